//! The engine's side of a claim: the plan of the next claim (room in the window, fair
//! shares, what to leave out) and the intake of the rows it returns into the window.

use std::sync::Arc;
use std::time::Instant;

use super::aggkey::{AggKey, HashSet};
use super::claimer::{self, Claimed, Plan};
use super::window::{Body, Entry, Inserted};
use super::{Engine, LATE_ROWS_TOTAL};
use crate::metrics as m;
use crate::sink::Sink;
use crate::store::StoreError;

impl<S: Sink> Engine<S> {
    /// Rows that left memory still `PENDING` (`Window::take_dropped_low`) bring the
    /// sweep's low water mark back below them, before it is used or raised again.
    fn settle_drops(&mut self) {
        if let Some(low) = self.window.take_dropped_low() {
            self.sweep.lower(low);
        }
    }

    /// The next claim's plan, when there is room for rows; the claim starts with it.
    pub(super) fn next_plan(&mut self, now: Instant) -> Option<Plan> {
        self.settle_drops();
        let room_rows = self.max_rows.saturating_sub(self.window.rows());
        let max_bytes = usize::try_from(self.cfg.max_in_flight_bytes).unwrap_or(usize::MAX);
        let room_bytes = max_bytes.saturating_sub(self.window.bytes());
        if room_rows == 0 || (room_bytes == 0 && !self.window.is_empty()) {
            return None;
        }
        let share = self.cfg.max_rows_per_aggregate;
        let mut refill = self.sweep.refill(self.window.per_hash(), share);
        let frozen: HashSet<i32> = self
            .window
            .frozen_hashes()
            .chain(self.rejected.values().map(|(_, h)| *h))
            .collect();
        refill.retain(|h| !frozen.contains(h));
        // The scan leaves frozen aggregates out and the cursor moves past their rows:
        // capped for the rest of the sweep, so a row after those (the aggregate dropped
        // from memory since) is never taken before them.
        for h in &frozen {
            self.sweep.cap(*h);
        }
        let only_type = self.tenant_turn(now);
        let refilling = !refill.is_empty() || only_type.is_some();
        let (after, mut capped) = self.sweep.plan(refilling);
        let skip_type = match refilling {
            true => None,
            false => self.sweep.tenant().map(str::to_string),
        };
        // Skipping an aggregate of a partition not held is the partition filter's job
        // (counted, every scan after a rebalance examined 100 000 rows).
        capped.retain(|h| self.leases.holds(*h));
        // A type's rows may be far apart: its scans pass over the others'.
        let skipping = !capped.is_empty() || skip_type.is_some() || only_type.is_some();
        capped.extend(frozen);
        // Every id held (the scan's due retries come from below its start too).
        let exclude: HashSet<i64> = self
            .window
            .ids()
            .chain(self.recording.keys())
            .copied()
            .collect();
        // Ids the scan returns: enough to fill the room, with a little slack for rows
        // skipped in memory (held already, or past their aggregate's share). Not much
        // more: rows after the one that fills the room are read again by the next scan
        // (twice the room made every row of a drain scanned twice). A scan that runs out
        // of rows first only makes a smaller claim; the next one goes on from there.
        let take = room_rows.min(self.cfg.batch_size as usize);
        let scan_limit = u32::try_from((take + take / 8).max(64)).unwrap_or(u32::MAX);
        let mut plan = Plan {
            generation: self.sweep.generation(),
            epoch: self.sweep.epoch(),
            after,
            capped,
            only: (!refill.is_empty()).then_some(refill),
            skip_type,
            only_type,
            exclude,
            retried: self.window.retried_ids().collect(),
            counts: self.window.per_hash().clone(),
            max_per_aggregate: share,
            room_rows: take,
            room_bytes: room_bytes.max(1),
            scan_limit,
            examine: claimer::examine_limit(scan_limit, skipping),
            partitions: self.leases.claim_filter(),
            on_failed: self.cfg.on_failed,
            list_writers: false,
            horizon: self.sweep.settled(),
            ahead: None,
        };
        // A refill scans first: the page scanned ahead would reach the horizon late.
        if let Some(ahead) = self.ahead.take() {
            ahead.adopt(&mut plan);
        }
        // A page scanned ahead did not list the writers: the listing stays due.
        plan.list_writers = plan.ahead.is_none() && self.sweep.list_due(now);
        self.dropped.clear();
        self.claim_due = false;
        Some(plan)
    }

    pub(super) fn on_claimed(
        &mut self,
        r: Result<Result<Claimed, StoreError>, tokio::task::JoinError>,
    ) {
        let claimed = match r {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return self.db_error("claim", &e),
            Err(e) => return tracing::error!(error = %e, "claim task failed"),
        };
        metrics::gauge!(m::DATABASE_UP).set(1.0);
        self.db_pacer.reset();
        // Rows held now do not hold the low water mark (`Sweep::observe`); rows dropped
        // from memory since the last claim lower it first.
        self.settle_drops();
        let (window, recording) = (&self.window, &self.recording);
        self.sweep.observe(claimed.generation, &claimed.seen, |id| {
            window.holds(id) || recording.contains_key(&id)
        });
        self.ahead = claimed.ahead;
        if !claimed.refill {
            self.sweep.advance(
                claimed.generation,
                claimed.cursor,
                claimed.end,
                claimed.rows.len(),
                claimed.capped.iter().chain(&claimed.passed),
                Instant::now(),
            );
        }
        // Claim again at once only while the sweep has not reached the end of the table,
        // or while it holds hot aggregates back (they are refilled as they drain);
        // otherwise NOTIFY or the poll tick bring the next claim. (Aggregates passed
        // over for a retry not yet due wait for the tick.)
        let more = self.sweep.more || !claimed.capped.is_empty();
        self.doorbell
            .record(Instant::now(), claimed.rows.len(), more);
        for c in claimed.rows {
            if !self.leases.holds(c.hash) {
                continue; // let go while the claim ran: its new holder claims it
            }
            let bytes = c.bytes();
            let row = c.row;
            let key = AggKey::new(&row.aggregate_type, &row.aggregate_id);
            if self.dropped.contains(&key) {
                // Dropped while the claim ran: an earlier row may have left memory.
                self.sweep.cap(c.hash);
                continue;
            }
            let id = row.id;
            let body = match row.into_message() {
                Ok(msg) => Body::Message(Arc::new(msg)),
                Err(why) => Body::Invalid(why),
            };
            let entry = Entry {
                id,
                body,
                bytes,
                hash: c.hash,
                strikes: 0,
                suspect: false,
            };
            let behind = self.delivered.is_behind(&key, id);
            if self.window.insert(key, entry) == Inserted::Late || behind {
                metrics::counter!(LATE_ROWS_TOTAL).increment(1);
                tracing::warn!(
                    id,
                    "row committed after a later row of its aggregate was sent; sent out of id order"
                );
            }
        }
        self.claim_due = more;
    }
}
