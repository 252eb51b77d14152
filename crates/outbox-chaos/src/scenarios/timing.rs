//! Timing faults: handlers slower than the lease, and skewed wall clocks.

use std::time::Duration;

use super::{Ctx, Outcome, Stage};
use crate::history::{Expect, Planned};

/// Handlers running 1.5 × the lease, with the heartbeat (each runs once)
/// and without it (the handler timeout, shorter than the lease, ends each
/// attempt; the events are dead-lettered after `max_attempts`).
pub(super) async fn slow(ctx: &Ctx, heartbeat: bool) -> anyhow::Result<Outcome> {
    let name = if heartbeat {
        "slow-heartbeat"
    } else {
        "slow-no-heartbeat"
    };
    let mut stage = Stage::new(ctx, name).await?;
    let env: &[(&str, &str)] = if heartbeat {
        &[
            ("OUTBOXD_DISPATCHER__HEARTBEAT_INTERVAL_MS", "500"),
            ("OUTBOXD_DISPATCHER__HANDLER_TIMEOUT_MS", "10000"),
        ]
    } else {
        &[
            ("OUTBOXD_DISPATCHER__HEARTBEAT_INTERVAL_MS", "0"),
            ("OUTBOXD_DISPATCHER__HANDLER_TIMEOUT_MS", "1500"),
        ]
    };
    stage.launch(stage.spec("a", env)).await?;
    stage.launch(stage.spec("b", env)).await?;
    let plan = (0..40)
        .map(|n| {
            let p = Planned::slow(n, 3000, 3);
            if heartbeat {
                p
            } else {
                p.expecting(Expect::DeadLetter, 3)
            }
        })
        .collect();
    let produced = stage.producer(plan, 100).await?;
    stage.quiesce(Duration::from_secs(60), false).await?;
    let faults = if heartbeat {
        "handlers take 3 s, lease 2 s, heartbeat every 0.5 s, 2 dispatchers"
    } else {
        "handlers take 3 s, lease 2 s, no heartbeat, handler timeout 1.5 s, 2 dispatchers"
    };
    let (mut outcome, _) = stage.finish(produced, faults.into(), false).await?;
    if outcome.verdict.extra_invocations > 0 {
        outcome.failure = Some(format!(
            "{} invocations beyond plan: a live lease was taken over",
            outcome.verdict.extra_invocations
        ));
    }
    Ok(outcome)
}

/// Dispatchers whose wall clocks are 2 days ahead and 2 days behind:
/// leases, retries and retention use the database clock, so nothing runs
/// twice and no young dead letter is swept.
pub(super) async fn clock_skew(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let mut stage = Stage::new(ctx, "clock-skew").await?;
    let env = [
        ("OUTBOXD_GC__SCHEDULE", "* * * * * *"),
        ("OUTBOXD_DEAD_LETTER_RETENTION_DAYS", "1"),
    ];
    let mut ahead = stage.spec("ahead", &env);
    ahead.clock_offset = Some("+2d".into());
    let mut behind = stage.spec("behind", &env);
    behind.clock_offset = Some("-2d".into());
    stage.launch(ahead).await?;
    stage.launch(behind).await?;
    let plan = (0..600)
        .map(|n| match n % 10 {
            3 => Planned::work(n, "flaky", 3),
            5 => Planned::work(n, "permanent", 3),
            _ => Planned::slow(n, 10, 3),
        })
        .collect();
    let produced = stage.producer(plan, 300).await?;
    stage.quiesce(Duration::from_secs(60), false).await?;
    // Let the leader's GC run a few times over the fresh dead letters.
    let mut gc_runs = 0.0;
    for _ in 0..100 {
        gc_runs = 0.0;
        for process in &stage.fleet {
            gc_runs += process.metric("outboxd_gc_runs_total").await?;
        }
        if gc_runs >= 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut outcome, observed) = stage
        .finish(
            produced,
            "2 dispatchers under libfaketime, clocks +2 days and −2 days; GC every second with 1-day retention".into(),
            false,
        )
        .await?;
    let skew_days = observed.max_clock_skew_secs / 86_400.0;
    outcome.notes.push(format!(
        "worker clocks off by up to {skew_days:.2} days; {gc_runs} GC runs swept no young dead letter"
    ));
    if skew_days < 1.9 {
        outcome.failure = Some(format!(
            "the clock skew did not take effect (max {skew_days:.2} days)"
        ));
    } else if gc_runs < 3.0 {
        outcome.failure = Some(format!("the GC ran only {gc_runs} times"));
    } else if outcome.verdict.extra_invocations > 0 {
        outcome.failure = Some(format!(
            "{} invocations beyond plan: a lease was judged by a skewed clock",
            outcome.verdict.extra_invocations
        ));
    }
    Ok(outcome)
}
