//! The backlog gauge (`Store::pending_gauge_within`): exact up to its bound, the rest
//! estimated from ids sampled beyond it, parked rows below the floor always counted.

use std::time::Duration;

use outbox_relay::config::OnFailed;
use sqlx::{Connection, PgConnection, PgPool};

use super::{hash, insert, reject, store};

#[sqlx::test(migrations = false)]
async fn the_gauge_is_exact_up_to_its_bound_and_samples_beyond_it(pool: PgPool) {
    let s = store(pool.clone()).await;
    // Producers that lock their aggregates themselves: the identity's ids, one per row, so
    // every id sampled beyond the bound is a row and the estimate comes out exact.
    let opts = pool.connect_options();
    let mut dense = PgConnection::connect_with(&opts).await.unwrap();
    sqlx::query("SET outboxrelay.order_lock = off")
        .execute(&mut dense)
        .await
        .unwrap();
    let mut rows = Vec::new();
    for i in 0..12 {
        rows.push(insert(&mut dense, &format!("g{i}")).await);
    }
    assert!(
        rows.windows(2).all(|w| w[1] == w[0] + 1),
        "dense ids {rows:?}"
    );
    s.mark_processed(&[rows[1], rows[3]]).await.unwrap();
    assert_eq!(s.pending_gauge_within(100).await.unwrap().0, 10);
    assert_eq!(
        s.pending_gauge_within(12).await.unwrap().0,
        10,
        "as many rows as the bound: nothing beyond"
    );
    // Reads rows 0 to 3 (two pending); every id sampled after row 3 is a pending row.
    assert_eq!(s.pending_gauge_within(4).await.unwrap().0, 10);
    s.mark_processed(&rows[4..]).await.unwrap();
    assert_eq!(s.pending_gauge_within(100).await.unwrap().0, 2);
    assert_eq!(
        s.pending_gauge_within(4).await.unwrap().0,
        2,
        "beyond the bound every sampled id is a processed row"
    );
    let (_, age) = s.pending_gauge_within(4).await.unwrap();
    assert!((0.0..60.0).contains(&age), "oldest pending age {age}");

    // With the order lock on each insert draws two ids: sampling finds rows at half of them.
    let locked: Vec<i64> = {
        let mut v = Vec::new();
        for i in 0..40 {
            v.push(insert(&pool, &format!("l{i}")).await);
        }
        v
    };
    assert!(
        locked.windows(2).all(|w| w[1] > w[0] + 1),
        "sparse ids {locked:?}"
    );
    let (estimate, _) = s.pending_gauge_within(4).await.unwrap();
    assert!(
        (20..=80).contains(&estimate),
        "42 pending, 2 of them among the 4 rows read, the rest sampled: {estimate}"
    );

    // Rows parked behind a FAILED row, below the floor, count whatever the bound.
    let failed = insert(&pool, "p").await;
    let parked = insert(&pool, "p").await;
    let mut fatal = reject(failed, Duration::ZERO);
    fatal.fatal = true;
    s.reject(&[fatal], 5, OnFailed::Block).await.unwrap();
    s.park(&[parked], &[hash(&pool, "p").await], OnFailed::Block)
        .await
        .unwrap();
    s.mark_processed(&rows).await.unwrap();
    s.mark_processed(&locked).await.unwrap();
    s.raise_floor(parked).await.unwrap();
    assert_eq!(s.pending_gauge_within(1).await.unwrap().0, 1);
    assert_eq!(s.backlog().await.unwrap().pending, 1);
}

/// A producer may write any `timestamptz` into `created_at`; those the relay cannot hold
/// as a time (±infinity, years past 262 000) reach it as `None` (the row then fails on
/// its own), and leave the backlog's age, the gauge and the list of failures working —
/// Postgres cannot subtract an infinite time, and decoding one panicked.
#[sqlx::test(migrations = false)]
async fn times_the_relay_cannot_represent_break_no_query(pool: PgPool) {
    let s = store(pool.clone()).await;
    let mut odd = Vec::new();
    for (agg, t) in [
        ("inf", "infinity"),
        ("minf", "-infinity"),
        ("far", "290000-01-01 00:00:00+00"),
        ("old", "4000-01-01 00:00:00+00 BC"),
    ] {
        let id = insert(&pool, agg).await;
        sqlx::query("UPDATE outbox SET created_at = $2::text::timestamptz WHERE id = $1")
            .bind(id)
            .bind(t)
            .execute(&pool)
            .await
            .unwrap();
        odd.push(id);
    }
    let normal = insert(&pool, "n").await;
    let rows = s.claim(None, 100, OnFailed::Block).await.unwrap();
    let times: Vec<(i64, bool)> = rows
        .iter()
        .map(|r| (r.id, r.created_at.is_some()))
        .collect();
    assert_eq!(
        times,
        vec![
            (odd[0], false),
            (odd[1], false),
            (odd[2], false),
            (odd[3], true),
            (normal, true)
        ]
    );
    let why = rows[0].to_message().unwrap_err();
    assert!(
        why.contains("created_at is not a time the relay can represent"),
        "{why}"
    );
    assert!(rows[3].to_message().is_ok(), "4000 BC is a time");

    let backlog = s.backlog().await.unwrap();
    assert_eq!(backlog.pending, 5);
    assert!(
        backlog.oldest_pending_age_seconds > 1e11,
        "4000 BC is the oldest representable: {}",
        backlog.oldest_pending_age_seconds
    );
    let (pending, age) = s.pending_gauge_within(100).await.unwrap();
    assert_eq!(pending, 5);
    assert!(age > 1e11, "gauge age {age}");
    let (pending, _) = s.pending_gauge_within(1).await.unwrap();
    assert!(pending >= 1, "estimated beyond the bound: {pending}");

    let mut fatal = reject(odd[0], Duration::ZERO);
    fatal.fatal = true;
    s.reject(&[fatal], 5, OnFailed::Block).await.unwrap();
    let failures = s.recent_failures(10).await.unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!((failures[0].id, failures[0].created_at), (odd[0], None));
}
