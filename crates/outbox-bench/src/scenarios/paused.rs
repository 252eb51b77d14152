//! Paused rows and the claim: the time of one claim of 100 served rows with
//! a small backlog, against a large one of which 90 % belong to a paused
//! topic — interleaved with the served rows, then all ahead of them.

use outbox_core::store::pauses;
use outbox_core::topics::Served;

use crate::bench::Bench;
use crate::load;
use crate::support::{ScratchDatabase, prefill, prefill_topics, truncate};

/// Claims taken from each backlog, in turn.
const CLAIM_PAIRS: u32 = 100;

const SERVED: &str = "bench.noop";
const PAUSED: &str = "bench.paused";

/// The small backlog (every row served) waits in the benchmark's database,
/// the large one in a scratch database with its paused topic.
pub async fn paused(b: &mut Bench) -> anyhow::Result<()> {
    let (s, l) = (b.args.backlogs[0], b.args.backlogs[1]);
    let large_db = ScratchDatabase::create(&b.pool, "outboxd_bench_paused").await?;
    let large_app = outbox_core::store::apps::ensure(&large_db.pool, "bench", "bench outboxd")
        .await?
        .id;
    pauses::pause(&large_db.pool, large_app, PAUSED, None, Some("benchmark")).await?;
    let with_pause = Served {
        paused: vec![pauses::pause_key(large_app, PAUSED)],
        ..Served::everything()
    };
    let everything = Served::everything();
    eprintln!("bench: paused, filling {s} rows and {l} rows (90 % paused, interleaved)");
    prefill(&b.pool, b.app, s, SERVED).await?;
    let mut mix = [PAUSED; 10];
    mix[0] = SERVED;
    prefill_topics(&large_db.pool, large_app, l, &mix).await?;
    let served = [&b.pool, &large_db.pool];
    let (small, interleaved) =
        load::served_claims(served, [&everything, &with_pause], CLAIM_PAIRS).await?;
    eprintln!("bench: paused, refilling {l} rows (90 % paused, all ahead)");
    truncate(&large_db.pool).await?;
    prefill(&large_db.pool, large_app, l / 10 * 9, PAUSED).await?;
    prefill(&large_db.pool, large_app, l / 10, SERVED).await?;
    let (small_again, ahead) =
        load::served_claims(served, [&everything, &with_pause], CLAIM_PAIRS).await?;
    large_db.drop_it(&b.pool).await?;
    truncate(&b.pool).await?;
    b.figure(
        "paused",
        format!("claim of 100, {s} waiting, p50"),
        small,
        "ms claim",
        None,
    );
    b.figure(
        "paused",
        format!("claim of 100, {l} waiting, 90 % paused interleaved, p50"),
        interleaved,
        "ms claim",
        Some((small, "small backlog")),
    );
    b.figure(
        "paused",
        format!("claim of 100, {l} waiting, 90 % paused ahead, p50"),
        ahead,
        "ms claim",
        Some((small_again, "small backlog")),
    );
    Ok(())
}
