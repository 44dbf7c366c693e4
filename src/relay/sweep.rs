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

use std::time::Instant;

use super::aggkey::{HashMap, HashSet};
use super::claimer::Seen;
use super::horizon::Horizon;

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
    ) {
        if generation != self.generation {
            return;
        }
        if end {
            self.more = false;
            self.cursor = self.low;
            self.capped.clear();
        } else {
            let held_back = cursor > self.horizon.safe();
            self.more = !(held_back && taken == 0);
            self.cursor = cursor.min(self.horizon.safe());
            self.capped.extend(capped.into_iter().copied());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::horizon::tests::quiet;
    use crate::store::Probe;
    use crate::store::{Floor, Fresh};

    #[test]
    fn the_sweep_caps_until_it_wraps_and_refills_what_runs_low() {
        let mut s = Sweep::default();
        prime(&mut s, 1000);
        s.observe(s.generation(), &snap(quiet(1000)), none);
        assert!(s.refill(&HashMap::default(), 4).is_empty());
        assert_eq!(s.plan(false), (0, HashSet::default()));
        let g = s.generation();
        s.advance(g, 40, false, 1, &[7]);
        assert!(s.more);
        assert!(
            s.refill(&[(7, 2)].into_iter().collect(), 4).is_empty(),
            "half its share held"
        );
        assert_eq!(s.refill(&[(7, 1)].into_iter().collect(), 4), vec![7]);
        assert_eq!(s.plan(true).0, 0);
        assert!(
            s.refill(&HashMap::default(), 4).is_empty(),
            "one refill at a time"
        );
        assert_eq!(s.plan(false), (40, [7].into_iter().collect()));
        s.advance(g, 90, false, 1, &[8]);
        s.restart();
        s.advance(g, 120, false, 1, &[]);
        assert_eq!(
            s.plan(false),
            (0, HashSet::default()),
            "a stale claim moves nothing"
        );
        s.advance(s.generation(), 90, true, 1, &[]);
        assert_eq!(s.plan(false), (0, HashSet::default()));
    }

    /// Nothing held.
    fn none(_: i64) -> bool {
        false
    }

    /// The first ids with no retry schedule a scan examined (all of them).
    fn fresh(ids: &[i64]) -> Fresh {
        Fresh {
            ids: ids.to_vec(),
            more: false,
        }
    }

    /// A scan that started above the mark (says nothing about it).
    fn snap(p: Probe) -> Seen {
        Seen {
            after: i64::MAX,
            probe: Some(p),
            ..Seen::default()
        }
    }

    /// Make `top` the horizon for the next statement (a probe with no writer listed).
    fn prime(s: &mut Sweep, top: i64) {
        s.observe(s.generation(), &snap(quiet(top)), none);
    }

    #[test]
    fn the_cursor_stops_at_the_horizon() {
        let mut s = Sweep::default();
        prime(&mut s, 100);
        s.observe(s.generation(), &snap(quiet(100)), none);
        let g = s.generation();
        s.advance(g, 250, false, 3, &[4]);
        assert_eq!(
            s.plan(false),
            (100, [4].into_iter().collect()),
            "rows above 100 looked at again"
        );
        assert!(s.more, "it took rows: claim again");
        s.advance(g, 250, false, 0, &[]);
        assert!(!s.more, "held back and nothing taken: wait for the tick");
        prime(&mut s, 300);
        s.observe(s.generation(), &snap(quiet(300)), none);
        s.advance(g, 250, false, 0, &[]);
        assert_eq!(s.plan(false).0, 250);
        assert!(s.more);
    }

    #[test]
    fn a_wrap_starts_at_the_low_water_mark() {
        let mut s = Sweep::default();
        let g = s.generation();
        let floor = |floor, epoch| Some(Floor { floor, epoch });
        // Stored floor 10; the scan from 0 found pending rows from 40; nothing running.
        prime(&mut s, 100);
        s.observe(
            g,
            &Seen {
                after: 0,
                probe: Some(quiet(100)),
                fresh: fresh(&[40]),
                reach: i64::MAX,
                floor: floor(10, 0),
            },
            none,
        );
        assert_eq!(s.plan(true).0, 39, "a refill starts at the mark");
        s.advance(g, 90, true, 1, &[]);
        assert_eq!(s.plan(false).0, 39, "so does a wrap");
        // A scan from the mark that found nothing: the mark goes to the horizon, no
        // further (ids above 200 may still commit).
        prime(&mut s, 200);
        s.observe(
            g,
            &Seen {
                after: 39,
                probe: Some(quiet(200)),
                fresh: fresh(&[]),
                reach: i64::MAX,
                floor: floor(10, 0),
            },
            none,
        );
        assert_eq!(s.plan(true).0, 200);
        // A scan that started above the mark says nothing about it.
        prime(&mut s, 900);
        s.observe(
            g,
            &Seen {
                after: 300,
                probe: Some(quiet(900)),
                fresh: fresh(&[800]),
                reach: i64::MAX,
                floor: floor(10, 0),
            },
            none,
        );
        assert_eq!(s.plan(true).0, 200);
        // The floor was lowered (rows re-opened): the mark follows it down, whatever
        // the scan that brought the news found.
        prime(&mut s, 900);
        s.observe(
            g,
            &Seen {
                after: 200,
                probe: Some(quiet(900)),
                fresh: fresh(&[850]),
                reach: i64::MAX,
                floor: floor(5, 1),
            },
            none,
        );
        assert_eq!(s.plan(true).0, 5);
        assert_eq!(
            s.plan(false),
            (5, HashSet::default()),
            "the sweep starts over there"
        );
        assert_ne!(s.generation(), g, "claims planned before it move nothing");
        let g = s.generation();
        // A raised floor lifts the mark; a restart goes back to the stored floor.
        s.observe(
            g,
            &Seen {
                after: 900,
                probe: None,
                fresh: fresh(&[]),
                reach: i64::MAX,
                floor: floor(60, 1),
            },
            none,
        );
        assert_eq!(s.plan(true).0, 60);
        prime(&mut s, 900);
        s.observe(
            g,
            &Seen {
                after: 60,
                probe: Some(quiet(900)),
                fresh: fresh(&[700]),
                reach: i64::MAX,
                floor: floor(60, 1),
            },
            none,
        );
        assert_eq!(s.plan(true).0, 699);
        s.restart();
        assert_eq!(s.plan(false).0, 60);
        // A scan planned before the restart is ignored.
        prime(&mut s, 900);
        s.observe(
            g,
            &Seen {
                after: 0,
                probe: Some(quiet(900)),
                fresh: fresh(&[800]),
                reach: i64::MAX,
                floor: floor(60, 1),
            },
            none,
        );
        assert_eq!(s.plan(true).0, 60);
    }

    #[test]
    fn rows_held_do_not_hold_the_mark_until_they_leave_memory_pending() {
        let mut s = Sweep::default();
        let g = s.generation();
        // Row 5 is out at the broker (its confirm slow); 6-8 are held too; 40 is not.
        let held = |id: i64| (5..=8).contains(&id);
        prime(&mut s, 100);
        let seen = |fresh| Seen {
            after: 0,
            probe: Some(quiet(100)),
            fresh,
            reach: i64::MAX,
            floor: None,
        };
        s.observe(g, &seen(fresh(&[5, 6, 7, 8, 40, 41])), held);
        assert_eq!(s.plan(true).0, 39, "a wrap starts after the rows held");
        // All listed held and the list cut: as far as it listed.
        s.lower(1);
        let cut = Fresh {
            ids: vec![5, 6, 7, 8],
            more: true,
        };
        s.observe(g, &seen(cut), held);
        assert_eq!(s.plan(true).0, 8);
        // All listed held and nothing more examined: the horizon.
        s.observe(g, &seen(fresh(&[5, 6, 7, 8])), held);
        assert_eq!(s.plan(true).0, 100);
        // Row 6 left memory still pending (its aggregate dropped): the mark goes back,
        // and a scan that still lists it (not held now) keeps it there.
        s.lower(6);
        assert_eq!(s.plan(true).0, 5);
        s.observe(g, &seen(fresh(&[5, 6, 7, 8, 40])), |id| id == 5 || id == 7);
        assert_eq!(s.plan(true).0, 5);
        s.advance(g, 100, true, 0, &[]);
        assert_eq!(s.plan(false).0, 5, "the next wrap finds it");
    }

    #[test]
    fn a_scan_that_stopped_short_raises_the_mark_only_as_far_as_it_looked() {
        let mut s = Sweep::default();
        let g = s.generation();
        // Only rows waiting for a retry among the rows examined, and more after them.
        prime(&mut s, 900);
        s.observe(
            g,
            &Seen {
                after: 0,
                probe: Some(quiet(900)),
                fresh: fresh(&[]),
                reach: 300,
                floor: None,
            },
            none,
        );
        assert_eq!(s.plan(true).0, 300);
    }
}
