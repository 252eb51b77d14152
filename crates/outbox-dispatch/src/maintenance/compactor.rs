//! The compactor: rewrites outboxd's small bookkeeping tables with
//! `TRUNCATE` when dead row versions pile up in them that a `VACUUM`
//! cannot remove, which is while an old snapshot is held (see
//! [`outbox_core::store::compaction`]). With the rotator, it keeps every
//! outboxd table bounded however long a snapshot is held.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_core::store::compaction::{self, Compaction, CompactionPolicy};
use sqlx::PgPool;
use tracing::{debug, warn};

use crate::Error;

/// How often the compactor reads the tables' statistics: often enough that
/// a table written on every limited claim (a hundred times a second and
/// more) gathers no more than a few hundred dead versions between two
/// looks; a look is one read of `pg_stat_user_tables`.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);

/// The longest wait before a table whose compaction a session's lock turned
/// away is tried again (its vacuum, which finds nothing to remove while
/// that session's snapshot lasts, waits as long).
const RETRY_AT_MOST_EVERY: Duration = Duration::from_secs(16);

/// Compacts the bookkeeping tables.
#[derive(Debug, Clone)]
pub struct Compactor {
    pool: PgPool,
    policy: CompactionPolicy,
    retries: Arc<Mutex<HashMap<&'static str, super::Retry>>>,
}

impl Compactor {
    /// A compactor that checks every [`CHECK_EVERY`] under `policy`.
    pub fn new(pool: PgPool, policy: CompactionPolicy) -> Self {
        Self {
            pool,
            policy,
            retries: Arc::default(),
        }
    }

    fn retries(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, super::Retry>> {
        self.retries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One pass: vacuums the tables whose dead versions reached the
    /// policy's threshold and compacts those a vacuum could not clean; a
    /// table a session's lock turned away is tried again after a second,
    /// then less and less often. A table that failed is logged and left for
    /// the next pass; the first failure is the pass's error.
    pub async fn run_once(&self) -> Result<Vec<Compaction>, Error> {
        let mut done = Vec::new();
        let mut first_error = None;
        let now = Instant::now();
        let asked = Mutex::new(Vec::new());
        let outcomes = compaction::compact_where(&self.pool, self.policy, |table| {
            asked.lock().unwrap_or_else(|e| e.into_inner()).push(table);
            self.retries().get(table).is_none_or(|r| r.due(now))
        })
        .await?;
        // A table no longer bloated starts afresh when next turned away.
        let asked = asked.into_inner().unwrap_or_else(|e| e.into_inner());
        self.retries().retain(|table, _| asked.contains(table));
        for outcome in outcomes {
            match outcome {
                Ok(compaction) => {
                    match compaction {
                        Compaction::Blocked { table } => {
                            self.retries()
                                .entry(table)
                                .or_default()
                                .blocked(Instant::now(), RETRY_AT_MOST_EVERY);
                        }
                        Compaction::Vacuumed { table } | Compaction::Compacted { table, .. } => {
                            self.retries().remove(table);
                        }
                    }
                    note(compaction);
                    done.push(compaction);
                }
                Err(err) => {
                    warn!(error = %err, "bookkeeping table compaction failed");
                    first_error.get_or_insert(err);
                }
            }
        }
        match first_error {
            Some(err) => Err(err.into()),
            None => Ok(done),
        }
    }
}

fn note(compaction: Compaction) {
    match compaction {
        Compaction::Vacuumed { table } => debug!(table, "bookkeeping table vacuumed"),
        Compaction::Compacted { table, kept } => {
            metrics::counter!("outboxd_compactions_total", "table" => table).increment(1);
            debug!(table, kept, "bookkeeping table compacted");
        }
        Compaction::Blocked { table } => {
            metrics::counter!("outboxd_compactions_blocked_total", "table" => table).increment(1);
            debug!(
                table,
                "bookkeeping table compaction waits: a session holds the table"
            );
        }
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
