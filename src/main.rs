//! The `outbox-relay` binary: command line, logging, exit codes (2 = fix your config,
//! schema or dependencies; 1 = unexpected failure).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outbox_relay::app::{self, AppError};
use outbox_relay::commands;
use outbox_relay::config::Settings;

#[derive(Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Transactional outbox relay: Postgres → RabbitMQ / Kafka"
)]
struct Cli {
    /// TOML config file (env vars OUTBOX_RELAY__SECTION__KEY override it).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay daemon.
    Run,
    /// Apply the embedded SQL migrations (idempotent).
    Migrate,
    /// Counts per status, oldest pending age, blocked aggregates, recent failures.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Set FAILED rows back to PENDING with attempts = 0.
    Replay {
        #[arg(long = "id", value_name = "ID", num_args = 1..)]
        ids: Vec<i64>,
        #[arg(long, conflicts_with = "ids")]
        all_failed: bool,
    },
    /// Give FAILED rows up for good (kept for audit) so their aggregate moves on.
    Discard {
        #[arg(long = "id", value_name = "ID", num_args = 1.., required = true)]
        ids: Vec<i64>,
    },
    /// Validate the config, reach the database and the broker; exit 0 or 2.
    Check,
    /// Migrate, write sample order events, relay them, read them back, print what arrived.
    Demo {
        /// Number of events to write.
        #[arg(long, default_value_t = 2000)]
        events: u32,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,sqlx::postgres::notice=warn,lapin=error,pinky_swear=error",
        )
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stdout().is_terminal() {
        builder.init();
    } else {
        builder.json().flatten_event(true).init();
    }
}

/// One-shot commands die quietly on a closed stdout (`outbox-relay status | head -1`), as
/// Unix tools do, instead of panicking on `EPIPE`. The daemon (`run`) keeps Rust's default
/// (SIGPIPE ignored): a peer closing a socket must never kill it.
fn die_on_closed_pipe() {
    // SAFETY: called once at start, before any thread exists; SIG_DFL is a valid handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run) {
        die_on_closed_pipe();
    }
    init_logging();
    let result = (|| -> anyhow::Result<Result<(), AppError>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        Ok(runtime.block_on(dispatch(cli)))
    })();
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("outbox-relay: error: {e}");
            tracing::error!(error = %e, "exiting");
            ExitCode::from(e.exit_code() as u8)
        }
        Err(e) => {
            eprintln!("outbox-relay: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn dispatch(cli: Cli) -> Result<(), AppError> {
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Run => app::run(settings).await,
        Command::Migrate => commands::migrate(&settings).await,
        Command::Status { json } => commands::status(&settings, json).await,
        Command::Replay { ids, all_failed } => commands::replay(&settings, &ids, all_failed).await,
        Command::Discard { ids } => commands::discard(&settings, &ids).await,
        Command::Check => commands::check(&settings).await,
        Command::Demo { events } => commands::demo::run(&settings, events).await,
    }
}
