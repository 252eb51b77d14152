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
//! are summed under `topic="other"`; a pair labelled once keeps its label
//! for the life of the process, so the series stay within the caps.

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
    // Which pairs have a label, kept across passes: what bounds the series.
    labelled: Mutex<Labelled>,
}

/// Every (app, topic) pair given a label of its own since the process
/// started, and every app whose topics overflowed into `other`. A pair keeps
/// its label, at 0 while it has no rows, and a new one gets a label only
/// while the caps allow: the series exported stay within the caps however
/// topics come and go (the exporter never forgets a series, so labels that
/// moved with the topics' sizes would pile up without bound).
#[derive(Debug, Default)]
struct Labelled {
    // By app: its labelled topics, and `other` once it overflowed (every
    // one of them is set on every pass, at 0 without rows).
    topics: BTreeMap<String, BTreeSet<String>>,
    // Topics labelled in all apps, for the shared cap (`other` not counted).
    total: usize,
}

impl Labelled {
    /// The label of `app`'s `topic` (as shown): its own, or `other`.
    fn label(&mut self, app: &str, topic: String) -> String {
        let topics = self.topics.entry(app.to_owned()).or_default();
        if topics.contains(&topic) {
            return topic;
        }
        if topic == OTHER {
            // A topic of that name shares the label; it is exported from
            // the set like every other.
            topics.insert(topic.clone());
            return topic;
        }
        // `other` is in the set once an app overflowed; it takes no share.
        let own = topics.len() - usize::from(topics.contains(OTHER));
        if admits(own, self.total) {
            topics.insert(topic.clone());
            self.total += 1;
            topic
        } else {
            topics.insert(OTHER.to_owned());
            OTHER.to_owned()
        }
    }
}

impl Sampler {
    /// A sampler counting every `interval`.
    pub fn new(pool: PgPool, interval: Duration) -> Self {
        Self {
            pool,
            interval,
            labelled: Mutex::new(Labelled::default()),
        }
    }

    /// One pass; returns how many series have rows, after the topics past
    /// the caps were summed under `other`.
    pub async fn run_once(&self) -> Result<usize, Error> {
        let counts = outbox_core::store::outbox::record_state_counts(&self.pool).await?;
        let Ok(mut labelled) = self.labelled.lock() else {
            return Ok(0);
        };
        let mut merged: BTreeMap<(String, String), Sample> = BTreeMap::new();
        // Largest first: the caps fall on an app's smallest topics.
        for c in counts {
            let topic = labelled.label(&c.app, outbox_core::topics::shown(&c.topic).into_owned());
            let entry = merged.entry((c.app, topic)).or_default();
            entry.due += c.due;
            entry.scheduled += c.scheduled;
            entry.running += c.running;
            entry.unserved += c.unserved;
            entry.paused += c.paused;
            entry.behind_open_transaction += c.behind_open_transaction;
            entry.unserved_age_secs = entry.unserved_age_secs.max(c.unserved_age_secs);
        }
        for (app, topics) in &labelled.topics {
            for topic in topics {
                let sample = merged
                    .get(&(app.clone(), topic.clone()))
                    .copied()
                    .unwrap_or_default();
                set(app, topic, &sample);
            }
        }
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
