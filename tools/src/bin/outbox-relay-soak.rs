//! `outbox-relay-soak`: a bounded soak of the relay binary under load and faults, with the
//! same ledger as the fault suites. Producers commit rows for `--minutes` (default 3)
//! while the relay (the `outbox-relay` binary next to this one, run as a child process
//! on RabbitMQ) is attacked at random every few seconds: SIGKILL and restart of the
//! relay, `pg_terminate_backend` of its connections, RabbitMQ's memory alarm on for a
//! few seconds. Then everything drains and it prints
//! `committed=… delivered=… failed=… lost=… duplicates=…`; exit 0 only when nothing was
//! lost and every aggregate's first deliveries kept `id` order. The memory watermark is
//! always restored to 0.4, the table, exchange and queue dropped.
//!
//! ```text
//! cargo build --release -p outbox-relay -p outbox-relay-tools --bin outbox-relay \
//!     --bin outbox-relay-soak
//! target/release/outbox-relay-soak --minutes 3
//! ```
//! Env: `TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`),
//! `TEST_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).

use anyhow::Context;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};
use rand::Rng;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection as _, PgPool};
use tokio::process::{Child, Command};

const AGGREGATES: usize = 100;
const PRODUCERS: usize = 4;

fn env_or(k: &str, d: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| d.to_string())
}

fn usage() -> ! {
    eprintln!("usage: outbox-relay-soak [--minutes N]   (N: whole minutes, default 3)");
    std::process::exit(2)
}

/// Restores RabbitMQ's memory watermark, whatever happens.
struct WatermarkOnDrop;
impl Drop for WatermarkOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "set_vm_memory_high_watermark", "0.4"])
            .status();
    }
}

struct Soak {
    pool: PgPool,
    table: String,
    pg_url: String,
    amqp_url: String,
    exchange: String,
    relay_bin: PathBuf,
}

impl Soak {
    fn start_relay(&self) -> anyhow::Result<Child> {
        let log = std::env::temp_dir().join(format!("{}-relay.log", self.table));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("relay log {}", log.display()))?;
        Command::new(&self.relay_bin)
            .arg("run")
            .env("OUTBOX_RELAY__DATABASE__URL", &self.pg_url)
            .env("OUTBOX_RELAY__DATABASE__TABLE", &self.table)
            .env("OUTBOX_RELAY__RABBITMQ__URL", &self.amqp_url)
            .env("OUTBOX_RELAY__RABBITMQ__EXCHANGE", &self.exchange)
            .env("OUTBOX_RELAY__RELAY__POLL_INTERVAL", "200ms")
            .env("OUTBOX_RELAY__RELAY__LEASE_TIMEOUT", "2s")
            .env("OUTBOX_RELAY__RELAY__PUBLISH_TIMEOUT", "2s")
            .env("OUTBOX_RELAY__RELAY__BACKOFF_MAX", "1s")
            .env("OUTBOX_RELAY__HTTP__LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {}", self.relay_bin.display()))
    }

    async fn count(&self, cond: &str) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM \"{}\" WHERE {cond}",
            self.table
        ))
        .fetch_one(&self.pool)
        .await
        .unwrap_or(-1)
    }
}

async fn amqp(url: &str) -> anyhow::Result<Connection> {
    let props = outbox_relay::sink::rabbitmq::connection_properties();
    Ok(Connection::connect(url, props).await?)
}

fn producers(
    pool: &PgPool,
    table: &str,
    stop: &Arc<AtomicBool>,
    commits: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..PRODUCERS)
        .map(|p| {
            let (pool, stop, commits) = (pool.clone(), stop.clone(), commits.clone());
            let sql = format!(
                "INSERT INTO \"{table}\" (aggregate_type, aggregate_id, event_type, payload, headers)
                 VALUES ('order', $1, 'order.updated', $2, '{{}}')"
            );
            tokio::spawn(async move {
                let mine: Vec<usize> = (0..AGGREGATES).filter(|a| a % PRODUCERS == p).collect();
                let mut seq = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    let agg = format!("agg-{}", mine[seq % mine.len()]);
                    let res = sqlx::query(&sql)
                        .bind(&agg)
                        .bind(serde_json::json!({"orderId": agg, "seq": seq}))
                        .execute(&pool)
                        .await;
                    if res.is_ok() {
                        commits.fetch_add(1, Ordering::SeqCst);
                        seq += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(if res.is_ok() { 2 } else { 100 }))
                        .await;
                }
            })
        })
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> anyhow::Result<()> {
    let mut minutes: u64 = 3;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--minutes" => {
                minutes = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            _ => usage(),
        }
    }
    let relay_bin = std::env::current_exe()?
        .parent()
        .map(|d| d.join("outbox-relay"))
        .filter(|p| p.exists())
        .ok_or_else(|| {
            anyhow::anyhow!("outbox-relay binary not found next to this one: cargo build --release -p outbox-relay --bin outbox-relay")
        })?;
    let pg_url = env_or(
        "TEST_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    );
    let amqp_url = env_or("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let tag = format!("soak_{:08x}", rand::random::<u32>());
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&pg_url)
        .await?;
    {
        let mut conn = sqlx::PgConnection::connect(&pg_url).await?;
        let t = outbox_relay::table::TableName::parse(&tag).map_err(|e| anyhow::anyhow!("{e}"))?;
        outbox_relay::migrate::migrate(&mut conn, &t).await?;
    }
    let conn = amqp(&amqp_url).await?;
    let ch = conn.create_channel().await?;
    let queue = format!("{tag}.q");
    let durable = || ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(&tag, ExchangeKind::Topic, durable(), FieldTable::default())
        .await?;
    ch.queue_declare(
        &queue,
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        &queue,
        &tag,
        "#",
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let soak = Soak {
        pool: pool.clone(),
        table: tag.clone(),
        pg_url,
        amqp_url: amqp_url.clone(),
        exchange: tag.clone(),
        relay_bin,
    };
    println!(
        "soak {tag}: {minutes} min of load and faults (relay log: {}/{tag}-relay.log)",
        std::env::temp_dir().display()
    );

    // Consume for the whole run (durable queue: nothing is lost while we reconnect).
    let deliveries = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let consuming = Arc::new(AtomicBool::new(true));
    let consumer = {
        let (deliveries, consuming, url, queue) = (
            deliveries.clone(),
            consuming.clone(),
            amqp_url.clone(),
            queue.clone(),
        );
        tokio::spawn(async move {
            while consuming.load(Ordering::SeqCst) {
                let Ok(conn) = amqp(&url).await else {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                };
                let Ok(ch) = conn.create_channel().await else {
                    continue;
                };
                let _ = ch.basic_qos(2000, BasicQosOptions::default()).await;
                let Ok(mut c) = ch
                    .basic_consume(
                        &queue,
                        "soak",
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                else {
                    continue;
                };
                while consuming.load(Ordering::SeqCst) {
                    match tokio::time::timeout(Duration::from_millis(500), c.next()).await {
                        Ok(Some(Ok(d))) => {
                            let id = d
                                .properties
                                .message_id()
                                .as_ref()
                                .map(|s| s.as_str().to_string())
                                .unwrap_or_default();
                            // Record before acking: a redelivery after a broken
                            // connection is then counted as a duplicate, never a loss.
                            deliveries
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .push(id);
                            let _ = d.ack(BasicAckOptions::default()).await;
                        }
                        Ok(_) => break,
                        Err(_) => {}
                    }
                }
            }
        })
    };

    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let writers = producers(&pool, &tag, &stop, &commits);
    let _watermark = WatermarkOnDrop;
    let mut relay = soak.start_relay()?;
    let started = Instant::now();
    let end = started + Duration::from_secs(minutes * 60);
    let mut faults: HashMap<&'static str, u32> = HashMap::new();
    while Instant::now() < end {
        let wait = Duration::from_millis(rand::thread_rng().gen_range(2_000..8_000));
        tokio::time::sleep(wait.min(end.saturating_duration_since(Instant::now()))).await;
        if Instant::now() >= end {
            break;
        }
        let fault =
            ["sigkill", "pg_terminate_backend", "memory_alarm"][rand::thread_rng().gen_range(0..3)];
        match fault {
            "sigkill" => {
                let _ = relay.kill().await;
                relay = soak.start_relay()?;
            }
            "pg_terminate_backend" => {
                let _ = sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE application_name = 'outbox-relay' AND pid <> pg_backend_pid()",
                )
                .execute(&pool)
                .await;
            }
            _ => {
                let _ = std::process::Command::new("rabbitmqctl")
                    .args(["-q", "set_vm_memory_high_watermark", "0"])
                    .status();
                tokio::time::sleep(Duration::from_secs(3)).await;
                let _ = std::process::Command::new("rabbitmqctl")
                    .args(["-q", "set_vm_memory_high_watermark", "0.4"])
                    .status();
            }
        }
        *faults.entry(fault).or_default() += 1;
        println!(
            "  {:>4}s  {fault:<22} committed so far {:>7}  processed {:>7}",
            started.elapsed().as_secs(),
            commits.load(Ordering::SeqCst),
            soak.count("status = 'PROCESSED'").await
        );
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        let _ = w.await;
    }
    // Drain: the relay settles every row, the consumer reads until the queue is quiet.
    let drain_deadline = Instant::now() + Duration::from_secs(180);
    while soak.count("status = 'PENDING'").await != 0 && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut last = usize::MAX;
    while Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let n = deliveries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len();
        if n == last {
            break;
        }
        last = n;
    }
    consuming.store(false, Ordering::SeqCst);
    let _ = consumer.await;
    let _ = relay.kill().await;

    // The ledger.
    let rows: Vec<(i64, String, String, String)> = sqlx::query_as(&format!(
        "SELECT id, event_id::text, aggregate_type || '/' || aggregate_id, status FROM \"{tag}\" ORDER BY id"
    ))
    .fetch_all(&pool)
    .await?;
    let got = deliveries
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let by_event: HashMap<&str, (i64, &str)> = rows
        .iter()
        .map(|r| (r.1.as_str(), (r.0, r.2.as_str())))
        .collect();
    let mut seen = HashSet::new();
    let mut last_of: HashMap<&str, i64> = HashMap::new();
    let (mut duplicates, mut disorder, mut unknown) = (0usize, 0usize, 0usize);
    for id in &got {
        let Some(&(rid, agg)) = by_event.get(id.as_str()) else {
            unknown += 1;
            continue;
        };
        if !seen.insert(id.as_str()) {
            duplicates += 1;
            continue;
        }
        if last_of.insert(agg, rid).unwrap_or(0) > rid {
            disorder += 1;
        }
    }
    let failed = rows.iter().filter(|r| r.3 == "FAILED").count();
    let pending = rows.iter().filter(|r| r.3 == "PENDING").count();
    let lost = rows
        .iter()
        .filter(|r| r.3 != "FAILED" && !seen.contains(r.1.as_str()))
        .count();
    let mut fl: Vec<_> = faults.into_iter().collect();
    fl.sort();
    println!("faults injected: {fl:?}");
    println!(
        "SOAK {minutes} min: committed={} delivered={} failed={failed} lost={lost} duplicates={duplicates} (pending={pending} out_of_order={disorder} unknown={unknown})",
        rows.len(),
        seen.len()
    );

    let _ = ch.queue_delete(&queue, QueueDeleteOptions::default()).await;
    let _ = ch
        .exchange_delete(&tag, ExchangeDeleteOptions::default())
        .await;
    for sql in outbox_relay::migrate::drop_statements(&tag) {
        let _ = sqlx::query(&sql).execute(&pool).await;
    }
    if lost == 0 && disorder == 0 && unknown == 0 && pending == 0 {
        Ok(())
    } else {
        eprintln!(
            "soak FAILED: lost={lost} out_of_order={disorder} unknown={unknown} pending={pending}"
        );
        std::process::exit(1)
    }
}
