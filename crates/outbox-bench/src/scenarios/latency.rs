//! (c) Latency from enqueue commit to handler start, idle and under loads of
//! half and a quarter of the drain capacity, for outboxd in both modes and
//! for plain-SQL consumers on the same load, with and without leases.

use crate::bench::Bench;
use crate::load::{self, Taker};
use crate::support::{checkpoint, truncate};

/// Idle first, then each offered load with the takers in turn; the loads
/// are fractions of outboxd's drain rate (or of 0.4 × the raw drain when
/// the drain scenario did not run), or `--latency-load`.
pub async fn latency(b: &mut Bench) -> anyhow::Result<()> {
    let (app, samples) = (b.app, b.args.latency_samples);
    let lease = Taker::Outboxd {
        in_transaction: false,
    };
    let transactional = Taker::Outboxd {
        in_transaction: true,
    };
    // Idle means nothing else to do, including the writes the drains
    // left behind.
    checkpoint(&b.pool).await;
    let idle = load::latency(&b.pool, &b.settings, app, samples, 0, lease).await?;
    let drain_rate = b.drain.unwrap_or(b.raw_drain * 0.4);
    let load_rates: Vec<u32> = match b.args.latency_load {
        Some(rate) => vec![rate],
        None => b
            .args
            .latency_loads
            .iter()
            .map(|fraction| (drain_rate * fraction) as u32)
            .collect(),
    };
    let mut runs = vec![("idle".to_owned(), idle, None, None, 0)];
    let takers = [
        (Taker::Raw, "raw SQL consumers"),
        (Taker::RawLease, "raw SQL consumers with leases"),
        (lease, "outboxd"),
        (transactional, "outboxd transactional mode"),
    ];
    // The takers take turns for --latency-rounds rounds and each one's
    // samples are pooled, so a slow minute of the machine falls on all.
    let rounds = b.args.latency_rounds;
    let per_round = samples.div_ceil(rounds);
    for load_rate in load_rates {
        let mut pooled: Vec<Option<load::Latency>> = vec![None; takers.len()];
        for round in 1..=rounds {
            for ((taker, label), pooled) in takers.iter().zip(pooled.iter_mut()) {
                eprintln!(
                    "bench: latency under {load_rate}/s load, {label}, round {round} of {rounds}"
                );
                let run =
                    load::latency(&b.pool, &b.settings, app, per_round, load_rate, *taker).await?;
                truncate(&b.pool).await?;
                match pooled {
                    Some(all) => all.merge(&run)?,
                    None => *pooled = Some(run),
                }
            }
        }
        // Every taker's p99 against the plain consumers'; outboxd's also
        // against the plain consumers that lease, its own design in SQL.
        let p99_of = |wanted: Taker| {
            takers
                .iter()
                .zip(&pooled)
                .find(|((taker, _), _)| *taker == wanted)
                .and_then(|(_, run)| run.as_ref())
                .map(|run| run.quantile_ms(0.99))
        };
        let (raw_p99, raw_lease_p99) = (p99_of(Taker::Raw), p99_of(Taker::RawLease));
        for ((taker, label), run) in takers.iter().zip(pooled) {
            let Some(run) = run else { continue };
            let baseline = raw_p99
                .filter(|_| *taker != Taker::Raw)
                .map(|p99| (p99, "raw consumers' p99"));
            let lease_baseline = raw_lease_p99
                .filter(|_| matches!(taker, Taker::Outboxd { .. }))
                .map(|p99| (p99, "raw leasing consumers' p99"));
            runs.push((
                format!("{load_rate}/s load, {label}"),
                run,
                baseline,
                lease_baseline,
                load_rate,
            ));
        }
    }
    for (label, l, baseline, lease_baseline, load_rate) in runs {
        for (q, v, ratio_to) in [
            ("p50", l.quantile_ms(0.5), None),
            ("p95", l.quantile_ms(0.95), None),
            ("p99", l.quantile_ms(0.99), baseline),
            (
                "p99 of the producer's commit alone",
                l.commit_p99_ms(),
                None,
            ),
        ] {
            b.figure(
                "latency",
                format!("latency {label}, {q}"),
                v,
                "ms",
                ratio_to,
            );
        }
        if let Some(baseline) = lease_baseline {
            b.figure(
                "latency",
                format!("latency {label}, p99 against leasing consumers"),
                l.quantile_ms(0.99),
                "ms",
                Some(baseline),
            );
        }
        if load_rate > 0 {
            b.figure(
                "latency",
                format!("latency {label}: load achieved"),
                l.offered(),
                "events/s",
                Some((f64::from(load_rate), "asked")),
            );
        }
    }
    truncate(&b.pool).await?;
    Ok(())
}
