//! `outbox_core::enqueue` and `enqueue_batch`, and the SQL function
//! `outbox_enqueue`: what they store and what they refuse. (The tests that
//! need a dispatcher to see a row handled stay in outbox-dispatch.)

use outbox_core::{NewEvent, Source, enqueue, enqueue_batch};
use outbox_testkit::TestDb;
use serde_json::json;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn payload(n: u64) -> serde_json::Value {
    json!({ "n": n })
}

#[tokio::test]
async fn batch_enqueue_keeps_order_and_options() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let events: Vec<NewEvent> = (0..500)
        .map(|n| {
            let e = NewEvent::new("bulk", payload(n)).with_max_attempts(3);
            if n == 0 { e.with_run_at(later) } else { e }
        })
        .collect();
    let mut tx = db.pool.begin().await?;
    let ids = enqueue_batch(&mut tx, app, &events).await?;
    tx.commit().await?;
    assert_eq!(ids.len(), 500);
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "UUIDv7 ids are time-ordered"
    );
    let (n, max_attempts): (i64, i32) =
        sqlx::query_as("SELECT count(*), min(max_attempts) FROM outbox WHERE app_id = $1")
            .bind(app)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!((n, max_attempts), (500, 3));
    let delayed: bool = sqlx::query_scalar(
        "SELECT run_at > now() + interval '59 minutes' FROM outbox WHERE id = $1",
    )
    .bind(ids[0])
    .fetch_one(&db.pool)
    .await?;
    assert!(delayed);
    Ok(())
}

#[tokio::test]
async fn a_plain_batch_stores_the_same_rows_as_the_full_statement() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    // Plain events take the short statement, or COPY from 64 of them on; one
    // event with a header sends the whole batch through the full statement.
    // The stored rows must not differ. The payloads carry what a text format
    // would have to escape.
    let tricky = |n: u64| json!({ "n": n, "s": "quote \" backslash \\ tab \t newline \n \\N é 😀", "nested": [1.5, null, {"k": true}] });
    let event = |n: u64| NewEvent::new("bulk", tricky(n)).with_source(Source::Pubsub);
    let short: Vec<NewEvent> = (0..3).map(event).collect();
    let copied: Vec<NewEvent> = (0..200).map(event).collect();
    let mut full = short.clone();
    full.push(NewEvent::new("bulk", payload(9)).with_headers(serde_json::json!({"k": "v"})));
    let mut tx = db.pool.begin().await?;
    let short_ids = enqueue_batch(&mut tx, app, &short).await?;
    let copied_ids = enqueue_batch(&mut tx, app, &copied).await?;
    let full_ids = enqueue_batch(&mut tx, app, &full).await?;
    tx.commit().await?;
    // Every column but the ones that differ by nature (id, times, xid).
    let stored = |ids: Vec<uuid::Uuid>| {
        sqlx::query_scalar::<_, serde_json::Value>(
            "SELECT to_jsonb(o) - 'id' - 'created_at' - 'run_at' - 'enqueue_xid'
             FROM outbox o WHERE id = ANY($1) ORDER BY id",
        )
        .bind(ids)
        .fetch_all(&db.pool)
    };
    let stored_short = stored(short_ids).await?;
    let stored_full = stored(full_ids[..3].to_vec()).await?;
    assert_eq!(stored_short.len(), 3);
    assert_eq!(stored_short, stored_full);
    assert!(copied_ids.windows(2).all(|w| w[0] < w[1]));
    let stored_copied = stored(copied_ids.clone()).await?;
    assert_eq!(stored_copied.len(), 200);
    assert_eq!(stored_copied[..3], stored_full[..]);
    for (n, row) in stored_copied.iter().enumerate() {
        assert_eq!(row["payload"], tricky(n as u64), "row {n}");
    }
    Ok(())
}

#[tokio::test]
async fn a_copied_batch_for_an_unknown_app_or_with_a_bad_event_stores_nothing() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let events: Vec<NewEvent> = (0..100)
        .map(|n| NewEvent::new("bulk", payload(n)))
        .collect();
    let mut tx = db.pool.begin().await?;
    let err = enqueue_batch(&mut tx, uuid::Uuid::new_v4(), &events)
        .await
        .unwrap_err();
    assert!(matches!(err, outbox_core::Error::UnknownApp(_)), "{err}");
    tx.rollback().await?;
    let mut bad = events.clone();
    bad[70] = NewEvent::new("", payload(70));
    let mut conn = db.pool.acquire().await?;
    let err = enqueue_batch(&mut conn, app, &bad).await.unwrap_err();
    assert!(err.to_string().contains("topic"), "{err}");
    // \u0000 is valid JSON but not storable in jsonb: the server refuses the
    // COPY, and the connection stays usable.
    let mut nul = events.clone();
    nul[99] = NewEvent::new("bulk", json!({ "s": "\u{0}" }));
    assert!(enqueue_batch(&mut conn, app, &nul).await.is_err());
    assert_eq!(outbox_core::store::outbox::count(&mut *conn).await?, 0);
    enqueue_batch(&mut conn, app, &events).await?;
    assert_eq!(outbox_core::store::outbox::count(&mut *conn).await?, 100);
    Ok(())
}

#[tokio::test]
async fn invalid_events_are_refused_with_the_field_named() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let mut conn = db.pool.acquire().await?;
    let err = enqueue(&mut conn, app, &NewEvent::new("", payload(1)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("topic"), "{err}");
    for topic in ["a b", "a..b", "orders.", "a*b"] {
        let err = enqueue(&mut conn, app, &NewEvent::new(topic, payload(1)))
            .await
            .unwrap_err();
        assert!(
            err.to_string().starts_with("invalid topic"),
            "{topic}: {err}"
        );
    }
    // A webhook's URL is checked as a URL, not as subject tokens.
    enqueue(
        &mut conn,
        app,
        &NewEvent::new("webhook:https://hooks.example.com/a..b", payload(1)),
    )
    .await?;
    sqlx::query("DELETE FROM outbox")
        .execute(&mut *conn)
        .await?;
    // The SQL function agrees.
    sqlx::query("SELECT outbox_enqueue('shop', 'webhook:https://hooks.example.com/a..b')")
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM outbox")
        .execute(&mut *conn)
        .await?;
    let err = enqueue(
        &mut conn,
        uuid::Uuid::new_v4(),
        &NewEvent::new("t", payload(1)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, outbox_core::Error::UnknownApp(_)), "{err}");
    assert_eq!(outbox_core::store::outbox::count(&db.pool).await?, 0);
    Ok(())
}

#[tokio::test]
async fn sql_function_refuses_bad_arguments_with_stable_sqlstates_and_no_row() -> TestResult {
    let db = TestDb::new().await?;
    db.app("shop").await?;
    let long = "t".repeat(256);
    // 256 characters, one more than a key may have (counted in characters,
    // as the table's checks count them).
    let wide = "é".repeat(256);
    // (call, SQLSTATE, what the message says): 23503 unknown app, 23502 a
    // required value is NULL, 23514 a value out of its range (the function
    // names the argument), 22P02 text that is not JSON, 22P05 \u0000 in
    // JSON, 22007 a bad timestamp.
    let cases: Vec<(String, &str, &str)> = vec![
        (
            "SELECT outbox_enqueue('nope', 't')".into(),
            "23503",
            "unknown app",
        ),
        (
            "SELECT outbox_enqueue(NULL, 't')".into(),
            "23503",
            "unknown app",
        ),
        (
            "SELECT outbox_enqueue('''; DROP TABLE outbox; --', 't')".into(),
            "23503",
            "unknown app",
        ),
        (
            "SELECT outbox_enqueue('shop', NULL)".into(),
            "23502",
            "topic",
        ),
        (
            "SELECT outbox_enqueue('shop', '')".into(),
            "23514",
            "invalid topic",
        ),
        (
            format!("SELECT outbox_enqueue('shop', '{long}')"),
            "23514",
            "invalid topic",
        ),
        (
            "SELECT outbox_enqueue('shop', 'orders.*')".into(),
            "23514",
            "is a pattern",
        ),
        (
            r"SELECT outbox_enqueue('shop', E'a\nb')".into(),
            "23514",
            "control characters",
        ),
        // What cannot become NATS subject tokens (migration 0041).
        (
            "SELECT outbox_enqueue('shop', 'a b')".into(),
            "23514",
            "must not contain whitespace",
        ),
        (
            "SELECT outbox_enqueue('shop', 'a' || chr(160) || 'b')".into(),
            "23514",
            "must not contain whitespace",
        ),
        (
            "SELECT outbox_enqueue('shop', 'a' || chr(8203) || 'b')".into(),
            "23514",
            "control characters",
        ),
        (
            "SELECT outbox_enqueue('shop', 'a..b')".into(),
            "23514",
            "empty name",
        ),
        (
            "SELECT outbox_enqueue('shop', '.a')".into(),
            "23514",
            "empty name",
        ),
        (
            "SELECT outbox_enqueue('shop', 'a*b')".into(),
            "23514",
            "hold no '*' or '>'",
        ),
        (
            "SELECT outbox_enqueue('shop', 'webhook:not-a-url')".into(),
            "23514",
            "a webhook topic is webhook:http(s)://host/path",
        ),
        (
            "SELECT outbox_enqueue('shop', 'webhook:https://h/a b')".into(),
            "23514",
            "a webhook topic is webhook:http(s)://host/path",
        ),
        (
            "SELECT outbox_enqueue('shop', 'a.')".into(),
            "23514",
            "empty name",
        ),
        (
            "SELECT outbox_enqueue('shop', 'a>b')".into(),
            "23514",
            "hold no '*' or '>'",
        ),
        (
            "SELECT outbox_enqueue('shop', 't', p_source => NULL)".into(),
            "23502",
            "source must not be NULL",
        ),
        (
            "SELECT outbox_enqueue('shop', 'a' || chr(8238) || 'b')".into(),
            "23514",
            "control characters",
        ),
        (
            "SELECT outbox_enqueue('shop', 't', p_idempotency_key => '')".into(),
            "23514",
            "invalid idempotency_key",
        ),
        (
            "SELECT outbox_enqueue('shop', 't', p_ordering_key => '')".into(),
            "23514",
            "invalid ordering_key",
        ),
        (
            format!("SELECT outbox_enqueue('shop', 't', p_partition_key => '{wide}')"),
            "23514",
            "invalid partition_key",
        ),
        (
            "SELECT outbox_enqueue('shop', 't', p_source => 'bogus')".into(),
            "23514",
            "invalid source 'bogus'",
        ),
        (
            "SELECT outbox_enqueue('shop', 't', p_max_attempts => 0)".into(),
            "23514",
            "invalid max_attempts 0",
        ),
        (
            "SELECT outbox_enqueue('shop', 't', p_priority => -1)".into(),
            "23514",
            "invalid priority -1",
        ),
        (
            "SELECT outbox_enqueue('shop', 't', '{not json')".into(),
            "22P02",
            "json",
        ),
        (
            r#"SELECT outbox_enqueue('shop', 't', '{"a": "\u0000"}')"#.into(),
            "22P05",
            "Unicode escape",
        ),
        (
            "SELECT outbox_enqueue('shop', 't', p_run_at => 'someday')".into(),
            "22007",
            "someday",
        ),
        (
            "SELECT outbox_enqueue('shop', 't', p_headers => '[1]')".into(),
            "23514",
            "invalid headers",
        ),
    ];
    let mut wrong = Vec::new();
    for (call, state, says) in &cases {
        match sqlx::query(call).execute(&db.pool).await {
            Ok(_) => wrong.push(format!("{call}: accepted")),
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some(*state) && e.message().contains(says) => {}
            Err(e) => wrong.push(format!(
                "{call}: want SQLSTATE {state} saying {says:?}, got {e:?}"
            )),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(outbox_core::store::outbox::count(&db.pool).await?, 0);
    Ok(())
}

/// Migration 0038 creates `outbox_enqueue()` again (its priority became an
/// integer): a producer role granted the old function may call the new one,
/// and PUBLIC, whose EXECUTE had been revoked, does not get it back.
#[tokio::test]
async fn the_upgrade_of_the_sql_function_keeps_who_may_call_it() -> TestResult {
    let db = TestDb::migrated_to(37).await?;
    let role = format!("producer_{}", uuid::Uuid::new_v4().simple());
    let old = "outbox_enqueue(text, text, jsonb, timestamptz, text, text, integer, jsonb, text, smallint, text)";
    for statement in [
        format!("CREATE ROLE {role}"),
        format!("REVOKE ALL ON FUNCTION {old} FROM PUBLIC"),
        format!("GRANT EXECUTE ON FUNCTION {old} TO {role}"),
    ] {
        sqlx::query(&statement).execute(&db.pool).await?;
    }
    let upgraded = outbox_core::migrate(&db.pool).await;
    let may_call: Result<(bool, bool), sqlx::Error> = sqlx::query_as(
        "SELECT has_function_privilege($1, p.oid, 'EXECUTE'),
                EXISTS (SELECT 1
                        FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                        WHERE a.grantee = 0)
         FROM pg_proc p WHERE p.proname = 'outbox_enqueue'",
    )
    .bind(&role)
    .fetch_one(&db.pool)
    .await;
    // Roles belong to the server, not to the test's database.
    sqlx::query(&format!("DROP OWNED BY {role}"))
        .execute(&db.pool)
        .await?;
    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(&db.pool)
        .await?;
    upgraded?;
    assert_eq!(may_call?, (true, false), "(the role may call, PUBLIC may)");
    db.app("shop").await?;
    sqlx::query("SELECT outbox_enqueue('shop', 't', p_priority => 5)")
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// Default privileges changed since the old function was made (here: new
/// functions no longer executable by PUBLIC) do not take from the new one
/// what the old one gave: PUBLIC keeps EXECUTE.
#[tokio::test]
async fn the_upgrade_of_the_sql_function_ignores_later_default_privileges() -> TestResult {
    let db = TestDb::migrated_to(37).await?;
    sqlx::query("ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC")
        .execute(&db.pool)
        .await?;
    outbox_core::migrate(&db.pool).await?;
    let public_may: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1
                        FROM pg_proc p,
                             aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                        WHERE p.proname = 'outbox_enqueue' AND a.grantee = 0)",
    )
    .fetch_one(&db.pool)
    .await?;
    assert!(public_may, "PUBLIC lost EXECUTE on outbox_enqueue()");
    Ok(())
}

/// A call whose idempotency key is held by a row that finishes between the
/// call's insert and its look-up inserts again: it never answers NULL.
/// (Before migration 0038 a deleter racing two producers made some calls
/// answer NULL and write nothing.)
#[tokio::test]
async fn the_sql_function_never_answers_null_while_the_keys_row_keeps_finishing() -> TestResult {
    let db = TestDb::with_pool_size(4).await?;
    db.app("shop").await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let deleter = {
        let (pool, stop) = (db.pool.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sqlx::query("DELETE FROM ONLY outbox WHERE idempotency_key = 'k'")
                    .execute(&pool)
                    .await?;
            }
            Ok::<_, sqlx::Error>(())
        })
    };
    let producers: Vec<_> = (0..2)
        .map(|_| {
            let pool = db.pool.clone();
            tokio::spawn(async move {
                let mut nulls = 0;
                for _ in 0..1500 {
                    let id: Option<uuid::Uuid> = sqlx::query_scalar(
                        "SELECT outbox_enqueue('shop', 't', p_idempotency_key => 'k')",
                    )
                    .fetch_one(&pool)
                    .await?;
                    nulls += usize::from(id.is_none());
                }
                Ok::<_, sqlx::Error>(nulls)
            })
        })
        .collect();
    let mut nulls = 0;
    for producer in producers {
        nulls += producer.await??;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    deleter.await??;
    assert_eq!(nulls, 0, "calls that answered NULL");
    Ok(())
}

/// Named statements on the server connection, except this query's own.
async fn prepared_inserts(conn: &mut sqlx::PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%INSERT ' || 'INTO outbox%'",
    )
    .fetch_one(conn)
    .await
}

/// Inserts are prepared (one round trip each) only on a connection whose
/// statement cache is in use: never on one made for a transaction-pooling
/// PgBouncer, which has no cache, where a named statement would be left
/// behind for the next client of the server connection.
#[tokio::test]
async fn inserts_are_prepared_only_on_a_connection_that_keeps_prepared_statements() -> TestResult {
    use sqlx::Connection;
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let event = NewEvent::new("t", payload(1));
    let batch: Vec<NewEvent> = (0..10).map(|n| NewEvent::new("t", payload(n))).collect();

    let pooled = outbox_core::store::pooled_connect_options(&db.pool.connect_options());
    let mut conn = sqlx::PgConnection::connect_with(&pooled).await?;
    sqlx::query("SELECT $1::int")
        .bind(1)
        .execute(&mut conn)
        .await?;
    enqueue(&mut conn, app, &event).await?;
    enqueue_batch(&mut conn, app, &batch).await?;
    assert_eq!(conn.cached_statements_size(), 0);

    let mut direct = sqlx::PgConnection::connect_with(&db.pool.connect_options()).await?;
    enqueue(&mut direct, app, &event).await?;
    assert_eq!(direct.cached_statements_size(), 0, "nothing cached yet");
    sqlx::query("SELECT $1::int")
        .bind(1)
        .execute(&mut direct)
        .await?;
    enqueue(&mut direct, app, &event).await?;
    enqueue_batch(&mut direct, app, &batch).await?;
    enqueue(&mut direct, app, &event).await?;
    // One insert of each shape, or two of one when the current segment
    // changed between them (another test's database rotated).
    let cached = direct.cached_statements_size();
    let prepared = prepared_inserts(&mut direct).await?;
    assert!(prepared >= 2, "{prepared} prepared inserts");
    assert_eq!(cached as i64, prepared + 1, "the inserts and the SELECT");
    // The query above is prepared and cached too (it does not count itself).
    assert_eq!(prepared_inserts(&mut conn).await?, 0);
    assert_eq!(outbox_core::store::outbox::count(&db.pool).await?, 24);
    Ok(())
}

/// Migration 0039: a `run_at` outside the years 1970 to 9999 broke every
/// reader of its row (and the leader's state sample of every app). Rows
/// already there are moved to the nearest bound; then the SQL function
/// refuses such a `run_at`, and the library names it.
#[tokio::test]
async fn a_run_at_outside_the_years_1970_to_9999_is_refused_and_old_ones_are_moved_into_them()
-> TestResult {
    let db = TestDb::migrated_to(38).await?;
    let app = db.app("shop").await?;
    let far = ["infinity", "-infinity", "294276-12-31 00:00:00+00"];
    for at in far {
        sqlx::query("SELECT outbox_enqueue('shop', 'far', '{}', $1::timestamptz)")
            .bind(at)
            .execute(&db.pool)
            .await?;
    }
    outbox_core::migrate(&db.pool).await?;
    let moved: Vec<String> = sqlx::query_scalar(
        "SELECT to_char(run_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') FROM outbox
         WHERE topic = 'far' ORDER BY run_at",
    )
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(moved, ["1970-01-01", "9999-12-31", "9999-12-31"]);
    for at in far {
        let refused = sqlx::query("SELECT outbox_enqueue('shop', 'far', '{}', $1::timestamptz)")
            .bind(at)
            .execute(&db.pool)
            .await
            .err()
            .ok_or(format!("{at} was taken"))?;
        let code = refused
            .as_database_error()
            .and_then(|e| e.code())
            .unwrap_or_default()
            .into_owned();
        assert_eq!(code, "23514", "{at}: {refused}");
        assert!(refused.to_string().contains("run_at"), "{refused}");
    }
    let mut tx = db.pool.begin().await?;
    let refused = enqueue(
        &mut tx,
        app,
        &NewEvent::new("far", json!({})).with_run_at(chrono::DateTime::<chrono::Utc>::MIN_UTC),
    )
    .await
    .err()
    .ok_or("the library took it")?;
    assert!(refused.to_string().contains("run_at"), "{refused}");
    Ok(())
}
