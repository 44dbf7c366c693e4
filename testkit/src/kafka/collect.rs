//! A Kafka consumer collecting a topic's event ids in the background (`KafkaCollector`),
//! riding out a broker restart.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};

use super::Received;
use crate::unique;

/// A consumer reading `topic` continuously in a background task; survives a broker
/// restart (it reconnects; `auto.offset.reset=earliest` re-reads a log that started over).
pub struct KafkaCollector {
    ids: Arc<std::sync::Mutex<Vec<String>>>,
    last_new: Arc<std::sync::Mutex<Instant>>,
    task: tokio::task::JoinHandle<()>,
}

impl KafkaCollector {
    pub fn start(brokers: &str, topic: &str) -> KafkaCollector {
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
                    if let Some(id) = Received::of(&msg).header("event_id") {
                        ids.lock().unwrap().push(id.to_string());
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
