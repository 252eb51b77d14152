//! The replayer: replays dead letters whose quarantine (automatic replay
//! policy) is over. Each replay is the normal one — a new outbox row linked by
//! `replayed_from`, the dead letter resolved `replayed` — and the next dead
//! letter of that event is quarantined twice as long, until the policy's
//! rounds are spent and it waits for an operator.

use std::time::Duration;

use sqlx::PgPool;
use tracing::info;

use crate::Error;

/// Fires automatic replays.
#[derive(Debug, Clone)]
pub struct Replayer {
    pool: PgPool,
    interval: Duration,
    batch: i64,
}

impl Replayer {
    /// A replayer checking every `interval`.
    pub fn new(pool: PgPool, interval: Duration) -> Self {
        Self {
            pool,
            interval,
            batch: 100,
        }
    }

    /// One pass; returns how many dead letters it replayed.
    pub async fn run_once(&self) -> Result<usize, Error> {
        let mut tx = self.pool.begin().await?;
        let replayed = outbox_core::store::dead_letters::replay_due(&mut tx, self.batch).await?;
        tx.commit().await?;
        metrics::counter!("outboxd_auto_replayed_total").increment(replayed.len() as u64);
        if !replayed.is_empty() {
            info!(replayed = replayed.len(), "automatic replays enqueued");
        }
        Ok(replayed.len())
    }
}

impl super::Service for Replayer {
    fn name(&self) -> &'static str {
        "auto_replay"
    }

    fn cadence(&self) -> super::Cadence {
        super::Cadence::Every(self.interval)
    }

    fn pass(&self) -> futures::future::BoxFuture<'_, Result<super::Report, Error>> {
        Box::pin(async move {
            Ok(super::Report {
                items: self.run_once().await? as u64,
            })
        })
    }
}
