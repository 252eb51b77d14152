//! The cron scheduler: enqueues one outbox row per due tick of every enabled
//! cron trigger.
//!
//! Exactly once with any number of schedulers: due triggers are locked with
//! `FOR UPDATE SKIP LOCKED` while a tick is enqueued and the trigger moved to
//! its next tick, in one transaction, and each tick's row carries the
//! idempotency key `cron:<trigger>:<tick>`. After downtime, missed ticks fire
//! once (not once per missed tick), then the schedule resumes from now.

use std::time::Duration;

use sqlx::PgPool;
use tracing::{info, warn};

use crate::Error;

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// How often to look for due ticks.
    pub interval: Duration,
    /// Most triggers fired per pass.
    pub batch: i64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            batch: 100,
        }
    }
}

/// Fires due cron triggers.
#[derive(Debug, Clone)]
pub struct Scheduler {
    pool: PgPool,
    config: SchedulerConfig,
}

impl Scheduler {
    /// A scheduler on `pool`.
    pub fn new(pool: PgPool, config: SchedulerConfig) -> Self {
        Self { pool, config }
    }

    /// One pass: fires every due trigger (up to the batch) and returns how many rows it enqueued.
    pub async fn run_once(&self) -> Result<usize, Error> {
        let mut tx = self.pool.begin().await?;
        let pass = outbox_core::store::triggers::fire_due_cron(&mut tx, self.config.batch).await?;
        tx.commit().await?;
        for skipped in &pass.skipped {
            warn!(
                trigger_id = %skipped.trigger_id,
                app_id = %skipped.app_id,
                error = %skipped.error,
                "cron tick skipped: the trigger's row would be refused; delete the trigger and create it with a valid target"
            );
        }
        metrics::counter!("outboxd_cron_fired_total").increment(pass.fired.len() as u64);
        if !pass.fired.is_empty() {
            info!(fired = pass.fired.len(), "cron ticks enqueued");
        }
        Ok(pass.fired.len())
    }
}

impl super::Service for Scheduler {
    fn name(&self) -> &'static str {
        "cron_scheduler"
    }

    fn cadence(&self) -> super::Cadence {
        super::Cadence::Every(self.config.interval)
    }

    fn pass(&self) -> futures::future::BoxFuture<'_, Result<super::Report, Error>> {
        Box::pin(async move {
            Ok(super::Report {
                items: self.run_once().await? as u64,
            })
        })
    }
}
