//! The connection to PostgreSQL: one pool per process, with the session
//! settings dispatchers rely on, sized from the one connection budget
//! (`database.max_connections`).

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::{Pooler, Settings};

/// Opens the pool. `database.max_connections` bounds every connection the
/// process opens: `own` of them are kept for connections a component opens
/// outside the pool (a dispatcher's claim loops, LISTEN and pacer; see
/// [`outbox_dispatch::Config::own_connections`]), the pool gets the rest.
/// Configuration checks that at least two are left for the pool.
///
/// Behind a transaction-pooling PgBouncer (`database.pooler = "transaction"`)
/// the connections carry no session settings and no statement cache (see
/// [`outbox_core::store::pooled_connect_options`]).
pub async fn connect(settings: &Settings, own: usize) -> anyhow::Result<PgPool> {
    let own = u32::try_from(own).unwrap_or(u32::MAX);
    let size = settings.database.max_connections.saturating_sub(own).max(1);
    open(settings, size).await
}

/// A small pool of `size` connections beside the daemon's, outside the
/// budget, for work that is not outboxd's own: the demo's producer, the
/// chaos worker's effects.
pub async fn connect_beside(settings: &Settings, size: u32) -> anyhow::Result<PgPool> {
    open(settings, size.max(1)).await
}

async fn open(settings: &Settings, size: u32) -> anyhow::Result<PgPool> {
    let db = &settings.database;
    let url = PgConnectOptions::from_str(db.url.expose())
        .context("database.url (DATABASE_URL) is not a valid PostgreSQL URL")?
        .application_name("outboxd");
    let options = match db.pooler() {
        Pooler::Transaction => outbox_core::store::pooled_connect_options(&url),
        Pooler::None => session_options(url, db.idle_in_transaction_timeout_ms),
    };
    let shown = redact_url(db.url.expose());
    let opened = PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_millis(db.acquire_timeout_ms))
        .connect_with(options.clone())
        .await;
    let err = match opened {
        Ok(pool) => return Ok(pool),
        // The pool retries until its timeout and keeps only that: one more
        // attempt says why (refused, unknown database, wrong password).
        Err(sqlx::Error::PoolTimedOut) => {
            use sqlx::ConnectOptions;
            let wait = Duration::from_millis(db.acquire_timeout_ms);
            match tokio::time::timeout(wait, options.connect()).await {
                Ok(Err(why)) => why,
                // Silent (a host that drops packets) or fine now.
                Err(_) | Ok(Ok(_)) => sqlx::Error::PoolTimedOut,
            }
        }
        Err(err) => err,
    };
    Err(anyhow::Error::new(err).context(format!("cannot connect to PostgreSQL at {shown}")))
}

/// Refuses to go on behind a transaction-pooling PgBouncer: `what` (the
/// dispatcher, migrations, the consumer runtime) needs a direct connection.
pub fn require_direct(settings: &Settings, what: &str) -> anyhow::Result<()> {
    if settings.database.pooler() == Pooler::Transaction {
        anyhow::bail!(
            "{what} needs a direct connection to PostgreSQL (LISTEN, session advisory locks and session settings do not survive transaction pooling), but database.pooler = \"transaction\": point database.url (DATABASE_URL) at the server itself or at a session-pooling PgBouncer, and give the transaction-pooled URL to producers only"
        );
    }
    Ok(())
}

/// The session settings a direct connection carries.
fn session_options(url: PgConnectOptions, idle_in_transaction_timeout_ms: u64) -> PgConnectOptions {
    outbox_core::store::outbox::planner_options(&url)
        .options([(
            "idle_in_transaction_session_timeout",
            format!("{idle_in_transaction_timeout_ms}ms"),
        )])
        // A process cut off by the network keeps its row and advisory locks
        // until the server notices it is gone; probing an idle connection
        // after 30 s (3 probes, 10 s apart) bounds that to about a minute.
        .options([
            ("tcp_keepalives_idle", 30),
            ("tcp_keepalives_interval", 10),
            ("tcp_keepalives_count", 3),
        ])
}

/// A database URL fit for a log or a terminal: no password, no query
/// parameters (which may carry credentials or driver noise).
pub fn redact_url(url: &str) -> String {
    let url = url.split('?').next().unwrap_or_default();
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{}@{}", &url[..scheme + 3], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sessions_end_idle_transactions_and_probe_a_silent_client()
    -> Result<(), Box<dyn std::error::Error>> {
        let db = outbox_testkit::TestDb::new().await?;
        let settings = Settings::load_from(
            std::path::Path::new("../../config"),
            None,
            [("DATABASE_URL".to_owned(), db.url.clone())],
        )?;
        let pool = connect(&settings, 0).await?;
        for (name, want) in [
            ("idle_in_transaction_session_timeout", "60000"),
            ("tcp_keepalives_idle", "30"),
            ("tcp_keepalives_interval", "10"),
            ("tcp_keepalives_count", "3"),
            ("enable_bitmapscan", "off"),
            ("enable_seqscan", "off"),
        ] {
            let got = outbox_core::store::stats::setting(&pool, name).await?;
            assert_eq!(got, want, "{name}");
        }
        Ok(())
    }

    #[tokio::test]
    async fn the_pool_gets_the_budget_less_the_dispatchers_own_connections()
    -> Result<(), Box<dyn std::error::Error>> {
        let db = outbox_testkit::TestDb::new().await?;
        let settings = Settings::load_from(
            std::path::Path::new("../../config"),
            None,
            [
                ("DATABASE_URL".to_owned(), db.url.clone()),
                (
                    "OUTBOXD_DATABASE__MAX_CONNECTIONS".to_owned(),
                    "12".to_owned(),
                ),
            ],
        )?;
        let own = settings.dispatcher_config().own_connections();
        let pool = connect(&settings, own).await?;
        assert_eq!(pool.options().get_max_connections() as usize, 12 - own);
        Ok(())
    }
}
