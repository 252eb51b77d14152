//! Password hashing: argon2id on the blocking pool, one hash at a time per
//! lane, so that a flood of sign-ins can take one core at most and the
//! clients an account signed in from lately do not queue behind it.

use std::sync::Arc;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm as Argon2Algorithm, Argon2, Params, Version};
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// argon2id with OWASP's minimum: m = 19 MiB, t = 2, p = 1.
fn argon2() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Argon2Algorithm::Argon2id, Version::V0x13, params)
}

/// Which queue a password check waits in ([`Hasher::verify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// A client the account signed in from lately (the login throttle's
    /// memory), or an authenticated caller setting a password: only someone
    /// who knew the password could have put a client here.
    Known,
    /// Anyone else, a flood of guesses included.
    Stranger,
}

/// Hashes and verifies passwords on the blocking pool, one at a time in each
/// [`Lane`] (each hash holds 19 MiB and a core for tens of milliseconds):
/// guesses from many addresses at once leave the other core to dispatch,
/// and an owner signing in from a client they used lately waits for one
/// hash at most, not for the guesses queued before them.
#[derive(Clone)]
pub struct Hasher {
    known: Arc<Semaphore>,
    strangers: Arc<Semaphore>,
    // Verified when the e-mail is unknown, so that costs what a wrong password costs.
    dummy_hash: Arc<String>,
}

impl Hasher {
    /// A hasher with its dummy hash computed once.
    pub fn new() -> Result<Self, ApiError> {
        let dummy_hash = hash_now("dummy password for timing equalization")?;
        Ok(Self {
            known: Arc::new(Semaphore::new(1)),
            strangers: Arc::new(Semaphore::new(1)),
            dummy_hash: Arc::new(dummy_hash),
        })
    }

    /// Hashes a password (PHC string) for a caller that is signed in, in the
    /// [`Lane::Known`] lane.
    pub async fn hash(&self, password: String) -> Result<String, ApiError> {
        self.hash_in(password, Lane::Known).await
    }

    /// Hashes a password (PHC string) waiting in `lane`: a public sign-up
    /// waits with the strangers.
    pub async fn hash_in(&self, password: String, lane: Lane) -> Result<String, ApiError> {
        let _permit = self
            .permits(lane)
            .acquire()
            .await
            .map_err(|_| ApiError::internal("hasher closed"))?;
        tokio::task::spawn_blocking(move || hash_now(&password))
            .await
            .map_err(|e| ApiError::internal(format!("hashing task: {e}")))?
    }

    fn permits(&self, lane: Lane) -> &Semaphore {
        match lane {
            Lane::Known => &self.known,
            Lane::Stranger => &self.strangers,
        }
    }

    /// Verifies `password` against `hash`, or against the dummy hash when
    /// there is no user, so both cost the same, waiting in `lane`.
    pub async fn verify(&self, password: String, hash: Option<String>, lane: Lane) -> bool {
        let Ok(_permit) = self.permits(lane).acquire().await else {
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
