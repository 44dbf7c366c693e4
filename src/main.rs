//! The `outbox-relay` binary: command line, logging, exit codes (2 = fix your config,
//! schema or dependencies; 1 = unexpected failure).
//!
//! Logging: `run` (the daemon) logs JSON lines when stdout is not a terminal; one-shot
//! commands log plain lines for a person and print their final error once. Whatever
//! `RUST_LOG` says, lapin, amq-protocol and pinky-swear log at most at `debug` (lapin
//! traces the AMQP login frame, credentials included), and every line written goes
//! through `secret::scrub` (URL passwords, `password=` parameters and every
//! configured secret value masked).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outbox_relay::app;
use outbox_relay::commands;
use outbox_relay::config::Settings;
use outbox_relay::secret;
use outbox_relay::wiring::AppError;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Transactional outbox relay: Postgres → RabbitMQ / Kafka / NATS JetStream / Redis / Amazon SQS / SNS"
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
    Check {
        /// Only load and validate the config as `run` would (env included); open no
        /// connection. `*_file` secrets that are not there are listed as unchecked.
        #[arg(long)]
        offline: bool,
    },
    /// Migrate, write sample order events, relay them, read them back, print what arrived.
    Demo {
        /// Number of events to write.
        #[arg(long, default_value_t = 2000)]
        events: u32,
        /// Write the sample events even into an outbox that holds rows the demo did not
        /// write (they are relayed to the configured broker like any other event).
        #[arg(long)]
        force: bool,
    },
}

/// Without `RUST_LOG`: our own events from `info`, lapin only its errors.
const DEFAULT_FILTER: &str = "info,sqlx::postgres::notice=warn,lapin=error,pinky_swear=error";

/// Without `RUST_LOG`, for one-shot commands: nothing from lapin at all. What matters of
/// a broker error reaches the command's own output through the error it returns; lapin's
/// own lines are noise there (under load, closing the connection can still log "invalid
/// channel" for a channel closed a moment before).
const COMMAND_FILTER: &str = "info,sqlx::postgres::notice=warn,lapin=off,pinky_swear=off";

/// Log targets capped whatever `RUST_LOG` asks (a prefix matches every module below
/// it): lapin traces every frame it writes, the login frame with the password among
/// them; amq-protocol and pinky-swear trace connection internals.
const CAPPED_TARGETS: [(&str, LevelFilter); 3] = [
    ("lapin", LevelFilter::DEBUG),
    ("amq_protocol", LevelFilter::DEBUG),
    ("pinky_swear", LevelFilter::DEBUG),
];

fn init_logging(daemon: bool) {
    let default = if daemon {
        DEFAULT_FILTER
    } else {
        COMMAND_FILTER
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let caps = Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_targets(CAPPED_TARGETS);
    let registry = tracing_subscriber::registry().with(filter);
    let layer = tracing_subscriber::fmt::layer().with_writer(ScrubbedStderr);
    if !daemon {
        let human = layer
            .without_time()
            .with_ansi(std::io::stderr().is_terminal());
        registry.with(human.with_filter(caps)).init();
    } else if std::io::stdout().is_terminal() {
        registry.with(layer.with_filter(caps)).init();
    } else {
        let json = layer.json().flatten_event(true);
        registry.with(json.with_filter(caps)).init();
    }
}

/// The log writer: each event is collected whole, scrubbed of secrets, then written to
/// stderr in one piece.
struct ScrubbedStderr;

impl<'a> MakeWriter<'a> for ScrubbedStderr {
    type Writer = ScrubbedEvent;

    fn make_writer(&'a self) -> ScrubbedEvent {
        ScrubbedEvent(Vec::with_capacity(256))
    }
}

struct ScrubbedEvent(Vec<u8>);

impl Write for ScrubbedEvent {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ScrubbedEvent {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let text = secret::scrub(&String::from_utf8_lossy(&self.0));
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
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
    let daemon = matches!(cli.command, Command::Run);
    if !daemon {
        die_on_closed_pipe();
    }
    init_logging(daemon);
    let result = (|| -> anyhow::Result<Result<(), AppError>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        Ok(runtime.block_on(dispatch(cli)))
    })();
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            // Once: a JSON log line for the daemon, a plain line for a person.
            let why = secret::scrub(&e.to_string());
            if daemon {
                tracing::error!(error = %why, "exiting");
            } else {
                eprintln!("outbox-relay: error: {why}");
            }
            ExitCode::from(e.exit_code() as u8)
        }
        Err(e) => {
            eprintln!("outbox-relay: error: {}", secret::scrub(&format!("{e:#}")));
            ExitCode::from(1)
        }
    }
}

async fn dispatch(cli: Cli) -> Result<(), AppError> {
    if let Command::Check { offline: true } = cli.command {
        return commands::check_offline(cli.config.as_deref());
    }
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Run => app::run_until_signalled(settings).await,
        Command::Migrate => commands::migrate(&settings).await,
        Command::Status { json } => commands::status(&settings, json).await,
        Command::Replay { ids, all_failed } => commands::replay(&settings, &ids, all_failed).await,
        Command::Discard { ids } => commands::discard(&settings, &ids).await,
        Command::Check { .. } => commands::check(&settings).await,
        Command::Demo { events, force } => commands::demo::run(&settings, events, force).await,
    }
}
