/// Errors of the core crate: the database, migrations, and invalid input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database refused or failed a statement.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration could not be applied.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database holds an outboxd migration this build does not know: a
    /// newer outboxd migrated it.
    #[error(
        "the database was migrated by a newer outboxd (its migration {found} is unknown to this one, which knows up to {known}): run that version or a later one"
    )]
    SchemaNewer {
        /// The unknown migration.
        found: i64,
        /// The last migration this build knows.
        known: i64,
    },
    /// No app has this slug or id.
    #[error("unknown app {0:?}")]
    UnknownApp(String),
    /// No row has this id (or it belongs to another app).
    #[error("not found: {0}")]
    NotFound(String),
    /// The row is not in the state the caller expected (e.g. a KV version).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The caller passed a value the model does not accept.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Which input was wrong.
        field: &'static str,
        /// What is wrong with it and what is accepted.
        reason: String,
    },
}

impl Error {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            reason: reason.into(),
        }
    }
}
