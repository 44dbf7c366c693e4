//! Kafka side of the fault suites: draining and collecting topics, relay env for the
//! Kafka sink, topic creation, and a private tansu broker (`Tansu`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;

use super::services::fault_env;

#[path = "../kafka_support/mod.rs"]
mod kafka_support;

/// Read `topics` from the beginning until nothing new arrived for `quiet` (after at
/// least `min` distinct event ids) or `within` passed. Returns the `event_id` headers in
/// arrival order (per partition, that is log order).
///
/// Partitions are assigned explicitly (`kafka_support::consumer`, no group join).
pub async fn kafka_drain(
    brokers: &str,
    topics: &[&str],
    min: usize,
    quiet: Duration,
    within: Duration,
) -> Vec<String> {
    use rdkafka::message::{Headers, Message as _};
    let deadline = Instant::now() + within;
    let c = kafka_support::consumer(brokers, topics).await;
    let mut out = Vec::new();
    let mut distinct = HashSet::new();
    let mut last_new = Instant::now();
    let mut errors = 0usize;
    while Instant::now() < deadline {
        if distinct.len() >= min && last_new.elapsed() >= quiet {
            break;
        }
        let Ok(msg) = tokio::time::timeout(Duration::from_millis(500), c.recv()).await else {
            continue;
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                errors += 1;
                if errors <= 5 {
                    eprintln!("kafka_drain {topics:?}: consumer error: {e}");
                }
                continue;
            }
        };
        let id = msg.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == "event_id")
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        if let Some(id) = id {
            distinct.insert(id.clone());
            out.push(id);
            last_new = Instant::now();
        }
    }
    out
}

/// Relay env for the Kafka sink at `brokers`, default topic `topic`, with `properties`
/// passed through a TOML file (property names hold dots). Returns (env, config file).
pub fn kafka_env(
    table: &str,
    brokers: &str,
    topic: &str,
    properties: &[(&str, &str)],
    extra: &[(&str, &str)],
) -> (Vec<(String, String)>, tempfile::NamedTempFile) {
    let mut env = fault_env(table, "unused", extra);
    env.push(("OUTBOX_RELAY__SINK__KIND".into(), "kafka".into()));
    env.push(("OUTBOX_RELAY__KAFKA__BROKERS".into(), brokers.into()));
    env.push(("OUTBOX_RELAY__KAFKA__TOPIC".into(), topic.into()));
    let mut toml = String::from("[kafka.properties]\n");
    for (k, v) in properties {
        toml.push_str(&format!("{k:?} = {v:?}\n"));
    }
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), toml).unwrap();
    (env, file)
}

/// A consumer reading `topic` continuously in a background task; survives a broker
/// restart (it reconnects; `auto.offset.reset=earliest` re-reads a log that started over).
pub struct KafkaCollector {
    ids: Arc<std::sync::Mutex<Vec<String>>>,
    last_new: Arc<std::sync::Mutex<Instant>>,
    task: tokio::task::JoinHandle<()>,
}

impl KafkaCollector {
    pub fn start(brokers: &str, topic: &str) -> KafkaCollector {
        use rdkafka::consumer::{Consumer, StreamConsumer};
        use rdkafka::message::{Headers, Message as _};
        let c: StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", unique("fault-collector"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("topic.metadata.refresh.interval.ms", "1000")
            .set("reconnect.backoff.max.ms", "500")
            .create()
            .expect("kafka consumer");
        c.subscribe(&[topic]).expect("subscribe");
        let ids = Arc::new(std::sync::Mutex::new(Vec::new()));
        let last_new = Arc::new(std::sync::Mutex::new(Instant::now()));
        let task = {
            let (ids, last_new) = (ids.clone(), last_new.clone());
            tokio::spawn(async move {
                loop {
                    let Ok(msg) = c.recv().await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    let id = msg.headers().and_then(|h| {
                        h.iter()
                            .find(|h| h.key == "event_id")
                            .and_then(|h| h.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    });
                    if let Some(id) = id {
                        ids.lock().unwrap().push(id);
                        *last_new.lock().unwrap() = Instant::now();
                    }
                }
            })
        };
        KafkaCollector {
            ids,
            last_new,
            task,
        }
    }

    pub fn ids(&self) -> Vec<String> {
        self.ids.lock().unwrap().clone()
    }

    pub fn distinct(&self) -> HashSet<String> {
        self.ids.lock().unwrap().iter().cloned().collect()
    }

    /// Time since the last new record.
    pub fn quiet_for(&self) -> Duration {
        self.last_new.lock().unwrap().elapsed()
    }
}

impl Drop for KafkaCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Create `topic` (retrying while the broker starts), as an operator would.
pub async fn kafka_create_topic(brokers: &str, topic: &str, partitions: i32, within: Duration) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let deadline = Instant::now() + within;
    loop {
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
        let res = admin
            .create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &opts,
            )
            .await;
        match res {
            Ok(r) => match &r[0] {
                Ok(_) => return,
                Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => return,
                Err(e) if Instant::now() > deadline => panic!("create topic {topic}: {e:?}"),
                Err(_) => {}
            },
            Err(e) if Instant::now() > deadline => panic!("create topic {topic}: {e}"),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A private tansu broker (same command line as `scripts/kafka-broker.sh`, in-memory
/// storage) on its own port, so stopping it disturbs no other test. Killed on drop.
pub struct Tansu {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl Tansu {
    pub fn start(port: u16) -> Tansu {
        let mut t = Tansu { port, child: None };
        t.spawn();
        t
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::File::create(format!("/tmp/tansu-fault-{}.log", self.port)).unwrap();
        let child = std::process::Command::new("tansu")
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("tansu on PATH (scripts/kafka-broker.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL the broker (its in-memory log is gone with it).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}
