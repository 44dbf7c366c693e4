//! The Redis sink end to end against the local Redis (`TEST_REDIS_URL`, default
//! 127.0.0.1:6379) with the real relay loop: stream mode (SPEC fields, per-aggregate
//! entry order, all PROCESSED), pub/sub with a subscriber (the JSON envelope), pub/sub
//! with none (a rejection: rows FAILED, dead-lettered to a stream), a key holding the
//! wrong type (that row FAILED alone), and the sink's own contract: `close` ends every
//! outstanding confirm, `probe` follows the connection. Every key is unique to its test
//! and deleted.

use std::collections::HashMap;
use std::time::Duration;

use outbox_relay::model::Message;
use outbox_relay::sink::redis::{RedisMode, RedisSink};
use outbox_relay::sink::{Sink, SinkError};
use outbox_relay_testkit::{
    db::*,
    faults::Proxy,
    inproc::*,
    order::{check, Delivery},
    redis::*,
    wait::*,
};

const SETTLE: Duration = Duration::from_secs(90);

fn sink(cfg: &outbox_relay::sink::redis::RedisConfig) -> RedisSink {
    RedisSink::new(cfg, Duration::from_secs(5)).expect("valid Redis config")
}

/// The row's `headers` as the map the relay writes into the `headers` field.
fn headers_of(r: &DbRow) -> HashMap<String, String> {
    r.header_pairs().into_iter().collect()
}

/// 3 000 rows over 60 aggregates: one entry per row carrying the SPEC fields, each
/// aggregate's entries in `id` order, every row PROCESSED with no attempt spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_mode_many_aggregates_in_order() {
    let keys = TestKeys::new("stream");
    let table = TestTable::new("rds").await;
    table.insert_rows(&Row::grid(50, 60)).await;

    let sink = sink(&keys.config(RedisMode::Stream));
    relay_all(&table, sink, relay_config("5s"), 3_000, SETTLE).await;

    let got = stream_entries(&keys.key("order")).await;
    assert_eq!(got.len(), 3_000, "one entry per row");
    let db = table.rows().await;
    let by_event: HashMap<String, HashMap<String, String>> =
        got.iter().map(|e| (event_id(e), fields(e))).collect();
    for r in &db {
        let f = by_event
            .get(&r.event_id)
            .unwrap_or_else(|| panic!("lost: {r:?}"));
        assert_eq!(f.len(), 6, "exactly the SPEC fields: {f:?}");
        assert_eq!(f["event_type"], r.event_type);
        assert_eq!(f["aggregate_type"], r.aggregate_type);
        assert_eq!(f["aggregate_id"], r.aggregate_id);
        assert_eq!(
            f["payload"], r.payload,
            "payload is the JSON text as stored"
        );
        let h: HashMap<String, String> = serde_json::from_str(&f["headers"]).unwrap();
        assert_eq!(h, headers_of(r), "headers of row {}", r.id);
    }
    let id_of: HashMap<&str, (i64, &str)> = db
        .iter()
        .map(|r| (r.event_id.as_str(), (r.id, r.aggregate_id.as_str())))
        .collect();
    let events: Vec<String> = got.iter().map(event_id).collect();
    let report = check(events.iter().map(|e| Delivery {
        event: e,
        row: id_of.get(e.as_str()).copied(),
        partition: None,
    }));
    assert_eq!(
        report.assert_clean("stream entry order: "),
        0,
        "no duplicates"
    );
    keys.cleanup().await;
    table.drop_all().await;
}

/// Pub/sub with a subscriber: every event arrives once as one JSON object carrying
/// `event_id`, `event_type`, `aggregate_type`, `aggregate_id`, `headers` and `payload`
/// (as JSON, not a string).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_with_a_subscriber_gets_every_envelope() {
    let keys = TestKeys::new("pubsub");
    let channel = keys.key("order");
    let table = TestTable::new("rdp").await;
    let subscriber = Subscriber::start(&channel).await;
    table.produce(400, 20, 4).await;

    let relay = Running::start(
        table.store(),
        sink(&keys.config(RedisMode::Pubsub)),
        relay_config("5s"),
    );
    wait_until(SETTLE, "400 rows PROCESSED", || async {
        table.count("PROCESSED").await == 400
    })
    .await;
    relay.stop(Duration::from_secs(30)).await;
    wait_until(Duration::from_secs(10), "400 messages received", || async {
        subscriber.len() >= 400
    })
    .await;
    let got = subscriber.stop();
    assert_eq!(got.len(), 400);
    let db = table.rows().await;
    let mut envelopes: HashMap<String, serde_json::Value> = HashMap::new();
    for m in &got {
        let outbox_relay::sink::redis::tap::Received::Message { channel: c, body } = m else {
            panic!("not a pub/sub message: {m:?}")
        };
        assert_eq!(c, &channel);
        let v: serde_json::Value = serde_json::from_str(body).expect("one JSON object");
        let id = v["event_id"].as_str().expect("event_id").to_string();
        assert!(envelopes.insert(id, v).is_none(), "delivered once");
    }
    for r in &db {
        let v = envelopes
            .get(&r.event_id)
            .unwrap_or_else(|| panic!("lost: {r:?}"));
        assert_eq!(v.as_object().unwrap().len(), 6, "{v}");
        assert_eq!(v["event_type"], r.event_type.as_str());
        assert_eq!(v["aggregate_type"], r.aggregate_type.as_str());
        assert_eq!(v["aggregate_id"], r.aggregate_id.as_str());
        assert_eq!(v["headers"], r.headers);
        let payload: serde_json::Value = serde_json::from_str(&r.payload).unwrap();
        assert_eq!(v["payload"], payload);
    }
    keys.cleanup().await;
    table.drop_all().await;
}

/// Pub/sub with nobody subscribed: each PUBLISH reaches 0 receivers, a rejection, so
/// the rows end FAILED after `max_attempts` (3) with a readable `last_error`, and each
/// is dead-lettered to the `dead_letter_key` stream with that error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_without_a_subscriber_fails_the_rows() {
    let keys = TestKeys::new("nosub");
    let table = TestTable::new("rdn").await;
    let ids = [
        table
            .insert("a", "order.created", None, serde_json::json!({}))
            .await,
        table
            .insert("b", "order.created", None, serde_json::json!({}))
            .await,
    ];
    let mut cfg = keys.config(RedisMode::Pubsub);
    cfg.dead_letter_key = Some(keys.key("dead"));

    let relay = Running::start(table.store(), sink(&cfg), relay_config("5s"));
    wait_until(SETTLE, "both rows FAILED", || async {
        table.count("FAILED").await == 2
    })
    .await;
    relay.stop(Duration::from_secs(30)).await;
    let channel = keys.key("order");
    for id in ids {
        let (status, attempts, last_error) = table.row(id).await;
        assert_eq!((status.as_str(), attempts), ("FAILED", 3));
        let e = last_error.expect("last_error");
        assert!(
            e.contains("no subscriber on channel") && e.contains(&channel),
            "{e}"
        );
    }
    let dead = stream_entries(&keys.key("dead")).await;
    assert_eq!(dead.len(), 2, "both dead-lettered");
    for d in &dead {
        let f = fields(d);
        assert!(f["last_error"].contains("no subscriber"), "{f:?}");
        assert!(f.contains_key("event_id") && f.contains_key("payload"));
    }
    keys.cleanup().await;
    table.drop_all().await;
}

/// A row whose destination key holds a plain string: Redis answers WRONGTYPE, the row
/// is FAILED on its own with an error naming the key, and rows to other keys flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrongtype_key_fails_its_row_only() {
    let keys = TestKeys::new("wrongtype");
    let blocked = keys.key("blocked");
    let mut conn = redis_conn().await;
    let _: () = redis::AsyncCommands::set(&mut conn, &blocked, "not a stream")
        .await
        .expect("SET");
    let table = TestTable::new("rdw").await;
    let mut rows = Row::typo_between(None, &blocked);
    rows.extend([Row::new("a", 1), Row::new("c", 0).to(&keys.key("other"))]);
    table.insert_rows(&rows).await;

    let sink = sink(&keys.config(RedisMode::Stream));
    relay_until(&table, sink, relay_config("5s"), 4, 1).await;
    table.the_typo_failed(&["WRONGTYPE", &blocked]).await;
    assert_eq!(stream_entries(&keys.key("order")).await.len(), 3);
    assert_eq!(stream_entries(&keys.key("other")).await.len(), 1);
    keys.cleanup().await;
    table.drop_all().await;
}

fn message(id: i64, aggregate_id: &str) -> Message {
    Message {
        id,
        event_id: uuid::Uuid::new_v4(),
        aggregate_type: "order".into(),
        aggregate_id: aggregate_id.into(),
        event_type: "order.created".into(),
        destination: None,
        routing_key: None,
        payload: r#"{"n": 1}"#.into(),
        headers: vec![],
        created_at: chrono::Utc::now(),
        attempts: 0,
    }
}

/// With the server unreachable behind a frozen proxy, `close` ends every outstanding
/// confirm at once as `Unavailable` (none hangs, none is `Ok` or a rejection), `probe`
/// then says "not connected"; once the path is back, `connect` and `probe` succeed and
/// a send is confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_outstanding_confirms_and_probe_follows_the_connection() {
    let keys = TestKeys::new("close");
    let proxy = Proxy::start("127.0.0.1:6379").await;
    let mut cfg = keys.config(RedisMode::Stream);
    cfg.url = outbox_relay::secret::Secret::new(format!("redis://127.0.0.1:{}", proxy.port));
    // A response timeout far longer than the waits below: only `close` can end them.
    let mut sink = RedisSink::new(&cfg, Duration::from_secs(60)).expect("valid config");
    sink.connect().await.expect("connect through the proxy");
    sink.probe(Duration::from_secs(2)).await.expect("probe");

    proxy.freeze();
    let mut out = Vec::new();
    for i in 0..50 {
        let confirm = sink
            .send(&message(i, &format!("a{i}")))
            .await
            .expect("send");
        out.push(tokio::spawn(confirm));
    }
    let stalled = sink.probe(Duration::from_millis(300)).await;
    assert!(
        matches!(stalled, Err(SinkError::Unavailable(_))),
        "{stalled:?}"
    );
    sink.close().await;
    for c in out {
        let r = tokio::time::timeout(Duration::from_secs(5), c)
            .await
            .expect("every confirm ends after close")
            .expect("confirm task");
        assert!(matches!(r, Err(SinkError::Unavailable(_))), "{r:?}");
    }
    assert!(!sink.is_connected());
    assert!(sink.probe(Duration::from_secs(1)).await.is_err());

    proxy.thaw();
    sink.connect().await.expect("reconnect");
    sink.probe(Duration::from_secs(2))
        .await
        .expect("probe after reconnect");
    let c = sink.send(&message(99, "after")).await.expect("send");
    c.await.expect("confirmed");
    sink.close().await;
    keys.cleanup().await;
}
