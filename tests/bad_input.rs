//! The bad-input matrix (SPEC §3.7): every row that cannot be published fails on its own,
//! with a `last_error` a person can read, while good rows around it — same batch, other
//! aggregates — are delivered. One test per broker; each row of the matrix is its own
//! aggregate. Not disruptive (parallel phase). The NATS part runs against the local
//! nats-server on a stream of its own (its `max_payload`, 1 MiB by default, is the
//! size limit). The Kafka part runs against librdkafka's mock cluster with a small
//! `message.max.bytes` (RabbitMQ's max message size is a node-wide setting, 128 MiB by
//! default, not changeable per test); the SQS and SNS parts against the AWS emulator (moto,
//! `scripts/aws-emulator.sh`; SNS rows read from a queue subscribed to the topic); Redis in stream mode against the local server (its
//! `proto-max-bulk-len` is server-wide, so the size limit is attacked in
//! `faults_redis.rs`, not here). The relay binary is the child process in each.

use std::time::Duration;

use outbox_relay::sink::redis::RedisMode;
use outbox_relay_testkit::{
    aws::*, db::*, faults::*, hex_id, nats::*, rabbit::*, redis::*, relay_proc::*, unique,
};

/// One bad row of the matrix: its aggregate, what to insert, and what `last_error` must say.
struct Case {
    name: &'static str,
    aggregate_id: String,
    event_type: String,
    destination: Option<String>,
    routing_key: Option<String>,
    headers: serde_json::Value,
    payload: serde_json::Value,
    /// `created_at` as Postgres reads it (`None`: the column's default).
    created_at: Option<&'static str>,
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
            created_at: None,
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
    fn created_at(mut self, t: &'static str) -> Self {
        self.created_at = Some(t);
        self
    }
}

async fn insert(table: &str, pool: &sqlx::PgPool, c: &Case) -> i64 {
    sqlx::query_scalar(&format!(
        "INSERT INTO \"{table}\" (aggregate_type, aggregate_id, event_type, destination, routing_key, payload, headers, created_at)
         VALUES ('order', $1, $2, $3, $4, $5, $6, coalesce($7::text::timestamptz, now())) RETURNING id"
    ))
    .bind(&c.aggregate_id)
    .bind(&c.event_type)
    .bind(&c.destination)
    .bind(&c.routing_key)
    .bind(&c.payload)
    .bind(&c.headers)
    .bind(c.created_at)
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("insert case {}: {e}", c.name))
}

/// `n` good rows over 7 aggregates, numbered on from `*g`.
async fn insert_good(table: &TestTable, g: &mut usize, n: usize) {
    for _ in 0..n {
        let aggregate = format!("good-{}", *g % 7);
        let payload = serde_json::json!({"k": "v"});
        table
            .insert(&aggregate, "order.created", None, payload)
            .await;
        *g += 1;
    }
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
        insert_good(table, &mut g, good_per_gap).await;
        out.push((c, insert(&table.name, &table.pool, c).await));
    }
    insert_good(table, &mut g, good_per_gap).await;
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

/// Wait until no row is pending, then check every case (`check_cases`).
async fn settle(table: &TestTable, loaded: &[(&Case, i64)]) {
    table
        .wait_no_pending(Duration::from_secs(60), "every row settled")
        .await;
    check_cases(table, loaded).await;
}

/// The ledger of the matrix `title` once settled: `delivered` (the event ids the broker
/// holds, read after the ledger is loaded) covers every good row, only the `bad` rows
/// failed, and the relay is still live; then the relay stops.
async fn account<F>(title: &str, table: &TestTable, bad: usize, relay: RelayProc, delivered: F)
where
    F: std::future::Future<Output = Vec<String>>,
{
    let title = format!("bad input matrix ({title})");
    let mut ledger = Ledger::load(&title, &table.pool, &table.name).await;
    ledger.delivered(delivered.await);
    let t = ledger.settle();
    assert_eq!(t.failed, bad, "only the bad rows failed");
    assert_eq!(
        relay.get("/livez").await.map(|r| r.0),
        Some(200),
        "bad input never wedges the relay"
    );
    drop(relay);
}

/// What `last_error` says of a `created_at` the relay cannot represent.
const UNREPRESENTABLE: &str = "created_at is not a time the relay can represent";

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
        // Deeper than serde_json's recursion limit: once failed every claim that read it.
        Case::new(
            "headers_nested_200_deep",
            &["headers must be a JSON object", "recursion limit"],
            1,
        )
        .headers((0..200).fold(serde_json::json!("v"), |v, _| serde_json::json!({ "a": v }))),
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
        // A producer may write any timestamptz; these the relay cannot represent (they
        // once panicked every claim that read them, freezing the relay).
        Case::new("created_at_infinity", &[UNREPRESENTABLE], 1).created_at("infinity"),
        Case::new("created_at_minus_infinity", &[UNREPRESENTABLE], 1).created_at("-infinity"),
        Case::new("created_at_year_290000", &[UNREPRESENTABLE], 1)
            .created_at("290000-01-01 00:00:00+00"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_bad_rows_fail_alone_with_readable_errors() {
    let (table, broker) = table_and_broker("badin_r").await;
    let missing = unique("no_such_exchange");
    // An exchange that exists with no queue bound: the message comes back (mandatory).
    let lonely = unique("lonely_exchange");
    broker.declare_unbound(&lonely).await;
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
    settle(&table, &loaded).await;
    let delivered = drain_queue(
        &broker.queue,
        Duration::from_secs(1),
        Duration::from_secs(30),
    );
    account("RabbitMQ", &table, cases.len(), relay, delivered).await;
    broker.delete_exchange(&lonely).await;
    broker.cleanup_with(&table).await;
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
    settle(&table, &loaded).await;
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
async fn nats_bad_rows_fail_alone_with_readable_errors() {
    let stream = TestStream::new("badin_n").await;
    let table = TestTable::new("badin_n").await;
    let nowhere = format!("badin_nowhere_{}.events", hex_id());
    let inside = |rest: &str| format!("{}.{rest}", stream.name);
    let mut cases = common_cases(3);
    cases.extend([
        Case::new(
            "subject_no_stream_captures",
            &["no JetStream stream captures subject", nowhere.as_str()],
            3,
        )
        .dest(&nowhere),
        Case::new("subject_wildcard_star", &["wildcard", "'*'"], 3).dest(inside("orders.*")),
        Case::new("subject_wildcard_gt", &["wildcard", "'>'"], 3).dest(inside("orders.>")),
        Case::new("subject_space", &["whitespace"], 3).dest(inside("orders events")),
        Case::new("subject_empty_token", &["empty token"], 3).dest(inside("orders..v1")),
        Case::new("subject_4000_bytes", &["4000 bytes", "max_control_line"], 3)
            .dest(inside(&"s".repeat(4000 - stream.name.len() - 1))),
        {
            let mut c = Case::new("event_type_with_space", &["whitespace"], 3);
            c.event_type = "order created".into();
            c
        },
        {
            let mut c = Case::new("payload_over_max_payload", &["max_payload", "1048576"], 3);
            c.payload = serde_json::json!({ "blob": "x".repeat(1_100_000) });
            c
        },
        Case::new("header_nats_rollup", &["Nats-Rollup", "reserved"], 3)
            .headers(serde_json::json!({"Nats-Rollup": "all"})),
        Case::new("header_name_space", &["not a valid NATS header name"], 3)
            .headers(serde_json::json!({"trace parent": "1"})),
        Case::new("header_value_newline", &["line break"], 3)
            .headers(serde_json::json!({"traceparent": "1\r\nInjected: yes"})),
    ]);
    let loaded = load(&table, &cases, 5).await;
    let relay = RelayProc::start(&nats_env(&table.name, &stream.template(), &[]));
    settle(&table, &loaded).await;
    let delivered = async {
        let got = stream.messages().await;
        got.iter()
            .filter_map(|m| m.header("event_id").map(str::to_string))
            .collect()
    };
    account("NATS", &table, cases.len(), relay, delivered).await;
    stream.delete().await;
    table.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqs_bad_rows_fail_alone_with_readable_errors() {
    require_emulator();
    let queue = TestQueue::new("badin-s", false).await;
    let missing = queue.missing_sibling();
    let mut cases = aws_cases("SQS", &queue.url);
    cases.extend([
        Case::new("unknown_queue", &[missing.as_str(), "does not exist"], 3).dest(&missing),
        Case::new("destination_not_a_queue_url", &["not a queue URL"], 3).dest("orders"),
    ]);
    let env = sqs_env(&aws_endpoint(), &queue.url);
    aws_bad_rows("SQS", "badin_s", &cases, env, &queue).await;
    queue.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sns_bad_rows_fail_alone_with_readable_errors() {
    require_emulator();
    let topic = TestTopic::new("badin-sn", false).await;
    let missing = format!("{}-missing", topic.arn);
    let mut cases = aws_cases("SNS", &topic.arn);
    cases.extend([
        Case::new("unknown_topic", &[missing.as_str(), "does not exist"], 3).dest(&missing),
        Case::new("destination_not_a_topic_arn", &["not an SNS topic ARN"], 3).dest("orders"),
    ]);
    let env = sns_env(&aws_endpoint(), &topic.arn);
    aws_bad_rows("SNS", "badin_sn", &cases, env, &topic.queue).await;
    topic.delete().await;
}

/// The cases SQS and SNS share (the same message limits); `target` is the sink's queue or
/// topic, and `<target>.fifo` a FIFO one.
fn aws_cases(service: &str, target: &str) -> Vec<Case> {
    let fifo = format!("{target}.fifo");
    let seven: serde_json::Map<String, serde_json::Value> =
        (0..7).map(|i| (format!("h{i}"), "v".into())).collect();
    let mut cases = common_cases(3);
    cases.extend([
        {
            let mut c = Case::new("payload_over_256_kib", &["256 KiB", service], 3);
            c.payload = serde_json::json!({ "blob": "x".repeat(300 * 1024) });
            c
        },
        Case::new(
            "eleven_attributes",
            &["11 message attributes", "at most 10"],
            3,
        )
        .headers(serde_json::Value::Object(seven)),
        Case::new("reserved_attribute_name", &["\"AWS.trace\"", "reserved"], 3)
            .headers(serde_json::json!({"AWS.trace": "1"})),
        Case::new(
            "attribute_name_with_space",
            &["\"has space\"", "only letters"],
            3,
        )
        .headers(serde_json::json!({"has space": "1"})),
        Case::new("empty_attribute_value", &["\"tenant\" is empty"], 3)
            .headers(serde_json::json!({"tenant": ""})),
        {
            let mut c =
                Case::new("group_id_over_128", &["MessageGroupId", "limit is 128"], 3).dest(&fifo);
            c.aggregate_id = "g".repeat(200);
            c
        },
    ]);
    cases
}

/// Run the relay (`env`: an SQS or SNS sink whose good rows land in `queue`) over
/// `cases` between good rows: each case FAILED as expected, every good row delivered.
async fn aws_bad_rows(
    service: &str,
    prefix: &str,
    cases: &[Case],
    env: Vec<(String, String)>,
    queue: &TestQueue,
) {
    let table = TestTable::new(prefix).await;
    let loaded = load(&table, cases, 5).await;
    let mut full = relay_env(&table.name, "unused");
    full.extend(env);
    let relay = RelayProc::start(&full);
    settle(&table, &loaded).await;
    let delivered = async {
        let good = table.count("PROCESSED").await as usize;
        let got = queue.read(good, Duration::from_secs(30)).await;
        got.iter()
            .filter_map(|m| m.attribute("event_id").map(str::to_string))
            .collect()
    };
    account(service, &table, cases.len(), relay, delivered).await;
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
    settle(&table, &loaded).await;
    let stream = keys.key("order");
    let delivered = async { stream_entries(&stream).await.iter().map(event_id).collect() };
    account("Redis stream", &table, cases.len(), relay, delivered).await;
    keys.cleanup().await;
    table.cleanup().await;
}

#[path = "bad_input/encoding.rs"]
mod encoding;
