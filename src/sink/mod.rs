//! The seam between the relay engine and a broker. The engine sees only the `Sink` trait,
//! `Confirm` and `SinkError`; lapin, rdkafka, async-nats, redis-rs and AWS SDK types stay
//! inside their own submodule, and each broker's submodule owns its config section
//! (`<broker>::config`: keys, defaults, validation).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::model::Message;

pub mod aws;
pub mod kafka;
pub mod nats;
pub mod rabbitmq;
pub mod redis;
mod tap;

pub use tap::Arrival;

/// Why a message was not confirmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// The broker refused this message (nack, unroutable, unknown exchange/topic, too
    /// large, …). Counts an attempt; retried with backoff until `max_attempts`.
    #[error("{0}")]
    Rejected(String),
    /// The broker could not be reached, or the connection broke before it answered.
    /// Spends no attempt: the message was not judged, and will be sent again.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

impl SinkError {
    /// `true` for errors that say nothing about the message (retry without counting).
    pub fn is_retryable(&self) -> bool {
        matches!(self, SinkError::Unavailable(_))
    }
}

/// The broker's answer for one sent message: resolves to `Ok(())` once the broker has
/// confirmed it durably (for RabbitMQ: acked and routed), or to why not.
pub type Confirm = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send + 'static>>;

/// A confirm that is already decided (a message refused before it was sent).
pub fn decided(result: Result<(), SinkError>) -> Confirm {
    Box::pin(std::future::ready(result))
}

/// A broker publisher with confirms, two-phase: `send` hands one message over and
/// returns its `Confirm`; the engine keeps many confirms outstanding at once.
///
/// Contract:
/// - `send` returns `Err` only when nothing was handed to the broker (the message was
///   refused before sending, or there is no connection); once it returns `Ok`, the
///   message may reach the broker whatever its `Confirm` later says;
/// - messages sent while earlier confirms are outstanding belong to other aggregates
///   (the engine keeps at most one unconfirmed message per aggregate), so a sink need
///   not preserve order between outstanding messages;
/// - `close` abandons every outstanding message: afterwards none of them can still be
///   delivered by this sink (the connection is gone / the producer's queue purged).
pub trait Sink: Send + 'static {
    /// Connect (or reconnect) if not connected; declare what must exist at start.
    fn connect(&mut self) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Hand one message to the broker.
    fn send(
        &mut self,
        message: &Message,
    ) -> impl Future<Output = Result<Confirm, SinkError>> + Send;

    /// Send a row that ended `FAILED` to the dead-letter target, carrying `error` as a
    /// header. `Ok(None)` when no dead-letter target is configured.
    fn dead_letter(
        &mut self,
        message: &Message,
        error: &str,
    ) -> impl Future<Output = Result<Option<Confirm>, SinkError>> + Send;

    /// Whether the broker connection is up, without sending anything (cheap).
    fn is_connected(&self) -> bool;

    /// Ask the broker, without sending a message, whether it still answers: at most one
    /// cheap round trip, answered within `within`. The engine calls it about once a
    /// second while nothing is out, so an outage shows on an idle relay. The returned
    /// future does not borrow the sink. By default: the connection state only.
    fn probe(&self, within: Duration) -> Confirm {
        let _ = within;
        decided(if self.is_connected() {
            Ok(())
        } else {
            Err(SinkError::Unavailable("not connected".into()))
        })
    }

    /// How long the engine waits for a confirm before it treats the broker as stalled,
    /// given `relay.publish_timeout`. A sink whose client times messages out itself
    /// answers later than that client would.
    fn confirm_timeout(&self, publish_timeout: Duration) -> Duration {
        publish_timeout
    }

    /// Drop the connection (graceful shutdown, after a stall, or to abandon what is
    /// outstanding).
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}
