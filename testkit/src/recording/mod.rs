//! A scriptable in-process sink for engine tests, and the harness around it.
//!
//! `RecordingSink` records every `send` (which message, in which order, by which sink) in
//! a `Ledger` that several sinks may share (one per relay instance). A `Script` decides
//! each send's fate: confirmed at once, rejected, refused before sending, broker down, the
//! connection breaking before the confirm, or a *held* confirm that the test releases
//! later, in any order, with `Ledger::release`.
//!
//! A confirm is *outstanding* from the moment `send` returns it until the engine has
//! polled it to completion or dropped it (abandoned) — exactly what the engine's
//! in-flight bound counts. At every send the ledger notes how many confirms were
//! outstanding for that sink and for that aggregate (across all sinks), so tests can
//! assert the window and "one unconfirmed row per aggregate" from the record.

mod harness;
mod sink;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use outbox_relay::model::Message;
use outbox_relay::sink::SinkError;
use tokio::sync::oneshot;

use crate::wait::wait_for;

pub use harness::*;
pub use sink::RecordingSink;

/// What becomes of one send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Handed over; the confirm says Ok at once.
    Confirm,
    /// Handed over; the broker rejects it (nack, unroutable, …).
    Reject(String),
    /// Refused before sending: `send` returns `Err(Rejected)`.
    Refuse(String),
    /// No broker: `send` returns `Err(Unavailable)`, nothing handed over.
    Down(String),
    /// Handed over, then the connection broke: the confirm says `Unavailable`.
    Broken(String),
    /// Handed over; the confirm waits until the test calls `Ledger::release`.
    Hold,
}

/// What the script knows about a send.
#[derive(Debug, Clone)]
pub struct SendInfo {
    /// Sends of this row before this one (all sinks).
    pub nth: usize,
    /// Send calls of this sink before this one.
    pub calls: usize,
    /// The sink's name.
    pub sink: String,
}

pub type Script = Arc<dyn Fn(&Message, &SendInfo) -> Step + Send + Sync>;

/// One `send` call.
#[derive(Debug, Clone)]
pub struct Sent {
    /// Position in the ledger's event order (shared by all sinks).
    pub seq: u64,
    pub at: Instant,
    pub sink: String,
    pub id: i64,
    pub aggregate: String,
    /// `attempts` as the engine passed it.
    pub attempts: i32,
    /// A `dead_letter` call rather than a `send`.
    pub dead_letter: bool,
    pub step: Step,
    /// Confirms of this sink outstanding when the send started.
    pub out_sink: usize,
    /// Confirms of this aggregate outstanding (all sinks) when the send started.
    pub out_agg: usize,
}

#[derive(Debug, Clone)]
pub enum Event {
    Sent(Sent),
    /// The engine polled the confirm of send `send_seq` to completion.
    Resolved {
        seq: u64,
        at: Instant,
        send_seq: u64,
        sink: String,
        id: i64,
        dead_letter: bool,
        result: Result<(), SinkError>,
    },
    /// The engine dropped the confirm of send `send_seq` unanswered (abandoned it).
    Dropped {
        seq: u64,
        at: Instant,
        send_seq: u64,
        sink: String,
        id: i64,
    },
    Closed {
        seq: u64,
        at: Instant,
        sink: String,
    },
}

struct Out {
    sink: String,
    id: i64,
    aggregate: String,
}

struct Held {
    send_seq: u64,
    sink: String,
    tx: oneshot::Sender<Result<(), SinkError>>,
}

#[derive(Default)]
struct State {
    next_seq: u64,
    events: Vec<Event>,
    /// Outstanding confirms by send seq.
    out: BTreeMap<u64, Out>,
    /// Held confirms by row id (the latest send of that row).
    held: HashMap<i64, Held>,
    calls: HashMap<String, usize>,
    sends_of: HashMap<i64, usize>,
}

impl State {
    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }
}

/// The record shared by one or more `RecordingSink`s.
#[derive(Clone, Default)]
pub struct Ledger(Arc<Mutex<State>>);

impl Ledger {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A sink named `name` recording into this ledger.
    pub fn sink(
        &self,
        name: &str,
        script: impl Fn(&Message, &SendInfo) -> Step + Send + Sync + 'static,
    ) -> RecordingSink {
        RecordingSink {
            name: name.to_string(),
            ledger: self.clone(),
            script: Arc::new(script),
            dead_letter: None,
            connected: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn events(&self) -> Vec<Event> {
        self.lock().events.clone()
    }

    /// Every send call, in order.
    pub fn sends(&self) -> Vec<Sent> {
        self.all_sends()
            .into_iter()
            .filter(|s| !s.dead_letter)
            .collect()
    }

    /// Every dead-letter call, in order.
    pub fn dead_letters(&self) -> Vec<Sent> {
        self.all_sends()
            .into_iter()
            .filter(|s| s.dead_letter)
            .collect()
    }

    fn all_sends(&self) -> Vec<Sent> {
        self.lock()
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Sent(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    /// Send calls for row `id`.
    pub fn sends_of(&self, id: i64) -> Vec<Sent> {
        self.sends().into_iter().filter(|s| s.id == id).collect()
    }

    pub fn send_count(&self, id: i64) -> usize {
        self.lock().sends_of.get(&id).copied().unwrap_or(0)
    }

    /// Times `close` was called on the sink `sink`.
    pub fn closes(&self, sink: &str) -> Vec<Instant> {
        self.lock()
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Closed { sink: s, at, .. } if s == sink => Some(*at),
                _ => None,
            })
            .collect()
    }

    /// Ids whose confirm the engine saw as Ok (each once per confirm).
    pub fn confirmed(&self) -> Vec<i64> {
        self.lock()
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Resolved {
                    id,
                    result: Ok(()),
                    dead_letter: false,
                    ..
                } => Some(*id),
                _ => None,
            })
            .collect()
    }

    /// Whether the engine has seen the outcome of send `send_seq` (or dropped it).
    pub fn settled(&self, send_seq: u64) -> bool {
        self.lock().events.iter().any(|e| match e {
            Event::Resolved { send_seq: s, .. } | Event::Dropped { send_seq: s, .. } => {
                *s == send_seq
            }
            _ => false,
        })
    }

    /// Held confirms the engine still awaits: (row id, send seq, sink), in send order.
    pub fn held(&self) -> Vec<(i64, u64, String)> {
        let st = self.lock();
        let mut v: Vec<(i64, u64, String)> = st
            .held
            .iter()
            .filter(|(_, h)| !h.tx.is_closed())
            .map(|(id, h)| (*id, h.send_seq, h.sink.clone()))
            .collect();
        v.sort_by_key(|h| h.1);
        v
    }

    /// Wait until the engine holds exactly `want` confirms out; returns them (send order).
    pub async fn wait_held(&self, want: usize, what: &str) -> Vec<(i64, u64, String)> {
        wait_for(
            Duration::from_secs(10),
            &format!("{want} confirms held ({what})"),
            || {
                let h = self.held();
                async move { (h.len() == want).then_some(h) }
            },
        )
        .await
    }

    /// Ids of the held confirms of one sink.
    pub fn held_by(&self, sink: &str) -> Vec<i64> {
        self.held()
            .into_iter()
            .filter(|h| h.2 == sink)
            .map(|h| h.0)
            .collect()
    }

    /// Rows with a confirm outstanding at the sink `sink`: (id, aggregate).
    pub fn outstanding(&self, sink: &str) -> Vec<(i64, String)> {
        self.lock()
            .out
            .values()
            .filter(|o| o.sink == sink)
            .map(|o| (o.id, o.aggregate.clone()))
            .collect()
    }

    /// Answer the held confirm of row `id`; `false` if nothing awaits it any more.
    pub fn release(&self, id: i64, result: Result<(), SinkError>) -> bool {
        let held = self.lock().held.remove(&id);
        match held {
            Some(h) => h.tx.send(result).is_ok(),
            None => false,
        }
    }

    /// Release row `id`'s held confirm with Ok and wait until the engine has taken it.
    pub async fn release_and_wait(&self, id: i64, timeout: Duration) -> bool {
        let seq = self.lock().held.get(&id).map(|h| h.send_seq);
        let Some(seq) = seq else { return false };
        if !self.release(id, Ok(())) {
            return false;
        }
        wait_for(
            timeout,
            &format!("engine took the confirm of row {id}"),
            || {
                let done = self.settled(seq);
                async move { done.then_some(()) }
            },
        )
        .await;
        true
    }

    /// Violations of the window bounds in the record: a send that started with
    /// `max_in_flight` (or more) confirms of its sink outstanding, or while a confirm of
    /// its aggregate was outstanding anywhere.
    pub fn bound_violations(&self, max_in_flight: usize) -> Vec<String> {
        let mut bad = Vec::new();
        for s in self.all_sends() {
            if s.out_sink >= max_in_flight {
                bad.push(format!(
                    "sink {} sent row {}{} with {} confirms outstanding (max_in_flight {max_in_flight})",
                    s.sink, s.id, dl(&s), s.out_sink
                ));
            }
            if s.out_agg > 0 {
                bad.push(format!(
                    "sink {} sent row {}{} of aggregate {} while {} confirm(s) of that aggregate were outstanding",
                    s.sink, s.id, dl(&s), s.aggregate, s.out_agg
                ));
            }
        }
        bad
    }

    /// Largest number of confirms outstanding at once (per sink, counting the new send).
    pub fn max_outstanding(&self, sink: &str) -> usize {
        self.sends()
            .iter()
            .filter(|s| s.sink == sink)
            .map(|s| s.out_sink + 1)
            .max()
            .unwrap_or(0)
    }

    /// Order violations against the table's rows `(id, aggregate)`: a row sent before
    /// every lower row of its aggregate had been confirmed (as seen by the engine), or a
    /// row sent again after it was confirmed.
    pub fn order_violations(&self, rows: &[(i64, String)]) -> Vec<String> {
        let mut lower: HashMap<&str, Vec<i64>> = HashMap::new();
        for (id, agg) in rows {
            lower.entry(agg.as_str()).or_default().push(*id);
        }
        let mut confirmed: HashSet<i64> = HashSet::new();
        let mut bad = Vec::new();
        for e in self.events() {
            match e {
                Event::Sent(s) if !s.dead_letter => {
                    if confirmed.contains(&s.id) {
                        bad.push(format!(
                            "row {} ({}) sent again by {} after it was confirmed",
                            s.id, s.aggregate, s.sink
                        ));
                    }
                    let earlier = lower.get(s.aggregate.as_str()).into_iter().flatten();
                    let missing: Vec<i64> = earlier
                        .filter(|id| **id < s.id && !confirmed.contains(id))
                        .copied()
                        .collect();
                    if !missing.is_empty() {
                        bad.push(format!(
                            "row {} ({}) sent by {} before rows {missing:?} of its aggregate were confirmed",
                            s.id, s.aggregate, s.sink
                        ));
                    }
                }
                Event::Resolved {
                    id,
                    result: Ok(()),
                    dead_letter: false,
                    ..
                } => {
                    confirmed.insert(id);
                }
                _ => {}
            }
        }
        bad
    }
}

fn dl(s: &Sent) -> &'static str {
    if s.dead_letter {
        " (dead letter)"
    } else {
        ""
    }
}
