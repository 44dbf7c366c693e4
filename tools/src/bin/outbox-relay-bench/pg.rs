//! The Postgres side of the bench: unique migrated tables, preloading, producers that
//! commit one row per transaction (paced or flat out), the Postgres ceiling (claim +
//! mark with no broker) and the textbook relay's database half.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use chrono::{DateTime, Utc};
use outbox_relay::config::OnFailed;
use outbox_relay::store::Store;
use outbox_relay::table::TableName;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use uuid::Uuid;

/// The value of the one header of every bench row (`TRACEPARENT`'s entry).
pub const TRACE_VALUE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
pub const TRACEPARENT: &str =
    r#"{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}"#;

/// A migrated outbox table of its own; `drop` removes it and everything derived.
#[derive(Clone)]
pub struct BenchTable {
    pub name: String,
    pub pool: PgPool,
}

pub async fn pool(url: &str, max: u32) -> Result<PgPool> {
    let opts: PgConnectOptions = url
        .parse::<PgConnectOptions>()?
        .application_name("outbox-relay-bench");
    // The relay's pool settings: the Postgres ceiling's statements go through the same.
    outbox_relay::store::pool_options(max)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(opts)
        .await
        .context("connect to Postgres")
}

pub async fn connection(url: &str) -> Result<PgConnection> {
    let opts: PgConnectOptions = url
        .parse::<PgConnectOptions>()?
        .application_name("outbox-relay-bench");
    Ok(opts.connect().await?)
}

impl BenchTable {
    pub async fn create(pool: &PgPool, name: &str) -> Result<Self> {
        let mut conn = pool.acquire().await?;
        outbox_relay::migrate::migrate(
            &mut conn,
            &TableName::parse(name).map_err(|e| anyhow!("table {name}: {e}"))?,
        )
        .await
        .with_context(|| format!("migrate {name}"))?;
        Ok(Self {
            name: name.to_string(),
            pool: pool.clone(),
        })
    }

    pub fn ident(&self) -> String {
        format!("\"{}\"", self.name)
    }

    pub fn store(&self) -> Result<Store> {
        let table =
            TableName::parse(&self.name).map_err(|e| anyhow!("table {}: {e}", self.name))?;
        Ok(Store::from_pool(self.pool.clone(), table))
    }

    pub async fn drop(&self) {
        let n = &self.name;
        for sql in outbox_relay::migrate::drop_statements(n) {
            let _ = sqlx::query(&sql).execute(&self.pool).await;
        }
    }

    /// `n` PENDING rows, ~`payload_bytes` of JSON each, aggregates spread pseudo-randomly
    /// (a deterministic hash of the row number) over `aggregates`. Then VACUUM ANALYZE,
    /// as autovacuum would soon do for an insert-heavy table.
    pub async fn preload(&self, n: u64, aggregates: u32, payload_bytes: usize) -> Result<()> {
        let pad = pad_for(&self.pool, payload_bytes).await?;
        let t = self.ident();
        let chunk = 50_000u64;
        let mut from = 1u64;
        while from <= n {
            let to = (from + chunk - 1).min(n);
            // One transaction per chunk, nothing else writing the table: the order lock
            // is not needed, and it would hold one lock per aggregate until commit
            // (over ~6 000 aggregates exhaust the server's lock table).
            let mut tx = self.pool.begin().await?;
            sqlx::query("SELECT set_config('outboxrelay.order_lock', 'off', true)")
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!(
                "INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload, headers)
                 SELECT 'order', 'order-' || a, 'order.created', {payload}, $4::jsonb
                 FROM generate_series($1::bigint, $2::bigint) g,
                      LATERAL (SELECT (hashint8(g) & 2147483647) % $3 AS a) x
                 ORDER BY g",
                payload = payload_sql("a", "g", pad)
            ))
            .bind(from as i64)
            .bind(to as i64)
            .bind(i64::from(aggregates))
            .bind(TRACEPARENT)
            .execute(&mut *tx)
            .await
            .context("preload")?;
            tx.commit().await?;
            from = to + 1;
        }
        sqlx::raw_sql(&format!("VACUUM ANALYZE {t}"))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// (updates, HOT updates) of the table so far (cumulative statistics).
    pub async fn updates(&self) -> Result<(i64, i64)> {
        Ok(sqlx::query_as(
            "SELECT coalesce(n_tup_upd, 0), coalesce(n_tup_hot_upd, 0)
             FROM pg_stat_user_tables WHERE relid = to_regclass($1)",
        )
        .bind(self.ident())
        .fetch_optional(&self.pool)
        .await?
        .unwrap_or((0, 0)))
    }

    /// Share of the updates since `before` that were HOT, once the statistics show at
    /// least `expected` of them (backends flush their counts within about a second);
    /// `None` if they never do within 10 s.
    pub async fn hot_share_since(&self, before: (i64, i64), expected: u64) -> Result<Option<f64>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (upd, hot) = self.updates().await?;
            let (upd, hot) = (upd - before.0, hot - before.1);
            if upd > 0 && upd as u64 >= expected {
                return Ok(Some(hot as f64 / upd as f64));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn pending(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {} WHERE status = 'PENDING'",
            self.ident()
        ))
        .fetch_one(&self.pool)
        .await?)
    }

    /// Whether any row is still due for the relay, looking from `from` (the first pending
    /// id the last call found, which it updates: the bench's rows never re-open, so the
    /// primary-key walk reads each marked row once over the whole drain). The drain polls
    /// this every 100 ms: a `count(*)` there read the whole table each time and took a
    /// third of a core from the run it measured.
    pub async fn any_pending(&self, from: &mut i64) -> Result<bool> {
        let first: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT id FROM {} WHERE id >= $1 AND status = 'PENDING' ORDER BY id LIMIT 1",
            self.ident()
        ))
        .bind(*from)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(id) = first {
            *from = id;
        }
        Ok(first.is_some())
    }

    pub async fn count_status(&self, status: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {} WHERE status = $1",
            self.ident()
        ))
        .bind(status)
        .fetch_one(&self.pool)
        .await?)
    }

    /// created_at → processed_at of PROCESSED rows, in ms: (p50, p99, max).
    pub async fn latency_percentiles(&self) -> Result<(f64, f64, f64)> {
        let r: (Option<f64>, Option<f64>, Option<f64>) = sqlx::query_as(&format!(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d),
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY d),
                    max(d)
             FROM (SELECT extract(epoch FROM processed_at - created_at)::float8 * 1000 AS d
                   FROM {} WHERE status = 'PROCESSED') s",
            self.ident()
        ))
        .fetch_one(&self.pool)
        .await?;
        Ok((r.0.unwrap_or(0.0), r.1.unwrap_or(0.0), r.2.unwrap_or(0.0)))
    }

    /// When the first and the last row were marked (`None` when none was).
    pub async fn processed_span(&self) -> Result<Option<(DateTime<Utc>, DateTime<Utc>)>> {
        let (first, last): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
            sqlx::query_as(&format!(
                "SELECT min(processed_at), max(processed_at) FROM {} WHERE status = 'PROCESSED'",
                self.ident()
            ))
            .fetch_one(&self.pool)
            .await?;
        Ok(first.zip(last))
    }

    /// Partitions leased by some relay instance (256 = the relay is up and claiming).
    pub async fn leased(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT count(*) FROM \"{}_relay_leases\" WHERE owner IS NOT NULL AND lease_until > now()",
            self.name
        ))
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn notify_channel(&self) -> Result<String> {
        Ok(self.store()?.notify_channel().await?)
    }
}

/// The padding that makes a rendered payload `target` bytes long.
async fn pad_for(pool: &PgPool, target: usize) -> Result<usize> {
    let base: i32 = sqlx::query_scalar(&format!(
        "SELECT octet_length(({})::text) FROM (SELECT 500 AS a, 100000 AS g) s",
        payload_sql("a", "g", 0)
    ))
    .fetch_one(pool)
    .await?;
    Ok(target.saturating_sub(base as usize))
}

/// A payload exactly as the relay will read it (`payload::text` of the preloaded rows).
pub async fn rendered_payload(pool: &PgPool, target: usize) -> Result<String> {
    let pad = pad_for(pool, target).await?;
    Ok(sqlx::query_scalar(&format!(
        "SELECT ({})::text FROM (SELECT 500 AS a, 100000 AS g) s",
        payload_sql("a", "g", pad)
    ))
    .fetch_one(pool)
    .await?)
}

/// The current WAL insert position.
pub async fn wal_lsn(pool: &PgPool) -> Result<String> {
    Ok(sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(pool)
        .await?)
}

/// Full-page images written to WAL so far (cumulative, `pg_stat_wal`).
pub async fn wal_fpi(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT wal_fpi FROM pg_stat_wal")
        .fetch_one(pool)
        .await?)
}

/// WAL bytes written since `lsn` (by everyone: the bench runs alone).
pub async fn wal_since(pool: &PgPool, lsn: &str) -> Result<f64> {
    Ok(
        sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::float8")
            .bind(lsn)
            .fetch_one(pool)
            .await?,
    )
}

pub async fn db_now(pool: &PgPool) -> Result<DateTime<Utc>> {
    Ok(sqlx::query_scalar("SELECT now()").fetch_one(pool).await?)
}

/// The payload as SQL over an aggregate number `a` and a sequence number `g`: an order
/// event of about the usual shape, with a `note` padded by `pad` bytes.
fn payload_sql(a: &str, g: &str, pad: usize) -> String {
    format!(
        "jsonb_build_object('orderId', 'order-' || {a}, 'seq', {g}, 'customerId', 'customer-' || {a},
            'currency', 'EUR', 'total', 59.98, 'status', 'created',
            'lines', '[{{\"sku\": \"SKU-1001\", \"qty\": 2, \"price\": 19.99}}, {{\"sku\": \"SKU-2002\", \"qty\": 1, \"price\": 20.00}}]'::jsonb,
            'note', repeat('x', {pad}))"
    )
}

/// The same payload built client-side (for producers that bind it).
pub fn payload_text(agg: u32, seq: u64, target: usize) -> String {
    let head = format!(
        r#"{{"seq": {seq}, "lines": [{{"qty": 2, "sku": "SKU-1001", "price": 19.99}}, {{"qty": 1, "sku": "SKU-2002", "price": 20.00}}], "total": 59.98, "status": "created", "orderId": "order-{agg}", "currency": "EUR", "customerId": "customer-{agg}", "note": ""#
    );
    let pad = target.saturating_sub(head.len() + 2);
    let mut s = head;
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

/// One committed producer row.
pub struct Commit {
    pub event_id: Uuid,
    pub at: Instant,
}

/// What a producer transaction writes: one outbox row, and first (when `business` names
/// a table made by [`business_table`]) one business row, as an order service would.
pub struct Target<'a> {
    pub outbox: &'a str,
    pub business: Option<&'a str>,
}

/// A business table for [`Target::business`]: an order row, written before the event.
pub async fn business_table(pool: &PgPool, name: &str) -> Result<()> {
    sqlx::raw_sql(&format!(
        "DROP TABLE IF EXISTS \"{name}\";
         CREATE TABLE \"{name}\" (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
             customer_id TEXT NOT NULL, status TEXT NOT NULL, total NUMERIC(12, 2) NOT NULL,
             created_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    ))
    .execute(pool)
    .await?;
    Ok(())
}

/// `producers` connections each committing one row per transaction (after a business
/// row, if the target has a business table). With `rate` the rows are paced to that
/// total rate (a late producer catches up without bursting past the schedule); without,
/// flat out. Runs for `secs`. Returns every commit.
pub async fn produce(
    url: &str,
    target: &Target<'_>,
    producers: usize,
    rate: Option<f64>,
    secs: f64,
    aggregates: u32,
    payload_bytes: usize,
) -> Result<Vec<Commit>> {
    let sql = Arc::new(format!(
        "INSERT INTO \"{}\" (event_id, aggregate_type, aggregate_id, event_type, payload, headers)
         VALUES ($1, 'order', $2, 'order.created', $3::jsonb, $4::jsonb)",
        target.outbox
    ));
    let business = Arc::new(target.business.map(|b| {
        format!("INSERT INTO \"{b}\" (customer_id, status, total) VALUES ($1, 'created', 59.98)")
    }));
    let mut conns = Vec::new();
    for _ in 0..producers {
        conns.push(connection(url).await?);
    }
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for (p, mut conn) in conns.into_iter().enumerate() {
        let sql = sql.clone();
        let business = business.clone();
        tasks.push(tokio::spawn(async move {
            let mut out: Vec<Commit> = Vec::new();
            let period = rate.map(|r| Duration::from_secs_f64(producers as f64 / r));
            // Stagger producers over one period so the offered load is smooth.
            let offset = period
                .map(|d| d.mul_f64(p as f64 / producers as f64))
                .unwrap_or_default();
            let mut k: u32 = 0;
            let mut seq = p as u64;
            tokio::time::sleep_until((start + offset).into()).await;
            loop {
                if let Some(d) = period {
                    let due = start + offset + d * k;
                    if due >= end {
                        break;
                    }
                    tokio::time::sleep_until(due.into()).await;
                    k += 1;
                } else if Instant::now() >= end {
                    break;
                }
                let agg = rand::random::<u32>() % aggregates;
                let event_id = Uuid::new_v4();
                let payload = payload_text(agg, seq, payload_bytes);
                seq += producers as u64;
                let insert = sqlx::query(&sql)
                    .bind(event_id)
                    .bind(format!("order-{agg}"))
                    .bind(payload)
                    .bind(TRACEPARENT);
                if let Some(b) = business.as_deref() {
                    let mut tx = conn.begin().await?;
                    sqlx::query(b)
                        .bind(format!("customer-{agg}"))
                        .execute(&mut *tx)
                        .await?;
                    insert.execute(&mut *tx).await?;
                    tx.commit().await?;
                } else {
                    insert.execute(&mut conn).await?;
                }
                out.push(Commit {
                    event_id,
                    at: Instant::now(),
                });
            }
            let _ = conn.close().await;
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

/// The Postgres ceiling: claim 500 due rows, mark them PROCESSED, repeat until none are
/// left — the relay's database work with no broker. Returns (rows, seconds).
pub async fn pg_ceiling(table: &BenchTable, batch: u32) -> Result<(u64, f64)> {
    let store = table.store()?;
    let started = Instant::now();
    let mut done = 0u64;
    let mut after = 0;
    loop {
        // From the last row claimed (nothing below it is pending: the table is preloaded),
        // as the relay's sweep walks the primary key from its cursor.
        let rows = store
            .claim_after(after, None, batch, OnFailed::Block)
            .await?;
        let Some(last) = rows.last() else {
            break;
        };
        after = last.id;
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        done += store.mark_processed(&ids).await?;
    }
    Ok((done, started.elapsed().as_secs_f64()))
}

/// A row as the textbook relay reads it.
#[derive(sqlx::FromRow)]
pub struct NaiveRow {
    pub id: i64,
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: String,
    pub created_at: DateTime<Utc>,
}

/// Publishes one row and waits for its confirm.
pub trait NaivePublisher {
    fn publish_one(
        &mut self,
        row: &NaiveRow,
    ) -> impl std::future::Future<Output = Result<()>> + Send;
}

/// The textbook relay: poll 10 rows in id order, publish one at a time awaiting each
/// confirm, one UPDATE per row, sleep 1 s when idle. Stops when the table is drained.
/// Returns (rows, seconds).
pub async fn naive_relay<P: NaivePublisher>(
    table: &BenchTable,
    publisher: &mut P,
) -> Result<(u64, f64)> {
    let t = table.ident();
    let select = format!(
        "SELECT id, event_id, aggregate_type, aggregate_id, event_type, payload::text AS payload, created_at
         FROM {t} WHERE status = 'PENDING' ORDER BY id LIMIT 10"
    );
    let update = format!("UPDATE {t} SET status = 'PROCESSED', processed_at = now() WHERE id = $1");
    let started = Instant::now();
    let mut done = 0u64;
    loop {
        let rows: Vec<NaiveRow> = sqlx::query_as(&select).fetch_all(&table.pool).await?;
        if rows.is_empty() {
            if table.pending().await? == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        for row in &rows {
            publisher.publish_one(row).await?;
            sqlx::query(&update)
                .bind(row.id)
                .execute(&table.pool)
                .await?;
            done += 1;
        }
    }
    Ok((done, started.elapsed().as_secs_f64()))
}
