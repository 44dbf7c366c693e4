//! What lapin's answers mean for one message: a publisher confirm or a lapin error
//! becomes `Ok`, a `Rejected` (the broker judged the message: nacked, or returned —
//! matched by message id, `returns.rs`) or an `Unavailable` (the channel or connection
//! broke first); error texts are redacted of URL secrets.

use lapin::publisher_confirm::Confirmation;

use super::returns::Returns;
use crate::sink::SinkError;

/// What a publisher confirm says about message `id` (its `message_id`): a return is
/// judged by its message id, whichever confirm lapin attached it to (`Returns`).
pub(super) async fn judge(
    c: Result<Confirmation, lapin::Error>,
    id: &str,
    returns: &Returns,
) -> Result<(), SinkError> {
    let c = match c {
        Ok(c) => c,
        Err(e) => return Err(broken(&e)),
    };
    returns.keep(&c);
    if let Confirmation::NotRequested = c {
        return Err(SinkError::Rejected(
            "publisher confirms are not enabled on the channel".into(),
        ));
    }
    // The broker sends a message's return before its ack, but the ack that resolved this
    // confirm may have resolved others that hold it: let every confirm already resolved
    // hand in its return before this one is judged.
    tokio::task::yield_now().await;
    if let Some(why) = returns.take(id) {
        return Err(SinkError::Rejected(why));
    }
    match c {
        Confirmation::Nack(_) => Err(SinkError::Rejected("the broker nacked the message".into())),
        _ => Ok(()),
    }
}

/// The channel or connection broke before the broker answered: not a judgement on the
/// message (the engine finds out whether this message is what broke it).
pub(super) fn broken(e: &lapin::Error) -> SinkError {
    match channel_close_reason(e) {
        Some(reason) => unavailable(reason),
        None => unavailable(describe(e)),
    }
}

pub(super) fn unavailable(why: impl Into<String>) -> SinkError {
    SinkError::Unavailable(crate::secret::redact_url(&why.into()))
}

/// A channel-level error the broker raised because of a message (not a connection loss).
fn channel_close_reason(e: &lapin::Error) -> Option<String> {
    match e {
        lapin::Error::ProtocolError(amqp) => Some(format!(
            "RabbitMQ closed the channel: {} {}",
            amqp.get_id(),
            amqp.get_message().as_str()
        )),
        _ => None,
    }
}

pub(super) fn describe(e: &lapin::Error) -> String {
    match e {
        lapin::Error::ProtocolError(amqp) => {
            format!("{} {}", amqp.get_id(), amqp.get_message().as_str())
        }
        other => other.to_string(),
    }
}
