//! `outboxd`: the transactional-outbox dispatcher as a daemon and CLI.
//!
//! Layout: [`config`] (layered settings), [`http`] (health, readiness,
//! metrics), [`commands`] (the operator commands, one file per noun),
//! [`demo`] (the demo workload), [`mod@bench`] (the benchmark command),
//! [`chaos`] (the fault-injection handlers); this file parses the command
//! line, runs the daemon and wires the pieces together.

mod bench;
mod chaos;
mod commands;
mod config;
mod demo;
mod http;

use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use outbox_core::store::apps;
use outbox_dispatch::{Dispatcher, Registry};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::commands::accounts::{ApiKeyCommand, UserCommand};
use crate::commands::apps::AppCommand;
use crate::commands::dead_letters::DeadLetterCommand;
use crate::commands::enqueue::EnqueueArgs;
use crate::commands::triggers::TriggerCommand;
use crate::config::Settings;

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
        /// Run the fault-injection handlers (for the chaos harness).
        #[arg(long, hide = true, conflicts_with = "demo")]
        chaos: bool,
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
    /// Measure throughput and latency against the raw SQL ceiling.
    Bench(bench::BenchArgs),
    /// A dispatcher for the benchmark's scale-out scenario.
    #[command(hide = true)]
    BenchWorker(bench::WorkerArgs),
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
    init_tracing(&settings);
    // A panicking handler is a failed attempt, not a crash: log it as one line.
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(%location, %message, "panic");
    }));
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

fn init_tracing(settings: &Settings) {
    let mut filter = tracing_subscriber::EnvFilter::try_new(&settings.log.filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // PostgreSQL's notices ("relation … already exists, skipping" on every
    // migrate) are noise at info; a filter that names sqlx decides itself.
    if !settings.log.filter.contains("sqlx")
        && let Ok(directive) = "sqlx::postgres::notice=warn".parse()
    {
        filter = filter.add_directive(directive);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a person at a terminal, not in log files
        // (formatting them is also a measurable cost per dispatched event).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if settings.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn execute(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::ConfigCheck => {
            print!("{}", settings.to_toml()?);
            Ok(())
        }
        Command::Migrate => {
            let pool = connect(&settings).await?;
            outbox_core::migrate(&pool).await.context("migrating")?;
            println!("migrations applied");
            Ok(())
        }
        Command::Run { demo, chaos } => run(settings, demo, chaos).await,
        Command::Demo => run(settings, true, false).await,
        Command::Consume => consume(settings).await,
        Command::Enqueue(args) => commands::enqueue::run(settings, args).await,
        Command::App(cmd) => commands::apps::run(settings, cmd).await,
        Command::DeadLetters(cmd) => commands::dead_letters::run(settings, cmd).await,
        Command::User(cmd) => commands::accounts::user(settings, cmd).await,
        Command::ApiKey(cmd) => commands::accounts::api_key(settings, cmd).await,
        Command::Trigger(cmd) => commands::triggers::run(settings, cmd).await,
        Command::Gc { once } => commands::gc::run(settings, once).await,
        Command::Bench(args) => bench::run(settings, args).await,
        Command::BenchWorker(args) => bench::worker(settings, args).await,
    }
}

/// Opens the pool with the session settings dispatchers rely on.
pub(crate) async fn connect(settings: &Settings) -> anyhow::Result<PgPool> {
    let db = &settings.database;
    let options = PgConnectOptions::from_str(db.url.expose())
        .context("database.url (DATABASE_URL) is not a valid PostgreSQL URL")?
        .application_name("outboxd")
        .options([(
            "idle_in_transaction_session_timeout",
            format!("{}ms", db.idle_in_transaction_timeout_ms),
        )])
        // A process cut off by the network keeps its row and advisory locks
        // until the server notices it is gone; probing an idle connection
        // after 30 s (3 probes, 10 s apart) bounds that to about a minute.
        .options([
            ("tcp_keepalives_idle", 30),
            ("tcp_keepalives_interval", 10),
            ("tcp_keepalives_count", 3),
        ]);
    let shown = redact_url(db.url.expose());
    PgPoolOptions::new()
        .max_connections(db.max_connections)
        .acquire_timeout(Duration::from_millis(db.acquire_timeout_ms))
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {shown}"))
}

/// A database URL fit for a log or a terminal: no password, no query
/// parameters (which may carry credentials or driver noise).
pub(crate) fn redact_url(url: &str) -> String {
    let url = url.split('?').next().unwrap_or_default();
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{}@{}", &url[..scheme + 3], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// Resolves on SIGTERM or SIGINT.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

async fn run(settings: Settings, demo: bool, chaos: bool) -> anyhow::Result<()> {
    let pool = connect(&settings).await?;
    if settings.database.auto_migrate {
        outbox_core::migrate(&pool)
            .await
            .context("migrating on start")?;
    }
    let metrics = http::install_metrics()?;

    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown_signal().await;
            info!("shutdown signal received");
            stop.cancel();
        }
    });

    // NATS first: a stream-contract mismatch must stop start-up before
    // anything serves.
    let (nats_client, jetstream) = if settings.nats.url.is_empty() {
        (None, None)
    } else {
        let client = outbox_nats::connect(&settings.nats.url).await?;
        let js = async_nats::jetstream::new(client.clone());
        outbox_nats::ensure_stream(&js, &settings.stream_contract())
            .await
            .context("checking the NATS stream contract")?;
        (Some(client), Some(js))
    };

    let admin = match settings.admin_auth() {
        Some(auth) => {
            let mut state = outbox_admin::AdminState::new(pool.clone(), auth)?;
            state.body_limit = usize::try_from(settings.http.max_body_bytes)
                .context("http.max_body_bytes does not fit this machine")?;
            state.api_servers = settings.api_servers();
            Some(outbox_admin::router(state))
        }
        None => {
            tracing::warn!(
                "admin API and dashboard are off: set JWT_SECRET (at least 32 bytes) to turn them on"
            );
            None
        }
    };
    let addr = settings
        .http
        .listen
        .parse()
        .context("http.listen is not a socket address")?;
    let (bound, server) = http::serve(
        addr,
        http::router(pool.clone(), metrics, nats_client, admin),
        {
            let stop = stop.clone();
            async move { stop.cancelled().await }
        },
    )
    .await
    .with_context(|| format!("cannot listen on {addr}"))?;
    info!(%bound, "http listening: /healthz /readyz /metrics");
    println!("outboxd listening on http://{bound}");
    if settings.admin_auth().is_some() {
        println!("dashboard: http://{bound}/login");
    }

    let registry = if demo {
        let app = apps::ensure(&pool, demo::APP, "Demo app").await?;
        demo::register_triggers(&pool, app.id).await?;
        tokio::spawn(demo::produce(
            pool.clone(),
            app.id,
            Duration::from_secs(2),
            stop.clone(),
        ));
        println!(
            "demo running: app {:?}; see its dead letters with `outboxd dead-letters list --app {}`",
            demo::APP,
            demo::APP
        );
        demo::registry()
    } else if chaos {
        chaos::registry(pool.clone())?
    } else {
        Registry::new()
    };
    let mut registry = registry;
    if settings.webhook.secret.expose().is_empty() {
        info!("webhook targets are off: set OUTBOXD_WEBHOOK__SECRET to sign and send them");
    } else {
        registry.prefix(
            outbox_dispatch::targets::webhook::PREFIX,
            outbox_dispatch::targets::Webhook::new(
                settings.webhook.secret.expose().as_bytes().to_vec(),
                Duration::from_millis(settings.webhook.timeout_ms),
            ),
        );
    }
    if let Some(js) = jetstream.filter(|_| settings.nats.relay_unhandled) {
        registry.fallback(outbox_nats::Relay::new(
            js,
            pool.clone(),
            outbox_nats::RelayConfig {
                subject_template: settings.nats.subject_template.clone(),
                ack_timeout: Duration::from_millis(settings.nats.ack_timeout_ms),
            },
        ));
        info!(url = %redact_url(&settings.nats.url), stream = %settings.nats.stream.name, "relaying unhandled topics to NATS JetStream");
    }
    // The GC schedule and the cron scheduler run on the elected leader only.
    let (leader, leader_task) = outbox_dispatch::maintenance::leader::campaign(
        pool.clone(),
        Duration::from_secs(1),
        stop.clone(),
    );
    let sweeper =
        outbox_dispatch::maintenance::Sweeper::new(pool.clone(), settings.sweeper_config());
    let sweeper_task = tokio::spawn({
        let stop = stop.clone();
        let leader = leader.clone();
        async move { sweeper.run(Some(leader), stop.cancelled_owned()).await }
    });
    let replayer =
        outbox_dispatch::maintenance::Replayer::new(pool.clone(), Duration::from_secs(1));
    let replayer_task = tokio::spawn({
        let stop = stop.clone();
        let leader = leader.clone();
        async move { replayer.run(Some(leader), stop.cancelled_owned()).await }
    });
    let sampler = outbox_dispatch::maintenance::Sampler::new(
        pool.clone(),
        Duration::from_secs(settings.http.metrics_sample_secs),
    );
    let sampler_task = tokio::spawn({
        let stop = stop.clone();
        let leader = leader.clone();
        async move { sampler.run(Some(leader), stop.cancelled_owned()).await }
    });
    let scheduler = outbox_dispatch::maintenance::Scheduler::new(pool.clone(), Default::default());
    let scheduler_task = tokio::spawn({
        let stop = stop.clone();
        async move { scheduler.run(Some(leader), stop.cancelled_owned()).await }
    });
    let dispatcher = Dispatcher::new(pool.clone(), registry, settings.dispatcher_config())?;
    let report = dispatcher
        .run({
            let stop = stop.clone();
            async move { stop.cancelled().await }
        })
        .await?;
    stop.cancel();
    let _ = scheduler_task.await;
    let _ = sweeper_task.await;
    let _ = replayer_task.await;
    let _ = sampler_task.await;
    let _ = leader_task.await;
    let _ = server.await;
    pool.close().await;
    info!(
        completed = report.totals.completed,
        released = report.released,
        "bye"
    );
    Ok(())
}

async fn consume(settings: Settings) -> anyhow::Result<()> {
    if settings.nats.url.is_empty() {
        bail!("consume needs NATS: set NATS_URL (or [nats] url)");
    }
    let pool = connect(&settings).await?;
    if settings.database.auto_migrate {
        outbox_core::migrate(&pool)
            .await
            .context("migrating on start")?;
    }
    let client = outbox_nats::connect(&settings.nats.url).await?;
    let js = async_nats::jetstream::new(client);
    outbox_nats::ensure_stream(&js, &settings.stream_contract())
        .await
        .context("checking the NATS stream contract")?;
    let config = settings.consumer_config();
    println!(
        "consuming {:?} from stream {} as {}",
        config.filter_subjects, config.stream, config.durable
    );
    let runtime = outbox_nats::ConsumerRuntime::new(js, pool, config).route(
        ">",
        |delivery: outbox_nats::Delivery| async move {
            info!(
                subject = %delivery.subject,
                tenant = %delivery.tenant,
                delivered = delivery.delivered,
                message_id = delivery.message_id.as_deref().unwrap_or(""),
                "consumed"
            );
            Ok::<(), outbox_nats::HandlerError>(())
        },
    );
    runtime.run(shutdown_signal()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sessions_end_idle_transactions_and_probe_a_silent_client()
    -> Result<(), Box<dyn std::error::Error>> {
        let db = outbox_testkit::TestDb::new().await?;
        let settings = config::Settings::load_from(
            std::path::Path::new("../../config"),
            None,
            [("DATABASE_URL".to_owned(), db.url.clone())],
        )?;
        let pool = connect(&settings).await?;
        for (name, want) in [
            ("idle_in_transaction_session_timeout", "60000"),
            ("tcp_keepalives_idle", "30"),
            ("tcp_keepalives_interval", "10"),
            ("tcp_keepalives_count", "3"),
        ] {
            let got: String = sqlx::query_scalar("SELECT setting FROM pg_settings WHERE name = $1")
                .bind(name)
                .fetch_one(&pool)
                .await?;
            assert_eq!(got, want, "{name}");
        }
        Ok(())
    }
}
