//! The [`Dispatcher`]: construction, `run`, and the drain at shutdown; the
//! state its parts share.
//!
//! ```text
//!  pacer: NOTIFY while asleep,
//!         a tick while busy ──▶ claim loop ──spawn──▶ handler tasks ──Finished──▶ completer
//!                      ▲  (semaphore: at most `concurrency` rows claimed)   │
//!                      └──────────── permits return after the flush ◀───────┘
//!  heartbeat: extends the leases of running rows every `heartbeat_interval`
//! ```
//!
//! Where each part lives: the claim loop, completer and heartbeat in
//! `lease/`, transactional mode in `transactional.rs`, the pacer and its
//! vocabulary in [`crate::pacer`], running a handler and writing its outcome
//! in `outcome.rs`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_core::ClaimedEvent;
use outbox_core::model::Lease;
use outbox_core::store::outbox::{self as store, Positions};
use outbox_core::store::processes::ProcessInfo;
use sqlx::{Connection, PgPool};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use uuid::Uuid;

use crate::failure_log::FailureLog;
use crate::outcome::Finished;
use crate::subscription::ServedNow;
use crate::telemetry::TopicMetrics;
use crate::{Config, Error, Registry};

/// Retries of one topic are logged once per this window, with a count.
const RETRY_LOG_WINDOW: Duration = Duration::from_secs(10);

/// What [`Dispatcher::run_once`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Rows claimed.
    pub claimed: usize,
    /// Rows handled and deleted.
    pub completed: usize,
    /// Rows rescheduled after a failure.
    pub retried: usize,
    /// Rows rescheduled by a snooze.
    pub snoozed: usize,
    /// Rows moved to `dead_letters`.
    pub dead_lettered: usize,
    /// Outcomes refused because the lease was taken over meanwhile.
    pub fenced: usize,
}

impl BatchReport {
    pub(crate) fn add(&mut self, other: BatchReport) {
        self.claimed += other.claimed;
        self.completed += other.completed;
        self.retried += other.retried;
        self.snoozed += other.snoozed;
        self.dead_lettered += other.dead_lettered;
        self.fenced += other.fenced;
    }
}

/// What [`Dispatcher::run`] did when it stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Totals over the dispatcher's life.
    pub totals: BatchReport,
    /// Rows whose handler was still running when the grace period ended;
    /// their leases were released so another dispatcher takes them at once.
    pub released: usize,
}

/// The least time the writes after a drain get, whatever `drain_grace` is.
const WRITES_AFTER_DRAIN_AT_LEAST: Duration = Duration::from_secs(2);

pub(crate) struct Shared {
    pub(crate) pool: PgPool,
    pub(crate) registry: Registry,
    pub(crate) config: Config,
    // Rows whose handler is running, for the heartbeat and for drain.
    pub(crate) running: Mutex<HashMap<Uuid, Lease>>,
    // Wakes the claim loop: the pacer's tick, a notification, or an ordered
    // row finished.
    pub(crate) wake: Notify,
    // Rows claimed over the dispatcher's life; the pacer sleeps when it
    // stops moving.
    pub(crate) claimed_rows: AtomicU64,
    // Notifications received over the dispatcher's life, and a wake-up for
    // the pacer when one arrives (several may arrive per wake-up).
    pub(crate) notifications: AtomicU64,
    pub(crate) notified: Notify,
    // Whether the LISTEN connection is up; without it the pacer never sleeps.
    pub(crate) listening: AtomicBool,
    // Successes waiting to be deleted. A claim loop deletes them in its next
    // claim statement (one commit for both); the completer takes whatever a
    // claim loop does not pick up soon.
    pub(crate) succeeded: Mutex<Vec<Finished>>,
    // Tells the completer that `succeeded` has rows.
    pub(crate) succeeded_ready: Notify,
    // Totals over the dispatcher's life.
    pub(crate) totals: Mutex<BatchReport>,
    // Logs retries (summarised per topic) and dead letters.
    pub(crate) failures: FailureLog,
    // Counters and the handler histogram per app and topic.
    pub(crate) topic_metrics: TopicMetrics,
    // Bumped when claim loops must move their positions on before their
    // next claim (the pacer's last look before sleeping).
    pub(crate) fresh_look: AtomicU64,
    // When this process's row in `outbox_processes` was last written.
    pub(crate) row_written_at: Mutex<Option<Instant>>,
    // What the rewind task last found from every app's first row, and how
    // many times it has found something.
    pub(crate) rewound: Mutex<Positions>,
    pub(crate) rewound_generation: AtomicU64,
    // The same for the limited topics' rows, which the ordinary positions
    // pass (`LimitedFrom`).
    pub(crate) limited_rewound: Mutex<Positions>,
    pub(crate) limited_rewound_generation: AtomicU64,
    // Past the last row the process's claims took, per app, and bumped when
    // claims must start from their positions (`ClaimFrom`).
    pub(crate) claimed_past: Mutex<Positions>,
    pub(crate) walk_generation: AtomicU64,
    // The topics a claim takes, as of the last beat of `process`.
    pub(crate) served: ServedNow,
    // This process's row in `outbox_processes`.
    pub(crate) process: ProcessInfo,
}

/// Claims due rows and runs their handlers. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Shared>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("config", &self.inner.config)
            .field("registry", &self.inner.registry)
            .finish()
    }
}

impl Dispatcher {
    /// A dispatcher over `pool` with the handlers of `registry`.
    ///
    /// **Connection budget.** Besides what it borrows from `pool` (outcome
    /// writes, heartbeats, handlers' own queries), a running dispatcher opens
    /// connections of its own with `pool`'s options, outside the pool's
    /// limit: one per claim loop ([`Config::claim_loops`]), one for LISTEN,
    /// one that holds the pacer's place while it sleeps, and in transactional
    /// mode one batch keeper per claim loop. So it needs up to `loops + 2`
    /// (lease mode) or `2 × loops + 2` (transactional) connections on the server beyond
    /// `pool`'s `max_connections`; see [`Config::own_connections`].
    pub fn new(pool: PgPool, registry: Registry, config: Config) -> Result<Self, Error> {
        config.validate()?;
        let served = ServedNow::new(registry.subscription());
        let process = served.process_info(Uuid::now_v7(), &config.worker_id);
        Ok(Self {
            inner: Arc::new(Shared {
                pool,
                registry,
                config,
                running: Mutex::new(HashMap::new()),
                wake: Notify::new(),
                claimed_rows: AtomicU64::new(0),
                notifications: AtomicU64::new(0),
                notified: Notify::new(),
                listening: AtomicBool::new(false),
                succeeded: Mutex::new(Vec::new()),
                succeeded_ready: Notify::new(),
                totals: Mutex::new(BatchReport::default()),
                failures: FailureLog::new(RETRY_LOG_WINDOW),
                topic_metrics: TopicMetrics::default(),
                fresh_look: AtomicU64::new(0),
                row_written_at: Mutex::new(None),
                rewound: Mutex::new(Positions::default()),
                claimed_past: Mutex::new(Positions::default()),
                walk_generation: AtomicU64::new(0),
                rewound_generation: AtomicU64::new(0),
                limited_rewound: Mutex::new(Positions::default()),
                limited_rewound_generation: AtomicU64::new(0),
                served,
                process,
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// This process's id in `outbox_processes` (written while [`Dispatcher::run`]
    /// runs, and by [`Dispatcher::run_once`]).
    pub fn process_id(&self) -> Uuid {
        self.inner.process.id
    }

    /// Claims one batch of the topics it serves, runs it, writes the
    /// outcomes, and says what happened. Tests drive this until
    /// `claimed == 0` instead of sleeping.
    pub async fn run_once(&self) -> Result<BatchReport, Error> {
        let inner = &self.inner;
        inner.beat().await?;
        if inner.config.in_transaction {
            inner.count_abandoned().await;
            // The keeper lives for this batch only; closing it frees its lock.
            let mut keeper = None;
            let report = inner.tx_batch(&mut keeper, &Positions::default()).await;
            if let Some(keeper) = keeper {
                let _ = keeper.close().await;
            }
            return report;
        }
        let (config, limits) = (&inner.config, inner.served.limits());
        let mut rows = Vec::new();
        if !limits.topics.is_empty() {
            let mut conn = inner.pool.acquire().await?;
            for topic in limits.topics.iter().filter(|t| inner.serves(&limits, t)) {
                let want = config.batch_size.saturating_sub(rows.len() as u32);
                if want == 0 {
                    break;
                }
                let claim = store::claim_limited(
                    &mut conn,
                    topic,
                    &limits.served,
                    None,
                    &config.worker_id,
                    want,
                    config.lease,
                )
                .await?;
                rows.extend(claim.rows);
            }
        }
        let rest = config.batch_size.saturating_sub(rows.len() as u32);
        if rest > 0 {
            rows.extend(
                store::claim_served(
                    &inner.pool,
                    &inner.served.get(),
                    &config.worker_id,
                    rest,
                    config.lease,
                )
                .await?,
            );
        }
        let claimed = rows.len();
        let finished = futures::future::join_all(rows.into_iter().map(|row| {
            let inner = inner.clone();
            async move { inner.run_row(row, None).await }
        }))
        .await;
        let mut report = inner.flush(&finished).await?;
        report.claimed = claimed;
        Ok(report)
    }

    /// Runs [`Dispatcher::run_once`] until a batch claims nothing; returns the totals.
    pub async fn run_until_idle(&self) -> Result<BatchReport, Error> {
        let mut totals = BatchReport::default();
        loop {
            let report = self.run_once().await?;
            totals.add(report);
            if report.claimed == 0 {
                return Ok(totals);
            }
        }
    }

    /// Runs until `shutdown` completes, then drains: stops claiming, lets
    /// running handlers finish within `drain_grace`, releases the leases of
    /// the rest, and returns.
    pub async fn run(
        &self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<DrainReport, Error> {
        let inner = self.inner.clone();
        let config = &inner.config;
        let stop = crate::cancelled_by(shutdown);
        // Background helpers stop after the drain, not at the signal: running
        // rows keep their leases fresh while they finish.
        let helpers = CancellationToken::new();
        // Known to the others, and knowing them, before the first claim.
        if let Err(err) = inner.beat().await {
            warn!(error = %err, "could not record this process in outbox_processes; retrying every second");
        }
        let announce = tokio::spawn(inner.clone().announce(helpers.clone()));
        let listener = tokio::spawn(inner.clone().listen(helpers.clone()));
        let pacer = tokio::spawn(inner.clone().pace(helpers.clone()));
        let heartbeat = tokio::spawn(inner.clone().heartbeat(helpers.clone()));
        let rewind = tokio::spawn(inner.clone().rewind(helpers.clone()));
        let (done_tx, done_rx) = mpsc::unbounded_channel::<Finished>();
        let completer = tokio::spawn(inner.clone().complete(done_rx));

        let permits = Arc::new(Semaphore::new(config.concurrency));
        info!(worker = %config.worker_id, process = %inner.process.id, topics = ?inner.process.topics, patterns = ?inner.process.patterns, claim_loops = config.claim_loops(), "dispatcher started");
        let loops: Vec<_> = (0..config.claim_loops())
            .map(|_| {
                if config.in_transaction {
                    tokio::spawn(inner.clone().tx_loop(stop.clone()))
                } else {
                    tokio::spawn(inner.clone().claim_loop(
                        permits.clone(),
                        stop.clone(),
                        done_tx.clone(),
                    ))
                }
            })
            .collect();
        for claim_loop in loops {
            if let Err(err) = claim_loop.await {
                error!(error = %err, "claim loop failed");
            }
        }
        drop(done_tx);
        // The writes after the drain (outcomes, released leases, this
        // process's row) get `drain_grace` too, and at least
        // [`WRITES_AFTER_DRAIN_AT_LEAST`] (a grace of 0 must not drop them):
        // with PostgreSQL unreachable each would wait out the pool's timeout
        // and its retries, past what an orchestrator gives a stopping
        // process. What is not written runs again when its lease expires.
        let writes_deadline =
            tokio::time::Instant::now() + config.drain_grace.max(WRITES_AFTER_DRAIN_AT_LEAST);
        let mut completer = completer;
        match tokio::time::timeout_at(writes_deadline, &mut completer).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => error!(error = %err, "completer task failed"),
            Err(_) => {
                completer.abort();
                warn!(grace = ?config.drain_grace.max(WRITES_AFTER_DRAIN_AT_LEAST), "the last outcomes were not written in time (is PostgreSQL reachable?); their rows run again when their leases expire");
            }
        }
        let totals = inner.totals.lock().map(|t| *t).unwrap_or_default();
        let abandoned: Vec<Lease> = inner.running_drain();
        let released = if abandoned.is_empty() {
            0
        } else {
            let pool = &inner.pool;
            let history = inner.config.attempt_history;
            let released = crate::outcome::again_for_missed(
                &abandoned,
                |l| l.id,
                |leases| async move { store::release(pool, &leases, true, history).await },
            );
            match tokio::time::timeout_at(writes_deadline, released).await {
                Ok(Ok(ids)) => ids.len(),
                Ok(Err(err)) => {
                    warn!(error = %err, rows = abandoned.len(), "could not release leases; they expire by themselves");
                    0
                }
                Err(_) => {
                    warn!(
                        rows = abandoned.len(),
                        "could not release leases in time; they expire by themselves"
                    );
                    0
                }
            }
        };
        helpers.cancel();
        for mut helper in [listener, pacer, heartbeat, rewind, announce] {
            if tokio::time::timeout_at(writes_deadline, &mut helper)
                .await
                .is_err()
            {
                // The process row expires by itself, the activity counts of
                // the last seconds are lost.
                helper.abort();
            }
        }
        info!(
            claimed = totals.claimed,
            completed = totals.completed,
            retried = totals.retried,
            snoozed = totals.snoozed,
            dead_lettered = totals.dead_lettered,
            fenced = totals.fenced,
            released,
            "dispatcher stopped"
        );
        Ok(DrainReport { totals, released })
    }
}

impl Shared {
    pub(crate) fn running_insert_all(&self, rows: &[ClaimedEvent]) {
        if let Ok(mut running) = self.running.lock() {
            running.extend(rows.iter().map(|row| (row.id, row.lease())));
        }
    }

    pub(crate) fn running_remove(&self, id: Uuid) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(&id);
        }
    }

    pub(crate) fn push_succeeded(&self, mut finished: Finished) {
        finished.permit = None;
        if let Ok(mut succeeded) = self.succeeded.lock() {
            succeeded.push(finished);
        }
        self.succeeded_ready.notify_one();
    }

    pub(crate) fn take_succeeded(&self) -> Vec<Finished> {
        self.succeeded
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default()
    }

    pub(crate) fn return_succeeded(&self, finished: Vec<Finished>) {
        if finished.is_empty() {
            return;
        }
        if let Ok(mut succeeded) = self.succeeded.lock() {
            succeeded.extend(finished);
        }
        self.succeeded_ready.notify_one();
    }

    pub(crate) fn record_completed(&self, sent: usize, completed: usize) {
        let fenced = sent.saturating_sub(completed);
        if fenced > 0 {
            warn!(
                fenced,
                "completions refused: the lease was taken over (row ran too long or lost its connection)"
            );
        }
        metrics::counter!("outboxd_fenced_total").increment(fenced as u64);
        self.add_totals(BatchReport {
            claimed: sent,
            completed,
            fenced,
            ..BatchReport::default()
        });
    }

    pub(crate) fn add_totals(&self, report: BatchReport) {
        if let Ok(mut totals) = self.totals.lock() {
            totals.add(report);
        }
    }

    pub(crate) fn running_snapshot(&self) -> Vec<Lease> {
        self.running
            .lock()
            .map(|r| r.values().copied().collect())
            .unwrap_or_default()
    }

    pub(crate) fn running_drain(&self) -> Vec<Lease> {
        self.running
            .lock()
            .map(|mut r| r.drain().map(|(_, l)| l).collect())
            .unwrap_or_default()
    }
}
