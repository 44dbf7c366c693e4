//! The relay loop in-process (`Running`), test timings for it, and a sink wrapper that
//! counts what the real sink answered (`CountingSink`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_relay::config::RelayConfig;
use outbox_relay::health::Health;
use outbox_relay::model::Message;
use outbox_relay::relay::Relay;
use outbox_relay::sink::{Confirm, Sink, SinkError};
use outbox_relay::store::Store;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::unique;

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

/// A relay running in this process.
pub struct Running {
    pub instance: String,
    pub cancel: CancellationToken,
    pub handle: JoinHandle<()>,
}

impl Running {
    /// The real relay loop on `store` with `sink`, in a task, under a unique instance name.
    pub fn start<S: Sink>(store: Store, sink: S, cfg: RelayConfig) -> Running {
        Self::named(unique("relay"), store, sink, cfg)
    }

    /// As [`Running::start`], as instance `instance`.
    pub fn named<S: Sink>(instance: String, store: Store, sink: S, cfg: RelayConfig) -> Running {
        let relay = Relay::new(
            store,
            sink,
            cfg,
            instance.clone(),
            Default::default(),
            Arc::new(Health::new(Duration::from_secs(300))),
        );
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(relay.run(cancel.clone()));
        Running {
            instance,
            cancel,
            handle,
        }
    }

    /// Cancel and wait for the relay to return (panics if it takes over `within`).
    pub async fn stop(self, within: Duration) {
        self.cancel.cancel();
        tokio::time::timeout(within, self.handle)
            .await
            .expect("the relay stops in time")
            .expect("the relay task does not panic");
    }
}

/// Relay `table` in-process through `sink` until exactly `processed` rows are PROCESSED
/// and `failed` FAILED (within a minute), then stop the relay.
pub async fn relay_until<S: Sink>(
    table: &crate::db::TestTable,
    sink: S,
    cfg: RelayConfig,
    processed: i64,
    failed: i64,
) {
    relay_settled(table, sink, cfg, processed, failed, Duration::from_secs(60)).await;
}

/// Relay `table` in-process through `sink` until all its `n` rows are PROCESSED (within
/// `within`), stop the relay (within 30 s) and check that every row was relayed cleanly
/// (`TestTable::assert_all_clean`). Returns how long the relaying took.
pub async fn relay_all<S: Sink>(
    table: &crate::db::TestTable,
    sink: S,
    cfg: RelayConfig,
    n: i64,
    within: Duration,
) -> Duration {
    let took = relay_settled(table, sink, cfg, n, 0, within).await;
    table.assert_all_clean().await;
    took
}

/// Start a relay on `table`, wait until exactly `processed` rows are PROCESSED and
/// `failed` FAILED (within `within`), stop it (within 30 s); returns the time from start
/// to settled.
async fn relay_settled<S: Sink>(
    table: &crate::db::TestTable,
    sink: S,
    cfg: RelayConfig,
    processed: i64,
    failed: i64,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    let relay = Running::start(table.store(), sink, cfg);
    table.wait_settled(processed, failed, within).await;
    let took = started.elapsed();
    relay.stop(Duration::from_secs(30)).await;
    took
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
