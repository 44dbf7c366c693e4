//! outbox-relay: a transactional outbox relay. Producers commit an outbox row with their
//! business rows; the relay publishes committed rows to RabbitMQ, Kafka, NATS JetStream,
//! Redis, SQS or SNS with broker confirms and marks them `PROCESSED` (or `FAILED` after its
//! retries).
//!
//! Layout (each stage is a module; brokers stay behind the `Sink` seam):
//! - `config`   — typed settings: defaults → TOML → env, validated; the composition of
//!   the sections (the sink sections' types and checks live with their sink)
//! - `checks`   — `ConfigError` and the value checks `config` and every sink section share
//! - `secret`   — the `Secret` type, redaction of URLs and text, the log scrubber
//! - `table`    — the configured table name and the relay tables derived from it
//! - `migrate`  — embedded SQL migrations and the start-up schema check
//! - `model`    — the outbox row and the validated wire `Message`
//! - `store`    — Postgres: claim, mark, parked rows, leases (`store::leases`), operator
//!   queries (`store::admin`), connections (the hot path's own pool: `store::pool`), rows
//!   whose text cannot be sent in UTF-8 (`store::unreadable`), the tenant probe
//!   (`store::tenants`)
//! - `sink`     — the `Sink` trait; `sink::rabbitmq` (lapin), `sink::kafka` (rdkafka),
//!   `sink::nats` (async-nats, JetStream), `sink::redis` (redis-rs: streams, pub/sub),
//!   `sink::aws` (the AWS SDK: `sqs` and `sns` through one batcher), each owning its config
//!   section(s) (`<broker>::config`) and a demo reader (`tap`, giving `sink::Arrival`)
//! - `relay`    — the engine: claimer, per-aggregate window, fairness between types
//!   (`relay::tenants`), dispatch, completer, leases
//!   and the partitions they give, doorbell (when to ask for NOTIFY), idle probes,
//!   backoff, wake-ups
//! - `wiring`   — what `run` and the commands share: the configured sink as one
//!   `AnySink` (the only dispatch over broker kinds), the instance name, `AppError`
//! - `maintenance` — leader-only services (the holder of partition 0): backlog gauges,
//!   retention
//! - `app`      — the daemon, `run(settings, listener, shutdown)` (in-process in tests;
//!   `run_until_signalled` binds `http.listen` and waits for SIGTERM/SIGINT): tasks,
//!   HTTP, maintenance, graceful shutdown
//! - `http`, `health`, `metrics` — `/livez`, `/readyz`, `/metrics`
//! - `commands` — `migrate`, `check` (and `check --offline`), `status`, `replay`,
//!   `discard`, `demo`

pub mod app;
pub mod checks;
pub mod commands;
pub mod config;
pub mod health;
pub mod http;
mod maintenance;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod relay;
pub mod secret;
pub mod sink;
pub mod store;
pub mod table;
pub mod wiring;
