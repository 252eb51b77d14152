//! `[nats]`, `[nats.stream]` and `[consumer]`: the relay, the stream
//! contract and the consumer runtime.

use std::time::Duration;

use outbox_core::topics::TopicPattern;
use serde::{Deserialize, Serialize};

use super::{ConfigError, Settings, env_hint, range};

/// `[nats]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct NatsSettings {
    pub url: String,
    pub relay_unhandled: bool,
    pub relay_topics: Vec<String>,
    pub subject_template: String,
    pub ack_timeout_ms: u64,
    pub fail_fast: bool,
    pub stream: StreamSettings,
}

/// `[nats.stream]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct StreamSettings {
    pub name: String,
    pub subjects: Vec<String>,
    pub retention: String,
    pub storage: String,
    pub replicas: u32,
    pub max_age_secs: u64,
    pub max_bytes: i64,
    pub max_msgs: i64,
    pub duplicate_window_secs: u64,
}

/// `[consumer]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct ConsumerSettings {
    pub group: String,
    pub subjects: Vec<String>,
    pub ack_wait_ms: u64,
    pub max_deliver: u32,
    pub concurrency: u32,
    pub nak_base_ms: u64,
    pub nak_max_ms: u64,
    pub dedupe_ttl_secs: u64,
    pub mask_fields: Vec<String>,
}

impl Settings {
    /// `[nats]` and `[nats.stream]`.
    pub(super) fn validate_nats(&self) -> Result<(), ConfigError> {
        let n = &self.nats;
        let invalid = |key: &'static str, value: String, problem: &'static str, accepted: &str| {
            Err(ConfigError::Range {
                key,
                value,
                problem,
                accepted: accepted.to_owned(),
                env_hint: env_hint(key),
            })
        };
        if !(n.url.is_empty() || n.url.starts_with("nats://") || n.url.starts_with("tls://")) {
            return invalid(
                "nats.url",
                format!("{:?}", n.url),
                "is not a NATS URL",
                "nats://host:port, or empty to disable",
            );
        }
        if let Err(err) = outbox_nats::subject::SubjectTemplate::parse(&n.subject_template) {
            return invalid(
                "nats.subject_template",
                format!("{:?}", n.subject_template),
                "is not a subject template",
                &format!(
                    "{}; placeholders {}, e.g. tenant.{{app}}.{{topic}}",
                    err.problem,
                    outbox_nats::subject::PLACEHOLDERS
                ),
            );
        }
        range("nats.ack_timeout_ms", n.ack_timeout_ms, 100, 600_000)?;
        if n.relay_topics.is_empty() {
            return invalid(
                "nats.relay_topics",
                "[]".into(),
                "is empty",
                "at least one topic pattern, e.g. [\">\"] (every topic) or [\"orders.*\", \"billing.>\"]; to relay nothing, set relay_unhandled = false",
            );
        }
        self.relay_patterns()?;
        let st = &n.stream;
        if st.name.is_empty() || st.name.contains(['.', ' ', '*', '>']) {
            return invalid(
                "nats.stream.name",
                format!("{:?}", st.name),
                "is not a stream name",
                "a non-empty name without '.', ' ', '*' or '>'",
            );
        }
        if st.subjects.is_empty() {
            return invalid(
                "nats.stream.subjects",
                "[]".into(),
                "is empty",
                "at least one subject, e.g. [\"tenant.>\"]",
            );
        }
        if !matches!(st.retention.as_str(), "limits" | "interest" | "workqueue") {
            return invalid(
                "nats.stream.retention",
                format!("{:?}", st.retention),
                "is unknown",
                "\"limits\", \"interest\" or \"workqueue\"",
            );
        }
        if !matches!(st.storage.as_str(), "file" | "memory") {
            return invalid(
                "nats.stream.storage",
                format!("{:?}", st.storage),
                "is unknown",
                "\"file\" or \"memory\"",
            );
        }
        range("nats.stream.replicas", st.replicas as u64, 1, 5)?;
        range(
            "nats.stream.duplicate_window_secs",
            st.duplicate_window_secs,
            1,
            604_800,
        )?;
        if st.max_bytes < -1 || st.max_msgs < -1 {
            return invalid(
                "nats.stream.max_bytes",
                format!("{} / max_msgs {}", st.max_bytes, st.max_msgs),
                "is negative",
                "-1 (no limit) or a positive number",
            );
        }
        Ok(())
    }

    /// `nats.relay_topics` as patterns; the first invalid one is refused
    /// with the rule it breaks.
    pub fn relay_patterns(&self) -> Result<Vec<TopicPattern>, ConfigError> {
        self.nats
            .relay_topics
            .iter()
            .map(|p| {
                TopicPattern::parse(p).map_err(|e| ConfigError::Range {
                    key: "nats.relay_topics",
                    value: format!("{p:?}"),
                    problem: "is not a topic pattern",
                    accepted: match e {
                        outbox_core::Error::Invalid { reason, .. } => reason,
                        other => other.to_string(),
                    },
                    env_hint: env_hint("nats.relay_topics"),
                })
            })
            .collect()
    }

    /// `[consumer]`.
    pub(super) fn validate_consumer(&self) -> Result<(), ConfigError> {
        let cs = &self.consumer;
        range("consumer.ack_wait_ms", cs.ack_wait_ms, 1000, 3_600_000)?;
        range("consumer.max_deliver", cs.max_deliver as u64, 1, 1000)?;
        range("consumer.concurrency", cs.concurrency as u64, 1, 10_000)?;
        range("consumer.nak_base_ms", cs.nak_base_ms, 1, 3_600_000)?;
        range(
            "consumer.nak_max_ms",
            cs.nak_max_ms,
            cs.nak_base_ms,
            86_400_000,
        )?;
        range("consumer.dedupe_ttl_secs", cs.dedupe_ttl_secs, 0, 2_592_000)?;
        Ok(())
    }

    /// The stream contract from `[nats.stream]`.
    pub fn stream_contract(&self) -> outbox_nats::StreamContract {
        use async_nats::jetstream::stream::{RetentionPolicy, StorageType};
        let st = &self.nats.stream;
        outbox_nats::StreamContract {
            name: st.name.clone(),
            subjects: st.subjects.clone(),
            retention: match st.retention.as_str() {
                "interest" => RetentionPolicy::Interest,
                "workqueue" => RetentionPolicy::WorkQueue,
                _ => RetentionPolicy::Limits,
            },
            storage: if st.storage == "memory" {
                StorageType::Memory
            } else {
                StorageType::File
            },
            replicas: st.replicas as usize,
            max_age: Duration::from_secs(st.max_age_secs),
            max_bytes: st.max_bytes,
            max_messages: st.max_msgs,
            duplicate_window: Duration::from_secs(st.duplicate_window_secs),
        }
    }

    /// The consumer runtime's settings in its own types.
    pub fn consumer_config(&self) -> outbox_nats::ConsumerConfig {
        let cs = &self.consumer;
        outbox_nats::ConsumerConfig {
            stream: self.nats.stream.name.clone(),
            durable: outbox_nats::durable_name("consume", &cs.group),
            filter_subjects: cs.subjects.clone(),
            ack_wait: Duration::from_millis(cs.ack_wait_ms),
            max_deliver: i64::from(cs.max_deliver),
            concurrency: cs.concurrency as usize,
            batch: (cs.concurrency as usize).min(256),
            nak_base: Duration::from_millis(cs.nak_base_ms),
            nak_max: Duration::from_millis(cs.nak_max_ms),
            dedupe_ttl: (cs.dedupe_ttl_secs > 0).then(|| Duration::from_secs(cs.dedupe_ttl_secs)),
            mask_fields: cs.mask_fields.clone(),
            // The tenant's place in the subjects the relay makes (checked at load).
            tenant_token: outbox_nats::subject::SubjectTemplate::parse(&self.nats.subject_template)
                .map_or(1, |t| t.app_token()),
            ..outbox_nats::ConsumerConfig::default()
        }
    }
}
