//! nats-server stopped in the middle of a run (`start-stop-daemon --stop`), then started
//! again: nothing is lost, no row spends an attempt, the stream holds each event once
//! (JetStream drops re-publishes by `Nats-Msg-Id`), per aggregate in `id` order, and
//! `outbox_relay_broker_up` drops to 0 and comes back to 1 while `/readyz` stays 200.
//! Disruptive: runs in the serial phase of `scripts/test.sh`, and always starts the
//! server again (`NatsStartOnDrop`), whatever happens to the test.

use std::time::Duration;

use outbox_relay_testkit::{db::*, nats::*, relay_proc::*, wait::*};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_stopped_mid_run_loses_nothing_and_spends_no_attempts() {
    let stream = TestStream::new("fnstop").await;
    let table = TestTable::new("fnstop").await;
    let relay = RelayProc::start(&nats_env(&table.name, &stream.template(), &[]));
    let producer = {
        let t = TestTable {
            name: table.name.clone(),
            pool: table.pool.clone(),
        };
        tokio::spawn(async move { t.produce(6_000, 60, 4).await })
    };
    wait_for(Duration::from_secs(30), "relaying under way", || async {
        (table.count("PROCESSED").await > 300).then_some(())
    })
    .await;
    wait_broker_up(&relay, true, Duration::from_secs(10)).await;

    let guard = NatsStartOnDrop;
    stop_nats();
    wait_broker_up(&relay, false, Duration::from_secs(30)).await;
    let stuck = table.count("PROCESSED").await;
    assert_eq!(
        relay.get("/readyz").await.map(|r| r.0),
        Some(200),
        "readiness does not follow the broker"
    );
    assert_eq!(
        relay.get("/livez").await.map(|r| r.0),
        Some(200),
        "alive while waiting for the broker"
    );
    table
        .assert_no_attempts("an outage spends no attempts")
        .await;
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
    let ids: std::collections::HashSet<&str> =
        got.iter().filter_map(|m| m.header("event_id")).collect();
    assert!(
        db.iter().all(|r| ids.contains(r.event_id.as_str())),
        "nothing lost (stopped at {stuck} processed)"
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
