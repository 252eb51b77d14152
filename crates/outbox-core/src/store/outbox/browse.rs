//! Browsing an app's rows for the console and the API: filters, keyset
//! pages in claim order in both directions, counts exact up to a bound and
//! estimated beyond it; and "retry now" for rows waiting on a delay or a
//! backoff.
//!
//! Pages walk `outbox_due_idx` (`app_id, run_at, id`), the claim order, and
//! check the other filters on the rows they pass, so a page of a common
//! topic or state reads little more than the page. A rare match (a payload
//! value in a million rows) may read the whole app: every read runs under a
//! time budget, a count that runs out of it falls back to the planner's
//! estimate, and a page that runs out of it is refused with a message that
//! says how to narrow the search.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor, PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

use super::RowCount;
use crate::Error;

/// Rows waiting for a delay or a backoff: not running, due later. Their
/// `run_at` is at most 90 s before their due time (see `RowState::predicate`).
macro_rules! waiting {
    () => {
        concat!(
            " AND o.run_at > now() - interval '90 seconds'",
            " AND (o.locked_until IS NULL OR o.locked_until <= now()) AND ",
            due_at!(),
            " > now()"
        )
    };
}

/// The state of a row that has not finished, as the console names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RowState {
    /// Due now and not leased: the next claim may take it.
    Due,
    /// Due later (enqueued with a delay), not leased.
    Scheduled,
    /// A failed attempt waits for its backoff.
    Retrying,
    /// A handler holds its lease.
    Running,
}

impl RowState {
    /// Every state, in the order the console lists them.
    pub const ALL: [RowState; 4] = [Self::Due, Self::Scheduled, Self::Retrying, Self::Running];

    /// The state's name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Due => "due",
            Self::Scheduled => "scheduled",
            Self::Retrying => "retrying",
            Self::Running => "running",
        }
    }

    /// The predicate that picks rows of this state. Each bounds `run_at`
    /// where it can, so that the scan of `outbox_due_idx` starts near its
    /// rows: a row due later has a `run_at` at most 90 s (priority 9) before
    /// the time it is due (migration 0022), so rows scheduled or retrying lie
    /// at the end of the claim order, past everything due. Running rows have
    /// no such bound (a claim leaves `run_at` as it was).
    fn predicate(self) -> &'static str {
        match self {
            Self::Running => " AND o.locked_until > now()",
            Self::Due => concat!(
                " AND o.run_at <= now() AND (o.locked_until IS NULL OR o.locked_until <= now())",
                " AND ",
                due_at!(),
                " <= now()"
            ),
            Self::Scheduled => concat!(
                waiting!(),
                " AND NOT (o.last_error IS NOT NULL AND o.attempt_count > 0)"
            ),
            Self::Retrying => concat!(
                waiting!(),
                " AND o.last_error IS NOT NULL AND o.attempt_count > 0"
            ),
        }
    }
}

impl std::str::FromStr for RowState {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "state",
                    format!("{s:?} is not one of due, scheduled, retrying, running"),
                )
            })
    }
}

/// A payload field that must have a value: `path` names nested keys
/// (`customer.id` is `["customer", "id"]`), compared as text, so `42`
/// matches the number 42 and the string "42". Serialized as it is written,
/// `customer.id=42` (what the audit log shows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadField {
    /// The keys from the payload's top level down.
    pub path: Vec<String>,
    /// The value, as text.
    pub value: String,
}

impl Serialize for PayloadField {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{}={}", self.path.join("."), self.value))
    }
}

impl PayloadField {
    /// Parses `key.sub=value` (spaces around the key and the value are
    /// dropped).
    pub fn parse(s: &str) -> Result<Self, Error> {
        let invalid = || {
            // `field`, as the API and the console name the parameter.
            Error::invalid(
                "field",
                format!("{s:?} is not key=value (nested keys joined with '.')"),
            )
        };
        let (path, value) = s.split_once('=').ok_or_else(invalid)?;
        let path: Vec<String> = path.trim().split('.').map(str::to_owned).collect();
        if path.iter().any(String::is_empty) {
            return Err(invalid());
        }
        Ok(Self {
            path,
            value: value.trim().to_owned(),
        })
    }
}

/// Which rows of an app to look at (every field narrows; none means all).
/// Serialized (for the audit log) without the fields left unset.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RowFilter {
    /// Rows of this topic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Rows in this state now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<RowState>,
    /// Rows of this ordering key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ordering_key: Option<String>,
    /// Rows of this partition key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition_key: Option<String>,
    /// The row with this idempotency key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Rows enqueued at or after this time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_from: Option<DateTime<Utc>>,
    /// Rows enqueued before this time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_to: Option<DateTime<Utc>>,
    /// Rows whose payload contains this JSON object or array (`@>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_contains: Option<Value>,
    /// Rows whose payload has this value at this path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_field: Option<PayloadField>,
    /// Only rows no handler is running: those a cancel touches.
    #[serde(skip)]
    pub idle_only: bool,
    /// Only rows waiting for a delay or a retry's backoff (scheduled or
    /// retrying): those "retry now" touches.
    #[serde(skip)]
    pub waiting_only: bool,
}

impl RowFilter {
    /// Checks the parts the database would reject with a less helpful error.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(topic) = &self.topic {
            crate::topics::validate_topic(topic)?;
        }
        if let Some(contains) = &self.payload_contains
            && !(contains.is_object() || contains.is_array())
        {
            return Err(Error::invalid(
                "payload_contains",
                "must be a JSON object or array, e.g. {\"customer\":\"c-1\"}",
            ));
        }
        if let (Some(from), Some(to)) = (self.created_from, self.created_to)
            && from >= to
        {
            return Err(Error::invalid("created_to", "must be after created_from"));
        }
        Ok(())
    }

    /// Adds `WHERE` with the app and every filter to `q`.
    fn push_where(&self, q: &mut QueryBuilder<'_, Postgres>, app: Uuid) {
        q.push(" WHERE o.app_id = ").push_bind(app);
        if let Some(topic) = &self.topic {
            q.push(" AND o.topic = ").push_bind(topic.clone());
        }
        if let Some(state) = self.state {
            q.push(state.predicate());
        }
        if self.idle_only {
            q.push(" AND (o.locked_until IS NULL OR o.locked_until <= now())");
        }
        if self.waiting_only {
            q.push(waiting!());
        }
        for (column, value) in [
            ("ordering_key", &self.ordering_key),
            ("partition_key", &self.partition_key),
            ("idempotency_key", &self.idempotency_key),
        ] {
            if let Some(value) = value {
                q.push(format_args!(" AND o.{column} = "))
                    .push_bind(value.clone());
            }
        }
        if let Some(from) = self.created_from {
            q.push(" AND o.created_at >= ").push_bind(from);
        }
        if let Some(to) = self.created_to {
            q.push(" AND o.created_at < ").push_bind(to);
        }
        if let Some(contains) = &self.payload_contains {
            q.push(" AND o.payload @> ").push_bind(contains.clone());
        }
        if let Some(field) = &self.payload_field {
            q.push(" AND o.payload #>> ")
                .push_bind(field.path.clone())
                .push(" = ")
                .push_bind(field.value.clone());
        }
    }
}

/// A position in the claim order: a page starts after or ends before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowCursor {
    /// The row's `run_at`.
    pub run_at: DateTime<Utc>,
    /// The row's id.
    pub id: Uuid,
}

impl RowCursor {
    /// The cursor as text for a URL: `<microseconds>_<id>`.
    pub fn encode(&self) -> String {
        format!("{}_{}", self.run_at.timestamp_micros(), self.id)
    }

    /// Reads [`RowCursor::encode`]'s text.
    pub fn decode(s: &str) -> Result<Self, Error> {
        let invalid = || Error::invalid("cursor", format!("{s:?} is not a page cursor"));
        let (micros, id) = s.split_once('_').ok_or_else(invalid)?;
        let run_at = micros
            .parse::<i64>()
            .ok()
            .and_then(crate::model::cursor_time)
            .ok_or_else(invalid)?;
        let id = Uuid::parse_str(id).map_err(|_| invalid())?;
        Ok(Self { run_at, id })
    }
}

/// Which page to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageAt {
    /// The first rows in claim order.
    First,
    /// The rows after this position.
    After(RowCursor),
    /// The rows before this position (the previous page).
    Before(RowCursor),
}

/// One row in a list: everything but the payload, headers and history.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct RowSummary {
    /// The row's id.
    pub id: Uuid,
    /// `due`, `scheduled`, `retrying` or `running`.
    pub state: String,
    /// Where the row came from.
    pub source: String,
    /// Its topic.
    pub topic: String,
    /// Where a trigger's row goes, if anywhere else than its topic.
    pub target: Option<String>,
    /// Its ordering key.
    pub ordering_key: Option<String>,
    /// Its partition key.
    pub partition_key: Option<String>,
    /// Its idempotency key.
    pub idempotency_key: Option<String>,
    /// Its priority.
    pub priority: i16,
    /// Attempts started.
    pub attempt_count: i32,
    /// When it is due.
    pub due_at: DateTime<Utc>,
    /// The process holding its lease, while running.
    pub locked_by: Option<String>,
    /// The start of its last error (300 characters).
    pub last_error: Option<String>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// Its position in the claim order.
    #[serde(skip)]
    pub run_at: DateTime<Utc>,
}

/// A page of rows in claim order, with the cursors of its neighbours.
#[derive(Debug, Clone, PartialEq)]
pub struct RowPage {
    /// The rows, next to be claimed first.
    pub rows: Vec<RowSummary>,
    /// Where the previous page ends, when there are rows before this one.
    pub before: Option<RowCursor>,
    /// Where the next page starts, when there are rows after this one.
    pub after: Option<RowCursor>,
}

/// The most rows [`browse`] returns.
pub const MAX_PAGE_ROWS: i64 = 500;

const SUMMARY_COLUMNS: &str = concat!(
    "SELECT o.id, ",
    row_state!("d.due_at"),
    " AS state,
            o.source, o.topic, o.target, o.ordering_key, o.partition_key, o.idempotency_key,
            o.priority, o.attempt_count, d.due_at, o.locked_by,
            left(o.last_error, 300) AS last_error, o.created_at, o.run_at
     FROM outbox o
     CROSS JOIN LATERAL (SELECT ",
    due_at!(),
    " AS due_at) AS d"
);

/// Runs `read` in a transaction whose statements stop after `budget`;
/// `None` when they did. With a payload containment filter, bitmap scans
/// are allowed in it (the daemon's connections turn them off for the
/// claim's sake), so that a GIN index on `payload`, if an operator made one
/// (docs/operations.md), can serve it.
async fn within<T>(
    pool: &PgPool,
    budget: Duration,
    filter: &RowFilter,
    read: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
) -> Result<Option<T>, Error> {
    let mut tx = pool.begin().await?;
    limit_statements(&mut *tx, budget).await?;
    if filter.payload_contains.is_some() {
        sqlx::query("SELECT set_config('enable_bitmapscan', 'on', true)")
            .execute(&mut *tx)
            .await?;
    }
    match read(&mut tx).await {
        Ok(value) => {
            tx.commit().await?;
            Ok(Some(value))
        }
        // 57014: query_canceled, here by the statement timeout.
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("57014") => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// One page of `app`'s rows that match `filter`, at most `limit`
/// ([`MAX_PAGE_ROWS`]) in claim order; refused when reading it takes longer
/// than `budget`.
pub async fn browse(
    pool: &PgPool,
    app: Uuid,
    filter: &RowFilter,
    at: PageAt,
    limit: i64,
    budget: Duration,
) -> Result<RowPage, Error> {
    filter.validate()?;
    let limit = limit.clamp(1, MAX_PAGE_ROWS);
    let mut q = QueryBuilder::new(SUMMARY_COLUMNS);
    filter.push_where(&mut q, app);
    let backwards = match at {
        PageAt::First => false,
        PageAt::After(c) => {
            q.push(" AND (o.run_at, o.id) > (")
                .push_bind(c.run_at)
                .push(", ")
                .push_bind(c.id)
                .push(")");
            false
        }
        PageAt::Before(c) => {
            q.push(" AND (o.run_at, o.id) < (")
                .push_bind(c.run_at)
                .push(", ")
                .push_bind(c.id)
                .push(")");
            true
        }
    };
    q.push(if backwards {
        " ORDER BY o.run_at DESC, o.id DESC LIMIT "
    } else {
        " ORDER BY o.run_at, o.id LIMIT "
    })
    .push_bind(limit + 1);
    let read =
        async |conn: &mut PgConnection| q.build_query_as::<RowSummary>().fetch_all(conn).await;
    let Some(mut rows) = within(pool, budget, filter, read).await? else {
        return Err(Error::invalid(
            "filter",
            format!(
                "the search ran longer than {} ms: narrow it with a topic, a state, a key or a time range",
                budget.as_millis()
            ),
        ));
    };
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    if backwards {
        rows.reverse();
    }
    let cursor = |r: &RowSummary| RowCursor {
        run_at: r.run_at,
        id: r.id,
    };
    let (first, last) = (rows.first().map(cursor), rows.last().map(cursor));
    let (before, after) = match at {
        PageAt::First => (None, last.filter(|_| more)),
        PageAt::After(c) => (first.or(Some(c)), last.filter(|_| more)),
        PageAt::Before(c) => (first.filter(|_| more), last.or(Some(c))),
    };
    Ok(RowPage {
        rows,
        before,
        after,
    })
}

/// How many of `app`'s rows match `filter`: exact up to `bound`; beyond it,
/// or when counting takes longer than `budget`, the planner's estimate.
pub async fn count_matching(
    pool: &PgPool,
    app: Uuid,
    filter: &RowFilter,
    bound: i64,
    budget: Duration,
) -> Result<RowCount, Error> {
    filter.validate()?;
    // One row past the bound tells "more": leave room for it.
    let bound = bound.clamp(1, i64::MAX - 1);
    let mut q = QueryBuilder::new("SELECT count(*) FROM (SELECT 1 FROM outbox o");
    filter.push_where(&mut q, app);
    q.push(" LIMIT ").push_bind(bound + 1).push(") AS matching");
    let read = async |conn: &mut PgConnection| q.build_query_scalar::<i64>().fetch_one(conn).await;
    let counted = within(pool, budget, filter, read).await?;
    if let Some(rows) = counted.filter(|rows| *rows <= bound) {
        return Ok(RowCount {
            rows,
            exact: true,
            at_least: false,
        });
    }
    let mut q = QueryBuilder::new("EXPLAIN (FORMAT JSON) SELECT 1 FROM outbox o");
    filter.push_where(&mut q, app);
    let read =
        async |conn: &mut PgConnection| q.build_query_scalar::<Value>().fetch_one(conn).await;
    // Planning waits for a lock that blocked the count too: no estimate then.
    let estimate = within(pool, budget, filter, read)
        .await?
        .and_then(|plan| plan.pointer("/0/Plan/Plan Rows").and_then(Value::as_f64))
        .unwrap_or(0.0) as i64;
    let counted_past = if counted.is_some() { bound + 1 } else { 0 };
    Ok(RowCount {
        rows: estimate.max(counted_past),
        exact: false,
        at_least: estimate < counted_past,
    })
}

/// Up to `limit` ids of `app`'s rows that match `filter`, in claim order:
/// the rows a bulk action on the filter picks (set `idle_only` or
/// `waiting_only` for the rows it can change).
pub async fn matching_ids<'e>(
    db: impl PgExecutor<'e>,
    app: Uuid,
    filter: &RowFilter,
    limit: i64,
) -> Result<Vec<Uuid>, Error> {
    filter.validate()?;
    let mut q = QueryBuilder::new("SELECT o.id FROM outbox o");
    filter.push_where(&mut q, app);
    q.push(" ORDER BY o.run_at, o.id LIMIT ")
        .push_bind(limit.max(1));
    Ok(q.build_query_scalar().fetch_all(db).await?)
}

/// Makes every statement after it in the caller's transaction stop after
/// `budget` (`SET LOCAL statement_timeout`).
pub async fn limit_statements<'e>(db: impl PgExecutor<'e>, budget: Duration) -> Result<(), Error> {
    sqlx::query("SELECT set_config('statement_timeout', $1, true)")
        .bind(budget.as_millis().max(1).to_string())
        .execute(db)
        .await?;
    Ok(())
}

/// Makes these rows of `app` due now if they wait for a delay or a retry's
/// backoff (not running; a due row is left as it is), keeping their attempt
/// count; wakes sleeping dispatchers. Returns the ids made due.
///
/// A row made due takes its place in the claim order at the moment of the
/// update, whatever its priority, and (without an ordering key) carries this
/// transaction as its `enqueue_xid`: a claim loop's position
/// (`advance_positions`) may pass that moment before this transaction
/// commits, and finds rows behind it by the transaction that wrote them, as
/// it does a producer's. A row with an ordering key keeps its transaction,
/// which orders it among its key's rows; it relies on the commit following
/// the update within the positions' margin (a quarter of a second), and on
/// the rewind otherwise.
pub async fn retry_now<'e>(
    db: impl PgExecutor<'e>,
    app: Uuid,
    ids: &[Uuid],
) -> Result<Vec<Uuid>, Error> {
    super::check_id_batch(ids)?;
    Ok(sqlx::query_scalar(concat!(
        "WITH picked AS (
            SELECT o.tableoid, o.ctid FROM outbox o
            WHERE o.id = ANY ($2::uuid[]) AND o.app_id = $1
              AND (o.locked_until IS NULL OR o.locked_until <= now())
              AND ",
        due_at!(),
        " > now()
            FOR UPDATE SKIP LOCKED
         ), moved AS (
            UPDATE outbox o
            SET run_at = clock_timestamp(),
                not_before = CASE WHEN o.priority > 0 THEN clock_timestamp() END,
                enqueue_xid = CASE WHEN o.ordering_key IS NULL THEN pg_current_xact_id()
                                   ELSE o.enqueue_xid END
            WHERE ",
        in_picked!(),
        "
            RETURNING o.id
         ), woken AS (
            SELECT pg_notify('outbox_due', '') WHERE EXISTS (SELECT 1 FROM moved)
         )
         SELECT id FROM moved, (SELECT count(*) FROM woken) AS w"
    ))
    .bind(app)
    .bind(ids)
    .fetch_all(db)
    .await?)
}
