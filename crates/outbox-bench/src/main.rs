//! `outbox-bench`: outboxd's throughput and latency next to the raw
//! PostgreSQL ceiling for the same work, measured in one run on one database.
//!
//! The raw baselines are plain SQL written here on purpose (the ceiling
//! outboxd is compared with); everything outboxd does goes through its
//! library crates, as in production. Run it through `scripts/bench.sh`,
//! which starts a private durable PostgreSQL and a nats-server.
//!
//! Layout: [`mod@bench`] holds the arguments and the shared context, runs the
//! scenarios in order and prints the table; [`scenarios`] has one function
//! per scenario (by group, one file each); [`load`] measures under a steady
//! offered load, the latency takers, the deep backlog and scale-out;
//! [`support`] holds the raw baseline's statement and what the scenarios
//! share; [`report`] writes CSV and SVG charts. Every statement that is not
//! a raw baseline goes through `outbox_core::store` (housekeeping through
//! `store::stats`).

mod bench;
mod load;
mod report;
mod scenarios;
mod support;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outboxd::config::Settings;

/// Measure outboxd's throughput and latency against the raw SQL ceiling.
#[derive(Debug, Parser)]
#[command(name = "outbox-bench", args_conflicts_with_subcommands = true)]
struct Cli {
    /// Folder with default.toml and the environment overlays.
    #[arg(
        long,
        env = "OUTBOXD_CONFIG_DIR",
        default_value = "config",
        global = true
    )]
    config_dir: PathBuf,
    /// Environment overlay to apply (`config/<ENV>.toml`).
    #[arg(long, env = "OUTBOXD_ENV", global = true)]
    env: Option<String>,
    #[command(flatten)]
    args: bench::BenchArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A dispatcher for the scale-out scenario (started by the benchmark).
    #[command(hide = true)]
    Worker(bench::WorkerArgs),
}

/// The same allocator as the `outboxd` binary, so the figures are its figures.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(&cli.config_dir, cli.env.as_deref()) {
        Ok(s) => s,
        Err(err) => {
            eprintln!("outbox-bench: {err}");
            return ExitCode::from(2);
        }
    };
    outboxd::logging::init_tracing(&settings);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("outbox-bench: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Some(Command::Worker(args)) => bench::worker(settings, args).await,
            None => bench::run(settings, cli.args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("outbox-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}
