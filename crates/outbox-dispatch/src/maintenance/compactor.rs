//! The compactor: rewrites outboxd's small bookkeeping tables with
//! `TRUNCATE` when dead row versions pile up in them, which happens only
//! while an old snapshot keeps vacuum from removing them (see
//! [`outbox_core::store::compaction`]). With the rotator, it keeps every
//! outboxd table bounded however long a snapshot is held.

use std::time::Duration;

use outbox_core::store::compaction::{self, Compaction, CompactionPolicy};
use sqlx::PgPool;
use tracing::{debug, info};

use crate::Error;

/// How often the compactor reads the tables' statistics.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);

/// Compacts the bookkeeping tables.
#[derive(Debug, Clone)]
pub struct Compactor {
    pool: PgPool,
    policy: CompactionPolicy,
}

impl Compactor {
    /// A compactor that checks every [`CHECK_EVERY`] under `policy`.
    pub fn new(pool: PgPool, policy: CompactionPolicy) -> Self {
        Self { pool, policy }
    }

    /// One pass: compacts the tables whose dead versions reached the
    /// policy's threshold.
    pub async fn run_once(&self) -> Result<Vec<Compaction>, Error> {
        let done = compaction::compact(&self.pool, self.policy).await?;
        for compaction in &done {
            match *compaction {
                Compaction::Compacted { table, dead, kept } => {
                    metrics::counter!("outboxd_compactions_total", "table" => table).increment(1);
                    debug!(table, dead, kept, "bookkeeping table compacted");
                }
                Compaction::Blocked { table } => {
                    metrics::counter!("outboxd_compactions_blocked_total", "table" => table)
                        .increment(1);
                    info!(
                        table,
                        "bookkeeping table compaction waits: a session holds the table; trying \
                         again at the next pass"
                    );
                }
            }
        }
        Ok(done)
    }
}

impl super::Service for Compactor {
    fn name(&self) -> &'static str {
        "bookkeeping_compaction"
    }

    fn cadence(&self) -> super::Cadence {
        super::Cadence::Every(CHECK_EVERY)
    }

    fn pass(&self) -> futures::future::BoxFuture<'_, Result<super::Report, Error>> {
        Box::pin(async move {
            let compacted = self
                .run_once()
                .await?
                .iter()
                .filter(|c| matches!(c, Compaction::Compacted { .. }))
                .count();
            Ok(super::Report {
                items: compacted as u64,
            })
        })
    }
}
