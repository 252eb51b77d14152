//! outboxd as a platform over HTTP: KV writes that fire triggers, events,
//! jobs, and trigger management. Each write is one transaction.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use outbox_core::store::kv::{self, WriteContext};
use outbox_core::store::triggers::{self, TriggerSpec};
use outbox_core::{NewEvent, Source};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::AdminState;
use crate::api::Bearer;
use crate::audit::{self, Action};
use crate::auth::{self, Capability};
use crate::error::ApiError;

/// The producer API routes: KV, events, jobs and triggers.
pub fn routes() -> Router<AdminState> {
    Router::new()
        .route(
            "/api/apps/{app}/kv/{collection}/{key}",
            get(kv_get).put(kv_put).delete(kv_delete),
        )
        .route("/api/apps/{app}/events/{topic}", post(publish))
        .route("/api/apps/{app}/jobs/{queue}", post(job))
        .route(
            "/api/apps/{app}/triggers",
            get(list_triggers).post(create_trigger),
        )
        .route(
            "/api/apps/{app}/triggers/{id}",
            get(get_trigger).delete(delete_trigger),
        )
        .route("/api/apps/{app}/triggers/{id}/enable", post(enable_trigger))
        .route(
            "/api/apps/{app}/triggers/{id}/disable",
            post(disable_trigger),
        )
}

use crate::strict::{self, json as body, json_or_default as body_or_default};

/// A 201 answer with `Location` set to `location`.
fn created(location: &str, answer: Value) -> Response {
    let mut response = (StatusCode::CREATED, Json(answer)).into_response();
    if let Ok(value) = axum::http::HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

async fn kv_get(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, collection, key)): Path<(String, String, String)>,
) -> Result<Json<kv::Entry>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterRead).await?;
    kv::get(&state.pool, app.id, &collection, &key)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound("entry"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    value: Value,
    expected_version: Option<i64>,
}

async fn kv_put(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, collection, key)): Path<(String, String, String)>,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::Write).await?;
    let put: PutBody = body(&bytes)?;
    let mut tx = state
        .pool
        .begin()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let written = kv::put(
        &mut tx,
        app.id,
        &collection,
        &key,
        &put.value,
        put.expected_version,
        &WriteContext::default(),
    )
    .await?;
    tx.commit()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    // Version 1 is a new entry: 201 at its own URL; later versions are updates.
    if written.version == 1 {
        let location = format!("/api/apps/{}/kv/{collection}/{key}", app.slug);
        return Ok(created(&location, json!(written)));
    }
    Ok(Json(written).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    expected_version: Option<i64>,
}

async fn kv_delete(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, collection, key)): Path<(String, String, String)>,
    strict::Query(q): strict::Query<DeleteQuery>,
) -> Result<Json<kv::Written>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::Write).await?;
    let mut tx = state
        .pool
        .begin()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let written = kv::delete(
        &mut tx,
        app.id,
        &collection,
        &key,
        q.expected_version,
        &WriteContext::default(),
    )
    .await?
    .ok_or(ApiError::NotFound("entry"))?;
    tx.commit()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(written))
}

/// The body of `POST …/events/{topic}`: an event is published now, once
/// per idempotency key.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EventBody {
    #[serde(default)]
    payload: Value,
    headers: Option<Value>,
    idempotency_key: Option<String>,
    priority: Option<i64>,
    partition_key: Option<String>,
}

/// The body of `POST …/jobs/{queue}`: a job may also wait, keep an order
/// and limit its attempts.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct JobBody {
    #[serde(default)]
    payload: Value,
    headers: Option<Value>,
    idempotency_key: Option<String>,
    ordering_key: Option<String>,
    max_attempts: Option<i64>,
    run_at: Option<DateTime<Utc>>,
    delay_ms: Option<i64>,
    priority: Option<i64>,
    partition_key: Option<String>,
}

/// A body's `priority`, refused by name outside 0..=9.
fn priority_of(priority: Option<i64>) -> Result<i16, ApiError> {
    let Some(p) = priority else { return Ok(0) };
    i16::try_from(p)
        .ok()
        .filter(|p| (0..=outbox_core::model::MAX_PRIORITY).contains(p))
        .ok_or_else(|| {
            ApiError::Invalid(format!(
                "priority: {p} is not between 0 and {}",
                outbox_core::model::MAX_PRIORITY
            ))
        })
}

/// The longest a job may be delayed: ten years.
const MAX_DELAY_MS: i64 = 10 * 365 * 24 * 3600 * 1000;

async fn enqueue(state: &AdminState, app_id: Uuid, event: NewEvent) -> Result<Response, ApiError> {
    let mut tx = state
        .pool
        .begin()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let id = outbox_core::enqueue(&mut tx, app_id, &event).await?;
    tx.commit()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok((StatusCode::CREATED, Json(json!({ "id": id }))).into_response())
}

/// The row's headers: the body's, with the request's trace context
/// (`traceparent`, `correlation-id`, `x-correlation-id`) added where the body
/// does not set them, so one trace runs from the HTTP call through the row
/// to the NATS message and its consumer.
fn headers_of(headers: Option<Value>, request: &axum::http::HeaderMap) -> Result<Value, ApiError> {
    let mut headers = headers.unwrap_or_else(|| json!({}));
    let Some(object) = headers.as_object_mut() else {
        return Err(ApiError::Invalid("headers: must be a JSON object".into()));
    };
    for name in ["traceparent", "correlation-id", "x-correlation-id"] {
        let sent = request
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty() && v.len() <= 512);
        if let Some(value) = sent
            && !object.contains_key(name)
        {
            object.insert(name.to_owned(), Value::String(value.to_owned()));
        }
    }
    Ok(headers)
}

/// Resolves `slug` for writing a row of `topic`, a valid one. A `webhook:` topic makes
/// outboxd POST to the URL in it, signed with the app's secrets, from inside
/// the network it runs in: only those who may point a trigger at a URL (the
/// app's admins) may publish to one.
pub(crate) async fn authorize_topic(
    state: &AdminState,
    p: &auth::Principal,
    slug: &str,
    topic: &str,
) -> Result<outbox_core::App, ApiError> {
    let app = auth::authorize(&state.pool, p, slug, Capability::Write).await?;
    outbox_core::topics::validate_new_topic(topic)?;
    outbox_core::topics::check_webhook_prefix_case("topic", topic)?;
    if topic.starts_with(outbox_core::topics::WEBHOOK_PREFIX) {
        auth::authorize(&state.pool, p, slug, Capability::ManageTriggers)
            .await
            .map_err(|e| match e {
                ApiError::RoleTooLow { .. } => ApiError::NotAllowed(format!(
                    "topic: {topic:?} sends a request to the URL in it; only the app's admins may write to a webhook: topic (operators replay and retry existing rows)"
                )),
                other => other,
            })?;
    }
    Ok(app)
}

async fn publish(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, topic)): Path<(String, String)>,
    request: axum::http::HeaderMap,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let app = authorize_topic(&state, &p, &app, &topic).await?;
    let b: EventBody = body_or_default(&bytes)?;
    let mut event = NewEvent::new(topic, b.payload).with_source(Source::Pubsub);
    event.headers = headers_of(b.headers, &request)?;
    event.idempotency_key = b.idempotency_key;
    event.priority = priority_of(b.priority)?;
    event.partition_key = b.partition_key;
    enqueue(&state, app.id, event).await
}

async fn job(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, queue)): Path<(String, String)>,
    request: axum::http::HeaderMap,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let app = authorize_topic(&state, &p, &app, &queue).await?;
    let b: JobBody = body_or_default(&bytes)?;
    let mut event = NewEvent::new(queue, b.payload).with_source(Source::Queue);
    event.headers = headers_of(b.headers, &request)?;
    event.idempotency_key = b.idempotency_key;
    event.ordering_key = b.ordering_key;
    event.priority = priority_of(b.priority)?;
    event.partition_key = b.partition_key;
    if let Some(n) = b.max_attempts {
        event.max_attempts = Some(i32::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
            ApiError::Invalid(format!(
                "max_attempts: {n} is not between 1 and {}",
                i32::MAX
            ))
        })?);
    }
    event.run_at = match (b.run_at, b.delay_ms) {
        (Some(_), Some(_)) => {
            return Err(ApiError::Invalid(
                "run_at, delay_ms: give at most one of them".into(),
            ));
        }
        (Some(at), None) => Some(at),
        (None, Some(ms)) if (0..=MAX_DELAY_MS).contains(&ms) => {
            Some(Utc::now() + chrono::Duration::milliseconds(ms))
        }
        (None, Some(ms)) => {
            return Err(ApiError::Invalid(format!(
                "delay_ms: {ms} is not between 0 and {MAX_DELAY_MS} (ten years)"
            )));
        }
        (None, None) => None,
    };
    enqueue(&state, app.id, event).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerBody {
    kind: String,
    name: String,
    target: String,
    /// As the trigger list names it too.
    #[serde(alias = "collection_glob")]
    collection: Option<String>,
    ops: Option<Vec<String>>,
    schedule: Option<String>,
    timezone: Option<String>,
    #[serde(default)]
    sources: Vec<String>,
    #[serde(default)]
    topics: Vec<String>,
    #[serde(default)]
    trigger_ids: Vec<Uuid>,
}

/// Builds a trigger spec from API input, naming what is missing and what
/// belongs to another kind (a cron trigger sent a collection would have
/// been created without it, silently).
fn spec(b: &TriggerBody) -> Result<TriggerSpec, ApiError> {
    let given = [
        ("collection", "kv", b.collection.is_some()),
        ("ops", "kv", b.ops.is_some()),
        ("schedule", "cron", b.schedule.is_some()),
        ("timezone", "cron", b.timezone.is_some()),
        ("sources", "dead_letter", !b.sources.is_empty()),
        ("topics", "dead_letter", !b.topics.is_empty()),
        ("trigger_ids", "dead_letter", !b.trigger_ids.is_empty()),
    ];
    if let Some((field, kind, _)) = given
        .iter()
        .find(|(_, kind, given)| *given && *kind != b.kind)
        .filter(|_| ["kv", "cron", "dead_letter"].contains(&b.kind.as_str()))
    {
        return Err(ApiError::Invalid(format!(
            "{field}: belongs to {kind} triggers, not to a {} trigger",
            b.kind
        )));
    }
    match b.kind.as_str() {
        "kv" => Ok(TriggerSpec::Kv {
            collection: b
                .collection
                .clone()
                .ok_or_else(|| ApiError::Invalid("kv triggers need collection".into()))?,
            ops: b
                .ops
                .clone()
                .unwrap_or_else(|| vec!["put".into(), "delete".into()]),
        }),
        "cron" => Ok(TriggerSpec::Cron {
            schedule: b
                .schedule
                .clone()
                .ok_or_else(|| ApiError::Invalid("cron triggers need schedule".into()))?,
            timezone: b.timezone.clone().unwrap_or_else(|| "UTC".into()),
        }),
        "dead_letter" => Ok(TriggerSpec::DeadLetter {
            sources: b.sources.clone(),
            topics: b.topics.clone(),
            trigger_ids: b.trigger_ids.clone(),
        }),
        other => Err(ApiError::Invalid(format!(
            "kind {other:?} is not kv, cron or dead_letter"
        ))),
    }
}

async fn create_trigger(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(app): Path<String>,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::ManageTriggers).await?;
    let b: TriggerBody = body(&bytes)?;
    let spec = spec(&b)?;
    let principal = format!("user:{}", p.user.id);
    let mut tx = state
        .pool
        .begin()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let id = triggers::create(&mut tx, app.id, &b.name, &b.target, Some(&principal), &spec).await?;
    let target = id.to_string();
    let action = Action {
        action: "trigger.create",
        target: Some(&target),
        rows: 0,
        detail: json!({ "name": b.name, "target": b.target, "kind": b.kind }),
    };
    audit::record(&mut tx, &audit::actor(&p), app.id, action).await?;
    tx.commit()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(created(
        &format!("/api/apps/{}/triggers/{id}", app.slug),
        json!({ "id": id }),
    ))
}

async fn list_triggers(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(app): Path<String>,
) -> Result<Json<Vec<triggers::Trigger>>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterRead).await?;
    Ok(Json(triggers::list(&state.pool, app.id).await?))
}

/// `GET /api/apps/{app}/triggers/{trigger}`: one trigger, by id or name.
async fn get_trigger(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, trigger)): Path<(String, String)>,
) -> Result<Json<triggers::Trigger>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterRead).await?;
    Ok(Json(triggers::find(&state.pool, app.id, &trigger).await?))
}

/// Enables or disables the trigger named by id or name; answers its id,
/// its state and whether this changed it.
async fn set_trigger(
    state: AdminState,
    p: auth::Principal,
    app: String,
    trigger: String,
    enabled: bool,
) -> Result<Json<Value>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::ManageTriggers).await?;
    let id = triggers::find(&state.pool, app.id, &trigger).await?.id;
    let changed = change_trigger(&state.pool, &audit::actor(&p), app.id, id, Some(enabled)).await?;
    Ok(Json(
        json!({ "id": id, "enabled": enabled, "changed": changed }),
    ))
}

/// Enables or disables (`Some`) or deletes (`None`) a trigger of the app for
/// `actor`, recorded in the audit log; returns whether anything changed (an
/// enable of an enabled trigger changes, and records, nothing).
pub async fn change_trigger(
    pool: &sqlx::PgPool,
    actor: &str,
    app_id: Uuid,
    id: Uuid,
    enabled: Option<bool>,
) -> Result<bool, ApiError> {
    let mut tx = audit::begin(pool).await?;
    let action = match enabled {
        Some(enabled) => {
            if !triggers::set_enabled(&mut tx, app_id, id, enabled).await? {
                // Already so: nothing to record.
                audit::commit(tx).await?;
                return Ok(false);
            }
            if enabled {
                "trigger.enable"
            } else {
                "trigger.disable"
            }
        }
        None => {
            triggers::delete(&mut *tx, app_id, id).await?;
            "trigger.delete"
        }
    };
    let target = id.to_string();
    audit::record(&mut tx, actor, app_id, Action::on(action, &target)).await?;
    audit::commit(tx).await?;
    Ok(true)
}

async fn enable_trigger(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, trigger)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    set_trigger(state, p, app, trigger, true).await
}

async fn disable_trigger(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, trigger)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    set_trigger(state, p, app, trigger, false).await
}

/// `DELETE /api/apps/{app}/triggers/{trigger}`: 204, as a pause's or a
/// limit's removal answers.
async fn delete_trigger(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, trigger)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::ManageTriggers).await?;
    let id = triggers::find(&state.pool, app.id, &trigger).await?.id;
    change_trigger(&state.pool, &audit::actor(&p), app.id, id, None).await?;
    Ok(StatusCode::NO_CONTENT)
}
