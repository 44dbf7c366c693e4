//! The NATS JetStream sink end to end against the local nats-server (127.0.0.1:4222, or
//! `TEST_NATS_URL`), each test on a stream of its own: SPEC §2 subjects, headers and
//! body in per-aggregate order; a subject no stream captures fails its row alone; and a
//! relay SIGKILLed again and again leaves each event in the stream exactly once
//! (JetStream drops a re-publish by its `Nats-Msg-Id`).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use outbox_relay::sink::nats::NatsSink;
use outbox_relay_testkit::{
    db::*, faults::Producer, hex_id, inproc::*, nats::*, relay_proc::*, wait::*,
};

/// 3 000 rows over 60 aggregates: subject from the template, body = payload JSON,
/// headers = the row's plus `Nats-Msg-Id`/`event_id` = event_id and the metadata; the
/// stream holds each once, per aggregate in `id` order; every row PROCESSED, no attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_arrive_once_with_spec_headers_in_order() {
    let stream = TestStream::new("nt").await;
    let table = TestTable::new("nt").await;
    let rows: Vec<Row> = (0..50)
        .flat_map(|seq| (0..60).map(move |a| Row::new(&format!("order-{a}"), seq)))
        .collect();
    table.insert_rows(&rows).await;

    let started = Instant::now();
    let sink = NatsSink::new(&nats_config(&stream.template()), Duration::from_secs(10)).unwrap();
    let relay = Running::start(table.store(), sink, relay_config("10s"));
    wait_until(Duration::from_secs(120), "3 000 rows PROCESSED", || async {
        table.count_where("status = 'PROCESSED'").await == 3_000
    })
    .await;
    println!("relayed 3 000 rows in {:?}", started.elapsed());
    relay.stop(Duration::from_secs(30)).await;
    assert_eq!(
        table
            .count_where("processed_at IS NULL OR attempts <> 0 OR last_error IS NOT NULL")
            .await,
        0
    );

    let got = stream.messages().await;
    assert_eq!(got.len(), 3_000, "the stream holds each event once");
    let by_event: HashMap<&str, &Stored> = got
        .iter()
        .map(|m| (m.header("event_id").unwrap(), m))
        .collect();
    let db = table.rows().await;
    let subject = format!("{}.order.order.updated", stream.name);
    for r in &db {
        let m = by_event
            .get(r.event_id.as_str())
            .unwrap_or_else(|| panic!("lost: {r:?}"));
        assert_eq!(m.subject, subject);
        assert_eq!(m.payload, r.payload, "body is the payload JSON as stored");
        let mut want: Vec<(String, String)> = r
            .headers
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        for (k, v) in [
            ("Nats-Msg-Id", &r.event_id),
            ("event_id", &r.event_id),
            ("event_type", &r.event_type),
            ("aggregate_type", &r.aggregate_type),
            ("aggregate_id", &r.aggregate_id),
        ] {
            want.push((k.to_string(), v.clone()));
        }
        want.sort();
        assert_eq!(m.headers, want, "headers of row {}", r.id);
    }
    let report = nats_order(&db, &got);
    assert_eq!(report.assert_clean(""), 0, "no duplicates");
    stream.delete().await;
    table.drop_all().await;
}

/// A row whose destination subject no stream captures fails on its own (attempts spent,
/// a last_error naming the subject); the others go through; its aggregate's later row
/// waits (`on_failed = block`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_no_stream_captures_fails_its_row_only() {
    let stream = TestStream::new("nt").await;
    let table = TestTable::new("nt").await;
    let nowhere = format!("nt_nowhere_{}.events", hex_id());
    table
        .insert_rows(&[
            Row::new("a", 0),
            Row::new("typo", 0).to(&nowhere),
            Row::new("b", 0),
            Row::new("typo", 1),
        ])
        .await;
    let sink = NatsSink::new(&nats_config(&stream.template()), Duration::from_secs(10)).unwrap();
    relay_until(&table, sink, relay_config("10s"), 2, 1).await;
    let (failed, why) = table.the_failed().await;
    assert_eq!((failed.aggregate_id.as_str(), failed.attempts), ("typo", 3));
    assert!(
        why.contains("no JetStream stream captures subject") && why.contains(&nowhere),
        "{why}"
    );
    assert_eq!(
        table.rows().await[3].status,
        "PENDING",
        "the aggregate's later row waits"
    );
    assert_eq!(stream.count().await, 2);
    stream.delete().await;
    table.drop_all().await;
}

/// With `nats.dead_letter_subject` set, a row that ends FAILED is also published there,
/// with the SPEC headers, `last_error` and `original_subject`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_row_is_dead_lettered() {
    let stream = TestStream::new("ntdl").await;
    let table = TestTable::new("ntdl").await;
    let nowhere = format!("nt_nowhere_{}.events", hex_id());
    table
        .insert_rows(&[Row::new("ok", 0), Row::new("typo", 0).to(&nowhere)])
        .await;
    let mut cfg = nats_config(&stream.template());
    cfg.dead_letter_subject = Some(format!("{}.dead", stream.name));
    let sink = NatsSink::new(&cfg, Duration::from_secs(10)).unwrap();
    let relay = Running::start(table.store(), sink, relay_config("10s"));
    table.wait_settled(1, 1, Duration::from_secs(60)).await;
    stream.wait_count(2, Duration::from_secs(10)).await;
    relay.stop(Duration::from_secs(30)).await;
    let db = table.rows().await;
    let got = stream.messages().await;
    let dead = got
        .iter()
        .find(|m| m.subject == format!("{}.dead", stream.name))
        .expect("dead-lettered message");
    assert_eq!(dead.header("event_id"), Some(db[1].event_id.as_str()));
    assert_eq!(dead.header("original_subject"), Some(nowhere.as_str()));
    assert!(dead
        .header("last_error")
        .is_some_and(|e| e.contains("no JetStream stream captures subject")));
    assert_eq!(dead.payload, db[1].payload);
    stream.delete().await;
    table.drop_all().await;
}

/// The relay process SIGKILLed 6 times at random points (start-up, claim, publish, ack,
/// mark) while producers keep committing, restarted each time, then one run drains
/// everything: the stream holds every event exactly once, per aggregate in `id` order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_relay_leaves_each_event_once_in_order() {
    let stream = TestStream::new("ntkill").await;
    let table = TestTable::new("ntkill").await;
    let env = nats_env(
        &table.name,
        &stream.template(),
        &[
            // Short leases so each new run takes the killed one's partitions over quickly.
            ("OUTBOX_RELAY__RELAY__LEASE_TIMEOUT", "1s"),
            ("OUTBOX_RELAY__RELAY__PUBLISH_TIMEOUT", "800ms"),
            ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "200"),
        ],
    );
    table.produce(2_000, 40, 4).await;
    let producer = Producer::start(&table.pool, &table.name, 40, 4, Duration::from_millis(2));
    let progress = kill_repeatedly(&env, &table, 6, 300..=1500).await;
    println!("(lifetime ms, processed after) {progress:?}");

    let relay = RelayProc::start(&env);
    let (commits, _) = producer.stop().await;
    table
        .wait_no_pending(Duration::from_secs(120), "the last run drains the table")
        .await;
    drop(relay);
    let db = table.rows().await;
    assert_eq!(db.len() as u64, 2_000 + commits);
    assert!(db.iter().all(|r| r.status == "PROCESSED"), "all PROCESSED");
    stream
        .wait_count(db.len() as u64, Duration::from_secs(30))
        .await;
    let got = stream.messages().await;
    let ids: HashSet<&str> = got.iter().filter_map(|m| m.header("event_id")).collect();
    assert_eq!(ids.len(), got.len(), "no event stored twice");
    assert_eq!(got.len(), db.len(), "each event stored once");
    assert!(
        db.iter().all(|r| ids.contains(r.event_id.as_str())),
        "none lost"
    );
    nats_order(&db, &got).assert_clean("");
    println!(
        "{} events, each stored exactly once after 6 SIGKILLs",
        got.len()
    );
    stream.delete().await;
    table.cleanup().await;
}
