//! (a) The raw ceiling: claim-and-delete batches with plain SQL, and (with
//! the drain scenario) the raw lease drain (lease, then delete, with plain
//! SQL) and the same backlog dispatched by outboxd in lease and
//! transactional mode; with `--explain`, the plans of the hot statements.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use outbox_core::model::Lease;
use outbox_core::store::{limits, stats};
use outbox_dispatch::{Dispatcher, Event, HandlerError, Registry};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use outboxd::config::Settings;

use crate::bench::Bench;
use crate::support::{BATCH, RAW_DELETE, RAW_LEASE, median, prefill, spread, truncate};

/// A topic with a concurrency limit while another one drains.
const LIMITED: &str = "bench.limited";

/// The raw drain baseline (always), and when `drain` is wanted the raw lease
/// drain and outboxd's drains of the same backlog (lease mode, transactional
/// mode, and lease mode while another topic has a limit). The machine's
/// speed drifts by tens of percent from one minute to the next, so they
/// alternate for
/// `--drain-rounds` rounds and each figure is the median of its rounds.
/// Sets `raw_drain` and `drain` of `b` for the scenarios that follow.
pub async fn drain(b: &mut Bench) -> anyhow::Result<()> {
    let (app, raw_app, rows) = (b.app, b.raw_app, b.args.rows);
    let wanted = b.wants("drain");
    let rounds = if wanted { b.args.drain_rounds } else { 1 };
    let (mut raw_rates, mut lease_rates, mut tx_rates) = (Vec::new(), Vec::new(), Vec::new());
    let (mut limited_rates, mut raw_lease_rates) = (Vec::new(), Vec::new());
    let other_topic_limited = limits::Limits {
        max_running: Some(4),
        ..limits::Limits::default()
    };
    for round in 0..rounds {
        eprintln!("bench: drain, round {} of {rounds}", round + 1);
        prefill(&b.pool, raw_app, rows, "bench.noop").await?;
        if b.args.explain && round == 0 {
            let plans = explain(&b.pool, raw_app).await?;
            b.plans.push_str(&plans);
        }
        raw_rates.push(raw_drain(&b.pool, raw_app, rows, b.args.raw_consumers).await?);
        truncate(&b.pool).await?;
        if wanted {
            prefill(&b.pool, raw_app, rows, "bench.noop").await?;
            raw_lease_rates
                .push(raw_lease_drain(&b.pool, raw_app, rows, b.args.raw_consumers).await?);
            truncate(&b.pool).await?;
            for (in_transaction, rates) in [(false, &mut lease_rates), (true, &mut tx_rates)] {
                prefill(&b.pool, app, rows, "bench.noop").await?;
                rates.push(outboxd_drain(&b.pool, &b.settings, rows, in_transaction).await?);
                truncate(&b.pool).await?;
            }
            // Limits in place that do not constrain this topic: the claim
            // loops look at the limited topic besides draining this one.
            limits::set(&b.pool, app, LIMITED, &other_topic_limited, None).await?;
            prefill(&b.pool, app, rows, "bench.noop").await?;
            limited_rates.push(outboxd_drain(&b.pool, &b.settings, rows, false).await?);
            truncate(&b.pool).await?;
            limits::remove(&b.pool, app, LIMITED).await?;
        }
    }
    let raw_drain = median(raw_rates.clone());
    let ceiling = (raw_drain, "raw drain");
    b.figure(
        "drain",
        format!(
            "raw drain: DELETE…SKIP LOCKED LIMIT {BATCH}, {} conns ({})",
            b.args.raw_consumers,
            spread(&raw_rates)
        ),
        raw_drain,
        "rows/s",
        Some(ceiling),
    );
    let drain = (!lease_rates.is_empty()).then(|| median(lease_rates.clone()));
    if let Some(rate) = drain {
        // Lease mode writes each row twice, the raw drain once: the raw lease
        // drain is the ceiling of that design, and the ratio of each round's
        // pair (taken one after the other) says how close outboxd comes to it.
        let raw_lease = median(raw_lease_rates.clone());
        b.figure(
            "drain",
            format!(
                "raw lease drain: lease, then delete, {} conns ({})",
                b.args.raw_consumers,
                spread(&raw_lease_rates)
            ),
            raw_lease,
            "rows/s",
            Some(ceiling),
        );
        let per_round: Vec<f64> = lease_rates
            .iter()
            .zip(&raw_lease_rates)
            .map(|(lease, raw)| lease / raw)
            .collect();
        let rounds: Vec<String> = per_round.iter().map(|r| format!("{r:.2}")).collect();
        b.figure(
            "drain",
            format!("outboxd dispatch, lease mode ({})", rounds.join(" ")),
            median(per_round),
            "ratio",
            Some((1.0, "raw lease drain, per round")),
        );
        b.figure(
            "drain",
            format!(
                "outboxd dispatch: backlog, no-op handler ({})",
                spread(&lease_rates)
            ),
            rate,
            "events/s",
            Some(ceiling),
        );
        b.figure(
            "drain",
            format!(
                "outboxd dispatch: transactional mode ({})",
                spread(&tx_rates)
            ),
            median(tx_rates.clone()),
            "events/s",
            Some(ceiling),
        );
        b.figure(
            "drain",
            format!(
                "outboxd dispatch: another topic limited ({})",
                spread(&limited_rates)
            ),
            median(limited_rates.clone()),
            "events/s",
            Some((rate, "lease-mode drain")),
        );
    }
    b.raw_drain = raw_drain;
    b.drain = drain;
    Ok(())
}

/// `EXPLAIN (ANALYZE, BUFFERS)` of the claim, the combined complete-and-claim
/// and the raw baseline's statement, on the backlog of `app` (rolled back).
async fn explain(pool: &PgPool, app: Uuid) -> anyhow::Result<String> {
    const WORKER: &str = "explain";
    const LEASE: Duration = Duration::from_secs(30);
    let mut out = String::new();
    let mut tx = pool.begin().await?;
    let claimed = outbox_core::store::outbox::claim(&mut *tx, WORKER, 100, LEASE).await?;
    let done: Vec<Lease> = claimed
        .iter()
        .map(|c| Lease {
            id: c.id,
            token: c.lease_token,
        })
        .collect();
    let lines = stats::explain_claim(&mut *tx, WORKER, 100, LEASE).await?;
    out.push_str(&format!("## claim (batch 100)\n\n{}\n\n", lines.join("\n")));
    let lines =
        stats::explain_complete_and_claim(&mut *tx, &Default::default(), &done, WORKER, 100, LEASE)
            .await?;
    out.push_str(&format!(
        "## complete 100 and claim 100\n\n{}\n\n",
        lines.join("\n")
    ));
    let lines = stats::explain_take(&mut *tx, 100).await?;
    out.push_str(&format!(
        "## transactional take (batch 100)\n\n{}\n\n",
        lines.join("\n")
    ));
    // Baseline: the plan of the raw-SQL ceiling's statement, plain SQL on
    // purpose.
    let lines: Vec<String> =
        sqlx::query_scalar(&format!("EXPLAIN (ANALYZE, BUFFERS) {RAW_DELETE}"))
            .bind(app)
            .fetch_all(&mut *tx)
            .await?;
    out.push_str(&format!(
        "## raw baseline: DELETE … LIMIT 100 SKIP LOCKED\n\n{}\n",
        lines.join("\n")
    ));
    tx.rollback().await?;
    Ok(out)
}

/// The raw ceiling: `consumers` connections delete the `rows` rows of `app`
/// in batches of 100 until none is left; rows per second.
async fn raw_drain(pool: &PgPool, app: Uuid, rows: u32, consumers: u32) -> anyhow::Result<f64> {
    consume_all(pool, rows, consumers, "raw drain", move |pool| async move {
        let mut total = 0u64;
        loop {
            // Baseline: the raw-SQL ceiling, plain SQL on purpose.
            let n = sqlx::query(RAW_DELETE)
                .bind(app)
                .execute(&pool)
                .await?
                .rows_affected();
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    })
    .await
}

/// The raw lease ceiling: `consumers` connections lease the `rows` rows of
/// `app` in batches of 100 and delete each batch with the statement that
/// leases the next, until none is left; rows per second.
async fn raw_lease_drain(
    pool: &PgPool,
    app: Uuid,
    rows: u32,
    consumers: u32,
) -> anyhow::Result<f64> {
    consume_all(
        pool,
        rows,
        consumers,
        "raw lease drain",
        move |pool| async move {
            let mut total = 0u64;
            let mut leased: Vec<Uuid> = Vec::new();
            loop {
                // Baseline: the raw lease ceiling, plain SQL on purpose.
                let next: Vec<Uuid> = sqlx::query_scalar(RAW_LEASE)
                    .bind(app)
                    .bind(&leased)
                    .fetch_all(&pool)
                    .await?;
                total += leased.len() as u64;
                if next.is_empty() {
                    return Ok(total);
                }
                leased = next;
            }
        },
    )
    .await
}

/// Runs `consumers` copies of `consume` side by side, each returning how many
/// rows it deleted, and checks that together they deleted the `rows` rows of
/// the backlog; rows per second.
async fn consume_all<F, Fut>(
    pool: &PgPool,
    rows: u32,
    consumers: u32,
    what: &str,
    consume: F,
) -> anyhow::Result<f64>
where
    F: Fn(PgPool) -> Fut,
    Fut: std::future::Future<Output = Result<u64, sqlx::Error>> + Send + 'static,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..consumers)
        .map(|_| tokio::spawn(consume(pool.clone())))
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    ensure!(
        total == u64::from(rows),
        "{what} deleted {total} of {rows} rows"
    );
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// outboxd dispatches the `rows` rows waiting in the outbox (topic
/// `bench.noop`) with a no-op handler, in lease or transactional mode;
/// events per second.
pub async fn outboxd_drain(
    pool: &PgPool,
    settings: &Settings,
    rows: u32,
    in_transaction: bool,
) -> anyhow::Result<f64> {
    let handled = Arc::new(AtomicU64::new(0));
    let all_handled = Arc::new(Notify::new());
    let mut registry = Registry::new();
    {
        let (handled, all_handled) = (handled.clone(), all_handled.clone());
        registry.register("bench.noop", move |_e: Event| {
            if handled.fetch_add(1, Ordering::Relaxed) + 1 == u64::from(rows) {
                all_handled.notify_one();
            }
            async { Ok::<(), HandlerError>(()) }
        });
    }
    let config = outbox_dispatch::Config {
        in_transaction,
        ..settings.dispatcher_config()
    };
    run_until_drained(pool, registry, config, rows, &all_handled).await
}

/// Runs a dispatcher with `registry` and `config` until its handlers have
/// signalled `all_handled` and the outbox is empty, and checks that it
/// completed the `rows` rows; rows per second from its start.
pub async fn run_until_drained(
    pool: &PgPool,
    registry: Registry,
    config: outbox_dispatch::Config,
    rows: u32,
    all_handled: &Notify,
) -> anyhow::Result<f64> {
    let dispatcher = Dispatcher::new(pool.clone(), registry, config)?;
    let stop = CancellationToken::new();
    let started = Instant::now();
    let run = tokio::spawn({
        let dispatcher = dispatcher.clone();
        let stop = stop.clone();
        async move { dispatcher.run(async move { stop.cancelled().await }).await }
    });
    // Counting rows while the dispatcher works would compete with it for the
    // two cores; count handler calls instead, then wait for the last deletes.
    tokio::time::timeout(Duration::from_secs(600), all_handled.notified())
        .await
        .context("the backlog was not handled within 10 minutes")?;
    while outbox_core::store::outbox::count(pool).await? > 0 {
        ensure!(
            !run.is_finished(),
            "the dispatcher stopped before the backlog was drained"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    stop.cancel();
    let report = run.await??;
    ensure!(
        report.totals.completed == rows as usize,
        "dispatcher completed {} of {rows} rows",
        report.totals.completed
    );
    Ok(rows as f64 / elapsed.as_secs_f64())
}
