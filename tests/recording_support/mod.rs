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
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::FutureExt;
use outbox_relay::config::{OnFailed, RelayConfig};
use outbox_relay::health::Health;
use outbox_relay::model::Message;
use outbox_relay::relay::Relay;
use outbox_relay::sink::{Confirm, Sink, SinkError};
use outbox_relay::store::Store;
use outbox_relay::table::TableName;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::common::{unique, wait_for, TestTable};

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
    dead_letter: bool,
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

/// Removes its send from the outstanding set when the confirm is done or dropped.
struct OutGuard {
    ledger: Ledger,
    send_seq: u64,
    sink: String,
    id: i64,
    dead_letter: bool,
    done: bool,
}

impl OutGuard {
    fn resolved(&mut self, result: &Result<(), SinkError>) {
        let mut st = self.ledger.lock();
        st.out.remove(&self.send_seq);
        let seq = st.seq();
        st.events.push(Event::Resolved {
            seq,
            at: Instant::now(),
            send_seq: self.send_seq,
            sink: self.sink.clone(),
            id: self.id,
            dead_letter: self.dead_letter,
            result: result.clone(),
        });
        self.done = true;
    }
}

impl Drop for OutGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut st = self.ledger.lock();
        st.out.remove(&self.send_seq);
        if st
            .held
            .get(&self.id)
            .is_some_and(|h| h.send_seq == self.send_seq)
        {
            st.held.remove(&self.id);
        }
        let seq = st.seq();
        st.events.push(Event::Dropped {
            seq,
            at: Instant::now(),
            send_seq: self.send_seq,
            sink: self.sink.clone(),
            id: self.id,
        });
    }
}

/// See the module doc.
#[derive(Clone)]
pub struct RecordingSink {
    pub name: String,
    pub ledger: Ledger,
    script: Script,
    /// What a dead-letter publish does; `None`: no dead-letter target configured.
    dead_letter: Option<Script>,
    connected: Arc<AtomicBool>,
}

impl RecordingSink {
    /// A sink with a ledger of its own.
    pub fn new(script: impl Fn(&Message, &SendInfo) -> Step + Send + Sync + 'static) -> Self {
        Ledger::default().sink("sink", script)
    }

    /// Configure a dead-letter target whose publishes `script` decides (`Refuse` and
    /// `Down` make `dead_letter` return the error).
    pub fn with_dead_letter(
        mut self,
        script: impl Fn(&Message, &SendInfo) -> Step + Send + Sync + 'static,
    ) -> Self {
        self.dead_letter = Some(Arc::new(script));
        self
    }

    /// Record the send, run the script, and (for a confirm handed out) register it as
    /// outstanding and, if held, awaiting the test — all under one lock, so a test that
    /// changes what its script answers and then looks at `held` sees every held send.
    #[allow(clippy::type_complexity)]
    fn record_send(
        &self,
        m: &Message,
        dead_letter: bool,
    ) -> (u64, Step, Option<oneshot::Receiver<Result<(), SinkError>>>) {
        let mut st = self.ledger.lock();
        let calls = st.calls.get(&self.name).copied().unwrap_or(0);
        let nth = st.sends_of.get(&m.id).copied().unwrap_or(0);
        let info = SendInfo {
            nth,
            calls,
            sink: self.name.clone(),
        };
        let step = match (&self.dead_letter, dead_letter) {
            (Some(script), true) => script(m, &info),
            _ => (self.script)(m, &info),
        };
        if !dead_letter {
            *st.calls.entry(self.name.clone()).or_insert(0) += 1;
            *st.sends_of.entry(m.id).or_insert(0) += 1;
        }
        let out_sink = st.out.values().filter(|o| o.sink == self.name).count();
        let out_agg = st
            .out
            .values()
            .filter(|o| o.aggregate == m.aggregate_id)
            .count();
        let seq = st.seq();
        st.events.push(Event::Sent(Sent {
            seq,
            at: Instant::now(),
            sink: self.name.clone(),
            id: m.id,
            aggregate: m.aggregate_id.clone(),
            attempts: m.attempts,
            dead_letter,
            step: step.clone(),
            out_sink,
            out_agg,
        }));
        if matches!(step, Step::Refuse(_) | Step::Down(_)) {
            return (seq, step, None);
        }
        st.out.insert(
            seq,
            Out {
                sink: self.name.clone(),
                id: m.id,
                aggregate: m.aggregate_id.clone(),
                dead_letter,
            },
        );
        let mut rx = None;
        if step == Step::Hold {
            let (tx, r) = oneshot::channel();
            let h = Held {
                send_seq: seq,
                sink: self.name.clone(),
                tx,
            };
            st.held.insert(m.id, h);
            rx = Some(r);
        }
        (seq, step, rx)
    }

    fn hand_out(&mut self, m: &Message, dead_letter: bool) -> Result<Confirm, SinkError> {
        let (send_seq, step, held) = self.record_send(m, dead_letter);
        match &step {
            Step::Refuse(why) => return Err(SinkError::Rejected(why.clone())),
            Step::Down(why) => {
                self.connected.store(false, Ordering::SeqCst);
                return Err(SinkError::Unavailable(why.clone()));
            }
            _ => {}
        }
        // Like a real sink, sending (re)opens the connection.
        self.connected.store(true, Ordering::SeqCst);
        let mut guard = OutGuard {
            ledger: self.ledger.clone(),
            send_seq,
            sink: self.name.clone(),
            id: m.id,
            dead_letter,
            done: false,
        };
        let connected = self.connected.clone();
        Ok(Box::pin(async move {
            let result = match (step, held) {
                (Step::Hold, Some(rx)) => rx
                    .await
                    .unwrap_or_else(|_| Err(SinkError::Unavailable("connection closed".into()))),
                (Step::Reject(why), _) => Err(SinkError::Rejected(why)),
                (Step::Broken(why), _) => {
                    connected.store(false, Ordering::SeqCst);
                    Err(SinkError::Unavailable(why))
                }
                _ => Ok(()),
            };
            guard.resolved(&result);
            result
        }))
    }
}

impl Sink for RecordingSink {
    async fn connect(&mut self) -> Result<(), SinkError> {
        self.connected.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn send(&mut self, m: &Message) -> Result<Confirm, SinkError> {
        self.hand_out(m, false)
    }

    async fn dead_letter(
        &mut self,
        m: &Message,
        _error: &str,
    ) -> Result<Option<Confirm>, SinkError> {
        if self.dead_letter.is_none() {
            return Ok(None);
        }
        self.hand_out(m, true).map(Some)
    }

    fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Drop the "connection": held confirms of this sink can no longer be answered.
    async fn close(&mut self) {
        self.connected.store(false, Ordering::SeqCst);
        let mut st = self.ledger.lock();
        st.held.retain(|_, h| h.sink != self.name);
        let seq = st.seq();
        st.events.push(Event::Closed {
            seq,
            at: Instant::now(),
            sink: self.name.clone(),
        });
    }
}

/// Fast timings for in-process runs.
pub fn cfg() -> RelayConfig {
    let mut c: RelayConfig =
        serde_json::from_value(serde_json::json!({})).expect("default relay config");
    c.poll_interval = Duration::from_millis(50);
    c.backoff_initial = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(40);
    c.max_attempts = 3;
    c.lease_timeout = Duration::from_secs(4);
    c.publish_timeout = Duration::from_secs(3);
    c.shutdown_timeout = Duration::from_secs(2);
    c.on_failed = OnFailed::Block;
    c.listen = false;
    c.max_in_flight = 16;
    c
}

/// A relay running in this process.
pub struct Running {
    pub instance: String,
    pub cancel: CancellationToken,
    pub handle: JoinHandle<()>,
}

impl Running {
    /// Cancel and wait for the relay to return (panics if it takes over `within`).
    pub async fn stop(self, within: Duration) {
        self.cancel.cancel();
        tokio::time::timeout(within, self.handle)
            .await
            .expect("the relay stops in time")
            .expect("the relay task does not panic");
    }
}

/// Start a relay on `table` with `sink`.
pub fn start(table: &TestTable, sink: RecordingSink, cfg: RelayConfig) -> Running {
    let store = Store::from_pool(
        table.pool.clone(),
        TableName::parse(&table.name).expect("table name"),
    );
    let instance = unique(&format!("rec{}", sink.name));
    let relay = Relay::new(
        store,
        sink,
        cfg,
        instance.clone(),
        Arc::default(),
        Arc::new(Health::new(Duration::from_secs(60))),
    );
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(relay.run(cancel.clone()));
    Running {
        instance,
        cancel,
        handle,
    }
}

/// The engine's logs on the test output when `RUST_LOG` is set (e.g. `outbox_relay=debug`).
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Run `scenario` on a fresh table; drop the table even if it panicked.
pub async fn with_table<F, Fut>(prefix: &str, scenario: F)
where
    F: FnOnce(Arc<TestTable>) -> Fut,
    Fut: Future<Output = ()>,
{
    init_logs();
    let table = Arc::new(TestTable::new(prefix).await);
    let outcome = AssertUnwindSafe(scenario(table.clone()))
        .catch_unwind()
        .await;
    table.cleanup().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Every row of the table: (id, aggregate_id), in id order.
pub async fn rows(table: &TestTable) -> Vec<(i64, String)> {
    sqlx::query_as(&format!(
        "SELECT id, aggregate_id FROM \"{}\" ORDER BY id",
        table.name
    ))
    .fetch_all(&table.pool)
    .await
    .expect("rows")
}

/// Insert `per` rows for each aggregate, round-robin (a1 b1 c1 a2 b2 …); returns the ids
/// per aggregate in id order.
pub async fn insert_round_robin(
    table: &TestTable,
    aggs: &[&str],
    per: usize,
) -> HashMap<String, Vec<i64>> {
    let mut out: HashMap<String, Vec<i64>> = HashMap::new();
    for _ in 0..per {
        for a in aggs {
            let id = table.insert(a, "e", None, serde_json::json!({})).await;
            out.entry(a.to_string()).or_default().push(id);
        }
    }
    out
}

/// The lease partition of an aggregate (as the relay computes it).
pub async fn partition_of(table: &TestTable, agg: &str) -> i32 {
    sqlx::query_scalar("SELECT hashtext('order' || '/' || $1) & 255")
        .bind(agg)
        .fetch_one(&table.pool)
        .await
        .expect("partition")
}

/// Owner of every partition (`None` = free or expired).
pub async fn owners(table: &TestTable) -> HashMap<i32, Option<String>> {
    let rows: Vec<(i32, Option<String>)> = sqlx::query_as(&format!(
        "SELECT partition, CASE WHEN lease_until > now() THEN owner END
         FROM \"{}_relay_leases\"",
        table.name
    ))
    .fetch_all(&table.pool)
    .await
    .expect("leases");
    rows.into_iter().collect()
}

/// Partitions with an owner.
pub async fn owned_count(table: &TestTable) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}_relay_leases\" WHERE owner IS NOT NULL",
        table.name
    ))
    .fetch_one(&table.pool)
    .await
    .expect("leases")
}

/// Wait until `instance` holds every partition.
pub async fn wait_all_leases(table: &TestTable, instance: &str, timeout: Duration) {
    wait_for(
        timeout,
        &format!("{instance} holds all 256 partitions"),
        || async {
            let o = owners(table).await;
            (o.len() == 256 && o.values().all(|v| v.as_deref() == Some(instance))).then_some(())
        },
    )
    .await
}

/// Status of one row.
pub async fn status(table: &TestTable, id: i64) -> String {
    table.row(id).await.0
}

fn dl(s: &Sent) -> &'static str {
    if s.dead_letter {
        " (dead letter)"
    } else {
        ""
    }
}

/// Assert no bound or order violations in `ledger` for `rows`.
pub fn assert_clean(ledger: &Ledger, max_in_flight: usize, rows: &[(i64, String)]) {
    let mut bad = ledger.bound_violations(max_in_flight);
    bad.extend(ledger.order_violations(rows));
    assert!(
        bad.is_empty(),
        "{} violation(s):\n{}",
        bad.len(),
        bad.join("\n")
    );
}
