//! Dead letters over the API: list (filters, keyset paging), count, show,
//! ignore, replay and bulk actions, and the helpers the dashboard and the
//! CLI share.

use axum::Json;
use axum::extract::{Path, State};
use outbox_core::DeadLetter;
use outbox_core::store::dead_letters::{self, Cursor, Filter};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::AdminState;
use crate::audit::{self, Action};
use crate::auth::{self, Capability};
use crate::error::ApiError;

use super::Bearer;

/// List filters and paging, as query parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only this source.
    pub source: Option<String>,
    /// Only this topic.
    pub topic: Option<String>,
    /// Only this trigger.
    pub trigger_id: Option<Uuid>,
    /// Only this resolution.
    pub resolution: Option<String>,
    /// Only unresolved rows.
    #[serde(default)]
    pub unresolved: bool,
    /// Page size (1..=200, default 50).
    pub limit: Option<i64>,
    /// The `next_cursor` of the previous page.
    pub after: Option<String>,
    /// The `prev_cursor` of the page after: the newer page before it.
    pub before: Option<String>,
}

impl ListQuery {
    /// The store filter; empty strings mean "no filter" (HTML forms send them).
    pub fn filter(&self) -> Result<Filter, ApiError> {
        let nonempty = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
        let resolution = nonempty(&self.resolution);
        if let Some(r) = &resolution
            && !matches!(
                r.as_str(),
                "replayed" | "ignored" | "handled_by_script" | "handler_failed"
            )
        {
            return Err(ApiError::Invalid(format!(
                "resolution: {r:?} is not one of replayed, ignored, handled_by_script, handler_failed"
            )));
        }
        Ok(Filter {
            source: nonempty(&self.source),
            topic: nonempty(&self.topic),
            trigger_id: self.trigger_id,
            resolution,
            unresolved_only: self.unresolved,
        })
    }

    /// The cursor, if any.
    pub fn cursor(&self) -> Result<Option<Cursor>, ApiError> {
        self.after
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(decode_cursor)
            .transpose()
    }

    /// The `before` cursor, if any.
    fn before_cursor(&self) -> Result<Option<Cursor>, ApiError> {
        self.before
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| decode_named("before", s))
            .transpose()
    }

    /// The page size.
    pub fn limit(&self) -> Result<u32, ApiError> {
        match self.limit.unwrap_or(50) {
            n @ 1..=200 => Ok(n as u32),
            n => Err(ApiError::Invalid(format!(
                "limit: {n} is not between 1 and 200"
            ))),
        }
    }
}

/// `<micros since epoch>_<uuid>`.
pub fn encode_cursor(row: &DeadLetter) -> String {
    format!("{}_{}", row.created_at.timestamp_micros(), row.id)
}

/// Reads a cursor from [`encode_cursor`].
pub fn decode_cursor(s: &str) -> Result<Cursor, ApiError> {
    decode_named("after", s)
}

/// [`decode_cursor`] for the parameter `name`.
fn decode_named(name: &str, s: &str) -> Result<Cursor, ApiError> {
    let bad = || {
        ApiError::Invalid(format!(
            "{name}: {s:?} is not a cursor from a previous page"
        ))
    };
    let (micros, id) = s.split_once('_').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    Ok(Cursor {
        created_at: outbox_core::model::cursor_time(micros).ok_or_else(bad)?,
        id: Uuid::parse_str(id).map_err(|_| bad())?,
    })
}

/// A page of dead letters, newest first, with the cursors of the pages
/// around it.
#[derive(Debug, Serialize)]
pub struct Page {
    /// The dead letters.
    pub items: Vec<DeadLetter>,
    /// `after` for the next (older) page, when there is one.
    pub next_cursor: Option<String>,
    /// `before` for the previous (newer) page, when there is one.
    pub prev_cursor: Option<String>,
}

/// The page `q` asks for: the newest, the one after `after`, or the one
/// before `before`.
pub async fn list_page(pool: &sqlx::PgPool, app_id: Uuid, q: &ListQuery) -> Result<Page, ApiError> {
    let limit = q.limit()?;
    let filter = q.filter()?;
    match (q.cursor()?, q.before_cursor()?) {
        (Some(_), Some(_)) => Err(ApiError::Invalid(
            "before: give after or before, not both".into(),
        )),
        (None, Some(before)) => {
            let mut items =
                dead_letters::list_newer(pool, app_id, &filter, before, limit + 1).await?;
            // Newest first: the one beyond the page is the first.
            let newer = items.len() > limit as usize;
            if newer {
                items.remove(0);
            }
            Ok(Page {
                prev_cursor: newer.then(|| items.first().map(encode_cursor)).flatten(),
                // The page asked from lies after this one.
                next_cursor: items.last().map(encode_cursor),
                items,
            })
        }
        (after, None) => {
            let mut items = dead_letters::list(pool, app_id, &filter, after, limit + 1).await?;
            // One beyond the page says an older page follows (a full last
            // page led to an empty one).
            let older = items.len() > limit as usize;
            items.truncate(limit as usize);
            Ok(Page {
                next_cursor: older.then(|| items.last().map(encode_cursor)).flatten(),
                // The page the cursor came from lies before this one.
                prev_cursor: after
                    .is_some()
                    .then(|| items.first().map(encode_cursor))
                    .flatten(),
                items,
            })
        }
    }
}

pub(super) async fn list(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(app): Path<String>,
    crate::strict::Query(q): crate::strict::Query<ListQuery>,
) -> Result<Json<Page>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterRead).await?;
    Ok(Json(list_page(&state.pool, app.id, &q).await?))
}

/// How many unresolved dead letters of the app `filter` names (every one
/// without a filter): what a bulk action by that filter touches, up to
/// [`MAX_BULK`] per call.
pub async fn count_unresolved_matching(
    pool: &sqlx::PgPool,
    app_id: Uuid,
    filter: &BulkFilter,
) -> Result<i64, ApiError> {
    if filter.names_nothing() {
        return Ok(dead_letters::count_unresolved(pool, app_id).await?);
    }
    Ok(dead_letters::count(pool, app_id, &filter.unresolved(), i64::MAX).await?)
}

pub(super) async fn count(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(app): Path<String>,
    // The same filter as a bulk action's, so the count is what it would take.
    crate::strict::Query(filter): crate::strict::Query<BulkFilter>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterRead).await?;
    let unresolved = count_unresolved_matching(&state.pool, app.id, &filter).await?;
    Ok(Json(serde_json::json!({ "unresolved": unresolved })))
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found("dead letter"))
}

pub(super) async fn show(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<DeadLetter>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterRead).await?;
    let id = dead_letters::resolve_id(&state.pool, app.id, parse_id(&id)?).await?;
    Ok(Json(dead_letters::get(&state.pool, app.id, id).await?))
}

/// Resolves one dead letter as `ignored` (recorded in the audit log as done
/// by `actor`); `id` is its own or the outbox row's it was
/// ([`dead_letters::resolve_id`]); returns its id. 409 when it is resolved
/// already.
pub async fn ignore_one(
    pool: &sqlx::PgPool,
    actor: &str,
    app_id: Uuid,
    id: Uuid,
) -> Result<Uuid, ApiError> {
    let id = dead_letters::resolve_id(pool, app_id, id).await?;
    let mut tx = audit::begin(pool).await?;
    let changed = dead_letters::ignore(&mut *tx, app_id, &[id]).await?;
    if !changed.is_empty() {
        let target = id.to_string();
        let action = Action {
            action: "dead_letter.ignore",
            target: Some(&target),
            rows: 1,
            detail: serde_json::json!({}),
        };
        audit::record(&mut tx, actor, app_id, action).await?;
        audit::commit(tx).await?;
    } else {
        drop(tx);
        let row = dead_letters::get(pool, app_id, id).await?;
        return Err(ApiError::Conflict(format!(
            "dead letter {id} is already resolved ({})",
            row.resolution.unwrap_or_default()
        )));
    }
    Ok(id)
}

/// Replays one dead letter, with its own attempt budget unless
/// `max_attempts` overrides it (recorded in the audit log as done by
/// `actor`); `id` is its own or the outbox row's it was
/// ([`dead_letters::resolve_id`]); returns its id and the new outbox id. 409
/// when resolved already.
pub async fn replay_one(
    pool: &sqlx::PgPool,
    actor: &str,
    app_id: Uuid,
    id: Uuid,
    max_attempts: Option<i32>,
) -> Result<(Uuid, Uuid), ApiError> {
    let id = dead_letters::resolve_id(pool, app_id, id).await?;
    let mut tx = audit::begin(pool).await?;
    let replayed = dead_letters::replay_with(&mut tx, app_id, &[id], max_attempts).await?;
    match replayed.first() {
        Some((_, outbox_id)) => {
            let target = id.to_string();
            let action = Action {
                action: "dead_letter.replay",
                target: Some(&target),
                rows: 1,
                detail: serde_json::json!({ "outbox_id": outbox_id, "max_attempts": max_attempts }),
            };
            audit::record(&mut tx, actor, app_id, action).await?;
            audit::commit(tx).await?;
            Ok((id, *outbox_id))
        }
        None => {
            drop(tx);
            let row = dead_letters::get(pool, app_id, id).await?;
            Err(ApiError::Conflict(format!(
                "dead letter {id} is already resolved ({})",
                row.resolution.unwrap_or_default()
            )))
        }
    }
}

pub(super) async fn ignore(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterManage).await?;
    let id = ignore_one(&state.pool, &audit::actor(&p), app.id, parse_id(&id)?).await?;
    Ok(Json(
        serde_json::json!({ "id": id, "resolution": "ignored" }),
    ))
}

/// The optional body of a replay.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    /// Attempts the replayed row gets (default: the dead letter's own).
    pub max_attempts: Option<i64>,
}

/// Checks a replay's `max_attempts` override.
pub fn replay_attempts(max_attempts: Option<i64>) -> Result<Option<i32>, ApiError> {
    max_attempts
        .map(|n| {
            i32::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
                ApiError::Invalid(format!(
                    "max_attempts: {n} is not between 1 and {}",
                    i32::MAX
                ))
            })
        })
        .transpose()
}

pub(super) async fn replay(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, id)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterManage).await?;
    let body: ReplayBody = crate::strict::json_or_default(&body)?;
    let max_attempts = replay_attempts(body.max_attempts)?;
    let (id, outbox_id) = replay_one(
        &state.pool,
        &audit::actor(&p),
        app.id,
        parse_id(&id)?,
        max_attempts,
    )
    .await?;
    Ok(Json(
        serde_json::json!({ "id": id, "resolution": "replayed", "outbox_id": outbox_id }),
    ))
}

/// A bulk action: by id list, or by filter (unresolved rows only).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkBody {
    /// `replay` or `ignore` (`resolve` is accepted for `ignore`).
    pub action: String,
    /// These dead letters.
    pub ids: Option<Vec<Uuid>>,
    /// Or every unresolved dead letter matching this (it must name
    /// something).
    pub filter: Option<BulkFilter>,
    /// Or every unresolved dead letter of the app, asked for by name.
    #[serde(default)]
    pub all: bool,
    /// For `replay`: attempts the replayed rows get (default: each dead
    /// letter's own).
    #[serde(default)]
    pub max_attempts: Option<i64>,
}

/// The filter of a bulk action, and of `GET …/dead-letters/count`. A blank
/// field names nothing.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkFilter {
    /// Only this source.
    pub source: Option<String>,
    /// Only this topic.
    pub topic: Option<String>,
    /// Only this trigger.
    pub trigger_id: Option<Uuid>,
}

impl BulkFilter {
    /// Whether every field is absent or blank (a script's empty variable
    /// must not mean every dead letter).
    pub fn names_nothing(&self) -> bool {
        let given = |v: &Option<String>| v.as_deref().is_some_and(|v| !v.trim().is_empty());
        !given(&self.source) && !given(&self.topic) && self.trigger_id.is_none()
    }

    /// The store's filter for the unresolved dead letters this names; a
    /// field is taken as given (a stored topic may end with a space).
    pub fn unresolved(&self) -> Filter {
        let given = |v: &Option<String>| v.clone().filter(|v| !v.trim().is_empty());
        Filter {
            source: given(&self.source),
            topic: given(&self.topic),
            trigger_id: self.trigger_id,
            unresolved_only: true,
            ..Filter::default()
        }
    }
}

/// The most dead letters one bulk action takes; by filter, the newest.
pub const MAX_BULK: u32 = 10_000;

/// What a bulk action did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bulked {
    /// Dead letters replayed or ignored.
    pub changed: usize,
    /// True when a filter (or `all`) picked a whole batch: more may match,
    /// even when some of the batch were resolved by someone else meanwhile.
    pub more: bool,
}

/// Runs a bulk action (recorded in the audit log as done by `actor`, with
/// its filter); says how many rows changed and whether more may match.
pub async fn run_bulk(
    pool: &sqlx::PgPool,
    actor: &str,
    app_id: Uuid,
    body: &BulkBody,
) -> Result<Bulked, ApiError> {
    if body
        .ids
        .as_ref()
        .is_some_and(|ids| ids.len() > MAX_BULK as usize)
    {
        return Err(ApiError::Invalid(format!(
            "ids: at most {MAX_BULK} per request"
        )));
    }
    let ids = match (&body.ids, &body.filter, body.all) {
        // A dead letter's id, or the id of the row it was (a log line's).
        (Some(ids), None, false) => dead_letters::resolve_ids(pool, app_id, ids).await?,
        (None, Some(f), false) if f.names_nothing() => {
            // A script's empty variable must not mean every dead letter.
            return Err(ApiError::Invalid(
                "filter: names no dead letters (every field is absent or blank); to act on every unresolved one, send \"all\": true instead".into(),
            ));
        }
        (None, Some(f), false) => {
            dead_letters::ids_matching(pool, app_id, &f.unresolved(), MAX_BULK).await?
        }
        (None, None, true) => {
            dead_letters::ids_matching(pool, app_id, &Filter::default(), MAX_BULK).await?
        }
        _ => {
            return Err(ApiError::Invalid(
                "ids, filter, all: give exactly one of them".into(),
            ));
        }
    };
    if body.max_attempts.is_some() && matches!(body.action.as_str(), "ignore" | "resolve") {
        return Err(ApiError::Invalid(
            "max_attempts: only a replay takes it (an ignored dead letter runs no more)".into(),
        ));
    }
    let max_attempts = replay_attempts(body.max_attempts)?;
    let mut tx = audit::begin(pool).await?;
    let (action, changed) = match body.action.as_str() {
        "replay" => (
            "dead_letter.bulk_replay",
            dead_letters::replay_with(&mut tx, app_id, &ids, max_attempts)
                .await?
                .len(),
        ),
        "ignore" | "resolve" => (
            "dead_letter.bulk_ignore",
            dead_letters::ignore(&mut *tx, app_id, &ids).await?.len(),
        ),
        other => {
            return Err(ApiError::Invalid(format!(
                "action: {other:?} is not replay or ignore"
            )));
        }
    };
    // What was asked for, as asked: a filter or "all" matched the rows
    // when the action ran, a list of ids named them.
    // Only what was given: an absent field or attempt budget is left out.
    let mut detail = match &body.filter {
        Some(f) => {
            let mut filter = serde_json::Map::new();
            for (name, value) in [
                ("source", f.source.clone()),
                ("topic", f.topic.clone()),
                ("trigger_id", f.trigger_id.map(|id| id.to_string())),
            ] {
                if let Some(value) = value {
                    filter.insert(name.into(), value.into());
                }
            }
            serde_json::json!({ "filter": filter })
        }
        None if body.all => serde_json::json!({ "all": true }),
        None => serde_json::json!({ "ids": ids.len() }),
    };
    if let Some(n) = max_attempts {
        detail["max_attempts"] = n.into();
    }
    if changed > 0 {
        let action = Action {
            action,
            target: None,
            rows: changed,
            detail,
        };
        audit::record(&mut tx, actor, app_id, action).await?;
    }
    audit::commit(tx).await?;
    Ok(Bulked {
        changed,
        more: body.ids.is_none() && ids.len() == MAX_BULK as usize,
    })
}

pub(super) async fn bulk(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(app): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterManage).await?;
    let body: BulkBody = crate::strict::json(&body)?;
    // As a cancel's: an empty list is a script's empty variable, not a request.
    if body.ids.as_ref().is_some_and(Vec::is_empty) {
        return Err(ApiError::Invalid(
            "ids: give at least one (or a filter, or \"all\": true)".into(),
        ));
    }
    let done = run_bulk(&state.pool, &audit::actor(&p), app.id, &body).await?;
    Ok(Json(serde_json::json!({ "changed": done.changed })))
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// A cursor is a cursor or a 400 with a message; never a panic.
        #[test]
        fn arbitrary_cursors_are_refused_not_panicked(s in ".{0,60}|-?[0-9]{1,25}_.{0,40}") {
            if let Err(err) = decode_cursor(&s) {
                proptest::prop_assert_eq!(err.status_and_code().1, "invalid");
            }
        }
    }

    #[test]
    fn a_cursor_round_trips() {
        let id = Uuid::now_v7();
        let at = chrono::DateTime::<chrono::Utc>::from_timestamp_micros(1_700_000_000_123_456)
            .unwrap_or_default();
        let cursor = decode_cursor(&format!("{}_{id}", at.timestamp_micros()));
        assert!(matches!(cursor, Ok(c) if c.id == id && c.created_at == at));
    }
}
