//! What a NATS or JetStream error means for the row: `Rejected` (JetStream judged this
//! message) or `Unavailable` (no answer, the connection broke, JetStream not ready), with
//! a readable reason that never holds a credential (the client only ever sees the URL
//! without its userinfo).

use std::time::Duration;

use async_nats::jetstream::context::{
    GetStreamByNameError, GetStreamByNameErrorKind, PublishError, PublishErrorKind,
};

use crate::sink::SinkError;

/// The verdict on a publish (or its ack) to `subject` that failed.
pub(super) fn publish_failed(e: &PublishError, subject: &str, timeout: Duration) -> SinkError {
    let u = |why: String| SinkError::Unavailable(why);
    match e.kind() {
        PublishErrorKind::StreamNotFound => u(format!(
            "no JetStream stream answered for subject {subject:?} (no responders); the relay looks its stream up again before the next try"
        )),
        PublishErrorKind::TimedOut => u(format!(
            "no JetStream publish ack for subject {subject:?} within {timeout:?}"
        )),
        PublishErrorKind::BrokenPipe => u(format!(
            "the NATS connection closed before the publish ack for subject {subject:?} arrived"
        )),
        PublishErrorKind::MaxAckPending => u("too many publish acks outstanding".into()),
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => {
            SinkError::Rejected(format!("JetStream refused the message for subject {subject:?}: {e}"))
        }
        PublishErrorKind::Other => match jetstream_error(e) {
            // 503: JetStream is not ready, out of resources or unavailable right now.
            Some(js) if js.code() >= 500 => u(format!(
                "JetStream could not take the message for subject {subject:?} now: {js}"
            )),
            Some(js) => SinkError::Rejected(format!(
                "JetStream refused the message for subject {subject:?}: {js}"
            )),
            None => u(format!("publish to subject {subject:?} failed: {e}")),
        },
    }
}

/// The JetStream API error a publish failed with, if that is what it was.
fn jetstream_error(e: &PublishError) -> Option<&async_nats::jetstream::Error> {
    std::error::Error::source(e)?.downcast_ref::<async_nats::jetstream::Error>()
}

/// The verdict on asking JetStream which stream captures `subject`.
pub(super) fn lookup_failed(e: &GetStreamByNameError, subject: &str) -> SinkError {
    match e.kind() {
        GetStreamByNameErrorKind::NotFound => SinkError::Rejected(format!(
            "no JetStream stream captures subject {subject:?}: add it to a stream's subjects (the relay never creates streams)"
        )),
        GetStreamByNameErrorKind::InvalidSubject => {
            SinkError::Rejected(format!("{subject:?} is not a valid NATS subject"))
        }
        _ => SinkError::Unavailable(format!(
            "cannot ask JetStream which stream captures subject {subject:?}: {e}"
        )),
    }
}
