//! The claimer: finds due rows to fill the window, fairly. A claim scans pending ids
//! (no payloads) after a cursor, picks at most `max_rows_per_aggregate` rows of any one
//! aggregate (counting what the window already holds), and fetches the picked rows that
//! are due and behind no blocker, within the window's free rows and bytes.
//!
//! Order safety: claims run one at a time. A *sweep* walks the table in `id` order across
//! claims; once it passes over a row of an aggregate without taking it (the aggregate is
//! capped, held back, or was dropped from memory), that aggregate is *capped* for the rest
//! of the sweep, so a later row can never be taken while an earlier one is left behind.
//! When the sweep reaches the end it starts again from the first pending id. While some
//! aggregate is capped, every other claim is a *front* claim from the first pending id,
//! so a capped (hot) aggregate is refilled without waiting for the sweep to wrap.

use std::collections::{HashMap, HashSet};

use crate::config::OnFailed;
use crate::store::{ClaimedRow, Scanned, Store, StoreError};

/// The sweep's position between claims.
#[derive(Debug, Default)]
pub struct Sweep {
    cursor: i64,
    capped: HashSet<i32>,
    last_was_front: bool,
}

impl Sweep {
    /// Whether the next claim should be a front claim.
    pub fn front_next(&self) -> bool {
        !self.capped.is_empty() && !self.last_was_front
    }

    /// Rows of this aggregate hash may not be taken again in this sweep.
    pub fn cap(&mut self, hash: i32) {
        self.capped.insert(hash);
    }

    /// Start the next claim: its scan start and the hashes it must skip.
    pub fn plan(&mut self, front: bool) -> (i64, HashSet<i32>) {
        self.last_was_front = front;
        if front {
            (0, HashSet::new())
        } else {
            (self.cursor, self.capped.clone())
        }
    }

    /// Take a sweep claim's result into account.
    pub fn advance(&mut self, cursor: i64, end: bool, capped: &[i32]) {
        if end {
            self.cursor = 0;
            self.capped.clear();
        } else {
            self.cursor = cursor;
            self.capped.extend(capped.iter().copied());
        }
    }
}

/// Everything one claim needs, snapshotted from the engine when it starts.
#[derive(Debug, Clone)]
pub struct Plan {
    pub front: bool,
    pub after: i64,
    /// Aggregate hashes not to take rows of (capped in the sweep, held back, …).
    pub capped: HashSet<i32>,
    /// Ids held in memory or being recorded.
    pub exclude: HashSet<i64>,
    /// Rows held per aggregate hash.
    pub counts: HashMap<i32, u32>,
    pub max_per_aggregate: u32,
    pub room_rows: usize,
    pub room_bytes: usize,
    pub scan_limit: u32,
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

/// Pick rows from a scan (pure; see the module doc).
pub fn select(plan: &Plan, scanned: &[Scanned]) -> Selection {
    let mut sel = Selection {
        cursor: plan.after,
        ..Selection::default()
    };
    let mut counts: HashMap<i32, u32> = HashMap::new();
    let mut capped: HashSet<i32> = HashSet::new();
    let mut bytes = 0usize;
    let mut full = false;
    for s in scanned {
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
            full = true;
            break;
        }
        *taken += 1;
        bytes += size;
        sel.take.push(s.id);
        sel.cursor = s.id;
    }
    sel.end = !full && scanned.len() < plan.scan_limit as usize;
    sel
}

/// A finished claim.
#[derive(Debug)]
pub struct Claimed {
    pub front: bool,
    pub rows: Vec<ClaimedRow>,
    pub cursor: i64,
    pub end: bool,
    pub capped: Vec<i32>,
}

/// Run one claim against the store.
pub async fn claim(store: Store, plan: Plan) -> Result<Claimed, StoreError> {
    let scanned = store
        .scan(plan.after, plan.partitions.as_deref(), plan.scan_limit)
        .await?;
    let mut sel = select(&plan, &scanned);
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
    Ok(Claimed {
        front: plan.front,
        rows,
        cursor: sel.cursor,
        end: sel.end,
        capped: sel.capped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(max_per_aggregate: u32, room_rows: usize) -> Plan {
        Plan {
            front: false,
            after: 0,
            capped: HashSet::new(),
            exclude: HashSet::new(),
            counts: HashMap::new(),
            max_per_aggregate,
            room_rows,
            room_bytes: 1 << 20,
            scan_limit: 100,
            partitions: None,
            on_failed: OnFailed::Block,
        }
    }

    fn scan(rows: &[(i64, i32)]) -> Vec<Scanned> {
        rows.iter()
            .map(|&(id, hash)| Scanned { id, hash, size: 10 })
            .collect()
    }

    #[test]
    fn a_hot_aggregate_gets_its_share_and_the_others_come_through() {
        let mut rows: Vec<(i64, i32)> = (1..=50).map(|id| (id, 1)).collect();
        rows.extend((51..=55).map(|id| (id, id as i32)));
        let sel = select(&plan(3, 100), &scan(&rows));
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
        let sel = select(&p, &scan(&[(1, 1), (2, 1), (3, 1), (4, 1), (5, 9), (6, 2)]));
        assert_eq!(sel.take, vec![3, 6]);
        assert_eq!(sel.cursor, 6);
    }

    #[test]
    fn a_full_window_stops_before_the_row_it_cannot_take() {
        let sel = select(&plan(10, 2), &scan(&[(1, 1), (2, 2), (3, 3), (4, 4)]));
        assert_eq!(sel.take, vec![1, 2]);
        assert_eq!(sel.cursor, 2, "row 3 is looked at again");
        assert!(!sel.end);
    }

    #[test]
    fn the_sweep_caps_until_it_wraps() {
        let mut s = Sweep::default();
        assert!(!s.front_next());
        assert_eq!(s.plan(false), (0, HashSet::new()));
        s.advance(40, false, &[7]);
        assert!(s.front_next(), "a capped aggregate gets a front claim");
        assert_eq!(s.plan(true).0, 0);
        assert!(!s.front_next());
        assert_eq!(s.plan(false), (40, [7].into()));
        s.advance(90, true, &[]);
        assert_eq!(s.plan(false), (0, HashSet::new()));
    }
}
