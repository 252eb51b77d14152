//! The limited claim against the store: the rows an ordinary claim leased
//! in the seconds after a limit was set (a process that had not yet beaten)
//! hold slots too, rate tokens are issued at the rate, and a limit per
//! partition key takes each key's free slots.

use std::time::Duration;

use outbox_core::NewEvent;
use outbox_core::store::limits::{self, LimitedTopic, Limits};
use outbox_core::store::outbox as store;
use outbox_core::topics::Served;
use outbox_testkit::TestDb;
use serde_json::json;
use sqlx::Connection;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const LEASE: Duration = Duration::from_secs(30);

/// `n` due rows of `topic`.
async fn fill(db: &TestDb, app: uuid::Uuid, topic: &str, n: usize) -> TestResult {
    let events: Vec<NewEvent> = (0..n)
        .map(|i| NewEvent::new(topic, json!({ "i": i })))
        .collect();
    let mut tx = db.pool.begin().await?;
    outbox_core::enqueue_batch(&mut tx, app, &events).await?;
    tx.commit().await?;
    Ok(())
}

/// Enqueues `events` in one transaction.
async fn enqueue_all(db: &TestDb, app: uuid::Uuid, events: &[NewEvent]) -> TestResult {
    let mut tx = db.pool.begin().await?;
    outbox_core::enqueue_batch(&mut tx, app, events).await?;
    tx.commit().await?;
    Ok(())
}

/// `topic` of `app`, as the beat names a limited topic.
fn limited(app: uuid::Uuid, topic: &str) -> LimitedTopic {
    LimitedTopic {
        app_id: app,
        topic: topic.into(),
    }
}

/// A limited claim of up to `n` rows of `topic` by a process serving everything.
async fn claim(
    conn: &mut sqlx::PgConnection,
    topic: &LimitedTopic,
    n: u32,
) -> Result<store::LimitedClaim, outbox_core::Error> {
    store::claim_limited(conn, topic, &Served::everything(), None, "w", n, LEASE).await
}

/// The `i` of the claimed rows' payloads, sorted.
fn claimed_i(claim: &store::LimitedClaim) -> Vec<String> {
    let mut got: Vec<String> = claim
        .rows
        .iter()
        .map(|r| r.payload["i"].to_string())
        .collect();
    got.sort_unstable();
    got
}

#[tokio::test]
async fn rows_an_ordinary_claim_took_after_the_limit_was_set_hold_slots() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    fill(&db, app, "report", 5).await?;
    let one = Limits {
        max_running: Some(1),
        ..Limits::default()
    };
    limits::set(&db.pool, app, "report", &one, None).await?;
    // A process that has not beaten since claims as before the limit.
    let early = store::claim(&db.pool, "not-yet-told", 1, LEASE).await?;
    assert_eq!(early.len(), 1);
    let topic = limited(app, "report");
    let mut conn = sqlx::PgConnection::connect(&db.url).await?;
    let taken = claim(&mut conn, &topic, 5).await?;
    assert_eq!(
        (taken.rows.len(), taken.free),
        (0, 0),
        "the row the early claim leased holds the only slot"
    );
    let shown = limits::list(&db.pool, app).await?;
    assert_eq!(shown[0].running, 1, "and is recorded");
    conn.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_rate_limit_issues_its_burst_then_waits_for_the_next_token() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    fill(&db, app, "partner", 10).await?;
    let rate = Limits {
        rate_per_sec: Some(2.0),
        burst: Some(3),
        ..Limits::default()
    };
    limits::set(&db.pool, app, "partner", &rate, None).await?;
    let topic = limited(app, "partner");
    let mut conn = sqlx::PgConnection::connect(&db.url).await?;
    let first = claim(&mut conn, &topic, 10).await?;
    assert_eq!(first.rows.len(), 3, "a full burst to start with");
    let wait = first.ready_in.ok_or("no wait for the next token")?;
    assert!(
        wait > Duration::from_millis(300) && wait <= Duration::from_millis(500),
        "{wait:?} until the next token at 2/s"
    );
    let none = claim(&mut conn, &topic, 10).await?;
    assert_eq!(none.rows.len(), 0, "no token left");
    tokio::time::sleep(wait + Duration::from_millis(20)).await;
    let next = claim(&mut conn, &topic, 10).await?;
    assert_eq!(next.rows.len(), 1, "one token came");
    conn.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_limit_per_key_takes_one_row_of_each_key_until_its_row_ends() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    // Three rows of key a first (they fill the front of the queue), two of
    // b, and two without a key.
    let keys = [
        Some("a"),
        Some("a"),
        Some("a"),
        Some("b"),
        None,
        Some("b"),
        None,
    ];
    let events: Vec<NewEvent> = keys
        .into_iter()
        .enumerate()
        .map(|(i, key)| {
            let event = NewEvent::new("sync", json!({ "i": i }));
            match key {
                Some(k) => event.with_partition_key(k),
                None => event,
            }
        })
        .collect();
    enqueue_all(&db, app, &events).await?;
    let per_key = Limits {
        max_running_per_key: Some(1),
        max_running: Some(10),
        ..Limits::default()
    };
    limits::set(&db.pool, app, "sync", &per_key, None).await?;
    let topic = limited(app, "sync");
    let mut conn = sqlx::PgConnection::connect(&db.url).await?;
    let first = claim(&mut conn, &topic, 10).await?;
    assert_eq!(
        claimed_i(&first),
        ["0", "3", "4", "6"],
        "the first of a, the first of b, both keyless"
    );
    assert!(first.held, "rows of a and b were left");
    let second = claim(&mut conn, &topic, 10).await?;
    assert!(second.rows.is_empty(), "a and b are at their limit");
    assert!(second.held);
    assert_eq!(limits::list(&db.pool, app).await?[0].running, 4);

    // The row of a ends: the next row of a may run, b still waits.
    let done: Vec<_> = first
        .rows
        .iter()
        .filter(|r| r.payload["i"] == 0)
        .map(|r| r.lease())
        .collect();
    store::complete(&mut conn, &done).await?;
    assert_eq!(claimed_i(&claim(&mut conn, &topic, 10).await?), ["1"]);
    conn.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_partition_key_out_of_range_is_refused_and_nothing_is_written() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut tx = db.pool.begin().await?;
    for bad in [String::new(), "k".repeat(256)] {
        let event = NewEvent::new("sync", json!({})).with_partition_key(bad);
        let message = outbox_core::enqueue(&mut tx, app, &event)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("partition_key"), "{message}");
    }
    tx.commit().await?;
    assert_eq!(store::count(&db.pool).await?, 0);
    let refused = sqlx::query("SELECT outbox_enqueue('shop', 'sync', p_partition_key => '')")
        .execute(&db.pool)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(refused.contains("partition_key"), "{refused}");
    let id: uuid::Uuid =
        sqlx::query_scalar("SELECT outbox_enqueue('shop', 'sync', p_partition_key => 'acme')")
            .fetch_one(&db.pool)
            .await?;
    let key: Option<String> = sqlx::query_scalar("SELECT partition_key FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(key.as_deref(), Some("acme"));
    Ok(())
}

#[tokio::test]
async fn a_key_with_more_rows_than_the_window_does_not_take_the_other_keys_turns() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    // 300 rows of one busy customer ahead of one row each of two others:
    // more than one claim's window of due rows.
    let mut events: Vec<NewEvent> = (0..300)
        .map(|i| NewEvent::new("sync", json!({ "i": i })).with_partition_key("busy"))
        .collect();
    events.push(NewEvent::new("sync", json!({ "i": "b" })).with_partition_key("b"));
    events.push(NewEvent::new("sync", json!({ "i": "c" })).with_partition_key("c"));
    enqueue_all(&db, app, &events).await?;
    let per_key = Limits {
        max_running_per_key: Some(1),
        ..Limits::default()
    };
    limits::set(&db.pool, app, "sync", &per_key, None).await?;
    let mut conn = sqlx::PgConnection::connect(&db.url).await?;
    let first = claim(&mut conn, &limited(app, "sync"), 10).await?;
    assert_eq!(
        claimed_i(&first),
        ["\"b\"", "\"c\"", "0"],
        "one row of each customer"
    );
    assert!(
        first.free > 10,
        "without a concurrency or rate limit the topic's limits allow any number: {}",
        first.free
    );
    conn.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_limit_per_key_added_to_a_rate_limit_counts_the_rows_running_already() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    enqueue_all(
        &db,
        app,
        &[NewEvent::new("sync", json!({})).with_partition_key("acme")],
    )
    .await?;
    let rate = Limits {
        rate_per_sec: Some(5.0),
        ..Limits::default()
    };
    limits::set(&db.pool, app, "sync", &rate, None).await?;
    // Long after the rate limit was set (past the window in which claims
    // adopt rows leased elsewhere), a row of the topic runs unrecorded.
    age_limit(&db, "sync").await?;
    assert_eq!(store::claim(&db.pool, "w", 1, LEASE).await?.len(), 1);
    let both = Limits {
        rate_per_sec: Some(5.0),
        max_running_per_key: Some(1),
        ..Limits::default()
    };
    limits::set(&db.pool, app, "sync", &both, None).await?;
    assert_eq!(limits::list(&db.pool, app).await?[0].running, 1);
    Ok(())
}

/// The limit's row as the server stores it: its place and the transaction
/// that wrote it, which change with every new version of the row.
async fn limit_version(db: &TestDb, topic: &str) -> Result<String, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT ctid::text || '/' || xmin::text FROM outbox_topic_limits WHERE topic = $1",
    )
    .bind(topic)
    .fetch_one(&db.pool)
    .await
}

/// Makes `topic`'s limit as old as one set an hour ago, past the window in
/// which its claims also count rows leased elsewhere: from then on only
/// the recorded running rows hold slots.
async fn age_limit(db: &TestDb, topic: &str) -> TestResult {
    sqlx::query(
        "UPDATE outbox_topic_limits SET set_at = now() - interval '1 hour' WHERE topic = $1",
    )
    .bind(topic)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Under a held snapshot a limited claim must leave no dead version in the
/// table operators' limits live in (it cannot be compacted): the claims
/// write their state apart, and that state survives a compaction.
#[tokio::test]
async fn limited_claims_write_no_new_version_of_the_limit_and_their_state_survives_compaction()
-> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    fill(&db, app, "mail", 40).await?;
    let both = Limits {
        max_running: Some(30),
        rate_per_sec: Some(1000.0),
        burst: Some(1000),
        ..Limits::default()
    };
    limits::set(&db.pool, app, "mail", &both, None).await?;
    age_limit(&db, "mail").await?;
    let before = limit_version(&db, "mail").await?;
    let mut holder = sqlx::PgConnection::connect_with(&db.pool.connect_options()).await?;
    outbox_core::store::stats::hold_transaction_id(&mut holder).await?;

    let mut conn = db.pool.acquire().await?;
    let topic = limited(app, "mail");
    let mut claimed = 0;
    for _ in 0..20 {
        claimed += claim(&mut conn, &topic, 1).await?.rows.len();
    }
    assert_eq!(claimed, 20);
    assert_eq!(
        limit_version(&db, "mail").await?,
        before,
        "a claim rewrote the limit's row"
    );

    let done = outbox_core::store::compaction::compact_table(
        &db.pool,
        "outbox_topic_limit_states",
        Duration::from_millis(500),
    )
    .await?;
    assert_eq!(
        done,
        outbox_core::store::compaction::Compaction::Compacted {
            table: "outbox_topic_limit_states",
            kept: 1
        }
    );
    assert_eq!(limits::list(&db.pool, app).await?[0].running, 20);
    // Ten slots are left of thirty, whatever was asked for.
    assert_eq!(claim(&mut conn, &topic, 25).await?.rows.len(), 10);
    assert_eq!(claim(&mut conn, &topic, 25).await?.rows.len(), 0);
    holder.close().await?;
    Ok(())
}

/// A claim that waits for a compaction of the states must see the rows the
/// compaction put back, not the table as `TRUNCATE` left it: an empty
/// answer would free every slot.
#[tokio::test]
async fn a_limited_claim_waiting_for_a_compaction_counts_the_slots_it_kept() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    fill(&db, app, "mail", 6).await?;
    let two = Limits {
        max_running: Some(2),
        ..Limits::default()
    };
    limits::set(&db.pool, app, "mail", &two, None).await?;
    age_limit(&db, "mail").await?;
    let topic = limited(app, "mail");
    let mut conn = db.pool.acquire().await?;
    assert_eq!(claim(&mut conn, &topic, 2).await?.rows.len(), 2);

    // The compaction's steps, held open while a claim comes.
    let mut compactor = db.pool.begin().await?;
    sqlx::query("LOCK TABLE outbox_topic_limit_states IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *compactor)
        .await?;
    sqlx::query(
        "DO $$
         DECLARE kept outbox_topic_limit_states[];
         BEGIN
            SELECT array_agg(t) INTO kept FROM outbox_topic_limit_states t;
            TRUNCATE outbox_topic_limit_states;
            INSERT INTO outbox_topic_limit_states SELECT * FROM unnest(kept);
         END
         $$",
    )
    .execute(&mut *compactor)
    .await?;
    let waiting = tokio::spawn({
        let pool = db.pool.clone();
        let topic = topic.clone();
        async move {
            let mut conn = pool.acquire().await?;
            claim(&mut conn, &topic, 2).await
        }
    });
    assert!(
        db.a_statement_waits_on_a_lock().await,
        "the claim never waited for the compaction"
    );
    compactor.commit().await?;
    let late = waiting.await??;
    assert!(
        late.rows.is_empty(),
        "claimed {} rows over the limit",
        late.rows.len()
    );
    assert_eq!(late.free, 0);
    Ok(())
}

/// A restore from a dump taken while the leader compacted the states has
/// limits without a state: the next claim starts one, with a full burst.
#[tokio::test]
async fn a_limit_without_its_state_is_claimed_from_a_new_one() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    fill(&db, app, "mail", 10).await?;
    let limit = Limits {
        max_running: Some(3),
        rate_per_sec: Some(0.01),
        burst: Some(4),
        ..Limits::default()
    };
    limits::set(&db.pool, app, "mail", &limit, None).await?;
    age_limit(&db, "mail").await?;
    sqlx::query("DELETE FROM outbox_topic_limit_states")
        .execute(&db.pool)
        .await?;
    let topic = limited(app, "mail");
    let mut conn = db.pool.acquire().await?;
    let first = claim(&mut conn, &topic, 10).await?;
    assert_eq!(first.rows.len(), 3, "three slots");
    assert_eq!(first.free, 3);
    let state: (i32, f64) = sqlx::query_as(
        "SELECT cardinality(running), tokens FROM outbox_topic_limit_states WHERE topic = 'mail'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(state.0, 3);
    assert!((state.1 - 1.0).abs() < 0.01, "tokens {}", state.1);
    assert!(claim(&mut conn, &topic, 10).await?.rows.is_empty());
    Ok(())
}

/// A database with a limit whose row holds its running rows and tokens
/// (before migration 0033) is migrated with them: the slot stays taken.
#[tokio::test]
async fn the_upgrade_keeps_a_limits_running_rows_and_tokens() -> TestResult {
    let db = TestDb::migrated_to(32).await?;
    let app = db.app("shop").await?;
    fill(&db, app, "mail", 3).await?;
    let leased = store::claim(&db.pool, "old", 1, LEASE).await?;
    assert_eq!(leased.len(), 1);
    sqlx::query(
        "INSERT INTO outbox_topic_limits
             (app_id, topic, max_running, rate_per_sec, burst, tokens, running, set_at)
         VALUES ($1, 'mail', 2, 1, 5, 1.5, ARRAY[$2::uuid], now() - interval '1 hour')",
    )
    .bind(app)
    .bind(leased[0].id)
    .execute(&db.pool)
    .await?;

    // A dispatcher of the earlier version is up: it would fail every claim
    // round on the dropped columns, so the migration is refused, saying
    // which, and changes nothing.
    crate::live_dispatcher(&db, "0.32").await?;
    let refused = outbox_core::migrate(&db.pool)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        refused.contains("web-1") && refused.contains("stop all outboxd processes"),
        "{refused:?}"
    );
    let tokens: f64 = sqlx::query_scalar("SELECT tokens FROM outbox_topic_limits")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(tokens, 1.5);
    sqlx::query("DELETE FROM outbox_processes")
        .execute(&db.pool)
        .await?;

    outbox_core::migrate(&db.pool).await?;
    assert_eq!(limits::list(&db.pool, app).await?[0].running, 1);
    let mut conn = db.pool.acquire().await?;
    let claimed = claim(&mut conn, &limited(app, "mail"), 10).await?;
    assert_eq!(claimed.rows.len(), 1, "one slot of two and one whole token");
    Ok(())
}

/// Without any limit, no dispatcher reads the moved columns: the upgrade
/// runs while one of the earlier version is up (a rolling restart).
#[tokio::test]
async fn the_upgrade_without_limits_runs_beside_a_live_dispatcher() -> TestResult {
    let db = TestDb::migrated_to(32).await?;
    crate::live_dispatcher(&db, "0.32").await?;
    outbox_core::migrate(&db.pool).await?;
    let app = db.app("shop").await?;
    let one = Limits {
        max_running: Some(1),
        ..Limits::default()
    };
    limits::set(&db.pool, app, "mail", &one, None).await?;
    assert_eq!(limits::list(&db.pool, app).await?.len(), 1);
    Ok(())
}

/// Index and table blocks `conn`'s open transaction has read so far.
async fn blocks_read(conn: &mut sqlx::PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT sum(pg_stat_get_xact_blocks_fetched(c.oid))::int8 FROM pg_class c
         WHERE c.relnamespace = 'public'::regnamespace AND c.relname LIKE 'outbox%'",
    )
    .fetch_one(&mut *conn)
    .await
}

/// While a snapshot is held, a limited claim from its app's first row
/// walks every row of the topic finished since; from a position taken for
/// the limited topic it does not, and still finds the row that is due.
#[tokio::test]
async fn a_limited_claim_from_a_position_does_not_walk_rows_finished_under_a_held_snapshot()
-> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let ten = Limits {
        max_running: Some(10),
        ..Limits::default()
    };
    limits::set(&db.pool, app, "mail", &ten, None).await?;
    age_limit(&db, "mail").await?;
    let mut holder = sqlx::PgConnection::connect_with(&db.pool.connect_options()).await?;
    outbox_core::store::stats::hold_transaction_id(&mut holder).await?;
    fill(&db, app, "mail", 20_000).await?;
    sqlx::query("DELETE FROM outbox").execute(&db.pool).await?;
    fill(&db, app, "mail", 1).await?;
    fill(&db, app, "other", 1).await?;

    let only_mail = Served {
        exact: vec!["mail".into()],
        ..Served::default()
    };
    let mut positions = store::Positions::default();
    for _ in 0..2 {
        positions =
            store::advance_positions(&db.pool, &positions, &only_mail, Duration::ZERO).await?;
    }
    let topic = limited(app, "mail");
    let mut read = Vec::new();
    for from in [None, positions.of(app)] {
        let mut tx = db.pool.begin().await?;
        let before = blocks_read(&mut tx).await?;
        let claim =
            store::claim_limited(&mut tx, &topic, &Served::everything(), from, "w", 10, LEASE)
                .await?;
        assert_eq!(claimed_i(&claim), ["0"], "from {from:?}");
        read.push(blocks_read(&mut tx).await? - before);
        tx.rollback().await?;
    }
    assert!(
        read[0] > 1_000,
        "the 20,000 dead rows should cost a claim from the first row: {} blocks",
        read[0]
    );
    assert!(
        read[1] < 100,
        "a claim from the position read {} blocks (from the first row: {})",
        read[1],
        read[0]
    );
    holder.close().await?;
    Ok(())
}
