//! The `[sqs]` and `[sns]` config sections: their keys, their defaults, and their
//! validation (run by `Settings` when `sink.kind = "sqs"` / `"sns"`). Credentials are
//! not configured here: they come from the standard AWS chain (env, profile files, web
//! identity, container / instance metadata) and are never printed.

use serde::Deserialize;

use crate::checks::{invalid, ConfigError};

/// The region used when `region` is not set.
const DEFAULT_REGION: &str = "us-east-1";

fn default_region() -> String {
    DEFAULT_REGION.into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqsConfig {
    /// Where rows without a `destination` go; a URL ending `.fifo` is a FIFO queue.
    #[serde(default)]
    pub queue_url: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// Optional, e.g. a local emulator (`http://127.0.0.1:5000`); empty = AWS itself.
    #[serde(default)]
    pub endpoint_url: String,
    /// Where rows that end `FAILED` are also sent (optional).
    #[serde(default)]
    pub dead_letter_queue_url: Option<String>,
}

impl Default for SqsConfig {
    fn default() -> Self {
        Self {
            queue_url: String::new(),
            region: default_region(),
            endpoint_url: String::new(),
            dead_letter_queue_url: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnsConfig {
    /// Where rows without a `destination` go; an ARN ending `.fifo` is a FIFO topic.
    #[serde(default)]
    pub topic_arn: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// Optional, e.g. a local emulator; empty = AWS itself.
    #[serde(default)]
    pub endpoint_url: String,
    /// Where rows that end `FAILED` are also published (optional).
    #[serde(default)]
    pub dead_letter_topic_arn: Option<String>,
}

impl Default for SnsConfig {
    fn default() -> Self {
        Self {
            topic_arn: String::new(),
            region: default_region(),
            endpoint_url: String::new(),
            dead_letter_topic_arn: None,
        }
    }
}

impl SqsConfig {
    /// Check every value of the section, naming the key of the first bad one. The
    /// default queue is required: a row's `destination` may name another queue, but a
    /// row without one must have somewhere to go (and `check` probes this queue).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.queue_url.trim().is_empty() {
            return Err(invalid(
                "sqs.queue_url",
                "must be set: the queue URL rows without a destination go to (https://sqs.<region>.amazonaws.com/<account>/<name>)",
            ));
        }
        check_queue_url(&self.queue_url).map_err(|m| invalid("sqs.queue_url", m))?;
        check_region(&self.region).map_err(|m| invalid("sqs.region", m))?;
        check_endpoint(&self.endpoint_url).map_err(|m| invalid("sqs.endpoint_url", m))?;
        if let Some(dlq) = &self.dead_letter_queue_url {
            check_queue_url(dlq).map_err(|m| invalid("sqs.dead_letter_queue_url", m))?;
        }
        Ok(())
    }
}

impl SnsConfig {
    /// Check every value of the section, naming the key of the first bad one (the
    /// default topic is required, as `sqs.queue_url` is).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.topic_arn.trim().is_empty() {
            return Err(invalid(
                "sns.topic_arn",
                "must be set: the topic ARN rows without a destination go to (arn:aws:sns:<region>:<account>:<name>)",
            ));
        }
        check_topic_arn(&self.topic_arn).map_err(|m| invalid("sns.topic_arn", m))?;
        check_region(&self.region).map_err(|m| invalid("sns.region", m))?;
        check_endpoint(&self.endpoint_url).map_err(|m| invalid("sns.endpoint_url", m))?;
        if let Some(dlt) = &self.dead_letter_topic_arn {
            check_topic_arn(dlt).map_err(|m| invalid("sns.dead_letter_topic_arn", m))?;
        }
        Ok(())
    }
}

/// An SQS queue URL: `http(s)://host/<account>/<name>`. Also what a row's
/// `destination` must be for the SQS sink.
pub fn check_queue_url(url: &str) -> Result<(), String> {
    let u = url::Url::parse(url.trim())
        .map_err(|e| format!("{url:?} is not a queue URL ({e}); expected https://sqs.<region>.amazonaws.com/<account>/<name>"))?;
    if !matches!(u.scheme(), "https" | "http") {
        return Err(format!(
            "{url:?} is not a queue URL: the scheme must be https:// (or http:// for an emulator)"
        ));
    }
    if u.username() != "" || u.password().is_some() {
        return Err(
            "a queue URL must not hold credentials (they come from the AWS credential chain)"
                .into(),
        );
    }
    let segments: Vec<&str> = u
        .path_segments()
        .map(|s| s.filter(|p| !p.is_empty()).collect())
        .unwrap_or_default();
    match segments.as_slice() {
        [_account, name] if valid_name(name) => Ok(()),
        _ => Err(format!(
            "{url:?} is not a queue URL: expected https://sqs.<region>.amazonaws.com/<account>/<name> (name: 1 to 80 letters, digits, - or _, FIFO queues ending .fifo)"
        )),
    }
}

/// An SNS topic ARN: `arn:<partition>:sns:<region>:<account>:<name>`. Also what a row's
/// `destination` must be for the SNS sink.
pub fn check_topic_arn(arn: &str) -> Result<(), String> {
    let parts: Vec<&str> = arn.split(':').collect();
    match parts.as_slice() {
        ["arn", partition, "sns", region, account, name]
            if !partition.is_empty()
                && !region.is_empty()
                && !account.is_empty()
                && valid_name(name) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "{arn:?} is not an SNS topic ARN: expected arn:aws:sns:<region>:<account>:<name> (name: 1 to 256 letters, digits, - or _, FIFO topics ending .fifo)"
        )),
    }
}

/// A queue or topic name: letters, digits, `-`, `_`, optionally ending `.fifo`.
fn valid_name(name: &str) -> bool {
    let base = name.strip_suffix(".fifo").unwrap_or(name);
    !base.is_empty()
        && name.len() <= 256
        && base
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn check_region(region: &str) -> Result<(), String> {
    let ok = !region.is_empty()
        && region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{region:?} is not an AWS region (e.g. \"us-east-1\")"
        ))
    }
}

fn check_endpoint(endpoint: &str) -> Result<(), String> {
    if endpoint.trim().is_empty() {
        return Ok(());
    }
    let u = url::Url::parse(endpoint).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(u.scheme(), "https" | "http") {
        return Err(format!(
            "scheme must be http:// or https://, got {}://",
            u.scheme()
        ));
    }
    if u.username() != "" || u.password().is_some() {
        return Err("must not hold credentials (they come from the AWS credential chain)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::key_of;

    #[test]
    fn sqs_section_is_checked() {
        let mut c = SqsConfig::default();
        assert_eq!(key_of(c.validate().unwrap_err()), "sqs.queue_url");
        c.queue_url = "https://sqs.us-east-1.amazonaws.com/123456789012/orders".into();
        c.validate().unwrap();
        c.queue_url = "http://127.0.0.1:5000/123456789012/orders.fifo".into();
        c.endpoint_url = "http://127.0.0.1:5000".into();
        c.validate().unwrap();
        for bad in [
            "orders",
            "ftp://h/1/q",
            "https://h/q",
            "https://h/1/q!",
            "https://u:p@h/1/q",
        ] {
            c.queue_url = bad.into();
            assert_eq!(key_of(c.validate().unwrap_err()), "sqs.queue_url", "{bad}");
        }
        c.queue_url = "https://h/1/q".into();
        c.region = "US East".into();
        assert_eq!(key_of(c.validate().unwrap_err()), "sqs.region");
        c.region = "eu-west-1".into();
        c.endpoint_url = "localhost:5000".into();
        assert_eq!(key_of(c.validate().unwrap_err()), "sqs.endpoint_url");
        c.endpoint_url = String::new();
        c.dead_letter_queue_url = Some("dlq".into());
        assert_eq!(
            key_of(c.validate().unwrap_err()),
            "sqs.dead_letter_queue_url"
        );
    }

    #[test]
    fn sns_section_is_checked() {
        let mut c = SnsConfig::default();
        assert_eq!(key_of(c.validate().unwrap_err()), "sns.topic_arn");
        c.topic_arn = "arn:aws:sns:us-east-1:123456789012:orders".into();
        c.validate().unwrap();
        c.topic_arn = "arn:aws-cn:sns:cn-north-1:123456789012:orders.fifo".into();
        c.validate().unwrap();
        for bad in [
            "orders",
            "arn:aws:sqs:us-east-1:1:q",
            "arn:aws:sns:us-east-1:1:",
            "arn:aws:sns::1:t",
        ] {
            c.topic_arn = bad.into();
            assert_eq!(key_of(c.validate().unwrap_err()), "sns.topic_arn", "{bad}");
        }
        c.topic_arn = "arn:aws:sns:us-east-1:1:t".into();
        c.dead_letter_topic_arn = Some("https://x/1/q".into());
        assert_eq!(
            key_of(c.validate().unwrap_err()),
            "sns.dead_letter_topic_arn"
        );
    }
}
