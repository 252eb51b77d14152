//! The topics page: who serves what (the live processes), the paused
//! topics with a resume button, and a form to pause one.

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use outbox_core::store::{pauses, processes};

use crate::AdminState;
use crate::auth::{self, Capability};
use crate::error::ApiError;

use super::render::{error_page, esc, logout_form, page};
use super::session::{Session, after_form, checked_form, field};

pub(super) async fn topics_page(
    State(state): State<AdminState>,
    session: Session,
    Path(app): Path<String>,
) -> Response {
    let result = async {
        let app = auth::authorize(
            &state.pool,
            &session.principal,
            &app,
            Capability::DeadLetterRead,
        )
        .await?;
        let paused = pauses::list(&state.pool, app.id).await?;
        let live = processes::live(&state.pool).await?;
        Ok::<_, ApiError>((app, paused, live))
    }
    .await;
    let (app, paused, live) = match result {
        Ok(v) => v,
        Err(err) => return error_page(&err),
    };
    let slug = esc(&app.slug);
    let csrf = esc(&session.csrf);
    let mut body = logout_form(&session);
    body.push_str(&format!(
        r#"<p><a href="/apps/{slug}/dead-letters?unresolved=true">← {slug} dead letters</a></p><h1>{slug} · topics</h1>
<h2>Paused</h2>"#
    ));
    if paused.is_empty() {
        body.push_str(r#"<p class=muted data-paused=none>No topic is paused. Pausing one stops every process from claiming its rows within about a second; rows already running finish.</p>"#);
    } else {
        body.push_str(
            "<table><tr><th>Topic</th><th>Since</th><th>By</th><th>Reason</th><th></th></tr>",
        );
        for p in &paused {
            body.push_str(&format!(
                r#"<tr data-paused="{topic}"><td>{topic}</td><td>{at}</td><td>{by}</td><td>{reason}</td><td>
<form class=inline method=post action="/apps/{slug}/topics/resume"><input type=hidden name=csrf value="{csrf}"><input type=hidden name=topic value="{topic}"><button type=submit>resume</button></form></td></tr>"#,
                topic = esc(&p.topic),
                at = p.paused_at.to_rfc3339(),
                by = esc(p.paused_by.as_deref().unwrap_or("")),
                reason = esc(p.reason.as_deref().unwrap_or("")),
            ));
        }
        body.push_str("</table>");
    }
    body.push_str(&format!(
        r#"<form method=post action="/apps/{slug}/topics/pause"><input type=hidden name=csrf value="{csrf}">
<p><label>Topic <input name=topic required maxlength=255></label> <label>Reason <input name=reason maxlength=1000></label> <button type=submit>Pause</button></p></form>
<h2>Processes</h2>"#
    ));
    if live.is_empty() {
        body.push_str(r#"<p class=muted data-processes=none>No dispatcher is running: rows wait until one serving their topic starts (<code>outboxd run</code>).</p>"#);
    } else {
        body.push_str("<table><tr><th>Worker</th><th>Host</th><th>Version</th><th>Serves</th><th>Since</th><th>Last seen</th></tr>");
        for p in &live {
            let mut serves = p.topics.clone();
            serves.extend(p.patterns.iter().cloned());
            body.push_str(&format!(
                r#"<tr data-process="{id}"><td>{worker}</td><td>{pid}@{host}</td><td>{version}</td><td>{serves}</td><td>{since}</td><td>{seen}</td></tr>"#,
                id = p.id,
                worker = esc(&p.worker),
                pid = p.pid,
                host = esc(&p.host),
                version = esc(&p.version),
                serves = esc(&serves.join(", ")),
                since = p.started_at.to_rfc3339(),
                seen = p.last_seen.to_rfc3339(),
            ));
        }
        body.push_str("</table>");
    }
    page(&format!("{} topics", app.slug), &body).into_response()
}

/// `POST /apps/{app}/topics/{pause|resume}` with the topic (and a reason).
pub(super) async fn change_topic(
    State(state): State<AdminState>,
    session: Session,
    Path((app, action)): Path<(String, String)>,
    req: Request,
) -> Response {
    let result = async {
        let (form, app) = checked_form(&state, &session, &app, Capability::Operate, req).await?;
        let topic = field(&form, "topic").unwrap_or_default().trim().to_owned();
        match action.as_str() {
            "pause" => {
                let reason = field(&form, "reason")
                    .map(str::trim)
                    .filter(|r| !r.is_empty());
                let by = session.principal.user.email.as_str();
                pauses::pause(&state.pool, app.id, &topic, Some(by), reason).await?;
            }
            "resume" => {
                if !pauses::resume(&state.pool, app.id, &topic).await? {
                    return Err(ApiError::not_found("pause"));
                }
            }
            _ => return Err(ApiError::not_found("action")),
        }
        Ok::<_, ApiError>(format!("/apps/{}/topics", app.slug))
    }
    .await;
    after_form(result)
}
