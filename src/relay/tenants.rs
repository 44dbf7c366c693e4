//! Fairness between `aggregate_type`s (tenants). The sweep serves a backlog in `id`
//! order, and a burst spread over many aggregates, none of them hot, caps none: rows of
//! other types written behind it would wait for all of it. So while the sweep has not
//! reached the end, a type holding three quarters of the rows of a window at least half
//! full (in rows or in bytes) for `DOMINANT_FOR` is probed: a read off the claim's path
//! (`Store::other_type_after`) looks for rows of other types among the next 100 000
//! pending rows and the last 10 000 (a longer burst with rows of others written during it
//! and none since is not seen: those wait for the sweep). If there are some, the sweep
//! passes over the type (`Sweep::cap_tenant`): its claims go on to the other types' rows,
//! and every other claim refills the type from the low water mark, so the two share the
//! room that frees up. If there are none, the type is left alone for a while
//! (`Sweep::alone`). Order is kept as for a capped aggregate: a type's rows are then taken
//! only by refills, each starting below every row of it not yet held.

use std::time::{Duration, Instant};

use tokio::task::{JoinError, JoinHandle};

use super::Engine;
use crate::sink::Sink;
use crate::store::StoreError;

/// How long one type must hold most of the window before a probe looks behind its burst.
pub const DOMINANT_FOR: Duration = Duration::from_millis(500);
/// How often the window's share per type is counted (a walk over the aggregates held).
const LOOK_EVERY: Duration = Duration::from_millis(100);
/// Pending rows a probe examines at most after the cursor, and at the end of the table.
const PROBE_HEAD: u32 = 100_000;
const PROBE_TAIL: u32 = 10_000;

/// A probe under way: the type, and whether rows of others wait behind it.
pub type TenantProbe = JoinHandle<(String, Result<bool, StoreError>)>;

/// What the engine knows of the types in its window.
#[derive(Debug)]
pub struct Tenants {
    /// The type holding most of the window, since when.
    dominant: Option<(String, Instant)>,
    next_look: Instant,
    pub probe: Option<TenantProbe>,
}

impl Tenants {
    pub fn new(now: Instant) -> Self {
        Self {
            dominant: None,
            next_look: now,
            probe: None,
        }
    }
}

impl<S: Sink> Engine<S> {
    /// The type to refill with the next claim, if one is passed over and it is its turn;
    /// otherwise watch the window for a dominant type (and probe behind it).
    pub(super) fn tenant_turn(&mut self, now: Instant) -> Option<String> {
        if self.sweep.tenant().is_some() {
            self.tenants.dominant = None;
            return self.sweep.refill_tenant();
        }
        if now >= self.tenants.next_look {
            self.tenants.next_look = now + LOOK_EVERY;
            self.watch_tenants(now);
        }
        None
    }

    fn watch_tenants(&mut self, now: Instant) {
        let rows = self.window.rows();
        let max_bytes = usize::try_from(self.cfg.max_in_flight_bytes).unwrap_or(usize::MAX);
        let half_full = rows * 2 >= self.max_rows || self.window.bytes() >= max_bytes / 2;
        let top = (self.sweep.more && half_full)
            .then(|| self.window.top_type())
            .flatten()
            .filter(|(_, n)| n * 4 >= rows * 3)
            .map(|(t, _)| t.to_string());
        let Some(t) = top else {
            self.tenants.dominant = None;
            return;
        };
        let since = match &self.tenants.dominant {
            Some((d, since)) if *d == t => *since,
            _ => {
                self.tenants.dominant = Some((t.clone(), now));
                now
            }
        };
        if now.duration_since(since) < DOMINANT_FOR
            || self.tenants.probe.is_some()
            || !self.sweep.may_probe(&t, now)
        {
            return;
        }
        let (store, after) = (self.store.clone(), self.sweep.cursor());
        let partitions = self.leases.claim_filter();
        self.tenants.probe = Some(tokio::spawn(async move {
            let found = store
                .other_type_after(after, partitions.as_deref(), &t, PROBE_HEAD, PROBE_TAIL)
                .await;
            (t, found)
        }));
    }

    pub(super) fn on_tenant_probed(
        &mut self,
        r: Result<(String, Result<bool, StoreError>), JoinError>,
    ) {
        let now = Instant::now();
        match r {
            Ok((t, Ok(true))) => {
                if self.sweep.cap_tenant(&t) {
                    tracing::debug!(aggregate_type = %t, "rows of other types wait behind this type's burst: passing over it");
                    self.claim_due = true;
                }
            }
            Ok((t, Ok(false))) => self.sweep.alone(&t, now),
            Ok((t, Err(e))) => {
                tracing::debug!(error = %e, "tenant probe failed");
                self.sweep.alone(&t, now);
            }
            Err(e) => tracing::error!(error = %e, "tenant probe task failed"),
        }
    }
}
