//! nats-server stopped in the middle of a run (`start-stop-daemon --stop`), then started
//! again: nothing is lost, no row spends an attempt, the stream holds each event once
//! (JetStream drops re-publishes by `Nats-Msg-Id`), per aggregate in `id` order, and
//! `outbox_relay_broker_up` drops to 0 and comes back to 1 while `/readyz` stays 200.
//! The path to the server attacked through a TCP proxy (frozen with the sockets open, or
//! cut) three times while rows keep coming: the same, each event stored once.
//! Disruptive: runs in the serial phase of `scripts/test.sh`, and always starts the
//! server again (`NatsStartOnDrop`), whatever happens to the test.

use std::time::Duration;

use outbox_relay_testkit::{db::*, faults::*, nats::*, relay_proc::*};

/// Every row of `db` is among the stream's messages `got` (by `event_id`); `what` is the
/// message if not.
fn assert_none_lost(db: &[DbRow], got: &[Stored], what: &str) {
    let ids: std::collections::HashSet<&str> =
        got.iter().filter_map(|m| m.header("event_id")).collect();
    assert!(
        db.iter().all(|r| ids.contains(r.event_id.as_str())),
        "{what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_stopped_mid_run_loses_nothing_and_spends_no_attempts() {
    let stream = TestStream::new("fnstop").await;
    let table = TestTable::new("fnstop").await;
    let relay = RelayProc::start(&nats_env(&table.name, &stream.template(), &[]));
    let producer = table.produce_aside(6_000, 60, 4);
    table
        .wait_processed_over(300, Duration::from_secs(30))
        .await;
    wait_broker_up(&relay, true, Duration::from_secs(10)).await;

    let guard = NatsStartOnDrop;
    stop_nats();
    assert_outage_ridden_out(&relay, &table, Duration::from_secs(30)).await;
    let stuck = table.count("PROCESSED").await;
    drop(guard); // starts nats-server again and waits for its port

    producer.await.unwrap();
    table
        .wait_status("PROCESSED", 6_000, Duration::from_secs(180))
        .await;
    wait_broker_up(&relay, true, Duration::from_secs(30)).await;
    assert_eq!(
        table
            .count_where("attempts <> 0 OR last_error IS NOT NULL")
            .await,
        0,
        "no row's attempts grew"
    );
    stream.wait_count(6_000, Duration::from_secs(30)).await;
    let got = stream.messages().await;
    let db = table.rows().await;
    assert_none_lost(
        &db,
        &got,
        &format!("nothing lost (stopped at {stuck} processed)"),
    );
    assert_eq!(got.len(), 6_000, "each event stored once");
    nats_order(&db, &got).assert_clean("");
    println!("nats-server stop/start at {stuck} processed: 6 000 stored once, in order");
    drop(relay);
    stream.delete().await;
    table.cleanup().await;
}

/// nats-server stopped while the relay has nothing to send: `broker_up` drops to 0 from
/// the probe alone and is 1 again after the restart; a row written then is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_stopped_while_idle_shows_in_broker_up() {
    let stream = TestStream::new("fnidle").await;
    let table = TestTable::new("fnidle").await;
    let relay = RelayProc::start(&nats_env(&table.name, &stream.template(), &[]));
    wait_broker_up(&relay, true, Duration::from_secs(20)).await;
    let guard = NatsStartOnDrop;
    stop_nats();
    wait_broker_up(&relay, false, Duration::from_secs(20)).await;
    drop(guard);
    wait_broker_up(&relay, true, Duration::from_secs(30)).await;
    table
        .insert("after", "order.created", None, serde_json::json!({}))
        .await;
    table
        .wait_status("PROCESSED", 1, Duration::from_secs(30))
        .await;
    stream.wait_count(1, Duration::from_secs(10)).await;
    drop(relay);
    stream.delete().await;
    table.cleanup().await;
}

/// Freeze or cut the relay's path to nats-server 3 times while producers keep writing.
async fn proxy_attack(prefix: &str, attack: &str, cut: bool) {
    let stream = TestStream::new(prefix).await;
    let table = TestTable::new(prefix).await;
    let upstream = nats_url()
        .split_once("://")
        .map(|(_, h)| h.to_string())
        .unwrap();
    let proxy = Proxy::start(&upstream).await;
    let url = format!("nats://127.0.0.1:{}", proxy.port);
    let env = nats_env(
        &table.name,
        &stream.template(),
        &[("OUTBOX_RELAY__NATS__URL", url.as_str())],
    );
    let (relay, producer) = attack_through_proxy(&proxy, &table, env, attack, cut).await;
    let (commits, _) = producer.stop().await;
    table
        .wait_no_pending(
            Duration::from_secs(120),
            "everything relayed after the attack",
        )
        .await;
    drop(relay);
    table.assert_no_attempts("no row spent an attempt").await;
    let db = table.rows().await;
    assert!(db.iter().all(|r| r.status == "PROCESSED"), "all PROCESSED");
    stream
        .wait_count(db.len() as u64, Duration::from_secs(30))
        .await;
    let got = stream.messages().await;
    assert_none_lost(&db, &got, "none lost");
    assert_eq!(got.len(), db.len(), "each event stored once");
    nats_order(&db, &got).assert_clean("");
    println!(
        "{attack}: {} events (producers committed {commits}) stored once, in order; proxy saw {} connections",
        db.len(),
        proxy.connections.load(std::sync::atomic::Ordering::SeqCst)
    );
    stream.delete().await;
    table.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn network_freeze_to_nats_loses_nothing() {
    proxy_attack("fnnfreeze", "NATS network freeze x3", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn network_cut_to_nats_loses_nothing() {
    proxy_attack("fnncut", "NATS network cut x3", true).await;
}
