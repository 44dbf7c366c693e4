//! What the demo's broker readers (`rabbitmq::tap`, `kafka::tap`) hand back: one event
//! as the consumer saw it, the same shape whichever broker it came from.

/// One event as the consumer saw it.
pub struct Arrival {
    pub event_id: String,
    pub aggregate_id: String,
    /// The broker-specific view of the message, for printing (indented lines).
    pub summary: String,
}

/// The value of header `name` among a message's `headers` (empty when absent).
pub fn header(headers: &[(String, String)], name: &str) -> String {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}
