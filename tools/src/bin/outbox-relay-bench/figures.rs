//! The figures a run collects: per-phase results (`Drain`, `Latency`), per-sink and
//! overall tallies (`SinkFigures`, `Figures`), and the sink under test (`Kind`).

use crate::procs::{CpuSplit, RelayUsage};

#[derive(Debug, Clone, Default)]
pub struct Drain {
    pub rows: u64,
    /// From the relay's spawn to the last row's mark.
    pub secs: f64,
    /// From the relay's spawn to the first row's mark (process start, connections,
    /// leases, the first claim and send).
    pub startup: f64,
    pub usage: RelayUsage,
    pub split: CpuSplit,
    /// WAL written from the relay's start to the end of the drain, per row.
    pub wal_per_row: f64,
    /// Full-page images in that WAL, per row (a checkpoint just before or during the
    /// drain makes the first change of every page write one: ~8 KB each).
    pub fpi_per_row: f64,
    /// Share of the drain's updates of the outbox table that were HOT.
    pub hot_share: Option<f64>,
}

impl Drain {
    pub fn rate(&self) -> f64 {
        self.rows as f64 / self.secs
    }

    /// Rows per second from the first mark to the last (start-up left out).
    pub fn steady_rate(&self) -> f64 {
        self.rows.saturating_sub(1) as f64 / (self.secs - self.startup).max(1e-3)
    }
}

/// Producer commits/s per round, for two shapes of producer transaction: one outbox row
/// alone, and a business row then the outbox row (as issue #11 measures an order service).
#[derive(Debug, Clone, Default)]
pub struct Producers {
    pub outbox_only: ProducerRuns,
    pub with_business_row: ProducerRuns,
}

/// Commits/s per round: bare SPEC table, relay schema (no relay), the same with the order
/// lock switched off (`outboxrelay.order_lock = off`), relay schema with the relay draining.
#[derive(Debug, Clone, Default)]
pub struct ProducerRuns {
    pub bare: Vec<f64>,
    pub schema: Vec<f64>,
    pub unlocked: Vec<f64>,
    pub draining: Vec<f64>,
}

/// `ProducerRuns`' means.
#[derive(Debug, Clone, Copy)]
pub struct ProducerMeans {
    pub bare: f64,
    pub schema: f64,
    pub unlocked: f64,
    pub draining: f64,
}

impl ProducerMeans {
    /// "bare / schema (×) / lock off (×) / draining (×)", each ratio to `bare`.
    pub fn summary(&self) -> String {
        let int = crate::report::int;
        format!(
            "{} / {} ({:.2}×) / {} ({:.2}×) / {} ({:.2}×)",
            int(self.bare),
            int(self.schema),
            self.schema / self.bare,
            int(self.unlocked),
            self.unlocked / self.bare,
            int(self.draining),
            self.draining / self.bare
        )
    }
}

impl ProducerRuns {
    pub fn means(&self) -> ProducerMeans {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        ProducerMeans {
            bare: mean(&self.bare),
            schema: mean(&self.schema),
            unlocked: mean(&self.unlocked),
            draining: mean(&self.draining),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Latency {
    pub offered: f64,
    pub achieved: f64,
    pub committed: usize,
    pub missing: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    /// created_at → processed_at in the database: (p50, p99, max) ms.
    pub db_side: (f64, f64, f64),
    pub usage: RelayUsage,
    pub split: CpuSplit,
}

/// An idle relay (empty table) over `secs`: the transactions its sessions ran per second
/// (as the server counted them) and the CPU it and its backends took.
#[derive(Debug, Clone, Default)]
pub struct Idle {
    pub secs: f64,
    pub transactions_per_sec: f64,
    pub usage: RelayUsage,
    pub split: CpuSplit,
}

#[derive(Debug, Default)]
pub struct SinkFigures {
    pub skipped: Option<String>,
    pub ceiling: Option<f64>,
    pub ceiling_split: Option<CpuSplit>,
    pub drain: Option<Drain>,
    pub latency: Option<Latency>,
    /// The broker's own latency at the same rate (bare publisher → consumer): p50, p99,
    /// max ms.
    pub floor: Option<(f64, f64, f64)>,
    pub naive: Option<(u64, f64)>,
    pub idle: Option<Idle>,
    pub errors: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Figures {
    pub payload_avg: f64,
    pub pg_ceiling: Option<f64>,
    pub pg_split: Option<CpuSplit>,
    pub producers: Option<Producers>,
    pub pg_version: String,
    pub load_start: String,
    /// One entry per sink asked for, in the order they ran.
    pub sinks: Vec<(Kind, SinkFigures)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Rabbit,
    Kafka,
    Nats,
    Redis,
    Sqs,
    Sns,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Rabbit,
        Kind::Kafka,
        Kind::Nats,
        Kind::Redis,
        Kind::Sqs,
        Kind::Sns,
    ];

    /// The `sink.kind` value (and the prefix of the bench's log lines).
    pub fn label(self) -> &'static str {
        match self {
            Kind::Rabbit => "rabbitmq",
            Kind::Kafka => "kafka",
            Kind::Nats => "nats",
            Kind::Redis => "redis",
            Kind::Sqs => "sqs",
            Kind::Sns => "sns",
        }
    }

    /// The column heading of the final table.
    pub fn title(self) -> &'static str {
        match self {
            Kind::Rabbit => "RabbitMQ",
            Kind::Kafka => "Kafka",
            Kind::Nats => "NATS JetStream",
            Kind::Redis => "Redis (stream)",
            Kind::Sqs => "SQS (moto emulator)",
            Kind::Sns => "SNS → SQS (moto emulator)",
        }
    }

    /// The broker's process name, for the CPU split.
    pub fn component(self) -> &'static str {
        match self {
            // Both emulated by the same moto process.
            Kind::Sns => "sqs",
            other => other.label(),
        }
    }

    /// A short tag for the phase's table and target names.
    pub fn tag(self) -> &'static str {
        match self {
            Kind::Rabbit => "r",
            Kind::Kafka => "k",
            Kind::Nats => "n",
            Kind::Redis => "d",
            Kind::Sqs => "q",
            Kind::Sns => "s",
        }
    }
}
