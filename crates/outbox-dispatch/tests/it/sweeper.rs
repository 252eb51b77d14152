//! The GC sweeper: retention horizons, concurrent sweepers, per-app retention.

use outbox_core::store::dead_letters::{self, External};
use outbox_dispatch::maintenance::Sweeper;
use outbox_dispatch::maintenance::sweeper::SweeperConfig;
use outbox_testkit::TestDb;
use serde_json::json;
use uuid::Uuid;

use crate::TestResult;

async fn dead_letter_aged(
    db: &TestDb,
    app: Uuid,
    age: &str,
) -> Result<Uuid, Box<dyn std::error::Error>> {
    let id = dead_letters::insert_external(
        &db.pool,
        &External {
            app_id: app,
            original_event_id: Uuid::now_v7(),
            source: "queue",
            topic: "t",
            handler: None,
            payload: &json!({}),
            headers: &json!({}),
            attempt_count: 1,
            last_error: "x",
        },
    )
    .await?;
    sqlx::query(&format!(
        "UPDATE dead_letters SET created_at = now() - interval '{age}' WHERE id = $1"
    ))
    .bind(id)
    .execute(&db.pool)
    .await?;
    Ok(id)
}

fn sweeper(db: &TestDb, batch: i64) -> Sweeper {
    Sweeper::new(
        db.pool.clone(),
        SweeperConfig {
            dead_letter_retention_days: 30,
            abandoned_executions_retention_days: 7,
            batch,
            ..SweeperConfig::default()
        },
    )
}

#[tokio::test]
async fn retention_deletes_past_the_horizon_and_keeps_a_second_younger() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let old = dead_letter_aged(&db, app, "30 days 1 second").await?;
    let young = dead_letter_aged(&db, app, "30 days -1 second").await?;
    let fresh = dead_letter_aged(&db, app, "0 seconds").await?;
    for (age, outbox_id) in [
        ("7 days 1 second", Uuid::now_v7()),
        ("7 days -1 second", Uuid::now_v7()),
    ] {
        sqlx::query(&format!(
            "INSERT INTO abandoned_executions (outbox_id, app_id, reply_to, topic, outcome, created_at)
             VALUES ($1, $2, 'inbox', 't', 'caller_gone', now() - interval '{age}')"
        ))
        .bind(outbox_id)
        .bind(app)
        .execute(&db.pool)
        .await?;
    }
    let report = sweeper(&db, 1000).run_once().await?;
    assert_eq!((report.dead_letters, report.abandoned_executions), (1, 1));
    let left: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM dead_letters ORDER BY created_at")
        .fetch_all(&db.pool)
        .await?;
    assert!(!left.contains(&old));
    assert!(left.contains(&young) && left.contains(&fresh));
    assert_eq!(
        sweeper(&db, 1000).run_once().await?.total(),
        0,
        "nothing twice"
    );
    Ok(())
}

#[tokio::test]
async fn concurrent_sweepers_split_the_work_without_double_deletes() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    sqlx::query(
        "INSERT INTO dead_letters (app_id, original_event_id, source, topic, payload, attempt_count, created_at)
         SELECT $1, gen_random_uuid(), 'queue', 't', '{}', 1, now() - interval '40 days' FROM generate_series(1, 5000)",
    )
    .bind(app)
    .execute(&db.pool)
    .await?;
    let (first, second) = (sweeper(&db, 100), sweeper(&db, 100));
    let (a, b) = tokio::join!(first.run_once(), second.run_once());
    let (a, b) = (a?, b?);
    assert_eq!(a.dead_letters + b.dead_letters, 5000, "{a:?} {b:?}");
    assert_eq!(dead_letters::count_unresolved(&db.pool, app).await?, 0);
    Ok(())
}

#[tokio::test]
async fn a_dead_letter_being_replayed_is_not_lost_to_the_sweeper() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let id = dead_letter_aged(&db, app, "40 days").await?;
    // The replay's transaction holds the row while the sweeper runs.
    let mut replay = db.pool.begin().await?;
    let replayed = dead_letters::replay(&mut replay, app, &[id]).await?;
    assert_eq!(replayed.len(), 1);
    let report = sweeper(&db, 1000).run_once().await?;
    assert_eq!(report.dead_letters, 0, "a locked row is skipped");
    replay.commit().await?;
    let outbox_id = replayed[0].1;
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM outbox WHERE id = $1 AND replayed_from = $2)",
    )
    .bind(outbox_id)
    .bind(id)
    .fetch_one(&db.pool)
    .await?;
    assert!(exists, "the replayed event is in the outbox");
    // Once the replay committed, the old (now resolved) dead letter goes; the event stays.
    assert_eq!(sweeper(&db, 1000).run_once().await?.dead_letters, 1);
    assert_eq!(outbox_core::store::outbox::count(&db.pool).await?, 1);
    Ok(())
}

#[tokio::test]
async fn an_app_can_keep_its_dead_letters_for_a_different_time() -> TestResult {
    let db = TestDb::new().await?;
    let short = db.app("short").await?;
    let normal = db.app("normal").await?;
    outbox_core::store::retention::set_app_retention(&db.pool, "short", Some(2)).await?;
    let gone = dead_letter_aged(&db, short, "3 days").await?;
    let kept = dead_letter_aged(&db, normal, "3 days").await?;
    let report = sweeper(&db, 1000).run_once().await?;
    assert_eq!(report.dead_letters, 1);
    let left: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM dead_letters")
        .fetch_all(&db.pool)
        .await?;
    assert_eq!(left, vec![kept]);
    assert!(!left.contains(&gone));
    let err = outbox_core::store::retention::set_app_retention(&db.pool, "short", Some(3651))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("0..=3650"), "{err}");
    Ok(())
}

#[tokio::test]
async fn an_app_can_keep_its_dead_letters_for_good_while_the_others_are_swept() -> TestResult {
    let db = TestDb::new().await?;
    let audited = db.app("audited").await?;
    let normal = db.app("normal").await?;
    outbox_core::store::retention::set_app_retention(&db.pool, "audited", Some(0)).await?;
    let kept = dead_letter_aged(&db, audited, "40 days").await?;
    let gone = dead_letter_aged(&db, normal, "40 days").await?;
    // The global 30 days sweeps the app without its own retention only.
    let report = sweeper(&db, 1000).run_once().await?;
    assert_eq!(report.dead_letters, 1);
    let left: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM dead_letters")
        .fetch_all(&db.pool)
        .await?;
    assert_eq!(left, vec![kept]);
    assert!(!left.contains(&gone));
    // The sweep of the version before (its statement as it was) keeps them
    // too: a rolling upgrade runs it beside this one.
    let earlier = sqlx::query(
        "DELETE FROM dead_letters WHERE id IN (
            SELECT d.id FROM dead_letters d JOIN apps a ON a.id = d.app_id
            WHERE d.created_at < now() - make_interval(days => coalesce(a.dead_letter_retention_days, nullif($1, 0)))
            ORDER BY d.created_at LIMIT $2 FOR UPDATE OF d SKIP LOCKED)",
    )
    .bind(30)
    .bind(1000_i64)
    .execute(&db.pool)
    .await?;
    assert_eq!(
        earlier.rows_affected(),
        0,
        "an earlier version deletes none of them"
    );
    Ok(())
}

#[tokio::test]
async fn without_a_global_retention_only_apps_with_their_own_are_swept() -> TestResult {
    let db = TestDb::new().await?;
    let short = db.app("short").await?;
    let normal = db.app("normal").await?;
    outbox_core::store::retention::set_app_retention(&db.pool, "short", Some(2)).await?;
    let gone = dead_letter_aged(&db, short, "3 days").await?;
    let kept = dead_letter_aged(&db, normal, "400 days").await?;
    let swept = outbox_core::store::retention::sweep_dead_letters(&db.pool, 0, 1000).await?;
    assert_eq!(swept, 1);
    let left: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM dead_letters")
        .fetch_all(&db.pool)
        .await?;
    assert_eq!(left, vec![kept]);
    assert!(!left.contains(&gone));
    Ok(())
}

#[tokio::test]
async fn one_sweep_deletes_at_most_its_batch_across_apps() -> TestResult {
    let db = TestDb::new().await?;
    for slug in ["one", "two"] {
        let app = db.app(slug).await?;
        sqlx::query(
            "INSERT INTO dead_letters (id, app_id, original_event_id, source, topic, payload, headers, attempt_count, created_at)
             SELECT gen_random_uuid(), $1, gen_random_uuid(), 'queue', 't', '{}', '{}', 1, now() - interval '40 days'
             FROM generate_series(1, 150)",
        )
        .bind(app)
        .execute(&db.pool)
        .await?;
    }
    let swept = outbox_core::store::retention::sweep_dead_letters(&db.pool, 30, 100).await?;
    assert_eq!(swept, 100);
    Ok(())
}

#[tokio::test]
async fn gc_forgets_login_counts_that_lapsed_a_week_ago() -> TestResult {
    let db = TestDb::new().await?;
    sqlx::query(
        "INSERT INTO login_throttle (key, failures, last_failure_at, blocked_until) VALUES
            ('address:192.0.2.1', 9, now() - interval '8 days', NULL),
            ('address:192.0.2.2', 9, now() - interval '1 hour', now() + interval '5 minutes')",
    )
    .execute(&db.pool)
    .await?;
    let report = Sweeper::new(db.pool.clone(), SweeperConfig::default())
        .run_once()
        .await?;
    assert_eq!(report.login_counts, 1);
    let left: Vec<String> = sqlx::query_scalar("SELECT key FROM login_throttle")
        .fetch_all(&db.pool)
        .await?;
    assert_eq!(left, vec!["address:192.0.2.2".to_owned()]);
    Ok(())
}

/// Expired sessions and the reply inboxes of invocations whose caller is
/// long gone are swept; live ones stay. (Signing in removed the expired
/// sessions of the same user only, and nothing removed an inbox whose
/// caller's process died.)
#[tokio::test]
async fn expired_sessions_and_stale_invocation_inboxes_are_swept() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let user = outbox_core::store::principals::create_user(&db.pool, "u@x.io", "hash", false)
        .await?
        .id;
    for expires in ["now() - interval '1 second'", "now() + interval '1 hour'"] {
        sqlx::query(&format!(
            "INSERT INTO sessions (user_id, expires_at) VALUES ($1, {expires})"
        ))
        .bind(user)
        .execute(&db.pool)
        .await?;
    }
    for age in ["1 hour 1 second", "59 minutes"] {
        sqlx::query(&format!(
            "INSERT INTO invocation_inboxes (inbox, app_id, outbox_id, created_at)
             VALUES ($1, $2, $3, now() - interval '{age}')"
        ))
        .bind(Uuid::new_v4())
        .bind(app)
        .bind(Uuid::now_v7())
        .execute(&db.pool)
        .await?;
    }
    let report = sweeper(&db, 1000).run_once().await?;
    assert_eq!((report.sessions, report.invocation_inboxes), (1, 1));
    let left: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM sessions WHERE expires_at > now()),
                (SELECT count(*) FROM invocation_inboxes)",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(left, (1, 1));
    Ok(())
}

#[tokio::test]
async fn the_audit_log_is_kept_unless_a_retention_is_set() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    // Entries 40, 20 and 0 days old, written oldest first as time would.
    sqlx::query(
        "INSERT INTO audit_log (actor, app_id, action, at)
         SELECT 'ops@example.com', $1, 'topic.pause', now() - make_interval(days => d)
         FROM unnest(ARRAY[40, 40, 40, 20, 0]) AS d",
    )
    .bind(app)
    .execute(&db.pool)
    .await?;
    let entries =
        || sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_log").fetch_one(&db.pool);
    assert_eq!(
        sweeper(&db, 2).run_once().await?.audit_entries,
        0,
        "kept by default"
    );
    assert_eq!(entries().await?, 5);
    let with_retention = |days| {
        Sweeper::new(
            db.pool.clone(),
            SweeperConfig {
                audit_log_retention_days: Some(days),
                batch: 2,
                ..SweeperConfig::default()
            },
        )
    };
    // Batches of two: the three old entries go in two, the young ones stay.
    assert_eq!(with_retention(30).run_once().await?.audit_entries, 3);
    assert_eq!(entries().await?, 2);
    assert_eq!(
        with_retention(30).run_once().await?.audit_entries,
        0,
        "nothing twice"
    );
    assert_eq!(with_retention(10).run_once().await?.audit_entries, 1);
    assert_eq!(entries().await?, 1);
    Ok(())
}
