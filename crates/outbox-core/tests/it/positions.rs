//! Claim positions: claims that do not walk over finished rows while an old
//! snapshot is held, and rows that land behind a position still claimed.

use std::time::Duration;

use outbox_core::store::outbox::{self as store, Positions};
use outbox_core::store::stats;
use outbox_core::topics::Served;
use outbox_core::{NewEvent, enqueue, enqueue_batch};
use outbox_testkit::TestDb;
use serde_json::json;
use sqlx::Connection;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const LEASE: Duration = Duration::from_secs(30);
const MARGIN: Duration = Duration::from_millis(250);

/// Shared buffers a plan touched: the first `Buffers:` line of
/// `EXPLAIN (ANALYZE, BUFFERS)`, which totals the whole statement.
fn buffers_touched(plan: &[String]) -> u64 {
    let line = plan
        .iter()
        .find(|l| l.trim_start().starts_with("Buffers:"))
        .map(String::as_str)
        .unwrap_or_default();
    ["hit=", "read="]
        .iter()
        .filter_map(|key| {
            let rest = &line[line.find(key)? + key.len()..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

async fn claim_plan(
    db: &TestDb,
    from: &Positions,
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let mut tx = db.pool.begin().await?;
    let plan = stats::explain_complete_and_claim(&mut *tx, from, &[], "w", 10, LEASE).await?;
    tx.rollback().await?;
    Ok(plan)
}

#[tokio::test]
async fn a_claim_from_positions_does_not_walk_rows_finished_under_a_held_snapshot() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    // An idle transaction holds the horizon back: no row deleted from now on
    // can be removed, nor its index entries.
    let mut holder = sqlx::PgConnection::connect_with(&db.pool.connect_options()).await?;
    stats::hold_transaction_id(&mut holder).await?;

    let events: Vec<NewEvent> = (0..20_000)
        .map(|n| NewEvent::new("t", json!({ "n": n })))
        .collect();
    let mut tx = db.pool.begin().await?;
    enqueue_batch(&mut tx, app, &events).await?;
    tx.commit().await?;
    sqlx::query("DELETE FROM outbox").execute(&db.pool).await?;
    let mut tx = db.pool.begin().await?;
    enqueue(&mut tx, app, &NewEvent::new("t", json!({ "live": true }))).await?;
    tx.commit().await?;
    // A claim starts no later than MARGIN before now, however recent its
    // position (a row may commit late with an earlier run_at): until then
    // the dead rows lie inside that window, and on a fast machine they all
    // did, so the claim from the positions walked them too.
    tokio::time::sleep(MARGIN * 2).await;

    // No margin: the live row, behind the dead ones, is the position.
    let positions = advance(&db, &Positions::default(), Duration::ZERO).await?;
    let positions = advance(&db, &positions, Duration::ZERO).await?;
    let from_start = buffers_touched(&claim_plan(&db, &Positions::default()).await?);
    let from_positions = buffers_touched(&claim_plan(&db, &positions).await?);
    assert!(
        from_start > 1_000,
        "the 20,000 dead rows should cost a claim from the first row: {from_start} buffers"
    );
    assert!(
        from_positions < 100,
        "a claim from the positions walked {from_positions} buffers (from the first row: {from_start})"
    );
    let (_, claimed) = store::complete_and_claim(
        &db.pool,
        &positions,
        &Served::everything(),
        &[],
        "w",
        10,
        LEASE,
    )
    .await?;
    assert_eq!(
        claimed.len(),
        1,
        "the live row is claimed from the positions"
    );
    holder.close().await?;
    Ok(())
}

#[tokio::test]
async fn rows_committed_behind_the_positions_are_claimed_after_the_next_advance() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let an_hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);

    // A transaction that is open when the positions are taken...
    let mut running = db.pool.begin().await?;
    enqueue(
        &mut running,
        app,
        &NewEvent::new("t", json!({ "n": "running" })).with_run_at(an_hour_ago),
    )
    .await?;
    // A later transaction commits first, so the snapshot of the advance
    // lists `running` among the transactions still open (rather than
    // beyond all it knows): the lookup by that list is what finds its row.
    db.app("later").await?;
    let positions = advance(&db, &Positions::default(), MARGIN).await?;
    let (taken_at, _) = positions.of(app).ok_or("no position for the app")?;
    assert!(
        taken_at > Some(an_hour_ago),
        "the position is past the uncommitted row"
    );
    running.commit().await?;
    // ...and one that begins afterwards, both with rows due an hour ago.
    let mut tx = db.pool.begin().await?;
    enqueue(
        &mut tx,
        app,
        &NewEvent::new("t", json!({ "n": "later" })).with_run_at(an_hour_ago),
    )
    .await?;
    tx.commit().await?;

    let (_, claimed) = store::complete_and_claim(
        &db.pool,
        &positions,
        &Served::everything(),
        &[],
        "w",
        10,
        LEASE,
    )
    .await?;
    assert!(
        claimed.is_empty(),
        "rows behind the positions wait for the next advance"
    );
    let positions = advance(&db, &positions, MARGIN).await?;
    let (_, claimed) = store::complete_and_claim(
        &db.pool,
        &positions,
        &Served::everything(),
        &[],
        "w",
        10,
        LEASE,
    )
    .await?;
    assert_eq!(claimed.len(), 2, "the next advance moves back to both rows");
    Ok(())
}

#[tokio::test]
async fn positions_stop_at_leased_rows_so_an_expired_lease_is_claimed_again() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    crate::enqueue_committed(&db, app, 3).await?;
    let leased = store::claim(&db.pool, "crashed", 3, Duration::from_millis(200)).await?;
    assert_eq!(leased.len(), 3);
    let mut positions = Positions::default();
    for _ in 0..3 {
        positions = advance(&db, &positions, Duration::ZERO).await?;
    }
    let mut claimed = Vec::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        positions = advance(&db, &positions, Duration::ZERO).await?;
        claimed = store::complete_and_claim(
            &db.pool,
            &positions,
            &Served::everything(),
            &[],
            "w",
            10,
            LEASE,
        )
        .await?
        .1;
        if !claimed.is_empty() {
            break;
        }
    }
    assert_eq!(
        claimed.len(),
        3,
        "the expired leases are claimed again from the positions"
    );
    Ok(())
}

#[tokio::test]
async fn a_rewind_finds_a_row_whose_run_at_was_moved_back_by_hand() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let in_an_hour = chrono::Utc::now() + chrono::Duration::hours(1);
    let mut tx = db.pool.begin().await?;
    enqueue(
        &mut tx,
        app,
        &NewEvent::new("t", json!({})).with_run_at(in_an_hour),
    )
    .await?;
    tx.commit().await?;
    let positions = advance(&db, &Positions::default(), MARGIN).await?;
    sqlx::query("UPDATE outbox SET run_at = now() - interval '1 hour'")
        .execute(&db.pool)
        .await?;
    let positions = advance(&db, &positions, MARGIN).await?;
    let (_, claimed) = store::complete_and_claim(
        &db.pool,
        &positions,
        &Served::everything(),
        &[],
        "w",
        10,
        LEASE,
    )
    .await?;
    assert!(
        claimed.is_empty(),
        "a move behind the positions is not seen by the advance"
    );

    let floor = store::rewind_positions(
        &db.pool,
        &Served::everything(),
        MARGIN,
        Some(Duration::from_secs(5)),
    )
    .await?
    .ok_or("the rewind ran over its budget")?;
    let positions = advance(&db, &positions.lowered_to(&floor), MARGIN).await?;
    let (_, claimed) = store::complete_and_claim(
        &db.pool,
        &positions,
        &Served::everything(),
        &[],
        "w",
        10,
        LEASE,
    )
    .await?;
    assert_eq!(
        claimed.len(),
        1,
        "the rewind brings the positions back to the row"
    );
    Ok(())
}

/// The earliest `run_at` a row may have (1970-01-01; migration 0039 keeps
/// `-infinity` out) is a position like any other.
#[tokio::test]
async fn a_row_due_since_the_earliest_run_at_is_a_position_too() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    sqlx::query(
        "SELECT outbox_enqueue('shop', 't', '{}'::jsonb, p_run_at => '1970-01-01 00:00:00+00')",
    )
    .execute(&db.pool)
    .await?;
    let positions = advance(&db, &Positions::default(), MARGIN).await?;
    assert_eq!(
        positions.of(app).map(|(run_at, _)| run_at),
        Some(Some(outbox_core::model::MIN_RUN_AT))
    );
    let positions = advance(&db, &positions, MARGIN).await?;
    let (_, claimed) = store::complete_and_claim(
        &db.pool,
        &positions,
        &Served::everything(),
        &[],
        "w",
        10,
        LEASE,
    )
    .await?;
    assert_eq!(claimed.len(), 1);
    Ok(())
}

/// Rows due later are no position yet (a position never lies past the margin
/// before now), so the advance does not read them: 20,000 rows of a topic
/// this process does not serve, scheduled a day ahead, were read on every
/// advance, 200–300 ms each time at 300,000 of them.
#[tokio::test]
async fn the_advance_of_positions_does_not_read_rows_due_later() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    sqlx::query(
        "INSERT INTO outbox (id, app_id, topic, payload, run_at)
         SELECT outbox_uuid_v7(), $1, 'report.nightly', '{}', now() + interval '1 day'
         FROM generate_series(1, 20000)",
    )
    .bind(app)
    .execute(&db.pool)
    .await?;
    sqlx::query("VACUUM ANALYZE outbox")
        .execute(&db.pool)
        .await?;
    let snapshot: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text")
        .fetch_one(&db.pool)
        .await?;
    let mut claimer =
        sqlx::PgConnection::connect_with(&store::claim_connect_options(&db.pool.connect_options()))
            .await?;
    let plan: Vec<String> = sqlx::query_scalar(&format!(
        "EXPLAIN (ANALYZE, BUFFERS) {}",
        store::ADVANCE_POSITIONS_SQL
    ))
    .bind(vec![app])
    .bind(vec![chrono::Utc::now() - chrono::Duration::seconds(5)])
    .bind(vec![uuid::Uuid::nil()])
    .bind(snapshot)
    .bind(MARGIN.as_secs_f64())
    .bind(false)
    .bind(vec!["mail.send"])
    .bind(Vec::<String>::new())
    .bind(Vec::<String>::new())
    .bind(Vec::<String>::new())
    .fetch_all(&mut claimer)
    .await?;
    claimer.close().await?;
    let touched = buffers_touched(&plan);
    assert!(
        touched < 100,
        "the advance read {touched} buffers for rows due tomorrow:\n{}",
        plan.join("\n")
    );
    Ok(())
}

/// Moves positions on from `from`, every topic served.
async fn advance(
    db: &TestDb,
    from: &Positions,
    margin: Duration,
) -> Result<Positions, outbox_core::Error> {
    store::advance_positions(&db.pool, from, &Served::everything(), margin).await
}
