//! The apps page: every app the operator can see, with its unresolved dead letters.

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use crate::AdminState;

use super::render::{error_page, esc, logout_form, page};
use super::session::Session;

pub(super) async fn apps_page(State(state): State<AdminState>, session: Session) -> Response {
    let rows = match outbox_core::store::principals::visible_apps(
        &state.pool,
        session.principal.user.id,
        session.principal.user.is_admin,
    )
    .await
    {
        Ok(rows) => rows,
        Err(err) => return error_page(&err.into()),
    };
    let mut body = logout_form(&session);
    body.push_str(
        "<h1>Apps</h1><table><tr><th>App</th><th>Name</th><th>Unresolved dead letters</th></tr>",
    );
    for (slug, name, unresolved) in rows {
        body.push_str(&format!(
            r#"<tr><td><a href="/apps/{s}/dead-letters?unresolved=true">{s}</a> · <a href="/apps/{s}/topics">topics</a> · <a href="/apps/{s}/triggers">triggers</a></td><td>{n}</td><td><span class="badge{z}" data-app="{s}">{u}</span></td></tr>"#,
            s = esc(&slug),
            n = esc(&name),
            z = if unresolved == 0 { " zero" } else { "" },
            u = unresolved
        ));
    }
    body.push_str("</table>");
    page("Apps", &body).into_response()
}
