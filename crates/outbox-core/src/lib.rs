//! The core of outboxd: the row model, the transactional enqueue API, and the
//! stores that own every SQL statement the other crates run.
//!
//! The outbox property comes from one rule: **enqueue writes through the
//! caller's connection**. Call [`enqueue()`] (or [`enqueue_batch`]) with the
//! same transaction that writes your data; the event becomes visible to
//! dispatchers only when that transaction commits, and a rollback leaves no row.
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool, app_id: uuid::Uuid) -> Result<(), outbox_core::Error> {
//! use outbox_core::{enqueue, NewEvent};
//!
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id) VALUES (42)").execute(&mut *tx).await?;
//! enqueue(&mut tx, app_id, &NewEvent::new("order.created", serde_json::json!({"id": 42}))).await?;
//! tx.commit().await?; // the order and its event commit together
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`model`]: ids, sources, new and claimed events, dead letters.
//! - [`enqueue`](mod@enqueue): single and batch enqueue in the caller's transaction.
//! - [`store`]: all SQL — apps, the dispatcher's claim/complete statements, dead letters.
//! - [`topics`]: which topics a dispatcher serves (names, prefixes, NATS-style patterns).
//! - [`cron`]: the next tick of a cron schedule in a time zone.
//! - [`MIGRATOR`]: the embedded, forward-only migrations.

/// The `run_at` a row due at `$due` (an SQL expression) is stored with at
/// priority `$priority`: earlier by the priority × 10 s, so that the claim
/// order, the index order of `outbox_due_idx`, puts higher priorities first
/// and lower ones still age in (see `model::NewEvent::priority`).
macro_rules! priority_run_at {
    ($due:expr, $priority:expr) => {
        concat!("(", $due, " - make_interval(secs => ", $priority, " * 10))")
    };
}

/// The `not_before` of a row due at `$due` at priority `$priority`: its
/// real due time when a priority moved `run_at` back past it, so that it
/// does not run early.
macro_rules! priority_not_before {
    ($due:expr, $priority:expr) => {
        concat!(
            "(CASE WHEN ",
            $priority,
            " > 0 AND ",
            $due,
            " > now() THEN ",
            $due,
            " END)"
        )
    };
}

pub mod cron;
pub mod enqueue;
mod error;
pub mod model;
pub mod store;
pub mod text;
pub mod topics;

pub use enqueue::{enqueue, enqueue_batch};
pub use error::Error;
pub use model::{App, Attempt, ClaimedEvent, DeadLetter, NewEvent, OutboxRow, Source};

/// The forward-only migrations in `migrations/`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// The version of the last migration this build knows.
pub fn last_migration() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// outboxd's migrations are numbered below this; a service's own, sharing
/// the table, from 1001 (README).
pub const OWN_MIGRATIONS_FROM: i64 = 1000;

/// [`MIGRATOR`], passing over the versions it does not know: a service's
/// own (what [`migrate`] checks first leaves no other kind).
fn leaving_other_migrations() -> sqlx::migrate::Migrator {
    let mut migrator = sqlx::migrate!("../../migrations");
    migrator.set_ignore_missing(true);
    migrator
}

/// Applies every pending migration and returns how many it applied (0 when
/// the database was up to date, or another process applied them while this
/// one waited). Run it once at start: it is safe to run from several
/// processes and skips what is applied.
///
/// Runs on a connection of its own, closed at the end: the migrator's
/// session advisory lock is not given back on an error, so a pooled
/// connection would keep it and the next attempt (a retry once the cause is
/// gone, e.g. a dispatcher of an earlier version stopped; see migration
/// 0032) would wait for it forever. The lock is taken before anything is
/// read, so what is counted as applied is what this call applied.
pub async fn migrate(pool: &sqlx::PgPool) -> Result<usize, Error> {
    use sqlx::Connection;
    let mut conn = pool.acquire().await?.detach();
    match migrate_locked(&mut conn).await {
        Ok(applied) => {
            conn.close().await?;
            Ok(applied)
        }
        Err(err) => {
            // The error that matters is the migration's, not the close's.
            let _ = conn.close().await;
            Err(err)
        }
    }
}

/// [`migrate`] on its connection, under the migrator's lock.
async fn migrate_locked(conn: &mut sqlx::PgConnection) -> Result<usize, Error> {
    use sqlx::migrate::Migrate;
    conn.lock().await?;
    if let Some(found) = store::unknown_outboxd_migration(&mut *conn).await? {
        return Err(Error::SchemaNewer {
            found,
            known: last_migration(),
        });
    }
    let missing = store::missing_migrations(&mut *conn).await?;
    let mut migrator = leaving_other_migrations();
    // The lock is held already (a second take would nest, and the
    // migrator's give-back would leave this one held).
    migrator.set_locking(false);
    migrator.run(&mut *conn).await?;
    conn.unlock().await?;
    Ok(missing)
}

/// The app (tenant) with this slug, created with `name` if it does not exist
/// yet; its `id` is the `app_id` every enqueue takes.
pub async fn ensure_app<'e>(
    db: impl sqlx::PgExecutor<'e>,
    slug: &str,
    name: &str,
) -> Result<App, Error> {
    store::apps::ensure(db, slug, name).await
}
