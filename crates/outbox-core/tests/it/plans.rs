//! The hot statements keep their index and TID scans when the statistics
//! describe a short queue, which is what they describe most of the time.

use outbox_core::store::outbox::{
    ADVANCE_POSITIONS_SQL, COMPLETE_AND_CLAIM_SQL, COMPLETE_SQL, DEAD_LETTER_SQL, HEARTBEAT_SQL,
    LOCK_IDS_SQL, RESCHEDULE_SQL, claim_connect_options, planner_options,
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

/// With sequential scans off, a statement on a table without a usable index
/// is costed past `jit_above_cost`; compiled, a beat of a millisecond took
/// hundreds of ms of CPU every second.
#[tokio::test]
async fn a_dispatcher_connection_compiles_no_statement_to_machine_code() -> TestResult {
    let db = TestDb::new().await?;
    let mut conn = PgConnection::connect_with(&planner_options(&db.pool.connect_options())).await?;
    let jit: String = sqlx::query_scalar("SHOW jit").fetch_one(&mut conn).await?;
    assert_eq!(jit, "off");
    let plan: Vec<String> =
        sqlx::query_scalar("EXPLAIN (ANALYZE, COSTS ON) SELECT count(*) FROM outbox_processes WHERE expires_at < now()")
            .fetch_all(&mut conn)
            .await?;
    let plan = plan.join("\n");
    assert!(plan.contains("Seq Scan"), "{plan}");
    assert!(!plan.contains("JIT"), "{plan}");
    conn.close().await?;
    Ok(())
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
            .bind(false)
            .bind(vec!["t"])
            .bind(vec!["^x\\."])
            .bind(Vec::<String>::new())
            .bind(vec!["paused"])
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
            .bind(false)
            .bind(vec!["t"])
            .bind(vec!["^x\\."])
            .bind(Vec::<String>::new())
            .bind(vec!["paused"])
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

/// While a snapshot is held, vacuum finds few live rows (or none) among many
/// dead ones and the statistics say so: every read of a whole index then
/// looks as cheap as probing the primary key. Each statement that takes rows
/// by id must still probe the primary key once per id and change rows by
/// `ctid`, never read all of an index (a completion read 1.6 million buffers
/// of `outbox_due_idx` that way).
#[tokio::test]
async fn lookups_by_id_probe_the_primary_key_when_a_held_snapshot_bloats_the_outbox() -> TestResult
{
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut holder = PgConnection::connect_with(&db.pool.connect_options()).await?;
    outbox_core::store::stats::hold_transaction_id(&mut holder).await?;
    fill(&db, app, 20_000).await?;
    sqlx::query("DELETE FROM outbox").execute(&db.pool).await?;
    let mut dispatcher =
        PgConnection::connect_with(&claim_connect_options(&db.pool.connect_options())).await?;
    let ids: Vec<Uuid> = (0..500).map(|_| Uuid::new_v4()).collect();
    let tokens = vec![1i64; 500];
    let texts = vec![Some("e"); 500];
    for live in [3, 0] {
        if live > 0 {
            fill(&db, app, live).await?;
        } else {
            sqlx::query("DELETE FROM outbox").execute(&db.pool).await?;
        }
        sqlx::query("VACUUM ANALYZE outbox")
            .execute(&db.pool)
            .await?;
        let statements = [
            ("complete", COMPLETE_SQL),
            ("complete and claim", COMPLETE_AND_CLAIM_SQL),
            ("heartbeat", HEARTBEAT_SQL),
            ("reschedule", RESCHEDULE_SQL),
            ("dead letter", DEAD_LETTER_SQL),
            ("lock ids", LOCK_IDS_SQL),
        ];
        for (name, sql) in statements {
            let explain = format!("EXPLAIN (COSTS OFF) {sql}");
            let query = sqlx::query_scalar::<_, String>(&explain).bind(&ids);
            let query = match name {
                "complete" => query.bind(&tokens),
                "complete and claim" => query
                    .bind(&tokens)
                    .bind(vec![app])
                    .bind(vec![chrono::Utc::now()])
                    .bind(vec![Uuid::nil()]),
                "heartbeat" => query.bind(&tokens).bind(30.0f64),
                "reschedule" => query
                    .bind(&tokens)
                    .bind(vec![1.0f64; 500])
                    .bind(&texts)
                    .bind(vec![false; 500])
                    .bind(10i32)
                    .bind(2000i32),
                "dead letter" => query
                    .bind(&tokens)
                    .bind(&texts)
                    .bind(&texts)
                    .bind(10i32)
                    .bind(2000i32),
                _ => query,
            };
            // complete-and-claim takes its arrays after the limit, worker and
            // lease; the others start with them.
            let query = if name == "complete and claim" {
                sqlx::query_scalar::<_, String>(&explain)
                    .bind(100i64)
                    .bind("w")
                    .bind(30.0f64)
                    .bind(&ids)
                    .bind(&tokens)
                    .bind(vec![app])
                    .bind(vec![chrono::Utc::now()])
                    .bind(vec![Uuid::nil()])
                    .bind(true)
                    .bind(Vec::<String>::new())
                    .bind(Vec::<String>::new())
                    .bind(Vec::<String>::new())
                    .bind(Vec::<String>::new())
            } else {
                query
            };
            let plan = query.fetch_all(&mut dispatcher).await?.join("\n");
            let context = format!("{name}, {live} live rows:\n{plan}");
            assert!(!plan.contains("Seq Scan on outbox"), "{context}");
            // The rows of the ids: probes of the primary key, nothing else.
            let id_scans: Vec<&str> = plan
                .lines()
                .filter(|l| l.contains(" on outbox i") || l.contains(" on outbox o "))
                .filter(|l| !l.contains("outbox o_"))
                .collect();
            // A completion probes with its array, the others with one id each.
            let probe = if name.starts_with("complete") {
                "Index Cond: (id = ANY ("
            } else {
                "Index Cond: (id = t"
            };
            assert!(
                plan.contains("Index Scan using outbox_pkey on outbox ") && plan.contains(probe),
                "{context}"
            );
            for scan in id_scans {
                assert!(
                    scan.contains("Tid Scan") || scan.contains("using outbox_pkey"),
                    "{context}"
                );
            }
            assert!(
                !plan.contains("outbox_due_idx on outbox o ")
                    && !plan.contains("outbox_due_idx on outbox i"),
                "{context}"
            );
        }
    }
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
