//! Synchronous invoke: the caller's inbox and the dispatcher's answer.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::model::NewEvent;
use crate::{Error, enqueue};

/// The channel a dispatcher notifies (payload: the inbox id) when an answer is in.
pub const REPLY_CHANNEL: &str = "outbox_reply";

/// The `code` in a caller's answer when no handler serves the topic (the
/// admin API answers it with 404 `no_handler`).
pub const NO_HANDLER: &str = "no_handler";

/// The `code` in a caller's answer when the topic's target cannot take the
/// row now and nothing ran (the relay while NATS is down): the admin API
/// answers it with 503 `unavailable`, so the caller may try again.
pub const UNAVAILABLE: &str = "unavailable";

/// Creates an inbox and enqueues the invocation's row (with `reply_to` set,
/// so it is never retried) in the caller's transaction; returns (inbox, outbox id).
pub async fn start(
    conn: &mut PgConnection,
    app_id: Uuid,
    mut event: NewEvent,
) -> Result<(Uuid, Uuid), Error> {
    let inbox = Uuid::new_v4();
    event.reply_to = Some(inbox.to_string());
    let outbox_id = enqueue(&mut *conn, app_id, &event).await?;
    sqlx::query("INSERT INTO invocation_inboxes (inbox, app_id, outbox_id) VALUES ($1, $2, $3)")
        .bind(inbox)
        .bind(app_id)
        .bind(outbox_id)
        .execute(&mut *conn)
        .await?;
    Ok((inbox, outbox_id))
}

/// An answer, as the caller reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// Whether the handler succeeded.
    pub ok: bool,
    /// The handler's reply, or its error as `{"error": "..."}`.
    pub result: Value,
}

/// Takes the answer out of an inbox (deleting the inbox); `None` while none is in.
pub async fn take<'e>(db: impl PgExecutor<'e>, inbox: Uuid) -> Result<Option<Answer>, Error> {
    let row: Option<(bool, Value)> = sqlx::query_as(
        "DELETE FROM invocation_inboxes WHERE inbox = $1 AND finished_at IS NOT NULL RETURNING ok, result",
    )
    .bind(inbox)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|(ok, result)| Answer { ok, result }))
}

/// The caller gives up: its inbox goes, so a later answer is recorded as
/// abandoned. Returns the answer if it landed in the meantime.
pub async fn abandon<'e>(db: impl PgExecutor<'e>, inbox: Uuid) -> Result<Option<Answer>, Error> {
    let row: Option<(Option<bool>, Option<Value>)> =
        sqlx::query_as("DELETE FROM invocation_inboxes WHERE inbox = $1 RETURNING ok, result")
            .bind(inbox)
            .fetch_optional(db)
            .await?;
    Ok(match row {
        Some((Some(ok), result)) => Some(Answer {
            ok,
            result: result.unwrap_or(Value::Null),
        }),
        _ => None,
    })
}

/// Withdraws the invocation's row `outbox_id` of `app_id` if no handler has
/// taken it: its caller was told it timed out, so it must not run later
/// (behind a rate limit or a long queue it could run minutes after). The
/// row leaves a trace in `abandoned_executions`, outcome `withdrawn`. A row
/// another transaction holds right now (a claim, leased or in a
/// transactional batch) is skipped, not waited for. Returns whether the row
/// was withdrawn; false when it runs, has run, or was held.
pub async fn withdraw<'e>(
    db: impl PgExecutor<'e>,
    app_id: Uuid,
    outbox_id: Uuid,
) -> Result<bool, Error> {
    let withdrawn: Option<Uuid> = sqlx::query_scalar(
        "WITH idle AS MATERIALIZED (
             SELECT tableoid, ctid FROM outbox
             WHERE app_id = $1 AND id = $2 AND reply_to IS NOT NULL
               AND (locked_until IS NULL OR locked_until <= now())
             FOR UPDATE SKIP LOCKED
         )
         , withdrawn AS (
             DELETE FROM outbox o USING idle
             WHERE o.tableoid = idle.tableoid AND o.ctid = idle.ctid
             RETURNING o.id, o.app_id, o.reply_to, o.topic
         )
         INSERT INTO abandoned_executions (outbox_id, app_id, reply_to, topic, outcome, error)
         SELECT id, app_id, reply_to, topic, 'withdrawn', 'the caller timed out before any handler took it'
         FROM withdrawn
         RETURNING outbox_id",
    )
    .bind(app_id)
    .bind(outbox_id)
    .fetch_optional(db)
    .await?;
    Ok(withdrawn.is_some())
}

/// A dispatcher's answer to one invocation.
#[derive(Debug, Clone)]
pub struct Resolution {
    /// The outbox row.
    pub outbox_id: Uuid,
    /// The app.
    pub app_id: Uuid,
    /// The row's `reply_to` (the inbox id as text).
    pub reply_to: String,
    /// The topic that ran.
    pub topic: String,
    /// Whether the handler succeeded.
    pub ok: bool,
    /// The reply, or `{"error": ...}`.
    pub result: Value,
    /// When the handler started.
    pub started_at: DateTime<Utc>,
}

/// Delivers an answer: into the inbox with a NOTIFY when the caller still
/// waits, else into `abandoned_executions`. Returns whether the caller got it.
pub async fn resolve(conn: &mut PgConnection, r: &Resolution) -> Result<bool, Error> {
    let inbox = Uuid::parse_str(&r.reply_to).ok();
    let delivered: Option<Uuid> = match inbox {
        Some(inbox) => {
            sqlx::query_scalar(
                "UPDATE invocation_inboxes SET finished_at = now(), ok = $2, result = $3
             WHERE inbox = $1 AND finished_at IS NULL
             RETURNING inbox",
            )
            .bind(inbox)
            .bind(r.ok)
            .bind(&r.result)
            .fetch_optional(&mut *conn)
            .await?
        }
        None => None,
    };
    if let Some(inbox) = delivered {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(REPLY_CHANNEL)
            .bind(inbox.to_string())
            .execute(&mut *conn)
            .await?;
        return Ok(true);
    }
    sqlx::query(
        "INSERT INTO abandoned_executions (outbox_id, app_id, reply_to, topic, outcome, error, started_at, finished_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, now())",
    )
    .bind(r.outbox_id)
    .bind(r.app_id)
    .bind(&r.reply_to)
    .bind(&r.topic)
    .bind(if r.ok { "succeeded" } else { "failed" })
    .bind(if r.ok { None } else { r.result.get("error").and_then(|e| e.as_str()).map(str::to_owned) })
    .bind(r.started_at)
    .execute(&mut *conn)
    .await?;
    Ok(false)
}
