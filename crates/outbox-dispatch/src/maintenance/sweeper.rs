//! The GC sweeper: enforces retention in bounded batches.
//!
//! Each table is swept with `DELETE … LIMIT n FOR UPDATE SKIP LOCKED` until a
//! short batch, with a jittered pause between batches so a large backlog of
//! old rows does not monopolise the database. Concurrent sweepers (several
//! processes, or `outboxd gc --once` from an external cron) never block each
//! other or delete a row twice.

use std::future::Future;
use std::time::Duration;

use outbox_core::store::retention;
use sqlx::PgPool;
use tracing::info;

use crate::Error;

/// Sweeper settings.
#[derive(Debug, Clone)]
pub struct SweeperConfig {
    /// Dead letters older than this many days are deleted.
    pub dead_letter_retention_days: u32,
    /// Abandoned-execution records older than this many days are deleted.
    pub abandoned_executions_retention_days: u32,
    /// Audit-log entries older than this many days are deleted; `None`
    /// keeps every entry.
    pub audit_log_retention_days: Option<u32>,
    /// Rows per delete statement.
    pub batch: i64,
    /// Upper bound of the random pause between two batches.
    pub max_pause: Duration,
    /// Cron expression of the sweep schedule (6 fields with seconds, or 5).
    pub schedule: String,
}

impl Default for SweeperConfig {
    fn default() -> Self {
        Self {
            dead_letter_retention_days: 30,
            abandoned_executions_retention_days: 7,
            audit_log_retention_days: None,
            batch: 1000,
            max_pause: Duration::from_millis(50),
            schedule: "0 */10 * * * *".into(),
        }
    }
}

/// What one sweep deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Dead letters deleted.
    pub dead_letters: u64,
    /// Abandoned-execution records deleted.
    pub abandoned_executions: u64,
    /// Audit-log entries deleted.
    pub audit_entries: u64,
    /// Expired de-duplication records deleted.
    pub processed_messages: u64,
    /// Login-throttle counts deleted (last failure over a week ago).
    pub login_counts: u64,
    /// Expired sessions deleted.
    pub sessions: u64,
    /// Reply inboxes of synchronous invocations deleted (over an hour old).
    pub invocation_inboxes: u64,
}

impl SweepReport {
    /// Rows deleted in all tables.
    pub fn total(&self) -> u64 {
        self.dead_letters
            + self.abandoned_executions
            + self.audit_entries
            + self.processed_messages
            + self.login_counts
            + self.sessions
            + self.invocation_inboxes
    }
}

/// Deletes what retention no longer keeps.
#[derive(Debug, Clone)]
pub struct Sweeper {
    pool: PgPool,
    config: SweeperConfig,
}

impl Sweeper {
    /// A sweeper on `pool`.
    pub fn new(pool: PgPool, config: SweeperConfig) -> Self {
        Self { pool, config }
    }

    async fn drain<F, Fut>(&self, table: &'static str, mut batch: F) -> Result<u64, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<u64, outbox_core::Error>>,
    {
        let mut total = 0;
        loop {
            let deleted = batch().await?;
            total += deleted;
            metrics::counter!("outboxd_gc_deleted_total", "table" => table).increment(deleted);
            if deleted < self.config.batch as u64 {
                return Ok(total);
            }
            let pause = self.config.max_pause.mul_f64(fastrand::f64());
            tokio::time::sleep(pause).await;
        }
    }

    /// One full sweep; returns what it deleted.
    pub async fn run_once(&self) -> Result<SweepReport, Error> {
        let c = &self.config;
        let started = std::time::Instant::now();
        let report = SweepReport {
            dead_letters: self
                .drain("dead_letters", || {
                    retention::sweep_dead_letters(&self.pool, c.dead_letter_retention_days, c.batch)
                })
                .await?,
            abandoned_executions: self
                .drain("abandoned_executions", || {
                    retention::sweep_abandoned_executions(
                        &self.pool,
                        c.abandoned_executions_retention_days,
                        c.batch,
                    )
                })
                .await?,
            audit_entries: match c.audit_log_retention_days {
                Some(days) => {
                    self.drain("audit_log", || {
                        retention::sweep_audit_log(&self.pool, days, c.batch)
                    })
                    .await?
                }
                None => 0,
            },
            processed_messages: self
                .drain("processed_messages", || {
                    retention::sweep_processed_messages(&self.pool, c.batch)
                })
                .await?,
            login_counts: self
                .drain("login_throttle", || {
                    retention::sweep_login_throttle(&self.pool, c.batch)
                })
                .await?,
            sessions: self
                .drain("sessions", || {
                    retention::sweep_sessions(&self.pool, c.batch)
                })
                .await?,
            invocation_inboxes: self
                .drain("invocation_inboxes", || {
                    retention::sweep_invocation_inboxes(&self.pool, c.batch)
                })
                .await?,
        };
        metrics::counter!("outboxd_gc_runs_total").increment(1);
        metrics::histogram!("outboxd_gc_duration_seconds").record(started.elapsed().as_secs_f64());
        if report.total() > 0 {
            info!(?report, "gc swept");
        }
        Ok(report)
    }
}

impl super::Service for Sweeper {
    fn name(&self) -> &'static str {
        "gc_sweeper"
    }

    fn cadence(&self) -> super::Cadence {
        super::Cadence::Cron(self.config.schedule.clone())
    }

    fn pass(&self) -> futures::future::BoxFuture<'_, Result<super::Report, Error>> {
        Box::pin(async move {
            let report = self.run_once().await.inspect_err(|_| {
                metrics::counter!("outboxd_gc_errors_total").increment(1);
            })?;
            Ok(super::Report {
                items: report.total(),
            })
        })
    }
}
