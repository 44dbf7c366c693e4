//! NOTIFY phase: producer commits/s with the NOTIFY trigger enabled and disabled.

use anyhow::Result;

use crate::bench::Bench;
use crate::pg;
use crate::report::int;

impl Bench {
    /// Producer commits/s, flat out, with the NOTIFY trigger enabled and disabled
    /// (alternating rounds; a LISTEN connection is open as when a relay runs).
    pub async fn notify_cost(&self) -> Result<(f64, f64)> {
        let t = self.table("notify").await?;
        let channel = t.notify_channel().await?;
        let mut listener = sqlx::postgres::PgListener::connect(&self.args.database_url).await?;
        listener.listen(&channel).await?;
        let drain =
            tokio::spawn(async move { while let Ok(Some(_)) = listener.try_recv().await {} });
        let mut on: Vec<f64> = Vec::new();
        let mut off: Vec<f64> = Vec::new();
        for round in 0..self.args.notify_rounds {
            for enabled in [true, false] {
                t.set_trigger(enabled).await?;
                let commits = pg::produce(
                    &self.args.database_url,
                    &t.name,
                    self.args.producers,
                    None,
                    self.args.notify_secs,
                    self.args.aggregates,
                    self.args.payload_bytes,
                )
                .await?;
                let rate = commits.len() as f64 / self.args.notify_secs;
                eprintln!(
                    "  round {}: trigger {}: {} commits/s",
                    round + 1,
                    if enabled { "on " } else { "off" },
                    int(rate)
                );
                if enabled {
                    on.push(rate)
                } else {
                    off.push(rate)
                }
                sqlx::raw_sql(&format!("TRUNCATE {}", t.ident()))
                    .execute(&self.pool)
                    .await?;
            }
        }
        drain.abort();
        self.drop_table(&t).await;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let (on, off) = (mean(&on), mean(&off));
        println!(
            "postgres: producer commits/s ({} producers, one row per transaction, flat out): NOTIFY trigger on {} / off {} ({:+.1}%)",
            self.args.producers,
            int(on),
            int(off),
            100.0 * (on - off) / off
        );
        Ok((on, off))
    }
}
