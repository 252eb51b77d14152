//! Process faults: kill -9 of a dispatcher (also while it holds the slots of
//! a topic with a concurrency limit), SIGTERM under load, and handlers that
//! panic or abort the process.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::{Ctx, Outcome, Stage, jitter, mixed_work};
use crate::history::Planned;
use crate::scenarios::TOPIC;

/// kill -9 of a dispatcher at random moments under load, 5 times, with
/// restarts; in lease mode or in transactional mode (where a killed batch's
/// transaction rolls back and its rows run again).
pub(super) async fn kill9(ctx: &Ctx, transactional: bool) -> anyhow::Result<Outcome> {
    let name = if transactional {
        "kill9-transactional"
    } else {
        "kill9"
    };
    let mut stage = Stage::new(ctx, name).await?;
    let env: &[(&str, &str)] = if transactional {
        &[("OUTBOXD_DISPATCHER__IN_TRANSACTION", "true")]
    } else {
        &[]
    };
    stage.launch(stage.spec("a", env)).await?;
    stage.launch(stage.spec("b", env)).await?;
    let producer = stage.producer(mixed_work(3000, 10), 400);
    for _ in 0..5 {
        tokio::time::sleep(jitter(300, 1400)).await;
        let victim = fastrand::usize(..stage.fleet.len());
        stage.fleet[victim].kill9_and_restart().await?;
    }
    let produced = producer.await?;
    stage.quiesce(Duration::from_secs(60), false).await?;
    let (mut outcome, observed) = stage
        .finish(
            produced,
            format!(
                "5 × kill -9 of one of 2 dispatchers, restarted{}",
                if transactional {
                    "; transactional mode"
                } else {
                    ""
                }
            ),
            false,
        )
        .await?;
    if transactional {
        // A crash rolls a batch back (its attempt is counted through the
        // batch record once the dead worker's lock is free), and a failure
        // runs the rows before it once more: within twice the attempts plus
        // the kills.
        const BOUND: u32 = 2 * 10 + 5;
        outcome.verdict.over_attempts = observed
            .invocations
            .values()
            .filter(|&&n| n > BOUND)
            .count();
        let most = observed.invocations.values().max().copied().unwrap_or(0);
        outcome.notes.push(format!(
            "at most {most} invocations of one event (bound in transactional mode: 2 × max_attempts + kills = {BOUND})"
        ));
    }
    Ok(outcome)
}

/// kill -9 of dispatchers that hold the slots of a limited topic: two
/// dispatchers share a limit of 3 and are killed and restarted 4 times. The
/// topic's leased rows are counted every 5 ms and must never be more than 3
/// (a killed process's leases count until they expire: its slots come back
/// with them, or the outbox would never empty); nothing is lost.
pub(super) async fn kill9_limited(ctx: &Ctx) -> anyhow::Result<Outcome> {
    const LIMIT: i64 = 3;
    let mut stage = Stage::new(ctx, "kill9-limited").await?;
    let limit = outbox_core::store::limits::Limits {
        max_running: Some(LIMIT),
        ..Default::default()
    };
    outbox_core::store::limits::set(&stage.db.pool, stage.app, TOPIC, &limit, Some("chaos"))
        .await?;
    stage.launch(stage.spec("a", &[])).await?;
    stage.launch(stage.spec("b", &[])).await?;
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = tokio::spawn({
        let (pool, app, sampling) = (stage.db.pool.clone(), stage.app, sampling.clone());
        async move {
            let (mut most, mut samples) = (0i64, 0u64);
            while sampling.load(Ordering::Relaxed) {
                let leased: Result<i64, sqlx::Error> = sqlx::query_scalar(
                    "SELECT count(*) FROM outbox
                     WHERE app_id = $1 AND topic = $2 AND locked_until > now()",
                )
                .bind(app)
                .bind(TOPIC)
                .fetch_one(&pool)
                .await;
                if let Ok(n) = leased {
                    most = most.max(n);
                    samples += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (most, samples)
        }
    });
    let plan: Vec<Planned> = (0..400)
        .map(|n| {
            if n % 10 == 7 {
                Planned::work(n, "flaky", 10)
            } else {
                Planned::slow(n, 20, 10)
            }
        })
        .collect();
    let producer = stage.producer(plan, 200);
    for _ in 0..4 {
        tokio::time::sleep(jitter(300, 1200)).await;
        let victim = fastrand::usize(..stage.fleet.len());
        stage.fleet[victim].kill9_and_restart().await?;
    }
    let produced = producer.await?;
    stage.quiesce(Duration::from_secs(60), false).await?;
    sampling.store(false, Ordering::Relaxed);
    let (most, samples) = sampler.await?;
    let (mut outcome, _) = stage
        .finish(
            produced,
            format!("4 × kill -9 of one of 2 dispatchers sharing a limit of {LIMIT}, restarted"),
            false,
        )
        .await?;
    outcome.notes.push(format!(
        "at most {most} leased rows of the limited topic at once ({samples} samples, limit {LIMIT})"
    ));
    if most > LIMIT {
        outcome.failure = Some(format!(
            "{most} rows of a topic limited to {LIMIT} were leased at once"
        ));
    } else if samples == 0 {
        outcome.failure = Some("the leased rows were never counted".into());
    }
    Ok(outcome)
}

/// Undecodable payloads, panicking handlers and a handler that aborts the
/// whole process, among healthy events.
pub(super) async fn poison(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let mut stage = Stage::new(ctx, "poison").await?;
    stage.launch(stage.spec("a", &[])).await?;
    stage.launch(stage.spec("b", &[])).await?;
    let plan = (0..320)
        .map(|n| match n {
            50 | 150 | 250 | 280 | 300 => Planned::undecodable(n, 3),
            60 | 160 | 260 | 285 | 305 => Planned::work(n, "panic", 3),
            100 | 200 => Planned::work(n, "abort", 3),
            _ => Planned::slow(n, 10, 20),
        })
        .collect();
    let produced = stage.producer(plan, 200).await?;
    let deaths = stage.quiesce(Duration::from_secs(120), true).await?;
    let (mut outcome, _) = stage
        .finish(
            produced,
            "5 undecodable payloads, 5 panicking handlers, 2 handlers that abort the process"
                .into(),
            false,
        )
        .await?;
    outcome.notes.push(format!(
        "{deaths} process aborts, each restarted; the aborting events were dead-lettered at their 4th claim"
    ));
    if deaths != 6 {
        outcome.failure = Some(format!(
            "expected 6 aborts (2 events × 3 attempts), saw {deaths}"
        ));
    }
    Ok(outcome)
}

/// SIGTERM under load: the dispatcher drains, exits 0, and is started again.
pub(super) async fn sigterm(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let mut stage = Stage::new(ctx, "sigterm").await?;
    stage.launch(stage.spec("a", &[])).await?;
    let plan = (0..1500).map(|n| Planned::slow(n, 200, 10)).collect();
    let producer = stage.producer(plan, 400);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let clean = stage.fleet[0].terminate(Duration::from_secs(10)).await?;
    stage.fleet[0].start_again().await?;
    let produced = producer.await?;
    stage.quiesce(Duration::from_secs(60), false).await?;
    let (mut outcome, _) = stage
        .finish(
            produced,
            "SIGTERM under load (drain grace 1 s), then started again".into(),
            false,
        )
        .await?;
    if !clean {
        outcome.failure = Some("outboxd did not exit 0 after SIGTERM".into());
    }
    Ok(outcome)
}
