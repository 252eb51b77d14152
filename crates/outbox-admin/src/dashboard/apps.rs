//! The apps page, the instance overview: every app the operator can see
//! with its rows by state (as last sampled) and unresolved dead letters, and
//! the dispatcher processes that are up and what each serves.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use outbox_core::store::outbox::recorded_app_totals;
use outbox_core::store::{principals, processes};

use crate::AdminState;
use crate::error::ApiError;

use super::overview::processes_table;
use super::render::{error_page, esc, logout_form, page};
use super::session::Session;

pub(super) async fn apps_page(State(state): State<AdminState>, session: Session) -> Response {
    let user = &session.principal.user;
    let read = async {
        Ok::<_, ApiError>(tokio::try_join!(
            principals::visible_apps(&state.pool, user.id, user.is_admin),
            recorded_app_totals(&state.pool),
            processes::live(&state.pool),
        )?)
    };
    let (rows, totals, live) = match read.await {
        Ok(v) => v,
        Err(err) => return error_page(&err),
    };
    let mut body = logout_form(&session);
    body.push_str(
        "<h1>Apps</h1><div class=scroll><table id=apps><tr><th>App</th><th>Name</th><th>Due</th><th>Scheduled</th><th>Running</th><th>Unresolved dead letters</th></tr>",
    );
    if rows.is_empty() {
        body.push_str(r#"<tr><td colspan=6 class=muted>No app is visible to you. An instance admin creates apps (<code>outboxd app create SLUG</code>) and gives you a role on them.</td></tr>"#);
    }
    for (slug, name, unresolved) in &rows {
        let (due, scheduled, running) = totals
            .iter()
            .find(|t| t.0 == *slug)
            .map_or((0, 0, 0), |t| (t.1, t.2, t.3));
        body.push_str(&format!(
            r#"<tr data-app-row="{s}"><td><a href="/apps/{s}/topics">{s}</a> · <a href="/apps/{s}/outbox">rows</a> · <a href="/apps/{s}/dead-letters?unresolved=true">dead letters</a> · <a href="/apps/{s}/triggers">triggers</a></td><td>{n}</td><td>{due}</td><td>{scheduled}</td><td>{running}</td><td><span class="badge{z}" data-app="{s}">{u}</span></td></tr>"#,
            s = esc(slug),
            n = esc(name),
            z = if *unresolved == 0 { " zero" } else { "" },
            u = unresolved
        ));
    }
    body.push_str("</table></div>");
    // The processes serve every app: shown to whoever may see one.
    if !rows.is_empty() || user.is_admin {
        body.push_str("<h2>Processes</h2>");
        body.push_str(&processes_table(&live));
    }
    page("Apps", &body).into_response()
}
