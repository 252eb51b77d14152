//! The dispatcher's statements: claim, heartbeat, complete, retry, dead-letter,
//! release; and an operator's cancel. Every statement that ends a claim names the row's fencing token, so
//! a worker whose lease was taken over changes nothing.
//!
//! Claimable means `run_at <= now()` and no live lease (`locked_until` unset or
//! past): a row whose worker crashed is claimable again once its lease runs
//! out. A claim only writes unindexed columns, so PostgreSQL can update the
//! row in place (a HOT update) instead of adding index entries for every claim.
//!
//! Statements that take rows by id from an array find and lock each row with
//! its own probe of the primary key (`lease_lookup!`), then change it by id
//! alone or by `ctid`, never through a join on `id`; or, for a completion,
//! change the rows of `id = ANY (…)` and keep those whose `(id, token)` a
//! hash of the pairs holds, which leaves the scan of `outbox` its probes.
//! While an old snapshot is held, vacuum finds almost no live rows and the
//! statistics say so; the planner then costs a read of a whole index (the
//! primary key, or `outbox_due_idx`, which also holds `id`) as cheap as the
//! probes, and chose it: 1.2 s, then 15 s, for one completion after ten
//! minutes of a held snapshot. A probe inside a `LATERAL` subquery with a
//! `LIMIT` can only be a nested loop over the ids; `id = ANY (…)` with no
//! join can only be probes of the primary key (no other index holds `id`
//! for it: `outbox_due_idx` is partial, migration 0017, and sequential
//! scans are off); a `ctid` can only be reached by a TID scan.
//!
//! The statements live in private files by concern (claiming, the ends of a
//! lease, transactional handling, inspection, the attempt history); every item is re-exported
//! here, so its path is `store::outbox::NAME`.

use uuid::Uuid;

use crate::model::{ClaimedEvent, Lease};

/// [`LATE_MARGIN`] as an SQL interval's text.
macro_rules! late_margin {
    () => {
        "250 milliseconds"
    };
}

/// How far behind now claim positions stay: a producer's rows carry the
/// start of its transaction as `run_at`, so rows of a transaction shorter
/// than this are claimed without waiting for the positions to move back
/// to them (see [`advance_positions`]).
pub const LATE_MARGIN: std::time::Duration = std::time::Duration::from_millis(250);

/// When the row `o` is really due: a priority moves `run_at` earlier
/// (migration 0022), `not_before` keeps the time it was asked for.
macro_rules! due_at {
    () => {
        "coalesce(o.not_before, o.run_at + make_interval(secs => o.priority * 10))"
    };
}

/// The state of the row `o` that has not finished (`running`, `retrying`,
/// `scheduled` or `due`), given its due time `$due`.
macro_rules! row_state {
    ($due:literal) => {
        concat!(
            "CASE WHEN o.locked_until > now() THEN 'running'
                 WHEN ",
            $due,
            " > now() AND o.last_error IS NOT NULL AND o.attempt_count > 0 THEN 'retrying'
                 WHEN ",
            $due,
            " > now() THEN 'scheduled'
                 ELSE 'due' END"
        )
    };
}

/// What a `done` CTE returns: the id, and for a dead-letter-trigger row the
/// dead letter it handled (the payload itself is not copied for every row).
macro_rules! done_returning {
    () => {
        "RETURNING o.id,
        CASE WHEN o.source = 'dead_letter' THEN o.payload->>'dead_letter_id' END AS dead_letter_id"
    };
}

/// The `LATERAL` subquery that finds and locks the row of `t.id` still
/// holding lease `t.token` through the primary key, one probe per id
/// whatever the statistics say (see the module docs); `$lock` is the locking
/// clause. Its `ctid` column is the row's version that was locked: when the
/// lock had to wait for another statement that changed the row (a
/// heartbeat), that version is newer than the statement's snapshot, and a
/// change by `ctid` in the same statement does not see it. Statements that
/// change rows by `ctid` after a lookup that may wait therefore report the
/// row as unchanged and are run once more for those rows.
macro_rules! lease_lookup {
    ($lock:literal) => {
        concat!(
            "CROSS JOIN LATERAL (
        SELECT i.tableoid, i.ctid FROM outbox i
        WHERE i.id = t.id AND i.lease_token = t.token
        LIMIT 1 ",
            $lock,
            "
    ) AS i"
        )
    };
}

/// The `done` CTE: deletes the finished rows whose ids and fencing tokens
/// are the two array parameters named, returning as [`done_returning`].
/// The rows are reached by probes of the primary keys (`id = ANY`, which no
/// other index can serve: see the module docs) and kept by a hash of the
/// `(id, token)` pairs. The `DELETE` locks each row itself: a row a
/// heartbeat is changing is waited for, and its token checked again on its
/// newest version, so a row taken over meanwhile is left alone. (Finding
/// and locking each row with `lease_lookup!` first, then deleting it, locked
/// and probed every row twice: a quarter of a completion's time.)
macro_rules! done_cte {
    ($ids:literal, $tokens:literal) => {
        concat!(
            "done AS (
    DELETE FROM outbox o
    WHERE o.id = ANY (",
            $ids,
            "::uuid[])
      AND (o.id, o.lease_token) IN (SELECT * FROM unnest(",
            $ids,
            "::uuid[], ",
            $tokens,
            "::int8[]))
    ",
            done_returning!(),
            "
)"
        )
    };
}

/// Marks the dead letters behind successful dead-letter-trigger rows
/// `handled_by_script`; expects a `done` CTE ending in [`done_returning`].
macro_rules! handled_by_script_cte {
    () => {
        "handled AS (
    UPDATE dead_letters d SET resolution = 'handled_by_script', resolved_at = now()
    FROM done
    WHERE done.dead_letter_id ~ '^[0-9a-fA-F-]{36}$'
      AND d.id = done.dead_letter_id::uuid
      AND d.resolved_at IS NULL
    RETURNING d.id
)"
    };
}

/// The apps a claim visits, each with where its scan starts: every
/// unsuspended app, from its first row. Columns `id`, `from_run_at`, `from_id`.
macro_rules! apps_from_start {
    () => {
        "SELECT id, '-infinity'::timestamptz AS from_run_at,
                '00000000-0000-0000-0000-000000000000'::uuid AS from_id
         FROM apps WHERE suspended_at IS NULL"
    };
}

/// As [`apps_from_start`], but each app from its [`Positions`] entry (the
/// three parameters are its arrays: apps, `run_at`s, ids); an app without
/// one starts from its first row. No scan starts later than
/// [`LATE_MARGIN`](super::LATE_MARGIN) before now: positions never do, and
/// positions moved past claimed rows ([`Positions::move_past`]) must not pass
/// the rows of a producer's transaction that is about to commit.
macro_rules! apps_from_positions {
    ($apps:literal, $run_at:literal, $ids:literal) => {
        concat!(
            "SELECT a.id,
                CASE WHEN p.run_at IS NULL OR p.run_at < now() - interval '",
            late_margin!(),
            "'
                     THEN coalesce(p.run_at, '-infinity')
                     ELSE now() - interval '",
            late_margin!(),
            "' END AS from_run_at,
                CASE WHEN p.run_at IS NULL OR p.run_at < now() - interval '",
            late_margin!(),
            "'
                     THEN coalesce(p.id, '00000000-0000-0000-0000-000000000000')
                     ELSE '00000000-0000-0000-0000-000000000000' END AS from_id
         FROM apps a
         LEFT JOIN unnest(",
            $apps,
            "::uuid[], ",
            $run_at,
            "::timestamptz[], ",
            $ids,
            "::uuid[]) AS p(app_id, run_at, id) ON p.app_id = a.id
         WHERE a.suspended_at IS NULL"
        )
    };
}

/// The condition that a row's topic is served, from the five parameters of
/// a [`Served`](crate::topics::Served): every topic, or one of the exact
/// topics, or one matching a regular expression and not excluded; and not
/// paused (the key test only runs while something is paused, and builds a
/// row's key only when its topic is paused or limited in some app: the
/// topics are cut from the keys, `app id/topic`, once per statement).
macro_rules! served_filter {
    ($all:literal, $exact:literal, $regexes:literal, $excluded:literal, $paused:literal) => {
        concat!(
            "AND (",
            $all,
            "::bool OR o.topic = ANY (",
            $exact,
            "::text[]) OR (o.topic ~ ANY (",
            $regexes,
            "::text[]) AND o.topic <> ALL (",
            $excluded,
            "::text[])))
          AND (cardinality(",
            $paused,
            "::text[]) = 0
               OR o.topic <> ALL (ARRAY(SELECT substr(k, 38) FROM unnest(",
            $paused,
            "::text[]) AS k))
               OR (o.app_id::text || '/' || o.topic) <> ALL (",
            $paused,
            "::text[]))"
        )
    };
}

/// That the row `o` may be claimed now: due (a priority moves `run_at`
/// earlier, never past `not_before`), not leased, and, with an ordering
/// key, the oldest row of its key while no transaction that could still
/// commit an earlier row of that key is open.
macro_rules! claimable {
    () => {
        "o.run_at <= now()
          AND (o.not_before IS NULL OR o.not_before <= now())
          AND (o.locked_until IS NULL OR o.locked_until < now())
          AND (o.ordering_key IS NULL OR (
                o.enqueue_xid < pg_snapshot_xmin(pg_current_snapshot())
                AND NOT EXISTS (
                    SELECT 1 FROM outbox e
                    WHERE e.app_id = o.app_id
                      AND e.ordering_key = o.ordering_key
                      AND (e.enqueue_xid, e.id) < (o.enqueue_xid, o.id))))"
    };
}

/// Picks up to `$1` claimable rows of the apps `$apps` lists (see
/// [`apps_from_start`]) whose topic `$served` (a [`served_filter`]) takes,
/// apps in random order (fairness), and locks them.
/// Each app's scan starts at its `from_run_at`/`from_id`, so it does not
/// walk over the finished rows behind that point. Shared by [`claim`],
/// [`complete_and_claim`] and [`take`].
macro_rules! picked_cte {
    ($apps:expr, $served:expr) => {
        picked_cte!($apps, $served, "")
    };
    ($apps:expr, $served:expr, $extra:literal) => {
        concat!(
            "picked AS (
    SELECT c.tableoid, c.ctid
    FROM (",
            $apps,
            " ORDER BY random()) AS a
    CROSS JOIN LATERAL (
        SELECT o.tableoid, o.ctid
        FROM outbox o
        WHERE o.app_id = a.id
          AND (o.run_at, o.id) >= (a.from_run_at, a.from_id)
          AND ",
            claimable!(),
            "
        ",
            $served,
            "
        ",
            $extra,
            "
        ORDER BY o.run_at, o.id
        LIMIT $1
        FOR UPDATE OF o SKIP LOCKED
    ) AS c
    LIMIT $1
)"
        )
    };
}

/// The columns of a [`ClaimedEvent`].
macro_rules! claimed_columns {
    () => {
        concat!(
            "o.id, o.app_id, o.source, o.op, o.topic, o.trigger_id, o.target, o.payload, o.headers,
          o.idempotency_key, o.ordering_key, o.depth, o.attempt_count, o.max_attempts,
          o.lease_token, o.locked_until, o.first_attempt_at, o.reply_to,
          o.registered_by_principal, o.created_at,
          CASE WHEN isfinite(o.run_at) THEN o.run_at END AS run_at,
          CASE WHEN isfinite(o.run_at) THEN ",
            due_at!(),
            " END AS due_at"
        )
    };
}

/// Reads the columns of `claimed_columns!` by position: looking twenty-two
/// column names up for every claimed row was a measurable share of the
/// dispatcher's CPU. Further columns may follow them.
impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for ClaimedEvent {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok(Self {
            id: row.try_get(0)?,
            app_id: row.try_get(1)?,
            source: row.try_get(2)?,
            op: row.try_get(3)?,
            topic: row.try_get(4)?,
            trigger_id: row.try_get(5)?,
            target: row.try_get(6)?,
            payload: row.try_get(7)?,
            headers: row.try_get(8)?,
            idempotency_key: row.try_get(9)?,
            ordering_key: row.try_get(10)?,
            depth: row.try_get(11)?,
            attempt_count: row.try_get(12)?,
            max_attempts: row.try_get(13)?,
            lease_token: row.try_get(14)?,
            locked_until: row.try_get(15)?,
            first_attempt_at: row.try_get(16)?,
            reply_to: row.try_get(17)?,
            registered_by_principal: row.try_get(18)?,
            created_at: row.try_get(19)?,
            run_at: row.try_get(20)?,
            due_at: row.try_get(21)?,
        })
    }
}

/// How many columns `claimed_columns!` lists.
const CLAIMED_COLUMNS: usize = 22;

/// That the row `o` is one of the rows of the CTE `picked` (its columns
/// `tableoid` and `ctid`). A `ctid` names a row within one table only, and
/// `outbox` has its segments as children (migration 0032): each table is
/// reached by a TID scan of the picked `ctid`s, and keeps those of its own
/// through a hash join on both columns. (Comparing each row with an array
/// of `(tableoid, ctid)` records instead cost a record comparison per pair:
/// a quarter of a million for a batch of 500, most of a claim's time.)
macro_rules! in_picked {
    () => {
        "o.ctid = ANY (ARRAY(SELECT ctid FROM picked))
  AND (o.tableoid, o.ctid) IN (SELECT tableoid, ctid FROM picked)"
    };
}

/// Leases the picked rows: bumps the attempt and the fencing token.
macro_rules! lease_picked {
    () => {
        concat!(
            "UPDATE outbox o
SET attempt_count    = o.attempt_count + 1,
    lease_token      = o.lease_token + 1,
    locked_by        = $2,
    locked_until     = now() + make_interval(secs => $3),
    first_attempt_at = coalesce(o.first_attempt_at, now()),
    last_attempt_at  = now()
WHERE ",
            in_picked!(),
            "
RETURNING ",
            claimed_columns!()
        )
    };
}

fn split(leases: &[Lease]) -> (Vec<Uuid>, Vec<i64>) {
    leases.iter().map(|l| (l.id, l.token)).unzip()
}

#[macro_use]
mod history;

mod browse;
mod cancel;
mod claiming;
mod count;
mod inspect;
mod leases;
mod limited;
mod positions;
mod tx;

pub use browse::*;
pub use cancel::*;
pub use claiming::*;
pub use count::*;
pub use history::*;
pub use inspect::*;
pub use leases::*;
pub use limited::*;
pub use positions::*;
pub use tx::*;

#[cfg(test)]
mod tests {
    use super::CLAIMED_COLUMNS;

    /// `ClaimedEvent`'s `FromRow` reads by position: the column list must
    /// name the fields in the order it reads them.
    #[test]
    fn the_claimed_columns_are_in_the_order_the_row_is_decoded() {
        // Split at the commas between columns, not those inside a call.
        let mut depth = 0;
        let columns: Vec<&str> = claimed_columns!()
            .split(|c: char| {
                depth += i32::from(c == '(') - i32::from(c == ')');
                c == ',' && depth == 0
            })
            .map(|c| {
                c.rsplit(" AS ")
                    .next()
                    .unwrap_or(c)
                    .trim()
                    .trim_start_matches("o.")
            })
            .collect();
        assert_eq!(
            columns,
            [
                "id",
                "app_id",
                "source",
                "op",
                "topic",
                "trigger_id",
                "target",
                "payload",
                "headers",
                "idempotency_key",
                "ordering_key",
                "depth",
                "attempt_count",
                "max_attempts",
                "lease_token",
                "locked_until",
                "first_attempt_at",
                "reply_to",
                "registered_by_principal",
                "created_at",
                "run_at",
                "due_at",
            ]
        );
        assert_eq!(columns.len(), CLAIMED_COLUMNS);
    }

    #[test]
    fn the_late_margin_in_sql_is_the_constant() {
        assert_eq!(
            late_margin!(),
            format!("{} milliseconds", super::LATE_MARGIN.as_millis())
        );
    }
}
