//! (d) A fixed offered load for a while, outboxd against one plain-SQL
//! consumer with the same producers; (e) the same load while another
//! connection holds a snapshot open.

use crate::bench::Bench;
use crate::load::{self, Drainer};
use crate::support::truncate;

/// `steady`: the raw consumer's window, then outboxd's.
pub async fn steady(b: &mut Bench) -> anyhow::Result<()> {
    let (rate, secs) = (b.args.steady_rate, b.args.steady_secs);
    let raw = load::steady(
        &b.pool,
        &b.settings,
        b.raw_app,
        rate,
        secs,
        Drainer::Raw,
        false,
    )
    .await?;
    truncate(&b.pool).await?;
    let ours = load::steady(
        &b.pool,
        &b.settings,
        b.app,
        rate,
        secs,
        Drainer::Outboxd,
        false,
    )
    .await?;
    truncate(&b.pool).await?;
    b.figure(
        "steady",
        "producers: offered load achieved".into(),
        ours.offered,
        "events/s",
        None,
    );
    b.figure(
        "steady",
        format!("raw steady: {rate}/s offered, 1 consumer"),
        raw.completed,
        "events/s",
        None,
    );
    b.figure(
        "steady",
        format!("outboxd steady: {rate}/s offered"),
        ours.completed,
        "events/s",
        Some((raw.completed, "raw steady")),
    );
    b.figure(
        "steady",
        "outboxd steady: deepest queue".into(),
        ours.max_depth as f64,
        "rows",
        Some((raw.max_depth.max(1) as f64, "raw deepest queue")),
    );
    b.figure(
        "steady",
        "outboxd steady: queue at the end".into(),
        ours.final_depth as f64,
        "rows",
        None,
    );
    b.add_series("steady-depth", "raw consumer".into(), raw.depth);
    b.add_series("steady-depth", "outboxd".into(), ours.depth);
    Ok(())
}

/// `bloat`: outboxd's window with a REPEATABLE READ snapshot held from its
/// middle.
pub async fn bloat(b: &mut Bench) -> anyhow::Result<()> {
    let held = load::steady(
        &b.pool,
        &b.settings,
        b.app,
        b.args.steady_rate,
        b.args.steady_secs,
        Drainer::Outboxd,
        true,
    )
    .await?;
    truncate(&b.pool).await?;
    let before = held.completed_before.unwrap_or_default();
    let during = held.completed_during.unwrap_or_default();
    b.figure(
        "bloat",
        "outboxd: before the snapshot is held".into(),
        before,
        "events/s",
        None,
    );
    b.figure(
        "bloat",
        "outboxd: while a REPEATABLE READ snapshot is held".into(),
        during,
        "events/s",
        Some((before, "before")),
    );
    b.figure(
        "bloat",
        "outbox dead tuples at the end".into(),
        held.dead_tuples as f64,
        "tuples",
        None,
    );
    b.figure(
        "bloat",
        "deepest queue".into(),
        held.max_depth as f64,
        "rows",
        None,
    );
    b.add_series(
        "bloat-depth",
        "outboxd, snapshot held from the middle".into(),
        held.depth,
    );
    Ok(())
}
