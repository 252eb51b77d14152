//! Claims take only the topics they serve; processes record what they serve,
//! and the state counts show the due rows nobody serves.

use std::time::Duration;

use outbox_core::store::outbox::{self as store, Positions};
use outbox_core::store::pauses;
use outbox_core::store::processes::{self, ProcessInfo};
use outbox_core::topics::{Served, TopicPattern};
use outbox_core::{NewEvent, enqueue_batch};
use outbox_testkit::TestDb;
use serde_json::json;
use uuid::Uuid;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const LEASE: Duration = Duration::from_secs(30);

async fn enqueue_topics(db: &TestDb, app: Uuid, topics: &[&str]) -> TestResult {
    let events: Vec<NewEvent> = topics
        .iter()
        .map(|t| NewEvent::new(*t, json!({})))
        .collect();
    let mut tx = db.pool.begin().await?;
    enqueue_batch(&mut tx, app, &events).await?;
    tx.commit().await?;
    Ok(())
}

fn claimed_topics(rows: &[outbox_core::ClaimedEvent]) -> Vec<String> {
    let mut topics: Vec<String> = rows.iter().map(|r| r.topic.clone()).collect();
    topics.sort();
    topics
}

#[tokio::test]
async fn a_claim_takes_its_exact_topics_and_patterns_but_not_what_it_excludes() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let topics = [
        "email.send",
        "orders.created",
        "orders.eu.created",
        "billing.paid",
        "billing.eu.paid",
        "webhook:https://x.io/h",
        "other",
    ];
    enqueue_topics(&db, app, &topics).await?;
    let patterns = ["orders.*", "billing.>"].map(|p| TopicPattern::parse(p).map(|p| p.to_regex()));
    let served = Served {
        all: false,
        exact: vec!["email.send".into()],
        regexes: patterns
            .into_iter()
            .chain([Ok(outbox_core::topics::prefix_regex("webhook:"))])
            .collect::<Result<_, _>>()?,
        excluded: vec!["billing.eu.paid".into()],
        paused: Vec::new(),
    };
    let rows = store::claim_served(&db.pool, &served, "w", 100, LEASE).await?;
    assert_eq!(
        claimed_topics(&rows),
        [
            "billing.paid",
            "email.send",
            "orders.created",
            "webhook:https://x.io/h"
        ]
    );
    // The complete-and-claim of a claim loop and the transactional take
    // filter the same way; what is left is the three rows nobody took.
    let (_, rows) = store::complete_and_claim(
        &db.pool,
        &Positions::default(),
        &served,
        &[],
        "w",
        100,
        LEASE,
    )
    .await?;
    assert!(rows.is_empty(), "{:?}", claimed_topics(&rows));
    let mut tx = db.pool.begin().await?;
    let taken = store::take(&mut *tx, &Positions::default(), &served, 100).await?;
    assert!(taken.is_empty(), "{:?}", claimed_topics(&taken));
    let everything =
        store::take(&mut *tx, &Positions::default(), &Served::everything(), 100).await?;
    assert_eq!(
        claimed_topics(&everything),
        ["billing.eu.paid", "orders.eu.created", "other"]
    );
    tx.rollback().await?;
    // Nobody claimed them: no attempt was spent on the rows left.
    let attempts: Vec<i32> =
        sqlx::query_scalar("SELECT attempt_count FROM outbox WHERE locked_by IS NULL")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(attempts, [0, 0, 0]);
    Ok(())
}

fn process(topics: &[&str], patterns: &[&str]) -> Result<ProcessInfo, outbox_core::Error> {
    let parsed: Vec<TopicPattern> = patterns
        .iter()
        .map(|p| TopicPattern::parse(p))
        .collect::<Result<_, _>>()?;
    Ok(ProcessInfo {
        id: Uuid::now_v7(),
        worker: "w".into(),
        host: "h".into(),
        pid: 1,
        version: "0".into(),
        topics: topics.iter().map(|t| t.to_string()).collect(),
        patterns: patterns.iter().map(|p| p.to_string()).collect(),
        regexes: parsed.iter().map(TopicPattern::to_regex).collect(),
    })
}

#[tokio::test]
async fn processes_learn_what_the_others_serve_and_expired_ones_disappear() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let demo = process(&["invoice.compensate", "email.send"], &[])?;
    let relay = process(&[], &[">"])?;
    assert!(
        processes::beat(&db.pool, &demo, LEASE)
            .await?
            .others
            .is_empty()
    );
    assert_eq!(
        processes::beat(&db.pool, &relay, LEASE).await?.others,
        ["email.send", "invoice.compensate"]
    );
    assert!(
        processes::beat(&db.pool, &demo, LEASE)
            .await?
            .others
            .is_empty()
    );
    // A look learns the same without writing the process's row.
    let seen: String = sqlx::query_scalar("SELECT xmin::text FROM outbox_processes WHERE id = $1")
        .bind(relay.id)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(
        processes::look(&db.pool, relay.id).await?.others,
        ["email.send", "invoice.compensate"]
    );
    let after: String = sqlx::query_scalar("SELECT xmin::text FROM outbox_processes WHERE id = $1")
        .bind(relay.id)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(seen, after, "a look wrote the row");
    let live = processes::live(&db.pool).await?;
    assert_eq!(live.len(), 2);
    assert_eq!(live[0].topics, ["invoice.compensate", "email.send"]);
    assert_eq!(live[1].patterns, [">"]);
    assert!(processes::served_by_any(&db.pool, "anything").await?);

    // Without the relay, a topic only it matched is served by nobody, and
    // the state counts show its due rows as unserved, with their age.
    processes::leave(&db.pool, relay.id).await?;
    assert!(!processes::served_by_any(&db.pool, "anything").await?);
    assert!(processes::served_by_any(&db.pool, "email.send").await?);
    enqueue_topics(&db, app, &["email.send", "anything", "anything"]).await?;
    let counts = store::state_counts(&db.pool).await?;
    let of = |topic: &str| counts.iter().find(|c| c.topic == topic).cloned();
    let anything = of("anything").ok_or("no count for anything")?;
    assert_eq!((anything.due, anything.unserved), (2, 2));
    assert!(anything.unserved_age_secs >= 0.0);
    let email = of("email.send").ok_or("no count for email.send")?;
    assert_eq!((email.due, email.unserved), (1, 0));
    // Recorded, the same counts are there to read without a scan; a topic
    // whose rows are gone leaves at the next sample.
    assert_eq!(store::record_state_counts(&db.pool).await?.len(), 2);
    let recorded = store::recorded_state_counts(&db.pool, app).await?;
    let topics: Vec<(&str, i64, i64)> = recorded
        .iter()
        .map(|s| (s.topic.as_str(), s.due, s.unserved))
        .collect();
    assert_eq!(topics, [("anything", 2, 2), ("email.send", 1, 0)]);
    assert!(recorded[0].oldest_unserved_at.is_some());
    assert!(recorded[1].oldest_unserved_at.is_none());
    sqlx::query("DELETE FROM outbox WHERE topic = 'anything'")
        .execute(&db.pool)
        .await?;
    store::record_state_counts(&db.pool).await?;
    assert_eq!(store::recorded_state_counts(&db.pool, app).await?.len(), 1);

    // A process that stops beating is gone once its row expires: the next
    // beat of another deletes it.
    processes::beat(&db.pool, &demo, Duration::from_millis(1)).await?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(processes::live(&db.pool).await?.is_empty());
    assert!(
        processes::beat(&db.pool, &relay, LEASE)
            .await?
            .others
            .is_empty()
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_processes")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(rows, 1, "the expired row was deleted");
    Ok(())
}

#[tokio::test]
async fn a_paused_topic_is_not_claimed_by_anyone_until_it_resumes() -> TestResult {
    let db = TestDb::new().await?;
    let shop = db.app("shop").await?;
    let other = db.app("other").await?;
    enqueue_topics(&db, shop, &["email.send", "orders.created"]).await?;
    enqueue_topics(&db, other, &["email.send"]).await?;
    assert!(
        pauses::pause(
            &db.pool,
            shop,
            "email.send",
            Some("ops@x.io"),
            Some("SMTP down")
        )
        .await?
    );
    assert!(
        !pauses::pause(&db.pool, shop, "email.send", None, None).await?,
        "already paused"
    );
    let listed = pauses::list(&db.pool, shop).await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].reason.as_deref(), Some("SMTP down"));
    assert_eq!(listed[0].paused_by.as_deref(), Some("ops@x.io"));

    // A beat reads the pause; a claim serving every topic leaves it out,
    // for that app only.
    let beat = processes::beat(&db.pool, &process(&[], &[">"])?, LEASE).await?;
    assert_eq!(beat.paused, [pauses::pause_key(shop, "email.send")]);
    let served = Served {
        paused: beat.paused,
        ..Served::everything()
    };
    let mut tx = db.pool.begin().await?;
    let rows = store::claim_served(&mut *tx, &served, "w", 100, LEASE).await?;
    let mut claimed: Vec<(Uuid, String)> =
        rows.iter().map(|r| (r.app_id, r.topic.clone())).collect();
    claimed.sort();
    let mut expected = vec![
        (shop, "orders.created".to_owned()),
        (other, "email.send".to_owned()),
    ];
    expected.sort();
    assert_eq!(claimed, expected);
    tx.rollback().await?;

    assert!(pauses::resume(&db.pool, shop, "email.send").await?);
    assert!(
        !pauses::resume(&db.pool, shop, "email.send").await?,
        "not paused any more"
    );
    let beat = processes::beat(&db.pool, &process(&[], &[">"])?, LEASE).await?;
    assert!(beat.paused.is_empty());
    let rows = store::claim_served(&db.pool, &Served::everything(), "w", 100, LEASE).await?;
    assert_eq!(rows.len(), 3);

    // Bad input is refused by name, and nothing is written.
    let err = pauses::pause(&db.pool, shop, "", None, None)
        .await
        .err()
        .map(|e| e.to_string());
    assert!(err.is_some_and(|e| e.contains("topic")));
    let long = "x".repeat(pauses::MAX_REASON_CHARS + 1);
    let err = pauses::pause(&db.pool, shop, "t", None, Some(&long))
        .await
        .err()
        .map(|e| e.to_string());
    assert!(err.is_some_and(|e| e.contains("reason")));
    assert!(pauses::list(&db.pool, shop).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn positions_move_past_the_rows_a_claim_does_not_take() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut topics = vec!["paused"; 50];
    topics.extend(["served"; 5]);
    enqueue_topics(&db, app, &topics).await?;
    let first_served: (chrono::DateTime<chrono::Utc>, Uuid) = sqlx::query_as(
        "SELECT run_at, id FROM outbox WHERE topic = 'served' ORDER BY run_at, id LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await?;
    let paused = Served {
        paused: vec![pauses::pause_key(app, "paused")],
        ..Served::everything()
    };
    let at =
        store::advance_positions(&db.pool, &Positions::default(), &paused, Duration::ZERO).await?;
    assert_eq!(at.of(app), Some((Some(first_served.0), first_served.1)));
    let everything = store::advance_positions(
        &db.pool,
        &Positions::default(),
        &Served::everything(),
        Duration::ZERO,
    )
    .await?;
    let (run_at, id) = everything.of(app).ok_or("no position")?;
    assert!(
        (run_at, id) < (Some(first_served.0), first_served.1),
        "all rows count"
    );
    // A claim from the position finds the served rows without the paused ones.
    let (_, claimed) =
        store::complete_and_claim(&db.pool, &at, &paused, &[], "w", 10, LEASE).await?;
    assert_eq!(claimed_topics(&claimed), ["served"; 5]);
    Ok(())
}
