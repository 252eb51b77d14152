//! Handlers: what runs a row, the [`Event`] it receives, and the typed errors
//! that decide between retry, dead letter and snooze.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use outbox_core::ClaimedEvent;
use outbox_core::topics::{TopicPattern, prefix_regex};
use serde_json::Value;
use uuid::Uuid;

/// The event a handler runs, with the attempt it is on.
#[derive(Debug, Clone)]
pub struct Event {
    /// The outbox id; stable across attempts, so use it as your idempotency key.
    pub id: Uuid,
    /// The tenant.
    pub app_id: Uuid,
    /// Routing key.
    pub topic: String,
    /// Where the row came from.
    pub source: String,
    /// Source-specific operation.
    pub op: String,
    /// The event body.
    pub payload: Value,
    /// Trace and tenant headers.
    pub headers: Value,
    /// This attempt's number, starting at 1.
    pub attempt: i32,
    /// Attempts the row may make in all (its own limit, or the dispatcher's
    /// default); the last attempt is `attempt == max_attempts`.
    pub max_attempts: i32,
    /// When the row was enqueued (the producer's transaction).
    pub enqueued_at: chrono::DateTime<chrono::Utc>,
    /// When its first attempt started.
    pub first_attempt_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Ordering key, if any.
    pub ordering_key: Option<String>,
    /// Trigger-chain depth; enqueue follow-up work with `depth + 1`.
    pub depth: i32,
    /// The trigger that produced the row, if any.
    pub trigger_id: Option<Uuid>,
    /// The principal the work runs as.
    pub principal: Option<String>,
    /// Where [`Event::set_reply`] puts the answer for a synchronous caller.
    pub reply: ReplySlot,
    /// In transactional mode, the transaction that deletes this row; see
    /// [`Event::claim_tx`].
    pub claim_tx: Option<ClaimTx>,
}

/// The transaction a row is handled in when the dispatcher runs in
/// transactional mode (`Config::in_transaction`): the handler's statements
/// and the row's deletion commit together, or neither does.
#[derive(Clone)]
pub struct ClaimTx(
    pub(crate) Arc<tokio::sync::Mutex<Option<sqlx::Transaction<'static, sqlx::Postgres>>>>,
);

impl std::fmt::Debug for ClaimTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClaimTx")
    }
}

impl ClaimTx {
    pub(crate) fn new(tx: sqlx::Transaction<'static, sqlx::Postgres>) -> Self {
        Self(Arc::new(tokio::sync::Mutex::new(Some(tx))))
    }

    /// The connection of the transaction, for one or more statements:
    /// `sqlx::query(…).execute(&mut *tx.lock().await?)`.
    pub async fn lock(
        &self,
    ) -> Result<tokio::sync::MappedMutexGuard<'_, sqlx::PgConnection>, HandlerError> {
        tokio::sync::MutexGuard::try_map(self.0.lock().await, |tx| tx.as_deref_mut())
            .map_err(|_| HandlerError::retry("the claim transaction has ended"))
    }

    pub(crate) async fn finish(self) -> Option<sqlx::Transaction<'static, sqlx::Postgres>> {
        self.0.lock().await.take()
    }
}

/// Holds a handler's answer to a synchronous invocation (`POST …/invoke/{topic}`).
#[derive(Debug, Clone, Default)]
pub struct ReplySlot(std::sync::Arc<std::sync::Mutex<Option<Value>>>);

impl ReplySlot {
    /// The answer set so far.
    pub fn get(&self) -> Option<Value> {
        self.0.lock().ok().and_then(|v| v.clone())
    }

    /// Sets the answer (a handler that consumed its [`Event`] keeps a clone
    /// of the slot to answer after).
    pub fn set(&self, value: Value) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(value);
        }
    }
}

impl Event {
    pub(crate) fn from_claimed(row: &ClaimedEvent, default_max_attempts: i32) -> Self {
        Self {
            id: row.id,
            app_id: row.app_id,
            topic: row.topic.clone(),
            source: row.source.clone(),
            op: row.op.clone(),
            payload: row.payload.clone(),
            headers: row.headers.clone(),
            attempt: row.attempt_count,
            max_attempts: row.max_attempts.unwrap_or(default_max_attempts),
            enqueued_at: row.created_at,
            first_attempt_at: row.first_attempt_at,
            ordering_key: row.ordering_key.clone(),
            depth: row.depth,
            trigger_id: row.trigger_id,
            principal: row.registered_by_principal.clone(),
            reply: ReplySlot::default(),
            claim_tx: None,
        }
    }

    /// The claim transaction, in transactional mode; `None` in lease mode.
    /// Write through it to make an effect atomic with the row's deletion:
    ///
    /// ```no_run
    /// # async fn h(event: outbox_dispatch::Event) -> Result<(), outbox_dispatch::HandlerError> {
    /// if let Some(tx) = event.claim_tx() {
    ///     sqlx::query("INSERT INTO notifications (event_id) VALUES ($1)")
    ///         .bind(event.id)
    ///         .execute(&mut *tx.lock().await?)
    ///         .await
    ///         .map_err(outbox_dispatch::HandlerError::retry)?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn claim_tx(&self) -> Option<&ClaimTx> {
        self.claim_tx.as_ref()
    }

    /// Answers a synchronous caller (ignored for rows nobody waits on).
    pub fn set_reply(&self, value: Value) {
        self.reply.set(value);
    }

    /// Deserializes the payload; a payload that does not fit is a permanent error
    /// (retrying cannot fix it).
    pub fn payload_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_value(self.payload.clone())
            .map_err(|e| HandlerError::Permanent(format!("payload does not decode: {e}")))
    }
}

/// Why a handler did not finish the event, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// A transient failure: retry with backoff while attempts remain.
    #[error("{0}")]
    Retry(String),
    /// Retrying cannot help: dead-letter now.
    #[error("permanent: {0}")]
    Permanent(String),
    /// Not a failure: run again after this delay without spending an attempt.
    #[error("snoozed for {0:?}")]
    Snooze(Duration),
}

impl HandlerError {
    /// A transient failure from anything displayable.
    pub fn retry(err: impl std::fmt::Display) -> Self {
        Self::Retry(err.to_string())
    }

    /// A permanent failure from anything displayable.
    pub fn permanent(err: impl std::fmt::Display) -> Self {
        Self::Permanent(err.to_string())
    }
}

/// The future a handler returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'static>>;

/// Runs events of one topic. Closures `Fn(Event) -> impl Future<Output =
/// Result<(), HandlerError>>` are handlers; implement it by hand for types that
/// hold state.
pub trait Handler: Send + Sync + 'static {
    /// Handles one event. The dispatcher bounds it with the handler timeout.
    fn handle(&self, event: Event) -> HandlerFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(Event) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn handle(&self, event: Event) -> HandlerFuture {
        Box::pin(self(event))
    }
}

/// Handlers by topic. What a registry has handlers for is what its
/// dispatcher serves: a claim takes only rows of those topics (see
/// [`outbox_core::topics`]), so processes with different registries can
/// share one database without taking each other's rows.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Arc<dyn Handler>>,
    // Runs topics that have no handler of their own (e.g. the NATS relay),
    // among those its patterns match.
    fallback: Option<(Vec<TopicPattern>, Arc<dyn Handler>)>,
    // Runs every topic that starts with a prefix (e.g. "webhook:").
    prefixed: Vec<(String, Arc<dyn Handler>)>,
}

/// What a [`Registry`] serves, before other processes are taken into account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Subscription {
    /// Topics with a handler of their own.
    pub(crate) topics: Vec<String>,
    /// Prefixes (as `prefix*`) and fallback patterns, as declared.
    pub(crate) patterns: Vec<String>,
    /// Regular expressions of the prefixes.
    pub(crate) prefix_regexes: Vec<String>,
    /// Regular expressions of the fallback's patterns.
    pub(crate) fallback_regexes: Vec<String>,
    /// The fallback takes every topic (`>`).
    pub(crate) fallback_everything: bool,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut topics: Vec<&String> = self.handlers.keys().collect();
        topics.sort();
        f.debug_struct("Registry")
            .field("topics", &topics)
            .field("fallback", &self.fallback.is_some())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` for `topic`, replacing any earlier one.
    pub fn register(&mut self, topic: impl Into<String>, handler: impl Handler) -> &mut Self {
        self.handlers.insert(topic.into(), Arc::new(handler));
        self
    }

    /// Runs every topic that has no handler of its own in this registry, nor
    /// in another live process's (its topics are left to it): the fallback
    /// pattern `>`. See [`Registry::fallback_for`] to narrow it.
    pub fn fallback(&mut self, handler: impl Handler) -> &mut Self {
        self.fallback = Some((vec![TopicPattern::everything()], Arc::new(handler)));
        self
    }

    /// Runs the topics matching `patterns` (NATS-style, see
    /// [`outbox_core::topics`]) that have no handler of their own here, nor
    /// in another live process. Other topics are not claimed by this
    /// process: they wait for a process that serves them.
    pub fn fallback_for(
        &mut self,
        patterns: impl IntoIterator<Item = TopicPattern>,
        handler: impl Handler,
    ) -> &mut Self {
        self.fallback = Some((patterns.into_iter().collect(), Arc::new(handler)));
        self
    }

    /// Runs every topic that starts with `prefix` (after exact topics).
    pub fn prefix(&mut self, prefix: impl Into<String>, handler: impl Handler) -> &mut Self {
        self.prefixed.push((prefix.into(), Arc::new(handler)));
        self
    }

    /// The handler for `topic`: its own, else a prefix handler, else the
    /// fallback when one of its patterns matches.
    pub fn get(&self, topic: &str) -> Option<Arc<dyn Handler>> {
        self.handlers
            .get(topic)
            .or_else(|| {
                self.prefixed
                    .iter()
                    .find(|(p, _)| topic.starts_with(p.as_str()))
                    .map(|(_, h)| h)
            })
            .or_else(|| {
                self.fallback
                    .as_ref()
                    .filter(|(patterns, _)| patterns.iter().any(|p| p.matches(topic)))
                    .map(|(_, h)| h)
            })
            .cloned()
    }

    /// What this registry serves.
    pub(crate) fn subscription(&self) -> Subscription {
        let mut patterns: Vec<String> =
            self.prefixed.iter().map(|(p, _)| format!("{p}*")).collect();
        let prefix_regexes = self.prefixed.iter().map(|(p, _)| prefix_regex(p)).collect();
        let fallback = self
            .fallback
            .as_ref()
            .map(|(p, _)| p.as_slice())
            .unwrap_or_default();
        patterns.extend(fallback.iter().map(|p| p.as_str().to_owned()));
        Subscription {
            topics: self.topics(),
            patterns,
            prefix_regexes,
            fallback_regexes: fallback.iter().map(TopicPattern::to_regex).collect(),
            fallback_everything: fallback.iter().any(TopicPattern::is_everything),
        }
    }

    /// Registered topics, sorted.
    pub fn topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self.handlers.keys().cloned().collect();
        topics.sort();
        topics
    }
}
