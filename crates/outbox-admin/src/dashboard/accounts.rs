//! The instance admin's accounts page: users and API keys, and the actions
//! on them.

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};

use crate::AdminState;
use crate::accounts;
use crate::error::ApiError;

use super::flash::Flash;
use super::render::{error_page, esc, logout_form, page};
use super::session::{Session, after_form, check_csrf, field, form};

/// The instance admin's accounts page: users (roles, sessions, throttle)
/// and API keys, with the same actions as `outboxd user …` and
/// `outboxd api-key …`.
pub(super) async fn accounts_page(
    State(state): State<AdminState>,
    session: Session,
    flash: Flash,
) -> Response {
    if !session.principal.user.is_admin {
        return error_page(&ApiError::Forbidden);
    }
    let result = async {
        Ok::<_, ApiError>((
            accounts::list_users(&state.pool).await?,
            accounts::list_api_keys(&state.pool, None).await?,
            outbox_core::store::apps::list(&state.pool).await?,
        ))
    }
    .await;
    let (users, keys, apps) = match result {
        Ok(v) => v,
        Err(err) => return error_page(&err),
    };
    let csrf = esc(&session.csrf);
    let mut body = logout_form(&session);
    body.push_str(&format!(
        r#"<p><a href="/apps">← apps</a></p><h1>Accounts</h1>{flash}<div class=scroll><table id=users><tr><th>E-mail</th><th>Instance admin</th><th>Roles</th><th>Sessions</th><th>API keys</th><th>Created</th><th>Actions</th></tr>"#,
        flash = flash.html()
    ));
    for u in &users {
        let button = |action: &str, label: &str, confirm: bool| {
            format!(
                r#"<form class=inline method=post action="/admin/accounts/{id}/{action}"{ask}><input type=hidden name=csrf value="{csrf}">{c}<button type=submit>{label}</button></form>"#,
                ask = if action == "revoke-sessions" {
                    r#" data-confirm="Sign this account out everywhere? Every browser session of it ends now.""#
                } else {
                    ""
                },
                id = u.id,
                c = if confirm {
                    r#"<label><input type=checkbox name=confirm value=yes required> sure</label> "#
                } else {
                    ""
                },
            )
        };
        body.push_str(&format!(
            r#"<tr data-user="{email}"><td>{email}</td><td>{admin}</td><td>{roles}</td><td>{sessions}</td><td>{keys}</td><td>{created}</td><td>{revoke} {unlock} {delete}
<form class=inline method=post action="/admin/accounts/{id}/password"><input type=hidden name=csrf value="{csrf}"><input name=password type=password minlength=12 autocomplete=new-password placeholder="new password" required> <button type=submit>Set password</button></form></td></tr>"#,
            email = esc(&u.email),
            admin = if u.is_admin { "yes" } else { "" },
            roles = esc(&u.roles.join(", ")),
            sessions = u.sessions,
            keys = u.api_keys,
            created = u.created_at.format("%Y-%m-%d"),
            revoke = button("revoke-sessions", "Sign out everywhere", false),
            unlock = button("unlock", "Unlock", false),
            delete = button("delete", "Delete", true),
            id = u.id,
        ));
    }
    // Roles are given on apps that take them: not on the one that holds
    // messages of unknown apps, which only instance admins see.
    let app_options: String = apps
        .iter()
        .filter(|a| a.slug != outbox_core::store::apps::UNROUTED_SLUG)
        .map(|a| format!("<option>{}</option>", esc(&a.slug)))
        .collect();
    let user_options: String = users
        .iter()
        .filter(|u| !u.is_admin)
        .map(|u| format!(r#"<option value="{}">{}</option>"#, u.id, esc(&u.email)))
        .collect();
    body.push_str(&format!(
        r#"</table></div>
<h2>New account</h2><form method=post action="/admin/accounts" id=new-account><input type=hidden name=csrf value="{csrf}">
<p><label>E-mail <input name=email type=email required maxlength=254 autocomplete=off></label> <label>Password <input name=password type=password minlength=12 autocomplete=new-password required></label> <label><input type=checkbox name=admin value=yes> instance admin (every app, and accounts)</label> <button type=submit>Create</button></p>
<p class=muted>An account that is not an instance admin sees nothing until it has a role on an app.</p></form>
<h2>Roles</h2>{roles}"#,
        roles = if user_options.is_empty() || app_options.is_empty() {
            r#"<p class=muted id=roles-none>Roles are given to accounts that are not instance admins, on apps: create one of each first.</p>"#.to_owned()
        } else {
            format!(
                r#"<form method=post action="/admin/roles" id=set-role><input type=hidden name=csrf value="{csrf}">
<p><label>Account <select name=user>{user_options}</select></label> <label>App <select name=app>{app_options}</select></label> <label>Role <select name=role><option value=viewer>viewer: sees</option><option value=operator>operator: also acts (rows, dead letters, topics, writes)</option><option value=admin>admin: also triggers</option><option value=none>none: take the role away</option></select></label> <button type=submit>Set the role</button></p></form>"#
            )
        },
    ));
    body.push_str(
        r#"<h2>API keys</h2><div class=scroll><table id=api-keys><tr><th>Prefix</th><th>Name</th><th>Owner</th><th>Created</th><th>Last used</th><th>State</th><th></th></tr>"#,
    );
    if keys.is_empty() {
        body.push_str(r#"<tr><td colspan=7 class=muted>No API keys yet: create one with <code>outboxd api-key create EMAIL</code>.</td></tr>"#);
    }
    for k in &keys {
        let state_cell = k.revoked_at.map_or_else(
            || "active".to_owned(),
            |at| format!("revoked {}", at.format("%Y-%m-%d %H:%M")),
        );
        let action = if k.revoked_at.is_none() {
            format!(
                r#"<form class=inline method=post action="/admin/api-keys/{p}/revoke"><input type=hidden name=csrf value="{csrf}"><button type=submit>Revoke</button></form>"#,
                p = esc(&k.prefix)
            )
        } else {
            String::new()
        };
        body.push_str(&format!(
            r#"<tr data-key="{p}"><td><code>obx_{p}_…</code></td><td>{name}</td><td>{owner}</td><td>{created}</td><td>{used}</td><td>{state_cell}</td><td>{action}</td></tr>"#,
            p = esc(&k.prefix),
            name = esc(&k.name),
            owner = esc(&k.owner),
            created = k.created_at.format("%Y-%m-%d %H:%M"),
            used = k
                .last_used_at
                .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
                .unwrap_or_else(|| "never".into()),
        ));
    }
    body.push_str("</table></div>");
    page("Accounts", &body).into_response()
}

/// An instance admin's form: read, CSRF-checked, and refused to anyone else.
async fn admin_form(
    state: &AdminState,
    session: &Session,
    req: Request,
) -> Result<Vec<(String, String)>, ApiError> {
    let form = form(req, state.body_limit).await?;
    check_csrf(session, &form)?;
    if !session.principal.user.is_admin {
        return Err(ApiError::Forbidden);
    }
    Ok(form)
}

/// An instance admin's action on a user, from the accounts page.
pub(super) async fn account_action(
    State(state): State<AdminState>,
    session: Session,
    Path((user, action)): Path<(String, String)>,
    req: Request,
) -> Response {
    let result = async {
        let form = admin_form(&state, &session, req).await?;
        let email = accounts::find_user(&state.pool, &user).await?.email;
        // How many sessions ended, or failed sign-ins were forgotten.
        let mut rows = 0;
        match action.as_str() {
            "revoke-sessions" => {
                rows = accounts::revoke_sessions(&state.pool, &user).await?;
            }
            "unlock" => {
                rows = accounts::unlock(&state.pool, &user).await?;
            }
            "delete" => {
                if field(&form, "confirm") != Some("yes") {
                    return Err(ApiError::Invalid(
                        "confirm: tick the box to delete the user".into(),
                    ));
                }
                accounts::delete_user(&state.pool, &crate::audit::actor(&session.principal), &user)
                    .await?;
            }
            "password" => {
                let password = field(&form, "password").unwrap_or_default();
                rows = accounts::set_password(&state.pool, &state.hasher, &user, password).await?;
            }
            _ => return Err(ApiError::not_found("action")),
        }
        let named: String = form_urlencoded::byte_serialize(email.as_bytes()).collect();
        Ok(format!(
            "/admin/accounts?done=account-{action}&rows={rows}&named={named}"
        ))
    }
    .await;
    after_form(result)
}

/// Creates an account from the accounts page.
pub(super) async fn create_account(
    State(state): State<AdminState>,
    session: Session,
    req: Request,
) -> Response {
    let result = async {
        let form = admin_form(&state, &session, req).await?;
        let user = accounts::create_user(
            &state.pool,
            &state.hasher,
            &crate::audit::actor(&session.principal),
            field(&form, "email").unwrap_or_default().trim(),
            field(&form, "password").unwrap_or_default(),
            field(&form, "admin") == Some("yes"),
        )
        .await?;
        let named: String = form_urlencoded::byte_serialize(user.email.as_bytes()).collect();
        Ok(format!(
            "/admin/accounts?done=account-create&rows=1&named={named}"
        ))
    }
    .await;
    after_form(result)
}

/// Gives an account a role on an app, or takes it away, from the accounts
/// page.
pub(super) async fn set_role(
    State(state): State<AdminState>,
    session: Session,
    req: Request,
) -> Response {
    let result = async {
        let form = admin_form(&state, &session, req).await?;
        let user =
            accounts::find_user(&state.pool, field(&form, "user").unwrap_or_default()).await?;
        let app =
            outbox_core::store::apps::by_slug(&state.pool, field(&form, "app").unwrap_or_default())
                .await?;
        let actor = crate::audit::actor(&session.principal);
        let (done, rows, role) = match field(&form, "role").unwrap_or_default() {
            "none" => {
                let taken = accounts::revoke_role(&state.pool, &actor, app.id, &user).await?;
                ("role-revoke", u8::from(taken), "none")
            }
            role => {
                let role: outbox_core::store::principals::Role = role.parse()?;
                let changed =
                    accounts::grant_role(&state.pool, &actor, app.id, &user, role).await?;
                ("role-grant", u8::from(changed), role.as_str())
            }
        };
        let named = format!("{} on {}: {role}", user.email, app.slug);
        let named: String = form_urlencoded::byte_serialize(named.as_bytes()).collect();
        Ok(format!(
            "/admin/accounts?done={done}&rows={rows}&named={named}"
        ))
    }
    .await;
    after_form(result)
}

/// Revokes an API key from the accounts page.
pub(super) async fn revoke_key(
    State(state): State<AdminState>,
    session: Session,
    Path(prefix): Path<String>,
    req: Request,
) -> Response {
    let result = async {
        admin_form(&state, &session, req).await?;
        let revoked = accounts::revoke_api_key(&state.pool, &prefix).await?;
        let named: String = form_urlencoded::byte_serialize(revoked.prefix.as_bytes()).collect();
        Ok(format!(
            "/admin/accounts?done=key-revoke&rows={}&named={named}",
            u8::from(!revoked.already)
        ))
    }
    .await;
    after_form(result)
}
