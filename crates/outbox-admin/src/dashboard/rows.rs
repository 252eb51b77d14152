//! One row of the outbox: its fields, payload and headers, lease and attempt
//! history, with the operator's actions on it (retry now, cancel); a row
//! that was dead-lettered leads to its dead letter.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use outbox_core::store::outbox as store;
use outbox_core::store::{dead_letters, pauses, processes};
use outbox_core::{App, Attempt};
use uuid::Uuid;

use crate::AdminState;
use crate::error::ApiError;

use super::flash::Flash;
use super::render::{error_page, esc, esc_shown, keys_cell, logout_form, page, when};
use super::session::{Session, may_operate, viewed_app};

fn time(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map(when).unwrap_or_default()
}

/// The attempt history as a table, with a line for every attempt number
/// missing between two recorded ones (it had no outcome written: its process
/// stopped or its lease expired). Empty when nothing was recorded.
pub(super) fn attempts_table(attempts: Option<&[Attempt]>) -> String {
    let Some(attempts) = attempts.filter(|a| !a.is_empty()) else {
        return r#"<h2>Attempt history</h2><p class=muted id=attempts-empty>No failed attempt recorded.</p>"#.to_owned();
    };
    let mut html = String::from(
        r#"<h2>Attempt history</h2><div class=scroll><table id=attempts><tr><th>#</th><th>Started</th><th>Took</th><th>Worker</th><th>Error</th></tr>"#,
    );
    let mut previous: Option<i32> = None;
    for a in attempts {
        if let Some(p) = previous.filter(|p| a.attempt > p + 1) {
            let missing = if a.attempt == p + 2 {
                format!("{}", p + 1)
            } else {
                format!("{}–{}", p + 1, a.attempt - 1)
            };
            html.push_str(&format!(
                r#"<tr class=muted><td>{missing}</td><td colspan=4>no outcome written: the process stopped or the lease expired</td></tr>"#
            ));
        }
        previous = Some(a.attempt);
        let took = a
            .started_at
            .map(|s| {
                let ms = (a.ended_at - s).num_milliseconds().max(0);
                if ms < 1000 {
                    format!("{ms} ms")
                } else {
                    format!("{:.1} s", ms as f64 / 1000.0)
                }
            })
            .unwrap_or_default();
        html.push_str(&format!(
            r#"<tr data-attempt="{n}"><td>{n}</td><td>{started}</td><td>{took}</td><td>{worker}</td><td class=err>{error}</td></tr>"#,
            n = a.attempt,
            started = time(a.started_at),
            worker = esc_shown(a.worker.as_deref().unwrap_or("")),
            error = esc_shown(a.error.as_deref().unwrap_or("")),
        ));
    }
    html.push_str("</table></div>");
    html
}

/// `GET /apps/{app}/outbox/{id}`: one row that has not finished. A row that
/// was dead-lettered leads to its dead letter.
pub(super) async fn row_page(
    State(state): State<AdminState>,
    session: Session,
    Path((app, id)): Path<(String, String)>,
    flash: Flash,
) -> Response {
    let result = async {
        let app = viewed_app(&state, &session, &app).await?;
        let id = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("outbox row"))?;
        let row = store::row(&state.pool, app.id, id).await?;
        // Not in the outbox: the dead letter it became, or one whose own id
        // this is (an id of the wrong kind pasted into the look-up).
        let buried = match row {
            Some(_) => None,
            None => match dead_letters::resolve_id(&state.pool, app.id, id).await {
                Ok(dead_letter) => Some(dead_letter),
                Err(outbox_core::Error::NotFound(_)) => None,
                Err(err) => return Err(err.into()),
            },
        };
        let operator = may_operate(&state, &session, &app.slug).await?;
        let waits = match &row {
            Some(row) if row.state != store::RowState::Running.as_str() => {
                waiting_note(&state, &app, &row.topic).await?
            }
            _ => String::new(),
        };
        Ok::<_, ApiError>((app, id, row, buried, operator, waits))
    }
    .await;
    let (app, id, row, buried, operator, waits) = match result {
        Ok(v) => v,
        Err(err) => return error_page(&err),
    };
    let slug = esc(&app.slug);
    let Some(row) = row else {
        if let Some(d) = buried {
            // An action just taken from its page (a cancel, a second
            // click): the dead letter's page shows its result as it was.
            let passed = flash.passed_on();
            let done = if passed.is_empty() {
                String::new()
            } else {
                format!("?{passed}")
            };
            return Redirect::to(&format!("/apps/{slug}/dead-letters/{d}{done}")).into_response();
        }
        let text = format!(
            r#"<p class=err id=gone>Row {id} is not in the outbox of {slug}: it finished, or never existed.</p><p><a href="/apps/{slug}/topics">Back</a></p>"#
        );
        return (StatusCode::NOT_FOUND, page("Not in the outbox", &text)).into_response();
    };
    let pretty = |v: &serde_json::Value| esc(&serde_json::to_string_pretty(v).unwrap_or_default());
    let replayed = row.replayed_from.map_or_else(String::new, |d| {
        format!(
            r#"<tr><th>Replayed from</th><td><a id=replayed-from href="/apps/{slug}/dead-letters/{d}">dead letter {d}</a></td></tr>"#
        )
    });
    let lease = match (&row.locked_by, row.locked_until) {
        (Some(by), Some(until)) if row.state == "running" => {
            format!("held by {} until {}", esc(by), when(until))
        }
        (Some(by), Some(until)) => {
            format!("last held by {}, expired {}", esc(by), when(until))
        }
        _ => "none".to_owned(),
    };
    let keys = keys_cell(&[
        ("idempotency", row.idempotency_key.as_deref()),
        ("ordering", row.ordering_key.as_deref()),
        ("partition", row.partition_key.as_deref()),
    ]);
    let body = format!(
        r#"{logout}<p><a href="/apps/{slug}/outbox">← {slug} · rows</a> · <a href="/apps/{slug}/topics">topics</a></p><h1>{topic}</h1>{flash}{waits}
<div class=scroll><table id=row><tr><th>Id</th><td>{id}</td></tr><tr><th>State</th><td id=state>{state}</td></tr>
<tr><th>Due</th><td>{due}</td></tr><tr><th>Source</th><td>{src}</td></tr>
<tr><th>Runs as</th><td>{target}{principal}</td></tr>
<tr><th>Keys</th><td>{keys}</td></tr><tr><th>Priority</th><td>{prio}</td></tr>
<tr><th>Attempts</th><td id=attempt-count>{att} of {max}</td></tr><tr><th>Lease</th><td>{lease}</td></tr>
<tr><th>First attempt</th><td>{first}</td></tr><tr><th>Last attempt</th><td>{last}</td></tr>
<tr><th>Last error</th><td class=err>{err}</td></tr><tr><th>Enqueued</th><td>{created}</td></tr>{trace}{replayed}</table></div>
{actions}{attempts}
<h2>Payload</h2><pre id=payload>{payload}</pre><h2>Headers</h2><pre id=headers>{headers}</pre>"#,
        logout = logout_form(&session),
        topic = esc_shown(&row.topic),
        id = row.id,
        state = esc(&row.state),
        due = when(row.due_at),
        flash = flash.html(),
        trace = trace_rows(&row.headers),
        actions = if operator {
            actions(&slug, &session.csrf, &row)
        } else {
            String::new()
        },
        src = if row.op.is_empty() {
            esc_shown(&row.source)
        } else {
            format!("{} · {}", esc_shown(&row.source), esc(&row.op))
        },
        target = esc_shown(row.target.as_deref().unwrap_or(row.topic.as_str())),
        principal = row
            .registered_by_principal
            .as_deref()
            .map(|p| format!(" as {}", esc(p)))
            .unwrap_or_default(),
        prio = row.priority,
        att = row.attempt_count,
        max = row
            .max_attempts
            .map_or_else(|| "the default".to_owned(), |n| n.to_string()),
        first = time(row.first_attempt_at),
        last = time(row.last_attempt_at),
        err = esc_shown(row.last_error.as_deref().unwrap_or("")),
        created = when(row.created_at),
        attempts = attempts_table(row.attempts.as_deref()),
        payload = pretty(&row.payload),
        headers = pretty(&row.headers),
    );
    page(&row.topic, &body).into_response()
}

/// Why a row that is not running waits past its due time, as the topics page
/// says it of its topic: the app suspended, the topic paused, or no live
/// process serving it. Empty when nothing holds it back.
async fn waiting_note(state: &AdminState, app: &App, topic: &str) -> Result<String, ApiError> {
    let slug = esc(&app.slug);
    if app.suspended_at.is_some() {
        return Ok(format!(
            r#"<p class=err id=row-waits>The app is suspended: no process claims its rows until it is resumed (<code>outboxd app resume {slug}</code>).</p>"#
        ));
    }
    if let Some(pause) = pauses::list(&state.pool, app.id)
        .await?
        .into_iter()
        .find(|p| p.topic == topic)
    {
        return Ok(format!(
            r#"<p class=err id=row-waits>Its topic is paused, since {since}{by}{reason}: no process claims its rows until it is resumed on the <a href="/apps/{slug}/topics">topics page</a>.</p>"#,
            since = when(pause.paused_at),
            by = pause
                .paused_by
                .map(|by| format!(" by {}", esc_shown(&by)))
                .unwrap_or_default(),
            reason = pause
                .reason
                .map(|r| format!(" ({})", esc_shown(&r)))
                .unwrap_or_default(),
        ));
    }
    if !processes::served_by_any(&state.pool, topic).await? {
        return Ok(format!(
            r#"<p class=err id=row-waits>No running process serves this topic: the row waits, spending no attempt, until a process with a handler for it, or relaying it, starts (who serves what: the <a href="/apps/{slug}/topics">topics page</a>).</p>"#
        ));
    }
    Ok(String::new())
}

/// The trace and correlation ids among the row's headers, as table rows.
fn trace_rows(headers: &serde_json::Value) -> String {
    [
        "traceparent",
        "correlation-id",
        "x-correlation-id",
        "trace-id",
    ]
    .iter()
    .filter_map(|name| {
        headers.get(*name).and_then(|v| v.as_str()).map(|v| {
            format!(
                r#"<tr><th>{name}</th><td><code>{}</code></td></tr>"#,
                esc_shown(v)
            )
        })
    })
    .collect()
}

/// The operator's forms for one row: retry now while it waits for a delay
/// or a backoff, cancel while no handler runs it.
fn actions(slug: &str, csrf: &str, row: &outbox_core::OutboxRow) -> String {
    let csrf = esc(csrf);
    let id = row.id;
    let mut html = String::from("<h2>Actions</h2><div id=row-actions>");
    if matches!(row.state.as_str(), "scheduled" | "retrying") {
        html.push_str(&format!(
            r#"<form method=post action="/apps/{slug}/outbox/{id}/retry"><input type=hidden name=csrf value="{csrf}"><button type=submit id=retry-now>Retry now</button> <span class=muted>makes it due at once; its attempt count stays</span></form>"#
        ));
    }
    if row.state == "running" {
        html.push_str(r#"<p class=muted>A handler is running this row: it cannot be cancelled until the attempt ends.</p>"#);
    } else {
        html.push_str(&format!(
            r#"<form method=post action="/apps/{slug}/outbox/{id}/cancel"><input type=hidden name=csrf value="{csrf}"><p><label>Reason <input name=reason required maxlength=1000></label> <label><input type=checkbox name=confirm value=yes required> cancel this row</label> <button type=submit id=cancel-row>Cancel</button></p><p class=muted>It becomes an ignored dead letter carrying the reason; nothing is lost.</p></form>"#
        ));
    }
    html.push_str("</div>");
    html
}
