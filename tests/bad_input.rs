//! The bad-input matrix (SPEC §3.7): every row that cannot be published fails on its own,
//! with a `last_error` a person can read, while good rows around it — same batch, other
//! aggregates — are delivered. One test per broker; each row of the matrix is its own
//! aggregate. Not disruptive (parallel phase). Redis runs in stream mode against the
//! local server (its `proto-max-bulk-len` is server-wide, so the size limit is attacked
//! in `faults_redis.rs`, not here). The Kafka half runs against librdkafka's
//! mock cluster with a small `message.max.bytes` (RabbitMQ's max message size is a
//! node-wide setting, 128 MiB by default, not changeable per test); the relay binary is
//! the child process in both.

use std::time::Duration;

use outbox_relay::sink::redis::RedisMode;
use outbox_relay_testkit::{db::*, faults::*, rabbit::*, redis::*, relay_proc::*, unique};

/// One bad row of the matrix: its aggregate, what to insert, and what `last_error` must say.
struct Case {
    name: &'static str,
    aggregate_id: String,
    event_type: String,
    destination: Option<String>,
    routing_key: Option<String>,
    headers: serde_json::Value,
    payload: serde_json::Value,
    /// Substrings `last_error` must contain (all of them).
    expect: Vec<String>,
    /// Rejections before FAILED: 1 for input no retry can fix (validated before any
    /// broker sees it), `max_attempts` for a broker's verdict.
    attempts: i32,
}

impl Case {
    fn new(name: &'static str, expect: &[&str], attempts: i32) -> Case {
        Case {
            name,
            aggregate_id: format!("bad-{name}"),
            event_type: "order.created".into(),
            destination: None,
            routing_key: None,
            headers: serde_json::json!({}),
            payload: serde_json::json!({"case": name}),
            expect: expect.iter().map(|s| s.to_string()).collect(),
            attempts,
        }
    }
    fn dest(mut self, d: impl Into<String>) -> Self {
        self.destination = Some(d.into());
        self
    }
    fn headers(mut self, h: serde_json::Value) -> Self {
        self.headers = h;
        self
    }
}

async fn insert(table: &str, pool: &sqlx::PgPool, c: &Case) -> i64 {
    sqlx::query_scalar(&format!(
        "INSERT INTO \"{table}\" (aggregate_type, aggregate_id, event_type, destination, routing_key, payload, headers)
         VALUES ('order', $1, $2, $3, $4, $5, $6) RETURNING id"
    ))
    .bind(&c.aggregate_id)
    .bind(&c.event_type)
    .bind(&c.destination)
    .bind(&c.routing_key)
    .bind(&c.payload)
    .bind(&c.headers)
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("insert case {}: {e}", c.name))
}

/// Insert good rows and the cases interleaved; returns (case, id) pairs.
async fn load<'c>(
    table: &TestTable,
    cases: &'c [Case],
    good_per_gap: usize,
) -> Vec<(&'c Case, i64)> {
    let mut out = Vec::new();
    let mut g = 0;
    for c in cases {
        for _ in 0..good_per_gap {
            table
                .insert(
                    &format!("good-{}", g % 7),
                    "order.created",
                    None,
                    serde_json::json!({"k": "v"}),
                )
                .await;
            g += 1;
        }
        out.push((c, insert(&table.name, &table.pool, c).await));
    }
    for _ in 0..good_per_gap {
        table
            .insert(
                &format!("good-{}", g % 7),
                "order.created",
                None,
                serde_json::json!({}),
            )
            .await;
        g += 1;
    }
    out
}

/// Every case FAILED with its expected `last_error` and attempts; prints the matrix.
async fn check_cases(table: &TestTable, loaded: &[(&Case, i64)]) {
    println!(
        "{:<28} {:>8} {:>8}  last_error",
        "case", "status", "attempts"
    );
    for (c, id) in loaded {
        let (status, attempts, err) = table.row(*id).await;
        let err = err.unwrap_or_default();
        println!("{:<28} {:>8} {:>8}  {}", c.name, status, attempts, err);
        assert_eq!(status, "FAILED", "case {}: {err}", c.name);
        assert_eq!(attempts, c.attempts, "case {} attempts: {err}", c.name);
        for want in &c.expect {
            assert!(
                err.contains(want.as_str()),
                "case {}: last_error {err:?} should mention {want:?}",
                c.name
            );
        }
    }
}

fn common_cases(max_attempts: i32) -> Vec<Case> {
    let _ = max_attempts;
    vec![
        Case::new(
            "headers_array",
            &["headers must be a JSON object", "an array"],
            1,
        )
        .headers(serde_json::json!(["traceparent"])),
        Case::new(
            "headers_string",
            &["headers must be a JSON object", "a string"],
            1,
        )
        .headers(serde_json::json!("traceparent=1")),
        Case::new(
            "headers_null",
            &["headers must be a JSON object", "null"],
            1,
        )
        .headers(serde_json::Value::Null),
        Case::new("header_number", &["\"retries\" holds a number"], 1)
            .headers(serde_json::json!({"traceparent": "00-1-2-01", "retries": 3})),
        Case::new("header_object", &["\"meta\" holds an object"], 1)
            .headers(serde_json::json!({"meta": {"a": "b"}})),
        Case::new("header_bool", &["\"flag\" holds a boolean"], 1)
            .headers(serde_json::json!({"flag": true})),
        Case::new("header_null_value", &["\"gone\" holds null"], 1)
            .headers(serde_json::json!({"gone": null})),
        Case::new("header_key_too_long", &["headers key", "1 to 255 bytes"], 1)
            .headers(serde_json::json!({ "k".repeat(300): "v" })),
        {
            let mut c = Case::new("empty_aggregate_id", &["aggregate_id is empty"], 1);
            c.aggregate_id = String::new();
            c
        },
        {
            let mut c = Case::new("empty_event_type", &["event_type is empty"], 1);
            c.event_type = String::new();
            c
        },
        Case::new("empty_destination", &["destination is an empty string"], 1).dest(""),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_bad_rows_fail_alone_with_readable_errors() {
    let table = TestTable::new("badin_r").await;
    let broker = TestBroker::new("badin_r").await;
    let missing = unique("no_such_exchange");
    // An exchange that exists with no queue bound: the message comes back (mandatory).
    let lonely = unique("lonely_exchange");
    broker_declare(&lonely).await;
    let mut cases = common_cases(3);
    cases.extend([
        Case::new("unknown_exchange", &[missing.as_str(), "does not exist"], 3).dest(&missing),
        Case::new("unroutable", &["unroutable", lonely.as_str()], 3).dest(&lonely),
        Case::new(
            "exchange_name_256_bytes",
            &["exchange name", "256 bytes", "at most 255"],
            3,
        )
        .dest("x".repeat(256)),
        {
            let mut c = Case::new("event_type_300_bytes", &["event_type", "300 bytes"], 3);
            c.event_type = "e".repeat(300);
            c
        },
        Case::new("exchange_name_bad_chars", &["exchange"], 3).dest("orders events/v1 #!"),
        {
            let mut c = Case::new("routing_key_300_bytes", &["routing key", "300 bytes"], 3);
            c.routing_key = Some("r".repeat(300));
            c
        },
    ]);
    let loaded = load(&table, &cases, 5).await;
    let relay = RelayProc::start(&relay_env(&table.name, &broker.exchange));
    table
        .wait_no_pending(Duration::from_secs(60), "every row settled")
        .await;
    check_cases(&table, &loaded).await;
    let mut ledger = Ledger::load("bad input matrix (RabbitMQ)", &table.pool, &table.name).await;
    ledger.delivered(
        drain_queue(
            &broker.queue,
            Duration::from_secs(1),
            Duration::from_secs(30),
        )
        .await,
    );
    let t = ledger.settle();
    assert_eq!(t.failed, cases.len(), "only the bad rows failed");
    assert_eq!(
        relay.get("/livez").await.map(|r| r.0),
        Some(200),
        "bad input never wedges the relay"
    );
    drop(relay);
    broker_delete(&lonely).await;
    broker.cleanup().await;
    table.cleanup().await;
}

async fn broker_declare(name: &str) {
    let conn = amqp_connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        name,
        lapin::ExchangeKind::Topic,
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "declared").await;
}

async fn broker_delete(name: &str) {
    let conn = amqp_connect().await;
    let ch = conn.create_channel().await.unwrap();
    let _ = ch.exchange_delete(name, Default::default()).await;
    let _ = conn.close(200, "deleted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_bad_rows_fail_alone_with_readable_errors() {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let topic = unique("badin-k").replace('_', "-");
    cluster.create_topic(&topic, 3, 1).unwrap();
    let table = TestTable::new("badin_k").await;
    let missing = unique("no-such-topic");
    let mut cases = common_cases(3);
    cases.extend([
        Case::new("unknown_topic", &[missing.as_str(), "does not exist"], 3).dest(&missing),
        Case::new("topic_bad_chars", &["topic name", "contains"], 3).dest("orders events/v1"),
        Case::new("topic_250_chars", &["1 to 249 characters"], 3).dest("t".repeat(250)),
        {
            let mut c = Case::new("payload_too_large", &["too large", topic.as_str()], 3);
            c.payload = serde_json::json!({ "blob": "x".repeat(20_000) });
            c
        },
    ]);
    let loaded = load(&table, &cases, 5).await;
    let (env, file) = kafka_env(
        &table.name,
        &brokers,
        &topic,
        &[("message.max.bytes", "10000")],
        &[],
    );
    let relay = RelayProc::start_cmd(&env, &["run", "--config", file.path().to_str().unwrap()]);
    table
        .wait_no_pending(Duration::from_secs(60), "every row settled")
        .await;
    check_cases(&table, &loaded).await;
    let t = tally_kafka(
        "bad input matrix (Kafka, mock cluster)",
        &table,
        &brokers,
        &topic,
        Duration::from_secs(1),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(t.failed, cases.len(), "only the bad rows failed");
    drop(relay);
    table.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_bad_rows_fail_alone_with_readable_errors() {
    let keys = TestKeys::new("badin");
    let table = TestTable::new("badin_rd").await;
    // Keys that exist with another type than a stream: XADD answers WRONGTYPE.
    let string_key = keys.key("a_string");
    let hash_key = keys.key("a_hash");
    let mut conn = redis_conn().await;
    let _: () = redis::cmd("SET")
        .arg(&string_key)
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(&hash_key)
        .arg("f")
        .arg("v")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut cases = common_cases(3);
    cases.extend([
        Case::new("key_holds_a_string", &["WRONGTYPE", string_key.as_str()], 3).dest(&string_key),
        Case::new("key_holds_a_hash", &["WRONGTYPE", hash_key.as_str()], 3).dest(&hash_key),
    ]);
    let loaded = load(&table, &cases, 5).await;
    let relay = RelayProc::start(&keys.env(&table.name, RedisMode::Stream, &[]));
    table
        .wait_no_pending(Duration::from_secs(60), "every row settled")
        .await;
    check_cases(&table, &loaded).await;
    let mut ledger =
        Ledger::load("bad input matrix (Redis stream)", &table.pool, &table.name).await;
    ledger.delivered(
        stream_entries(&keys.key("order"))
            .await
            .iter()
            .map(event_id),
    );
    let t = ledger.settle();
    assert_eq!(t.failed, cases.len(), "only the bad rows failed");
    assert_eq!(
        relay.get("/livez").await.map(|r| r.0),
        Some(200),
        "bad input never wedges the relay"
    );
    drop(relay);
    keys.cleanup().await;
    table.cleanup().await;
}
