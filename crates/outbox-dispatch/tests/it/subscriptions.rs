//! Several processes with different handlers on one database: each claims
//! only the topics it serves, a relay-style fallback leaves the topics of
//! other live processes to them, and a topic nobody serves waits.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::NewEvent;
use outbox_core::store::{activity, processes};
use outbox_core::topics::TopicPattern;
use outbox_dispatch::{Dispatcher, DrainReport, Event, HandlerError, Registry};
use outbox_testkit::{TestDb, wait_until};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{TestResult, config};

/// The topics one process ran, in order.
#[derive(Clone, Default)]
struct Ran(Arc<Mutex<Vec<String>>>);

impl Ran {
    fn handler(
        &self,
    ) -> impl Fn(Event) -> futures::future::Ready<Result<(), HandlerError>> + Clone + use<> {
        let ran = self.clone();
        move |event: Event| {
            if let Ok(mut ran) = ran.0.lock() {
                ran.push(event.topic.clone());
            }
            futures::future::ready(Ok(()))
        }
    }

    fn topics(&self) -> Vec<String> {
        let mut topics = self.0.lock().map(|r| r.clone()).unwrap_or_default();
        topics.sort();
        topics.dedup();
        topics
    }

    fn count(&self) -> usize {
        self.0.lock().map(|r| r.len()).unwrap_or_default()
    }
}

/// Runs `registry` as a process of its own (its own pool) until the token is cancelled.
pub(crate) async fn start(
    db: &TestDb,
    registry: Registry,
) -> Result<
    (
        CancellationToken,
        JoinHandle<Result<DrainReport, outbox_dispatch::Error>>,
        uuid::Uuid,
    ),
    Box<dyn std::error::Error>,
> {
    start_with(db, registry, config()).await
}

/// As [`start`], with `config`.
pub(crate) async fn start_with(
    db: &TestDb,
    registry: Registry,
    config: outbox_dispatch::Config,
) -> Result<
    (
        CancellationToken,
        JoinHandle<Result<DrainReport, outbox_dispatch::Error>>,
        uuid::Uuid,
    ),
    Box<dyn std::error::Error>,
> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&db.url)
        .await?;
    let dispatcher = Dispatcher::new(pool, registry, config)?;
    let id = dispatcher.process_id();
    let stop = CancellationToken::new();
    let waiter = stop.clone();
    let run = tokio::spawn(async move { dispatcher.run(waiter.cancelled_owned()).await });
    let pool = db.pool.clone();
    let up = wait_until(Duration::from_secs(10), || {
        let pool = pool.clone();
        async move {
            processes::live(&pool)
                .await
                .is_ok_and(|live| live.iter().any(|p| p.id == id))
        }
    })
    .await;
    if !up {
        return Err("the process never recorded itself".into());
    }
    Ok((stop, run, id))
}

/// Waits until the outbox is empty.
pub(crate) async fn emptied(db: &TestDb) -> bool {
    let pool = db.pool.clone();
    wait_until(Duration::from_secs(20), || {
        let pool = pool.clone();
        async move {
            outbox_core::store::outbox::count(&pool)
                .await
                .is_ok_and(|n| n == 0)
        }
    })
    .await
}

pub(crate) async fn enqueue_each(
    db: &TestDb,
    app: uuid::Uuid,
    topics: &[&str],
    n: usize,
) -> TestResult {
    let mut events = Vec::new();
    for topic in topics {
        events.extend((0..n).map(|i| NewEvent::new(*topic, serde_json::json!({ "i": i }))));
    }
    let mut tx = db.pool.begin().await?;
    outbox_core::enqueue_batch(&mut tx, app, &events).await?;
    tx.commit().await?;
    Ok(())
}

#[tokio::test]
async fn processes_with_different_handlers_each_run_only_their_own_topics() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    // The demo: handlers by name. The relay: a fallback for every topic.
    // The billing relay: a fallback for billing.> only.
    let (demo_ran, relay_ran, billing_ran) = (Ran::default(), Ran::default(), Ran::default());
    let mut demo = Registry::new();
    demo.register("invoice.compensate", demo_ran.handler())
        .register("email.send", demo_ran.handler());
    let mut relay = Registry::new();
    relay.fallback(relay_ran.handler());
    let mut billing = Registry::new();
    billing.fallback_for([TopicPattern::parse("billing.>")?], billing_ran.handler());
    let (demo_stop, demo_run, demo_id) = start(&db, demo).await?;
    let (relay_stop, relay_run, _) = start(&db, relay).await?;
    let (billing_stop, billing_run, _) = start(&db, billing).await?;

    enqueue_each(
        &db,
        app,
        &[
            "invoice.compensate",
            "email.send",
            "orders.created",
            "billing.eu.paid",
        ],
        25,
    )
    .await?;
    let drained = emptied(&db).await;
    assert!(
        drained,
        "rows left: the processes did not serve every topic"
    );
    assert_eq!(demo_ran.topics(), ["email.send", "invoice.compensate"]);
    assert_eq!(demo_ran.count(), 50);
    // Both fallbacks match billing.eu.paid: either may run each row, once.
    let relayed = relay_ran.topics();
    assert!(
        relayed
            .iter()
            .all(|t| t == "orders.created" || t == "billing.eu.paid"),
        "the relay ran another process's topic: {relayed:?}"
    );
    assert!(billing_ran.topics().iter().all(|t| t == "billing.eu.paid"));
    assert_eq!(relay_ran.count() + billing_ran.count(), 50);
    assert_eq!(super::dead_letter_count(&db.pool).await?, 0);

    // The demo stops: its row goes, and its topics now wait while the billing
    // relay runs alone (the relay is stopped first).
    relay_stop.cancel();
    relay_run.await??;
    demo_stop.cancel();
    demo_run.await??;
    let live = processes::live(&db.pool).await?;
    assert!(
        live.iter().all(|p| p.id != demo_id),
        "a stopped process left its row"
    );
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].patterns, ["billing.>"]);
    enqueue_each(&db, app, &["email.send", "billing.paid"], 3).await?;
    let pool = db.pool.clone();
    let billed = wait_until(Duration::from_secs(10), || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox WHERE topic = 'billing.paid'")
                .fetch_one(&pool)
                .await
                .is_ok_and(|n| n == 0)
        }
    })
    .await;
    assert!(billed);
    let waiting: Vec<(String, i32)> =
        sqlx::query_as("SELECT topic, attempt_count FROM outbox ORDER BY id")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(
        waiting,
        vec![("email.send".to_owned(), 0); 3],
        "unserved rows wait, no attempt spent"
    );
    billing_stop.cancel();
    billing_run.await??;
    Ok(())
}

/// Waits until process `id` has beaten after `since` (it has read the pauses since).
async fn beaten_since(db: &TestDb, id: uuid::Uuid, since: chrono::DateTime<chrono::Utc>) -> bool {
    let pool = db.pool.clone();
    wait_until(Duration::from_secs(10), || {
        let pool = pool.clone();
        async move {
            processes::live(&pool)
                .await
                .is_ok_and(|live| live.iter().any(|p| p.id == id && p.last_seen > since))
        }
    })
    .await
}

#[tokio::test]
async fn a_pause_holds_new_rows_in_every_process_lets_running_ones_finish_and_resumes_live()
-> TestResult {
    use outbox_core::store::pauses;
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let ran = Ran::default();
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let mut registry = Registry::new();
    let slow = ran.clone();
    registry.register("mail", move |event: Event| {
        let ran = slow.clone();
        let started = started_tx.clone();
        let mut release = release_rx.clone();
        async move {
            let _ = started.send(());
            // Runs until the test lets it finish.
            let _ = release.wait_for(|go| *go).await;
            ran.handler()(event).await
        }
    });
    let (stop, run, id) = start(&db, registry).await?;

    // A row is running when the topic is paused: it finishes.
    enqueue_each(&db, app, &["mail"], 1).await?;
    tokio::time::timeout(Duration::from_secs(10), started_rx.recv())
        .await?
        .ok_or("the handler never started")?;
    let paused_at = chrono::Utc::now();
    assert!(pauses::pause(&db.pool, app, "mail", Some("ops"), Some("SMTP down")).await?);
    assert!(
        beaten_since(&db, id, paused_at).await,
        "no beat after the pause"
    );
    let _ = release_tx.send(true);
    let finished = emptied(&db).await;
    assert!(finished, "the running row did not finish under the pause");

    // New rows wait while paused: several claim polls pass without them.
    enqueue_each(&db, app, &["mail"], 5).await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(ran.count(), 1);
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT attempt_count FROM outbox")
        .fetch_all(&db.pool)
        .await?;
    assert_eq!(attempts, [0; 5], "paused rows are not claimed");

    // Resumed without a restart: they run.
    assert!(pauses::resume(&db.pool, app, "mail").await?);
    let drained = emptied(&db).await;
    assert!(drained, "the rows did not run after the resume");
    assert_eq!(ran.count(), 6);
    stop.cancel();
    run.await??;
    Ok(())
}

#[tokio::test]
async fn a_running_process_writes_its_attempt_counts_for_the_charts() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut registry = Registry::new();
    registry.register("ok", |_event: Event| async { Ok(()) });
    registry.register("bad", |_event: Event| async {
        Err(HandlerError::permanent("no such customer"))
    });
    let (stop, run, _) = start(&db, registry).await?;
    let mut tx = db.pool.begin().await?;
    let mut events: Vec<NewEvent> = (0..5)
        .map(|n| NewEvent::new("ok", serde_json::json!({ "n": n })))
        .collect();
    events.push(NewEvent::new("bad", serde_json::json!({})));
    outbox_core::enqueue_batch(&mut tx, app, &events).await?;
    tx.commit().await?;
    assert!(emptied(&db).await, "the rows were not handled");
    // Written every few beats while running (and once more at the end).
    let pool = db.pool.clone();
    let written = wait_until(Duration::from_secs(20), || {
        let pool = pool.clone();
        async move {
            activity::per_minute(&pool, app, None, 5)
                .await
                .is_ok_and(|m| m.iter().map(|m| m.completed).sum::<i64>() == 5)
        }
    })
    .await;
    assert!(
        written,
        "the completed attempts never reached outbox_activity"
    );
    stop.cancel();
    run.await??;
    let minutes = activity::per_minute(&db.pool, app, None, 5).await?;
    assert_eq!(minutes.len(), 5, "one entry per minute, empty ones too");
    let sum = |f: fn(&activity::MinuteActivity) -> i64| minutes.iter().map(f).sum::<i64>();
    assert_eq!(
        (
            sum(|m| m.completed),
            sum(|m| m.failed),
            sum(|m| m.dead_lettered)
        ),
        (5, 1, 1)
    );
    let bad = activity::per_minute(&db.pool, app, Some("bad"), 5).await?;
    assert_eq!(
        bad.iter().map(|m| m.completed + m.failed).sum::<i64>(),
        1,
        "by topic"
    );
    Ok(())
}

#[tokio::test]
async fn a_row_retried_now_by_an_operator_is_claimed_by_a_running_process() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let ran = Ran::default();
    let mut registry = Registry::new();
    registry.register("mail", ran.handler());
    let (stop, run, _) = start(&db, registry).await?;
    // Rows due in an hour, one with an ordering key, enqueued while the
    // process claims.
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let mut tx = db.pool.begin().await?;
    let ids = outbox_core::enqueue_batch(
        &mut tx,
        app,
        &[
            NewEvent::new("mail", serde_json::json!({})).with_run_at(later),
            NewEvent::new("mail", serde_json::json!({}))
                .with_run_at(later)
                .with_ordering_key("customer-1"),
        ],
    )
    .await?;
    tx.commit().await?;
    let retried = outbox_core::store::outbox::retry_now(&db.pool, app, &ids).await?;
    assert_eq!(retried.len(), 2);
    assert!(emptied(&db).await, "the rows made due were never claimed");
    assert_eq!(ran.count(), 2);
    stop.cancel();
    run.await??;
    Ok(())
}
