//! The figures a run collects: per-phase results (`Drain`, `Latency`), per-sink and
//! overall tallies (`SinkFigures`, `Figures`), and the sink under test (`Kind`).

use crate::procs::{CpuSplit, RelayUsage};

#[derive(Debug, Clone, Default)]
pub struct Drain {
    pub rows: u64,
    pub secs: f64,
    pub usage: RelayUsage,
    pub split: CpuSplit,
}

impl Drain {
    pub fn rate(&self) -> f64 {
        self.rows as f64 / self.secs
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

#[derive(Debug, Default)]
pub struct SinkFigures {
    pub skipped: Option<String>,
    pub ceiling: Option<f64>,
    pub ceiling_split: Option<CpuSplit>,
    pub drain: Option<Drain>,
    pub latency: Option<Latency>,
    pub naive: Option<(u64, f64)>,
    pub errors: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Figures {
    pub payload_avg: f64,
    pub pg_ceiling: Option<f64>,
    pub pg_split: Option<CpuSplit>,
    pub notify: Option<(f64, f64)>,
    pub pg_version: String,
    pub load_start: String,
    pub rabbit: Option<SinkFigures>,
    pub kafka: Option<SinkFigures>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Rabbit,
    Kafka,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Rabbit => "rabbitmq",
            Kind::Kafka => "kafka",
        }
    }
    pub fn component(self) -> &'static str {
        self.label()
    }
}
