//! The statements around a transactional-mode batch: a savepoint per row
//! (so a failing handler undoes only its own writes), and the keeper
//! connection's asynchronous commit.

use sqlx::PgConnection;

use crate::Error;

/// Starts the savepoint a row's handler runs under.
pub async fn savepoint(conn: &mut PgConnection) -> Result<(), Error> {
    sqlx::query("SAVEPOINT row").execute(conn).await?;
    Ok(())
}

/// Undoes what the row's handler wrote.
pub async fn rollback_to_savepoint(conn: &mut PgConnection) -> Result<(), Error> {
    sqlx::query("ROLLBACK TO SAVEPOINT row")
        .execute(conn)
        .await?;
    Ok(())
}

/// Ends the row's savepoint (keeping what is left of it).
pub async fn release_savepoint(conn: &mut PgConnection) -> Result<(), Error> {
    sqlx::query("RELEASE SAVEPOINT row").execute(conn).await?;
    Ok(())
}

/// Lets the keeper connection commit without waiting for the disk: its
/// record guards against the worker's death, which such a commit survives;
/// if the server itself crashes, the batch dies with it and there is no
/// worker death to count.
pub async fn commit_asynchronously(conn: &mut PgConnection) -> Result<(), Error> {
    sqlx::query("SET synchronous_commit = off")
        .execute(conn)
        .await?;
    Ok(())
}
