//! Dead letters: writing a masked copy of a message that is given up.

use std::collections::HashMap;

use outbox_core::store::{dead_letters, dedupe};
use serde_json::Value;
use tracing::warn;
use uuid::Uuid;

use super::{ConsumeCounters, ConsumerRuntime, Verdict};

impl ConsumerRuntime {
    /// Writes a masked dead letter and terms the message; if the row cannot
    /// be written, naks it so it is not lost.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn dead_letter(
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
        // A replay's message id is `<original id>:replay:<n>`: its dead
        // letters stay those of the original message.
        let original = message_id
            .as_deref()
            .and_then(|id| Uuid::parse_str(id.split(':').next().unwrap_or(id)).ok())
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
    fn masking_reaches_nested_fields() {
        let v =
            json!({"email": "a@b.c", "user": {"email": "x", "name": "n"}, "list": [{"ssn": 1}]});
        let m = mask(&v, &["email".into(), "ssn".into()]);
        assert_eq!(
            m,
            json!({"email": "***", "user": {"email": "***", "name": "n"}, "list": [{"ssn": "***"}]})
        );
    }
}
