//! Segments (migration 0032): where rows are placed, and rotations that move
//! the rows left in a segment, truncate it while a snapshot is held, and
//! wait for a session that holds it without holding up claims.

use std::time::{Duration, Instant};

use outbox_core::model::Lease;
use outbox_core::store::outbox as store;
use outbox_core::store::segments::{self, Rotation, RotationPolicy};
use outbox_core::{NewEvent, enqueue, enqueue_batch};
use outbox_testkit::TestDb;
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A rotation as soon as it is asked for.
const AT_ONCE: RotationPolicy = RotationPolicy {
    period: Duration::ZERO,
    lock_timeout: Duration::from_millis(50),
    move_batch: 2,
};

/// The table each row of `ids` lives in.
async fn tables(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<String>, sqlx::Error> {
    let mut found = Vec::new();
    for id in ids {
        found.push(
            sqlx::query_scalar("SELECT tableoid::regclass::text FROM outbox WHERE id = $1")
                .bind(id)
                .fetch_one(pool)
                .await?,
        );
    }
    Ok(found)
}

async fn rows_in(pool: &PgPool, table: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(&format!("SELECT count(*) FROM ONLY {table}"))
        .fetch_one(pool)
        .await
}

#[tokio::test]
async fn rows_without_a_key_that_are_due_soon_go_to_a_segment_and_the_others_to_outbox()
-> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut tx = db.pool.begin().await?;
    let plain = enqueue(&mut tx, app, &NewEvent::new("t", json!({}))).await?;
    let with_headers = enqueue(
        &mut tx,
        app,
        &NewEvent::new("t", json!({})).with_ordering_key("k"),
    )
    .await?;
    let keyed = enqueue(
        &mut tx,
        app,
        &NewEvent::new("t", json!({})).with_idempotency_key("once"),
    )
    .await?;
    let far = enqueue(
        &mut tx,
        app,
        &NewEvent::new("t", json!({}))
            .with_run_at(chrono::Utc::now() + chrono::TimeDelta::hours(1)),
    )
    .await?;
    let small_batch = enqueue_batch(&mut tx, app, &vec![NewEvent::new("t", json!({})); 3]).await?;
    let copied = enqueue_batch(&mut tx, app, &vec![NewEvent::new("t", json!({})); 100]).await?;
    let mixed = enqueue_batch(
        &mut tx,
        app,
        &[
            NewEvent::new("t", json!({})).with_idempotency_key("twice"),
            NewEvent::new("t", json!({})),
        ],
    )
    .await?;
    let by_sql: Uuid = sqlx::query_scalar("SELECT outbox_enqueue('shop', 't')")
        .fetch_one(&mut *tx)
        .await?;
    let by_sql_keyed: Uuid =
        sqlx::query_scalar("SELECT outbox_enqueue('shop', 't', p_idempotency_key => 'k')")
            .fetch_one(&mut *tx)
            .await?;
    tx.commit().await?;

    let segment = |t: &String| segments::TABLES.contains(&t.as_str());
    let in_segments = tables(
        &db.pool,
        &[&[plain, with_headers, small_batch[0], copied[99]][..]].concat(),
    )
    .await?;
    assert!(in_segments.iter().all(segment), "{in_segments:?}");
    assert_eq!(
        tables(&db.pool, &[keyed, far, mixed[0], mixed[1], by_sql_keyed]).await?,
        vec!["outbox"; 5],
        "a key, a far run_at, or a batch with a key stays in outbox"
    );
    // The SQL function reads the current segment in each call.
    assert_eq!(tables(&db.pool, &[by_sql]).await?, vec!["outbox_s0"]);
    // Every row is one of the outbox's, whichever table holds it.
    let all: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(all, 1 + 1 + 1 + 1 + 3 + 100 + 2 + 1 + 1);
    Ok(())
}

/// Three rotations bring the first segment round again: its leased row and
/// its waiting row move to `outbox` with their leases and tokens, finished
/// rows go with the truncate, and the moved rows end as they would have.
#[tokio::test]
async fn a_rotation_moves_the_rows_left_and_truncates_the_segment_while_a_snapshot_is_held()
-> TestResult {
    let db = TestDb::new().await?;
    db.app("shop").await?;
    let mut ids = Vec::new();
    for n in 0..10 {
        let id: Uuid = sqlx::query_scalar(
            "SELECT outbox_enqueue('shop', 't', jsonb_build_object('n', $1::int))",
        )
        .bind(n)
        .fetch_one(&db.pool)
        .await?;
        ids.push(id);
    }
    assert_eq!(rows_in(&db.pool, "outbox_s0").await?, 10);

    // An old snapshot, held for the whole test by a session that never reads
    // the outbox (as an idle transaction does): vacuum can remove nothing.
    let mut holder = PgConnection::connect_with(&db.pool.connect_options()).await?;
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut holder)
        .await?;
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut holder)
        .await?;

    let claimed = store::claim(&db.pool, "w", 9, Duration::from_secs(60)).await?;
    assert_eq!(claimed.len(), 9);
    let (running, finished) = claimed.split_at(1);
    let finished: Vec<Lease> = finished.iter().map(|c| c.lease()).collect();
    assert_eq!(store::complete(&db.pool, &finished).await?.len(), 8);
    let waiting: Vec<Uuid> = ids
        .iter()
        .copied()
        .filter(|id| !claimed.iter().any(|c| c.id == *id))
        .collect();
    let size_before: i64 = sqlx::query_scalar("SELECT pg_relation_size('outbox_s0')")
        .fetch_one(&db.pool)
        .await?;
    assert!(size_before > 0);

    let pool = db.pool.clone();
    let rotate = || segments::rotate(&pool, AT_ONCE);
    assert_eq!(
        rotate().await?,
        Rotation::Rotated {
            segment: 1,
            moved: 0
        }
    );
    assert_eq!(
        rotate().await?,
        Rotation::Rotated {
            segment: 2,
            moved: 0
        }
    );
    assert_eq!(
        rotate().await?,
        Rotation::Rotated {
            segment: 0,
            moved: 2
        }
    );
    assert_eq!(segments::current(&db.pool).await?, (0, 3));

    let size_after: i64 = sqlx::query_scalar("SELECT pg_relation_size('outbox_s0')")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(size_after, 0, "the truncate gave the segment's space back");
    assert_eq!(
        tables(&db.pool, &[running[0].id, waiting[0]]).await?,
        vec!["outbox", "outbox"]
    );
    // The running row kept its lease: another claim does not take it, its
    // worker's completion (by id and token) still finds it.
    let again = store::claim(&db.pool, "other", 10, Duration::from_secs(60)).await?;
    assert_eq!(
        again.iter().map(|c| c.id).collect::<Vec<_>>(),
        waiting,
        "only the waiting row is claimable"
    );
    assert_eq!(
        store::complete(&db.pool, &[running[0].lease(), again[0].lease()])
            .await?
            .len(),
        2
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(left, 0);
    sqlx::query("COMMIT").execute(&mut holder).await?;
    holder.close().await?;
    Ok(())
}

/// A reader's open transaction holds the segment due for truncation: the
/// rotation gives up after its lock timeout, claims and producers go on
/// meanwhile, and the rotation succeeds once the reader is gone.
#[tokio::test]
async fn a_rotation_waits_for_a_session_holding_the_segment_without_holding_up_claims() -> TestResult
{
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    crate::enqueue_committed(&db, app, 5).await?;
    let mut reader = PgConnection::connect_with(&db.pool.connect_options()).await?;
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut reader)
        .await?;
    sqlx::query("SELECT count(*) FROM outbox_s1")
        .execute(&mut reader)
        .await?;

    let started = Instant::now();
    assert_eq!(
        segments::rotate(&db.pool, AT_ONCE).await?,
        Rotation::Blocked { moved: 0 }
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(segments::current(&db.pool).await?, (0, 0));
    crate::enqueue_committed(&db, app, 1).await?;
    let claimed = store::claim(&db.pool, "w", 10, Duration::from_secs(60)).await?;
    assert_eq!(claimed.len(), 6);

    sqlx::query("COMMIT").execute(&mut reader).await?;
    reader.close().await?;
    assert_eq!(
        segments::rotate(&db.pool, AT_ONCE).await?,
        Rotation::Rotated {
            segment: 1,
            moved: 0
        }
    );
    Ok(())
}

/// A producer whose transaction inserted into the segment due for
/// truncation and commits while the rotation waits for its lock: the
/// rotation found what was left before it waited, without that row, and
/// still moves it (by its transaction id) instead of truncating it away.
#[tokio::test]
async fn a_row_that_commits_while_the_rotation_waits_for_its_lock_is_moved() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut producer = PgConnection::connect_with(&db.pool.connect_options()).await?;
    sqlx::query("BEGIN").execute(&mut producer).await?;
    // As a producer that read the current segment just before a switch.
    let late: Uuid = sqlx::query_scalar(
        "INSERT INTO outbox_s1 (id, app_id, topic, payload)
         VALUES (gen_random_uuid(), $1, 't', '{}') RETURNING id",
    )
    .bind(app)
    .fetch_one(&mut producer)
    .await?;

    let patient = RotationPolicy {
        lock_timeout: Duration::from_secs(30),
        ..AT_ONCE
    };
    let rotation = tokio::spawn({
        let pool = db.pool.clone();
        async move { segments::rotate(&pool, patient).await }
    });
    // The rotation waits for the producer's lock on the segment.
    let waiting = outbox_testkit::wait_until(Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_locks
                            WHERE relation = 'outbox_s1'::regclass
                              AND mode = 'AccessExclusiveLock' AND NOT granted)",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap_or(false)
    })
    .await;
    assert!(waiting, "the rotation did not wait for the segment's lock");
    sqlx::query("COMMIT").execute(&mut producer).await?;
    producer.close().await?;

    assert_eq!(
        rotation.await??,
        Rotation::Rotated {
            segment: 1,
            moved: 1
        }
    );
    assert_eq!(tables(&db.pool, &[late]).await?, vec!["outbox"]);
    Ok(())
}

#[tokio::test]
async fn a_rotation_that_cannot_switch_at_once_gives_up_and_keeps_the_segments_rows() -> TestResult
{
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    // Rows in the segment the rotation empties next, one of them leased, so
    // the locked step has something to move.
    crate::enqueue_committed(&db, app, 3).await?;
    sqlx::query(
        "WITH gone AS (DELETE FROM outbox RETURNING *) INSERT INTO outbox_s1 SELECT * FROM gone",
    )
    .execute(&db.pool)
    .await?;
    let leased = store::claim(&db.pool, "w", 1, Duration::from_secs(60)).await?;
    assert_eq!(leased.len(), 1);
    // A compaction (or any session) holding `outbox_segments` for longer
    // than the rotation's lock timeout.
    let mut holder = PgConnection::connect_with(&db.pool.connect_options()).await?;
    sqlx::query("BEGIN").execute(&mut holder).await?;
    sqlx::query("LOCK TABLE outbox_segments IN SHARE MODE")
        .execute(&mut holder)
        .await?;

    assert_eq!(
        segments::rotate(&db.pool, AT_ONCE).await?,
        Rotation::Blocked { moved: 2 }
    );
    sqlx::query("COMMIT").execute(&mut holder).await?;
    // Nothing truncated: the leased row is still where it was, the others
    // were moved to `outbox` before the lock, and none is gone.
    assert_eq!(segments::current(&db.pool).await?, (0, 0));
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(total, 3);
    assert_eq!(rows_in(&db.pool, "outbox_s1").await?, 1);
    assert_eq!(tables(&db.pool, &[leased[0].id]).await?, vec!["outbox_s1"]);
    assert!(matches!(
        segments::rotate(&db.pool, AT_ONCE).await?,
        Rotation::Rotated { segment: 1, .. }
    ));
    Ok(())
}

/// A database of the schema before segments, with rows waiting and one
/// leased, is migrated in place: the rows stay in `outbox`, the lease still
/// ends by its token, and new rows go to the first segment.
#[tokio::test]
async fn the_upgrade_to_segments_keeps_rows_in_flight() -> TestResult {
    let db = TestDb::migrated_to(31).await?;
    let app = db.app("shop").await?;
    for n in 0..3 {
        sqlx::query("INSERT INTO outbox (id, app_id, topic, payload) VALUES ($1, $2, 't', $3)")
            .bind(Uuid::now_v7())
            .bind(app)
            .bind(json!({ "n": n }))
            .execute(&db.pool)
            .await?;
    }
    let leased = store::claim(&db.pool, "old", 1, Duration::from_secs(60)).await?;
    assert_eq!(leased.len(), 1);

    // A dispatcher of the earlier version is still up: the migration is
    // refused, saying which, and changes nothing.
    crate::live_dispatcher(&db, "0.31").await?;
    let refused = outbox_core::migrate(&db.pool)
        .await
        .expect_err("a live dispatcher must stop the migration")
        .to_string();
    assert!(
        refused.contains("web-1") && refused.contains("stop all outboxd processes"),
        "{refused}"
    );
    let segments_exist: bool = sqlx::query_scalar("SELECT to_regclass('outbox_s0') IS NOT NULL")
        .fetch_one(&db.pool)
        .await?;
    assert!(!segments_exist);
    sqlx::query("DELETE FROM outbox_processes")
        .execute(&db.pool)
        .await?;

    outbox_core::migrate(&db.pool).await?;
    let by_sql: Uuid = sqlx::query_scalar("SELECT outbox_enqueue('shop', 't')")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(tables(&db.pool, &[by_sql]).await?, vec!["outbox_s0"]);
    let claimed = store::claim(&db.pool, "new", 10, Duration::from_secs(60)).await?;
    assert_eq!(claimed.len(), 3, "the two waiting rows and the new one");
    let mut leases: Vec<Lease> = claimed.iter().map(|c| c.lease()).collect();
    leases.push(leased[0].lease());
    assert_eq!(store::complete(&db.pool, &leases).await?.len(), 4);
    Ok(())
}

/// The SQLSTATE of a failed statement.
fn sqlstate(result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>) -> Option<String> {
    match result {
        Err(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Segments check a statement's apps once (migration 0035) instead of
/// through a foreign key per row; the app's row is locked as the foreign
/// key locked it. A delete of the app that waited for a producer's
/// uncommitted batch sees its rows once it commits and is refused, and
/// one under REPEATABLE READ, whose snapshot would miss them, is refused
/// outright. With its rows gone the app can be deleted.
#[tokio::test]
async fn an_app_that_rows_of_a_segment_name_cannot_be_deleted_even_by_a_delete_that_waited()
-> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let events: Vec<NewEvent> = (0..100)
        .map(|n| NewEvent::new("bulk", json!({ "n": n })))
        .collect();
    let mut producer = db.pool.begin().await?;
    let ids = enqueue_batch(&mut producer, app, &events).await?;
    enqueue(&mut producer, app, &NewEvent::new("one", json!({}))).await?;
    let deleter = tokio::spawn({
        let pool = db.pool.clone();
        async move {
            sqlx::query("DELETE FROM apps WHERE id = $1")
                .bind(app)
                .execute(&pool)
                .await
        }
    });
    assert!(
        db.a_statement_waits_on_a_lock().await,
        "the delete never waited for the producer"
    );
    producer.commit().await?;
    assert_eq!(sqlstate(deleter.await?).as_deref(), Some("23503"));
    let placed = tables(&db.pool, &ids[..1]).await?;
    assert!(segments::TABLES.contains(&placed[0].as_str()), "{placed:?}");
    let renumbered = sqlx::query("UPDATE apps SET id = gen_random_uuid() WHERE id = $1")
        .bind(app)
        .execute(&db.pool)
        .await;
    assert_eq!(sqlstate(renumbered).as_deref(), Some("23503"));
    // A cascade reaches `outbox` through its foreign key, not the segments.
    let truncated = sqlx::query("TRUNCATE apps CASCADE").execute(&db.pool).await;
    assert_eq!(sqlstate(truncated).as_deref(), Some("23503"));
    // Naming outbox empties the segments too: that reset goes through.
    let mut reset = db.pool.begin().await?;
    sqlx::query("TRUNCATE outbox, apps CASCADE")
        .execute(&mut *reset)
        .await?;
    reset.rollback().await?;
    // Another column of the app changes as before.
    sqlx::query("UPDATE apps SET slug = 'shop-2' WHERE id = $1")
        .bind(app)
        .execute(&db.pool)
        .await?;

    let mut repeatable = db.pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *repeatable)
        .await?;
    let refused = sqlx::query("DELETE FROM apps WHERE id = $1")
        .bind(app)
        .execute(&mut *repeatable)
        .await;
    assert_eq!(sqlstate(refused).as_deref(), Some("0A000"));
    repeatable.rollback().await?;

    sqlx::query("DELETE FROM outbox").execute(&db.pool).await?;
    sqlx::query("DELETE FROM apps WHERE id = $1")
        .bind(app)
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// The other order: a producer whose batch waits for a delete of its app
/// (which found no rows) is refused as an unknown app once the delete
/// commits, and stores nothing.
#[tokio::test]
async fn a_batch_that_waited_for_the_delete_of_its_app_is_refused() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut deleter = db.pool.begin().await?;
    sqlx::query("DELETE FROM apps WHERE id = $1")
        .bind(app)
        .execute(&mut *deleter)
        .await?;
    let producer = tokio::spawn({
        let pool = db.pool.clone();
        async move {
            let events: Vec<NewEvent> = (0..100)
                .map(|n| NewEvent::new("bulk", json!({ "n": n })))
                .collect();
            let mut conn = pool.acquire().await?;
            enqueue_batch(&mut conn, app, &events).await
        }
    });
    assert!(
        db.a_statement_waits_on_a_lock().await,
        "the producer never waited for the delete"
    );
    deleter.commit().await?;
    let err = producer.await?.expect_err("the app is gone");
    assert!(matches!(err, outbox_core::Error::UnknownApp(_)), "{err}");
    assert_eq!(store::count(&db.pool).await?, 0);
    Ok(())
}

/// The segments' check reads outboxd's own `apps` whatever the producer's
/// search_path (migration 0036 names its schema in the function): neither
/// a table of the session's called `apps` nor its own `=` for uuids vouches
/// for an unknown app, and a producer whose search_path leaves outboxd's
/// schema out still inserts.
#[tokio::test]
async fn the_check_of_a_segment_reads_outboxds_apps_whatever_the_search_path() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let stranger = Uuid::now_v7();
    let mut tx = db.pool.begin().await?;
    sqlx::query("CREATE SCHEMA shadow")
        .execute(&mut *tx)
        .await?;
    sqlx::query("CREATE TABLE shadow.apps (id uuid PRIMARY KEY)")
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO shadow.apps VALUES ($1)")
        .bind(stranger)
        .execute(&mut *tx)
        .await?;
    let insert = |app: Uuid| {
        sqlx::query(
            "INSERT INTO public.outbox_s0 (id, app_id, source, topic, payload)
             VALUES (gen_random_uuid(), $1, 'queue', 'shadowed', '{}')",
        )
        .bind(app)
    };

    sqlx::query("SET LOCAL search_path = shadow, public")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SAVEPOINT shadowed").execute(&mut *tx).await?;
    let refused = insert(stranger).execute(&mut *tx).await;
    assert_eq!(sqlstate(refused).as_deref(), Some("23503"));
    sqlx::query("ROLLBACK TO SAVEPOINT shadowed")
        .execute(&mut *tx)
        .await?;

    for statement in [
        "CREATE FUNCTION shadow.always(uuid, uuid) RETURNS boolean LANGUAGE sql AS 'SELECT true'",
        "CREATE OPERATOR shadow.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = shadow.always)",
        "SET LOCAL search_path = shadow, pg_catalog, public",
        "SAVEPOINT equal",
    ] {
        sqlx::query(statement).execute(&mut *tx).await?;
    }
    let refused = insert(stranger).execute(&mut *tx).await;
    assert_eq!(sqlstate(refused).as_deref(), Some("23503"));
    sqlx::query("ROLLBACK TO SAVEPOINT equal")
        .execute(&mut *tx)
        .await?;

    sqlx::query("SET LOCAL search_path = shadow")
        .execute(&mut *tx)
        .await?;
    insert(app).execute(&mut *tx).await?;
    tx.commit().await?;
    assert_eq!(rows_in(&db.pool, "outbox_s0").await?, 1);
    Ok(())
}
