//! The fault-injection handlers: their behaviour is chosen by the payload,
//! and they leave a history the chaos harness checks.
//!
//! Every invocation appends `<n> <event id> <attempt> <worker>` to the file
//! named by `CHAOS_HISTORY` before doing anything else, so a process that
//! dies mid-handler still leaves its invocation behind (a `write` reaches the
//! page cache; `kill -9` does not undo it). The effect is a row in
//! `chaos_effects`, keyed by `n`, written in the handler's own transaction
//! (the unique key turns at-least-once invocations into one effect), or in
//! transactional mode through the claim transaction (atomic with the row's
//! deletion).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_dispatch::{Event, HandlerError, Registry};
use serde::Deserialize;
use sqlx::PgPool;

/// The topic whose payload picks the behaviour.
pub const TOPIC: &str = "chaos.work";

/// What a `chaos.work` payload asks for. A payload that does not decode
/// (e.g. `"sleep_ms": "soon"`) is a permanent error: the poison scenario.
#[derive(Debug, Deserialize)]
struct Work {
    n: i64,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    sleep_ms: u64,
}

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Mode {
    /// Write the effect.
    #[default]
    Ok,
    /// Fail the first attempt, then succeed.
    Flaky,
    /// Sleep `sleep_ms`, then write the effect.
    Slow,
    /// Fail for good.
    Permanent,
    /// Panic inside the handler.
    Panic,
    /// Abort the whole process (the attempt was counted at claim).
    Abort,
}

/// The chaos handlers; they write their effects through `pool`.
pub fn registry(pool: PgPool) -> anyhow::Result<Registry> {
    let path = std::env::var("CHAOS_HISTORY")
        .map_err(|_| anyhow::anyhow!("the chaos worker needs CHAOS_HISTORY (the history file)"))?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open the chaos history {path}: {e}"))?;
    let log = Arc::new(Mutex::new(file));
    let worker = format!("pid{}", std::process::id());
    let mut registry = Registry::new();
    registry.register(TOPIC, move |event: Event| {
        let pool = pool.clone();
        let log = log.clone();
        let worker = worker.clone();
        async move {
            let n = event.payload["n"].as_i64().unwrap_or(-1);
            record(
                &log,
                &format!("{n} {} {} {worker}\n", event.id, event.attempt),
            )?;
            let work: Work = event.payload_as()?;
            match work.mode {
                Mode::Ok => {}
                Mode::Flaky if event.attempt < 2 => {
                    return Err(HandlerError::retry("flaky: first attempt fails"));
                }
                Mode::Flaky => {}
                Mode::Slow => tokio::time::sleep(Duration::from_millis(work.sleep_ms)).await,
                Mode::Permanent => return Err(HandlerError::permanent("permanent by request")),
                Mode::Panic => panic!("chaos: handler panics on request"),
                // The history line is already written: `File` does not buffer.
                Mode::Abort => std::process::abort(),
            }
            write_effect(&pool, work.n, &event, &worker).await
        }
    });
    Ok(registry)
}

fn record(log: &Mutex<std::fs::File>, line: &str) -> Result<(), HandlerError> {
    let mut file = log
        .lock()
        .map_err(|_| HandlerError::retry("chaos history lock poisoned"))?;
    file.write_all(line.as_bytes())
        .map_err(|e| HandlerError::retry(format!("chaos history: {e}")))
}

async fn write_effect(
    pool: &PgPool,
    n: i64,
    event: &Event,
    worker: &str,
) -> Result<(), HandlerError> {
    // In transactional mode the effect commits with the row's deletion.
    if let Some(claim) = event.claim_tx() {
        return insert_effect(&mut *claim.lock().await?, n, event, worker).await;
    }
    let mut tx = pool.begin().await.map_err(HandlerError::retry)?;
    insert_effect(&mut tx, n, event, worker).await?;
    tx.commit().await.map_err(HandlerError::retry)
}

async fn insert_effect(
    conn: &mut sqlx::PgConnection,
    n: i64,
    event: &Event,
    worker: &str,
) -> Result<(), HandlerError> {
    sqlx::query(
        "INSERT INTO chaos_effects (n, event_id, attempt, worker, worker_clock)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (n) DO NOTHING",
    )
    .bind(n)
    .bind(event.id)
    .bind(event.attempt)
    .bind(worker)
    .bind(chrono::Utc::now())
    .execute(conn)
    .await
    .map_err(HandlerError::retry)?;
    Ok(())
}
