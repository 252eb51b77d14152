//! Compaction: outboxd's small bookkeeping tables rewritten with `TRUNCATE`
//! when vacuum cannot remove their dead row versions, so that their space,
//! like the segments', comes back while an old snapshot is held.
//!
//! These tables hold a few rows each (a row per process, per topic, per
//! topic and minute, per running transactional batch, per limited topic,
//! and one for the segments), but they are written all the time — a
//! heartbeat, a rotation every period, a sample, the attempt counts, a
//! batch record per transactional batch, a limit's running rows and tokens
//! per limited claim — and under a held snapshot every write leaves a dead
//! version behind. [`compact`] finds the tables whose statistics count at
//! least [`CompactionPolicy::min_dead`] dead versions, more than their live
//! rows; runs a plain `VACUUM` on each (which is all it takes while no
//! snapshot is held); and rewrites only those that still have as many:
//! [`compact_table`] copies the live rows, truncates the table and puts
//! them back, in one transaction that holds the table's exclusive lock for
//! as long as that takes — milliseconds for most, up to about a second for
//! `outbox_activity` with a hundred thousand rows (a row per topic and
//! minute, kept a day), which is compacted only once its dead versions
//! outnumber them.
//!
//! `TRUNCATE` is not MVCC-safe: a transaction whose snapshot is older than
//! the compaction sees the table empty. outboxd's Rust statements run in
//! `READ COMMITTED` and take their snapshot after their locks, so one that
//! waited for a compaction sees its result. Two readers may see the table
//! empty, and both take that answer: the SQL function `outbox_enqueue`
//! (PL/pgSQL takes a statement's snapshot before its locks) and a producer
//! in its own `REPEATABLE READ` transaction read the current segment, and
//! an empty answer places the row in segment 0, which costs at most a move
//! (see [`super::segments`]). A `pg_dump` whose snapshot predates a
//! compaction that commits before the dump locks the table dumps it empty:
//! so only tables that hold nothing to restore are compacted (limits and
//! pauses are configuration, and are not; a limit's state is not), a
//! restored database without the segments' row gets it back at the next
//! rotation, and a limited claim that finds no state for its limit starts
//! one (no rows recorded, a full burst).

use std::time::Duration;

use sqlx::PgPool;

use crate::Error;

/// The tables compaction looks after: written often, small, and holding
/// nothing a backup must keep.
pub const TABLES: [&str; 6] = [
    "outbox_segments",
    "outbox_processes",
    "outbox_topic_states",
    "outbox_activity",
    "outbox_tx_batches",
    "outbox_topic_limit_states",
];

/// How many times [`CompactionPolicy::min_dead`] the limits' states wait
/// for. They are written on every limited claim (a hundred times a second
/// and more), so at the common threshold they would be rewritten every few
/// seconds under a held snapshot, and every rewrite (`TRUNCATE`) leaves
/// dead versions of the table's, its index's and its TOAST table's rows in
/// `pg_class`, which the snapshot keeps too, and makes every session plan
/// its statements on the table again. At eight times (2,000 by default) a
/// claim reads at most that many versions of its limit's state, about a
/// millisecond, and a rewrite comes every 20 s at 100 limited claims a
/// second.
pub const LIMIT_STATES_MIN_DEAD_FACTOR: i64 = 8;

/// The dead versions `table` must have before it is compacted, under a
/// policy whose threshold is `min_dead`.
fn min_dead_of(table: &str, min_dead: i64) -> i64 {
    if table == "outbox_topic_limit_states" {
        min_dead.saturating_mul(LIMIT_STATES_MIN_DEAD_FACTOR)
    } else {
        min_dead
    }
}

/// When and how tables are compacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionPolicy {
    /// Dead row versions a table must have (and more than its live rows)
    /// after a `VACUUM` before it is compacted.
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

/// What [`compact`] did to one table over the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compaction {
    /// A `VACUUM` brought it under the threshold (no snapshot held them).
    Vacuumed {
        /// The table, one of [`TABLES`].
        table: &'static str,
    },
    /// The table was rewritten with its `kept` live rows.
    Compacted {
        /// The table, one of [`TABLES`].
        table: &'static str,
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

/// The tables of [`TABLES`] whose dead row versions, by the server's
/// statistics, reach `min_dead` (the limits' states
/// [`LIMIT_STATES_MIN_DEAD_FACTOR`] times that) and outnumber their live
/// rows, with that count; `only` narrows the look to one table.
pub async fn bloated(
    pool: &PgPool,
    min_dead: i64,
    only: Option<&str>,
) -> Result<Vec<(&'static str, i64)>, Error> {
    let thresholds: Vec<i64> = TABLES.iter().map(|t| min_dead_of(t, min_dead)).collect();
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT s.relname::text, s.n_dead_tup
         FROM pg_stat_user_tables s
         JOIN unnest($1::text[], $2::int8[]) AS t(name, min_dead) ON s.relid = to_regclass(t.name)
         WHERE s.n_dead_tup >= t.min_dead AND s.n_dead_tup > s.n_live_tup
           AND ($3::text IS NULL OR s.relid = to_regclass($3))
         ORDER BY s.relname",
    )
    .bind(TABLES)
    .bind(&thresholds)
    .bind(only)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(name, dead)| known(&name).map(|table| (table, dead)))
        .collect())
}

/// Vacuums every table [`bloated`] names and compacts those still over the
/// threshold after it, each on its own; one table's failure leaves the
/// others to be done (the error is in its place in the answer).
pub async fn compact(
    pool: &PgPool,
    policy: CompactionPolicy,
) -> Result<Vec<Result<Compaction, Error>>, Error> {
    compact_where(pool, policy, |_| true).await
}

/// [`compact`] for the bloated tables `try_table` accepts (the others wait
/// for a later pass).
pub async fn compact_where(
    pool: &PgPool,
    policy: CompactionPolicy,
    try_table: impl Fn(&'static str) -> bool,
) -> Result<Vec<Result<Compaction, Error>>, Error> {
    let mut done = Vec::new();
    for (table, _) in bloated(pool, policy.min_dead, None).await? {
        if try_table(table) {
            done.push(vacuum_then_compact(pool, table, policy).await);
        }
    }
    Ok(done)
}

async fn vacuum_then_compact(
    pool: &PgPool,
    table: &'static str,
    policy: CompactionPolicy,
) -> Result<Compaction, Error> {
    super::vacuum_skip_locked(pool, table).await?;
    if bloated(pool, policy.min_dead, Some(table))
        .await?
        .is_empty()
    {
        return Ok(Compaction::Vacuumed { table });
    }
    compact_table(pool, table, policy.lock_timeout).await
}

/// Rewrites `table` (one of [`TABLES`]) with its live rows, whatever its
/// statistics say. A lock wait longer than `lock_timeout`, or a deadlock
/// with a session that holds the table, gives up with
/// [`Compaction::Blocked`] and changes nothing.
pub async fn compact_table(
    pool: &PgPool,
    table: &str,
    lock_timeout: Duration,
) -> Result<Compaction, Error> {
    let table = known(table).ok_or_else(|| {
        Error::invalid(
            "table",
            format!("{table:?} is not one of {}", TABLES.join(", ")),
        )
    })?;
    let mut tx = super::begin_with_lock_timeout(pool, lock_timeout).await?;
    let rewritten = async {
        sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
            .execute(&mut *tx)
            .await?;
        // Server-side, so the rows never leave it: held in a variable while
        // the table is truncated (a temporary table would add more catalog
        // rows, which a held snapshot keeps as dead versions too).
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
        sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&mut *tx)
            .await
    }
    .await;
    match rewritten {
        Ok(kept) => {
            tx.commit().await?;
            Ok(Compaction::Compacted {
                table,
                kept: u64::try_from(kept).unwrap_or(0),
            })
        }
        Err(err) if super::is_lock_conflict(&err) => {
            tx.rollback().await?;
            Ok(Compaction::Blocked { table })
        }
        Err(err) => Err(err.into()),
    }
}

/// `name` as the entry of [`TABLES`] it equals.
fn known(name: &str) -> Option<&'static str> {
    TABLES.iter().copied().find(|t| *t == name)
}
