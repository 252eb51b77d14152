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

/// The columns of [`User`], in its field order (`sessions::user_of` names
/// them too).
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

/// `email` as users are stored and found by: trimmed and lower-cased by
/// the database, whose `lower()` follows its collation (ASCII only under
/// `C`). Whatever counts logins per account must fold the same way, or two
/// spellings the database tells apart would share one count.
pub async fn fold_email<'e>(db: impl PgExecutor<'e>, email: &str) -> Result<String, Error> {
    Ok(sqlx::query_scalar("SELECT lower($1)")
        .bind(email.trim())
        .fetch_one(db)
        .await?)
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

/// Gives `user_id` `role` on `app_id` (replacing an earlier role); false
/// when it had that role already.
pub async fn set_role<'e>(
    db: impl PgExecutor<'e>,
    app_id: Uuid,
    user_id: Uuid,
    role: Role,
) -> Result<bool, Error> {
    let changed = sqlx::query(
        "INSERT INTO app_members (app_id, user_id, role) VALUES ($1, $2, $3)
         ON CONFLICT (app_id, user_id) DO UPDATE SET role = EXCLUDED.role
         WHERE app_members.role IS DISTINCT FROM EXCLUDED.role",
    )
    .bind(app_id)
    .bind(user_id)
    .bind(role.as_str())
    .execute(db)
    .await?
    .rows_affected();
    Ok(changed > 0)
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

/// The owner and secret hash of an unrevoked key with this prefix. Its
/// `last_used_at` is brought up to date at most once a minute, so a busy
/// machine client does not turn every request into a write.
pub async fn api_key_by_prefix<'e>(
    db: impl PgExecutor<'e>,
    prefix: &str,
) -> Result<Option<(Uuid, String)>, Error> {
    Ok(sqlx::query_as(
        "WITH key AS (
            SELECT id, user_id, secret_hash, last_used_at FROM api_keys
            WHERE prefix = $1 AND revoked_at IS NULL
         ), touched AS (
            UPDATE api_keys a SET last_used_at = now()
            FROM key
            WHERE a.id = key.id
              AND (key.last_used_at IS NULL OR key.last_used_at < now() - interval '1 minute')
         )
         SELECT user_id, secret_hash FROM key",
    )
    .bind(prefix)
    .fetch_optional(db)
    .await?)
}

/// A user as listed to operators: no hash, with role and session counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct UserSummary {
    /// Primary key.
    pub id: Uuid,
    /// Lower-case e-mail.
    pub email: String,
    /// Holds every capability on every app.
    pub is_admin: bool,
    /// When the account was created.
    pub created_at: DateTime<Utc>,
    /// `app:role` for each app the user is a member of.
    pub roles: Vec<String>,
    /// Live sessions (signed-in browsers and API tokens).
    pub sessions: i64,
    /// Unrevoked API keys.
    pub api_keys: i64,
}

/// Every user, by e-mail.
pub async fn list_users<'e>(db: impl PgExecutor<'e>) -> Result<Vec<UserSummary>, Error> {
    Ok(sqlx::query_as(
        "SELECT u.id, u.email, u.is_admin, u.created_at,
                coalesce((SELECT array_agg(a.slug || ':' || m.role ORDER BY a.slug)
                          FROM app_members m JOIN apps a ON a.id = m.app_id
                          WHERE m.user_id = u.id), '{}') AS roles,
                (SELECT count(*) FROM sessions s WHERE s.user_id = u.id AND s.expires_at > now()) AS sessions,
                (SELECT count(*) FROM api_keys k WHERE k.user_id = u.id AND k.revoked_at IS NULL) AS api_keys
         FROM users u ORDER BY u.email",
    )
    .fetch_all(db)
    .await?)
}

/// Deletes a user with their roles, sessions and API keys. Refuses to
/// delete the last instance admin, in the same transaction (so two operators
/// deleting the last two admins at once cannot both succeed).
pub async fn delete_user(conn: &mut sqlx::PgConnection, user_id: Uuid) -> Result<(), Error> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    if admin_lock(&mut tx, user_id).await? {
        refuse_last_admin(&mut tx).await?;
    }
    sqlx::query("DELETE FROM users WHERE id = $1")
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Makes a user an instance admin (`admin`) or an ordinary user again;
/// false when it already was. Refuses to take the last instance admin's
/// rights, serialised with [`delete_user`]. Takes effect on the user's next
/// request: a principal is read for every request.
pub async fn set_admin(
    conn: &mut sqlx::PgConnection,
    user_id: Uuid,
    admin: bool,
) -> Result<bool, Error> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let was_admin = admin_lock(&mut tx, user_id).await?;
    if was_admin == admin {
        return Ok(false);
    }
    if was_admin {
        refuse_last_admin(&mut tx).await?;
    }
    sqlx::query("UPDATE users SET is_admin = $2 WHERE id = $1")
        .bind(user_id)
        .bind(admin)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

/// Locks the instance admins' rows, which serialises every change that could
/// remove the last of them, and the user's; returns whether the user is an
/// instance admin ([`Error::NotFound`] when there is no such user).
async fn admin_lock(tx: &mut sqlx::PgConnection, user_id: Uuid) -> Result<bool, Error> {
    sqlx::query("SELECT id FROM users WHERE is_admin OR id = $1 ORDER BY id FOR UPDATE")
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query_scalar("SELECT is_admin FROM users WHERE id = $1")
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| Error::NotFound("user".into()))
}

/// Refuses a change that removes an instance admin when it is the last one
/// (under [`admin_lock`], so the count is exact).
async fn refuse_last_admin(tx: &mut sqlx::PgConnection) -> Result<(), Error> {
    let admins: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE is_admin")
        .fetch_one(&mut *tx)
        .await?;
    if admins <= 1 {
        return Err(Error::Conflict(
            "this is the last instance admin: make another user admin first (outboxd user promote EMAIL)".into(),
        ));
    }
    Ok(())
}

/// Replaces a user's password hash and ends all their sessions, in one
/// transaction; returns how many sessions ended.
pub async fn set_password(
    conn: &mut sqlx::PgConnection,
    user_id: Uuid,
    password_hash: &str,
) -> Result<u64, Error> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let changed = sqlx::query("UPDATE users SET password_hash = $2 WHERE id = $1")
        .bind(user_id)
        .bind(password_hash)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if changed == 0 {
        return Err(Error::NotFound("user".into()));
    }
    let ended = crate::store::sessions::close_all(&mut *tx, user_id).await?;
    tx.commit().await?;
    Ok(ended)
}

/// Removes a user's role on an app; returns whether there was one.
pub async fn remove_role<'e>(
    db: impl PgExecutor<'e>,
    app_id: Uuid,
    user_id: Uuid,
) -> Result<bool, Error> {
    Ok(
        sqlx::query("DELETE FROM app_members WHERE app_id = $1 AND user_id = $2")
            .bind(app_id)
            .bind(user_id)
            .execute(db)
            .await?
            .rows_affected()
            > 0,
    )
}

/// An API key as listed to operators: never its secret or hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct ApiKeySummary {
    /// Primary key.
    pub id: Uuid,
    /// The public part of the key (`obx_<prefix>_…`), to tell keys apart.
    pub prefix: String,
    /// The name given at creation.
    pub name: String,
    /// E-mail of the user the key acts as.
    pub owner: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was last used (to the minute).
    pub last_used_at: Option<DateTime<Utc>>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Every API key (revoked ones too, marked), newest first; only `owner`'s
/// when given.
pub async fn list_api_keys<'e>(
    db: impl PgExecutor<'e>,
    owner: Option<Uuid>,
) -> Result<Vec<ApiKeySummary>, Error> {
    Ok(sqlx::query_as(
        "SELECT k.id, k.prefix, k.name, u.email AS owner, k.created_at, k.last_used_at, k.revoked_at
         FROM api_keys k JOIN users u ON u.id = k.user_id
         WHERE $1::uuid IS NULL OR k.user_id = $1
         ORDER BY k.created_at DESC",
    )
    .bind(owner)
    .fetch_all(db)
    .await?)
}

/// Revokes the key with this prefix; the next request with it is refused.
/// False when it was revoked already (its revocation time is kept);
/// [`Error::NotFound`] when no key has the prefix.
pub async fn revoke_api_key(conn: &mut sqlx::PgConnection, prefix: &str) -> Result<bool, Error> {
    // The update re-checks `revoked_at IS NULL` on the row a concurrent
    // revocation changed, so of two at once only one says "revoked now".
    let revoked_now = sqlx::query(
        "UPDATE api_keys SET revoked_at = now() WHERE prefix = $1 AND revoked_at IS NULL",
    )
    .bind(prefix)
    .execute(&mut *conn)
    .await?
    .rows_affected()
        > 0;
    if revoked_now {
        return Ok(true);
    }
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_keys WHERE prefix = $1)")
            .bind(prefix)
            .fetch_one(&mut *conn)
            .await?;
    if exists {
        Ok(false)
    } else {
        Err(Error::NotFound("api key".into()))
    }
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
