//! The topics page: each topic's rows by state as the leader last counted
//! them (unserved ones stand out), who serves what (the live processes),
//! the paused topics with a resume button and a form to pause one, and the
//! limited topics with a form to limit one.

use axum::extract::{Path, Request, State};
use axum::response::{Html, IntoResponse, Response};
use outbox_core::store::{limits, pauses, processes};

use crate::AdminState;
use crate::api;
use crate::audit;
use crate::auth::Capability;
use crate::error::ApiError;

use super::flash::Flash;
use super::overview::{Overview, processes_table};
use super::render::{error_page, esc, logout_form, page, when};
use super::session::{Session, after_form, checked_form, field, may, viewed_app};

pub(super) async fn topics_page(
    State(state): State<AdminState>,
    session: Session,
    Path(app): Path<String>,
    flash: Flash,
) -> Response {
    let result = async {
        let app = viewed_app(&state, &session, &app).await?;
        let paused = pauses::list(&state.pool, app.id).await?;
        let limited = limits::list(&state.pool, app.id).await?;
        let live = processes::live(&state.pool).await?;
        let overview = Overview::read(&state, app.id).await?;
        let operator = may(&state, &session, &app.slug, Capability::Operate).await?;
        Ok::<_, ApiError>((app, paused, limited, live, overview, operator))
    }
    .await;
    let (app, paused, limited, live, overview, operator) = match result {
        Ok(v) => v,
        Err(err) => return error_page(&err),
    };
    let slug = esc(&app.slug);
    let csrf = esc(&session.csrf);
    let mut body = logout_form(&session);
    body.push_str(&format!(
        r#"<p><a href="/apps/{slug}/outbox">{slug} · rows</a> · <a href="/apps/{slug}/dead-letters?unresolved=true">dead letters</a> · <a href="/apps/{slug}/audit">audit log</a></p><h1>{slug} · topics</h1>{flash}
<form method=get action="/apps/{slug}/outbox"><label>Row id <input name=id size=38 placeholder="an outbox row id, e.g. from a log line" required></label> <button type=submit>Show the row</button></form>
<h2>Overview</h2>"#,
        flash = flash.html(),
    ));
    body.push_str(&format!(
        r#"<div id=topic-rows data-refresh="/apps/{slug}/topics/rows">{}</div>"#,
        overview.html(&slug)
    ));
    body.push_str("<h2>Paused</h2>");
    if paused.is_empty() {
        body.push_str(r#"<p class=muted data-paused=none>No topic is paused. Pausing one stops every process from claiming its rows within about a second; rows already running finish.</p>"#);
    } else {
        body.push_str(
            "<div class=scroll><table><tr><th>Topic</th><th>Since</th><th>By</th><th>Reason</th><th></th></tr>",
        );
        for p in &paused {
            let topic = esc(&p.topic);
            let resume = if operator {
                format!(
                    r#"<form class=inline method=post action="/apps/{slug}/topics/resume" data-confirm="Resume this topic? Every process claims its rows again within about a second."><input type=hidden name=csrf value="{csrf}"><input type=hidden name=topic value="{topic}"><button type=submit>resume</button></form>"#
                )
            } else {
                String::new()
            };
            body.push_str(&format!(
                r#"<tr data-paused="{topic}"><td>{topic}</td><td>{at}</td><td>{by}</td><td>{reason}</td><td>{resume}</td></tr>"#,
                at = when(p.paused_at),
                by = esc(p.paused_by.as_deref().unwrap_or("")),
                reason = esc(p.reason.as_deref().unwrap_or("")),
            ));
        }
        body.push_str("</table></div>");
    }
    if operator {
        body.push_str(&format!(
            r#"<form method=post action="/apps/{slug}/topics/pause" data-confirm="Pause this topic? No process claims its rows until it is resumed."><input type=hidden name=csrf value="{csrf}">
<p><label>Topic <input name=topic required maxlength=255></label> <label>Reason <input name=reason maxlength=1000></label> <button type=submit>Pause</button></p></form>"#
        ));
    }
    body.push_str("<h2>Limits</h2>");
    if limited.is_empty() {
        body.push_str(r#"<p class=muted data-limits=none>No topic is limited. A concurrency limit lets at most that many of a topic's rows run at once (in all, or per partition key), a rate limit at most that many start per second, across every process (lease mode), from about a second on.</p>"#);
    } else {
        body.push_str(
            "<div class=scroll><table><tr><th>Topic</th><th>Running</th><th>Per key</th><th>Rate</th><th>Since</th><th>By</th><th></th></tr>",
        );
        for l in &limited {
            let topic = esc(&l.topic);
            let unlimit = if operator {
                format!(
                    r#"<form class=inline method=post action="/apps/{slug}/topics/unlimit" data-confirm="Remove this topic's limits?"><input type=hidden name=csrf value="{csrf}"><input type=hidden name=topic value="{topic}"><button type=submit>remove limit</button></form>"#
                )
            } else {
                String::new()
            };
            body.push_str(&format!(
                r#"<tr data-limited="{topic}"><td>{topic}</td><td>{running} / {max}</td><td>{per_key}</td><td>{rate}</td><td>{at}</td><td>{by}</td><td>{unlimit}</td></tr>"#,
                running = l.running,
                max = l.max_running.map_or("∞".to_owned(), |n| n.to_string()),
                per_key = l.max_running_per_key.map_or(String::new(), |n| n.to_string()),
                rate = l
                    .rate_per_sec
                    .zip(l.burst)
                    .map_or(String::new(), |(r, b)| format!("{r}/s, burst {b}")),
                at = when(l.set_at),
                by = esc(l.set_by.as_deref().unwrap_or("")),
            ));
        }
        body.push_str("</table></div>");
    }
    if operator {
        body.push_str(&format!(
            r#"<form method=post action="/apps/{slug}/topics/limit" data-confirm="Set these limits on the topic?"><input type=hidden name=csrf value="{csrf}">
<p><label>Topic <input name=topic required maxlength=255></label> <label>At most running <input name=max_running type=number min=1 max={max}></label> <label>Per partition key <input name=max_running_per_key type=number min=1 max={max}></label> <label>Starts per second <input name=rate_per_sec type=number min=0.001 step=any></label> <label>Burst <input name=burst type=number min=1></label> <button type=submit>Limit</button></p></form>"#,
            max = limits::MAX_RUNNING,
        ));
    }
    body.push_str("<h2>Processes</h2>");
    body.push_str(&processes_table(&live));
    page(&format!("{} topics", app.slug), &body).into_response()
}

/// `GET /apps/{app}/topics/rows`: the topics page's overview alone (charts
/// and rows by state), which the page fetches again every 2 s while it is
/// visible.
pub(super) async fn topic_rows(
    State(state): State<AdminState>,
    session: Session,
    Path(app): Path<String>,
) -> Response {
    let result = async {
        let app = viewed_app(&state, &session, &app).await?;
        let overview = Overview::read(&state, app.id).await?;
        Ok::<_, ApiError>(overview.html(&esc(&app.slug)))
    }
    .await;
    match result {
        Ok(html) => Html(html).into_response(),
        Err(err) => error_page(&err),
    }
}

/// `POST /apps/{app}/topics/{pause|resume|limit|unlimit}` with the topic
/// (and a reason, or a limit).
pub(super) async fn change_topic(
    State(state): State<AdminState>,
    session: Session,
    Path((app, action)): Path<(String, String)>,
    req: Request,
) -> Response {
    let result = async {
        let (form, app) = checked_form(&state, &session, &app, Capability::Operate, req).await?;
        // What an operator typed (pause, limit) loses its surrounding
        // spaces; a resume or unlimit names the stored topic as it is, which
        // a pause made through the API may end with one.
        let given = field(&form, "topic").unwrap_or_default();
        let topic = if matches!(action.as_str(), "pause" | "limit") {
            given.trim().to_owned()
        } else {
            given.to_owned()
        };
        let actor = audit::actor(&session.principal);
        // How many topics changed: a pause of a paused topic changes none.
        let mut changed: u8 = 1;
        // A pause or limit of a topic nothing names, most often a typo.
        let mut unseen = "";
        match action.as_str() {
            "pause" => {
                let reason = field(&form, "reason")
                    .map(str::trim)
                    .filter(|r| !r.is_empty());
                let paused = api::pause_topic(&state.pool, &actor, app.id, &topic, reason).await?;
                changed = u8::from(paused.now);
                if !paused.seen {
                    unseen = "&unseen=true";
                }
            }
            "resume" => match api::resume_topic(&state.pool, &actor, app.id, &topic).await {
                // A second click, or another operator first: the wanted
                // state holds, as the CLI says.
                Err(ApiError::NotFound(_)) => changed = 0,
                other => other?,
            },
            "limit" => {
                let wanted = limits::Limits {
                    max_running: number(&form, "max_running").map_err(in_labels)?,
                    max_running_per_key: number(&form, "max_running_per_key").map_err(in_labels)?,
                    rate_per_sec: number(&form, "rate_per_sec").map_err(in_labels)?,
                    burst: number(&form, "burst").map_err(in_labels)?,
                };
                if !api::limit_topic(&state.pool, &actor, app.id, &topic, &wanted)
                    .await
                    .map_err(in_labels)?
                    .seen
                {
                    unseen = "&unseen=true";
                }
            }
            "unlimit" => match api::unlimit_topic(&state.pool, &actor, app.id, &topic).await {
                // A second click, or another operator first, as a resume.
                Err(ApiError::NotFound(_)) => changed = 0,
                other => other?,
            },
            _ => return Err(ApiError::not_found("action")),
        }
        let named: String = form_urlencoded::byte_serialize(topic.as_bytes()).collect();
        Ok::<_, ApiError>(format!(
            "/apps/{}/topics?done={action}&rows={changed}&named={named}{unseen}",
            app.slug
        ))
    }
    .await;
    after_form(result)
}

/// A limit's refusal in the words of the form's labels: the store names the
/// API's fields ("give max_running, max_running_per_key or rate_per_sec").
fn in_labels(err: ApiError) -> ApiError {
    let ApiError::Invalid(text) = err else {
        return err;
    };
    ApiError::Invalid(outbox_core::text::rename_fields(
        &text,
        &[
            ("max_running_per_key", "Per partition key"),
            ("max_running", "At most running"),
            ("rate_per_sec", "Starts per second"),
            ("burst", "Burst"),
        ],
    ))
}

/// A number field of a form: absent or blank is `None`.
fn number<T: std::str::FromStr>(
    form: &[(String, String)],
    name: &'static str,
) -> Result<Option<T>, ApiError> {
    match field(form, name).map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| ApiError::Invalid(format!("invalid {name}: {v:?} is not a number"))),
    }
}
