//! Inspection: row counts, the oldest due row's age, and per-state counts.

use sqlx::PgExecutor;
use uuid::Uuid;

use crate::{Error, OutboxRow};

/// Counts rows, for tests and the CLI.
pub async fn count<'e>(db: impl PgExecutor<'e>) -> Result<i64, Error> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(db)
        .await?)
}

/// Counts rows that are leased right now.
pub async fn count_leased<'e>(db: impl PgExecutor<'e>) -> Result<i64, Error> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE locked_by IS NOT NULL AND locked_until > now()",
    )
    .fetch_one(db)
    .await?)
}

/// Age in seconds of the oldest due row, expired leases included (0 when none
/// is due), from when it was really due (a priority moves `run_at` earlier).
/// Rows held on purpose (a paused topic, a suspended app) are left out: they
/// are meant to wait, and an alert on this age must not fire for them. So
/// are rows running (a live lease): a handler that runs for minutes is not
/// a row falling behind.
pub async fn oldest_due_age<'e>(db: impl PgExecutor<'e>) -> Result<f64, Error> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(extract(epoch FROM now() - min(
                    coalesce(o.not_before, o.run_at + make_interval(secs => o.priority * 10))))::float8, 0)
         FROM outbox o JOIN apps a ON a.id = o.app_id AND a.suspended_at IS NULL
         WHERE o.run_at <= now() AND (o.not_before IS NULL OR o.not_before <= now())
           AND (o.locked_until IS NULL OR o.locked_until <= now())
           AND NOT EXISTS (SELECT 1 FROM outbox_topic_pauses p
                           WHERE p.app_id = o.app_id AND p.topic = o.topic)",
    )
    .fetch_one(db)
    .await?)
}

/// One row of `app_id` by id, with its state; `None` when the app has no
/// such row (it never existed, or it has finished).
pub async fn row<'e>(
    db: impl PgExecutor<'e>,
    app_id: Uuid,
    id: Uuid,
) -> Result<Option<OutboxRow>, Error> {
    Ok(sqlx::query_as(concat!(
        "SELECT o.id, o.app_id, ",
        row_state!("d.due_at"),
        " AS state,
                o.source, o.op, o.topic, o.trigger_id, o.target, o.payload, o.headers,
                o.idempotency_key, o.ordering_key, o.partition_key, o.priority, o.depth,
                o.attempt_count, o.max_attempts, d.due_at, o.locked_by, o.locked_until,
                o.first_attempt_at, o.last_attempt_at, o.last_error, o.registered_by_principal,
                o.replayed_from, o.created_at, ",
        attempts_with_newest!("o", default_error_chars!()),
        " AS attempts
         FROM outbox o
         CROSS JOIN LATERAL (SELECT ",
        due_at!(),
        " AS due_at) AS d
         WHERE o.id = $1 AND o.app_id = $2"
    ))
    .bind(id)
    .bind(app_id)
    .fetch_optional(db)
    .await?)
}

/// How many rows of one app and topic are in each state.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StateCounts {
    /// The app's slug.
    pub app: String,
    /// The topic.
    pub topic: String,
    /// Due now and not leased.
    pub due: i64,
    /// Due later (delayed, or waiting for a retry's backoff), not leased.
    pub scheduled: i64,
    /// Leased: a handler is running it.
    pub running: i64,
    /// Of `scheduled`, the rows waiting for a retry's backoff.
    pub retrying: i64,
    /// Due, but no live process serves the topic (`outbox_processes`): the
    /// rows wait for one. Equal to `due` or 0; 0 while they are `paused`.
    pub unserved: i64,
    /// Age in seconds of the oldest of the `unserved` rows (0 when none).
    pub unserved_age_secs: f64,
    /// Due, but held on purpose: the topic is paused or the app suspended.
    /// Equal to `due` or 0.
    pub paused: i64,
    /// Of `due`, rows with an ordering key whose transaction is not older
    /// than every open one that holds a transaction id: it (a session idle
    /// in transaction after a write) could yet commit an earlier row of
    /// their key, so none of them is claimed before it ends. Read-only
    /// transactions hold no id and nothing back.
    pub behind_open_transaction: i64,
}

/// `held`: whether the rows of `$topic` of app `$app` wait on purpose now
/// (the topic paused, or the app suspended).
macro_rules! held_now {
    ($app:expr, $topic:expr) => {
        concat!(
            "SELECT EXISTS (SELECT 1 FROM outbox_topic_pauses p WHERE p.app_id = ",
            $app,
            " AND p.topic = ",
            $topic,
            " UNION ALL SELECT 1 FROM apps a WHERE a.id = ",
            $app,
            " AND a.suspended_at IS NOT NULL) AS held"
        )
    };
}

/// `served`: whether a live process serves the topic `$topic` now, by name
/// or by pattern.
macro_rules! served_now {
    ($topic:expr) => {
        concat!(
            "SELECT EXISTS (
                SELECT 1 FROM outbox_processes p
                WHERE p.expires_at > now()
                  AND (",
            $topic,
            " = ANY (p.topics) OR ",
            $topic,
            " ~ ANY (p.regexes))) AS served"
        )
    };
}

/// The rows of every app and topic by state (`sampled`): its columns are
/// those of [`StateCounts`], with `app_id`, `oldest_due` and `total`.
/// It counts every row (a sequential scan).
macro_rules! sampled_states {
    () => {
        concat!(
            "WITH counts AS (
            SELECT a.id AS app_id, a.slug AS app, o.topic,
                count(*) FILTER (WHERE d.due_at <= now()
                                   AND (o.locked_until IS NULL OR o.locked_until <= now())) AS due,
                count(*) FILTER (WHERE d.due_at > now()
                                   AND (o.locked_until IS NULL OR o.locked_until <= now())) AS scheduled,
                count(*) FILTER (WHERE o.locked_until > now()) AS running,
                count(*) FILTER (WHERE d.due_at > now()
                                   AND (o.locked_until IS NULL OR o.locked_until <= now())
                                   AND o.last_error IS NOT NULL AND o.attempt_count > 0) AS retrying,
                min(d.due_at) FILTER (WHERE d.due_at <= now()
                                   AND (o.locked_until IS NULL OR o.locked_until <= now())) AS oldest_due,
                count(*) FILTER (WHERE d.due_at <= now()
                                   AND (o.locked_until IS NULL OR o.locked_until <= now())
                                   AND o.ordering_key IS NOT NULL
                                   AND o.enqueue_xid >= horizon.xmin)
                    AS behind_open_transaction,
                count(*) AS total
            FROM outbox o JOIN apps a ON a.id = o.app_id
            -- Once per statement, not once per row the scan passes.
            CROSS JOIN (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin) AS horizon
            CROSS JOIN LATERAL (SELECT ",
            due_at!(),
            " AS due_at) AS d
            GROUP BY a.id, a.slug, o.topic
         ), sampled AS (
            SELECT c.app_id, c.app, c.topic, c.due, c.scheduled, c.running, c.retrying, c.total,
                   c.behind_open_transaction, c.oldest_due, CASE WHEN s.served OR h.held THEN 0 ELSE c.due END AS unserved,
                   CASE WHEN s.served OR h.held OR c.oldest_due IS NULL THEN 0
                        ELSE extract(epoch FROM now() - c.oldest_due)::float8 END AS unserved_age_secs,
                   CASE WHEN h.held THEN c.due ELSE 0 END AS paused
            FROM counts c
            CROSS JOIN LATERAL (",
            served_now!("c.topic"),
            ") AS s
            CROSS JOIN LATERAL (",
            held_now!("c.app_id", "c.topic"),
            ") AS h
         )"
        )
    };
}

/// Rows per app, topic and state, most rows first. It counts every row (a
/// sequential scan), so one elected process samples it now and then
/// ([`record_state_counts`]), not every scrape or page.
pub async fn state_counts<'e>(db: impl PgExecutor<'e>) -> Result<Vec<StateCounts>, Error> {
    Ok(sqlx::query_as(concat!(
        sampled_states!(),
        " SELECT * FROM sampled ORDER BY total DESC"
    ))
    .fetch_all(db)
    .await?)
}

/// [`state_counts`], also written to `outbox_topic_states` (migration
/// 0025) in the same statement, for [`recorded_state_counts`] to read
/// cheaply (topics without rows left are removed there), and the rows due
/// and the oldest due age to the minute's `outbox_activity` (migration
/// 0029) for the console's charts.
pub async fn record_state_counts<'e>(db: impl PgExecutor<'e>) -> Result<Vec<StateCounts>, Error> {
    Ok(sqlx::query_as(concat!(
        sampled_states!(),
        ", gone AS (
            DELETE FROM outbox_topic_states t
            WHERE NOT EXISTS (SELECT 1 FROM sampled s
                              WHERE s.app_id = t.app_id AND s.topic = t.topic)
         ), kept AS (
            INSERT INTO outbox_topic_states AS t
                (app_id, topic, due, scheduled, running, retrying, oldest_due_at, sampled_at)
            SELECT app_id, topic, due, scheduled, running, retrying, oldest_due, now()
            FROM sampled
            ON CONFLICT (app_id, topic) DO UPDATE
                SET due = excluded.due, scheduled = excluded.scheduled,
                    running = excluded.running, retrying = excluded.retrying,
                    oldest_due_at = excluded.oldest_due_at, sampled_at = excluded.sampled_at
         ), charted AS (
            -- The minute's largest backlog and oldest due age, for the charts.
            INSERT INTO outbox_activity AS a (app_id, minute, topic, due, oldest_due_secs)
            SELECT app_id, date_trunc('minute', now()), topic, due,
                   coalesce(extract(epoch FROM now() - oldest_due)::float8, 0)
            FROM sampled
            -- The order every writer of the table takes its rows in.
            ORDER BY app_id, topic
            ON CONFLICT (app_id, minute, topic) DO UPDATE
                SET due = greatest(a.due, excluded.due),
                    oldest_due_secs = greatest(a.oldest_due_secs, excluded.oldest_due_secs)
         )
         SELECT * FROM sampled ORDER BY total DESC"
    ))
    .fetch_all(db)
    .await?)
}

/// One topic's rows by state, as the last sample counted them.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize)]
pub struct TopicStates {
    /// The topic.
    pub topic: String,
    /// Due now and not leased.
    pub due: i64,
    /// Due later (delayed, or waiting for a retry's backoff), not leased.
    pub scheduled: i64,
    /// Leased: a handler is running it.
    pub running: i64,
    /// Of `scheduled`, the rows waiting for a retry's backoff.
    pub retrying: i64,
    /// Due, and no live process serves the topic now: the rows wait for one
    /// (0 while the topic is paused or the app suspended: they wait on
    /// purpose).
    pub unserved: i64,
    /// When the oldest unserved row became due (none without unserved rows).
    pub oldest_unserved_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When the rows were counted.
    pub sampled_at: chrono::DateTime<chrono::Utc>,
}

/// The topics of `app` with rows, as [`record_state_counts`] last counted
/// them: unserved first, then by rows due. Whether a topic is served is
/// decided now, from the live processes. Empty until a leader has sampled.
pub async fn recorded_state_counts<'e>(
    db: impl PgExecutor<'e>,
    app: uuid::Uuid,
) -> Result<Vec<TopicStates>, Error> {
    Ok(sqlx::query_as(concat!(
        "SELECT t.topic, t.due, t.scheduled, t.running, t.retrying,
                CASE WHEN s.served OR h.held THEN 0 ELSE t.due END AS unserved,
                CASE WHEN s.served OR h.held OR t.due = 0 THEN NULL ELSE t.oldest_due_at END
                    AS oldest_unserved_at,
                t.sampled_at
         FROM outbox_topic_states t
         CROSS JOIN LATERAL (",
        served_now!("t.topic"),
        ") AS s
         CROSS JOIN LATERAL (",
        held_now!("t.app_id", "t.topic"),
        ") AS h
         WHERE t.app_id = $1
         ORDER BY unserved DESC, t.due DESC, t.topic"
    ))
    .bind(app)
    .fetch_all(db)
    .await?)
}

/// Every app's rows by state, summed over its topics, as the last sample
/// counted them: (slug, due, scheduled, running), for the instance overview.
pub async fn recorded_app_totals<'e>(
    db: impl PgExecutor<'e>,
) -> Result<Vec<(String, i64, i64, i64)>, Error> {
    Ok(sqlx::query_as(
        "SELECT a.slug, sum(t.due)::int8, sum(t.scheduled)::int8, sum(t.running)::int8
         FROM outbox_topic_states t JOIN apps a ON a.id = t.app_id
         GROUP BY a.slug ORDER BY a.slug",
    )
    .fetch_all(db)
    .await?)
}

/// How many rows are due and not leased, counted up to a bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DueCount {
    /// Rows counted: all of them when `exact`, else the bound.
    pub rows: i64,
    /// False when the count stopped at the bound: there are at least `rows`.
    pub exact: bool,
}

/// Counts rows that are due now and not leased, stopping at `bound`: the
/// cost grows with the bound, not with the backlog, so a dashboard or a
/// metrics scrape can ask often ("at least 10,000 due" is as useful there as
/// the exact number).
pub async fn count_due<'e>(db: impl PgExecutor<'e>, bound: i64) -> Result<DueCount, Error> {
    let bound = bound.max(1);
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT 1 FROM outbox
             WHERE run_at <= now() AND (not_before IS NULL OR not_before <= now())
               AND (locked_until IS NULL OR locked_until <= now())
             LIMIT $1
         ) due",
    )
    .bind(bound)
    .fetch_one(db)
    .await?;
    Ok(DueCount {
        rows,
        exact: rows < bound,
    })
}
