//! The sweep's state between claims: its cursor, the aggregates it has capped, the
//! *horizon* (the highest id at or below which no transaction can still commit) and the
//! *low water mark* it wraps to (every pending, unparked row of this instance's
//! partitions has an id above it).
//!
//! Late commits: a row whose transaction is still open is invisible to the scan that
//! passes its id; once it commits, its aggregate's next rows (drawn after it, schema 3's
//! order lock) commit too and would be found first. So the cursor never moves past the
//! horizon (learnt from the scans' snapshots, `Horizon`); rows above it may be taken, and
//! are looked at again by the next claim.
//!
//! Low water mark (schema 5: no index on `status`, a scan walks the primary key): a wrap
//! starts at the mark, not at id 0, so it does not read again every row marked since the
//! table began. The mark starts at the stored floor (`store::Floor`, raised by the
//! leader) and rises with each scan that started at or below it: the first pending id it
//! examined, less one, or the horizon when it found none, whichever is lower. A lowered
//! floor (a new `epoch`: rows re-opened by replay or un-parking) resets it and starts
//! the sweep over from there (a claim that sees the new epoch takes nothing: rows of the
//! re-opened aggregates above the cursor must not go before them).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::claimer::Seen;
use crate::store::Probe;

/// The highest id no transaction can still commit at or below, from the scans' probes
/// (`Probe`): a probe lists, after its statement's snapshot, the transactions holding the
/// table's `RowExclusiveLock`. Every insert takes that lock before it draws its id and
/// holds it until it ends, so every transaction that drew an id at or below the probe's
/// `top` and is still running is on its list. Once none of them is on a later probe's
/// list, they have all ended, and `top` is the horizon for every statement whose
/// snapshot is taken after that later list — the next statement, not the one that
/// listed (its snapshot is older than its list). A probe with nobody listed makes its
/// own `top` the horizon the same way.
///
/// Only writers of this table hold it back (a long transaction elsewhere does not), and
/// nothing needs the producer's xid before its id (schema 4 did: the horizon was learnt
/// from snapshots' xmin; a transaction that drew an id before it had an xid was then
/// invisible to them).
#[derive(Debug, Default, Clone)]
pub struct Horizon {
    /// Valid for the statement of the last probe observed.
    safe: i64,
    /// Valid for statements that start after the last probe's.
    next: i64,
    candidate: Option<Probe>,
    /// When a scan was last asked to list the writers.
    listed: Option<Instant>,
}

/// How often a scan lists the table's writers (`pg_locks` is not cheap): the horizon
/// then trails the newest rows by a few tens of milliseconds, which only makes the next
/// scans start a little lower (rows above the horizon are taken all the same).
const LIST_EVERY: Duration = Duration::from_millis(20);

impl Horizon {
    /// Whether the scan about to start should list the writers (then it is counted as
    /// listed).
    pub fn list_due(&mut self, now: Instant) -> bool {
        let due = self
            .listed
            .is_none_or(|at| now.saturating_duration_since(at) >= LIST_EVERY);
        if due {
            self.listed = Some(now);
        }
        due
    }

    /// Take a probe into account; returns the horizon valid for the statement it came from.
    pub fn observe(&mut self, p: Probe) -> i64 {
        // That statement's snapshot was taken after every earlier probe's list.
        self.safe = self.next;
        let Some(writers) = &p.writers else {
            // Not listed: it says nothing new.
            return self.safe;
        };
        let ended = self
            .candidate
            .as_ref()
            .is_some_and(|c| c.writers.iter().flatten().all(|w| !writers.contains(w)));
        if ended {
            if let Some(c) = self.candidate.take() {
                self.next = self.next.max(c.top);
            }
        }
        // A pending candidate is kept until it validates: replacing it with each newer
        // probe could put the horizon off for ever under a steady stream of transactions.
        if self.candidate.is_none() {
            if writers.is_empty() {
                self.next = self.next.max(p.top);
            } else {
                self.candidate = Some(p);
            }
        }
        self.safe
    }

    /// Valid for the statement of the last probe observed.
    pub fn safe(&self) -> i64 {
        self.safe
    }

    /// Valid for statements that start after the last probe's statement ended.
    pub fn settled(&self) -> i64 {
        self.next
    }
}

/// The sweep's position between claims.
#[derive(Debug, Default)]
pub struct Sweep {
    cursor: i64,
    horizon: Horizon,
    /// Every pending, unparked row of this instance's partitions has an id above it.
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
            (self.low, HashSet::new())
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

    /// Take what a claim's scan saw into account (every claim's, refills' too): its
    /// snapshot for the horizon, the stored floor, and (for a scan that started at or
    /// below the mark, in the sweep's current generation) the first pending id.
    pub fn observe(&mut self, generation: u64, seen: &Seen) {
        if let Some(p) = &seen.probe {
            self.horizon.observe(p.clone());
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
            let mark = seen.first.map_or(seen.reach, |first| first - 1).min(safe);
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
    use crate::store::Floor;

    #[test]
    fn the_sweep_caps_until_it_wraps_and_refills_what_runs_low() {
        let mut s = Sweep::default();
        prime(&mut s, 1000);
        s.observe(s.generation(), &snap(quiet(1000)));
        assert!(s.refill(&HashMap::new(), 4).is_empty());
        assert_eq!(s.plan(false), (0, HashSet::new()));
        let g = s.generation();
        s.advance(g, 40, false, 1, &[7]);
        assert!(s.more);
        assert!(
            s.refill(&[(7, 2)].into(), 4).is_empty(),
            "half its share held"
        );
        assert_eq!(s.refill(&[(7, 1)].into(), 4), vec![7]);
        assert_eq!(s.plan(true).0, 0);
        assert!(
            s.refill(&HashMap::new(), 4).is_empty(),
            "one refill at a time"
        );
        assert_eq!(s.plan(false), (40, [7].into()));
        s.advance(g, 90, false, 1, &[8]);
        s.restart();
        s.advance(g, 120, false, 1, &[]);
        assert_eq!(
            s.plan(false),
            (0, HashSet::new()),
            "a stale claim moves nothing"
        );
        s.advance(s.generation(), 90, true, 1, &[]);
        assert_eq!(s.plan(false), (0, HashSet::new()));
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
        s.observe(s.generation(), &snap(quiet(top)));
    }

    /// A probe that lists no writer.
    fn quiet(top: i64) -> Probe {
        probe(top, &[])
    }

    fn probe(top: i64, writers: &[&str]) -> Probe {
        Probe {
            top,
            writers: Some(writers.iter().map(|w| w.to_string()).collect()),
        }
    }

    #[test]
    fn the_horizon_waits_for_every_writer_listed_with_the_candidate() {
        let mut h = Horizon::default();
        // Id 500 the highest visible; writers 3/10 and 4/20 hold the table's lock.
        assert_eq!(h.observe(probe(500, &["3/10", "4/20"])), 0);
        // 3/10 ended, 4/20 still there: a newer candidate is not taken.
        assert_eq!(h.observe(probe(600, &["4/20", "5/7"])), 0);
        assert_eq!(h.settled(), 0);
        // Both ended: 500 holds for statements after this one, not for this one.
        assert_eq!(h.observe(probe(700, &["5/7", "6/1"])), 0);
        assert_eq!(h.settled(), 500);
        assert_eq!(h.observe(probe(800, &["6/1"])), 500);
        // 5/7 and 6/1 ended, and nobody listed: this probe's own top (past 700) from
        // the next statement on.
        assert_eq!(h.observe(quiet(900)), 500);
        assert_eq!(h.settled(), 900);
        assert_eq!(h.observe(quiet(950)), 900);
        assert_eq!(h.settled(), 950);
        assert_eq!(h.observe(quiet(10)), 950);
        assert_eq!(h.settled(), 950, "never moves back");
    }

    /// A scan that did not list the writers moves nothing on; scans list every 20 ms.
    #[test]
    fn an_unlisted_probe_says_nothing_new_and_listing_is_paced() {
        let mut h = Horizon::default();
        assert_eq!(h.observe(probe(50, &["1/1"])), 0);
        let unlisted = Probe {
            top: 80,
            writers: None,
        };
        assert_eq!(h.observe(unlisted.clone()), 0);
        assert_eq!(h.settled(), 0, "1/1 may still run");
        assert_eq!(h.observe(quiet(90)), 0);
        assert_eq!(h.settled(), 90);
        assert_eq!(h.observe(unlisted), 90);
        assert_eq!(h.settled(), 90);
        let t = Instant::now();
        assert!(h.list_due(t));
        assert!(!h.list_due(t + Duration::from_millis(19)));
        assert!(h.list_due(t + LIST_EVERY));
    }

    /// The failure of trusting a probe for its own statement: a writer that ends between
    /// the statement's snapshot and its list is not listed, yet its row was invisible to
    /// that snapshot. So a quiet probe's `top` holds only for the statements after it.
    #[test]
    fn a_quiet_list_says_nothing_about_its_own_snapshot() {
        let mut h = Horizon::default();
        assert_eq!(h.observe(quiet(6)), 0);
        assert_eq!(h.settled(), 6);
        // A writer (a vxid) that reappears keeps the candidate pending.
        assert_eq!(h.observe(probe(9, &["7/1"])), 6);
        assert_eq!(h.observe(probe(12, &["7/1"])), 6);
        assert_eq!(h.observe(probe(12, &["8/1"])), 6);
        assert_eq!(h.settled(), 9);
    }

    #[test]
    fn the_cursor_stops_at_the_horizon() {
        let mut s = Sweep::default();
        prime(&mut s, 100);
        s.observe(s.generation(), &snap(quiet(100)));
        let g = s.generation();
        s.advance(g, 250, false, 3, &[4]);
        assert_eq!(
            s.plan(false),
            (100, [4].into()),
            "rows above 100 looked at again"
        );
        assert!(s.more, "it took rows: claim again");
        s.advance(g, 250, false, 0, &[]);
        assert!(!s.more, "held back and nothing taken: wait for the tick");
        prime(&mut s, 300);
        s.observe(s.generation(), &snap(quiet(300)));
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
                first: Some(40),
                reach: i64::MAX,
                floor: floor(10, 0),
            },
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
                first: None,
                reach: i64::MAX,
                floor: floor(10, 0),
            },
        );
        assert_eq!(s.plan(true).0, 200);
        // A scan that started above the mark says nothing about it.
        prime(&mut s, 900);
        s.observe(
            g,
            &Seen {
                after: 300,
                probe: Some(quiet(900)),
                first: Some(800),
                reach: i64::MAX,
                floor: floor(10, 0),
            },
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
                first: Some(850),
                reach: i64::MAX,
                floor: floor(5, 1),
            },
        );
        assert_eq!(s.plan(true).0, 5);
        assert_eq!(
            s.plan(false),
            (5, HashSet::new()),
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
                first: None,
                reach: i64::MAX,
                floor: floor(60, 1),
            },
        );
        assert_eq!(s.plan(true).0, 60);
        prime(&mut s, 900);
        s.observe(
            g,
            &Seen {
                after: 60,
                probe: Some(quiet(900)),
                first: Some(700),
                reach: i64::MAX,
                floor: floor(60, 1),
            },
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
                first: Some(800),
                reach: i64::MAX,
                floor: floor(60, 1),
            },
        );
        assert_eq!(s.plan(true).0, 60);
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
                first: None,
                reach: 300,
                floor: None,
            },
        );
        assert_eq!(s.plan(true).0, 300);
    }
}
