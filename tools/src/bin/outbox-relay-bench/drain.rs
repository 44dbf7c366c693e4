//! Drain phases: preloaded rows drained by the relay under test, and by the textbook
//! relay for comparison.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::Bench;
use crate::figures::{Drain, Kind};
use crate::pg;
use crate::procs::{census, CpuSplit, RelayChild, RelayUsage};

impl Bench {
    pub async fn drain(&self, kind: Kind) -> Result<Drain> {
        let phase = format!("drain_{}", kind.tag());
        let rows = self.rows_for(kind);
        let t = self.preloaded(&phase, rows).await?;
        if let Some(r) = &self.rabbit {
            if kind == Kind::Rabbit {
                r.purge().await?;
            }
        }
        let env = self.relay_env(kind, &t.name, &phase).await?;
        match kind {
            Kind::Sqs => self.sqs()?.consume(&phase).await?,
            Kind::Sns => self.sns()?.consume(&phase).await?,
            _ => {}
        }
        let a = census();
        let (lsn0, upd0) = (pg::wal_lsn(&self.pool).await?, t.updates().await?);
        let fpi0 = pg::wal_fpi(&self.pool).await?;
        let t0 = pg::db_now(&self.pool).await?;
        let mut relays = Vec::new();
        for i in 0..self.args.relays {
            let name = if i == 0 {
                phase.clone()
            } else {
                format!("{phase}-{i}")
            };
            relays.push(self.spawn_relay(&env, &name)?);
        }
        let started = Instant::now();
        let limit = Duration::from_secs(600);
        let mut last_report = Instant::now();
        let mut from = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            for relay in &mut relays {
                relay.check_alive()?;
            }
            if !t.any_pending(&mut from).await? {
                break;
            }
            if last_report.elapsed() > Duration::from_secs(5) {
                let pending = t.pending().await?;
                eprintln!(
                    "  {pending} rows pending after {:.0}s",
                    started.elapsed().as_secs_f64()
                );
                last_report = Instant::now();
            }
            if started.elapsed() > limit {
                let tail: Vec<String> = relays.iter().map(|r| r.log_tail(10)).collect();
                stop_all(relays).await;
                let tail = tail.join("\n--\n");
                let pending = t.pending().await?;
                bail!("{pending} rows still pending after {limit:?}; relay log:\n{tail}");
            }
        }
        let ours = self.backends(Some(&t)).await;
        let pids: Vec<u32> = relays.iter().map(|r| r.pid).collect();
        let split = CpuSplit::between(&a, &census(), &pids, &ours, kind.component());
        let usage = stop_all(relays).await;
        let wal = pg::wal_since(&self.pool, &lsn0).await?;
        let (first, end) = t.processed_span().await?.context("no processed_at")?;
        let processed = t.count_status("PROCESSED").await? as u64;
        let hot_share = t.hot_share_since(upd0, processed).await?;
        // Read after the statistics settled (hot_share_since waits for them).
        let fpi = pg::wal_fpi(&self.pool).await? - fpi0;
        let failed = t.count_status("FAILED").await?;
        if failed > 0 || processed != rows {
            bail!("drain ended with {processed} PROCESSED and {failed} FAILED of {rows} rows");
        }
        self.drop_table(&t).await;
        // Every PROCESSED row must be at the broker (at least once).
        if let Some(there) = self.delivered(kind, &phase).await? {
            if there < processed {
                bail!("only {there} messages at the broker for {processed} PROCESSED rows");
            }
        }
        let secs = (end - t0).to_std().unwrap_or_default().as_secs_f64();
        let startup = (first - t0).to_std().unwrap_or_default().as_secs_f64();
        Ok(Drain {
            rows: processed,
            secs,
            startup,
            usage,
            split,
            wal_per_row: wal / processed.max(1) as f64,
            fpi_per_row: fpi as f64 / processed.max(1) as f64,
            hot_share,
        })
    }

    /// How many messages the broker holds for `phase` (emptied afterwards), where the
    /// bench can count them.
    async fn delivered(&self, kind: Kind, phase: &str) -> Result<Option<u64>> {
        Ok(match kind {
            Kind::Rabbit => {
                let r = self.rabbit()?;
                let depth = r.depth().await?;
                r.purge().await?;
                Some(u64::from(depth))
            }
            Kind::Kafka => None,
            Kind::Nats => Some(self.nats()?.count(phase).await?),
            Kind::Redis => Some(self.redis()?.count(phase).await?),
            Kind::Sqs => Some(self.sqs()?.delivered(phase).await?),
            Kind::Sns => Some(self.sns()?.delivered(phase).await?),
        })
    }

    pub async fn naive(&self, kind: Kind) -> Result<(u64, f64)> {
        let phase = format!("naive_{}", kind.tag());
        let t = self.preloaded(&phase, self.args.naive_rows).await?;
        let out = match kind {
            Kind::Rabbit => {
                let r = self.rabbit()?;
                r.purge().await?;
                let mut p = r.publisher().await?;
                let out = pg::naive_relay(&t, &mut p).await?;
                r.purge().await?;
                out
            }
            Kind::Kafka => {
                let k = self.kafka()?;
                let topic = k.topic(&format!("{}_{phase}", self.prefix)).await?;
                let mut p = k.publisher(&topic)?;
                pg::naive_relay(&t, &mut p).await?
            }
            other => bail!("no textbook relay for {}", other.label()),
        };
        self.drop_table(&t).await;
        Ok(out)
    }
}

/// Stop every relay of a drain: their CPU summed, the highest peak RSS.
async fn stop_all(relays: Vec<RelayChild>) -> RelayUsage {
    let mut total = RelayUsage::default();
    for relay in relays {
        let u = relay.stop().await;
        total.cpu_secs += u.cpu_secs;
        total.peak_rss_mb = total.peak_rss_mb.max(u.peak_rss_mb);
    }
    total
}
