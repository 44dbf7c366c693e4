//! Command line of the bench: the sink choice, the phases, and every tunable (`Args`).

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::figures::Kind;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SinkArg {
    Rabbitmq,
    Kafka,
    Nats,
    Redis,
    /// Amazon SQS, against the local emulator (`--sqs-endpoint`).
    Sqs,
    /// Amazon SNS (a topic with an SQS queue subscribed), against the same emulator.
    Sns,
    /// RabbitMQ and Kafka.
    Both,
    /// Every sink above.
    All,
}

/// The sinks `--sink` asks for, each once, in a fixed order.
pub fn kinds(args: &Args) -> Vec<Kind> {
    Kind::ALL
        .into_iter()
        .filter(|k| {
            args.sink.iter().any(|s| match s {
                SinkArg::All => true,
                SinkArg::Both => matches!(k, Kind::Rabbit | Kind::Kafka),
                SinkArg::Rabbitmq => *k == Kind::Rabbit,
                SinkArg::Kafka => *k == Kind::Kafka,
                SinkArg::Nats => *k == Kind::Nats,
                SinkArg::Redis => *k == Kind::Redis,
                SinkArg::Sqs => *k == Kind::Sqs,
                SinkArg::Sns => *k == Kind::Sns,
            })
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Phase {
    /// Raw broker ceiling (bare publisher, no database).
    Ceiling,
    /// Postgres ceiling (claim + mark, no broker).
    Pg,
    /// Preloaded rows drained by the relay.
    Drain,
    /// Commit → arrival latency at a fixed offered rate.
    Latency,
    /// The textbook relay on a smaller preload.
    Naive,
    /// Producer commits/s: bare SPEC table vs the relay's schema (relay absent, relay
    /// draining).
    Producers,
    /// A relay with an empty table: its transactions per second on the database and the
    /// CPU it and its Postgres backends take (`--idle-secs`).
    Idle,
}

#[derive(Parser, Debug)]
#[command(
    name = "outbox-relay-bench",
    about = "Benchmark outbox-relay against the local Postgres, RabbitMQ and Kafka"
)]
pub struct Args {
    /// Sinks to measure (comma separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "both")]
    pub sink: Vec<SinkArg>,
    /// Rows preloaded for the drain and for the ceilings.
    #[arg(long, default_value_t = 200_000)]
    pub rows: u64,
    /// Aggregates the rows are spread over.
    #[arg(long, default_value_t = 1_000)]
    pub aggregates: u32,
    /// Size of each JSON payload as the relay reads it.
    #[arg(long, default_value_t = 500)]
    pub payload_bytes: usize,
    /// Claim batch of the Postgres ceiling, and in-flight window of the broker ceilings
    /// (the relay's default batch_size).
    #[arg(long, default_value_t = 500)]
    pub window: usize,
    /// Offered rate of the latency run (rows/s, one row per producer transaction).
    #[arg(long, default_value_t = 2_000.0)]
    pub latency_rate: f64,
    /// Duration of the latency run.
    #[arg(long, default_value_t = 30.0)]
    pub latency_secs: f64,
    /// Concurrent producer connections (latency and NOTIFY runs).
    #[arg(long, default_value_t = 8)]
    pub producers: usize,
    /// Latency run without NOTIFY wake-ups (`relay.listen = false`; pair with e.g.
    /// `--relay-env OUTBOX_RELAY__RELAY__POLL_INTERVAL=10ms`).
    #[arg(long)]
    pub no_listen: bool,
    /// Rows preloaded for the textbook relay.
    #[arg(long, default_value_t = 10_000)]
    pub naive_rows: u64,
    /// Seconds per producers-phase measurement (producers flat out).
    #[arg(long, default_value_t = 5.0)]
    pub notify_secs: f64,
    /// Rounds of the producers phase (bare / schema / draining alternating).
    #[arg(long, default_value_t = 3)]
    pub notify_rounds: u32,
    /// Seconds the idle phase watches a relay with nothing to do.
    #[arg(long, default_value_t = 30.0)]
    pub idle_secs: f64,
    /// Phases to run (comma separated); all by default.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ceiling,pg,drain,latency,idle,naive,producers"
    )]
    pub phases: Vec<Phase>,
    /// Relay processes draining the preloaded table together (drain phases): each takes
    /// its share of the partitions, so with 2 or more the drain includes a rebalance.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub relays: u32,
    /// Extra relay configuration, `KEY=VALUE` (e.g. OUTBOX_RELAY__RELAY__BATCH_SIZE=1000).
    #[arg(long = "relay-env", value_name = "KEY=VALUE")]
    pub relay_env: Vec<String>,
    /// The relay binary (default: `outbox-relay` next to this binary).
    #[arg(long)]
    pub relay_bin: Option<PathBuf>,
    /// Do not `cargo build --release -p outbox-relay` first (only done under `cargo run`).
    #[arg(long)]
    pub no_build: bool,
    #[arg(
        long,
        env = "BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    pub database_url: String,
    #[arg(
        long,
        env = "BENCH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    #[arg(long, env = "BENCH_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    #[arg(long, env = "BENCH_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    #[arg(
        long,
        env = "BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// The SQS endpoint (an emulator: `scripts/aws-emulator.sh` starts moto there).
    #[arg(
        long,
        env = "BENCH_SQS_ENDPOINT",
        default_value = "http://127.0.0.1:5000"
    )]
    pub sqs_endpoint: String,
    /// Rows of the SQS drain and ceiling (an emulator is far slower than the others).
    #[arg(long, default_value_t = 2_000)]
    pub sqs_rows: u64,
    /// Rows/s offered in the SQS latency phase (the emulator takes a few hundred).
    #[arg(long, default_value_t = 50.0)]
    pub sqs_latency_rate: f64,
}

pub fn has(args: &Args, p: Phase) -> bool {
    args.phases.contains(&p)
}
