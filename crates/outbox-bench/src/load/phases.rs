//! Phases of trouble under a steady load: outboxd keeps dispatching while the
//! database holds an old snapshot, serves long readers, loses its
//! connections or runs out of them — each phase followed by a recovery
//! window, every series sampled every few seconds.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use hdrhistogram::Histogram;
use outbox_core::store::limits::{self, Limits};
use outbox_core::store::{compaction, stats};
use outbox_dispatch::maintenance::{Compactor, Rotator, Supervisor};
use outbox_dispatch::{Dispatcher, Event, HandlerError, Registry};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use outboxd::config::Settings;

use super::spawn_producers;

/// The topic of the phases' events.
const TOPIC: &str = "bench.phase";

/// The `application_name` of the dispatcher's connections, which the
/// `backend-kill` phase terminates (and nothing else).
const DISPATCHER_APPLICATION: &str = "outbox-bench-dispatcher";

/// A progress line on stderr every this many samples (30 s with the
/// default 5-s samples).
const PROGRESS_EVERY: usize = 6;

/// How often `backend-kill` terminates the dispatcher's connections (twice
/// per phase at least, for short phases).
const KILL_EVERY: Duration = Duration::from_secs(3);

/// Readers of the `active-readers` phase.
const READERS: usize = 4;

/// Most idle connections `pool-exhaustion` opens (fewer when the server's
/// `max_connections` leaves less room; some are always left over).
const IDLE_CONNECTIONS: i64 = 300;

/// How often `postgres-restart` restarts the server within a long phase.
const RESTART_EVERY: Duration = Duration::from_secs(20);

/// The environment variable holding the shell command that restarts the
/// benchmark's PostgreSQL (`scripts/bench.sh` sets it); `postgres-restart`
/// needs it.
pub const RESTART_COMMAND_ENV: &str = "OUTBOX_BENCH_PG_RESTART";

/// A phase: what is done to the database while the load runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Nothing: the baseline.
    Clean,
    /// Nothing, right after a fault ended: how fast things come back.
    Recovery,
    /// A session holds `BEGIN; SELECT txid_current()` and idles.
    IdleInTx,
    /// Four REPEATABLE READ sessions scan outboxd's tables over and over.
    ActiveReaders,
    /// The dispatcher's connections are terminated every few seconds.
    BackendKill,
    /// Hundreds of idle connections take the server's free slots.
    PoolExhaustion,
    /// PostgreSQL restarts (a fast shutdown, then a start) at the phase's
    /// start and every [`RESTART_EVERY`] within it.
    PostgresRestart,
}

impl Phase {
    /// Every phase with its name, as `--phases` takes it.
    pub const ALL: &'static [(&'static str, Phase)] = &[
        ("clean", Self::Clean),
        ("recovery", Self::Recovery),
        ("idle-in-tx", Self::IdleInTx),
        ("active-readers", Self::ActiveReaders),
        ("backend-kill", Self::BackendKill),
        ("pool-exhaustion", Self::PoolExhaustion),
        ("postgres-restart", Self::PostgresRestart),
    ];

    /// The phase called `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, p)| *p)
    }

    /// A `--phases` entry: a name, optionally with its own length in
    /// seconds (`idle-in-tx:3600`); `None` when the name is unknown or the
    /// length is not a whole number of at least one.
    pub fn parse_entry(entry: &str) -> Option<(Self, Option<u32>)> {
        match entry.split_once(':') {
            None => Some((Self::parse(entry)?, None)),
            Some((name, secs)) => {
                let secs = secs.parse::<u32>().ok().filter(|s| *s >= 1)?;
                Some((Self::parse(name)?, Some(secs)))
            }
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, p)| *p == self)
            .map_or("unknown", |(n, _)| *n)
    }
}

/// The load of a phase run.
#[derive(Debug, Clone)]
pub struct PhaseLoad {
    /// Events offered per second.
    pub rate: u32,
    /// Each handler sleeps this long.
    pub handler: Duration,
    /// One sample every this long.
    pub sample: Duration,
    /// A concurrency limit on the topic for the run, if any.
    pub max_running: Option<u32>,
}

/// One sample: a window of `sample` length.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Seconds since the run began (the window's end).
    pub at: f64,
    /// Index of the phase in the run.
    pub phase: usize,
    /// Commit → handler start, milliseconds: p50, p95, p99 of the window
    /// (None when no handler started in it).
    pub claim_ms: Option<[f64; 3]>,
    /// Handlers finished per second.
    pub completed_per_sec: f64,
    /// Events enqueued and not yet handled at the window's end.
    pub depth: i64,
    /// Dead tuples of all outboxd tables at the window's end.
    pub dead_tuples: i64,
    /// Of those, the bookkeeping tables' ([`compaction::TABLES`]).
    pub bookkeeping_dead_tuples: i64,
    /// Autovacuum passes over the outbox that finished in the window.
    pub autovacuums: i64,
}

/// What a phase run saw.
#[derive(Debug, Clone)]
pub struct PhaseRun {
    /// Every sample, in order.
    pub samples: Vec<Sample>,
    /// Dead tuples per table at the end of each phase.
    pub dead_by_table: Vec<Vec<(String, i64)>>,
    /// Dead tuples of `pg_class` at the end of each phase.
    pub catalog_dead: Vec<i64>,
    /// Events enqueued.
    pub produced: u64,
    /// Distinct events whose handler ran.
    pub handled: u64,
    /// Enqueues whose commit failed without saying whether it happened (a
    /// restart in the middle): their events may or may not exist.
    pub uncertain: u64,
}

/// Runs `phases` back to back under one steady load and one dispatcher;
/// afterwards waits until every event was handled, and fails if one was lost.
pub async fn run(
    pool: &PgPool,
    settings: &Settings,
    app: Uuid,
    load: &PhaseLoad,
    phases: &[(Phase, Duration)],
) -> anyhow::Result<PhaseRun> {
    let latencies = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).context("histogram bounds")?,
    ));
    let finished = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(Mutex::new(HashSet::<Uuid>::new()));
    let registry = recording(load.handler, &latencies, &finished, &seen);
    // Set, or removed: a run that failed half-way may have left one.
    match load.max_running {
        Some(max_running) => {
            let limit = Limits {
                max_running: Some(i64::from(max_running)),
                ..Limits::default()
            };
            limits::set(pool, app, TOPIC, &limit, Some("bench")).await?;
        }
        None => {
            limits::remove(pool, app, TOPIC).await?;
        }
    }
    let dispatcher_pool = PgPoolOptions::new()
        .max_connections(settings.database.max_connections)
        .connect_with(
            pool.connect_options()
                .as_ref()
                .clone()
                .application_name(DISPATCHER_APPLICATION),
        )
        .await?;
    let mut config = settings.dispatcher_config();
    config.worker_id = "bench-phases".into();
    let dispatcher = Dispatcher::new(dispatcher_pool.clone(), registry, config)?;
    let stop_dispatcher = CancellationToken::new();
    let dispatching = tokio::spawn({
        let stop = stop_dispatcher.clone();
        async move { dispatcher.run(stop.cancelled_owned()).await }
    });
    // The leader's segment rotation and compaction, as `outboxd run` has them.
    let rotating = tokio::spawn(
        Supervisor::new(dispatcher_pool.clone())
            .with(Rotator::new(
                dispatcher_pool.clone(),
                settings.rotation_policy(),
            ))
            .with(Compactor::new(
                dispatcher_pool.clone(),
                settings.compaction_policy(),
            ))
            .run(stop_dispatcher.clone().cancelled_owned()),
    );

    let produced = Arc::new(AtomicU64::new(0));
    let uncertain = Arc::new(AtomicU64::new(0));
    let stop_producers = CancellationToken::new();
    let producers = spawn_producers(
        pool,
        app,
        TOPIC,
        load.rate,
        stop_producers.clone(),
        produced.clone(),
        Some(uncertain.clone()),
    );

    let started = Instant::now();
    let mut samples = Vec::new();
    let mut dead_by_table = Vec::new();
    let mut catalog_dead = Vec::new();
    let mut last_finished = 0;
    let mut dead = 0;
    let mut bookkeeping_dead = 0;
    let mut last_autovacuums = stats::table_vacuum(pool, "outbox").await?.autovacuum_count;
    for (index, &(phase, length)) in phases.iter().enumerate() {
        eprintln!("bench: phases, {} ({} s)", phase.name(), length.as_secs());
        let fault = Fault::start(phase, pool, length).await?;
        let phase_end = Instant::now() + length;
        while Instant::now() < phase_end {
            tokio::time::sleep(load.sample.min(phase_end - Instant::now())).await;
            let claim_ms = latencies.lock().ok().and_then(|mut h| {
                let quantiles = (!h.is_empty())
                    .then(|| [0.5, 0.95, 0.99].map(|q| h.value_at_quantile(q) as f64 / 1000.0));
                h.reset();
                quantiles
            });
            let now_finished = finished.load(Ordering::Relaxed);
            let window = load.sample.as_secs_f64();
            // While the server restarts, a sample keeps the last figures.
            if let Ok(tables) = stats::dead_tuples(pool).await {
                dead = tables.iter().map(|(_, n)| n).sum();
                bookkeeping_dead = bookkeeping(&tables);
            }
            // Counted here rather than read from the table: a count of an
            // outbox bloated by a held snapshot reads every dead row, and
            // every 5 s that slowed the very claims being measured.
            let handled = seen.lock().map(|s| s.len() as u64).unwrap_or_default();
            let depth = i64::try_from(produced.load(Ordering::Relaxed).saturating_sub(handled))
                .unwrap_or(i64::MAX);
            let autovacuums = stats::table_vacuum(pool, "outbox")
                .await
                .map_or(last_autovacuums, |t| t.autovacuum_count);
            samples.push(Sample {
                at: started.elapsed().as_secs_f64(),
                phase: index,
                claim_ms,
                completed_per_sec: (now_finished - last_finished) as f64 / window,
                depth,
                dead_tuples: dead,
                bookkeeping_dead_tuples: bookkeeping_dead,
                autovacuums: (autovacuums - last_autovacuums).max(0),
            });
            // A long run shows how it goes while it goes, and a run that
            // fails to drain at the end has shown where it fell behind.
            if samples.len() % PROGRESS_EVERY == 0 {
                let p99 = claim_ms.map_or_else(|| "-".to_owned(), |q| format!("{:.1} ms", q[2]));
                eprintln!(
                    "bench:   {:>5.0} s: {:.0} completed/s, {depth} waiting, claim p99 {p99}, \
                     {dead} dead tuples",
                    started.elapsed().as_secs_f64(),
                    (now_finished - last_finished) as f64 / window,
                );
            }
            last_autovacuums = autovacuums;
            last_finished = now_finished;
        }
        fault.end().await?;
        dead_by_table.push(stats::dead_tuples(pool).await.unwrap_or_default());
        catalog_dead.push(stats::catalog_dead_tuples(pool).await.unwrap_or_default());
    }

    stop_producers.cancel();
    for producer in producers {
        producer.await??;
    }
    let produced = produced.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !stats::queue_empty(pool, app).await? {
        ensure!(
            Instant::now() < deadline,
            "the dispatcher did not drain the queue within 2 minutes after the phases"
        );
        ensure!(!dispatching.is_finished(), "the dispatcher stopped early");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_dispatcher.cancel();
    dispatching.await??;
    rotating.await?;
    dispatcher_pool.close().await;
    if load.max_running.is_some() {
        limits::remove(pool, app, TOPIC).await?;
    }
    let handled = seen.lock().map(|s| s.len() as u64).unwrap_or_default();
    let uncertain = uncertain.load(Ordering::Relaxed);
    ensure!(
        handled >= produced,
        "{produced} events enqueued but {handled} handled: {} lost",
        produced - handled
    );
    ensure!(
        handled <= produced + uncertain,
        "{handled} events handled but only {produced} enqueued (and {uncertain} in doubt)"
    );
    Ok(PhaseRun {
        samples,
        dead_by_table,
        catalog_dead,
        produced,
        handled,
        uncertain,
    })
}

/// Handlers of [`TOPIC`] that note when they started relative to the
/// event's commit, sleep `handler`, and count themselves.
fn recording(
    handler: Duration,
    latencies: &Arc<Mutex<Histogram<u64>>>,
    finished: &Arc<AtomicU64>,
    seen: &Arc<Mutex<HashSet<Uuid>>>,
) -> Registry {
    let (latencies, finished, seen) = (latencies.clone(), finished.clone(), seen.clone());
    let mut registry = Registry::new();
    registry.register(TOPIC, move |event: Event| {
        let waited = chrono::Utc::now() - event.enqueued_at;
        let micros = u64::try_from(waited.num_microseconds().unwrap_or(0)).unwrap_or(0);
        if let Ok(mut h) = latencies.lock() {
            h.saturating_record(micros.max(1));
        }
        let (finished, seen) = (finished.clone(), seen.clone());
        async move {
            if !handler.is_zero() {
                tokio::time::sleep(handler).await;
            }
            if let Ok(mut seen) = seen.lock() {
                seen.insert(event.id);
            }
            finished.fetch_add(1, Ordering::Relaxed);
            Ok::<(), HandlerError>(())
        }
    });
    registry
}

/// A fault in progress, ended by [`Fault::end`].
enum Fault {
    None,
    Held(PgConnection),
    Tasks(CancellationToken, Vec<JoinHandle<anyhow::Result<()>>>),
    Idle(Vec<PgConnection>),
}

impl Fault {
    async fn start(phase: Phase, pool: &PgPool, length: Duration) -> anyhow::Result<Self> {
        let options = pool.connect_options();
        Ok(match phase {
            Phase::Clean | Phase::Recovery => Self::None,
            Phase::IdleInTx => {
                // outboxd's own sessions end an idle transaction after a
                // minute; this one stands for a session that is not outboxd's.
                let held = options
                    .as_ref()
                    .clone()
                    .options([("idle_in_transaction_session_timeout", "0")]);
                let mut conn = PgConnection::connect_with(&held).await?;
                stats::hold_transaction_id(&mut conn).await?;
                Self::Held(conn)
            }
            Phase::ActiveReaders => {
                let stop = CancellationToken::new();
                let mut readers = Vec::new();
                for _ in 0..READERS {
                    let mut conn = PgConnection::connect_with(&options).await?;
                    let stop = stop.clone();
                    readers.push(tokio::spawn(async move {
                        stats::hold_snapshot(&mut conn).await?;
                        while !stop.is_cancelled() {
                            stats::scan_outboxd_tables(&mut conn).await?;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        conn.close().await?;
                        Ok(())
                    }));
                }
                Self::Tasks(stop, readers)
            }
            Phase::BackendKill => {
                let stop = CancellationToken::new();
                let every = KILL_EVERY.min(length / 2);
                let killer = tokio::spawn({
                    let (pool, stop) = (pool.clone(), stop.clone());
                    async move {
                        loop {
                            tokio::select! {
                                () = stop.cancelled() => return Ok(()),
                                () = tokio::time::sleep(every) => {}
                            }
                            stats::terminate_sessions(&pool, DISPATCHER_APPLICATION).await?;
                        }
                    }
                });
                Self::Tasks(stop, vec![killer])
            }
            Phase::PostgresRestart => {
                let command = std::env::var(RESTART_COMMAND_ENV).with_context(|| {
                    format!(
                        "postgres-restart needs {RESTART_COMMAND_ENV} (scripts/bench.sh sets it)"
                    )
                })?;
                let stop = CancellationToken::new();
                let restarter = tokio::spawn({
                    let stop = stop.clone();
                    async move {
                        loop {
                            let status = tokio::process::Command::new("bash")
                                .arg("-c")
                                .arg(&command)
                                .status()
                                .await?;
                            ensure!(status.success(), "restarting PostgreSQL failed: {status}");
                            tokio::select! {
                                () = stop.cancelled() => return Ok(()),
                                () = tokio::time::sleep(RESTART_EVERY) => {}
                            }
                        }
                    }
                });
                Self::Tasks(stop, vec![restarter])
            }
            Phase::PoolExhaustion => {
                // Leave room for the dispatcher's reconnections and the
                // benchmark's own samples.
                let room = stats::connection_headroom(pool).await? - 40;
                let mut idle = Vec::new();
                for _ in 0..room.clamp(0, IDLE_CONNECTIONS) {
                    idle.push(PgConnection::connect_with(&options).await?);
                }
                Self::Idle(idle)
            }
        })
    }

    async fn end(self) -> anyhow::Result<()> {
        match self {
            Self::None => {}
            Self::Held(conn) => conn.close().await?,
            Self::Tasks(stop, tasks) => {
                stop.cancel();
                for task in tasks {
                    task.await??;
                }
            }
            Self::Idle(conns) => {
                for conn in conns {
                    conn.close().await?;
                }
            }
        }
        Ok(())
    }
}

/// The tables that hold operators' settings, which outboxd writes only when
/// an operator changes them.
const SETTINGS_TABLES: [&str; 2] = ["outbox_topic_limits", "outbox_topic_pauses"];

/// The dead tuples of the tables of operators' settings among `tables`.
pub fn settings(tables: &[(String, i64)]) -> i64 {
    tables
        .iter()
        .filter(|(name, _)| SETTINGS_TABLES.contains(&name.as_str()))
        .map(|(_, n)| n)
        .sum()
}

/// The dead tuples of outboxd's bookkeeping tables among `tables`.
pub fn bookkeeping(tables: &[(String, i64)]) -> i64 {
    tables
        .iter()
        .filter(|(name, _)| compaction::TABLES.contains(&name.as_str()))
        .map(|(_, n)| n)
        .sum()
}
