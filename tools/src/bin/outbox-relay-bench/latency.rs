//! Latency phase: commit → consumer arrival at a fixed offered rate, with the relay
//! running and producers committing one row per transaction.

use std::time::Instant;

use anyhow::{Context, Result};

use crate::bench::Bench;
use crate::figures::{Kind, Latency};
use crate::floor::{percentiles, waited};
use crate::pg;
use crate::procs::{census, CpuSplit};

impl Bench {
    pub async fn latency(&self, kind: Kind) -> Result<Latency> {
        let phase = format!("lat_{}", kind.tag());
        let t = self.table(&phase).await?;
        let mut env = self.relay_env(kind, &t.name, &phase).await?;
        if self.args.no_listen {
            env.push(("OUTBOX_RELAY__RELAY__LISTEN".into(), "false".into()));
        }
        let (seen, consumer) = match kind {
            Kind::Rabbit => {
                let r = self.rabbit()?;
                r.purge().await?;
                r.arrivals().await?
            }
            Kind::Kafka => {
                let k = self.kafka()?;
                let topic = env
                    .iter()
                    .find(|(k, _)| k == "OUTBOX_RELAY__KAFKA__TOPIC")
                    .map(|(_, v)| v.clone())
                    .context("Kafka relay env has no OUTBOX_RELAY__KAFKA__TOPIC")?;
                let (seen, task) = k.arrivals(&topic).await?;
                k.warm(&topic, &seen).await?;
                (seen, task)
            }
            Kind::Nats => self.nats()?.arrivals(&phase).await?,
            Kind::Redis => self.redis()?.arrivals(&phase).await?,
            Kind::Sqs => self.sqs()?.arrivals(&phase).await?,
            Kind::Sns => self.sns()?.arrivals(&phase).await?,
        };
        let mut relay = self.spawn_relay(&env, &phase)?;
        self.wait_leased(&t, &mut relay).await?;
        let a = census();
        let started = Instant::now();
        let commits = pg::produce(
            &self.args.database_url,
            &pg::Target {
                outbox: &t.name,
                business: None,
            },
            self.args.producers,
            Some(self.rate_for(kind)),
            self.args.latency_secs,
            self.args.aggregates,
            self.args.payload_bytes,
        )
        .await?;
        let produced_secs = started.elapsed().as_secs_f64();
        // Wait for the stragglers (bounded).
        let sent: Vec<_> = commits.iter().map(|c| (c.event_id, c.at)).collect();
        let (lat, missing) = waited(&sent, &seen).await;
        let ours = self.backends(Some(&t)).await;
        eprintln!(
            "  producers ran {produced_secs:.1}s, stragglers waited for {:.1}s",
            started.elapsed().as_secs_f64() - produced_secs
        );
        let split = CpuSplit::between(&a, &census(), &[relay.pid], &ours, kind.component());
        relay.check_alive()?;
        let db_side = t.latency_percentiles().await?;
        let usage = relay.stop().await;
        consumer.abort();
        self.drop_table(&t).await;
        if let (Some(r), Kind::Rabbit) = (&self.rabbit, kind) {
            r.purge().await?;
        }
        let (p50, p99, max) = percentiles(&lat)?;
        Ok(Latency {
            offered: self.rate_for(kind),
            achieved: commits.len() as f64 / produced_secs,
            committed: commits.len(),
            missing,
            p50,
            p99,
            max,
            db_side,
            usage,
            split,
        })
    }
}
