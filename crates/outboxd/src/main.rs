//! `outboxd`: the transactional-outbox dispatcher as a daemon and CLI. This
//! file parses the command line and hands each command to the library
//! ([`outboxd::daemon::run`] for `run`) or to its file in `commands/`.

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outboxd::config::Settings;
use outboxd::{daemon, db, demo, logging};

use crate::commands::accounts::{ApiKeyCommand, UserCommand};
use crate::commands::apps::AppCommand;
use crate::commands::dead_letters::DeadLetterCommand;
use crate::commands::enqueue::EnqueueArgs;
use crate::commands::triggers::TriggerCommand;

/// A transactional-outbox dispatcher backed by PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "outboxd", version, about)]
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply pending database migrations.
    Migrate,
    /// Run the dispatcher and the HTTP endpoints until SIGTERM/SIGINT.
    Run {
        /// Also run the demo handlers and producer.
        #[arg(long)]
        demo: bool,
    },
    /// Run with the demo workload (same as `run --demo`).
    Demo,
    /// Consume relayed events from JetStream with the consumer runtime and
    /// log each one (a demo of the library's consumer API).
    Consume,
    /// Enqueue one event; the payload comes from --payload or standard input.
    Enqueue(EnqueueArgs),
    /// Manage apps (tenants).
    #[command(subcommand)]
    App(AppCommand),
    /// Inspect, replay and ignore dead letters.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLetterCommand),
    /// Manage operator accounts.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage API keys for machines.
    #[command(subcommand, name = "api-key")]
    ApiKey(ApiKeyCommand),
    /// Manage triggers (KV, cron, dead-letter).
    #[command(subcommand)]
    Trigger(TriggerCommand),
    /// Garbage-collect: delete dead letters and abandoned executions past retention.
    Gc {
        /// Run one sweep and exit (for an external cron); without it, sweep on `gc.schedule`.
        #[arg(long)]
        once: bool,
    },
    /// Check the configuration and print it (secrets hidden).
    #[command(name = "config")]
    ConfigCheck,
}

/// A dispatched event makes dozens of small, short-lived allocations across
/// threads; glibc's allocator spent about a quarter of the relay's CPU on
/// them (and on its arena locks), mimalloc a fraction of that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(&cli.config_dir, cli.env.as_deref()) {
        Ok(s) => s,
        Err(err) => {
            eprintln!("outboxd: {err}");
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
            eprintln!("outboxd: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("outboxd: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::ConfigCheck => {
            print!("{}", settings.to_toml()?);
            Ok(())
        }
        Command::Migrate => {
            let pool = db::connect(&settings, 0).await?;
            outbox_core::migrate(&pool).await.context("migrating")?;
            println!("migrations applied");
            Ok(())
        }
        Command::Run { demo: false } => {
            let registry = outbox_dispatch::Registry::new();
            daemon::run(settings, registry, daemon::shutdown_signal()).await?;
            Ok(())
        }
        Command::Run { demo: true } | Command::Demo => {
            demo::run(settings, daemon::shutdown_signal()).await
        }
        Command::Consume => commands::consume::run(settings).await,
        Command::Enqueue(args) => commands::enqueue::run(settings, args).await,
        Command::App(cmd) => commands::apps::run(settings, cmd).await,
        Command::DeadLetters(cmd) => commands::dead_letters::run(settings, cmd).await,
        Command::User(cmd) => commands::accounts::user(settings, cmd).await,
        Command::ApiKey(cmd) => commands::accounts::api_key(settings, cmd).await,
        Command::Trigger(cmd) => commands::triggers::run(settings, cmd).await,
        Command::Gc { once } => commands::gc::run(settings, once).await,
    }
}
