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

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures::{FutureExt, StreamExt};
use outbox_core::store::{apps, dead_letters, dedupe};
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{info, warn};
use uuid::Uuid;

use crate::Error;

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

/// One delivery of a message, as a handler sees it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message subject.
    pub subject: String,
    /// The tenant's app slug (from the subject, checked against `tenant-id`).
    pub tenant: String,
    /// The tenant's app id.
    pub app_id: Uuid,
    /// `Nats-Msg-Id` (the outbox id for relayed events).
    pub message_id: Option<String>,
    /// The decoded JSON body.
    pub payload: Value,
    /// Message headers (first value of each).
    pub headers: HashMap<String, String>,
    /// This delivery's number, starting at 1.
    pub delivered: i64,
    /// Sequence in the stream.
    pub stream_sequence: u64,
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

/// `+TERM <reason>`: async-nats has no term-with-reason, so send the ack body
/// to the message's reply subject ourselves.
async fn term(message: &jetstream::Message, reason: &str) -> Result<(), async_nats::Error> {
    let Some(reply) = message.message.reply.clone() else {
        return message.ack_with(AckKind::Term).await;
    };
    let reason: String = reason
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    message
        .context
        .client()
        .publish(reply, format!("+TERM {reason}").into())
        .await?;
    Ok(())
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

    /// Routes subjects matching `pattern` (NATS wildcards `*` and `>`) to `handler`.
    /// The first matching route wins.
    pub fn route(mut self, pattern: impl Into<String>, handler: impl MessageHandler) -> Self {
        Arc::make_mut(&mut self.routes).push((pattern.into(), Arc::new(handler)));
        self
    }

    /// Creates the durable pull consumer, or binds to the existing one.
    pub async fn consumer(&self) -> Result<jetstream::consumer::Consumer<pull::Config>, Error> {
        let c = &self.config;
        let stream = self
            .js
            .get_stream(&c.stream)
            .await
            .map_err(|e| Error::JetStream(format!("get stream {}: {e}", c.stream)))?;
        stream
            .get_or_create_consumer(
                &c.durable,
                pull::Config {
                    durable_name: Some(c.durable.clone()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: c.ack_wait,
                    // The runtime enforces max_deliver itself: a message whose
                    // dead letter could not be written is nak'ed, and must
                    // still be redelivered after its last allowed delivery.
                    max_deliver: -1,
                    max_ack_pending: c.concurrency as i64,
                    filter_subjects: c.filter_subjects.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| Error::JetStream(format!("consumer {}: {e}", c.durable)))
    }

    /// Consumes until `shutdown` completes, then lets running handlers
    /// finish within `drain_grace`. Outages are retried with backoff.
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let permits = Arc::new(Semaphore::new(self.config.concurrency));
        let mut tasks = JoinSet::new();
        let mut failures = 0u32;
        tokio::pin!(shutdown);
        'outer: loop {
            let consumer = match self.consumer().await {
                Ok(c) => c,
                Err(err) => {
                    failures = failures.saturating_add(1);
                    let pause = Duration::from_millis((200u64 << failures.min(5)).min(5000));
                    warn!(error = %err, ?pause, "consumer unavailable; retrying");
                    tokio::select! {
                        () = &mut shutdown => break 'outer,
                        () = tokio::time::sleep(pause) => continue 'outer,
                    }
                }
            };
            let mut messages = match consumer
                .stream()
                .max_messages_per_batch(self.config.batch)
                .messages()
                .await
            {
                Ok(m) => m,
                Err(err) => {
                    failures = failures.saturating_add(1);
                    warn!(error = %err, "cannot pull messages; retrying");
                    tokio::select! {
                        () = &mut shutdown => break 'outer,
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue 'outer,
                    }
                }
            };
            info!(durable = %self.config.durable, stream = %self.config.stream, "consuming");
            loop {
                let permit = tokio::select! {
                    () = &mut shutdown => break 'outer,
                    p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break 'outer },
                };
                let next = tokio::select! {
                    () = &mut shutdown => break 'outer,
                    next = messages.next() => next,
                };
                match next {
                    Some(Ok(message)) => {
                        failures = 0;
                        let runtime = self.clone();
                        tasks.spawn(async move {
                            runtime.process(message).await;
                            drop(permit);
                        });
                    }
                    Some(Err(err)) => {
                        warn!(error = %err, "pull failed; re-subscribing");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue 'outer;
                    }
                    None => continue 'outer,
                }
                while tasks.try_join_next().is_some() {}
            }
        }
        let deadline = tokio::time::Instant::now() + self.config.drain_grace;
        while !tasks.is_empty() {
            if tokio::time::timeout_at(deadline, tasks.join_next())
                .await
                .is_err()
            {
                // Unacked messages are redelivered after ack_wait.
                tasks.abort_all();
            }
        }
        Ok(())
    }

    /// Handles one message end to end, including its ack/nak/term.
    pub async fn process(&self, message: jetstream::Message) {
        let verdict = self.decide(&message).await;
        let (label, sent) = match &verdict {
            Verdict::Ack => (
                "ack",
                tokio::time::timeout(self.config.ack_timeout, message.ack_with(AckKind::Ack)).await,
            ),
            Verdict::Nak(delay) => (
                "nak",
                tokio::time::timeout(
                    self.config.ack_timeout,
                    message.ack_with(AckKind::Nak(Some(*delay))),
                )
                .await,
            ),
            Verdict::Term(reason) => (
                "term",
                tokio::time::timeout(self.config.ack_timeout, term(&message, reason)).await,
            ),
        };
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                warn!(subject = %message.subject, error = %err, ack = label, "ack failed; the server redelivers after ack_wait")
            }
            Err(_) => {
                warn!(subject = %message.subject, ack = label, "ack timed out; the server redelivers after ack_wait")
            }
        }
    }

    fn nak_delay(&self, delivered: i64) -> Duration {
        let exp = (delivered.max(1) - 1).min(20) as u32;
        self.config
            .nak_base
            .checked_mul(1u32 << exp)
            .map_or(self.config.nak_max, |d| d.min(self.config.nak_max))
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

    async fn decide(&self, message: &jetstream::Message) -> Verdict {
        let c = &self.counters;
        let subject = message.subject.to_string();
        let Ok(info) = message.info() else {
            warn!(%subject, "not a JetStream message; terminating");
            ConsumeCounters::bump(&c.poisoned, "outboxd_consumer_poisoned_total");
            return Verdict::Term("not a JetStream message".into());
        };
        let (delivered, stream_sequence) = (info.delivered, info.stream_sequence);
        let Some(handler) = self
            .routes
            .iter()
            .find(|(pattern, _)| subject_matches(pattern, &subject))
            .map(|(_, h)| h.clone())
        else {
            warn!(%subject, "no handler for this subject; terminating");
            ConsumeCounters::bump(&c.poisoned, "outboxd_consumer_poisoned_total");
            return Verdict::Term("no handler for this subject".into());
        };
        let Ok(payload) = serde_json::from_slice::<Value>(&message.payload) else {
            warn!(%subject, stream_sequence, "payload is not JSON; terminating");
            ConsumeCounters::bump(&c.poisoned, "outboxd_consumer_poisoned_total");
            return Verdict::Term("payload is not JSON".into());
        };
        let headers: HashMap<String, String> = message
            .headers
            .as_ref()
            .map(|h| {
                h.iter()
                    .filter_map(|(k, v)| Some((k.to_string(), v.first()?.as_str().to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        let tenant = subject
            .split('.')
            .nth(self.config.tenant_token)
            .unwrap_or_default()
            .to_owned();
        if headers.get("tenant-id").is_some_and(|t| *t != tenant) || tenant.is_empty() {
            warn!(%subject, header = ?headers.get("tenant-id"), "tenant header disagrees with the subject; terminating");
            ConsumeCounters::bump(&c.tenant_rejected, "outboxd_consumer_tenant_rejected_total");
            return Verdict::Term("tenant-id header disagrees with the subject".into());
        }
        // An unknown tenant has no app to file a dead letter under.
        let Some(app) = self.app(&tenant).await else {
            warn!(%subject, %tenant, "unknown app; terminating");
            ConsumeCounters::bump(&c.poisoned, "outboxd_consumer_poisoned_total");
            return Verdict::Term(format!("unknown app {tenant}"));
        };
        let app_id = app.id;
        let message_id = headers.get("Nats-Msg-Id").cloned();
        if app.suspended {
            let error = format!("app {tenant} is suspended; the message was not processed");
            return self
                .dead_letter(
                    &subject,
                    app_id,
                    &message_id,
                    &payload,
                    &headers,
                    delivered,
                    &error,
                    None,
                )
                .await;
        }
        let dedupe_key = self.config.dedupe_ttl.and(message_id.clone());
        if let Some(key) = &dedupe_key {
            match dedupe::claim(&self.pool, &self.config.durable, key, self.config.ack_wait).await {
                Ok(dedupe::Claim::Claimed) => {}
                Ok(dedupe::Claim::Duplicate) => {
                    ConsumeCounters::bump(&c.deduped, "outboxd_consumer_deduped_total");
                    return Verdict::Ack;
                }
                Ok(dedupe::Claim::Busy) => {
                    ConsumeCounters::bump(&c.retried, "outboxd_consumer_retried_total");
                    return Verdict::Nak(self.config.nak_base);
                }
                Err(err) => {
                    warn!(%subject, error = %err, "de-duplication claim failed; redelivering");
                    return Verdict::Nak(self.nak_delay(delivered));
                }
            }
        }
        let delivery = Delivery {
            subject: subject.clone(),
            tenant,
            app_id,
            message_id: message_id.clone(),
            payload: payload.clone(),
            headers: headers.clone(),
            delivered,
            stream_sequence,
        };
        let run = AssertUnwindSafe(handler.handle(delivery)).catch_unwind();
        let result = match tokio::time::timeout(self.config.ack_wait, run).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(HandlerError::Retry("handler panicked".into())),
            Err(_) => Err(HandlerError::Retry(format!(
                "handler ran past ack_wait {:?}",
                self.config.ack_wait
            ))),
        };
        let error = match result {
            Ok(()) => {
                if let (Some(key), Some(ttl)) = (&dedupe_key, self.config.dedupe_ttl)
                    && let Err(err) =
                        dedupe::complete(&self.pool, &self.config.durable, key, ttl).await
                {
                    warn!(%subject, error = %err, "could not mark the message done; a redelivery may run it again");
                }
                ConsumeCounters::bump(&c.consumed, "outboxd_consumer_consumed_total");
                return Verdict::Ack;
            }
            Err(HandlerError::Snooze(delay)) if delivered < self.config.max_deliver => {
                if let Some(key) = &dedupe_key {
                    let _ = dedupe::release(&self.pool, &self.config.durable, key).await;
                }
                return Verdict::Nak(delay);
            }
            Err(HandlerError::Snooze(_)) => format!(
                "snoozed past the last delivery ({delivered} of {})",
                self.config.max_deliver
            ),
            Err(HandlerError::Retry(e)) if delivered < self.config.max_deliver => {
                tracing::debug!(%subject, delivered, error = %e, "handler failed; redelivering");
                if let Some(key) = &dedupe_key {
                    let _ = dedupe::release(&self.pool, &self.config.durable, key).await;
                }
                ConsumeCounters::bump(&c.retried, "outboxd_consumer_retried_total");
                return Verdict::Nak(self.nak_delay(delivered));
            }
            Err(HandlerError::Retry(e)) => {
                format!("{e} (delivery {delivered} of {})", self.config.max_deliver)
            }
            Err(HandlerError::Permanent(e)) => e,
        };
        self.dead_letter(
            &subject,
            app_id,
            &message_id,
            &payload,
            &headers,
            delivered,
            &error,
            dedupe_key.as_deref(),
        )
        .await
    }

    /// Writes a masked dead letter and terms the message; if the row cannot
    /// be written, naks it so it is not lost.
    #[allow(clippy::too_many_arguments)]
    async fn dead_letter(
        &self,
        subject: &str,
        app_id: Uuid,
        message_id: &Option<String>,
        payload: &Value,
        headers: &HashMap<String, String>,
        delivered: i64,
        error: &str,
        dedupe_key: Option<&str>,
    ) -> Verdict {
        let c = &self.counters;
        let masked = mask(payload, &self.config.mask_fields);
        let headers_json = serde_json::to_value(headers).unwrap_or_default();
        let original = message_id
            .as_deref()
            .and_then(|id| Uuid::parse_str(id).ok())
            .unwrap_or_else(Uuid::now_v7);
        let row = dead_letters::External {
            app_id,
            original_event_id: original,
            source: "nats",
            topic: subject,
            handler: Some(&self.config.durable),
            payload: &masked,
            headers: &headers_json,
            attempt_count: delivered.min(i64::from(i32::MAX)) as i32,
            last_error: error,
        };
        match dead_letters::insert_external(&self.pool, &row).await {
            Ok(_) => {
                if let (Some(key), Some(ttl)) = (dedupe_key, self.config.dedupe_ttl) {
                    let _ = dedupe::complete(&self.pool, &self.config.durable, key, ttl).await;
                }
                ConsumeCounters::bump(&c.dead_lettered, "outboxd_consumer_dead_lettered_total");
                Verdict::Term(format!("dead-lettered: {error}"))
            }
            Err(err) => {
                warn!(%subject, error = %err, "could not write the dead letter; redelivering instead");
                if let Some(key) = dedupe_key {
                    let _ = dedupe::release(&self.pool, &self.config.durable, key).await;
                }
                ConsumeCounters::bump(&c.retried, "outboxd_consumer_retried_total");
                Verdict::Nak(self.nak_delay(delivered))
            }
        }
    }
}

/// NATS subject matching: `*` matches one token, `>` the rest (one or more).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Replaces the values of `fields` (at any depth) with `"***"`, and makes
/// the rest storable (see `storable`).
pub fn mask(value: &Value, fields: &[String]) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    if fields.iter().any(|f| f == k) {
                        (storable(k), Value::String("***".into()))
                    } else {
                        (storable(k), mask(v, fields))
                    }
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|v| mask(v, fields)).collect()),
        Value::String(s) => Value::String(storable(s)),
        other => other.clone(),
    }
}

/// PostgreSQL's jsonb cannot hold U+0000: a dead letter keeps the message
/// with each one replaced by U+FFFD rather than failing to be written (which
/// would redeliver the poison message forever).
fn storable(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn masked_payloads_are_storable() {
        let masked = mask(
            &json!({"email": "a@b", "note\u{0}": ["x\u{0}y"]}),
            &["email".to_owned()],
        );
        assert_eq!(
            masked,
            json!({"email": "***", "note\u{FFFD}": ["x\u{FFFD}y"]})
        );
    }

    #[test]
    fn wildcards() {
        assert!(subject_matches(
            "tenant.*.order.created",
            "tenant.shop.order.created"
        ));
        assert!(subject_matches("tenant.>", "tenant.shop.order.created"));
        assert!(!subject_matches("tenant.>", "tenant"));
        assert!(!subject_matches(
            "tenant.*.order",
            "tenant.shop.order.created"
        ));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.c"));
    }

    #[test]
    fn masking_reaches_nested_fields() {
        let v =
            json!({"email": "a@b.c", "user": {"email": "x", "name": "n"}, "list": [{"ssn": 1}]});
        let m = mask(&v, &["email".into(), "ssn".into()]);
        assert_eq!(
            m,
            json!({"email": "***", "user": {"email": "***", "name": "n"}, "list": [{"ssn": "***"}]})
        );
    }

    #[test]
    fn durable_names_are_sanitized_and_stable() {
        assert_eq!(
            durable_name("notify", "eu west.1"),
            "outboxd_notify_eu_west_1"
        );
        assert_eq!(durable_name("notify", "g"), durable_name("notify", "g"));
    }
}
