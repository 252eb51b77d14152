//! The relay sink: publish an outbox row to JetStream and succeed only on PubAck.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind};
use outbox_dispatch::{Event, Handler, HandlerError, handler::HandlerFuture};
use sqlx::PgPool;
use uuid::Uuid;

use crate::headers;
use crate::subject::{InvalidTemplate, SubjectTemplate};

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Subject template: `{app}` is the app slug, `{topic}` the row's topic;
    /// fields of the row may be used too (see [`crate::subject`]).
    pub subject_template: String,
    /// How long to wait for the PubAck before the attempt fails (and retries).
    pub ack_timeout: Duration,
    /// Where the relay records its last PubAck (for the health endpoint).
    pub status: PublishStatus,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            subject_template: "tenant.{app}.{topic}".to_owned(),
            ack_timeout: Duration::from_secs(5),
            status: PublishStatus::default(),
        }
    }
}

/// How long a row waits at first, without spending an attempt, while the
/// NATS connection is down.
pub const DISCONNECTED_PAUSE: Duration = Duration::from_secs(1);

/// The longest a row waits at once while the NATS connection is down.
pub const DISCONNECTED_PAUSE_MAX: Duration = Duration::from_secs(15);

/// When a relay last had a publish acknowledged, and whether the stream
/// contract is still to be checked; clones share both.
#[derive(Debug, Clone, Default)]
pub struct PublishStatus {
    last_ack: Arc<AtomicI64>,
    stream_check_pending: Arc<AtomicBool>,
}

impl PublishStatus {
    /// The time of the last acknowledged publish, if any.
    pub fn last_publish_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        match self.last_ack.load(Ordering::Relaxed) {
            0 => None,
            micros => chrono::DateTime::from_timestamp_micros(micros),
        }
    }

    /// Holds every relay sharing this status, as if NATS were down, until
    /// [`PublishStatus::mark_stream_checked`]: a process that starts before NATS
    /// answers checks the stream contract once it does, and publishes
    /// nothing into a stream it has not checked.
    pub fn hold_until_stream_checked(&self) {
        self.stream_check_pending.store(true, Ordering::Relaxed);
    }

    /// The stream contract held: relays may publish.
    pub fn mark_stream_checked(&self) {
        self.stream_check_pending.store(false, Ordering::Relaxed);
    }

    /// Whether the stream contract is still to be checked.
    pub fn stream_check_pending(&self) -> bool {
        self.stream_check_pending.load(Ordering::Relaxed)
    }

    /// Whether a relay on `client` may publish now: connected (publishing
    /// then reaches the server, not the client's buffer) and the stream
    /// checked.
    pub fn may_publish(&self, client: &async_nats::Client) -> bool {
        client.connection_state() == async_nats::connection::State::Connected
            && !self.stream_check_pending()
    }

    fn record(&self) {
        self.last_ack
            .store(chrono::Utc::now().timestamp_micros(), Ordering::Relaxed);
    }
}

/// Publishes outbox rows to JetStream. Register it as the dispatcher's
/// handler for the topics to relay (or as the fallback for all topics).
#[derive(Clone)]
pub struct Relay {
    js: jetstream::Context,
    // The connection under `js`, taken once: its state is read on every
    // publish, and `Context::client` clones it.
    client: async_nats::Client,
    pool: PgPool,
    config: RelayConfig,
    // The checked template; a bad one fails every row with its reason
    // (the daemon refuses it at start-up).
    template: Result<SubjectTemplate, InvalidTemplate>,
    // App slugs by id: subjects and the tenant header use the slug.
    slugs: Arc<RwLock<HashMap<Uuid, String>>>,
    // When the current NATS outage began (unix µs; 0: none), for how long a
    // row waits: see [`Relay::outage_pause`].
    outage_since: Arc<AtomicI64>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .finish()
    }
}

impl Relay {
    /// A relay publishing through `js`; `pool` resolves app slugs.
    pub fn new(js: jetstream::Context, pool: PgPool, config: RelayConfig) -> Self {
        Self {
            client: js.client(),
            js,
            pool,
            template: SubjectTemplate::parse(&config.subject_template),
            config,
            slugs: Arc::default(),
            outage_since: Arc::default(),
        }
    }

    /// See [`PublishStatus::may_publish`].
    fn connected(&self) -> bool {
        self.config.status.may_publish(&self.client)
    }

    /// How long a row waits while the connection is down: a second at
    /// first, a quarter of the outage so far as it lasts, at most
    /// [`DISCONNECTED_PAUSE_MAX`], so a long outage does not rewrite every
    /// waiting row each second.
    fn outage_pause(&self) -> Duration {
        let now = chrono::Utc::now().timestamp_micros();
        let since =
            match self
                .outage_since
                .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => now,
                Err(since) => since,
            };
        let lasted = Duration::from_micros(u64::try_from(now - since).unwrap_or(0));
        (lasted / 4).clamp(DISCONNECTED_PAUSE, DISCONNECTED_PAUSE_MAX)
    }

    async fn slug(&self, app_id: Uuid) -> Result<String, HandlerError> {
        if let Some(slug) = self.slugs.read().ok().and_then(|m| m.get(&app_id).cloned()) {
            return Ok(slug);
        }
        let app = outbox_core::store::apps::by_id(&self.pool, app_id)
            .await
            .map_err(|e| HandlerError::retry(format!("looking up app {app_id}: {e}")))?;
        if let Ok(mut slugs) = self.slugs.write() {
            slugs.insert(app_id, app.slug.clone());
        }
        Ok(app.slug)
    }

    /// Publishes one event and waits for its PubAck.
    pub async fn publish(
        &self,
        event: Event,
    ) -> Result<jetstream::publish::PublishAck, HandlerError> {
        let slug = self.slug(event.app_id).await?;
        if slug.starts_with('_') {
            return Err(HandlerError::permanent(format!(
                "app {slug} is reserved: nothing is published under it"
            )));
        }
        let template = self
            .template
            .as_ref()
            .map_err(|e| HandlerError::permanent(e.to_string()))?;
        let (subject, message_id) = match replayed_message(template, &slug, &event)? {
            Some(replayed) => replayed,
            None => {
                let subject = template.render(&slug, &event).map_err(|e| {
                    HandlerError::permanent(format!("no NATS subject for this row: {e}"))
                })?;
                (subject, event.id.to_string())
            }
        };
        // While the client is disconnected it would buffer the message and
        // send it on reconnect, long after this attempt failed for want of a
        // PubAck: the row could then be dead-lettered, and replayed under a
        // new id, although its message reached the stream. Waiting spends no
        // attempt, so an outage of any length sends no row to dead letters.
        if !self.connected() {
            metrics::counter!("outboxd_publish_deferred_total").increment(1);
            return Err(HandlerError::Snooze(self.outage_pause()));
        }
        let headers = headers::inject(&message_id, &slug, &event.topic, &event.headers);
        let payload = serde_json::to_vec(&event.payload)
            .map_err(|e| HandlerError::permanent(format!("payload does not serialize: {e}")))?;
        let publish = async {
            let ack = self
                .js
                .publish_with_headers(subject.clone(), headers, payload.into())
                .await?;
            ack.await
        };
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(self.config.ack_timeout, publish).await;
        metrics::histogram!("outboxd_publish_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(ack)) => {
                self.outage_since.store(0, Ordering::Relaxed);
                self.config.status.record();
                metrics::counter!("outboxd_published_total").increment(1);
                if ack.duplicate {
                    metrics::counter!("outboxd_published_duplicates_total").increment(1);
                }
                Ok(ack)
            }
            Ok(Err(err)) => Err(classify(&subject, err.kind(), &err)),
            // The connection was lost while this publish waited: not the
            // row's failure, so no attempt is spent. The message may still
            // reach the stream from the client's buffer; the next publish has
            // the same message id, which JetStream takes once within its
            // duplicate window.
            Err(_) if !self.connected() => {
                metrics::counter!("outboxd_publish_deferred_total").increment(1);
                Err(HandlerError::Snooze(self.outage_pause()))
            }
            Err(_) => Err(HandlerError::retry(format!(
                "no PubAck for {subject} within {:?}",
                self.config.ack_timeout
            ))),
        }
    }
}

/// For a replayed dead letter of the consumer runtime (source `nats`, with
/// the `outbox-subject` and `outbox-msg-id` headers the replay sets): the
/// subject it came from and its new message id. The subject must be one of
/// the tenant's: a row cannot publish into another app's subjects.
fn replayed_message(
    template: &SubjectTemplate,
    slug: &str,
    event: &Event,
) -> Result<Option<(String, String)>, HandlerError> {
    let header = |name: &str| event.headers.get(name).and_then(|v| v.as_str());
    let (Some(subject), Some(id)) = (header("outbox-subject"), header("outbox-msg-id")) else {
        return Ok(None);
    };
    if event.source != "nats" {
        return Ok(None);
    }
    let tenant = template
        .tenant_filter(slug, ">")
        .map(|f| f.trim_end_matches('>').to_owned());
    let concrete = !subject.contains(['*', '>'])
        && !subject.chars().any(char::is_whitespace)
        && !subject.split('.').any(str::is_empty);
    match tenant {
        Some(prefix) if concrete && subject.starts_with(&prefix) => {
            Ok(Some((subject.to_owned(), id.to_owned())))
        }
        _ => Err(HandlerError::permanent(format!(
            "the replayed message's subject {subject:?} is not one of app {slug}'s subjects"
        ))),
    }
}

/// Maps a publish failure by its kind, never by its message text.
fn classify(subject: &str, kind: PublishErrorKind, err: &dyn std::fmt::Display) -> HandlerError {
    match kind {
        // Sequence and message-id expectations cannot start holding by retrying.
        PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence
        | PublishErrorKind::MaxPayloadExceeded => {
            HandlerError::permanent(format!("publish to {subject}: {err}"))
        }
        // No stream captures the subject: an operator can fix the stream, so retry.
        PublishErrorKind::StreamNotFound => HandlerError::retry(format!(
            "publish to {subject}: no stream captures this subject"
        )),
        _ => HandlerError::retry(format!("publish to {subject}: {err}")),
    }
}

impl Handler for Relay {
    fn handle(&self, event: Event) -> HandlerFuture {
        let relay = self.clone();
        let reply = event.reply.clone();
        Box::pin(async move {
            let ack = relay.publish(event).await?;
            // A synchronous caller learns where its event went: no handler
            // ran it here, the stream took it (an answer of null looked like
            // a handler's).
            let answer = serde_json::json!({
                "relayed": { "stream": ack.stream, "sequence": ack.sequence, "duplicate": ack.duplicate }
            });
            reply.set(answer);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_errors_map_by_kind() {
        let e = classify("s", PublishErrorKind::WrongLastSequence, &"x");
        assert!(matches!(e, HandlerError::Permanent(_)));
        let e = classify("s", PublishErrorKind::TimedOut, &"x");
        assert!(matches!(e, HandlerError::Retry(_)));
        let e = classify("s", PublishErrorKind::StreamNotFound, &"x");
        assert!(matches!(e, HandlerError::Retry(m) if m.contains("no stream")));
    }
}
