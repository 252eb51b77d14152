//! Claim positions: where each app's claim scan starts.
//!
//! A deleted row stays in `outbox_due_idx` until vacuum removes it, and
//! vacuum cannot remove it while any session holds a snapshot older than the
//! delete (a `pg_dump`, a long report, an `idle in transaction` session). A
//! claim that scanned from an app's first row would visit every such entry
//! before finding live work, so the cost of a claim would grow with the time
//! the snapshot has been held. Scanning from a position instead bounds the
//! walk by the rows finished since the position was taken.
//!
//! A position is the `(run_at, id)` of the first row of the app that was
//! still there when the position was taken, but never later than a little
//! before that moment. A row can appear behind it afterwards only if the
//! transaction that inserts it commits later: [`advance_positions`] finds
//! those rows by the transaction id they carry (`enqueue_xid`), comparing it
//! with the snapshot the previous positions were taken in, and moves the
//! position back to them.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Error;
use crate::model::ClaimedEvent;
use crate::topics::Served;

/// Where a claim loop's scans start, one entry per app; an app without an
/// entry is scanned from its first row. Taken and moved on by
/// [`advance_positions`]; [`Positions::default`] is every app from its
/// first row.
#[derive(Debug, Clone, Default)]
pub struct Positions {
    pub(crate) apps: Vec<Uuid>,
    /// `None` is `-infinity` (a row may be due since then), which the
    /// driver cannot represent.
    pub(crate) run_at: Vec<Option<DateTime<Utc>>>,
    pub(crate) ids: Vec<Uuid>,
    /// The snapshot the positions were taken in (`pg_snapshot` as text): rows
    /// of transactions it did not see as ended may lie behind them.
    snapshot: Option<String>,
}

impl Positions {
    /// Where `app`'s scan starts, when it has a position (a `run_at` of
    /// `None` is `-infinity`).
    pub fn of(&self, app: Uuid) -> Option<(Option<DateTime<Utc>>, Uuid)> {
        let i = self.apps.iter().position(|a| *a == app)?;
        Some((self.run_at[i], self.ids[i]))
    }
}

/// The statement of [`advance_positions`] (`$1`–`$3` the previous
/// positions' arrays, `$4` their snapshot as text, `$5` the margin in
/// seconds, `$6`–`$10` the [`Served`] topics), for `EXPLAIN`.
pub const ADVANCE_POSITIONS_SQL: &str = concat!(
    "WITH prev AS (
    SELECT a.id AS app_id,
           coalesce(p.run_at, '-infinity') AS run_at,
           coalesce(p.id, '00000000-0000-0000-0000-000000000000') AS id
    FROM apps a
    LEFT JOIN unnest($1::uuid[], $2::timestamptz[], $3::uuid[]) AS p(app_id, run_at, id)
      ON p.app_id = a.id
 ), unseen AS MATERIALIZED (
    SELECT o.app_id, o.run_at, o.id FROM outbox o
    WHERE o.enqueue_xid >= pg_snapshot_xmax($4::text::pg_snapshot)
    ",
    served_filter!("$6", "$7", "$8", "$9", "$10"),
    "
    UNION ALL
    SELECT o.app_id, o.run_at, o.id FROM outbox o
    WHERE o.enqueue_xid = ANY (ARRAY(SELECT pg_snapshot_xip($4::text::pg_snapshot)))
    ",
    served_filter!("$6", "$7", "$8", "$9", "$10"),
    "
 ), unseen_first AS (
    SELECT DISTINCT ON (app_id) app_id, run_at, id FROM unseen ORDER BY app_id, run_at, id
 )
 SELECT prev.app_id, CASE WHEN isfinite(next.run_at) THEN next.run_at END, next.id,
        pg_current_snapshot()::text
 FROM prev
 CROSS JOIN LATERAL (
    SELECT c.run_at, c.id FROM (
        (SELECT o.run_at, o.id FROM outbox o
         WHERE o.app_id = prev.app_id AND (o.run_at, o.id) >= (prev.run_at, prev.id)
         AND o.run_at <= now() - make_interval(secs => $5)
         ",
    served_filter!("$6", "$7", "$8", "$9", "$10"),
    "
         ORDER BY o.run_at, o.id LIMIT 1)
        UNION ALL
        (SELECT u.run_at, u.id FROM unseen_first u WHERE u.app_id = prev.app_id)
        UNION ALL
        SELECT now() - make_interval(secs => $5),
               '00000000-0000-0000-0000-000000000000'::uuid
    ) AS c
    ORDER BY c.run_at, c.id
    LIMIT 1
 ) AS next"
);

/// Finds each app's position from its previous one: the first row still
/// there at or after it, or a row inserted behind it by a transaction that
/// `previous` did not see as ended, whichever comes first — and never later
/// than `margin` before now, so that a producer's transaction that began a
/// moment ago (its rows' `run_at` is its start) is claimed without waiting
/// for the next advance.
///
/// Only rows whose topic `served` takes count: a position moves past the
/// rows of paused and unserved topics, so claims do not walk over them
/// again. When `served` takes more than before (a resume, a process that
/// left), positions must be taken afresh ([`Positions::default`]): rows it
/// passed may be claimable now.
///
/// The scan from the previous position walks only what was finished since
/// it was taken, and the lookup by transaction id only the rows inserted
/// since, so the cost does not grow while an old snapshot is held. It stops
/// at the margin before now, which caps the position anyway: rows due
/// later (a delay, a day of scheduled jobs) of a topic this process does
/// not serve were otherwise read on every advance, 300,000 of them taking
/// 200–300 ms each time. Run it
/// on a connection with [`claim_connect_options`](super::claim_connect_options):
/// planned for an unknown snapshot on a short queue, the lookup would
/// otherwise read the whole table.
pub async fn advance_positions<'e>(
    db: impl PgExecutor<'e>,
    previous: &Positions,
    served: &Served,
    margin: Duration,
) -> Result<Positions, Error> {
    let rows: Vec<(Uuid, Option<DateTime<Utc>>, Uuid, String)> =
        sqlx::query_as(ADVANCE_POSITIONS_SQL)
            .bind(&previous.apps)
            .bind(&previous.run_at)
            .bind(&previous.ids)
            .bind(previous.snapshot.as_deref())
            .bind(margin.as_secs_f64())
            .bind(served.all)
            .bind(&served.exact)
            .bind(&served.regexes)
            .bind(&served.excluded)
            .bind(&served.paused)
            .fetch_all(db)
            .await?;
    let mut next = Positions {
        apps: Vec::with_capacity(rows.len()),
        run_at: Vec::with_capacity(rows.len()),
        ids: Vec::with_capacity(rows.len()),
        snapshot: None,
    };
    for (app, run_at, id, snapshot) in rows {
        next.apps.push(app);
        next.run_at.push(run_at);
        next.ids.push(id);
        next.snapshot = Some(snapshot);
    }
    Ok(next)
}

impl Positions {
    /// Moves each app's entry on to the last of `claimed` in claim order
    /// when that lies further. A claim from the result skips what a
    /// claim loop took since the positions were taken (rows still leased,
    /// which a claim from the positions walks over and leaves); a claim
    /// must still start from the positions themselves now and then, for
    /// the rows behind these that became claimable again (a lease that ran
    /// out, a claim that was rolled back).
    pub fn move_past(&mut self, claimed: &[ClaimedEvent]) {
        // A `run_at` that is not finite sorts first (`-infinity`), or is
        // `infinity`, after which nothing is due: neither moves.
        self.raise(
            claimed
                .iter()
                .filter_map(|row| row.run_at.map(|at| (row.app_id, Some(at), row.id))),
        );
    }

    /// These positions, each app's moved on to its entry in `other` when
    /// that lies further.
    pub fn at_least(&self, other: &Positions) -> Positions {
        let mut moved = self.clone();
        moved.raise(
            other
                .apps
                .iter()
                .zip(&other.run_at)
                .zip(&other.ids)
                .map(|((app, run_at), id)| (*app, *run_at, *id)),
        );
        moved
    }

    /// Moves each app's entry on to its `(run_at, id)` of `entries` when
    /// that lies further (an app without an entry starts from its first
    /// row, before any row). The apps are looked up in a map: a claim makes
    /// this call, and one process may serve thousands of apps.
    fn raise(&mut self, entries: impl Iterator<Item = (Uuid, Option<DateTime<Utc>>, Uuid)>) {
        let mut index: HashMap<Uuid, usize> = self
            .apps
            .iter()
            .enumerate()
            .map(|(i, app)| (*app, i))
            .collect();
        for (app, run_at, id) in entries {
            match index.get(&app) {
                Some(&i) => {
                    if (run_at, id) > (self.run_at[i], self.ids[i]) {
                        self.run_at[i] = run_at;
                        self.ids[i] = id;
                    }
                }
                None => {
                    index.insert(app, self.apps.len());
                    self.apps.push(app);
                    self.run_at.push(run_at);
                    self.ids.push(id);
                }
            }
        }
    }

    /// These positions, each moved back to `floor`'s entry for its app where
    /// that one is earlier (an app without an entry already starts from its
    /// first row). The snapshot stays these positions', or becomes
    /// `floor`'s when these have none.
    pub fn lowered_to(&self, floor: &Positions) -> Positions {
        let mut lowered = self.clone();
        for (i, app) in floor.apps.iter().enumerate() {
            let key = (floor.run_at[i], floor.ids[i]);
            if let Some(j) = lowered.apps.iter().position(|a| a == app)
                && key < (lowered.run_at[j], lowered.ids[j])
            {
                lowered.run_at[j] = key.0;
                lowered.ids[j] = key.1;
            }
        }
        if lowered.snapshot.is_none() {
            lowered.snapshot.clone_from(&floor.snapshot);
        }
        lowered
    }
}

/// Takes positions afresh, every app from its first row whose topic
/// `served` takes, within `budget`
/// when one is given: `None` when the scan took longer (while an old
/// snapshot is held it walks every row finished since).
///
/// Positions only move back for rows inserted behind them; this finds a row
/// whose `run_at` was moved earlier by hand (an operator's `UPDATE`), which
/// a claim loop's positions may have passed.
pub async fn rewind_positions(
    pool: &sqlx::PgPool,
    served: &Served,
    margin: Duration,
    budget: Option<Duration>,
) -> Result<Option<Positions>, Error> {
    let mut tx = pool.begin().await?;
    // Without a budget, a timeout set for the role must not cut it short.
    let timeout = budget.map_or_else(|| "0".to_owned(), |b| format!("{}ms", b.as_millis().max(1)));
    sqlx::query("SELECT set_config('statement_timeout', $1, true)")
        .bind(timeout)
        .execute(&mut *tx)
        .await?;
    match advance_positions(&mut *tx, &Positions::default(), served, margin).await {
        Ok(positions) => {
            tx.commit().await?;
            Ok(Some(positions))
        }
        Err(Error::Database(sqlx::Error::Database(err)))
            if err.code().as_deref() == Some("57014") =>
        {
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp(secs, 0)
    }

    #[test]
    fn lowering_keeps_the_earlier_entry_of_each_app() {
        let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let own = Positions {
            apps: vec![a, b],
            run_at: vec![at(10), at(10)],
            ids: vec![Uuid::from_u128(5), Uuid::from_u128(5)],
            snapshot: Some("10:10:".into()),
        };
        let floor = Positions {
            apps: vec![a, b, c],
            run_at: vec![at(5), at(20), at(7)],
            ids: vec![Uuid::nil(), Uuid::nil(), Uuid::nil()],
            snapshot: Some("3:3:".into()),
        };
        let lowered = own.lowered_to(&floor);
        assert_eq!(lowered.of(a), Some((at(5), Uuid::nil())));
        assert_eq!(lowered.of(b), Some((at(10), Uuid::from_u128(5))));
        assert_eq!(
            lowered.of(c),
            None,
            "an app without a position starts from its first row"
        );
        assert_eq!(lowered.snapshot.as_deref(), Some("10:10:"));
        let fresh = Positions::default().lowered_to(&floor);
        assert_eq!(fresh.snapshot.as_deref(), Some("3:3:"));
    }

    #[test]
    fn moving_past_claimed_rows_keeps_the_later_entry_of_each_app() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let own = Positions {
            apps: vec![a, b],
            run_at: vec![at(10), at(10)],
            ids: vec![Uuid::from_u128(5), Uuid::from_u128(5)],
            snapshot: Some("10:10:".into()),
        };
        let other = Positions {
            apps: vec![a, b],
            run_at: vec![at(20), at(10)],
            ids: vec![Uuid::nil(), Uuid::from_u128(4)],
            snapshot: None,
        };
        let moved = own.at_least(&other);
        assert_eq!(moved.of(a), Some((at(20), Uuid::nil())));
        assert_eq!(moved.of(b), Some((at(10), Uuid::from_u128(5))));
        assert_eq!(moved.snapshot.as_deref(), Some("10:10:"));
        let from_first = Positions::default().at_least(&other);
        assert_eq!(from_first.of(b), Some((at(10), Uuid::from_u128(4))));
        // The rows of one claim name an app many times, in any order.
        let rows = Positions {
            apps: vec![a, a, a],
            run_at: vec![at(30), at(40), at(35)],
            ids: vec![Uuid::nil(); 3],
            snapshot: None,
        };
        assert_eq!(
            Positions::default().at_least(&rows).of(a),
            Some((at(40), Uuid::nil()))
        );
    }

    #[test]
    fn minus_infinity_comes_first() {
        let app = Uuid::from_u128(1);
        let own = Positions {
            apps: vec![app],
            run_at: vec![at(10)],
            ids: vec![Uuid::nil()],
            snapshot: None,
        };
        let floor = Positions {
            apps: vec![app],
            run_at: vec![None],
            ids: vec![Uuid::nil()],
            snapshot: None,
        };
        assert_eq!(own.lowered_to(&floor).of(app), Some((None, Uuid::nil())));
    }
}
