//! The relay loop: claim a batch of due rows from the partitions this instance leases,
//! publish it in per-aggregate waves through a `Sink`, await the confirms, and record
//! every outcome in one statement per kind. It sees only `Store` and `Sink`.
//!
//! Crash points (any of them may be a SIGKILL):
//! - after claim, before publish: nothing was marked; the rows are claimed again
//!   (by us after restart, or by whoever takes the partition over);
//! - after publish, before confirm / after confirm, before mark: the rows are still
//!   `PENDING` and will be published again — a duplicate, never a loss (consumers dedup
//!   on `event_id`);
//! - after mark: done.

pub mod backoff;
pub mod leases;
pub mod wake;
pub mod waves;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::RelayConfig;
use crate::health::Health;
use crate::metrics as m;
use crate::model::Message;
use crate::sink::{Sink, SinkError};
use crate::store::{Rejection, Store, StoreError};
use backoff::Pacer;
use leases::LeaseKeeper;

pub struct Relay<S: Sink> {
    store: Store,
    sink: S,
    cfg: RelayConfig,
    leases: LeaseKeeper,
    wake: Arc<Notify>,
    health: Arc<Health>,
}

impl<S: Sink> Relay<S> {
    pub fn new(
        store: Store,
        sink: S,
        cfg: RelayConfig,
        instance: String,
        wake: Arc<Notify>,
        health: Arc<Health>,
    ) -> Self {
        let leases = LeaseKeeper::new(instance, cfg.lease_timeout);
        Self {
            store,
            sink,
            cfg,
            leases,
            wake,
            health,
        }
    }

    /// Run until `cancel` fires; then finish the in-flight wave, record it, hand the
    /// leases back and return.
    ///
    /// While there is a backlog the loop is a pipeline: the next batch is claimed (with
    /// the rows still in memory excluded) while the current one is published, and a
    /// confirmed batch is marked while the next one is published. The pipeline only runs
    /// while every row confirms: any rejection, unavailable broker or held-back row
    /// drops the prefetched batch (it was claimed without knowing that outcome) and
    /// records synchronously, so the next claim sees every blocker in the database.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut db_pacer = Pacer::default();
        let mut broker_pacer = Pacer::default();
        match self.sink.connect().await {
            Ok(()) => metrics::gauge!(m::BROKER_UP).set(1.0),
            Err(e) => {
                metrics::gauge!(m::BROKER_UP).set(0.0);
                tracing::warn!(error = %e, "broker not reachable yet; will retry");
            }
        }
        let mut pipe = Pipeline::default();
        while !cancel.is_cancelled() {
            self.health.beat();
            if Instant::now() >= self.leases.next_renew() {
                // Renew (and rebalance) only with nothing in flight.
                pipe.drain().await;
                if let Err(e) = self.leases.maintain(&self.store, true).await {
                    self.db_down(&e, &mut db_pacer, &cancel).await;
                    continue;
                }
            }
            if !self.leases.fence_ok() {
                // No partitions (others hold them all) or leases not yet valid: idle.
                pipe.drain().await;
                self.idle(&cancel).await;
                continue;
            }
            let rows = match pipe.next.take() {
                Some(next) if next.held == self.leases.held() => Ok(next.rows),
                stale => {
                    if stale.is_some() {
                        // Partitions changed since the prefetch: claim afresh.
                        pipe.carry.clear();
                    }
                    let exclude = pipe.in_memory_ids();
                    self.store
                        .claim_excluding(
                            self.leases.claim_filter(),
                            &exclude,
                            self.cfg.batch_size,
                            self.cfg.on_failed,
                        )
                        .await
                }
            };
            let rows = match rows {
                Ok(rows) => rows,
                Err(e) => {
                    pipe.drain().await;
                    self.db_down(&e, &mut db_pacer, &cancel).await;
                    continue;
                }
            };
            db_pacer.reset();
            metrics::gauge!(m::DATABASE_UP).set(1.0);
            if rows.is_empty() && pipe.carry.is_empty() {
                pipe.drain().await;
                self.idle(&cancel).await;
                continue;
            }
            // A full batch means more is probably due: claim the next one meanwhile.
            let full = rows.len() >= self.cfg.batch_size as usize;
            let carried = std::mem::take(&mut pipe.carry);
            let mut exclude = pipe.recording_ids.clone();
            exclude.extend(rows.iter().map(|r| r.id));
            exclude.extend(carried.iter().map(|m| m.id));
            let held = self.leases.held().to_vec();
            let prefetch = full.then(|| {
                let store = self.store.clone();
                let filter = self.leases.claim_filter().map(<[i32]>::to_vec);
                let (limit, on_failed) = (self.cfg.batch_size, self.cfg.on_failed);
                tokio::spawn(async move {
                    store
                        .claim_excluding(filter.as_deref(), &exclude, limit, on_failed)
                        .await
                })
            });
            let out = self
                .publish_batch(rows, carried, prefetch.is_some(), &cancel)
                .await;
            let clean = out.clean();
            let broker_unavailable = out.broker_unavailable;
            if clean {
                pipe.wait_recording().await;
                pipe.recording_ids = out.confirmed.clone();
                pipe.carry = out.carried;
                pipe.recording = Some(tokio::spawn(record(
                    self.recorder(),
                    out.confirmed,
                    out.rejections,
                    cancel.clone(),
                )));
                if let Some(p) = prefetch {
                    match p.await {
                        Ok(Ok(rows)) => pipe.next = Some(Claimed { rows, held }),
                        // The next iteration claims again (and reports the error); the
                        // carried rows are claimed again with it.
                        _ => pipe.carry.clear(),
                    }
                }
            } else {
                // Something was not confirmed: drop what was claimed without knowing it,
                // and record before claiming again.
                if let Some(p) = prefetch {
                    let _ = p.await;
                }
                pipe.carry.clear();
                pipe.drain().await;
                record(
                    self.recorder(),
                    out.confirmed,
                    out.rejections,
                    cancel.clone(),
                )
                .await;
            }
            if broker_unavailable {
                metrics::gauge!(m::BROKER_UP).set(0.0);
                let pause = broker_pacer.next_pause();
                tracing::warn!(
                    ?pause,
                    untouched = out.untouched,
                    "broker unavailable; rows stay PENDING, no attempts spent"
                );
                self.pause(pause, &cancel).await;
            } else {
                broker_pacer.reset();
            }
        }
        pipe.drain().await;
        self.sink.close().await;
        if let Err(e) = self.leases.leave(&self.store).await {
            tracing::warn!(error = %e, "could not hand leases back; they expire after lease_timeout/2");
        }
        tracing::info!("relay loop stopped");
    }

    fn recorder(&self) -> Recorder {
        Recorder {
            store: self.store.clone(),
            max_attempts: self.cfg.max_attempts,
            shutdown_timeout: self.cfg.shutdown_timeout,
            health: self.health.clone(),
        }
    }

    /// Publish `carried` rows (deferred from the previous batch, in memory) and the
    /// claimed `rows` in per-aggregate waves. With `defer_tail`, a short tail of small
    /// waves is handed back as `carried` instead of costing a confirm round trip each:
    /// the next batch starts with it (its rows stay excluded from claims meanwhile).
    async fn publish_batch(
        &mut self,
        rows: Vec<crate::model::OutboxRow>,
        carried: Vec<Message>,
        defer_tail: bool,
        cancel: &CancellationToken,
    ) -> Published {
        let mut out = Published::default();
        let total = rows.len() + carried.len();
        let mut final_failures: Vec<(Message, String)> = Vec::new();
        let mut messages = carried;
        messages.reserve(rows.len());
        // Aggregates whose earlier row was not confirmed in this batch.
        let mut held_back: HashSet<(String, String)> = HashSet::new();
        for row in rows {
            match row.to_message() {
                Ok(msg) => messages.push(msg),
                Err(why) => {
                    tracing::warn!(id = row.id, event_id = %row.event_id, error = %why, "row cannot be published");
                    held_back.insert((row.aggregate_type.clone(), row.aggregate_id.clone()));
                    out.rejections.push(Rejection {
                        id: row.id,
                        error: why,
                        retry_in: Duration::ZERO,
                        fatal: true,
                    });
                }
            }
        }
        if messages.windows(2).any(|w| w[0].id > w[1].id) {
            messages.sort_by_key(|m| m.id);
        }
        let waves = waves::plan(messages);
        let mut left = total - out.rejections.len();
        let mut waves = waves.into_iter();
        while let Some(wave) = waves.next() {
            if cancel.is_cancelled() || out.broker_unavailable {
                break;
            }
            if self.leases.maintain(&self.store, false).await.is_err() || !self.leases.fence_ok() {
                // Cannot prove we still own these partitions: stop publishing.
                self.leases.invalidate();
                break;
            }
            left -= wave.len();
            let wave: Vec<Message> = if held_back.is_empty() {
                wave
            } else {
                wave.into_iter()
                    .filter(|msg| {
                        !held_back.contains(&(msg.aggregate_type.clone(), msg.aggregate_id.clone()))
                    })
                    .collect()
            };
            if wave.is_empty() {
                continue;
            }
            let results = self.sink.publish(&wave).await;
            let now = Utc::now();
            for (msg, res) in wave.into_iter().zip(results) {
                match res {
                    Ok(()) => {
                        let latency = (now - msg.created_at).to_std().unwrap_or_default();
                        metrics::histogram!(m::PUBLISH_LATENCY).record(latency.as_secs_f64());
                        out.confirmed.push(msg.id);
                    }
                    Err(SinkError::Unavailable(why)) => {
                        tracing::debug!(id = msg.id, error = %why, "not confirmed: broker unavailable");
                        out.broker_unavailable = true;
                        held_back.insert((msg.aggregate_type.clone(), msg.aggregate_id.clone()));
                    }
                    Err(SinkError::Rejected(why)) => {
                        held_back.insert((msg.aggregate_type.clone(), msg.aggregate_id.clone()));
                        out.rejections.push(self.rejection(&msg, why.clone()));
                        if self.is_last_attempt(&msg) {
                            final_failures.push((msg, why));
                        }
                    }
                }
            }
            if !out.broker_unavailable {
                metrics::gauge!(m::BROKER_UP).set(1.0);
            }
            // A short tail (a quarter of the batch at most, half a batch size at most)
            // waits for the next batch, whose first wave it joins.
            if defer_tail
                && held_back.is_empty()
                && left > 0
                && left * 4 <= total
                && left <= self.cfg.batch_size as usize / 2
            {
                out.carried = waves.by_ref().flatten().collect();
                break;
            }
        }
        // Dead-letter before the FAILED mark: a crash in between re-publishes, never loses.
        for (msg, why) in &final_failures {
            match self.sink.dead_letter(msg, why).await {
                Ok(true) => metrics::counter!(m::DEAD_LETTERED_TOTAL).increment(1),
                Ok(false) => {}
                Err(e) => tracing::error!(id = msg.id, error = %e, "dead-letter publish failed"),
            }
        }
        out.untouched = total - out.confirmed.len() - out.rejections.len();
        out
    }

    fn is_last_attempt(&self, msg: &Message) -> bool {
        msg.attempts + 1 >= self.cfg.max_attempts as i32
    }

    fn rejection(&self, msg: &Message, why: String) -> Rejection {
        let attempt = u32::try_from(msg.attempts + 1).unwrap_or(1);
        tracing::warn!(id = msg.id, event_id = %msg.event_id, attempt, error = %why, "broker rejected row");
        Rejection {
            id: msg.id,
            error: why,
            retry_in: backoff::retry_delay(attempt, self.cfg.backoff_initial, self.cfg.backoff_max),
            fatal: false,
        }
    }

    async fn db_down(&mut self, e: &StoreError, pacer: &mut Pacer, cancel: &CancellationToken) {
        metrics::gauge!(m::DATABASE_UP).set(0.0);
        self.leases.invalidate();
        let pause = pacer.next_pause();
        tracing::warn!(error = %e, ?pause, "database error; retrying");
        self.pause(pause, cancel).await;
    }

    /// Wait for a NOTIFY, the poll interval, the next lease renew, or shutdown.
    async fn idle(&mut self, cancel: &CancellationToken) {
        let until_renew = self
            .leases
            .next_renew()
            .saturating_duration_since(Instant::now());
        let wait = self
            .cfg
            .poll_interval
            .min(until_renew.max(Duration::from_millis(10)));
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }

    async fn pause(&mut self, d: Duration, cancel: &CancellationToken) {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(d) => {}
        }
    }
}

/// A batch claimed ahead, with the partitions held when it was claimed.
struct Claimed {
    rows: Vec<crate::model::OutboxRow>,
    held: Vec<i32>,
}

/// What publishing one batch came to, before it is recorded.
#[derive(Default)]
struct Published {
    confirmed: Vec<i64>,
    rejections: Vec<Rejection>,
    /// Rows deferred to the next batch (not published, still `PENDING`).
    carried: Vec<Message>,
    /// Rows left `PENDING` untouched (carried, broker down, held back, shutdown).
    untouched: usize,
    /// A message came back `SinkError::Unavailable`: pause before the next claim.
    broker_unavailable: bool,
}

impl Published {
    /// Every row confirmed, or deliberately deferred.
    fn clean(&self) -> bool {
        self.rejections.is_empty()
            && !self.broker_unavailable
            && self.untouched == self.carried.len()
    }
}

/// The rows this instance holds in memory between claims.
#[derive(Default)]
struct Pipeline {
    /// The next batch, claimed while the current one was published.
    next: Option<Claimed>,
    /// Rows deferred from the last batch; the next one starts with them.
    carry: Vec<Message>,
    /// The confirmed batch being marked in the background, and its ids.
    recording: Option<tokio::task::JoinHandle<()>>,
    recording_ids: Vec<i64>,
}

impl Pipeline {
    /// Ids a claim must leave out: rows in memory, or confirmed and not yet marked.
    fn in_memory_ids(&self) -> Vec<i64> {
        let mut ids = self.recording_ids.clone();
        ids.extend(self.carry.iter().map(|m| m.id));
        ids
    }

    async fn wait_recording(&mut self) {
        if let Some(r) = self.recording.take() {
            let _ = r.await;
        }
        self.recording_ids.clear();
    }

    /// Empty the pipeline: finish the mark in flight; forget the prefetched batch and the
    /// carried rows (they are `PENDING` and untouched: claimed again later).
    async fn drain(&mut self) {
        self.next = None;
        self.carry.clear();
        self.wait_recording().await;
    }
}

/// What recording outcomes needs (owned, so it can run beside the next batch).
struct Recorder {
    store: Store,
    max_attempts: u32,
    shutdown_timeout: Duration,
    health: Arc<Health>,
}

/// Write a batch's outcomes (FAILED rows are counted in the metrics). Retries while the
/// database is down (bounded by shutdown): confirmed-but-unmarked rows would only be
/// re-published, but marking them spares consumers the duplicates.
async fn record(
    r: Recorder,
    confirmed: Vec<i64>,
    rejections: Vec<Rejection>,
    cancel: CancellationToken,
) {
    let deadline = Instant::now() + r.shutdown_timeout;
    let mut pacer = Pacer::default();
    let mut marked = confirmed.is_empty();
    let mut rejected = rejections.is_empty();
    loop {
        if !marked {
            match r.store.mark_processed(&confirmed).await {
                Ok(n) => {
                    metrics::counter!(m::PUBLISHED_TOTAL).increment(n);
                    marked = true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, rows = confirmed.len(), "marking PROCESSED failed; retrying")
                }
            }
        }
        if !rejected {
            match r.store.reject(&rejections, r.max_attempts).await {
                Ok(outcomes) => {
                    for o in &outcomes {
                        if o.failed {
                            metrics::counter!(m::FAILED_TOTAL).increment(1);
                            tracing::error!(id = o.id, attempts = o.attempts, "row FAILED");
                        } else {
                            metrics::counter!(m::RETRIES_TOTAL).increment(1);
                        }
                    }
                    rejected = true;
                }
                Err(e) => tracing::warn!(error = %e, "recording rejections failed; retrying"),
            }
        }
        if marked && rejected {
            metrics::gauge!(m::DATABASE_UP).set(1.0);
            return;
        }
        metrics::gauge!(m::DATABASE_UP).set(0.0);
        r.health.beat();
        if cancel.is_cancelled() && Instant::now() > deadline {
            tracing::error!(
                "gave up recording outcomes at shutdown; those rows will be re-published"
            );
            return;
        }
        tokio::time::sleep(pacer.next_pause()).await;
    }
}
