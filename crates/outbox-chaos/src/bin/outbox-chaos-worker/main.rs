//! `outbox-chaos-worker run`: outboxd's daemon ([`outboxd::daemon::run`],
//! the same one `outboxd run` starts) with the fault-injection handlers of
//! [`handlers`] instead of an application's. The chaos harness starts,
//! kills and restarts these processes; the production binary carries none
//! of this.

mod handlers;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outboxd::config::Settings;
use outboxd::{daemon, db, logging};

/// A chaos worker: outboxd with the fault-injection handlers.
#[derive(Debug, Parser)]
#[command(name = "outbox-chaos-worker")]
struct Cli {
    /// Folder with default.toml and the environment overlays.
    #[arg(long, env = "OUTBOXD_CONFIG_DIR", default_value = "config")]
    config_dir: PathBuf,
    /// Environment overlay to apply (`config/<ENV>.toml`).
    #[arg(long, env = "OUTBOXD_ENV")]
    env: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run until SIGTERM/SIGINT, like `outboxd run`.
    Run,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(&cli.config_dir, cli.env.as_deref()) {
        Ok(s) => s,
        Err(err) => {
            eprintln!("outbox-chaos-worker: {err}");
            return ExitCode::from(2);
        }
    };
    logging::init_tracing(&settings);
    logging::log_panics();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("outbox-chaos-worker: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let Command::Run = cli.command;
    let result = runtime.block_on(async {
        // The handlers write their effects through a pool of their own.
        let pool = db::connect(&settings, 0).await?;
        let registry = handlers::registry(pool)?;
        daemon::run(settings, registry, daemon::shutdown_signal()).await
    });
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("outbox-chaos-worker: {err:#}");
            ExitCode::FAILURE
        }
    }
}
