//! A running dispatcher while the outbox's segments rotate as fast as they
//! can: rows move to `outbox` mid-claim, mid-handler and mid-order, and
//! every row still runs exactly once, each ordering key in order.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::store::segments::{self, Rotation, RotationPolicy};
use outbox_core::{NewEvent, enqueue_batch};
use outbox_dispatch::maintenance::Rotator;
use outbox_dispatch::{Dispatcher, Event, HandlerError, Registry};
use outbox_testkit::{TestDb, wait_until};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{Calls, TestResult, config, spawn_run};

#[tokio::test]
async fn rows_run_once_each_and_keys_in_order_while_segments_rotate_under_the_dispatcher()
-> TestResult {
    let db = TestDb::with_pool_size(12).await?;
    let app = db.app("shop").await?;
    let calls = Calls::default();
    let order: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let mut registry = Registry::new();
    registry.register("t", {
        let (calls, order) = (calls.clone(), order.clone());
        move |e: Event| {
            let (calls, order) = (calls.clone(), order.clone());
            async move {
                calls.record(e.id);
                let n = e.payload["n"].as_i64().unwrap_or_default();
                if let Some(key) = e.ordering_key.clone() {
                    order.lock().expect("order lock").push((key, n));
                }
                // Some handlers outlive a rotation: their rows move while leased.
                tokio::time::sleep(Duration::from_millis((n % 7) as u64 * 5)).await;
                Ok::<(), HandlerError>(())
            }
        }
    });
    let dispatcher = Dispatcher::new(db.pool.clone(), registry, config())?;
    let stop = CancellationToken::new();
    let run = spawn_run(dispatcher, &stop);
    let rotations = tokio::spawn({
        let (pool, stop) = (db.pool.clone(), stop.clone());
        async move {
            let policy = RotationPolicy {
                period: Duration::ZERO,
                lock_timeout: Duration::from_millis(50),
                move_batch: 10,
            };
            let mut rotated = 0;
            while !stop.is_cancelled() {
                if let Rotation::Rotated { .. } = segments::rotate(&pool, policy).await? {
                    rotated += 1;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, outbox_core::Error>(rotated)
        }
    });

    let mut ids = Vec::new();
    for batch in 0..60i64 {
        let events: Vec<NewEvent> = (0..30)
            .map(|i| {
                let n = batch * 30 + i;
                let event = NewEvent::new("t", json!({ "n": n }));
                if i % 3 == 0 {
                    event.with_ordering_key(format!("k{}", i % 4))
                } else {
                    event
                }
            })
            .collect();
        let mut tx = db.pool.begin().await?;
        ids.extend(enqueue_batch(&mut tx, app, &events).await?);
        tx.commit().await?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drained = wait_until(Duration::from_secs(60), || async {
        outbox_core::store::outbox::count(&db.pool).await.ok() == Some(0)
    })
    .await;
    stop.cancel();
    run.await??;
    let rotated = rotations.await??;
    assert!(drained, "not every row was handled");
    assert!(rotated >= 5, "only {rotated} rotations");
    assert_eq!(calls.distinct(), ids.len());
    assert_eq!(calls.total() as usize, ids.len(), "a row ran twice");
    let order = order.lock().expect("order lock").clone();
    for key in ["k0", "k1", "k2", "k3"] {
        let seen: Vec<i64> = order
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, n)| *n)
            .collect();
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        assert_eq!(seen, sorted, "key {key} ran out of order");
    }
    Ok(())
}

/// Autovacuum leaves the segments to the rotation (migration 0034); a
/// session that holds the segment to be emptied, without an old snapshot,
/// must not let the segments grow without bound: after three periods of
/// blocked tries, the rotator vacuums them itself.
#[tokio::test]
async fn a_rotation_blocked_for_three_periods_vacuums_the_segments() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let without_autovacuum: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_class
         WHERE relname IN ('outbox_s0', 'outbox_s1', 'outbox_s2')
           AND 'autovacuum_enabled=false' = ANY (reloptions)",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(without_autovacuum, 3, "autovacuum is on for a segment");

    let (current, _) = segments::current(&db.pool).await?;
    let next = segments::TABLES[(current + 1) % segments::TABLES.len()];
    let events: Vec<NewEvent> = (0..500)
        .map(|n| NewEvent::new("t", json!({ "n": n })))
        .collect();
    let mut tx = db.pool.begin().await?;
    enqueue_batch(&mut tx, app, &events).await?;
    tx.commit().await?;
    // Finished rows, as completions leave them, in whichever segment the
    // producer placed them (its reading of the current one is cached per
    // process).
    let mut conn = db.pool.acquire().await?;
    let finished = sqlx::query("DELETE FROM outbox")
        .execute(&mut *conn)
        .await?
        .rows_affected();
    assert_eq!(finished, 500);
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut *conn)
        .await?;
    drop(conn);
    let segment_stats = || {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, (i64, i64)>(
                "SELECT coalesce(sum(n_dead_tup), 0)::int8, coalesce(min(vacuum_count), 0)
                 FROM pg_stat_user_tables
                 WHERE relname IN ('outbox_s0', 'outbox_s1', 'outbox_s2')",
            )
            .fetch_one(&pool)
            .await
        }
    };
    let counted = wait_until(Duration::from_secs(10), || async {
        segment_stats().await.ok() == Some((500, 0))
    })
    .await;
    assert!(counted, "the finished rows are not counted as dead tuples");

    // A transaction that read the next segment and idles: its lock keeps
    // the rotation out; in READ COMMITTED it holds no snapshot between
    // statements, so a vacuum can remove the finished rows.
    let mut holder = db.pool.begin().await?;
    sqlx::query(&format!("SELECT count(*) FROM {next}"))
        .execute(&mut *holder)
        .await?;

    let policy = RotationPolicy {
        period: Duration::from_millis(100),
        ..RotationPolicy::default()
    };
    let rotator = Rotator::new(db.pool.clone(), policy);
    tokio::time::sleep(policy.period).await;
    assert!(matches!(
        rotator.run_once().await?,
        Rotation::Blocked { .. }
    ));
    assert_eq!(
        segment_stats().await?,
        (500, 0),
        "vacuumed before three periods"
    );
    let vacuumed = wait_until(Duration::from_secs(10), || async {
        let blocked = matches!(rotator.run_once().await, Ok(Rotation::Blocked { .. }));
        blocked && segment_stats().await.is_ok_and(|(_, vacuums)| vacuums >= 1)
    })
    .await;
    assert!(
        vacuumed,
        "the segments were not vacuumed while rotations were blocked"
    );
    assert_eq!(
        segment_stats().await?.0,
        0,
        "the vacuum left the finished rows"
    );

    holder.rollback().await?;
    let rotated = wait_until(Duration::from_secs(10), || async {
        matches!(rotator.run_once().await, Ok(Rotation::Rotated { .. }))
    })
    .await;
    assert!(
        rotated,
        "the rotation did not resume once the segment was free"
    );
    Ok(())
}
