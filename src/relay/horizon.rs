//! The horizon: the highest id at or below which no transaction can still commit, learnt
//! from the scans' lists of the table's writers (`Probe`), and how often a scan lists them.

use std::time::{Duration, Instant};

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
    pub fn observe(&mut self, p: &Probe) -> i64 {
        // That statement's snapshot was taken after every earlier probe's list.
        self.safe = self.next;
        let Some(writers) = &p.writers else {
            // Not listed: it says nothing new.
            return self.safe;
        };
        // Every writer listed with the candidate has ended: its top holds from now on.
        let ended = |c: &mut Probe| c.writers.iter().flatten().all(|w| !writers.contains(w));
        if let Some(c) = self.candidate.take_if(ended) {
            self.next = self.next.max(c.top);
        }
        // A pending candidate is kept until it validates: replacing it with each newer
        // probe could put the horizon off for ever under a steady stream of transactions.
        if self.candidate.is_none() {
            if writers.is_empty() {
                self.next = self.next.max(p.top);
            } else {
                self.candidate = Some(p.clone());
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A probe that lists no writer.
    pub(in crate::relay) fn quiet(top: i64) -> Probe {
        probe(top, &[])
    }

    pub(in crate::relay) fn probe(top: i64, writers: &[&str]) -> Probe {
        Probe {
            top,
            writers: Some(writers.iter().map(|w| w.to_string()).collect()),
        }
    }

    #[test]
    fn the_horizon_waits_for_every_writer_listed_with_the_candidate() {
        let mut h = Horizon::default();
        // Id 500 the highest visible; writers 3/10 and 4/20 hold the table's lock.
        assert_eq!(h.observe(&probe(500, &["3/10", "4/20"])), 0);
        // 3/10 ended, 4/20 still there: a newer candidate is not taken.
        assert_eq!(h.observe(&probe(600, &["4/20", "5/7"])), 0);
        assert_eq!(h.settled(), 0);
        // Both ended: 500 holds for statements after this one, not for this one.
        assert_eq!(h.observe(&probe(700, &["5/7", "6/1"])), 0);
        assert_eq!(h.settled(), 500);
        assert_eq!(h.observe(&probe(800, &["6/1"])), 500);
        // 5/7 and 6/1 ended, and nobody listed: this probe's own top (past 700) from
        // the next statement on.
        assert_eq!(h.observe(&quiet(900)), 500);
        assert_eq!(h.settled(), 900);
        assert_eq!(h.observe(&quiet(950)), 900);
        assert_eq!(h.settled(), 950);
        assert_eq!(h.observe(&quiet(10)), 950);
        assert_eq!(h.settled(), 950, "never moves back");
    }

    /// A scan that did not list the writers moves nothing on; scans list every 20 ms.
    #[test]
    fn an_unlisted_probe_says_nothing_new_and_listing_is_paced() {
        let mut h = Horizon::default();
        assert_eq!(h.observe(&probe(50, &["1/1"])), 0);
        let unlisted = Probe {
            top: 80,
            writers: None,
        };
        assert_eq!(h.observe(&unlisted), 0);
        assert_eq!(h.settled(), 0, "1/1 may still run");
        assert_eq!(h.observe(&quiet(90)), 0);
        assert_eq!(h.settled(), 90);
        assert_eq!(h.observe(&unlisted), 90);
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
        assert_eq!(h.observe(&quiet(6)), 0);
        assert_eq!(h.settled(), 6);
        // A writer (a vxid) that reappears keeps the candidate pending.
        assert_eq!(h.observe(&probe(9, &["7/1"])), 6);
        assert_eq!(h.observe(&probe(12, &["7/1"])), 6);
        assert_eq!(h.observe(&probe(12, &["8/1"])), 6);
        assert_eq!(h.settled(), 9);
    }
}
