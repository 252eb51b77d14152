//! `[dispatcher]`, the retry settings at the top level, and `[webhook]`:
//! what [`outbox_dispatch::Config`] and the webhook target are built from.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Secret, Settings, below_lease, range};

/// `[dispatcher]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct DispatcherSettings {
    pub worker_id: String,
    pub batch_size: u32,
    pub concurrency: u32,
    pub claimers: u32,
    pub poll_interval_ms: u64,
    pub lease_ms: u64,
    pub handler_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub drain_grace_ms: u64,
    pub in_transaction: bool,
    pub attempt_history: u16,
    pub attempt_error_chars: u32,
}

/// `[webhook]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct WebhookSettings {
    pub secret: Secret,
    pub timeout_ms: u64,
    pub rotation_overlap_secs: u64,
    pub allow_private_networks: bool,
}

impl Settings {
    /// `max_trigger_depth`, `trigger_retry_*` and `[dispatcher]`.
    pub(super) fn validate_dispatcher(&self) -> Result<(), ConfigError> {
        range("max_trigger_depth", self.max_trigger_depth as u64, 1, 64)?;
        range(
            "trigger_retry_max_attempts",
            self.trigger_retry_max_attempts as u64,
            1,
            1000,
        )?;
        range(
            "trigger_retry_base_ms",
            self.trigger_retry_base_ms,
            1,
            3_600_000,
        )?;
        range(
            "trigger_retry_max_ms",
            self.trigger_retry_max_ms,
            self.trigger_retry_base_ms,
            86_400_000,
        )?;
        let d = &self.dispatcher;
        range("dispatcher.batch_size", d.batch_size as u64, 1, 10_000)?;
        range("dispatcher.concurrency", d.concurrency as u64, 1, 100_000)?;
        range("dispatcher.claimers", d.claimers as u64, 0, 16)?;
        range(
            "dispatcher.poll_interval_ms",
            d.poll_interval_ms,
            10,
            600_000,
        )?;
        range("dispatcher.lease_ms", d.lease_ms, 1000, 86_400_000)?;
        if d.heartbeat_interval_ms == 0 {
            // Without a heartbeat nothing extends a lease: a handler must
            // finish (or time out) before its lease runs out.
            below_lease(
                "dispatcher.handler_timeout_ms",
                d.handler_timeout_ms,
                10,
                d.lease_ms,
            )?;
        } else {
            range(
                "dispatcher.handler_timeout_ms",
                d.handler_timeout_ms,
                10,
                86_400_000,
            )?;
            below_lease(
                "dispatcher.heartbeat_interval_ms",
                d.heartbeat_interval_ms,
                100,
                d.lease_ms,
            )?;
        }
        range("dispatcher.drain_grace_ms", d.drain_grace_ms, 0, 3_600_000)?;
        range(
            "dispatcher.attempt_history",
            d.attempt_history as u64,
            0,
            100,
        )?;
        range(
            "dispatcher.attempt_error_chars",
            d.attempt_error_chars as u64,
            16,
            100_000,
        )?;
        Ok(())
    }

    /// `[webhook]`.
    pub(super) fn validate_webhook(&self) -> Result<(), ConfigError> {
        range("webhook.timeout_ms", self.webhook.timeout_ms, 100, 600_000)?;
        range(
            "webhook.rotation_overlap_secs",
            self.webhook.rotation_overlap_secs,
            0,
            30 * 86_400,
        )?;
        Ok(())
    }

    /// The dispatcher's settings in its own types.
    pub fn dispatcher_config(&self) -> outbox_dispatch::Config {
        let d = &self.dispatcher;
        let mut config = outbox_dispatch::Config {
            batch_size: d.batch_size,
            concurrency: d.concurrency as usize,
            claimers: d.claimers as usize,
            poll_interval: Duration::from_millis(d.poll_interval_ms),
            lease: Duration::from_millis(d.lease_ms),
            handler_timeout: Duration::from_millis(d.handler_timeout_ms),
            heartbeat_interval: Duration::from_millis(d.heartbeat_interval_ms),
            drain_grace: Duration::from_millis(d.drain_grace_ms),
            retry: outbox_dispatch::RetryPolicy {
                max_attempts: self.trigger_retry_max_attempts,
                base: Duration::from_millis(self.trigger_retry_base_ms),
                max: Duration::from_millis(self.trigger_retry_max_ms),
                jitter: true,
            },
            max_trigger_depth: self.max_trigger_depth,
            in_transaction: d.in_transaction,
            attempt_history: outbox_core::store::outbox::AttemptHistory {
                keep: d.attempt_history,
                error_chars: d.attempt_error_chars,
            },
            ..outbox_dispatch::Config::default()
        };
        if !d.worker_id.is_empty() {
            config.worker_id = d.worker_id.clone();
        }
        config
    }
}
