//! PostgreSQL faults: a crash under load, a partition between one
//! dispatcher and the database, and an old snapshot held throughout.

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use outbox_core::store::stats;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};

use super::{Ctx, Outcome, Stage, jitter, mixed_work};
use crate::history::Planned;
use crate::procs::PgControl;
use crate::proxy::{Mode, Proxy};

/// PostgreSQL crash (`pg_ctl stop -m immediate`) and restart under load.
pub(super) async fn pg_crash(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let pg = PgControl::from_env()?;
    let mut stage = Stage::new(ctx, "pg-crash").await?;
    stage.launch(stage.spec("a", &[])).await?;
    let producer = stage.producer(mixed_work(2500, 10), 400);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    pg.crash().await?;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    pg.start().await?;
    let produced = producer.await?;
    stage.quiesce(Duration::from_secs(90), false).await?;
    let (outcome, _) = stage
        .finish(
            produced,
            "PostgreSQL stopped with -m immediate for 2 s under load".into(),
            false,
        )
        .await?;
    Ok(outcome)
}

/// A partition between one dispatcher and PostgreSQL, longer than the lease,
/// while a second dispatcher runs: the first one's completions are fenced.
pub(super) async fn pg_partition(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let mut stage = Stage::new(ctx, "pg-partition").await?;
    let options = PgConnectOptions::from_str(&stage.db.url)?;
    let upstream =
        std::net::SocketAddr::from_str(&format!("{}:{}", options.get_host(), options.get_port()))
            .context("the chaos database must be on an IP address")?;
    let proxy = Proxy::start(upstream).await?;
    let mut spec = stage.spec("a", &[]);
    spec.database_url = options
        .clone()
        .host("127.0.0.1")
        .port(proxy.addr().port())
        .to_url_lossy()
        .to_string();
    stage.launch(spec).await?;
    stage.launch(stage.spec("b", &[])).await?;
    let plan = (0..1200).map(|n| Planned::slow(n, 300, 10)).collect();
    let producer = stage.producer(plan, 400);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    proxy.set(Mode::Blackhole);
    tokio::time::sleep(Duration::from_millis(5000)).await;
    proxy.set(Mode::Pass);
    let produced = producer.await?;
    stage.quiesce(Duration::from_secs(60), false).await?;
    // A's held statements reach the database when the partition heals; its
    // refused outcomes show in its metrics as they arrive: wait until the
    // count is positive and has not moved for a second.
    let mut fenced = 0.0;
    let mut steady_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let now = stage.fleet[0].metric("outboxd_fenced_total").await?;
        if now != fenced {
            fenced = now;
            steady_since = Instant::now();
        } else if fenced > 0.0 && steady_since.elapsed() >= Duration::from_secs(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut outcome, _) = stage
        .finish(
            produced,
            "dispatcher A cut from PostgreSQL for 5 s (lease 2 s) while B runs".into(),
            false,
        )
        .await?;
    outcome.notes.push(format!(
        "{fenced} outcomes of A refused by the fencing token after the partition"
    ));
    if fenced == 0.0 {
        outcome.failure = Some("no outcome of A was fenced: the fault missed".into());
    }
    Ok(outcome)
}

/// A session holds a transaction id (and with it the xmin horizon) for the
/// whole run, so no row finished meanwhile can be vacuumed, while two
/// dispatchers work and are killed twice: claims start from positions,
/// which must never pass a row that is still there (a leased row of a
/// killed dispatcher, a retry, a row committed late).
pub(super) async fn held_snapshot(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let mut stage = Stage::new(ctx, "held-snapshot").await?;
    // outboxd's own sessions end idle transactions; this one is not outboxd's.
    let options = PgConnectOptions::from_str(&stage.db.url)?
        .options([("idle_in_transaction_session_timeout", "0")]);
    let mut holder = PgConnection::connect_with(&options).await?;
    stats::hold_transaction_id(&mut holder).await?;
    stage.launch(stage.spec("a", &[])).await?;
    stage.launch(stage.spec("b", &[])).await?;
    let producer = stage.producer(mixed_work(3000, 10), 400);
    for _ in 0..2 {
        tokio::time::sleep(jitter(800, 2000)).await;
        let victim = fastrand::usize(..stage.fleet.len());
        stage.fleet[victim].kill9_and_restart().await?;
    }
    let produced = producer.await?;
    stage.quiesce(Duration::from_secs(90), false).await?;
    let dead = stats::table_vacuum(&stage.db.pool, "outbox")
        .await?
        .dead_tuples;
    holder.close().await?;
    let (mut outcome, _) = stage
        .finish(
            produced,
            "an idle transaction holds the xmin horizon throughout; 2 × kill -9 of one of 2 dispatchers".into(),
            false,
        )
        .await?;
    outcome.notes.push(format!(
        "{dead} dead tuples in outbox and its segments while the snapshot was held"
    ));
    Ok(outcome)
}
