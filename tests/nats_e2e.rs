//! The NATS JetStream sink end to end against the local nats-server (127.0.0.1:4222, or
//! `TEST_NATS_URL`), each test on a stream of its own: SPEC §2 subjects, headers and
//! body in per-aggregate order; a subject no stream captures fails its row alone; and a
//! relay SIGKILLed again and again leaves each event in the stream exactly once
//! (JetStream drops a re-publish by its `Nats-Msg-Id`).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outbox_relay::sink::nats::NatsSink;
use outbox_relay_testkit::{db::*, faults::Producer, hex_id, inproc::*, nats::*, relay_proc::*};

/// A stream and a table of their own, and a subject no stream captures.
async fn nowhere_setup(prefix: &str) -> (TestStream, TestTable, String) {
    let stream = TestStream::new(prefix).await;
    let table = TestTable::new(prefix).await;
    (stream, table, format!("nt_nowhere_{}.events", hex_id()))
}

/// 3 000 rows over 60 aggregates: subject from the template, body = payload JSON,
/// headers = the row's plus `Nats-Msg-Id`/`event_id` = event_id and the metadata; the
/// stream holds each once, per aggregate in `id` order; every row PROCESSED, no attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_arrive_once_with_spec_headers_in_order() {
    let stream = TestStream::new("nt").await;
    let table = TestTable::new("nt").await;
    table.insert_rows(&Row::grid(50, 60)).await;

    let sink = NatsSink::new(&nats_config(&stream.template()), Duration::from_secs(10)).unwrap();
    let within = Duration::from_secs(120);
    let took = relay_all(&table, sink, relay_config("10s"), 3_000, within).await;
    println!("relayed 3 000 rows in {took:?}");

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
        let mut want = r.spec_headers();
        want.push(("Nats-Msg-Id".into(), r.event_id.clone()));
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
    let (stream, table, nowhere) = nowhere_setup("nt").await;
    let mut rows = Row::typo_between(None, &nowhere);
    rows.push(Row::new("typo", 1));
    table.insert_rows(&rows).await;
    let sink = NatsSink::new(&nats_config(&stream.template()), Duration::from_secs(10)).unwrap();
    relay_until(&table, sink, relay_config("10s"), 2, 1).await;
    let mentions = ["no JetStream stream captures subject", &nowhere];
    table.the_typo_failed(&mentions).await;
    table.assert_later_row_waits(3).await;
    assert_eq!(stream.count().await, 2);
    stream.delete().await;
    table.drop_all().await;
}

/// With `nats.dead_letter_subject` set, a row that ends FAILED is also published there,
/// with the SPEC headers, `last_error` and `original_subject`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_row_is_dead_lettered() {
    let (stream, table, nowhere) = nowhere_setup("ntdl").await;
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
