//! The fault scenarios. Each one produces under load, injects its fault,
//! waits for quiescence (the outbox is empty), stops its processes and checks
//! the recorded history.

mod nats;
mod postgres;
mod process;
mod timing;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use outbox_testkit::TestDb;
use uuid::Uuid;

use crate::history::{Commit, Observed, Planned, Verdict, create_effects_table, produce};
use crate::procs::{NatsServer, Outboxd, OutboxdSpec};

use nats::{nats_kill, nats_partition, nats_stop};
use postgres::{held_snapshot, pg_crash, pg_partition};
use process::{kill9, kill9_limited, poison, sigterm};
use timing::{clock_skew, slow};

/// The topic of the chaos handlers (`outbox-chaos-worker`).
const TOPIC: &str = "chaos.work";

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
    "kill9-limited",
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
    "held-snapshot",
];

/// Runs one scenario by name.
pub async fn run(ctx: &Ctx, name: &str) -> anyhow::Result<Outcome> {
    match name {
        "kill9" => kill9(ctx, false).await,
        "kill9-transactional" => kill9(ctx, true).await,
        "kill9-limited" => kill9_limited(ctx).await,
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
        "held-snapshot" => held_snapshot(ctx).await,
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
