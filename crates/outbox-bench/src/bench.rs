//! The benchmark run: its arguments, the shared `Bench` every scenario
//! works in, the scenarios in order, and the table they print.
//!
//! The raw baseline drains a backlog with plain
//! `DELETE … WHERE id IN (SELECT … LIMIT 100 FOR UPDATE SKIP LOCKED)`;
//! every outboxd figure is printed with its ratio to that ceiling (and
//! enqueue figures also to plain INSERTs of the same row shape).

use std::time::Duration;

use anyhow::ensure;
use clap::Args;
use outbox_core::store::stats;
use outbox_dispatch::{Dispatcher, Event, HandlerError, Registry};
use sqlx::PgPool;
use uuid::Uuid;

use outboxd::config::Settings;

use crate::load::phases::Phase;
use crate::report::{self, Figure, Series};
use crate::scenarios;

/// Sizes of the benchmark run.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Backlog size for the drain scenarios (raw and end-to-end).
    #[arg(long, default_value_t = 200_000)]
    pub rows: u32,
    /// Rows enqueued by the enqueue scenarios.
    #[arg(long, default_value_t = 20_000)]
    pub enqueue_rows: u32,
    /// Concurrent producers for the single-row enqueue scenarios.
    #[arg(long, default_value_t = 4)]
    pub producers: u32,
    /// Rounds of the drain and enqueue scenarios (raw and outboxd in turn);
    /// each figure is the median of its rounds.
    #[arg(long, default_value_t = 3)]
    pub drain_rounds: u32,
    /// Concurrent connections of the raw drain baseline.
    #[arg(long, default_value_t = 2)]
    pub raw_consumers: u32,
    /// Samples for each latency scenario (idle, and each taker under each
    /// load, spread over the rounds).
    #[arg(long, default_value_t = 1500)]
    pub latency_samples: u32,
    /// Rounds of the loaded latency scenarios (the takers in turn).
    #[arg(long, default_value_t = 3)]
    pub latency_rounds: u32,
    /// Offered loads of the loaded latency scenarios, as fractions of the
    /// measured drain rate.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.25")]
    pub latency_loads: Vec<f64>,
    /// One offered load for the loaded latency scenarios, in events per
    /// second, instead of --latency-loads.
    #[arg(long)]
    pub latency_load: Option<u32>,
    /// Rows for the relay and consume scenarios (they need NATS_URL).
    #[arg(long, default_value_t = 50_000)]
    pub relay_rows: u32,
    /// Length of the steady and bloat windows, in seconds.
    #[arg(long, default_value_t = 60)]
    pub steady_secs: u32,
    /// Offered load of the steady and bloat scenarios, in events per second.
    #[arg(long, default_value_t = 8_000)]
    pub steady_rate: u32,
    /// The small and the large backlog of the backlog scenario.
    #[arg(long, value_delimiter = ',', default_value = "10000,1000000")]
    pub backlogs: Vec<u32>,
    /// Rows handled to measure the drain rate in the backlog scenario.
    #[arg(long, default_value_t = 10_000)]
    pub backlog_measured: u32,
    /// Rows drained by the scale-out scenario for each process count.
    #[arg(long, default_value_t = 100_000)]
    pub scale_rows: u32,
    /// Process counts of the scale-out scenario.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub processes: Vec<u32>,
    /// Handler time of the scale-out scenario's I/O-bound variant, in ms
    /// (each process then runs at most --scale-concurrency handlers at once).
    #[arg(long, default_value_t = 5)]
    pub scale_handler_ms: u64,
    /// Handlers each process runs at once in the I/O-bound variant.
    #[arg(long, default_value_t = 64)]
    pub scale_concurrency: u32,
    /// The phases of the phases scenario, in order (clean first): clean,
    /// recovery, idle-in-tx, active-readers, backend-kill, pool-exhaustion,
    /// postgres-restart; `NAME:SECS` gives one phase its own length.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "clean,idle-in-tx,recovery,active-readers,recovery,backend-kill,recovery,pool-exhaustion,recovery,postgres-restart,recovery"
    )]
    pub phases: Vec<String>,
    /// Length of each phase without its own, in seconds.
    #[arg(long, default_value_t = 30)]
    pub phase_secs: u32,
    /// One sample of the phases' series every this many seconds.
    #[arg(long, default_value_t = 5)]
    pub phase_sample_secs: u32,
    /// Offered load of the phases scenario, in events per second.
    #[arg(long, default_value_t = 800)]
    pub phase_rate: u32,
    /// Each handler of the phases scenario sleeps this long, in ms.
    #[arg(long, default_value_t = 1)]
    pub phase_handler_ms: u64,
    /// Give the phases' topic a concurrency limit of this many rows running
    /// at once, so that every claim of the phases is a limited claim.
    #[arg(long)]
    pub phase_max_running: Option<u32>,
    /// Print `EXPLAIN (ANALYZE, BUFFERS)` of the hot statements.
    #[arg(long)]
    pub explain: bool,
    /// Write results.csv, series.csv, SVG charts (and plans.txt) here.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Run only these scenarios (comma-separated: auth, enqueue, drain, history,
    /// latency, steady, bloat, phases, backlog, paused, console, relay,
    /// scale-out); the raw drain baseline always runs.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "auth,enqueue,drain,history,latency,steady,bloat,phases,backlog,paused,console,relay,scale-out"
    )]
    pub scenarios: Vec<String>,
}

/// The scenarios `--scenarios` accepts.
const KNOWN: &[&str] = &[
    "auth",
    "enqueue",
    "drain",
    "history",
    "latency",
    "steady",
    "bloat",
    "phases",
    "backlog",
    "paused",
    "console",
    "relay",
    "scale-out",
];

impl BenchArgs {
    /// Refuses sizes the scenarios cannot work with, and unknown scenarios.
    fn check(&self) -> anyhow::Result<()> {
        let args = self;
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
        ensure!(args.phase_secs >= 1, "--phase-secs must be at least 1");
        ensure!(
            (1..=args.phase_secs).contains(&args.phase_sample_secs),
            "--phase-sample-secs must be in 1..=--phase-secs"
        );
        ensure!(args.phase_rate >= 10, "--phase-rate must be at least 10");
        ensure!(
            args.phase_handler_ms <= 10_000,
            "--phase-handler-ms must be at most 10000"
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
        if let Some(unknown) = args.phases.iter().find(|p| Phase::parse_entry(p).is_none()) {
            let known: Vec<_> = Phase::ALL.iter().map(|(n, _)| *n).collect();
            anyhow::bail!(
                "unknown phase {unknown:?}; known: {} (each optionally NAME:SECS, SECS ≥ 1)",
                known.join(", ")
            );
        }
        ensure!(
            args.phases
                .first()
                .and_then(|p| Phase::parse_entry(p))
                .map(|(p, _)| p)
                == Some(Phase::Clean),
            "--phases must start with clean (the baseline the others are compared with)"
        );
        if args
            .phases
            .iter()
            .filter_map(|p| Phase::parse_entry(p))
            .any(|(p, _)| p == Phase::PostgresRestart)
        {
            ensure!(
                std::env::var_os(crate::load::phases::RESTART_COMMAND_ENV).is_some(),
                "the postgres-restart phase needs {} (run it through scripts/bench.sh)",
                crate::load::phases::RESTART_COMMAND_ENV
            );
        }
        if let Some(unknown) = args.scenarios.iter().find(|s| !KNOWN.contains(&s.as_str())) {
            anyhow::bail!("unknown scenario {unknown:?}; known: {}", KNOWN.join(", "));
        }
        Ok(())
    }
}

/// What every scenario works with, and what they collect for the table.
pub struct Bench {
    /// The benchmark's database.
    pub pool: PgPool,
    /// The configuration (dispatcher settings, NATS URL).
    pub settings: Settings,
    /// The command line.
    pub args: BenchArgs,
    /// The app outboxd's scenarios enqueue to.
    pub app: Uuid,
    /// The app the raw-SQL baselines write to.
    pub raw_app: Uuid,
    /// Every figure so far, in the order they are printed.
    pub figures: Vec<Figure>,
    /// The time series for the charts.
    pub series: Vec<Series>,
    /// The `--explain` plans, as printed.
    pub plans: String,
    /// The raw drain's rate (the ceiling), rows per second; set by the drain
    /// scenario, which always runs first.
    pub raw_drain: f64,
    /// outboxd's drain rate in lease mode, when the drain scenario ran.
    pub drain: Option<f64>,
}

impl Bench {
    /// Connects, migrates, makes sure of the two apps and an empty outbox,
    /// and prints the run's header line.
    async fn connect(settings: Settings, args: BenchArgs) -> anyhow::Result<Self> {
        let mut settings = settings;
        settings.database.max_connections =
            settings.database.max_connections.max(args.producers + 8);
        let pool = outboxd::db::connect(&settings, 0).await?;
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
        let machine = stats::server_facts(&pool).await?;
        println!(
            "outboxd bench: rows={} fsync={} synchronous_commit={} cores={} server={}",
            args.rows,
            machine.fsync,
            machine.synchronous_commit,
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            machine.version.split(" on ").next().unwrap_or_default(),
        );
        Ok(Self {
            pool,
            settings,
            args,
            app,
            raw_app,
            figures: Vec::new(),
            series: Vec::new(),
            plans: String::new(),
            raw_drain: 0.0,
            drain: None,
        })
    }

    /// Whether `--scenarios` names `scenario`.
    pub fn wants(&self, scenario: &str) -> bool {
        self.args.scenarios.iter().any(|s| s == scenario)
    }

    /// Adds a figure to the table, with the baseline (value and label) it is
    /// compared with, if any.
    pub fn figure(
        &mut self,
        scenario: &'static str,
        name: String,
        value: f64,
        unit: &'static str,
        ratio_to: Option<(f64, &str)>,
    ) {
        self.figures.push(Figure {
            scenario,
            name,
            value,
            unit,
            ratio_to: ratio_to.map(|(v, l)| (v, l.to_owned())),
        });
    }

    /// Adds a time series to a chart.
    pub fn add_series(&mut self, chart: &'static str, label: String, points: Vec<(f64, f64)>) {
        self.series.push(Series {
            chart,
            label,
            points,
        });
    }

    /// Prints the table (and the plans), and writes the files of `--out`.
    fn finish(self) -> anyhow::Result<()> {
        let Self {
            args,
            figures,
            series,
            plans,
            ..
        } = self;
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
}

/// `outbox-bench`: runs the wanted scenarios in order, then prints the table
/// and writes the files of `--out`.
pub async fn run(settings: Settings, args: BenchArgs) -> anyhow::Result<()> {
    args.check()?;
    let mut bench = Bench::connect(settings, args).await?;
    // The raw drain baseline always runs: it is the ceiling of the table,
    // and the latency loads fall back on it without the drain scenario.
    scenarios::drain(&mut bench).await?;
    if bench.wants("history") {
        scenarios::history(&mut bench).await?;
    }
    if bench.wants("enqueue") {
        scenarios::enqueue(&mut bench).await?;
    }
    if bench.wants("latency") {
        scenarios::latency(&mut bench).await?;
    }
    if bench.wants("steady") {
        scenarios::steady(&mut bench).await?;
    }
    if bench.wants("bloat") {
        scenarios::bloat(&mut bench).await?;
    }
    if bench.wants("phases") {
        scenarios::phases(&mut bench).await?;
    }
    if bench.wants("backlog") {
        scenarios::backlog(&mut bench).await?;
    }
    if bench.wants("paused") {
        scenarios::paused(&mut bench).await?;
    }
    if bench.wants("console") {
        scenarios::console(&mut bench).await?;
    }
    if bench.wants("relay") {
        scenarios::relay(&mut bench).await?;
    }
    if bench.wants("auth") {
        scenarios::auth(&mut bench).await?;
    }
    if bench.wants("scale-out") {
        scenarios::scale_out(&mut bench).await?;
    }
    bench.finish()
}

/// What a `worker`'s handlers do.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Each handler waits this long (an I/O-bound handler); 0: no-op.
    #[arg(long, default_value_t = 0)]
    handler_ms: u64,
}

/// `outbox-bench worker`: a dispatcher for the scale-out scenario; runs
/// until SIGTERM.
pub async fn worker(settings: Settings, args: WorkerArgs) -> anyhow::Result<()> {
    let pool = outboxd::db::connect(&settings, 0).await?;
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
    dispatcher.run(outboxd::daemon::shutdown_signal()).await?;
    Ok(())
}
