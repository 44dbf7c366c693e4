//! The relay loop in-process against the real Postgres, with a recording sink that can
//! reject or be "down" on cue: waves keep per-aggregate order, a rejection holds back
//! its aggregate only, an outage spends no attempts, bad rows fail alone.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use outbox_relay::config::{OnFailed, RelayConfig};
use outbox_relay::health::Health;
use outbox_relay::model::Message;
use outbox_relay::relay::Relay;
use outbox_relay::sink::{Sink, SinkError};
use outbox_relay::store::Store;
use outbox_relay::table::TableName;
use tokio_util::sync::CancellationToken;

type Script = Box<dyn Fn(&Message, usize) -> Result<(), SinkError> + Send + Sync>;

/// Records every publish call; `script(message, call_number)` decides each outcome.
#[derive(Clone)]
struct RecordingSink {
    calls: Arc<Mutex<Vec<Vec<Message>>>>,
    script: Arc<Script>,
}

impl RecordingSink {
    fn new(
        script: impl Fn(&Message, usize) -> Result<(), SinkError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            calls: Arc::default(),
            script: Arc::new(Box::new(script)),
        }
    }
    fn delivered(&self) -> Vec<Message> {
        let calls = self.calls.lock().unwrap();
        let mut out = Vec::new();
        for (n, call) in calls.iter().enumerate() {
            for m in call {
                if (self.script)(m, n).is_ok() {
                    out.push(m.clone());
                }
            }
        }
        out
    }
}

impl Sink for RecordingSink {
    async fn connect(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
    async fn publish(&mut self, messages: &[Message]) -> Vec<Result<(), SinkError>> {
        let mut calls = self.calls.lock().unwrap();
        let n = calls.len();
        calls.push(messages.to_vec());
        messages.iter().map(|m| (self.script)(m, n)).collect()
    }
    async fn dead_letter(&mut self, _m: &Message, _e: &str) -> Result<bool, SinkError> {
        Ok(false)
    }
    async fn close(&mut self) {}
}

fn cfg() -> RelayConfig {
    let mut c: RelayConfig = serde_json::from_value(serde_json::json!({})).unwrap();
    c.poll_interval = Duration::from_millis(50);
    c.backoff_initial = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(40);
    c.max_attempts = 3;
    c.lease_timeout = Duration::from_secs(4);
    c.on_failed = OnFailed::Block;
    c
}

async fn start(
    table: &TestTable,
    sink: RecordingSink,
    cfg: RelayConfig,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let store = Store::from_pool(table.pool.clone(), TableName::parse(&table.name).unwrap());
    let relay = Relay::new(
        store,
        sink,
        cfg,
        unique("rec"),
        Arc::default(),
        Arc::new(Health::new(Duration::from_secs(60))),
    );
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(relay.run(cancel.clone()));
    (cancel, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waves_never_hold_two_rows_of_one_aggregate_and_keep_order() {
    let table = TestTable::new("rwave").await;
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(
            table
                .insert(&format!("a{}", i % 3), "e", None, serde_json::json!({}))
                .await,
        );
    }
    let sink = RecordingSink::new(|_, _| Ok(()));
    let (cancel, h) = start(&table, sink.clone(), cfg()).await;
    table
        .wait_status("PROCESSED", 30, Duration::from_secs(20))
        .await;
    cancel.cancel();
    h.await.unwrap();
    for call in sink.calls.lock().unwrap().iter() {
        let mut aggs: Vec<&str> = call.iter().map(|m| m.aggregate_id.as_str()).collect();
        aggs.sort();
        let n = aggs.len();
        aggs.dedup();
        assert_eq!(aggs.len(), n, "one row per aggregate per wave");
    }
    let delivered: Vec<i64> = sink.delivered().iter().map(|m| m.id).collect();
    for agg in ["a0", "a1", "a2"] {
        let seq: Vec<i64> = sink
            .delivered()
            .iter()
            .filter(|m| m.aggregate_id == agg)
            .map(|m| m.id)
            .collect();
        assert!(
            seq.windows(2).all(|w| w[0] < w[1]),
            "{agg} in id order: {seq:?}"
        );
    }
    assert_eq!(delivered.len(), 30);
    table.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_holds_back_its_aggregate_only_until_failed() {
    let table = TestTable::new("rrej").await;
    let a1 = table.insert("a", "ok", None, serde_json::json!({})).await;
    let a2 = table
        .insert("a", "poison", None, serde_json::json!({}))
        .await;
    let a3 = table.insert("a", "ok", None, serde_json::json!({})).await;
    let b1 = table.insert("b", "ok", None, serde_json::json!({})).await;
    let b2 = table.insert("b", "ok", None, serde_json::json!({})).await;
    let sink = RecordingSink::new(|m, _| {
        if m.event_type == "poison" {
            Err(SinkError::Rejected("poisoned".into()))
        } else {
            Ok(())
        }
    });
    let (cancel, h) = start(&table, sink.clone(), cfg()).await;
    table
        .wait_status("FAILED", 1, Duration::from_secs(20))
        .await;
    table
        .wait_status("PROCESSED", 3, Duration::from_secs(20))
        .await;
    cancel.cancel();
    h.await.unwrap();
    assert_eq!(table.row(a1).await.0, "PROCESSED");
    assert_eq!(
        table.row(a2).await,
        ("FAILED".into(), 3, Some("poisoned".into()))
    );
    assert_eq!(
        table.row(a3).await.0,
        "PENDING",
        "held back behind the FAILED row"
    );
    assert_eq!(table.row(b1).await.0, "PROCESSED");
    assert_eq!(table.row(b2).await.0, "PROCESSED");
    assert!(
        sink.calls
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .all(|m| m.id != a3),
        "a3 never sent"
    );
    table.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_spends_no_attempts() {
    let table = TestTable::new("rdown").await;
    for i in 0..50 {
        table
            .insert(&format!("k{}", i % 5), "e", None, serde_json::json!({}))
            .await;
    }
    // Down for the first 4 publish calls, with one message "confirmed" before the drop.
    let sink = RecordingSink::new(|m, call| {
        if call < 4 && m.aggregate_id != "k0" {
            Err(SinkError::Unavailable("connection reset".into()))
        } else {
            Ok(())
        }
    });
    let (cancel, h) = start(&table, sink.clone(), cfg()).await;
    table
        .wait_status("PROCESSED", 50, Duration::from_secs(30))
        .await;
    cancel.cancel();
    h.await.unwrap();
    assert_eq!(table.max_attempts_seen().await, 0);
    table.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_leases_back() {
    let table = TestTable::new("rstop").await;
    let sink = RecordingSink::new(|_, _| Ok(()));
    let (cancel, h) = start(&table, sink, cfg()).await;
    wait_for(Duration::from_secs(10), "leases taken", || async {
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM \"{}_relay_leases\" WHERE owner IS NOT NULL",
            table.name
        ))
        .fetch_one(&table.pool)
        .await
        .unwrap();
        (n == 256).then_some(())
    })
    .await;
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), h)
        .await
        .expect("stops promptly")
        .unwrap();
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}_relay_leases\" WHERE owner IS NOT NULL",
        table.name
    ))
    .fetch_one(&table.pool)
    .await
    .unwrap();
    assert_eq!(n, 0);
    table.cleanup().await;
}
