//! Test support for outboxd and its users.
//!
//! [`TestDb::new`] gives each test its own freshly migrated database on the
//! server named by `DATABASE_URL`, so tests run in parallel without sharing
//! rows. The databases are left behind for post-mortems; the test scripts run
//! a throw-away PostgreSQL cluster.

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
        outbox_core::migrate(&pool)
            .await
            .map_err(|e| TestDbError(format!("migrate {name}: {e}")))?;
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
