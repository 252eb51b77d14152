//! `outboxd bench`: outboxd's throughput and latency next to the raw
//! PostgreSQL ceiling for the same work, measured in one run on one database.
//!
//! The raw baseline drains a backlog with plain
//! `DELETE … WHERE id IN (SELECT … LIMIT 100 FOR UPDATE SKIP LOCKED)`;
//! every outboxd figure is printed with its ratio to that ceiling (and
//! enqueue figures also to plain INSERTs of the same row shape).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Args;
use hdrhistogram::Histogram;
use outbox_core::{NewEvent, enqueue, enqueue_batch};
use outbox_dispatch::{Dispatcher, Event, HandlerError, Registry};
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Settings;

/// Sizes of the benchmark run.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Backlog size for the drain scenarios (raw and end-to-end).
    #[arg(long, default_value_t = 100_000)]
    rows: u32,
    /// Rows enqueued by the enqueue scenarios.
    #[arg(long, default_value_t = 20_000)]
    enqueue_rows: u32,
    /// Concurrent producers for the single-row enqueue scenarios.
    #[arg(long, default_value_t = 4)]
    producers: u32,
    /// Concurrent connections of the raw drain baseline.
    #[arg(long, default_value_t = 2)]
    raw_consumers: u32,
    /// Samples for the idle latency scenario.
    #[arg(long, default_value_t = 500)]
    latency_samples: u32,
    /// Rows for the relay and consume scenarios (they need NATS_URL).
    #[arg(long, default_value_t = 50_000)]
    relay_rows: u32,
    /// Run only these scenarios (comma-separated: enqueue, drain, latency,
    /// relay); the raw drain baseline always runs.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "enqueue,drain,latency,relay"
    )]
    scenarios: Vec<String>,
}

const BATCH: usize = 100;

/// One printed figure.
struct Figure {
    name: String,
    value: f64,
    unit: &'static str,
    ratio_to: Option<(f64, &'static str)>,
}

pub async fn run(settings: Settings, args: BenchArgs) -> anyhow::Result<()> {
    ensure!(args.rows >= 1000, "--rows must be at least 1000");
    ensure!(
        args.enqueue_rows >= 100,
        "--enqueue-rows must be at least 100"
    );
    ensure!(
        (1..=64).contains(&args.producers),
        "--producers must be in 1..=64"
    );
    ensure!(
        (1..=16).contains(&args.raw_consumers),
        "--raw-consumers must be in 1..=16"
    );
    ensure!(
        args.latency_samples >= 10,
        "--latency-samples must be at least 10"
    );
    let mut settings = settings;
    settings.database.max_connections = settings.database.max_connections.max(args.producers + 8);
    let pool = crate::connect(&settings).await?;
    outbox_core::migrate(&pool).await?;
    let raw_app = outbox_core::store::apps::ensure(&pool, "bench-raw", "bench raw SQL")
        .await?
        .id;
    let app = outbox_core::store::apps::ensure(&pool, "bench", "bench outboxd")
        .await?
        .id;
    let leftover = outbox_core::store::outbox::count(&pool).await?;
    ensure!(
        leftover == 0,
        "the outbox already holds {leftover} rows; run the benchmark on an empty database"
    );
    let durability: (String, String) =
        sqlx::query_as("SELECT current_setting('fsync'), current_setting('synchronous_commit')")
            .fetch_one(&pool)
            .await?;
    println!(
        "outboxd bench: rows={} enqueue_rows={} producers={} fsync={} synchronous_commit={} cores={}",
        args.rows,
        args.enqueue_rows,
        args.producers,
        durability.0,
        durability.1,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut figures = Vec::new();

    // (a) the raw ceiling: claim-and-delete batches with plain SQL.
    prefill(&pool, raw_app, args.rows, "bench.noop").await?;
    let raw_drain = raw_drain(&pool, raw_app, args.rows, args.raw_consumers).await?;
    let ceiling = (raw_drain, "raw drain");
    figures.push(Figure {
        name: format!(
            "raw drain: DELETE…SKIP LOCKED LIMIT {BATCH}, {} conns",
            args.raw_consumers
        ),
        value: raw_drain,
        unit: "rows/s",
        ratio_to: Some(ceiling),
    });
    let wants = |name: &str| args.scenarios.iter().any(|s| s == name);
    if wants("enqueue") {
        let raw_single = raw_insert(&pool, raw_app, args.enqueue_rows, args.producers, 1).await?;
        figures.push(Figure {
            name: format!("raw insert: 1 row/txn, {} producers", args.producers),
            value: raw_single,
            unit: "rows/s",
            ratio_to: Some(ceiling),
        });
        let raw_batch = raw_insert(&pool, raw_app, args.enqueue_rows, 1, BATCH).await?;
        figures.push(Figure {
            name: format!("raw insert: {BATCH} rows/txn (unnest), 1 producer"),
            value: raw_batch,
            unit: "rows/s",
            ratio_to: Some(ceiling),
        });
        truncate(&pool).await?;

        // (b) outboxd enqueue.
        let single = outboxd_enqueue(&pool, app, args.enqueue_rows, args.producers, 1).await?;
        figures.push(Figure {
            name: format!("outboxd enqueue: 1 event/txn, {} producers", args.producers),
            value: single,
            unit: "events/s",
            ratio_to: Some((raw_single, "raw 1-row insert")),
        });
        let batch = outboxd_enqueue(&pool, app, args.enqueue_rows, 1, BATCH).await?;
        figures.push(Figure {
            name: format!("outboxd enqueue_batch: {BATCH} events/txn"),
            value: batch,
            unit: "events/s",
            ratio_to: Some((raw_batch, "raw batch insert")),
        });
        truncate(&pool).await?;
    }

    // (c) end-to-end dispatch of a backlog with a no-op handler.
    let mut in_process = None;
    if wants("drain") {
        prefill(&pool, app, args.rows, "bench.noop").await?;
        let drain = outboxd_drain(&pool, &settings, args.rows).await?;
        in_process = Some(drain);
        figures.push(Figure {
            name: "outboxd dispatch: backlog, no-op handler".into(),
            value: drain,
            unit: "events/s",
            ratio_to: Some(ceiling),
        });
        truncate(&pool).await?;
    }

    // (e) relay to JetStream (PubAck before delete) and the consumer runtime.
    if wants("relay") {
        if settings.nats.url.is_empty() {
            println!("relay and consume: skipped (set NATS_URL)");
        } else {
            let (relay, consume) =
                relay_and_consume(&pool, &settings, app, args.relay_rows).await?;
            figures.push(Figure {
                name: "outboxd relay: outbox → JetStream, PubAck".into(),
                value: relay,
                unit: "events/s",
                ratio_to: Some(in_process.map_or(ceiling, |d| (d, "in-process dispatch"))),
            });
            figures.push(Figure {
                name: "consumer runtime: JetStream → handler, ack".into(),
                value: consume,
                unit: "msgs/s",
                ratio_to: Some((relay, "relay")),
            });
            truncate(&pool).await?;
        }
    }

    // (d) latency from enqueue commit to handler start on an idle system.
    if wants("latency") {
        let (p50, p99) = latency(&pool, &settings, app, args.latency_samples).await?;
        figures.push(Figure {
            name: "latency commit→handler, idle, p50".into(),
            value: p50,
            unit: "ms",
            ratio_to: None,
        });
        figures.push(Figure {
            name: "latency commit→handler, idle, p99".into(),
            value: p99,
            unit: "ms",
            ratio_to: None,
        });
    }

    println!();
    println!("{:<52} {:>14}  {:<9} RATIO", "SCENARIO", "VALUE", "UNIT");
    for f in &figures {
        let ratio = f
            .ratio_to
            .map(|(base, label)| format!("{:.2} of {label}", f.value / base))
            .unwrap_or_default();
        println!("{:<52} {:>14.1}  {:<9} {ratio}", f.name, f.value, f.unit);
    }
    Ok(())
}

async fn truncate(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("TRUNCATE outbox").execute(pool).await?;
    sqlx::query("VACUUM ANALYZE outbox").execute(pool).await?;
    Ok(())
}

/// Fills the backlog with due rows, in chunks, and settles statistics.
async fn prefill(pool: &PgPool, app: Uuid, rows: u32, topic: &str) -> anyhow::Result<()> {
    let mut left = rows;
    while left > 0 {
        let n = left.min(20_000);
        sqlx::query(
            "INSERT INTO outbox (id, app_id, topic, payload, run_at)
             SELECT outbox_uuid_v7(), $1, $3, jsonb_build_object('n', g), now() - interval '1 second'
             FROM generate_series(1, $2) g",
        )
        .bind(app)
        .bind(n as i32)
        .bind(topic)
        .execute(pool)
        .await
        .context("prefilling the backlog")?;
        left -= n;
    }
    sqlx::query("VACUUM ANALYZE outbox").execute(pool).await?;
    Ok(())
}

async fn raw_drain(pool: &PgPool, app: Uuid, rows: u32, consumers: u32) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..consumers {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut total = 0u64;
            loop {
                let n = sqlx::query(
                    "DELETE FROM outbox WHERE id IN (
                         SELECT id FROM outbox WHERE app_id = $1 AND run_at <= now()
                         ORDER BY run_at, id LIMIT 100 FOR UPDATE SKIP LOCKED)",
                )
                .bind(app)
                .execute(&pool)
                .await?
                .rows_affected();
                if n == 0 {
                    return Ok::<u64, sqlx::Error>(total);
                }
                total += n;
            }
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    ensure!(
        total == rows as u64,
        "raw drain deleted {total} of {rows} rows"
    );
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn raw_insert(
    pool: &PgPool,
    app: Uuid,
    rows: u32,
    producers: u32,
    per_txn: usize,
) -> anyhow::Result<f64> {
    let per_producer = rows / producers;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..producers {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u32;
            while done < per_producer {
                let n = (per_producer - done).min(per_txn as u32) as usize;
                let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
                let payloads: Vec<serde_json::Value> =
                    (0..n).map(|i| json!({"n": done as usize + i})).collect();
                let mut tx = pool.begin().await?;
                if n == 1 {
                    sqlx::query("INSERT INTO outbox (id, app_id, topic, payload) VALUES ($1, $2, 'bench.noop', $3)")
                        .bind(ids[0])
                        .bind(app)
                        .bind(&payloads[0])
                        .execute(&mut *tx)
                        .await?;
                } else {
                    sqlx::query(
                        "INSERT INTO outbox (id, app_id, topic, payload)
                         SELECT u.id, $1, 'bench.noop', u.payload FROM unnest($2::uuid[], $3::jsonb[]) AS u(id, payload)",
                    )
                    .bind(app)
                    .bind(&ids)
                    .bind(&payloads)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                done += n as u32;
            }
            Ok::<u32, sqlx::Error>(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn outboxd_enqueue(
    pool: &PgPool,
    app: Uuid,
    rows: u32,
    producers: u32,
    per_txn: usize,
) -> anyhow::Result<f64> {
    let per_producer = rows / producers;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..producers {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u32;
            while done < per_producer {
                let n = (per_producer - done).min(per_txn as u32) as usize;
                let events: Vec<NewEvent> = (0..n)
                    .map(|i| NewEvent::new("bench.noop", json!({"n": done as usize + i})))
                    .collect();
                let mut tx = pool.begin().await?;
                if n == 1 {
                    enqueue(&mut tx, app, &events[0]).await?;
                } else {
                    enqueue_batch(&mut tx, app, &events).await?;
                }
                tx.commit().await?;
                done += n as u32;
            }
            Ok::<u32, outbox_core::Error>(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn outboxd_drain(pool: &PgPool, settings: &Settings, rows: u32) -> anyhow::Result<f64> {
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
    let dispatcher = Dispatcher::new(pool.clone(), registry, settings.dispatcher_config())?;
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

async fn latency(
    pool: &PgPool,
    settings: &Settings,
    app: Uuid,
    samples: u32,
) -> anyhow::Result<(f64, f64)> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Uuid, Instant)>();
    let tx = Arc::new(tx);
    let mut registry = Registry::new();
    registry.register("bench.latency", move |e: Event| {
        let tx = tx.clone();
        async move {
            let _ = tx.send((e.id, Instant::now()));
            Ok::<(), HandlerError>(())
        }
    });
    let dispatcher = Dispatcher::new(pool.clone(), registry, settings.dispatcher_config())?;
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let stop = stop.clone();
        async move { dispatcher.run(async move { stop.cancelled().await }).await }
    });
    // Let the dispatcher reach its idle wait before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut histogram = Histogram::<u64>::new(3)?;
    for _ in 0..samples {
        let mut txn = pool.begin().await?;
        let id = enqueue(&mut txn, app, &NewEvent::new("bench.latency", json!({}))).await?;
        let committing = Instant::now();
        txn.commit().await?;
        let (got, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .context("no handler start within 10 s")?
            .context("latency handler gone")?;
        ensure!(got == id, "handler saw an unexpected event");
        histogram.record(at.duration_since(committing).as_micros() as u64)?;
        tokio::time::sleep(Duration::from_millis(2 + fastrand::u64(..3))).await;
    }
    stop.cancel();
    run.await??;
    Ok((
        histogram.value_at_quantile(0.5) as f64 / 1000.0,
        histogram.value_at_quantile(0.99) as f64 / 1000.0,
    ))
}

/// Relays a backlog to a fresh bench stream, then consumes it back; returns
/// both rates.
async fn relay_and_consume(
    pool: &PgPool,
    settings: &Settings,
    app: Uuid,
    rows: u32,
) -> anyhow::Result<(f64, f64)> {
    use async_nats::jetstream::stream::{RetentionPolicy, StorageType};
    let client = outbox_nats::connect(&settings.nats.url).await?;
    let js = async_nats::jetstream::new(client);
    let contract = outbox_nats::StreamContract {
        name: "OUTBOXD_BENCH".into(),
        subjects: vec!["bench.>".into()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        replicas: 1,
        max_age: Duration::from_secs(3600),
        max_bytes: -1,
        max_messages: -1,
        duplicate_window: Duration::from_secs(120),
    };
    let _ = js.delete_stream(&contract.name).await;
    let mut stream = outbox_nats::ensure_stream(&js, &contract).await?;
    prefill(pool, app, rows, "bench.relay").await?;

    let mut registry = Registry::new();
    registry.fallback(outbox_nats::Relay::new(
        js.clone(),
        pool.clone(),
        outbox_nats::RelayConfig {
            subject_template: "bench.{app}.{topic}".into(),
            ack_timeout: Duration::from_secs(30),
        },
    ));
    let dispatcher = Dispatcher::new(pool.clone(), registry, settings.dispatcher_config())?;
    let stop = CancellationToken::new();
    let started = Instant::now();
    let run = tokio::spawn({
        let stop = stop.clone();
        async move { dispatcher.run(async move { stop.cancelled().await }).await }
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    while stream.info().await?.state.messages < u64::from(rows) {
        ensure!(
            Instant::now() < deadline,
            "relay did not finish within 10 minutes"
        );
        ensure!(!run.is_finished(), "the dispatcher stopped while relaying");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while outbox_core::store::outbox::count(pool).await? > 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let relay = f64::from(rows) / started.elapsed().as_secs_f64();
    stop.cancel();
    run.await??;

    let config = outbox_nats::ConsumerConfig {
        stream: contract.name.clone(),
        durable: outbox_nats::durable_name("bench", "consume"),
        concurrency: 512,
        batch: 256,
        ..outbox_nats::ConsumerConfig::default()
    };
    let runtime = outbox_nats::ConsumerRuntime::new(js.clone(), pool.clone(), config)
        .route("bench.>", |_d: outbox_nats::Delivery| async {
            Ok::<(), outbox_nats::ConsumeError>(())
        });
    let counters = runtime.counters.clone();
    let stop = CancellationToken::new();
    let started = Instant::now();
    let consume = tokio::spawn({
        let stop = stop.clone();
        async move { runtime.run(stop.cancelled_owned()).await }
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    while outbox_nats::consumer::ConsumeCounters::get(&counters.consumed) < u64::from(rows) {
        ensure!(
            Instant::now() < deadline,
            "consume did not finish within 10 minutes"
        );
        ensure!(!consume.is_finished(), "the consumer stopped early");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let consumed = f64::from(rows) / started.elapsed().as_secs_f64();
    stop.cancel();
    consume.await??;
    let _ = js.delete_stream(&contract.name).await;
    Ok((relay, consumed))
}
