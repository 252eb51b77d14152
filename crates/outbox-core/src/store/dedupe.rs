//! Consume-side de-duplication: claim → run → complete after success, or
//! release after failure, so a failed delivery's retry is not swallowed as a
//! duplicate.

use std::time::Duration;

use sqlx::PgExecutor;

use crate::Error;

/// What a claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This consumer owns the message now: run it, then complete or release.
    Claimed,
    /// The message was handled already (within the TTL): acknowledge, skip.
    Duplicate,
    /// Another consumer is running it right now: try again later.
    Busy,
}

/// Claims `message_id` for `consumer` for `hold` (its ack wait).
pub async fn claim(
    db: &sqlx::PgPool,
    consumer: &str,
    message_id: &str,
    hold: Duration,
) -> Result<Claim, Error> {
    // Insert, or take over an abandoned claim or an expired done row; the
    // returned state tells whether we own it.
    let row: Option<String> = sqlx::query_scalar(
        "INSERT INTO processed_messages AS p (consumer, message_id, state, claimed_until)
         VALUES ($1, $2, 'claimed', now() + make_interval(secs => $3))
         ON CONFLICT (consumer, message_id) DO UPDATE
            SET state = 'claimed', claimed_until = EXCLUDED.claimed_until, expires_at = NULL
            WHERE (p.state = 'claimed' AND p.claimed_until < now())
               OR (p.state = 'done' AND p.expires_at < now())
         RETURNING state",
    )
    .bind(consumer)
    .bind(message_id)
    .bind(hold.as_secs_f64())
    .fetch_optional(db)
    .await?;
    if row.is_some() {
        return Ok(Claim::Claimed);
    }
    let state: Option<String> = sqlx::query_scalar(
        "SELECT state FROM processed_messages WHERE consumer = $1 AND message_id = $2",
    )
    .bind(consumer)
    .bind(message_id)
    .fetch_optional(db)
    .await?;
    Ok(match state.as_deref() {
        Some("done") => Claim::Duplicate,
        // Claimed by another consumer, or released between the two statements.
        _ => Claim::Busy,
    })
}

/// Marks a claimed message handled; it is a duplicate for `ttl`.
pub async fn complete<'e>(
    db: impl PgExecutor<'e>,
    consumer: &str,
    message_id: &str,
    ttl: Duration,
) -> Result<(), Error> {
    sqlx::query(
        "UPDATE processed_messages
         SET state = 'done', expires_at = now() + make_interval(secs => $3)
         WHERE consumer = $1 AND message_id = $2",
    )
    .bind(consumer)
    .bind(message_id)
    .bind(ttl.as_secs_f64())
    .execute(db)
    .await?;
    Ok(())
}

/// Forgets a claim after a failed run, so the redelivery runs again.
pub async fn release<'e>(
    db: impl PgExecutor<'e>,
    consumer: &str,
    message_id: &str,
) -> Result<(), Error> {
    sqlx::query(
        "DELETE FROM processed_messages WHERE consumer = $1 AND message_id = $2 AND state = 'claimed'",
    )
    .bind(consumer)
    .bind(message_id)
    .execute(db)
    .await?;
    Ok(())
}
