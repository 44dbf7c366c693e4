//! The seam between the relay loop and a broker. The loop sees only the `Sink` trait and
//! `SinkError`; lapin and rdkafka types stay inside their own submodule.

use std::future::Future;

use crate::model::Message;

pub mod kafka;
pub mod rabbitmq;

/// Why a message was not confirmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// The broker refused this message (nack, unroutable, unknown exchange/topic, too
    /// large, …). Counts an attempt; retried with backoff until `max_attempts`.
    #[error("{0}")]
    Rejected(String),
    /// The broker could not be reached, or did not answer in time. Spends no attempt: the
    /// message was not judged, and will be sent again after reconnecting.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

impl SinkError {
    /// `true` for errors that say nothing about the message (retry without counting).
    pub fn is_retryable(&self) -> bool {
        matches!(self, SinkError::Unavailable(_))
    }
}

/// A broker publisher with confirms.
///
/// Contract: `publish` returns one result per message, in the same order; `Ok(())` means
/// the broker confirmed that message durably (and, for RabbitMQ, routed it). Messages of
/// one call belong to distinct aggregates, so the sink may send them concurrently.
pub trait Sink: Send + 'static {
    /// Connect (or reconnect) if not connected; declare what must exist at start.
    fn connect(&mut self) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Publish all messages with many in flight, and wait for every confirm.
    fn publish(
        &mut self,
        messages: &[Message],
    ) -> impl Future<Output = Vec<Result<(), SinkError>>> + Send;

    /// Publish a row that ended `FAILED` to the dead-letter target, if one is configured,
    /// carrying `error` as a header. `Ok(false)` when none is configured.
    fn dead_letter(
        &mut self,
        message: &Message,
        error: &str,
    ) -> impl Future<Output = Result<bool, SinkError>> + Send;

    /// Drop the connection (graceful shutdown, or after a stall).
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}
