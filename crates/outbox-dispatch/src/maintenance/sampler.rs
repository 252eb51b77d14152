//! The sampler: gauges of the rows due, scheduled and running per app and
//! topic (`outboxd_rows_due`, `outboxd_rows_scheduled`,
//! `outboxd_rows_running`), and of the due rows no live process serves
//! (`outboxd_rows_unserved`, with `outboxd_unserved_oldest_age_seconds`)
//! or that wait on purpose, their topic paused or their app suspended
//! (`outboxd_rows_paused`), or ordered rows that wait for an open
//! transaction to end (`outboxd_rows_behind_open_transaction`).
//! Counting them scans the outbox, so only the elected leader samples,
//! every interval; the other processes export nothing for these names. The
//! counts are also written to `outbox_topic_states` for the dashboard. Pairs
//! past the label caps ([`crate::telemetry::admits`]), the smallest first,
//! are summed under `topic="other"`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use sqlx::PgPool;

use crate::Error;
use crate::telemetry::{OTHER, admits};

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
        let counts = outbox_core::store::outbox::record_state_counts(&self.pool).await?;
        let mut merged: BTreeMap<(String, String), Sample> = BTreeMap::new();
        // Largest first: the caps fall on an app's smallest topics.
        let (mut labelled, mut per_app) = (0, BTreeMap::<String, usize>::new());
        for c in counts {
            let app_pairs = per_app.entry(c.app.clone()).or_default();
            let topic = if admits(*app_pairs, labelled) {
                *app_pairs += 1;
                labelled += 1;
                outbox_core::topics::shown(&c.topic).into_owned()
            } else {
                OTHER.to_owned()
            };
            let entry = merged.entry((c.app, topic)).or_default();
            entry.due += c.due;
            entry.scheduled += c.scheduled;
            entry.running += c.running;
            entry.unserved += c.unserved;
            entry.paused += c.paused;
            entry.behind_open_transaction += c.behind_open_transaction;
            entry.unserved_age_secs = entry.unserved_age_secs.max(c.unserved_age_secs);
        }
        let Ok(mut shown) = self.shown.lock() else {
            return Ok(0);
        };
        for (app, topic) in shown.iter() {
            if !merged.contains_key(&(app.clone(), topic.clone())) {
                set(app, topic, &Sample::default());
            }
        }
        for ((app, topic), sample) in &merged {
            set(app, topic, sample);
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

/// The gauges of one (app, topic).
#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    due: i64,
    scheduled: i64,
    running: i64,
    unserved: i64,
    unserved_age_secs: f64,
    paused: i64,
    behind_open_transaction: i64,
}

fn set(app: &str, topic: &str, s: &Sample) {
    let labels = [("app", app.to_owned()), ("topic", topic.to_owned())];
    metrics::gauge!("outboxd_rows_due", &labels).set(s.due as f64);
    metrics::gauge!("outboxd_rows_scheduled", &labels).set(s.scheduled as f64);
    metrics::gauge!("outboxd_rows_running", &labels).set(s.running as f64);
    metrics::gauge!("outboxd_rows_unserved", &labels).set(s.unserved as f64);
    metrics::gauge!("outboxd_unserved_oldest_age_seconds", &labels).set(s.unserved_age_secs);
    metrics::gauge!("outboxd_rows_paused", &labels).set(s.paused as f64);
    metrics::gauge!("outboxd_rows_behind_open_transaction", &labels)
        .set(s.behind_open_transaction as f64);
}
