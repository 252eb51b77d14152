//! The claim loop and everything around it: heartbeat, completer, drain.
//!
//! ```text
//!  pacer: NOTIFY while asleep,
//!         a tick while busy ──▶ claim loop ──spawn──▶ handler tasks ──Finished──▶ completer
//!                      ▲  (semaphore: at most `concurrency` rows claimed)   │
//!                      └──────────── permits return after the flush ◀───────┘
//!  heartbeat: extends the leases of running rows every `heartbeat_interval`
//! ```
//!
//! The pacer decides when claim loops look for rows. While rows keep coming
//! it is *busy*: it wakes a claim loop every [`BUSY_POLL`] and inserts send
//! no `NOTIFY` (see [`outbox_core::store::wake`]). Once claims come back
//! empty it *sleeps*: inserts notify, and each notification wakes a claim
//! loop. Many notifications in a short time make it busy again.
//!
//! Completions are written in batches: one `DELETE` for every success the
//! completer has in hand, one `UPDATE` for every retry, one statement for
//! every dead letter.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use outbox_core::ClaimedEvent;
use outbox_core::model::Lease;
use outbox_core::store::listen::{Heard, Listener, reconnect_pause};
use outbox_core::store::outbox::{self as store, Reschedule, ToDeadLetter};
use outbox_core::store::wake;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use crate::failure_log::{FailureLog, RowFacts};
use crate::telemetry::{TopicHandles, TopicMetrics};
use uuid::Uuid;

use crate::{ClaimTx, Error, Event, HandlerError, Registry, RetryPolicy};

/// Retries of one topic are logged once per this window, with a count.
const RETRY_LOG_WINDOW: Duration = Duration::from_secs(10);

pub use outbox_core::store::invocations::NO_HANDLER;
/// The channel dispatchers LISTEN on; the outbox insert trigger notifies it
/// while some dispatcher sleeps.
pub const NOTIFY_CHANNEL: &str = outbox_core::store::wake::CHANNEL;

/// How often a busy dispatcher looks for new rows: at most this long passes
/// between a commit and the claim that sees it, at a cost of one claim per
/// tick (an empty claim costs about 0.1 ms of server time).
pub const BUSY_POLL: Duration = Duration::from_millis(1);

/// A busy dispatcher sleeps once its claims have found nothing for this long
/// (a gap that a steady 250 commits a second practically never leaves, so
/// the two thresholds do not flap against each other).
const BUSY_IDLE: Duration = Duration::from_millis(32);

/// A sleeping dispatcher turns busy when this many notifications arrive
/// within [`BUSY_WINDOW`] (about 250 inserting commits a second): polling
/// then costs the database less than the notifications, which make those
/// commits wait for one another.
const BUSY_NOTIFICATIONS: u32 = 8;
const BUSY_WINDOW: Duration = Duration::from_millis(32);

/// Dispatcher settings. [`Config::default`] is a sane start; [`Config::validate`]
/// checks the relations between them.
#[derive(Debug, Clone)]
pub struct Config {
    /// Written to `locked_by`, so operators can tell which process holds a row.
    pub worker_id: String,
    /// Most rows claimed by one statement.
    pub batch_size: u32,
    /// Most rows claimed and not yet completed at once (bounds handler concurrency).
    pub concurrency: usize,
    /// Claim loops running side by side, so one claim's commit overlaps the next.
    pub claimers: usize,
    /// How often to look for due rows when no notification arrives (delayed
    /// rows, retries, missed notifications).
    pub poll_interval: Duration,
    /// How long a claim holds a row; a crashed worker's rows are due again after it.
    pub lease: Duration,
    /// A handler running longer than this fails the attempt. Shorter than
    /// `lease` when the heartbeat is off; with it on, the heartbeat keeps a
    /// long handler's lease alive.
    pub handler_timeout: Duration,
    /// How often running rows' leases are extended; shorter than `lease`.
    /// Zero turns the heartbeat off.
    pub heartbeat_interval: Duration,
    /// On shutdown, how long running handlers may take before their rows are released.
    pub drain_grace: Duration,
    /// Backoff and attempt limit.
    pub retry: RetryPolicy,
    /// Rows deeper in a trigger chain than this are dead-lettered, not run.
    pub max_trigger_depth: u32,
    /// Transactional mode: each claim loop deletes a batch of rows in a
    /// transaction, runs their handlers one after another inside it (see
    /// [`crate::Event::claim_tx`]) and commits; a failure rolls the batch back
    /// and its rows are run again one per transaction. One write per row
    /// instead of a lease and a delete. A process that dies mid-batch still
    /// counts an attempt for the batch's rows (see
    /// [`outbox_core::store::outbox::open_tx_batch`]).
    /// Rows with a synchronous caller and dead-letter-trigger rows are left to
    /// lease-mode dispatchers.
    pub in_transaction: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            worker_id: default_worker_id(),
            batch_size: 500,
            concurrency: 2048,
            claimers: 3,
            poll_interval: Duration::from_secs(1),
            lease: Duration::from_secs(30),
            handler_timeout: Duration::from_secs(20),
            heartbeat_interval: Duration::from_secs(10),
            drain_grace: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            max_trigger_depth: 8,
            in_transaction: false,
        }
    }
}

/// `<hostname>-<pid>-<random>`: unique per process, readable in `locked_by`.
pub fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "outboxd".to_owned());
    format!("{host}-{}-{:04x}", std::process::id(), fastrand::u16(..))
}

impl Config {
    /// The connections a running dispatcher opens outside its pool (see
    /// [`Dispatcher::new`]).
    pub fn own_connections(&self) -> usize {
        let keepers = if self.in_transaction {
            self.claimers
        } else {
            0
        };
        self.claimers + keepers + 2
    }

    /// Checks the relations the dispatcher relies on; a refusal names the
    /// setting and its range.
    pub fn validate(&self) -> Result<(), Error> {
        let fail = |m: String| Err(Error::Config(m));
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return fail(format!(
                "batch_size {} is outside 1..=10000",
                self.batch_size
            ));
        }
        if self.concurrency == 0 {
            return fail("concurrency must be at least 1".into());
        }
        if self.in_transaction && self.concurrency != Config::default().concurrency {
            return fail(format!(
                "concurrency {} applies to lease mode only: in transactional mode each claim loop runs its batch's rows one after another; set claimers (and batch_size) instead",
                self.concurrency
            ));
        }
        if self.claimers == 0 || self.claimers > 16 {
            return fail(format!("claimers {} is outside 1..=16", self.claimers));
        }
        if self.heartbeat_interval.is_zero() && self.handler_timeout >= self.lease {
            return fail(format!(
                "handler_timeout ({:?}) must be shorter than lease ({:?}) when the heartbeat is off",
                self.handler_timeout, self.lease
            ));
        }
        if self.heartbeat_interval >= self.lease {
            return fail(format!(
                "heartbeat_interval ({:?}) must be shorter than lease ({:?})",
                self.heartbeat_interval, self.lease
            ));
        }
        if self.retry.max_attempts == 0 {
            return fail("retry.max_attempts must be at least 1".into());
        }
        Ok(())
    }
}

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
    fn add(&mut self, other: BatchReport) {
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

/// The result of running one claimed row.
#[derive(Debug)]
enum Outcome {
    Done,
    Retry {
        delay: Duration,
        error: String,
    },
    Snooze(Duration),
    ToDeadLetter {
        error: String,
    },
    /// A synchronous invocation's answer: delivered to its caller, never retried.
    Reply {
        app_id: Uuid,
        reply_to: String,
        topic: String,
        ok: bool,
        result: serde_json::Value,
        started_at: chrono::DateTime<chrono::Utc>,
    },
}

struct Finished {
    lease: Lease,
    outcome: Outcome,
    ordered: bool,
    // Only for failures (what their log lines say); successes stay cheap.
    facts: Option<Box<RowFacts>>,
    // Bounds the rows a dispatcher holds. A failure keeps its permit until the
    // outcome is written; a success gives it back as soon as the handler
    // returns, since the next claim statement deletes it anyway.
    permit: Option<OwnedSemaphorePermit>,
}

struct Inner {
    pool: PgPool,
    registry: Registry,
    config: Config,
    // Rows whose handler is running, for the heartbeat and for drain.
    running: Mutex<HashMap<Uuid, Lease>>,
    // Wakes the claim loop: the pacer's tick, a notification, or an ordered
    // row finished.
    wake: Notify,
    // Rows claimed over the dispatcher's life; the pacer sleeps when it
    // stops moving.
    claimed_rows: AtomicU64,
    // Notifications received over the dispatcher's life, and a wake-up for
    // the pacer when one arrives (several may arrive per wake-up).
    notifications: AtomicU64,
    notified: Notify,
    // Whether the LISTEN connection is up; without it the pacer never sleeps.
    listening: AtomicBool,
    // Successes waiting to be deleted. A claim loop deletes them in its next
    // claim statement (one commit for both); the completer takes whatever a
    // claim loop does not pick up soon.
    succeeded: Mutex<Vec<Finished>>,
    // Tells the completer that `succeeded` has rows.
    succeeded_ready: Notify,
    // Totals over the dispatcher's life.
    totals: Mutex<BatchReport>,
    // Logs retries (summarised per topic) and dead letters.
    failures: FailureLog,
    // Counters and the handler histogram per app and topic.
    topic_metrics: TopicMetrics,
}

/// Claims due rows and runs their handlers. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
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
    /// limit: one per claim loop (`claimers`), one for LISTEN, one that holds
    /// the pacer's place while it sleeps, and in transactional mode one batch
    /// keeper per claim loop. So it needs up to `claimers + 2` (lease mode)
    /// or `2 × claimers + 2` (transactional) connections on the server beyond
    /// `pool`'s `max_connections`; see [`Config::own_connections`].
    pub fn new(pool: PgPool, registry: Registry, config: Config) -> Result<Self, Error> {
        config.validate()?;
        Ok(Self {
            inner: Arc::new(Inner {
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
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Claims one batch, runs it, writes the outcomes, and says what happened.
    /// Tests drive this until `claimed == 0` instead of sleeping.
    pub async fn run_once(&self) -> Result<BatchReport, Error> {
        let inner = &self.inner;
        if inner.config.in_transaction {
            inner.count_abandoned().await;
            // The keeper lives for this batch only; closing it frees its lock.
            let mut keeper = None;
            let report = inner.tx_batch(&mut keeper).await;
            if let Some(keeper) = keeper {
                let _ = keeper.close().await;
            }
            return report;
        }
        let rows = store::claim(
            &inner.pool,
            &inner.config.worker_id,
            inner.config.batch_size,
            inner.config.lease,
        )
        .await?;
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
        let stop = CancellationToken::new();
        tokio::spawn({
            let stop = stop.clone();
            async move {
                tokio::select! {
                    () = shutdown => stop.cancel(),
                    () = stop.cancelled() => {}
                }
            }
        });
        // Background helpers stop after the drain, not at the signal: running
        // rows keep their leases fresh while they finish.
        let helpers = CancellationToken::new();
        let listener = tokio::spawn(inner.clone().listen(helpers.clone()));
        let pacer = tokio::spawn(inner.clone().pace(helpers.clone()));
        let heartbeat = tokio::spawn(inner.clone().heartbeat(helpers.clone()));
        let (done_tx, done_rx) = mpsc::unbounded_channel::<Finished>();
        let completer = tokio::spawn(inner.clone().complete(done_rx));

        let permits = Arc::new(Semaphore::new(config.concurrency));
        info!(worker = %config.worker_id, topics = ?inner.registry.topics(), claimers = config.claimers, "dispatcher started");
        let loops: Vec<_> = (0..config.claimers)
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
        if let Err(err) = completer.await {
            error!(error = %err, "completer task failed");
        }
        let totals = inner.totals.lock().map(|t| *t).unwrap_or_default();
        let abandoned: Vec<Lease> = inner.running_drain();
        let released = if abandoned.is_empty() {
            0
        } else {
            match store::release(&inner.pool, &abandoned, true).await {
                Ok(ids) => ids.len(),
                Err(err) => {
                    warn!(error = %err, rows = abandoned.len(), "could not release leases; they expire by themselves");
                    0
                }
            }
        };
        helpers.cancel();
        let _ = listener.await;
        let _ = pacer.await;
        let _ = heartbeat.await;
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

impl Inner {
    fn running_insert_all(&self, rows: &[ClaimedEvent]) {
        if let Ok(mut running) = self.running.lock() {
            running.extend(rows.iter().map(|row| (row.id, row.lease())));
        }
    }

    fn running_remove(&self, id: Uuid) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(&id);
        }
    }

    fn push_succeeded(&self, mut finished: Finished) {
        finished.permit = None;
        if let Ok(mut succeeded) = self.succeeded.lock() {
            succeeded.push(finished);
        }
        self.succeeded_ready.notify_one();
    }

    fn take_succeeded(&self) -> Vec<Finished> {
        self.succeeded
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default()
    }

    fn return_succeeded(&self, finished: Vec<Finished>) {
        if finished.is_empty() {
            return;
        }
        if let Ok(mut succeeded) = self.succeeded.lock() {
            succeeded.extend(finished);
        }
        self.succeeded_ready.notify_one();
    }

    fn record_completed(&self, sent: usize, completed: usize) {
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

    fn add_totals(&self, report: BatchReport) {
        if let Ok(mut totals) = self.totals.lock() {
            totals.add(report);
        }
    }

    fn running_snapshot(&self) -> Vec<Lease> {
        self.running
            .lock()
            .map(|r| r.values().copied().collect())
            .unwrap_or_default()
    }

    fn running_drain(&self) -> Vec<Lease> {
        self.running
            .lock()
            .map(|mut r| r.drain().map(|(_, l)| l).collect())
            .unwrap_or_default()
    }

    /// Claims rows while permits are free and hands each to a task; on stop,
    /// waits up to `drain_grace` for its tasks and aborts the rest (their
    /// rows stay in `running` and are released by the caller).
    async fn claim_loop(
        self: Arc<Self>,
        permits: Arc<Semaphore>,
        stop: CancellationToken,
        done_tx: mpsc::UnboundedSender<Finished>,
    ) {
        let config = &self.config;
        let mut tasks = JoinSet::new();
        let mut claim_errors = 0u32;
        let mut claim_conn: Option<PgConnection> = None;
        loop {
            let first = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let mut held = vec![first];
            while held.len() < config.batch_size as usize {
                match permits.clone().try_acquire_owned() {
                    Ok(p) => held.push(p),
                    Err(_) => break,
                }
            }
            let wanted = held.len();
            let succeeded = self.take_succeeded();
            let leases: Vec<Lease> = succeeded.iter().map(|f| f.lease).collect();
            let claimed = match self.claim_connection(&mut claim_conn).await {
                Ok(conn) => {
                    store::complete_and_claim(
                        conn,
                        &leases,
                        &config.worker_id,
                        wanted as u32,
                        config.lease,
                    )
                    .await
                }
                Err(err) => Err(err.into()),
            };
            if claimed.is_err() {
                // The next round connects afresh rather than reuse a
                // connection in an unknown state.
                claim_conn = None;
            }
            let rows = match claimed {
                Ok((completed, rows)) => {
                    claim_errors = 0;
                    self.record_completed(leases.len(), completed);
                    rows
                }
                Err(err) => {
                    self.return_succeeded(succeeded);
                    claim_errors = claim_errors.saturating_add(1);
                    let pause = reconnect_pause(claim_errors);
                    warn!(error = %err, ?pause, "claim failed; backing off");
                    drop(held);
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(pause) => continue,
                    }
                }
            };
            let got = rows.len();
            self.claimed_rows.fetch_add(got as u64, Ordering::Relaxed);
            self.running_insert_all(&rows);
            let mut rows = rows.into_iter();
            loop {
                let chunk: Vec<_> = rows
                    .by_ref()
                    .take(ROWS_PER_TASK)
                    .map(|row| (row, held.pop()))
                    .collect();
                if chunk.is_empty() {
                    break;
                }
                let inner = self.clone();
                let done_tx = done_tx.clone();
                // Each row's outcome is handed on as soon as it is known, not
                // when the rest of its chunk is.
                tasks.spawn(async move {
                    let mut running: FuturesUnordered<_> = chunk
                        .into_iter()
                        .map(|(row, permit)| inner.run_row(row, permit))
                        .collect();
                    while let Some(finished) = running.next().await {
                        inner.running_remove(finished.lease.id);
                        if matches!(finished.outcome, Outcome::Done) && !finished.ordered {
                            inner.push_succeeded(finished);
                        } else {
                            // The completer only stops after every sender is gone.
                            let _ = done_tx.send(finished);
                        }
                    }
                });
            }
            drop(held);
            while tasks.try_join_next().is_some() {}
            if got < wanted {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(config.poll_interval) => {}
                }
            }
        }
        if let Some(conn) = claim_conn.take() {
            let _ = conn.close().await;
        }
        debug!(running = tasks.len(), grace = ?config.drain_grace, "claim loop draining");
        let deadline = tokio::time::Instant::now() + config.drain_grace;
        while !tasks.is_empty() {
            if tokio::time::timeout_at(deadline, tasks.join_next())
                .await
                .is_err()
            {
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
            }
        }
    }

    /// Transactional mode: take a batch, run it in its transaction, commit;
    /// repeat until stopped. A stop lets the batch in hand finish.
    async fn tx_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut errors = 0u32;
        let mut keeper = None;
        let mut abandoned_checked: Option<Instant> = None;
        while !stop.is_cancelled() {
            if abandoned_checked.is_none_or(|at| at.elapsed() >= ABANDONED_CHECK_INTERVAL) {
                abandoned_checked = Some(Instant::now());
                self.count_abandoned().await;
            }
            match self.tx_batch(&mut keeper).await {
                Ok(report) => {
                    errors = 0;
                    if report.claimed < self.config.batch_size as usize {
                        tokio::select! {
                            biased;
                            () = stop.cancelled() => break,
                            () = self.wake.notified() => {}
                            () = tokio::time::sleep(self.config.poll_interval) => {}
                        }
                    }
                }
                Err(err) => {
                    errors = errors.saturating_add(1);
                    let pause = reconnect_pause(errors);
                    warn!(error = %err, ?pause, "transactional batch failed; backing off");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
        if let Some(keeper) = keeper {
            let _ = keeper.close().await;
        }
    }

    /// One transactional batch: delete the rows, run their handlers in the
    /// same transaction, commit — one write per row.
    ///
    /// When a handler fails, the batch rolls back (nothing of it happened)
    /// and its rows are locked again at once in a new transaction, where each
    /// handler runs inside a savepoint: a failure then undoes only its own
    /// writes and records its attempt in that transaction, and the rows that
    /// succeed are deleted when it commits. The failed row's outcome is kept
    /// from the first run; the rows before it run a second time (their first
    /// writes were rolled back). A row another claim takes in the moment
    /// between the two transactions is simply run there.
    ///
    /// Before any handler runs, the batch's events are recorded through
    /// `keeper` (see [`store::open_tx_batch`]), so a worker that dies
    /// mid-batch still counts an attempt for each of them.
    async fn tx_batch(&self, keeper: &mut Option<PgConnection>) -> Result<BatchReport, Error> {
        let mut tx = self.pool.begin().await?;
        let rows = store::take(&mut tx, self.config.batch_size).await?;
        let taken = rows.len();
        if taken == 0 {
            tx.commit().await?;
            return Ok(BatchReport::default());
        }
        self.claimed_rows.fetch_add(taken as u64, Ordering::Relaxed);
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let lock_key = fastrand::i64(..);
        self.open_tx_batch(keeper, lock_key, &ids).await?;
        let (mut tx, first_failure) = self.run_batch(tx, &rows).await?;
        let Some((failed_at, failed_outcome)) = first_failure else {
            store::close_tx_batch(&mut tx, lock_key).await?;
            tx.commit().await?;
            self.record_completed(taken, taken);
            return Ok(BatchReport {
                claimed: taken,
                completed: taken,
                ..BatchReport::default()
            });
        };
        tx.rollback().await?;
        let failed_id = rows[failed_at].id;
        let mut tx = self.pool.begin().await?;
        store::close_tx_batch(&mut tx, lock_key).await?;
        let locked = store::lock_ids(&mut tx, &ids).await?;
        let mut report = BatchReport {
            claimed: taken,
            ..BatchReport::default()
        };
        let mut done = Vec::new();
        let mut failed_outcome = Some(failed_outcome);
        for row in &locked {
            let outcome = if row.id == failed_id {
                failed_outcome.take().unwrap_or(Outcome::Done)
            } else {
                outbox_core::store::tx_batch::savepoint(&mut tx).await?;
                let shared = ClaimTx::new(tx);
                let outcome = self
                    .run_handler(taken_attempt(row), Some(shared.clone()))
                    .await;
                tx = shared
                    .finish()
                    .await
                    .ok_or(Error::Internal("the claim transaction vanished"))?;
                if !matches!(outcome, Outcome::Done) {
                    outbox_core::store::tx_batch::rollback_to_savepoint(&mut tx).await?;
                }
                outbox_core::store::tx_batch::release_savepoint(&mut tx).await?;
                outcome
            };
            if matches!(outcome, Outcome::Done) {
                done.push(row.id);
                report.completed += 1;
            } else {
                let facts = RowFacts::of(row, self.config.retry.max_attempts);
                let (retried, dead_lettered) =
                    self.record_tx_failure(&mut tx, &facts, outcome).await?;
                report.retried += retried;
                report.dead_lettered += dead_lettered;
            }
        }
        store::delete_locked(&mut tx, &done).await?;
        tx.commit().await?;
        self.record_completed(report.completed, report.completed);
        self.add_totals(BatchReport {
            retried: report.retried,
            dead_lettered: report.dead_lettered,
            ..BatchReport::default()
        });
        Ok(report)
    }

    /// The claim loop's own connection (see [`store::claim_connect_options`]),
    /// connected first if needed.
    async fn claim_connection<'c>(
        &self,
        conn: &'c mut Option<PgConnection>,
    ) -> Result<&'c mut PgConnection, sqlx::Error> {
        let connected = match conn.take() {
            Some(connected) => connected,
            None => {
                let options = store::claim_connect_options(&self.pool.connect_options());
                PgConnection::connect_with(&options).await?
            }
        };
        Ok(conn.insert(connected))
    }

    /// Records a transactional batch's events through the loop's keeper
    /// connection, connecting it first if needed (a broken one is replaced).
    async fn open_tx_batch(
        &self,
        keeper: &mut Option<PgConnection>,
        lock_key: i64,
        ids: &[Uuid],
    ) -> Result<(), Error> {
        let mut conn = match keeper.take() {
            Some(conn) => conn,
            None => {
                let mut conn = PgConnection::connect_with(&self.pool.connect_options()).await?;
                outbox_core::store::tx_batch::commit_asynchronously(&mut conn).await?;
                conn
            }
        };
        store::open_tx_batch(&mut conn, lock_key, &self.config.worker_id, ids).await?;
        // Kept only after a success: a connection that failed is dropped,
        // which also frees any lock it held.
        *keeper = Some(conn);
        Ok(())
    }

    /// Counts an attempt for the events of transactional batches whose
    /// worker died, in a transaction of its own.
    async fn count_abandoned(&self) {
        let counted = async {
            let mut tx = self.pool.begin().await?;
            let counted = store::count_abandoned_tx_batches(&mut tx).await?;
            tx.commit().await?;
            Ok::<_, Error>(counted)
        }
        .await;
        match counted {
            Ok(0) => {}
            Ok(events) => warn!(
                events,
                "a worker died during a transactional batch; its events' attempt was counted"
            ),
            Err(err) => warn!(error = %err, "counting abandoned transactional batches failed"),
        }
    }

    /// Runs the handlers of `rows` one after another in `tx` until one does
    /// not succeed; returns the transaction and that row's index and outcome.
    async fn run_batch(
        &self,
        tx: sqlx::Transaction<'static, sqlx::Postgres>,
        rows: &[ClaimedEvent],
    ) -> Result<
        (
            sqlx::Transaction<'static, sqlx::Postgres>,
            Option<(usize, Outcome)>,
        ),
        Error,
    > {
        let shared = ClaimTx::new(tx);
        let mut failure = None;
        for (i, row) in rows.iter().enumerate() {
            let outcome = self
                .run_handler(taken_attempt(row), Some(shared.clone()))
                .await;
            if !matches!(outcome, Outcome::Done) {
                failure = Some((i, outcome));
                break;
            }
        }
        let tx = shared
            .finish()
            .await
            .ok_or(Error::Internal("the claim transaction vanished"))?;
        Ok((tx, failure))
    }

    /// Records a failed transactional attempt in the batch's transaction:
    /// counts it (a snooze does not) and reschedules the row, or moves it to
    /// `dead_letters`. Returns (retried, dead-lettered).
    async fn record_tx_failure(
        &self,
        tx: &mut sqlx::PgConnection,
        facts: &RowFacts,
        outcome: Outcome,
    ) -> Result<(usize, usize), Error> {
        let id = facts.id;
        let (delay, count, error, bury) = match outcome {
            Outcome::Retry { delay, error } => (delay, true, Some(error), None),
            Outcome::Snooze(delay) => (delay, false, None, None),
            Outcome::ToDeadLetter { error } => {
                (Duration::ZERO, true, Some(error.clone()), Some(error))
            }
            Outcome::Done | Outcome::Reply { .. } => (Duration::ZERO, false, None, None),
        };
        let token =
            store::record_failed_attempt(&mut *tx, id, delay, count, error.as_deref()).await?;
        Ok(match (bury, token) {
            (Some(error), Some(token)) => {
                let moved = store::dead_letter(
                    tx,
                    &[ToDeadLetter {
                        lease: Lease { id, token },
                        error: error.clone(),
                        handler: None,
                    }],
                )
                .await?;
                if !moved.is_empty() {
                    self.failures.dead_lettered(facts, &error);
                }
                (0, moved.len())
            }
            (None, Some(_)) if count => {
                self.failures
                    .retry_scheduled(facts, error.as_deref().unwrap_or_default(), delay);
                (1, 0)
            }
            _ => (0, 0),
        })
    }

    /// Runs one claimed row and decides its outcome. Never fails: every
    /// problem, panics included, becomes an outcome.
    async fn run_row(&self, row: ClaimedEvent, permit: Option<OwnedSemaphorePermit>) -> Finished {
        let lease = row.lease();
        let ordered = row.ordering_key.is_some();
        let span = tracing::info_span!("outbox.dispatch", id = %row.id, topic = %row.topic,
            attempt = row.attempt_count, correlation_id = tracing::field::Empty);
        // Only rows that carry a correlation id get the field (no empty ones).
        if let Some(correlation) = row.headers.get("correlation-id").and_then(|v| v.as_str()) {
            span.record("correlation_id", correlation);
        }
        let facts = RowFacts::of(&row, self.config.retry.max_attempts);
        let outcome = self.run_handler(row, None).instrument(span).await;
        let facts = matches!(
            outcome,
            Outcome::Retry { .. } | Outcome::ToDeadLetter { .. }
        )
        .then(|| Box::new(facts));
        Finished {
            lease,
            outcome,
            ordered,
            facts,
            permit,
        }
    }

    /// Runs a row ([`Inner::run_handler_unmetered`]) and counts the attempt and
    /// its outcome under the row's app and topic.
    async fn run_handler(&self, row: ClaimedEvent, claim_tx: Option<ClaimTx>) -> Outcome {
        let meter = self
            .topic_metrics
            .of(&self.pool, row.app_id, &row.topic)
            .await;
        meter.claimed.increment(1);
        let outcome = self.run_handler_unmetered(row, claim_tx, &meter).await;
        match &outcome {
            Outcome::Done | Outcome::Reply { ok: true, .. } => meter.completed.increment(1),
            Outcome::Retry { .. } => meter.retried.increment(1),
            Outcome::ToDeadLetter { .. } => meter.dead_lettered.increment(1),
            Outcome::Snooze(_) | Outcome::Reply { ok: false, .. } => {}
        }
        outcome
    }

    async fn run_handler_unmetered(
        &self,
        row: ClaimedEvent,
        claim_tx: Option<ClaimTx>,
        meter: &TopicHandles,
    ) -> Outcome {
        let retry = &self.config.retry;
        let max = row.max_attempts.unwrap_or(retry.max_attempts as i32);
        if row.attempt_count > max {
            return Outcome::ToDeadLetter {
                error: format!(
                    "attempts exhausted: attempt {} of {max} was lost with its worker (it died, or its lease expired)",
                    row.attempt_count - 1
                ),
            };
        }
        if row.depth > self.config.max_trigger_depth as i32 {
            return Outcome::ToDeadLetter {
                error: format!(
                    "trigger chain depth {} exceeds max_trigger_depth {}; not run (a trigger loop?)",
                    row.depth, self.config.max_trigger_depth
                ),
            };
        }
        // Trigger work runs with the rights of the principal that registered
        // the trigger; a principal that lost them gets a dead letter, not a run.
        if row.trigger_id.is_some()
            && let Some(principal) = row.registered_by_principal.as_deref()
        {
            match outbox_core::store::principals::may_run_triggers(
                &self.pool, row.app_id, principal,
            )
            .await
            {
                Ok(true) => {}
                Ok(false) => {
                    return Outcome::ToDeadLetter {
                        error: format!(
                            "principal {principal} may no longer run this app's triggers (needs the app's admin role); not run"
                        ),
                    };
                }
                Err(err) => {
                    return Outcome::Retry {
                        delay: self.config.retry.backoff(row.attempt_count.max(1) as u32),
                        error: format!("checking the principal's rights failed: {err}"),
                    };
                }
            }
        }
        let failed = |error: String| {
            if let Some(reply_to) = row.reply_to.clone() {
                // A synchronous caller gets the error at once; no retries.
                return Outcome::Reply {
                    app_id: row.app_id,
                    reply_to,
                    topic: row.topic.clone(),
                    ok: false,
                    result: serde_json::json!({ "error": error }),
                    started_at: chrono::Utc::now(),
                };
            }
            if retry.has_attempts_left(row.attempt_count, row.max_attempts) {
                Outcome::Retry {
                    delay: retry.backoff(row.attempt_count.max(1) as u32),
                    error,
                }
            } else {
                Outcome::ToDeadLetter {
                    error: format!("{error} (attempt {} of {max})", row.attempt_count),
                }
            }
        };
        let Some(handler) = self.registry.get(&row.topic) else {
            let error = format!("no handler registered for topic {:?}", row.topic);
            if let Some(reply_to) = row.reply_to.clone() {
                // The caller learns that nobody serves the topic, not that a handler failed.
                return Outcome::Reply {
                    app_id: row.app_id,
                    reply_to,
                    topic: row.topic.clone(),
                    ok: false,
                    result: serde_json::json!({ "error": error, "code": NO_HANDLER }),
                    started_at: chrono::Utc::now(),
                };
            }
            return failed(error);
        };
        let mut event = Event::from_claimed(&row, max);
        event.claim_tx = claim_tx;
        let reply = event.reply.clone();
        let started = Instant::now();
        let started_at = chrono::Utc::now();
        let run = AssertUnwindSafe(handler.handle(event)).catch_unwind();
        let result = tokio::time::timeout(self.config.handler_timeout, run).await;
        meter
            .handler_duration
            .record(started.elapsed().as_secs_f64());
        if let Some(reply_to) = row.reply_to.clone() {
            // A synchronous caller waits: answer it, success or not; no retries.
            let (ok, result) = match result {
                Ok(Ok(Ok(()))) => (true, reply.get().unwrap_or(serde_json::Value::Null)),
                Ok(Ok(Err(err))) => (false, serde_json::json!({ "error": err.to_string() })),
                Ok(Err(_)) => (false, serde_json::json!({ "error": "handler panicked" })),
                Err(_) => (
                    false,
                    serde_json::json!({ "error": format!("handler timed out after {:?}", self.config.handler_timeout) }),
                ),
            };
            return Outcome::Reply {
                app_id: row.app_id,
                reply_to,
                topic: row.topic.clone(),
                ok,
                result,
                started_at,
            };
        }
        match result {
            Ok(Ok(Ok(()))) => Outcome::Done,
            Ok(Ok(Err(HandlerError::Retry(error)))) => failed(error),
            Ok(Ok(Err(HandlerError::Permanent(error)))) => Outcome::ToDeadLetter {
                error: format!("permanent: {error}"),
            },
            Ok(Ok(Err(HandlerError::Snooze(delay)))) => Outcome::Snooze(delay),
            Ok(Err(panic)) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".to_owned());
                failed(format!("handler panicked: {message}"))
            }
            Err(_) => failed(format!(
                "handler timed out after {:?}",
                self.config.handler_timeout
            )),
        }
    }

    /// Writes a set of outcomes: one statement per kind.
    async fn flush(&self, finished: &[Finished]) -> Result<BatchReport, Error> {
        let mut done = Vec::new();
        let mut later = Vec::new();
        let mut buried = Vec::new();
        let mut replies = Vec::new();
        let mut snoozed = 0;
        for f in finished {
            match &f.outcome {
                Outcome::Done => done.push(f.lease),
                Outcome::Retry { delay, error } => later.push(Reschedule {
                    lease: f.lease,
                    delay: *delay,
                    error: Some(error.clone()),
                    refund_attempt: false,
                }),
                Outcome::Snooze(delay) => {
                    snoozed += 1;
                    later.push(Reschedule {
                        lease: f.lease,
                        delay: *delay,
                        error: None,
                        refund_attempt: true,
                    })
                }
                Outcome::ToDeadLetter { error } => buried.push(ToDeadLetter {
                    lease: f.lease,
                    error: error.clone(),
                    handler: None,
                }),
                Outcome::Reply { .. } => replies.push(f),
            }
        }
        let mut answered = 0;
        for f in replies {
            if let Outcome::Reply {
                app_id,
                reply_to,
                topic,
                ok,
                result,
                started_at,
            } = &f.outcome
            {
                let mut tx = self.pool.begin().await?;
                if !store::complete(&mut *tx, &[f.lease]).await?.is_empty() {
                    let resolution = outbox_core::store::invocations::Resolution {
                        outbox_id: f.lease.id,
                        app_id: *app_id,
                        reply_to: reply_to.clone(),
                        topic: topic.clone(),
                        ok: *ok,
                        result: result.clone(),
                        started_at: *started_at,
                    };
                    if !outbox_core::store::invocations::resolve(&mut tx, &resolution).await? {
                        metrics::counter!("outboxd_abandoned_executions_total").increment(1);
                    }
                    answered += 1;
                }
                tx.commit().await?;
            }
        }
        let completed = store::complete(&self.pool, &done).await?.len() + answered;
        let rescheduled_ids = store::reschedule(&self.pool, &later).await?;
        let rescheduled = rescheduled_ids.len();
        let dead_lettered_ids = if buried.is_empty() {
            Vec::new()
        } else {
            let mut conn = self.pool.acquire().await?;
            store::dead_letter(&mut conn, &buried).await?
        };
        let dead_lettered = dead_lettered_ids.len();
        self.log_failures(finished, &rescheduled_ids, &dead_lettered_ids);
        let expected = finished.len();
        let fenced = expected - completed - rescheduled - dead_lettered;
        if fenced > 0 {
            warn!(
                fenced,
                "outcomes refused: the lease was taken over (row ran too long or lost its connection)"
            );
        }
        metrics::counter!("outboxd_fenced_total").increment(fenced as u64);
        if finished.iter().any(|f| f.ordered) {
            // The next row of the key is claimable now; do not wait for the poll.
            self.wake.notify_one();
        }
        Ok(BatchReport {
            claimed: 0,
            completed,
            retried: rescheduled.saturating_sub(snoozed),
            snoozed: snoozed.min(rescheduled),
            dead_lettered,
            fenced,
        })
    }

    /// Logs the failures that were written (a fenced outcome changed nothing,
    /// so it is not logged as a retry or a dead letter).
    fn log_failures(&self, finished: &[Finished], rescheduled: &[Uuid], dead_lettered: &[Uuid]) {
        for f in finished {
            let Some(facts) = &f.facts else { continue };
            match &f.outcome {
                Outcome::Retry { delay, error } if rescheduled.contains(&f.lease.id) => {
                    self.failures.retry_scheduled(facts, error, *delay);
                }
                Outcome::ToDeadLetter { error } if dead_lettered.contains(&f.lease.id) => {
                    self.failures.dead_lettered(facts, error);
                }
                _ => {}
            }
        }
    }

    /// Writes outcomes as they arrive, batching whatever is waiting: failures
    /// from the channel, and successes no claim loop picked up within a moment.
    async fn complete(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Finished>) {
        let mut batch = Vec::new();
        // Outcomes of one claimed batch arrive within moments of each other:
        // wait briefly so they share one statement (one commit).
        let linger = Duration::from_millis(1);
        // A busy claim loop deletes successes with its next claim; give it
        // this long before writing them separately.
        let success_linger = Duration::from_millis(5);
        let target = self.config.batch_size as usize;
        loop {
            tokio::select! {
                received = rx.recv_many(&mut batch, 4096) => {
                    if received == 0 {
                        break;
                    }
                    let deadline = tokio::time::Instant::now() + linger;
                    while batch.len() < target {
                        match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, 4096)).await {
                            Ok(n) if n > 0 => {}
                            _ => break,
                        }
                    }
                }
                () = self.succeeded_ready.notified() => {
                    tokio::time::sleep(success_linger).await;
                    batch.extend(self.take_succeeded());
                }
            }
            self.flush_with_retries(&batch).await;
            // Dropping the batch returns its permits to the claim loops.
            batch.clear();
        }
        batch.extend(self.take_succeeded());
        self.flush_with_retries(&batch).await;
    }

    async fn flush_with_retries(&self, batch: &[Finished]) {
        if batch.is_empty() {
            return;
        }
        let mut tries = 0u32;
        loop {
            match self.flush(batch).await {
                Ok(report) => {
                    self.add_totals(BatchReport {
                        claimed: batch.len(),
                        ..report
                    });
                    return;
                }
                Err(err) if tries < 5 => {
                    tries += 1;
                    let pause = reconnect_pause(tries);
                    warn!(error = %err, rows = batch.len(), ?pause, "writing outcomes failed; retrying");
                    tokio::time::sleep(pause).await;
                }
                Err(err) => {
                    error!(error = %err, rows = batch.len(), "giving up writing outcomes; the rows run again when their leases expire");
                    return;
                }
            }
        }
    }

    /// Keeps the leases of running rows fresh.
    async fn heartbeat(self: Arc<Self>, stop: CancellationToken) {
        if self.config.heartbeat_interval.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval(self.config.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let leases = self.running_snapshot();
            if leases.is_empty() {
                continue;
            }
            match store::heartbeat(&self.pool, &leases, self.config.lease).await {
                Ok(kept) if kept.len() < leases.len() => {
                    // Either finished in the meantime or taken over; the
                    // completion of a taken-over row is fenced.
                    debug!(
                        lost = leases.len() - kept.len(),
                        "some leases were not extended"
                    );
                }
                Ok(_) => {}
                Err(err) => warn!(error = %err, "heartbeat failed"),
            }
        }
    }

    /// Wakes a claim loop on every `NOTIFY outbox_due` and tells the pacer;
    /// reconnects with backoff.
    async fn listen(self: Arc<Self>, stop: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let attempt = async {
                let mut listener = Listener::connect(&self.pool, &[NOTIFY_CHANNEL]).await?;
                self.listening.store(true, Ordering::Relaxed);
                // Anything inserted while we were not listening is due now.
                self.wake.notify_one();
                loop {
                    // After a reconnection, notifications sent meanwhile are
                    // gone: look for rows either way.
                    if let Heard::Notification(_) = listener.next().await? {
                        self.notifications.fetch_add(1, Ordering::Relaxed);
                        self.notified.notify_one();
                    }
                    self.wake.notify_one();
                }
                #[allow(unreachable_code)]
                Ok::<(), outbox_core::Error>(())
            };
            tokio::select! {
                () = stop.cancelled() => return,
                result = attempt => {
                    self.listening.store(false, Ordering::Relaxed);
                    if let Err(err) = result {
                        failures = failures.saturating_add(1);
                        warn!(error = %err, "LISTEN connection lost; polling until it is back");
                    }
                }
            }
            let pause = reconnect_pause(failures);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Paces the claim loops (see the module docs): ticks while busy, sleeps
    /// on notifications while idle. The `sleep` lock lives on a connection of
    /// its own, closed when the dispatcher stops.
    async fn pace(self: Arc<Self>, stop: CancellationToken) {
        let mut sleeper: Option<PgConnection> = None;
        let mut state = Pace::busy();
        let mut last_claimed = self.claimed_rows.load(Ordering::Relaxed);
        loop {
            state = match state {
                Pace::Busy { quiet_since } => {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(BUSY_POLL) => {}
                    }
                    let claimed = self.claimed_rows.load(Ordering::Relaxed);
                    let quiet_since = if claimed == last_claimed {
                        quiet_since
                    } else {
                        Instant::now()
                    };
                    last_claimed = claimed;
                    self.wake.notify_one();
                    if quiet_since.elapsed() < BUSY_IDLE || !self.listening.load(Ordering::Relaxed)
                    {
                        Pace::Busy { quiet_since }
                    } else {
                        self.fall_asleep(&mut sleeper).await
                    }
                }
                Pace::Asleep { recheck } => {
                    match self
                        .doze(&stop, tokio::time::Instant::now() + recheck)
                        .await
                    {
                        Woken::Stopped => break,
                        Woken::Recheck => {
                            // Until every insert open at the start of the
                            // sleep has ended, poll at growing intervals;
                            // then once per poll interval, which also finds
                            // out when the pacer's connection (and with it
                            // the lock) is gone. The claim this wakes starts
                            // after the check, so it sees the rows of every
                            // insert the check found ended.
                            let settled = self.settled(&mut sleeper).await;
                            self.wake.notify_one();
                            match settled {
                                Some(true) => Pace::Asleep {
                                    recheck: self.config.poll_interval,
                                },
                                Some(false) => Pace::Asleep {
                                    recheck: (recheck * 2).min(self.config.poll_interval),
                                },
                                None => Pace::busy(),
                            }
                        }
                        Woken::Busy => {
                            self.wake_up(&mut sleeper).await;
                            last_claimed = self.claimed_rows.load(Ordering::Relaxed);
                            Pace::busy()
                        }
                    }
                }
            };
        }
        if let Some(conn) = sleeper.take() {
            let _ = conn.close().await;
        }
    }

    /// Waits, asleep, until notifications come fast enough to poll instead
    /// (or the LISTEN connection is lost), until `recheck_at`, or until stopped.
    async fn doze(&self, stop: &CancellationToken, recheck_at: tokio::time::Instant) -> Woken {
        let mut burst = Burst::new(Instant::now());
        let mut seen = self.notifications.load(Ordering::Relaxed);
        loop {
            tokio::select! {
                () = stop.cancelled() => return Woken::Stopped,
                () = tokio::time::sleep_until(recheck_at) => return Woken::Recheck,
                () = self.notified.notified() => {}
            }
            let received = self.notifications.load(Ordering::Relaxed);
            let arrived = received.saturating_sub(seen);
            seen = received;
            if !self.listening.load(Ordering::Relaxed) || burst.record(Instant::now(), arrived) {
                return Woken::Busy;
            }
        }
    }

    /// Takes the `sleep` lock on the pacer's connection (connecting it first
    /// if needed) and wakes a claim loop for one last look; stays busy when
    /// that fails.
    async fn fall_asleep(&self, sleeper: &mut Option<PgConnection>) -> Pace {
        let began = async {
            let conn = match sleeper {
                Some(conn) => conn,
                None => {
                    sleeper.insert(PgConnection::connect_with(&self.pool.connect_options()).await?)
                }
            };
            wake::begin_sleep(conn).await
        }
        .await;
        match began {
            Ok(Some(settled)) => {
                // The claim this wakes starts after the lock was taken.
                self.wake.notify_one();
                Pace::Asleep {
                    recheck: if settled {
                        self.config.poll_interval
                    } else {
                        BUSY_POLL
                    },
                }
            }
            Ok(None) => Pace::busy(),
            Err(err) => {
                debug!(error = %err, "could not start sleeping; polling");
                *sleeper = None;
                Pace::busy()
            }
        }
    }

    /// Asks whether inserts open when the sleep began have ended; `None`
    /// (and the connection dropped, which frees its lock) when the pacer's
    /// connection failed.
    async fn settled(&self, sleeper: &mut Option<PgConnection>) -> Option<bool> {
        let conn = sleeper.as_mut()?;
        match wake::settled(conn).await {
            Ok(settled) => Some(settled),
            Err(err) => {
                debug!(error = %err, "lost the pacer's connection; polling");
                *sleeper = None;
                None
            }
        }
    }

    /// Releases the `sleep` lock: this dispatcher polls from now on.
    async fn wake_up(&self, sleeper: &mut Option<PgConnection>) {
        if let Some(conn) = sleeper.as_mut()
            && let Err(err) = wake::end_sleep(conn).await
        {
            debug!(error = %err, "lost the pacer's connection");
            *sleeper = None;
        }
    }
}

/// What the pacer is doing.
#[derive(Debug, Clone, Copy)]
enum Pace {
    /// Waking a claim loop every [`BUSY_POLL`]; no row claimed since `quiet_since`.
    Busy { quiet_since: Instant },
    /// Holding the `sleep` lock and waking claim loops on notifications,
    /// and after `recheck`: short while an insert open since before the
    /// sleep may still commit unannounced, the poll interval once none is.
    Asleep { recheck: Duration },
}

/// Notifications counted in windows of [`BUSY_WINDOW`].
#[derive(Debug)]
struct Burst {
    window_start: Instant,
    count: u32,
}

impl Burst {
    fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            count: 0,
        }
    }

    /// Counts `arrived` notifications at `now`; true once
    /// [`BUSY_NOTIFICATIONS`] of them arrived within one window.
    fn record(&mut self, now: Instant, arrived: u64) -> bool {
        if now.saturating_duration_since(self.window_start) > BUSY_WINDOW {
            *self = Self::new(now);
        }
        self.count = self
            .count
            .saturating_add(u32::try_from(arrived).unwrap_or(u32::MAX));
        self.count >= BUSY_NOTIFICATIONS
    }
}

impl Pace {
    fn busy() -> Self {
        Self::Busy {
            quiet_since: Instant::now(),
        }
    }
}

/// Why a sleeping pacer woke up.
enum Woken {
    Stopped,
    /// Time to ask again whether the sleep has settled.
    Recheck,
    /// Rows come fast: poll instead.
    Busy,
}

/// Claimed rows run together in one task: spawning a task per row cost more
/// than a no-op handler, while a batch still spreads over the runtime's
/// threads in chunks of this size.
const ROWS_PER_TASK: usize = 32;

/// How often each transactional claim loop looks for batches whose worker died.
const ABANDONED_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A taken row as its handler sees it: a take does not count the attempt in
/// the table (a failure does, after the rollback), so the attempt running
/// now is one more than those recorded.
fn taken_attempt(row: &ClaimedEvent) -> ClaimedEvent {
    let mut row = row.clone();
    row.attempt_count += 1;
    row
}

#[cfg(test)]
mod connection_budget_tests {
    use super::Config;

    #[test]
    fn the_budget_counts_claim_loops_listen_pacer_and_keepers() {
        let lease = Config {
            claimers: 3,
            ..Config::default()
        };
        assert_eq!(lease.own_connections(), 5);
        let transactional = Config {
            claimers: 3,
            in_transaction: true,
            ..Config::default()
        };
        assert_eq!(transactional.own_connections(), 8);
    }

    #[test]
    fn concurrency_is_refused_where_it_does_not_apply() {
        let transactional = Config {
            in_transaction: true,
            concurrency: 64,
            ..Config::default()
        };
        let err = transactional.validate().err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|m| m.contains("lease mode only") && m.contains("claimers")),
            "{err:?}"
        );
        let lease = Config {
            concurrency: 64,
            ..Config::default()
        };
        assert!(lease.validate().is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_notifications_turns_the_pacer_busy_a_trickle_does_not() {
        let start = Instant::now();
        let mut burst = Burst::new(start);
        let fast: Vec<bool> = (0..BUSY_NOTIFICATIONS)
            .map(|i| burst.record(start + Duration::from_millis(u64::from(i)), 1))
            .collect();
        assert!(fast[..fast.len() - 1].iter().all(|busy| !busy));
        assert_eq!(fast.last(), Some(&true));

        // Notifications that arrived while the pacer was not looking count.
        let mut burst = Burst::new(start);
        assert!(burst.record(start, u64::from(BUSY_NOTIFICATIONS)));

        // One notification per window never adds up, however long it goes on.
        let mut burst = Burst::new(start);
        let spaced = BUSY_WINDOW + Duration::from_millis(1);
        assert!((1..1000u32).all(|i| !burst.record(start + spaced * i, 1)));
    }
}
