//! Authentication: argon2id passwords (hashed off the async runtime), JWTs,
//! API keys, login rate limits, and capabilities per app.
//!
//! This module holds the settings, the principal and authorization per app;
//! password hashing, tokens, API keys and the login throttle live in
//! submodules and are re-exported here.

use std::time::Duration;

use outbox_core::store::principals::{self, Role, User};
use outbox_core::store::sessions;
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::ApiError;

mod api_keys;
mod password;
mod proxies;
mod throttle;
mod tokens;

pub use self::api_keys::{API_KEY_TAG, new_api_key};
pub use self::password::{Hasher, Lane};
pub use self::proxies::{IpNet, client_address};
pub use self::throttle::{Admitted, Throttle, ThrottleConfig, forget_clients, unlock};
pub use self::tokens::{Claims, IssuedToken, issue_token, open_session, verify_token};

pub(crate) use self::api_keys::constant_time_eq;
use self::api_keys::sha256_hex;

/// Minimum JWT secret length in bytes (HS256 needs a 256-bit key).
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// Authentication settings.
#[derive(Clone)]
pub struct AuthConfig {
    /// HS256 key; at least [`MIN_JWT_SECRET_BYTES`].
    pub jwt_secret: Vec<u8>,
    /// The key before the last rotation: tokens it signed are still taken
    /// until they expire, so a rotation signs nobody out. New tokens are
    /// signed with [`Self::jwt_secret`] only.
    pub previous_jwt_secret: Option<Vec<u8>>,
    /// Until when (seconds since the epoch) [`Self::previous_jwt_secret`] is
    /// taken: by then every token it signed before the rotation has
    /// expired, and a key left in the settings by mistake stops counting.
    pub previous_jwt_secret_until: i64,
    /// Token lifetime.
    pub token_ttl: Duration,
    /// `iss` of issued tokens, required on presented ones.
    pub issuer: String,
    /// `aud` of issued tokens, required on presented ones.
    pub audience: String,
    /// Mark cookies `Secure` (serve behind TLS).
    pub secure_cookies: bool,
    /// How failed logins are slowed down.
    pub throttle: ThrottleConfig,
    /// Reverse proxies whose `X-Forwarded-For` names the client (empty:
    /// the TCP peer is the client).
    pub trusted_proxies: Vec<IpNet>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("jwt_secret", &"[redacted]")
            .field(
                "previous_jwt_secret",
                &self.previous_jwt_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("token_ttl", &self.token_ttl)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl AuthConfig {
    /// Defaults around a secret: 24 h tokens, [`ThrottleConfig::default`].
    pub fn new(jwt_secret: impl Into<Vec<u8>>) -> Result<Self, String> {
        let jwt_secret = jwt_secret.into();
        if jwt_secret.len() < MIN_JWT_SECRET_BYTES {
            return Err(format!(
                "JWT_SECRET is {} bytes; at least {MIN_JWT_SECRET_BYTES} are required",
                jwt_secret.len()
            ));
        }
        Ok(Self {
            jwt_secret,
            previous_jwt_secret: None,
            previous_jwt_secret_until: 0,
            token_ttl: Duration::from_secs(24 * 3600),
            issuer: "outboxd".into(),
            audience: "outboxd-admin".into(),
            secure_cookies: false,
            throttle: ThrottleConfig::default(),
            trusted_proxies: Vec::new(),
        })
    }
}

impl AuthConfig {
    /// Also takes tokens signed with `previous`, the key before a rotation
    /// (at least [`MIN_JWT_SECRET_BYTES`]), for [`Self::token_ttl`] from now:
    /// set the lifetime first.
    pub fn with_previous_secret(mut self, previous: impl Into<Vec<u8>>) -> Result<Self, String> {
        let previous = previous.into();
        if previous.len() < MIN_JWT_SECRET_BYTES {
            return Err(format!(
                "the previous JWT secret is {} bytes; at least {MIN_JWT_SECRET_BYTES} are required",
                previous.len()
            ));
        }
        self.previous_jwt_secret = Some(previous);
        let ttl = i64::try_from(self.token_ttl.as_secs()).unwrap_or(i64::MAX);
        self.previous_jwt_secret_until = chrono::Utc::now().timestamp().saturating_add(ttl);
        Ok(self)
    }

    /// The key before the rotation, while it is still taken.
    pub fn previous_key_now(&self) -> Option<&[u8]> {
        self.previous_jwt_secret
            .as_deref()
            .filter(|_| chrono::Utc::now().timestamp() < self.previous_jwt_secret_until)
    }
}

/// Who is calling, re-read from the database on every request so a removed
/// user, role or session takes effect at once.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The user.
    pub user: User,
    /// The session of a token; `None` for an API key.
    pub session_id: Option<Uuid>,
}

/// Resolves a bearer credential (JWT or API key) to its user.
pub async fn authenticate(
    pool: &PgPool,
    config: &AuthConfig,
    credential: &str,
) -> Result<Principal, ApiError> {
    if let Some(rest) = credential.strip_prefix(API_KEY_TAG) {
        let (prefix, secret) = rest.split_once('_').ok_or_else(ApiError::unauthorized)?;
        let (user_id, hash) = principals::api_key_by_prefix(pool, prefix)
            .await?
            .ok_or_else(ApiError::unauthorized)?;
        if !constant_time_eq(sha256_hex(secret).as_bytes(), hash.as_bytes()) {
            return Err(ApiError::unauthorized());
        }
        let user = principals::user_by_id(pool, user_id)
            .await?
            .ok_or_else(ApiError::unauthorized)?;
        return Ok(Principal {
            user,
            session_id: None,
        });
    }
    let (user_id, session_id) = verify_token(config, credential)?;
    let user = sessions::user_of(pool, session_id, user_id)
        .await?
        .ok_or_else(ApiError::unauthorized)?;
    Ok(Principal {
        user,
        session_id: Some(session_id),
    })
}

/// What a principal may do on one app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// `AppDeadLetterRead(app)`: list, count and read dead letters.
    DeadLetterRead,
    /// `AppDeadLetterManage(app)`: replay and resolve dead letters.
    DeadLetterManage,
    /// `AppManageTriggers(app)`: create and change triggers.
    ManageTriggers,
    /// `AppWrite(app)`: write KV entries, publish events, enqueue jobs.
    Write,
    /// `AppOperate(app)`: pause and resume topics, cancel rows.
    Operate,
}

/// Which capabilities a role grants.
pub fn role_grants(role: Role, capability: Capability) -> bool {
    match role {
        Role::Admin => true,
        Role::Operator => matches!(
            capability,
            Capability::DeadLetterRead
                | Capability::DeadLetterManage
                | Capability::Write
                | Capability::Operate
        ),
        Role::Viewer => capability == Capability::DeadLetterRead,
    }
}

/// Resolves `slug` for a principal that needs `capability` on it. An app the
/// principal cannot see at all answers 404, exactly like a missing app.
pub async fn authorize(
    pool: &PgPool,
    principal: &Principal,
    slug: &str,
    capability: Capability,
) -> Result<outbox_core::App, ApiError> {
    let app = outbox_core::store::apps::by_slug(pool, slug)
        .await
        .map_err(|_| ApiError::not_found("app"))?;
    if principal.user.is_admin {
        return Ok(app);
    }
    match principals::role_on(pool, app.id, principal.user.id).await? {
        None => Err(ApiError::not_found("app")),
        Some(role) if role_grants(role, capability) => Ok(app),
        Some(role) => Err(ApiError::RoleTooLow {
            app: app.slug,
            role: role.as_str(),
            needed: needed_role(capability),
        }),
    }
}

/// The least role that grants `capability`, in words.
fn needed_role(capability: Capability) -> &'static str {
    if role_grants(Role::Viewer, capability) {
        "viewer or above"
    } else if role_grants(Role::Operator, capability) {
        "operator or admin"
    } else {
        "admin"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_secret_is_refused() {
        let err = AuthConfig::new(vec![1u8; 31]).err().unwrap_or_default();
        assert!(
            err.contains("31 bytes") && err.contains("at least 32"),
            "{err}"
        );
    }

    #[test]
    fn roles_map_to_capabilities() {
        use Capability::*;
        assert!(role_grants(Role::Viewer, DeadLetterRead));
        assert!(!role_grants(Role::Viewer, DeadLetterManage));
        assert!(role_grants(Role::Operator, DeadLetterManage));
        assert!(!role_grants(Role::Operator, ManageTriggers));
        assert!(role_grants(Role::Operator, Write));
        assert!(!role_grants(Role::Viewer, Write));
        assert!(role_grants(Role::Admin, ManageTriggers));
    }
}
