//! Producers phase: what the relay's schema costs the order service. Producer commits/s,
//! flat out, into a bare table with exactly SPEC §1's columns, into the relay's schema
//! with no relay running (order lock on, then switched off), and into the relay's schema
//! while a relay drains it — in alternating rounds, so drift hits all of them alike; for a transaction of one outbox row
//! and for one of a business row then the outbox row.

use anyhow::{anyhow, Result};
use outbox_relay::migrate::{render, MIGRATIONS};
use outbox_relay::table::TableName;

use crate::bench::Bench;
use crate::figures::{Kind, ProducerRuns, Producers};
use crate::pg;
use crate::report::int;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Bare,
    Schema,
    /// The relay's schema with `outboxrelay.order_lock = off` (producers that lock the
    /// aggregate themselves).
    Unlocked,
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
        let orders = format!("{}_orders", self.prefix);
        let bare_table = TableName::parse(&bare).map_err(|e| anyhow!("{e}"))?;
        sqlx::raw_sql(&render(MIGRATIONS[0].sql, &bare_table))
            .execute(&self.pool)
            .await?;
        pg::business_table(&self.pool, &orders).await?;
        let t = self.table("producers").await?;
        let mut out = Producers::default();
        let mut result = Ok(());
        'rounds: for round in 0..self.args.notify_rounds {
            for business in [None, Some(orders.as_str())] {
                for v in [
                    Variant::Bare,
                    Variant::Schema,
                    Variant::Unlocked,
                    Variant::Draining,
                ] {
                    let runs = if business.is_some() {
                        &mut out.with_business_row
                    } else {
                        &mut out.outbox_only
                    };
                    let round = Round {
                        kind,
                        bare: &bare,
                        business,
                        v,
                        round,
                    };
                    if let Err(e) = self.producer_round(&round, &t, runs).await {
                        result = Err(e);
                        break 'rounds;
                    }
                }
            }
        }
        for table in [&bare, &orders] {
            let _ = sqlx::raw_sql(&format!("DROP TABLE IF EXISTS \"{table}\""))
                .execute(&self.pool)
                .await;
        }
        self.drop_table(&t).await;
        result?;
        for (shape, runs) in [
            ("one outbox row", &out.outbox_only),
            ("a business row + an outbox row", &out.with_business_row),
        ] {
            println!(
                "postgres: producer commits/s ({} producers, {shape} per transaction, flat out): bare SPEC table / relay schema, no relay / the same, order lock off / relay schema, relay draining: {}",
                self.args.producers,
                runs.means().summary()
            );
        }
        Ok(out)
    }

    async fn producer_round(
        &self,
        r: &Round<'_>,
        t: &pg::BenchTable,
        out: &mut ProducerRuns,
    ) -> Result<()> {
        let table = if r.v == Variant::Bare {
            r.bare
        } else {
            &t.name
        };
        let relay = if r.v == Variant::Draining {
            let env = self.relay_env(r.kind, &t.name, "producers").await?;
            Some(self.spawn_relay(&env, "producers")?)
        } else {
            None
        };
        let url = if r.v == Variant::Unlocked {
            with_setting(&self.args.database_url, "outboxrelay.order_lock", "off")
        } else {
            self.args.database_url.clone()
        };
        let commits = pg::produce(
            &url,
            &pg::Target {
                outbox: table,
                business: r.business,
            },
            self.args.producers,
            None,
            self.args.notify_secs,
            self.args.aggregates,
            self.args.payload_bytes,
        )
        .await;
        if let Some(relay) = relay {
            relay.stop().await;
        }
        let rate = commits?.len() as f64 / self.args.notify_secs;
        let label = match r.v {
            Variant::Bare => "bare SPEC table     ",
            Variant::Schema => "relay schema        ",
            Variant::Unlocked => "schema, lock off    ",
            Variant::Draining => "schema, relay drains",
        };
        let shape = if r.business.is_some() {
            "business + outbox"
        } else {
            "outbox only      "
        };
        eprintln!(
            "  round {}: {shape}: {label}: {} commits/s",
            r.round + 1,
            int(rate)
        );
        match r.v {
            Variant::Bare => out.bare.push(rate),
            Variant::Schema => out.schema.push(rate),
            Variant::Unlocked => out.unlocked.push(rate),
            Variant::Draining => out.draining.push(rate),
        }
        let mut truncate = format!("TRUNCATE \"{table}\"");
        if let Some(b) = r.business {
            truncate += &format!(", \"{b}\"");
        }
        sqlx::raw_sql(&truncate).execute(&self.pool).await?;
        if let (Some(rabbit), Kind::Rabbit) = (&self.rabbit, r.kind) {
            rabbit.purge().await?;
        }
        Ok(())
    }
}

/// One measurement of the producers phase.
struct Round<'a> {
    kind: Kind,
    bare: &'a str,
    business: Option<&'a str>,
    v: Variant,
    round: u32,
}

/// `url` with a server setting for its sessions (libpq's `options`, as sqlx reads it).
fn with_setting(url: &str, name: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20{name}%3D{value}")
}
