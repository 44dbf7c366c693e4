//! Typed configuration: defaults → `--config` TOML → `OUTBOX_RELAY__SECTION__KEY` env vars,
//! validated once at start. Every error names the offending key; secrets never print.
//!
//! Secrets can come from files (the Kubernetes Secret-volume convention): `database.url_file`
//! `rabbitmq.url_file`, `nats.url_file` and `redis.url_file` replace their URL, and any `kafka.properties."<name>_file"`
//! entry (e.g. `"sasl.password_file"`) sets property `<name>` to the file's content.

mod defaults;
mod files;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::checks::{check_url, invalid, ConfigError};
use crate::secret::{self, Secret};
use crate::sink::aws::{SnsConfig, SqsConfig};
use crate::sink::kafka::KafkaConfig;
use crate::sink::nats::NatsConfig;
use crate::sink::rabbitmq::RabbitmqConfig;
use crate::sink::redis::RedisConfig;
use crate::table::TableName;
use defaults::*;
pub use files::{MissingFiles, SecretFile};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailed {
    /// Later rows of a FAILED row's aggregate wait for `replay` or `discard`.
    Block,
    /// Later rows proceed.
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    Rabbitmq,
    Kafka,
    Nats,
    Redis,
    Sqs,
    Sns,
}

impl fmt::Display for SinkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SinkKind::Rabbitmq => "rabbitmq",
            SinkKind::Kafka => "kafka",
            SinkKind::Nats => "nats",
            SinkKind::Redis => "redis",
            SinkKind::Sqs => "sqs",
            SinkKind::Sns => "sns",
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    #[serde(default = "default_database_url")]
    pub url: Secret,
    /// File holding the URL (Kubernetes Secret volume); wins over `url`.
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    #[serde(default = "default_table")]
    pub table: String,
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_backoff_initial", with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
    #[serde(default = "default_on_failed")]
    pub on_failed: OnFailed,
    #[serde(default = "default_lease_timeout", with = "humantime_serde")]
    pub lease_timeout: Duration,
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub retention: Duration,
    /// How long one publish may wait for its broker confirm before the connection is
    /// considered stalled (no attempt is spent; the relay reconnects). Zero (the default)
    /// means `lease_timeout / 2`, at most 15 s: see `effective_publish_timeout`.
    #[serde(default, with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Listen for NOTIFY from the outbox trigger (polling stays on as the safety net).
    #[serde(default = "default_true")]
    pub listen: bool,
    /// The claim tick while rows flow and the relay does not ask for NOTIFY (it claims
    /// again this long after a claim): the trade between what a relay that keeps up costs
    /// Postgres (a claim's statements each tick) and the latency it adds (half a tick on
    /// average). At most `poll_interval` is used.
    #[serde(default = "default_busy_poll_interval", with = "humantime_serde")]
    pub busy_poll_interval: Duration,
    /// Most messages sent and not yet confirmed at any moment (the sliding window).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// Most bytes of claimed rows (payload, headers, keys) held in memory at once.
    #[serde(default = "default_max_in_flight_bytes")]
    pub max_in_flight_bytes: u64,
    /// Most rows of one aggregate held in memory (and taken by one claim): a hot
    /// aggregate gets this share while others are due, never the whole window.
    #[serde(default = "default_max_rows_per_aggregate")]
    pub max_rows_per_aggregate: u32,
}

impl RelayConfig {
    /// `publish_timeout` as set, or by default `lease_timeout / 2` capped at 15 s (so a
    /// send always fits inside the lease that fences it).
    pub fn effective_publish_timeout(&self) -> Duration {
        if self.publish_timeout.is_zero() {
            (self.lease_timeout / 2).min(Duration::from_secs(15))
        } else {
            self.publish_timeout
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    #[serde(default = "default_sink_kind")]
    pub kind: SinkKind,
}

/// The longest `relay.poll_interval` accepted (the polling safety net must come round).
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(3600);
/// The shortest `relay.publish_timeout` accepted.
const MIN_PUBLISH_TIMEOUT: Duration = Duration::from_millis(100);

/// Suffix of a `kafka.properties` key whose value is a file holding the property's value.
pub const PROPERTY_FILE_SUFFIX: &str = "_file";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
}

/// The whole configuration. Every section is present (the loader starts each as an
/// empty table, so every field a file or env var leaves out takes its default).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseConfig,
    pub relay: RelayConfig,
    pub sink: SinkConfig,
    pub rabbitmq: RabbitmqConfig,
    pub kafka: KafkaConfig,
    pub nats: NatsConfig,
    pub redis: RedisConfig,
    pub sqs: SqsConfig,
    pub sns: SnsConfig,
    pub http: HttpConfig,
}

/// The sections of `Settings`.
const SECTIONS: [&str; 10] = [
    "database", "relay", "sink", "rabbitmq", "kafka", "nats", "redis", "sqs", "sns", "http",
];

/// Prefix of the environment variables that override the file: `OUTBOX_RELAY__<SECTION>__<KEY>`.
pub const ENV_PREFIX: &str = "OUTBOX_RELAY";

/// Loaded and validated settings, with what became of each `*_file` secret.
#[derive(Debug)]
pub struct Loaded {
    pub settings: Settings,
    pub files: Vec<SecretFile>,
}

/// A config builder holding every section as an empty table (the fields' defaults).
fn sections() -> Result<config::ConfigBuilder<config::builder::DefaultState>, ConfigError> {
    let mut builder = config::Config::builder();
    for section in SECTIONS {
        builder = builder
            .set_default(section, config::Map::<String, config::Value>::new())
            .map_err(|e| ConfigError::Load(scrub(e)))?;
    }
    Ok(builder)
}

impl Settings {
    /// Load defaults, then the optional TOML file, then `OUTBOX_RELAY__*` env vars; read
    /// the `*_file` secrets; validate. What every command but `check --offline` uses.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with(file, MissingFiles::Fail).map(|l| l.settings)
    }

    /// `load`, with a choice of what a `*_file` secret that is not there means. With
    /// `MissingFiles::Unchecked` (`check --offline`) it is listed in `Loaded::files` as
    /// not read, and the value it would supply is not validated; all else is as `load`.
    pub fn load_with(file: Option<&Path>, missing: MissingFiles) -> Result<Loaded, ConfigError> {
        let mut builder = sections()?;
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Load(format!(
                    "--config file {} does not exist",
                    path.display()
                )));
            }
            builder = builder.add_source(
                config::File::from(path.to_path_buf()).format(config::FileFormat::Toml),
            );
        }
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        let raw = builder.build().map_err(|e| ConfigError::Load(scrub(e)))?;
        let mut settings: Settings = raw
            .try_deserialize()
            .map_err(|e| ConfigError::Load(scrub(e)))?;
        let files = settings.resolve_files(missing)?;
        secret::register_secrets(settings.secret_values());
        let unchecked: Vec<&str> = files
            .iter()
            .filter(|f| !f.read)
            .map(|f| f.supplies.as_str())
            .collect();
        settings.validate_except(&unchecked)?;
        Ok(Loaded { settings, files })
    }

    /// Every configured secret value (URL passwords, secret Kafka properties), for the
    /// log scrubber (`secret::scrub`).
    pub fn secret_values(&self) -> Vec<String> {
        let mut out = secret::url_secrets(self.database.url.expose());
        out.extend(secret::url_secrets(self.rabbitmq.url.expose()));
        out.extend(self.nats.secret_values());
        out.extend(secret::url_secrets(self.redis.url.expose()));
        out.extend(
            self.kafka
                .properties
                .iter()
                .filter(|(k, v)| secret::is_secret_property(k) && !v.is_empty())
                .map(|(_, v)| v.clone()),
        );
        out
    }

    /// Check every value once, naming the key of the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_except(&[])
    }

    /// `validate`, but not the values of `unchecked` (keys a `*_file` secret that is not
    /// there would have supplied: `check --offline`).
    fn validate_except(&self, unchecked: &[&str]) -> Result<(), ConfigError> {
        if !unchecked.contains(&"database.url") {
            let schemes = ["postgres", "postgresql"];
            check_url("database.url", &self.database.url, &schemes, "postgres://")?;
        }
        self.table()?;
        if self.database.max_connections < 2 {
            return Err(invalid("database.max_connections", "must be at least 2"));
        }
        let r = &self.relay;
        if r.batch_size == 0 || r.batch_size > 10_000 {
            return Err(invalid("relay.batch_size", "must be between 1 and 10000"));
        }
        if r.poll_interval.is_zero() || r.poll_interval > MAX_POLL_INTERVAL {
            return Err(invalid(
                "relay.poll_interval",
                "must be greater than 0 and at most 1h: it is the safety net when no NOTIFY \
                 arrives (relay.listen off, or the LISTEN connection lost)",
            ));
        }
        if r.busy_poll_interval.is_zero() {
            return Err(invalid(
                "relay.busy_poll_interval",
                "must be greater than 0",
            ));
        }
        if r.max_attempts == 0 {
            return Err(invalid("relay.max_attempts", "must be at least 1"));
        }
        if r.backoff_initial.is_zero() {
            return Err(invalid("relay.backoff_initial", "must be greater than 0"));
        }
        if r.backoff_max < r.backoff_initial {
            return Err(invalid(
                "relay.backoff_max",
                "must not be smaller than relay.backoff_initial",
            ));
        }
        if r.lease_timeout < Duration::from_secs(1) {
            return Err(invalid("relay.lease_timeout", "must be at least 1s"));
        }
        if !r.publish_timeout.is_zero() && r.publish_timeout < MIN_PUBLISH_TIMEOUT {
            return Err(invalid(
                "relay.publish_timeout",
                "must be at least 100ms (or 0s: the default): a message not confirmed within \
                 it is taken for a stalled broker and sent again, so a shorter one resends \
                 everything",
            ));
        }
        if r.publish_timeout >= r.lease_timeout {
            return Err(invalid(
                "relay.publish_timeout",
                format!(
                    "must be shorter than relay.lease_timeout ({:?}): a send must fit inside the partition lease that fences it",
                    r.lease_timeout
                ),
            ));
        }
        if r.max_in_flight == 0 || r.max_in_flight > 100_000 {
            return Err(invalid(
                "relay.max_in_flight",
                "must be between 1 and 100000",
            ));
        }
        if r.max_in_flight_bytes < 1024 * 1024 {
            return Err(invalid(
                "relay.max_in_flight_bytes",
                "must be at least 1048576 (1 MiB)",
            ));
        }
        if r.max_rows_per_aggregate == 0 {
            return Err(invalid(
                "relay.max_rows_per_aggregate",
                "must be at least 1",
            ));
        }
        match self.sink.kind {
            SinkKind::Rabbitmq => self.rabbitmq.validate(unchecked)?,
            SinkKind::Kafka => self.kafka.validate()?,
            SinkKind::Nats => self.nats.validate(unchecked)?,
            SinkKind::Redis => self.redis.validate(unchecked)?,
            SinkKind::Sqs => self.sqs.validate()?,
            SinkKind::Sns => self.sns.validate()?,
        }
        self.http_listen()?;
        Ok(())
    }

    /// `database.table`, parsed (validated at load, so this fails only on settings
    /// changed since).
    pub fn table(&self) -> Result<TableName, ConfigError> {
        TableName::parse(&self.database.table).map_err(|m| invalid("database.table", m))
    }

    /// `http.listen`, parsed (validated at load, as `table`).
    pub fn http_listen(&self) -> Result<SocketAddr, ConfigError> {
        self.http
            .listen
            .parse()
            .map_err(|e| invalid("http.listen", format!("not host:port ({e})")))
    }
}

/// `config` errors may echo a value; make sure a URL with a password never does.
fn scrub(e: config::ConfigError) -> String {
    secret::redact_text(&e.to_string())
}

#[cfg(test)]
mod tests;
