//! Integration tests of enqueue and dispatch against a real PostgreSQL.
//! Each test gets its own database (outbox_testkit::TestDb).

mod dispatch;
mod enqueueing;
mod leadership;
mod leases;
mod limits;
mod ordering;
mod replayer;
mod sampler;
mod segments;
mod subscriptions;
mod sweeper;
mod transactional;
mod triggers;
mod webhook;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::NewEvent;
use outbox_dispatch::{
    Config, Dispatcher, DrainReport, Event, HandlerError, Registry, RetryPolicy,
};
use outbox_testkit::TestDb;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub(crate) type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Fast settings for tests.
pub(crate) fn config() -> Config {
    Config {
        batch_size: 50,
        concurrency: 64,
        poll_interval: Duration::from_millis(50),
        lease: Duration::from_secs(10),
        handler_timeout: Duration::from_secs(5),
        heartbeat_interval: Duration::from_secs(2),
        drain_grace: Duration::from_secs(2),
        retry: RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(10),
            max: Duration::from_millis(100),
            jitter: true,
        },
        ..Config::default()
    }
}

/// Counts handler invocations per event id.
#[derive(Clone, Default)]
pub(crate) struct Calls(Arc<Mutex<HashMap<Uuid, u32>>>);

impl Calls {
    pub(crate) fn record(&self, id: Uuid) {
        *self.0.lock().expect("calls lock").entry(id).or_default() += 1;
    }
    pub(crate) fn of(&self, id: Uuid) -> u32 {
        self.0
            .lock()
            .expect("calls lock")
            .get(&id)
            .copied()
            .unwrap_or(0)
    }
    pub(crate) fn total(&self) -> u32 {
        self.0.lock().expect("calls lock").values().sum()
    }
    pub(crate) fn distinct(&self) -> usize {
        self.0.lock().expect("calls lock").len()
    }
}

/// Enqueues one event in its own committed transaction.
pub(crate) async fn enqueue_committed(
    pool: &PgPool,
    app: Uuid,
    event: NewEvent,
) -> Result<Uuid, outbox_core::Error> {
    let mut tx = pool.begin().await?;
    let id = outbox_core::enqueue(&mut tx, app, &event).await?;
    tx.commit().await?;
    Ok(id)
}

/// "Advances the clock": makes every waiting row due now.
pub(crate) async fn make_all_due(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE outbox SET run_at = now() WHERE locked_by IS NULL OR locked_until < now()")
        .execute(pool)
        .await?;
    Ok(())
}

pub(crate) async fn dead_letter_count(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(pool)
        .await
}

/// Runs `dispatcher` in a task until `stop` is cancelled.
pub(crate) fn spawn_run(
    dispatcher: Dispatcher,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<Result<DrainReport, outbox_dispatch::Error>> {
    let stop = stop.clone();
    tokio::spawn(async move { dispatcher.run(async move { stop.cancelled().await }).await })
}

/// A dispatcher whose `topic` handler records calls and then returns `result`.
pub(crate) fn recording(
    db: &TestDb,
    topic: &str,
    calls: &Calls,
    result: impl Fn(&Event) -> Result<(), HandlerError> + Send + Sync + 'static,
    config: Config,
) -> Dispatcher {
    let calls = calls.clone();
    let result = Arc::new(result);
    let mut registry = Registry::new();
    registry.register(topic, move |event: Event| {
        let calls = calls.clone();
        let result = result.clone();
        async move {
            calls.record(event.id);
            result(&event)
        }
    });
    Dispatcher::new(db.pool.clone(), registry, config).expect("valid config")
}

pub(crate) fn payload(n: u64) -> serde_json::Value {
    json!({ "n": n })
}
