//! The row-state sampler's gauges: bounded labels, fair across apps.

use std::time::Duration;

use outbox_core::NewEvent;
use outbox_dispatch::maintenance::sampler::Sampler;
use outbox_dispatch::telemetry::{LABELLED_PER_APP_ALWAYS, MAX_LABELLED, MAX_LABELLED_PER_APP};
use outbox_testkit::TestDb;
use serde_json::json;
use uuid::Uuid;

use crate::TestResult;

/// Enqueues `rows(n)` rows of each topic `t0`…`t{topics-1}` of `app`.
async fn fill(db: &TestDb, app: Uuid, topics: usize, rows: impl Fn(usize) -> usize) -> TestResult {
    let events: Vec<NewEvent> = (0..topics)
        .flat_map(|n| (0..rows(n)).map(move |_| NewEvent::new(format!("t{n}"), json!({}))))
        .collect();
    let mut tx = db.pool.begin().await?;
    outbox_core::enqueue_batch(&mut tx, app, &events).await?;
    tx.commit().await?;
    Ok(())
}

/// An app with more topics than the shared label budget takes its own
/// share, the largest topics first; the other apps keep theirs (before,
/// the first 200 pairs by size took every label, so a tenant inventing
/// topics pushed every other tenant's into "other").
#[tokio::test]
async fn one_apps_many_topics_leave_the_other_apps_their_labels() -> TestResult {
    let db = TestDb::new().await?;
    let noisy = db.app("noisy").await?;
    let quiet = db.app("quiet").await?;
    let small = db.app("small").await?;
    // The noisy app's topics are the largest: they come first in the sample.
    fill(&db, noisy, MAX_LABELLED + 50, |n| if n < 5 { 4 } else { 3 }).await?;
    fill(&db, quiet, 30, |_| 2).await?;
    fill(&db, small, 3, |_| 1).await?;
    let sampler = Sampler::new(db.pool.clone(), Duration::from_secs(60));
    let pairs = sampler.run_once().await?;
    // noisy: its share and "other"; quiet: its share of what is left
    // (30 < 50) and no "other"; small: its 3.
    const { assert!(MAX_LABELLED_PER_APP + 30 + 3 <= MAX_LABELLED && LABELLED_PER_APP_ALWAYS >= 3) };
    assert_eq!(pairs, MAX_LABELLED_PER_APP + 1 + 30 + 3);

    // The noisy app's topics are replaced by new ones: they go to "other",
    // the old labels stay (at 0), so the series do not pile up as topics
    // come and go (they grew by 50 a round before).
    sqlx::query("DELETE FROM outbox WHERE app_id = $1")
        .bind(noisy)
        .execute(&db.pool)
        .await?;
    let new_topics: Vec<NewEvent> = (0..60)
        .map(|n| NewEvent::new(format!("new.t{n}"), json!({})))
        .collect();
    let mut tx = db.pool.begin().await?;
    outbox_core::enqueue_batch(&mut tx, noisy, &new_topics).await?;
    tx.commit().await?;
    assert_eq!(sampler.run_once().await?, 1 + 30 + 3);
    Ok(())
}
