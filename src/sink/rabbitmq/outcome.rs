//! What lapin's answers mean for one message: a publisher confirm or a lapin error
//! becomes `Ok`, a `Rejected` (the broker judged the message) or an `Unavailable` (the
//! channel or connection broke first); error texts are redacted of URL secrets.

use lapin::publisher_confirm::Confirmation;

use crate::sink::SinkError;

/// What a publisher confirm says about one message.
pub(super) fn confirmation(c: Result<Confirmation, lapin::Error>) -> Result<(), SinkError> {
    match c {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(ret))) | Ok(Confirmation::Nack(Some(ret))) => {
            Err(SinkError::Rejected(format!(
                "unroutable: no queue is bound to exchange {:?} for routing key {:?} (returned {} {})",
                ret.delivery.exchange.as_str(),
                ret.delivery.routing_key.as_str(),
                ret.reply_code,
                ret.reply_text.as_str()
            )))
        }
        Ok(Confirmation::Nack(None)) => {
            Err(SinkError::Rejected("the broker nacked the message".into()))
        }
        Ok(Confirmation::NotRequested) => Err(SinkError::Rejected(
            "publisher confirms are not enabled on the channel".into(),
        )),
        Err(e) => Err(broken(&e)),
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
