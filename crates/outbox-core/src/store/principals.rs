//! Users, API keys and per-app roles. Password and key hashing happen in the
//! caller (the admin crate); this module stores and finds hashes.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Error;

/// An operator account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct User {
    /// Primary key.
    pub id: Uuid,
    /// Lower-case e-mail, unique.
    pub email: String,
    /// The argon2id PHC string; never serialized.
    #[serde(skip)]
    pub password_hash: String,
    /// Holds every capability on every app.
    pub is_admin: bool,
    /// When the account was created.
    pub created_at: DateTime<Utc>,
}

/// A per-app role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads dead letters.
    Viewer,
    /// Reads, replays and resolves dead letters.
    Operator,
    /// Everything on the app, triggers included.
    Admin,
}

impl Role {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "viewer" => Ok(Self::Viewer),
            "operator" => Ok(Self::Operator),
            "admin" => Ok(Self::Admin),
            other => Err(Error::Invalid {
                field: "role",
                reason: format!("{other:?} is not one of viewer, operator, admin"),
            }),
        }
    }
}

const USER_COLUMNS: &str = "id, email, password_hash, is_admin, created_at";

/// Creates a user; the e-mail is stored lower-case.
pub async fn create_user<'e>(
    db: impl PgExecutor<'e>,
    email: &str,
    password_hash: &str,
    is_admin: bool,
) -> Result<User, Error> {
    sqlx::query_as(&format!(
        "INSERT INTO users (email, password_hash, is_admin) VALUES (lower($1), $2, $3)
         RETURNING {USER_COLUMNS}"
    ))
    .bind(email.trim())
    .bind(password_hash)
    .bind(is_admin)
    .fetch_one(db)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(d) if d.constraint() == Some("users_email_key") => Error::Invalid {
            field: "email",
            reason: "a user with this e-mail exists".into(),
        },
        _ => Error::Database(e),
    })
}

/// Finds a user by e-mail (case-insensitive).
pub async fn user_by_email<'e>(
    db: impl PgExecutor<'e>,
    email: &str,
) -> Result<Option<User>, Error> {
    Ok(sqlx::query_as(&format!(
        "SELECT {USER_COLUMNS} FROM users WHERE email = lower($1)"
    ))
    .bind(email.trim())
    .fetch_optional(db)
    .await?)
}

/// Finds a user by id.
pub async fn user_by_id<'e>(db: impl PgExecutor<'e>, id: Uuid) -> Result<Option<User>, Error> {
    Ok(
        sqlx::query_as(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
            .bind(id)
            .fetch_optional(db)
            .await?,
    )
}

/// Gives `user_id` `role` on `app_id` (replacing an earlier role).
pub async fn set_role<'e>(
    db: impl PgExecutor<'e>,
    app_id: Uuid,
    user_id: Uuid,
    role: Role,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO app_members (app_id, user_id, role) VALUES ($1, $2, $3)
         ON CONFLICT (app_id, user_id) DO UPDATE SET role = EXCLUDED.role",
    )
    .bind(app_id)
    .bind(user_id)
    .bind(role.as_str())
    .execute(db)
    .await?;
    Ok(())
}

/// The role of `user_id` on `app_id`, if any.
pub async fn role_on<'e>(
    db: impl PgExecutor<'e>,
    app_id: Uuid,
    user_id: Uuid,
) -> Result<Option<Role>, Error> {
    let role: Option<String> =
        sqlx::query_scalar("SELECT role FROM app_members WHERE app_id = $1 AND user_id = $2")
            .bind(app_id)
            .bind(user_id)
            .fetch_optional(db)
            .await?;
    role.map(|r| r.parse()).transpose()
}

/// Apps a user may see, with unresolved dead-letter counts: every app for
/// an instance admin, the member apps otherwise.
pub async fn visible_apps<'e>(
    db: impl PgExecutor<'e>,
    user_id: Uuid,
    is_admin: bool,
) -> Result<Vec<(String, String, i64)>, Error> {
    Ok(sqlx::query_as(
        "SELECT a.slug, a.name,
                (SELECT count(*) FROM dead_letters d WHERE d.app_id = a.id AND d.resolved_at IS NULL)
         FROM apps a
         WHERE $2 OR EXISTS (SELECT 1 FROM app_members m WHERE m.app_id = a.id AND m.user_id = $1)
         ORDER BY a.slug",
    )
    .bind(user_id)
    .bind(is_admin)
    .fetch_all(db)
    .await?)
}

/// Stores an API key's hash; returns the key id.
pub async fn create_api_key<'e>(
    db: impl PgExecutor<'e>,
    user_id: Uuid,
    name: &str,
    prefix: &str,
    secret_hash: &str,
) -> Result<Uuid, Error> {
    Ok(sqlx::query_scalar(
        "INSERT INTO api_keys (user_id, name, prefix, secret_hash) VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(user_id)
    .bind(name)
    .bind(prefix)
    .bind(secret_hash)
    .fetch_one(db)
    .await?)
}

/// The owner and secret hash of an unrevoked key with this prefix.
pub async fn api_key_by_prefix<'e>(
    db: impl PgExecutor<'e>,
    prefix: &str,
) -> Result<Option<(Uuid, String)>, Error> {
    Ok(sqlx::query_as(
        "UPDATE api_keys SET last_used_at = now()
         WHERE prefix = $1 AND revoked_at IS NULL
         RETURNING user_id, secret_hash",
    )
    .bind(prefix)
    .fetch_optional(db)
    .await?)
}

/// Whether a principal may still run a trigger's work on `app_id`: an
/// instance admin, or an admin of the app. `principal` is `user:<id>`;
/// other principals (e.g. `demo`, set by the operator CLI) are not checked.
pub async fn may_run_triggers<'e>(
    db: impl PgExecutor<'e>,
    app_id: Uuid,
    principal: &str,
) -> Result<bool, Error> {
    let Some(user_id) = principal.strip_prefix("user:") else {
        return Ok(true);
    };
    let Ok(user_id) = Uuid::parse_str(user_id) else {
        return Ok(false);
    };
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (
            SELECT 1 FROM users u
            WHERE u.id = $2
              AND (u.is_admin OR EXISTS (
                    SELECT 1 FROM app_members m
                    WHERE m.app_id = $1 AND m.user_id = $2 AND m.role = 'admin')))",
    )
    .bind(app_id)
    .bind(user_id)
    .fetch_one(db)
    .await?)
}
