//! Topics as the unit of control: who serves what (live processes), paused
//! topics, concurrency and rate limits, the rows by state, and the audit log.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use outbox_core::store::outbox as store;
use outbox_core::store::{activity, dead_letters, limits, pauses, processes};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::AdminState;
use crate::audit::{self, Action};
use crate::auth::{self, Capability};
use crate::error::ApiError;

use super::Bearer;

/// `GET /api/apps/{app}/processes`: the live dispatcher processes and what
/// each serves (they serve every app).
pub(super) async fn list_processes(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(app): Path<String>,
) -> Result<Json<Vec<processes::Process>>, ApiError> {
    auth::authorize(&state.pool, &p, &app, Capability::DeadLetterRead).await?;
    Ok(Json(processes::live(&state.pool).await?))
}

/// A topic as the overview shows it: its rows by state as the leader last
/// counted them, whether it is paused, and its unresolved dead letters.
#[derive(Debug, Clone, Serialize)]
pub struct TopicSummary {
    /// The topic.
    pub topic: String,
    /// Due now and not leased.
    pub due: i64,
    /// Due later (delayed, or waiting for a retry's backoff), not leased.
    pub scheduled: i64,
    /// Leased: a handler is running it.
    pub running: i64,
    /// Of `scheduled`, the rows waiting for a retry's backoff.
    pub retrying: i64,
    /// Due, and no live process serves the topic now (0 while it is paused).
    pub unserved: i64,
    /// When the oldest unserved row became due.
    pub oldest_unserved_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When the rows were counted (`None`: the topic had no rows then).
    pub sampled_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Whether the topic is paused now.
    pub paused: bool,
    /// Its unresolved dead letters, counted now.
    pub dead_letters: i64,
}

/// The topics of `app`: those with rows (unserved first, then by rows due),
/// then those without rows that are paused or have unresolved dead letters,
/// so that a paused topic whose rows all finished still shows.
pub async fn topic_summaries(state: &AdminState, app: Uuid) -> Result<Vec<TopicSummary>, ApiError> {
    let (states, paused, dead) = tokio::try_join!(
        store::recorded_state_counts(&state.pool, app),
        pauses::list(&state.pool, app),
        dead_letters::unresolved_by_topic(&state.pool, app),
    )?;
    let paused: Vec<String> = paused.into_iter().map(|p| p.topic).collect();
    // By name, so that the topics without rows come in a stable order.
    let dead: std::collections::BTreeMap<String, i64> = dead.into_iter().collect();
    let summary = |topic: String, counted: Option<&store::TopicStates>| TopicSummary {
        due: counted.map_or(0, |s| s.due),
        scheduled: counted.map_or(0, |s| s.scheduled),
        running: counted.map_or(0, |s| s.running),
        retrying: counted.map_or(0, |s| s.retrying),
        unserved: counted.map_or(0, |s| s.unserved),
        oldest_unserved_at: counted.and_then(|s| s.oldest_unserved_at),
        sampled_at: counted.map(|s| s.sampled_at),
        paused: paused.contains(&topic),
        dead_letters: dead.get(&topic).copied().unwrap_or(0),
        topic,
    };
    let mut topics: Vec<TopicSummary> = states
        .iter()
        .map(|s| summary(s.topic.clone(), Some(s)))
        .collect();
    let mut extras: Vec<&String> = dead.keys().chain(paused.iter()).collect();
    extras.sort();
    for extra in extras {
        if !topics.iter().any(|t| &t.topic == extra) {
            topics.push(summary(extra.clone(), None));
        }
    }
    Ok(topics)
}

/// `GET /api/apps/{app}/topics`: [`topic_summaries`].
pub(super) async fn list_topics(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(app): Path<String>,
) -> Result<Json<Vec<TopicSummary>>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterRead).await?;
    Ok(Json(topic_summaries(&state, app.id).await?))
}

/// The query of `GET /api/apps/{app}/activity`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct ActivityQuery {
    /// Only this topic.
    pub topic: Option<String>,
    /// How many minutes back (1..=1440, default 60).
    pub minutes: Option<i32>,
}

impl ActivityQuery {
    /// The minutes asked for, checked.
    fn minutes(&self) -> Result<i32, ApiError> {
        match self.minutes {
            None => Ok(60),
            Some(n @ 1..=1440) => Ok(n),
            Some(n) => Err(ApiError::Invalid(format!(
                "minutes: {n} is not between 1 and 1440"
            ))),
        }
    }
}

/// `GET /api/apps/{app}/activity`: attempts completed and failed, rows due
/// and the oldest due age, per minute over the last `minutes`.
pub(super) async fn list_activity(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(app): Path<String>,
    q: Result<crate::strict::Query<ActivityQuery>, ApiError>,
) -> Result<Json<Vec<activity::MinuteActivity>>, ApiError> {
    let crate::strict::Query(q) = q?;
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterRead).await?;
    let topic = q.topic.as_deref().filter(|t| !t.is_empty());
    Ok(Json(
        activity::per_minute(&state.pool, app.id, topic, q.minutes()?).await?,
    ))
}

/// The query of `GET /api/apps/{app}/stream`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StreamQuery {
    /// A subject filter after the tenant's token (default `>`).
    subject: Option<String>,
    /// At most this many, the latest (1..=100, default 10).
    last: Option<usize>,
    /// Stored at most this many seconds ago (1..=604800, default 3600).
    since_secs: Option<u64>,
}

/// `GET /api/apps/{app}/stream`: the latest messages relayed for the app,
/// read through an ephemeral consumer of this request's own.
pub(super) async fn read_stream(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(app): Path<String>,
    q: Result<crate::strict::Query<StreamQuery>, ApiError>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let crate::strict::Query(q) = q?;
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterRead).await?;
    let reader = state.stream_reader.as_ref().ok_or_else(|| {
        ApiError::Absent(
            "no message stream: this outboxd does not relay to NATS (set nats.url)".into(),
        )
    })?;
    let last = q.last.unwrap_or(10);
    if !(1..=100).contains(&last) {
        return Err(ApiError::Invalid(format!(
            "last: {last} is not between 1 and 100"
        )));
    }
    let since = q.since_secs.unwrap_or(3600);
    if !(1..=604_800).contains(&since) {
        return Err(ApiError::Invalid(format!(
            "since_secs: {since} is not between 1 and 604800"
        )));
    }
    let subject = q.subject.as_deref().unwrap_or(">");
    let messages = reader
        .tail(
            &app.slug,
            subject,
            last,
            std::time::Duration::from_secs(since),
        )
        .await
        .map_err(|e| match e {
            crate::StreamReadError::Filter(why) => ApiError::Invalid(why),
            crate::StreamReadError::Unavailable(why) => ApiError::internal(why),
        })?;
    Ok(Json(messages))
}

/// The query of `GET /api/apps/{app}/audit`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditQuery {
    /// Entries older than this one (the last `id` of the previous page).
    pub before: Option<i64>,
    /// At most this many (1..=500, default 100). Signed, so that a
    /// negative one is told the range as elsewhere.
    pub limit: Option<i64>,
}

impl AuditQuery {
    /// The page size asked for, checked.
    pub(crate) fn limit(&self) -> Result<u32, ApiError> {
        match self.limit {
            None => Ok(100),
            Some(n @ 1..=500) => Ok(n as u32),
            Some(n) => Err(ApiError::Invalid(format!(
                "limit: {n} is not between 1 and 500"
            ))),
        }
    }
}

/// `GET /api/apps/{app}/audit`: the app's recorded operator actions, newest
/// first (`before` pages back).
pub(super) async fn list_audit(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(app): Path<String>,
    q: Result<crate::strict::Query<AuditQuery>, ApiError>,
) -> Result<Json<Vec<outbox_core::store::audit::Record>>, ApiError> {
    let crate::strict::Query(q) = q?;
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterRead).await?;
    let limit = q.limit()?;
    Ok(Json(
        outbox_core::store::audit::list(&state.pool, app.id, q.before, limit).await?,
    ))
}

/// `GET /api/apps/{app}/pauses`: the app's paused topics.
pub(super) async fn list_pauses(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(app): Path<String>,
) -> Result<Json<Vec<pauses::TopicPause>>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterRead).await?;
    Ok(Json(pauses::list(&state.pool, app.id).await?))
}

/// What a pause did.
#[derive(Debug, Clone, Copy)]
pub struct Paused {
    /// Paused now; false when it was paused already.
    pub now: bool,
    /// Whether anything in the app names the topic ([`pauses::topic_seen`]):
    /// false is most often a misspelt topic, which every caller points out.
    pub seen: bool,
}

/// What a limit did.
#[derive(Debug, Clone)]
pub struct Limited {
    /// The limits as set.
    pub limits: limits::ValidLimits,
    /// As [`Paused::seen`].
    pub seen: bool,
}

/// Pauses `topic` of the app for `actor` (recorded in the audit log when it
/// was not paused already).
pub async fn pause_topic(
    pool: &sqlx::PgPool,
    actor: &str,
    app_id: Uuid,
    topic: &str,
    reason: Option<&str>,
) -> Result<Paused, ApiError> {
    let mut tx = audit::begin(pool).await?;
    let paused = pauses::pause(&mut *tx, app_id, topic, Some(actor), reason).await?;
    let seen = pauses::topic_seen(&mut *tx, app_id, topic).await?;
    if paused {
        let action = Action {
            action: "topic.pause",
            target: Some(topic),
            rows: 0,
            detail: json!({ "reason": reason }),
        };
        audit::record(&mut tx, actor, app_id, action).await?;
    }
    audit::commit(tx).await?;
    Ok(Paused { now: paused, seen })
}

/// Resumes `topic` for `actor` (recorded); 404 when it was not paused.
pub async fn resume_topic(
    pool: &sqlx::PgPool,
    actor: &str,
    app_id: Uuid,
    topic: &str,
) -> Result<(), ApiError> {
    let mut tx = audit::begin(pool).await?;
    if !pauses::resume(&mut *tx, app_id, topic).await? {
        return Err(ApiError::NotFound("pause"));
    }
    let action = Action::on("topic.resume", topic);
    audit::record(&mut tx, actor, app_id, action).await?;
    audit::commit(tx).await
}

/// Sets `topic`'s limits for `actor` (recorded, with the limits).
pub async fn limit_topic(
    pool: &sqlx::PgPool,
    actor: &str,
    app_id: Uuid,
    topic: &str,
    wanted: &limits::Limits,
) -> Result<Limited, ApiError> {
    let mut tx = audit::begin(pool).await?;
    let set = limits::set(&mut *tx, app_id, topic, wanted, Some(actor)).await?;
    let seen = pauses::topic_seen(&mut *tx, app_id, topic).await?;
    let action = Action {
        action: "topic.limit",
        target: Some(topic),
        rows: 0,
        detail: json!({
            "max_running": set.max_running(),
            "max_running_per_key": set.max_running_per_key(),
            "rate_per_sec": set.rate().map(|(r, _)| r),
            "burst": set.rate().map(|(_, b)| b),
        }),
    };
    audit::record(&mut tx, actor, app_id, action).await?;
    audit::commit(tx).await?;
    Ok(Limited { limits: set, seen })
}

/// Removes `topic`'s limits for `actor` (recorded); 404 when it had none.
pub async fn unlimit_topic(
    pool: &sqlx::PgPool,
    actor: &str,
    app_id: Uuid,
    topic: &str,
) -> Result<(), ApiError> {
    let mut tx = audit::begin(pool).await?;
    if !limits::remove(&mut *tx, app_id, topic).await? {
        return Err(ApiError::NotFound("limit"));
    }
    let action = Action::on("topic.unlimit", topic);
    audit::record(&mut tx, actor, app_id, action).await?;
    audit::commit(tx).await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct PauseBody {
    reason: Option<String>,
}

/// `PUT /api/apps/{app}/pauses/{topic}`: pauses the topic in every process
/// within about a second; 201 when paused now, 200 when it already was.
pub(super) async fn pause(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, topic)): Path<(String, String)>,
    bytes: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::Operate).await?;
    let body: PauseBody = crate::strict::json_or_default(&bytes)?;
    let actor = audit::actor(&p);
    let paused = pause_topic(&state.pool, &actor, app.id, &topic, body.reason.as_deref()).await?;
    let status = if paused.now {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({ "topic": topic, "paused": true, "seen": paused.seen })),
    ))
}

/// `DELETE /api/apps/{app}/pauses/{topic}`: resumes the topic; 404 when it
/// was not paused.
pub(super) async fn resume(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, topic)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::Operate).await?;
    resume_topic(&state.pool, &audit::actor(&p), app.id, &topic).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/apps/{app}/limits`: the app's topics with a concurrency or rate limit,
/// each with how many of its rows run now.
pub(super) async fn list_limits(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path(app): Path<String>,
) -> Result<Json<Vec<limits::TopicLimit>>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::DeadLetterRead).await?;
    Ok(Json(limits::list(&state.pool, app.id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LimitBody {
    max_running: Option<i64>,
    max_running_per_key: Option<i64>,
    rate_per_sec: Option<f64>,
    burst: Option<i64>,
}

/// `PUT /api/apps/{app}/limits/{topic}`: at most `max_running` rows of the
/// topic run at once (`max_running_per_key` per partition key), and at most `rate_per_sec` start per second (bursts
/// of `burst`), across every process, from about a second on. Replaces the
/// topic's limits.
pub(super) async fn set_limit(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, topic)): Path<(String, String)>,
    bytes: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::Operate).await?;
    let body: LimitBody = crate::strict::json(&bytes)?;
    let wanted = limits::Limits {
        max_running: body.max_running,
        max_running_per_key: body.max_running_per_key,
        rate_per_sec: body.rate_per_sec,
        burst: body.burst,
    };
    let Limited { limits: set, seen } =
        limit_topic(&state.pool, &audit::actor(&p), app.id, &topic, &wanted).await?;
    Ok(Json(json!({
        "topic": topic,
        "seen": seen,
        "max_running": set.max_running(),
        "max_running_per_key": set.max_running_per_key(),
        "rate_per_sec": set.rate().map(|(r, _)| r),
        "burst": set.rate().map(|(_, b)| b),
    })))
}

/// `DELETE /api/apps/{app}/limits/{topic}`: removes the topic's limit; 404
/// when it had none.
pub(super) async fn remove_limit(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, topic)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let app = auth::authorize(&state.pool, &p, &app, Capability::Operate).await?;
    unlimit_topic(&state.pool, &audit::actor(&p), app.id, &topic).await?;
    Ok(StatusCode::NO_CONTENT)
}
