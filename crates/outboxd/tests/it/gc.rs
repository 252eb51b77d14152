//! `outboxd gc`.

use outbox_testkit::TestDb;

use crate::support::{TestResult, outboxd, run, text};

#[tokio::test]
async fn gc_once_reports_what_it_deleted() -> TestResult {
    let db = TestDb::new().await?;
    let app = outbox_core::store::apps::ensure(&db.pool, "shop", "shop")
        .await?
        .id;
    sqlx::query(
        "INSERT INTO dead_letters (app_id, original_event_id, source, topic, payload, attempt_count, created_at)
         SELECT $1, gen_random_uuid(), 'queue', 't', '{}', 1, now() - make_interval(days => g) + interval '1 hour'
         FROM generate_series(1, 40) g",
    )
    .bind(app)
    .execute(&db.pool)
    .await?;
    let out = run(outboxd(Some(&db.url))
        .args(["gc", "--once"])
        .env("OUTBOXD_DEAD_LETTER_RETENTION_DAYS", "30"))?;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Rows of days 31..=40 are past 30 days; day 30's is an hour younger than the horizon.
    assert!(
        stdout.contains("deleted 10 dead letters (older than 30 days, or an app's own retention)"),
        "{stdout}"
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(left, 30);
    // 0 keeps every dead letter (of the apps without a retention of their own).
    let kept = run(outboxd(Some(&db.url))
        .args(["gc", "--once"])
        .env("OUTBOXD_DEAD_LETTER_RETENTION_DAYS", "0"))?;
    assert!(kept.status.success(), "{}", text(&kept.stderr));
    assert!(
        text(&kept.stdout).contains("deleted 0 dead letters"),
        "{}",
        text(&kept.stdout)
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(left, 30);
    outbox_core::store::retention::set_app_retention(&db.pool, "shop", Some(25)).await?;
    let own = run(outboxd(Some(&db.url))
        .args(["gc", "--once"])
        .env("OUTBOXD_DEAD_LETTER_RETENTION_DAYS", "0"))?;
    assert!(
        text(&own.stdout).contains("deleted 5 dead letters"),
        "an app's own retention still holds: {}",
        text(&own.stdout)
    );
    // "off" leaves sweeps to an external scheduler: `gc --once` sweeps, a
    // `gc` on the schedule says there is none.
    let off = run(outboxd(Some(&db.url))
        .args(["gc", "--once"])
        .env("OUTBOXD_GC__SCHEDULE", "off"))?;
    assert!(off.status.success(), "{}", text(&off.stderr));
    let scheduled = run(outboxd(Some(&db.url))
        .arg("gc")
        .env("OUTBOXD_GC__SCHEDULE", "off"))?;
    assert!(!scheduled.status.success());
    assert!(
        text(&scheduled.stderr).contains("gc --once"),
        "{}",
        text(&scheduled.stderr)
    );
    let bad = run(outboxd(Some(&db.url))
        .args(["gc", "--once"])
        .env("OUTBOXD_GC__SCHEDULE", "never"))?;
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad.stderr).contains("gc.schedule"));
    Ok(())
}
