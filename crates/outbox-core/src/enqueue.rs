//! Enqueue in the caller's transaction.
//!
//! The inserts are prepared only on a connection that keeps prepared
//! statements (its statement cache holds one already); on any other they are
//! unnamed: a producer's connection may pass through a transaction-pooling
//! PgBouncer, where a named prepared statement would be left on a server
//! connection another client gets next.
//!
//! Both functions take `&mut PgConnection`, so pass `&mut tx` (or `&mut *tx`)
//! of the transaction that writes your data. That is the whole outbox property:
//! the row commits or rolls back with your data, and no dispatcher can see it
//! before the commit.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::store::segments;
use crate::{Error, NewEvent};

/// The statement `$into!(table, $args…)` once for each segment, in the
/// order of [`segments::TABLES`].
macro_rules! each_segment {
    ($into:ident $(, $arg:literal)*) => {
        [
            $into!("outbox_s0" $(, $arg)*),
            $into!("outbox_s1" $(, $arg)*),
            $into!("outbox_s2" $(, $arg)*),
        ]
    };
}

/// The single-row insert into `$table`, then `$conflict` (the handling of an
/// idempotency key, which only `outbox` has).
macro_rules! insert_one_into {
    ($table:literal, $conflict:literal) => {
        concat!(
            "
    INSERT INTO ",
            $table,
            " (id, app_id, source, op, topic, trigger_id, target, payload, headers,
                                idempotency_key, ordering_key, depth, max_attempts, run_at, reply_to,
                                registered_by_principal, priority, not_before, partition_key)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, ",
            priority_run_at!("coalesce($14, now())", "$17"),
            ", $15, $16, $17, ",
            priority_not_before!("$14", "$17"),
            ", $18)",
            $conflict,
            "
    RETURNING id"
        )
    };
}

const INSERT_ONE: &str = insert_one_into!(
    "outbox",
    "
    ON CONFLICT (app_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING"
);

/// [`INSERT_ONE`] into each segment (no idempotency key, nothing to conflict on).
const INSERT_ONE_SEGMENT: [&str; 3] = each_segment!(insert_one_into, "");

/// The batch insert into `$table`, then `$conflict` (as [`insert_one_into`]).
macro_rules! insert_many_into {
    ($table:literal, $conflict:literal) => {
        concat!(
            "
    INSERT INTO ",
            $table,
            " (id, app_id, source, op, topic, trigger_id, target, payload, headers,
                        idempotency_key, ordering_key, depth, max_attempts, run_at, reply_to,
                        registered_by_principal, priority, not_before, partition_key)
    SELECT u.id, $1, u.source, u.op, u.topic, u.trigger_id, u.target, u.payload, u.headers,
           u.idempotency_key, u.ordering_key, u.depth, u.max_attempts, ",
            priority_run_at!("coalesce(u.run_at, now())", "u.priority"),
            ",
           u.reply_to, u.principal, u.priority, ",
            priority_not_before!("u.run_at", "u.priority"),
            ", u.partition_key
    FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $6::uuid[], $7::text[],
                $8::jsonb[], $9::jsonb[], $10::text[], $11::text[], $12::int4[], $13::int4[],
                $14::timestamptz[], $15::text[], $16::text[], $17::int2[], $18::text[])
         WITH ORDINALITY AS u(id, source, op, topic, trigger_id, target, payload, headers,
                              idempotency_key, ordering_key, depth, max_attempts, run_at,
                              reply_to, principal, priority, partition_key, ord)
    ORDER BY u.ord",
            $conflict,
            "
    RETURNING id"
        )
    };
}

const INSERT_MANY: &str = insert_many_into!(
    "outbox",
    "
    ON CONFLICT (app_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING"
);

/// [`INSERT_MANY`] into each segment.
const INSERT_MANY_SEGMENT: [&str; 3] = each_segment!(insert_many_into, "");

/// [`INSERT_MANY`] for a batch of plain events (see [`is_plain`]): the other
/// columns keep their defaults, so thirteen arrays of NULLs are neither sent nor
/// unpacked, and with no idempotency key nothing can conflict. A plain
/// event is due now, so it always goes to the current segment.
macro_rules! insert_many_plain_into {
    ($table:literal) => {
        concat!(
            "
    INSERT INTO ",
            $table,
            " (id, app_id, source, topic, payload)
    SELECT u.id, $1, u.source, u.topic, u.payload
    FROM unnest($2::uuid[], $3::text[], $4::text[], $5::jsonb[]) AS u(id, source, topic, payload)"
        )
    };
}

const INSERT_MANY_PLAIN: [&str; 3] = each_segment!(insert_many_plain_into);

/// The plain batch again, as a binary `COPY` (see [`copy_plain_batch`]).
/// Defaults, checks and the segment's statement-level insert trigger (which
/// checks the app and wakes a sleeping dispatcher) apply to `COPY` as to
/// `INSERT`.
macro_rules! copy_plain_into {
    ($table:literal) => {
        concat!(
            "COPY ",
            $table,
            " (id, app_id, source, topic, payload) FROM STDIN (FORMAT binary)"
        )
    };
}

const COPY_PLAIN: [&str; 3] = each_segment!(copy_plain_into);

/// From this many plain events on, a batch is sent with `COPY` rather than
/// as arrays unpacked by `unnest`: below it the extra round trip of `COPY`
/// costs more than the parsing of the arrays saves.
const COPY_FROM: usize = 64;

/// [`INSERT_ONE`] for a plain event (see [`is_plain`]): five parameters
/// instead of eighteen, and nothing to conflict on or return.
macro_rules! insert_one_plain_into {
    ($table:literal) => {
        concat!(
            "
    INSERT INTO ",
            $table,
            " (id, app_id, source, topic, payload) VALUES ($1, $2, $3, $4, $5)"
        )
    };
}

const INSERT_ONE_PLAIN: [&str; 3] = each_segment!(insert_one_plain_into);

/// `ONLY`: keys live in `outbox` itself (see [`segments`]), and reading the
/// segments would hold their locks, and so hold off their rotation, until
/// the producer's transaction ends.
const FIND_BY_KEY: &str =
    "SELECT idempotency_key, id FROM ONLY outbox WHERE app_id = $1 AND idempotency_key = ANY($2)";

/// How often an idempotent enqueue retries when the row it collided with
/// disappears (completed) between the insert and the look-up.
const IDEMPOTENCY_RACE_RETRIES: usize = 3;

/// Enqueues one event for `app_id` in the caller's transaction and returns its id.
///
/// With an idempotency key that an existing row of the app already holds, no
/// row is inserted and the existing row's id is returned.
pub async fn enqueue(
    conn: &mut PgConnection,
    app_id: Uuid,
    event: &NewEvent,
) -> Result<Uuid, Error> {
    event.validate()?;
    if is_plain(event) {
        let id = Uuid::now_v7();
        let segment = segments::current_for_insert(conn).await?;
        sqlx::query(INSERT_ONE_PLAIN[segment])
            .persistent(prepares(conn))
            .bind(id)
            .bind(app_id)
            .bind(event.source.as_str())
            .bind(&event.topic)
            .bind(&event.payload)
            .execute(&mut *conn)
            .await
            .map_err(|e| map_insert_error(e, app_id))?;
        return Ok(id);
    }
    let statement = if in_segment(event) {
        INSERT_ONE_SEGMENT[segments::current_for_insert(conn).await?]
    } else {
        INSERT_ONE
    };
    for _ in 0..IDEMPOTENCY_RACE_RETRIES {
        let inserted: Option<Uuid> = sqlx::query_scalar(statement)
            .persistent(prepares(conn))
            .bind(Uuid::now_v7())
            .bind(app_id)
            .bind(event.source.as_str())
            .bind(&event.op)
            .bind(&event.topic)
            .bind(event.trigger_id)
            .bind(&event.target)
            .bind(&event.payload)
            .bind(&event.headers)
            .bind(&event.idempotency_key)
            .bind(&event.ordering_key)
            .bind(event.depth)
            .bind(event.max_attempts)
            .bind(event.run_at)
            .bind(&event.reply_to)
            .bind(&event.registered_by_principal)
            .bind(event.priority)
            .bind(&event.partition_key)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| map_insert_error(e, app_id))?;
        if let Some(id) = inserted {
            return Ok(id);
        }
        // Only an idempotency conflict inserts nothing; look the holder up in a
        // fresh statement so a row committed by a concurrent producer is seen.
        let key = event.idempotency_key.clone().unwrap_or_default();
        let existing: Option<(String, Uuid)> = sqlx::query_as(FIND_BY_KEY)
            .persistent(prepares(conn))
            .bind(app_id)
            .bind(vec![key])
            .fetch_optional(&mut *conn)
            .await?;
        if let Some((_, id)) = existing {
            return Ok(id);
        }
    }
    Err(Error::invalid(
        "idempotency_key",
        "the conflicting row kept disappearing; try again",
    ))
}

/// Enqueues many events for `app_id` in one statement and returns their ids
/// in input order. Idempotency keys behave as in [`enqueue`], also between
/// events of the same batch (the first one wins).
pub async fn enqueue_batch(
    conn: &mut PgConnection,
    app_id: Uuid,
    events: &[NewEvent],
) -> Result<Vec<Uuid>, Error> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let n = events.len();
    if events.iter().all(is_plain) {
        if n >= COPY_FROM {
            return copy_plain_batch(conn, app_id, events).await;
        }
        return enqueue_plain_batch(conn, app_id, events).await;
    }
    let mut ids = Vec::with_capacity(n);
    let mut sources = Vec::with_capacity(n);
    let mut ops = Vec::with_capacity(n);
    let mut topics = Vec::with_capacity(n);
    let mut trigger_ids = Vec::with_capacity(n);
    let mut targets = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut headers = Vec::with_capacity(n);
    let mut idempotency_keys = Vec::with_capacity(n);
    let mut ordering_keys = Vec::with_capacity(n);
    let mut depths = Vec::with_capacity(n);
    let mut max_attempts = Vec::with_capacity(n);
    let mut run_ats: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
    let mut reply_tos = Vec::with_capacity(n);
    let mut principals = Vec::with_capacity(n);
    let mut priorities = Vec::with_capacity(n);
    let mut partition_keys = Vec::with_capacity(n);
    for event in events {
        event.validate()?;
        ids.push(Uuid::now_v7());
        sources.push(event.source.as_str());
        ops.push(event.op.as_str());
        topics.push(event.topic.as_str());
        trigger_ids.push(event.trigger_id);
        targets.push(event.target.as_deref());
        payloads.push(&event.payload);
        headers.push(&event.headers);
        idempotency_keys.push(event.idempotency_key.as_deref());
        ordering_keys.push(event.ordering_key.as_deref());
        depths.push(event.depth);
        max_attempts.push(event.max_attempts);
        run_ats.push(event.run_at);
        reply_tos.push(event.reply_to.as_deref());
        principals.push(event.registered_by_principal.as_deref());
        priorities.push(event.priority);
        partition_keys.push(event.partition_key.as_deref());
    }
    let payloads: Vec<&Value> = payloads;
    let headers: Vec<&Value> = headers;
    let statement = if events.iter().all(in_segment) {
        INSERT_MANY_SEGMENT[segments::current_for_insert(conn).await?]
    } else {
        INSERT_MANY
    };
    let inserted: Vec<Uuid> = sqlx::query_scalar(statement)
        .persistent(prepares(conn))
        .bind(app_id)
        .bind(&ids)
        .bind(&sources)
        .bind(&ops)
        .bind(&topics)
        .bind(&trigger_ids)
        .bind(&targets)
        .bind(&payloads)
        .bind(&headers)
        .bind(&idempotency_keys)
        .bind(&ordering_keys)
        .bind(&depths)
        .bind(&max_attempts)
        .bind(&run_ats)
        .bind(&reply_tos)
        .bind(&principals)
        .bind(&priorities)
        .bind(&partition_keys)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| map_insert_error(e, app_id))?;
    if inserted.len() == n {
        return Ok(ids);
    }
    // Some events collided on their idempotency key: answer with the holders' ids.
    let keys: Vec<String> = events
        .iter()
        .zip(&ids)
        .filter(|(_, id)| !inserted.contains(id))
        .filter_map(|(e, _)| e.idempotency_key.clone())
        .collect();
    let holders: std::collections::HashMap<String, Uuid> = sqlx::query_as(FIND_BY_KEY)
        .persistent(prepares(conn))
        .bind(app_id)
        .bind(&keys)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
    let inserted: std::collections::HashSet<Uuid> = inserted.into_iter().collect();
    events
        .iter()
        .zip(ids)
        .map(|(event, id)| {
            if inserted.contains(&id) {
                return Ok(id);
            }
            event
                .idempotency_key
                .as_ref()
                .and_then(|k| holders.get(k).copied())
                .ok_or_else(|| {
                    Error::invalid(
                        "idempotency_key",
                        "the conflicting row disappeared during the batch; try again",
                    )
                })
        })
        .collect()
}

/// Whether the statements on `conn` may be prepared and kept: its statement
/// cache holds a statement already. A connection for a transaction-pooling
/// PgBouncer has no cache ([`crate::store::pooled_connect_options`]), so it
/// never does and gets unnamed statements, which sqlx parses in a round trip
/// of their own before binding them. On a direct connection the producer's
/// own statements, which sqlx prepares and caches by default, fill the cache,
/// and from then on the inserts here are prepared once and cost one round
/// trip each (a quarter of a one-row transaction's; docs/performance.md,
/// "Batch enqueue without a check per row").
fn prepares(conn: &PgConnection) -> bool {
    conn.cached_statements_size() > 0
}

/// An event whose row goes to a segment: no idempotency key (whose
/// uniqueness only `outbox`'s index keeps) and due within
/// [`segments::HORIZON`].
fn in_segment(event: &NewEvent) -> bool {
    event.idempotency_key.is_none()
        && event
            .run_at
            .is_none_or(|at| at <= Utc::now() + chrono::TimeDelta::seconds(segments::HORIZON_SECS))
}

/// An event whose row needs only id, source, topic and payload: every other
/// column keeps its default.
fn is_plain(event: &NewEvent) -> bool {
    event.op.is_empty()
        && event.headers.as_object().is_some_and(|h| h.is_empty())
        && event.run_at.is_none()
        && event.idempotency_key.is_none()
        && event.ordering_key.is_none()
        && event.max_attempts.is_none()
        && event.depth == 0
        && event.trigger_id.is_none()
        && event.target.is_none()
        && event.reply_to.is_none()
        && event.registered_by_principal.is_none()
        && event.priority == 0
        && event.partition_key.is_none()
}

async fn enqueue_plain_batch(
    conn: &mut PgConnection,
    app_id: Uuid,
    events: &[NewEvent],
) -> Result<Vec<Uuid>, Error> {
    let n = events.len();
    let mut ids = Vec::with_capacity(n);
    let mut sources = Vec::with_capacity(n);
    let mut topics = Vec::with_capacity(n);
    let mut payloads: Vec<&Value> = Vec::with_capacity(n);
    for event in events {
        event.validate()?;
        ids.push(Uuid::now_v7());
        sources.push(event.source.as_str());
        topics.push(event.topic.as_str());
        payloads.push(&event.payload);
    }
    let segment = segments::current_for_insert(conn).await?;
    let inserted = sqlx::query(INSERT_MANY_PLAIN[segment])
        .persistent(prepares(conn))
        .bind(app_id)
        .bind(&ids)
        .bind(&sources)
        .bind(&topics)
        .bind(&payloads)
        .execute(&mut *conn)
        .await
        .map_err(|e| map_insert_error(e, app_id))?
        .rows_affected();
    debug_assert_eq!(inserted, n as u64, "a plain batch cannot conflict");
    Ok(ids)
}

/// Sends a plain batch with `COPY … (FORMAT binary)`: the rows reach the
/// table without the server parsing uuids and texts out of arrays.
async fn copy_plain_batch(
    conn: &mut PgConnection,
    app_id: Uuid,
    events: &[NewEvent],
) -> Result<Vec<Uuid>, Error> {
    let mut ids = Vec::with_capacity(events.len());
    let mut rows = CopyRows::new(events.len());
    for event in events {
        event.validate()?;
        let id = Uuid::now_v7();
        ids.push(id);
        rows.begin_row(5);
        rows.field(id.as_bytes())?;
        rows.field(app_id.as_bytes())?;
        rows.field(event.source.as_str().as_bytes())?;
        rows.field(event.topic.as_bytes())?;
        rows.jsonb_field(&event.payload)?;
    }
    let segment = segments::current_for_insert(conn).await?;
    let mut copy = conn
        .copy_in_raw(COPY_PLAIN[segment])
        .await
        .map_err(|e| map_insert_error(e, app_id))?;
    // A failed send drops `copy`, which tells the server to abandon the COPY.
    copy.send(rows.finish()).await?;
    let inserted = copy
        .finish()
        .await
        .map_err(|e| map_insert_error(e, app_id))?;
    debug_assert_eq!(inserted, ids.len() as u64, "a plain batch cannot conflict");
    Ok(ids)
}

/// The bytes of a binary `COPY`: a header, rows of length-prefixed fields in
/// each column's binary form, and a trailer.
struct CopyRows(Vec<u8>);

impl CopyRows {
    fn new(rows: usize) -> Self {
        let mut bytes = Vec::with_capacity(32 + rows * 128);
        bytes.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        bytes.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        bytes.extend_from_slice(&0i32.to_be_bytes()); // no header extension
        Self(bytes)
    }

    fn begin_row(&mut self, fields: i16) {
        self.0.extend_from_slice(&fields.to_be_bytes());
    }

    /// A uuid (16 bytes) or a text (its UTF-8 bytes).
    fn field(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.length(bytes.len())?;
        self.0.extend_from_slice(bytes);
        Ok(())
    }

    /// A `jsonb` value: a version byte (1), then the JSON text.
    fn jsonb_field(&mut self, value: &Value) -> Result<(), Error> {
        let text = serde_json::to_vec(value)
            .map_err(|e| Error::invalid("payload", format!("cannot be written as JSON: {e}")))?;
        self.length(text.len() + 1)?;
        self.0.push(1);
        self.0.extend_from_slice(&text);
        Ok(())
    }

    fn length(&mut self, len: usize) -> Result<(), Error> {
        let len = i32::try_from(len)
            .map_err(|_| Error::invalid("payload", "a field of 2 GiB or more cannot be stored"))?;
        self.0.extend_from_slice(&len.to_be_bytes());
        Ok(())
    }

    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&(-1i16).to_be_bytes());
        self.0
    }
}

fn map_insert_error(err: sqlx::Error, app_id: Uuid) -> Error {
    if let sqlx::Error::Database(db) = &err
        && db.constraint() == Some("outbox_app_id_fkey")
    {
        return Error::UnknownApp(app_id.to_string());
    }
    Error::Database(err)
}
