//! The engine's two-step claim: `scan` lists pending ids after a cursor (walking the
//! primary key) with their
//! aggregate hash and stored size (no payloads, skipped aggregates left out in the
//! database), the engine picks a fair share of them,
//! and `fetch` reads the picked rows that are due and behind no blocker, stopping at a
//! byte budget.

use futures::TryStreamExt;
use sqlx::postgres::PgRow;
use sqlx::Row;

use super::{unreadable, Store, StoreError};
use crate::config::OnFailed;
use crate::model::OutboxRow;

/// One pending row as the scan sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned {
    pub id: i64,
    /// `hashtext(aggregate_type || '/' || aggregate_id)`; `& 255` is the lease partition.
    pub hash: i32,
    /// Stored size of payload + headers + key (compressed where TOASTed): an estimate.
    pub size: i64,
}

/// What one scan asks for (see `Store::scan`).
#[derive(Debug, Clone, Copy)]
pub struct ScanQuery<'a> {
    pub after: i64,
    pub partitions: Option<&'a [i32]>,
    pub limit: u32,
    pub examine: u32,
    pub skip: Option<&'a [i32]>,
    pub only: Option<&'a [i32]>,
    /// List the table's writers for the horizon (`Probe::writers`).
    pub list_writers: bool,
    /// Leave out rows of these `aggregate_type`s (a tenant's burst, passed over).
    pub skip_types: Option<&'a [String]>,
    /// A refill of these `aggregate_type`s (with `only`: rows of either).
    pub only_types: Option<&'a [String]>,
}

/// The scan's one row: the pending rows and the due retries as arrays, and the summary.
struct ScanRow {
    ids: Option<Vec<i64>>,
    hashes: Option<Vec<i32>>,
    sizes: Option<Vec<i64>>,
    due_ids: Option<Vec<i64>>,
    due_hashes: Option<Vec<i32>>,
    due_sizes: Option<Vec<i64>>,
    last: i64,
    examined: i32,
    top: Option<i64>,
    writers: Option<Vec<String>>,
    fresh: Option<Vec<i64>>,
    floor: Option<i64>,
    epoch: Option<i64>,
}

impl<'r> sqlx::FromRow<'r, PgRow> for ScanRow {
    /// By position, as `ClaimedRow` (the scan's columns: `SCANNED_COLUMNS`).
    fn from_row(r: &'r PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            ids: r.try_get_unchecked(0)?,
            hashes: r.try_get_unchecked(1)?,
            sizes: r.try_get_unchecked(2)?,
            due_ids: r.try_get_unchecked(3)?,
            due_hashes: r.try_get_unchecked(4)?,
            due_sizes: r.try_get_unchecked(5)?,
            last: r.try_get_unchecked(6)?,
            examined: r.try_get_unchecked(7)?,
            top: r.try_get_unchecked(8)?,
            writers: r.try_get_unchecked(9)?,
            fresh: r.try_get_unchecked(10)?,
            floor: r.try_get_unchecked(11)?,
            epoch: r.try_get_unchecked(12)?,
        })
    }
}

/// The scan's columns by name, in the order `ScanRow::from_row` reads them.
#[cfg(test)]
pub(crate) const SCANNED_COLUMNS: [&str; 8] = [
    "w.ids",
    "w.hashes",
    "w.sizes",
    "e.ids",
    "e.hashes",
    "e.sizes",
    "x.last",
    "x.examined",
];

/// Rows from the scan's three arrays (of one length, or the scan is refused).
fn zipped(
    ids: Option<Vec<i64>>,
    hashes: Option<Vec<i32>>,
    sizes: Option<Vec<i64>>,
) -> Result<Vec<Scanned>, StoreError> {
    let (ids, hashes, sizes) = (
        ids.unwrap_or_default(),
        hashes.unwrap_or_default(),
        sizes.unwrap_or_default(),
    );
    if ids.len() != hashes.len() || ids.len() != sizes.len() {
        return Err(StoreError::Unexpected("scan arrays of different lengths"));
    }
    Ok(ids
        .into_iter()
        .zip(hashes)
        .zip(sizes)
        .map(|((id, hash), size)| Scanned { id, hash, size })
        .collect())
}

/// What a statement's snapshot says about ids that can still commit (see
/// `relay::Horizon`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    /// The highest id visible to the snapshot (any status).
    pub top: i64,
    /// The virtual transaction ids holding the table's `RowExclusiveLock`, listed after
    /// the snapshot: every transaction that drew an id at or below `top` and had not
    /// ended by then is one of them. `None` when the statement did not list them.
    pub writers: Option<Vec<String>>,
}

/// How many of the first pending ids with no retry schedule a scan returns (`Fresh`).
pub const FRESH_IDS: usize = 128;

/// The first pending ids with no retry schedule a scan examined, in `id` order: at most
/// `FRESH_IDS` of them; `more` when it examined further ones. The sweep's low water mark
/// rises to just below the first of them this instance does not hold (`relay::Sweep`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fresh {
    pub ids: Vec<i64>,
    pub more: bool,
}

impl Fresh {
    /// From the scan's list (`FRESH_IDS` + 1 at most: one more says it was cut).
    fn cut(mut ids: Vec<i64>) -> Self {
        ids.sort_unstable();
        let more = ids.len() > FRESH_IDS;
        ids.truncate(FRESH_IDS);
        Self { ids, more }
    }
}

/// One page of a scan.
#[derive(Debug, Clone, Default)]
pub struct ScanPage {
    pub rows: Vec<Scanned>,
    /// Retries that fell due at or below `after` (not part of the walk).
    pub due: Vec<Scanned>,
    /// The highest id examined (`after` when none was).
    pub last_examined: i64,
    /// How many pending rows were examined (a page with fewer than `examine` reached
    /// the end of the table).
    pub examined: u32,
    /// The scan's snapshot (`None` in unit tests' pages).
    pub probe: Option<Probe>,
    /// The first pending ids examined with no retry schedule.
    pub fresh: Fresh,
    /// The stored floor as the scan's snapshot saw it (`None` in unit tests' pages).
    pub floor: Option<super::Floor>,
}

/// A fetched row with its aggregate hash.
#[derive(Debug, Clone)]
pub struct ClaimedRow {
    pub row: OutboxRow,
    pub hash: i32,
}

impl<'r> sqlx::FromRow<'r, PgRow> for ClaimedRow {
    /// By position, in the fetch's column order (`Sql::fetch`), without sqlx's check of
    /// each column's declared type against the Rust type (the statement fixes both): a
    /// fetch returns hundreds of rows, and looking each column up by name and checking it
    /// took a tenth of the relay's CPU in a drain. The test below checks the positions
    /// against the statement's column names; `tests/store.rs` decodes real rows.
    fn from_row(r: &'r PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            row: OutboxRow {
                id: r.try_get_unchecked(0)?,
                event_id: r.try_get_unchecked(1)?,
                aggregate_type: r.try_get_unchecked(2)?,
                aggregate_id: r.try_get_unchecked(3)?,
                event_type: r.try_get_unchecked(4)?,
                destination: r.try_get_unchecked(5)?,
                routing_key: r.try_get_unchecked(6)?,
                payload: r.try_get_unchecked(7)?,
                headers: r.try_get_unchecked(8)?,
                attempts: r.try_get_unchecked(9)?,
                created_at: r.try_get_unchecked(10)?,
                flaw: None,
            },
            hash: r.try_get_unchecked(11)?,
        })
    }
}

/// The fetch's columns by name, in the order `ClaimedRow::from_row` reads them.
#[cfg(test)]
pub(crate) const FETCHED_COLUMNS: [&str; 12] = [
    "id",
    "event_id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "destination",
    "routing_key",
    "payload",
    "headers",
    "attempts",
    "created_at",
    "hash",
];

impl ClaimedRow {
    /// Bytes this row takes in memory (what the window's byte bound counts).
    pub fn bytes(&self) -> usize {
        let r = &self.row;
        r.payload.len()
            + r.headers.len()
            + r.aggregate_type.len()
            + r.aggregate_id.len()
            + r.event_type.len()
            + r.destination.as_ref().map_or(0, String::len)
            + r.routing_key.as_ref().map_or(0, String::len)
            + 256
    }
}

/// The fetch's bitmap of a dense range starting at `low`: bit `id - low` (least
/// significant bit of each byte first, as Postgres's `get_bit` reads it) for each id;
/// `high` is the highest of `ids` (from `dense_range`), which sizes the map.
fn range_bits(ids: &[i64], low: i64, high: i64) -> Vec<u8> {
    let offset = |id: i64| usize::try_from(id - low).unwrap_or(0);
    let mut bits = vec![0u8; offset(high) / 8 + 1];
    for id in ids {
        let o = offset(*id);
        if let Some(byte) = bits.get_mut(o / 8) {
            *byte |= 1 << (o % 8);
        }
    }
    bits
}

/// The lowest and highest of `ids` when they lie close together (the stretch of the
/// primary key between them holds at most twice as many ids, plus a little): walking
/// that stretch is cheaper than looking each id up.
fn dense_range(ids: &[i64]) -> Option<(i64, i64)> {
    let low = *ids.iter().min()?;
    let high = *ids.iter().max()?;
    let span = high.checked_sub(low)?;
    let len = i64::try_from(ids.len()).ok()?;
    (span <= len.saturating_mul(2).saturating_add(64)).then_some((low, high))
}

impl Store {
    /// Pending rows with `id > after`, in `id` order, from the given partitions
    /// (`None` = all): ids, hashes and stored sizes only. At most `examine` rows are
    /// looked at; of those, rows whose hash is in `skip` are left out, and with `only`
    /// just those hashes are kept; at most `limit` are returned. Beside them, up to
    /// `limit` retries due now with `id <= after` (the same filters).
    pub async fn scan(&self, q: &ScanQuery<'_>) -> Result<ScanPage, StoreError> {
        let row = sqlx::query_as::<_, ScanRow>(&self.sql.scan)
            .bind(q.after)
            .bind(q.partitions)
            .bind(i64::from(q.limit))
            .bind(i64::from(q.examine))
            .bind(q.skip)
            .bind(q.only)
            .bind(q.list_writers)
            .bind(q.skip_types)
            .bind(q.only_types)
            .fetch_one(&self.hot)
            .await?;
        let probe = match (row.top, row.writers) {
            (Some(top), writers) => Probe { top, writers },
            _ => return Err(StoreError::Unexpected("scan summary without its snapshot")),
        };
        let mut rows = zipped(row.ids, row.hashes, row.sizes)?;
        // In id order (`array_agg` keeps its input's order in practice; this makes sure).
        rows.sort_unstable_by_key(|r| r.id);
        Ok(ScanPage {
            rows,
            due: zipped(row.due_ids, row.due_hashes, row.due_sizes)?,
            last_examined: row.last,
            examined: u32::try_from(row.examined).unwrap_or(0),
            probe: Some(probe),
            fresh: Fresh::cut(row.fresh.unwrap_or_default()),
            floor: row
                .floor
                .zip(row.epoch)
                .map(|(floor, epoch)| super::Floor { floor, epoch }),
        })
    }

    /// The rows among `ids` that are still `PENDING`, due, and behind no blocker of
    /// their aggregate, in `id` order; stops once `budget` bytes were read (at least one
    /// row is always returned when any qualifies). The flag says whether it stopped
    /// early: rows after the last one returned were not looked at. A retry of the
    /// aggregate before a row blocks it, due or not, unless it is read here too or is in
    /// `held` (rows the caller holds already, ahead of this one in its queue). With
    /// `epoch`, nothing is returned unless the floor's epoch is still that one (no rows
    /// re-opened since).
    pub async fn fetch(
        &self,
        ids: &[i64],
        on_failed: OnFailed,
        budget: usize,
        epoch: Option<i64>,
        held: &[i64],
    ) -> Result<(Vec<ClaimedRow>, bool), StoreError> {
        if ids.is_empty() {
            return Ok((Vec::new(), false));
        }
        let range = dense_range(ids);
        let sql = if range.is_some() {
            &self.sql.fetch_range
        } else {
            &self.sql.fetch
        };
        let q = Fetch {
            ids,
            on_failed,
            budget,
            epoch,
            held,
        };
        match self.fetch_as(sql, &q, range, |r: ClaimedRow| r).await {
            Err(StoreError::Query(e)) if unreadable::is_unsendable(&e) => {
                tracing::warn!(
                    error = %e,
                    "Postgres cannot send a fetched row's text in UTF-8; reading the rows \
                     as bytes to fail the row alone"
                );
                let raw = &self.sql.fetch_raw;
                self.fetch_as(raw, &q, None, |r: unreadable::RawRow| r.0)
                    .await
            }
            other => other,
        }
    }

    /// Run a fetch statement (`sql`, reading rows as `R`), stopping at the byte budget.
    async fn fetch_as<R>(
        &self,
        sql: &str,
        q: &Fetch<'_>,
        range: Option<(i64, i64)>,
        into: fn(R) -> ClaimedRow,
    ) -> Result<(Vec<ClaimedRow>, bool), StoreError>
    where
        R: for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin,
    {
        let mut query = sqlx::query_as::<_, R>(sql)
            .bind(q.ids)
            .bind(q.on_failed == OnFailed::Block)
            .bind(q.epoch)
            .bind(q.held);
        if let Some((low, high)) = range {
            query = query
                .bind(low)
                .bind(high)
                .bind(range_bits(q.ids, low, high));
        }
        let mut stream = query.fetch(&self.hot);
        let mut out = Vec::new();
        let mut used = 0usize;
        while let Some(row) = stream.try_next().await? {
            let row = into(row);
            let size = row.bytes();
            if !out.is_empty() && used + size > q.budget {
                return Ok((out, true));
            }
            used += size;
            out.push(row);
        }
        Ok((out, false))
    }
}

/// One fetch's arguments (see `Store::fetch`).
struct Fetch<'a> {
    ids: &'a [i64],
    on_failed: OnFailed,
    budget: usize,
    epoch: Option<i64>,
    held: &'a [i64],
}

#[cfg(test)]
mod tests {
    use super::{dense_range, range_bits, FETCHED_COLUMNS, SCANNED_COLUMNS};
    use crate::table::TableName;

    /// The names the fetch's select list gives its columns, in order.
    fn select_list(sql: &str) -> Vec<String> {
        let start = sql.find("SELECT").unwrap() + "SELECT".len();
        let end = sql.find("FROM").unwrap();
        sql[start..end]
            .split(',')
            .map(|c| {
                let c = c.trim();
                let name = c.rsplit(" AS ").next().unwrap();
                name.trim_start_matches("o.").to_string()
            })
            .collect()
    }

    #[test]
    fn the_fetches_and_the_scan_return_the_columns_where_they_are_read() {
        let sql = super::super::Sql::new(&TableName::parse("app.ev").unwrap());
        for stmt in [&sql.fetch, &sql.fetch_range] {
            assert_eq!(select_list(stmt), FETCHED_COLUMNS, "{stmt}");
        }
        // The scan's outer select list starts with the columns named (the probe, the
        // first fresh id, the floor and its epoch follow).
        let outer = sql.scan.rfind("SELECT w.ids").unwrap();
        let head: Vec<String> = sql.scan[outer + "SELECT".len()..]
            .split(',')
            .take(SCANNED_COLUMNS.len())
            .map(|c| c.trim().to_string())
            .collect();
        assert_eq!(head, SCANNED_COLUMNS);
        assert!(sql.fetch_range.contains("o.id >= $5 AND o.id <= $6"));
    }

    #[test]
    fn ids_close_together_are_fetched_as_a_range() {
        let drain: Vec<i64> = (1_000..1_500).collect();
        assert_eq!(dense_range(&drain), Some((1_000, 1_499)));
        assert_eq!(
            dense_range(&[7, 3, 60]),
            Some((3, 60)),
            "unordered, few ids"
        );
        assert_eq!(dense_range(&[7, 3, 90]), None, "a span of 87 for 3 ids");
        let refill: Vec<i64> = (0..500).map(|i| i * 1_000).collect();
        assert_eq!(
            dense_range(&refill),
            None,
            "a hot aggregate's rows far apart"
        );
        assert_eq!(dense_range(&[i64::MIN, i64::MAX]), None, "no overflow");
        assert_eq!(dense_range(&[]), None);
    }

    #[test]
    fn a_range_s_bitmap_has_one_bit_per_wanted_id() {
        assert_eq!(
            range_bits(&[10, 11, 18, 26], 10, 26),
            vec![0b0000_0011, 0b0000_0001, 0b0000_0001]
        );
        assert_eq!(range_bits(&[5], 5, 5), vec![1]);
        let drain: Vec<i64> = (1_000..1_500).step_by(2).collect();
        let bits = range_bits(&drain, 1_000, *drain.iter().max().unwrap());
        assert_eq!(bits.len(), 63);
        assert!(bits[..62].iter().all(|b| *b == 0x55), "{bits:?}");
    }
}
