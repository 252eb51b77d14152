//! Leadership: a session advisory lock that one connection holds while its
//! process leads the maintenance services (GC, cron, replays, sampling). The
//! lock lives and dies with the session, so a crashed leader's lock is freed
//! by the server; a connection that fails its ping has lost it.

use sqlx::PgConnection;

use crate::Error;

/// Tries to take the leadership lock `key` on `conn`; whether it was taken.
/// It is held until `conn` closes.
pub async fn try_lead(conn: &mut PgConnection, key: i64) -> Result<bool, Error> {
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(conn)
        .await?)
}

/// Checks that the session holding the lock is still alive.
pub async fn ping(conn: &mut PgConnection) -> Result<(), Error> {
    sqlx::query("SELECT 1").execute(conn).await?;
    Ok(())
}
