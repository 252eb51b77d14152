//! Measurements under a steady offered load: producers at a fixed rate
//! against outboxd or a plain-SQL consumer, queue depth over time, a
//! snapshot held open (bloat), latency under load, a deep backlog, and
//! several processes.
//!
//! One file per kind: `steady` (steady load and bloat), `latency` (the
//! latency takers), `backlog` (claims and drain rates of a deep backlog) and
//! `scale_out` (worker processes), `phases` (trouble under a steady load). The producers and the no-op registry they
//! share are here.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use outbox_core::{NewEvent, enqueue_batch};
use outbox_dispatch::{Event, HandlerError, Registry};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

mod backlog;
mod latency;
pub mod phases;
mod scale_out;
mod steady;

pub use self::backlog::{backlog, backlog_claims, served_claims};
pub use self::latency::{Latency, Taker, latency};
pub use self::scale_out::{WorkerLoad, scale_out};
pub use self::steady::{Drainer, steady};

/// Four producers that together enqueue `rate` events per second of
/// `topic`, in one transaction per producer every 10 ms. With `uncertain`,
/// they ride out a restart of the server (counting there the events of
/// commits that failed) instead of stopping at the first error.
fn spawn_producers(
    pool: &PgPool,
    app: Uuid,
    topic: &'static str,
    rate: u32,
    stop: CancellationToken,
    produced: Arc<AtomicU64>,
    uncertain: Option<Arc<AtomicU64>>,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<()>>> {
    const PRODUCERS: u32 = 4;
    const TICK: Duration = Duration::from_millis(10);
    let per_tick = (f64::from(rate) / 100.0 / f64::from(PRODUCERS)).max(0.0);
    (0..PRODUCERS)
        .map(|_| {
            let (pool, stop, produced) = (pool.clone(), stop.clone(), produced.clone());
            let uncertain = uncertain.clone();
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
                    let Some(uncertain) = &uncertain else {
                        let mut tx = pool.begin().await?;
                        enqueue_batch(&mut tx, app, &events).await?;
                        tx.commit().await?;
                        produced.fetch_add(count as u64, Ordering::Relaxed);
                        continue;
                    };
                    // Riding out a restart: a failed begin or insert
                    // enqueued nothing (the events stay owed); a failed
                    // commit may or may not have.
                    let Ok(mut tx) = pool.begin().await else {
                        owed += count as f64;
                        continue;
                    };
                    if enqueue_batch(&mut tx, app, &events).await.is_err() {
                        owed += count as f64;
                        continue;
                    }
                    match tx.commit().await {
                        Ok(()) => produced.fetch_add(count as u64, Ordering::Relaxed),
                        Err(_) => uncertain.fetch_add(count as u64, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect()
}

/// A registry whose handler for `topic` does nothing.
fn noop(topic: &str) -> Registry {
    let mut registry = Registry::new();
    registry.register(topic, |_e: Event| async { Ok::<(), HandlerError>(()) });
    registry
}
