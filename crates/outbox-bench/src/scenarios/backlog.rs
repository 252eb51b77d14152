//! (f) Claim latency and drain rate with a small and a large backlog; the
//! large one is drained to the end while the resident set is sampled.

use crate::bench::Bench;
use crate::load;
use crate::support::{ScratchDatabase, median, prefill, truncate};

/// Claims taken from each backlog by the backlog scenario, in turn.
const CLAIM_PAIRS: u32 = 200;

/// The small backlog waits in the benchmark's database, the large one in a
/// scratch database of its own.
pub async fn backlog(b: &mut Bench) -> anyhow::Result<()> {
    let (s, l) = (b.args.backlogs[0], b.args.backlogs[1]);
    let (app, measured) = (b.app, b.args.backlog_measured);
    // The large backlog waits in a database of its own while the claims
    // of the two alternate (see `load::backlog_claims`).
    let large_db = ScratchDatabase::create(&b.pool, "outboxd_bench_backlog").await?;
    let large_app = outbox_core::store::apps::ensure(&large_db.pool, "bench", "bench outboxd")
        .await?
        .id;
    eprintln!("bench: backlog, filling {s} and {l} rows");
    prefill(&b.pool, app, s, "bench.noop").await?;
    prefill(&large_db.pool, large_app, l, "bench.noop").await?;
    eprintln!("bench: backlog, {CLAIM_PAIRS} claims from each in turn");
    let (small_claim, large_claim) =
        load::backlog_claims(&b.pool, &large_db.pool, CLAIM_PAIRS).await?;
    // A window of `backlog_measured` events lasts a tenth of a second, so
    // each side is the median of five: five fills of the small backlog,
    // the first five windows of the large one.
    const WINDOWS: u32 = 5;
    let mut small_rates = Vec::new();
    for window in 0..WINDOWS {
        if window > 0 {
            prefill(&b.pool, app, s, "bench.noop").await?;
        }
        let run = load::backlog(&b.pool, &b.settings, s, measured, 1).await?;
        small_rates.extend(run.drain_rates);
        truncate(&b.pool).await?;
    }
    eprintln!("bench: backlog, draining {l} rows");
    let large = load::backlog(&large_db.pool, &b.settings, l, measured, WINDOWS).await?;
    large_db.drop_it(&b.pool).await?;
    let small_rate = median(small_rates);
    let large_rate = median(large.drain_rates);
    b.figure(
        "backlog",
        format!("claim of 100, {s} waiting, p50"),
        small_claim,
        "ms claim",
        None,
    );
    b.figure(
        "backlog",
        format!("claim of 100, {l} waiting, p50"),
        large_claim,
        "ms claim",
        Some((small_claim, "small backlog")),
    );
    b.figure(
        "backlog",
        format!("drain, {s} waiting"),
        small_rate,
        "events/s",
        None,
    );
    b.figure(
        "backlog",
        format!("drain, {l} waiting"),
        large_rate,
        "events/s",
        Some((small_rate, "small backlog")),
    );
    b.figure(
        "backlog",
        format!("peak RSS draining {l} rows"),
        large.peak_rss_mib,
        "MiB",
        None,
    );
    Ok(())
}
