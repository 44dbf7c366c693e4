//! Idle phase: what a relay with nothing to do costs the order service's database — the
//! transactions its sessions run per second (from `pg_stat_database`, so counted by the
//! server, not from the relay's code) and the CPU of its Postgres backends and its own,
//! over `--idle-secs` with an empty table.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::bench::Bench;
use crate::figures::{Idle, Kind};
use crate::procs::{census, CpuSplit};

/// Transactions committed and rolled back in the bench's database so far, as the
/// statistics system has them (each backend reports at most once a second while busy,
/// within 10 s when idle: over a window of tens of seconds that blurs the count by a
/// few transactions per session at each end).
async fn transactions(pool: &sqlx::PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database
         WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?)
}

impl Bench {
    pub async fn idle(&self, kind: Kind) -> Result<Idle> {
        let phase = format!("idle_{}", kind.tag());
        let t = self.table(&phase).await?;
        let env = self.relay_env(kind, &t.name, &phase).await?;
        let mut relay = self.spawn_relay(&env, &phase)?;
        self.wait_leased(&t, &mut relay).await?;
        // Past start-up (connections, migrations check, the first claims).
        tokio::time::sleep(Duration::from_secs(3)).await;
        let before = transactions(&self.pool).await?;
        let a = census();
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(self.args.idle_secs)).await;
        let after = transactions(&self.pool).await?;
        let secs = started.elapsed().as_secs_f64();
        let ours = self.backends(Some(&t)).await;
        let split = CpuSplit::between(&a, &census(), &[relay.pid], &ours, kind.component());
        relay.check_alive()?;
        let usage = relay.stop().await;
        self.drop_table(&t).await;
        // The bench's own reads: the first one's commit is counted in `after`.
        let relay_transactions = (after - before - 1).max(0);
        Ok(Idle {
            secs,
            transactions_per_sec: relay_transactions as f64 / secs,
            usage,
            split,
        })
    }
}
