//! The consumer runtime, for services that consume what outboxd relays: a
//! durable pull consumer with explicit acks, handlers by subject, typed
//! errors, poison handling, dead letters and optional de-duplication.
//!
//! Per message:
//! 1. not a JetStream message, no route for the subject, undecodable JSON, or
//!    a `tenant-id` header that disagrees with the subject → `term` + log
//!    (never redelivered forever);
//! 2. with de-duplication on, claim the `Nats-Msg-Id`: a duplicate is acked
//!    and skipped, a message another consumer is running is nak'ed for later;
//! 3. run the handler; it answers in the dispatcher's vocabulary,
//!    [`HandlerError`]: `Ok` → mark done, `ack`; [`HandlerError::Retry`] →
//!    release the claim, `nak` with backoff, or after the last allowed
//!    delivery write a dead letter and `term`; [`HandlerError::Snooze`] →
//!    `nak` after exactly that delay (JetStream counts it as a delivery);
//!    [`HandlerError::Permanent`] → dead letter, `term`. If the dead letter
//!    cannot be written the message is nak'ed, never lost.

mod dead_letter;
mod delivery;
mod routing;
mod run;

pub use dead_letter::mask;
pub use delivery::Delivery;
pub use routing::subject_matches;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream;
use outbox_core::store::apps;
use sqlx::PgPool;
use uuid::Uuid;

/// Consumer runtime settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The stream to consume.
    pub stream: String,
    /// Durable consumer name; derive it with [`durable_name`] so restarts and
    /// rolling deploys reuse it.
    pub durable: String,
    /// Subjects to consume (empty: all of the stream's).
    pub filter_subjects: Vec<String>,
    /// The server redelivers a message not acked within this long.
    pub ack_wait: Duration,
    /// Deliveries before a message is dead-lettered (enforced by the runtime,
    /// so a message whose dead letter cannot be written yet is still redelivered).
    pub max_deliver: i64,
    /// Handlers running at once; also the consumer's `max_ack_pending`.
    pub concurrency: usize,
    /// Messages requested per pull.
    pub batch: usize,
    /// Bound on each ack / nak / term round trip.
    pub ack_timeout: Duration,
    /// Nak delay after the first failed delivery; doubles per delivery.
    pub nak_base: Duration,
    /// The nak delay never grows past this.
    pub nak_max: Duration,
    /// De-duplicate by `Nats-Msg-Id` for this long (None: off).
    pub dedupe_ttl: Option<Duration>,
    /// JSON keys whose values are replaced by `"***"` in dead-lettered payloads.
    pub mask_fields: Vec<String>,
    /// Which dot-separated subject token names the tenant (1 in `tenant.<app>.<topic>`).
    pub tenant_token: usize,
    /// On shutdown, how long running handlers may finish.
    pub drain_grace: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            stream: "OUTBOX".into(),
            durable: durable_name("consumer", "default"),
            filter_subjects: Vec::new(),
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            concurrency: 64,
            batch: 64,
            ack_timeout: Duration::from_secs(5),
            nak_base: Duration::from_millis(500),
            nak_max: Duration::from_secs(60),
            dedupe_ttl: None,
            mask_fields: Vec::new(),
            tenant_token: 1,
            drain_grace: Duration::from_secs(10),
        }
    }
}

/// A durable consumer name from a role and a group: deterministic, so every
/// process of the group (and every restart) shares one consumer.
pub fn durable_name(role: &str, group: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("outboxd_{}_{}", clean(role), clean(group))
}

pub use outbox_dispatch::HandlerError;

/// The future a message handler returns.
pub type ConsumeFuture = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'static>>;

/// Handles deliveries of the subjects it is routed.
pub trait MessageHandler: Send + Sync + 'static {
    /// Handles one delivery.
    fn handle(&self, delivery: Delivery) -> ConsumeFuture;
}

impl<F, Fut> MessageHandler for F
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn handle(&self, delivery: Delivery) -> ConsumeFuture {
        Box::pin(self(delivery))
    }
}

/// Counts of what the runtime did, for tests and reports.
#[derive(Debug, Default)]
pub struct ConsumeCounters {
    /// Handled and acked.
    pub consumed: AtomicU64,
    /// Nak'ed for redelivery.
    pub retried: AtomicU64,
    /// Skipped as duplicates.
    pub deduped: AtomicU64,
    /// Terminated as unknown or undecodable.
    pub poisoned: AtomicU64,
    /// Written to `dead_letters`.
    pub dead_lettered: AtomicU64,
    /// Terminated because the tenant header disagreed with the subject.
    pub tenant_rejected: AtomicU64,
    /// Terminated because no app has the subject's tenant; parked as dead
    /// letters of the reserved app `_unrouted`.
    pub unknown_tenant: AtomicU64,
}

impl ConsumeCounters {
    fn bump(counter: &AtomicU64, metric: &'static str) {
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(metric).increment(1);
    }

    /// A counter's value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// The consumer runtime. Build it, add routes, then [`ConsumerRuntime::run`].
#[derive(Clone)]
pub struct ConsumerRuntime {
    js: jetstream::Context,
    pool: PgPool,
    config: Arc<ConsumerConfig>,
    routes: Arc<Vec<(String, Arc<dyn MessageHandler>)>>,
    // App id and suspension by slug, refreshed after APP_CACHE_TTL.
    apps: Arc<RwLock<HashMap<String, CachedApp>>>,
    /// What the runtime did so far.
    pub counters: Arc<ConsumeCounters>,
}

/// How long an app's suspension state may be stale in the consumer.
const APP_CACHE_TTL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
struct CachedApp {
    id: Uuid,
    suspended: bool,
    fetched: std::time::Instant,
}

enum Verdict {
    Ack,
    Nak(Duration),
    /// Stop redelivery; the reason shows in the server's advisory (2.10.4+).
    Term(String),
}

impl ConsumerRuntime {
    /// A runtime on `js`, writing dead letters and de-duplication state through `pool`.
    pub fn new(js: jetstream::Context, pool: PgPool, config: ConsumerConfig) -> Self {
        Self {
            js,
            pool,
            config: Arc::new(config),
            routes: Arc::new(Vec::new()),
            apps: Arc::default(),
            counters: Arc::default(),
        }
    }

    async fn app(&self, slug: &str) -> Option<CachedApp> {
        if let Some(app) = self.apps.read().ok().and_then(|m| m.get(slug).copied())
            && app.fetched.elapsed() < APP_CACHE_TTL
        {
            return Some(app);
        }
        let row = apps::by_slug(&self.pool, slug).await.ok()?;
        let app = CachedApp {
            id: row.id,
            suspended: row.suspended_at.is_some(),
            fetched: std::time::Instant::now(),
        };
        if let Ok(mut m) = self.apps.write() {
            m.insert(slug.to_owned(), app);
        }
        Some(app)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_names_are_sanitized_and_stable() {
        assert_eq!(
            durable_name("notify", "eu west.1"),
            "outboxd_notify_eu_west_1"
        );
        assert_eq!(durable_name("notify", "g"), durable_name("notify", "g"));
    }
}
