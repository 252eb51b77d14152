//! The outboxd dispatcher: claims due outbox rows, runs the handler registered
//! for each row's topic, and records the outcome.
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use outbox_core::{NewEvent, enqueue};
//! use outbox_dispatch::{Config, Dispatcher, Event, HandlerError, Registry};
//!
//! // Once at start: outboxd's tables, and the app (tenant) your rows belong to.
//! outbox_core::migrate(&pool).await?;
//! let app_id = outbox_core::ensure_app(&pool, "shop", "Shop").await?.id;
//!
//! // Producer: the event commits or rolls back with the caller's data.
//! let mut tx = pool.begin().await?;
//! enqueue(&mut tx, app_id, &NewEvent::new("order.created", serde_json::json!({"id": 42}))).await?;
//! tx.commit().await?;
//!
//! // Consumer: handlers by topic.
//! let mut registry = Registry::new();
//! registry.register("order.created", |event: Event| async move {
//!     println!("order {} created", event.payload["id"]);
//!     Ok::<(), HandlerError>(())
//! });
//! let dispatcher = Dispatcher::new(pool, registry, Config::default())?;
//! dispatcher.run(async { tokio::signal::ctrl_c().await.ok(); }).await?;
//! # Ok(()) }
//! ```
//!
//! # Outcomes
//! A handler's result decides what happens to the row:
//! - `Ok(())` deletes it;
//! - [`HandlerError::Retry`] reschedules it with exponential backoff and full
//!   jitter ([`RetryPolicy`]) until its attempts are spent, then dead-letters it;
//! - [`HandlerError::Permanent`] dead-letters it at once;
//! - [`HandlerError::Snooze`] runs it again after a delay without spending an attempt;
//! - a panic or a timeout counts as a failed attempt.
//!
//! Dead-lettering deletes the outbox row and inserts the `dead_letters` row in
//! one statement. Attempts are counted when a row is claimed, so a row whose
//! worker keeps crashing still reaches its limit.
//!
//! # Layout
//! - [`handler`]: the [`Event`] handlers receive, [`HandlerError`], [`Registry`].
//! - [`retry`]: [`RetryPolicy`] (backoff).
//! - [`config`]: [`Config`] and the rules that relate its settings.
//! - [`dispatcher`]: [`Dispatcher`] — construction, run and drain, and the
//!   state its parts share. The parts: `lease/` (claim loop, completer,
//!   heartbeat), `transactional` (transactional mode), [`pacer`] (when claim
//!   loops look, and the wake vocabulary), `outcome` (running a handler and
//!   the one mapping from its outcome to a write).
//! - [`maintenance`]: background services of one shape ([`maintenance::Service`])
//!   started and stopped by one [`maintenance::Supervisor`].
//! - [`subscription`]: what this process serves, and its row in
//!   `outbox_processes` that tells the others.
//! - [`targets`]: built-in handlers (webhooks).

pub mod config;
pub mod dispatcher;
mod error;
mod failure_log;
pub mod handler;
mod lease;
pub mod maintenance;
mod outcome;
pub mod pacer;
pub mod positions;
pub mod retry;
pub mod subscription;
pub mod targets;
pub mod telemetry;
mod transactional;

pub use config::{Config, default_worker_id};
pub use dispatcher::{BatchReport, Dispatcher, DrainReport};
pub use error::Error;
pub use handler::{ClaimTx, Event, Handler, HandlerError, Registry};
pub use outcome::NO_HANDLER;
pub use retry::RetryPolicy;

/// A token cancelled when `shutdown` completes (or when cancelled itself):
/// how a `run(shutdown)` future becomes something every task it starts
/// can watch.
pub fn cancelled_by(
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio_util::sync::CancellationToken {
    let stop = tokio_util::sync::CancellationToken::new();
    let watched = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown => watched.cancel(),
            () = watched.cancelled() => {}
        }
    });
    stop
}
