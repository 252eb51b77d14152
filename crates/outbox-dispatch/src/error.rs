/// Errors that stop a dispatcher (handler failures never do).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A statement of the core stores failed.
    #[error(transparent)]
    Core(#[from] outbox_core::Error),
    /// The database connection failed outside a store call (e.g. LISTEN).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The configuration is inconsistent.
    #[error("invalid dispatcher config: {0}")]
    Config(String),
    /// An internal invariant did not hold (a bug, reported instead of a panic).
    #[error("internal error: {0}")]
    Internal(&'static str),
}
