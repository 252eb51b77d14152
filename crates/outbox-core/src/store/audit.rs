//! The audit log (migration 0028): one entry per operator action on an app,
//! written in the action's own transaction.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Error;

/// An action to record.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    /// Who: an account's e-mail (with ` (API key)` for a key).
    pub actor: &'a str,
    /// The app acted on.
    pub app_id: Uuid,
    /// What, as `noun.verb`: `dead_letter.replay`, `topic.pause`, …
    pub action: &'a str,
    /// What it was done to: a topic, a dead letter's or a trigger's id.
    pub target: Option<&'a str>,
    /// How many rows it changed.
    pub rows: i64,
    /// Anything else worth keeping (a reason, a filter, a limit).
    pub detail: Value,
}

/// A recorded action.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Record {
    /// Increasing with time; pass the last one seen as `before` for older ones.
    pub id: i64,
    /// When.
    pub at: DateTime<Utc>,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// To what.
    pub target: Option<String>,
    /// How many rows.
    pub rows: i64,
    /// The rest.
    pub detail: Value,
}

/// Records one action, in the caller's transaction.
pub async fn record<'e>(db: impl PgExecutor<'e>, entry: &Entry<'_>) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO audit_log (actor, app_id, action, target, rows, detail)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(entry.actor)
    .bind(entry.app_id)
    .bind(entry.action)
    .bind(entry.target)
    .bind(entry.rows)
    .bind(&entry.detail)
    .execute(db)
    .await?;
    Ok(())
}

/// An app's entries, newest first, at most `limit` (1..=500), older than
/// the entry `before` when given.
pub async fn list<'e>(
    db: impl PgExecutor<'e>,
    app_id: Uuid,
    before: Option<i64>,
    limit: u32,
) -> Result<Vec<Record>, Error> {
    Ok(sqlx::query_as(
        "SELECT id, at, actor, action, target, rows, detail FROM audit_log
         WHERE app_id = $1 AND ($2::bigint IS NULL OR id < $2)
         ORDER BY id DESC LIMIT $3",
    )
    .bind(app_id)
    .bind(before)
    .bind(i64::from(limit.clamp(1, 500)))
    .fetch_all(db)
    .await?)
}
