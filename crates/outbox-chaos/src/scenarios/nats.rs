//! NATS faults during relay: nats-server killed, stopped, or cut off.

use std::time::Duration;

use super::{Ctx, Outcome, Stage};
use crate::history::Planned;
use crate::proxy::{Mode, Proxy};

fn relay_plan(total: i64) -> Vec<Planned> {
    (0..total).map(|n| Planned::relay(n, 1000)).collect()
}

/// nats-server kill -9 and restart during relay.
pub(super) async fn nats_kill(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let mut stage = Stage::new(ctx, "nats-kill").await?;
    let url = stage.with_nats().await?;
    let mut spec = stage.spec("a", &[]);
    spec.nats_url = Some(url);
    stage.launch(spec).await?;
    let producer = stage.producer(relay_plan(3000), 500);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stage.nats()?.kill9().await?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stage.nats()?.restart().await?;
    let produced = producer.await?;
    stage.quiesce(Duration::from_secs(60), false).await?;
    let (outcome, _) = stage
        .finish(
            produced,
            "nats-server kill -9 during relay, restarted after 1 s (duplicate window 120 s)".into(),
            false,
        )
        .await?;
    Ok(outcome)
}

/// SIGSTOP of nats-server for longer than the publish (PubAck) timeout.
pub(super) async fn nats_stop(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let mut stage = Stage::new(ctx, "nats-stop").await?;
    let url = stage.with_nats().await?;
    let mut spec = stage.spec("a", &[("OUTBOXD_NATS__ACK_TIMEOUT_MS", "1000")]);
    spec.nats_url = Some(url);
    stage.launch(spec).await?;
    let producer = stage.producer(relay_plan(2000), 500);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stage.nats()?.signal("STOP").await?;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    stage.nats()?.signal("CONT").await?;
    let produced = producer.await?;
    stage.quiesce(Duration::from_secs(60), false).await?;
    let (outcome, _) = stage
        .finish(
            produced,
            "nats-server SIGSTOP for 3 s (PubAck timeout 1 s), then SIGCONT".into(),
            false,
        )
        .await?;
    Ok(outcome)
}

/// A partition between the relay and NATS, shorter or longer than the
/// stream's duplicate window.
pub(super) async fn nats_partition(ctx: &Ctx, longer: bool) -> anyhow::Result<Outcome> {
    let name = if longer {
        "nats-partition-long"
    } else {
        "nats-partition-short"
    };
    let mut stage = Stage::new(ctx, name).await?;
    stage.with_nats().await?;
    let proxy = Proxy::start(stage.nats()?.addr()).await?;
    let (window, cut_ms) = if longer { ("1", 4000) } else { ("30", 1000) };
    let mut spec = stage.spec(
        "a",
        &[
            ("OUTBOXD_NATS__ACK_TIMEOUT_MS", "500"),
            ("OUTBOXD_NATS__STREAM__DUPLICATE_WINDOW_SECS", window),
        ],
    );
    spec.nats_url = Some(format!("nats://{}", proxy.addr()));
    stage.launch(spec).await?;
    let producer = stage.producer(relay_plan(2000), 500);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A degraded link first, then the partition.
    proxy.set(Mode::Latency(Duration::from_millis(50)));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    proxy.set(Mode::Blackhole);
    tokio::time::sleep(Duration::from_millis(cut_ms)).await;
    proxy.set(Mode::Pass);
    let produced = producer.await?;
    stage.quiesce(Duration::from_secs(60), false).await?;
    let (outcome, _) = stage
        .finish(
            produced,
            format!(
                "relay link at 50 ms latency for 1 s, then cut for {} s; duplicate window {window} s, PubAck timeout 0.5 s",
                cut_ms / 1000
            ),
            longer,
        )
        .await?;
    Ok(outcome)
}
