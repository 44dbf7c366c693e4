//! What a Redis error means for one message: a server error reply about the command
//! (`WRONGTYPE`, `NOPERM`, …) is `Rejected` naming the key; a lost connection, a
//! timeout, or a server that cannot take writes right now (`LOADING`, `OOM`,
//! `READONLY`, `MISCONF`, …) is `Unavailable`. Texts are redacted of URL secrets.

use redis::{ErrorKind, RedisError};

use crate::secret::redact_url;
use crate::sink::SinkError;

/// Server error codes that say the server cannot take writes now, not that this
/// message is wrong: the relay waits and sends it again without spending an attempt.
const NOT_ABOUT_THE_MESSAGE: [&str; 12] = [
    "LOADING",
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "READONLY",
    "OOM",
    "MISCONF",
    "NOAUTH",
    "WRONGPASS",
    "NOREPLICAS",
    "UNBLOCKED",
];

/// The outcome of `what` (e.g. `XADD to stream "outbox.order"`) failing with `e`.
pub fn classify(what: &str, e: &RedisError) -> SinkError {
    match server_code(e) {
        Some(code) if !NOT_ABOUT_THE_MESSAGE.contains(&code) => SinkError::Rejected(format!(
            "Redis refused {what}: {}",
            redact_url(&server_text(e))
        )),
        Some(_) => unavailable(format!("Redis cannot take {what} now: {}", server_text(e))),
        None => unavailable(format!("{what}: {e}")),
    }
}

/// The error code of a server error reply, or `None` for a client-side error (I/O,
/// timeout, parse, …).
fn server_code(e: &RedisError) -> Option<&str> {
    match e.kind() {
        ErrorKind::IoError
        | ErrorKind::ClientError
        | ErrorKind::ParseError
        | ErrorKind::TypeError
        | ErrorKind::InvalidClientConfig
        | ErrorKind::AuthenticationFailed => None,
        _ => e.code(),
    }
}

/// `CODE detail`, as the server wrote it.
fn server_text(e: &RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        _ => e.to_string(),
    }
}

pub fn unavailable(why: impl Into<String>) -> SinkError {
    SinkError::Unavailable(redact_url(&why.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How redis-rs represents an error reply it has no kind of its own for.
    fn server(code: &str, detail: &str) -> RedisError {
        redis::make_extension_error(code.to_string(), Some(detail.to_string()))
    }

    #[test]
    fn a_reply_about_the_message_is_a_rejection_naming_the_key() {
        let e = server(
            "WRONGTYPE",
            "Operation against a key holding the wrong kind of value",
        );
        let out = classify("XADD to stream \"outbox.order\"", &e);
        let SinkError::Rejected(why) = out else {
            panic!("{out:?}")
        };
        assert!(
            why.contains("outbox.order") && why.contains("WRONGTYPE"),
            "{why}"
        );
        let e = RedisError::from((ErrorKind::ResponseError, "", "bad".to_string()));
        assert!(matches!(classify("x", &e), SinkError::Rejected(_)));
    }

    #[test]
    fn server_state_and_connection_errors_are_unavailable() {
        for code in ["LOADING", "OOM", "READONLY", "MISCONF", "NOAUTH"] {
            let e = server(code, "whatever");
            assert!(classify("x", &e).is_retryable(), "{code}");
        }
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(classify("x", &io).is_retryable());
        let busy = RedisError::from((ErrorKind::BusyLoadingError, "loading"));
        assert!(classify("x", &busy).is_retryable());
    }
}
