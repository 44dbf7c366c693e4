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
