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

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outboxd::launch::{ConfigArgs, launch};

/// Measure outboxd's throughput and latency against the raw SQL ceiling.
#[derive(Debug, Parser)]
#[command(name = "outbox-bench", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
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
    launch("outbox-bench", &cli.config, |settings| async move {
        match cli.command {
            Some(Command::Worker(args)) => bench::worker(settings, args).await,
            None => bench::run(settings, cli.args).await,
        }
    })
}
