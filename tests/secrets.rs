//! Secrets and output hygiene (issue #12), against the real Postgres and RabbitMQ and the
//! relay binary: a RabbitMQ user and a Postgres role created for the test with unique
//! passwords (the Postgres one in the `?password=` query form) never show up in anything
//! the relay prints at `RUST_LOG=trace` — daemon or one-shot command, success or error;
//! nor do Kafka SASL secrets (one read from a `*_file`) with librdkafka's `debug=all`;
//! healthy one-shot commands print no ERROR or WARN line and a failing one prints its
//! error once, as a plain line; a `kafka.properties.partitioner` override exits 2 naming
//! the key; a NATS password or token in `nats.url` never prints either. Not disruptive
//! (parallel phase): the user and the role are the test's own.

use std::process::Stdio;
use std::time::Duration;

use outbox_relay_testkit::{
    db::*, faults::*, nats::*, pg_url, rabbit::*, relay_proc::*, unique, wait::*,
};

/// A password nobody else uses, safe in a URL as it is.
fn unique_password(prefix: &str) -> String {
    format!(
        "{prefix}-{:016x}{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    )
}

/// The forms a password could be printed in: as it is, and as the byte list lapin's
/// frame dumps show for the AMQP PLAIN login response (`[0, 117, …]`).
fn forms(password: &str) -> Vec<String> {
    let bytes: Vec<String> = password.bytes().map(|b| b.to_string()).collect();
    vec![password.to_string(), bytes.join(", ")]
}

/// Fail, naming where, if any form of any secret is in `text`.
fn assert_clean(what: &str, text: &str, secrets: &[&str]) {
    for s in secrets {
        for f in forms(s) {
            assert!(
                !text.contains(&f),
                "{what} printed a secret ({f:?}):\n{}",
                excerpt(text, &f)
            );
        }
    }
}

fn excerpt(text: &str, needle: &str) -> String {
    let at = text.find(needle).unwrap_or(0);
    let from = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let to = text[at..].find('\n').map_or(text.len(), |i| at + i);
    text[from..to].chars().take(2000).collect()
}

/// A log line at ERROR or WARN, in the JSON or in the plain format.
fn alarm(line: &str) -> bool {
    let t = line.trim_start();
    line.contains("\"level\":\"ERROR\"")
        || line.contains("\"level\":\"WARN\"")
        || line.contains(" ERROR ")
        || line.contains(" WARN ")
        || t.starts_with("ERROR ")
        || t.starts_with("WARN ")
}

/// A RabbitMQ user with all permissions on `/`, deleted on drop (even on a panic).
struct RabbitUser {
    name: String,
}

impl RabbitUser {
    fn create(password: &str) -> RabbitUser {
        let name = unique("relay_sec");
        rabbitmqctl(&["add_user", &name, password]);
        let user = RabbitUser { name };
        rabbitmqctl(&["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"]);
        user
    }
}

impl Drop for RabbitUser {
    fn drop(&mut self) {
        sh("rabbitmqctl", &["delete_user", &self.name]);
    }
}

/// A login role with a password (pg_hba here is `trust`, so any password would do: the
/// point is only that the string is never printed), dropped on drop (even on a panic).
/// Superuser, so it may do whatever the relay's own role is granted, whatever that is.
struct PgRole {
    name: String,
}

impl PgRole {
    async fn create(pool: &sqlx::PgPool, password: &str) -> PgRole {
        let name = unique("relay_sec");
        sqlx::raw_sql(&format!(
            "CREATE ROLE {name} LOGIN SUPERUSER PASSWORD '{password}'"
        ))
        .execute(pool)
        .await
        .expect("create role");
        PgRole { name }
    }
}

impl Drop for PgRole {
    fn drop(&mut self) {
        let name = &self.name;
        sh(
            "psql",
            &[
                "-q",
                &pg_url(),
                "-c",
                &format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'"
                ),
                "-c",
                &format!("DROP OWNED BY {name}"),
                "-c",
                &format!("DROP ROLE IF EXISTS {name}"),
            ],
        );
    }
}

fn set(env: &mut Vec<(String, String)>, key: &str, value: impl Into<String>) {
    env.retain(|(k, _)| k != key);
    env.push((key.to_string(), value.into()));
}

/// Run `outbox-relay run` until `done` holds, then SIGTERM it; everything it printed
/// (stdout and stderr) with its exit code.
async fn run_daemon_until<F, Fut>(env: &[(String, String)], done: F) -> (Option<i32>, String)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<()>>,
{
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = tokio::process::Command::new(bin())
        .arg("run")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("OUTBOX_RELAY__HTTP__LISTEN", "127.0.0.1:0")
        .stdout(Stdio::from(std::fs::File::create(&out_path).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&err_path).unwrap()))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn relay");
    wait_for(Duration::from_secs(60), "the relay did its work", done).await;
    let pid = child.id().unwrap().to_string();
    assert!(sh("kill", &["-TERM", &pid]));
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the relay stops on SIGTERM")
        .unwrap();
    let printed =
        std::fs::read_to_string(&out_path).unwrap() + &std::fs::read_to_string(&err_path).unwrap();
    (status.code(), printed)
}

/// `n` rows of `order.created`, one for each aggregate `<prefix>0` … `<prefix><n - 1>`.
async fn insert_n(table: &TestTable, prefix: &str, n: usize) {
    for i in 0..n {
        let aggregate = format!("{prefix}{i}");
        table
            .insert(&aggregate, "order.created", None, serde_json::json!({}))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn passwords_never_print_at_trace() {
    let (table, broker) = table_and_broker("secrets").await;
    let mq_password = unique_password("MqPw");
    let pg_password = unique_password("PgPw");
    let mq_user = RabbitUser::create(&mq_password);
    let pg_role = PgRole::create(&table.pool, &pg_password).await;
    let role = &pg_role.name;
    let secrets = [mq_password.as_str(), pg_password.as_str()];

    let mut env = relay_env(&table.name, &broker.exchange);
    set(
        &mut env,
        "OUTBOX_RELAY__DATABASE__URL",
        format!("postgres://{role}@127.0.0.1:5432/test?password={pg_password}"),
    );
    set(
        &mut env,
        "OUTBOX_RELAY__RABBITMQ__URL",
        format!("amqp://{}:{mq_password}@127.0.0.1:5672/%2f", mq_user.name),
    );
    set(&mut env, "RUST_LOG", "trace");

    insert_n(&table, "sec-", 5).await;
    let (code, printed) = run_daemon_until(&env, || async {
        (table.count("PROCESSED").await == 5).then_some(())
    })
    .await;
    assert_eq!(code, Some(0), "clean exit on SIGTERM");
    assert_eq!(broker.take(5, Duration::from_secs(30)).await.len(), 5);
    assert!(
        printed.contains("\"level\":\"TRACE\""),
        "the relay logged at trace"
    );
    assert_clean("run at RUST_LOG=trace", &printed, &secrets);

    for args in [
        &["check"][..],
        &["status"],
        &["status", "--json"],
        &["migrate"],
    ] {
        let (code, out, err) = run_cmd(&env, args).await;
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        assert_clean(
            &format!("{args:?} at trace"),
            &format!("{out}{err}"),
            &secrets,
        );
    }

    // Failures print their URL (redacted), never the password: a database that is not
    // there, then a broker login refused.
    let mut down = env.clone();
    set(
        &mut down,
        "OUTBOX_RELAY__DATABASE__URL",
        format!("postgres://{role}@127.0.0.1:1/test?password={pg_password}"),
    );
    set(&mut down, "OUTBOX_RELAY__DATABASE__CONNECT_TIMEOUT", "1s");
    let mut refused = env.clone();
    set(
        &mut refused,
        "OUTBOX_RELAY__RABBITMQ__URL",
        format!("amqp://{}:{mq_password}-x@127.0.0.1:5672/%2f", mq_user.name),
    );
    for (what, env) in [("database down", &down), ("broker login refused", &refused)] {
        let (code, out, err) = run_cmd(env, &["check"]).await;
        assert_eq!(code, 2, "{what}: {out}{err}");
        assert_clean(&format!("check, {what}"), &format!("{out}{err}"), &secrets);
    }

    drop(mq_user);
    drop(pg_role);
    broker.cleanup_with(&table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_secrets_never_print_at_trace() {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let table = TestTable::new("secrets_k").await;
    let sasl_password = unique_password("KafkaSaslPw");
    let key_password = unique_password("KafkaKeyPw");
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("sasl-password");
    std::fs::write(&password_file, format!("{sasl_password}\n")).unwrap();
    let path = password_file.display().to_string();
    let (mut env, file) = kafka_env(
        &table.name,
        &cluster.bootstrap_servers(),
        "outbox-{aggregate_type}",
        &[
            ("security.protocol", "sasl_plaintext"),
            ("sasl.mechanism", "PLAIN"),
            ("sasl.username", "relay"),
            ("sasl.password_file", &path),
            ("ssl.key.password", &key_password),
            ("debug", "all"),
        ],
        &[],
    );
    set(&mut env, "RUST_LOG", "trace");
    let config = file.path().to_str().unwrap();
    let (code, out, err) = run_cmd(&env, &["check", "--config", config]).await;
    assert!(
        err.contains("librdkafka") && err.contains("sasl.password"),
        "librdkafka logged its configuration (debug=all) at trace: {err}"
    );
    assert!(code == 0 || code == 2, "{out}{err}");
    assert_clean(
        "kafka check at trace with debug=all",
        &format!("{out}{err}"),
        &[&sasl_password, &key_password],
    );
    table.cleanup().await;
}

/// `nats.url` with `user:password@`, then with a lone `token@` (the local server has no
/// auth and ignores both): neither prints from `run` (rows relayed) or `check` at
/// `RUST_LOG=trace`, nor from a `check` that cannot reach the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_credentials_never_print_at_trace() {
    let stream = TestStream::new("secrets_n").await;
    let table = TestTable::new("secrets_n").await;
    let password = unique_password("NatsPw");
    let token = unique_password("NatsToken");
    let secrets = [password.as_str(), token.as_str()];
    let host = nats_url()
        .split_once("://")
        .map(|(_, h)| h.to_string())
        .unwrap();
    for (n, url) in [
        format!("nats://relay:{password}@{host}"),
        format!("nats://{token}@{host}"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut env = nats_env(&table.name, &stream.template(), &[]);
        set(&mut env, "OUTBOX_RELAY__NATS__URL", url.clone());
        set(&mut env, "RUST_LOG", "trace");
        insert_n(&table, &format!("sec-{n}-"), 3).await;
        let want = 3 * (n as i64 + 1);
        let (code, printed) = run_daemon_until(&env, || async {
            (table.count("PROCESSED").await == want).then_some(())
        })
        .await;
        assert_eq!(code, Some(0), "clean exit on SIGTERM: {printed}");
        assert!(printed.contains("\"level\":\"TRACE\""), "logged at trace");
        assert_clean("nats run at RUST_LOG=trace", &printed, &secrets);
        let (code, out, err) = run_cmd(&env, &["check"]).await;
        assert_eq!(code, 0, "{out}{err}");
        assert_clean("nats check at trace", &format!("{out}{err}"), &secrets);
        let mut down = env.clone();
        set(
            &mut down,
            "OUTBOX_RELAY__NATS__URL",
            url.replace(&host, "127.0.0.1:1"),
        );
        let (code, out, err) = run_cmd(&down, &["check"]).await;
        assert_eq!(code, 2, "{out}{err}");
        assert_clean("nats check, server down", &format!("{out}{err}"), &secrets);
    }
    assert_eq!(stream.count().await, 6);
    stream.delete().await;
    table.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn healthy_commands_print_no_error_or_warn() {
    let table = TestTable::unmigrated("quiet").await;
    let broker = TestBroker::new("quiet").await;
    let mut env = relay_env(&table.name, &broker.exchange);
    env.retain(|(k, _)| k != "RUST_LOG");
    for args in [
        &["migrate"][..],
        &["migrate"],
        &["check"],
        &["status"],
        &["status", "--json"],
        &["demo", "--events", "40"],
    ] {
        let (code, out, err) = run_cmd(&env, args).await;
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        for line in out.lines().chain(err.lines()) {
            assert!(!alarm(line), "{args:?} printed {line:?}\n{out}{err}");
        }
    }

    // A failing one-shot command prints its error once, as a plain line.
    let mut env = env.clone();
    set(
        &mut env,
        "OUTBOX_RELAY__RABBITMQ__URL",
        "amqp://guest:guest@127.0.0.1:1/%2f",
    );
    let (code, out, err) = run_cmd(&env, &["check"]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert_eq!(
        err.matches("cannot connect to amqp://").count(),
        1,
        "the error once: {err}"
    );
    assert!(err.contains("outbox-relay: error: "), "{err}");
    assert!(
        !err.lines().any(|l| l.trim_start().starts_with('{')),
        "no JSON log line from a one-shot command: {err}"
    );
    broker.cleanup_with(&table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioner_override_exits_2_naming_the_key() {
    let (env, file) = kafka_env(
        "partitioner_t",
        "127.0.0.1:1",
        "outbox-{aggregate_type}",
        &[("partitioner", "random")],
        &[],
    );
    let config = file.path().to_str().unwrap();
    for cmd in ["check", "run"] {
        let (code, out, err) = run_cmd(&env, &[cmd, "--config", config]).await;
        assert_eq!(code, 2, "{cmd}: {out}{err}");
        assert!(err.contains("kafka.properties.partitioner"), "{cmd}: {err}");
    }
    // The relay's own partitioner, spelled out, is not an override.
    let (env, file) = kafka_env(
        "partitioner_t",
        "127.0.0.1:1",
        "outbox-{aggregate_type}",
        &[("partitioner", "murmur2_random")],
        &[("OUTBOX_RELAY__RELAY__PUBLISH_TIMEOUT", "1s")],
    );
    let (_, _, err) = run_cmd(&env, &["check", "--config", file.path().to_str().unwrap()]).await;
    assert!(!err.contains("kafka.properties.partitioner"), "{err}");
}
