//! What the attempt history costs: a backlog whose every row fails its first
//! attempt and succeeds at its second, drained with the history on (the
//! default) and off, alternating for `--drain-rounds` rounds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use outbox_core::store::outbox::AttemptHistory;
use outbox_dispatch::{Event, HandlerError, Registry, RetryPolicy};
use sqlx::PgPool;
use tokio::sync::Notify;

use outboxd::config::Settings;

use super::drain::run_until_drained;
use crate::bench::Bench;
use crate::support::{median, prefill, spread, truncate};

const FLAKY: &str = "bench.flaky";

/// The history scenario: events/s with the history on and off, and their
/// ratio (a failure per row is the most history a drain can write).
pub async fn history(b: &mut Bench) -> anyhow::Result<()> {
    let (app, rows) = (b.app, b.args.rows);
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for round in 0..b.args.drain_rounds {
        eprintln!(
            "bench: history, round {} of {}",
            round + 1,
            b.args.drain_rounds
        );
        let mut order = [
            (AttemptHistory::default(), true),
            (AttemptHistory::OFF, false),
        ];
        if round % 2 == 1 {
            order.reverse();
        }
        for (history, is_on) in order {
            prefill(&b.pool, app, rows, FLAKY).await?;
            let rate = drain_failing_once(&b.pool, &b.settings, rows, history).await?;
            (if is_on { &mut on } else { &mut off }).push(rate);
            truncate(&b.pool).await?;
        }
    }
    let off_rate = median(off.clone());
    b.figure(
        "history",
        format!("every row fails once, history off ({})", spread(&off)),
        off_rate,
        "events/s",
        None,
    );
    b.figure(
        "history",
        format!("every row fails once, history on ({})", spread(&on)),
        median(on),
        "events/s",
        Some((off_rate, "history off")),
    );
    Ok(())
}

/// Drains the `rows` rows of topic `bench.flaky`, whose handler fails each
/// row's first attempt (retried at once) and succeeds at the second; rows per
/// second.
async fn drain_failing_once(
    pool: &PgPool,
    settings: &Settings,
    rows: u32,
    history: AttemptHistory,
) -> anyhow::Result<f64> {
    let succeeded = Arc::new(AtomicU64::new(0));
    let all_succeeded = Arc::new(Notify::new());
    let mut registry = Registry::new();
    {
        let (succeeded, all_succeeded) = (succeeded.clone(), all_succeeded.clone());
        registry.register(FLAKY, move |e: Event| {
            let outcome = if e.attempt < 2 {
                Err(HandlerError::retry("the first attempt fails"))
            } else {
                if succeeded.fetch_add(1, Ordering::Relaxed) + 1 == u64::from(rows) {
                    all_succeeded.notify_one();
                }
                Ok(())
            };
            async move { outcome }
        });
    }
    let config = outbox_dispatch::Config {
        attempt_history: history,
        retry: RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(1),
            max: Duration::from_millis(1),
            jitter: false,
        },
        ..settings.dispatcher_config()
    };
    run_until_drained(pool, registry, config, rows, &all_succeeded).await
}
