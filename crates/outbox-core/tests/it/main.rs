//! Integration tests of enqueue and the stores against a real PostgreSQL.
mod browse;
mod cancel;
mod compaction;
mod enqueue;
mod history;
mod inspect;
mod leases;
mod limits;
mod plans;
mod positions;
mod priorities;
mod replay;
mod segments;
mod state_machine;
mod subscriptions;
mod wake;

/// Enqueues `n` plain events of topic `t` for `app` and commits them.
async fn enqueue_committed(
    db: &outbox_testkit::TestDb,
    app: uuid::Uuid,
    n: u64,
) -> Result<(), outbox_core::Error> {
    let events: Vec<outbox_core::NewEvent> = (0..n)
        .map(|n| outbox_core::NewEvent::new("t", serde_json::json!({ "n": n })))
        .collect();
    let mut tx = db.pool.begin().await?;
    outbox_core::enqueue_batch(&mut tx, app, &events).await?;
    tx.commit().await?;
    Ok(())
}

/// The heartbeat of a live dispatcher of version `version` on host
/// `web-1` (pid 42), as one of an earlier version left it.
async fn live_dispatcher(db: &outbox_testkit::TestDb, version: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO outbox_processes (id, worker, host, pid, version, expires_at)
         VALUES ($1, 'old', 'web-1', 42, $2, now() + interval '30 seconds')",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(version)
    .execute(&db.pool)
    .await?;
    Ok(())
}
