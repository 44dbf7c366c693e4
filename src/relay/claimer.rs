//! The claimer: finds due rows to fill the window, fairly. A claim scans pending ids
//! (no payloads) after a cursor, picks at most `max_rows_per_aggregate` rows of any one
//! aggregate (counting what the window already holds), and fetches the picked rows that
//! are due and behind no blocker, within the window's free rows and bytes.
//!
//! Order safety: claims run one at a time. A *sweep* walks the table in `id` order across
//! claims; once it passes over a row of an aggregate without taking it (the aggregate is
//! capped, held back, dropped from memory, or its row is not due or is blocked), that
//! aggregate is *capped* for the rest of the sweep, so a later row can never be taken
//! while an earlier one is left behind.
//! The database leaves those aggregates out of the sweep's scan, so a hot aggregate's
//! backlog is passed over in one statement. When the sweep reaches the end it starts
//! again from the first pending id. While a capped aggregate runs low in the window,
//! every other claim is a *refill*: the first pending rows of just those aggregates, so a
//! hot aggregate keeps flowing without waiting for the sweep to wrap.
//!
//! Late commits: a row whose transaction is still open is invisible to the scan that
//! passes its id; once it commits, its aggregate's next rows (drawn after it, schema 3's
//! order lock) commit too and would be found first. So the cursor never moves past the
//! *horizon*, the highest id at or below which no transaction can still commit (learnt
//! from the scans' snapshots, `Horizon`); rows above it may be taken, and are looked at
//! again by the next claim.

use std::collections::{HashMap, HashSet};

use crate::config::OnFailed;
use crate::store::{ClaimedRow, Probe, ScanPage, ScanQuery, Store, StoreError};

/// The highest id no transaction can still commit at or below, from two scan snapshots:
/// a *candidate* (the highest id visible to a snapshot S1, and S1's xmax) becomes the
/// horizon once a later snapshot's xmin reaches S1's xmax — every transaction running at
/// S1 has ended by then. An id at or below the candidate was drawn before the candidate's
/// row, which committed before S1, so by a transaction that had its xid before S1
/// (migration 0004: the insert trigger takes the xid before it draws the id).
#[derive(Debug, Default, Clone, Copy)]
pub struct Horizon {
    safe: i64,
    candidate: Option<Probe>,
}

impl Horizon {
    /// Take a scan's snapshot into account; returns the horizon valid for that scan.
    pub fn observe(&mut self, p: Probe) -> i64 {
        if p.xmin >= p.xmax {
            // Nothing was running at the snapshot: everything visible is all there is.
            self.safe = self.safe.max(p.top);
            self.candidate = None;
            return self.safe;
        }
        match self.candidate {
            Some(c) if p.xmin >= c.xmax => {
                self.safe = self.safe.max(c.top);
                self.candidate = Some(p);
            }
            // Kept until it validates: replacing it with each newer snapshot could put
            // the horizon off for ever under a steady stream of transactions.
            Some(_) => {}
            None => self.candidate = Some(p),
        }
        self.safe
    }

    pub fn safe(&self) -> i64 {
        self.safe
    }
}

/// The sweep's position between claims.
#[derive(Debug, Default)]
pub struct Sweep {
    cursor: i64,
    horizon: Horizon,
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
            (0, HashSet::new())
        } else {
            (self.cursor, self.capped.clone())
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Start over from the first pending id: rows of many aggregates left memory at once
    /// (partitions let go or lost), so none of them may be skipped ahead.
    pub fn restart(&mut self) {
        self.cursor = 0;
        self.capped.clear();
        self.more = true;
        self.generation += 1;
    }

    /// Take a claim's snapshot into account (every claim's, refills' too).
    pub fn observe(&mut self, probe: Option<Probe>) {
        if let Some(p) = probe {
            self.horizon.observe(p);
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
            self.cursor = 0;
            self.capped.clear();
        } else {
            let held_back = cursor > self.horizon.safe();
            self.more = !(held_back && taken == 0);
            self.cursor = cursor.min(self.horizon.safe());
            self.capped.extend(capped.into_iter().copied());
        }
    }
}

/// Everything one claim needs, snapshotted from the engine when it starts.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The sweep's generation when planned.
    pub generation: u64,
    pub after: i64,
    /// Aggregate hashes not to take rows of (capped in the sweep, held back, …).
    pub capped: HashSet<i32>,
    /// A refill: only these hashes.
    pub only: Option<Vec<i32>>,
    /// Ids held in memory or being recorded.
    pub exclude: HashSet<i64>,
    /// Rows held per aggregate hash.
    pub counts: HashMap<i32, u32>,
    pub max_per_aggregate: u32,
    pub room_rows: usize,
    pub room_bytes: usize,
    /// Most ids one scan returns, and most it examines.
    pub scan_limit: u32,
    pub examine: u32,
    pub partitions: Option<Vec<i32>>,
    pub on_failed: OnFailed,
}

/// What the scan's ids came to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Selection {
    pub take: Vec<i64>,
    /// The last id looked at (the sweep continues after it).
    pub cursor: i64,
    /// The scan found no more rows after the cursor.
    pub end: bool,
    /// Hashes this claim passed over without taking (capped from now on).
    pub capped: Vec<i32>,
}

/// Pick rows from a scan page (pure; see the module doc).
pub fn select(plan: &Plan, page: &ScanPage) -> Selection {
    let mut sel = Selection {
        cursor: plan.after,
        ..Selection::default()
    };
    let mut counts: HashMap<i32, u32> = HashMap::new();
    let mut capped: HashSet<i32> = HashSet::new();
    let mut bytes = 0usize;
    for s in &page.rows {
        if plan.exclude.contains(&s.id) {
            sel.cursor = s.id;
            continue;
        }
        if plan.capped.contains(&s.hash) || capped.contains(&s.hash) {
            sel.cursor = s.id;
            continue;
        }
        let held = plan.counts.get(&s.hash).copied().unwrap_or(0);
        let taken = counts.entry(s.hash).or_insert(0);
        if held + *taken >= plan.max_per_aggregate {
            capped.insert(s.hash);
            sel.capped.push(s.hash);
            sel.cursor = s.id;
            continue;
        }
        let size = usize::try_from(s.size).unwrap_or(0);
        if sel.take.len() >= plan.room_rows
            || (!sel.take.is_empty() && bytes + size > plan.room_bytes)
        {
            // Full: the sweep continues at this row next time.
            return sel;
        }
        *taken += 1;
        bytes += size;
        sel.take.push(s.id);
        sel.cursor = s.id;
    }
    if page.rows.len() < plan.scan_limit as usize {
        // Every row examined was looked at (the database left out only skipped hashes).
        sel.cursor = sel.cursor.max(page.last_examined);
        sel.end = page.examined < plan.examine;
    }
    sel
}

/// The picked ids the fetch left out (not due yet, or behind a retry or a FAILED row).
/// When the fetch stopped early, only ids before the last row read were looked at.
fn left_out(take: &[i64], rows: &[ClaimedRow], truncated: bool) -> HashSet<i64> {
    let limit = if truncated {
        rows.last().map_or(i64::MIN, |r| r.row.id)
    } else {
        i64::MAX
    };
    let got: HashSet<i64> = rows.iter().map(|r| r.row.id).collect();
    take.iter()
        .copied()
        .filter(|id| *id < limit && !got.contains(id))
        .collect()
}

/// Park the rows left out because a FAILED row blocks them (the store parks only what a
/// FAILED row holds back; rows behind a retry stay pending).
async fn park_blocked(
    store: &Store,
    page: &ScanPage,
    left_out: &HashSet<i64>,
) -> Result<(), StoreError> {
    let (ids, hashes): (Vec<i64>, Vec<i32>) = page
        .rows
        .iter()
        .filter(|s| left_out.contains(&s.id))
        .map(|s| (s.id, s.hash))
        .unzip();
    let parked = store.park(&ids, &hashes).await?;
    if parked > 0 {
        tracing::debug!(parked, "parked rows behind FAILED rows");
    }
    Ok(())
}

/// A finished claim.
#[derive(Debug)]
pub struct Claimed {
    pub refill: bool,
    pub generation: u64,
    pub rows: Vec<ClaimedRow>,
    pub cursor: i64,
    pub end: bool,
    /// Hashes passed over because the share was reached (more rows are due).
    pub capped: Vec<i32>,
    /// Hashes passed over because their rows were not due or were blocked.
    pub passed: Vec<i32>,
    /// The scan's snapshot.
    pub probe: Option<Probe>,
}

/// Run one claim against the store.
pub async fn claim(store: Store, plan: Plan) -> Result<Claimed, StoreError> {
    let skip: Vec<i32> = plan.capped.iter().copied().collect();
    let page = store
        .scan(&ScanQuery {
            after: plan.after,
            partitions: plan.partitions.as_deref(),
            limit: plan.scan_limit,
            examine: plan.examine,
            skip: (!skip.is_empty()).then_some(skip.as_slice()),
            only: plan.only.as_deref(),
        })
        .await?;
    let mut sel = select(&plan, &page);
    let (rows, truncated) = store
        .fetch(&sel.take, plan.on_failed, plan.room_bytes)
        .await?;
    if truncated {
        // The byte budget ran out: continue right after the last row read, so the rows
        // not read are looked at again (capping them could skip them for the sweep).
        if let Some(last) = rows.last() {
            sel.cursor = last.row.id;
        }
        sel.end = false;
    }
    let left_out = left_out(&sel.take, &rows, truncated);
    // The sweep passes over the rows left out: their aggregates are capped until it
    // wraps, or a later row of theirs could go out first once a retry falls due.
    let mut passed: Vec<i32> = Vec::new();
    for s in page.rows.iter().filter(|s| left_out.contains(&s.id)) {
        if !sel.capped.contains(&s.hash) && !passed.contains(&s.hash) {
            passed.push(s.hash);
        }
    }
    if plan.on_failed == OnFailed::Block && !left_out.is_empty() {
        park_blocked(&store, &page, &left_out).await?;
    }
    Ok(Claimed {
        refill: plan.only.is_some(),
        generation: plan.generation,
        rows,
        cursor: sel.cursor,
        end: sel.end,
        capped: sel.capped,
        passed,
        probe: page.probe,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Scanned;

    fn plan(max_per_aggregate: u32, room_rows: usize) -> Plan {
        Plan {
            generation: 0,
            after: 0,
            capped: HashSet::new(),
            only: None,
            exclude: HashSet::new(),
            counts: HashMap::new(),
            max_per_aggregate,
            room_rows,
            room_bytes: 1 << 20,
            scan_limit: 100,
            examine: 1000,
            partitions: None,
            on_failed: OnFailed::Block,
        }
    }

    fn page(rows: &[(i64, i32)]) -> ScanPage {
        ScanPage {
            rows: rows
                .iter()
                .map(|&(id, hash)| Scanned { id, hash, size: 10 })
                .collect(),
            last_examined: rows.last().map_or(0, |r| r.0),
            examined: rows.len() as u32,
            probe: None,
        }
    }

    #[test]
    fn a_hot_aggregate_gets_its_share_and_the_others_come_through() {
        let mut rows: Vec<(i64, i32)> = (1..=50).map(|id| (id, 1)).collect();
        rows.extend((51..=55).map(|id| (id, id as i32)));
        let sel = select(&plan(3, 100), &page(&rows));
        assert_eq!(sel.take, vec![1, 2, 3, 51, 52, 53, 54, 55]);
        assert_eq!(sel.capped, vec![1]);
        assert!(sel.end);
    }

    #[test]
    fn rows_in_memory_count_towards_the_share_and_are_skipped() {
        let mut p = plan(3, 100);
        p.exclude = [1, 2].into();
        p.counts = [(1, 2)].into();
        p.capped = [9].into();
        let sel = select(&p, &page(&[(1, 1), (2, 1), (3, 1), (4, 1), (5, 9), (6, 2)]));
        assert_eq!(sel.take, vec![3, 6]);
        assert_eq!(sel.cursor, 6);
    }

    #[test]
    fn a_full_window_stops_before_the_row_it_cannot_take() {
        let sel = select(&plan(10, 2), &page(&[(1, 1), (2, 2), (3, 3), (4, 4)]));
        assert_eq!(sel.take, vec![1, 2]);
        assert_eq!(sel.cursor, 2, "row 3 is looked at again");
        assert!(!sel.end);
    }

    #[test]
    fn rows_left_out_by_the_database_move_the_cursor_past_them() {
        let mut p = page(&[(5, 2)]);
        p.last_examined = 900;
        p.examined = 1000;
        let sel = select(&plan(10, 10), &p);
        assert_eq!(
            (sel.take.clone(), sel.cursor, sel.end),
            (vec![5], 900, false)
        );
        p.examined = 999;
        assert!(select(&plan(10, 10), &p).end);
    }

    #[test]
    fn the_sweep_caps_until_it_wraps_and_refills_what_runs_low() {
        let mut s = Sweep::default();
        s.observe(Some(probe(1000, 5, 5)));
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

    fn probe(top: i64, xmin: i64, xmax: i64) -> Probe {
        Probe { top, xmin, xmax }
    }

    #[test]
    fn the_horizon_waits_for_every_transaction_running_at_its_snapshot() {
        let mut h = Horizon::default();
        // Transactions 10..20 were running when id 500 was the highest visible.
        assert_eq!(h.observe(probe(500, 10, 20)), 0);
        // Later snapshots: still running (xmin 15), and a newer candidate is not taken.
        assert_eq!(h.observe(probe(600, 15, 30)), 0);
        // Every transaction of the first snapshot has ended: 500 is safe, the candidate
        // is now this snapshot.
        assert_eq!(h.observe(probe(700, 20, 40)), 500);
        assert_eq!(h.observe(probe(800, 39, 45)), 500);
        assert_eq!(h.observe(probe(900, 40, 50)), 700);
        // A snapshot with nothing running is safe at once.
        assert_eq!(h.observe(probe(950, 60, 60)), 950);
        assert_eq!(h.observe(probe(940, 60, 60)), 950, "never moves back");
    }

    #[test]
    fn the_cursor_stops_at_the_horizon() {
        let mut s = Sweep::default();
        s.observe(Some(probe(100, 1, 1)));
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
        s.observe(Some(probe(300, 2, 2)));
        s.advance(g, 250, false, 0, &[]);
        assert_eq!(s.plan(false).0, 250);
        assert!(s.more);
    }
}
