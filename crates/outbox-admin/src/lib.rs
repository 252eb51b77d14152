//! outboxd's admin surface: authentication (argon2id passwords, HS256 JWTs,
//! API keys, login rate limits), per-app roles mapped to capabilities, the
//! dead-letter JSON API under `/api`, and the dashboard (server-rendered HTML
//! on the same server).
//!
//! # Layout
//! - [`auth`]: hashing, tokens and sessions, API keys, the login throttle, [`auth::authorize`].
//! - [`api`]: the dead-letter JSON endpoints.
//! - [`events_api`]: the producer API: KV, events, jobs and triggers over HTTP.
//! - [`dashboard`]: the HTML pages and their forms (cookie session + CSRF).
//! - [`ApiError`]: stable error codes and statuses.
//!
//! All SQL goes through `outbox_core::store`.
//!
//! Mount it in your own axum server:
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let auth = outbox_admin::AuthConfig::new(std::env::var("JWT_SECRET")?.into_bytes())?;
//! let admin = outbox_admin::router(outbox_admin::AdminState::new(pool, auth)?);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, admin).await?;
//! # Ok(()) }
//! ```

pub mod accounts;
pub mod api;
pub mod audit;
pub mod auth;
pub mod dashboard;
mod error;
pub mod events_api;
pub mod invoke;
pub mod strict;
pub mod webhooks;

pub use auth::AuthConfig;
pub use error::ApiError;

use axum::Router;
use sqlx::PgPool;

/// What every admin handler shares.
#[derive(Clone)]
pub struct AdminState {
    /// The database.
    pub pool: PgPool,
    /// Token and cookie settings.
    pub auth: AuthConfig,
    /// Password hashing off the async runtime.
    pub hasher: auth::Hasher,
    /// Failed-login counters, in the database.
    pub throttle: auth::Throttle,
    /// Wakes synchronous callers when their answer is in.
    pub replies: invoke::ReplyHub,
    /// The largest request body accepted on any route (413 `too_large` past it).
    pub body_limit: usize,
    /// Base URLs the OpenAPI document lists under `servers` (where clients
    /// reach this server); empty keeps the document's placeholder.
    pub api_servers: Vec<String>,
    /// Reads what was relayed to a message stream (`GET …/stream`); none
    /// without one.
    pub stream_reader: Option<std::sync::Arc<dyn StreamReader>>,
    /// Room for row searches, so that they cannot take the whole pool.
    pub row_searches: api::RowSearches,
}

/// What was relayed for one app, read back for operators: the daemon gives
/// one backed by NATS JetStream (the admin crate speaks no NATS itself).
pub trait StreamReader: Send + Sync {
    /// The latest `last` messages of the app `app` (its slug) whose subject
    /// after the tenant's token matches `subject` (NATS wildcards), stored
    /// at most `since` ago; each a JSON document.
    fn tail(
        &self,
        app: &str,
        subject: &str,
        last: usize,
        since: std::time::Duration,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<Vec<serde_json::Value>, StreamReadError>>
                + Send
                + '_,
        >,
    >;
}

/// Why a [`StreamReader`] read nothing.
#[derive(Debug, thiserror::Error)]
pub enum StreamReadError {
    /// The subject filter is not one (400).
    #[error("{0}")]
    Filter(String),
    /// The stream could not be read (500; the detail is logged).
    #[error("{0}")]
    Unavailable(String),
}

impl AdminState {
    /// State for `pool` with `auth`.
    /// Must be called inside a Tokio runtime (it starts the reply listener).
    pub fn new(pool: PgPool, auth: AuthConfig) -> Result<Self, ApiError> {
        let pool_for_replies = pool.clone();
        Ok(Self {
            throttle: auth::Throttle::new(pool.clone(), auth.throttle.clone()),
            row_searches: api::RowSearches::for_pool(&pool),
            pool,
            auth,
            hasher: auth::Hasher::new()?,
            replies: invoke::ReplyHub::start(pool_for_replies),
            body_limit: strict::DEFAULT_BODY_LIMIT,
            api_servers: Vec::new(),
            stream_reader: None,
        })
    }
}

/// The admin router: `/api/...` and the dashboard pages, every route
/// bounded by `state.body_limit`.
pub fn router(state: AdminState) -> Router {
    let limit = state.body_limit;
    let secure_cookies = state.auth.secure_cookies;
    api::routes()
        .merge(events_api::routes())
        .merge(invoke::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::declared::refuse_undeclared,
        ))
        .layer(axum::middleware::map_response(move |res| {
            error::api_response(res, limit)
        }))
        .merge(dashboard::routes(secure_cookies))
        .fallback(error::not_found)
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Creates a user with an argon2id hash of `password` (CLI bootstrap).
pub async fn create_user(
    pool: &PgPool,
    email: &str,
    password: &str,
    is_admin: bool,
) -> Result<outbox_core::store::principals::User, ApiError> {
    let hash = accounts::new_user_hash(&auth::Hasher::new()?, email, password).await?;
    Ok(outbox_core::store::principals::create_user(pool, email, &hash, is_admin).await?)
}

/// Creates an API key for a user; returns the key (shown once).
pub async fn create_api_key(
    pool: &PgPool,
    user_id: uuid::Uuid,
    name: &str,
) -> Result<String, ApiError> {
    let (key, prefix, hash) = auth::new_api_key();
    outbox_core::store::principals::create_api_key(pool, user_id, name, &prefix, &hash).await?;
    Ok(key)
}
