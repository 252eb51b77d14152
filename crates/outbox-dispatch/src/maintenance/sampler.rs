//! The sampler: gauges of the rows due, scheduled and running per app and
//! topic (`outboxd_rows_due`, `outboxd_rows_scheduled`,
//! `outboxd_rows_running`). Counting them scans the outbox, so only the
//! elected leader samples, every interval; the other processes export
//! nothing for these names. Pairs past [`crate::telemetry::MAX_LABELLED`]
//! are summed under `topic="other"`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use sqlx::PgPool;

use crate::Error;
use crate::telemetry::{MAX_LABELLED, OTHER};

/// Samples the outbox's row states into gauges.
#[derive(Debug)]
pub struct Sampler {
    pool: PgPool,
    interval: Duration,
    // Label pairs set by the last pass: those gone since are set to 0.
    shown: Mutex<BTreeSet<(String, String)>>,
}

impl Sampler {
    /// A sampler counting every `interval`.
    pub fn new(pool: PgPool, interval: Duration) -> Self {
        Self {
            pool,
            interval,
            shown: Mutex::new(BTreeSet::new()),
        }
    }

    /// One pass; returns how many (app, topic) pairs it set.
    pub async fn run_once(&self) -> Result<usize, Error> {
        let counts = outbox_core::store::outbox::state_counts(&self.pool).await?;
        let mut merged: BTreeMap<(String, String), [i64; 3]> = BTreeMap::new();
        for (i, c) in counts.into_iter().enumerate() {
            let topic = if i < MAX_LABELLED {
                c.topic
            } else {
                OTHER.to_owned()
            };
            let entry = merged.entry((c.app, topic)).or_default();
            entry[0] += c.due;
            entry[1] += c.scheduled;
            entry[2] += c.running;
        }
        let Ok(mut shown) = self.shown.lock() else {
            return Ok(0);
        };
        for (app, topic) in shown.iter() {
            if !merged.contains_key(&(app.clone(), topic.clone())) {
                set(app, topic, [0, 0, 0]);
            }
        }
        for ((app, topic), values) in &merged {
            set(app, topic, *values);
        }
        *shown = merged.keys().cloned().collect();
        Ok(merged.len())
    }
}

impl super::Service for Sampler {
    fn name(&self) -> &'static str {
        "row_state_sampler"
    }

    fn cadence(&self) -> super::Cadence {
        super::Cadence::Every(self.interval)
    }

    fn pass(&self) -> futures::future::BoxFuture<'_, Result<super::Report, Error>> {
        Box::pin(async move {
            Ok(super::Report {
                items: self.run_once().await? as u64,
            })
        })
    }
}

fn set(app: &str, topic: &str, [due, scheduled, running]: [i64; 3]) {
    let labels = [("app", app.to_owned()), ("topic", topic.to_owned())];
    metrics::gauge!("outboxd_rows_due", &labels).set(due as f64);
    metrics::gauge!("outboxd_rows_scheduled", &labels).set(scheduled as f64);
    metrics::gauge!("outboxd_rows_running", &labels).set(running as f64);
}
