//! How the relay connects to Postgres: the session options and the pool settings every
//! pool uses, and the hot path's own pool.
//!
//! The hot path (the claim's scan and fetch, and the marks) has connections of its own,
//! planned once per connection instead of on every call. Planning was most of what a claim
//! cost Postgres while the relay keeps up with its producers (a claim every few
//! milliseconds, a handful of rows each: the scan planned in ~0.3 ms and ran in ~0.1;
//! `docs/benchmarks.md`, 2026-12-06 10:40). A plan built once
//! (`plan_cache_mode = force_generic_plan`) is built with whatever the statistics say at
//! that moment, though: prepared while the table was empty, the scan's plan was a bitmap
//! scan of every id above the cursor and a sort (208 ms per call at 200 000 pending rows),
//! which is why the relay's other sessions plan every call. On the hot connections the
//! planner is therefore held to the index paths these statements are written for:
//! sequential and bitmap scans, explicit sorts, hash and merge joins and materialization
//! are priced out (`enable_* = off` only adds a cost, so a statement without an index
//! path still runs), and `jit` is off (that cost would otherwise cross `jit_above_cost`
//! and compile each call). Nothing else runs on them; `tests/store/hot.rs` checks the
//! plans they build on an empty table once the table is full.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use super::{Store, StoreError};

/// Connection options from a database URL (no password in any error we return).
pub fn connect_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    // Prepared statements are planned with their real parameters every time
    // (`force_custom_plan`): a generic plan cached while the table was empty or small would
    // probe blockers with a sequential scan per row once rows pile up (p50 4 s at
    // 2 000 rows/s, seen in the bench), and re-preparing each call costs a round trip.
    // The hot path's pool (`hot`) plans once instead, held to index paths.
    url.parse::<PgConnectOptions>()
        .map(|o| {
            o.log_statements(tracing::log::LevelFilter::Trace)
                .options([("plan_cache_mode", "force_custom_plan")])
        })
        .map_err(|e| StoreError::BadUrl(crate::secret::redact_url(&e.to_string())))
}

/// A connection idle at least this long is pinged before it is handed out.
const IDLE_PING: Duration = Duration::from_secs(1);

/// The pool settings every relay pool uses (and the bench's Postgres ceiling, so it is
/// measured the same way). sqlx pings a connection when it goes back to the pool; by
/// default it pings it again before handing it out, a second round trip per statement
/// on the claim's critical path. Here only a connection idle for `IDLE_PING` is pinged
/// first (one that may have been cut while unused: a server restart is still noticed
/// before a statement is sent); a busy one was checked when it was returned.
pub fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= IDLE_PING {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// Connections of the hot path: a scan ahead, a fetch and a mark run at the same time.
const CONNECTIONS: u32 = 3;

/// Session settings of the hot path's connections (see the module doc).
pub const HOT_SETTINGS: [(&str, &str); 8] = [
    ("plan_cache_mode", "force_generic_plan"),
    ("enable_seqscan", "off"),
    ("enable_bitmapscan", "off"),
    ("enable_sort", "off"),
    ("enable_hashjoin", "off"),
    ("enable_mergejoin", "off"),
    ("enable_material", "off"),
    ("jit", "off"),
];

/// A pool beside `pool`, to the same database with the same options, for the hot path.
/// Connects lazily (the first claim opens it); a later `-c` overrides the main pool's
/// `plan_cache_mode`.
pub fn hot(pool: &PgPool) -> PgPool {
    let opts = (*pool.connect_options()).clone().options(HOT_SETTINGS);
    let acquire = pool.options().get_acquire_timeout();
    pool_options(CONNECTIONS)
        .acquire_timeout(acquire)
        .connect_lazy_with(opts)
}

impl Store {
    /// The hot path's statements, (name, SQL), for checking the plans their sessions
    /// build (`tests/store/hot.rs`); run them with [`HOT_SETTINGS`].
    #[doc(hidden)]
    pub fn hot_statements(&self) -> [(&'static str, &str); 4] {
        [
            ("scan", &self.sql.scan),
            ("fetch", &self.sql.fetch),
            ("fetch_range", &self.sql.fetch_range),
            ("mark_processed", &self.sql.mark_processed),
        ]
    }

    /// A setting as the hot path's sessions have it (`tests/store/hot.rs`).
    #[doc(hidden)]
    pub async fn hot_setting(&self, name: &str) -> Result<String, StoreError> {
        Ok(sqlx::query_scalar("SELECT current_setting($1)")
            .bind(name)
            .fetch_one(&self.hot)
            .await?)
    }
}
