//! The relay as a child process, and what /proc says about it and about the machine:
//! peak RSS (VmHWM), CPU seconds (utime + stime), and CPU per component (Postgres
//! backends, the broker, this bench) so each figure says where the time went.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux almost everywhere).
pub fn clk_tck() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// (comm, utime + stime in seconds) of one process.
fn stat_of(path: &Path) -> Option<(String, f64)> {
    let s = std::fs::read_to_string(path).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    // Fields after ") ": state(3) ... utime(14) stime(15), i.e. index 11 and 12 here.
    let rest: Vec<&str> = s[close + 2..].split_whitespace().collect();
    let ut: f64 = rest.get(11)?.parse().ok()?;
    let st: f64 = rest.get(12)?.parse().ok()?;
    Some((comm, (ut + st) / clk_tck()))
}

pub fn cpu_secs(pid: u32) -> Option<f64> {
    stat_of(Path::new(&format!("/proc/{pid}/stat"))).map(|(_, c)| c)
}

/// Peak resident set size in MiB (VmHWM).
pub fn peak_rss_mb(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU seconds of every process, and the machine's busy seconds, at one instant.
#[derive(Debug, Clone, Default)]
pub struct Census {
    pub at: Option<Instant>,
    pub procs: HashMap<u32, (&'static str, f64)>,
    /// Busy CPU seconds of the whole machine (all cores), from /proc/stat.
    pub machine_busy: f64,
}

fn component(comm: &str) -> &'static str {
    match comm {
        "postgres" => "postgres",
        "beam.smp" | "erl_child_setup" | "inet_gethost" => "rabbitmq",
        c if c.starts_with("tansu") || c.starts_with("kafka") || c == "java" => "kafka",
        "nats-server" => "nats",
        "redis-server" => "redis",
        c if c.starts_with("moto") => "sqs",
        "outbox-relay" => "relay",
        _ => "other",
    }
}

pub fn census() -> Census {
    let mut procs = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((comm, cpu)) = stat_of(&e.path().join("stat")) {
                procs.insert(pid, (component(&comm), cpu));
            }
        }
    }
    let machine_busy = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_string();
            let v: Vec<f64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal
            let total: f64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
            Some((total - idle) / clk_tck())
        })
        .unwrap_or(0.0);
    Census {
        at: Some(Instant::now()),
        procs,
        machine_busy,
    }
}

/// CPU spent between two censuses: by this run's relay process and Postgres backends
/// (exact, per pid), and by all Postgres / broker processes of the machine (which
/// includes other sessions' work when the machine is shared).
#[derive(Debug, Clone, Default)]
pub struct CpuSplit {
    pub wall: f64,
    pub relay: f64,
    /// This run's backends (the relay's connections and the bench's own).
    pub postgres_ours: f64,
    pub postgres_all: f64,
    pub broker: f64,
    pub bench: f64,
    pub machine: f64,
}

impl CpuSplit {
    pub fn between(
        a: &Census,
        b: &Census,
        relays: &[u32],
        ours: &HashSet<u32>,
        broker: &str,
    ) -> Self {
        let delta = |pid: &u32| {
            let after = b.procs.get(pid).map_or(0.0, |x| x.1);
            let before = a.procs.get(pid).map_or(0.0, |x| x.1);
            (after - before).max(0.0)
        };
        let by_comm = |c: &str| -> f64 {
            b.procs
                .iter()
                .filter(|(_, (comm, _))| *comm == c)
                .map(|(pid, _)| delta(pid))
                .sum::<f64>()
                + 0.0
        };
        let wall = match (a.at, b.at) {
            (Some(x), Some(y)) => y.duration_since(x).as_secs_f64(),
            _ => 0.0,
        };
        Self {
            wall,
            relay: relays.iter().map(delta).sum::<f64>() + 0.0,
            postgres_ours: ours.iter().map(delta).sum::<f64>() + 0.0,
            postgres_all: by_comm("postgres"),
            broker: by_comm(broker),
            bench: delta(&std::process::id()),
            machine: (b.machine_busy - a.machine_busy).max(0.0),
        }
    }

    pub fn describe(&self) -> String {
        let pct = |x: f64| {
            if self.wall > 0.0 {
                100.0 * x / self.wall
            } else {
                0.0
            }
        };
        format!(
            "cpu over {:.1}s wall: relay {:.1}s ({:.0}%), postgres backends of this run {:.1}s ({:.0}%), all postgres {:.1}s ({:.0}%), broker {:.1}s ({:.0}%), bench {:.1}s ({:.0}%); machine busy {:.0}% of {} cores",
            self.wall,
            self.relay,
            pct(self.relay),
            self.postgres_ours,
            pct(self.postgres_ours),
            self.postgres_all,
            pct(self.postgres_all),
            self.broker,
            pct(self.broker),
            self.bench,
            pct(self.bench),
            pct(self.machine) / nproc() as f64,
            nproc()
        )
    }
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn nproc() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

pub fn mem_total_gb() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("MemTotal:"))?.to_string();
            l.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0)
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// `target/release/outbox-relay run` as a child, configured by env.
pub struct RelayChild {
    child: Child,
    pub pid: u32,
    log: PathBuf,
}

/// What the relay used, read from /proc just before it was stopped.
#[derive(Debug, Clone, Default)]
pub struct RelayUsage {
    pub peak_rss_mb: f64,
    pub cpu_secs: f64,
}

impl RelayChild {
    pub fn spawn(bin: &Path, env: &[(String, String)], log: PathBuf) -> Result<Self> {
        let file =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {} run", bin.display()))?;
        let pid = child.id().context("relay pid")?;
        Ok(Self { child, pid, log })
    }

    /// Fail with the log's tail if the relay exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the relay exited early ({status}); last log lines:\n{}",
                self.log_tail(20)
            );
        }
        Ok(())
    }

    pub fn log_tail(&self, n: usize) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn usage(&self) -> RelayUsage {
        RelayUsage {
            peak_rss_mb: peak_rss_mb(self.pid).unwrap_or(0.0),
            cpu_secs: cpu_secs(self.pid).unwrap_or(0.0),
        }
    }

    /// Read the usage, then SIGTERM (graceful) and wait; SIGKILL after 20 s.
    pub async fn stop(mut self) -> RelayUsage {
        let usage = self.usage();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
        let _ = std::fs::remove_file(&self.log);
        usage
    }
}
