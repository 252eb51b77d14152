//! `outboxd`: the transactional-outbox dispatcher as a daemon and CLI. This
//! file parses the command line and hands each command to the library
//! ([`outboxd::daemon::run`] for `run`) or to its file in `commands/`.

mod commands;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outboxd::config::Settings;
use outboxd::launch::{ConfigArgs, launch};
use outboxd::{daemon, db, demo};

use crate::commands::accounts::{ApiKeyCommand, UserCommand};
use crate::commands::apps::AppCommand;
use crate::commands::dead_letters::DeadLetterCommand;
use crate::commands::enqueue::EnqueueArgs;
use crate::commands::topics::{CancelArgs, RowsArgs, TopicCommand};
use crate::commands::triggers::TriggerCommand;

/// A transactional-outbox dispatcher backed by PostgreSQL.
#[derive(Debug, Parser)]
#[command(
    name = "outboxd",
    version,
    about = "A transactional-outbox dispatcher backed by PostgreSQL: runs handlers, relays to NATS JetStream, retries, dead-letters, and serves an admin API and dashboard."
)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
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
    /// Read what was relayed to JetStream (the durable consumers untouched).
    #[command(subcommand)]
    Stream(commands::stream::StreamCommand),
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
    /// Webhook targets with secrets of their own: create, rotate, list, delete.
    #[command(subcommand)]
    Webhook(commands::webhooks::WebhookCommand),
    /// Manage triggers (KV, cron, dead-letter).
    #[command(subcommand)]
    Trigger(TriggerCommand),
    /// Pause, resume and list paused topics; set, remove and list their limits.
    #[command(subcommand)]
    Topic(TopicCommand),
    /// List the live dispatcher processes and what each serves.
    Processes {
        /// Print one JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Cancel rows that have not run: they become ignored dead letters with the reason.
    Cancel(CancelArgs),
    /// Run rows waiting for a delay or a retry's backoff now.
    Retry(RowsArgs),
    /// Garbage-collect: delete dead letters, abandoned executions and (when a retention is set) audit-log entries past retention, expired de-duplication records, lapsed login-throttle counts, expired sessions and stale invocation inboxes.
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
    launch("outboxd", &cli.config, |settings| {
        execute(cli.command, settings)
    })
}

async fn execute(command: Command, settings: Settings) -> anyhow::Result<()> {
    // Only producers go through a transaction-pooling PgBouncer: the other
    // commands' statements are prepared, or need the session.
    let direct = match &command {
        Command::Enqueue(_) | Command::ConfigCheck | Command::Stream(_) => None,
        Command::Run { .. } | Command::Demo => Some("the dispatcher"),
        Command::Migrate => Some("migrating (a session advisory lock)"),
        Command::Consume => Some("the consumer runtime"),
        _ => Some("this command"),
    };
    if let Some(what) = direct {
        db::require_direct(&settings, what)?;
    }
    match command {
        Command::ConfigCheck => {
            print!("{}", settings.to_toml()?);
            Ok(())
        }
        Command::Migrate => {
            let pool = db::connect(&settings, 0).await?;
            let last = outbox_core::last_migration();
            match outbox_core::migrate(&pool).await.context("migrating")? {
                0 => println!("the database is up to date (outboxd migration {last})"),
                n => println!(
                    "{n} migration(s) applied (the database is at outboxd migration {last})"
                ),
            }
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
        Command::Stream(cmd) => commands::stream::run(settings, cmd).await,
        Command::Enqueue(args) => commands::enqueue::run(settings, args).await,
        Command::App(cmd) => commands::apps::run(settings, cmd).await,
        Command::DeadLetters(cmd) => commands::dead_letters::run(settings, cmd).await,
        Command::User(cmd) => commands::accounts::user(settings, cmd).await,
        Command::ApiKey(cmd) => commands::accounts::api_key(settings, cmd).await,
        Command::Trigger(cmd) => commands::triggers::run(settings, cmd).await,
        Command::Webhook(cmd) => commands::webhooks::run(settings, cmd).await,
        Command::Topic(cmd) => commands::topics::topic(settings, cmd).await,
        Command::Processes { json } => commands::topics::list_processes(settings, json).await,
        Command::Cancel(args) => commands::topics::cancel(settings, args).await,
        Command::Retry(args) => commands::topics::retry(settings, args).await,
        Command::Gc { once } => commands::gc::run(settings, once).await,
    }
}
