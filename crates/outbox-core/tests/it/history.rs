//! The attempt history (migration 0026): failed attempts are recorded with
//! their worker, times and a bounded error, the last N are kept, the history
//! goes into the dead letter, and an attempt without an outcome leaves a gap.

use std::time::Duration;

use chrono::Utc;
use outbox_core::model::Lease;
use outbox_core::store::outbox::{
    self as store, AttemptHistory, FailedAttempt, Reschedule, ToDeadLetter,
};
use outbox_core::{Attempt, store::dead_letters};
use outbox_testkit::{TestDb, wait_until};
use sqlx::PgPool;
use uuid::Uuid;

type TestResult = Result<(), Box<dyn std::error::Error>>;

async fn claim_one(pool: &PgPool, worker: &str) -> Result<Lease, Box<dyn std::error::Error>> {
    let claimed = store::claim(pool, worker, 1, Duration::from_secs(30)).await?;
    Ok(claimed.first().ok_or("nothing to claim")?.lease())
}

async fn fail(
    pool: &PgPool,
    lease: Lease,
    error: &str,
    history: AttemptHistory,
) -> Result<(), Box<dyn std::error::Error>> {
    let retry = Reschedule {
        lease,
        delay: Duration::ZERO,
        error: Some(error.to_owned()),
        refund_attempt: false,
    };
    assert_eq!(
        store::reschedule(pool, &[retry], history).await?,
        [lease.id]
    );
    Ok(())
}

async fn history(pool: &PgPool, id: Uuid) -> Result<Option<Vec<Attempt>>, outbox_core::Error> {
    let app: Uuid = sqlx::query_scalar("SELECT app_id FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await?;
    Ok(store::row(pool, app, id)
        .await?
        .and_then(|row| row.attempts))
}

/// The attempt history of the dead letter that row `id` became.
async fn buried_history(
    pool: &PgPool,
    id: Uuid,
) -> Result<Vec<Attempt>, Box<dyn std::error::Error>> {
    let dead = dead_letters::by_original(pool, id).await?;
    Ok(dead
        .first()
        .and_then(|d| d.attempts.clone())
        .ok_or("the dead letter has no history")?)
}

#[tokio::test]
async fn failed_attempts_are_kept_with_worker_and_times_and_go_into_the_dead_letter() -> TestResult
{
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    crate::enqueue_committed(&db, app, 1).await?;
    let keep_two = AttemptHistory {
        keep: 2,
        error_chars: 16,
    };

    let first = claim_one(&db.pool, "worker-a").await?;
    fail(&db.pool, first, "connection refused", keep_two).await?;
    let recorded = history(&db.pool, first.id).await?.ok_or("no history")?;
    assert_eq!(recorded.len(), 1);
    let a = &recorded[0];
    assert_eq!(a.attempt, 1);
    assert_eq!(a.worker.as_deref(), Some("worker-a"));
    // The newest failed attempt's error is the row's last_error, whole.
    assert_eq!(a.error.as_deref(), Some("connection refused"));
    let started = a.started_at.ok_or("no start")?;
    assert!(started <= a.ended_at && a.ended_at <= Utc::now() + chrono::Duration::seconds(5));

    let second = claim_one(&db.pool, "worker-b").await?;
    fail(&db.pool, second, "timeout", keep_two).await?;
    let recorded = history(&db.pool, first.id).await?.ok_or("no history")?;
    let kept: Vec<(i32, Option<&str>, Option<&str>)> = recorded
        .iter()
        .map(|a| (a.attempt, a.worker.as_deref(), a.error.as_deref()))
        .collect();
    // Pushed into the history by the next failure, cut to 16 characters.
    assert_eq!(
        kept,
        [
            (1, Some("worker-a"), Some("connection refus")),
            (2, Some("worker-b"), Some("timeout"))
        ]
    );
    assert_eq!(recorded[0].started_at, Some(started));
    let third = claim_one(&db.pool, "worker-c").await?;
    fail(&db.pool, third, "503", keep_two).await?;
    let recorded = history(&db.pool, first.id).await?.ok_or("no history")?;
    let kept: Vec<(i32, Option<&str>)> = recorded
        .iter()
        .map(|a| (a.attempt, a.worker.as_deref()))
        .collect();
    assert_eq!(kept, [(2, Some("worker-b")), (3, Some("worker-c"))]);

    let fourth = claim_one(&db.pool, "worker-d").await?;
    let bury = ToDeadLetter {
        lease: fourth,
        error: "permanent: bad payload".into(),
        handler: None,
    };
    assert_eq!(
        store::dead_letter(&db.pool, &[bury], keep_two).await?,
        [fourth.id]
    );
    let attempts = buried_history(&db.pool, fourth.id).await?;
    let kept: Vec<(i32, Option<&str>, Option<&str>)> = attempts
        .iter()
        .map(|a| (a.attempt, a.worker.as_deref(), a.error.as_deref()))
        .collect();
    assert_eq!(
        kept,
        [
            (3, Some("worker-c"), Some("503")),
            (4, Some("worker-d"), Some("permanent: bad p"))
        ]
    );
    Ok(())
}

#[tokio::test]
async fn with_the_history_off_nothing_is_recorded_and_a_snooze_records_nothing() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    crate::enqueue_committed(&db, app, 1).await?;
    let lease = claim_one(&db.pool, "w").await?;
    fail(&db.pool, lease, "boom", AttemptHistory::OFF).await?;
    assert_eq!(history(&db.pool, lease.id).await?, None);

    let lease = claim_one(&db.pool, "w").await?;
    let snooze = Reschedule {
        lease,
        delay: Duration::ZERO,
        error: None,
        refund_attempt: true,
    };
    let changed = store::reschedule(&db.pool, &[snooze], AttemptHistory::default()).await?;
    assert_eq!(changed, [lease.id]);
    assert_eq!(history(&db.pool, lease.id).await?, None);
    Ok(())
}

/// A claim whose lease runs out without an outcome (the process died) is
/// not in the history; the next failure's attempt number shows the gap.
#[tokio::test]
async fn an_attempt_whose_lease_expired_leaves_a_gap() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    crate::enqueue_committed(&db, app, 1).await?;
    let lost = store::claim(&db.pool, "died", 1, Duration::from_millis(1)).await?;
    assert_eq!(lost.len(), 1);
    let rescued = wait_until(Duration::from_secs(5), || async {
        matches!(
            store::claim(&db.pool, "rescuer", 1, Duration::from_secs(30))
                .await
                .as_deref(),
            Ok([_])
        )
    })
    .await;
    assert!(rescued, "the expired lease was not claimable again");
    let lease = Lease {
        id: lost[0].id,
        token: lost[0].lease().token + 1,
    };
    fail(&db.pool, lease, "boom", AttemptHistory::default()).await?;
    let recorded = history(&db.pool, lease.id).await?.ok_or("no history")?;
    let kept: Vec<(i32, Option<&str>)> = recorded
        .iter()
        .map(|a| (a.attempt, a.worker.as_deref()))
        .collect();
    assert_eq!(kept, [(2, Some("rescuer"))]);
    Ok(())
}

/// Transactional mode records the failure with the worker it is given, and
/// the dead-lettering that follows in the same transaction does not record
/// the same attempt twice.
#[tokio::test]
async fn a_transactional_failure_is_recorded_once_into_the_dead_letter() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    crate::enqueue_committed(&db, app, 1).await?;
    let id: Uuid = sqlx::query_scalar("SELECT id FROM outbox")
        .fetch_one(&db.pool)
        .await?;
    let started_at = Utc::now();
    let mut tx = db.pool.begin().await?;
    let attempt = FailedAttempt {
        id,
        delay: Duration::ZERO,
        counts: true,
        error: Some("permanent: no such customer"),
        worker: "tx-worker",
        started_at,
    };
    let token = store::record_failed_attempt(&mut *tx, &attempt, AttemptHistory::default())
        .await?
        .ok_or("the row was not recorded")?;
    let bury = ToDeadLetter {
        lease: Lease { id, token },
        error: "permanent: no such customer".into(),
        handler: None,
    };
    assert_eq!(
        store::dead_letter(&mut *tx, &[bury], AttemptHistory::default()).await?,
        [id]
    );
    tx.commit().await?;
    let attempts = buried_history(&db.pool, id).await?;
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0].attempt, 1);
    assert_eq!(attempts[0].worker.as_deref(), Some("tx-worker"));
    let recorded_start = attempts[0].started_at.ok_or("no start")?;
    assert!((recorded_start - started_at).num_milliseconds().abs() < 5);
    Ok(())
}

/// The push keeps the last `keep` entries whatever the history's length
/// (a lower `dispatcher.attempt_history` cuts a longer one at once); with
/// `keep` 0 it leaves the history alone.
#[tokio::test]
async fn the_push_keeps_the_last_entries() -> TestResult {
    let db = TestDb::new().await?;
    for (history, keep, expected) in [
        (None, 3, Some("[1]")),
        (Some("[1]"), 3, Some("[1, 2]")),
        (Some("[1, 2]"), 2, Some("[2, 3]")),
        (Some("[1, 2, 3, 4]"), 2, Some("[4, 5]")),
        (Some("[1, 2]"), 0, Some("[1, 2]")),
        (None, 0, None),
    ] {
        let next = history.map_or(1, |h: &str| h.matches(',').count() + 2);
        let pushed: Option<String> = sqlx::query_scalar(
            "SELECT outbox_attempts_push($1::jsonb, to_jsonb($2::int), $3)::text",
        )
        .bind(history)
        .bind(next as i32)
        .bind(keep)
        .fetch_one(&db.pool)
        .await?;
        assert_eq!(pushed.as_deref(), expected, "{history:?} keep {keep}");
    }
    Ok(())
}

/// Entries written before migration 0027 were objects: they are read, kept
/// and cut like the arrays written since, into the dead letter too.
#[tokio::test]
async fn histories_of_object_entries_are_read_and_extended() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    crate::enqueue_committed(&db, app, 1).await?;
    let first = claim_one(&db.pool, "old-worker").await?;
    sqlx::query(
        "UPDATE outbox SET locked_by = NULL, locked_until = NULL, last_error = 'old',
                attempts = jsonb_build_array(jsonb_build_object(
                    'attempt', 1, 'started_at', now(), 'ended_at', now(),
                    'worker', 'old-worker', 'error', 'written by 0026'))
         WHERE id = $1",
    )
    .bind(first.id)
    .execute(&db.pool)
    .await?;
    let keep_two = AttemptHistory {
        keep: 2,
        error_chars: 100,
    };
    let second = claim_one(&db.pool, "w2").await?;
    fail(&db.pool, second, "second", keep_two).await?;
    let recorded = history(&db.pool, first.id).await?.ok_or("no history")?;
    let kept: Vec<(i32, Option<&str>)> = recorded
        .iter()
        .map(|a| (a.attempt, a.error.as_deref()))
        .collect();
    assert_eq!(kept, [(1, Some("written by 0026")), (2, Some("second"))]);
    let third = claim_one(&db.pool, "w3").await?;
    let bury = ToDeadLetter {
        lease: third,
        error: "third".into(),
        handler: None,
    };
    store::dead_letter(&db.pool, &[bury], keep_two).await?;
    let attempts = buried_history(&db.pool, first.id).await?;
    let kept: Vec<(i32, Option<&str>)> = attempts
        .iter()
        .map(|a| (a.attempt, a.error.as_deref()))
        .collect();
    assert_eq!(kept, [(2, Some("second")), (3, Some("third"))]);
    Ok(())
}

/// What the row stores (migration 0037): a first failure writes the
/// attempt into the row's own columns and builds no `jsonb`; the next one
/// pushes it into `attempts`. A cancelled row's dead letter gets both.
#[tokio::test]
async fn the_newest_failed_attempt_lives_in_columns_until_the_next_failure() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    crate::enqueue_committed(&db, app, 1).await?;
    let stored = |id: Uuid| {
        sqlx::query_as::<_, (Option<serde_json::Value>, Option<i32>, Option<String>)>(
            "SELECT attempts, failed_attempt, failed_attempt_worker FROM outbox WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&db.pool)
    };

    let first = claim_one(&db.pool, "worker-a").await?;
    fail(&db.pool, first, "refused", AttemptHistory::default()).await?;
    let (attempts, newest, worker) = stored(first.id).await?;
    assert_eq!(attempts, None);
    assert_eq!((newest, worker.as_deref()), (Some(1), Some("worker-a")));

    let second = claim_one(&db.pool, "worker-b").await?;
    fail(&db.pool, second, "timeout", AttemptHistory::default()).await?;
    let (attempts, newest, worker) = stored(first.id).await?;
    let pushed = attempts.ok_or("the first attempt was not pushed")?;
    assert_eq!(pushed.as_array().map(Vec::len), Some(1));
    assert_eq!(pushed[0][0], 1);
    assert_eq!(pushed[0][4], "refused");
    assert_eq!((newest, worker.as_deref()), (Some(2), Some("worker-b")));

    let cancelled = store::cancel(
        &db.pool,
        app,
        &store::CancelFilter::Ids(vec![first.id]),
        None,
        "not needed",
    )
    .await?;
    assert_eq!(cancelled, [first.id]);
    let kept: Vec<(i32, Option<String>)> = buried_history(&db.pool, first.id)
        .await?
        .into_iter()
        .map(|a| (a.attempt, a.error))
        .collect();
    assert_eq!(
        kept,
        [(1, Some("refused".into())), (2, Some("timeout".into()))]
    );
    Ok(())
}

/// A process with the history off records nothing, but the newest failed
/// attempt another process recorded goes into `attempts` whole when its
/// error is overwritten, instead of being lost.
#[tokio::test]
async fn a_failure_with_the_history_off_keeps_what_another_process_recorded() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    crate::enqueue_committed(&db, app, 1).await?;
    let first = claim_one(&db.pool, "recording").await?;
    fail(&db.pool, first, "first", AttemptHistory::default()).await?;
    let second = claim_one(&db.pool, "silent").await?;
    fail(&db.pool, second, "second", AttemptHistory::OFF).await?;
    let recorded = history(&db.pool, first.id).await?.ok_or("no history")?;
    let kept: Vec<(i32, Option<&str>, Option<&str>)> = recorded
        .iter()
        .map(|a| (a.attempt, a.worker.as_deref(), a.error.as_deref()))
        .collect();
    assert_eq!(kept, [(1, Some("recording"), Some("first"))]);

    // The same when the newest attempt is still in its columns and the
    // row is dead-lettered by a process with the history off.
    let third = claim_one(&db.pool, "recording").await?;
    fail(&db.pool, third, "third", AttemptHistory::default()).await?;
    let fourth = claim_one(&db.pool, "silent").await?;
    let bury = ToDeadLetter {
        lease: fourth,
        error: "fourth".into(),
        handler: None,
    };
    store::dead_letter(&db.pool, &[bury], AttemptHistory::OFF).await?;
    let kept: Vec<(i32, Option<String>)> = buried_history(&db.pool, first.id)
        .await?
        .into_iter()
        .map(|a| (a.attempt, a.error))
        .collect();
    assert_eq!(kept, [(1, Some("first".into())), (3, Some("third".into()))]);
    Ok(())
}

/// A transactional worker that dies overwrites the row's `last_error`,
/// which held the error of its newest failed attempt: that attempt goes
/// into `attempts` first.
#[tokio::test]
async fn a_worker_death_keeps_the_newest_failed_attempt() -> TestResult {
    use sqlx::Connection;
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    crate::enqueue_committed(&db, app, 1).await?;
    let first = claim_one(&db.pool, "worker-a").await?;
    fail(&db.pool, first, "refused", AttemptHistory::default()).await?;

    let mut keeper = sqlx::PgConnection::connect_with(&db.pool.connect_options()).await?;
    store::open_tx_batch(&mut keeper, 11, "doomed", &[first.id]).await?;
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut keeper)
        .await?;
    keeper.close().await?;
    assert!(
        db.a_session_ended(backend).await,
        "the dead worker's session never ended"
    );
    let mut tx = db.pool.begin().await?;
    assert_eq!(store::count_abandoned_tx_batches(&mut tx).await?, 1);
    tx.commit().await?;

    let recorded = history(&db.pool, first.id).await?.ok_or("no history")?;
    let kept: Vec<(i32, Option<&str>)> = recorded
        .iter()
        .map(|a| (a.attempt, a.error.as_deref()))
        .collect();
    assert_eq!(kept, [(1, Some("refused"))]);
    Ok(())
}

/// The upgrade to migration 0037 with a row in flight: a history written
/// into `attempts` before it is read and extended after it.
#[tokio::test]
async fn the_upgrade_keeps_a_history_written_before_it() -> TestResult {
    let db = TestDb::migrated_to(36).await?;
    let app = db.app("shop").await?;
    crate::enqueue_committed(&db, app, 1).await?;
    let first = claim_one(&db.pool, "old-worker").await?;
    // What a retry of the previous version wrote.
    sqlx::query(
        "UPDATE outbox SET locked_by = NULL, locked_until = NULL, last_error = 'before',
                attempts = jsonb_build_array(jsonb_build_array(
                    1, now(), clock_timestamp(), 'old-worker', 'before'))
         WHERE id = $1",
    )
    .bind(first.id)
    .execute(&db.pool)
    .await?;
    outbox_core::migrate(&db.pool).await?;

    let second = claim_one(&db.pool, "new-worker").await?;
    fail(&db.pool, second, "after", AttemptHistory::default()).await?;
    let recorded = history(&db.pool, first.id).await?.ok_or("no history")?;
    let kept: Vec<(i32, Option<&str>, Option<&str>)> = recorded
        .iter()
        .map(|a| (a.attempt, a.worker.as_deref(), a.error.as_deref()))
        .collect();
    assert_eq!(
        kept,
        [
            (1, Some("old-worker"), Some("before")),
            (2, Some("new-worker"), Some("after"))
        ]
    );
    Ok(())
}
