//! (g) Relay to JetStream (PubAck before delete) and the consumer runtime,
//! next to an in-process drain of the same rows and straight JetStream
//! publishes (the relay's NATS ceiling). Needs NATS_URL.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use outbox_dispatch::{Dispatcher, Registry};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use outboxd::config::Settings;

use super::drain::outboxd_drain;
use crate::bench::Bench;
use crate::support::{median, prefill, truncate};

/// Skipped, with a line saying so, when NATS_URL is not set.
pub async fn relay(b: &mut Bench) -> anyhow::Result<()> {
    if b.settings.nats.url.is_empty() {
        println!("relay and consume: skipped (set NATS_URL)");
        return Ok(());
    }
    let in_flight = b.settings.dispatcher_config().concurrency;
    let rates = relay_and_consume(
        &b.pool,
        &b.settings,
        b.app,
        b.args.relay_rows,
        b.args.drain_rounds,
    )
    .await?;
    let rows = b.args.relay_rows;
    b.figure(
        "relay",
        format!("outboxd dispatch: {rows} rows, no-op handler, same rounds"),
        rates.drain,
        "events/s",
        None,
    );
    b.figure(
        "relay",
        format!("raw JetStream publish: same headers, PubAck, {in_flight} in flight"),
        rates.publish,
        "msgs/s",
        None,
    );
    b.figure(
        "relay",
        "outboxd relay: outbox → JetStream, PubAck".into(),
        rates.relay,
        "events/s",
        Some((rates.drain, "in-process dispatch")),
    );
    // Relaying does a drain's database work and a publish's NATS work
    // on the same cores: at best 1 / (1/drain + 1/publish) per second.
    let shared = 1.0 / (1.0 / rates.drain + 1.0 / rates.publish);
    b.figure(
        "relay",
        "outboxd relay, against drain and publish sharing the cores".into(),
        rates.relay,
        "events/s",
        Some((shared, "1/(1/drain + 1/publish)")),
    );
    b.figure(
        "relay",
        "consumer runtime: JetStream → handler, ack".into(),
        rates.consume,
        "msgs/s",
        Some((rates.relay, "relay")),
    );
    truncate(&b.pool).await?;
    Ok(())
}

/// What the relay scenario measured, in events (messages) per second.
struct RelayRates {
    /// In-process dispatch of the same rows, no-op handler.
    drain: f64,
    /// Straight JetStream publishes with the relay's headers.
    publish: f64,
    /// Outbox → JetStream, PubAck before the delete.
    relay: f64,
    /// The consumer runtime reading the relayed messages back.
    consume: f64,
}

/// For `rounds` rounds, in turn: drains `rows` rows in-process, publishes
/// `rows` messages straight to JetStream (the relay's NATS ceiling) and
/// relays `rows` rows to a fresh bench stream; then consumes the last
/// round's messages back. The first three are medians of their rounds.
async fn relay_and_consume(
    pool: &PgPool,
    settings: &Settings,
    app: Uuid,
    rows: u32,
    rounds: u32,
) -> anyhow::Result<RelayRates> {
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
    let (mut drains, mut publishes, mut relays) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        eprintln!("bench: relay, round {round} of {rounds}");
        prefill(pool, app, rows, "bench.noop").await?;
        drains.push(outboxd_drain(pool, settings, rows, false).await?);
        truncate(pool).await?;
        publishes.push(raw_publish(&js, rows, settings.dispatcher_config().concurrency).await?);
        let _ = js.delete_stream(&contract.name).await;
        let stream = outbox_nats::ensure_stream(&js, &contract).await?;
        prefill(pool, app, rows, "bench.relay").await?;
        relays.push(relay_rate(pool, settings, &js, stream, rows).await?);
        truncate(pool).await?;
    }

    let config = outbox_nats::ConsumerConfig {
        stream: contract.name.clone(),
        durable: outbox_nats::durable_name("bench", "consume"),
        concurrency: 512,
        batch: 256,
        ..outbox_nats::ConsumerConfig::default()
    };
    let runtime = outbox_nats::ConsumerRuntime::new(js.clone(), pool.clone(), config)
        .route("bench.>", |_d: outbox_nats::Delivery| async {
            Ok::<(), outbox_nats::HandlerError>(())
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
    Ok(RelayRates {
        drain: median(drains),
        publish: median(publishes),
        relay: median(relays),
        consume: consumed,
    })
}

/// Relays the `rows` rows waiting in the outbox to `stream` with outboxd;
/// events per second.
async fn relay_rate(
    pool: &PgPool,
    settings: &Settings,
    js: &async_nats::jetstream::Context,
    mut stream: async_nats::jetstream::stream::Stream,
    rows: u32,
) -> anyhow::Result<f64> {
    let mut registry = Registry::new();
    registry.fallback(outbox_nats::Relay::new(
        js.clone(),
        pool.clone(),
        outbox_nats::RelayConfig {
            subject_template: "bench.{app}.{topic}".into(),
            ack_timeout: Duration::from_secs(30),
            ..Default::default()
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
    Ok(relay)
}

/// The relay's NATS ceiling: `rows` JetStream publishes with the relay's
/// headers, `in_flight` awaiting their PubAck at once, into a stream of their
/// own (file storage, duplicate window on); messages per second.
// Baseline: the NATS ceiling of the relay, plain JetStream publishes on
// purpose (no SQL).
async fn raw_publish(
    js: &async_nats::jetstream::Context,
    rows: u32,
    in_flight: usize,
) -> anyhow::Result<f64> {
    use futures::stream::{FuturesUnordered, StreamExt};
    const STREAM: &str = "OUTBOXD_BENCH_RAW";
    let _ = js.delete_stream(STREAM).await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["benchraw.>".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .context("creating the raw publish stream")?;
    let publish_one = |js: async_nats::jetstream::Context| async move {
        let id = Uuid::now_v7().to_string();
        // The relay's own headers, made by the relay's own helper.
        let headers = outbox_nats::headers::inject(&id, "bench", "bench.relay", &json!({}));
        let payload = serde_json::to_vec(&json!({"n": 1}))?;
        js.publish_with_headers("benchraw.bench.relay", headers, payload.into())
            .await?
            .await?;
        Ok::<(), anyhow::Error>(())
    };
    let started = Instant::now();
    let mut waiting = FuturesUnordered::new();
    for _ in 0..rows {
        if waiting.len() >= in_flight.max(1)
            && let Some(result) = waiting.next().await
        {
            result?;
        }
        waiting.push(publish_one(js.clone()));
    }
    while let Some(result) = waiting.next().await {
        result?;
    }
    let rate = f64::from(rows) / started.elapsed().as_secs_f64();
    let _ = js.delete_stream(STREAM).await;
    Ok(rate)
}
