//! The login throttle: failed logins counted per account, per address and
//! per (account, address) pair, in PostgreSQL.

use std::net::IpAddr;
use std::time::Duration;

use outbox_core::store::login_throttle;
use outbox_core::store::principals::fold_email;
use sqlx::PgPool;

use super::Lane;
use crate::error::ApiError;

/// Login throttling: failures are counted per account, per client address
/// and per (account, address) pair, in PostgreSQL. Once a key has used its
/// free failures, the next attempt under it waits `base_delay`, doubling with
/// each further failure up to `max_delay`; a count lapses `window` after its
/// last failure.
///
/// An address that is held back is refused for every account. An account
/// that is held back is refused only to addresses that have failed on it
/// more than once (`TYPOS_FORGIVEN`) and have not signed in to it within
/// the window: someone guessing elsewhere can never lock the rightful owner
/// out after a typo, from a new network as from a client it signs in from.
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

/// Failures of an address on an account that is held back before the
/// account's hold applies to that address too: an owner on a new network
/// who mistypes once still signs in, at the price of one more guess per
/// address for someone guessing from many (the pair's own limit still
/// holds each address back).
pub const TYPOS_FORGIVEN: u32 = 1;

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
    /// Noted when the account signs in from this address.
    known: String,
}

impl ThrottleKeys {
    /// The keys of `email` as [`fold_email`] folds it, from `addr`.
    fn new(email: &str, addr: Option<IpAddr>) -> Self {
        let addr = addr.map_or_else(|| "unknown".to_owned(), client_key);
        Self {
            account: format!("account:{email}"),
            address: format!("address:{addr}"),
            pair: format!("pair:{email}|{addr}"),
            known: format!("known:{email}|{addr}"),
        }
    }

    /// How long an attempt must wait, from its keys' states: a held-back
    /// address or pair always; a held-back account only for an address that
    /// has failed on it more than [`TYPOS_FORGIVEN`] times and is not
    /// `known` (signed in to it lately).
    fn wait(&self, states: &[login_throttle::KeyState], known: bool) -> Option<Duration> {
        let now = chrono::Utc::now();
        let wait = |key: &str| {
            states
                .iter()
                .find(|s| s.key == key)
                .and_then(|s| s.blocked_until)
                .filter(|until| *until > now)
                .map(|until| (until - now).to_std().unwrap_or_default())
        };
        let pair_failing = states
            .iter()
            .any(|s| s.key == self.pair && i64::from(s.failures) > i64::from(TYPOS_FORGIVEN));
        let account_wait = wait(&self.account).filter(|_| pair_failing && !known);
        [wait(&self.address), wait(&self.pair), account_wait]
            .into_iter()
            .flatten()
            .max()
    }
}

/// The address a client is counted under: an IPv4 address (an IPv4-mapped
/// IPv6 one included) as it is, an IPv6 address by its /64, which one
/// subscriber usually holds whole.
fn client_key(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                let prefix = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("{prefix}/64")
            }
        },
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

    /// Admits a login attempt, counting it as a failure before its password
    /// is checked (so attempts sent at once cannot overtake their own
    /// count), or refuses it with how long to wait. Known and unknown
    /// accounts are treated alike. A success hands the admission to
    /// [`Throttle::record_success`].
    pub async fn admit(&self, email: &str, addr: Option<IpAddr>) -> Result<Admitted, ApiError> {
        let email = fold_email(&self.pool, email).await?;
        let keys = ThrottleKeys::new(&email, addr);
        let c = &self.config;
        let known = login_throttle::remembered(&self.pool, &keys.known, self.window_secs()).await?;
        let refusal = login_throttle::begin_attempt(
            &self.pool,
            &[
                keys.account.clone(),
                keys.address.clone(),
                keys.pair.clone(),
            ],
            &[
                free(c.free_per_account),
                free(c.free_per_address),
                free(c.free_per_pair),
            ],
            self.window_secs(),
            c.base_delay.as_secs_f64(),
            c.max_delay.as_secs_f64(),
            |states| keys.wait(states, known),
        )
        .await?;
        match refusal {
            Err(wait) => Err(ApiError::RateLimited(wait)),
            Ok(before) => Ok(Admitted {
                email,
                known,
                address_before: before
                    .into_iter()
                    .filter(|k| k.key == keys.address)
                    .collect(),
            }),
        }
    }

    /// Gives back the count of a successful attempt: forgets the account's
    /// failures and this address's on it (the address's count over all
    /// accounts loses this attempt only), and remembers that the account
    /// signed in from here.
    pub async fn record_success(
        &self,
        addr: Option<IpAddr>,
        admitted: Admitted,
    ) -> Result<(), ApiError> {
        let keys = ThrottleKeys::new(&admitted.email, addr);
        login_throttle::refund(
            &self.pool,
            &[keys.account, keys.pair],
            &admitted.address_before,
            &[free(self.config.free_per_address)],
            &keys.known,
        )
        .await?;
        Ok(())
    }
}

/// An attempt [`Throttle::admit`] let through, counted as a failure: what
/// its address's count was before, for a success to put back.
#[derive(Debug)]
pub struct Admitted {
    /// The e-mail as the database folds it (its keys are counted under).
    email: String,
    /// Whether the account signed in from this client within the window.
    known: bool,
    address_before: Vec<login_throttle::KeyState>,
}

impl Admitted {
    /// The lane the attempt's password check waits in: [`Lane::Known`] for a
    /// client the account signed in from within the window.
    pub fn lane(&self) -> Lane {
        if self.known {
            Lane::Known
        } else {
            Lane::Stranger
        }
    }
}

fn free(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Clears an account's login throttle (`outboxd user unlock`): its own count
/// and the counts of every address on it. Returns how many counts went.
/// The addresses it signed in from are forgotten too (see [`forget_clients`]).
pub async fn unlock(pool: &PgPool, email: &str) -> Result<u64, ApiError> {
    let email = fold_email(pool, email).await?;
    let pairs = login_throttle::clear_prefixed(pool, &[format!("pair:{email}|")]).await?;
    forget_clients(pool, &email).await?;
    Ok(pairs + login_throttle::clear(pool, &[format!("account:{email}")]).await?)
}

/// Forgets the addresses an account signed in from, which the account's
/// hold-back spares: after a password change or revoked sessions, a client
/// that signed in with the old credentials is spared no longer.
pub async fn forget_clients(pool: &PgPool, email: &str) -> Result<(), ApiError> {
    let email = fold_email(pool, email).await?;
    login_throttle::clear_prefixed(pool, &[format!("known:{email}|")]).await?;
    Ok(())
}
