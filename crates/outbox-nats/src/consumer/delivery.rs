//! The [`Delivery`] a handler sees, and the per-message decision: parse and
//! check the message, claim it, run its handler, and map the outcome to a
//! verdict.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;

use async_nats::jetstream;
use futures::FutureExt;
use outbox_core::store::{apps, dedupe};
use serde_json::Value;
use tracing::{Instrument, warn};
use uuid::Uuid;

use super::{ConsumeCounters, ConsumerRuntime, HandlerError, Verdict, subject_matches};
use crate::headers::{self, MSG_ID, TENANT_ID, TraceContext};

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
    /// Its correlation id, trace context and trace id, from the headers
    /// (either correlation header; the trace id derived from `traceparent`
    /// when the message has none).
    pub trace: TraceContext,
    /// This delivery's number, starting at 1.
    pub delivered: i64,
    /// Sequence in the stream.
    pub stream_sequence: u64,
}

impl ConsumerRuntime {
    pub(super) async fn decide(&self, message: &jetstream::Message) -> Verdict {
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
        // Reserved apps (`_unrouted`) are nobody's tenant.
        if headers.get(TENANT_ID).is_some_and(|t| *t != tenant)
            || tenant.is_empty()
            || tenant.starts_with('_')
        {
            warn!(%subject, header = ?headers.get(TENANT_ID), "tenant header disagrees with the subject; terminating");
            ConsumeCounters::bump(&c.tenant_rejected, "outboxd_consumer_tenant_rejected_total");
            return Verdict::Term("tenant-id header disagrees with the subject".into());
        }
        // An unknown tenant has no app to file a dead letter under: the
        // message is parked under the reserved app, with the tenant it
        // claimed, never processed.
        let Some(app) = self.app(&tenant).await else {
            warn!(%subject, claimed_tenant = %tenant, "message for an unknown app; parking it as a dead letter of _unrouted");
            ConsumeCounters::bump(&c.unknown_tenant, "outboxd_consumer_unknown_tenant_total");
            let Some(unrouted) = self.app(apps::UNROUTED_SLUG).await else {
                return Verdict::Term(format!("unknown app {tenant}"));
            };
            let mut parked = headers.clone();
            parked.insert("claimed-tenant".to_owned(), tenant.clone());
            let message_id = parked.get(MSG_ID).cloned();
            let error = format!("no app {tenant:?}: the message was not processed");
            return self
                .dead_letter(
                    &subject,
                    unrouted.id,
                    &message_id,
                    &payload,
                    &parked,
                    delivered,
                    &error,
                    None,
                )
                .await;
        };
        let app_id = app.id;
        let message_id = headers.get(MSG_ID).cloned();
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
            trace: headers::extract(&headers),
            headers: headers.clone(),
            delivered,
            stream_sequence,
        };
        // The handler runs in the message's trace: its log lines carry the
        // trace and correlation ids the producer sent.
        let span = tracing::info_span!(
            "consume",
            subject = %subject,
            trace_id = %delivery.trace.trace_id.as_deref().unwrap_or(""),
            correlation_id = %delivery.trace.correlation_id.as_deref().unwrap_or(""),
        );
        let run = AssertUnwindSafe(handler.handle(delivery).instrument(span)).catch_unwind();
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
}
