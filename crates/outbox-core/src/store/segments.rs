//! Segments: the three tables (`outbox_s0`–`outbox_s2`, children of
//! `outbox`, migration 0032) that hold most rows and are emptied with
//! `TRUNCATE` in turn, so that their space comes back without `VACUUM`,
//! even while an old snapshot keeps vacuum from removing anything.
//!
//! Producers put rows without an idempotency key that are due within
//! [`HORIZON`] into the current segment; every other row goes to `outbox`
//! itself. Every statement that reads or changes rows addresses `outbox` and
//! so reaches all four tables.
//!
//! [`rotate`] empties the segment after the current one (current two periods
//! ago): it moves the rows still there (scheduled, retrying, paused, leased
//! by a slow handler) to `outbox`, truncates the segment and makes it the
//! current one. Any segment may receive a row at any time — a producer that
//! read the current segment just before a rotation — because a rotation
//! moves whatever it finds while it holds the segment's lock: a placement
//! can cost a move, never a row.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::Error;

/// The segments, in turn.
pub const TABLES: [&str; 3] = ["outbox_s0", "outbox_s1", "outbox_s2"];

/// Rows due later than this from their enqueue go to `outbox` itself: a row
/// that waits longer than a rotation period would be moved anyway.
pub const HORIZON: Duration = Duration::from_secs(HORIZON_SECS as u64);

/// [`HORIZON`] in seconds (the SQL function `outbox_enqueue` uses the same).
pub const HORIZON_SECS: i64 = 60;

/// How long a producer trusts the current segment it read: a stale answer
/// costs a move at the next rotation, never a row.
const CURRENT_FOR: Duration = Duration::from_secs(1);

/// The current segment as this process last read it. Shared by every
/// connection of the process, whatever database it reaches: the answer only
/// decides where a row is placed, which any answer gets right.
static CURRENT: Mutex<Option<(Instant, usize)>> = Mutex::new(None);

/// The segment a producer inserts into now (an index into [`TABLES`]),
/// read on `conn` (in the producer's transaction, unprepared, so it works
/// through a transaction-pooling PgBouncer) at most once per second per
/// process.
pub async fn current_for_insert(conn: &mut PgConnection) -> Result<usize, Error> {
    let cached = *CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((read_at, segment)) = cached
        && read_at.elapsed() < CURRENT_FOR
    {
        return Ok(segment);
    }
    // No row: the producer's `REPEATABLE READ` snapshot is older than a
    // compaction of the table (`store::compaction`), which it sees empty.
    let current: Option<i16> = sqlx::query_scalar("SELECT current FROM outbox_segments")
        .persistent(false)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(current) = current else {
        // Not kept: it is this snapshot's answer, not the table's.
        return Ok(0);
    };
    let segment = usize::try_from(current).unwrap_or(0) % TABLES.len();
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), segment));
    Ok(segment)
}

/// How a rotation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationPolicy {
    /// How long a segment stays current. Without a vacuum, the outbox holds
    /// at most about three periods of finished rows.
    pub period: Duration,
    /// How long the rotation waits for the segment's lock before it gives
    /// up until its next pass. Claims and producers that address the
    /// segment queue behind a waiting rotation, so this bounds their stall.
    pub lock_timeout: Duration,
    /// Rows moved per statement before the lock is taken.
    pub move_batch: i64,
}

impl Default for RotationPolicy {
    /// Every 10 s, waiting at most 50 ms for the lock.
    fn default() -> Self {
        Self {
            period: Duration::from_secs(10),
            lock_timeout: Duration::from_millis(50),
            move_batch: 5000,
        }
    }
}

/// What a call of [`rotate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// The current segment is younger than the period.
    NotDue,
    /// The segment to empty is in use (a `pg_dump`, a reader's open
    /// transaction, a transactional batch), or `outbox_segments` is (a
    /// compaction): nothing truncated, `moved` rows moved to `outbox`
    /// already; the next pass tries again.
    Blocked {
        /// Rows moved to `outbox` before the lock was refused.
        moved: u64,
    },
    /// `segment` was emptied and is the current one now.
    Rotated {
        /// The index into [`TABLES`] of the new current segment.
        segment: usize,
        /// Rows that were still there, moved to `outbox`.
        moved: u64,
    },
}

/// Empties the segment after the current one and makes it current, when the
/// current one is older than `policy.period`.
///
/// Rows without a lease holder (`locked_by`: never claimed, or released for
/// a retry) are moved to `outbox` in batches first, each row deleted and
/// inserted in one statement (locked rows are skipped), without the
/// segment's exclusive lock. A row whose lease has expired may still have
/// its handler running, and a completion waiting on the move would not
/// follow the row to `outbox`, so such rows wait for the locked step. The
/// ids of the rows left are read next, with the snapshot that read them.
/// Then, in one transaction under `policy.lock_timeout`: switch, lock the
/// segment, move what is left (leased rows: no completion can be half-way
/// through them while the lock is held, and one that starts after the
/// commit finds them in `outbox` by id and token), truncate it. What is
/// left is found by index, never by reading the segment under its lock:
/// the rows read before, by id, and rows of transactions that snapshot did
/// not see as ended (a producer that placed a row in the segment late), by
/// `enqueue_xid`. A row keeps its id, `run_at`, lease, token,
/// attempts and `enqueue_xid` through a move, so claim positions, ordering
/// keys and fencing see the same row.
pub async fn rotate(pool: &PgPool, policy: RotationPolicy) -> Result<Rotation, Error> {
    let read: Option<(i16, bool)> = sqlx::query_as(
        "SELECT current, switched_at <= now() - make_interval(secs => $1)
         FROM outbox_segments",
    )
    .bind(policy.period.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    let Some((current, due)) = read else {
        // A database restored from a dump taken while a compaction emptied
        // the table (`store::compaction`): segment 0 is as good as any.
        sqlx::query("INSERT INTO outbox_segments DEFAULT VALUES ON CONFLICT DO NOTHING")
            .execute(pool)
            .await?;
        return Ok(Rotation::NotDue);
    };
    if !due {
        return Ok(Rotation::NotDue);
    }
    let next = (usize::try_from(current).unwrap_or(0) + 1) % TABLES.len();
    let table = TABLES[next];
    let mut moved = 0;
    loop {
        let batch = sqlx::query(&format!(
            "WITH picked AS (
                SELECT ctid FROM {table}
                WHERE locked_by IS NULL
                LIMIT $1
                FOR UPDATE SKIP LOCKED
             ), gone AS (
                DELETE FROM {table} o WHERE o.ctid = ANY (ARRAY(SELECT ctid FROM picked))
                RETURNING o.*
             )
             INSERT INTO outbox SELECT * FROM gone"
        ))
        .bind(policy.move_batch)
        .execute(pool)
        .await?
        .rows_affected();
        moved += batch;
        if batch < policy.move_batch as u64 {
            break;
        }
    }
    // What is left (leased rows), and the snapshot that found it: the
    // locked step takes these rows by id, and rows inserted since by
    // transactions this snapshot did not see as ended by their
    // `enqueue_xid`, so it never reads the segment itself. At tens of
    // thousands of events a second a segment holds hundreds of thousands of
    // finished rows, and reading them while holding its lock stalled every
    // claim and producer for as long.
    let (left, seen): (Vec<Uuid>, String) = sqlx::query_as(&format!(
        "SELECT coalesce(array_agg(id), '{{}}'), pg_current_snapshot()::text FROM {table}"
    ))
    .fetch_one(pool)
    .await?;
    let mut tx = super::begin_with_lock_timeout(pool, policy.lock_timeout).await?;
    let locked_step = async {
        // The switch first, so that no wait for `outbox_segments` (a
        // compaction holds it for a moment) happens while the segment's
        // lock holds up claims and producers. Only from the segment read
        // above: a rotator that lost leadership while it waited must not
        // switch back and empty the segment now current.
        let switched = sqlx::query(
            "UPDATE outbox_segments
             SET current = $1, switched_at = now(), rotations = rotations + 1
             WHERE current = $2",
        )
        .bind(next as i16)
        .bind(current)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if switched == 0 {
            return Ok(None);
        }
        sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
            .execute(&mut *tx)
            .await?;
        // Index look-ups whatever the segment's statistics say.
        sqlx::query("SET LOCAL enable_seqscan = off")
            .execute(&mut *tx)
            .await?;
        let left = sqlx::query(&format!(
            "INSERT INTO outbox SELECT * FROM {table} o
             WHERE o.id = ANY ($1::uuid[])
                OR o.enqueue_xid >= pg_snapshot_xmax($2::text::pg_snapshot)
                OR o.enqueue_xid = ANY (ARRAY(SELECT pg_snapshot_xip($2::text::pg_snapshot)))"
        ))
        .bind(&left)
        .bind(&seen)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(&format!("TRUNCATE {table}"))
            .execute(&mut *tx)
            .await?;
        Ok::<_, sqlx::Error>(Some(left))
    }
    .await;
    match locked_step {
        Ok(Some(left)) => {
            tx.commit().await?;
            Ok(Rotation::Rotated {
                segment: next,
                moved: moved + left,
            })
        }
        Ok(None) => {
            tx.rollback().await?;
            Ok(Rotation::NotDue)
        }
        Err(err) if super::is_lock_conflict(&err) => {
            tx.rollback().await?;
            Ok(Rotation::Blocked { moved })
        }
        Err(err) => Err(err.into()),
    }
}

/// `VACUUM (SKIP_LOCKED)` of each segment that no vacuum is on already;
/// returns the dead tuples the segments still hold afterwards (those an
/// open snapshot keeps, as the vacuums counted them).
///
/// Autovacuum leaves the segments alone (migration 0034): its lock, held
/// for as long as it runs, kept [`rotate`] out, and PostgreSQL would not
/// cancel it for a lock wait as short as the rotation's. The rotator calls
/// this only while rotations stay blocked (a session holds a segment), when
/// the segments would otherwise grow without bound.
pub async fn vacuum(pool: &PgPool) -> Result<i64, Error> {
    for table in TABLES {
        super::vacuum_skip_locked(pool, table).await?;
    }
    let left: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(n_dead_tup), 0)::int8 FROM pg_stat_user_tables
         WHERE relid = ANY (ARRAY[to_regclass($1), to_regclass($2), to_regclass($3)])",
    )
    .bind(TABLES[0])
    .bind(TABLES[1])
    .bind(TABLES[2])
    .fetch_one(pool)
    .await?;
    Ok(left)
}

/// The current segment (an index into [`TABLES`]) and how many rotations
/// there have been.
pub async fn current(pool: &PgPool) -> Result<(usize, i64), Error> {
    let (current, rotations): (i16, i64) =
        sqlx::query_as("SELECT current, rotations FROM outbox_segments")
            .fetch_optional(pool)
            .await?
            .unwrap_or((0, 0));
    Ok((usize::try_from(current).unwrap_or(0), rotations))
}
