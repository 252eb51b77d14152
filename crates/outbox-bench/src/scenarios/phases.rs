//! `phases`: a steady load with a 1 ms handler through phases of trouble
//! (a held snapshot, long readers, killed connections, no free connection
//! slots), each followed by a recovery window; figures per phase compared
//! with the clean one, and the series behind them.

use std::time::Duration;

use crate::bench::Bench;
use crate::load::phases::{self, Phase, PhaseLoad, Sample, bookkeeping, settings};
use crate::support::{median, truncate};

/// `phases`: see the module docs.
pub async fn phases(b: &mut Bench) -> anyhow::Result<()> {
    // BenchArgs::check refused unknown phases and a first one other than clean.
    let run_of: Vec<(Phase, Duration)> = b
        .args
        .phases
        .iter()
        .filter_map(|entry| Phase::parse_entry(entry))
        .map(|(phase, secs)| {
            let secs = secs.unwrap_or(b.args.phase_secs);
            (phase, Duration::from_secs(u64::from(secs)))
        })
        .collect();
    let load = PhaseLoad {
        rate: b.args.phase_rate,
        handler: Duration::from_millis(b.args.phase_handler_ms),
        sample: Duration::from_secs(u64::from(b.args.phase_sample_secs)),
        max_running: b.args.phase_max_running,
    };
    let run = phases::run(&b.pool, &b.settings, b.app, &load, &run_of).await?;
    truncate(&b.pool).await?;

    let of = |index: usize| -> Vec<&Sample> {
        run.samples.iter().filter(|s| s.phase == index).collect()
    };
    let quantile = |samples: &[&Sample], q: usize| {
        median(
            samples
                .iter()
                .filter_map(|s| s.claim_ms.map(|c| c[q]))
                .collect(),
        )
    };
    let clean = of(0);
    let clean_rate = median(clean.iter().map(|s| s.completed_per_sec).collect());
    let clean_p99 = quantile(&clean, 2);
    for (index, (phase, _)) in run_of.iter().enumerate() {
        let samples = of(index);
        let name = phase.name();
        let label = format!("{name} (phase {})", index + 1);
        let baseline = |v: f64| (index > 0).then_some((v, "clean"));
        b.figure(
            "phases",
            format!("{label}: completions"),
            median(samples.iter().map(|s| s.completed_per_sec).collect()),
            "events/s",
            baseline(clean_rate),
        );
        b.figure(
            "phases",
            format!("{label}: claim p50"),
            quantile(&samples, 0),
            "ms",
            None,
        );
        b.figure(
            "phases",
            format!("{label}: claim p99"),
            quantile(&samples, 2),
            "ms",
            baseline(clean_p99),
        );
        let worst = samples
            .iter()
            .filter_map(|s| s.claim_ms.map(|c| c[2]))
            .fold(0.0, f64::max);
        b.figure(
            "phases",
            format!("{label}: worst window's claim p99"),
            worst,
            "ms",
            None,
        );
        b.figure(
            "phases",
            format!("{label}: deepest queue"),
            samples.iter().map(|s| s.depth).max().unwrap_or_default() as f64,
            "rows",
            None,
        );
        let dead: i64 = run.dead_by_table[index].iter().map(|(_, n)| n).sum();
        b.figure(
            "phases",
            format!("{label}: dead tuples at its end"),
            dead as f64,
            "tuples",
            None,
        );
        b.figure(
            "phases",
            format!("{label}: of those, bookkeeping tables'"),
            bookkeeping(&run.dead_by_table[index]) as f64,
            "tuples",
            None,
        );
        b.figure(
            "phases",
            format!("{label}: of those, operators' settings tables'"),
            settings(&run.dead_by_table[index]) as f64,
            "tuples",
            None,
        );
        b.figure(
            "phases",
            format!("{label}: pg_class dead tuples at its end"),
            run.catalog_dead[index] as f64,
            "tuples",
            None,
        );
        b.figure(
            "phases",
            format!("{label}: bookkeeping tables' most dead tuples"),
            samples
                .iter()
                .map(|s| s.bookkeeping_dead_tuples)
                .max()
                .unwrap_or_default() as f64,
            "tuples",
            None,
        );
    }
    b.figure(
        "phases",
        "phases: events enqueued, all handled".into(),
        run.handled as f64,
        "events",
        Some((run.produced as f64, "enqueued")),
    );
    if run.uncertain > 0 {
        b.figure(
            "phases",
            "phases: events whose commit failed in a restart (may exist)".into(),
            run.uncertain as f64,
            "events",
            None,
        );
    }
    let series = |f: &dyn Fn(&Sample) -> Option<f64>| -> Vec<(f64, f64)> {
        run.samples
            .iter()
            .filter_map(|s| f(s).map(|v| (s.at, v)))
            .collect()
    };
    let p99 = series(&|s| s.claim_ms.map(|c| c[2]));
    let p50 = series(&|s| s.claim_ms.map(|c| c[0]));
    let completed = series(&|s| Some(s.completed_per_sec));
    let depth = series(&|s| Some(s.depth as f64));
    let dead = series(&|s| Some(s.dead_tuples as f64));
    let bookkeeping_dead = series(&|s| Some(s.bookkeeping_dead_tuples as f64));
    let autovacuums = series(&|s| Some(s.autovacuums as f64));
    b.add_series("phases-claim-ms", "p99".into(), p99);
    b.add_series("phases-claim-ms", "p50".into(), p50);
    b.add_series("phases-completions", "completed/s".into(), completed);
    b.add_series("phases-depth", "queue depth".into(), depth);
    b.add_series("phases-dead-tuples", "outboxd tables".into(), dead);
    b.add_series(
        "phases-bookkeeping-dead-tuples",
        "bookkeeping tables".into(),
        bookkeeping_dead,
    );
    b.add_series(
        "phases-autovacuum",
        "passes over the outbox".into(),
        autovacuums,
    );
    Ok(())
}
