//! `outbox-relay-bench`: how fast outbox-relay moves rows from Postgres to each broker,
//! where the time goes, and how that compares with the ceilings of the same machine and
//! with the textbook relay. Not a test: a harness that prints figures.
//!
//! ```text
//! cargo run --release -p outbox-relay-tools --bin outbox-relay-bench -- \
//!     [--sink rabbitmq,kafka,nats,redis,sqs,sns|both|all] [--rows 200000]
//! ```
//!
//! Every phase works on its own uniquely named table / queue / topic, dropped afterwards.
//! The relay under test is the release binary (`target/release/outbox-relay run`) as a
//! child process configured by env, so its RSS and CPU are its own.

mod bench;
mod ceilings;
mod cli;
mod drain;
mod figures;
mod floor;
mod idle;
mod kafka;
mod latency;
mod nats;
mod pg;
mod procs;
mod producers;
mod rabbit;
mod redis;
mod report;
mod sns;
mod sqs;
mod window;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bench::Bench;
use clap::Parser;
use cli::Args;
use figures::{Figures, Kind, SinkFigures};
use report::print_table;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outbox-relay-bench: tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outbox-relay-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let relay_bin = relay_binary(&args)?;
    let prefix = format!("bench_{:08x}", rand::random::<u32>());
    let pool = pg::pool(&args.database_url, 12).await?;
    let payload = pg::rendered_payload(&pool, args.payload_bytes).await?;
    let pg_version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await?;
    let load = procs::load_average();
    if load
        .split_whitespace()
        .next()
        .and_then(|l| l.parse::<f64>().ok())
        .unwrap_or(0.0)
        > procs::nproc() as f64
    {
        println!("WARNING: load average {load} exceeds the {} cores: other work is running, figures will be noisy", procs::nproc());
    }
    println!(
        "outbox-relay-bench: prefix {prefix}, relay {}, {} rows, {} aggregates, {}-byte payloads, Postgres {pg_version}",
        relay_bin.display(),
        args.rows,
        args.aggregates,
        payload.len()
    );

    let mut figures = Figures {
        payload_avg: payload.len() as f64,
        pg_version,
        load_start: procs::load_average(),
        ..Default::default()
    };
    let mut bench = Bench {
        args,
        prefix,
        relay_bin,
        pool,
        tables: Default::default(),
        rabbit: None,
        kafka: None,
        nats: None,
        redis: None,
        sqs: None,
        sns: None,
        payload,
    };
    let mut skipped = Vec::new();
    for kind in cli::kinds(&bench.args) {
        if let Err(why) = bench.connect(kind).await {
            println!("{}: skipped ({why})", kind.label());
            skipped.push((kind, why));
        }
    }

    let outcome = tokio::select! {
        r = bench.all(&mut figures) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    bench.cleanup().await;
    for (kind, why) in skipped {
        let figs = SinkFigures {
            skipped: Some(why),
            ..Default::default()
        };
        figures.sinks.push((kind, figs));
    }
    figures
        .sinks
        .sort_by_key(|(k, _)| Kind::ALL.iter().position(|x| x == k));
    outcome?;
    print_table(&bench.args, &figures);
    Ok(())
}

/// Kafka is benchmarked when a broker answers and the sink is built in.
pub fn kafka_ready(brokers: &str) -> std::result::Result<(), String> {
    kafka::reachable(brokers).map_err(|e| format!("no Kafka broker: {e}"))?;
    let cfg = kafka::config(brokers, "bench").map_err(|e| e.to_string())?;
    outbox_relay::sink::kafka::KafkaSink::new(&cfg, Duration::from_secs(10))
        .map(|_| ())
        .map_err(|e| format!("Kafka sink not ready: {e}"))
}

/// The relay binary under test; under `cargo run` it is rebuilt first so it matches
/// the source tree.
fn relay_binary(args: &Args) -> Result<PathBuf> {
    let bin = match &args.relay_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .join("outbox-relay"),
    };
    if args.relay_bin.is_none() && !args.no_build {
        if let Ok(cargo) = std::env::var("CARGO") {
            eprintln!(
                "building the relay: cargo build --release -p outbox-relay --bin outbox-relay"
            );
            let ok = std::process::Command::new(cargo)
                .args([
                    "build",
                    "--release",
                    "-p",
                    "outbox-relay",
                    "--bin",
                    "outbox-relay",
                ])
                .stdout(std::process::Stdio::null())
                .status()?
                .success();
            if !ok {
                bail!("cargo build --release -p outbox-relay --bin outbox-relay failed");
            }
        }
    }
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release -p outbox-relay --bin outbox-relay` first",
            bin.display()
        );
    }
    Ok(bin)
}
