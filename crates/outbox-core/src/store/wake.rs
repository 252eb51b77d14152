//! How inserts wake dispatchers without serialising their commits.
//!
//! The outbox's insert trigger sends `NOTIFY` [`CHANNEL`] only while some
//! dispatcher sleeps (a transaction that notified commits under a
//! database-wide lock, so notifying producers cannot share a disk flush). A
//! dispatcher that is not asleep polls instead. Migration 0013 states the
//! protocol; in short:
//!
//! ```text
//!  dispatcher                               inserting statement (trigger)
//!  begin_sleep: take `sleep` (shared),      take `gate` (shared, to its commit)
//!    is `gate` free? → settled              `sleep` held by anyone? → NOTIFY
//!  claim once more, then wait for NOTIFY
//!  while not settled: poll, ask settled()
//!  end_sleep: release `sleep`
//! ```
//!
//! Every function here runs on one dedicated connection per dispatcher: the
//! `sleep` lock belongs to its session, and the server frees it when that
//! session ends.

use sqlx::PgConnection;

use crate::Error;

/// The channel the insert trigger notifies.
pub const CHANNEL: &str = "outbox_due";

/// Advisory lock class of the protocol ("outb" in ASCII); the keys are
/// `(CLASS, 1)` for `sleep` and `(CLASS, 2)` for `gate`.
const CLASS: i32 = 1_869_968_482;

/// Starts sleeping: from now on inserting statements notify. `None` when the
/// `sleep` lock could not be taken at this moment (a producer was testing
/// it; try again later); otherwise whether no insert that might have looked
/// at `sleep` before it was taken is still open (see [`settled`]).
pub async fn begin_sleep(conn: &mut PgConnection) -> Result<Option<bool>, Error> {
    Ok(sqlx::query_scalar(
        "SELECT CASE WHEN pg_try_advisory_lock_shared($1, 1)
                     THEN CASE WHEN pg_try_advisory_lock($1, 2)
                               THEN pg_advisory_unlock($1, 2)
                               ELSE false END
                END",
    )
    .bind(CLASS)
    .fetch_one(conn)
    .await?)
}

/// Whether no inserting transaction is open (the `gate` is free): every row
/// inserted before the sleep began is then either visible to a claim that
/// starts now, or was announced by a `NOTIFY`.
pub async fn settled(conn: &mut PgConnection) -> Result<bool, Error> {
    Ok(sqlx::query_scalar(
        "SELECT CASE WHEN pg_try_advisory_lock($1, 2)
                     THEN pg_advisory_unlock($1, 2)
                     ELSE false END",
    )
    .bind(CLASS)
    .fetch_one(conn)
    .await?)
}

/// Stops sleeping: once no dispatcher sleeps, inserts stop notifying.
pub async fn end_sleep(conn: &mut PgConnection) -> Result<(), Error> {
    sqlx::query("SELECT pg_advisory_unlock_shared($1, 1)")
        .bind(CLASS)
        .execute(conn)
        .await?;
    Ok(())
}
