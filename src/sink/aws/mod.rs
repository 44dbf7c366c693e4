//! Amazon SQS and SNS sinks (AWS SDK for Rust): the SPEC §2 mapping (`wire`: body =
//! payload JSON text, String message attributes, FIFO group / deduplication ids, limits
//! checked before sending), a background `batcher` that sends `SendMessageBatch` /
//! `PublishBatch` requests of up to 10 entries per target, and one sink (`AwsSink`) over
//! them with a `Service` each for `sqs` and `sns`. SDK types stay inside this module.
//!
//! Invariants:
//! - a message is `Ok(())` only from the service's success for its own batch entry;
//! - a failed entry the service blames on the sender, or a missing queue / topic, is a
//!   `Rejected` naming it; throttling, service faults and transport errors are
//!   `Unavailable` (no attempt spent);
//! - a message over a service limit (10 attributes, 256 KiB) is refused before sending;
//! - credentials come from the standard AWS chain and never appear in errors or logs.

mod batcher;
mod client;
mod config;
mod sink;
mod sns;
mod sqs;
pub mod tap;
pub mod wire;

pub use config::{check_queue_url, check_topic_arn, SnsConfig, SqsConfig};
pub use sns::SnsSink;
pub use sqs::SqsSink;
