//! The `[nats]` config section: its keys, their defaults, and its validation (run by
//! `Settings` when `sink.kind = "nats"`).

use std::path::PathBuf;

use serde::Deserialize;

use super::wire::{check_subject, check_template};
use crate::checks::{check_url, invalid, ConfigError};
use crate::secret::Secret;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// `nats://` or `tls://`; may carry `user:password@` or `token@` (never printed).
    #[serde(default = "default_url")]
    pub url: Secret,
    /// File holding the URL (Kubernetes Secret volume); wins over `url`.
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// Subject template: `{aggregate_type}` and `{event_type}` are substituted.
    #[serde(default = "default_subject")]
    pub subject: String,
    /// Where a row that ended `FAILED` is also published (a stream must capture it).
    #[serde(default)]
    pub dead_letter_subject: Option<String>,
    /// PEM CA bundle for `tls://` connections.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_url() -> Secret {
    Secret::new("nats://127.0.0.1:4222")
}

fn default_subject() -> String {
    "outbox.{aggregate_type}.{event_type}".into()
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: default_url(),
            url_file: None,
            subject: default_subject(),
            dead_letter_subject: None,
            ca_file: None,
        }
    }
}

impl NatsConfig {
    /// The secrets `nats.url` carries, for the log scrubber: its password and secret
    /// query parameters, and a lone `token@` (a username without a password).
    pub fn secret_values(&self) -> Vec<String> {
        let mut out = crate::secret::url_secrets(self.url.expose());
        if let Ok(u) = url::Url::parse(self.url.expose()) {
            if u.password().is_none() && !u.username().is_empty() {
                out.push(u.username().to_string());
            }
        }
        out
    }

    /// Check every value of the section, naming the key of the first bad one. A key in
    /// `unchecked` (`nats.url`, when its `url_file` is not there: `check --offline`) is
    /// not checked.
    pub fn validate(&self, unchecked: &[&str]) -> Result<(), ConfigError> {
        if !unchecked.contains(&"nats.url") {
            check_url("nats.url", &self.url, &["nats", "tls"], "nats:// or tls://")?;
            let u = url::Url::parse(self.url.expose())
                .map_err(|e| invalid("nats.url", format!("not a URL: {e}")))?;
            if u.host_str().is_none_or(str::is_empty) {
                return Err(invalid("nats.url", "has no host"));
            }
        }
        check_template(&self.subject).map_err(|m| invalid("nats.subject", m))?;
        if let Some(dl) = &self.dead_letter_subject {
            check_subject(dl).map_err(|m| invalid("nats.dead_letter_subject", m))?;
        }
        if let Some(ca) = &self.ca_file {
            if !ca.exists() {
                return Err(invalid(
                    "nats.ca_file",
                    format!("{} does not exist", ca.display()),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::key_of;

    #[test]
    fn defaults_are_valid() {
        NatsConfig::default().validate(&[]).unwrap();
    }

    #[test]
    fn bad_values_name_their_key() {
        let bad = |f: &dyn Fn(&mut NatsConfig)| {
            let mut c = NatsConfig::default();
            f(&mut c);
            key_of(c.validate(&[]).unwrap_err())
        };
        assert_eq!(bad(&|c| c.url = Secret::new("amqp://h:4222")), "nats.url");
        assert_eq!(bad(&|c| c.url = Secret::new("not a url")), "nats.url");
        assert_eq!(bad(&|c| c.subject = String::new()), "nats.subject");
        assert_eq!(bad(&|c| c.subject = "outbox.*".into()), "nats.subject");
        assert_eq!(bad(&|c| c.subject = "outbox.>".into()), "nats.subject");
        assert_eq!(bad(&|c| c.subject = "out box".into()), "nats.subject");
        assert_eq!(bad(&|c| c.subject = "outbox..x".into()), "nats.subject");
        assert_eq!(
            bad(&|c| c.subject = "outbox.{aggregate}".into()),
            "nats.subject"
        );
        assert_eq!(
            bad(&|c| c.dead_letter_subject = Some("dl.*".into())),
            "nats.dead_letter_subject"
        );
        assert_eq!(
            bad(&|c| c.ca_file = Some("/nonexistent/ca.pem".into())),
            "nats.ca_file"
        );
        // `check --offline` with a url_file that is not there: the URL is not checked.
        let c = NatsConfig {
            url: Secret::new("junk"),
            ..NatsConfig::default()
        };
        c.validate(&["nats.url"]).unwrap();
    }

    #[test]
    fn tokens_are_secrets() {
        let c = NatsConfig {
            url: Secret::new("nats://s3cr3t-token@nats:4222"),
            ..NatsConfig::default()
        };
        assert_eq!(c.secret_values(), vec!["s3cr3t-token".to_string()]);
        let c = NatsConfig {
            url: Secret::new("nats://app:hunter2@nats:4222"),
            ..NatsConfig::default()
        };
        assert_eq!(c.secret_values(), vec!["hunter2".to_string()]);
    }

    #[test]
    fn credentials_and_tls_urls_are_accepted() {
        for url in [
            "nats://user:pw@127.0.0.1:4222",
            "nats://s3cr3t-token@nats:4222",
            "tls://nats.example:4222",
        ] {
            let c = NatsConfig {
                url: Secret::new(url),
                ..NatsConfig::default()
            };
            c.validate(&[]).unwrap();
        }
    }
}
