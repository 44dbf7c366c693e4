//! The completer: records outcomes in batched statements, one mark and one rejection
//! statement in flight at a time (group commit: whatever confirmed while one statement
//! ran goes into the next). A statement that fails because the database is unreachable
//! is retried with backoff; one that fails for any other reason is retried row by row,
//! so one row cannot stall the others.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::backoff::Pacer;
use crate::config::OnFailed;
use crate::health::Health;
use crate::metrics as m;
use crate::store::{Rejection, Store, StoreError};

/// Outcomes recorded by one finished statement.
#[derive(Debug)]
pub enum Recorded {
    /// These confirmed ids are `PROCESSED` now (or were no longer `PENDING`), except
    /// the second list's: the database refused their marks, they stay `PENDING` (to be
    /// published again).
    Marked(Vec<i64>, Vec<i64>),
    /// These rejected ids are recorded (or given up on after a row-level error).
    Rejected(Vec<i64>),
}

pub struct Completer {
    store: Store,
    max_attempts: u32,
    on_failed: OnFailed,
    health: Arc<Health>,
    marks: Vec<i64>,
    /// Confirmed rows that had been retried: rows may be parked behind them.
    releases: Vec<i64>,
    marking: Option<JoinHandle<(Vec<i64>, Vec<i64>)>>,
    rejects: Vec<Rejection>,
    rejecting: Option<JoinHandle<Vec<i64>>>,
    /// Ids handed over and not yet recorded.
    backlog: usize,
}

impl Completer {
    pub fn new(store: Store, max_attempts: u32, on_failed: OnFailed, health: Arc<Health>) -> Self {
        Self {
            store,
            max_attempts,
            on_failed,
            health,
            marks: Vec::new(),
            releases: Vec::new(),
            marking: None,
            rejects: Vec::new(),
            rejecting: None,
            backlog: 0,
        }
    }

    /// Record a confirm; `retried` (the row had been rejected before) marks it in a
    /// transaction that also un-parks the rows parked behind it while it waited.
    pub fn mark(&mut self, id: i64, retried: bool) {
        if retried {
            self.releases.push(id);
        } else {
            self.marks.push(id);
        }
        self.backlog += 1;
    }

    pub fn reject(&mut self, r: Rejection) {
        self.rejects.push(r);
        self.backlog += 1;
    }

    /// Outcomes handed over and not yet recorded.
    pub fn backlog(&self) -> usize {
        self.backlog
    }

    pub fn is_idle(&self) -> bool {
        self.backlog == 0
    }

    /// Start a statement for what has accumulated, if none of its kind is running.
    pub fn kick(&mut self) {
        if self.marking.is_none() && !(self.marks.is_empty() && self.releases.is_empty()) {
            let ids = std::mem::take(&mut self.marks);
            let releases = std::mem::take(&mut self.releases);
            let (store, health) = (self.store.clone(), self.health.clone());
            self.marking = Some(tokio::spawn(async move {
                let (mut done, mut refused) = mark(&store, ids, &health, false).await;
                let (released, not) = mark(&store, releases, &health, true).await;
                done.extend(released);
                refused.extend(not);
                (done, refused)
            }));
        }
        if self.rejecting.is_none() && !self.rejects.is_empty() {
            let rs = std::mem::take(&mut self.rejects);
            let (store, health) = (self.store.clone(), self.health.clone());
            let policy = (self.max_attempts, self.on_failed);
            self.rejecting = Some(tokio::spawn(reject(store, rs, policy, health)));
        }
    }

    /// The next finished statement (pending for ever when none runs).
    pub async fn next(&mut self) -> Recorded {
        let out = tokio::select! {
            (done, refused) = join(&mut self.marking) => Recorded::Marked(done, refused),
            r = join(&mut self.rejecting) => Recorded::Rejected(r),
        };
        match &out {
            Recorded::Marked(ids, _) => {
                self.marking = None;
                self.backlog -= ids.len();
            }
            Recorded::Rejected(ids) => {
                self.rejecting = None;
                self.backlog -= ids.len();
            }
        }
        self.kick();
        out
    }

    /// Stop statements still retrying (shutdown deadline): their rows stay `PENDING`.
    pub fn abort(&mut self) {
        if let Some(h) = self.marking.take() {
            h.abort();
        }
        if let Some(h) = self.rejecting.take() {
            h.abort();
        }
    }
}

async fn join<T: Default>(h: &mut Option<JoinHandle<T>>) -> T {
    match h {
        Some(handle) => handle.await.unwrap_or_default(),
        None => std::future::pending().await,
    }
}

/// Mark confirmed ids `PROCESSED` (`release`: and un-park what waits behind them),
/// retrying while the database is unreachable; a statement refused for another reason
/// is retried row by row, so one row cannot hold the others' marks back. Returns the
/// ids, and those whose mark was refused.
async fn mark(
    store: &Store,
    ids: Vec<i64>,
    health: &Health,
    release: bool,
) -> (Vec<i64>, Vec<i64>) {
    let mut refused = Vec::new();
    if ids.is_empty() {
        return (ids, refused);
    }
    let began = std::time::Instant::now();
    let marked = mark_with_retry(store, &ids, health, release).await;
    tracing::trace!(
        rows = ids.len(),
        took_us = began.elapsed().as_micros() as u64,
        "marked PROCESSED"
    );
    if let Err(e) = marked {
        tracing::warn!(error = %e, rows = ids.len(), "marking PROCESSED failed; marking the rows one by one");
        for id in &ids {
            if let Err(e) = mark_with_retry(store, std::slice::from_ref(id), health, release).await
            {
                tracing::error!(id, error = %e, "cannot mark this row PROCESSED; it stays PENDING and will be published again");
                refused.push(*id);
            }
        }
    }
    (ids, refused)
}

async fn mark_with_retry(
    store: &Store,
    ids: &[i64],
    health: &Health,
    release: bool,
) -> Result<(), StoreError> {
    let n = until_reachable(
        health,
        "marking PROCESSED",
        ids.len(),
        Pacer::MAX,
        || async move {
            if release {
                store.mark_released(ids).await
            } else {
                store.mark_processed(ids).await
            }
        },
    )
    .await?;
    metrics::counter!(m::PUBLISHED_TOTAL).increment(n);
    Ok(())
}

/// Run one recording statement until it succeeds or fails for a reason other than the
/// database being unreachable (returned): while unreachable, `database_up` is 0 and the
/// statement is retried with backoff (pauses at most `max_pause`).
async fn until_reachable<T, F, Fut>(
    health: &Health,
    what: &str,
    rows: usize,
    max_pause: Duration,
    mut statement: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut pacer = Pacer::default();
    loop {
        match statement().await {
            Ok(v) => {
                metrics::gauge!(m::DATABASE_UP).set(1.0);
                return Ok(v);
            }
            Err(e) if e.is_unavailable() => {
                metrics::gauge!(m::DATABASE_UP).set(0.0);
                tracing::warn!(error = %e, rows, "{what} failed; retrying");
                health.beat();
                tokio::time::sleep(pacer.next_pause().min(max_pause)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Record rejections under `policy` (`max_attempts`, `on_failed`): one statement, or row
/// by row when the statement itself is refused.
async fn reject(
    store: Store,
    rs: Vec<Rejection>,
    policy: (u32, OnFailed),
    health: Arc<Health>,
) -> Vec<i64> {
    let ids: Vec<i64> = rs.iter().map(|r| r.id).collect();
    match with_retry(&store, &rs, policy, &health).await {
        Ok(()) => ids,
        Err(e) => {
            tracing::warn!(error = %e, rows = rs.len(), "recording rejections failed; recording them one by one");
            for r in &rs {
                if let Err(e) = with_retry(&store, std::slice::from_ref(r), policy, &health).await {
                    tracing::error!(id = r.id, error = %e, "cannot record this row's rejection; it stays PENDING and will be tried again");
                }
            }
            ids
        }
    }
}

/// One rejection statement, retried while the database is unreachable; a refusal for
/// any other reason is returned.
async fn with_retry(
    store: &Store,
    rs: &[Rejection],
    (max_attempts, on_failed): (u32, OnFailed),
    health: &Health,
) -> Result<(), StoreError> {
    let outcomes = until_reachable(
        health,
        "recording rejections",
        rs.len(),
        Duration::from_secs(5),
        || store.reject(rs, max_attempts, on_failed),
    )
    .await?;
    for o in &outcomes {
        if o.failed {
            metrics::counter!(m::FAILED_TOTAL).increment(1);
            tracing::error!(id = o.id, attempts = o.attempts, "row FAILED");
        } else {
            metrics::counter!(m::RETRIES_TOTAL).increment(1);
        }
    }
    Ok(())
}
