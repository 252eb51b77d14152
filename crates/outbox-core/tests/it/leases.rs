//! The ends of a lease against statements that change the same rows at the
//! same moment: a heartbeat's update must not make a completion, a retry or
//! a dead-lettering miss a row whose lease it still holds.

use std::time::Duration;

use outbox_core::model::Lease;
use outbox_core::store::outbox::{self as store, AttemptHistory, Reschedule, ToDeadLetter};
use outbox_testkit::TestDb;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Claims three rows, then for each end of a lease: holds a heartbeat-like
/// update of one row open, starts the end, lets the update commit, and
/// checks that the end changed the row (a retry or a dead-lettering on its
/// second call, as `outbox_dispatch` makes it).
#[tokio::test]
async fn an_end_of_lease_waits_for_a_concurrent_heartbeat_instead_of_missing_the_row() -> TestResult
{
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    crate::enqueue_committed(&db, app, 3).await?;
    let claimed = store::claim(&db.pool, "w", 3, Duration::from_secs(30)).await?;
    assert_eq!(claimed.len(), 3);
    let leases: Vec<Lease> = claimed.iter().map(|c| c.lease()).collect();

    for (n, lease) in leases.iter().enumerate() {
        let mut heartbeat = PgConnection::connect_with(&db.pool.connect_options()).await?;
        sqlx::query("BEGIN").execute(&mut heartbeat).await?;
        sqlx::query(
            "UPDATE outbox SET locked_until = locked_until + interval '1 second' WHERE id = $1",
        )
        .bind(lease.id)
        .execute(&mut heartbeat)
        .await?;
        let pool = db.pool.clone();
        let lease = *lease;
        let end = tokio::spawn(async move { end_lease(&pool, n, lease).await });
        let waiting = db.a_statement_waits_on_a_lock().await;
        assert!(waiting, "end {n} did not wait for the heartbeat");
        sqlx::query("COMMIT").execute(&mut heartbeat).await?;
        heartbeat.close().await?;
        let changed = end.await??;
        if n == 0 {
            // A completion deletes the row's newest version in the same
            // statement.
            assert_eq!(changed, vec![lease.id], "end {n} missed the row");
        } else {
            // A retry or a dead-lettering reports the row unchanged, and
            // changes it when called again (as the dispatcher does).
            let changed = if changed.is_empty() {
                end_lease(&db.pool, n, lease).await?
            } else {
                changed
            };
            assert_eq!(changed, vec![lease.id], "end {n} missed the row twice");
        }
    }
    let (left, dead): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox WHERE locked_by IS NOT NULL),
                (SELECT count(*) FROM dead_letters)",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!((left, dead), (0, 1));
    Ok(())
}

/// A completion that waits on a takeover of its row (a claim by another
/// worker once the lease ran out, which bumps the fencing token) checks the
/// token again on the row's newest version and leaves the row to its new
/// holder.
#[tokio::test]
async fn a_completion_waiting_on_a_takeover_leaves_the_row_to_its_new_holder() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    crate::enqueue_committed(&db, app, 1).await?;
    let claimed = store::claim(&db.pool, "w", 1, Duration::from_secs(30)).await?;
    let lease = claimed.first().ok_or("nothing claimed")?.lease();
    let mut takeover = PgConnection::connect_with(&db.pool.connect_options()).await?;
    sqlx::query("BEGIN").execute(&mut takeover).await?;
    sqlx::query("UPDATE outbox SET lease_token = lease_token + 1, locked_by = 'v' WHERE id = $1")
        .bind(lease.id)
        .execute(&mut takeover)
        .await?;
    let pool = db.pool.clone();
    let end = tokio::spawn(async move { store::complete(&pool, &[lease]).await });
    let waiting = db.a_statement_waits_on_a_lock().await;
    assert!(waiting, "the completion did not wait for the takeover");
    sqlx::query("COMMIT").execute(&mut takeover).await?;
    takeover.close().await?;
    assert!(
        end.await??.is_empty(),
        "a fenced completion deleted the row"
    );
    let holder: Option<String> = sqlx::query_scalar("SELECT locked_by FROM outbox WHERE id = $1")
        .bind(lease.id)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(holder.as_deref(), Some("v"));
    Ok(())
}

/// The `n`th end of a lease: a completion, a retry, then a dead-lettering.
async fn end_lease(pool: &PgPool, n: usize, lease: Lease) -> Result<Vec<Uuid>, outbox_core::Error> {
    match n {
        0 => store::complete(pool, &[lease]).await,
        1 => {
            let retry = Reschedule {
                lease,
                delay: Duration::from_secs(60),
                error: Some("boom".into()),
                refund_attempt: false,
            };
            store::reschedule(pool, &[retry], AttemptHistory::default()).await
        }
        _ => {
            let dead = ToDeadLetter {
                lease,
                error: "boom".into(),
                handler: None,
            };
            store::dead_letter(pool, &[dead], AttemptHistory::default()).await
        }
    }
}
