//! The sweep's state between claims: its cursor, the aggregates it has capped, the
//! *horizon* (the highest id at or below which no transaction can still commit) and the
//! *low water mark* it wraps to (every pending, unparked row of this instance's
//! partitions that it does not hold has an id above it).
//!
//! Late commits: a row whose transaction is still open is invisible to the scan that
//! passes its id; once it commits, its aggregate's next rows (drawn after it, schema 3's
//! order lock) commit too and would be found first. So the cursor never moves past the
//! horizon (`horizon::Horizon`, learnt from the scans' lists of writers); rows above it
//! may be taken, and are looked at again by the next claim.
//!
//! Low water mark (schema 5: no index on `status`, a scan walks the primary key): a wrap
//! starts at the mark, not at id 0, so it does not read again every row marked since the
//! table began. The mark starts at the stored floor (`store::Floor`, raised by the
//! leader) and rises with each scan that started at or below it: the first pending id it
//! examined that this instance does not hold (in its window, or being recorded), less
//! one, or the horizon when it found none, whichever is lower. Rows held do not hold it:
//! a row whose confirm takes seconds while thousands of rows after it are marked would
//! otherwise make every wrap walk all of those again, once per claim. A held row that
//! leaves memory still `PENDING` (its aggregate dropped after a rejection or when its
//! partition was let go, a mark the database refused) lowers the mark to just below it
//! (`lower`, from `Window::take_dropped_low` before the next claim is planned or seen). A lowered floor (a new
//! `epoch`: rows re-opened by replay or un-parking) resets it and starts the sweep over
//! from there (a claim that sees the new epoch takes nothing: rows of the re-opened
//! aggregates above the cursor must not go before them).

use std::time::{Duration, Instant};

use super::aggkey::{HashMap, HashSet};
use super::claimer::Seen;
use super::horizon::Horizon;

/// How long a type found alone in the backlog is not probed again (`Sweep::alone`): a
/// probe walks its backlog (up to 100 000 rows, 70–100 ms under `EXPLAIN ANALYZE`), so a
/// drain of one type pays that about once per period; rows of another type written
/// behind its burst wait up to this long more before they are seen. Doubled each time
/// the type is found alone again, up to `SOLO_MAX`.
pub const SOLO_FOR: Duration = Duration::from_secs(1);
pub const SOLO_MAX: Duration = Duration::from_secs(8);

/// Types with longer names are never passed over (the name is a parameter of every scan).
pub const MAX_TENANT_BYTES: usize = 1024;

/// The sweep's position between claims.
#[derive(Debug, Default)]
pub struct Sweep {
    cursor: i64,
    horizon: Horizon,
    /// Every pending, unparked row of this instance's partitions that it does not hold
    /// has an id above it.
    low: i64,
    /// The stored floor last seen (its epoch changes when it is lowered).
    floor: Option<crate::store::Floor>,
    capped: HashSet<i32>,
    /// An `aggregate_type` passed over for the rest of the sweep (`tenant` below).
    tenant: Option<String>,
    /// Rows sweep claims took while `tenant` was passed over.
    taken_past_tenant: usize,
    /// A type found alone in the backlog (by a probe, or a sweep passing over it that
    /// took nothing), until when it is not probed again, and for how long it was.
    solo: Option<(String, Instant, Duration)>,
    last_was_refill: bool,
    /// The last sweep claim did not reach the end of the table.
    pub more: bool,
    /// Bumped by `restart`: a claim planned before it must not move the cursor.
    generation: u64,
}

impl Sweep {
    /// The capped aggregates to refill now (those holding less than half their share),
    /// unless the last claim was a refill already.
    pub fn refill(&self, counts: &HashMap<i32, u32>, share: u32) -> Vec<i32> {
        if self.last_was_refill {
            return Vec::new();
        }
        self.capped
            .iter()
            .copied()
            .filter(|h| counts.get(h).copied().unwrap_or(0) * 2 < share)
            .collect()
    }

    /// Rows of this aggregate hash may not be taken again in this sweep.
    pub fn cap(&mut self, hash: i32) {
        self.capped.insert(hash);
    }

    /// Pass over the rows of `aggregate_type` for the rest of the sweep (a probe found
    /// rows of other types behind its burst, `relay::tenants`): the sweep goes on to those,
    /// and refills (`refill_tenant`) feed the type from the low water mark in `id` order.
    /// Not while another type is passed over, nor for a name over `MAX_TENANT_BYTES`.
    /// Returns whether it is passed over now.
    pub fn cap_tenant(&mut self, aggregate_type: &str) -> bool {
        if self.tenant.is_some() || aggregate_type.len() > MAX_TENANT_BYTES {
            return false;
        }
        self.tenant = Some(aggregate_type.to_string());
        self.taken_past_tenant = 0;
        self.solo = None;
        // The sweep's claim first: the rows behind the burst have waited.
        self.last_was_refill = true;
        true
    }

    /// Whether a probe for rows behind `aggregate_type`'s burst may run now: no type is
    /// passed over, and it was not found alone within its solo period.
    pub fn may_probe(&self, aggregate_type: &str, now: Instant) -> bool {
        self.tenant.is_none()
            && aggregate_type.len() <= MAX_TENANT_BYTES
            && !matches!(&self.solo, Some((t, until, _)) if t == aggregate_type && now < *until)
    }

    /// `aggregate_type` was found alone in the backlog: not probed again for `SOLO_FOR`,
    /// twice as long each time it is found alone again, up to `SOLO_MAX`.
    pub fn alone(&mut self, aggregate_type: &str, now: Instant) {
        let period = match &self.solo {
            Some((t, _, was)) if t == aggregate_type => (*was * 2).min(SOLO_MAX),
            _ => SOLO_FOR,
        };
        self.solo = Some((aggregate_type.to_string(), now + period, period));
    }

    /// The type the sweep passes over, if any.
    pub fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    /// The passed-over type to refill now: every other claim (the sweep claims between
    /// them take the other types' rows, so the two share the room that frees up).
    pub fn refill_tenant(&self) -> Option<String> {
        if self.last_was_refill {
            return None;
        }
        self.tenant.clone()
    }

    /// The sweep wrapped or started over: no type is passed over any more; one that was
    /// passed over through a whole sweep that took nothing else was alone.
    fn end_tenant(&mut self, now: Option<Instant>) {
        if let (Some(t), Some(now)) = (self.tenant.take(), now) {
            if self.taken_past_tenant == 0 {
                self.alone(&t, now);
            }
        }
        self.taken_past_tenant = 0;
    }

    /// Start the next claim: a refill of `only` from the first pending id, or the sweep
    /// from its cursor, skipping its capped hashes. Returns the scan start and the skip set.
    pub fn plan(&mut self, refill: bool) -> (i64, HashSet<i32>) {
        self.last_was_refill = refill;
        if refill {
            (self.low, HashSet::default())
        } else {
            (self.cursor, self.capped.clone())
        }
    }

    /// Where the next sweep claim starts.
    pub fn cursor(&self) -> i64 {
        self.cursor
    }

    /// The horizon a claim planned now will be held to (`Horizon::settled`).
    pub fn settled(&self) -> i64 {
        self.horizon.settled()
    }

    /// Whether the next scan lists the table's writers (`Horizon::list_due`).
    pub fn list_due(&mut self, now: Instant) -> bool {
        self.horizon.list_due(now)
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The floor's epoch last seen (`None` before the first scan).
    pub fn epoch(&self) -> Option<i64> {
        self.floor.map(|f| f.epoch)
    }

    /// Start over from the first pending id: rows of many aggregates left memory at once
    /// (partitions let go or lost), so none of them may be skipped ahead.
    pub fn restart(&mut self) {
        // The mark was learnt for the partitions held then: back to the table's floor.
        self.low = self.floor.map_or(0, |f| f.floor);
        self.cursor = self.low;
        self.capped.clear();
        self.end_tenant(None);
        self.more = true;
        self.generation += 1;
    }

    /// A row this instance held left memory still `PENDING` and due (its aggregate was
    /// dropped, or its mark was refused): the next wrap must find it again.
    pub fn lower(&mut self, id: i64) {
        self.low = self.low.min(id.saturating_sub(1));
    }

    /// Take what a claim's scan saw into account (every claim's, refills' too): its
    /// snapshot for the horizon, the stored floor, and (for a scan that started at or
    /// below the mark, in the sweep's current generation) the first pending id it
    /// examined that is not `held` now.
    pub fn observe(&mut self, generation: u64, seen: &Seen, held: impl Fn(i64) -> bool) {
        if let Some(p) = &seen.probe {
            self.horizon.observe(p);
        }
        if let Some(f) = seen.floor {
            let lowered = self.floor.is_some_and(|was| was.epoch != f.epoch);
            self.floor = Some(f);
            if lowered {
                // Rows were re-opened below the mark: this scan may have started above
                // them, so it says nothing, and the sweep starts over from the floor
                // (a later row of their aggregates must not be taken first).
                self.low = self.low.min(f.floor);
                self.cursor = self.low;
                self.capped.clear();
                self.end_tenant(None);
                self.more = true;
                self.generation += 1;
                return;
            }
            self.low = self.low.max(f.floor);
        }
        if generation == self.generation && seen.after <= self.low && seen.probe.is_some() {
            let safe = self.horizon.safe();
            let fresh = &seen.fresh;
            let mark = match fresh.ids.iter().copied().find(|id| !held(*id)) {
                Some(first) => first - 1,
                // Every one listed is held, and the scan examined more: as far as it listed.
                None if fresh.more => fresh.ids.last().copied().unwrap_or(seen.after),
                None => seen.reach,
            };
            let mark = mark.min(safe);
            self.low = self.low.max(mark);
        }
    }

    /// Take a sweep claim's result into account (ignored if the sweep restarted since
    /// that claim was planned): the cursor moves to `cursor`, but not past the horizon.
    /// A claim held back by the horizon that took nothing does not ask for another at
    /// once (the poll tick or a wake-up brings it, when the open transactions may have
    /// ended).
    pub fn advance<'a>(
        &mut self,
        generation: u64,
        cursor: i64,
        end: bool,
        taken: usize,
        capped: impl IntoIterator<Item = &'a i32>,
        now: Instant,
    ) {
        if generation != self.generation {
            return;
        }
        self.taken_past_tenant += taken;
        if end {
            self.more = false;
            self.cursor = self.low;
            self.capped.clear();
            self.end_tenant(Some(now));
        } else {
            let held_back = cursor > self.horizon.safe();
            self.more = !(held_back && taken == 0);
            self.cursor = cursor.min(self.horizon.safe());
            self.capped.extend(capped.into_iter().copied());
        }
    }
}

#[cfg(test)]
#[path = "sweep_tests.rs"]
mod tests;
