//! `outboxd bench`: outboxd's throughput and latency next to the raw
//! PostgreSQL ceiling for the same work, measured in one run on one database.
//!
//! The raw baseline drains a backlog with plain
//! `DELETE … WHERE id IN (SELECT … LIMIT 100 FOR UPDATE SKIP LOCKED)`;
//! every outboxd figure is printed with its ratio to that ceiling (and
//! enqueue figures also to plain INSERTs of the same row shape).
//!
//! Layout: this module runs the scenarios in order and prints the table;
//! [`load`] holds the scenarios under a steady offered load, the deep
//! backlog and scale-out; [`report`] writes CSV and SVG charts.

mod load;
mod report;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Args;
use outbox_core::{NewEvent, enqueue, enqueue_batch};
use outbox_dispatch::{Dispatcher, Event, HandlerError, Registry};
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Settings;
use report::{Figure, Series};

/// Sizes of the benchmark run.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Backlog size for the drain scenarios (raw and end-to-end).
    #[arg(long, default_value_t = 200_000)]
    rows: u32,
    /// Rows enqueued by the enqueue scenarios.
    #[arg(long, default_value_t = 20_000)]
    enqueue_rows: u32,
    /// Concurrent producers for the single-row enqueue scenarios.
    #[arg(long, default_value_t = 4)]
    producers: u32,
    /// Rounds of the drain and enqueue scenarios (raw and outboxd in turn);
    /// each figure is the median of its rounds.
    #[arg(long, default_value_t = 3)]
    drain_rounds: u32,
    /// Concurrent connections of the raw drain baseline.
    #[arg(long, default_value_t = 2)]
    raw_consumers: u32,
    /// Samples for each latency scenario (idle, and each taker under each
    /// load, spread over the rounds).
    #[arg(long, default_value_t = 1500)]
    latency_samples: u32,
    /// Rounds of the loaded latency scenarios (the takers in turn).
    #[arg(long, default_value_t = 3)]
    latency_rounds: u32,
    /// Offered loads of the loaded latency scenarios, as fractions of the
    /// measured drain rate.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.25")]
    latency_loads: Vec<f64>,
    /// One offered load for the loaded latency scenarios, in events per
    /// second, instead of --latency-loads.
    #[arg(long)]
    latency_load: Option<u32>,
    /// Rows for the relay and consume scenarios (they need NATS_URL).
    #[arg(long, default_value_t = 50_000)]
    relay_rows: u32,
    /// Length of the steady and bloat windows, in seconds.
    #[arg(long, default_value_t = 60)]
    steady_secs: u32,
    /// Offered load of the steady and bloat scenarios, in events per second.
    #[arg(long, default_value_t = 8_000)]
    steady_rate: u32,
    /// The small and the large backlog of the backlog scenario.
    #[arg(long, value_delimiter = ',', default_value = "10000,1000000")]
    backlogs: Vec<u32>,
    /// Rows handled to measure the drain rate in the backlog scenario.
    #[arg(long, default_value_t = 10_000)]
    backlog_measured: u32,
    /// Rows drained by the scale-out scenario for each process count.
    #[arg(long, default_value_t = 100_000)]
    scale_rows: u32,
    /// Process counts of the scale-out scenario.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    processes: Vec<u32>,
    /// Handler time of the scale-out scenario's I/O-bound variant, in ms
    /// (each process then runs at most --scale-concurrency handlers at once).
    #[arg(long, default_value_t = 5)]
    scale_handler_ms: u64,
    /// Handlers each process runs at once in the I/O-bound variant.
    #[arg(long, default_value_t = 64)]
    scale_concurrency: u32,
    /// Print `EXPLAIN (ANALYZE, BUFFERS)` of the hot statements.
    #[arg(long)]
    explain: bool,
    /// Write results.csv, series.csv, SVG charts (and plans.txt) here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Run only these scenarios (comma-separated: auth, enqueue, drain, latency,
    /// steady, bloat, backlog, relay, scale-out); the raw drain baseline
    /// always runs.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "auth,enqueue,drain,latency,steady,bloat,backlog,relay,scale-out"
    )]
    scenarios: Vec<String>,
}

const BATCH: usize = 100;

/// The raw baseline's unit of work: claim and delete 100 due rows of app `$1`.
const RAW_DELETE: &str = "DELETE FROM outbox WHERE id IN (
    SELECT id FROM outbox WHERE app_id = $1 AND run_at <= now()
    ORDER BY run_at, id LIMIT 100 FOR UPDATE SKIP LOCKED)";

const KNOWN: &[&str] = &[
    "auth",
    "enqueue",
    "drain",
    "latency",
    "steady",
    "bloat",
    "backlog",
    "relay",
    "scale-out",
];

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
        (1..=9).contains(&args.drain_rounds),
        "--drain-rounds must be in 1..=9"
    );
    ensure!(
        (1..=16).contains(&args.raw_consumers),
        "--raw-consumers must be in 1..=16"
    );
    ensure!(
        args.latency_samples >= 10,
        "--latency-samples must be at least 10"
    );
    ensure!(
        (1..=args.latency_samples).contains(&args.latency_rounds),
        "--latency-rounds must be in 1..=--latency-samples"
    );
    ensure!(
        args.latency_loads.iter().all(|f| *f > 0.0 && *f <= 1.0),
        "--latency-loads takes fractions of the drain rate in (0, 1]"
    );
    ensure!(
        args.latency_load.is_none_or(|rate| rate >= 100),
        "--latency-load must be at least 100 events/s"
    );
    ensure!(args.steady_secs >= 2, "--steady-secs must be at least 2");
    ensure!(
        args.steady_rate >= 100,
        "--steady-rate must be at least 100"
    );
    ensure!(
        args.backlogs.len() == 2 && args.backlogs.iter().all(|b| *b >= 1000),
        "--backlogs takes two sizes of at least 1000, small then large"
    );
    ensure!(
        args.backlog_measured >= 100 && args.backlog_measured <= args.backlogs[0],
        "--backlog-measured must be in 100..=the small backlog"
    );
    ensure!(
        args.processes.iter().all(|p| (1..=16).contains(p)),
        "--processes takes counts in 1..=16"
    );
    if let Some(unknown) = args.scenarios.iter().find(|s| !KNOWN.contains(&s.as_str())) {
        anyhow::bail!("unknown scenario {unknown:?}; known: {}", KNOWN.join(", "));
    }
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
    let machine: (String, String, String) = sqlx::query_as(
        "SELECT current_setting('fsync'), current_setting('synchronous_commit'), version()",
    )
    .fetch_one(&pool)
    .await?;
    println!(
        "outboxd bench: rows={} fsync={} synchronous_commit={} cores={} server={}",
        args.rows,
        machine.0,
        machine.1,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        machine.2.split(" on ").next().unwrap_or_default(),
    );
    let mut figures: Vec<Figure> = Vec::new();
    let mut series: Vec<Series> = Vec::new();
    let mut plans = String::new();
    let fig = |scenario, name: String, value, unit, ratio_to: Option<(f64, &str)>| Figure {
        scenario,
        name,
        value,
        unit,
        ratio_to: ratio_to.map(|(v, l)| (v, l.to_owned())),
    };

    let wants = |name: &str| args.scenarios.iter().any(|s| s == name);
    // (a) the raw ceiling: claim-and-delete batches with plain SQL, and (with
    // the drain scenario) the same backlog dispatched by outboxd in lease and
    // transactional mode. The machine's speed drifts by tens of percent from
    // one minute to the next, so the three alternate for --drain-rounds
    // rounds and each figure is the median of its rounds.
    let rounds = if wants("drain") { args.drain_rounds } else { 1 };
    let (mut raw_rates, mut lease_rates, mut tx_rates) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        eprintln!("bench: drain, round {} of {rounds}", round + 1);
        prefill(&pool, raw_app, args.rows, "bench.noop").await?;
        if args.explain && round == 0 {
            plans.push_str(&explain(&pool, raw_app).await?);
        }
        raw_rates.push(raw_drain(&pool, raw_app, args.rows, args.raw_consumers).await?);
        truncate(&pool).await?;
        if wants("drain") {
            for (in_transaction, rates) in [(false, &mut lease_rates), (true, &mut tx_rates)] {
                prefill(&pool, app, args.rows, "bench.noop").await?;
                rates.push(outboxd_drain(&pool, &settings, args.rows, in_transaction).await?);
                truncate(&pool).await?;
            }
        }
    }
    let spread = |rates: &[f64]| {
        let (lo, hi) = rates.iter().fold((f64::INFINITY, 0.0_f64), |(lo, hi), r| {
            (lo.min(*r), hi.max(*r))
        });
        format!("{:.0}k–{:.0}k", lo / 1000.0, hi / 1000.0)
    };
    let raw_drain = median(raw_rates.clone());
    let ceiling = (raw_drain, "raw drain");
    figures.push(fig(
        "drain",
        format!(
            "raw drain: DELETE…SKIP LOCKED LIMIT {BATCH}, {} conns ({})",
            args.raw_consumers,
            spread(&raw_rates)
        ),
        raw_drain,
        "rows/s",
        Some(ceiling),
    ));
    let drain = (!lease_rates.is_empty()).then(|| median(lease_rates.clone()));
    if let Some(rate) = drain {
        figures.push(fig(
            "drain",
            format!(
                "outboxd dispatch: backlog, no-op handler ({})",
                spread(&lease_rates)
            ),
            rate,
            "events/s",
            Some(ceiling),
        ));
        figures.push(fig(
            "drain",
            format!(
                "outboxd dispatch: transactional mode ({})",
                spread(&tx_rates)
            ),
            median(tx_rates.clone()),
            "events/s",
            Some(ceiling),
        ));
    }
    let wants = |name: &str| args.scenarios.iter().any(|s| s == name);
    // (b) enqueue: one row per transaction from several producers, and
    // batches; raw and outboxd alternate for as many rounds as the drain
    // (the machine drifts), each figure the median of its rounds.
    if wants("enqueue") {
        let mut rates: [Vec<f64>; 4] = Default::default();
        for round in 0..args.drain_rounds {
            eprintln!(
                "bench: enqueue, round {} of {}",
                round + 1,
                args.drain_rounds
            );
            for (i, (target, producers, per_txn, writer)) in [
                (raw_app, args.producers, 1, Writer::Raw),
                (app, args.producers, 1, Writer::Outboxd),
                (raw_app, 1, BATCH, Writer::Raw),
                (app, 1, BATCH, Writer::Outboxd),
            ]
            .into_iter()
            .enumerate()
            {
                rates[i].push(
                    insert_rate(&pool, target, args.enqueue_rows, producers, per_txn, writer)
                        .await?,
                );
                truncate(&pool).await?;
            }
        }
        let [raw_single, single, raw_batch, batch] = rates.map(median);
        figures.push(fig(
            "enqueue",
            format!("raw insert: 1 row/txn, {} producers", args.producers),
            raw_single,
            "rows/s",
            None,
        ));
        figures.push(fig(
            "enqueue",
            format!("raw insert: {BATCH} rows/txn (unnest), 1 producer"),
            raw_batch,
            "rows/s",
            None,
        ));
        figures.push(fig(
            "enqueue",
            format!("outboxd enqueue: 1 event/txn, {} producers", args.producers),
            single,
            "events/s",
            Some((raw_single, "raw 1-row insert")),
        ));
        figures.push(fig(
            "enqueue",
            format!("outboxd enqueue_batch: {BATCH} events/txn"),
            batch,
            "events/s",
            Some((raw_batch, "raw batch insert")),
        ));
    }

    // (c) latency from enqueue commit to handler start, idle and under loads
    // of half and a quarter of the drain capacity, for outboxd in both modes
    // and for plain-SQL consumers on the same load.
    if wants("latency") {
        use load::Taker;
        let lease = Taker::Outboxd {
            in_transaction: false,
        };
        let transactional = Taker::Outboxd {
            in_transaction: true,
        };
        // Idle means nothing else to do, including the writes the drains
        // left behind.
        checkpoint(&pool).await;
        let idle = load::latency(&pool, &settings, app, args.latency_samples, 0, lease).await?;
        let drain_rate = drain.unwrap_or(raw_drain * 0.4);
        let load_rates: Vec<u32> = match args.latency_load {
            Some(rate) => vec![rate],
            None => args
                .latency_loads
                .iter()
                .map(|fraction| (drain_rate * fraction) as u32)
                .collect(),
        };
        let mut runs = vec![("idle".to_owned(), idle, None, 0)];
        let takers = [
            (Taker::Raw, "raw SQL consumers"),
            (lease, "outboxd"),
            (transactional, "outboxd transactional mode"),
        ];
        // The takers take turns for --latency-rounds rounds and each one's
        // samples are pooled, so a slow minute of the machine falls on all.
        let rounds = args.latency_rounds;
        let per_round = args.latency_samples.div_ceil(rounds);
        for load_rate in load_rates {
            let mut pooled: Vec<Option<load::Latency>> = vec![None; takers.len()];
            for round in 1..=rounds {
                for ((taker, label), pooled) in takers.iter().zip(pooled.iter_mut()) {
                    eprintln!(
                        "bench: latency under {load_rate}/s load, {label}, round {round} of {rounds}"
                    );
                    let run =
                        load::latency(&pool, &settings, app, per_round, load_rate, *taker).await?;
                    truncate(&pool).await?;
                    match pooled {
                        Some(all) => all.merge(&run)?,
                        None => *pooled = Some(run),
                    }
                }
            }
            let mut raw_p99 = None;
            for ((_, label), run) in takers.iter().zip(pooled) {
                let Some(run) = run else { continue };
                let baseline = raw_p99.map(|p99| (p99, "raw consumers' p99"));
                raw_p99.get_or_insert(run.quantile_ms(0.99));
                runs.push((
                    format!("{load_rate}/s load, {label}"),
                    run,
                    baseline,
                    load_rate,
                ));
            }
        }
        for (label, l, baseline, load_rate) in runs {
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
                figures.push(fig(
                    "latency",
                    format!("latency {label}, {q}"),
                    v,
                    "ms",
                    ratio_to,
                ));
            }
            if load_rate > 0 {
                figures.push(fig(
                    "latency",
                    format!("latency {label}: load achieved"),
                    l.offered(),
                    "events/s",
                    Some((f64::from(load_rate), "asked")),
                ));
            }
        }
        truncate(&pool).await?;
    }

    // (d) a fixed offered load for a while: outboxd against one plain-SQL
    // consumer with the same producers.
    if wants("steady") {
        let raw = load::steady(
            &pool,
            &settings,
            raw_app,
            args.steady_rate,
            args.steady_secs,
            load::Drainer::Raw,
            false,
        )
        .await?;
        truncate(&pool).await?;
        let ours = load::steady(
            &pool,
            &settings,
            app,
            args.steady_rate,
            args.steady_secs,
            load::Drainer::Outboxd,
            false,
        )
        .await?;
        truncate(&pool).await?;
        figures.push(fig(
            "steady",
            "producers: offered load achieved".into(),
            ours.offered,
            "events/s",
            None,
        ));
        figures.push(fig(
            "steady",
            format!("raw steady: {}/s offered, 1 consumer", args.steady_rate),
            raw.completed,
            "events/s",
            None,
        ));
        figures.push(fig(
            "steady",
            format!("outboxd steady: {}/s offered", args.steady_rate),
            ours.completed,
            "events/s",
            Some((raw.completed, "raw steady")),
        ));
        figures.push(fig(
            "steady",
            "outboxd steady: deepest queue".into(),
            ours.max_depth as f64,
            "rows",
            Some((raw.max_depth.max(1) as f64, "raw deepest queue")),
        ));
        figures.push(fig(
            "steady",
            "outboxd steady: queue at the end".into(),
            ours.final_depth as f64,
            "rows",
            None,
        ));
        series.push(Series {
            chart: "steady-depth",
            label: "raw consumer".into(),
            points: raw.depth,
        });
        series.push(Series {
            chart: "steady-depth",
            label: "outboxd".into(),
            points: ours.depth,
        });
    }

    // (e) the same load while another connection holds a snapshot open.
    if wants("bloat") {
        let held = load::steady(
            &pool,
            &settings,
            app,
            args.steady_rate,
            args.steady_secs,
            load::Drainer::Outboxd,
            true,
        )
        .await?;
        truncate(&pool).await?;
        let before = held.completed_before.unwrap_or_default();
        let during = held.completed_during.unwrap_or_default();
        figures.push(fig(
            "bloat",
            "outboxd: before the snapshot is held".into(),
            before,
            "events/s",
            None,
        ));
        figures.push(fig(
            "bloat",
            "outboxd: while a REPEATABLE READ snapshot is held".into(),
            during,
            "events/s",
            Some((before, "before")),
        ));
        figures.push(fig(
            "bloat",
            "outbox dead tuples at the end".into(),
            held.dead_tuples as f64,
            "tuples",
            None,
        ));
        figures.push(fig(
            "bloat",
            "deepest queue".into(),
            held.max_depth as f64,
            "rows",
            None,
        ));
        series.push(Series {
            chart: "bloat-depth",
            label: "outboxd, snapshot held from the middle".into(),
            points: held.depth,
        });
    }

    // (f) claim latency and drain rate with a small and a large backlog; the
    // large one is drained to the end while the resident set is sampled.
    if wants("backlog") {
        let (s, l) = (args.backlogs[0], args.backlogs[1]);
        // The large backlog waits in a database of its own while the claims
        // of the two alternate (see `load::backlog_claims`).
        let large_db = ScratchDatabase::create(&pool, "outboxd_bench_backlog").await?;
        let large_app = outbox_core::store::apps::ensure(&large_db.pool, "bench", "bench outboxd")
            .await?
            .id;
        eprintln!("bench: backlog, filling {s} and {l} rows");
        prefill(&pool, app, s, "bench.noop").await?;
        prefill(&large_db.pool, large_app, l, "bench.noop").await?;
        eprintln!("bench: backlog, {CLAIM_PAIRS} claims from each in turn");
        let (small_claim, large_claim) =
            load::backlog_claims(&pool, &large_db.pool, CLAIM_PAIRS).await?;
        // A window of `backlog_measured` events lasts a tenth of a second, so
        // each side is the median of five: five fills of the small backlog,
        // the first five windows of the large one.
        const WINDOWS: u32 = 5;
        let mut small_rates = Vec::new();
        for window in 0..WINDOWS {
            if window > 0 {
                prefill(&pool, app, s, "bench.noop").await?;
            }
            let run = load::backlog(&pool, &settings, s, args.backlog_measured, 1).await?;
            small_rates.extend(run.drain_rates);
            truncate(&pool).await?;
        }
        eprintln!("bench: backlog, draining {l} rows");
        let large =
            load::backlog(&large_db.pool, &settings, l, args.backlog_measured, WINDOWS).await?;
        large_db.drop_it(&pool).await?;
        let small_rate = median(small_rates);
        let large_rate = median(large.drain_rates);
        figures.push(fig(
            "backlog",
            format!("claim of 100, {s} waiting, p50"),
            small_claim,
            "ms claim",
            None,
        ));
        figures.push(fig(
            "backlog",
            format!("claim of 100, {l} waiting, p50"),
            large_claim,
            "ms claim",
            Some((small_claim, "small backlog")),
        ));
        figures.push(fig(
            "backlog",
            format!("drain, {s} waiting"),
            small_rate,
            "events/s",
            None,
        ));
        figures.push(fig(
            "backlog",
            format!("drain, {l} waiting"),
            large_rate,
            "events/s",
            Some((small_rate, "small backlog")),
        ));
        figures.push(fig(
            "backlog",
            format!("peak RSS draining {l} rows"),
            large.peak_rss_mib,
            "MiB",
            None,
        ));
    }

    // (g) relay to JetStream (PubAck before delete) and the consumer runtime.
    if wants("relay") {
        if settings.nats.url.is_empty() {
            println!("relay and consume: skipped (set NATS_URL)");
        } else {
            let in_flight = settings.dispatcher_config().concurrency;
            let rates =
                relay_and_consume(&pool, &settings, app, args.relay_rows, args.drain_rounds)
                    .await?;
            let rows = args.relay_rows;
            figures.push(fig(
                "relay",
                format!("outboxd dispatch: {rows} rows, no-op handler, same rounds"),
                rates.drain,
                "events/s",
                None,
            ));
            figures.push(fig(
                "relay",
                format!("raw JetStream publish: same headers, PubAck, {in_flight} in flight"),
                rates.publish,
                "msgs/s",
                None,
            ));
            figures.push(fig(
                "relay",
                "outboxd relay: outbox → JetStream, PubAck".into(),
                rates.relay,
                "events/s",
                Some((rates.drain, "in-process dispatch")),
            ));
            // Relaying does a drain's database work and a publish's NATS work
            // on the same cores: at best 1 / (1/drain + 1/publish) per second.
            let shared = 1.0 / (1.0 / rates.drain + 1.0 / rates.publish);
            figures.push(fig(
                "relay",
                "outboxd relay, against drain and publish sharing the cores".into(),
                rates.relay,
                "events/s",
                Some((shared, "1/(1/drain + 1/publish)")),
            ));
            figures.push(fig(
                "relay",
                "consumer runtime: JetStream → handler, ack".into(),
                rates.consume,
                "msgs/s",
                Some((rates.relay, "relay")),
            ));
            truncate(&pool).await?;
        }
    }

    // (h) several dispatcher processes on one database.
    // No-op handlers: one process already drives PostgreSQL to its limit on
    // this machine. I/O-bound handlers with a per-process concurrency: the
    // processes, not the database, are the limit, which is when adding one helps.
    // (i) what authenticating an API request costs now that a token is
    // checked against its session row, next to the user lookup a token
    // needed before: alone, and within the database work of a typical
    // request (role check and an unresolved count); rounds in turn, 4
    // callers at once.
    if wants("auth") {
        let checks = (args.enqueue_rows as usize).clamp(100, 20_000);
        let rates = auth_rates(&pool, app, checks, args.drain_rounds as usize).await?;
        for (what, unit, [before, after]) in [
            ("authentication", "checks/s", rates[0]),
            ("request (auth, role, count)", "requests/s", rates[1]),
        ] {
            figures.push(fig(
                "auth",
                format!("{what}: token + user lookup (before sessions)"),
                before,
                unit,
                None,
            ));
            figures.push(fig(
                "auth",
                format!("{what}: token + session lookup"),
                after,
                unit,
                Some((before, "before sessions")),
            ));
        }
    }

    if wants("scale-out") {
        let io_bound = load::WorkerLoad {
            handler_ms: args.scale_handler_ms,
            concurrency: args.scale_concurrency,
        };
        for (label, load) in [
            ("no-op handler".to_owned(), load::WorkerLoad::default()),
            (
                format!(
                    "{} ms handler, {} at once per process",
                    io_bound.handler_ms, io_bound.concurrency
                ),
                io_bound,
            ),
        ] {
            let mut one = None;
            for &n in &args.processes {
                let rate = load::scale_out(&pool, args.scale_rows, n, load).await?;
                truncate(&pool).await?;
                let base = *one.get_or_insert(rate);
                figures.push(fig(
                    "scale-out",
                    format!("{n} process(es), {label}"),
                    rate,
                    "events/s",
                    Some((base, "1 process")),
                ));
            }
        }
    }

    println!();
    println!("{:<58} {:>12}  {:<9} RATIO", "SCENARIO", "VALUE", "UNIT");
    for f in &figures {
        let ratio = f
            .ratio()
            .zip(f.ratio_to.as_ref())
            .map(|(r, (_, label))| format!("{r:.2} of {label}"))
            .unwrap_or_default();
        println!("{:<58} {:>12.1}  {:<9} {ratio}", f.name, f.value, f.unit);
    }
    if args.explain {
        println!("\n{plans}");
    }
    if let Some(dir) = &args.out {
        report::write(dir, &figures, &series)?;
        if args.explain {
            std::fs::write(dir.join("plans.txt"), &plans)?;
        }
        println!("results, series and charts written to {}", dir.display());
    }
    Ok(())
}

/// `EXPLAIN (ANALYZE, BUFFERS)` of the claim, the combined complete-and-claim
/// and the raw baseline's statement, on the backlog of `app` (rolled back).
async fn explain(pool: &PgPool, app: Uuid) -> anyhow::Result<String> {
    use outbox_core::store::outbox::{CLAIM_SQL, COMPLETE_AND_CLAIM_SQL};
    let mut out = String::new();
    let mut tx = pool.begin().await?;
    let claimed =
        outbox_core::store::outbox::claim(&mut *tx, "explain", 100, Duration::from_secs(30))
            .await?;
    let ids: Vec<Uuid> = claimed.iter().map(|c| c.id).collect();
    let tokens: Vec<i64> = claimed.iter().map(|c| c.lease_token).collect();
    for (title, sql, done) in [
        ("claim (batch 100)", CLAIM_SQL, false),
        ("complete 100 and claim 100", COMPLETE_AND_CLAIM_SQL, true),
    ] {
        let text = format!("EXPLAIN (ANALYZE, BUFFERS) {sql}");
        let mut q = sqlx::query_scalar::<_, String>(&text)
            .bind(100i64)
            .bind("explain")
            .bind(30.0f64);
        if done {
            q = q.bind(&ids).bind(&tokens);
        }
        let lines = q.fetch_all(&mut *tx).await?;
        out.push_str(&format!("## {title}\n\n{}\n\n", lines.join("\n")));
    }
    let lines: Vec<String> = sqlx::query_scalar(&format!(
        "EXPLAIN (ANALYZE, BUFFERS) {}",
        outbox_core::store::outbox::TAKE_SQL
    ))
    .bind(100i64)
    .fetch_all(&mut *tx)
    .await?;
    out.push_str(&format!(
        "## transactional take (batch 100)\n\n{}\n\n",
        lines.join("\n")
    ));
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

/// What a `bench-worker`'s handlers do.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Each handler waits this long (an I/O-bound handler); 0: no-op.
    #[arg(long, default_value_t = 0)]
    handler_ms: u64,
}

/// `outboxd bench-worker`: a dispatcher for the scale-out scenario; runs
/// until SIGTERM.
pub async fn worker(settings: Settings, args: WorkerArgs) -> anyhow::Result<()> {
    let pool = crate::connect(&settings).await?;
    let mut registry = Registry::new();
    let wait = Duration::from_millis(args.handler_ms);
    registry.fallback(move |_e: Event| async move {
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok::<(), HandlerError>(())
    });
    let dispatcher = Dispatcher::new(pool, registry, settings.dispatcher_config())?;
    println!("bench-worker ready");
    dispatcher.run(crate::shutdown_signal()).await?;
    Ok(())
}

async fn truncate(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("TRUNCATE outbox").execute(pool).await?;
    sqlx::query("VACUUM ANALYZE outbox").execute(pool).await?;
    Ok(())
}

/// Claims taken from each backlog by the backlog scenario, in turn.
const CLAIM_PAIRS: u32 = 200;

/// A migrated database beside the benchmark's own, dropped when done with
/// (and dropped first if a failed run left it behind).
struct ScratchDatabase {
    name: &'static str,
    pool: PgPool,
}

impl ScratchDatabase {
    async fn create(pool: &PgPool, name: &'static str) -> anyhow::Result<Self> {
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(pool)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(pool)
            .await
            .with_context(|| format!("creating database {name} (needs CREATEDB)"))?;
        let scratch = sqlx::postgres::PgPoolOptions::new()
            .max_connections(pool.options().get_max_connections())
            .connect_with(pool.connect_options().as_ref().clone().database(name))
            .await?;
        outbox_core::migrate(&scratch).await?;
        Ok(Self {
            name,
            pool: scratch,
        })
    }

    async fn drop_it(self, pool: &PgPool) -> anyhow::Result<()> {
        self.pool.close().await;
        sqlx::query(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .execute(pool)
            .await?;
        Ok(())
    }
}

/// The middle value (the mean of the two middle ones for an even count).
/// Per second, [before, after] sessions: token checks alone, and the
/// database work of a typical request (authentication, the caller's role on
/// `app`, an unresolved dead-letter count). Medians of `rounds` rounds taken
/// in turn, with 4 callers at once.
async fn auth_rates(
    pool: &PgPool,
    app: uuid::Uuid,
    checks: usize,
    rounds: usize,
) -> anyhow::Result<[[f64; 2]; 2]> {
    use outbox_core::store::{dead_letters, principals};
    let auth = outbox_admin::AuthConfig::new(vec![7u8; 32]).map_err(anyhow::Error::msg)?;
    let email = format!("bench-{}@x.io", uuid::Uuid::new_v4().simple());
    let user = principals::create_user(pool, &email, "not a hash", false).await?;
    principals::set_role(pool, app, user.id, principals::Role::Viewer).await?;
    let issued = outbox_admin::auth::open_session(pool, &auth, user.id).await?;
    // [with sessions][whole request]
    let mut rates: [[Vec<f64>; 2]; 2] = Default::default();
    for _ in 0..rounds.max(1) {
        for whole in [false, true] {
            for with_session in [false, true] {
                let started = std::time::Instant::now();
                let mut callers = tokio::task::JoinSet::new();
                for _ in 0..4 {
                    let (pool, auth, token) = (pool.clone(), auth.clone(), issued.token.clone());
                    callers.spawn(async move {
                        for _ in 0..checks / 4 {
                            let user = if with_session {
                                outbox_admin::auth::authenticate(&pool, &auth, &token)
                                    .await?
                                    .user
                            } else {
                                let (id, _) = outbox_admin::auth::verify_token(&auth, &token)?;
                                principals::user_by_id(&pool, id)
                                    .await?
                                    .ok_or(outbox_admin::ApiError::Unauthorized)?
                            };
                            if whole {
                                principals::role_on(&pool, app, user.id).await?;
                                dead_letters::count_unresolved(&pool, app).await?;
                            }
                        }
                        Ok::<_, outbox_admin::ApiError>(())
                    });
                }
                while let Some(done) = callers.join_next().await {
                    done?.map_err(|e| anyhow::anyhow!("{e}"))?;
                }
                let rate = (checks / 4 * 4) as f64 / started.elapsed().as_secs_f64();
                rates[usize::from(whole)][usize::from(with_session)].push(rate);
            }
        }
    }
    sqlx::query("DELETE FROM users WHERE id = $1")
        .bind(user.id)
        .execute(pool)
        .await?;
    Ok(rates.map(|pair| pair.map(median)))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
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
    // The fill's WAL would otherwise be checkpointed in the middle of the
    // measurement that follows (a 1M-row fill is about a gigabyte of it).
    checkpoint(pool).await;
    Ok(())
}

/// Writes out what earlier scenarios left dirty, so that it is not written
/// during the measurement that follows. Needs superuser or pg_checkpoint;
/// without it the run is only noisier.
async fn checkpoint(pool: &PgPool) {
    if let Err(err) = sqlx::query("CHECKPOINT").execute(pool).await {
        tracing::debug!(error = %err, "no CHECKPOINT");
    }
}

async fn raw_drain(pool: &PgPool, app: Uuid, rows: u32, consumers: u32) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..consumers {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut total = 0u64;
            loop {
                let n = sqlx::query(RAW_DELETE)
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

/// How the enqueue scenario writes rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    /// Plain INSERTs of the same row shape (the baseline).
    Raw,
    /// `enqueue` / `enqueue_batch`.
    Outboxd,
}

/// `producers` tasks write `rows` rows in transactions of `per_txn`; returns
/// rows per second.
async fn insert_rate(
    pool: &PgPool,
    app: Uuid,
    rows: u32,
    producers: u32,
    per_txn: usize,
    writer: Writer,
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
                let payloads: Vec<serde_json::Value> =
                    (0..n).map(|i| json!({"n": done as usize + i})).collect();
                let mut tx = pool.begin().await?;
                write_rows(&mut tx, app, payloads, writer).await?;
                tx.commit().await?;
                done += n as u32;
            }
            Ok::<u32, anyhow::Error>(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn write_rows(
    conn: &mut sqlx::PgConnection,
    app: Uuid,
    payloads: Vec<serde_json::Value>,
    writer: Writer,
) -> anyhow::Result<()> {
    match (writer, payloads.len()) {
        (Writer::Raw, 1) => {
            sqlx::query(
                "INSERT INTO outbox (id, app_id, topic, payload) VALUES ($1, $2, 'bench.noop', $3)",
            )
            .bind(Uuid::now_v7())
            .bind(app)
            .bind(&payloads[0])
            .execute(conn)
            .await?;
        }
        (Writer::Raw, n) => {
            let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
            sqlx::query(
                "INSERT INTO outbox (id, app_id, topic, payload)
                 SELECT u.id, $1, 'bench.noop', u.payload FROM unnest($2::uuid[], $3::jsonb[]) AS u(id, payload)",
            )
            .bind(app)
            .bind(&ids)
            .bind(&payloads)
            .execute(conn)
            .await?;
        }
        (Writer::Outboxd, 1) => {
            let event = NewEvent::new(
                "bench.noop",
                payloads.into_iter().next().unwrap_or_default(),
            );
            enqueue(conn, app, &event).await?;
        }
        (Writer::Outboxd, _) => {
            let events: Vec<NewEvent> = payloads
                .into_iter()
                .map(|p| NewEvent::new("bench.noop", p))
                .collect();
            enqueue_batch(conn, app, &events).await?;
        }
    }
    Ok(())
}

async fn outboxd_drain(
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
        relays.push(relay(pool, settings, &js, stream, rows).await?);
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
async fn relay(
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
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        headers.insert("tenant-id", "bench");
        headers.insert("correlation-id", id.as_str());
        headers.insert("traceparent", outbox_nats::new_traceparent().as_str());
        headers.insert("outbox-topic", "bench.relay");
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
