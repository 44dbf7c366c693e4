//! Ceiling phases: Postgres alone (claim + mark, no broker) and each broker alone
//! (bare publisher, no database).

use anyhow::Result;

use crate::bench::Bench;
use crate::figures::Kind;
use crate::pg;
use crate::procs::{census, CpuSplit};
use crate::report::int;
use crate::window::Load;

impl Bench {
    pub async fn pg_ceiling(&self) -> Result<(f64, CpuSplit)> {
        let t = self.preloaded("pgc", self.args.rows).await?;
        let a = census();
        let (rows, secs) = pg::pg_ceiling(&t, self.args.window as u32).await?;
        let ours = self.backends(None).await;
        let split = CpuSplit::between(&a, &census(), &[], &ours, "none");
        self.drop_table(&t).await;
        let rate = rows as f64 / secs;
        println!(
            "postgres: ceiling (claim + mark, {}-row batches, no broker) {rows} rows in {secs:.2}s = {} rows/s  [{}]",
            self.args.window,
            int(rate),
            split.describe()
        );
        Ok((rate, split))
    }

    pub async fn broker_ceiling(&self, kind: Kind) -> Result<(f64, CpuSplit)> {
        let load = Load {
            n: self.rows_for(kind),
            payload: &self.payload,
            aggregates: self.args.aggregates,
            window: self.args.window,
        };
        let a = census();
        let secs = match kind {
            Kind::Rabbit => {
                let r = self.rabbit()?;
                r.purge().await?;
                let a2 = census();
                let secs = r.ceiling(&load).await?;
                let split =
                    CpuSplit::between(&a2, &census(), &[], &Default::default(), kind.component());
                r.purge().await?;
                return Ok((load.n as f64 / secs, split));
            }
            Kind::Kafka => {
                let k = self.kafka()?;
                let topic = k.topic(&format!("{}_ceiling", self.prefix)).await?;
                k.ceiling(&topic, &load).await?
            }
            Kind::Nats => self.nats()?.ceiling(&load).await?,
            Kind::Redis => self.redis()?.ceiling(&load).await?,
            Kind::Sqs => self.sqs()?.ceiling(&load).await?,
            Kind::Sns => self.sns()?.ceiling(&load).await?,
        };
        let split = CpuSplit::between(&a, &census(), &[], &Default::default(), kind.component());
        Ok((load.n as f64 / secs, split))
    }
}
