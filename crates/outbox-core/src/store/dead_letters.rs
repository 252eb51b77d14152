//! Dead letters: listing, reading, counting, resolving and replaying.

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection, PgExecutor, Postgres, QueryBuilder};
use uuid::Uuid;

use crate::{DeadLetter, Error};

/// The advisory-lock key for replays of the consumer message whose id (as
/// text) is `$message`: replays of one message take turns on it.
macro_rules! replay_turn {
    ($message:literal) => {
        concat!("hashtextextended('outboxd replay ' || ", $message, ", 0)")
    };
}

const COLUMNS: &str = "id, app_id, original_event_id, source, op, topic, trigger_id, handler, \
     payload, headers, ordering_key, partition_key, attempt_count, first_attempt_at, \
     last_attempt_at, last_error, created_at, resolved_at, resolution, max_attempts, attempts, \
     replayed_as, \
     (SELECT p.id FROM dead_letters p WHERE p.replayed_as = dead_letters.original_event_id \
      AND p.app_id = dead_letters.app_id LIMIT 1) AS replay_of";

/// [`COLUMNS`] without the attempt history (`NULL`), for lists: a page of
/// 200 with full histories could weigh megabytes.
const LIST_COLUMNS: &str = "id, app_id, original_event_id, source, op, topic, trigger_id, \
     handler, payload, headers, ordering_key, partition_key, attempt_count, first_attempt_at, \
     last_attempt_at, last_error, created_at, resolved_at, resolution, max_attempts, \
     NULL::jsonb AS attempts, replayed_as, \
     (SELECT p.id FROM dead_letters p WHERE p.replayed_as = dead_letters.original_event_id \
      AND p.app_id = dead_letters.app_id LIMIT 1) AS replay_of";

/// Filters for [`list`]. Every field narrows the result; all are optional.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this source.
    pub source: Option<String>,
    /// Only this topic.
    pub topic: Option<String>,
    /// Only dead letters of this trigger.
    pub trigger_id: Option<Uuid>,
    /// Only this resolution.
    pub resolution: Option<String>,
    /// Only rows nobody has resolved yet.
    pub unresolved_only: bool,
}

/// Where a page ends: the `(created_at, id)` of its last row. Pass it back to
/// get the next (older) page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// `created_at` of the last row seen.
    pub created_at: DateTime<Utc>,
    /// `id` of the last row seen.
    pub id: Uuid,
}

/// Appends a filter's conditions (all bound parameters).
fn push_filter(q: &mut QueryBuilder<'_, Postgres>, filter: &Filter) {
    if let Some(source) = &filter.source {
        q.push(" AND source = ").push_bind(source.clone());
    }
    if let Some(topic) = &filter.topic {
        q.push(" AND topic = ").push_bind(topic.clone());
    }
    if let Some(trigger_id) = filter.trigger_id {
        q.push(" AND trigger_id = ").push_bind(trigger_id);
    }
    if let Some(resolution) = &filter.resolution {
        q.push(" AND resolution = ").push_bind(resolution.clone());
    }
}

/// Lists an app's dead letters, newest first, `limit` at most (taken within
/// 1..=1001: a page of the largest size, 1,000, and one more that says
/// another follows), after `cursor`, without their attempt histories
/// ([`get`] reads one with it).
pub async fn list<'e>(
    db: impl PgExecutor<'e>,
    app_id: Uuid,
    filter: &Filter,
    after: Option<Cursor>,
    limit: u32,
) -> Result<Vec<DeadLetter>, Error> {
    page(db, app_id, filter, after.map(|c| (c, Side::Older)), limit).await
}

/// Lists the `limit` dead letters just newer than `before` (the page before
/// one that starts there), newest first, as [`list`] does.
pub async fn list_newer<'e>(
    db: impl PgExecutor<'e>,
    app_id: Uuid,
    filter: &Filter,
    before: Cursor,
    limit: u32,
) -> Result<Vec<DeadLetter>, Error> {
    let mut rows = page(db, app_id, filter, Some((before, Side::Newer)), limit).await?;
    rows.reverse();
    Ok(rows)
}

/// Which side of a cursor a page lies on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Older,
    Newer,
}

/// `limit` dead letters of the filter, from the cursor on its side (newest
/// first for older ones, oldest first for newer ones: the nearest first).
async fn page<'e>(
    db: impl PgExecutor<'e>,
    app_id: Uuid,
    filter: &Filter,
    from: Option<(Cursor, Side)>,
    limit: u32,
) -> Result<Vec<DeadLetter>, Error> {
    let mut q: QueryBuilder<'_, Postgres> = QueryBuilder::new("SELECT ");
    q.push(LIST_COLUMNS)
        .push(" FROM dead_letters WHERE app_id = ")
        .push_bind(app_id);
    if filter.unresolved_only {
        q.push(" AND resolved_at IS NULL");
    }
    push_filter(&mut q, filter);
    let newer = matches!(from, Some((_, Side::Newer)));
    if let Some((cursor, _)) = from {
        q.push(if newer {
            " AND (created_at, id) > ("
        } else {
            " AND (created_at, id) < ("
        })
        .push_bind(cursor.created_at)
        .push(", ")
        .push_bind(cursor.id)
        .push(")");
    }
    q.push(if newer {
        " ORDER BY created_at, id LIMIT "
    } else {
        " ORDER BY created_at DESC, id DESC LIMIT "
    })
    .push_bind(i64::from(limit.clamp(1, 1001)));
    Ok(q.build_query_as().fetch_all(db).await?)
}

/// Reads one dead letter of an app; another app's id is "not found".
pub async fn get<'e>(db: impl PgExecutor<'e>, app_id: Uuid, id: Uuid) -> Result<DeadLetter, Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM dead_letters WHERE app_id = $1 AND id = $2"
    ))
    .bind(app_id)
    .bind(id)
    .fetch_optional(db)
    .await?
    .ok_or_else(|| Error::NotFound(format!("dead letter {id}")))
}

/// The id of the app's dead letter that `id` names: its own id, or the id
/// of the outbox row it was (what a dispatcher's "dead-lettered" log line
/// and a row's address name); the newest when a row id names several.
pub async fn resolve_id(db: &sqlx::PgPool, app_id: Uuid, id: Uuid) -> Result<Uuid, Error> {
    let found: Option<Uuid> = sqlx::query_scalar(
        "SELECT id FROM (
             SELECT id, 0 AS by_row, created_at FROM dead_letters
             WHERE app_id = $1 AND id = $2
             UNION ALL
             SELECT id, 1, created_at FROM dead_letters
             WHERE app_id = $1 AND original_event_id = $2
         ) AS named
         ORDER BY by_row, created_at DESC
         LIMIT 1",
    )
    .bind(app_id)
    .bind(id)
    .fetch_optional(db)
    .await?;
    if let Some(found) = found {
        return Ok(found);
    }
    // A log line's id of a row that has not been dead-lettered (a retry
    // is logged too): say where it is.
    let waiting: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM outbox WHERE app_id = $1 AND id = $2)")
            .bind(app_id)
            .bind(id)
            .fetch_one(db)
            .await?;
    Err(Error::NotFound(if waiting {
        format!("dead letter {id}: it is an outbox row still waiting, not a dead letter")
    } else {
        format!("dead letter {id}")
    }))
}

/// The app's dead letters that `ids` name, each as [`resolve_id`] reads one: by
/// its own id, or by the id of the outbox row it was (the newest). Ids
/// that name none are left out.
pub async fn resolve_ids<'e>(
    db: impl PgExecutor<'e>,
    app_id: Uuid,
    ids: &[Uuid],
) -> Result<Vec<Uuid>, Error> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM dead_letters WHERE app_id = $1 AND id = ANY ($2)
         UNION
         (SELECT DISTINCT ON (original_event_id) id FROM dead_letters
          WHERE app_id = $1 AND original_event_id = ANY ($2)
          ORDER BY original_event_id, created_at DESC)",
    )
    .bind(app_id)
    .bind(ids)
    .fetch_all(db)
    .await?)
}

/// Reads one dead letter by id, whatever its app (operator CLI).
pub async fn get_any<'e>(db: impl PgExecutor<'e>, id: Uuid) -> Result<DeadLetter, Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM dead_letters WHERE id = $1"))
        .bind(id)
        .fetch_optional(db)
        .await?
        .ok_or_else(|| Error::NotFound(format!("dead letter {id}")))
}

/// Dead letters of an app that nobody has resolved (the dashboard badge).
pub async fn count_unresolved<'e>(db: impl PgExecutor<'e>, app_id: Uuid) -> Result<i64, Error> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM dead_letters WHERE app_id = $1 AND resolved_at IS NULL",
    )
    .bind(app_id)
    .fetch_one(db)
    .await?)
}

/// An app's unresolved dead letters per topic, most first.
pub async fn unresolved_by_topic<'e>(
    db: impl PgExecutor<'e>,
    app_id: Uuid,
) -> Result<Vec<(String, i64)>, Error> {
    Ok(sqlx::query_as(
        "SELECT topic, count(*) FROM dead_letters
         WHERE app_id = $1 AND resolved_at IS NULL
         GROUP BY topic ORDER BY count(*) DESC, topic",
    )
    .bind(app_id)
    .fetch_all(db)
    .await?)
}

/// How many of an app's dead letters match `filter` (for "showing 50 of
/// 123"); counting stops at `bound`, so a huge table costs at most that.
pub async fn count<'e>(
    db: impl PgExecutor<'e>,
    app_id: Uuid,
    filter: &Filter,
    bound: i64,
) -> Result<i64, Error> {
    let mut q: QueryBuilder<'_, Postgres> =
        QueryBuilder::new("SELECT count(*) FROM (SELECT 1 FROM dead_letters WHERE app_id = ");
    q.push_bind(app_id);
    if filter.unresolved_only {
        q.push(" AND resolved_at IS NULL");
    }
    push_filter(&mut q, filter);
    q.push(" LIMIT ").push_bind(bound).push(") matching");
    Ok(q.build_query_scalar().fetch_one(db).await?)
}

/// Dead letters of the app whose original outbox id is `original_event_id`.
pub async fn by_original<'e>(
    db: impl PgExecutor<'e>,
    original_event_id: Uuid,
) -> Result<Vec<DeadLetter>, Error> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM dead_letters WHERE original_event_id = $1 ORDER BY created_at"
    ))
    .bind(original_event_id)
    .fetch_all(db)
    .await?)
}

/// Unresolved dead letters per app slug, every app listed (the metrics gauge).
pub async fn unresolved_by_app<'e>(db: impl PgExecutor<'e>) -> Result<Vec<(String, i64)>, Error> {
    Ok(sqlx::query_as(
        "SELECT a.slug, count(d.id) FROM apps a
         LEFT JOIN dead_letters d ON d.app_id = a.id AND d.resolved_at IS NULL
         GROUP BY a.slug ORDER BY a.slug",
    )
    .fetch_all(db)
    .await?)
}

/// A dead letter for work that never was an outbox row (e.g. a NATS message
/// a consumer gave up on).
#[derive(Debug, Clone)]
pub struct External<'a> {
    /// The tenant.
    pub app_id: Uuid,
    /// The message's own id (the `Nats-Msg-Id` when it is a UUID), else a new one.
    pub original_event_id: Uuid,
    /// Where it came from, e.g. `nats`.
    pub source: &'a str,
    /// The subject or topic.
    pub topic: &'a str,
    /// The handler that failed.
    pub handler: Option<&'a str>,
    /// The body, already masked.
    pub payload: &'a serde_json::Value,
    /// The headers.
    pub headers: &'a serde_json::Value,
    /// Deliveries made.
    pub attempt_count: i32,
    /// Why it was given up.
    pub last_error: &'a str,
}

/// Inserts an [`External`] dead letter; returns its id.
pub async fn insert_external<'e>(
    db: impl PgExecutor<'e>,
    row: &External<'_>,
) -> Result<Uuid, Error> {
    Ok(sqlx::query_scalar(
        "INSERT INTO dead_letters (app_id, original_event_id, source, topic, handler, payload, headers,
                                   attempt_count, last_attempt_at, last_error)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now(), $9)
         RETURNING id",
    )
    .bind(row.app_id)
    .bind(row.original_event_id)
    .bind(row.source)
    .bind(row.topic)
    .bind(row.handler)
    .bind(row.payload)
    .bind(row.headers)
    .bind(row.attempt_count)
    .bind(row.last_error)
    .fetch_one(db)
    .await?)
}

/// Marks an app's unresolved dead letters `ignored`; returns the ids changed.
/// Already resolved rows are left alone.
pub async fn ignore<'e>(
    db: impl PgExecutor<'e>,
    app_id: Uuid,
    ids: &[Uuid],
) -> Result<Vec<Uuid>, Error> {
    Ok(sqlx::query_scalar(
        "UPDATE dead_letters SET resolution = 'ignored', resolved_at = now()
         WHERE app_id = $1 AND id = ANY($2) AND resolved_at IS NULL
         RETURNING id",
    )
    .bind(app_id)
    .bind(ids)
    .fetch_all(db)
    .await?)
}

/// Replays an app's unresolved dead letters in one statement (so in one
/// transaction): a fresh outbox row per dead letter, from its payload,
/// headers and attempt budget, linked by `replayed_from`, and the dead letter
/// marked `replayed`. Returns (dead letter id, new outbox id) pairs; resolved
/// rows are skipped. A dead letter of the consumer runtime (source `nats`)
/// is published again to its subject (header `outbox-subject`) under the
/// message id `<original id>:replay:<n>` (header `outbox-msg-id`), `n`
/// counting the replays of that message.
pub async fn replay(
    conn: &mut PgConnection,
    app_id: Uuid,
    ids: &[Uuid],
) -> Result<Vec<(Uuid, Uuid)>, Error> {
    replay_with(conn, app_id, ids, None).await
}

/// [`replay`] with the replayed rows' `max_attempts` set to `max_attempts`
/// instead of the dead letter's own (at least 1).
pub async fn replay_with(
    conn: &mut PgConnection,
    app_id: Uuid,
    ids: &[Uuid],
    max_attempts: Option<i32>,
) -> Result<Vec<(Uuid, Uuid)>, Error> {
    if let Some(n) = max_attempts
        && n < 1
    {
        return Err(Error::invalid(
            "max_attempts",
            format!("{n} is below the minimum of 1"),
        ));
    }
    // Two replays of different dead letters of one message, at once, would
    // each count the replays committed before them and publish under the
    // same `:replay:<n>`, and the stream's duplicate window would drop the
    // second. So replays of one message take turns: the lock (held to the
    // end of the transaction) comes first, and the statement that counts
    // starts after it, with a snapshot that sees the earlier replay.
    let mut tx = conn.begin().await?;
    sqlx::query(concat!(
        "SELECT pg_advisory_xact_lock(",
        replay_turn!("m"),
        ")
         FROM (SELECT DISTINCT original_event_id::text AS m FROM dead_letters
               WHERE app_id = $1 AND id = ANY($2) AND source = 'nats' AND resolved_at IS NULL
               ORDER BY 1) AS messages"
    ))
    .bind(app_id)
    .bind(ids)
    .execute(&mut *tx)
    .await?;
    let replayed = sqlx::query_as(
        "WITH resolved AS (
            UPDATE dead_letters
            SET resolution = 'replayed', resolved_at = now(), replayed_as = outbox_uuid_v7()
            WHERE app_id = $1 AND id = ANY($2) AND resolved_at IS NULL
            RETURNING id, app_id, source, op, topic, trigger_id, payload, headers, ordering_key,
                      depth, registered_by_principal, max_attempts, partition_key, replayed_as,
                      original_event_id,
                      (SELECT count(*) FROM dead_letters p
                       WHERE p.original_event_id = dead_letters.original_event_id
                         AND p.resolution = 'replayed') AS replays
         ), enqueued AS (
            INSERT INTO outbox (id, app_id, source, op, topic, trigger_id, payload, headers,
                                ordering_key, depth, registered_by_principal, replayed_from,
                                max_attempts, partition_key)
            SELECT replayed_as, app_id,
                   CASE WHEN source IN ('kv', 'cron', 'pubsub', 'queue', 'dead_letter', 'email', 'nats')
                        THEN source ELSE 'queue' END,
                   op,
                   -- The relayed row's own topic, so that it is routed as it was.
                   CASE WHEN source = 'nats' THEN coalesce(headers->>'outbox-topic', topic)
                        ELSE topic END,
                   trigger_id, payload,
                   -- A message the consumer runtime gave up goes back to its
                   -- subject, under a message id of its own: the stream's
                   -- duplicate window would drop the original id.
                   CASE WHEN source = 'nats'
                        THEN headers || jsonb_build_object(
                            'outbox-subject', topic,
                            'outbox-msg-id', original_event_id::text || ':replay:'
                                || (replays + row_number() OVER (PARTITION BY original_event_id
                                                                 ORDER BY id)))
                        ELSE headers END,
                   ordering_key, depth,
                   registered_by_principal, id, coalesce($3, max_attempts), partition_key
            FROM resolved
            RETURNING replayed_from, id
         )
         SELECT replayed_from, id FROM enqueued",
    )
    .bind(app_id)
    .bind(ids)
    .bind(max_attempts)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(replayed)
}

/// Ids of an app's unresolved dead letters matching `filter` (for bulk actions),
/// at most `limit`.
pub async fn ids_matching<'e>(
    db: impl PgExecutor<'e>,
    app_id: Uuid,
    filter: &Filter,
    limit: u32,
) -> Result<Vec<Uuid>, Error> {
    let mut q: QueryBuilder<'_, Postgres> =
        QueryBuilder::new("SELECT id FROM dead_letters WHERE resolved_at IS NULL AND app_id = ");
    q.push_bind(app_id);
    push_filter(&mut q, filter);
    q.push(" ORDER BY created_at DESC, id DESC LIMIT ")
        .push_bind(i64::from(limit.clamp(1, 10_000)));
    Ok(q.build_query_scalar().fetch_all(db).await?)
}

/// Sets an automatic replay policy for an app (and optionally one source /
/// topic): replay after `initial_delay_secs`, doubling per round, `max_rounds` times.
pub async fn set_replay_policy<'e>(
    db: impl PgExecutor<'e>,
    app_id: Uuid,
    source: Option<&str>,
    topic: Option<&str>,
    initial_delay_secs: u32,
    max_rounds: u32,
) -> Result<(), Error> {
    if !(1..=604_800).contains(&initial_delay_secs) {
        return Err(Error::invalid("delay", "must be within 1..=604800 seconds"));
    }
    if !(1..=20).contains(&max_rounds) {
        return Err(Error::invalid("rounds", "must be within 1..=20"));
    }
    sqlx::query(
        "INSERT INTO replay_policies (app_id, source, topic, initial_delay_secs, max_rounds)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT ON CONSTRAINT replay_policies_scope_key
         DO UPDATE SET initial_delay_secs = EXCLUDED.initial_delay_secs, max_rounds = EXCLUDED.max_rounds",
    )
    .bind(app_id)
    .bind(source)
    .bind(topic)
    .bind(initial_delay_secs as i32)
    .bind(max_rounds as i32)
    .execute(db)
    .await?;
    Ok(())
}

/// An automatic replay policy, as [`replay_policies`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct ReplayPolicy {
    /// The source it is limited to (`None`: any).
    pub source: Option<String>,
    /// The topic it is limited to (`None`: any).
    pub topic: Option<String>,
    /// Quarantine before the first replay, in seconds.
    pub initial_delay_secs: i32,
    /// Replays before a dead letter waits for an operator.
    pub max_rounds: i32,
}

/// An app's automatic replay policies, the widest first.
pub async fn replay_policies<'e>(
    db: impl PgExecutor<'e>,
    app_id: Uuid,
) -> Result<Vec<ReplayPolicy>, Error> {
    Ok(sqlx::query_as(
        "SELECT source, topic, initial_delay_secs, max_rounds FROM replay_policies
         WHERE app_id = $1 ORDER BY source NULLS FIRST, topic NULLS FIRST",
    )
    .bind(app_id)
    .fetch_all(db)
    .await?)
}

/// Removes an app's replay policy for exactly this source and topic
/// (`None`: the one for any); returns whether there was one.
pub async fn remove_replay_policy<'e>(
    db: impl PgExecutor<'e>,
    app_id: Uuid,
    source: Option<&str>,
    topic: Option<&str>,
) -> Result<bool, Error> {
    Ok(sqlx::query(
        "DELETE FROM replay_policies
         WHERE app_id = $1 AND source IS NOT DISTINCT FROM $2 AND topic IS NOT DISTINCT FROM $3",
    )
    .bind(app_id)
    .bind(source)
    .bind(topic)
    .execute(db)
    .await?
    .rows_affected()
        > 0)
}

/// Replays dead letters whose quarantine is over (up to `limit`); returns
/// (dead letter id, new outbox id) pairs. Due rows are locked with
/// `SKIP LOCKED`, so concurrent replayers never replay one twice.
pub async fn replay_due(
    conn: &mut sqlx::PgConnection,
    limit: i64,
) -> Result<Vec<(Uuid, Uuid)>, Error> {
    // Rows are locked before their message's replay lock here, the other
    // way round from an operator's replay ([`replay_with`]); so this side
    // never waits: it skips a message whose lock is taken (try), as it skips
    // a locked row, and the lock it then asks for again is its own.
    let due: Vec<(Uuid, Uuid)> = sqlx::query_as(concat!(
        "SELECT id, app_id FROM dead_letters
         WHERE replay_due_at <= now() AND resolved_at IS NULL
           AND (source <> 'nats' OR pg_try_advisory_xact_lock(",
        replay_turn!("original_event_id::text"),
        "))
         ORDER BY replay_due_at
         LIMIT $1
         FOR UPDATE SKIP LOCKED"
    ))
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    let mut replayed = Vec::with_capacity(due.len());
    for (id, app_id) in due {
        replayed.extend(replay(&mut *conn, app_id, &[id]).await?);
    }
    Ok(replayed)
}
