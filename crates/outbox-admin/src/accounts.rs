//! Account management for instance admins: users, their roles on apps
//! (recorded in each app's audit log), their sessions and login throttle,
//! and API keys. The admin API, the dashboard's accounts page and
//! the CLI (`outboxd user …`, `outboxd api-key …`) all call these, so each
//! action means the same everywhere.

use outbox_core::store::principals::{self, ApiKeySummary, User, UserSummary};
use outbox_core::store::sessions;
use sqlx::PgPool;
use uuid::Uuid;

use crate::audit::{self, Action};
use crate::auth::{self, Hasher};
use crate::error::ApiError;

/// The shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// The longest password accepted (argon2 input stays bounded).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Checks a new password's length.
pub fn check_password(password: &str) -> Result<(), ApiError> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(ApiError::Invalid(format!(
            "password: at least {MIN_PASSWORD_CHARS} characters"
        )));
    }
    if password.len() > MAX_PASSWORD_BYTES || password.contains('\0') {
        return Err(ApiError::Invalid(format!(
            "password: at most {MAX_PASSWORD_BYTES} bytes, without NUL characters"
        )));
    }
    Ok(())
}

/// Finds a user by id or e-mail.
pub async fn find_user(pool: &PgPool, user: &str) -> Result<User, ApiError> {
    let found = match Uuid::parse_str(user) {
        Ok(id) => principals::user_by_id(pool, id).await?,
        Err(_) if user.contains('\0') => None,
        Err(_) => principals::user_by_email(pool, user).await?,
    };
    found.ok_or(ApiError::NotFound("user"))
}

/// Every user, with roles and counts of live sessions and API keys.
pub async fn list_users(pool: &PgPool) -> Result<Vec<UserSummary>, ApiError> {
    Ok(principals::list_users(pool).await?)
}

/// Creates a user for `actor`. An instance admin's creation is recorded in
/// every app's audit log, in the same transaction: it gives every
/// capability on every app.
pub async fn create_user(
    pool: &PgPool,
    hasher: &Hasher,
    actor: &str,
    email: &str,
    password: &str,
    is_admin: bool,
) -> Result<User, ApiError> {
    let hash = new_user_hash(hasher, email, password).await?;
    let mut tx = audit::begin(pool).await?;
    let user = principals::create_user(&mut *tx, email, &hash, is_admin).await?;
    if is_admin {
        record_in_every_app(&mut tx, actor, "user.promote", &user.email).await?;
    }
    audit::commit(tx).await?;
    Ok(user)
}

/// Checks a new account's e-mail and password; returns the password's hash.
pub(crate) async fn new_user_hash(
    hasher: &Hasher,
    email: &str,
    password: &str,
) -> Result<String, ApiError> {
    check_password(password)?;
    check_email(email)?;
    hasher.hash(password.to_owned()).await
}

/// The longest e-mail address an account may have, in bytes (the longest
/// path SMTP carries); sign-in refuses longer ones before it looks.
pub(crate) const MAX_EMAIL_BYTES: usize = 254;

/// Checks a new account's e-mail address: at most [`MAX_EMAIL_BYTES`] once
/// lower-cased (as it is stored), an `@`, no spaces or control characters
/// (it is shown in the CLI, the console and the audit log).
fn check_email(email: &str) -> Result<(), ApiError> {
    let bytes = email.to_lowercase().len();
    if bytes > MAX_EMAIL_BYTES {
        return Err(ApiError::Invalid(format!(
            "email: at most {MAX_EMAIL_BYTES} bytes (got {bytes})"
        )));
    }
    if let Some(c) = email
        .chars()
        .find(|c| c.is_whitespace())
        .or_else(|| outbox_core::topics::first_unprintable(email))
    {
        return Err(ApiError::Invalid(format!(
            "email: must not contain spaces or control characters (found U+{:04X})",
            u32::from(c)
        )));
    }
    if email.chars().count() < 3 || !email.contains('@') {
        return Err(ApiError::Invalid(format!(
            "email: {email:?} is not an e-mail address"
        )));
    }
    Ok(())
}

/// Deletes a user for `actor` (roles, sessions and API keys go with it); the
/// last instance admin cannot be deleted. An instance admin's deletion is
/// recorded in every app's audit log.
pub async fn delete_user(pool: &PgPool, actor: &str, user: &str) -> Result<User, ApiError> {
    let found = find_user(pool, user).await?;
    let mut tx = audit::begin(pool).await?;
    principals::delete_user(&mut tx, found.id).await?;
    if found.is_admin {
        record_in_every_app(&mut tx, actor, "user.delete", &found.email).await?;
    }
    audit::commit(tx).await?;
    auth::forget_clients(pool, &found.email).await?;
    Ok(found)
}

/// Records a change of who holds every capability on every app (an instance
/// admin made or unmade) in every app's audit log.
async fn record_in_every_app(
    tx: &mut sqlx::PgConnection,
    actor: &str,
    action: &str,
    email: &str,
) -> Result<(), ApiError> {
    for app in outbox_core::store::apps::list(&mut *tx).await? {
        audit::record(tx, actor, app.id, Action::on(action, email)).await?;
    }
    Ok(())
}

/// Makes a user an instance admin (`admin`) or takes the rights away for
/// `actor`; false when the user already was what was asked. The last
/// instance admin keeps them. A change gives or takes every capability on
/// every app, so it is recorded in every app's audit log, in the same
/// transaction.
pub async fn set_instance_admin(
    pool: &PgPool,
    actor: &str,
    user: &str,
    admin: bool,
) -> Result<(User, bool), ApiError> {
    let found = find_user(pool, user).await?;
    let mut tx = audit::begin(pool).await?;
    let changed = principals::set_admin(&mut tx, found.id, admin).await?;
    if changed {
        let action = if admin { "user.promote" } else { "user.demote" };
        record_in_every_app(&mut tx, actor, action, &found.email).await?;
    }
    audit::commit(tx).await?;
    Ok((found, changed))
}

/// Sets a user's password and ends every session they have; returns how
/// many sessions ended.
pub async fn set_password(
    pool: &PgPool,
    hasher: &Hasher,
    user: &str,
    password: &str,
) -> Result<u64, ApiError> {
    check_password(password)?;
    let found = find_user(pool, user).await?;
    let hash = hasher.hash(password.to_owned()).await?;
    let mut conn = pool.acquire().await.map_err(outbox_core::Error::from)?;
    let ended = principals::set_password(&mut conn, found.id, &hash).await?;
    auth::forget_clients(pool, &found.email).await?;
    Ok(ended)
}

/// Ends every session of a user (API keys stay: revoke them by prefix);
/// returns how many ended.
pub async fn revoke_sessions(pool: &PgPool, user: &str) -> Result<u64, ApiError> {
    let found = find_user(pool, user).await?;
    let ended = sessions::close_all(pool, found.id).await?;
    auth::forget_clients(pool, &found.email).await?;
    Ok(ended)
}

/// Clears a user's login throttle; returns how many counts were cleared.
pub async fn unlock(pool: &PgPool, user: &str) -> Result<u64, ApiError> {
    let found = find_user(pool, user).await?;
    auth::unlock(pool, &found.email).await
}

/// API keys, newest first (of one user when given).
pub async fn list_api_keys(
    pool: &PgPool,
    owner: Option<&str>,
) -> Result<Vec<ApiKeySummary>, ApiError> {
    let owner = match owner {
        Some(user) => Some(find_user(pool, user).await?.id),
        None => None,
    };
    Ok(principals::list_api_keys(pool, owner).await?)
}

/// An API key's revocation: the key's prefix, and whether it was revoked
/// before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedKey {
    /// The part of the key after `obx_`, up to its secret.
    pub prefix: String,
    /// Revoked by an earlier call; nothing changed.
    pub already: bool,
}

/// Revokes an API key by its prefix (the part after `obx_`; a whole key is
/// accepted too). A key revoked before stays as it was.
pub async fn revoke_api_key(pool: &PgPool, prefix: &str) -> Result<RevokedKey, ApiError> {
    let prefix = prefix
        .strip_prefix(auth::API_KEY_TAG)
        .unwrap_or(prefix)
        .split('_')
        .next()
        .unwrap_or_default();
    if prefix.is_empty() || prefix.contains('\0') {
        return Err(ApiError::NotFound("api key"));
    }
    let mut conn = pool.acquire().await.map_err(outbox_core::Error::from)?;
    let revoked_now = principals::revoke_api_key(&mut conn, prefix).await?;
    Ok(RevokedKey {
        prefix: prefix.to_owned(),
        already: !revoked_now,
    })
}

/// Gives `user` `role` on the app for `actor` (replacing the role it had),
/// recorded in the app's audit log; false (and nothing recorded) when it
/// had that role already.
pub async fn grant_role(
    pool: &PgPool,
    actor: &str,
    app_id: Uuid,
    user: &User,
    role: principals::Role,
) -> Result<bool, ApiError> {
    let app = outbox_core::store::apps::by_id(pool, app_id).await?;
    if app.slug == outbox_core::store::apps::UNROUTED_SLUG {
        return Err(ApiError::Invalid(format!(
            "app {}: reserved for messages of unknown apps; only instance admins see it",
            app.slug
        )));
    }
    let mut tx = audit::begin(pool).await?;
    if !principals::set_role(&mut *tx, app_id, user.id, role).await? {
        return Ok(false);
    }
    let action = Action {
        action: "role.grant",
        target: Some(&user.email),
        rows: 0,
        detail: serde_json::json!({ "role": role.as_str() }),
    };
    audit::record(&mut tx, actor, app_id, action).await?;
    audit::commit(tx).await?;
    Ok(true)
}

/// Takes `user`'s role on the app away for `actor`, recorded when it had
/// one; false when it had none.
pub async fn revoke_role(
    pool: &PgPool,
    actor: &str,
    app_id: Uuid,
    user: &User,
) -> Result<bool, ApiError> {
    let mut tx = audit::begin(pool).await?;
    if !principals::remove_role(&mut *tx, app_id, user.id).await? {
        return Ok(false);
    }
    audit::record(
        &mut tx,
        actor,
        app_id,
        Action::on("role.revoke", &user.email),
    )
    .await?;
    audit::commit(tx).await?;
    Ok(true)
}
