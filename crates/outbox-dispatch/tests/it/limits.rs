//! Concurrency limits per topic, across several processes: never more of a
//! limited topic's rows run at once than its limit (in all, or of one
//! partition key), other topics are not
//! held back, and the slots of a process that died come back with its
//! leases.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use outbox_core::NewEvent;
use outbox_core::store::limits::{self, LimitedTopic};
use outbox_core::store::outbox as store;
use outbox_core::topics::Served;
use outbox_dispatch::{Event, HandlerError, Registry};
use outbox_testkit::TestDb;
use serde_json::json;
use sqlx::Connection;

use super::subscriptions::{emptied, enqueue_each, start, start_with};
use super::{TestResult, config};

/// At most `n` rows at once.
fn at_once(n: i64) -> limits::Limits {
    limits::Limits {
        max_running: Some(n),
        ..limits::Limits::default()
    }
}

/// When each run of one topic started and ended, in every process.
#[derive(Clone, Default)]
struct Runs(Arc<Mutex<Vec<(Instant, Instant)>>>);

impl Runs {
    /// A handler that takes `busy` and records its run.
    fn handler(
        &self,
        busy: Duration,
    ) -> impl Fn(Event) -> futures::future::BoxFuture<'static, Result<(), HandlerError>> + Clone + use<>
    {
        let runs = self.clone();
        move |_event: Event| {
            let runs = runs.clone();
            Box::pin(async move {
                let started = Instant::now();
                tokio::time::sleep(busy).await;
                if let Ok(mut runs) = runs.0.lock() {
                    runs.push((started, Instant::now()));
                }
                Ok(())
            })
        }
    }

    fn count(&self) -> usize {
        self.0.lock().map(|r| r.len()).unwrap_or_default()
    }

    fn first_start(&self) -> Option<Instant> {
        self.0
            .lock()
            .ok()
            .and_then(|r| r.iter().map(|(s, _)| *s).min())
    }

    /// The most runs that overlapped at any instant.
    fn most_at_once(&self) -> usize {
        overlap(&self.0.lock().map(|r| r.clone()).unwrap_or_default())
    }
}

/// The most of `runs` (start, end) that overlapped at any instant.
fn overlap(runs: &[(Instant, Instant)]) -> usize {
    // An end sorts before a start at the same instant: back-to-back runs
    // do not overlap.
    let mut edges: Vec<(Instant, i32)> = runs
        .iter()
        .flat_map(|(start, end)| [(*start, 1), (*end, -1)])
        .collect();
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, step) in edges {
        now += step;
        most = most.max(now);
    }
    usize::try_from(most).unwrap_or(0)
}

#[tokio::test]
async fn a_limited_topic_never_runs_more_rows_at_once_than_its_limit_across_four_processes()
-> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    limits::set(
        &db.pool,
        app,
        "report.render",
        &at_once(2),
        Some("ops@example.com"),
    )
    .await?;
    let (limited, free) = (Runs::default(), Runs::default());
    let mut processes = Vec::new();
    for _ in 0..4 {
        let mut registry = Registry::new();
        registry
            .register("report.render", limited.handler(Duration::from_millis(20)))
            .register("email.send", free.handler(Duration::from_millis(20)));
        processes.push(start(&db, registry).await?);
    }
    enqueue_each(&db, app, &["report.render", "email.send"], 40).await?;
    assert!(emptied(&db).await, "rows left");
    assert_eq!(limited.count(), 40);
    assert_eq!(free.count(), 40);
    assert_eq!(
        limited.most_at_once(),
        2,
        "the limit of 2 was exceeded, or never reached"
    );
    assert!(
        free.most_at_once() > 2,
        "the unlimited topic was held back: {} at once",
        free.most_at_once()
    );
    let shown = limits::list(&db.pool, app).await?;
    assert_eq!(shown.len(), 1);
    assert_eq!(
        (
            shown[0].topic.as_str(),
            shown[0].max_running,
            shown[0].running
        ),
        ("report.render", Some(2), 0)
    );
    assert_eq!(shown[0].set_by.as_deref(), Some("ops@example.com"));

    // Without its limit the topic runs as wide as the processes allow.
    assert!(limits::remove(&db.pool, app, "report.render").await?);
    assert!(!limits::remove(&db.pool, app, "report.render").await?);
    let unlimited = Runs::default();
    for (stop, run, _) in processes {
        stop.cancel();
        run.await??;
    }
    let mut registry = Registry::new();
    registry.register(
        "report.render",
        unlimited.handler(Duration::from_millis(50)),
    );
    let (stop, run, _) = start(&db, registry).await?;
    enqueue_each(&db, app, &["report.render"], 20).await?;
    assert!(emptied(&db).await, "rows left");
    assert!(unlimited.most_at_once() > 2);
    stop.cancel();
    run.await??;
    Ok(())
}

/// When each run started and ended.
type Spans = Vec<(Instant, Instant)>;

/// When each run started and ended, by the `customer` of its payload.
#[derive(Clone, Default)]
struct RunsByKey(Arc<Mutex<HashMap<String, Spans>>>);

impl RunsByKey {
    /// A handler that takes `busy` and records its run under its customer.
    fn handler(
        &self,
        busy: Duration,
    ) -> impl Fn(Event) -> futures::future::BoxFuture<'static, Result<(), HandlerError>> + Clone + use<>
    {
        let runs = self.clone();
        move |event: Event| {
            let runs = runs.clone();
            let key = event.payload["customer"].as_str().unwrap_or("").to_owned();
            Box::pin(async move {
                let started = Instant::now();
                tokio::time::sleep(busy).await;
                if let Ok(mut runs) = runs.0.lock() {
                    runs.entry(key).or_default().push((started, Instant::now()));
                }
                Ok(())
            })
        }
    }
}

#[tokio::test]
async fn a_key_limited_to_one_runs_its_rows_one_at_a_time_across_four_processes_while_keys_run_side_by_side()
-> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let one_per_key = limits::Limits {
        max_running_per_key: Some(1),
        ..limits::Limits::default()
    };
    limits::set(&db.pool, app, "invoice.sync", &one_per_key, None).await?;
    let runs = RunsByKey::default();
    let mut processes = Vec::new();
    for _ in 0..4 {
        let mut registry = Registry::new();
        registry.register("invoice.sync", runs.handler(Duration::from_millis(20)));
        processes.push(start(&db, registry).await?);
    }
    let customers = ["acme", "globex", "initech", "umbrella"];
    let events: Vec<NewEvent> = (0..8)
        .flat_map(|i| {
            customers.iter().map(move |c| {
                NewEvent::new("invoice.sync", json!({ "customer": c, "i": i }))
                    .with_partition_key(*c)
            })
        })
        .collect();
    let mut tx = db.pool.begin().await?;
    outbox_core::enqueue_batch(&mut tx, app, &events).await?;
    tx.commit().await?;
    assert!(emptied(&db).await, "rows left");
    let by_key = runs.0.lock().map(|r| r.clone()).unwrap_or_default();
    let mut all = Vec::new();
    for customer in customers {
        let of_key = by_key.get(customer).cloned().unwrap_or_default();
        assert_eq!(of_key.len(), 8, "{customer}: runs");
        assert_eq!(
            overlap(&of_key),
            1,
            "{customer}: rows of one key overlapped"
        );
        all.extend(of_key);
    }
    assert!(
        overlap(&all) > 1,
        "different keys never ran side by side: {} at once",
        overlap(&all)
    );
    for (stop, run, _) in processes {
        stop.cancel();
        run.await??;
    }
    Ok(())
}

#[tokio::test]
async fn the_slots_of_a_process_that_died_come_back_when_its_leases_expire() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    limits::set(&db.pool, app, "report.render", &at_once(1), None).await?;
    enqueue_each(&db, app, &["report.render"], 5).await?;
    // A process claims the topic's one slot with a lease of a second, and dies.
    let lease = Duration::from_secs(1);
    let mut dead = sqlx::PgConnection::connect(&db.url).await?;
    let topic = LimitedTopic {
        app_id: app,
        topic: "report.render".into(),
    };
    // The lease runs from the claim statement's start, after this instant.
    let expires = Instant::now() + lease;
    let taken = store::claim_limited(
        &mut dead,
        &topic,
        &Served::everything(),
        None,
        "dead",
        5,
        lease,
    )
    .await?;
    assert_eq!(taken.rows.len(), 1, "one slot, one row");
    assert_eq!(taken.free, 1);
    let again = store::claim_limited(
        &mut dead,
        &topic,
        &Served::everything(),
        None,
        "dead",
        5,
        lease,
    )
    .await?;
    assert_eq!((again.rows.len(), again.free), (0, 0), "the slot is taken");
    dead.close().await?;

    let runs = Runs::default();
    let mut registry = Registry::new();
    registry.register("report.render", runs.handler(Duration::from_millis(5)));
    let (stop, run, _) = start_with(&db, registry, config()).await?;
    assert!(
        emptied(&db).await,
        "the dead process's slot never came back"
    );
    assert_eq!(runs.count(), 5, "the dead process's row runs again too");
    assert!(
        runs.first_start().is_some_and(|first| first >= expires),
        "a row ran while the dead process still held the only slot"
    );
    assert_eq!(runs.most_at_once(), 1);
    stop.cancel();
    run.await??;
    Ok(())
}

#[tokio::test]
async fn a_rate_limited_topic_starts_its_rate_across_two_processes() -> TestResult {
    const RATE: f64 = 20.0;
    const WINDOW: Duration = Duration::from_secs(30);
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let limit = limits::Limits {
        rate_per_sec: Some(RATE),
        burst: Some(1),
        ..limits::Limits::default()
    };
    limits::set(&db.pool, app, "partner.call", &limit, None).await?;
    let runs = Runs::default();
    let mut processes = Vec::new();
    for _ in 0..2 {
        let mut registry = Registry::new();
        registry.register("partner.call", runs.handler(Duration::from_millis(1)));
        processes.push(start(&db, registry).await?);
    }
    // More rows than the window lets start: the limit, not the backlog, decides.
    enqueue_each(&db, app, &["partner.call"], 1000).await?;
    let pool = db.pool.clone();
    let began = outbox_testkit::wait_until(Duration::from_secs(10), || {
        let runs = runs.clone();
        async move { runs.count() > 0 }
    })
    .await;
    assert!(began, "nothing ran");
    let first = runs.first_start().ok_or("no first start")?;
    tokio::time::sleep_until((first + WINDOW).into()).await;
    let started = runs
        .0
        .lock()
        .map(|r| r.iter().filter(|(s, _)| *s < first + WINDOW).count())
        .unwrap_or_default();
    let expected = RATE * WINDOW.as_secs_f64();
    let ratio = started as f64 / expected;
    println!("{started} starts in {WINDOW:?} at {RATE}/s: {ratio:.3} of the rate");
    assert!(
        (0.9..=1.1).contains(&ratio),
        "{started} starts in {WINDOW:?} at {RATE}/s: {ratio:.3} of the rate"
    );
    let left = outbox_core::store::outbox::count(&pool).await?;
    assert!(left > 0, "the backlog ran out before the window closed");
    for (stop, run, _) in processes {
        stop.cancel();
        run.await??;
    }
    Ok(())
}

#[tokio::test]
async fn a_limit_set_while_rows_run_counts_them() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let runs = Runs::default();
    let narrow = outbox_dispatch::Config {
        concurrency: 3,
        batch_size: 3,
        ..config()
    };
    let mut processes = Vec::new();
    for _ in 0..2 {
        let mut registry = Registry::new();
        registry.register("report.render", runs.handler(Duration::from_millis(400)));
        processes.push(start_with(&db, registry, narrow.clone()).await?);
    }
    enqueue_each(&db, app, &["report.render"], 20).await?;
    let leased = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM outbox WHERE topic = 'report.render' AND locked_until > now()",
        )
        .fetch_one(&pool)
        .await
        .unwrap_or(-1)
    };
    let busy = outbox_testkit::wait_until(Duration::from_secs(10), || {
        leased(db.pool.clone()).map(|n| n >= 4)
    })
    .await;
    assert!(busy, "the rows never ran side by side");
    limits::set(&db.pool, app, "report.render", &at_once(1), None).await?;
    // Every process knows of the limit after its next beat.
    let set = chrono::Utc::now();
    let known = outbox_testkit::wait_until(Duration::from_secs(5), || {
        let pool = db.pool.clone();
        async move {
            outbox_core::store::processes::live(&pool)
                .await
                .is_ok_and(|live| live.len() == 2 && live.iter().all(|p| p.last_seen > set))
        }
    })
    .await;
    assert!(known);
    // From then on the rows already running count: none starts until fewer
    // than the limit run, and then one at a time.
    let mut last = leased(db.pool.clone()).await;
    let mut samples = 0;
    while outbox_core::store::outbox::count(&db.pool).await? > 0 && samples < 2000 {
        let now = leased(db.pool.clone()).await;
        assert!(now >= 0);
        assert!(
            now <= last.max(1),
            "{now} running after {last}: a row started while the limit was exceeded"
        );
        last = now;
        samples += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (stop, run, _) in processes {
        stop.cancel();
        run.await??;
    }
    Ok(())
}

/// Limited claims start from positions of their own: a row of a limited
/// topic committed late behind them (a long producer transaction), and one
/// whose `run_at` an operator moved back by hand, still run while the
/// topic keeps its dispatcher busy.
#[tokio::test]
async fn rows_that_land_behind_a_limited_topics_positions_still_run() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    limits::set(&db.pool, app, "mail", &at_once(50), None).await?;
    let handled: Arc<Mutex<Vec<uuid::Uuid>>> = Arc::default();
    let mut registry = Registry::new();
    registry.register("mail", {
        let handled = handled.clone();
        move |event: Event| {
            let handled = handled.clone();
            async move {
                if let Ok(mut handled) = handled.lock() {
                    handled.push(event.id);
                }
                Ok::<(), HandlerError>(())
            }
        }
    });
    let (stop, run, _) = start(&db, registry).await?;
    let ran = |id: uuid::Uuid| {
        let handled = handled.clone();
        async move { handled.lock().is_ok_and(|h| h.contains(&id)) }
    };
    // A steady trickle keeps the limited claims going (and their positions
    // moving on) while the two rows land behind them.
    let trickle = tokio::spawn({
        let (pool, stop) = (db.pool.clone(), stop.clone());
        async move {
            while !stop.is_cancelled() {
                let mut tx = pool.begin().await?;
                outbox_core::enqueue(&mut tx, app, &NewEvent::new("mail", json!({}))).await?;
                tx.commit().await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<_, outbox_core::Error>(())
        }
    });
    let an_hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    let mut long = db.pool.begin().await?;
    let late = outbox_core::enqueue(
        &mut long,
        app,
        &NewEvent::new("mail", json!({ "late": true })).with_run_at(an_hour_ago),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    long.commit().await?;
    let late_ran = outbox_testkit::wait_until(Duration::from_secs(5), || ran(late)).await;
    assert!(
        late_ran,
        "a row committed behind the positions was not claimed"
    );

    let in_an_hour = chrono::Utc::now() + chrono::Duration::hours(1);
    let mut tx = db.pool.begin().await?;
    let moved = outbox_core::enqueue(
        &mut tx,
        app,
        &NewEvent::new("mail", json!({ "moved": true })).with_run_at(in_an_hour),
    )
    .await?;
    tx.commit().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    sqlx::query("UPDATE outbox SET run_at = now() - interval '1 hour' WHERE id = $1")
        .bind(moved)
        .execute(&db.pool)
        .await?;
    let moved_ran = outbox_testkit::wait_until(Duration::from_secs(10), || ran(moved)).await;
    assert!(moved_ran, "a row moved back by hand was not claimed");
    stop.cancel();
    run.await??;
    trickle.await??;
    Ok(())
}
