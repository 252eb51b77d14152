//! A fixed offered load for a while, drained by outboxd or by one plain-SQL
//! consumer, optionally with a snapshot held open for the second half.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::ensure;
use outbox_core::store::stats;
use outbox_dispatch::Dispatcher;
use sqlx::{Connection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use outboxd::config::Settings;

use super::{noop, spawn_producers};
use crate::support::RAW_DELETE_ALL;

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
        None,
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
        let d = stats::queue_depth(pool, app).await?;
        max_depth = max_depth.max(d);
        depth.push((started.elapsed().as_secs_f64(), d as f64));
        if hold_snapshot && holder.is_none() && started.elapsed() >= window / 2 {
            at_half = Some((started.elapsed(), produced.load(Ordering::Relaxed), d));
            holder = Some(hold_xmin(pool).await?);
        }
    }
    let elapsed = started.elapsed();
    let produced_total = produced.load(Ordering::Relaxed);
    let final_depth = stats::queue_depth(pool, app).await?;
    stop_producers.cancel();
    for p in producers {
        p.await??;
    }
    let dead_tuples = stats::table_vacuum(pool, "outbox").await?.dead_tuples;
    if let Some(conn) = holder.take() {
        conn.close().await?;
    }
    // Let the drainer finish the tail so the next scenario starts empty.
    while !stats::queue_empty(pool, app).await? {
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
    stats::hold_snapshot(&mut conn).await?;
    Ok(conn)
}

/// [`Drainer::Raw`]: one plain-SQL consumer deleting batches of 100 back to
/// back (1 ms apart when the queue is empty) until `stop` and empty.
async fn raw_consumer(pool: PgPool, app: Uuid, stop: CancellationToken) -> anyhow::Result<()> {
    loop {
        // Baseline: the raw-SQL ceiling's statement, plain SQL on purpose.
        let n = sqlx::query(RAW_DELETE_ALL)
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
