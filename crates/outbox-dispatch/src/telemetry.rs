//! The dispatcher's metrics: their descriptions (`# HELP`), and counters and
//! a handler-duration histogram labelled by app and topic; the same counts
//! go to `outbox_activity` every few seconds for the console's charts. Label
//! values are capped ([`admits`]): a topic past its app's share or past
//! [`MAX_LABELLED`] pairs in all is counted under `topic="other"`, so a
//! producer inventing topics cannot blow up the metrics' cardinality, nor
//! push another app's topics into `other`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use metrics::{Counter, Histogram};
use outbox_core::store::activity::{self, ActivityDelta};
use sqlx::PgPool;
use uuid::Uuid;

/// Distinct (app, topic) label pairs the apps share; past it an app's
/// further topics share `other`, except for its first
/// [`LABELLED_PER_APP_ALWAYS`].
pub const MAX_LABELLED: usize = 200;

/// Label pairs every app gets whatever the other apps hold: the shared
/// budget may be spent by a tenant that invents topics.
pub const LABELLED_PER_APP_ALWAYS: usize = 10;

/// Label pairs one app may hold at most.
pub const MAX_LABELLED_PER_APP: usize = 50;

/// Whether an app holding `app_pairs` label pairs gets one more, while all
/// apps hold `total`. At most [`MAX_LABELLED`] plus
/// [`LABELLED_PER_APP_ALWAYS`] per app are ever given.
pub fn admits(app_pairs: usize, total: usize) -> bool {
    app_pairs < LABELLED_PER_APP_ALWAYS
        || (app_pairs < MAX_LABELLED_PER_APP && total < MAX_LABELLED)
}

/// The longest a write of the attempt counts may take; they are kept for the
/// next one past it.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The `topic` label of everything past the cap.
pub const OTHER: &str = "other";

/// Describes every metric the dispatcher and its maintenance services
/// export (the exporter prints these as `# HELP`). Call once, after
/// installing a recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "outboxd_claimed_total",
        "Rows claimed (attempts started), by app and topic."
    );
    describe_counter!(
        "outboxd_completed_total",
        "Rows whose handler succeeded, by app and topic."
    );
    describe_counter!(
        "outboxd_retried_total",
        "Failed attempts rescheduled with backoff, by app and topic."
    );
    describe_counter!(
        "outboxd_dead_lettered_total",
        "Rows moved to dead_letters, by app and topic."
    );
    describe_counter!(
        "outboxd_fenced_total",
        "Outcomes refused because another worker had taken the row's lease over."
    );
    describe_counter!(
        "outboxd_abandoned_executions_total",
        "Synchronous invocations whose caller had gone when the answer came."
    );
    describe_histogram!(
        "outboxd_handler_duration_seconds",
        metrics::Unit::Seconds,
        "Handler run time, by app and topic."
    );
    describe_histogram!(
        "outboxd_queue_wait_seconds",
        metrics::Unit::Seconds,
        "How long a row waited from its due time to the start of an attempt, by app and topic."
    );
    describe_gauge!(
        "outboxd_leader",
        "1 while this process is the maintenance leader."
    );
    describe_counter!(
        "outboxd_auto_replayed_total",
        "Dead letters replayed by an automatic replay policy."
    );
    describe_counter!(
        "outboxd_gc_deleted_total",
        "Rows deleted by the GC sweeper, by table."
    );
    describe_counter!("outboxd_gc_runs_total", "GC sweeps run.");
    describe_counter!("outboxd_gc_errors_total", "GC sweeps that failed.");
    describe_counter!(
        "outboxd_maintenance_errors_total",
        "Maintenance passes that failed, by service."
    );
    describe_histogram!(
        "outboxd_gc_duration_seconds",
        metrics::Unit::Seconds,
        "GC sweep run time."
    );
    describe_counter!("outboxd_cron_fired_total", "Cron ticks enqueued.");
    describe_gauge!(
        "outboxd_rows_due",
        "Rows due now and not leased, by app and topic (sampled by the leader)."
    );
    describe_gauge!(
        "outboxd_rows_scheduled",
        "Rows due later (delay or backoff), by app and topic (sampled by the leader)."
    );
    describe_gauge!(
        "outboxd_rows_running",
        "Leased rows (a handler runs them), by app and topic (sampled by the leader)."
    );
    describe_gauge!(
        "outboxd_rows_unserved",
        "Due rows whose topic no live process serves: they wait for one, by app and topic (sampled by the leader)."
    );
    describe_gauge!(
        "outboxd_unserved_oldest_age_seconds",
        metrics::Unit::Seconds,
        "Age of the oldest unserved due row, by app and topic (sampled by the leader)."
    );
    describe_gauge!(
        "outboxd_rows_paused",
        "Due rows held on purpose (topic paused, app suspended), by app and topic (sampled by the leader)."
    );
    describe_gauge!(
        "outboxd_rows_behind_open_transaction",
        "Due rows with an ordering key held back by an open transaction that holds an older transaction id and could still commit an earlier row of their key (a session idle in transaction after a write), by app and topic (sampled by the leader)."
    );
    describe_counter!(
        "outboxd_segment_rotations_total",
        "Segment rotations done: a segment emptied with TRUNCATE and made current."
    );
    describe_counter!(
        "outboxd_segment_rotations_blocked_total",
        "Segment rotations that gave up within their lock timeout (a long transaction held the segment)."
    );
    describe_counter!(
        "outboxd_segment_rows_moved_total",
        "Rows moved out of a segment before it was emptied (still waiting, or leased by slow handlers)."
    );
    describe_counter!(
        "outboxd_segment_vacuums_total",
        "VACUUMs of a segment while its rotation stayed blocked."
    );
}

/// One (app, topic)'s handles, looked up once and kept, with the counts
/// not yet written to `outbox_activity` for the console's charts.
pub(crate) struct TopicHandles {
    pub claimed: Counter,
    completed: Counter,
    retried: Counter,
    dead_lettered: Counter,
    pub handler_duration: Histogram,
    /// Due time to the start of an attempt.
    pub queue_wait: Histogram,
    app_id: Uuid,
    topic: String,
    // Since the last write to `outbox_activity`: completed, failed, dead-lettered.
    unwritten: [AtomicU64; 3],
}

impl TopicHandles {
    fn new(app_id: Uuid, app: &str, topic: &str) -> Self {
        let labels = [
            ("app", app.to_owned()),
            ("topic", outbox_core::topics::shown(topic).into_owned()),
        ];
        Self {
            claimed: metrics::counter!("outboxd_claimed_total", &labels),
            completed: metrics::counter!("outboxd_completed_total", &labels),
            retried: metrics::counter!("outboxd_retried_total", &labels),
            dead_lettered: metrics::counter!("outboxd_dead_lettered_total", &labels),
            handler_duration: metrics::histogram!("outboxd_handler_duration_seconds", &labels),
            queue_wait: metrics::histogram!("outboxd_queue_wait_seconds", &labels),
            app_id,
            topic: topic.to_owned(),
            unwritten: Default::default(),
        }
    }

    /// Counts an attempt whose handler succeeded.
    pub fn count_completed(&self) {
        self.completed.increment(1);
        self.unwritten[0].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed attempt that will be retried.
    pub fn count_retried(&self) {
        self.retried.increment(1);
        self.unwritten[1].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed attempt that dead-lettered its row.
    pub fn count_dead_lettered(&self) {
        self.dead_lettered.increment(1);
        self.unwritten[1].fetch_add(1, Ordering::Relaxed);
        self.unwritten[2].fetch_add(1, Ordering::Relaxed);
    }

    /// Takes the unwritten counts (none when all are zero).
    fn take(&self) -> Option<ActivityDelta> {
        let [completed, failed, dead_lettered] =
            [0, 1, 2].map(|i| self.unwritten[i].swap(0, Ordering::Relaxed));
        (completed + failed > 0).then(|| ActivityDelta {
            app_id: self.app_id,
            topic: self.topic.clone(),
            completed,
            failed,
            dead_lettered,
        })
    }

    /// Puts counts taken by [`Self::take`] back (their write failed).
    fn give_back(&self, delta: &ActivityDelta) {
        for (i, n) in [delta.completed, delta.failed, delta.dead_lettered]
            .into_iter()
            .enumerate()
        {
            self.unwritten[i].fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Labelled handles by (app id, topic), with app slugs looked up once.
#[derive(Default)]
pub(crate) struct TopicMetrics {
    // app → topic → handles: looked up by `&str`, without allocating a key.
    handles: RwLock<HashMap<Uuid, HashMap<String, Arc<TopicHandles>>>>,
    // How many (app, topic) pairs `handles` holds.
    pairs: std::sync::atomic::AtomicUsize,
    slugs: RwLock<HashMap<Uuid, String>>,
    overflow: RwLock<HashMap<Uuid, Arc<TopicHandles>>>,
}

impl TopicMetrics {
    /// The handles of `app_id`'s `topic`: a read lock and a hash lookup,
    /// except the first time (one query for the app's slug).
    pub async fn of(&self, pool: &PgPool, app_id: Uuid, topic: &str) -> Arc<TopicHandles> {
        let app_pairs = match self.handles.read() {
            Ok(handles) => {
                let topics = handles.get(&app_id);
                if let Some(found) = topics.and_then(|t| t.get(topic)) {
                    return found.clone();
                }
                topics.map_or(0, HashMap::len)
            }
            Err(_) => 0,
        };
        let slug = self.slug(pool, app_id).await;
        if !admits(app_pairs, self.pairs.load(Ordering::Relaxed)) {
            return self.overflow_of(app_id, &slug);
        }
        let Ok(mut handles) = self.handles.write() else {
            return Arc::new(TopicHandles::new(app_id, &slug, OTHER));
        };
        let topics = handles.entry(app_id).or_default();
        if let Some(found) = topics.get(topic) {
            return found.clone();
        }
        // Again under the lock: two first sightings that both read the
        // counts below the caps would otherwise both take a label.
        if !admits(topics.len(), self.pairs.load(Ordering::Relaxed)) {
            drop(handles);
            return self.overflow_of(app_id, &slug);
        }
        let created = Arc::new(TopicHandles::new(app_id, &slug, topic));
        topics.insert(topic.to_owned(), created.clone());
        self.pairs.fetch_add(1, Ordering::Relaxed);
        created
    }

    fn overflow_of(&self, app_id: Uuid, slug: &str) -> Arc<TopicHandles> {
        if let Some(found) = self
            .overflow
            .read()
            .ok()
            .and_then(|o| o.get(&app_id).cloned())
        {
            return found;
        }
        let handles = Arc::new(TopicHandles::new(app_id, slug, OTHER));
        if let Ok(mut overflow) = self.overflow.write() {
            overflow.entry(app_id).or_insert_with(|| handles.clone());
        }
        handles
    }

    /// Adds the attempts counted since the last call to the current
    /// minute's `outbox_activity`; on failure they are kept for the next.
    pub async fn write_activity(&self, pool: &PgPool) -> Result<(), outbox_core::Error> {
        let mut all: Vec<Arc<TopicHandles>> = Vec::new();
        if let Ok(handles) = self.handles.read() {
            all.extend(handles.values().flat_map(|t| t.values().cloned()));
        }
        if let Ok(overflow) = self.overflow.read() {
            all.extend(overflow.values().cloned());
        }
        let taken: Vec<(Arc<TopicHandles>, ActivityDelta)> = all
            .into_iter()
            .filter_map(|h| h.take().map(|d| (h, d)))
            .collect();
        let deltas: Vec<ActivityDelta> = taken.iter().map(|(_, d)| d.clone()).collect();
        // Bounded, so that a slow write cannot hold up the heartbeat it follows.
        let written =
            match tokio::time::timeout(WRITE_TIMEOUT, activity::record(pool, &deltas)).await {
                Ok(written) => written,
                Err(_) => Err(outbox_core::Error::Conflict(format!(
                    "writing the attempt counts took longer than {WRITE_TIMEOUT:?}"
                ))),
            };
        if written.is_err() {
            for (handles, delta) in &taken {
                handles.give_back(delta);
            }
        }
        written
    }

    async fn slug(&self, pool: &PgPool, app_id: Uuid) -> String {
        if let Some(slug) = self.slugs.read().ok().and_then(|s| s.get(&app_id).cloned()) {
            return slug;
        }
        // An app that cannot be looked up (database briefly away) is
        // labelled by its id this time and looked up again next time.
        match outbox_core::store::apps::by_id(pool, app_id).await {
            Ok(app) => {
                if let Ok(mut slugs) = self.slugs.write() {
                    slugs.insert(app_id, app.slug.clone());
                }
                app.slug
            }
            Err(_) => app_id.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{LABELLED_PER_APP_ALWAYS, MAX_LABELLED, MAX_LABELLED_PER_APP, OTHER, TopicMetrics};

    /// Many first sightings at once must not take more labels than the caps,
    /// and an app that invents topics leaves the other apps theirs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_new_topics_never_take_more_labels_than_the_caps()
    -> Result<(), Box<dyn std::error::Error>> {
        // Nothing listens there: slugs fall back to the app's id at once.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(std::time::Duration::from_millis(20))
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")?;
        let metrics = Arc::new(TopicMetrics::default());
        let apps: Vec<uuid::Uuid> = (0..6).map(|_| uuid::Uuid::now_v7()).collect();
        let labelled_of = |app_index: usize, topics: usize| {
            let tasks: Vec<_> = (0..topics)
                .map(|n| {
                    let (metrics, pool, app) = (metrics.clone(), pool.clone(), apps[app_index]);
                    tokio::spawn(async move { metrics.of(&pool, app, &format!("t{n}")).await })
                })
                .collect();
            async move {
                let mut labelled = std::collections::HashSet::new();
                for task in tasks {
                    labelled.insert(task.await?.topic.clone());
                }
                labelled.remove(OTHER);
                Ok::<usize, Box<dyn std::error::Error>>(labelled.len())
            }
        };
        // Five apps inventing topics take their share each, and then the
        // shared budget is spent...
        for app in 0..5 {
            let labelled = labelled_of(app, MAX_LABELLED).await?;
            let expected = MAX_LABELLED_PER_APP.min(MAX_LABELLED - app * MAX_LABELLED_PER_APP);
            assert_eq!(labelled, expected.max(LABELLED_PER_APP_ALWAYS), "app {app}");
        }
        // ...but an app that comes later still gets its first topics.
        assert_eq!(labelled_of(5, 40).await?, LABELLED_PER_APP_ALWAYS);
        assert_eq!(
            metrics.pairs.load(std::sync::atomic::Ordering::Relaxed),
            MAX_LABELLED + 2 * LABELLED_PER_APP_ALWAYS
        );
        Ok(())
    }
}
