//! The AWS emulator side of the tests (moto, `scripts/aws-emulator.sh`): its endpoint
//! (`TEST_AWS_ENDPOINT`), test credentials, sink configs, unique queues / topics
//! (`TestQueue`, `TestTopic`, removed by `delete`) and reading a queue to a count.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use outbox_relay::sink::aws::tap::{Admin, Received};
use outbox_relay::sink::aws::{SnsConfig, SqsConfig};

use crate::hex_id;

/// The region the tests use.
pub const REGION: &str = "us-east-1";

/// The emulator (`TEST_AWS_ENDPOINT`, default moto on 127.0.0.1:5000).
pub fn aws_endpoint() -> String {
    std::env::var("TEST_AWS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5000".into())
}

/// Test credentials for the SDK's env provider (moto accepts any), set once per
/// process; also the env a relay child process gets (`aws_env`).
pub fn use_test_credentials() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for (k, v) in aws_env_pairs() {
            // Once per process, before this binary's first client reads them.
            std::env::set_var(k, v);
        }
    });
}

fn aws_env_pairs() -> [(&'static str, &'static str); 3] {
    [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", REGION),
    ]
}

/// Fails the test, saying how to start it, when the emulator does not answer.
pub fn require_emulator() {
    use_test_credentials();
    let endpoint = aws_endpoint();
    let host = endpoint
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/');
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host)
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| panic!("TEST_AWS_ENDPOINT {endpoint} is not host:port"));
    if let Err(e) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
        panic!("no AWS emulator at {endpoint} ({e}): run scripts/aws-emulator.sh first");
    }
}

/// Admin clients on the emulator (`endpoint`: the emulator or a proxy in front of it).
pub async fn admin_at(endpoint: &str) -> Admin {
    use_test_credentials();
    Admin::new(REGION, endpoint).await
}

pub async fn admin() -> Admin {
    admin_at(&aws_endpoint()).await
}

/// `[sqs]` for `queue_url` through `endpoint`.
pub fn sqs_config(endpoint: &str, queue_url: &str) -> SqsConfig {
    SqsConfig {
        queue_url: queue_url.into(),
        region: REGION.into(),
        endpoint_url: endpoint.into(),
        dead_letter_queue_url: None,
    }
}

/// `[sns]` for `topic_arn` through `endpoint`.
pub fn sns_config(endpoint: &str, topic_arn: &str) -> SnsConfig {
    SnsConfig {
        topic_arn: topic_arn.into(),
        region: REGION.into(),
        endpoint_url: endpoint.into(),
        dead_letter_topic_arn: None,
    }
}

/// The env of a relay child process publishing to SQS queue `queue_url`.
pub fn sqs_env(endpoint: &str, queue_url: &str) -> Vec<(String, String)> {
    aws_relay_env("sqs", ("QUEUE_URL", queue_url), endpoint)
}

/// The env of a relay child process publishing to `topic_arn` on the emulator.
pub fn sns_env(endpoint: &str, topic_arn: &str) -> Vec<(String, String)> {
    aws_relay_env("sns", ("TOPIC_ARN", topic_arn), endpoint)
}

fn aws_relay_env(kind: &str, target: (&str, &str), endpoint: &str) -> Vec<(String, String)> {
    let section = kind.to_ascii_uppercase();
    let mut env: Vec<(String, String)> = aws_env_pairs()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.extend([
        ("OUTBOX_RELAY__SINK__KIND".to_string(), kind.to_string()),
        (
            format!("OUTBOX_RELAY__{section}__{}", target.0),
            target.1.into(),
        ),
        (
            format!("OUTBOX_RELAY__{section}__ENDPOINT_URL"),
            endpoint.into(),
        ),
        (format!("OUTBOX_RELAY__{section}__REGION"), REGION.into()),
    ]);
    env
}

/// A unique queue on the emulator, removed by `delete` (or on drop if the test panics
/// first).
pub struct TestQueue {
    pub admin: Admin,
    pub name: String,
    pub url: String,
}

impl TestQueue {
    /// `prefix`-<random>, a FIFO queue when `fifo`.
    pub async fn new(prefix: &str, fifo: bool) -> TestQueue {
        let admin = admin().await;
        let mut name = format!("{prefix}-{}", hex_id());
        if fifo {
            name.push_str(".fifo");
        }
        let url = admin
            .create_queue(&name)
            .await
            .expect("create the test queue");
        TestQueue { admin, name, url }
    }

    /// A queue URL of the same shape that names no queue.
    pub fn missing_sibling(&self) -> String {
        let base = self.url.rsplit_once('/').map_or("", |(b, _)| b);
        format!("{base}/missing-{}", hex_id())
    }

    /// Read (and delete) messages until `n` distinct `event_id`s arrived, or fail after
    /// `within`; every message read, in arrival order (duplicates included).
    pub async fn read(&self, n: usize, within: Duration) -> Vec<Received> {
        let mut reader = self.admin.reader(&self.url);
        let mut got = Vec::new();
        let mut ids = std::collections::HashSet::new();
        let deadline = Instant::now() + within;
        while ids.len() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} messages arrived in {} within {within:?}",
                ids.len(),
                self.name
            );
            if let Some(m) = reader.next(Duration::from_secs(1)).await.expect("receive") {
                ids.insert(m.attribute("event_id").unwrap_or_default().to_string());
                got.push(m);
            }
        }
        got
    }

    /// Read for `quiet` and return what arrived (to see that nothing more comes).
    pub async fn drain(&self, quiet: Duration) -> Vec<Received> {
        let mut reader = self.admin.reader(&self.url);
        let mut got = Vec::new();
        let deadline = Instant::now() + quiet;
        while Instant::now() < deadline {
            if let Some(m) = reader.next(Duration::from_secs(1)).await.expect("receive") {
                got.push(m);
            }
        }
        got
    }

    pub async fn delete(self) {
        self.admin
            .delete_queue(&self.url)
            .await
            .expect("delete the test queue");
    }
}

impl Drop for TestQueue {
    /// `delete` when the test panicked before it (a topic's queue too).
    fn drop(&mut self) {
        let (admin, url) = (self.admin.clone(), self.url.clone());
        crate::teardown::after_panic(format!("queue {}", self.name), async move {
            let _ = admin.delete_queue(&url).await;
        });
    }
}

/// A unique topic with a subscribed queue (raw delivery), removed by `delete` (or on drop
/// if the test panics first).
pub struct TestTopic {
    pub arn: String,
    pub queue: TestQueue,
    subscription: String,
}

impl TestTopic {
    pub async fn new(prefix: &str, fifo: bool) -> TestTopic {
        let queue = TestQueue::new(&format!("{prefix}-sub"), fifo).await;
        let mut name = format!("{prefix}-{}", hex_id());
        if fifo {
            name.push_str(".fifo");
        }
        let arn = queue
            .admin
            .create_topic(&name)
            .await
            .expect("create the test topic");
        let subscription = queue
            .admin
            .subscribe_queue(&arn, &queue.url)
            .await
            .expect("subscribe the test queue");
        TestTopic {
            arn,
            queue,
            subscription,
        }
    }

    pub async fn delete(self) {
        let admin = self.queue.admin.clone();
        let _ = admin.unsubscribe(&self.subscription).await;
        admin
            .delete_topic(&self.arn)
            .await
            .expect("delete the test topic");
        admin
            .delete_queue(&self.queue.url)
            .await
            .expect("delete the test queue");
    }
}

impl Drop for TestTopic {
    /// `delete` when the test panicked before it (the queue's own drop removes it).
    fn drop(&mut self) {
        let (admin, arn) = (self.queue.admin.clone(), self.arn.clone());
        crate::teardown::after_panic(format!("topic {arn}"), async move {
            let _ = admin.delete_topic(&arn).await;
        });
    }
}

/// The messages by `event_id` (the first copy of each).
pub fn by_event_id(got: &[Received]) -> HashMap<String, &Received> {
    let mut out = HashMap::new();
    for m in got {
        out.entry(m.attribute("event_id").unwrap_or_default().to_string())
            .or_insert(m);
    }
    out
}

/// Every row of `db` arrived in `got`, mapped as SPEC §2 says (`fifo`: with group and
/// deduplication ids).
pub fn assert_all_delivered(db: &[crate::db::DbRow], got: &[Received], fifo: bool) {
    let by_id = by_event_id(got);
    for row in db {
        let m = by_id
            .get(&row.event_id)
            .unwrap_or_else(|| panic!("lost: {row:?}"));
        assert_spec_mapping(row, m, fifo);
    }
}

/// Assert the order of messages read from a FIFO queue against the table's rows: first
/// arrivals of each aggregate in `id` order. Messages of other tables are skipped.
pub fn assert_fifo_order(db: &[crate::db::DbRow], got: &[Received]) -> usize {
    let id_of: HashMap<&str, (i64, &str)> = db
        .iter()
        .map(|r| (r.event_id.as_str(), (r.id, r.aggregate_id.as_str())))
        .collect();
    crate::order::check(got.iter().map(|m| {
        let event = m.attribute("event_id").expect("event_id attribute");
        crate::order::Delivery {
            event,
            row: id_of.get(event).copied(),
            partition: None,
        }
    }))
    .assert_clean("")
}

/// Assert that `m` carries the SPEC §2 mapping of `row`: body = payload JSON text,
/// String attributes `event_id`, `event_type`, `aggregate_type`, `aggregate_id` and
/// every `headers` entry, nothing else; on a FIFO target, group id = aggregate_id and
/// deduplication id = event_id.
pub fn assert_spec_mapping(row: &crate::db::DbRow, m: &Received, fifo: bool) {
    assert_eq!(m.body, row.payload, "body of row {}", row.id);
    let mut want: HashMap<String, String> = row
        .headers
        .as_object()
        .expect("headers object")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    want.insert("event_id".into(), row.event_id.clone());
    want.insert("event_type".into(), row.event_type.clone());
    want.insert("aggregate_type".into(), row.aggregate_type.clone());
    want.insert("aggregate_id".into(), row.aggregate_id.clone());
    assert_eq!(m.attributes, want, "attributes of row {}", row.id);
    if fifo {
        assert_eq!(m.group_id.as_deref(), Some(row.aggregate_id.as_str()));
        assert_eq!(m.dedup_id.as_deref(), Some(row.event_id.as_str()));
    }
}

/// Reads (and deletes) a queue in the background while a test runs, so the queue stays
/// shallow (moto's send latency grows with queue depth: a deep FIFO queue answers
/// slower than a relay's publish timeout).
pub struct Collector {
    got: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    pub fn start(queue: &TestQueue) -> Collector {
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut reader = queue.admin.reader(&queue.url);
        let sink = got.clone();
        let task = tokio::spawn(async move {
            loop {
                match reader.next(Duration::from_secs(1)).await {
                    Ok(Some(m)) => sink.lock().expect("collector lock").push(m),
                    Ok(None) => {}
                    Err(e) => eprintln!("collector: {e}"),
                }
            }
        });
        Collector { got, task }
    }

    /// Distinct `event_id`s read so far.
    pub fn distinct(&self) -> usize {
        let got = self.got.lock().expect("collector lock");
        by_event_id(&got).len()
    }

    /// Wait until `n` distinct messages arrived (or fail after `within`); stop reading
    /// and return every message read, in arrival order.
    pub async fn finish(self, n: usize, within: Duration) -> Vec<Received> {
        crate::wait::wait_until(within, &format!("{n} messages read"), || async {
            self.distinct() >= n
        })
        .await;
        self.task.abort();
        let got = self.got.lock().expect("collector lock").clone();
        got
    }
}
