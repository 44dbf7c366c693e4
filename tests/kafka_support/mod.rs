//! Shared helpers of the Kafka integration tests: a unique outbox table per test (dropped
//! at the end), the real relay loop in-process, a counting sink wrapper, and a Kafka
//! reader. Conditions are polled with deadlines; nothing sleeps to dodge a race.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_relay::config::RelayConfig;
use outbox_relay::health::Health;
use outbox_relay::model::Message;
use outbox_relay::relay::Relay;
use outbox_relay::sink::kafka::KafkaConfig;
use outbox_relay::sink::{Confirm, Sink, SinkError};
use outbox_relay::store::Store;
use outbox_relay::table::TableName;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::ClientConfig;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

pub fn hex_id() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// A migrated outbox table unique to one test.
pub struct TestTable {
    pub name: String,
    pub pool: PgPool,
    pub store: Store,
}

impl TestTable {
    pub async fn create() -> TestTable {
        let name = format!("kt_{}", hex_id());
        let pool = PgPoolOptions::new()
            .max_connections(6)
            .connect(DATABASE_URL)
            .await
            .expect("Postgres at 127.0.0.1:5432 (user postgres, db test)");
        let table = TableName::parse(&name).unwrap();
        let mut conn = pool.acquire().await.unwrap();
        outbox_relay::migrate::migrate(&mut conn, &table)
            .await
            .unwrap();
        drop(conn);
        let store = Store::from_pool(pool.clone(), table);
        TestTable { name, pool, store }
    }

    /// Insert rows `(aggregate_type, aggregate_id, event_type, destination, payload,
    /// headers)` in the given order (so `id` follows it).
    pub async fn insert(&self, rows: &[Row]) {
        for chunk in rows.chunks(2_000) {
            let col = |f: fn(&Row) -> String| chunk.iter().map(f).collect::<Vec<String>>();
            let dest: Vec<Option<String>> = chunk.iter().map(|r| r.destination.clone()).collect();
            let payload: Vec<serde_json::Value> = chunk.iter().map(|r| r.payload.clone()).collect();
            let headers: Vec<serde_json::Value> = chunk.iter().map(|r| r.headers.clone()).collect();
            sqlx::query(&format!(
                "INSERT INTO \"{}\" (aggregate_type, aggregate_id, event_type, destination, payload, headers)
                 SELECT a, b, c, d, e, f FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[])
                      WITH ORDINALITY AS u(a, b, c, d, e, f, n) ORDER BY n",
                self.name
            ))
            .bind(col(|r| r.aggregate_type.clone()))
            .bind(col(|r| r.aggregate_id.clone()))
            .bind(col(|r| r.event_type.clone()))
            .bind(dest)
            .bind(payload)
            .bind(headers)
            .execute(&self.pool)
            .await
            .unwrap();
        }
    }

    /// Every row: id, event_id, aggregate_id, status, attempts, last_error,
    /// processed_at IS NOT NULL, payload::text, headers.
    pub async fn rows(&self) -> Vec<DbRow> {
        sqlx::query_as::<_, DbRow>(&format!(
            "SELECT id, event_id::text AS event_id, aggregate_type, aggregate_id, event_type, status, attempts, last_error,
                    processed_at IS NOT NULL AS processed, payload::text AS payload, headers
             FROM \"{}\" ORDER BY id",
            self.name
        ))
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    pub async fn count_where(&self, cond: &str) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM \"{}\" WHERE {cond}",
            self.name
        ))
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    pub async fn drop_all(self) {
        let n = &self.name;
        sqlx::raw_sql(&format!(
            "DROP TABLE IF EXISTS \"{n}\", \"{n}_relay_leases\", \"{n}_relay_members\", \"{n}_relay_migrations\" CASCADE;
             DROP FUNCTION IF EXISTS \"{n}_notify\"() CASCADE;
             DROP FUNCTION IF EXISTS \"{n}_insert\"() CASCADE;"
        ))
        .execute(&self.pool)
        .await
        .unwrap();
        self.pool.close().await;
    }
}

#[derive(Debug, Clone)]
pub struct Row {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub destination: Option<String>,
    pub payload: serde_json::Value,
    pub headers: serde_json::Value,
}

impl Row {
    pub fn new(aggregate_id: &str, seq: usize) -> Row {
        Row {
            aggregate_type: "order".into(),
            aggregate_id: aggregate_id.into(),
            event_type: "order.updated".into(),
            destination: None,
            payload: serde_json::json!({"orderId": aggregate_id, "seq": seq, "total": 12.5}),
            headers: serde_json::json!({"traceparent": format!("00-{:032x}-{:016x}-01", seq, seq), "correlation_id": format!("c-{seq}")}),
        }
    }

    pub fn to(mut self, topic: &str) -> Row {
        self.destination = Some(topic.into());
        self
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DbRow {
    pub id: i64,
    pub event_id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub processed: bool,
    pub payload: String,
    pub headers: serde_json::Value,
}

/// Relay settings for tests: short backoffs, 3 attempts, no LISTEN (polling only).
pub fn relay_config(publish_timeout: &str) -> RelayConfig {
    serde_json::from_value(serde_json::json!({
        "batch_size": 500,
        "poll_interval": "100ms",
        "max_attempts": 3,
        "backoff_initial": "50ms",
        "backoff_max": "400ms",
        "shutdown_timeout": "5s",
        "publish_timeout": publish_timeout,
        "listen": false,
    }))
    .unwrap()
}

pub fn kafka_config(brokers: &str, props: &[(&str, &str)]) -> KafkaConfig {
    KafkaConfig {
        brokers: brokers.into(),
        topic: "outbox.{aggregate_type}".into(),
        dead_letter_topic: None,
        properties: props
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// The real relay loop in a task.
pub struct RunningRelay {
    pub cancel: CancellationToken,
    pub handle: JoinHandle<()>,
}

impl RunningRelay {
    pub fn start<S: Sink>(store: &Store, sink: S, cfg: RelayConfig) -> RunningRelay {
        let cancel = CancellationToken::new();
        let relay = Relay::new(
            store.clone(),
            sink,
            cfg,
            format!("test-{}", hex_id()),
            Arc::new(Notify::new()),
            Arc::new(Health::new(Duration::from_secs(300))),
        );
        let handle = tokio::spawn(relay.run(cancel.clone()));
        RunningRelay { cancel, handle }
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("relay stops within 30s")
            .unwrap();
    }
}

/// Outcome counts of a wrapped sink.
#[derive(Default, Debug)]
pub struct Counts {
    pub confirmed: AtomicUsize,
    pub rejected: AtomicUsize,
    pub unavailable: AtomicUsize,
}

impl Counts {
    pub fn get(&self) -> (usize, usize, usize) {
        (
            self.confirmed.load(Ordering::SeqCst),
            self.rejected.load(Ordering::SeqCst),
            self.unavailable.load(Ordering::SeqCst),
        )
    }
}

/// A sink that counts what the real one answered.
pub struct CountingSink<S> {
    pub inner: S,
    pub counts: Arc<Counts>,
}

impl<S: Sink> Sink for CountingSink<S> {
    async fn connect(&mut self) -> Result<(), SinkError> {
        let r = self.inner.connect().await;
        if r.is_err() {
            // A failed reconnect is the broker answering "unavailable" too.
            self.counts.unavailable.fetch_add(1, Ordering::SeqCst);
        }
        r
    }
    async fn send(&mut self, m: &Message) -> Result<Confirm, SinkError> {
        let counts = self.counts.clone();
        let tally = move |r: &Result<(), SinkError>| {
            let c = match r {
                Ok(()) => &counts.confirmed,
                Err(SinkError::Rejected(_)) => &counts.rejected,
                Err(SinkError::Unavailable(_)) => &counts.unavailable,
            };
            c.fetch_add(1, Ordering::SeqCst);
        };
        match self.inner.send(m).await {
            Ok(confirm) => Ok(Box::pin(async move {
                let r = confirm.await;
                tally(&r);
                r
            })),
            Err(e) => {
                tally(&Err(e.clone()));
                Err(e)
            }
        }
    }
    async fn dead_letter(&mut self, m: &Message, e: &str) -> Result<Option<Confirm>, SinkError> {
        self.inner.dead_letter(m, e).await
    }
    fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }
    fn confirm_timeout(&self, publish_timeout: Duration) -> Duration {
        self.inner.confirm_timeout(publish_timeout)
    }
    async fn close(&mut self) {
        self.inner.close().await
    }
}

/// Poll `cond` every 50 ms until it holds; panic with `what` after `within`.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One Kafka record as a consumer saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub headers: Vec<(String, String)>,
    pub payload: String,
}

impl Received {
    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

/// A consumer reading every partition of `topics` from the beginning. Partitions are
/// assigned explicitly (no consumer-group join, whose rebalance can outlast a test's
/// deadline on a loaded machine); the metadata lookup is retried for up to 30 s.
pub async fn consumer(brokers: &str, topics: &[&str]) -> StreamConsumer {
    use rdkafka::{Offset, TopicPartitionList};
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("kt-{}", hex_id()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .unwrap();
    let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut tpl = TopicPartitionList::new();
        for topic in &topics {
            loop {
                let parts: Vec<i32> = c
                    .fetch_metadata(Some(topic), Duration::from_secs(5))
                    .map(|md| {
                        md.topics()
                            .iter()
                            .filter(|t| t.name() == topic && t.error().is_none())
                            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                            .collect()
                    })
                    .unwrap_or_default();
                if !parts.is_empty() {
                    for p in parts {
                        tpl.add_partition_offset(topic, p, Offset::Beginning)
                            .unwrap();
                    }
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "topic {topic:?} has no partitions"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        c.assign(&tpl).unwrap();
        c
    })
    .await
    .unwrap()
}

/// Read from `consumer` until `want` distinct `event_id`s arrived (duplicates are kept
/// in the result); panic after `within`.
pub async fn read_events(
    consumer: &StreamConsumer,
    within: Duration,
    want: usize,
) -> Vec<Received> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    let mut distinct = std::collections::HashSet::new();
    while distinct.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "timed out after {within:?} reading Kafka; got {} records",
            out.len()
        );
        let Ok(msg) = tokio::time::timeout(left.min(Duration::from_secs(1)), consumer.recv()).await
        else {
            continue;
        };
        let msg = msg.expect("consumer error");
        let headers = msg
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let r = Received {
            topic: msg.topic().to_string(),
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            headers,
            payload: msg
                .payload()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default(),
        };
        if let Some(id) = r.header("event_id") {
            distinct.insert(id.to_string());
        }
        out.push(r);
    }
    out
}

/// Distinct event ids among `records`.
pub fn event_ids(records: &[Received]) -> HashMap<String, Received> {
    let mut m = HashMap::new();
    for r in records {
        if let Some(id) = r.header("event_id") {
            m.entry(id.to_string()).or_insert_with(|| r.clone());
        }
    }
    m
}

/// Within each aggregate, the first arrival of each event is in `id` order, and all of
/// an aggregate's events share one partition.
pub fn assert_order(db: &[DbRow], got: &[Received]) {
    let id_of: HashMap<&str, (i64, &str)> = db
        .iter()
        .map(|r| (r.event_id.as_str(), (r.id, r.aggregate_id.as_str())))
        .collect();
    let mut sorted: Vec<&Received> = got.iter().collect();
    sorted.sort_by_key(|r| (r.topic.clone(), r.partition, r.offset));
    let mut seen = std::collections::HashSet::new();
    let mut last: HashMap<&str, (i64, i32)> = HashMap::new();
    for r in sorted {
        let eid = r.header("event_id").expect("event_id header");
        if !seen.insert(eid.to_string()) {
            continue; // a duplicate (at-least-once)
        }
        let Some(&(id, agg)) = id_of.get(eid) else {
            continue;
        };
        if let Some((prev, partition)) = last.insert(agg, (id, r.partition)) {
            assert!(prev < id, "aggregate {agg}: id {id} arrived after {prev}");
            assert_eq!(
                partition, r.partition,
                "aggregate {agg} spread over partitions"
            );
        }
    }
}
