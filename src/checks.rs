//! `ConfigError` and the value checks every config section shares (`invalid`, `check_url`):
//! what `config::Settings` and each sink's own config section (`sink::<x>::config`) report
//! with. A leaf module: it names neither `config` nor `sink`, so both can use it.

use crate::secret::Secret;

/// Why the configuration cannot be used. Always names the key (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Load(String),
    #[error("config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    /// A `kafka.properties.<name>` entry that would weaken the guarantees.
    #[error("{0}")]
    Property(String),
}

/// The key an `Invalid` error names (tests: anything else is a failure).
#[cfg(test)]
pub(crate) fn key_of(e: ConfigError) -> &'static str {
    match e {
        ConfigError::Invalid { key, .. } => key,
        other => panic!("expected an invalid key, got {other:?}"),
    }
}

/// The error for a bad value of `key`.
pub(crate) fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// `value` parses as a URL whose scheme is one of `schemes` (`wanted` in the error).
pub(crate) fn check_url(
    key: &'static str,
    value: &Secret,
    schemes: &[&str],
    wanted: &str,
) -> Result<(), ConfigError> {
    let u = url::Url::parse(value.expose()).map_err(|e| invalid(key, format!("not a URL: {e}")))?;
    if !schemes.contains(&u.scheme()) {
        return Err(invalid(
            key,
            format!("scheme must be {wanted}, got {}://", u.scheme()),
        ));
    }
    Ok(())
}
