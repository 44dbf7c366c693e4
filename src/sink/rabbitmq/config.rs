//! The `[rabbitmq]` config section: its keys, their defaults, and its validation (run
//! by `Settings` when `sink.kind = "rabbitmq"`).

use std::path::PathBuf;

use serde::Deserialize;

use crate::checks::{check_url, invalid, ConfigError};
use crate::secret::Secret;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitmqConfig {
    #[serde(default = "default_url")]
    pub url: Secret,
    /// File holding the URL (Kubernetes Secret volume); wins over `url`.
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    #[serde(default = "default_exchange")]
    pub exchange: String,
    #[serde(default)]
    pub dead_letter_exchange: Option<String>,
    /// PEM CA bundle for `amqps://` connections.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_url() -> Secret {
    Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f")
}

fn default_exchange() -> String {
    "outbox".into()
}

impl RabbitmqConfig {
    /// Check every value of the section, naming the key of the first bad one. A key in
    /// `unchecked` (`rabbitmq.url`, when its `url_file` is not there: `check --offline`)
    /// is not checked.
    pub fn validate(&self, unchecked: &[&str]) -> Result<(), ConfigError> {
        if !unchecked.contains(&"rabbitmq.url") {
            let schemes = ["amqp", "amqps"];
            let wanted = "amqp:// or amqps://";
            check_url("rabbitmq.url", &self.url, &schemes, wanted)?;
        }
        if self.exchange.is_empty() {
            return Err(invalid(
                "rabbitmq.exchange",
                "must not be empty (the default exchange cannot be declared)",
            ));
        }
        if let Some(ca) = &self.ca_file {
            if !ca.exists() {
                return Err(invalid(
                    "rabbitmq.ca_file",
                    format!("{} does not exist", ca.display()),
                ));
            }
        }
        Ok(())
    }
}
