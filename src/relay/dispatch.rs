//! The dispatcher: sends ready heads through the sink while the window of unconfirmed
//! messages has room, and turns each confirm into the next step for its row.
//!
//! Outcomes per row:
//! - confirmed: handed to the completer; the aggregate's next row becomes ready;
//! - rejected: counts an attempt (dead-lettered first if it was the last one); the
//!   aggregate waits until the rejection is recorded, other aggregates go on;
//! - unavailable (the connection broke): if the sink cannot reconnect, the broker is down
//!   — pause, reconnect with backoff, no attempts spent. If it reconnects at once, the
//!   message may be what broke it: it becomes a *suspect* and goes out alone; a suspect
//!   that breaks the connection while alone `MAX_STRIKES` times fails like a rejection;
//! - no confirm within `publish_timeout`, or the lease fence reached: everything out is
//!   abandoned (the sink is closed so nothing stale arrives later), no attempts spent.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::Future;

use super::aggkey::AggKey;
use super::backoff::{self, Pacer};
use super::window::{Body, Entry};
use super::Engine;
use crate::metrics as m;
use crate::model::Message;
use crate::sink::{Confirm, Sink, SinkError};
use crate::store::Rejection;

/// Longest pause between reconnect attempts to a broker that is down (each attempt is
/// itself bounded by the connect timeout): an outage ends for the relay within seconds.
const BROKER_RETRY_MAX: Duration = Duration::from_secs(2);
/// Times a suspect may break the connection while out alone before it is rejected.
pub const MAX_STRIKES: u8 = 3;

/// Most messages one turn of the loop sends; the rest go in the next turns. A sink
/// whose `send` only enqueues (Kafka) never makes the loop wait, so without a bound a
/// turn sent a whole window (a thousand messages, milliseconds) while a finished claim
/// waited to be taken in, and the next claim with it.
pub const TURN_SENDS: usize = 64;

/// A confirm being awaited: the row id and what became of it.
pub type Pending = Pin<Box<dyn Future<Output = (i64, Outcome)> + Send>>;

#[derive(Debug)]
pub enum Outcome {
    Answered(Result<(), SinkError>),
    TimedOut,
}

/// A message out at the broker.
pub struct Flight {
    key: AggKey,
    pub(super) hash: i32,
    msg: Arc<Message>,
    sent: Instant,
    /// `Some` for a dead-letter publish: the rejection to record when it is answered.
    dead_letter: Option<Rejection>,
}

/// What the engine knows of the broker.
pub struct Broker {
    pub down: bool,
    pub retry_at: Instant,
    pacer: Pacer,
}

impl Default for Broker {
    fn default() -> Self {
        Self {
            down: false,
            retry_at: Instant::now(),
            pacer: Pacer::default(),
        }
    }
}

fn pending(id: i64, confirm: Confirm, timeout: Duration) -> Pending {
    Box::pin(async move {
        match tokio::time::timeout(timeout, confirm).await {
            Ok(r) => (id, Outcome::Answered(r)),
            Err(_) => (id, Outcome::TimedOut),
        }
    })
}

impl<S: Sink> Engine<S> {
    fn may_send(&self) -> bool {
        !self.broker.down
            && self.probation.is_none()
            && self.flights.len() < self.cfg.max_in_flight as usize
            && self.completer.backlog() < self.cfg.max_in_flight as usize * 10
            && self.leases.fence_ok()
    }

    /// Send ready heads while the window of unconfirmed messages has room.
    pub(super) async fn dispatch(&mut self) {
        self.sends_left = false;
        let mut sends = 0;
        while self.may_send() {
            if sends == TURN_SENDS {
                self.sends_left = true;
                return;
            }
            sends += 1;
            let alone = self.flights.is_empty();
            let Some((key, entry)) = self.window.next(|e| !e.suspect || alone) else {
                return;
            };
            let msg = match &entry.body {
                Body::Message(msg) => msg.clone(),
                Body::Invalid(why) => {
                    tracing::warn!(id = entry.id, error = %why, "row cannot be published");
                    self.window.hold(&key);
                    self.record_rejection(key, entry.hash, entry.id, why.clone(), true);
                    continue;
                }
            };
            match self.sink.send(&msg).await {
                Ok(confirm) => {
                    if entry.suspect {
                        self.probation = Some(entry.id);
                    }
                    self.confirms
                        .push(pending(entry.id, confirm, self.confirm_timeout));
                    let flight = Flight {
                        key,
                        hash: entry.hash,
                        msg,
                        sent: Instant::now(),
                        dead_letter: None,
                    };
                    self.flights.insert(entry.id, flight);
                }
                Err(SinkError::Rejected(why)) => self.rejected_row(key, &entry, &msg, why).await,
                Err(SinkError::Unavailable(why)) => {
                    self.window.unsent(&key, false, entry.suspect);
                    self.broker_down(&why);
                    return;
                }
            }
        }
    }

    pub(super) async fn on_outcome(&mut self, id: i64, outcome: Outcome) {
        let Some(flight) = self.flights.remove(&id) else {
            return; // abandoned earlier
        };
        if self.probation == Some(id) {
            self.probation = None;
        }
        if let Some(rejection) = flight.dead_letter {
            match outcome {
                Outcome::Answered(Ok(())) => metrics::counter!(m::DEAD_LETTERED_TOTAL).increment(1),
                Outcome::Answered(Err(e)) => {
                    tracing::error!(id, error = %e, "dead-letter publish failed")
                }
                Outcome::TimedOut => tracing::error!(id, "dead-letter publish not confirmed"),
            }
            self.hand_rejection(flight.key, flight.hash, rejection);
            return;
        }
        match outcome {
            Outcome::Answered(Ok(())) => {
                let latency = (Utc::now() - flight.msg.created_at)
                    .to_std()
                    .unwrap_or_default();
                self.meters.publish_latency.record(latency.as_secs_f64());
                // A confirm of the connection an outage just broke may still come in after
                // the outage was reported: only a reconnect says the broker is back.
                if !self.broker.down {
                    self.meters.broker_up.set(1.0);
                }
                self.last_confirm = Some(Instant::now());
                self.window.finish(&flight.key);
                self.delivered.record(&flight.key, id);
                self.recording.insert(id, flight.hash);
                self.completer.mark(id, flight.msg.attempts > 0);
            }
            Outcome::Answered(Err(SinkError::Rejected(why))) => {
                let Some(entry) = self.window.head(&flight.key) else {
                    return;
                };
                self.rejected_row(flight.key, &entry, &flight.msg, why)
                    .await;
            }
            Outcome::Answered(Err(SinkError::Unavailable(why))) => {
                self.unconfirmed(id, flight, why).await;
            }
            Outcome::TimedOut => {
                self.window.unsent(&flight.key, false, false);
                let why = format!("no confirm within {:?}", self.confirm_timeout);
                self.abandon(&why).await;
                self.broker_down(&why);
            }
        }
    }

    /// A message came back unjudged. If the connection broke and cannot be made again,
    /// the broker is down (no strike). If it reconnects at once, the message may be what
    /// broke it: it goes out alone next, with a strike if it was alone already. If the
    /// connection stayed up, it is a strike when a neighbour confirmed meanwhile.
    async fn unconfirmed(&mut self, id: i64, flight: Flight, why: String) {
        let was_alone = self.flights.is_empty();
        let strike;
        let suspect;
        if self.sink.is_connected() {
            strike = self.last_confirm > Some(flight.sent);
            suspect = false;
        } else if !self.broker.down && self.sink.connect().await.is_ok() {
            strike = was_alone;
            suspect = true;
        } else {
            self.window.unsent(&flight.key, false, false);
            self.broker_down(&why);
            return;
        }
        let strikes = self.window.head_strikes(&flight.key) + u8::from(strike);
        if strikes < MAX_STRIKES {
            tracing::debug!(id, strikes, suspect, error = %why, "not confirmed; will be sent again");
            self.window.unsent(&flight.key, strike, suspect);
            return;
        }
        self.window.unsent(&flight.key, true, true);
        let Some(entry) = self.window.head(&flight.key) else {
            return;
        };
        let why = format!(
            "the broker did not take this message {strikes} times while it took others: {why}"
        );
        self.rejected_row(flight.key, &entry, &flight.msg, why)
            .await;
    }

    /// A rejected row: dead-letter it first if this was its last attempt, then record.
    async fn rejected_row(&mut self, key: AggKey, entry: &Entry, msg: &Message, why: String) {
        self.window.hold(&key);
        let attempt = u32::try_from(msg.attempts + 1).unwrap_or(1);
        tracing::warn!(id = msg.id, event_id = %msg.event_id, attempt, error = %why, "broker rejected row");
        let rejection = Rejection {
            id: entry.id,
            error: why.clone(),
            retry_in: backoff::retry_delay(attempt, self.cfg.backoff_initial, self.cfg.backoff_max),
            fatal: false,
        };
        if attempt >= self.cfg.max_attempts {
            // Dead-letter before the FAILED mark: a crash in between re-publishes.
            match self.sink.dead_letter(msg, &why).await {
                Ok(Some(confirm)) => {
                    self.confirms
                        .push(pending(entry.id, confirm, self.confirm_timeout));
                    let flight = Flight {
                        key,
                        hash: entry.hash,
                        msg: Arc::new(msg.clone()),
                        sent: Instant::now(),
                        dead_letter: Some(rejection),
                    };
                    self.flights.insert(entry.id, flight);
                    return;
                }
                Ok(None) => {}
                Err(e) => tracing::error!(id = msg.id, error = %e, "dead-letter publish failed"),
            }
        }
        self.hand_rejection(key, entry.hash, rejection);
    }

    pub(super) fn record_rejection(
        &mut self,
        key: AggKey,
        hash: i32,
        id: i64,
        why: String,
        fatal: bool,
    ) {
        let r = Rejection {
            id,
            error: why,
            retry_in: Duration::ZERO,
            fatal,
        };
        self.hand_rejection(key, hash, r);
    }

    fn hand_rejection(&mut self, key: AggKey, hash: i32, r: Rejection) {
        self.recording.insert(r.id, hash);
        self.rejected.insert(r.id, (key, hash));
        self.completer.reject(r);
    }

    /// Give up on everything out: close the sink (nothing stale can arrive later), put
    /// the rows back unjudged.
    pub(super) async fn abandon(&mut self, why: &str) {
        tracing::warn!(
            out = self.flights.len(),
            reason = why,
            "abandoning unconfirmed messages; they will be sent again, no attempts spent"
        );
        self.sink.close().await;
        self.confirms = futures::stream::FuturesUnordered::new();
        self.probation = None;
        for (_, f) in std::mem::take(&mut self.flights) {
            match f.dead_letter {
                Some(rejection) => self.hand_rejection(f.key, f.hash, rejection),
                None => self.window.unsent(&f.key, false, false),
            }
        }
    }

    /// The broker is not there: no sends until a reconnect works. Only the first report
    /// of an outage (or a failed reconnect) moves the reconnect backoff on.
    pub(super) fn broker_down(&mut self, why: &str) {
        self.meters.broker_up.set(0.0);
        if self.broker.down {
            return;
        }
        tracing::warn!(error = %why, "broker unavailable; rows stay PENDING, no attempts spent");
        self.broker.down = true;
        self.broker.retry_at =
            Instant::now() + self.broker.pacer.next_pause().min(BROKER_RETRY_MAX);
    }

    /// Connect (at start, or when the pause after an outage is over).
    pub(super) async fn broker_connect(&mut self) {
        tracing::debug!("connecting to the broker");
        match self.sink.connect().await {
            Ok(()) => {
                if self.broker.down {
                    tracing::info!("broker reachable again");
                }
                self.meters.broker_up.set(1.0);
                self.broker.down = false;
                self.broker.pacer.reset();
            }
            Err(e) => {
                if self.broker.down {
                    tracing::debug!(error = %e, "broker still not reachable");
                    self.meters.broker_up.set(0.0);
                    self.broker.retry_at =
                        Instant::now() + self.broker.pacer.next_pause().min(BROKER_RETRY_MAX);
                } else {
                    self.broker_down(&e.to_string());
                }
            }
        }
    }
}
