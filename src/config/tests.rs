//! Unit tests of configuration loading, validation, secret files and redaction.

use super::*;

/// Settings with every field at its default (as the loader gives with no file or env).
fn empty_table() -> Settings {
    toml_from("")
}

#[test]
fn defaults_are_valid() {
    let s = empty_table();
    s.validate().unwrap();
    assert_eq!(s.relay.batch_size, 500);
    assert_eq!(s.relay.poll_interval, Duration::from_millis(500));
    assert_eq!(s.relay.busy_poll_interval, Duration::from_millis(5));
    assert_eq!(s.relay.on_failed, OnFailed::Block);
    assert_eq!(s.kafka.topic, "outbox.{aggregate_type}");
}

#[test]
fn toml_parses_spec_example() {
    let toml = r#"
[database]
url = "postgres://localhost/outbox"
table = "app.outbox"
[relay]
batch_size = 100
poll_interval = "250ms"
busy_poll_interval = "20ms"
backoff_max = "5m"
on_failed = "skip"
[sink]
kind = "kafka"
[kafka]
brokers = "k:9092"
[kafka.properties]
"compression.type" = "lz4"
"#;
    let s: Settings = toml_from(toml);
    s.validate().unwrap();
    assert_eq!(s.relay.on_failed, OnFailed::Skip);
    assert_eq!(s.relay.backoff_max, Duration::from_secs(300));
    assert_eq!(s.relay.busy_poll_interval, Duration::from_millis(20));
    assert_eq!(s.kafka.properties["compression.type"], "lz4");
}

#[test]
fn bad_values_name_their_key() {
    let mut s = empty_table();
    s.relay.batch_size = 0;
    assert!(rejection(&s).contains("relay.batch_size"));
    let mut s = empty_table();
    s.relay.busy_poll_interval = Duration::ZERO;
    assert!(rejection(&s).contains("relay.busy_poll_interval"));
    let mut s = empty_table();
    s.database.table = "bad name;".into();
    assert!(rejection(&s).contains("database.table"));
    let mut s = empty_table();
    s.relay.backoff_max = Duration::from_millis(1);
    assert!(rejection(&s).contains("relay.backoff_max"));
    // Accepted once: a poll every 114 years, a timeout that resends every message.
    let mut s = empty_table();
    s.relay.poll_interval = Duration::from_secs(1_000_000 * 3600);
    assert!(rejection(&s).contains("relay.poll_interval"));
    for short in [Duration::from_millis(1), Duration::from_millis(99)] {
        let mut s = empty_table();
        s.relay.publish_timeout = short;
        let why = rejection(&s);
        assert!(
            why.contains("relay.publish_timeout") && why.contains("at least 100ms"),
            "{why}"
        );
    }
    let mut s = empty_table();
    s.relay.publish_timeout = Duration::from_millis(100);
    s.relay.poll_interval = Duration::from_secs(3600);
    s.validate().unwrap();
}

#[test]
fn kafka_secrets_come_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("sasl-password");
    std::fs::write(&pw, "file-Secret-7d1\n").unwrap();
    let toml = format!(
        r#"
[sink]
kind = "kafka"
[kafka.properties]
"sasl.username" = "app"
"sasl.password" = "inline-loses"
"sasl.password_file" = "{}"
"#,
        pw.display()
    );
    let mut s: Settings = toml_from(&toml);
    s.resolve_files(MissingFiles::Fail).unwrap();
    s.validate().unwrap();
    assert_eq!(s.kafka.properties["sasl.password"], "file-Secret-7d1");
    assert!(!s.kafka.properties.contains_key("sasl.password_file"));
    assert_eq!(s.kafka.properties["sasl.username"], "app");
    assert!(s.secret_values().iter().any(|v| v == "file-Secret-7d1"));
    // (That `kafka.properties` reach the producer as-is: `sink::kafka::props` tests.)

    let mut s: Settings = toml_from(
        r#"
[kafka.properties]
"ssl.key.password_file" = "/nonexistent/key-password"
"#,
    );
    let e = s.resolve_files(MissingFiles::Fail).unwrap_err().to_string();
    assert!(e.contains("kafka.properties.ssl.key.password_file"), "{e}");
}

#[test]
fn missing_secret_files_are_unchecked_only_when_asked() {
    let toml = r#"
[database]
url = "not a url"
url_file = "/nonexistent/database-url"
[rabbitmq]
url_file = "/nonexistent/rabbitmq-url"
[kafka.properties]
"sasl.password_file" = "/nonexistent/sasl-password"
"#;
    let mut s: Settings = toml_from(toml);
    let e = s.resolve_files(MissingFiles::Fail).unwrap_err().to_string();
    assert!(e.contains("database.url_file"), "{e}");

    let mut s: Settings = toml_from(toml);
    let files = s.resolve_files(MissingFiles::Unchecked).unwrap();
    let seen: Vec<(&str, &str, bool)> = files
        .iter()
        .map(|f| (f.key.as_str(), f.supplies.as_str(), f.read))
        .collect();
    assert_eq!(
        seen,
        [
            ("database.url_file", "database.url", false),
            ("rabbitmq.url_file", "rabbitmq.url", false),
            (
                "kafka.properties.sasl.password_file",
                "kafka.properties.sasl.password",
                false
            ),
        ]
    );
    assert!(s.kafka.properties.is_empty(), "{:?}", s.kafka.properties);
    // The value the missing file would have replaced is not judged; the rest is.
    assert!(s.validate().is_err());
    s.validate_except(&["database.url", "rabbitmq.url"])
        .unwrap();
    s.relay.batch_size = 0;
    let e = s.validate_except(&["database.url"]).unwrap_err();
    assert!(e.to_string().contains("relay.batch_size"), "{e}");

    // A file that is there but cannot be read (a directory) fails either way.
    let dir = tempfile::tempdir().unwrap();
    let mut s = empty_table();
    s.database.url_file = Some(dir.path().to_path_buf());
    let e = s.resolve_files(MissingFiles::Unchecked).unwrap_err();
    assert!(e.to_string().contains("database.url_file"), "{e}");
}

#[test]
fn partitioner_override_is_refused() {
    let mut s = empty_table();
    s.sink.kind = SinkKind::Kafka;
    s.kafka
        .properties
        .insert("partitioner".into(), "random".into());
    let e = s.validate().unwrap_err();
    assert!(matches!(e, ConfigError::Property(_)));
    assert!(
        e.to_string().contains("kafka.properties.partitioner"),
        "{e}"
    );
}

#[test]
fn debug_of_settings_prints_no_secret() {
    let mut s = empty_table();
    s.database.url = Secret::new("postgres://app:Pg-User-Pw1@db/x?sslpassword=Pg-Ssl-Pw2");
    s.rabbitmq.url = Secret::new("amqp://app:Mq-Pw3@mq:5672/%2f");
    s.kafka
        .properties
        .insert("sasl.password".into(), "Kafka-Pw4".into());
    s.kafka
        .properties
        .insert("ssl.keystore.password".into(), "Kafka-Pw5".into());
    s.kafka
        .properties
        .insert("sasl.username".into(), "app-user".into());
    let printed = format!("{s:?} {s:#?}");
    for pw in [
        "Pg-User-Pw1",
        "Pg-Ssl-Pw2",
        "Mq-Pw3",
        "Kafka-Pw4",
        "Kafka-Pw5",
    ] {
        assert!(!printed.contains(pw), "{pw} in {printed}");
    }
    assert!(printed.contains("app-user"));
    assert_eq!(s.secret_values().len(), 5, "{:?}", s.secret_values());
}

#[test]
fn query_password_is_redacted_in_display() {
    let s = Secret::new("postgres://u@host/db?password=Query-Pw6");
    assert_eq!(s.to_string(), "postgres://u@host/db?password=***");
}

/// Why `s` fails validation (the test fails if it passes).
fn rejection(s: &Settings) -> String {
    s.validate().unwrap_err().to_string()
}

fn toml_from(text: &str) -> Settings {
    load(text).unwrap()
}

/// `text` loaded over the defaults (no validation).
fn load(text: &str) -> Result<Settings, config::ConfigError> {
    sections()
        .unwrap()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()?
        .try_deserialize()
}

#[test]
fn redis_section_parses_and_its_password_is_a_secret() {
    let toml = r#"
[sink]
kind = "redis"
[redis]
url = "redis://default:s3cr3t-redis@cache:6379/0"
mode = "pubsub"
key = "events.{aggregate_type}"
"#;
    let s: Settings = toml_from(toml);
    s.validate().unwrap();
    assert_eq!(s.sink.kind.to_string(), "redis");
    assert_eq!(s.redis.mode, crate::sink::redis::RedisMode::Pubsub);
    assert!(s.secret_values().contains(&"s3cr3t-redis".to_string()));
    assert!(!format!("{s:?}").contains("s3cr3t-redis"));
    let mut bad = s.clone();
    bad.redis.url = Secret::new("amqp://h");
    assert!(rejection(&bad).contains("redis.url"));
}

#[test]
fn redis_and_nats_urls_come_from_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let redis = dir.path().join("redis-url");
    let nats = dir.path().join("nats-url");
    std::fs::write(&redis, "rediss://:s3cret@redis.example:6380\n").unwrap();
    std::fs::write(&nats, "tls://relay:n4ts@nats.example:4222\n").unwrap();
    let mut s = empty_table();
    s.redis.url_file = Some(redis);
    s.nats.url_file = Some(nats);
    let files = s.resolve_files(MissingFiles::Fail).unwrap();
    let supplied: Vec<&str> = files.iter().map(|f| f.supplies.as_str()).collect();
    assert_eq!(supplied, ["nats.url", "redis.url"]);
    assert_eq!(s.redis.url.expose(), "rediss://:s3cret@redis.example:6380");
    assert_eq!(s.nats.url.expose(), "tls://relay:n4ts@nats.example:4222");
    assert!(!format!("{:?}", s.redis).contains("s3cret"));
    s.sink.kind = SinkKind::Redis;
    s.validate().unwrap();
}

/// README's configuration table and the loader agree: every key the table names is known
/// (set to a value of no key's type, a known key fails on its type, an unknown one as
/// unknown), once, and every key of the sections it covers is named in README.
#[test]
fn every_key_of_the_readme_config_table_is_known() {
    let readme = include_str!("../../README.md");
    let keys: Vec<(&str, &str)> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once("` |").map(|(k, _)| k))
        .filter(|k| {
            k.chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.')
        })
        .filter_map(|k| k.split_once('.'))
        .filter(|(_, name)| !name.contains('.'))
        .collect();
    assert!(keys.contains(&("relay", "busy_poll_interval")), "{keys:?}");
    let mut once = std::collections::HashSet::new();
    for (section, name) in keys {
        assert!(
            once.insert((section, name)),
            "{section}.{name} has two rows"
        );
        let key = format!("{section}.{name}");
        let err = load_error(&format!("[{section}]\n{name} = [[1]]\n"));
        assert!(!err.is_empty(), "{key}: a nested array was accepted");
        assert!(!err.contains("unknown field"), "{key}: {err}");
    }
    // The other way round: every key of those sections is in the table (an unknown key's
    // error lists the section's keys).
    for section in ["database", "relay", "sink", "rabbitmq", "kafka", "http"] {
        let err = load_error(&format!("[{section}]\nno_such_key = [[1]]\n"));
        let (_, expected) = err
            .split_once("expected one of ")
            .or_else(|| err.split_once("expected "))
            .unwrap_or_else(|| panic!("{section}: {err}"));
        let expected = expected.split(" for key").next().unwrap_or_default();
        for name in expected.split(", ") {
            let key = format!("`{section}.{}`", name.trim_matches('`'));
            assert!(readme.contains(&key), "{key} is not in README: {err}");
        }
    }
}

/// What loading `toml` over the defaults fails with ("" when it loads).
fn load_error(toml: &str) -> String {
    load(toml).err().map(|e| e.to_string()).unwrap_or_default()
}
