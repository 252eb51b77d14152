use std::time::Duration;

use outbox_core::NewEvent;
use outbox_core::store::kv::{self, WriteContext};
use outbox_core::store::triggers::{self, TriggerSpec};
use outbox_dispatch::maintenance::Scheduler;
use outbox_dispatch::maintenance::scheduler::SchedulerConfig;
use outbox_testkit::TestDb;
use serde_json::json;
use uuid::Uuid;

use crate::{Calls, TestResult, config, enqueue_committed, payload, recording};

async fn kv_trigger(
    db: &TestDb,
    app: Uuid,
    name: &str,
    glob: &str,
    ops: &[&str],
) -> Result<Uuid, Box<dyn std::error::Error>> {
    let mut tx = db.pool.begin().await?;
    let spec = TriggerSpec::Kv {
        collection: glob.into(),
        ops: ops.iter().map(|s| s.to_string()).collect(),
    };
    let id = triggers::create(
        &mut tx,
        app,
        name,
        &format!("handle.{name}"),
        Some("user:test"),
        &spec,
    )
    .await?;
    tx.commit().await?;
    Ok(id)
}

#[tokio::test]
async fn kv_writes_fire_exactly_the_matching_triggers_atomically() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let other_app = db.app("other").await?;
    let all = kv_trigger(&db, app, "all", "*", &["put", "delete"]).await?;
    let prefix = kv_trigger(&db, app, "prefix", "orders:*", &["put"]).await?;
    let exact = kv_trigger(&db, app, "exact", "orders:eu", &["delete"]).await?;
    let _elsewhere = kv_trigger(&db, app, "elsewhere", "users", &["put", "delete"]).await?;
    let disabled = kv_trigger(&db, app, "disabled", "*", &["put"]).await?;
    triggers::set_enabled(&mut *db.pool.acquire().await?, app, disabled, false).await?;
    let _foreign = kv_trigger(&db, other_app, "foreign", "*", &["put"]).await?;

    // A write that rolls back fires nothing.
    let mut tx = db.pool.begin().await?;
    let written = kv::put(
        &mut tx,
        app,
        "orders:eu",
        "o1",
        &json!({"total": 5}),
        None,
        &WriteContext::default(),
    )
    .await?;
    assert_eq!(written.fired.len(), 2);
    tx.rollback().await?;
    assert_eq!(outbox_core::store::outbox::count(&db.pool).await?, 0);
    let mut conn = db.pool.acquire().await?;
    assert!(kv::get(&mut *conn, app, "orders:eu", "o1").await?.is_none());

    // The glob table: which triggers fire for which write.
    let cases: &[(&str, &str, &[Uuid])] = &[
        ("orders:eu", "put", &[all, prefix]),
        ("orders:eu", "delete", &[all, exact]),
        ("orders:us", "put", &[all, prefix]),
        ("ordersx", "put", &[all]),
        ("orders", "put", &[all]),
    ];
    for (collection, op, expected) in cases {
        let mut tx = db.pool.begin().await?;
        let written = if *op == "put" {
            kv::put(
                &mut tx,
                app,
                collection,
                "k",
                &json!({"v": 1}),
                None,
                &WriteContext::default(),
            )
            .await?
        } else {
            kv::delete(
                &mut tx,
                app,
                collection,
                "k",
                None,
                &WriteContext::default(),
            )
            .await?
            .ok_or("nothing deleted")?
        };
        tx.commit().await?;
        let fired: Vec<Uuid> = sqlx::query_scalar(
            "SELECT trigger_id FROM outbox WHERE id = ANY($1) ORDER BY trigger_id",
        )
        .bind(&written.fired)
        .fetch_all(&db.pool)
        .await?;
        let mut want = expected.to_vec();
        want.sort();
        assert_eq!(fired, want, "{op} {collection}");
        let (source, op_col, topic, depth): (String, String, String, i32) =
            sqlx::query_as("SELECT source, op, topic, depth FROM outbox WHERE id = $1")
                .bind(written.fired[0])
                .fetch_one(&db.pool)
                .await?;
        assert_eq!((source.as_str(), op_col.as_str(), depth), ("kv", *op, 0));
        assert!(topic.starts_with("handle."));
    }
    Ok(())
}

#[tokio::test]
async fn kv_versions_are_optimistic() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let ctx = WriteContext::default();
    let mut conn = db.pool.acquire().await?;
    assert_eq!(
        kv::put(&mut conn, app, "c", "k", &json!(1), Some(0), &ctx)
            .await?
            .version,
        1
    );
    let err = kv::put(&mut conn, app, "c", "k", &json!(2), Some(0), &ctx)
        .await
        .unwrap_err();
    assert!(matches!(err, outbox_core::Error::Conflict(_)), "{err}");
    assert_eq!(
        kv::put(&mut conn, app, "c", "k", &json!(2), Some(1), &ctx)
            .await?
            .version,
        2
    );
    let err = kv::put(&mut conn, app, "c", "k", &json!(3), Some(1), &ctx)
        .await
        .unwrap_err();
    assert!(matches!(err, outbox_core::Error::Conflict(_)));
    let err = kv::delete(&mut conn, app, "c", "k", Some(1), &ctx)
        .await
        .unwrap_err();
    assert!(matches!(err, outbox_core::Error::Conflict(_)));
    assert_eq!(
        kv::delete(&mut conn, app, "c", "k", Some(2), &ctx)
            .await?
            .map(|w| w.version),
        Some(2)
    );
    assert!(
        kv::delete(&mut conn, app, "c", "k", None, &ctx)
            .await?
            .is_none()
    );
    let err = kv::put(&mut conn, app, "bad*", "k", &json!(1), None, &ctx)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("collection"), "{err}");
    Ok(())
}

#[tokio::test]
async fn trigger_validation_names_the_problem() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut tx = db.pool.begin().await?;
    let cases = [
        (
            TriggerSpec::Kv {
                collection: "a*b".into(),
                ops: vec!["put".into()],
            },
            "collection",
        ),
        (
            TriggerSpec::Kv {
                collection: "a".into(),
                ops: vec!["upsert".into()],
            },
            "ops",
        ),
        (
            TriggerSpec::Cron {
                schedule: "every day".into(),
                timezone: "UTC".into(),
            },
            "schedule",
        ),
        (
            TriggerSpec::DeadLetter {
                sources: vec![],
                topics: vec!["x".repeat(256)],
                trigger_ids: vec![],
            },
            "topics",
        ),
    ];
    for (spec, field) in cases {
        let err = triggers::create(&mut tx, app, "t", "h", None, &spec)
            .await
            .unwrap_err();
        assert!(err.to_string().contains(field), "{err}");
    }
    let err = triggers::create(
        &mut tx,
        app,
        "t",
        "has space",
        None,
        &TriggerSpec::Cron {
            schedule: "* * * * *".into(),
            timezone: "UTC".into(),
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("target"), "{err}");
    let err = triggers::create(
        &mut tx,
        app,
        "hook",
        "webhook:ftp://x",
        None,
        &TriggerSpec::Cron {
            schedule: "* * * * *".into(),
            timezone: "UTC".into(),
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("webhook:http(s)"), "{err}");
    Ok(())
}

#[tokio::test]
async fn cron_ticks_fire_once_with_two_schedulers_and_missed_ticks_fire_once() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut tx = db.pool.begin().await?;
    let trigger = triggers::create(
        &mut tx,
        app,
        "every-second",
        "tick",
        None,
        &TriggerSpec::Cron {
            schedule: "* * * * * *".into(),
            timezone: "UTC".into(),
        },
    )
    .await?;
    tx.commit().await?;
    // Downtime: the trigger was due an hour ago.
    tick_due_since(&db.pool, trigger, "1 hour").await?;
    let a = Scheduler::new(db.pool.clone(), SchedulerConfig::default());
    let b = Scheduler::new(db.pool.clone(), SchedulerConfig::default());
    let started: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&db.pool)
        .await?;
    let (x, y) = tokio::join!(a.run_once(), b.run_once());
    assert!(x? + y? >= 1, "the missed ticks fired");
    // On a slow machine the second scheduler may run after the next tick is
    // due, and fire that one: only the ticks missed before count here.
    let missed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox
         WHERE trigger_id = $1 AND (payload->>'scheduled_at')::timestamptz < $2",
    )
    .bind(trigger)
    .bind(started)
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(missed, 1, "3600 missed ticks fire once");
    // Then every due tick fires exactly once, whichever scheduler gets it.
    for _ in 0..12 {
        let (x, y) = tokio::join!(a.run_once(), b.run_once());
        x?;
        y?;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let ticks: Vec<(String, i64)> = sqlx::query_as(
        "SELECT payload->>'scheduled_at', count(*) FROM outbox WHERE trigger_id = $1 GROUP BY 1",
    )
    .bind(trigger)
    .fetch_all(&db.pool)
    .await?;
    assert!(ticks.len() >= 3, "ticks fired: {ticks:?}");
    assert!(
        ticks.iter().all(|(_, n)| *n == 1),
        "a tick fired twice: {ticks:?}"
    );
    let source: String =
        sqlx::query_scalar("SELECT DISTINCT source FROM outbox WHERE trigger_id = $1")
            .bind(trigger)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(source, "cron");
    Ok(())
}

#[tokio::test]
async fn rows_past_the_depth_limit_are_dead_lettered_not_run() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let calls = Calls::default();
    let mut cfg = config();
    cfg.max_trigger_depth = 3;
    let dispatcher = recording(&db, "t", &calls, |_| Ok(()), cfg);
    let mut deep = NewEvent::new("t", payload(1));
    deep.depth = 4;
    let deep = enqueue_committed(&db.pool, app, deep).await?;
    let mut ok = NewEvent::new("t", payload(2));
    ok.depth = 3;
    let ok = enqueue_committed(&db.pool, app, ok).await?;
    dispatcher.run_until_idle().await?;
    assert_eq!((calls.of(deep), calls.of(ok)), (0, 1));
    let dead = outbox_core::store::dead_letters::by_original(&db.pool, deep).await?;
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("max_trigger_depth 3")),
        "{dead:?}"
    );
    Ok(())
}

async fn dead_letter_trigger_world(
    handler_succeeds: bool,
) -> Result<(TestDb, Uuid, outbox_dispatch::Dispatcher), Box<dyn std::error::Error>> {
    use outbox_dispatch::{Dispatcher, Event, HandlerError, Registry};
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut tx = db.pool.begin().await?;
    let spec = TriggerSpec::DeadLetter {
        sources: vec![],
        topics: vec!["payment.capture".into()],
        trigger_ids: vec![],
    };
    triggers::create(
        &mut tx,
        app,
        "on-payment-dead",
        "payment.compensate",
        Some("ops-cli"),
        &spec,
    )
    .await?;
    let spec = TriggerSpec::DeadLetter {
        sources: vec![],
        topics: vec!["other.topic".into()],
        trigger_ids: vec![],
    };
    triggers::create(&mut tx, app, "unrelated", "never.runs", None, &spec).await?;
    tx.commit().await?;
    let mut registry = Registry::new();
    registry.register("payment.capture", |_e: Event| async {
        Err::<(), _>(HandlerError::permanent("card declined"))
    });
    registry.register("payment.compensate", move |e: Event| async move {
        assert_eq!(e.source, "dead_letter");
        assert!(e.payload["dead_letter_id"].is_string());
        if handler_succeeds {
            Ok(())
        } else {
            Err(HandlerError::permanent("compensation failed too"))
        }
    });
    let dispatcher = Dispatcher::new(db.pool.clone(), registry, config())?;
    Ok((db, app, dispatcher))
}

#[tokio::test]
async fn a_dead_letter_trigger_that_succeeds_resolves_handled_by_script() -> TestResult {
    let (db, app, dispatcher) = dead_letter_trigger_world(true).await?;
    let id = enqueue_committed(&db.pool, app, NewEvent::new("payment.capture", payload(1))).await?;
    // Through the long-running loop (successes are deleted by the next claim statement).
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn({
        let stop = stop.clone();
        let dispatcher = dispatcher.clone();
        async move { dispatcher.run(async move { stop.cancelled().await }).await }
    });
    let resolved = outbox_testkit::wait_until(Duration::from_secs(10), || async {
        outbox_core::store::dead_letters::by_original(&db.pool, id)
            .await
            .ok()
            .and_then(|rows| rows.first().and_then(|r| r.resolution.clone()))
            == Some("handled_by_script".to_owned())
    })
    .await;
    stop.cancel();
    run.await??;
    assert!(
        resolved,
        "the dead letter was not resolved handled_by_script"
    );
    let (dead, pending): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM dead_letters), (SELECT count(*) FROM outbox)")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(
        (dead, pending),
        (1, 0),
        "one dead letter, no leftover rows (the unrelated trigger did not fire)"
    );
    Ok(())
}

#[tokio::test]
async fn a_dead_letter_trigger_that_fails_resolves_handler_failed_without_recursion() -> TestResult
{
    let (db, app, dispatcher) = dead_letter_trigger_world(false).await?;
    let id = enqueue_committed(&db.pool, app, NewEvent::new("payment.capture", payload(1))).await?;
    dispatcher.run_until_idle().await?;
    let rows = outbox_core::store::dead_letters::by_original(&db.pool, id).await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].resolution.as_deref(), Some("handler_failed"));
    assert!(
        rows[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("compensation failed too")),
        "{rows:?}"
    );
    let (dead, pending): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM dead_letters), (SELECT count(*) FROM outbox)")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(
        (dead, pending),
        (1, 0),
        "no second dead letter, no further trigger rows"
    );
    Ok(())
}

#[tokio::test]
async fn trigger_work_of_a_principal_that_lost_its_rights_is_dead_lettered() -> TestResult {
    use outbox_core::store::principals::{self, Role};
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let user = principals::create_user(&db.pool, "ops@x.io", "not-a-real-hash", false).await?;
    principals::set_role(&db.pool, app, user.id, Role::Admin).await?;
    let mut tx = db.pool.begin().await?;
    let spec = TriggerSpec::Kv {
        collection: "*".into(),
        ops: vec!["put".into()],
    };
    triggers::create(
        &mut tx,
        app,
        "audit",
        "audit",
        Some(&format!("user:{}", user.id)),
        &spec,
    )
    .await?;
    tx.commit().await?;
    let calls = Calls::default();
    let dispatcher = recording(
        &db,
        "audit",
        &calls,
        |e| {
            assert!(
                e.principal
                    .as_deref()
                    .is_some_and(|p| p.starts_with("user:")),
                "handlers see the principal"
            );
            Ok(())
        },
        config(),
    );
    let write = |n: i64| {
        let pool = db.pool.clone();
        async move {
            let mut tx = pool.begin().await?;
            let w = kv::put(
                &mut tx,
                app,
                "c",
                &format!("k{n}"),
                &json!(n),
                None,
                &WriteContext::default(),
            )
            .await?;
            tx.commit().await?;
            Ok::<Uuid, Box<dyn std::error::Error>>(w.fired[0])
        }
    };
    let allowed = write(1).await?;
    dispatcher.run_until_idle().await?;
    assert_eq!(calls.of(allowed), 1);
    // The registering user is demoted: the trigger's next work is refused.
    principals::set_role(&db.pool, app, user.id, Role::Viewer).await?;
    let refused = write(2).await?;
    dispatcher.run_until_idle().await?;
    assert_eq!(calls.of(refused), 0);
    let dead = outbox_core::store::dead_letters::by_original(&db.pool, refused).await?;
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("may no longer run")),
        "{dead:?}"
    );
    Ok(())
}

/// A target that no row may have is refused when the trigger is created.
/// One an earlier version let through skips its cron ticks, holding back no
/// other trigger, and a KV write it refuses names it.
#[tokio::test]
async fn a_trigger_target_a_row_may_not_have_is_refused_and_holds_back_no_other() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let cron = || TriggerSpec::Cron {
        schedule: "* * * * * *".into(),
        timezone: "UTC".into(),
    };
    let kv = || TriggerSpec::Kv {
        collection: "orders".into(),
        ops: vec!["put".into()],
    };
    let mut tx = db.pool.begin().await?;
    for (target, spec, says) in [
        ("orders.>", cron(), "is a pattern"),
        ("orders.*", kv(), "is a pattern"),
        ("a\u{7}b", kv(), "control characters"),
    ] {
        let err = triggers::create(&mut tx, app, "refused", target, None, &spec)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.starts_with("invalid target") && err.contains(says),
            "{target:?}: {err}"
        );
    }
    let legacy = triggers::create(&mut tx, app, "legacy", "orders.placed", None, &cron()).await?;
    let legacy_kv =
        triggers::create(&mut tx, app, "legacy-kv", "orders.saved", None, &kv()).await?;
    let good = triggers::create(&mut tx, app, "good", "tick", None, &cron()).await?;
    tx.commit().await?;
    // What an earlier version accepted.
    sqlx::query("UPDATE triggers SET target = 'orders.>' WHERE id = ANY($1)")
        .bind(vec![legacy, legacy_kv])
        .execute(&db.pool)
        .await?;
    sqlx::query("UPDATE cron_trigger_details SET next_fire_at = now() - interval '1 second'")
        .execute(&db.pool)
        .await?;

    let fired = Scheduler::new(db.pool.clone(), SchedulerConfig::default())
        .run_once()
        .await?;
    assert_eq!(fired, 1, "the good trigger fired");
    let rows: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT trigger_id, count(*) FROM outbox GROUP BY trigger_id")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(rows, [(good, 1)]);
    let moved_on: bool = sqlx::query_scalar(
        "SELECT next_fire_at > now() - interval '1 second' FROM cron_trigger_details WHERE trigger_id = $1",
    )
    .bind(legacy)
    .fetch_one(&db.pool)
    .await?;
    assert!(moved_on, "the skipped trigger waits for its next tick");

    let mut tx = db.pool.begin().await?;
    let err = kv::put(
        &mut tx,
        app,
        "orders",
        "o1",
        &json!({"total": 1}),
        None,
        &WriteContext::default(),
    )
    .await
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        err.contains(&legacy_kv.to_string()) && err.contains("is a pattern"),
        "{err}"
    );
    Ok(())
}

/// Moves `trigger`'s next tick to `ago` before now (an interval, e.g.
/// "9 hours"), as if it had passed.
async fn tick_due_since<'e>(
    db: impl sqlx::PgExecutor<'e>,
    trigger: Uuid,
    ago: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE cron_trigger_details SET next_fire_at = now() - $2::interval WHERE trigger_id = $1",
    )
    .bind(trigger)
    .bind(ago)
    .execute(db)
    .await?;
    Ok(())
}

/// A cron trigger enabled again fires at its next tick from now, not at the
/// tick it missed while disabled (a nightly job enabled at noon ran at noon).
#[tokio::test]
async fn a_cron_trigger_enabled_again_waits_for_its_next_tick() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut tx = db.pool.begin().await?;
    let trigger = triggers::create(
        &mut tx,
        app,
        "nightly",
        "report.build",
        None,
        &TriggerSpec::Cron {
            schedule: "0 3 * * *".into(),
            timezone: "UTC".into(),
        },
    )
    .await?;
    tx.commit().await?;
    let mut conn = db.pool.acquire().await?;
    triggers::set_enabled(&mut conn, app, trigger, false).await?;
    // Its tick passed while it was disabled.
    tick_due_since(&mut *conn, trigger, "9 hours").await?;
    triggers::set_enabled(&mut conn, app, trigger, true).await?;
    // Enabling it again, as a script may, keeps a tick that is due.
    tick_due_since(&mut *conn, trigger, "1 second").await?;
    triggers::set_enabled(&mut conn, app, trigger, true).await?;
    let kept: bool = sqlx::query_scalar(
        "SELECT next_fire_at < now() FROM cron_trigger_details WHERE trigger_id = $1",
    )
    .bind(trigger)
    .fetch_one(&mut *conn)
    .await?;
    assert!(kept, "enabling an enabled trigger moved its due tick");
    triggers::set_enabled(&mut conn, app, trigger, false).await?;
    tick_due_since(&mut *conn, trigger, "9 hours").await?;
    triggers::set_enabled(&mut conn, app, trigger, true).await?;
    let waits: bool = sqlx::query_scalar(
        "SELECT next_fire_at > now() AND next_fire_at <= now() + interval '1 day'
         FROM cron_trigger_details WHERE trigger_id = $1",
    )
    .bind(trigger)
    .fetch_one(&mut *conn)
    .await?;
    assert!(waits, "the missed tick is still due");
    let fired = Scheduler::new(db.pool.clone(), SchedulerConfig::default())
        .run_once()
        .await?;
    assert_eq!(fired, 0);
    Ok(())
}
