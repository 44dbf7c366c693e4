//! The doorbell (schemas 6 and 7): producers' commits notify only while a relay instance holds
//! its locks; a relay cannot take it while a producer that decided not to notify is still
//! open; one instance holds it at a time.

use outbox_relay::store::doorbell::{ring, unring, Rung};
use sqlx::postgres::PgListener;
use sqlx::{Acquire, PgPool};

use super::{insert, store};

/// The notifications that arrive before a marker sent now (in commit order: a
/// notification of an earlier commit arrives before it).
async fn before_marker(l: &mut PgListener, pool: &PgPool, channel: &str) -> usize {
    sqlx::query("SELECT pg_notify($1, 'marker')")
        .bind(channel)
        .execute(pool)
        .await
        .unwrap();
    let mut n = 0;
    loop {
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), l.recv())
            .await
            .expect("the marker arrives")
            .unwrap();
        if got.payload() == "marker" {
            return n;
        }
        n += 1;
    }
}

#[sqlx::test(migrations = false)]
async fn producers_notify_only_while_a_relay_holds_the_bell(pool: PgPool) {
    let s = store(pool.clone()).await;
    let channel = s.notify_channel().await.unwrap();
    let key = s.doorbell_key().await.unwrap();
    let mut l = PgListener::connect_with(&pool).await.unwrap();
    l.listen(&channel).await.unwrap();
    let mut relay = pool.acquire().await.unwrap();

    insert(&pool, "a").await;
    assert_eq!(
        before_marker(&mut l, &pool, &channel).await,
        0,
        "no bell, no NOTIFY"
    );

    assert_eq!(
        ring(relay.acquire().await.unwrap(), key).await.unwrap(),
        Rung::Held
    );
    insert(&pool, "b").await;
    let mut tx = pool.begin().await.unwrap();
    insert(&mut *tx, "c").await;
    insert(&mut *tx, "d").await;
    tx.commit().await.unwrap();
    assert_eq!(
        before_marker(&mut l, &pool, &channel).await,
        2,
        "one NOTIFY per committed transaction"
    );

    unring(relay.acquire().await.unwrap()).await.unwrap();
    insert(&pool, "e").await;
    assert_eq!(
        before_marker(&mut l, &pool, &channel).await,
        0,
        "let go: quiet again"
    );
}

#[sqlx::test(migrations = false)]
async fn the_bell_waits_for_producers_that_did_not_notify_and_has_one_holder(pool: PgPool) {
    let s = store(pool.clone()).await;
    let key = s.doorbell_key().await.unwrap();
    let mut first = pool.acquire().await.unwrap();
    let mut second = pool.acquire().await.unwrap();

    // A producer inserted while nobody listened and is still open: its commit will not
    // notify, so no relay may start listening before it ends (it would miss the row).
    let mut open = pool.begin().await.unwrap();
    insert(&mut *open, "a").await;
    assert_eq!(ring(&mut first, key).await.unwrap(), Rung::Busy);
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()",
    )
    .fetch_one(&mut *first)
    .await
    .unwrap();
    assert_eq!(held, 0, "a refused attempt holds nothing");
    open.commit().await.unwrap();

    assert_eq!(ring(&mut first, key).await.unwrap(), Rung::Held);
    assert_eq!(
        ring(&mut second, key).await.unwrap(),
        Rung::Covered,
        "one holder at a time"
    );
    // Held: a producer does not keep a slot (it notifies instead), so nothing waits on it.
    let mut open = pool.begin().await.unwrap();
    insert(&mut *open, "b").await;
    unring(&mut first).await.unwrap();
    assert_eq!(ring(&mut second, key).await.unwrap(), Rung::Held);
    open.commit().await.unwrap();
    // The holder's session ends (a relay that dies): the bell is free again.
    sqlx::Connection::close(second.detach()).await.unwrap();
    assert_eq!(ring(&mut first, key).await.unwrap(), Rung::Held);
}
