//! Probes that keep `broker_up` and `database_up` true when no rows flow: a broker round
//! trip (`Sink::probe`) once the engine has had nothing out for a second, and a database
//! ping once it has had nothing out or being recorded for two seconds; each answered
//! within `PROBE_TIMEOUT`, repeated at those paces while the quiet lasts. While rows
//! flow, their confirms and statements set the gauges (a ping then could wait for a
//! busy pool and report a database that is merely busy).
//!
//! - A broker probe that fails while nothing is out is handled as an outage seen at
//!   publish. A connection that says it is up but did not answer means the broker is down
//!   at once (`broker_up` 0, no attempts spent; the connection is closed, not trusted
//!   again). A connection that is gone (the broker closed it, or the engine did after
//!   abandoning what was out) is made again at once, and the broker is down only if that
//!   fails. Down, the engine reconnects with its usual backoff (`broker_down`,
//!   `broker_connect`) until one works and sets `broker_up` back to 1. An answer that
//!   comes back after messages went out meanwhile is ignored: their confirms judge the
//!   broker.
//! - The database ping takes a pooled connection and waits for it to answer; one that does
//!   not answer in time is dropped from the pool. It only sets `database_up`.
//!
//! Probes run beside the loop (the select loop polls `Probes::next`); they never hold it up.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgPool};
use tokio::task::JoinHandle;

use super::Engine;
use crate::metrics as m;
use crate::sink::{Confirm, Sink, SinkError};
use crate::store::{Store, StoreError};

/// How long the engine must have had nothing out before it probes the broker, and the
/// pause between broker probes.
const BROKER_EVERY: Duration = Duration::from_secs(1);
/// The same for database pings.
const DATABASE_EVERY: Duration = Duration::from_secs(2);
/// Longest wait for a probe's answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A probe's answer.
pub enum Probed {
    /// `started`: when the probe was sent (answers older than a confirm are stale).
    Broker {
        started: Instant,
        result: Result<(), SinkError>,
    },
    Database(Result<(), String>),
}

/// Which probes may run: `broker` when nothing is out and the broker is not known to be
/// down; `database` when nothing is out or being recorded.
#[derive(Clone, Copy)]
struct Quiet {
    broker: bool,
    database: bool,
}

/// The probes out and when the next ones are due.
pub struct Probes {
    broker: Option<(Instant, Confirm)>,
    broker_next: Instant,
    database: Option<JoinHandle<Result<(), String>>>,
    database_next: Instant,
    /// The last database answer, to log only changes.
    database_up: Option<bool>,
}

impl Probes {
    pub fn new(now: Instant) -> Self {
        Self {
            broker: None,
            broker_next: now + BROKER_EVERY,
            database: None,
            database_next: now + DATABASE_EVERY,
            database_up: None,
        }
    }

    /// Start the probes that are due after `BROKER_EVERY` / `DATABASE_EVERY` of quiet.
    fn start_due<S: Sink>(&mut self, now: Instant, quiet: Quiet, sink: &S, store: &Store) {
        if !quiet.broker {
            self.broker_next = now + BROKER_EVERY;
        } else if self.broker.is_none() && now >= self.broker_next {
            let probe = sink.probe(PROBE_TIMEOUT);
            let bounded: Confirm = Box::pin(async move {
                tokio::time::timeout(PROBE_TIMEOUT, probe)
                    .await
                    .unwrap_or_else(|_| {
                        Err(SinkError::Unavailable(format!(
                            "no answer to a probe within {PROBE_TIMEOUT:?}"
                        )))
                    })
            });
            self.broker = Some((now, bounded));
            self.broker_next = now + BROKER_EVERY;
        }
        if !quiet.database {
            self.database_next = now + DATABASE_EVERY;
        } else if self.database.is_none() && now >= self.database_next {
            let pool = store.pool().clone();
            self.database = Some(tokio::spawn(ping(pool, PROBE_TIMEOUT)));
            self.database_next = now + DATABASE_EVERY;
        }
    }

    /// When a probe is next due (a probe out wakes the loop by answering).
    fn next_due(&self, quiet: Quiet) -> Option<Instant> {
        let broker = (quiet.broker && self.broker.is_none()).then_some(self.broker_next);
        let database = (quiet.database && self.database.is_none()).then_some(self.database_next);
        match (broker, database) {
            (Some(b), Some(d)) => Some(b.min(d)),
            (b, d) => b.or(d),
        }
    }

    /// Before the sink closes: let a broker probe that is out get its answer (briefly), so
    /// the answer does not reach a closing channel (lapin logs that as an error).
    pub async fn settle(&mut self) {
        if let Some((_, probe)) = self.broker.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), probe).await;
        }
    }

    /// The next answer (pending for ever while no probe is out). Cancel-safe.
    pub fn next(&mut self) -> impl Future<Output = Probed> + '_ {
        std::future::poll_fn(move |cx| {
            if let Some((started, probe)) = &mut self.broker {
                if let Poll::Ready(result) = probe.as_mut().poll(cx) {
                    let started = *started;
                    self.broker = None;
                    return Poll::Ready(Probed::Broker { started, result });
                }
            }
            if let Some(task) = &mut self.database {
                if let Poll::Ready(r) = Pin::new(task).poll(cx) {
                    self.database = None;
                    let result = r.unwrap_or_else(|e| Err(format!("probe task failed: {e}")));
                    return Poll::Ready(Probed::Database(result));
                }
            }
            Poll::Pending
        })
    }
}

/// One round trip on a pooled connection, bounded; a connection that does not answer is
/// dropped from the pool rather than handed to the next query.
async fn ping(pool: PgPool, within: Duration) -> Result<(), String> {
    let mut conn = match tokio::time::timeout(within, pool.acquire()).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(StoreError::from(e).to_string()),
        Err(_) => return Err(format!("no pooled connection within {within:?}")),
    };
    match tokio::time::timeout(within, conn.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(StoreError::from(e).to_string()),
        Err(_) => {
            drop(conn.detach());
            Err(format!("no answer to a ping within {within:?}"))
        }
    }
}

impl<S: Sink> Engine<S> {
    fn quiet(&self) -> Quiet {
        let nothing_out = self.flights.is_empty();
        Quiet {
            broker: nothing_out && !self.broker.down,
            database: nothing_out && self.completer.is_idle(),
        }
    }

    pub(super) fn start_probes(&mut self, now: Instant) {
        let quiet = self.quiet();
        self.probes.start_due(now, quiet, &self.sink, &self.store);
    }

    /// When a probe is next due (in an hour when none is).
    pub(super) fn next_probe(&self) -> Instant {
        let later = Instant::now() + Duration::from_secs(3600);
        self.probes.next_due(self.quiet()).unwrap_or(later)
    }

    pub(super) async fn on_probed(&mut self, probed: Probed) {
        match probed {
            Probed::Broker { result: Ok(()), .. } => {
                if !self.broker.down {
                    self.meters.broker_up.set(1.0);
                }
            }
            Probed::Broker {
                started,
                result: Err(e),
            } => {
                let judged = !self.flights.is_empty()
                    || self.broker.down
                    || self.last_confirm.is_some_and(|t| t > started);
                if judged {
                    tracing::debug!(error = %e, "broker probe failed; sends since judge the broker");
                    return;
                }
                if self.sink.is_connected() {
                    // Up by its own account, yet silent: the broker is down, and this
                    // connection is not trusted again.
                    self.sink.close().await;
                    self.broker_down(&format!("idle probe: {e}"));
                } else {
                    // The connection is gone (closed by the broker, or by the engine after
                    // abandoning what was out): reconnect at once, as a send would; if
                    // that fails the broker is down.
                    tracing::debug!(error = %e, "idle probe: not connected; reconnecting");
                    self.broker_connect().await;
                }
            }
            Probed::Database(Err(e)) if !self.quiet().database => {
                // Rows started flowing meanwhile: a busy pool is no outage, and their
                // statements judge the database.
                tracing::debug!(error = %e, "database ping failed while busy; ignored");
            }
            Probed::Database(result) => {
                let up = result.is_ok();
                metrics::gauge!(m::DATABASE_UP).set(if up { 1.0 } else { 0.0 });
                match result {
                    Err(e) if self.probes.database_up != Some(false) => {
                        tracing::warn!(error = %e, "database ping failed");
                    }
                    Ok(()) if self.probes.database_up == Some(false) => {
                        tracing::info!("database answers again");
                    }
                    _ => {}
                }
                self.probes.database_up = Some(up);
            }
        }
    }
}
