//! The hot statements keep their index and TID scans when the statistics
//! describe a short queue, which is what they describe most of the time.

use outbox_core::store::outbox::{
    ADVANCE_POSITIONS_SQL, COMPLETE_AND_CLAIM_SQL, COMPLETE_SQL, claim_connect_options,
    planner_options,
};
use outbox_testkit::TestDb;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

type TestResult = Result<(), Box<dyn std::error::Error>>;

async fn fill(db: &TestDb, app: Uuid, rows: i32) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO outbox (id, app_id, topic, payload)
         SELECT outbox_uuid_v7(), $1, 't', jsonb_build_object('n', g) FROM generate_series(1, $2) g",
    )
    .bind(app)
    .bind(rows)
    .execute(&db.pool)
    .await?;
    Ok(())
}

type Explain<'q> =
    sqlx::query::QueryScalar<'q, sqlx::Postgres, String, sqlx::postgres::PgArguments>;

/// `EXPLAIN (COSTS OFF)` of `sql` on a claim loop's connection, with the
/// statistics of a short queue (300 rows of one app, analysed); `bind`
/// gives the statement its parameters for that app.
async fn short_queue_plan(
    sql: &str,
    bind: impl for<'q> FnOnce(Explain<'q>, Uuid) -> Explain<'q>,
) -> Result<String, Box<dyn std::error::Error>> {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    fill(&db, app, 300).await?;
    sqlx::query("VACUUM ANALYZE outbox")
        .execute(&db.pool)
        .await?;
    let mut claimer =
        PgConnection::connect_with(&claim_connect_options(&db.pool.connect_options())).await?;
    let explain = format!("EXPLAIN (COSTS OFF) {sql}");
    let plan: Vec<String> = bind(sqlx::query_scalar(&explain), app)
        .fetch_all(&mut claimer)
        .await?;
    claimer.close().await?;
    Ok(plan.join("\n"))
}

#[tokio::test]
async fn a_claim_loop_plans_no_sequential_scan_of_a_short_queue() -> TestResult {
    let plan = short_queue_plan(COMPLETE_AND_CLAIM_SQL, |explain, app| {
        explain
            .bind(100i64)
            .bind("w")
            .bind(30.0f64)
            .bind(Vec::<Uuid>::new())
            .bind(Vec::<i64>::new())
            .bind(vec![app])
            .bind(vec![chrono::Utc::now()])
            .bind(vec![Uuid::nil()])
    })
    .await?;
    assert!(!plan.contains("Seq Scan on outbox"), "{plan}");
    assert!(plan.contains("Tid Scan on outbox"), "{plan}");
    // The scan starts at the app's position: the row comparison bounds the
    // index scan instead of filtering the rows it returns.
    assert!(
        plan.contains("Index Cond: ((app_id = a.id) AND (ROW(run_at, id) >= ROW("),
        "{plan}"
    );
    Ok(())
}

/// The advance of the claim positions looks rows up by transaction id
/// (the range begun since the last snapshot, and the list running then)
/// through the index, never by reading the table or the whole index: while
/// an old snapshot is held, either would walk every row finished since.
#[tokio::test]
async fn the_advance_of_positions_reads_only_index_ranges() -> TestResult {
    let plan = short_queue_plan(ADVANCE_POSITIONS_SQL, |explain, app| {
        explain
            .bind(vec![app])
            .bind(vec![chrono::Utc::now()])
            .bind(vec![Uuid::nil()])
            .bind("100:104:100,102")
            .bind(0.25f64)
    })
    .await?;
    assert!(!plan.contains("Seq Scan on outbox"), "{plan}");
    assert!(plan.contains("Index Cond: (enqueue_xid >= "), "{plan}");
    assert!(plan.contains("Index Cond: (enqueue_xid = ANY "), "{plan}");
    assert!(
        plan.contains("Index Cond: ((app_id = a.id) AND (ROW(run_at, id) >= ROW("),
        "{plan}"
    );
    Ok(())
}

/// While a snapshot is held, vacuum finds few live rows among many dead ones
/// and the statistics say "a few rows"; a lookup by id must still go
/// through the primary key, not through a whole scan of `outbox_due_idx`
/// (which a connection without [`planner_options`] takes).
#[tokio::test]
async fn a_lookup_by_id_takes_the_primary_key_when_a_held_snapshot_bloats_the_outbox() -> TestResult
{
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut holder = PgConnection::connect_with(&db.pool.connect_options()).await?;
    outbox_core::store::stats::hold_transaction_id(&mut holder).await?;
    fill(&db, app, 20_000).await?;
    sqlx::query("DELETE FROM outbox").execute(&db.pool).await?;
    fill(&db, app, 3).await?;
    sqlx::query("VACUUM ANALYZE outbox")
        .execute(&db.pool)
        .await?;
    let mut dispatcher =
        PgConnection::connect_with(&planner_options(&db.pool.connect_options())).await?;
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN (COSTS OFF) DELETE FROM outbox o USING unnest($1::uuid[]) AS t(id) WHERE o.id = t.id",
    )
    .bind(vec![Uuid::nil()])
    .fetch_all(&mut dispatcher)
    .await?;
    let plan = plan.join("\n");
    assert!(plan.contains("using outbox_pkey"), "{plan}");
    // Completing 500 rows reads the primary key for those ids only, whatever
    // the join (a hash join read all of it).
    let ids: Vec<Uuid> = (0..500).map(|_| Uuid::new_v4()).collect();
    let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN (COSTS OFF) {COMPLETE_SQL}"))
        .bind(&ids)
        .bind(vec![1i64; 500])
        .fetch_all(&mut dispatcher)
        .await?;
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index Cond: (id = ANY (") || plan.contains("AND (id = ANY ("),
        "{}",
        plan.chars().take(2000).collect::<String>()
    );
    dispatcher.close().await?;
    holder.close().await?;
    Ok(())
}

#[tokio::test]
async fn vacuum_leaves_an_emptied_outbox_its_pages() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    fill(&db, app, 20_000).await?;
    sqlx::query("VACUUM outbox").execute(&db.pool).await?;
    let pages = || async {
        sqlx::query_scalar::<_, i64>("SELECT pg_relation_size('outbox') / 8192")
            .fetch_one(&db.pool)
            .await
    };
    let full = pages().await?;
    sqlx::query("DELETE FROM outbox").execute(&db.pool).await?;
    sqlx::query("VACUUM outbox").execute(&db.pool).await?;
    assert_eq!(pages().await?, full, "vacuum truncated the outbox");
    Ok(())
}
