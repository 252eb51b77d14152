//! Commit → handler start for single-event transactions, idle or under a
//! steady load, taken by outboxd (either mode) or by plain-SQL consumers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use hdrhistogram::Histogram;
use outbox_core::store::stats;
use outbox_core::{NewEvent, enqueue};
use outbox_dispatch::{Dispatcher, Event, HandlerError};
use serde_json::json;
use sqlx::{Connection, PgPool};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use outboxd::config::Settings;

use super::{noop, spawn_producers};

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
    /// Two plain-SQL consumers that lease batches of 100 and delete each
    /// batch with the statement that leases the next: the two writes per
    /// row of lease mode, without any dispatcher.
    RawLease,
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
        Taker::Raw | Taker::RawLease => {
            let leases = taker == Taker::RawLease;
            let consumers: Vec<_> = (0..2)
                .map(|_| {
                    tokio::spawn(raw_taker(
                        pool.clone(),
                        app,
                        leases,
                        tx.clone(),
                        stop.clone(),
                    ))
                })
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
            None,
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
    while !fell_behind && !stats::queue_empty(pool, app).await? {
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

/// A plain-SQL consumer: deletes batches of due rows ([`Taker::Raw`]), or
/// with `leases` leases them and deletes each batch with the statement that
/// leases the next ([`Taker::RawLease`]); reports when each latency sample
/// was taken.
async fn raw_taker(
    pool: PgPool,
    app: Uuid,
    leases: bool,
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
    let mut leased: Vec<Uuid> = Vec::new();
    while !stop.is_cancelled() {
        // Baseline: the raw-SQL taker, plain SQL on purpose.
        let rows: Vec<(Uuid, String)> = if leases {
            sqlx::query_as(RAW_LEASE_TAKE)
                .bind(app)
                .bind(&leased)
                .fetch_all(&mut conn)
                .await?
        } else {
            sqlx::query_as(RAW_TAKE)
                .bind(app)
                .fetch_all(&mut conn)
                .await?
        };
        let at = Instant::now();
        if leases {
            leased = rows.iter().map(|(id, _)| *id).collect();
        }
        for (id, topic) in &rows {
            if topic == "bench.latency" {
                let _ = taken.send((*id, at));
            }
        }
        if rows.is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    if !leased.is_empty() {
        // The last batch: deleted, and nothing of the nil app leased.
        sqlx::query(RAW_LEASE_TAKE)
            .bind(Uuid::nil())
            .bind(&leased)
            .execute(&mut conn)
            .await?;
    }
    conn.close().await?;
    Ok(())
}

/// What a [`Taker::Raw`] consumer runs: the drain baseline's batch of 100,
/// deleted by `ctid`.
// Baseline: the raw-SQL ceiling for latency, plain SQL on purpose.
// A `ctid` names a row within one table, and `outbox` has its segments as
// children: the row's table goes with it.
const RAW_TAKE: &str = "WITH picked AS (
    SELECT tableoid, ctid FROM outbox WHERE app_id = $1 AND run_at <= now()
    ORDER BY run_at, id LIMIT 100 FOR UPDATE SKIP LOCKED)
DELETE FROM outbox o WHERE o.ctid = ANY (ARRAY(SELECT ctid FROM picked))
    AND (o.tableoid, o.ctid) IN (SELECT tableoid, ctid FROM picked)
RETURNING id, topic";

/// What a [`Taker::RawLease`] consumer runs: deletes the rows `$2` it leased
/// last and leases the next 100 due rows of app `$1` whose lease is unset or
/// past, by `ctid` as [`RAW_TAKE`].
// Baseline: the raw-SQL ceiling for latency with leases, plain SQL on purpose.
const RAW_LEASE_TAKE: &str = "WITH done AS (
    DELETE FROM outbox WHERE id = ANY ($2)),
picked AS (
    SELECT tableoid, ctid FROM outbox WHERE app_id = $1 AND run_at <= now()
      AND (locked_until IS NULL OR locked_until < now())
    ORDER BY run_at, id LIMIT 100 FOR UPDATE SKIP LOCKED)
UPDATE outbox o
SET attempt_count = o.attempt_count + 1, lease_token = o.lease_token + 1,
    locked_by = 'raw', locked_until = now() + interval '30 seconds',
    last_attempt_at = now()
WHERE o.ctid = ANY (ARRAY(SELECT ctid FROM picked))
    AND (o.tableoid, o.ctid) IN (SELECT tableoid, ctid FROM picked)
RETURNING id, topic";

/// How long a latency sample may wait for its taker before the run counts
/// as fallen behind.
const TAKE_TIMEOUT: Duration = Duration::from_secs(10);
