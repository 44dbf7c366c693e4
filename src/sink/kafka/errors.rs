//! Error classification at the sink boundary (SPEC §3.3).
//!
//! librdkafka retries retriable errors itself until `message.timeout.ms`, so an error
//! that reaches a delivery report is either "the broker was not reached in time"
//! (`Unavailable`: spends no attempt) or a verdict on this message (`Rejected`: counts
//! an attempt). Anything not known to be about reachability is a verdict: an unknown
//! permanent error must fail its row after `max_attempts`, never stall the relay.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::sink::SinkError;

/// Errors that say the broker (or our connection to it) is not working, not that the
/// message is bad.
pub fn is_unavailable(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        // local: transport, timeouts, queue, shutdown, fatal producer state
        BrokerDestroy
            | BrokerTransportFailure
            | CriticalSystemResource
            | Resolve
            | MessageTimedOut
            | AllBrokersDown
            | OperationTimedOut
            | QueueFull
            | SSL
            | TimedOutQueue
            | Authentication
            | Interrupted
            | Retry
            | PurgeQueue
            | PurgeInflight
            | Fatal
            | Fenced
            | DestroyBroker
            | WaitingForCoordinator
            // broker: leadership, replication, throttling, producer-id state
            | LeaderNotAvailable
            | NotLeaderForPartition
            | RequestTimedOut
            | BrokerNotAvailable
            | ReplicaNotAvailable
            | NetworkException
            | NotEnoughReplicas
            | NotEnoughReplicasAfterAppend
            | NotController
            | KafkaStorageError
            | FencedLeaderEpoch
            | UnknownLeaderEpoch
            | PreferredLeaderNotAvailable
            | EligibleLeadersNotAvailable
            | ThrottlingQuotaExceeded
            | OutOfOrderSequenceNumber
            | InvalidProducerEpoch
            | UnknownProducerId
            | ProducerFenced
            | ConcurrentTransactions
            // the whole client is refused: credentials or cluster ACLs, fixed by an
            // operator; failing every row meanwhile would spend everyone's attempts
            | SaslAuthenticationFailed
            | IllegalSASLState
            | UnsupportedSASLMechanism
            | ClusterAuthorizationFailed
            | TransactionalIdAuthorizationFailed
    )
}

/// Turn an rdkafka error for a message to `topic` of `size` bytes into a `SinkError`.
pub fn classify(err: &KafkaError, topic: &str, size: usize) -> SinkError {
    match err.rdkafka_error_code() {
        Some(code) => classify_code(code, topic, size),
        // Not a librdkafka error code: a client-side problem (canceled, nul byte, …).
        None => SinkError::Unavailable(format!("topic {topic:?}: {err}")),
    }
}

/// The `SinkError` for a librdkafka error code; `Rejected` messages name the topic and
/// say what to do.
pub fn classify_code(code: RDKafkaErrorCode, topic: &str, size: usize) -> SinkError {
    use RDKafkaErrorCode::*;
    if is_unavailable(code) {
        return SinkError::Unavailable(format!("topic {topic:?}: {code} ({code:?})"));
    }
    let why = match code {
        MessageSizeTooLarge | MessageBatchTooLarge | InvalidMessageSize => format!(
            "message of {size} bytes is too large for topic {topic:?} (Kafka {code:?}: {code}); raise the topic's max.message.bytes or kafka.properties.message.max.bytes, or make the payload smaller"
        ),
        UnknownTopicOrPartition | UnknownTopic | UnknownPartition => format!(
            "topic {topic:?} does not exist (Kafka {code:?}); create it — the relay never creates a row's topic"
        ),
        InvalidTopic => format!("{topic:?} is not a valid Kafka topic name (Kafka InvalidTopic)"),
        TopicAuthorizationFailed => format!(
            "not authorized to write to topic {topic:?} (Kafka TopicAuthorizationFailed); grant the relay's principal WRITE on it"
        ),
        _ => format!("Kafka rejected the message for topic {topic:?}: {code} ({code:?})"),
    };
    SinkError::Rejected(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_spend_no_attempts() {
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::Fatal,
        ] {
            assert!(classify_code(code, "t", 1).is_retryable(), "{code:?}");
        }
    }

    #[test]
    fn verdicts_name_the_topic() {
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::InvalidTopic,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::MessageBatchTooLarge,
            RDKafkaErrorCode::InvalidRecord,
            RDKafkaErrorCode::InvalidMessage,
        ] {
            match classify_code(code, "orders.v1", 2048) {
                SinkError::Rejected(why) => assert!(why.contains("\"orders.v1\""), "{why}"),
                other => panic!("{code:?} -> {other:?}"),
            }
        }
        let SinkError::Rejected(why) =
            classify_code(RDKafkaErrorCode::MessageSizeTooLarge, "t", 2048)
        else {
            panic!()
        };
        assert!(why.contains("2048 bytes"), "{why}");
    }
}
