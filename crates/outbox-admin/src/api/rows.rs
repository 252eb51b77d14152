//! The outbox's rows: browsing with filters and keyset pages, one row, and
//! the operator's actions on rows that have not run (retry now, cancel), by
//! id, by topic or on a whole filter.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, NaiveDateTime, Utc};
use outbox_core::OutboxRow;
use outbox_core::store::dead_letters;
use outbox_core::store::outbox::{
    self as store, CancelFilter, PageAt, PayloadField, RowCount, RowCursor, RowFilter, RowSummary,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::AdminState;
use crate::audit::{self, Action};
use crate::auth::{self, Capability};
use crate::error::ApiError;

use super::Bearer;

/// Counts stop being exact past this many rows (an estimate follows).
pub const COUNT_BOUND: i64 = 1000;
/// The longest a count may take before the estimate is used instead.
pub const COUNT_BUDGET: Duration = Duration::from_millis(50);
/// The longest a page may take before it is refused (narrow the filter).
pub const PAGE_BUDGET: Duration = Duration::from_secs(2);
/// The longest a statement of an action on a filter may take.
pub const ACTION_BUDGET: Duration = Duration::from_secs(5);
/// The rows of a page when the caller does not say.
pub const DEFAULT_PAGE_ROWS: i64 = 50;

/// A filter on an app's rows as the API and the console's forms take it:
/// every field optional, blank fields ignored. `after`/`before`/`limit`
/// page a list and are refused in an action's filter.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RowQuery {
    /// Rows of this topic.
    pub topic: Option<String>,
    /// `due`, `scheduled`, `retrying` or `running`.
    pub state: Option<String>,
    /// Rows of this ordering key.
    pub ordering_key: Option<String>,
    /// Rows of this partition key.
    pub partition_key: Option<String>,
    /// The row with this idempotency key.
    pub idempotency_key: Option<String>,
    /// Enqueued at or after (RFC 3339, or `YYYY-MM-DDTHH:MM[:SS]` in UTC).
    pub created_from: Option<String>,
    /// Enqueued before (same forms).
    pub created_to: Option<String>,
    /// The payload contains this JSON (an object or array, or its text).
    pub payload: Option<Value>,
    /// The payload has this value at this path: `customer.id=c-1`.
    pub field: Option<String>,
    /// The page after this cursor.
    pub after: Option<String>,
    /// The page before this cursor.
    pub before: Option<String>,
    /// Rows per page (1..=500, default 50).
    pub limit: Option<i64>,
}

/// `None` for an absent or blank text field.
fn given(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

fn time(name: &str, value: &Option<String>) -> Result<Option<DateTime<Utc>>, ApiError> {
    let Some(text) = given(value) else {
        return Ok(None);
    };
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(Some(t.with_timezone(&Utc)));
    }
    ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
        .map(|t| Some(t.and_utc()))
        .ok_or_else(|| {
            ApiError::Invalid(format!(
                "{name}: {text:?} is not a time (RFC 3339, or YYYY-MM-DDTHH:MM in UTC)"
            ))
        })
}

impl RowQuery {
    /// The store's filter.
    pub fn filter(&self) -> Result<RowFilter, ApiError> {
        let payload_contains = match &self.payload {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) if text.trim().is_empty() => None,
            Some(Value::String(text)) => Some(serde_json::from_str(text).map_err(|_| {
                ApiError::Invalid(format!(
                    "payload: {text:?} is not JSON; give an object such as {{\"customer\":\"c-1\"}}"
                ))
            })?),
            Some(other) => Some(other.clone()),
        }
        // `{}` and `[]` are contained in every object and array: no filter,
        // and so no selection for an action.
        .filter(|v: &Value| {
            !(v.as_object().is_some_and(|o| o.is_empty())
                || v.as_array().is_some_and(|a| a.is_empty()))
        });
        // Said here under the parameter's name (the store calls it
        // payload_contains).
        if payload_contains
            .as_ref()
            .is_some_and(|v| !(v.is_object() || v.is_array()))
        {
            return Err(ApiError::Invalid(
                "payload: must be a JSON object or array, e.g. {\"customer\":\"c-1\"}".into(),
            ));
        }
        Ok(RowFilter {
            topic: given(&self.topic).map(str::to_owned),
            state: given(&self.state).map(str::parse).transpose()?,
            ordering_key: given(&self.ordering_key).map(str::to_owned),
            partition_key: given(&self.partition_key).map(str::to_owned),
            idempotency_key: given(&self.idempotency_key).map(str::to_owned),
            created_from: time("created_from", &self.created_from)?,
            created_to: time("created_to", &self.created_to)?,
            payload_contains,
            payload_field: given(&self.field).map(PayloadField::parse).transpose()?,
            idle_only: false,
            waiting_only: false,
        })
    }

    /// Which page, from `after` or `before` (not both).
    pub fn page_at(&self) -> Result<PageAt, ApiError> {
        match (given(&self.after), given(&self.before)) {
            (None, None) => Ok(PageAt::First),
            (Some(after), None) => Ok(PageAt::After(cursor("after", after)?)),
            (None, Some(before)) => Ok(PageAt::Before(cursor("before", before)?)),
            (Some(_), Some(_)) => Err(ApiError::Invalid("give after or before, not both".into())),
        }
    }

    /// The page size asked for, checked.
    pub fn limit(&self) -> Result<i64, ApiError> {
        match self.limit {
            None => Ok(DEFAULT_PAGE_ROWS),
            Some(n) if (1..=store::MAX_PAGE_ROWS).contains(&n) => Ok(n),
            Some(n) => Err(ApiError::Invalid(format!(
                "limit: {n} is not between 1 and {}",
                store::MAX_PAGE_ROWS
            ))),
        }
    }

    /// The filter of a bulk action: page fields have no meaning there.
    fn action_filter(&self) -> Result<RowFilter, ApiError> {
        if self.after.is_some() || self.before.is_some() || self.limit.is_some() {
            return Err(ApiError::Invalid(
                "filter: after, before and limit page a list; an action takes every matching row"
                    .into(),
            ));
        }
        self.filter()
    }
}

/// The page cursor a query's `field` (`after`, `before`) carries; a wrong
/// one is named by its parameter, and not echoed (it may be kilobytes).
fn cursor(field: &str, text: &str) -> Result<RowCursor, ApiError> {
    RowCursor::decode(text).map_err(|_| {
        ApiError::Invalid(format!(
            "{field}: not a page cursor; pass on the {field} of an earlier answer"
        ))
    })
}

/// A page of rows, with the cursors of the pages around it and how many
/// rows match in all.
#[derive(Debug, Serialize)]
pub struct RowList {
    /// The rows, next to be claimed first.
    pub rows: Vec<RowSummary>,
    /// The `before` cursor of the previous page, when there is one.
    pub before: Option<String>,
    /// The `after` cursor of the next page, when there is one.
    pub after: Option<String>,
    /// How many rows match: exact up to 1,000, else an estimate or a lower
    /// bound.
    pub count: RowCount,
}

/// A page of `app_id`'s rows for `q`, with its count.
pub async fn list_rows(
    state: &AdminState,
    user: Uuid,
    app_id: Uuid,
    q: &RowQuery,
) -> Result<RowList, ApiError> {
    let filter = q.filter()?;
    let _room = state.row_searches.enter(user).await?;
    let pool = &state.pool;
    // On two connections at once: a page of a rare match and its count each
    // take up to their budget, and the answer waits for the longer only.
    let at = q.page_at()?;
    let (page, count) = tokio::try_join!(
        store::browse(pool, app_id, &filter, at, q.limit()?, PAGE_BUDGET),
        store::count_matching(pool, app_id, &filter, COUNT_BOUND, COUNT_BUDGET),
    )?;
    let count = match at {
        PageAt::First => count.with_first_page(&page),
        _ => count,
    };
    Ok(RowList {
        rows: page.rows,
        before: page.before.map(|c| c.encode()),
        after: page.after.map(|c| c.encode()),
        count,
    })
}

/// How many of `app_id`'s rows matching `filter` each action would touch
/// now: `(cancel, retry)`, the idle rows and the waiting ones; exact up to
/// what one action takes (`MAX_CANCEL_BATCH`), so that the confirmation
/// says what will happen, within a page's budget.
pub async fn count_touched(
    state: &AdminState,
    user: Uuid,
    app_id: Uuid,
    filter: &RowFilter,
) -> Result<(RowCount, RowCount), ApiError> {
    let _room = state.row_searches.enter(user).await?;
    count_touched_in(&state.pool, app_id, filter).await
}

/// [`count_touched`] for a caller that has room already.
async fn count_touched_in(
    pool: &sqlx::PgPool,
    app_id: Uuid,
    filter: &RowFilter,
) -> Result<(RowCount, RowCount), ApiError> {
    let idle = RowFilter {
        idle_only: true,
        ..filter.clone()
    };
    let waiting = RowFilter {
        waiting_only: true,
        ..filter.clone()
    };
    Ok(tokio::try_join!(
        store::count_matching(pool, app_id, &idle, store::MAX_CANCEL_BATCH, PAGE_BUDGET),
        store::count_matching(pool, app_id, &waiting, store::MAX_CANCEL_BATCH, PAGE_BUDGET),
    )?)
}

/// `GET /api/apps/{app}/outbox`: the app's rows that have not finished,
/// filtered, in claim order, keyset-paginated both ways.
pub(super) async fn list(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(app): Path<String>,
    q: Result<crate::strict::Query<RowQuery>, ApiError>,
) -> Result<Json<RowList>, ApiError> {
    let crate::strict::Query(q) = q?;
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterRead).await?;
    Ok(Json(list_rows(&state, p.user.id, app.id, &q).await?))
}

/// `GET /api/apps/{app}/outbox/{id}`: one row that has not finished, with
/// its state and attempt history; 404 when the app has no such row.
pub(super) async fn show(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<OutboxRow>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterRead).await?;
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("outbox row"))?;
    if let Some(row) = store::row(&state.pool, app.id, id).await? {
        return Ok(Json(row));
    }
    // Dead-lettered (or an id of the wrong kind): say where it is.
    match dead_letters::resolve_id(&state.pool, app.id, id).await {
        Ok(dead_letter) => Err(ApiError::Absent(format!(
            "outbox row {id} is not in the outbox: see dead letter {dead_letter} (GET /api/apps/{}/dead-letters/{dead_letter})",
            app.slug
        ))),
        Err(outbox_core::Error::NotFound(_)) => Err(ApiError::not_found("outbox row")),
        Err(err) => Err(err.into()),
    }
}

/// The rows an operator's action names.
#[derive(Debug, Clone)]
pub enum Selection {
    /// These rows.
    Ids(Vec<Uuid>),
    /// Every row of this topic.
    Topic(String),
    /// Every row that matches.
    Matching(RowFilter),
}

impl Selection {
    /// From a body's `ids`, `topic`, `filter` or `all`, exactly one of them.
    /// A filter must name something: one whose fields are all blank (a
    /// script's empty variable, say) is refused rather than taken for every
    /// row of the app, which only `"all": true` asks for.
    fn from_body(
        ids: Option<Vec<Uuid>>,
        topic: Option<String>,
        filter: Option<RowQuery>,
        all: bool,
    ) -> Result<Self, ApiError> {
        match (ids, topic, filter, all) {
            (Some(ids), None, None, false) => Ok(Self::Ids(ids)),
            (None, Some(topic), None, false) => Ok(Self::Topic(topic)),
            (None, None, Some(filter), false) => {
                let filter = filter.action_filter()?;
                if filter == RowFilter::default() {
                    return Err(ApiError::Invalid(
                        "filter: names no rows (every field is absent or blank); to act on every row of the app, send \"all\": true instead".into(),
                    ));
                }
                Ok(Self::Matching(filter))
            }
            (None, None, None, true) => Ok(Self::Matching(RowFilter::default())),
            _ => Err(ApiError::Invalid(
                "give exactly one of ids (row ids), topic, filter or all".into(),
            )),
        }
    }

    /// What the audit log says the action was taken on.
    fn audited(&self) -> (Option<String>, Value) {
        match self {
            Self::Topic(topic) => (Some(topic.clone()), json!({})),
            Self::Ids(ids) if ids.len() == 1 => (Some(ids[0].to_string()), json!({ "ids": 1 })),
            Self::Ids(ids) => (None, json!({ "ids": ids.len() })),
            Self::Matching(f) => (f.topic.clone(), json!({ "filter": f })),
        }
    }

    /// The ids it names now, for an action that takes ids: at most
    /// `MAX_CANCEL_BATCH`, in claim order, of the rows `touched` marks
    /// (idle ones for a cancel, waiting ones for a retry).
    async fn ids(
        &self,
        tx: &mut sqlx::PgConnection,
        app_id: Uuid,
        touched: RowFilter,
    ) -> Result<Vec<Uuid>, ApiError> {
        let filter = match self {
            Self::Ids(ids) => return Ok(ids.clone()),
            Self::Topic(topic) => {
                // One topic: a pattern would be taken literally and match nothing.
                outbox_core::topics::validate_named_topic(topic)?;
                RowFilter {
                    topic: Some(topic.clone()),
                    ..touched
                }
            }
            Self::Matching(filter) => RowFilter {
                idle_only: touched.idle_only,
                waiting_only: touched.waiting_only,
                ..filter.clone()
            },
        };
        store::limit_statements(&mut *tx, ACTION_BUDGET).await?;
        Ok(store::matching_ids(&mut *tx, app_id, &filter, store::MAX_CANCEL_BATCH).await?)
    }
}

/// What a bulk action did: at most `MAX_CANCEL_BATCH` rows per call, `more`
/// when there may be others.
#[derive(Debug, Serialize)]
pub struct Acted {
    /// How many rows it changed.
    pub rows: usize,
    /// Their ids.
    pub ids: Vec<Uuid>,
    /// True when the call stopped at the batch size: call again for the rest.
    pub more: bool,
}

impl Acted {
    /// `changed` of the `picked` rows: when a whole batch was picked, more
    /// may match (even if some of the batch were taken by a claim meanwhile).
    fn of(changed: Vec<Uuid>, picked: usize, selection: &Selection) -> Self {
        let more =
            !matches!(selection, Selection::Ids(_)) && picked as i64 == store::MAX_CANCEL_BATCH;
        Self {
            rows: changed.len(),
            ids: changed,
            more,
        }
    }
}

/// The one shape of an action on rows: pick the rows `touched` marks among
/// those `selection` names, `change` them, and record `action` (with the
/// selection and `extra` as detail) when any changed — all in one
/// transaction.
#[allow(clippy::too_many_arguments)]
async fn act_on_rows(
    pool: &sqlx::PgPool,
    actor: &str,
    app_id: Uuid,
    selection: &Selection,
    touched: RowFilter,
    action: &'static str,
    extra: Value,
    change: impl AsyncFnOnce(&mut sqlx::PgConnection, &[Uuid]) -> Result<Vec<Uuid>, outbox_core::Error>,
) -> Result<Acted, ApiError> {
    let mut tx = audit::begin(pool).await?;
    let picked = selection.ids(&mut tx, app_id, touched).await?;
    // A filter that matches nothing changes nothing; an empty list of ids
    // is the caller's mistake, which `change` reports.
    let ids = if picked.is_empty() && !matches!(selection, Selection::Ids(_)) {
        Vec::new()
    } else {
        change(&mut tx, &picked).await?
    };
    if !ids.is_empty() {
        let (target, mut detail) = selection.audited();
        if let (Some(detail), Value::Object(extra)) = (detail.as_object_mut(), extra) {
            detail.extend(extra);
        }
        let action = Action {
            action,
            target: target.as_deref(),
            rows: ids.len(),
            detail,
        };
        audit::record(&mut tx, actor, app_id, action).await?;
    }
    audit::commit(tx).await?;
    Ok(Acted::of(ids, picked.len(), selection))
}

/// Cancels rows of the app for `actor` (see `store::outbox::cancel`; at most
/// `MAX_CANCEL_BATCH` per call, rows not running), recorded with the reason
/// and the count when it cancelled any.
pub async fn cancel_rows(
    pool: &sqlx::PgPool,
    actor: &str,
    app_id: Uuid,
    selection: &Selection,
    reason: &str,
) -> Result<Acted, ApiError> {
    let reason = store::check_cancel_reason(reason)?;
    let idle = RowFilter {
        idle_only: true,
        ..Default::default()
    };
    let cancel = async |conn: &mut sqlx::PgConnection, ids: &[Uuid]| {
        let these = CancelFilter::Ids(ids.to_vec());
        store::cancel(conn, app_id, &these, Some(actor), reason).await
    };
    let extra = json!({ "reason": reason });
    act_on_rows(
        pool,
        actor,
        app_id,
        selection,
        idle,
        "outbox.cancel",
        extra,
        cancel,
    )
    .await
}

/// Makes rows of the app that wait for a delay or a backoff due now, for
/// `actor` (recorded when it moved any).
pub async fn retry_rows(
    pool: &sqlx::PgPool,
    actor: &str,
    app_id: Uuid,
    selection: &Selection,
) -> Result<Acted, ApiError> {
    let waiting = RowFilter {
        waiting_only: true,
        ..Default::default()
    };
    let retry = async |conn: &mut sqlx::PgConnection, ids: &[Uuid]| {
        store::retry_now(conn, app_id, ids).await
    };
    act_on_rows(
        pool,
        actor,
        app_id,
        selection,
        waiting,
        "outbox.retry",
        json!({}),
        retry,
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CancelBody {
    ids: Option<Vec<Uuid>>,
    topic: Option<String>,
    filter: Option<RowQuery>,
    /// Every row of the app (that the action touches).
    #[serde(default)]
    all: bool,
    reason: String,
}

/// `POST /api/apps/{app}/outbox/cancel`: cancels rows that have not run
/// (by `ids`, every row of `topic`, or every row matching `filter`, at most
/// 10,000 per call); each becomes an `ignored` dead letter carrying the
/// reason.
pub(super) async fn cancel(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(app): Path<String>,
    bytes: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::Operate).await?;
    let body: CancelBody = crate::strict::json(&bytes)?;
    let selection = Selection::from_body(body.ids, body.topic, body.filter, body.all)?;
    let done = cancel_rows(
        &state.pool,
        &audit::actor(&p),
        app.id,
        &selection,
        &body.reason,
    )
    .await?;
    Ok(Json(
        json!({ "cancelled": done.rows, "ids": done.ids, "more": done.more }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RetryBody {
    ids: Option<Vec<Uuid>>,
    topic: Option<String>,
    filter: Option<RowQuery>,
    /// Every row of the app (that the action touches).
    #[serde(default)]
    all: bool,
}

/// `POST /api/apps/{app}/outbox/retry`: makes rows that wait for a delay or
/// a retry's backoff due now (by `ids`, `topic` or `filter`, at most 10,000
/// per call); running and due rows are left as they are.
pub(super) async fn retry(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(app): Path<String>,
    bytes: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::Operate).await?;
    let body: RetryBody = crate::strict::json(&bytes)?;
    let selection = Selection::from_body(body.ids, body.topic, body.filter, body.all)?;
    let done = retry_rows(&state.pool, &audit::actor(&p), app.id, &selection).await?;
    Ok(Json(
        json!({ "retried": done.rows, "ids": done.ids, "more": done.more }),
    ))
}

/// `GET /api/apps/{app}/outbox/count`: how many rows match the filter, and
/// how many of them a cancel (those not running) and a retry (those waiting
/// for a delay or a backoff) would touch.
pub(super) async fn count(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(app): Path<String>,
    q: Result<crate::strict::Query<RowQuery>, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let crate::strict::Query(q) = q?;
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterRead).await?;
    let filter = q.action_filter()?;
    let _room = state.row_searches.enter(p.user.id).await?;
    let all =
        store::count_matching(&state.pool, app.id, &filter, COUNT_BOUND, COUNT_BUDGET).await?;
    let (idle, waiting) = count_touched_in(&state.pool, app.id, &filter).await?;
    Ok(Json(
        json!({ "rows": all, "idle": idle, "waiting": waiting }),
    ))
}
