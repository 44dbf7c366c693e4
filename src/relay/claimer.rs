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
//! again from its low water mark. While a capped aggregate runs low in the window,
//! every other claim is a *refill*: the first pending rows of just those aggregates, so a
//! hot aggregate keeps flowing without waiting for the sweep to wrap. The sweep's state
//! between claims (cursor, horizon, where a wrap starts) is `sweep::Sweep`.

use super::aggkey::{HashMap, HashSet};
use super::ahead::Ahead;
use crate::config::OnFailed;
use crate::store::{
    ClaimedRow, Floor, Fresh, Probe, ScanPage, ScanQuery, Scanned, Store, StoreError,
};

/// Everything one claim needs, snapshotted from the engine when it starts.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The sweep's generation when planned.
    pub generation: u64,
    /// The floor's epoch the sweep knows (`None` before its first scan).
    pub epoch: Option<i64>,
    pub after: i64,
    /// Aggregate hashes not to take rows of (capped in the sweep, held back, …).
    pub capped: HashSet<i32>,
    /// A refill: only these hashes (and `only_type`).
    pub only: Option<Vec<i32>>,
    /// An `aggregate_type` the sweep passes over (`Sweep::cap_tenant`): its rows are left
    /// out of a sweep claim's scan.
    pub skip_type: Option<String>,
    /// A refill of this passed-over type (with `only`: rows of either).
    pub only_type: Option<String>,
    /// Ids held in memory or being recorded.
    pub exclude: HashSet<i64>,
    /// Held ids that were tried before (their retry time may still be in the database).
    pub retried: Vec<i64>,
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
    /// The scan lists the table's writers for the horizon.
    pub list_writers: bool,
    /// The horizon this claim's cursor will be held to: a page scanned ahead from past it
    /// would not be used.
    pub horizon: i64,
    /// A page scanned ahead that fits this plan (`Ahead::adopt`): used instead of scanning.
    pub ahead: Option<ScanPage>,
}

impl Plan {
    /// A refill: the first pending rows of some aggregates or of a type, from the low
    /// water mark (it does not move the sweep's cursor).
    pub fn is_refill(&self) -> bool {
        self.only.is_some() || self.only_type.is_some()
    }
}

/// The examine limit of a scan returning `scan_limit` ids: passing over skipped
/// aggregates' backlog is what the database does best, so a scan that skips some may
/// examine far more rows than it returns.
pub fn examine_limit(scan_limit: u32, skipping: bool) -> u32 {
    if skipping {
        scan_limit.saturating_mul(100).max(100_000)
    } else {
        scan_limit
    }
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

/// What `Picker::pick` did with one scanned row.
#[derive(Debug, PartialEq, Eq)]
enum Pick {
    /// Left out (held, capped, or its aggregate's share reached): look further.
    Passed,
    Taken,
    /// No room for it: stop here.
    Full,
}

/// The fairness and room rules of one selection, applied row by row.
struct Picker<'a> {
    plan: &'a Plan,
    sel: Selection,
    counts: HashMap<i32, u32>,
    capped: HashSet<i32>,
    bytes: usize,
}

impl Picker<'_> {
    fn pick(&mut self, s: &Scanned) -> Pick {
        let plan = self.plan;
        if plan.exclude.contains(&s.id)
            || plan.capped.contains(&s.hash)
            || self.capped.contains(&s.hash)
        {
            return Pick::Passed;
        }
        let held = plan.counts.get(&s.hash).copied().unwrap_or(0);
        let taken = self.counts.entry(s.hash).or_insert(0);
        if held + *taken >= plan.max_per_aggregate {
            self.capped.insert(s.hash);
            self.sel.capped.push(s.hash);
            return Pick::Passed;
        }
        let size = usize::try_from(s.size).unwrap_or(0);
        if self.sel.take.len() >= plan.room_rows
            || (!self.sel.take.is_empty() && self.bytes + size > plan.room_bytes)
        {
            return Pick::Full;
        }
        *taken += 1;
        self.bytes += size;
        self.sel.take.push(s.id);
        Pick::Taken
    }
}

/// Pick rows from a scan page (pure; see the module doc).
pub fn select(plan: &Plan, page: &ScanPage) -> Selection {
    let mut p = Picker {
        plan,
        sel: Selection {
            cursor: plan.after,
            ..Selection::default()
        },
        counts: HashMap::default(),
        capped: HashSet::default(),
        bytes: 0,
    };
    // Retries due below the cursor first (they do not move it).
    for s in &page.due {
        if p.pick(s) == Pick::Full {
            return p.sel;
        }
    }
    for s in &page.rows {
        if p.pick(s) == Pick::Full {
            // Full: the sweep continues at this row next time.
            return p.sel;
        }
        p.sel.cursor = s.id;
    }
    let mut sel = p.sel;
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

/// Park the rows left out because a FAILED row (block mode) or a retry not yet due
/// holds them back (the store parks only those; rows merely not due stay as they are).
async fn park_blocked(
    store: &Store,
    page: &ScanPage,
    left_out: &HashSet<i64>,
    on_failed: OnFailed,
) -> Result<(), StoreError> {
    let (ids, hashes): (Vec<i64>, Vec<i32>) = page
        .rows
        .iter()
        .chain(&page.due)
        .filter(|s| left_out.contains(&s.id))
        .map(|s| (s.id, s.hash))
        .unzip();
    let parked = store.park(&ids, &hashes, on_failed).await?;
    if parked > 0 {
        tracing::debug!(parked, "parked rows behind blockers");
    }
    Ok(())
}

/// A scan of `plan`'s partitions from `after`, leaving out the hashes in `skip`, not
/// listing the writers (the claim's own scan adds its refill and listing).
fn sweep_query<'a>(plan: &'a Plan, after: i64, skip: &'a [i32], examine: u32) -> ScanQuery<'a> {
    ScanQuery {
        after,
        partitions: plan.partitions.as_deref(),
        limit: plan.scan_limit,
        examine,
        skip: (!skip.is_empty()).then_some(skip),
        only: None,
        list_writers: false,
        skip_types: plan.skip_type.as_ref().map(std::slice::from_ref),
        only_types: None,
    }
}

/// The next sweep scan, from where this sweep claim leaves the cursor, skipping what it
/// caps (`Ahead`); `None` for a refill, a claim that reached the end or took nothing, a
/// cursor past the horizon (it will be held back), or a failed scan.
async fn scan_ahead(store: &Store, plan: &Plan, sel: &Selection) -> Option<Ahead> {
    if plan.is_refill() || sel.end || sel.take.is_empty() || sel.cursor > plan.horizon {
        return None;
    }
    let skip: HashSet<i32> = plan.capped.iter().chain(&sel.capped).copied().collect();
    let skip_list: Vec<i32> = skip.iter().copied().collect();
    let examine = examine_limit(
        plan.scan_limit,
        !skip.is_empty() || plan.skip_type.is_some(),
    );
    let page = store
        .scan(&sweep_query(plan, sel.cursor, &skip_list, examine))
        .await
        .ok()?;
    Some(Ahead {
        generation: plan.generation,
        after: sel.cursor,
        skip,
        skip_type: plan.skip_type.clone(),
        partitions: plan.partitions.clone(),
        scan_limit: plan.scan_limit,
        examine,
        page,
    })
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
    /// What the scan saw of the table (for the sweep's horizon and floor).
    pub seen: Seen,
    /// The next sweep scan, run beside this claim's fetch.
    pub ahead: Option<Ahead>,
}

/// What a claim's scan saw beside its rows.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Where the scan started (it looked at ids above it).
    pub after: i64,
    /// The scan's snapshot.
    pub probe: Option<Probe>,
    /// The first pending ids with no retry schedule it examined (of this instance's
    /// partitions, any hash).
    pub fresh: Fresh,
    /// How far it looked: the last id examined when it stopped at its examine limit,
    /// `i64::MAX` when it reached the end of the table.
    pub reach: i64,
    /// The stored floor.
    pub floor: Option<Floor>,
}

impl Default for Seen {
    fn default() -> Self {
        Self {
            after: 0,
            probe: None,
            fresh: Fresh::default(),
            reach: i64::MAX,
            floor: None,
        }
    }
}

/// Run one claim against the store.
pub async fn claim(store: Store, mut plan: Plan) -> Result<Claimed, StoreError> {
    let began = std::time::Instant::now();
    let scanned_ahead = plan.ahead.is_some();
    let mut page = match plan.ahead.take() {
        Some(page) => page,
        None => {
            let skip: Vec<i32> = plan.capped.iter().copied().collect();
            store
                .scan(&ScanQuery {
                    only: plan.only.as_deref(),
                    list_writers: plan.list_writers,
                    only_types: plan.only_type.as_ref().map(std::slice::from_ref),
                    ..sweep_query(&plan, plan.after, &skip, plan.examine)
                })
                .await?
        }
    };
    let epoch = page.floor.map(|f| f.epoch);
    let seen = Seen {
        after: plan.after,
        probe: page.probe.take(),
        fresh: std::mem::take(&mut page.fresh),
        reach: if page.examined < plan.examine {
            i64::MAX
        } else {
            page.last_examined
        },
        floor: page.floor,
    };
    if plan.epoch.is_some() && epoch != plan.epoch {
        // Rows were re-opened below the sweep (replay, un-parking): rows of their
        // aggregates above it must not go first. Take nothing; the sweep starts over.
        return Ok(Claimed {
            refill: plan.is_refill(),
            generation: plan.generation,
            rows: Vec::new(),
            cursor: plan.after,
            end: false,
            capped: Vec::new(),
            passed: Vec::new(),
            seen,
            ahead: None,
        });
    }
    let mut sel = select(&plan, &page);
    // The fetch re-checks the epoch the scan saw: a re-opening that commits between the
    // two statements makes it return nothing.
    let fetch = store.fetch(
        &sel.take,
        plan.on_failed,
        plan.room_bytes,
        epoch,
        &plan.retried,
    );
    // A sweep claim that stopped short of the end scans on from its cursor meanwhile.
    let (fetched, ahead) = tokio::join!(fetch, scan_ahead(&store, &plan, &sel));
    let (rows, truncated) = fetched?;
    if truncated {
        // The byte budget ran out: continue right after the last row read, so the rows
        // not read are looked at again (capping them could skip them for the sweep); a
        // due retry read last (below the cursor) leaves the cursor where it was.
        if let Some(last) = rows.last() {
            sel.cursor = last.row.id.max(plan.after);
        }
        sel.end = false;
    }
    tracing::trace!(
        after = plan.after,
        cursor = sel.cursor,
        scanned_ahead,
        picked = sel.take.len(),
        rows = rows.len(),
        took_us = began.elapsed().as_micros() as u64,
        "claimed"
    );
    let left_out = left_out(&sel.take, &rows, truncated);
    // The sweep passes over the rows left out: their aggregates are capped until it
    // wraps, or a later row of theirs could go out first once a retry falls due.
    let mut passed: Vec<i32> = Vec::new();
    for s in page
        .rows
        .iter()
        .chain(&page.due)
        .filter(|s| left_out.contains(&s.id))
    {
        if !sel.capped.contains(&s.hash) && !passed.contains(&s.hash) {
            passed.push(s.hash);
        }
    }
    if !left_out.is_empty() {
        park_blocked(&store, &page, &left_out, plan.on_failed).await?;
    }
    Ok(Claimed {
        refill: plan.is_refill(),
        generation: plan.generation,
        rows,
        cursor: sel.cursor,
        end: sel.end,
        capped: sel.capped,
        passed,
        seen,
        ahead,
    })
}

#[cfg(test)]
#[path = "claimer_tests.rs"]
pub(super) mod tests;
