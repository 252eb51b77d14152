//! Test support for outboxd and its users (a dev-dependency).
//!
//! # Layout
//! One module:
//! - [`TestDb::new`] gives each test its own freshly migrated database on the
//!   server named by `DATABASE_URL`, so tests run in parallel without sharing
//!   rows. The databases are left behind for post-mortems.
//! - [`TestDb::enqueued`] and [`TestDb::dead_lettered`] show what a use case
//!   left in the outbox and in `dead_letters`, for assertions.
//! - [`TestDb::advance`] moves the database's clock forward for outboxd's
//!   rows (backoff, leases, delays, cron ticks, retention) without waiting.
//! - [`run_until_idle`] runs a dispatcher with your handlers until nothing is
//!   due.
//! - [`wait_until`] waits on a condition instead of sleeping.
//!
//! ```no_run
//! # async fn t() -> Result<(), Box<dyn std::error::Error>> {
//! use outbox_testkit::{TestDb, run_until_idle};
//! let db = TestDb::new().await?;
//! let app = db.app("shop").await?;
//! let mut tx = db.pool.begin().await?;
//! outbox_core::enqueue(&mut tx, app, &outbox_core::NewEvent::new("order.placed", serde_json::json!({"id": 7}))).await?;
//! tx.commit().await?;
//! assert_eq!(db.enqueued("order.placed").await?, vec![serde_json::json!({"id": 7})]);
//! let mut handlers = outbox_dispatch::Registry::new();
//! handlers.register("order.placed", |_e: outbox_dispatch::Event| async { Ok(()) });
//! let report = run_until_idle(&db.pool, handlers).await?;
//! assert_eq!(report.completed, 1);
//! # Ok(()) }
//! ```

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

/// An isolated, migrated database for one test.
pub struct TestDb {
    /// A pool on the test database.
    pub pool: PgPool,
    /// The URL of the test database (for spawning processes against it).
    pub url: String,
    /// The database name.
    pub name: String,
}

/// Why a test database could not be made.
#[derive(Debug)]
pub struct TestDbError(pub String);

impl std::fmt::Display for TestDbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TestDbError {}

impl TestDb {
    /// Creates and migrates a new database named `outboxd_test_<uuid>`.
    pub async fn new() -> Result<Self, TestDbError> {
        Self::with_pool_size(8).await
    }

    /// Like [`TestDb::new`] with a pool of `max_connections`.
    pub async fn with_pool_size(max_connections: u32) -> Result<Self, TestDbError> {
        let db = Self::unmigrated(max_connections).await?;
        outbox_core::migrate(&db.pool)
            .await
            .map_err(|e| TestDbError(format!("migrate {}: {e}", db.name)))?;
        Ok(db)
    }

    /// A new database with the migrations up to and including `last` only:
    /// the schema of an earlier version, for upgrade tests (which then run
    /// [`outbox_core::migrate`] with rows in place).
    pub async fn migrated_to(last: i64) -> Result<Self, TestDbError> {
        let db = Self::unmigrated(8).await?;
        let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations");
        let earlier = std::env::temp_dir().join(format!("{}_migrations", db.name));
        let copy = || -> std::io::Result<()> {
            std::fs::create_dir_all(&earlier)?;
            for entry in std::fs::read_dir(&source)? {
                let path = entry?.path();
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                let version = name.split('_').next().and_then(|v| v.parse::<i64>().ok());
                if version.is_some_and(|v| v <= last) {
                    std::fs::copy(&path, earlier.join(name))?;
                }
            }
            Ok(())
        };
        copy().map_err(|e| TestDbError(format!("copying the migrations up to {last}: {e}")))?;
        let migrated = async {
            sqlx::migrate::Migrator::new(earlier.as_path())
                .await?
                .run(&db.pool)
                .await
        }
        .await;
        let _ = std::fs::remove_dir_all(&earlier);
        migrated.map_err(|e| TestDbError(format!("migrate {} up to {last}: {e}", db.name)))?;
        Ok(db)
    }

    async fn unmigrated(max_connections: u32) -> Result<Self, TestDbError> {
        let server_url = std::env::var("DATABASE_URL").map_err(|_| {
            TestDbError(
                "DATABASE_URL is not set: run the tests through scripts/test.sh, which starts PostgreSQL"
                    .into(),
            )
        })?;
        let server = PgConnectOptions::from_str(&server_url)
            .map_err(|e| TestDbError(format!("DATABASE_URL is not a PostgreSQL URL: {e}")))?;
        let name = format!("outboxd_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect_with(&server)
            .await
            .map_err(|e| TestDbError(format!("cannot connect to {server_url}: {e}")))?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .map_err(|e| TestDbError(format!("CREATE DATABASE {name}: {e}")))?;
        admin.close().await.ok();
        let options = server.clone().database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .connect_with(options.clone())
            .await
            .map_err(|e| TestDbError(format!("connect to {name}: {e}")))?;
        let url = options.to_url_lossy().to_string();
        Ok(Self { pool, url, name })
    }

    /// Creates an app with this slug and returns its id.
    pub async fn app(&self, slug: &str) -> Result<uuid::Uuid, TestDbError> {
        outbox_core::store::apps::ensure(&self.pool, slug, slug)
            .await
            .map(|a| a.id)
            .map_err(|e| TestDbError(e.to_string()))
    }
}

impl TestDb {
    /// Whether a session of this test's database comes to wait on a lock
    /// within ten seconds: for a test that makes one transaction wait for
    /// another and then lets the first go on.
    pub async fn a_statement_waits_on_a_lock(&self) -> bool {
        wait_until(std::time::Duration::from_secs(10), || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                                WHERE datname = current_database() AND wait_event_type = 'Lock')",
            )
            .fetch_one(&self.pool)
            .await
            .unwrap_or(false)
        })
        .await
    }

    /// Whether the server session `pid` has ended within ten seconds. A
    /// closed connection's session (and its advisory locks) ends on the
    /// server after the client has moved on: a test of a dead worker waits
    /// for it.
    pub async fn a_session_ended(&self, pid: i32) -> bool {
        wait_until(std::time::Duration::from_secs(10), || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)",
            )
            .bind(pid)
            .fetch_one(&self.pool)
            .await
            .unwrap_or(false)
        })
        .await
    }

    /// The payloads of `topic` waiting in the outbox, oldest first.
    pub async fn enqueued(&self, topic: &str) -> Result<Vec<serde_json::Value>, TestDbError> {
        sqlx::query_scalar("SELECT payload FROM outbox WHERE topic = $1 ORDER BY created_at, id")
            .bind(topic)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| TestDbError(format!("reading the outbox: {e}")))
    }

    /// The payloads of `topic` in `dead_letters`, oldest first, with the
    /// last error of each.
    pub async fn dead_lettered(
        &self,
        topic: &str,
    ) -> Result<Vec<(serde_json::Value, Option<String>)>, TestDbError> {
        sqlx::query_as(
            "SELECT payload, last_error FROM dead_letters WHERE topic = $1 ORDER BY created_at, id",
        )
        .bind(topic)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| TestDbError(format!("reading dead letters: {e}")))
    }

    /// Moves the clock forward by `by` for everything outboxd times with the
    /// database clock: due times, leases, attempts, dead-letter ages, cron
    /// ticks, replay quarantines and de-duplication records. (Every stored
    /// timestamp moves back by `by`, which is what the clock moving forward
    /// looks like to statements that compare with `now()`.)
    pub async fn advance(&self, by: std::time::Duration) -> Result<(), TestDbError> {
        let shift = format!("{} milliseconds", by.as_millis());
        let statements = [
            "UPDATE outbox SET run_at = run_at - $1::interval, locked_until = locked_until - $1::interval,
                    created_at = created_at - $1::interval, first_attempt_at = first_attempt_at - $1::interval,
                    last_attempt_at = last_attempt_at - $1::interval",
            "UPDATE dead_letters SET created_at = created_at - $1::interval,
                    replay_due_at = replay_due_at - $1::interval",
            "UPDATE cron_trigger_details SET next_fire_at = next_fire_at - $1::interval,
                    last_fire_at = last_fire_at - $1::interval",
            "UPDATE abandoned_executions SET created_at = created_at - $1::interval",
            "UPDATE processed_messages SET claimed_until = claimed_until - $1::interval,
                    expires_at = expires_at - $1::interval",
        ];
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| TestDbError(e.to_string()))?;
        for sql in statements {
            sqlx::query(sql)
                .bind(&shift)
                .execute(&mut *tx)
                .await
                .map_err(|e| TestDbError(format!("advancing the clock: {e}")))?;
        }
        tx.commit().await.map_err(|e| TestDbError(e.to_string()))
    }
}

/// Runs a dispatcher with `handlers` (test-friendly settings: backoff without
/// jitter, 500 ms after the first failure and doubling) until a claim finds
/// nothing due; returns what it did. Rows waiting for a
/// backoff are not due: [`TestDb::advance`] the clock and call it again.
pub async fn run_until_idle(
    pool: &PgPool,
    handlers: outbox_dispatch::Registry,
) -> Result<outbox_dispatch::BatchReport, TestDbError> {
    let config = outbox_dispatch::Config {
        handler_timeout: std::time::Duration::from_secs(10),
        // A failed row waits exactly its backoff ceiling (500 ms after the
        // first failure, doubling), so whether it is due depends only on
        // `TestDb::advance`, never on a random draw.
        retry: outbox_dispatch::RetryPolicy {
            jitter: false,
            ..outbox_dispatch::RetryPolicy::default()
        },
        ..outbox_dispatch::Config::default()
    };
    outbox_dispatch::Dispatcher::new(pool.clone(), handlers, config)
        .map_err(|e| TestDbError(e.to_string()))?
        .run_until_idle()
        .await
        .map_err(|e| TestDbError(format!("dispatching: {e}")))
}

/// Polls `check` every 10 ms until it returns `true` or `timeout` passes;
/// returns whether it became true. For waiting on a condition instead of sleeping.
pub async fn wait_until<F, Fut>(timeout: std::time::Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
