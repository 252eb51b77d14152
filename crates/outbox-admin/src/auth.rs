//! Authentication: argon2id passwords (hashed off the async runtime), JWTs,
//! API keys, login rate limits, and capabilities per app.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm as Argon2Algorithm, Argon2, Params, Version};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use outbox_core::store::principals::{self, Role, User};
use outbox_core::store::{login_throttle, sessions};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::error::ApiError;

/// Minimum JWT secret length in bytes (HS256 needs a 256-bit key).
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// Authentication settings.
#[derive(Clone)]
pub struct AuthConfig {
    /// HS256 key; at least [`MIN_JWT_SECRET_BYTES`].
    pub jwt_secret: Vec<u8>,
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
}

/// Login throttling: failures are counted per account, per client address
/// and per (account, address) pair, in PostgreSQL. Once a key has used its
/// free failures, the next attempt under it waits `base_delay`, doubling with
/// each further failure up to `max_delay`; a count lapses `window` after its
/// last failure.
///
/// An address that is held back is refused for every account. An account
/// that is held back is refused only to addresses that have failed on it:
/// someone guessing elsewhere can never lock the rightful owner out of a
/// client that has not been failing.
#[derive(Debug, Clone, PartialEq)]
pub struct ThrottleConfig {
    /// Failures of one account (from anywhere) before it is held back.
    pub free_per_account: u32,
    /// Failures from one address (on any account) before it is held back.
    pub free_per_address: u32,
    /// Failures of one account from one address before that pair is held back.
    pub free_per_pair: u32,
    /// The first hold-back.
    pub base_delay: Duration,
    /// The longest hold-back.
    pub max_delay: Duration,
    /// How long a count is remembered after its last failure.
    pub window: Duration,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            free_per_account: 5,
            free_per_address: 20,
            free_per_pair: 3,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(15 * 60),
            window: Duration::from_secs(60 * 60),
        }
    }
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("jwt_secret", &"[redacted]")
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
            token_ttl: Duration::from_secs(24 * 3600),
            issuer: "outboxd".into(),
            audience: "outboxd-admin".into(),
            secure_cookies: false,
            throttle: ThrottleConfig::default(),
        })
    }
}

/// argon2id with OWASP's minimum: m = 19 MiB, t = 2, p = 1.
fn argon2() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Argon2Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes and verifies passwords on the blocking pool, a few at a time (each
/// hash holds 19 MiB).
#[derive(Clone)]
pub struct Hasher {
    permits: Arc<Semaphore>,
    // Verified when the e-mail is unknown, so that costs what a wrong password costs.
    dummy_hash: Arc<String>,
}

impl Hasher {
    /// A hasher with its dummy hash computed once.
    pub fn new() -> Result<Self, ApiError> {
        let dummy_hash = hash_now("dummy password for timing equalization")?;
        Ok(Self {
            permits: Arc::new(Semaphore::new(2)),
            dummy_hash: Arc::new(dummy_hash),
        })
    }

    /// Hashes a password (PHC string).
    pub async fn hash(&self, password: String) -> Result<String, ApiError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| ApiError::internal("hasher closed"))?;
        tokio::task::spawn_blocking(move || hash_now(&password))
            .await
            .map_err(|e| ApiError::internal(format!("hashing task: {e}")))?
    }

    /// Verifies `password` against `hash`, or against the dummy hash when
    /// there is no user, so both cost the same.
    pub async fn verify(&self, password: String, hash: Option<String>) -> bool {
        let Ok(_permit) = self.permits.acquire().await else {
            return false;
        };
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.dummy_hash.as_ref().clone());
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash)
                .map(|parsed| {
                    argon2()
                        .verify_password(password.as_bytes(), &parsed)
                        .is_ok()
                })
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        ok && known
    }
}

fn hash_now(password: &str) -> Result<String, ApiError> {
    let salt = SaltString::generate(&mut OsRng);
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::internal(format!("hashing: {e}")))
}

/// The claims of an outboxd token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Expiry (seconds since the epoch).
    pub exp: i64,
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// The session the token belongs to; the token is valid only while the
    /// session row exists.
    pub sid: String,
}

/// A token and what it stands for.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The signed JWT.
    pub token: String,
    /// Its expiry (seconds since the epoch).
    pub expires_at: i64,
    /// The session it belongs to.
    pub session_id: Uuid,
}

/// Opens a session for `user_id` and issues its token.
pub async fn open_session(
    pool: &PgPool,
    config: &AuthConfig,
    user_id: Uuid,
) -> Result<IssuedToken, ApiError> {
    let expires = chrono::Utc::now()
        + chrono::Duration::from_std(config.token_ttl)
            .map_err(|_| ApiError::internal("token_ttl out of range"))?;
    let session_id = sessions::open(pool, user_id, expires).await?;
    let (token, expires_at) = issue_token(config, user_id, session_id)?;
    Ok(IssuedToken {
        token,
        expires_at,
        session_id,
    })
}

/// Signs a token for `user_id` in session `session_id`; returns it with its
/// expiry. The session must exist for the token to be accepted.
pub fn issue_token(
    config: &AuthConfig,
    user_id: Uuid,
    session_id: Uuid,
) -> Result<(String, i64), ApiError> {
    let now = chrono::Utc::now().timestamp();
    let exp = now + config.token_ttl.as_secs() as i64;
    let claims = Claims {
        sub: user_id.to_string(),
        iss: config.issuer.clone(),
        aud: config.audience.clone(),
        exp,
        iat: now,
        sid: session_id.to_string(),
    };
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&config.jwt_secret),
    )
    .map_err(|e| ApiError::internal(format!("signing a token: {e}")))?;
    Ok((token, exp))
}

/// Verifies a token: HS256 only, signature, `exp`, `iat` (not in the
/// future), `iss`, `aud`, `sub` and `sid` all required. Returns the user and
/// the session; whether the session is still open is the caller's check
/// ([`authenticate`]).
pub fn verify_token(config: &AuthConfig, token: &str) -> Result<(Uuid, Uuid), ApiError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.algorithms = vec![Algorithm::HS256];
    validation.leeway = 5;
    validation.set_issuer(&[&config.issuer]);
    validation.set_audience(&[&config.audience]);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
    let data = jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(&config.jwt_secret),
        &validation,
    )
    .map_err(|_| ApiError::unauthorized())?;
    if data.claims.iat > chrono::Utc::now().timestamp() + 5 {
        return Err(ApiError::unauthorized());
    }
    let user = Uuid::parse_str(&data.claims.sub).map_err(|_| ApiError::unauthorized())?;
    let session = Uuid::parse_str(&data.claims.sid).map_err(|_| ApiError::unauthorized())?;
    Ok((user, session))
}

/// Prefix of every API key: `obx_<prefix>_<secret>`.
pub const API_KEY_TAG: &str = "obx_";

/// A new API key: (the key to show once, its prefix, the hash to store).
pub fn new_api_key() -> (String, String, String) {
    let mut bytes = [0u8; 24];
    OsRng.fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let (prefix, secret) = hex.split_at(8);
    let key = format!("{API_KEY_TAG}{prefix}_{secret}");
    (key, prefix.to_owned(), sha256_hex(secret))
}

/// API key secrets are long random strings: a fast hash suffices (and keeps
/// per-request checks cheap), unlike passwords.
fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
}

/// Which capabilities a role grants.
pub fn role_grants(role: Role, capability: Capability) -> bool {
    match role {
        Role::Admin => true,
        Role::Operator => matches!(
            capability,
            Capability::DeadLetterRead | Capability::DeadLetterManage | Capability::Write
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
        Some(_) => Err(ApiError::forbidden()),
    }
}

/// The login throttle of [`ThrottleConfig`], kept in PostgreSQL so every
/// outboxd process sees the same counts and a restart forgets nothing.
#[derive(Clone)]
pub struct Throttle {
    pool: PgPool,
    config: ThrottleConfig,
}

/// The keys one login attempt is counted under.
struct ThrottleKeys {
    account: String,
    address: String,
    pair: String,
}

impl ThrottleKeys {
    fn new(email: &str, addr: Option<IpAddr>) -> Self {
        let email = email.trim().to_lowercase();
        let addr = addr.map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        Self {
            account: format!("account:{email}"),
            address: format!("address:{addr}"),
            pair: format!("pair:{email}|{addr}"),
        }
    }
}

impl Throttle {
    /// A throttle over `pool`.
    pub fn new(pool: PgPool, config: ThrottleConfig) -> Self {
        Self { pool, config }
    }

    fn window_secs(&self) -> i64 {
        self.config.window.as_secs().max(1) as i64
    }

    /// `Some(wait)` when this attempt must be refused, checked before the
    /// password is, so known and unknown accounts answer alike.
    pub async fn hold_back(
        &self,
        email: &str,
        addr: Option<IpAddr>,
    ) -> Result<Option<Duration>, ApiError> {
        let keys = ThrottleKeys::new(email, addr);
        let states = login_throttle::recent(
            &self.pool,
            &[
                keys.account.clone(),
                keys.address.clone(),
                keys.pair.clone(),
            ],
            self.window_secs(),
        )
        .await?;
        let now = chrono::Utc::now();
        let wait = |key: &str| {
            states
                .iter()
                .find(|s| s.key == key)
                .and_then(|s| s.blocked_until)
                .filter(|until| *until > now)
                .map(|until| (until - now).to_std().unwrap_or_default())
        };
        let pair_failing = states.iter().any(|s| s.key == keys.pair && s.failures > 0);
        let account_wait = wait(&keys.account).filter(|_| pair_failing);
        Ok([wait(&keys.address), wait(&keys.pair), account_wait]
            .into_iter()
            .flatten()
            .max())
    }

    /// Counts a failed attempt under all its keys.
    pub async fn record_failure(&self, email: &str, addr: Option<IpAddr>) -> Result<(), ApiError> {
        let keys = ThrottleKeys::new(email, addr);
        let c = &self.config;
        let free = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(outbox_core::Error::from)?;
        login_throttle::record_failure(
            &mut conn,
            &[keys.account, keys.address, keys.pair],
            &[
                free(c.free_per_account),
                free(c.free_per_address),
                free(c.free_per_pair),
            ],
            self.window_secs(),
            c.base_delay.as_secs_f64(),
            c.max_delay.as_secs_f64(),
        )
        .await?;
        Ok(())
    }

    /// Forgets the account's failures, and this address's on it, after a
    /// successful login (the address's count over all accounts stays).
    pub async fn record_success(&self, email: &str, addr: Option<IpAddr>) -> Result<(), ApiError> {
        let keys = ThrottleKeys::new(email, addr);
        login_throttle::clear(&self.pool, &[keys.account, keys.pair]).await?;
        Ok(())
    }
}

/// Clears an account's login throttle (`outboxd user unlock`): its own count
/// and the counts of every address on it. Returns how many counts went.
pub async fn unlock(pool: &PgPool, email: &str) -> Result<u64, ApiError> {
    let email = email.trim().to_lowercase();
    let pairs = login_throttle::clear_prefixed(pool, &[format!("pair:{email}|")]).await?;
    Ok(pairs + login_throttle::clear(pool, &[format!("account:{email}")]).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AuthConfig {
        AuthConfig::new(vec![7u8; 32]).expect("32-byte secret")
    }

    #[test]
    fn short_secret_is_refused() {
        let err = AuthConfig::new(vec![1u8; 31]).err().unwrap_or_default();
        assert!(
            err.contains("31 bytes") && err.contains("at least 32"),
            "{err}"
        );
    }

    #[test]
    fn tokens_round_trip_and_negatives_fail() {
        let c = config();
        let user = Uuid::new_v4();
        let session = Uuid::new_v4();
        let (token, _) = issue_token(&c, user, session).expect("token");
        assert_eq!(verify_token(&c, &token).ok(), Some((user, session)));

        // Tampered payload.
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = parts[1].chars().rev().collect();
        assert!(verify_token(&c, &parts.join(".")).is_err());
        // alg = none.
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            token.split('.').nth(1).unwrap_or_default()
        );
        assert!(verify_token(&c, &none).is_err());
        // Another algorithm with the same secret.
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims(&c, user, 0, &c.issuer, &c.audience),
            &EncodingKey::from_secret(&c.jwt_secret),
        )
        .expect("sign");
        assert!(verify_token(&c, &hs512).is_err());
        // Expired, wrong issuer, wrong audience, another secret.
        for (offset, iss, aud, secret) in [
            (
                -3600,
                c.issuer.as_str(),
                c.audience.as_str(),
                c.jwt_secret.clone(),
            ),
            (0, "someone-else", c.audience.as_str(), c.jwt_secret.clone()),
            (0, c.issuer.as_str(), "other-audience", c.jwt_secret.clone()),
            (0, c.issuer.as_str(), c.audience.as_str(), vec![9u8; 32]),
        ] {
            let t = jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims(&c, user, offset, iss, aud),
                &EncodingKey::from_secret(&secret),
            )
            .expect("sign");
            assert!(verify_token(&c, &t).is_err(), "{offset} {iss} {aud}");
        }
        // Missing aud.
        let no_aud = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": user.to_string(), "sid": Uuid::new_v4().to_string(), "iss": c.issuer, "exp": chrono::Utc::now().timestamp() + 60, "iat": chrono::Utc::now().timestamp()}),
            &EncodingKey::from_secret(&c.jwt_secret),
        )
        .expect("sign");
        assert!(verify_token(&c, &no_aud).is_err());
    }

    fn claims(c: &AuthConfig, user: Uuid, exp_offset: i64, iss: &str, aud: &str) -> Claims {
        let now = chrono::Utc::now().timestamp();
        let _ = c;
        Claims {
            sub: user.to_string(),
            iss: iss.into(),
            aud: aud.into(),
            exp: if exp_offset < 0 {
                now + exp_offset
            } else {
                now + 600
            },
            iat: now + exp_offset.min(0) - 10,
            sid: Uuid::new_v4().to_string(),
        }
    }

    fn b64(s: &str) -> String {
        use std::fmt::Write;
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = s.as_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b))
                << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                let _ = out.write_char(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    proptest::proptest! {
        /// Anything in the Authorization header that is not a token we
        /// issued is refused, without a panic.
        #[test]
        fn arbitrary_tokens_are_refused(
            token in ".{0,80}|[A-Za-z0-9_-]{1,40}\\.[A-Za-z0-9_-]{1,60}\\.[A-Za-z0-9_-]{0,43}",
        ) {
            proptest::prop_assert!(verify_token(&config(), &token).is_err());
        }
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

    #[test]
    fn api_keys_have_a_prefix_and_hash() {
        let (key, prefix, hash) = new_api_key();
        assert!(key.starts_with(&format!("{API_KEY_TAG}{prefix}_")));
        let secret = key.rsplit('_').next().unwrap_or_default();
        assert_eq!(sha256_hex(secret), hash);
    }
}
