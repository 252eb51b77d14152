//! `[gc]` and the retention settings at the top level: what the GC sweeper
//! is built from.

use serde::{Deserialize, Serialize};

use super::{ConfigError, Settings, env_hint, range};

/// `[gc]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct GcSettings {
    pub schedule: String,
    pub batch: u32,
    pub segment_period_secs: u64,
    pub segment_lock_timeout_ms: u64,
}

impl Settings {
    /// `*_retention_days`.
    pub(super) fn validate_retention(&self) -> Result<(), ConfigError> {
        // 0 keeps every dead letter of the apps without their own retention.
        range(
            "dead_letter_retention_days",
            self.dead_letter_retention_days as u64,
            0,
            3650,
        )?;
        range(
            "abandoned_executions_retention_days",
            self.abandoned_executions_retention_days as u64,
            1,
            3650,
        )?;
        // 0 keeps every entry.
        range(
            "audit_log_retention_days",
            self.audit_log_retention_days as u64,
            0,
            3650,
        )?;
        Ok(())
    }

    /// `[gc]`.
    pub(super) fn validate_gc(&self) -> Result<(), ConfigError> {
        if let Some(schedule) = self.gc_schedule()
            && let Err(err) = outbox_core::cron::next_tick(schedule, chrono::Utc::now())
        {
            return Err(ConfigError::Range {
                key: "gc.schedule",
                value: format!("{:?}", self.gc.schedule),
                problem: "is not a cron expression",
                accepted: format!(
                    "5 or 6 cron fields, e.g. \"0 */10 * * * *\", or \"off\" ({err})"
                ),
                env_hint: env_hint("gc.schedule"),
            });
        }
        range("gc.batch", self.gc.batch as u64, 1, 100_000)?;
        range(
            "gc.segment_period_secs",
            self.gc.segment_period_secs,
            1,
            3600,
        )?;
        range(
            "gc.segment_lock_timeout_ms",
            self.gc.segment_lock_timeout_ms,
            1,
            10_000,
        )?;
        Ok(())
    }

    /// The GC sweeper's schedule; `None` when `gc.schedule` is "off" (an
    /// external scheduler runs `outboxd gc --once`).
    pub fn gc_schedule(&self) -> Option<&str> {
        let schedule = self.gc.schedule.trim();
        (!schedule.eq_ignore_ascii_case("off")).then_some(schedule)
    }

    /// How the leader rotates the outbox's segments.
    pub fn rotation_policy(&self) -> outbox_core::store::segments::RotationPolicy {
        outbox_core::store::segments::RotationPolicy {
            period: std::time::Duration::from_secs(self.gc.segment_period_secs),
            lock_timeout: std::time::Duration::from_millis(self.gc.segment_lock_timeout_ms),
            ..Default::default()
        }
    }

    /// How the leader compacts the bookkeeping tables: waiting for a table's
    /// lock no longer than a rotation waits for a segment's.
    pub fn compaction_policy(&self) -> outbox_core::store::compaction::CompactionPolicy {
        outbox_core::store::compaction::CompactionPolicy {
            lock_timeout: std::time::Duration::from_millis(self.gc.segment_lock_timeout_ms),
            ..Default::default()
        }
    }

    /// The GC sweeper's settings in its own types.
    pub fn sweeper_config(&self) -> outbox_dispatch::maintenance::sweeper::SweeperConfig {
        outbox_dispatch::maintenance::sweeper::SweeperConfig {
            dead_letter_retention_days: self.dead_letter_retention_days,
            abandoned_executions_retention_days: self.abandoned_executions_retention_days,
            audit_log_retention_days: (self.audit_log_retention_days > 0)
                .then_some(self.audit_log_retention_days),
            batch: i64::from(self.gc.batch),
            schedule: self.gc.schedule.clone(),
            ..Default::default()
        }
    }
}
