//! Layered, validated configuration: `config/default.toml` (also embedded) →
//! `config/<env>.toml` → `OUTBOXD_*` environment variables → `DATABASE_URL`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Toml};
use serde::{Deserialize, Serialize};

/// The base layer, compiled in so the binary runs outside the repository.
const EMBEDDED_DEFAULT: &str = include_str!("../../../config/default.toml");

/// Environment variables with the `OUTBOXD_` prefix that are not settings.
const NOT_SETTINGS: &[&str] = &["env", "config_dir"];

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be read or a value has the wrong type or an unknown key.
    #[error("invalid configuration: {0}")]
    Load(String),
    /// A value is outside its accepted range.
    #[error("invalid configuration: {key} = {value} {problem}; accepted: {accepted}{env_hint}")]
    Range {
        /// The key, dotted (`dispatcher.batch_size`).
        key: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        problem: &'static str,
        /// The accepted range or form.
        accepted: String,
        /// The environment variable that sets this key.
        env_hint: String,
    },
}

/// A string that never prints (passwords, secrets).
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

/// What a secret prints as: whether it is set, never its value.
impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "[redacted]" })
    }
}

impl Secret {
    /// The secret itself; call it only where the value is used.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"[redacted]\"")
    }
}

/// All settings. See `config/default.toml` for what each one does.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Settings {
    pub max_trigger_depth: u32,
    pub trigger_retry_max_attempts: u32,
    pub trigger_retry_base_ms: u64,
    pub trigger_retry_max_ms: u64,
    pub dead_letter_retention_days: u32,
    pub abandoned_executions_retention_days: u32,
    pub database: DatabaseSettings,
    pub dispatcher: DispatcherSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    pub nats: NatsSettings,
    pub consumer: ConsumerSettings,
    pub admin: AdminSettings,
    pub gc: GcSettings,
    pub webhook: WebhookSettings,
}

/// `[webhook]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct WebhookSettings {
    pub secret: Secret,
    pub timeout_ms: u64,
}

/// `[gc]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct GcSettings {
    pub schedule: String,
    pub batch: u32,
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct AdminSettings {
    pub jwt_secret: Secret,
    pub token_ttl_secs: u64,
    pub secure_cookies: bool,
    pub login_limit_per_account: u32,
    pub login_limit_per_address: u32,
    pub login_limit_per_pair: u32,
    pub login_delay_base_ms: u64,
    pub login_delay_max_secs: u64,
    pub login_window_secs: u64,
}

/// `[consumer]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct ConsumerSettings {
    pub group: String,
    pub subjects: Vec<String>,
    pub ack_wait_ms: u64,
    pub max_deliver: u32,
    pub concurrency: u32,
    pub nak_base_ms: u64,
    pub nak_max_ms: u64,
    pub dedupe_ttl_secs: u64,
    pub mask_fields: Vec<String>,
}

/// `[nats]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct NatsSettings {
    pub url: String,
    pub relay_unhandled: bool,
    pub subject_template: String,
    pub ack_timeout_ms: u64,
    pub stream: StreamSettings,
}

/// `[nats.stream]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct StreamSettings {
    pub name: String,
    pub subjects: Vec<String>,
    pub retention: String,
    pub storage: String,
    pub replicas: u32,
    pub max_age_secs: u64,
    pub max_bytes: i64,
    pub max_msgs: i64,
    pub duplicate_window_secs: u64,
}

/// `[database]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct DatabaseSettings {
    pub url: Secret,
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
    pub idle_in_transaction_timeout_ms: u64,
    pub auto_migrate: bool,
}

/// `[dispatcher]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct DispatcherSettings {
    pub worker_id: String,
    pub batch_size: u32,
    pub concurrency: u32,
    pub claimers: u32,
    pub poll_interval_ms: u64,
    pub lease_ms: u64,
    pub handler_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub drain_grace_ms: u64,
    pub in_transaction: bool,
}

/// `[http]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct HttpSettings {
    pub listen: String,
    pub max_body_bytes: u64,
    pub public_url: String,
    pub metrics_sample_secs: u64,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct LogSettings {
    pub filter: String,
    pub format: String,
}

impl Settings {
    /// Loads the layers from `config_dir` for `env` and the process environment,
    /// then validates.
    pub fn load(config_dir: &Path, env: Option<&str>) -> Result<Self, ConfigError> {
        Self::load_from(config_dir, env, std::env::vars())
    }

    /// Like [`Settings::load`] with an explicit environment (for tests).
    pub fn load_from(
        config_dir: &Path,
        env: Option<&str>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        let mut figment = Figment::from(Toml::string(EMBEDDED_DEFAULT));
        let default_file = config_dir.join("default.toml");
        if default_file.is_file() {
            figment = figment.merge(Toml::file(&default_file));
        }
        if let Some(env) = env.filter(|e| !e.is_empty()) {
            let overlay: PathBuf = config_dir.join(format!("{env}.toml"));
            if !overlay.is_file() {
                let shown = std::path::absolute(&overlay).unwrap_or(overlay);
                return Err(ConfigError::Load(format!(
                    "environment overlay {} does not exist (--env / OUTBOXD_ENV = {env:?} is looked up in --config-dir / OUTBOXD_CONFIG_DIR = {})",
                    shown.display(),
                    config_dir.display()
                )));
            }
            figment = figment.merge(Toml::file(&overlay));
        }
        for (key, value) in vars.iter() {
            let Some(rest) = key.strip_prefix("OUTBOXD_") else {
                continue;
            };
            let rest = rest.to_ascii_lowercase();
            if NOT_SETTINGS.contains(&rest.as_str()) {
                continue;
            }
            let path = rest.replace("__", ".");
            figment = figment.merge((path, parse_env_value(value)));
        }
        if let Some((_, url)) = vars.iter().find(|(k, _)| k == "DATABASE_URL") {
            figment = figment.merge(("database.url", url.clone()));
        }
        if let Some((_, secret)) = vars.iter().find(|(k, _)| k == "JWT_SECRET") {
            figment = figment.merge(("admin.jwt_secret", secret.clone()));
        }
        if let Some((_, url)) = vars.iter().find(|(k, _)| k == "NATS_URL") {
            figment = figment.merge(("nats.url", url.clone()));
        }
        let settings: Settings = figment
            .extract()
            .map_err(|e| ConfigError::Load(describe_figment_error(e)))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Range checks; every failure names the key and what is accepted.
    pub fn validate(&self) -> Result<(), ConfigError> {
        range("max_trigger_depth", self.max_trigger_depth as u64, 1, 64)?;
        range(
            "trigger_retry_max_attempts",
            self.trigger_retry_max_attempts as u64,
            1,
            1000,
        )?;
        range(
            "trigger_retry_base_ms",
            self.trigger_retry_base_ms,
            1,
            3_600_000,
        )?;
        range(
            "trigger_retry_max_ms",
            self.trigger_retry_max_ms,
            self.trigger_retry_base_ms,
            86_400_000,
        )?;
        range(
            "dead_letter_retention_days",
            self.dead_letter_retention_days as u64,
            1,
            3650,
        )?;
        range(
            "abandoned_executions_retention_days",
            self.abandoned_executions_retention_days as u64,
            1,
            3650,
        )?;
        let db = &self.database;
        range(
            "database.max_connections",
            db.max_connections as u64,
            2,
            1000,
        )?;
        range(
            "database.acquire_timeout_ms",
            db.acquire_timeout_ms,
            100,
            600_000,
        )?;
        range(
            "database.idle_in_transaction_timeout_ms",
            db.idle_in_transaction_timeout_ms,
            1000,
            3_600_000,
        )?;
        let url = db.url.expose();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError::Range {
                key: "database.url",
                value: "(hidden)".into(),
                problem: "is not a PostgreSQL URL",
                accepted: "postgres://user[:password]@host[:port]/database".into(),
                env_hint: " (env DATABASE_URL)".into(),
            });
        }
        let d = &self.dispatcher;
        range("dispatcher.batch_size", d.batch_size as u64, 1, 10_000)?;
        range("dispatcher.concurrency", d.concurrency as u64, 1, 100_000)?;
        range("dispatcher.claimers", d.claimers as u64, 1, 16)?;
        range(
            "dispatcher.poll_interval_ms",
            d.poll_interval_ms,
            10,
            600_000,
        )?;
        range("dispatcher.lease_ms", d.lease_ms, 1000, 86_400_000)?;
        if d.heartbeat_interval_ms == 0 {
            // Without a heartbeat nothing extends a lease: a handler must
            // finish (or time out) before its lease runs out.
            below_lease(
                "dispatcher.handler_timeout_ms",
                d.handler_timeout_ms,
                10,
                d.lease_ms,
            )?;
        } else {
            range(
                "dispatcher.handler_timeout_ms",
                d.handler_timeout_ms,
                10,
                86_400_000,
            )?;
            below_lease(
                "dispatcher.heartbeat_interval_ms",
                d.heartbeat_interval_ms,
                100,
                d.lease_ms,
            )?;
        }
        range("dispatcher.drain_grace_ms", d.drain_grace_ms, 0, 3_600_000)?;
        if self.http.listen.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::Range {
                key: "http.listen",
                value: format!("{:?}", self.http.listen),
                problem: "is not a socket address",
                accepted: "host:port with an IP host, e.g. 127.0.0.1:8080".into(),
                env_hint: env_hint("http.listen"),
            });
        }
        self.validate_nats()?;
        if let Err(err) =
            outbox_core::store::triggers::next_tick(&self.gc.schedule, chrono::Utc::now())
        {
            return Err(ConfigError::Range {
                key: "gc.schedule",
                value: format!("{:?}", self.gc.schedule),
                problem: "is not a cron expression",
                accepted: format!("5 or 6 cron fields, e.g. \"0 */10 * * * *\" ({err})"),
                env_hint: env_hint("gc.schedule"),
            });
        }
        range("gc.batch", self.gc.batch as u64, 1, 100_000)?;
        range("webhook.timeout_ms", self.webhook.timeout_ms, 100, 600_000)?;
        let ad = &self.admin;
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
                env_hint: " (env JWT_SECRET)".into(),
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
        range(
            "http.max_body_bytes",
            self.http.max_body_bytes,
            1024,
            64 * 1024 * 1024,
        )?;
        let cs = &self.consumer;
        range("consumer.ack_wait_ms", cs.ack_wait_ms, 1000, 3_600_000)?;
        range("consumer.max_deliver", cs.max_deliver as u64, 1, 1000)?;
        range("consumer.concurrency", cs.concurrency as u64, 1, 10_000)?;
        range("consumer.nak_base_ms", cs.nak_base_ms, 1, 3_600_000)?;
        range(
            "consumer.nak_max_ms",
            cs.nak_max_ms,
            cs.nak_base_ms,
            86_400_000,
        )?;
        range("consumer.dedupe_ttl_secs", cs.dedupe_ttl_secs, 0, 2_592_000)?;
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(ConfigError::Range {
                key: "log.format",
                value: format!("{:?}", self.log.format),
                problem: "is not a known format",
                accepted: "\"text\" or \"json\"".into(),
                env_hint: env_hint("log.format"),
            });
        }
        Ok(())
    }

    fn validate_nats(&self) -> Result<(), ConfigError> {
        let n = &self.nats;
        let invalid = |key: &'static str, value: String, problem: &'static str, accepted: &str| {
            Err(ConfigError::Range {
                key,
                value,
                problem,
                accepted: accepted.to_owned(),
                env_hint: env_hint(key),
            })
        };
        if !(n.url.is_empty() || n.url.starts_with("nats://") || n.url.starts_with("tls://")) {
            return invalid(
                "nats.url",
                format!("{:?}", n.url),
                "is not a NATS URL",
                "nats://host:port, or empty to disable",
            );
        }
        if !n.subject_template.contains("{topic}") {
            return invalid(
                "nats.subject_template",
                format!("{:?}", n.subject_template),
                "lacks {topic}",
                "a subject with {app} and {topic}, e.g. tenant.{app}.{topic}",
            );
        }
        range("nats.ack_timeout_ms", n.ack_timeout_ms, 100, 600_000)?;
        let st = &n.stream;
        if st.name.is_empty() || st.name.contains(['.', ' ', '*', '>']) {
            return invalid(
                "nats.stream.name",
                format!("{:?}", st.name),
                "is not a stream name",
                "a non-empty name without '.', ' ', '*' or '>'",
            );
        }
        if st.subjects.is_empty() {
            return invalid(
                "nats.stream.subjects",
                "[]".into(),
                "is empty",
                "at least one subject, e.g. [\"tenant.>\"]",
            );
        }
        if !matches!(st.retention.as_str(), "limits" | "interest" | "workqueue") {
            return invalid(
                "nats.stream.retention",
                format!("{:?}", st.retention),
                "is unknown",
                "\"limits\", \"interest\" or \"workqueue\"",
            );
        }
        if !matches!(st.storage.as_str(), "file" | "memory") {
            return invalid(
                "nats.stream.storage",
                format!("{:?}", st.storage),
                "is unknown",
                "\"file\" or \"memory\"",
            );
        }
        range("nats.stream.replicas", st.replicas as u64, 1, 5)?;
        range(
            "nats.stream.duplicate_window_secs",
            st.duplicate_window_secs,
            1,
            604_800,
        )?;
        if st.max_bytes < -1 || st.max_msgs < -1 {
            return invalid(
                "nats.stream.max_bytes",
                format!("{} / max_msgs {}", st.max_bytes, st.max_msgs),
                "is negative",
                "-1 (no limit) or a positive number",
            );
        }
        Ok(())
    }

    /// The stream contract from `[nats.stream]`.
    pub fn stream_contract(&self) -> outbox_nats::StreamContract {
        use async_nats::jetstream::stream::{RetentionPolicy, StorageType};
        let st = &self.nats.stream;
        outbox_nats::StreamContract {
            name: st.name.clone(),
            subjects: st.subjects.clone(),
            retention: match st.retention.as_str() {
                "interest" => RetentionPolicy::Interest,
                "workqueue" => RetentionPolicy::WorkQueue,
                _ => RetentionPolicy::Limits,
            },
            storage: if st.storage == "memory" {
                StorageType::Memory
            } else {
                StorageType::File
            },
            replicas: st.replicas as usize,
            max_age: Duration::from_secs(st.max_age_secs),
            max_bytes: st.max_bytes,
            max_messages: st.max_msgs,
            duplicate_window: Duration::from_secs(st.duplicate_window_secs),
        }
    }

    /// The effective configuration as TOML, secrets shown only as set or
    /// not, the database URL without its password.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        let mut value = toml::Value::try_from(self)
            .map_err(|e| ConfigError::Load(format!("printing the configuration: {e}")))?;
        if let Some(db) = value
            .get_mut("database")
            .and_then(toml::Value::as_table_mut)
        {
            db.insert(
                "url".into(),
                toml::Value::String(crate::redact_url(self.database.url.expose())),
            );
        }
        toml::to_string_pretty(&value)
            .map_err(|e| ConfigError::Load(format!("printing the configuration: {e}")))
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
        auth.secure_cookies = ad.secure_cookies;
        auth.throttle = outbox_admin::auth::ThrottleConfig {
            free_per_account: ad.login_limit_per_account,
            free_per_address: ad.login_limit_per_address,
            free_per_pair: ad.login_limit_per_pair,
            base_delay: Duration::from_millis(ad.login_delay_base_ms),
            max_delay: Duration::from_secs(ad.login_delay_max_secs),
            window: Duration::from_secs(ad.login_window_secs),
        };
        Some(auth)
    }

    /// The GC sweeper's settings in its own types.
    pub fn sweeper_config(&self) -> outbox_dispatch::maintenance::sweeper::SweeperConfig {
        outbox_dispatch::maintenance::sweeper::SweeperConfig {
            dead_letter_retention_days: self.dead_letter_retention_days,
            abandoned_executions_retention_days: self.abandoned_executions_retention_days,
            batch: i64::from(self.gc.batch),
            schedule: self.gc.schedule.clone(),
            ..Default::default()
        }
    }

    /// The consumer runtime's settings in its own types.
    pub fn consumer_config(&self) -> outbox_nats::ConsumerConfig {
        let cs = &self.consumer;
        outbox_nats::ConsumerConfig {
            stream: self.nats.stream.name.clone(),
            durable: outbox_nats::durable_name("consume", &cs.group),
            filter_subjects: cs.subjects.clone(),
            ack_wait: Duration::from_millis(cs.ack_wait_ms),
            max_deliver: i64::from(cs.max_deliver),
            concurrency: cs.concurrency as usize,
            batch: (cs.concurrency as usize).min(256),
            nak_base: Duration::from_millis(cs.nak_base_ms),
            nak_max: Duration::from_millis(cs.nak_max_ms),
            dedupe_ttl: (cs.dedupe_ttl_secs > 0).then(|| Duration::from_secs(cs.dedupe_ttl_secs)),
            mask_fields: cs.mask_fields.clone(),
            ..outbox_nats::ConsumerConfig::default()
        }
    }

    /// The dispatcher's settings in its own types.
    pub fn dispatcher_config(&self) -> outbox_dispatch::Config {
        let d = &self.dispatcher;
        let mut config = outbox_dispatch::Config {
            batch_size: d.batch_size,
            concurrency: d.concurrency as usize,
            claimers: d.claimers as usize,
            poll_interval: Duration::from_millis(d.poll_interval_ms),
            lease: Duration::from_millis(d.lease_ms),
            handler_timeout: Duration::from_millis(d.handler_timeout_ms),
            heartbeat_interval: Duration::from_millis(d.heartbeat_interval_ms),
            drain_grace: Duration::from_millis(d.drain_grace_ms),
            retry: outbox_dispatch::RetryPolicy {
                max_attempts: self.trigger_retry_max_attempts,
                base: Duration::from_millis(self.trigger_retry_base_ms),
                max: Duration::from_millis(self.trigger_retry_max_ms),
                jitter: true,
            },
            max_trigger_depth: self.max_trigger_depth,
            in_transaction: d.in_transaction,
            ..outbox_dispatch::Config::default()
        };
        if !d.worker_id.is_empty() {
            config.worker_id = d.worker_id.clone();
        }
        config
    }
}

/// Environment values are typed like TOML: numbers and booleans parse, the
/// rest stays a string.
fn parse_env_value(raw: &str) -> figment::value::Value {
    use figment::value::Value;
    let trimmed = raw.trim();
    if let Ok(n) = trimmed.parse::<u64>() {
        return Value::from(n);
    }
    if let Ok(n) = trimmed.parse::<i64>() {
        return Value::from(n);
    }
    match trimmed {
        "true" => Value::from(true),
        "false" => Value::from(false),
        _ => Value::from(raw.to_owned()),
    }
}

fn env_hint(key: &str) -> String {
    let var = match key.split_once('.') {
        Some((section, k)) => format!("OUTBOXD_{}__{}", section, k),
        None => format!("OUTBOXD_{key}"),
    };
    format!(" (env {})", var.to_ascii_uppercase())
}

fn range(key: &'static str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    Err(ConfigError::Range {
        key,
        value: value.to_string(),
        problem: if value < min {
            "is too small"
        } else {
            "is too large"
        },
        accepted: format!("{min}..={max}"),
        env_hint: env_hint(key),
    })
}

/// Like [`range`] with `lease_ms - 1` as the maximum, but the refusal says
/// where that maximum comes from: it may be `lease_ms` that was just set.
fn below_lease(key: &'static str, value: u64, min: u64, lease_ms: u64) -> Result<(), ConfigError> {
    range(key, value, min, lease_ms - 1).map_err(|err| match err {
        ConfigError::Range {
            key,
            value,
            problem,
            env_hint,
            ..
        } => ConfigError::Range {
            key,
            value,
            problem,
            accepted: format!(
                "{min}..={}, shorter than dispatcher.lease_ms = {lease_ms}",
                lease_ms - 1
            ),
            env_hint,
        },
        other => other,
    })
}

fn describe_figment_error(err: figment::Error) -> String {
    err.into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let mut line = if key.is_empty() {
                e.kind.to_string()
            } else {
                format!("{key}: {}", e.kind)
            };
            if !key.is_empty() {
                line.push_str(&env_hint(&key));
            }
            line
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load_from(
            Path::new("../../config"),
            None,
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults_are_valid() {
        let s = load(&[]).expect("default config");
        assert_eq!(s.dispatcher.batch_size, 500);
        assert!(s.dispatcher_config().validate().is_ok());
    }

    #[test]
    fn env_overrides_flat_and_nested_keys() {
        let s = load(&[
            ("OUTBOXD_TRIGGER_RETRY_MAX_ATTEMPTS", "5"),
            ("OUTBOXD_DISPATCHER__BATCH_SIZE", "7"),
            ("OUTBOXD_ENV", "ignored-here"),
            ("DATABASE_URL", "postgres://x@127.0.0.1:1/db"),
        ])
        .expect("config");
        assert_eq!(s.trigger_retry_max_attempts, 5);
        assert_eq!(s.dispatcher.batch_size, 7);
        assert_eq!(s.database.url.expose(), "postgres://x@127.0.0.1:1/db");
    }

    #[test]
    fn out_of_range_names_key_range_and_env() {
        let err = load(&[("OUTBOXD_MAX_TRIGGER_DEPTH", "0")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_trigger_depth = 0"), "{err}");
        assert!(err.contains("1..=64"), "{err}");
        assert!(err.contains("OUTBOXD_MAX_TRIGGER_DEPTH"), "{err}");
    }

    #[test]
    fn a_lease_shorter_than_the_heartbeat_is_named_in_the_refusal() {
        let err = load(&[("OUTBOXD_DISPATCHER__LEASE_MS", "1000")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("heartbeat_interval_ms = 10000"), "{err}");
        assert!(
            err.contains("shorter than dispatcher.lease_ms = 1000"),
            "{err}"
        );
    }

    #[test]
    fn wrong_type_names_key() {
        let err = load(&[("OUTBOXD_DISPATCHER__BATCH_SIZE", "lots")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("dispatcher.batch_size"), "{err}");
    }

    #[test]
    fn unknown_key_is_refused() {
        let err = load(&[("OUTBOXD_DISPATCHER__BACH_SIZE", "3")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("bach_size"), "{err}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]
        /// Any value for any setting loads or is refused with the key named.
        #[test]
        fn arbitrary_setting_values_are_named_refusals(
            key in proptest::sample::select(vec![
                "OUTBOXD_DISPATCHER__BATCH_SIZE",
                "OUTBOXD_DISPATCHER__LEASE_MS",
                "OUTBOXD_DISPATCHER__HEARTBEAT_INTERVAL_MS",
                "OUTBOXD_TRIGGER_RETRY_MAX_ATTEMPTS",
                "OUTBOXD_HTTP__LISTEN",
                "OUTBOXD_NATS__STREAM__RETENTION",
                "OUTBOXD_GC__SCHEDULE",
                "OUTBOXD_LOG__FORMAT",
                "OUTBOXD_CONSUMER__MAX_DELIVER",
            ]),
            value in ".{0,20}|-?[0-9]{1,22}",
        ) {
            if let Err(err) = load(&[(key, value.as_str())]) {
                let text = err.to_string().to_lowercase();
                let section_key = key
                    .trim_start_matches("OUTBOXD_")
                    .replace("__", ".")
                    .to_lowercase();
                let leaf = section_key.rsplit('.').next().unwrap_or_default().to_owned();
                proptest::prop_assert!(text.contains(&leaf), "{key}={value:?}: {err}");
            }
        }
    }

    #[test]
    fn the_reference_lists_every_setting() {
        use figment::value::Value;
        fn flatten(prefix: &str, value: &Value, out: &mut std::collections::BTreeSet<String>) {
            match value {
                Value::Dict(_, dict) => {
                    for (k, v) in dict {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        flatten(&key, v, out);
                    }
                }
                _ => {
                    out.insert(prefix.to_owned());
                }
            }
        }
        let defaults: Value = Figment::from(Toml::string(EMBEDDED_DEFAULT))
            .extract()
            .expect("the embedded defaults parse");
        let mut keys = std::collections::BTreeSet::new();
        flatten("", &defaults, &mut keys);
        let reference = include_str!("../../../docs/configuration.md");
        let documented: std::collections::BTreeSet<String> = reference
            .lines()
            .filter_map(|l| l.strip_prefix("| `")?.split('`').next().map(str::to_owned))
            .collect();
        assert_eq!(
            keys, documented,
            "config/default.toml (left) and docs/configuration.md (right) differ: run python3 scripts/config-reference.py"
        );
    }

    #[test]
    fn handler_timeout_must_be_below_lease_without_heartbeat() {
        let err = load(&[
            ("OUTBOXD_DISPATCHER__LEASE_MS", "5000"),
            ("OUTBOXD_DISPATCHER__HEARTBEAT_INTERVAL_MS", "0"),
            ("OUTBOXD_DISPATCHER__HANDLER_TIMEOUT_MS", "5000"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("dispatcher.handler_timeout_ms"), "{err}");
        assert!(err.contains("10..=4999"), "{err}");
    }

    #[test]
    fn heartbeat_lets_handler_timeout_exceed_lease() {
        let settings = load(&[
            ("OUTBOXD_DISPATCHER__LEASE_MS", "5000"),
            ("OUTBOXD_DISPATCHER__HEARTBEAT_INTERVAL_MS", "1000"),
            ("OUTBOXD_DISPATCHER__HANDLER_TIMEOUT_MS", "7500"),
        ])
        .expect("valid");
        assert_eq!(
            settings.dispatcher_config().handler_timeout,
            Duration::from_millis(7500)
        );
    }

    #[test]
    fn short_jwt_secret_is_refused_with_its_length_not_its_value() {
        let err = load(&[("JWT_SECRET", "too-short-secret")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("admin.jwt_secret")
                && err.contains("16 bytes")
                && err.contains("at least 32"),
            "{err}"
        );
        assert!(!err.contains("too-short-secret"), "{err}");
        let ok = load(&[("JWT_SECRET", "0123456789abcdef0123456789abcdef")]).expect("32 bytes");
        assert!(ok.admin_auth().is_some());
        assert!(!format!("{ok:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn secrets_do_not_print() {
        let s = load(&[("DATABASE_URL", "postgres://u:hunter2@127.0.0.1/db")]).expect("config");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn missing_overlay_is_an_error() {
        let err = Settings::load_from(Path::new("../../config"), Some("nope"), Vec::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope.toml"), "{err}");
    }
}
