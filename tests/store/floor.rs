//! The claim floor (schema 5): what raises it, what lowers it, and the retries that wait
//! below it.

use std::time::Duration;

use outbox_relay::config::OnFailed;
use sqlx::PgPool;

use super::{hash, insert, reject, scan_from, scanned, store};

#[sqlx::test(migrations = false)]
async fn the_floor_rises_past_settled_rows_only_and_drops_for_reopened_ones(pool: PgPool) {
    let s = store(pool.clone()).await;
    let mut rows = Vec::new();
    for i in 0..6 {
        rows.push(insert(&pool, &format!("f{i}")).await);
    }
    s.mark_processed(&rows[..3]).await.unwrap();
    let top = rows[5];
    assert_eq!(
        s.raise_floor(top).await.unwrap(),
        rows[3] - 1,
        "stops below the first pending row"
    );
    s.mark_processed(&rows[3..]).await.unwrap();
    assert_eq!(
        s.raise_floor(rows[4]).await.unwrap(),
        rows[4],
        "never past the horizon"
    );
    assert_eq!(s.raise_floor(top).await.unwrap(), top);

    // A FAILED row is settled (the floor passes it); a parked one too.
    let failed = insert(&pool, "g").await;
    let parked = insert(&pool, "g").await;
    let mut fatal = reject(failed, Duration::ZERO);
    fatal.fatal = true;
    s.reject(&[fatal], 5, OnFailed::Block).await.unwrap();
    assert_eq!(
        s.park(&[parked], &[hash(&pool, "g").await], OnFailed::Block)
            .await
            .unwrap(),
        1
    );
    assert_eq!(s.raise_floor(parked).await.unwrap(), parked);
    assert_eq!(scanned(&s).await, Vec::<i64>::new());

    // Replay re-opens both below the floor: it drops, with a new epoch, and the scan
    // from the floor finds them again.
    let before = s.floor().await.unwrap();
    assert_eq!(s.replay(Some(&[failed])).await.unwrap(), vec![failed]);
    let after = s.floor().await.unwrap();
    assert_eq!(after.floor, failed - 1);
    assert_eq!(after.epoch, before.epoch + 1);
    let page = scan_from(&s, after.floor).await;
    assert_eq!(
        page.rows.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![failed, parked]
    );
    assert_eq!(page.floor, Some(after));
}

#[sqlx::test(migrations = false)]
async fn rows_behind_a_waiting_retry_park_and_come_back_when_it_is_released(pool: PgPool) {
    let s = store(pool.clone()).await;
    let (a1, a2) = (insert(&pool, "a").await, insert(&pool, "a").await);
    let ha = hash(&pool, "a").await;
    let wait = reject(a1, Duration::from_secs(3600));
    s.reject(std::slice::from_ref(&wait), 5, OnFailed::Skip)
        .await
        .unwrap();
    assert_eq!(
        s.park(&[a2], &[ha], OnFailed::Skip).await.unwrap(),
        1,
        "behind a waiting retry"
    );
    assert_eq!(
        s.raise_floor(a2).await.unwrap(),
        a2,
        "neither holds the floor"
    );
    // Due: found below the cursor, through the due index.
    sqlx::query("UPDATE outbox SET next_attempt_at = now() - interval '1 second' WHERE id = $1")
        .bind(a1)
        .execute(&pool)
        .await
        .unwrap();
    let page = scan_from(&s, a2).await;
    assert_eq!(
        (page.rows.len(), page.due.len(), page.due[0].id),
        (0, 1, a1)
    );
    // Confirmed: marked with its parked row released, the floor lowered below it.
    let epoch = s.floor().await.unwrap().epoch;
    assert_eq!(s.mark_released(&[a1]).await.unwrap(), 1);
    assert_eq!(s.floor().await.unwrap().floor, a2 - 1);
    assert_eq!(s.floor().await.unwrap().epoch, epoch + 1);
    assert_eq!(scanned(&s).await, vec![a2]);

    // Skip mode: a retry that ends FAILED releases what waited behind it.
    let a3 = insert(&pool, "a").await;
    s.reject(&[reject(a2, Duration::from_secs(3600))], 2, OnFailed::Skip)
        .await
        .unwrap();
    assert_eq!(s.park(&[a3], &[ha], OnFailed::Skip).await.unwrap(), 1);
    let out = s
        .reject(&[reject(a2, Duration::ZERO)], 2, OnFailed::Skip)
        .await
        .unwrap();
    assert!(out[0].failed);
    assert_eq!(scanned(&s).await, vec![a3]);
}

#[sqlx::test(migrations = false)]
async fn parked_rows_whose_blocker_is_gone_are_unparked_by_the_safety_net(pool: PgPool) {
    let s = store(pool.clone()).await;
    let (a1, a2, a3) = (
        insert(&pool, "a").await,
        insert(&pool, "a").await,
        insert(&pool, "a").await,
    );
    let ha = hash(&pool, "a").await;
    s.reject(&[reject(a1, Duration::from_secs(3600))], 5, OnFailed::Block)
        .await
        .unwrap();
    assert_eq!(
        s.park(&[a2, a3], &[ha, ha], OnFailed::Block).await.unwrap(),
        2
    );
    assert_eq!(
        s.unpark_orphans(OnFailed::Block, 10).await.unwrap(),
        0,
        "a1 still waits"
    );
    // a1 marked without its release (what a late rejection by a former holder can leave).
    s.mark_processed(&[a1]).await.unwrap();
    let epoch = s.floor().await.unwrap().epoch;
    assert_eq!(
        s.unpark_orphans(OnFailed::Block, 10).await.unwrap(),
        2,
        "both, though a3 is behind the parked a2"
    );
    assert_eq!(s.floor().await.unwrap().epoch, epoch + 1);
    assert_eq!(scanned(&s).await, vec![a2, a3]);
}

/// The horizon probe's contract: every transaction that drew an id at or below the
/// probe's `top` and is still open is on its list of writers, however its xid compares
/// with others' (T takes its xid after U but draws its id before U; U commits, T stays
/// open), and leaves the list when it ends. A transaction writing elsewhere is not listed.
#[sqlx::test(migrations = false)]
async fn the_probe_lists_every_open_writer_of_the_table(pool: PgPool) {
    let s = store(pool.clone()).await;
    let mut elsewhere = pool.begin().await.unwrap();
    sqlx::query("CREATE TEMP TABLE probe_elsewhere(x int)")
        .execute(&mut *elsewhere)
        .await
        .unwrap();
    sqlx::query("INSERT INTO probe_elsewhere VALUES (1)")
        .execute(&mut *elsewhere)
        .await
        .unwrap();
    let (mut u, mut t) = (pool.begin().await.unwrap(), pool.begin().await.unwrap());
    let vxid =
        "SELECT virtualxid FROM pg_locks WHERE locktype = 'virtualxid' AND pid = pg_backend_pid()";
    let xid = "SELECT pg_current_xact_id()::text::bigint";
    let ux: i64 = sqlx::query_scalar(xid).fetch_one(&mut *u).await.unwrap();
    let tv: String = sqlx::query_scalar(vxid).fetch_one(&mut *t).await.unwrap();
    let ev: String = sqlx::query_scalar(vxid)
        .fetch_one(&mut *elsewhere)
        .await
        .unwrap();
    let open = insert(&mut *t, "t").await;
    let tx: i64 = sqlx::query_scalar(xid).fetch_one(&mut *t).await.unwrap();
    assert!(tx > ux);
    let sent = insert(&mut *u, "u").await;
    assert!(open < sent);
    u.commit().await.unwrap();
    let p1 = s.probe().await.unwrap();
    assert_eq!(p1.top, sent, "row `open` is not visible, a later one is");
    assert_eq!(
        p1.writers.clone().unwrap(),
        vec![tv.clone()],
        "T only: U ended, `elsewhere` writes elsewhere"
    );
    assert!(!p1.writers.unwrap().contains(&ev));
    let p2 = s.probe().await.unwrap();
    assert_eq!(p2.writers, Some(vec![tv]), "still open");
    t.commit().await.unwrap();
    let p3 = s.probe().await.unwrap();
    assert_eq!(p3.writers, Some(vec![]));
    elsewhere.rollback().await.unwrap();
}
