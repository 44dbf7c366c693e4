//! `outbox-relay check --offline` through the binary, with no service needed: a valid
//! config exits 0 with a summary; each bad key exits 2 naming it, with the message `run`
//! gives; a `*_file` secret that is not there is listed as unchecked, not a failure; no
//! secret value is ever printed; `OUTBOX_RELAY__*` env overrides apply; no connection is
//! attempted (a listener the config points at is never called).

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "check_offline/cases.rs"]
mod cases;
use cases::bad_cases;

/// What one run of the binary left.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
    /// The one-shot command's error line, without its prefix.
    fn error(&self) -> String {
        self.stderr
            .lines()
            .find_map(|l| l.strip_prefix("outbox-relay: error: "))
            .unwrap_or_else(|| panic!("no error line in:\n{}", self.all()))
            .to_string()
    }
}

/// Run the binary with `--config config` and `args`, with no `OUTBOX_RELAY__*` variable
/// of ours but `env`; killed (and the test failed) after 30 s.
fn relay(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    cmd.arg("--config").arg(config).args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("OUTBOX_RELAY__") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "trace").envs(env.iter().copied());
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("outbox-relay {args:?} still running after 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn offline(config: &Path, env: &[(&str, &str)]) -> Outcome {
    relay(config, &["check", "--offline"], env)
}

/// A temporary directory holding secret files and configs.
struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Self {
        Dir(tempfile::tempdir().unwrap())
    }
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
    fn missing(&self, name: &str) -> PathBuf {
        self.0.path().join("not-mounted").join(name)
    }
    /// The deploy ConfigMap's settings, with secret files `database-url` and
    /// `rabbitmq-url` in this directory, changed by `edits` (section, key, TOML value;
    /// an empty value removes the key).
    fn config(&self, edits: &[(&str, &str, &str)]) -> PathBuf {
        let db = self.0.path().join("database-url");
        let mq = self.0.path().join("rabbitmq-url");
        if !db.exists() {
            self.file(
                "database-url",
                "postgres://relay:db-Pw-0@db.example:5432/app\n",
            );
        }
        if !mq.exists() {
            self.file("rabbitmq-url", "amqp://relay:mq-Pw-0@mq.example:5672/%2f\n");
        }
        let mut sections: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let base = [
            ("database", "url_file", quoted(&db)),
            ("database", "table", "\"outbox\"".into()),
            ("database", "max_connections", "4".into()),
            ("relay", "batch_size", "500".into()),
            ("relay", "lease_timeout", "\"30s\"".into()),
            ("relay", "shutdown_timeout", "\"20s\"".into()),
            ("sink", "kind", "\"rabbitmq\"".into()),
            ("rabbitmq", "url_file", quoted(&mq)),
            ("rabbitmq", "exchange", "\"outbox\"".into()),
            ("http", "listen", "\"0.0.0.0:9187\"".into()),
        ];
        for (s, k, v) in base {
            sections
                .entry(s.into())
                .or_default()
                .insert(k.into(), v.clone());
        }
        for (s, k, v) in edits {
            let section = sections.entry(s.to_string()).or_default();
            if v.is_empty() {
                section.remove(*k);
            } else {
                section.insert(k.to_string(), v.to_string());
            }
        }
        let mut text = String::new();
        for (s, kv) in sections {
            text += &format!("[{s}]\n");
            for (k, v) in kv {
                text += &format!("{k} = {v}\n");
            }
        }
        self.file(&format!("config-{}.toml", rand_suffix()), &text)
    }
}

fn quoted(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed).to_string()
}

#[test]
fn valid_config_exits_0_with_a_summary() {
    let dir = Dir::new();
    let out = offline(&dir.config(&[]), &[]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("config: valid"), "{}", out.stdout);
    assert!(
        out.stdout.contains("no connection attempted"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("table outbox, sink rabbitmq (exchange outbox)"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("database.url: from database.url_file")
            && out.stdout.contains("rabbitmq.url: from rabbitmq.url_file"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("unchecked"), "{}", out.stdout);
}

#[test]
fn each_bad_key_exits_2_naming_it() {
    let dir = Dir::new();
    for bad in bad_cases(&dir) {
        let out = offline(&bad.config(&dir), &[]);
        let key = bad.key;
        assert_eq!(out.code, Some(2), "{key}: {}", out.all());
        assert!(out.error().contains(key), "{key}: {}", out.all());
        assert!(out.stdout.is_empty(), "{key}: {}", out.stdout);
    }
}

#[test]
fn the_message_is_the_one_run_gives() {
    let dir = Dir::new();
    for bad in bad_cases(&dir).into_iter().filter(|b| b.at_load) {
        let (key, config) = (bad.key, bad.config(&dir));
        let offline = offline(&config, &[]);
        let run = relay(&config, &["run"], &[]);
        assert_eq!(run.code, Some(2), "{key}: {}", run.all());
        // `run` logs JSON lines (stdout is not a terminal): the last error is the one.
        let error = run
            .stderr
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| panic!("{key}: no error logged by run:\n{}", run.all()));
        assert_eq!(offline.error(), error, "{key}");
    }
}

#[test]
fn missing_secret_files_are_listed_unchecked() {
    let dir = Dir::new();
    let db = dir.missing("database-url");
    let sasl = dir.missing("sasl-password");
    let config = dir.config(&[
        ("database", "url_file", &quoted(&db)),
        ("kafka.properties", "\"sasl.password_file\"", &quoted(&sasl)),
    ]);
    let out = offline(&config, &[]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    for line in [
        format!(
            "database.url: from database.url_file {} (unchecked",
            db.display()
        ),
        format!(
            "kafka.properties.sasl.password: from kafka.properties.sasl.password_file {} (unchecked",
            sasl.display()
        ),
        "rabbitmq.url: from rabbitmq.url_file".to_string(),
        "2 secret file(s) unchecked".to_string(),
    ] {
        assert!(out.stdout.contains(&line), "{line:?} in:\n{}", out.stdout);
    }
    // There, but not readable: a failure naming the key, as for `run`.
    let config = dir.config(&[("database", "url_file", &quoted(dir.0.path()))]);
    let out = offline(&config, &[]);
    assert_eq!(out.code, Some(2), "{}", out.all());
    assert!(out.error().contains("database.url_file"), "{}", out.all());
}

#[test]
fn no_secret_value_is_printed() {
    let dir = Dir::new();
    let (db_pw, mq_pw, sasl_pw, inline_pw) = (
        "Db-Secret-4f1c9",
        "Mq-Secret-8a2e7",
        "Sasl-Secret-3b6d0",
        "Inline-Secret-9c5a2",
    );
    let db = dir.file(
        "db-secret",
        &format!("postgres://relay:{db_pw}@db.example/app?sslpassword={db_pw}"),
    );
    let mq = dir.file("mq-secret", &format!("amqp://relay:{mq_pw}@mq.example/%2f"));
    let sasl = dir.file("sasl-secret", sasl_pw);
    let bad_db = dir.file("bad-db", &format!("mysql://relay:{db_pw}@db.example/app"));
    let bad_db = bad_db.display().to_string();
    let secrets = [
        ("database", "url_file", quoted(&db)),
        ("rabbitmq", "url_file", quoted(&mq)),
        ("kafka.properties", "\"sasl.password_file\"", quoted(&sasl)),
        (
            "kafka.properties",
            "\"ssl.key.password\"",
            format!("\"{inline_pw}\""),
        ),
    ];
    let config = |extra: &[(&'static str, &'static str, &'static str)]| {
        let mut e: Vec<(&str, &str, &str)> =
            secrets.iter().map(|(s, k, v)| (*s, *k, &v[..])).collect();
        e.extend_from_slice(extra);
        dir.config(&e)
    };
    let kafka = ("sink", "kind", "\"kafka\"");
    // (config, env, exit code)
    type Run<'a> = (PathBuf, Vec<(&'a str, &'a str)>, i32);
    let runs: [Run; 5] = [
        (config(&[]), vec![], 0),
        (config(&[kafka]), vec![], 0),
        (config(&[("relay", "batch_size", "0")]), vec![], 2),
        (
            config(&[kafka, ("kafka.properties", "\"no.such\"", "\"1\"")]),
            vec![],
            2,
        ),
        (
            config(&[]),
            vec![("OUTBOX_RELAY__DATABASE__URL_FILE", bad_db.as_str())],
            2,
        ),
    ];
    for (config, env, code) in runs {
        let out = offline(&config, &env);
        assert_eq!(out.code, Some(code), "{}", out.all());
        for s in [db_pw, mq_pw, sasl_pw, inline_pw] {
            assert!(!out.all().contains(s), "{s} printed:\n{}", out.all());
        }
    }
}

#[test]
fn env_overrides_are_applied() {
    let dir = Dir::new();
    let config = dir.config(&[]);
    let missing = dir.missing("database-url");
    let out = offline(
        &config,
        &[
            ("OUTBOX_RELAY__DATABASE__TABLE", "app.events"),
            ("OUTBOX_RELAY__SINK__KIND", "kafka"),
            (
                "OUTBOX_RELAY__DATABASE__URL_FILE",
                &missing.display().to_string(),
            ),
        ],
    );
    assert_eq!(out.code, Some(0), "{}", out.all());
    for want in [
        "env OUTBOX_RELAY__DATABASE__TABLE, OUTBOX_RELAY__DATABASE__URL_FILE, OUTBOX_RELAY__SINK__KIND",
        "table app.events, sink kafka",
        &format!("database.url_file {} (unchecked", missing.display()),
    ] {
        assert!(out.stdout.contains(want), "{want:?} in:\n{}", out.stdout);
    }
    let out = offline(&config, &[("OUTBOX_RELAY__RELAY__BATCH_SIZE", "0")]);
    assert_eq!(out.code, Some(2), "{}", out.all());
    assert!(out.error().contains("relay.batch_size"), "{}", out.all());
    let out = offline(&config, &[("OUTBOX_RELAY__RELAY__LEASE_TIMEOUT", "10s")]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("lease_timeout 10s"), "{}", out.stdout);
}

#[test]
fn no_connection_is_attempted() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = Dir::new();
    for p in [port, closed] {
        let db = dir.file(
            &format!("db-{p}"),
            &format!("postgres://relay:pw@127.0.0.1:{p}/app"),
        );
        let mq = dir.file(
            &format!("mq-{p}"),
            &format!("amqp://relay:pw@127.0.0.1:{p}/%2f"),
        );
        let brokers = format!("\"127.0.0.1:{p}\"");
        let (db, mq) = (quoted(&db), quoted(&mq));
        let base = [
            ("database", "url_file", db.as_str()),
            ("rabbitmq", "url_file", mq.as_str()),
            ("kafka", "brokers", brokers.as_str()),
        ];
        for kind in ["\"rabbitmq\"", "\"kafka\""] {
            let mut edits = base.to_vec();
            edits.push(("sink", "kind", kind));
            let start = Instant::now();
            let out = offline(&dir.config(&edits), &[]);
            assert_eq!(out.code, Some(0), "{kind} port {p}: {}", out.all());
            assert!(start.elapsed() < Duration::from_secs(10), "{kind}: slow");
        }
    }
    listener.set_nonblocking(true).unwrap();
    match listener.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("check --offline connected: {other:?}"),
    }
    // Plain `check` is unchanged: it reaches out, and a closed port is exit 2.
    let db = quoted(&dir.file(
        "db-plain",
        &format!("postgres://relay:pw@127.0.0.1:{closed}/app"),
    ));
    let config = dir.config(&[
        ("database", "url_file", &db),
        ("database", "connect_timeout", "\"2s\""),
    ]);
    let out = relay(&config, &["check"], &[]);
    assert_eq!(out.code, Some(2), "{}", out.all());
}
