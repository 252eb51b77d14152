//! Scenarios under a steady offered load: producers at a fixed rate against
//! outboxd or a plain-SQL consumer, queue depth over time, a snapshot held
//! open (bloat), latency under load, a deep backlog, and several processes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use hdrhistogram::Histogram;
use outbox_core::{NewEvent, enqueue, enqueue_batch};
use outbox_dispatch::{Dispatcher, Event, HandlerError, Registry};
use serde_json::json;
use sqlx::{Connection, PgPool};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Settings;

/// Who drains the queue during a steady run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drainer {
    /// One plain-SQL consumer: `DELETE … LIMIT 100 FOR UPDATE SKIP LOCKED`.
    Raw,
    /// The outboxd dispatcher with a no-op handler.
    Outboxd,
}

/// What a steady run saw.
#[derive(Debug, Clone)]
pub struct Steady {
    /// Events enqueued per second (what was asked for, as achieved).
    pub offered: f64,
    /// Events completed per second over the whole window.
    pub completed: f64,
    /// Completed per second before the snapshot was held (bloat), if any.
    pub completed_before: Option<f64>,
    /// Completed per second while the snapshot was held (bloat), if any.
    pub completed_during: Option<f64>,
    /// Deepest queue seen.
    pub max_depth: i64,
    /// Queue depth at the end of the window.
    pub final_depth: i64,
    /// (seconds, depth) every half second.
    pub depth: Vec<(f64, f64)>,
    /// Dead tuples of `outbox` at the end (PostgreSQL's statistics).
    pub dead_tuples: i64,
}

/// Producers enqueue `rate` events per second (batches every 10 ms through
/// `enqueue_batch`) for `secs`; `drainer` completes them. With
/// `hold_snapshot`, a REPEATABLE READ transaction on another connection holds
/// the xmin horizon back for the second half of the window.
pub async fn steady(
    pool: &PgPool,
    settings: &Settings,
    app: Uuid,
    rate: u32,
    secs: u32,
    drainer: Drainer,
    hold_snapshot: bool,
) -> anyhow::Result<Steady> {
    let produced = Arc::new(AtomicU64::new(0));
    let stop_producers = CancellationToken::new();
    let producers = spawn_producers(
        pool,
        app,
        "bench.steady",
        rate,
        stop_producers.clone(),
        produced.clone(),
    );
    let stop_drainer = CancellationToken::new();
    let drainer_task = match drainer {
        Drainer::Raw => tokio::spawn(raw_consumer(pool.clone(), app, stop_drainer.clone())),
        Drainer::Outboxd => {
            let dispatcher = Dispatcher::new(
                pool.clone(),
                noop("bench.steady"),
                settings.dispatcher_config(),
            )?;
            let stop = stop_drainer.clone();
            tokio::spawn(async move {
                dispatcher
                    .run(async move { stop.cancelled().await })
                    .await
                    .map(|_| ())
                    .map_err(anyhow::Error::from)
            })
        }
    };
    let window = Duration::from_secs(u64::from(secs));
    let started = Instant::now();
    let mut depth = Vec::new();
    let mut max_depth = 0;
    let mut holder = None;
    let mut at_half = None;
    while started.elapsed() < window {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let d = queue_depth(pool, app).await?;
        max_depth = max_depth.max(d);
        depth.push((started.elapsed().as_secs_f64(), d as f64));
        if hold_snapshot && holder.is_none() && started.elapsed() >= window / 2 {
            at_half = Some((started.elapsed(), produced.load(Ordering::Relaxed), d));
            holder = Some(hold_xmin(pool).await?);
        }
    }
    let elapsed = started.elapsed();
    let produced_total = produced.load(Ordering::Relaxed);
    let final_depth = queue_depth(pool, app).await?;
    stop_producers.cancel();
    for p in producers {
        p.await??;
    }
    let dead_tuples: i64 = sqlx::query_scalar(
        "SELECT coalesce(n_dead_tup, 0) FROM pg_stat_user_tables WHERE relname = 'outbox'",
    )
    .fetch_optional(pool)
    .await?
    .unwrap_or_default();
    if let Some(conn) = holder.take() {
        conn.close().await?;
    }
    // Let the drainer finish the tail so the next scenario starts empty.
    while !queue_empty(pool, app).await? {
        ensure!(!drainer_task.is_finished(), "the drainer stopped early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_drainer.cancel();
    drainer_task.await??;
    let completed_total = produced_total as f64 - final_depth as f64;
    let (completed_before, completed_during) = match at_half {
        Some((t, p, d)) => {
            let before = (p as f64 - d as f64) / t.as_secs_f64();
            let during = (completed_total - (p as f64 - d as f64)) / (elapsed - t).as_secs_f64();
            (Some(before), Some(during))
        }
        None => (None, None),
    };
    Ok(Steady {
        offered: produced_total as f64 / elapsed.as_secs_f64(),
        completed: completed_total / elapsed.as_secs_f64(),
        completed_before,
        completed_during,
        max_depth,
        final_depth,
        depth,
        dead_tuples,
    })
}

/// A connection in an open REPEATABLE READ transaction with its snapshot
/// taken: VACUUM cannot remove any row version deleted after it.
async fn hold_xmin(pool: &PgPool) -> anyhow::Result<sqlx::PgConnection> {
    let options = pool.connect_options();
    let mut conn = sqlx::PgConnection::connect_with(&options).await?;
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut conn)
        .await?;
    sqlx::query("SELECT count(*) FROM apps")
        .execute(&mut conn)
        .await?;
    Ok(conn)
}

async fn queue_depth(pool: &PgPool, app: Uuid) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE app_id = $1")
            .bind(app)
            .fetch_one(pool)
            .await?,
    )
}

/// Whether `app` has no rows left. Polled in tight loops while dispatchers
/// run, so it stops at the first row instead of counting a backlog (a count
/// every few milliseconds would take a core from what is being measured).
async fn queue_empty(pool: &PgPool, app: Uuid) -> anyhow::Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM outbox WHERE app_id = $1)")
            .bind(app)
            .fetch_one(pool)
            .await?,
    )
}

/// Four producers that together enqueue `rate` events per second of
/// `topic`, in one transaction per producer every 10 ms.
fn spawn_producers(
    pool: &PgPool,
    app: Uuid,
    topic: &'static str,
    rate: u32,
    stop: CancellationToken,
    produced: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<()>>> {
    const PRODUCERS: u32 = 4;
    const TICK: Duration = Duration::from_millis(10);
    let per_tick = (f64::from(rate) / 100.0 / f64::from(PRODUCERS)).max(0.0);
    (0..PRODUCERS)
        .map(|_| {
            let (pool, stop, produced) = (pool.clone(), stop.clone(), produced.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(TICK);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut owed = 0.0;
                let mut n = 0u64;
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return Ok(()),
                        _ = tick.tick() => {}
                    }
                    owed += per_tick;
                    let count = owed.floor() as usize;
                    if count == 0 {
                        continue;
                    }
                    owed -= count as f64;
                    let events: Vec<NewEvent> = (0..count)
                        .map(|i| NewEvent::new(topic, json!({ "n": n + i as u64 })))
                        .collect();
                    n += count as u64;
                    let mut tx = pool.begin().await?;
                    enqueue_batch(&mut tx, app, &events).await?;
                    tx.commit().await?;
                    produced.fetch_add(count as u64, Ordering::Relaxed);
                }
            })
        })
        .collect()
}

async fn raw_consumer(pool: PgPool, app: Uuid, stop: CancellationToken) -> anyhow::Result<()> {
    loop {
        let n = sqlx::query(super::RAW_DELETE)
            .bind(app)
            .execute(&pool)
            .await?
            .rows_affected();
        if n == 0 {
            if stop.is_cancelled() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// A registry whose handler for `topic` does nothing.
pub fn noop(topic: &str) -> Registry {
    let mut registry = Registry::new();
    registry.register(topic, |_e: Event| async { Ok::<(), HandlerError>(()) });
    registry
}

/// Commit → handler start of the samples of one or more latency runs.
#[derive(Debug, Clone)]
pub struct Latency {
    /// Commit → handler start, µs.
    taken: Histogram<u64>,
    /// The producer's own commit, µs (part of `taken`).
    commits: Histogram<u64>,
    /// Load events committed, and the seconds they took.
    offered: (u64, f64),
}

impl Latency {
    /// Adds the samples of `other` (a run of the same taker and load).
    pub fn merge(&mut self, other: &Latency) -> anyhow::Result<()> {
        self.taken.add(&other.taken)?;
        self.commits.add(&other.commits)?;
        self.offered.0 += other.offered.0;
        self.offered.1 += other.offered.1;
        Ok(())
    }

    /// The `q` quantile of commit → handler start, ms.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.taken.value_at_quantile(q) as f64 / 1000.0
    }

    /// The 99th percentile of the producer's own commit, ms.
    pub fn commit_p99_ms(&self) -> f64 {
        self.commits.value_at_quantile(0.99) as f64 / 1000.0
    }

    /// Load events the producers committed per second (what was asked for,
    /// as achieved).
    pub fn offered(&self) -> f64 {
        self.offered.0 as f64 / self.offered.1.max(1e-9)
    }
}

/// Who takes the events in a latency run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taker {
    /// Two plain-SQL consumers deleting batches of 100 with `FOR UPDATE SKIP
    /// LOCKED … RETURNING` back to back (1 ms apart when the queue is
    /// empty): what the same load allows without any dispatcher.
    Raw,
    /// outboxd in lease mode (`false`) or transactional mode (`true`).
    Outboxd { in_transaction: bool },
}

/// Commit → handler start (for [`Taker::Raw`]: → the DELETE returning the
/// row) for `samples` single-event transactions, while producers offer
/// `load_rate` other events per second (0: idle).
pub async fn latency(
    pool: &PgPool,
    settings: &Settings,
    app: Uuid,
    samples: u32,
    load_rate: u32,
    taker: Taker,
) -> anyhow::Result<Latency> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Uuid, Instant)>();
    let stop = CancellationToken::new();
    let run = match taker {
        Taker::Raw => {
            let consumers: Vec<_> = (0..2)
                .map(|_| tokio::spawn(raw_taker(pool.clone(), app, tx.clone(), stop.clone())))
                .collect();
            tokio::spawn(async move {
                for consumer in consumers {
                    consumer.await??;
                }
                Ok::<(), anyhow::Error>(())
            })
        }
        Taker::Outboxd { in_transaction } => {
            let tx = Arc::new(tx);
            let mut registry = noop("bench.load");
            registry.register("bench.latency", move |e: Event| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send((e.id, Instant::now()));
                    Ok::<(), HandlerError>(())
                }
            });
            let config = outbox_dispatch::Config {
                in_transaction,
                ..settings.dispatcher_config()
            };
            let dispatcher = Dispatcher::new(pool.clone(), registry, config)?;
            let stop = stop.clone();
            tokio::spawn(async move {
                dispatcher
                    .run(async move { stop.cancelled().await })
                    .await?;
                Ok(())
            })
        }
    };
    let stop_load = CancellationToken::new();
    let produced = Arc::new(AtomicU64::new(0));
    let load_started = Instant::now();
    let producers = if load_rate > 0 {
        spawn_producers(
            pool,
            app,
            "bench.load",
            load_rate,
            stop_load.clone(),
            produced.clone(),
        )
    } else {
        Vec::new()
    };
    // Let the dispatcher reach its steady state before measuring.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut histogram = Histogram::<u64>::new(3)?;
    let mut commits = Histogram::<u64>::new(3)?;
    let mut fell_behind = false;
    for _ in 0..samples {
        let mut txn = pool.begin().await?;
        let id = enqueue(&mut txn, app, &NewEvent::new("bench.latency", json!({}))).await?;
        let committing = Instant::now();
        txn.commit().await?;
        commits.record(committing.elapsed().as_micros() as u64)?;
        match tokio::time::timeout(TAKE_TIMEOUT, rx.recv()).await {
            Ok(taken) => {
                let (got, at) = taken.context("latency handler gone")?;
                ensure!(got == id, "handler saw an unexpected event");
                histogram.record(at.duration_since(committing).as_micros() as u64)?;
            }
            Err(_) => {
                // The taker cannot keep up with the load: the queue grows
                // without bound. Counted as the timeout, and no further
                // samples are taken (each would wait as long).
                histogram.record(TAKE_TIMEOUT.as_micros() as u64)?;
                fell_behind = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(2 + fastrand::u64(..3))).await;
    }
    stop_load.cancel();
    let offered = (
        produced.load(Ordering::Relaxed),
        load_started.elapsed().as_secs_f64(),
    );
    for p in producers {
        p.await??;
    }
    // A taker that fell behind would take long to drain what is left; the
    // caller truncates the outbox instead.
    while !fell_behind && !queue_empty(pool, app).await? {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    run.await??;
    Ok(Latency {
        taken: histogram,
        commits,
        offered,
    })
}

/// A plain-SQL consumer for [`Taker::Raw`]: deletes batches of due rows and
/// reports when each latency sample was deleted.
async fn raw_taker(
    pool: PgPool,
    app: Uuid,
    taken: mpsc::UnboundedSender<(Uuid, Instant)>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    // Planned once, like a claim loop's statement. `DELETE … WHERE id IN
    // (SELECT …)` as in the drain baseline is at the planner's mercy here:
    // planned from a short queue's statistics it becomes a sequential scan
    // (with a hash join or a sort) of the whole outbox per batch, and falls
    // behind for good once the queue grows. Deleting the picked `ctid`s is
    // always an index range scan and a TID scan.
    let options = outbox_core::store::outbox::claim_connect_options(&pool.connect_options());
    let mut conn = sqlx::PgConnection::connect_with(&options).await?;
    while !stop.is_cancelled() {
        let rows: Vec<(Uuid, String)> = sqlx::query_as(RAW_TAKE)
            .bind(app)
            .fetch_all(&mut conn)
            .await?;
        let at = Instant::now();
        for (id, topic) in &rows {
            if topic == "bench.latency" {
                let _ = taken.send((*id, at));
            }
        }
        if rows.is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    conn.close().await?;
    Ok(())
}

/// What a [`Taker::Raw`] consumer runs: the drain baseline's batch of 100,
/// deleted by `ctid`.
const RAW_TAKE: &str = "DELETE FROM outbox WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM outbox WHERE app_id = $1 AND run_at <= now()
    ORDER BY run_at, id LIMIT 100 FOR UPDATE SKIP LOCKED))
RETURNING id, topic";

/// How long a latency sample may wait for its taker before the run counts
/// as fallen behind.
const TAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a deep backlog looks like to the dispatcher.
#[derive(Debug, Clone)]
pub struct Backlog {
    /// Events per second in each of the first windows of `measured` events
    /// (the first from the first handled event, so the dispatcher's start
    /// does not count).
    pub drain_rates: Vec<f64>,
    /// Largest resident set size while draining everything, MiB.
    pub peak_rss_mib: f64,
}

/// Median times, in ms, of one claim of 100 rows from the backlog of
/// `small` and from that of `large` (each a database of its own), as a claim
/// loop makes them: on a connection of its own kind, with nothing to
/// complete. The claims are rolled back, so every sample sees the same
/// backlog, and they alternate between the two (in turn first), so a drift
/// of the machine's speed during the run weighs on both alike.
pub async fn backlog_claims(
    small: &PgPool,
    large: &PgPool,
    pairs: u32,
) -> anyhow::Result<(f64, f64)> {
    use outbox_core::store::outbox::claim_connect_options;
    let mut claimers = [
        sqlx::PgConnection::connect_with(&claim_connect_options(&small.connect_options())).await?,
        sqlx::PgConnection::connect_with(&claim_connect_options(&large.connect_options())).await?,
    ];
    let mut claims = [Histogram::<u64>::new(3)?, Histogram::<u64>::new(3)?];
    for pair in 0..pairs {
        let order = if pair % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let mut tx = claimers[side].begin().await?;
            let started = Instant::now();
            let (_, rows) = outbox_core::store::outbox::complete_and_claim(
                &mut *tx,
                &[],
                "bench",
                100,
                Duration::from_secs(30),
            )
            .await?;
            claims[side].record(started.elapsed().as_micros() as u64)?;
            ensure!(rows.len() == 100, "a claim returned {} rows", rows.len());
            tx.rollback().await?;
        }
    }
    for claimer in claimers {
        claimer.close().await?;
    }
    let p50 = |h: &Histogram<u64>| h.value_at_quantile(0.5) as f64 / 1000.0;
    Ok((p50(&claims[0]), p50(&claims[1])))
}

/// With `waiting` due rows already in the outbox of `pool`: the rates of
/// handling the first `windows` windows of `measured` rows each, then
/// everything is drained while the resident set size is sampled.
pub async fn backlog(
    pool: &PgPool,
    settings: &Settings,
    waiting: u32,
    measured: u32,
    windows: u32,
) -> anyhow::Result<Backlog> {
    let handled = Arc::new(AtomicU64::new(0));
    let reached = Arc::new(Notify::new());
    // When the first event and each `measured`-th one were handled.
    let marks = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let last = u64::from(measured) * u64::from(windows.max(1));
    let mut registry = Registry::new();
    {
        let (handled, reached, marks) = (handled.clone(), reached.clone(), marks.clone());
        registry.register("bench.noop", move |_e: Event| {
            let n = handled.fetch_add(1, Ordering::Relaxed) + 1;
            if (n == 1 || n % u64::from(measured) == 0)
                && n <= last
                && let Ok(mut marks) = marks.lock()
            {
                marks.push(Instant::now());
            }
            if n == last {
                reached.notify_one();
            }
            async { Ok::<(), HandlerError>(()) }
        });
    }
    let dispatcher = Dispatcher::new(pool.clone(), registry, settings.dispatcher_config())?;
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let stop = stop.clone();
        async move { dispatcher.run(async move { stop.cancelled().await }).await }
    });
    tokio::time::timeout(Duration::from_secs(600), reached.notified())
        .await
        .context("the measured rows were not handled within 10 minutes")?;
    let mut marks = marks.lock().map(|m| m.clone()).unwrap_or_default();
    marks.sort();
    let drain_rates: Vec<f64> = marks
        .windows(2)
        .enumerate()
        .map(|(i, w)| {
            // The first window starts at its first event, not before it.
            let events = if i == 0 { measured - 1 } else { measured };
            f64::from(events) / w[1].duration_since(w[0]).as_secs_f64().max(1e-6)
        })
        .collect();
    ensure!(!drain_rates.is_empty(), "no drain window was measured");
    let mut peak_rss_mib = rss_mib();
    while handled.load(Ordering::Relaxed) < u64::from(waiting)
        || outbox_core::store::outbox::count(pool).await? > 0
    {
        ensure!(!run.is_finished(), "the dispatcher stopped early");
        peak_rss_mib = peak_rss_mib.max(rss_mib());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    run.await??;
    Ok(Backlog {
        drain_rates,
        peak_rss_mib,
    })
}

/// This process's resident set size in MiB (Linux), 0 when unknown.
pub fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// What each scale-out worker process does per event.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkerLoad {
    /// Handler time, ms (0: a no-op handler).
    pub handler_ms: u64,
    /// The process's `dispatcher.concurrency` (0: the configured one).
    pub concurrency: u32,
}

/// Drains `rows` with `processes` separate `outboxd bench-worker` processes;
/// returns events per second. The rows wait in a suspended app until every
/// worker is up, so start-up is not measured.
pub async fn scale_out(
    pool: &PgPool,
    rows: u32,
    processes: u32,
    load: WorkerLoad,
) -> anyhow::Result<f64> {
    let app = outbox_core::store::apps::ensure(pool, "bench-scale", "bench scale-out")
        .await?
        .id;
    outbox_core::store::apps::set_suspended(pool, "bench-scale", true).await?;
    super::prefill(pool, app, rows, "bench.noop").await?;
    let exe = std::env::current_exe().context("finding the outboxd binary")?;
    let mut workers = Vec::new();
    for _ in 0..processes {
        let mut command = tokio::process::Command::new(&exe);
        command
            .args(["bench-worker", "--handler-ms", &load.handler_ms.to_string()])
            .stdin(std::process::Stdio::null());
        if load.concurrency > 0 {
            command.env(
                "OUTBOXD_DISPATCHER__CONCURRENCY",
                load.concurrency.to_string(),
            );
        }
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting a bench worker")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if line.starts_with("bench-worker ready") {
                    return Ok(());
                }
            }
            Err(std::io::Error::other("the worker exited"))
        })
        .await
        .context("a bench worker did not start within 30 s")??;
        workers.push(child);
    }
    // The workers' LISTEN connections are up shortly after "ready".
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    outbox_core::store::apps::set_suspended(pool, "bench-scale", false).await?;
    sqlx::query("SELECT pg_notify('outbox_due', '')")
        .execute(pool)
        .await?;
    while !queue_empty(pool, app).await? {
        for w in &mut workers {
            ensure!(w.try_wait()?.is_none(), "a bench worker died");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = f64::from(rows) / started.elapsed().as_secs_f64();
    for mut w in workers {
        if let Some(pid) = w.id() {
            let _ = tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), w.wait()).await;
    }
    Ok(rate)
}
