//! `[http]` and `[admin]`: the HTTP endpoints, the admin API and sign-in.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Secret, Settings, env_hint, range};

/// `[http]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct HttpSettings {
    pub listen: String,
    pub max_body_bytes: u64,
    pub max_connections: u64,
    pub public_url: String,
    pub metrics_sample_secs: u64,
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct AdminSettings {
    pub jwt_secret: Secret,
    pub jwt_previous_secret: Secret,
    pub token_ttl_secs: u64,
    pub secure_cookies: bool,
    pub login_limit_per_account: u32,
    pub login_limit_per_address: u32,
    pub login_limit_per_pair: u32,
    pub login_delay_base_ms: u64,
    pub login_delay_max_secs: u64,
    pub login_window_secs: u64,
    pub trusted_proxies: Vec<String>,
}

impl Settings {
    /// `http.listen`.
    pub(super) fn validate_listen(&self) -> Result<(), ConfigError> {
        if self.http.listen.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::Range {
                key: "http.listen",
                value: format!("{:?}", self.http.listen),
                problem: "is not a socket address",
                accepted: "host:port with an IP host, e.g. 127.0.0.1:8080".into(),
                env_hint: env_hint("http.listen"),
            });
        }
        Ok(())
    }

    /// `[admin]`.
    pub(super) fn validate_admin(&self) -> Result<(), ConfigError> {
        let ad = &self.admin;
        for proxy in &ad.trusted_proxies {
            if let Err(problem) = proxy.parse::<outbox_admin::auth::IpNet>() {
                return Err(ConfigError::Range {
                    key: "admin.trusted_proxies",
                    value: format!("{proxy:?}"),
                    problem: "is not an address or network",
                    accepted: format!(
                        "addresses or CIDR networks, such as [\"10.0.0.0/8\"] ({problem})"
                    ),
                    env_hint: env_hint("admin.trusted_proxies"),
                });
            }
        }
        let secret_len = ad.jwt_secret.expose().len();
        if secret_len > 0 && secret_len < outbox_admin::auth::MIN_JWT_SECRET_BYTES {
            return Err(ConfigError::Range {
                key: "admin.jwt_secret",
                value: format!("({secret_len} bytes, hidden)"),
                problem: "is too short",
                accepted: format!(
                    "at least {} bytes, or empty to turn the admin API off",
                    outbox_admin::auth::MIN_JWT_SECRET_BYTES
                ),
                env_hint: env_hint("admin.jwt_secret"),
            });
        }
        let previous_len = ad.jwt_previous_secret.expose().len();
        if previous_len > 0
            && (previous_len < outbox_admin::auth::MIN_JWT_SECRET_BYTES || secret_len == 0)
        {
            return Err(ConfigError::Range {
                key: "admin.jwt_previous_secret",
                value: format!("({previous_len} bytes, hidden)"),
                problem: if secret_len == 0 {
                    "is set while admin.jwt_secret is empty"
                } else {
                    "is too short"
                },
                accepted: format!(
                    "at least {} bytes, beside a jwt_secret, or empty",
                    outbox_admin::auth::MIN_JWT_SECRET_BYTES
                ),
                env_hint: env_hint("admin.jwt_previous_secret"),
            });
        }
        range("admin.token_ttl_secs", ad.token_ttl_secs, 60, 2_592_000)?;
        range(
            "admin.login_limit_per_account",
            ad.login_limit_per_account as u64,
            1,
            10_000,
        )?;
        range(
            "admin.login_limit_per_address",
            ad.login_limit_per_address as u64,
            1,
            10_000,
        )?;
        range(
            "admin.login_limit_per_pair",
            ad.login_limit_per_pair as u64,
            1,
            10_000,
        )?;
        range(
            "admin.login_delay_base_ms",
            ad.login_delay_base_ms,
            100,
            60_000,
        )?;
        range(
            "admin.login_delay_max_secs",
            ad.login_delay_max_secs,
            1,
            86_400,
        )?;
        range("admin.login_window_secs", ad.login_window_secs, 60, 604_800)?;
        Ok(())
    }

    /// The rest of `[http]`.
    pub(super) fn validate_http(&self) -> Result<(), ConfigError> {
        let public_url = &self.http.public_url;
        let is_url = public_url.starts_with("http://") || public_url.starts_with("https://");
        if !(public_url.is_empty() || is_url) {
            return Err(ConfigError::Range {
                key: "http.public_url",
                value: format!("{public_url:?}"),
                problem: "is not an http(s) URL",
                accepted: "empty, or a URL such as https://outboxd.example.com".into(),
                env_hint: env_hint("http.public_url"),
            });
        }
        range(
            "http.metrics_sample_secs",
            self.http.metrics_sample_secs,
            1,
            3600,
        )?;
        range("http.max_connections", self.http.max_connections, 1, 65_535)?;
        range(
            "http.max_body_bytes",
            self.http.max_body_bytes,
            1024,
            64 * 1024 * 1024,
        )?;
        Ok(())
    }

    /// Where clients reach the HTTP API, for the OpenAPI document's
    /// `servers`: `http.public_url`, or else `http://<http.listen>`.
    pub fn api_servers(&self) -> Vec<String> {
        let url = if self.http.public_url.is_empty() {
            format!("http://{}", self.http.listen)
        } else {
            self.http.public_url.trim_end_matches('/').to_owned()
        };
        vec![url]
    }

    /// The admin API's auth settings, or None when no secret is configured.
    pub fn admin_auth(&self) -> Option<outbox_admin::AuthConfig> {
        let ad = &self.admin;
        let mut auth =
            outbox_admin::AuthConfig::new(ad.jwt_secret.expose().as_bytes().to_vec()).ok()?;
        auth.token_ttl = Duration::from_secs(ad.token_ttl_secs);
        let previous = ad.jwt_previous_secret.expose();
        if !previous.is_empty() {
            // After the lifetime: the previous key is taken for one.
            auth = auth.with_previous_secret(previous.as_bytes()).ok()?;
        }
        auth.secure_cookies = ad.secure_cookies;
        auth.throttle = outbox_admin::auth::ThrottleConfig {
            free_per_account: ad.login_limit_per_account,
            free_per_address: ad.login_limit_per_address,
            free_per_pair: ad.login_limit_per_pair,
            base_delay: Duration::from_millis(ad.login_delay_base_ms),
            max_delay: Duration::from_secs(ad.login_delay_max_secs),
            window: Duration::from_secs(ad.login_window_secs),
        };
        auth.trusted_proxies = ad
            .trusted_proxies
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect();
        Some(auth)
    }
}
