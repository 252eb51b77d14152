//! A deep backlog as the dispatcher sees it: how long one claim takes with
//! few or many rows waiting, the drain rate, and the resident set.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use hdrhistogram::Histogram;
use outbox_dispatch::{Dispatcher, Event, HandlerError, Registry};
use sqlx::{Connection, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use outboxd::config::Settings;

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
    let everything = outbox_core::topics::Served::everything();
    served_claims([small, large], [&everything, &everything], pairs).await
}

/// As [`backlog_claims`], each side claiming only what its `served` takes
/// (e.g. with a topic paused), from claim positions taken for it once
/// before the claims, as a claim loop takes them.
pub async fn served_claims(
    [small, large]: [&PgPool; 2],
    served: [&outbox_core::topics::Served; 2],
    pairs: u32,
) -> anyhow::Result<(f64, f64)> {
    use outbox_core::store::outbox::{Positions, advance_positions, claim_connect_options};
    let mut claimers = [
        sqlx::PgConnection::connect_with(&claim_connect_options(&small.connect_options())).await?,
        sqlx::PgConnection::connect_with(&claim_connect_options(&large.connect_options())).await?,
    ];
    let mut positions = [Positions::default(), Positions::default()];
    for side in 0..2 {
        positions[side] = advance_positions(
            &mut claimers[side],
            &Positions::default(),
            served[side],
            Duration::ZERO,
        )
        .await?;
    }
    let mut claims = [Histogram::<u64>::new(3)?, Histogram::<u64>::new(3)?];
    for pair in 0..pairs {
        let order = if pair % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let mut tx = claimers[side].begin().await?;
            let started = Instant::now();
            let (_, rows) = outbox_core::store::outbox::complete_and_claim(
                &mut *tx,
                &positions[side],
                served[side],
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
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}
