//! The relay engine: a claimer keeps a window of due rows in memory, the dispatcher sends
//! each aggregate's head through the `Sink` with many confirms outstanding, and the
//! completer records outcomes in batched statements. Leases run on their own clock. It
//! sees only `Store` and `Sink`.
//!
//! Stages (one file each): `window` (per-aggregate FIFOs, bounded in rows and bytes;
//! keyed by `aggkey`, a shared key hashed once),
//! `claimer` (fair claims), `intake` (the engine's side of a claim: its plan, its rows
//! into the window), `ahead` (the next sweep scan, run beside a claim's fetch),
//! `sweep` (where the next claim looks: cursor, low water mark), `horizon` (ids that can
//! no longer commit), `dispatch`
//! (sending, outcomes, broker outages), `completer` (batched marks), `leases` (renew,
//! rebalance, the fence), `partitions` (the engine's side of a renewal: dropping and
//! handing back partitions), `probe` (broker and database reachability while idle),
//! `doorbell` (wake-ups), `backoff`, `wake`.
//!
//! Crash points (any of them may be a SIGKILL):
//! - after claim, before send: nothing was marked; the rows are claimed again (by us
//!   after restart, or by whoever takes the partition over);
//! - after send, before confirm / after confirm, before mark: the row is still
//!   `PENDING` and will be published again — a duplicate, never a loss (consumers dedup
//!   on `event_id`); its aggregate's next row was not sent (only a confirmed head
//!   releases the next one), so first deliveries stay in order;
//! - after mark: done.

mod aggkey;
mod ahead;
pub mod backoff;
mod claimer;
mod completer;
mod dispatch;
mod doorbell;
mod horizon;
mod intake;
mod late;
mod leases;
mod partitions;
mod probe;
mod sweep;
mod tenants;
#[cfg(test)]
mod tests;
pub mod wake;
mod window;

pub(crate) use horizon::Horizon;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::RelayConfig;
use crate::health::Health;
use crate::metrics as m;
use crate::sink::Sink;
use crate::store::{Store, StoreError};
use aggkey::{AggKey, HashMap, HashSet, KeySet};
use ahead::Ahead;
use backoff::Pacer;
use claimer::Claimed;
use completer::{Completer, Recorded};
use dispatch::{Broker, Flight, Pending};
use doorbell::Doorbell;
use late::Delivered;
use leases::{Leases, Renewal};
use sweep::Sweep;
use tenants::Tenants;
use window::Window;

/// Late-committed rows seen behind a row of their aggregate that was already sent.
pub const LATE_ROWS_TOTAL: &str = "outbox_relay_late_rows_total";

pub struct Relay<S: Sink> {
    store: Store,
    sink: S,
    cfg: RelayConfig,
    instance: String,
    bell: wake::Bell,
    health: Arc<Health>,
}

impl<S: Sink> Relay<S> {
    pub fn new(
        store: Store,
        sink: S,
        cfg: RelayConfig,
        instance: String,
        bell: wake::Bell,
        health: Arc<Health>,
    ) -> Self {
        Self {
            store,
            sink,
            cfg,
            instance,
            bell,
            health,
        }
    }

    /// Run until `cancel` fires; then stop claiming, wait (within `shutdown_timeout`) for
    /// what is out at the broker, record it, hand the leases back and return.
    pub async fn run(self, cancel: CancellationToken) {
        Engine::new(self).run(cancel).await;
    }
}

/// The engine's state (see the module doc).
struct Engine<S: Sink> {
    store: Store,
    sink: S,
    cfg: RelayConfig,
    wake: Arc<Notify>,
    health: Arc<Health>,
    leases: Leases,
    renewing: Option<JoinHandle<Result<Renewal, StoreError>>>,
    releasing: HashSet<i32>,
    release_task: Option<JoinHandle<Result<(), StoreError>>>,
    window: Window,
    /// Highest delivered id per aggregate, for counting late rows.
    delivered: Delivered,
    max_rows: usize,
    flights: HashMap<i64, Flight>,
    confirms: FuturesUnordered<Pending>,
    /// A suspect row out alone: nothing else is sent until it comes back.
    probation: Option<i64>,
    /// The last turn stopped sending at `dispatch::TURN_SENDS` with heads still ready.
    sends_left: bool,
    /// How long a confirm may take (the sink's answer to `publish_timeout`).
    confirm_timeout: Duration,
    /// When the broker last confirmed something.
    last_confirm: Option<Instant>,
    broker: Broker,
    completer: Completer,
    /// Ids handed to the completer and not yet recorded, with their aggregate hash
    /// (claims leave them out; their partitions are not handed back meanwhile).
    recording: HashMap<i64, i32>,
    /// Rejected rows being recorded: their aggregate (held back) and hash.
    rejected: HashMap<i64, (AggKey, i32)>,
    sweep: Sweep,
    claiming: Option<JoinHandle<Result<Claimed, StoreError>>>,
    /// The next sweep scan, run beside the last sweep claim's fetch.
    ahead: Option<Ahead>,
    /// Fairness between `aggregate_type`s (`tenants`).
    tenants: Tenants,
    claim_due: bool,
    next_claim_at: Instant,
    db_pacer: Pacer,
    /// Aggregates dropped from memory since the running claim started.
    dropped: KeySet,
    /// When the last poll tick claimed (the tick is shorter while not listening).
    last_poll: Instant,
    doorbell: Doorbell,
    probes: probe::Probes,
    meters: Meters,
}

/// The engine's metrics that a confirm or a turn of the loop updates, looked up once
/// rather than by name (hashing the name and searching the registry) each time; the
/// engine sets `broker_up` only through its handle.
struct Meters {
    publish_latency: metrics::Histogram,
    broker_up: metrics::Gauge,
    in_flight: metrics::Gauge,
    window_rows: metrics::Gauge,
    window_bytes: metrics::Gauge,
}

impl<S: Sink> Engine<S> {
    fn new(r: Relay<S>) -> Self {
        let leases = Leases::new(r.instance, r.cfg.lease_timeout);
        let completer = Completer::new(
            r.store.clone(),
            r.cfg.max_attempts,
            r.cfg.on_failed,
            r.health.clone(),
        );
        let max_rows = (r.cfg.max_in_flight as usize * 2).max(r.cfg.batch_size as usize);
        let confirm_timeout = r.sink.confirm_timeout(r.cfg.effective_publish_timeout());
        Self {
            store: r.store,
            sink: r.sink,
            wake: r.bell.woken.clone(),
            health: r.health,
            leases,
            renewing: None,
            releasing: HashSet::default(),
            release_task: None,
            window: Window::default(),
            delivered: Delivered::default(),
            max_rows,
            flights: HashMap::default(),
            confirms: FuturesUnordered::new(),
            probation: None,
            sends_left: false,
            last_confirm: None,
            confirm_timeout,
            broker: Broker::default(),
            completer,
            recording: HashMap::default(),
            rejected: HashMap::default(),
            sweep: Sweep::default(),
            claiming: None,
            ahead: None,
            tenants: Tenants::new(Instant::now()),
            claim_due: true,
            next_claim_at: Instant::now(),
            db_pacer: Pacer::default(),
            dropped: KeySet::default(),
            last_poll: Instant::now(),
            doorbell: Doorbell::new(r.bell, r.cfg.busy_poll_interval),
            probes: probe::Probes::new(Instant::now()),
            meters: Meters {
                publish_latency: metrics::histogram!(m::PUBLISH_LATENCY),
                broker_up: metrics::gauge!(m::BROKER_UP),
                in_flight: metrics::gauge!(m::IN_FLIGHT),
                window_rows: metrics::gauge!(m::WINDOW_ROWS),
                window_bytes: metrics::gauge!(m::WINDOW_BYTES),
            },
            cfg: r.cfg,
        }
    }

    async fn run(mut self, cancel: CancellationToken) {
        self.broker_connect().await;
        while !cancel.is_cancelled() {
            self.health.beat();
            self.step().await;
            let timer = self.next_timer();
            tokio::select! {
                _ = cancel.cancelled() => {}
                Some((id, outcome)) = self.confirms.next(), if !self.confirms.is_empty() => {
                    self.on_outcome(id, outcome).await;
                    // Take every other confirm already in, before sending more.
                    while let Some(Some((id, outcome))) = futures::FutureExt::now_or_never(self.confirms.next()) {
                        self.on_outcome(id, outcome).await;
                    }
                }
                r = join(&mut self.renewing) => { self.renewing = None; self.on_renewed(r); }
                r = join(&mut self.release_task) => { self.release_task = None; self.on_released(r); }
                r = join(&mut self.claiming) => { self.claiming = None; self.on_claimed(r); }
                r = join(&mut self.tenants.probe) => { self.tenants.probe = None; self.on_tenant_probed(r); }
                r = self.completer.next() => self.on_recorded(r),
                p = self.probes.next() => self.on_probed(p).await,
                _ = self.wake.notified() => self.claim_due = true,
                // Heads left unsent by the last turn: go on once the others had their turn.
                _ = std::future::ready(()), if self.sends_left => {}
                _ = tokio::time::sleep_until(timer.into()) => {}
            }
        }
        self.shutdown().await;
    }

    /// Everything that is due now, in order: leases, the fence, reconnect, claim, send, probes.
    async fn step(&mut self) {
        let now = Instant::now();
        if now >= self.next_poll() {
            self.claim_due = true;
            self.last_poll = now;
        }
        self.doorbell.tick(now);
        if self.renewing.is_none() && now >= self.leases.next_renew() {
            let (store, instance) = (self.store.clone(), self.leases.instance.clone());
            let (ttl, have) = (self.leases.ttl(), self.leases.held().len());
            self.renewing = Some(tokio::spawn(leases::renew(store, instance, ttl, have)));
        }
        if !self.flights.is_empty() && self.leases.lapsed() {
            self.abandon("the partition leases may have lapsed (fence)")
                .await;
        }
        self.try_release();
        if self.broker.down && now >= self.broker.retry_at {
            self.broker_connect().await;
        }
        let claiming = self.claiming.is_some();
        self.maybe_claim();
        if !claiming && self.claiming.is_some() {
            // Tokio runs a task spawned from a worker next on that worker, after the
            // spawner yields, and no other worker may take it meanwhile: without this the
            // claim's first statement waited for the sends below (1-2 ms a claim in a drain).
            tokio::task::yield_now().await;
        }
        self.dispatch().await;
        self.completer.kick();
        self.start_probes(Instant::now());
        self.meters.in_flight.set(self.flights.len() as f64);
        self.meters.window_rows.set(self.window.rows() as f64);
        self.meters.window_bytes.set(self.window.bytes() as f64);
    }

    fn next_timer(&self) -> Instant {
        let mut t = self.next_poll().min(self.leases.next_renew());
        if self.broker.down {
            t = t.min(self.broker.retry_at);
        }
        t = t.min(self.next_probe());
        if self.claim_due && self.claiming.is_none() && self.next_claim_at > Instant::now() {
            // Waiting out a database error before claiming again.
            t = t.min(self.next_claim_at);
        }
        if !self.flights.is_empty() {
            if let Some(v) = self.leases.valid_until() {
                t = t.min(v);
            }
        }
        t.max(Instant::now() + Duration::from_millis(1))
    }

    fn next_poll(&self) -> Instant {
        self.last_poll + self.doorbell.poll_interval(self.cfg.poll_interval)
    }

    fn maybe_claim(&mut self) {
        let now = Instant::now();
        if self.claiming.is_some()
            || !self.claim_due
            || now < self.next_claim_at
            || self.broker.down
            || !self.leases.fence_ok()
        {
            return;
        }
        if let Some(plan) = self.next_plan(now) {
            self.claiming = Some(tokio::spawn(claimer::claim(self.store.clone(), plan)));
        }
    }

    fn db_error(&mut self, what: &str, e: &StoreError) {
        metrics::gauge!(m::DATABASE_UP).set(0.0);
        let pause = self.db_pacer.next_pause();
        tracing::warn!(error = %e, ?pause, "database error ({what}); retrying");
        self.next_claim_at = Instant::now() + pause;
        self.claim_due = true;
    }

    fn on_recorded(&mut self, r: Recorded) {
        match r {
            Recorded::Marked(ids, refused) => {
                for id in ids {
                    self.recording.remove(&id);
                }
                // Still `PENDING`: the sweep finds them again.
                if let Some(low) = refused.into_iter().min() {
                    self.sweep.lower(low);
                }
            }
            Recorded::Rejected(ids) => {
                for id in ids {
                    self.recording.remove(&id);
                    if let Some((key, hash)) = self.rejected.remove(&id) {
                        // The blocker is in the database now: forget the aggregate's
                        // rows; claims bring them back in order once it is due.
                        self.window.drop_aggregate(&key);
                        self.sweep.cap(hash);
                        self.dropped.insert(key);
                    }
                }
                self.claim_due = true;
            }
        }
    }

    /// Stop claiming; wait for what is out and record it (bounded), leave.
    async fn shutdown(mut self) {
        let deadline = Instant::now() + self.cfg.shutdown_timeout.mul_f64(0.8);
        self.window.clear();
        if let Some(c) = self.claiming.take() {
            c.abort();
        }
        loop {
            self.completer.kick();
            if self.confirms.is_empty() && self.completer.is_idle() {
                break;
            }
            let until = deadline.into();
            tokio::select! {
                Some((id, outcome)) = self.confirms.next(), if !self.confirms.is_empty() => {
                    self.on_outcome(id, outcome).await;
                }
                r = self.completer.next() => self.on_recorded(r),
                _ = tokio::time::sleep_until(until) => break,
            }
        }
        if !self.flights.is_empty() {
            self.abandon("shutting down").await;
        }
        if !self.completer.is_idle() {
            tracing::error!(
                "gave up recording outcomes at shutdown; those rows will be re-published"
            );
            self.completer.abort();
        }
        self.probes.settle().await;
        self.sink.close().await;
        self.leases.clear();
        if let Err(e) = self.store.leave(&self.leases.instance).await {
            tracing::warn!(error = %e, "could not hand leases back; they expire after lease_timeout/2");
        }
        tracing::info!("relay loop stopped");
    }
}

/// Await an optional task (pending for ever when there is none).
async fn join<T>(h: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match h {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}
