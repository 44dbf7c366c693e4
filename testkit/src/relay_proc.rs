//! The relay binary as a child process (`RelayProc`): where the binary is, the env a test
//! relay runs with, its HTTP port and metrics, and one-shot runs of a subcommand.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::db::TestTable;
use crate::wait::wait_for;
use crate::{amqp_url, pg_url, unique};

/// The relay binary as a child process with its own env.
pub struct RelayProc {
    pub child: Child,
    /// The HTTP port the relay bound (`http.listen` port 0), once its log said so.
    port: OnceLock<u16>,
    pub log: PathBuf,
}

/// The `outbox-relay` binary the tests run. `env!("CARGO_BIN_EXE_outbox-relay")` exists
/// only inside the product's own test targets, so a library finds it at run time:
/// `OUTBOX_RELAY_BIN` if set, else `NEXTEST_BIN_EXE_outbox-relay` (set by nextest), else
/// next to the test binary's `deps/` folder (`target/<profile>/outbox-relay`), where cargo
/// builds it before it runs a package's integration tests.
pub fn bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        let path = ["OUTBOX_RELAY_BIN", "NEXTEST_BIN_EXE_outbox-relay"]
            .iter()
            .find_map(|k| std::env::var_os(k).map(PathBuf::from))
            .unwrap_or_else(|| {
                let exe = std::env::current_exe().expect("current test binary");
                let profile_dir = exe
                    .parent()
                    .and_then(|deps| deps.parent())
                    .expect("test binary under target/<profile>/deps");
                profile_dir.join(format!("outbox-relay{}", std::env::consts::EXE_SUFFIX))
            });
        assert!(
            path.is_file(),
            "no outbox-relay binary at {} (build it, or set OUTBOX_RELAY_BIN)",
            path.display()
        );
        path.to_string_lossy().into_owned()
    })
}

/// Env for a relay on `table` publishing to `exchange`, with fast test timings.
pub fn relay_env(table: &str, exchange: &str) -> Vec<(String, String)> {
    [
        ("OUTBOX_RELAY__DATABASE__URL", pg_url()),
        ("OUTBOX_RELAY__DATABASE__TABLE", table.to_string()),
        ("OUTBOX_RELAY__RABBITMQ__URL", amqp_url()),
        ("OUTBOX_RELAY__RABBITMQ__EXCHANGE", exchange.to_string()),
        ("OUTBOX_RELAY__RELAY__POLL_INTERVAL", "100ms".into()),
        ("OUTBOX_RELAY__RELAY__BACKOFF_INITIAL", "50ms".into()),
        ("OUTBOX_RELAY__RELAY__BACKOFF_MAX", "200ms".into()),
        ("OUTBOX_RELAY__RELAY__MAX_ATTEMPTS", "3".into()),
        ("OUTBOX_RELAY__RELAY__LEASE_TIMEOUT", "4s".into()),
        ("OUTBOX_RELAY__RELAY__SHUTDOWN_TIMEOUT", "5s".into()),
        ("OUTBOX_RELAY__RELAY__PUBLISH_TIMEOUT", "3s".into()),
        ("RUST_LOG", "info".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Relay env for a fault test: fast timings plus `extra` overrides (last one wins).
pub fn fault_env(table: &str, exchange: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = relay_env(table, exchange);
    for (k, v) in extra {
        env.push((k.to_string(), v.to_string()));
    }
    env
}

/// Relay env for the Kafka sink at `brokers`, default topic `topic`, with `properties`
/// passed through a TOML file (property names hold dots). Returns (env, config file).
pub fn kafka_env(
    table: &str,
    brokers: &str,
    topic: &str,
    properties: &[(&str, &str)],
    extra: &[(&str, &str)],
) -> (Vec<(String, String)>, tempfile::NamedTempFile) {
    let mut env = fault_env(table, "unused", extra);
    env.push(("OUTBOX_RELAY__SINK__KIND".into(), "kafka".into()));
    env.push(("OUTBOX_RELAY__KAFKA__BROKERS".into(), brokers.into()));
    env.push(("OUTBOX_RELAY__KAFKA__TOPIC".into(), topic.into()));
    let mut toml = String::from("[kafka.properties]\n");
    for (k, v) in properties {
        toml.push_str(&format!("{k:?} = {v:?}\n"));
    }
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), toml).unwrap();
    (env, file)
}

impl RelayProc {
    pub fn start(env: &[(String, String)]) -> Self {
        Self::start_cmd(env, &["run"])
    }

    pub fn start_cmd(env: &[(String, String)], args: &[&str]) -> Self {
        let log = std::env::temp_dir().join(format!("{}.log", unique("relay")));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin())
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("OUTBOX_RELAY__HTTP__LISTEN", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn relay");
        Self {
            child,
            port: OnceLock::new(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// When `/readyz` first answered 200 (waits up to 30 s).
    pub async fn ready(&self) -> std::time::Instant {
        wait_for(Duration::from_secs(30), "relay /readyz 200", || async {
            (self.get("/readyz").await?.0 == 200).then(std::time::Instant::now)
        })
        .await
    }

    /// SIGTERM, then wait for the exit (SIGKILL if it takes longer than 15 s).
    pub async fn terminate(&mut self) {
        self.signal("TERM");
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The port the relay's HTTP server listens on, from its log line
    /// `http listening on 127.0.0.1:<port>` (`None` until it has bound one).
    pub fn http_port(&self) -> Option<u16> {
        if let Some(p) = self.port.get() {
            return Some(*p);
        }
        let logs = self.logs();
        let (_, rest) = logs.split_once("http listening on 127.0.0.1:")?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let port = digits.parse().ok()?;
        Some(*self.port.get_or_init(|| port))
    }

    /// GET a path on the relay's HTTP port: (status, body); `None` before it listens.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.http_port()?, path).await
    }

    /// The value of an unlabelled metric, if present.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        Some(self.metrics([name]).await?[0])
    }

    /// The values of unlabelled metrics from one scrape (`None` unless all are present).
    pub async fn metrics<const N: usize>(&self, names: [&str; N]) -> Option<[f64; N]> {
        let (_, body) = self.get("/metrics").await?;
        let mut out = [0.0; N];
        for (v, name) in out.iter_mut().zip(names) {
            *v = body
                .lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())?;
        }
        Some(out)
    }
}

/// Minimal HTTP/1.1 GET over a TCP stream (keeps the test deps small).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// Run the binary to completion: (exit code, stdout, stderr).
pub async fn run_cmd(env: &[(String, String)], args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("OUTBOX_RELAY__HTTP__LISTEN", "127.0.0.1:0")
        .output()
        .await
        .expect("run outbox-relay");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Poll a relay metric until `pred` holds for it.
pub async fn wait_metric(
    relay: &RelayProc,
    name: &str,
    within: Duration,
    pred: impl Fn(f64) -> bool,
) {
    let what = format!("metric {name}");
    wait_for(within, &what, || async {
        relay.metric(name).await.filter(|v| pred(*v)).map(|_| ())
    })
    .await
}

/// Wait until the relay reports its broker up (`true`) or down (`false`) in
/// `outbox_relay_broker_up`.
pub async fn wait_broker_up(relay: &RelayProc, up: bool, within: Duration) {
    let want = if up { 1.0 } else { 0.0 };
    wait_metric(relay, "outbox_relay_broker_up", within, |v| v == want).await
}

/// Riding out a broker outage: the relay reports the broker down (within `within`),
/// stays ready (a sidecar's readiness never follows the broker) and live, and no row has
/// spent an attempt on it.
pub async fn assert_outage_ridden_out(relay: &RelayProc, table: &TestTable, within: Duration) {
    wait_broker_up(relay, false, within).await;
    assert_eq!(
        relay.get("/readyz").await.map(|r| r.0),
        Some(200),
        "readiness does not follow the broker"
    );
    assert_eq!(
        relay.get("/livez").await.map(|r| r.0),
        Some(200),
        "alive while waiting for the broker"
    );
    table
        .assert_no_attempts("an outage spends no attempts")
        .await;
}

/// The SIGKILL attack: start the relay binary with `env` `runs` times, each killed with
/// SIGKILL after a random lifetime in `life_ms` (wherever it happens to be); returns
/// (lifetime ms, PROCESSED rows of `table` after the kill) per run, and asserts the last
/// run found work done.
pub async fn kill_repeatedly(
    env: &[(String, String)],
    table: &TestTable,
    runs: usize,
    life_ms: std::ops::RangeInclusive<u64>,
) -> Vec<(u64, i64)> {
    use rand::Rng;
    let mut progress = Vec::new();
    for run in 0..runs {
        let life = rand::thread_rng().gen_range(life_ms.clone());
        let mut relay = RelayProc::start(env);
        // The attack's schedule: the kill lands wherever the relay happens to be.
        tokio::time::sleep(Duration::from_millis(life)).await;
        relay.signal("KILL");
        let status = relay.child.wait().await.expect("wait for the killed relay");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "run {run} was SIGKILLed"
        );
        progress.push((life, table.count("PROCESSED").await));
    }
    assert!(
        progress.last().map_or(0, |p| p.1) > 0,
        "the killed runs got work done: {progress:?}"
    );
    progress
}
