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
//! - [`dispatcher`]: [`Dispatcher`] — the claim loop, heartbeat, completer and drain.
//! - [`maintenance`]: background services of the same shape (the cron [`maintenance::Scheduler`]).

pub mod dispatcher;
mod error;
mod failure_log;
pub mod handler;
pub mod maintenance;
pub mod retry;
pub mod targets;
pub mod telemetry;

pub use dispatcher::{BatchReport, Config, Dispatcher, DrainReport, NO_HANDLER};
pub use error::Error;
pub use handler::{ClaimTx, Event, Handler, HandlerError, Registry};
pub use retry::RetryPolicy;
