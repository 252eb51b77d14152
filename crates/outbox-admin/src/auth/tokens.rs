//! Tokens: the JWT claims, signing and verifying them, and opening the
//! session a token belongs to.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use outbox_core::store::sessions;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::ApiError;

use super::AuthConfig;

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
/// ([`authenticate`](crate::auth::authenticate)).
pub fn verify_token(config: &AuthConfig, token: &str) -> Result<(Uuid, Uuid), ApiError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.algorithms = vec![Algorithm::HS256];
    validation.leeway = 5;
    validation.set_issuer(&[&config.issuer]);
    validation.set_audience(&[&config.audience]);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
    let decode = |key: &[u8]| {
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(key), &validation)
    };
    let data = decode(&config.jwt_secret)
        .or_else(|err| match config.previous_key_now() {
            Some(previous) => decode(previous),
            None => Err(err),
        })
        .map_err(|_| ApiError::unauthorized())?;
    if data.claims.iat > chrono::Utc::now().timestamp() + 5 {
        return Err(ApiError::unauthorized());
    }
    let user = Uuid::parse_str(&data.claims.sub).map_err(|_| ApiError::unauthorized())?;
    let session = Uuid::parse_str(&data.claims.sid).map_err(|_| ApiError::unauthorized())?;
    Ok((user, session))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AuthConfig {
        AuthConfig::new(vec![7u8; 32]).expect("32-byte secret")
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

    /// After a rotation, tokens signed with the previous key are taken
    /// while they last (everyone was signed out before), new ones are
    /// signed with the new key, and a third key is refused; the previous
    /// key's tokens meet the same checks (an expired one is refused).
    #[test]
    fn tokens_of_the_previous_key_are_taken_after_a_rotation() {
        let before = config();
        let user = Uuid::new_v4();
        let session = Uuid::new_v4();
        let (old_token, _) = issue_token(&before, user, session).expect("token");
        let rotated = AuthConfig::new(vec![8u8; 32]).expect("32-byte secret");
        assert!(verify_token(&rotated, &old_token).is_err());
        let rotated = rotated
            .with_previous_secret(before.jwt_secret.clone())
            .expect("32-byte previous secret");
        assert_eq!(
            verify_token(&rotated, &old_token).ok(),
            Some((user, session))
        );
        let (new_token, _) = issue_token(&rotated, user, session).expect("token");
        assert!(
            verify_token(&before, &new_token).is_err(),
            "signed with the new key"
        );
        let other = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(&before, user, 0, &before.issuer, &before.audience),
            &EncodingKey::from_secret(&[9u8; 32]),
        )
        .expect("sign");
        assert!(verify_token(&rotated, &other).is_err());
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(&before, user, -3600, &before.issuer, &before.audience),
            &EncodingKey::from_secret(&before.jwt_secret),
        )
        .expect("sign");
        assert!(verify_token(&rotated, &expired).is_err());
        assert!(
            config()
                .with_previous_secret(vec![1u8; 31])
                .err()
                .is_some_and(|e| e.contains("31 bytes"))
        );
        // Once a token lifetime has passed since the rotation, the previous
        // key is not taken any more.
        let lapsed = AuthConfig {
            previous_jwt_secret_until: chrono::Utc::now().timestamp() - 1,
            ..rotated
        };
        assert!(verify_token(&lapsed, &old_token).is_err());
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
}
