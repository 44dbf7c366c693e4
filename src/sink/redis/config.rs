//! The `[redis]` config section: its keys, their defaults, the typed `mode`, and its
//! validation (run by `Settings` when `sink.kind = "redis"`).

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use crate::checks::{check_url, invalid, ConfigError};
use crate::secret::Secret;

/// What a Redis "publish" is: an entry appended to a stream, or a pub/sub message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// `XADD` to a stream: kept for consumers (and consumer groups) that read later.
    Stream,
    /// `PUBLISH` to a channel: only subscribers connected at that moment get it.
    Pubsub,
}

impl fmt::Display for RedisMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RedisMode::Stream => "stream",
            RedisMode::Pubsub => "pubsub",
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` (TLS).
    #[serde(default = "default_url")]
    pub url: Secret,
    /// File holding the URL (Kubernetes Secret volume); wins over `url`.
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    #[serde(default = "default_mode")]
    pub mode: RedisMode,
    /// Stream key (mode `stream`) or channel (mode `pubsub`) of rows without a
    /// `destination`; `{aggregate_type}` is substituted.
    #[serde(default = "default_key")]
    pub key: String,
    /// Stream key FAILED rows are appended to (with a `last_error` field), in both modes:
    /// a dead letter is kept, not broadcast. `{aggregate_type}` is substituted.
    #[serde(default)]
    pub dead_letter_key: Option<String>,
    /// Mode `stream`: trim each stream to about this many entries (`XADD … MAXLEN ~ N`).
    /// Unset: never trimmed by the relay.
    #[serde(default)]
    pub max_len: Option<u64>,
}

/// The placeholder `redis.key` and `redis.dead_letter_key` may hold.
pub const AGGREGATE_TYPE: &str = "{aggregate_type}";

fn default_url() -> Secret {
    Secret::new("redis://127.0.0.1:6379")
}

fn default_mode() -> RedisMode {
    RedisMode::Stream
}

fn default_key() -> String {
    "outbox.{aggregate_type}".into()
}

impl RedisConfig {
    /// Check every value of the section, naming the key of the first bad one. A key in
    /// `unchecked` (`redis.url`, when its `url_file` is not there: `check --offline`) is
    /// not checked.
    pub fn validate(&self, unchecked: &[&str]) -> Result<(), ConfigError> {
        if !unchecked.contains(&"redis.url") {
            self.validate_url()?;
        }
        self.validate_rest()
    }

    fn validate_url(&self) -> Result<(), ConfigError> {
        check_url(
            "redis.url",
            &self.url,
            &["redis", "rediss"],
            "redis:// or rediss://",
        )?;
        redis::Client::open(self.url.expose()).map_err(|e| {
            invalid(
                "redis.url",
                format!(
                    "not a usable Redis URL ({})",
                    crate::secret::redact_url(&e.to_string())
                ),
            )
        })?;
        Ok(())
    }

    fn validate_rest(&self) -> Result<(), ConfigError> {
        check_template("redis.key", &self.key)?;
        if let Some(dl) = &self.dead_letter_key {
            check_template("redis.dead_letter_key", dl)?;
        }
        if self.max_len == Some(0) {
            return Err(invalid(
                "redis.max_len",
                "must be at least 1 (leave it out to never trim the stream)",
            ));
        }
        if self.max_len.is_some() && self.mode == RedisMode::Pubsub {
            return Err(invalid(
                "redis.max_len",
                "only applies to redis.mode = \"stream\" (pub/sub keeps nothing to trim)",
            ));
        }
        Ok(())
    }
}

/// A key template: not empty or blank, and no `{…}` placeholder but `{aggregate_type}`.
fn check_template(key: &'static str, template: &str) -> Result<(), ConfigError> {
    if template.trim().is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    let rest = template.replace(AGGREGATE_TYPE, "");
    if let Some(start) = rest.find('{') {
        if rest[start..].contains('}') {
            return Err(invalid(
                key,
                format!("{template:?} holds a placeholder other than {AGGREGATE_TYPE}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RedisConfig {
        RedisConfig {
            url: default_url(),
            url_file: None,
            mode: RedisMode::Stream,
            key: default_key(),
            dead_letter_key: None,
            max_len: None,
        }
    }

    fn err_of(c: &RedisConfig) -> String {
        c.validate(&[]).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_valid() {
        cfg().validate(&[]).unwrap();
        let mut c = cfg();
        c.url = Secret::new("rediss://user:pw@cache.example:6380/2");
        c.dead_letter_key = Some("outbox.dead.{aggregate_type}".into());
        c.max_len = Some(100_000);
        c.validate(&[]).unwrap();
    }

    #[test]
    fn bad_values_name_their_key() {
        let mut c = cfg();
        c.url = Secret::new("http://u:hunter2@h:6379");
        let e = err_of(&c);
        assert!(e.contains("redis.url") && e.contains("redis://"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        c.url = Secret::new("not a url");
        assert!(err_of(&c).contains("redis.url"));

        let mut c = cfg();
        c.key = "  ".into();
        assert!(err_of(&c).contains("redis.key"));
        c.key = "outbox.{event_type}".into();
        let e = err_of(&c);
        assert!(e.contains("redis.key") && e.contains("placeholder"), "{e}");

        let mut c = cfg();
        c.dead_letter_key = Some(String::new());
        assert!(err_of(&c).contains("redis.dead_letter_key"));

        let mut c = cfg();
        c.max_len = Some(0);
        assert!(err_of(&c).contains("redis.max_len"));
        c.max_len = Some(10);
        c.mode = RedisMode::Pubsub;
        assert!(err_of(&c).contains("redis.max_len"));
    }

    #[test]
    fn mode_parses_lowercase_only() {
        #[derive(Deserialize)]
        struct W {
            mode: RedisMode,
        }
        let w: W = serde_json::from_str(r#"{"mode":"pubsub"}"#).unwrap();
        assert_eq!(w.mode, RedisMode::Pubsub);
        assert!(serde_json::from_str::<W>(r#"{"mode":"list"}"#).is_err());
        assert_eq!(RedisMode::Stream.to_string(), "stream");
    }
}
