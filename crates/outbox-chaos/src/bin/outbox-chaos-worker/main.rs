//! `outbox-chaos-worker run`: outboxd's daemon ([`outboxd::daemon::run`],
//! the same one `outboxd run` starts) with the fault-injection handlers of
//! [`handlers`] instead of an application's. The chaos harness starts,
//! kills and restarts these processes; the production binary carries none
//! of this.

mod handlers;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outboxd::launch::{ConfigArgs, launch};
use outboxd::{daemon, db};

/// A chaos worker: outboxd with the fault-injection handlers.
#[derive(Debug, Parser)]
#[command(name = "outbox-chaos-worker")]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
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
    let Command::Run = cli.command;
    launch("outbox-chaos-worker", &cli.config, |settings| async {
        // The handlers write their effects through a pool of their own, as
        // an application's handlers would (as large as the daemon's was).
        let pool = db::connect_beside(&settings, 10).await?;
        let registry = handlers::registry(pool)?;
        daemon::run(settings, registry, daemon::shutdown_signal()).await?;
        Ok(())
    })
}
