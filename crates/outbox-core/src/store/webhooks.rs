//! Webhook targets and their signing secrets (migration 0031): one secret
//! per app and URL, generated here and shown once; a rotation keeps the
//! previous secret signing too for an overlap.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Error;

/// A target as listed (its secrets are never read back out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct WebhookTarget {
    /// The URL events are POSTed to.
    pub url: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When its secret was last rotated.
    pub rotated_at: Option<DateTime<Utc>>,
    /// Until when the previous secret signs too.
    pub previous_until: Option<DateTime<Utc>>,
}

/// The secrets that sign a request to a target now: the current one, and
/// the previous one during a rotation's overlap.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecrets {
    /// The current secret.
    pub current: String,
    /// The previous secret, while it is still valid.
    pub previous: Option<String>,
}

impl std::fmt::Debug for SigningSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningSecrets").finish_non_exhaustive()
    }
}

/// A new secret: 64 hex digits from two v4 UUIDs, 244 bits of the
/// operating system's randomness.
fn new_secret() -> String {
    format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple())
}

fn check_url(url: &str) -> Result<(), Error> {
    let ok = (url.starts_with("http://") || url.starts_with("https://"))
        && url.len() <= 2048
        && !url.chars().any(char::is_whitespace);
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "url",
            "must be an http:// or https:// URL of at most 2048 characters",
        ))
    }
}

/// Creates the target `url` of `app` with a new secret and returns the
/// secret (shown once: it is not read back out). A conflict when it exists.
pub async fn create<'e>(db: impl PgExecutor<'e>, app: Uuid, url: &str) -> Result<String, Error> {
    check_url(url)?;
    let secret = new_secret();
    let created = sqlx::query(
        "INSERT INTO webhook_targets (app_id, url, secret) VALUES ($1, $2, $3)
         ON CONFLICT (app_id, url) DO NOTHING",
    )
    .bind(app)
    .bind(url)
    .bind(&secret)
    .execute(db)
    .await?
    .rows_affected();
    if created == 0 {
        return Err(Error::Conflict(format!(
            "webhook target {url} exists; rotate its secret instead"
        )));
    }
    Ok(secret)
}

/// Gives the target a new secret and returns it; the previous one keeps
/// signing for `overlap`. Not found when the target does not exist.
pub async fn rotate<'e>(
    db: impl PgExecutor<'e>,
    app: Uuid,
    url: &str,
    overlap: Duration,
) -> Result<String, Error> {
    let secret = new_secret();
    let rotated: Option<String> = sqlx::query_scalar(
        "UPDATE webhook_targets
         SET previous_secret = secret, secret = $3,
             previous_until = now() + make_interval(secs => $4), rotated_at = now()
         WHERE app_id = $1 AND url = $2
         RETURNING url",
    )
    .bind(app)
    .bind(url)
    .bind(&secret)
    .bind(overlap.as_secs_f64())
    .fetch_optional(db)
    .await?;
    rotated
        .map(|_| secret)
        .ok_or_else(|| Error::NotFound(format!("webhook target {url}")))
}

/// The app's targets, by URL.
pub async fn list<'e>(db: impl PgExecutor<'e>, app: Uuid) -> Result<Vec<WebhookTarget>, Error> {
    Ok(sqlx::query_as(
        "SELECT url, created_at, rotated_at, previous_until FROM webhook_targets
         WHERE app_id = $1 ORDER BY url",
    )
    .bind(app)
    .fetch_all(db)
    .await?)
}

/// Deletes a target (its rows then sign with the global secret, if any);
/// false when there was none.
pub async fn delete<'e>(db: impl PgExecutor<'e>, app: Uuid, url: &str) -> Result<bool, Error> {
    Ok(
        sqlx::query("DELETE FROM webhook_targets WHERE app_id = $1 AND url = $2")
            .bind(app)
            .bind(url)
            .execute(db)
            .await?
            .rows_affected()
            > 0,
    )
}

/// The secrets that sign a request of `app` to `url` now, if the target has
/// its own.
pub async fn signing_secrets<'e>(
    db: impl PgExecutor<'e>,
    app: Uuid,
    url: &str,
) -> Result<Option<SigningSecrets>, Error> {
    let row: Option<(String, Option<String>)> = sqlx::query_as(
        "SELECT secret, CASE WHEN previous_until > now() THEN previous_secret END
         FROM webhook_targets WHERE app_id = $1 AND url = $2",
    )
    .bind(app)
    .bind(url)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|(current, previous)| SigningSecrets { current, previous }))
}
