//! Claiming: the claim statement, the combined complete-and-claim, and the
//! connection options of a claim loop.

use std::time::Duration;

use sqlx::PgExecutor;
use sqlx::postgres::PgConnectOptions;
use uuid::Uuid;

use super::{CLAIMED_COLUMNS, Positions, split};
use crate::Error;
use crate::model::{ClaimedEvent, Lease};
use crate::topics::Served;

const CLAIM: &str = concat!(
    "WITH ",
    picked_cte!(
        apps_from_start!(),
        served_filter!("$4", "$5", "$6", "$7", "$8")
    ),
    "\n",
    lease_picked!()
);

/// The claim statement (`$1` limit, `$2` worker, `$3` lease seconds, `$4`–`$8`
/// the [`Served`] topics), for `EXPLAIN` in the benchmark.
pub const CLAIM_SQL: &str = CLAIM;

/// One round trip, one commit: delete the finished rows `$4`/`$5` (ids and
/// fencing tokens) and claim the next batch from the positions `$6`–`$8`. The single row of `done` is
/// joined to the claimed rows so the deleted count arrives even when nothing
/// was claimed.
const COMPLETE_AND_CLAIM: &str = concat!(
    "WITH ",
    done_cte!("$4", "$5"),
    ", ",
    handled_by_script_cte!(),
    ", ",
    picked_cte!(
        apps_from_positions!("$6", "$7", "$8"),
        served_filter!("$9", "$10", "$11", "$12", "$13")
    ),
    ", claimed AS (\n",
    lease_picked!(),
    "\n)
SELECT c.*, d.completed
FROM (SELECT count(*) AS completed FROM done) AS d
LEFT JOIN claimed AS c ON true"
);

/// The complete-and-claim statement (`$4` ids and `$5` tokens done, then as
/// [`CLAIM_SQL`] from the positions `$6`–`$8` for the [`Served`] topics
/// `$9`–`$13`), for `EXPLAIN` in the benchmark.
pub const COMPLETE_AND_CLAIM_SQL: &str = COMPLETE_AND_CLAIM;

/// Claims up to `limit` due rows for `worker`, leasing them for `lease`,
/// scanning every app from its first row (tests and one-off runs; a claim
/// loop uses [`complete_and_claim`] with its [`Positions`]).
///
/// The picked rows are locked by the same statement, so their `ctid` cannot
/// change before the `UPDATE` reaches them; joining on it skips a primary-key
/// lookup per row.
/// Apps are visited in random order each call, so one busy app cannot starve
/// the others. A row with an ordering key is claimable only when it is the
/// oldest row of its key and no transaction that could still commit an earlier
/// row of that key is open.
pub async fn claim<'e>(
    db: impl PgExecutor<'e>,
    worker: &str,
    limit: u32,
    lease: Duration,
) -> Result<Vec<ClaimedEvent>, Error> {
    claim_served(db, &Served::everything(), worker, limit, lease).await
}

/// As [`claim`], but only rows whose topic `served` takes.
pub async fn claim_served<'e>(
    db: impl PgExecutor<'e>,
    served: &Served,
    worker: &str,
    limit: u32,
    lease: Duration,
) -> Result<Vec<ClaimedEvent>, Error> {
    let limit = i64::from(limit.max(1));
    Ok(sqlx::query_as(CLAIM)
        .bind(limit)
        .bind(worker)
        .bind(lease.as_secs_f64())
        .bind(served.all)
        .bind(&served.exact)
        .bind(&served.regexes)
        .bind(&served.excluded)
        .bind(&served.paused)
        .fetch_all(db)
        .await?)
}

/// Options for a connection that runs [`complete_and_claim`] over and over:
/// it plans the statement once (a generic plan) instead of for every batch,
/// where planning took about a sixth of the statement's time and grew with
/// the backlog. The statement is written so that its generic plan is the one
/// a custom plan would be (index scan for the pick, TID scan for the lease).
///
/// Without a known batch size the generic plan's cost grows with the backlog;
/// JIT stays off, as on every dispatcher connection ([`planner_options`]).
pub fn claim_connect_options(base: &PgConnectOptions) -> PgConnectOptions {
    planner_options(base).options([("plan_cache_mode", "force_generic_plan")])
}

/// Options every dispatcher connection needs, pooled or not: bitmap and
/// sequential scans off.
///
/// While an old snapshot is held, vacuum cannot remove the outbox's dead
/// rows, but it does record how many live rows it found — a few, for a
/// queue that keeps up — and the planner scales its estimates by that
/// count. A bitmap scan of `outbox_due_idx` (`app_id, run_at, id`) for an
/// `id` then looks as cheap as the primary key, although without its
/// leading columns it reads the whole index: measured at 35 ms per row
/// deleted after 8 minutes of a held snapshot at 800 events/s, against
/// microseconds through the primary key. Without bitmap scans, the planner
/// costs that scan for what it is and takes the primary key.
///
/// The same statistics make a sequential scan of the bloated table look
/// about as cheap as probing the primary key for a batch of ids: which of
/// the two wins then turns on the correlation ANALYZE computed from the few
/// live rows, a coin toss, and the losing side reads every dead row. A short
/// queue in a few pages invites the same plan, which a generic plan keeps
/// after the table has grown. Nothing outboxd runs on these connections
/// wants a whole table read where an index serves, so sequential scans
/// are off.
///
/// With them off, a statement on a table without a usable index (the
/// process table, the transactional batches) is costed in the billions,
/// past `jit_above_cost`, and PostgreSQL compiled each one to machine code:
/// about 300 ms of CPU for a beat of a millisecond, every second, which took
/// a quarter of the drain's throughput on two cores. Nothing outboxd runs
/// is long enough to gain from JIT, so it is off.
pub fn planner_options(base: &PgConnectOptions) -> PgConnectOptions {
    base.clone().options([
        ("enable_bitmapscan", "off"),
        ("enable_seqscan", "off"),
        ("jit", "off"),
    ])
}

/// Deletes the successfully handled rows of `done` and claims up to `limit`
/// more from `positions` whose topic `served` takes, in one statement (one commit). Returns how many of `done` were
/// deleted (the rest were fenced) and the claimed rows.
///
/// A row of `done` whose lease expired before this call could also be picked
/// by the claim half; PostgreSQL then applies only one of the two changes, so
/// such a row may run again (at-least-once), never get lost.
pub async fn complete_and_claim<'e>(
    db: impl PgExecutor<'e>,
    positions: &Positions,
    served: &Served,
    done: &[Lease],
    worker: &str,
    limit: u32,
    lease: Duration,
) -> Result<(usize, Vec<ClaimedEvent>), Error> {
    use sqlx::{FromRow, Row};
    let (ids, tokens) = split(done);
    let rows = sqlx::query(COMPLETE_AND_CLAIM)
        .bind(i64::from(limit.max(1)))
        .bind(worker)
        .bind(lease.as_secs_f64())
        .bind(&ids)
        .bind(&tokens)
        .bind(&positions.apps)
        .bind(&positions.run_at)
        .bind(&positions.ids)
        .bind(served.all)
        .bind(&served.exact)
        .bind(&served.regexes)
        .bind(&served.excluded)
        .bind(&served.paused)
        .fetch_all(db)
        .await?;
    let mut completed = 0;
    let mut claimed = Vec::with_capacity(rows.len());
    for row in &rows {
        completed = row.try_get::<i64, _>(CLAIMED_COLUMNS)? as usize;
        if row.try_get::<Option<Uuid>, _>(0)?.is_some() {
            claimed.push(ClaimedEvent::from_row(row)?);
        }
    }
    Ok((completed, claimed))
}
