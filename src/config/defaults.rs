//! Built-in defaults of the configuration keys of `Settings`' own sections (the lowest
//! configuration layer; SPEC §5); each sink's section keeps its defaults in
//! `sink::<broker>::config`.

use std::time::Duration;

use super::{OnFailed, Secret, SinkKind};

pub(super) fn default_database_url() -> Secret {
    Secret::new("postgres://postgres@127.0.0.1:5432/test")
}
pub(super) fn default_table() -> String {
    "outbox".into()
}
pub(super) const fn default_max_connections() -> u32 {
    4
}
pub(super) const fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
pub(super) const fn default_batch_size() -> u32 {
    500
}
pub(super) const fn default_poll_interval() -> Duration {
    Duration::from_millis(500)
}
pub(super) const fn default_busy_poll_interval() -> Duration {
    Duration::from_millis(5)
}
pub(super) const fn default_max_attempts() -> u32 {
    10
}
pub(super) const fn default_backoff_initial() -> Duration {
    Duration::from_secs(1)
}
pub(super) const fn default_backoff_max() -> Duration {
    Duration::from_secs(300)
}
pub(super) const fn default_on_failed() -> OnFailed {
    OnFailed::Block
}
pub(super) const fn default_lease_timeout() -> Duration {
    Duration::from_secs(30)
}
pub(super) const fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(20)
}
pub(super) const fn default_retention() -> Duration {
    Duration::from_secs(24 * 3600)
}
pub(super) const fn default_max_in_flight() -> u32 {
    1000
}
pub(super) const fn default_max_in_flight_bytes() -> u64 {
    32 * 1024 * 1024
}
pub(super) const fn default_max_rows_per_aggregate() -> u32 {
    64
}
pub(super) const fn default_true() -> bool {
    true
}
pub(super) const fn default_sink_kind() -> SinkKind {
    SinkKind::Rabbitmq
}
pub(super) fn default_listen() -> String {
    "0.0.0.0:9187".into()
}
