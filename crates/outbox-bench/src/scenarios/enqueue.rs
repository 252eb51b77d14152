//! (b) Enqueue: one row per transaction from several producers, and
//! batches of two sizes, against plain INSERTs of the same row shape.

use std::time::Instant;

use outbox_core::{NewEvent, enqueue as enqueue_one, enqueue_batch};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::bench::Bench;
use crate::support::{BATCH, median, truncate};

/// The large batch: where a per-row saving outweighs a transaction's fixed
/// costs (its round trips and the commit's flush).
const LARGE_BATCH: usize = 1000;

/// Raw and outboxd alternate for as many rounds as the drain (the machine
/// drifts), each figure the median of its rounds.
pub async fn enqueue(b: &mut Bench) -> anyhow::Result<()> {
    let (app, raw_app, producers) = (b.app, b.raw_app, b.args.producers);
    let mut rates: [Vec<f64>; 6] = Default::default();
    for round in 0..b.args.drain_rounds {
        eprintln!(
            "bench: enqueue, round {} of {}",
            round + 1,
            b.args.drain_rounds
        );
        for (i, (target, producers, per_txn, writer)) in [
            (raw_app, producers, 1, Writer::Raw),
            (app, producers, 1, Writer::Outboxd),
            (raw_app, 1, BATCH, Writer::Raw),
            (app, 1, BATCH, Writer::Outboxd),
            (raw_app, 1, LARGE_BATCH, Writer::Raw),
            (app, 1, LARGE_BATCH, Writer::Outboxd),
        ]
        .into_iter()
        .enumerate()
        {
            rates[i].push(
                insert_rate(
                    &b.pool,
                    target,
                    b.args.enqueue_rows,
                    producers,
                    per_txn,
                    writer,
                )
                .await?,
            );
            truncate(&b.pool).await?;
        }
    }
    let [raw_single, single, raw_batch, batch, raw_large, large] = rates.map(median);
    b.figure(
        "enqueue",
        format!("raw insert: 1 row/txn, {} producers", b.args.producers),
        raw_single,
        "rows/s",
        None,
    );
    b.figure(
        "enqueue",
        format!("raw insert: {BATCH} rows/txn (unnest), 1 producer"),
        raw_batch,
        "rows/s",
        None,
    );
    b.figure(
        "enqueue",
        format!("raw insert: {LARGE_BATCH} rows/txn (unnest), 1 producer"),
        raw_large,
        "rows/s",
        None,
    );
    b.figure(
        "enqueue",
        format!(
            "outboxd enqueue: 1 event/txn, {} producers",
            b.args.producers
        ),
        single,
        "events/s",
        Some((raw_single, "raw 1-row insert")),
    );
    b.figure(
        "enqueue",
        format!("outboxd enqueue_batch: {BATCH} events/txn"),
        batch,
        "events/s",
        Some((raw_batch, "raw batch insert")),
    );
    b.figure(
        "enqueue",
        format!("outboxd enqueue_batch: {LARGE_BATCH} events/txn"),
        large,
        "events/s",
        Some((raw_large, "raw batch insert")),
    );
    Ok(())
}

/// How the enqueue scenario writes rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    /// Plain INSERTs of the same row shape (the baseline).
    Raw,
    /// `enqueue` / `enqueue_batch`.
    Outboxd,
}

/// `producers` tasks write `rows` rows in transactions of `per_txn`; returns
/// rows per second.
async fn insert_rate(
    pool: &PgPool,
    app: Uuid,
    rows: u32,
    producers: u32,
    per_txn: usize,
    writer: Writer,
) -> anyhow::Result<f64> {
    let per_producer = rows / producers;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..producers {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u32;
            while done < per_producer {
                let n = (per_producer - done).min(per_txn as u32) as usize;
                let payloads: Vec<serde_json::Value> =
                    (0..n).map(|i| json!({"n": done as usize + i})).collect();
                let mut tx = pool.begin().await?;
                write_rows(&mut tx, app, payloads, writer).await?;
                tx.commit().await?;
                done += n as u32;
            }
            Ok::<u32, anyhow::Error>(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Writes `payloads` as `bench.noop` rows of `app` in the caller's
/// transaction, the way `writer` does.
async fn write_rows(
    conn: &mut sqlx::PgConnection,
    app: Uuid,
    payloads: Vec<serde_json::Value>,
    writer: Writer,
) -> anyhow::Result<()> {
    match (writer, payloads.len()) {
        (Writer::Raw, 1) => {
            // Baseline: a plain single-row INSERT, the raw-SQL ceiling for
            // `enqueue`, on purpose.
            sqlx::query(
                "INSERT INTO outbox (id, app_id, topic, payload) VALUES ($1, $2, 'bench.noop', $3)",
            )
            .bind(Uuid::now_v7())
            .bind(app)
            .bind(&payloads[0])
            .execute(conn)
            .await?;
        }
        (Writer::Raw, n) => {
            let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
            // Baseline: a plain batch INSERT (unnest), the raw-SQL ceiling
            // for `enqueue_batch`, on purpose.
            sqlx::query(
                "INSERT INTO outbox (id, app_id, topic, payload)
                 SELECT u.id, $1, 'bench.noop', u.payload FROM unnest($2::uuid[], $3::jsonb[]) AS u(id, payload)",
            )
            .bind(app)
            .bind(&ids)
            .bind(&payloads)
            .execute(conn)
            .await?;
        }
        (Writer::Outboxd, 1) => {
            let event = NewEvent::new(
                "bench.noop",
                payloads.into_iter().next().unwrap_or_default(),
            );
            enqueue_one(conn, app, &event).await?;
        }
        (Writer::Outboxd, _) => {
            let events: Vec<NewEvent> = payloads
                .into_iter()
                .map(|p| NewEvent::new("bench.noop", p))
                .collect();
            enqueue_batch(conn, app, &events).await?;
        }
    }
    Ok(())
}
