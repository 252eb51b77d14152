//! `[database]`: the URL, the pool and the one connection budget.

use serde::{Deserialize, Serialize};

use super::{ConfigError, Secret, Settings, range};

/// `[database]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct DatabaseSettings {
    pub url: Secret,
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
    pub idle_in_transaction_timeout_ms: u64,
    pub auto_migrate: bool,
    pub pooler: String,
}

/// What `database.pooler` says sits between outboxd and PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooler {
    /// A direct connection (or a session-pooling PgBouncer).
    None,
    /// A transaction-pooling PgBouncer: fine for producers and one-shot
    /// commands, refused for the dispatcher.
    Transaction,
}

impl DatabaseSettings {
    /// `database.pooler`, parsed (validation has refused anything else).
    pub fn pooler(&self) -> Pooler {
        if self.pooler == "transaction" {
            Pooler::Transaction
        } else {
            Pooler::None
        }
    }
}

impl Settings {
    /// `[database]`.
    pub(super) fn validate_database(&self) -> Result<(), ConfigError> {
        let db = &self.database;
        range(
            "database.max_connections",
            db.max_connections as u64,
            2,
            1000,
        )?;
        range(
            "database.acquire_timeout_ms",
            db.acquire_timeout_ms,
            100,
            600_000,
        )?;
        range(
            "database.idle_in_transaction_timeout_ms",
            db.idle_in_transaction_timeout_ms,
            1000,
            3_600_000,
        )?;
        if !matches!(db.pooler.as_str(), "none" | "transaction") {
            return Err(ConfigError::Range {
                key: "database.pooler",
                value: format!("{:?}", db.pooler),
                problem: "is not a known pooler",
                accepted: "\"none\" (a direct connection) or \"transaction\" (a transaction-pooling PgBouncer)".into(),
                env_hint: super::env_hint("database.pooler"),
            });
        }
        let url = db.url.expose();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError::Range {
                key: "database.url",
                value: "(hidden)".into(),
                problem: "is not a PostgreSQL URL",
                accepted: "postgres://user[:password]@host[:port]/database".into(),
                env_hint: super::env_hint("database.url"),
            });
        }
        // The one connection budget: what a running daemon opens outside
        // the pool comes out of it (the dispatcher's own connections, and the
        // leader's, which leaves the pool while it leads), and the pool needs
        // two at least (an outcome write and a handler's query at once).
        let own = self.dispatcher_config().own_connections() as u64 + 1;
        if u64::from(db.max_connections) < own + 2 {
            return Err(ConfigError::Range {
                key: "database.max_connections",
                value: db.max_connections.to_string(),
                problem: "is too small for the dispatcher",
                accepted: format!(
                    "at least {} with {} claim loops ({own} connections of the daemon's own: one per claim loop{}, LISTEN, the pacer and the leader; and 2 for the pool)",
                    own + 2,
                    self.dispatcher_config().claim_loops(),
                    if self.dispatcher.in_transaction {
                        " and one batch keeper per loop"
                    } else {
                        ""
                    },
                ),
                env_hint: super::env_hint("database.max_connections"),
            });
        }
        Ok(())
    }
}
