//! Compaction: outboxd's small bookkeeping tables rewritten with `TRUNCATE`
//! when their dead row versions pile up, so that their space, like the
//! segments', comes back while an old snapshot keeps vacuum from removing
//! anything.
//!
//! These tables hold a few rows each (a row per process, per topic, per
//! minute, per running transactional batch, and one for the segments), but
//! they are written all the time — a heartbeat every few seconds, a
//! rotation every period, a sample, a batch record per transactional batch,
//! a limit's slots per claim — and under a held snapshot every write leaves
//! a dead version behind. [`compact`] copies the live rows, truncates the
//! table and puts them back, in one transaction that holds the table's
//! exclusive lock for as long as that takes (a few milliseconds for these
//! sizes). It only runs on a table whose dead versions are at least
//! [`CompactionPolicy::min_dead`] and more than its live rows: vacuum keeps
//! any table below that whenever it can run, so compaction is what happens
//! while it cannot.
//!
//! `TRUNCATE` is not MVCC-safe: a `REPEATABLE READ` transaction whose
//! snapshot is older than the compaction sees the table empty. Every reader
//! in outboxd reads in `READ COMMITTED`, where a statement that waited for
//! the lock takes its snapshot after it; the one reader that may run in a
//! producer's older snapshot, the read of the current segment, takes any
//! answer (see [`super::segments::current_for_insert`]).

use std::time::Duration;

use sqlx::PgPool;

use crate::Error;

/// The tables compaction looks after, written often and small.
pub const TABLES: [&str; 6] = [
    "outbox_segments",
    "outbox_processes",
    "outbox_topic_states",
    "outbox_activity",
    "outbox_topic_limits",
    "outbox_tx_batches",
];

/// When and how tables are compacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionPolicy {
    /// Dead row versions a table must have (and more than its live rows)
    /// before it is compacted.
    pub min_dead: i64,
    /// How long a compaction waits for the table's lock before it gives up
    /// until its next pass. Statements on the table queue behind a waiting
    /// compaction, so this bounds their stall.
    pub lock_timeout: Duration,
}

impl Default for CompactionPolicy {
    /// At 250 dead versions, waiting at most 50 ms for the lock.
    fn default() -> Self {
        Self {
            min_dead: 250,
            lock_timeout: Duration::from_millis(50),
        }
    }
}

/// What a call of [`compact`] did to one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compaction {
    /// The table was rewritten with its `kept` live rows.
    Compacted {
        /// The table, one of [`TABLES`].
        table: &'static str,
        /// Dead row versions the statistics counted before.
        dead: i64,
        /// Live rows put back.
        kept: u64,
    },
    /// A session holds the table (a `pg_dump`, a transaction that read it
    /// and is still open): nothing changed; the next pass tries again.
    Blocked {
        /// The table, one of [`TABLES`].
        table: &'static str,
    },
}

/// Compacts every table of [`TABLES`] whose dead row versions, by the
/// server's statistics, reach `policy.min_dead` and outnumber its live rows.
/// Each table in a transaction of its own.
pub async fn compact(pool: &PgPool, policy: CompactionPolicy) -> Result<Vec<Compaction>, Error> {
    let bloated: Vec<(String, i64)> = sqlx::query_as(
        "SELECT relname::text, n_dead_tup FROM pg_stat_user_tables
         WHERE relid = ANY (SELECT to_regclass(t) FROM unnest($1::text[]) AS t)
           AND n_dead_tup >= $2 AND n_dead_tup > n_live_tup
         ORDER BY relname",
    )
    .bind(TABLES)
    .bind(policy.min_dead)
    .fetch_all(pool)
    .await?;
    let mut done = Vec::with_capacity(bloated.len());
    for (name, dead) in bloated {
        let Some(table) = TABLES.iter().copied().find(|t| *t == name) else {
            continue;
        };
        done.push(compact_table(pool, table, dead, policy.lock_timeout).await?);
    }
    Ok(done)
}

/// Rewrites `table` (one of [`TABLES`]) with its live rows, whatever its
/// statistics say; `dead` is only reported back.
pub async fn compact_table(
    pool: &PgPool,
    table: &'static str,
    dead: i64,
    lock_timeout: Duration,
) -> Result<Compaction, Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(&format!(
        "SET LOCAL lock_timeout = {}",
        lock_timeout.as_millis().max(1)
    ))
    .execute(&mut *tx)
    .await?;
    let locked = sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        .execute(&mut *tx)
        .await;
    if let Err(err) = locked {
        if super::segments::is_lock_timeout(&err) {
            return Ok(Compaction::Blocked { table });
        }
        return Err(err.into());
    }
    let kept: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&mut *tx)
        .await?;
    // Server-side, so the rows never leave it: held in a variable while the
    // table is truncated (a temporary table would add catalog rows, which a
    // held snapshot keeps as dead versions too).
    sqlx::query(&format!(
        "DO $$
         DECLARE kept {table}[];
         BEGIN
            SELECT coalesce(array_agg(t), '{{}}') INTO kept FROM {table} t;
            TRUNCATE {table};
            INSERT INTO {table} SELECT * FROM unnest(kept);
         END
         $$"
    ))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Compaction::Compacted {
        table,
        dead,
        kept: u64::try_from(kept).unwrap_or(0),
    })
}
