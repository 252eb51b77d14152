//! Producers through a real transaction-pooling PgBouncer (started by
//! `scripts/test.sh`, which exports `PGBOUNCER_ADDR`): `outboxd enqueue`,
//! the library's `enqueue` from many tasks at once and a batch sent with
//! `COPY`, and the SQL function;
//! and the commands that need a direct connection refuse, saying why.

use futures::future::try_join_all;
use outbox_core::{NewEvent, enqueue, enqueue_batch};
use outbox_testkit::TestDb;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::support::{TestResult, outboxd, run, text};

/// `db`'s URL with PgBouncer's address instead of the server's.
fn through_pgbouncer(db: &TestDb) -> Result<String, Box<dyn std::error::Error>> {
    let bouncer = std::env::var("PGBOUNCER_ADDR").map_err(
        |_| "PGBOUNCER_ADDR is not set: run the tests with scripts/test.sh, which starts PgBouncer",
    )?;
    let (scheme_user, rest) = db.url.split_once('@').ok_or("no @ in the test URL")?;
    let (_, database) = rest.split_once('/').ok_or("no database in the test URL")?;
    Ok(format!("{scheme_user}@{bouncer}/{database}"))
}

#[tokio::test]
async fn producers_enqueue_through_a_transaction_pooling_pgbouncer() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let pooled_url = through_pgbouncer(&db)?;

    // The CLI, told what is in front of the server.
    for n in 0..3 {
        let out = run(outboxd(Some(&pooled_url))
            .env("OUTBOXD_DATABASE__POOLER", "transaction")
            .args(["enqueue", "--app", "shop", "--topic", "cli"])
            .args(["--payload", &json!({ "n": n }).to_string()]))?;
        assert!(out.status.success(), "{}", text(&out.stderr));
    }

    // The library, from more tasks than PgBouncer has server connections
    // for this database, so transactions share server connections.
    let options: PgConnectOptions = pooled_url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(40)
        .connect_with(outbox_core::store::pooled_connect_options(&options))
        .await?;
    try_join_all((0..40).map(|task| {
        let pool = pool.clone();
        async move {
            for n in 0..10 {
                let mut tx = pool.begin().await?;
                let event = NewEvent::new("library", json!({ "task": task, "n": n }))
                    .with_idempotency_key(format!("t{task}-{n}"));
                enqueue(&mut tx, app, &event).await?;
                tx.commit().await?;
            }
            Ok::<(), outbox_core::Error>(())
        }
    }))
    .await?;

    // The SQL function, as other languages call it: in a transaction, as
    // any statement through a transaction pooler must be.
    for n in 0..3 {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT outbox_enqueue('shop', 'sql', $1)")
            .persistent(false)
            .bind(json!({ "n": n }))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    // A large plain batch, which goes in with COPY.
    let batch: Vec<NewEvent> = (0..100)
        .map(|n| NewEvent::new("copied", json!({ "n": n })))
        .collect();
    let mut tx = pool.begin().await?;
    enqueue_batch(&mut tx, app, &batch).await?;
    tx.commit().await?;
    pool.close().await;

    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT topic, count(*) FROM outbox GROUP BY topic ORDER BY topic")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(
        counts,
        vec![
            ("cli".to_owned(), 3),
            ("copied".to_owned(), 100),
            ("library".to_owned(), 400),
            ("sql".to_owned(), 3)
        ]
    );
    Ok(())
}

#[tokio::test]
async fn what_needs_a_direct_connection_refuses_a_transaction_pooler() -> TestResult {
    let db = TestDb::new().await?;
    let pooled_url = through_pgbouncer(&db)?;
    for (args, what) in [
        (&["run"][..], "the dispatcher"),
        (&["demo"][..], "the dispatcher"),
        (&["migrate"][..], "migrating"),
        (&["app", "list"][..], "this command"),
    ] {
        let out = run(outboxd(Some(&pooled_url))
            .env("OUTBOXD_DATABASE__POOLER", "transaction")
            .args(args))?;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(what) && stderr.contains("needs a direct connection"),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains("database.pooler"), "{stderr}");
    }
    Ok(())
}
