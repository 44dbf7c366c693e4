//! `AppError`: why a command ended, keeping the layer's error as its source, and the
//! exit code it maps to.

use crate::checks::ConfigError;
use crate::migrate::MigrateError;
use crate::sink::SinkError;
use crate::store::StoreError;

/// Errors that end a command, each with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The schema is missing or older than this binary (or the migration failed).
    #[error(transparent)]
    Schema(#[from] MigrateError),
    #[error(transparent)]
    Database(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] SinkError),
    /// The command line or the environment cannot work as given.
    #[error("{0}")]
    Usage(String),
    /// Something failed while running (not the operator's to fix before starting).
    #[error("{0}")]
    Runtime(String),
}

impl AppError {
    /// 2 for anything the operator must fix before the command can work (bad config,
    /// missing migrations, unreachable dependency in `check`); 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            AppError::Runtime(_) => 1,
            _ => 2,
        }
    }
}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        AppError::Database(e.into())
    }
}
