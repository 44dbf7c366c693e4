//! Shared support of the integration tests, in one place: every `tests/*.rs` binary uses
//! what it needs from here (`use outbox_relay_testkit::{db::*, rabbit::*, …}`).
//!
//! - [`db`]: a unique migrated outbox table per test (`TestTable`) and its rows;
//! - [`rabbit`]: a unique exchange and queue per test (`TestBroker`), consumed messages;
//! - [`aws`]: the AWS emulator (moto): unique queues and topics, reading them back;
//! - [`kafka`]: the Kafka reader, a background collector, topics, a private tansu broker;
//! - [`nats`]: NATS JetStream: a unique stream per test, its messages, the server's stop/start;
//! - [`relay_proc`]: the relay binary as a child process (`RelayProc`) and its env;
//! - [`inproc`]: the relay loop in a task (`Running`) and a counting sink wrapper;
//! - [`wait`]: the one polling wait with a deadline;
//! - [`order`]: the one per-aggregate order check of first deliveries;
//! - [`faults`]: the ledger of an attack, producers, a TCP proxy, service guards;
//! - [`recording`]: a scriptable in-process sink that records every send;
//! - [`redis`]: the test Redis, unique keys per test, stream and channel readers.
//!
//! Services are the machine's own (see `scripts/services.sh`); tests isolate themselves
//! by unique names, never by owning a service, and remove what they made — at their end,
//! or from `Drop` when they panic first (`teardown`).

pub mod aws;
pub mod db;
pub mod faults;
pub mod inproc;
pub mod kafka;
pub mod nats;
pub mod order;
pub mod rabbit;
pub mod recording;
pub mod redis;
pub mod relay_proc;
mod teardown;
pub mod wait;

/// The test database (`TEST_DATABASE_URL`, default the local `test` database).
pub fn pg_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The test broker (`TEST_AMQP_URL`, default the local RabbitMQ).
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// `prefix` with a random suffix: a name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:08x}", rand::random::<u32>())
}

/// 12 random hex digits (for Kafka topic and instance names).
pub fn hex_id() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}
