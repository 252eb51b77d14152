//! The fault scenarios. Each one produces under load, injects its fault,
//! waits for quiescence (the outbox is empty), stops its processes and checks
//! the recorded history.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use outbox_testkit::TestDb;
use sqlx::ConnectOptions;
use sqlx::postgres::PgConnectOptions;
use uuid::Uuid;

use crate::history::{Commit, Expect, Observed, Planned, Verdict, create_effects_table, produce};
use crate::procs::{NatsServer, Outboxd, OutboxdSpec, PgControl};
use crate::proxy::{Mode, Proxy};

/// What every scenario needs from the command line.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The `outboxd` binary.
    pub outboxd: PathBuf,
    /// The repository's `config/`.
    pub config_dir: PathBuf,
    /// The `nats-server` binary.
    pub nats_bin: PathBuf,
    /// Scratch space; one folder per scenario.
    pub work_dir: PathBuf,
}

/// One scenario's result, a row of the results table.
#[derive(Debug)]
pub struct Outcome {
    /// Scenario name.
    pub name: &'static str,
    /// The faults injected, in words.
    pub faults: String,
    /// The invariant counts.
    pub verdict: Verdict,
    /// Extra observations (fenced completions, restarts, skew, …).
    pub notes: Vec<String>,
    /// A scenario-specific expectation that failed, if any.
    pub failure: Option<String>,
    /// Wall time.
    pub elapsed: Duration,
}

impl Outcome {
    /// Whether the invariants and the scenario's own expectations hold.
    pub fn passed(&self) -> bool {
        self.verdict.passed() && self.failure.is_none()
    }
}

/// The scenarios, in the order they run.
pub const ALL: &[&str] = &[
    "kill9",
    "kill9-transactional",
    "pg-crash",
    "nats-kill",
    "nats-stop",
    "pg-partition",
    "nats-partition-short",
    "nats-partition-long",
    "slow-heartbeat",
    "slow-no-heartbeat",
    "poison",
    "sigterm",
    "clock-skew",
];

/// Runs one scenario by name.
pub async fn run(ctx: &Ctx, name: &str) -> anyhow::Result<Outcome> {
    match name {
        "kill9" => kill9(ctx, false).await,
        "kill9-transactional" => kill9(ctx, true).await,
        "pg-crash" => pg_crash(ctx).await,
        "nats-kill" => nats_kill(ctx).await,
        "nats-stop" => nats_stop(ctx).await,
        "pg-partition" => pg_partition(ctx).await,
        "nats-partition-short" => nats_partition(ctx, false).await,
        "nats-partition-long" => nats_partition(ctx, true).await,
        "slow-heartbeat" => slow(ctx, true).await,
        "slow-no-heartbeat" => slow(ctx, false).await,
        "poison" => poison(ctx).await,
        "sigterm" => sigterm(ctx).await,
        "clock-skew" => clock_skew(ctx).await,
        other => bail!("unknown scenario {other:?}; known: {}", ALL.join(", ")),
    }
}

/// A scenario's database, app, folder and processes.
struct Stage {
    name: &'static str,
    ctx: Ctx,
    db: TestDb,
    app: Uuid,
    dir: PathBuf,
    fleet: Vec<Outboxd>,
    specs: Vec<OutboxdSpec>,
    nats: Option<NatsServer>,
    started: Instant,
}

impl Stage {
    async fn new(ctx: &Ctx, name: &'static str) -> anyhow::Result<Self> {
        let db = TestDb::with_pool_size(8)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        create_effects_table(&db.pool).await?;
        let app = db.app("chaos").await.map_err(|e| anyhow::anyhow!("{e}"))?;
        let dir = ctx.work_dir.join(format!("{name}-{}", &db.name[14..22]));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            name,
            ctx: ctx.clone(),
            db,
            app,
            dir,
            fleet: Vec::new(),
            specs: Vec::new(),
            nats: None,
            started: Instant::now(),
        })
    }

    async fn with_nats(&mut self) -> anyhow::Result<String> {
        let nats = NatsServer::start(&self.ctx.nats_bin, self.dir.join("nats")).await?;
        let url = nats.url();
        self.nats = Some(nats);
        Ok(url)
    }

    fn nats(&mut self) -> anyhow::Result<&mut NatsServer> {
        self.nats
            .as_mut()
            .context("this scenario runs no nats-server")
    }

    fn spec(&self, name: &str, env: &[(&str, &str)]) -> OutboxdSpec {
        OutboxdSpec {
            bin: self.ctx.outboxd.clone(),
            config_dir: self.ctx.config_dir.clone(),
            dir: self.dir.clone(),
            name: name.to_owned(),
            database_url: self.db.url.clone(),
            nats_url: None,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            clock_offset: None,
        }
    }

    async fn launch(&mut self, spec: OutboxdSpec) -> anyhow::Result<()> {
        self.fleet.push(Outboxd::start(spec.clone()).await?);
        self.specs.push(spec);
        Ok(())
    }

    fn producer(
        &self,
        plan: Vec<Planned>,
        rate: u32,
    ) -> tokio::task::JoinHandle<BTreeMap<i64, (Planned, Commit)>> {
        tokio::spawn(produce(self.db.pool.clone(), self.app, plan, rate))
    }

    /// Waits until the outbox is empty, restarting processes that died by
    /// themselves when `restart_dead` (else a death is a failure).
    async fn quiesce(&mut self, within: Duration, restart_dead: bool) -> anyhow::Result<u32> {
        let deadline = Instant::now() + within;
        let mut deaths = 0;
        loop {
            for process in &mut self.fleet {
                if process.restart_if_exited().await? {
                    deaths += 1;
                    if !restart_dead {
                        bail!("an outboxd process died during {}", self.name);
                    }
                }
            }
            let left = outbox_core::store::outbox::count(&self.db.pool)
                .await
                .unwrap_or(i64::MAX);
            if left == 0 || Instant::now() >= deadline {
                return Ok(deaths);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the processes (SIGTERM, drain), collects and checks.
    async fn finish(
        mut self,
        produced: BTreeMap<i64, (Planned, Commit)>,
        faults: String,
        stream_dups_allowed: bool,
    ) -> anyhow::Result<(Outcome, Observed)> {
        for process in &mut self.fleet {
            process.terminate(Duration::from_secs(20)).await?;
        }
        let histories: Vec<PathBuf> = self.specs.iter().map(OutboxdSpec::history).collect();
        let mut observed = Observed::collect(&self.db.pool, &histories).await?;
        if let Some(nats) = &self.nats {
            observed.read_stream(&nats.url(), "OUTBOX").await?;
        }
        let verdict = Verdict::check(&produced, &observed, stream_dups_allowed);
        let outcome = Outcome {
            name: self.name,
            faults,
            verdict,
            notes: Vec::new(),
            failure: None,
            elapsed: self.started.elapsed(),
        };
        self.db.pool.close().await;
        Ok((outcome, observed))
    }
}

fn jitter(from_ms: u64, to_ms: u64) -> Duration {
    Duration::from_millis(fastrand::u64(from_ms..to_ms))
}

/// 0..total as `chaos.work` events: mostly ok, some flaky, some slow.
fn mixed_work(total: i64, max_attempts: i32) -> Vec<Planned> {
    (0..total)
        .map(|n| match n % 10 {
            7 => Planned::work(n, "flaky", max_attempts),
            8 => Planned::slow(n, 100, max_attempts),
            _ => Planned::slow(n, 10, max_attempts),
        })
        .collect()
}

/// kill -9 of a dispatcher at random moments under load, 5 times, with
/// restarts; in lease mode or in transactional mode (where a killed batch's
/// transaction rolls back and its rows run again).
async fn kill9(ctx: &Ctx, transactional: bool) -> anyhow::Result<Outcome> {
    let name = if transactional {
        "kill9-transactional"
    } else {
        "kill9"
    };
    let mut stage = Stage::new(ctx, name).await?;
    let env: &[(&str, &str)] = if transactional {
        &[("OUTBOXD_DISPATCHER__IN_TRANSACTION", "true")]
    } else {
        &[]
    };
    stage.launch(stage.spec("a", env)).await?;
    stage.launch(stage.spec("b", env)).await?;
    let producer = stage.producer(mixed_work(3000, 10), 400);
    for _ in 0..5 {
        tokio::time::sleep(jitter(300, 1400)).await;
        let victim = fastrand::usize(..stage.fleet.len());
        stage.fleet[victim].kill9_and_restart().await?;
    }
    let produced = producer.await?;
    stage.quiesce(Duration::from_secs(60), false).await?;
    let (mut outcome, observed) = stage
        .finish(
            produced,
            format!(
                "5 × kill -9 of one of 2 dispatchers, restarted{}",
                if transactional {
                    "; transactional mode"
                } else {
                    ""
                }
            ),
            false,
        )
        .await?;
    if transactional {
        // A crash rolls a batch back (its attempt is counted through the
        // batch record once the dead worker's lock is free), and a failure
        // runs the rows before it once more: within twice the attempts plus
        // the kills.
        const BOUND: u32 = 2 * 10 + 5;
        outcome.verdict.over_attempts = observed
            .invocations
            .values()
            .filter(|&&n| n > BOUND)
            .count();
        let most = observed.invocations.values().max().copied().unwrap_or(0);
        outcome.notes.push(format!(
            "at most {most} invocations of one event (bound in transactional mode: 2 × max_attempts + kills = {BOUND})"
        ));
    }
    Ok(outcome)
}

/// PostgreSQL crash (`pg_ctl stop -m immediate`) and restart under load.
async fn pg_crash(ctx: &Ctx) -> anyhow::Result<Outcome> {
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

fn relay_plan(total: i64) -> Vec<Planned> {
    (0..total).map(|n| Planned::relay(n, 1000)).collect()
}

/// nats-server kill -9 and restart during relay.
async fn nats_kill(ctx: &Ctx) -> anyhow::Result<Outcome> {
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
async fn nats_stop(ctx: &Ctx) -> anyhow::Result<Outcome> {
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

/// A partition between one dispatcher and PostgreSQL, longer than the lease,
/// while a second dispatcher runs: the first one's completions are fenced.
async fn pg_partition(ctx: &Ctx) -> anyhow::Result<Outcome> {
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

/// A partition between the relay and NATS, shorter or longer than the
/// stream's duplicate window.
async fn nats_partition(ctx: &Ctx, longer: bool) -> anyhow::Result<Outcome> {
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

/// Handlers running 1.5 × the lease, with the heartbeat (each runs once)
/// and without it (the handler timeout, shorter than the lease, ends each
/// attempt; the events are dead-lettered after `max_attempts`).
async fn slow(ctx: &Ctx, heartbeat: bool) -> anyhow::Result<Outcome> {
    let name = if heartbeat {
        "slow-heartbeat"
    } else {
        "slow-no-heartbeat"
    };
    let mut stage = Stage::new(ctx, name).await?;
    let env: &[(&str, &str)] = if heartbeat {
        &[
            ("OUTBOXD_DISPATCHER__HEARTBEAT_INTERVAL_MS", "500"),
            ("OUTBOXD_DISPATCHER__HANDLER_TIMEOUT_MS", "10000"),
        ]
    } else {
        &[
            ("OUTBOXD_DISPATCHER__HEARTBEAT_INTERVAL_MS", "0"),
            ("OUTBOXD_DISPATCHER__HANDLER_TIMEOUT_MS", "1500"),
        ]
    };
    stage.launch(stage.spec("a", env)).await?;
    stage.launch(stage.spec("b", env)).await?;
    let plan = (0..40)
        .map(|n| {
            let p = Planned::slow(n, 3000, 3);
            if heartbeat {
                p
            } else {
                p.expecting(Expect::DeadLetter, 3)
            }
        })
        .collect();
    let produced = stage.producer(plan, 100).await?;
    stage.quiesce(Duration::from_secs(60), false).await?;
    let faults = if heartbeat {
        "handlers take 3 s, lease 2 s, heartbeat every 0.5 s, 2 dispatchers"
    } else {
        "handlers take 3 s, lease 2 s, no heartbeat, handler timeout 1.5 s, 2 dispatchers"
    };
    let (mut outcome, _) = stage.finish(produced, faults.into(), false).await?;
    if outcome.verdict.extra_invocations > 0 {
        outcome.failure = Some(format!(
            "{} invocations beyond plan: a live lease was taken over",
            outcome.verdict.extra_invocations
        ));
    }
    Ok(outcome)
}

/// Undecodable payloads, panicking handlers and a handler that aborts the
/// whole process, among healthy events.
async fn poison(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let mut stage = Stage::new(ctx, "poison").await?;
    stage.launch(stage.spec("a", &[])).await?;
    stage.launch(stage.spec("b", &[])).await?;
    let plan = (0..320)
        .map(|n| match n {
            50 | 150 | 250 | 280 | 300 => Planned::undecodable(n, 3),
            60 | 160 | 260 | 285 | 305 => Planned::work(n, "panic", 3),
            100 | 200 => Planned::work(n, "abort", 3),
            _ => Planned::slow(n, 10, 20),
        })
        .collect();
    let produced = stage.producer(plan, 200).await?;
    let deaths = stage.quiesce(Duration::from_secs(120), true).await?;
    let (mut outcome, _) = stage
        .finish(
            produced,
            "5 undecodable payloads, 5 panicking handlers, 2 handlers that abort the process"
                .into(),
            false,
        )
        .await?;
    outcome.notes.push(format!(
        "{deaths} process aborts, each restarted; the aborting events were dead-lettered at their 4th claim"
    ));
    if deaths != 6 {
        outcome.failure = Some(format!(
            "expected 6 aborts (2 events × 3 attempts), saw {deaths}"
        ));
    }
    Ok(outcome)
}

/// SIGTERM under load: the dispatcher drains, exits 0, and is started again.
async fn sigterm(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let mut stage = Stage::new(ctx, "sigterm").await?;
    stage.launch(stage.spec("a", &[])).await?;
    let plan = (0..1500).map(|n| Planned::slow(n, 200, 10)).collect();
    let producer = stage.producer(plan, 400);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let clean = stage.fleet[0].terminate(Duration::from_secs(10)).await?;
    stage.fleet[0].start_again().await?;
    let produced = producer.await?;
    stage.quiesce(Duration::from_secs(60), false).await?;
    let (mut outcome, _) = stage
        .finish(
            produced,
            "SIGTERM under load (drain grace 1 s), then started again".into(),
            false,
        )
        .await?;
    if !clean {
        outcome.failure = Some("outboxd did not exit 0 after SIGTERM".into());
    }
    Ok(outcome)
}

/// Dispatchers whose wall clocks are 2 days ahead and 2 days behind:
/// leases, retries and retention use the database clock, so nothing runs
/// twice and no young dead letter is swept.
async fn clock_skew(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let mut stage = Stage::new(ctx, "clock-skew").await?;
    let env = [
        ("OUTBOXD_GC__SCHEDULE", "* * * * * *"),
        ("OUTBOXD_DEAD_LETTER_RETENTION_DAYS", "1"),
    ];
    let mut ahead = stage.spec("ahead", &env);
    ahead.clock_offset = Some("+2d".into());
    let mut behind = stage.spec("behind", &env);
    behind.clock_offset = Some("-2d".into());
    stage.launch(ahead).await?;
    stage.launch(behind).await?;
    let plan = (0..600)
        .map(|n| match n % 10 {
            3 => Planned::work(n, "flaky", 3),
            5 => Planned::work(n, "permanent", 3),
            _ => Planned::slow(n, 10, 3),
        })
        .collect();
    let produced = stage.producer(plan, 300).await?;
    stage.quiesce(Duration::from_secs(60), false).await?;
    // Let the leader's GC run a few times over the fresh dead letters.
    let mut gc_runs = 0.0;
    for _ in 0..100 {
        gc_runs = 0.0;
        for process in &stage.fleet {
            gc_runs += process.metric("outboxd_gc_runs_total").await?;
        }
        if gc_runs >= 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut outcome, observed) = stage
        .finish(
            produced,
            "2 dispatchers under libfaketime, clocks +2 days and −2 days; GC every second with 1-day retention".into(),
            false,
        )
        .await?;
    let skew_days = observed.max_clock_skew_secs / 86_400.0;
    outcome.notes.push(format!(
        "worker clocks off by up to {skew_days:.2} days; {gc_runs} GC runs swept no young dead letter"
    ));
    if skew_days < 1.9 {
        outcome.failure = Some(format!(
            "the clock skew did not take effect (max {skew_days:.2} days)"
        ));
    } else if gc_runs < 3.0 {
        outcome.failure = Some(format!("the GC ran only {gc_runs} times"));
    } else if outcome.verdict.extra_invocations > 0 {
        outcome.failure = Some(format!(
            "{} invocations beyond plan: a lease was judged by a skewed clock",
            outcome.verdict.extra_invocations
        ));
    }
    Ok(outcome)
}
