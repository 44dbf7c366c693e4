//! Producers phase: what the relay's schema costs the order service. Producer commits/s,
//! flat out, into a bare table with exactly SPEC §1's columns, into the relay's schema
//! with no relay running, and into the relay's schema while a relay drains it — in
//! alternating rounds, so drift hits all three alike.

use anyhow::{anyhow, Result};
use outbox_relay::migrate::{render, MIGRATIONS};
use outbox_relay::table::TableName;

use crate::bench::Bench;
use crate::figures::{Kind, Producers};
use crate::pg;
use crate::report::int;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Bare,
    Schema,
    Draining,
}

impl Bench {
    pub async fn producer_cost(&self) -> Result<Producers> {
        let kind = if self.rabbit.is_some() {
            Kind::Rabbit
        } else if self.kafka.is_some() {
            Kind::Kafka
        } else {
            return Err(anyhow!("no broker for the draining relay"));
        };
        let bare = format!("{}_bare", self.prefix);
        let bare_table = TableName::parse(&bare).map_err(|e| anyhow!("{e}"))?;
        sqlx::raw_sql(&render(MIGRATIONS[0].sql, &bare_table))
            .execute(&self.pool)
            .await?;
        let t = self.table("producers").await?;
        let mut out = Producers::default();
        let mut result = Ok(());
        for round in 0..self.args.notify_rounds {
            for v in [Variant::Bare, Variant::Schema, Variant::Draining] {
                if let Err(e) = self
                    .producer_round(kind, &bare, &t, v, round, &mut out)
                    .await
                {
                    result = Err(e);
                    break;
                }
            }
        }
        let _ = sqlx::raw_sql(&format!("DROP TABLE IF EXISTS \"{bare}\""))
            .execute(&self.pool)
            .await;
        self.drop_table(&t).await;
        result?;
        let (b, s, d) = out.means();
        println!(
            "postgres: producer commits/s ({} producers, one row per transaction, flat out): bare SPEC table {} / relay schema, no relay {} ({:.2}×) / relay schema, relay draining {} ({:.2}×)",
            self.args.producers,
            int(b),
            int(s),
            s / b,
            int(d),
            d / b
        );
        Ok(out)
    }

    async fn producer_round(
        &self,
        kind: Kind,
        bare: &str,
        t: &pg::BenchTable,
        v: Variant,
        round: u32,
        out: &mut Producers,
    ) -> Result<()> {
        let table = if v == Variant::Bare { bare } else { &t.name };
        let relay = if v == Variant::Draining {
            let env = self.relay_env(kind, &t.name, "producers").await?;
            Some(self.spawn_relay(&env, "producers")?)
        } else {
            None
        };
        let commits = pg::produce(
            &self.args.database_url,
            table,
            self.args.producers,
            None,
            self.args.notify_secs,
            self.args.aggregates,
            self.args.payload_bytes,
        )
        .await;
        if let Some(r) = relay {
            r.stop().await;
        }
        let rate = commits?.len() as f64 / self.args.notify_secs;
        let label = match v {
            Variant::Bare => "bare SPEC table     ",
            Variant::Schema => "relay schema        ",
            Variant::Draining => "schema, relay drains",
        };
        eprintln!("  round {}: {label}: {} commits/s", round + 1, int(rate));
        match v {
            Variant::Bare => out.bare.push(rate),
            Variant::Schema => out.schema.push(rate),
            Variant::Draining => out.draining.push(rate),
        }
        sqlx::raw_sql(&format!("TRUNCATE \"{table}\""))
            .execute(&self.pool)
            .await?;
        if let (Some(r), Kind::Rabbit) = (&self.rabbit, kind) {
            r.purge().await?;
        }
        Ok(())
    }
}
