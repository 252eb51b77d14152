//! Sessions: the server-side half of a dashboard cookie or an API token.
//! A token names its session; the session row must exist (and not have
//! expired) on every request, so deleting it signs the token out everywhere.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Error;
use crate::store::principals::User;

/// Opens a session for `user_id` until `expires_at`; returns its id. Expired
/// sessions of the same user are removed on the way, so the table stays as
/// small as the number of live sessions.
pub async fn open<'e>(
    db: impl PgExecutor<'e>,
    user_id: Uuid,
    expires_at: DateTime<Utc>,
) -> Result<Uuid, Error> {
    Ok(sqlx::query_scalar(
        "WITH expired AS (DELETE FROM sessions WHERE user_id = $1 AND expires_at < now())
         INSERT INTO sessions (user_id, expires_at) VALUES ($1, $2) RETURNING id",
    )
    .bind(user_id)
    .bind(expires_at)
    .fetch_one(db)
    .await?)
}

/// The user of a live session: the session exists, belongs to `user_id` and
/// has not expired. One indexed lookup, the same cost as reading the user.
pub async fn user_of<'e>(
    db: impl PgExecutor<'e>,
    session_id: Uuid,
    user_id: Uuid,
) -> Result<Option<User>, Error> {
    // The user's columns in `User`'s order (see `principals::USER_COLUMNS`).
    Ok(sqlx::query_as(
        "SELECT u.id, u.email, u.password_hash, u.is_admin, u.created_at
         FROM users u
         WHERE u.id = $2
           AND EXISTS (SELECT 1 FROM sessions s
                       WHERE s.id = $1 AND s.user_id = $2 AND s.expires_at > now())",
    )
    .bind(session_id)
    .bind(user_id)
    .fetch_optional(db)
    .await?)
}

/// Ends one session (sign-out); returns whether it existed.
pub async fn close<'e>(db: impl PgExecutor<'e>, session_id: Uuid) -> Result<bool, Error> {
    Ok(sqlx::query("DELETE FROM sessions WHERE id = $1")
        .bind(session_id)
        .execute(db)
        .await?
        .rows_affected()
        > 0)
}

/// Ends every session of a user (password change, "revoke sessions");
/// returns how many there were.
pub async fn close_all<'e>(db: impl PgExecutor<'e>, user_id: Uuid) -> Result<u64, Error> {
    Ok(sqlx::query("DELETE FROM sessions WHERE user_id = $1")
        .bind(user_id)
        .execute(db)
        .await?
        .rows_affected())
}
