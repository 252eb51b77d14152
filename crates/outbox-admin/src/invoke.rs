//! Synchronous invoke: `POST /api/apps/{app}/invoke/{topic}` enqueues a row
//! with an inbox and waits for the dispatcher's answer — which may come from
//! another process: the answer travels through the database (the inbox row
//! and a `NOTIFY outbox_reply`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use outbox_core::store::invocations;
use outbox_core::store::listen::{Heard, Listener, reconnect_pause};
use outbox_core::{NewEvent, Source};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::AdminState;
use crate::api::Bearer;
use crate::error::ApiError;

/// Longest a caller may wait.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// Wakes waiting callers when their answer is in.
#[derive(Clone, Default)]
pub struct ReplyHub {
    waiters: Arc<Mutex<HashMap<Uuid, oneshot::Sender<()>>>>,
}

impl ReplyHub {
    /// A hub listening on the reply channel (reconnecting with backoff).
    pub fn start(pool: PgPool) -> Self {
        let hub = Self::default();
        let waiters = hub.waiters.clone();
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                // The pool closes when the server shuts down: stop listening then.
                if pool.is_closed() {
                    return;
                }
                let listened = async {
                    let mut listener =
                        Listener::connect(&pool, &[invocations::REPLY_CHANNEL]).await?;
                    loop {
                        // After a reconnection waiting callers poll, as always.
                        if let Heard::Notification(payload) = listener.next().await?
                            && let Ok(inbox) = Uuid::parse_str(&payload)
                            && let Some(tx) = waiters.lock().ok().and_then(|mut w| w.remove(&inbox))
                        {
                            let _ = tx.send(());
                        }
                    }
                    #[allow(unreachable_code)]
                    Ok::<(), outbox_core::Error>(())
                }
                .await;
                if let Err(err) = listened {
                    // The server is shutting down: not a lost connection.
                    if pool.is_closed() {
                        return;
                    }
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %err, "reply listener lost; waiting callers poll meanwhile");
                }
                tokio::time::sleep(reconnect_pause(failures)).await;
            }
        });
        hub
    }

    fn register(&self, inbox: Uuid) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiters.lock() {
            w.insert(inbox, tx);
        }
        rx
    }

    fn forget(&self, inbox: Uuid) {
        if let Ok(mut w) = self.waiters.lock() {
            w.remove(&inbox);
        }
    }
}

/// The invoke route.
pub fn routes() -> Router<AdminState> {
    Router::new().route("/api/apps/{app}/invoke/{topic}", post(invoke))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct InvokeBody {
    #[serde(default)]
    payload: Value,
    headers: Option<Value>,
    timeout_ms: Option<i64>,
}

async fn invoke(
    State(state): State<AdminState>,
    Bearer(p): Bearer,
    Path((app, topic)): Path<(String, String)>,
    bytes: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let app = crate::events_api::authorize_topic(&state, &p, &app, &topic).await?;
    let body: InvokeBody = crate::strict::json_or_default(&bytes)?;
    let timeout_ms = body.timeout_ms.unwrap_or(10_000);
    let max_ms = MAX_TIMEOUT.as_millis() as i64;
    if !(1..=max_ms).contains(&timeout_ms) {
        return Err(ApiError::Invalid(format!(
            "timeout_ms: {timeout_ms} is not between 1 and {max_ms}"
        )));
    }
    let timeout = Duration::from_millis(timeout_ms.unsigned_abs());
    let mut event = NewEvent::new(topic.clone(), body.payload)
        .with_source(Source::Pubsub)
        .with_max_attempts(1);
    if let Some(h) = body.headers {
        event.headers = h;
    }
    // A row nobody serves, or held on purpose, would wait unclaimed until
    // the timeout and then run after the caller was told it timed out.
    if !outbox_core::store::processes::served_by_any(&state.pool, &topic).await? {
        return Err(ApiError::NoHandler(topic));
    }
    if app.suspended_at.is_some() {
        return Err(ApiError::Conflict(format!(
            "app {:?} is suspended: its rows wait until it is resumed",
            app.slug
        )));
    }
    if outbox_core::store::pauses::is_paused(&state.pool, app.id, &topic).await? {
        return Err(ApiError::Conflict(format!(
            "topic {topic:?} is paused: its rows wait until it is resumed"
        )));
    }
    let db = |e: sqlx::Error| ApiError::internal(e.to_string());
    let mut tx = state.pool.begin().await.map_err(db)?;
    let (inbox, outbox_id) = invocations::start(&mut tx, app.id, event).await?;
    // Registered before the commit: the answer cannot come earlier.
    let mut woken = state.replies.register(inbox);
    tx.commit().await.map_err(db)?;
    let deadline = tokio::time::Instant::now() + timeout;
    let answer = loop {
        if let Some(answer) = invocations::take(&state.pool, inbox).await? {
            break answer;
        }
        // Woken by the NOTIFY, or poll every 500 ms in case a notification was missed.
        let wait = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + Duration::from_millis(500)),
            &mut woken,
        )
        .await;
        if tokio::time::Instant::now() >= deadline && wait.is_err() {
            state.replies.forget(inbox);
            if let Some(answer) = invocations::abandon(&state.pool, inbox).await? {
                // The answer landed just before we gave up.
                break answer;
            }
            let fate = if invocations::withdraw(&state.pool, app.id, outbox_id).await? {
                format!("withdrawn before any handler took it (row {outbox_id}): it will not run")
            } else {
                format!(
                    "a handler has taken it or is taking it (row {outbox_id}): it may still run once, and its outcome is recorded in abandoned_executions"
                )
            };
            return Err(ApiError::Timeout {
                after: timeout,
                fate,
            });
        }
        if wait.is_ok() {
            // The receiver is spent (woken, or its sender dropped): arm a new one.
            woken = state.replies.register(inbox);
        }
    };
    state.replies.forget(inbox);
    if answer.ok {
        Ok(Json(
            json!({ "id": outbox_id, "ok": true, "result": answer.result }),
        ))
    } else {
        let message = answer
            .result
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("handler failed");
        match answer.result.get("code").and_then(Value::as_str) {
            Some(invocations::NO_HANDLER) => return Err(ApiError::NoHandler(topic)),
            Some(invocations::UNAVAILABLE) => {
                let wait = answer
                    .result
                    .get("retry_after_secs")
                    .and_then(Value::as_u64)
                    .unwrap_or(1);
                return Err(ApiError::Unavailable(
                    message.to_owned(),
                    Duration::from_secs(wait),
                ));
            }
            _ => {}
        }
        Err(ApiError::HandlerFailed(message.to_owned()))
    }
}
