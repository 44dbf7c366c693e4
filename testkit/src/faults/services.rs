//! Local services under attack: shell helpers for Postgres and RabbitMQ, guards that
//! restore a stopped or blocked service even when a test panics, and the relay's
//! Postgres backends.

use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::pg_url;

/// Run a command, return whether it succeeded (output goes to the test's output).
pub fn sh(program: &str, args: &[&str]) -> bool {
    std::process::Command::new(program)
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn rabbitmqctl(args: &[&str]) {
    assert!(sh("rabbitmqctl", args), "rabbitmqctl {args:?} failed");
}

/// The local Postgres cluster's version directory (`ls /etc/postgresql`).
pub fn pg_version() -> String {
    std::fs::read_dir("/etc/postgresql")
        .expect("/etc/postgresql")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .max()
        .expect("a Postgres cluster")
}

pub fn pg_ctlcluster(action: &str) -> bool {
    sh(
        "pg_ctlcluster",
        &["--skip-systemctl-redirect", &pg_version(), "main", action],
    )
}

/// Block until Postgres accepts connections again (or `within` passes).
pub fn wait_pg_ready(within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if sh("pg_isready", &["-h", "127.0.0.1", "-p", "5432", "-q"]) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// Starts Postgres again if it is not running, even if the test panics.
pub struct PgStartOnDrop;
impl Drop for PgStartOnDrop {
    fn drop(&mut self) {
        if !sh("pg_isready", &["-h", "127.0.0.1", "-p", "5432", "-q"]) {
            let _ = pg_ctlcluster("start");
            wait_pg_ready(Duration::from_secs(60));
        }
    }
}

/// Starts the RabbitMQ app again, even if the test panics.
pub struct StartAppOnDrop;
impl Drop for StartAppOnDrop {
    fn drop(&mut self) {
        let _ = sh("rabbitmqctl", &["-q", "start_app"]);
        let _ = sh("rabbitmqctl", &["-q", "await_startup"]);
    }
}

/// Puts RabbitMQ's memory watermark back to 0.4 (clearing a forced alarm), even on panic.
pub struct WatermarkOnDrop;
impl Drop for WatermarkOnDrop {
    fn drop(&mut self) {
        let _ = sh(
            "rabbitmqctl",
            &["-q", "set_vm_memory_high_watermark", "0.4"],
        );
    }
}

/// Kill every backend of the relay (`application_name = 'outbox-relay'`: its pool and its
/// LISTEN connection). Returns how many were terminated.
pub async fn terminate_relay_backends(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity
         WHERE application_name = 'outbox-relay' AND pid <> pg_backend_pid()) t WHERE ok",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(0)
}

/// Number of relay backends currently LISTENing (the wake-up connection, whose last
/// statement is its LISTEN or a doorbell lock).
pub async fn relay_listeners(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE application_name = 'outbox-relay'
           AND (query ILIKE 'LISTEN%' OR query ILIKE '%advisory_lock%' OR query ILIKE '%advisory_unlock%')",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(0)
}

/// A fresh pool on the test database (after a restart the old one may hold dead sockets).
pub async fn fresh_pool() -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&pg_url())
        .await
        .expect("connect postgres")
}
