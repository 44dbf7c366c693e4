//! The bench state (`Bench`): the phase sequence per sink, and the shared plumbing the
//! phases use (bench tables, Postgres backends, relay env and child, cleanup).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cli::{has, Args, Phase};
use crate::figures::{Figures, Kind, SinkFigures};
use crate::procs::RelayChild;
use crate::report::int;
use crate::{kafka, nats, pg, rabbit, redis, sns, sqs};

pub struct Bench {
    pub args: Args,
    pub prefix: String,
    pub relay_bin: PathBuf,
    pub pool: sqlx::PgPool,
    pub tables: std::sync::Mutex<Vec<pg::BenchTable>>,
    pub rabbit: Option<rabbit::Rabbit>,
    pub kafka: Option<kafka::Kafka>,
    pub nats: Option<nats::Nats>,
    pub redis: Option<redis::Redis>,
    pub sqs: Option<sqs::Sqs>,
    pub sns: Option<sns::Sns>,
    pub payload: String,
}

impl Bench {
    /// Set up the side of `kind` (its exchange, stream, queue, client); the reason it
    /// cannot be benchmarked otherwise.
    pub async fn connect(&mut self, kind: Kind) -> std::result::Result<(), String> {
        let a = &self.args;
        let why = |e: anyhow::Error| format!("{e:#}");
        match kind {
            Kind::Rabbit => {
                let r = rabbit::Rabbit::setup(&a.amqp_url, &self.prefix).await;
                self.rabbit = Some(r.map_err(why)?);
            }
            Kind::Kafka => {
                crate::kafka_ready(&a.kafka_brokers)?;
                self.kafka = Some(kafka::Kafka::new(&a.kafka_brokers));
            }
            Kind::Nats => {
                let n = nats::Nats::setup(&a.nats_url, &self.prefix).await;
                self.nats = Some(n.map_err(why)?);
            }
            Kind::Redis => {
                let r = redis::Redis::setup(&a.redis_url, &self.prefix).await;
                self.redis = Some(r.map_err(why)?);
            }
            Kind::Sqs => {
                let q = sqs::Sqs::setup(&a.sqs_endpoint, &self.prefix).await;
                self.sqs = Some(q.map_err(why)?);
            }
            Kind::Sns => {
                let t = sns::Sns::setup(&a.sqs_endpoint, &self.prefix).await;
                self.sns = Some(t.map_err(why)?);
            }
        }
        Ok(())
    }

    fn present(&self, kind: Kind) -> bool {
        match kind {
            Kind::Rabbit => self.rabbit.is_some(),
            Kind::Kafka => self.kafka.is_some(),
            Kind::Nats => self.nats.is_some(),
            Kind::Redis => self.redis.is_some(),
            Kind::Sqs => self.sqs.is_some(),
            Kind::Sns => self.sns.is_some(),
        }
    }

    /// The RabbitMQ side; set up before any RabbitMQ phase runs.
    pub fn rabbit(&self) -> Result<&rabbit::Rabbit> {
        self.rabbit
            .as_ref()
            .context("RabbitMQ phase without a RabbitMQ connection")
    }

    /// The Kafka side; set up before any Kafka phase runs.
    pub fn kafka(&self) -> Result<&kafka::Kafka> {
        self.kafka
            .as_ref()
            .context("Kafka phase without a Kafka client")
    }

    pub fn nats(&self) -> Result<&nats::Nats> {
        self.nats
            .as_ref()
            .context("NATS phase without a NATS client")
    }

    pub fn redis(&self) -> Result<&redis::Redis> {
        self.redis
            .as_ref()
            .context("Redis phase without a Redis connection")
    }

    pub fn sqs(&self) -> Result<&sqs::Sqs> {
        self.sqs.as_ref().context("SQS phase without an SQS client")
    }

    pub fn sns(&self) -> Result<&sns::Sns> {
        self.sns.as_ref().context("SNS phase without an SNS client")
    }

    /// Rows of the drain and ceiling of `kind` (the emulated SQS takes fewer).
    pub fn rows_for(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Sqs | Kind::Sns => self.args.sqs_rows,
            _ => self.args.rows,
        }
    }

    /// The aggregate of a bare publisher's message `i` in this run.
    pub fn aggregate(&self, i: u64) -> String {
        crate::window::aggregate(i, self.args.aggregates)
    }

    /// Rows/s offered in the latency phase of `kind`.
    pub fn rate_for(&self, kind: Kind) -> f64 {
        match kind {
            Kind::Sqs | Kind::Sns => self.args.sqs_latency_rate,
            _ => self.args.latency_rate,
        }
    }

    pub async fn all(&self, f: &mut Figures) -> Result<()> {
        if has(&self.args, Phase::Pg) {
            let (rate, split) = self.pg_ceiling().await?;
            f.pg_ceiling = Some(rate);
            f.pg_split = Some(split);
        }
        for kind in Kind::ALL {
            if self.present(kind) {
                let figs = self.sink_phases(kind, f.pg_ceiling).await;
                f.sinks.push((kind, figs));
            }
        }
        if has(&self.args, Phase::Producers) {
            f.producers = Some(self.producer_cost().await?);
        }
        Ok(())
    }

    pub async fn sink_phases(&self, kind: Kind, pg_ceiling: Option<f64>) -> SinkFigures {
        let mut s = SinkFigures::default();
        let k = kind.label();
        if has(&self.args, Phase::Ceiling) {
            match self.broker_ceiling(kind).await {
                Ok((rate, split)) => {
                    println!(
                        "{k}: raw broker ceiling {} msg/s  [{}]",
                        int(rate),
                        split.describe()
                    );
                    s.ceiling = Some(rate);
                    s.ceiling_split = Some(split);
                }
                Err(e) => self.fail(&mut s, "ceiling", e),
            }
        }
        if has(&self.args, Phase::Drain) {
            match self.drain(kind).await {
                Ok(d) => {
                    let vs = |c: Option<f64>, what: &str| {
                        c.map(|c| format!(", {:.0}% of {what}", 100.0 * d.rate() / c))
                            .unwrap_or_default()
                    };
                    println!(
                        "{k}: drain {} rows in {:.2}s = {} rows/s{}{}; first row marked after {:.2}s, from then on {} rows/s; relay peak RSS {:.1} MB, CPU {:.2}s ({:.1} µs/row)  [{}]",
                        d.rows,
                        d.secs,
                        int(d.rate()),
                        vs(s.ceiling, "broker ceiling"),
                        vs(pg_ceiling, "Postgres ceiling"),
                        d.startup,
                        int(d.steady_rate()),
                        d.usage.peak_rss_mb,
                        d.usage.cpu_secs,
                        1e6 * d.usage.cpu_secs / d.rows as f64,
                        d.split.describe()
                    );
                    s.drain = Some(d);
                }
                Err(e) => self.fail(&mut s, "drain", e),
            }
        }
        if has(&self.args, Phase::Ceiling) && has(&self.args, Phase::Drain) {
            // Again after the drain: the ratio uses the better of the two runs.
            match self.broker_ceiling(kind).await {
                Ok((rate, split)) => {
                    println!(
                        "{k}: raw broker ceiling, second run {} msg/s  [{}]",
                        int(rate),
                        split.describe()
                    );
                    if s.ceiling.is_none_or(|c| rate > c) {
                        s.ceiling = Some(rate);
                        s.ceiling_split = Some(split);
                    }
                }
                Err(e) => self.fail(&mut s, "ceiling", e),
            }
        }
        if has(&self.args, Phase::Latency) {
            match self.latency(kind).await {
                Ok(l) => {
                    println!(
                        "{k}: latency at {} rows/s offered ({} achieved, {} rows, {} missing): commit -> consumer p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; created_at -> processed_at p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; relay peak RSS {:.1} MB, CPU {:.2}s  [{}]",
                        int(l.offered),
                        int(l.achieved),
                        l.committed,
                        l.missing,
                        l.p50,
                        l.p99,
                        l.max,
                        l.db_side.0,
                        l.db_side.1,
                        l.db_side.2,
                        l.usage.peak_rss_mb,
                        l.usage.cpu_secs,
                        l.split.describe()
                    );
                    s.latency = Some(l);
                }
                Err(e) => self.fail(&mut s, "latency", e),
            }
            match self.latency_floor(kind).await {
                Ok(Some((p50, p99, max))) => {
                    println!(
                        "{k}: latency floor (bare publisher -> consumer at {} msg/s, no database, no relay): p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms",
                        int(self.rate_for(kind))
                    );
                    s.floor = Some((p50, p99, max));
                }
                Ok(None) => {}
                Err(e) => self.fail(&mut s, "latency floor", e),
            }
        }
        if has(&self.args, Phase::Idle) {
            match self.idle(kind).await {
                Ok(i) => {
                    println!(
                        "{k}: idle relay (empty table) over {:.0}s: {:.1} transactions/s on its database; relay CPU {:.2}s, peak RSS {:.1} MB  [{}]",
                        i.secs,
                        i.transactions_per_sec,
                        i.usage.cpu_secs,
                        i.usage.peak_rss_mb,
                        i.split.describe()
                    );
                    s.idle = Some(i);
                }
                Err(e) => self.fail(&mut s, "idle", e),
            }
        }
        if has(&self.args, Phase::Naive) && matches!(kind, Kind::Rabbit | Kind::Kafka) {
            match self.naive(kind).await {
                Ok((rows, secs)) => {
                    println!(
                        "{k}: textbook relay {rows} rows in {secs:.1}s = {} rows/s",
                        int(rows as f64 / secs)
                    );
                    s.naive = Some((rows, secs));
                }
                Err(e) => self.fail(&mut s, "naive", e),
            }
        }
        s
    }

    pub fn fail(&self, s: &mut SinkFigures, phase: &str, e: anyhow::Error) {
        let msg = format!("{phase}: {e:#}");
        println!("ERROR {msg}");
        s.errors.push(msg);
    }

    pub async fn table(&self, suffix: &str) -> Result<pg::BenchTable> {
        let name = format!("{}_{suffix}", self.prefix);
        let t = pg::BenchTable::create(&self.pool, &name).await?;
        self.tables
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(t.clone());
        Ok(t)
    }

    /// Postgres backends of this run: the relay's connections to `table` (and its
    /// LISTEN connection), or without a table the bench's own.
    pub async fn backends(&self, table: Option<&pg::BenchTable>) -> HashSet<u32> {
        let pids: Vec<i32> = match table {
            Some(t) => {
                let channel = t.notify_channel().await.unwrap_or_default();
                sqlx::query_scalar(
                    "SELECT pid FROM pg_stat_activity
                     WHERE (application_name = 'outbox-relay' AND query LIKE '%' || $1 || '%')
                        OR (query LIKE '%' || $2 || '%' AND application_name <> 'outbox-relay-bench')",
                )
                .bind(&t.name)
                .bind(if channel.is_empty() { "\u{1}".to_string() } else { channel })
                .fetch_all(&self.pool)
                .await
                .unwrap_or_default()
            }
            None => sqlx::query_scalar(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'outbox-relay-bench'",
            )
            .fetch_all(&self.pool)
            .await
            .unwrap_or_default(),
        };
        pids.into_iter().map(|p| p as u32).collect()
    }

    pub async fn drop_table(&self, t: &pg::BenchTable) {
        t.drop().await;
        self.tables
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|x| x.name != t.name);
    }

    pub async fn cleanup(&self) {
        let tables: Vec<pg::BenchTable> = std::mem::take(
            &mut *self
                .tables
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for t in tables {
            t.drop().await;
        }
        if let Some(r) = &self.rabbit {
            r.teardown().await;
        }
        if let Some(k) = &self.kafka {
            k.teardown().await;
        }
        if let Some(n) = &self.nats {
            n.teardown().await;
        }
        if let Some(r) = &self.redis {
            r.teardown().await;
        }
        if let Some(q) = &self.sqs {
            q.teardown().await;
        }
        if let Some(t) = &self.sns {
            t.teardown().await;
        }
    }

    pub async fn preloaded(&self, suffix: &str, rows: u64) -> Result<pg::BenchTable> {
        let t = self.table(suffix).await?;
        // A checkpoint first: the bench's own WAL (preloads, producers) triggers
        // checkpoints, and one starting between a preload and the end of its drain makes
        // the drain's marks write every page again in full (500–930 B of WAL per row
        // instead of ~160–250 B, in several recorded runs). The drain then measures the
        // marks themselves; docs/benchmarks.md says what a checkpoint adds.
        if let Err(e) = sqlx::query("CHECKPOINT").execute(&self.pool).await {
            eprintln!("  (no checkpoint before the preload: {e})");
        }
        let started = Instant::now();
        t.preload(rows, self.args.aggregates, self.args.payload_bytes)
            .await?;
        eprintln!(
            "  preloaded {rows} rows into {} in {:.1}s",
            t.name,
            started.elapsed().as_secs_f64()
        );
        Ok(t)
    }

    /// Relay configuration by env for one phase.
    pub async fn relay_env(
        &self,
        kind: Kind,
        table: &str,
        phase: &str,
    ) -> Result<Vec<(String, String)>> {
        let mut env: Vec<(String, String)> = vec![
            (
                "OUTBOX_RELAY__DATABASE__URL".into(),
                self.args.database_url.clone(),
            ),
            ("OUTBOX_RELAY__DATABASE__TABLE".into(), table.into()),
            ("OUTBOX_RELAY__SINK__KIND".into(), kind.label().into()),
            ("OUTBOX_RELAY__HTTP__LISTEN".into(), "127.0.0.1:0".into()),
            ("RUST_LOG".into(), "warn".into()),
        ];
        match kind {
            Kind::Rabbit => {
                let r = self.rabbit()?;
                env.push((
                    "OUTBOX_RELAY__RABBITMQ__URL".into(),
                    self.args.amqp_url.clone(),
                ));
                env.push((
                    "OUTBOX_RELAY__RABBITMQ__EXCHANGE".into(),
                    r.exchange.clone(),
                ));
            }
            Kind::Kafka => {
                let k = self.kafka()?;
                let topic = k.topic(&format!("{}_{phase}", self.prefix)).await?;
                env.push((
                    "OUTBOX_RELAY__KAFKA__BROKERS".into(),
                    self.args.kafka_brokers.clone(),
                ));
                env.push(("OUTBOX_RELAY__KAFKA__TOPIC".into(), topic));
            }
            Kind::Nats => env.extend(self.nats()?.relay_env(phase).await?),
            Kind::Redis => env.extend(self.redis()?.relay_env(phase)),
            Kind::Sqs => env.extend(self.sqs()?.relay_env(phase).await?),
            Kind::Sns => env.extend(self.sns()?.relay_env(phase).await?),
        }
        for kv in &self.args.relay_env {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--relay-env {kv:?}: expected KEY=VALUE"))?;
            env.push((k.into(), v.into()));
        }
        Ok(env)
    }

    pub fn spawn_relay(&self, env: &[(String, String)], phase: &str) -> Result<RelayChild> {
        let log = std::env::temp_dir().join(format!("{}-{phase}-relay.log", self.prefix));
        RelayChild::spawn(&self.relay_bin, env, log)
    }

    /// Wait (at most 30 s) until `relay` holds every partition of `t`, then 1 s more.
    pub async fn wait_leased(&self, t: &pg::BenchTable, relay: &mut RelayChild) -> Result<()> {
        let ready_by = Instant::now() + Duration::from_secs(30);
        while t.leased().await? < outbox_relay::store::PARTITIONS as i64 {
            relay.check_alive()?;
            if Instant::now() > ready_by {
                bail!(
                    "the relay did not take its leases within 30 s:\n{}",
                    relay.log_tail(10)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(())
    }
}
