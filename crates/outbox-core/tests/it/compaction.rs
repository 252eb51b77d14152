//! Compaction of the bookkeeping tables: their dead versions, which a held
//! snapshot keeps from vacuum, go with a rewrite that keeps every live row;
//! a session holding a table makes the compaction wait, not the session;
//! and a producer whose snapshot predates a compaction still enqueues.

use std::time::{Duration, Instant};

use outbox_core::store::activity::{self, ActivityDelta};
use outbox_core::store::compaction::{self, Compaction, CompactionPolicy, TABLES};
use outbox_core::store::limits;
use outbox_core::store::outbox as store;
use outbox_core::store::processes::{self, ProcessInfo};
use outbox_core::store::stats;
use outbox_core::{NewEvent, enqueue};
use outbox_testkit::{TestDb, wait_until};
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const POLICY: CompactionPolicy = CompactionPolicy {
    min_dead: 500,
    lock_timeout: Duration::from_millis(50),
};

fn process(topic: &str) -> ProcessInfo {
    ProcessInfo {
        id: Uuid::now_v7(),
        worker: "w".into(),
        host: "h".into(),
        pid: 1,
        version: "0".into(),
        topics: vec![topic.into()],
        patterns: vec![],
        regexes: vec![],
    }
}

/// A session in the test's database that holds an old snapshot, as an
/// `idle in transaction` session does: vacuum can remove nothing.
async fn hold_snapshot(pool: &PgPool) -> Result<PgConnection, Box<dyn std::error::Error>> {
    let mut holder = PgConnection::connect_with(&pool.connect_options()).await?;
    stats::hold_transaction_id(&mut holder).await?;
    Ok(holder)
}

/// Sends `conn`'s table statistics to the server now, so that the next
/// look at `pg_stat_user_tables` counts its writes.
async fn flush_stats(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut *conn)
        .await?;
    sqlx::query("SELECT 1").execute(&mut *conn).await?;
    Ok(())
}

async fn pages(pool: &PgPool, table: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_relation_size($1::regclass) / current_setting('block_size')::int")
        .bind(table)
        .fetch_one(pool)
        .await
}

/// Every row of `table`, as text, in a stable order.
async fn rows(pool: &PgPool, table: &str) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(&format!("SELECT t::text FROM {table} t ORDER BY t::text"))
        .fetch_all(pool)
        .await
}

#[tokio::test]
async fn heartbeats_under_a_held_snapshot_are_compacted_away_and_the_rows_kept() -> TestResult {
    let db = TestDb::new().await?;
    db.app("shop").await?;
    let mut holder = hold_snapshot(&db.pool).await?;
    let here = process("t.a");
    let there = process("t.b");
    // One connection for the writes, so its statistics can be flushed.
    let mut writer = db.pool.acquire().await?;
    for _ in 0..600 {
        processes::beat(&mut *writer, &here, Duration::from_secs(30)).await?;
        processes::beat(&mut *writer, &there, Duration::from_secs(30)).await?;
    }
    flush_stats(&mut writer).await?;
    drop(writer);
    sqlx::query("VACUUM outbox_processes")
        .execute(&db.pool)
        .await?;
    let dead = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'outbox_processes'::regclass",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(15), || async { dead().await >= 1000 }).await,
        "the statistics never counted the heartbeats' dead versions: {}",
        dead().await
    );
    // Vacuum could not take them back: the heap still holds them.
    let before = pages(&db.pool, "outbox_processes").await?;
    assert!(before > 5, "{before} pages before compaction");
    let live = rows(&db.pool, "outbox_processes").await?;
    assert_eq!(live.len(), 2);

    let done = compaction::compact(&db.pool, POLICY).await?;
    assert!(
        done.iter().any(|c| matches!(
            c,
            Ok(Compaction::Compacted {
                table: "outbox_processes",
                kept: 2
            })
        )),
        "{done:?}"
    );
    assert_eq!(pages(&db.pool, "outbox_processes").await?, 1);
    assert_eq!(rows(&db.pool, "outbox_processes").await?, live);
    // The heartbeats go on against the new table, snapshot still held.
    let beat = processes::beat(&db.pool, &here, Duration::from_secs(30)).await?;
    assert_eq!(beat.others.len(), 1, "{:?}", beat.others);
    assert_eq!(rows(&db.pool, "outbox_processes").await?.len(), 2);
    sqlx::query("ROLLBACK").execute(&mut holder).await?;
    Ok(())
}

async fn filenode(pool: &PgPool, table: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_relation_filenode($1::regclass)::bigint")
        .bind(table)
        .fetch_one(pool)
        .await
}

#[tokio::test]
async fn dead_versions_vacuum_can_remove_are_vacuumed_not_compacted() -> TestResult {
    let db = TestDb::new().await?;
    db.app("shop").await?;
    // Dead versions no page pruning or autovacuum takes first: rows of
    // processes that came and went.
    sqlx::query("ALTER TABLE outbox_processes SET (autovacuum_enabled = false)")
        .execute(&db.pool)
        .await?;
    let mut writer = db.pool.acquire().await?;
    sqlx::query(
        "INSERT INTO outbox_processes (id, worker, host, pid, version, expires_at)
         SELECT gen_random_uuid(), 'w', 'h', 1, '0', now() FROM generate_series(1, 600)",
    )
    .execute(&mut *writer)
    .await?;
    sqlx::query("DELETE FROM outbox_processes")
        .execute(&mut *writer)
        .await?;
    flush_stats(&mut writer).await?;
    drop(writer);
    assert!(
        wait_until(Duration::from_secs(15), || async {
            compaction::bloated(&db.pool, POLICY.min_dead, Some("outbox_processes"))
                .await
                .is_ok_and(|b| !b.is_empty())
        })
        .await,
        "the statistics never counted the heartbeats' dead versions"
    );
    let before = filenode(&db.pool, "outbox_processes").await?;
    // A table the caller is not trying yet (its last compaction was turned
    // away) is left for a later pass.
    let skipped =
        compaction::compact_where(&db.pool, POLICY, |table| table != "outbox_processes").await?;
    assert!(
        !skipped.iter().any(|c| matches!(
            c,
            Ok(Compaction::Vacuumed {
                table: "outbox_processes"
            })
        )),
        "{skipped:?}"
    );
    let done = compaction::compact(&db.pool, POLICY).await?;
    assert!(
        done.iter().any(|c| matches!(
            c,
            Ok(Compaction::Vacuumed {
                table: "outbox_processes"
            })
        )),
        "{done:?}"
    );
    assert_eq!(filenode(&db.pool, "outbox_processes").await?, before);
    Ok(())
}

#[tokio::test]
async fn a_table_below_the_threshold_is_left_as_it_is() -> TestResult {
    let db = TestDb::new().await?;
    db.app("shop").await?;
    processes::beat(&db.pool, &process("t"), Duration::from_secs(30)).await?;
    let before = filenode(&db.pool, "outbox_processes").await?;
    assert!(compaction::compact(&db.pool, POLICY).await?.is_empty());
    assert_eq!(filenode(&db.pool, "outbox_processes").await?, before);
    Ok(())
}

#[tokio::test]
async fn every_bookkeeping_table_survives_a_compaction_with_its_rows() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    // A row in each table, with arrays, numbers and nulls to carry over.
    processes::beat(&db.pool, &process("t"), Duration::from_secs(30)).await?;
    crate::enqueue_committed(&db, app, 3).await?;
    store::record_state_counts(&db.pool).await?;
    activity::record(
        &db.pool,
        &[ActivityDelta {
            app_id: app,
            topic: "t".into(),
            completed: 7,
            failed: 2,
            dead_lettered: 1,
        }],
    )
    .await?;
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM outbox")
        .fetch_all(&db.pool)
        .await?;
    let mut keeper = db.pool.acquire().await?;
    store::open_tx_batch(&mut keeper, 42, "w", &ids).await?;
    let limit = limits::Limits {
        max_running: Some(5),
        rate_per_sec: Some(2.5),
        ..limits::Limits::default()
    };
    limits::set(&db.pool, app, "t", &limit, None).await?;
    crate::enqueue_committed(&db, app, 1).await?;
    let topic = limits::LimitedTopic {
        app_id: app,
        topic: "t".into(),
    };
    let served = outbox_core::topics::Served::everything();
    let limited = store::claim_limited(
        &mut keeper,
        &topic,
        &served,
        None,
        "w",
        1,
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(limited.rows.len(), 1);
    for table in TABLES {
        let live = rows(&db.pool, table).await?;
        assert!(!live.is_empty(), "{table} has no row to carry over");
        let done = compaction::compact_table(&db.pool, table, POLICY.lock_timeout).await?;
        assert_eq!(
            done,
            Compaction::Compacted {
                table,
                kept: live.len() as u64
            }
        );
        assert_eq!(rows(&db.pool, table).await?, live, "{table}");
    }
    Ok(())
}

#[tokio::test]
async fn only_the_bookkeeping_tables_are_compacted() -> TestResult {
    let db = TestDb::new().await?;
    for table in ["outbox_topic_limits", "outbox", "apps; DROP TABLE apps"] {
        let refused = compaction::compact_table(&db.pool, table, POLICY.lock_timeout).await;
        assert!(
            matches!(refused, Err(outbox_core::Error::Invalid { .. })),
            "{table}: {refused:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_session_holding_the_table_makes_the_compaction_wait_not_itself() -> TestResult {
    let db = TestDb::new().await?;
    db.app("shop").await?;
    processes::beat(&db.pool, &process("t"), Duration::from_secs(30)).await?;
    let mut reader = PgConnection::connect_with(&db.pool.connect_options()).await?;
    sqlx::query("BEGIN").execute(&mut reader).await?;
    sqlx::query("SELECT count(*) FROM outbox_processes")
        .execute(&mut reader)
        .await?;
    let started = Instant::now();
    let done = compaction::compact_table(&db.pool, "outbox_processes", POLICY.lock_timeout).await?;
    assert_eq!(
        done,
        Compaction::Blocked {
            table: "outbox_processes"
        }
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(rows(&db.pool, "outbox_processes").await?.len(), 1);
    sqlx::query("COMMIT").execute(&mut reader).await?;
    Ok(())
}

#[tokio::test]
async fn a_producer_whose_snapshot_predates_a_compaction_still_enqueues() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut producer = PgConnection::connect_with(&db.pool.connect_options()).await?;
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut producer)
        .await?;
    sqlx::query("SELECT count(*) FROM apps")
        .execute(&mut producer)
        .await?;
    let done = compaction::compact_table(&db.pool, "outbox_segments", POLICY.lock_timeout).await?;
    assert!(matches!(done, Compaction::Compacted { kept: 1, .. }));
    // The snapshot sees `outbox_segments` empty now; both ways of enqueueing
    // place the row somewhere, and it commits. (The library may answer from
    // its process-wide cache of the current segment instead of reading.)
    let from_sql: Uuid = sqlx::query_scalar("SELECT outbox_enqueue('shop', 't', '{}')")
        .fetch_one(&mut producer)
        .await?;
    let from_rust = enqueue(&mut producer, app, &NewEvent::new("t", json!({}))).await?;
    sqlx::query("COMMIT").execute(&mut producer).await?;
    let found: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE id = ANY ($1)")
        .bind(vec![from_sql, from_rust])
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(found, 2);
    Ok(())
}

/// The limits' states wait for eight times the threshold: each rewrite
/// leaves catalog rows behind, and they are written on every limited claim.
#[tokio::test]
async fn the_limits_states_wait_for_eight_times_the_threshold() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let limit = limits::Limits {
        max_running: Some(5),
        ..limits::Limits::default()
    };
    limits::set(&db.pool, app, "t", &limit, None).await?;
    let mut holder = hold_snapshot(&db.pool).await?;
    let mut writer = db.pool.acquire().await?;
    write_state(&mut writer, 1_000).await?;
    flush_stats(&mut writer).await?;
    let dead = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'outbox_topic_limit_states'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap_or_default()
    };
    assert!(
        wait_until(Duration::from_secs(15), || async { dead().await >= 1_000 }).await,
        "the statistics never counted the states' dead versions: {}",
        dead().await
    );
    let done = compaction::compact(&db.pool, POLICY).await?;
    assert!(done.is_empty(), "compacted at 1,000 of 4,000: {done:?}");

    write_state(&mut writer, 3_200).await?;
    flush_stats(&mut writer).await?;
    assert!(
        wait_until(Duration::from_secs(15), || async { dead().await >= 4_000 }).await,
        "{}",
        dead().await
    );
    let done = compaction::compact(&db.pool, POLICY).await?;
    assert!(
        done.iter().any(|c| matches!(
            c,
            Ok(Compaction::Compacted {
                table: "outbox_topic_limit_states",
                kept: 1
            })
        )),
        "{done:?}"
    );
    sqlx::query("ROLLBACK").execute(&mut holder).await?;
    Ok(())
}

/// Writes the limits' states `times` times in one transaction: as many dead
/// versions under a held snapshot.
async fn write_state(conn: &mut PgConnection, times: u32) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "DO $$ BEGIN
            FOR i IN 1..{times} LOOP
                UPDATE outbox_topic_limit_states SET tokens = tokens + 1;
            END LOOP;
         END $$"
    ))
    .execute(&mut *conn)
    .await?;
    Ok(())
}
