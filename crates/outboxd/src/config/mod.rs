//! Layered, validated configuration: `config/default.toml` (also embedded) →
//! `config/<env>.toml` → `OUTBOXD_*` environment variables → `DATABASE_URL`.
//!
//! Each section lives next to the checks and the conversion for the
//! component it configures: `database` (the pool and the connection
//! budget), `dispatcher` (claiming, retries, webhook targets), `nats`
//! (relay, stream contract, consumer runtime), `admin` (HTTP endpoints,
//! admin API, sign-in), `gc` (retention and the sweeper).

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Toml};
use serde::{Deserialize, Serialize};

/// The base layer, compiled in so the binary runs outside the repository.
const EMBEDDED_DEFAULT: &str = include_str!("../../../../config/default.toml");

/// Environment variables with the `OUTBOXD_` prefix that are not settings:
/// the command line's own, and the knobs of the repository's scripts, which
/// the README has users export.
const NOT_SETTINGS: &[&str] = &[
    "env",
    "config_dir",
    "bin",
    "state_dir",
    "http_port",
    "pid",
    "url",
];

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

mod admin;
mod database;
mod dispatcher;
mod gc;
mod nats;
#[cfg(test)]
mod tests;

pub use admin::{AdminSettings, HttpSettings};
pub use database::{DatabaseSettings, Pooler};
pub use dispatcher::{DispatcherSettings, WebhookSettings};
pub use gc::GcSettings;
pub use nats::{ConsumerSettings, NatsSettings, StreamSettings};

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
    pub audit_log_retention_days: u32,
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
            // `OUTBOXD_` alone would set the whole configuration to its value.
            if rest.is_empty() || rest.split("__").any(str::is_empty) {
                return Err(ConfigError::Load(format!(
                    "{key} names no setting: a setting is OUTBOXD_<KEY>, a key of a section OUTBOXD_<SECTION>__<KEY> (config/default.toml lists them)"
                )));
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
        if let Some((_, secret)) = vars.iter().find(|(k, _)| k == "JWT_PREVIOUS_SECRET") {
            figment = figment.merge(("admin.jwt_previous_secret", secret.clone()));
        }
        if let Some((_, url)) = vars.iter().find(|(k, _)| k == "NATS_URL") {
            figment = figment.merge(("nats.url", url.clone()));
        }
        let settings: Settings = figment
            .extract()
            .map_err(|e| ConfigError::Load(describe_figment_error(e)))?;
        settings.validate().map_err(|e| e.placed(&figment))?;
        Ok(settings)
    }

    /// Range checks, section by section; every failure names the key and
    /// what is accepted.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_dispatcher()?;
        self.validate_retention()?;
        self.validate_database()?;
        self.validate_listen()?;
        self.validate_nats()?;
        self.validate_gc()?;
        self.validate_webhook()?;
        self.validate_admin()?;
        self.validate_http()?;
        self.validate_consumer()?;
        self.validate_log()
    }

    /// `[log]`.
    pub(super) fn validate_log(&self) -> Result<(), ConfigError> {
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.log.filter) {
            return Err(ConfigError::Range {
                key: "log.filter",
                value: format!("{:?}", self.log.filter),
                problem: "is not a log filter",
                accepted: format!(
                    "directives such as \"info\" or \"info,outbox_dispatch=debug\" ({err})"
                ),
                env_hint: env_hint("log.filter"),
            });
        }
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

    /// The effective configuration as TOML, secrets shown only as set or
    /// not, the database and NATS URLs without their passwords.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        let mut value = toml::Value::try_from(self)
            .map_err(|e| ConfigError::Load(format!("printing the configuration: {e}")))?;
        if let Some(db) = value
            .get_mut("database")
            .and_then(toml::Value::as_table_mut)
        {
            db.insert(
                "url".into(),
                toml::Value::String(crate::db::redact_url(self.database.url.expose())),
            );
        }
        if let Some(nats) = value.get_mut("nats").and_then(toml::Value::as_table_mut) {
            let servers: Vec<String> = self
                .nats
                .url
                .split(',')
                .map(|url| crate::db::redact_url(url.trim()))
                .collect();
            nats.insert("url".into(), toml::Value::String(servers.join(",")));
        }
        toml::to_string_pretty(&value)
            .map_err(|e| ConfigError::Load(format!("printing the configuration: {e}")))
    }
}

/// Environment values are typed like TOML: numbers and booleans parse, a
/// value in brackets is a TOML array (e.g. `["orders.*", "billing.>"]`),
/// the rest stays a string.
fn parse_env_value(raw: &str) -> figment::value::Value {
    use figment::value::Value;
    let trimmed = raw.trim();
    if trimmed.starts_with('[') {
        let array = format!("v = {trimmed}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .and_then(|v| v.try_into::<Value>().ok());
        if let Some(array) = array {
            return array;
        }
    }
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

impl ConfigError {
    /// Names the file a key out of range was set in, when a file set it (the
    /// checks name the key's environment variable, which may not be set).
    fn placed(self, figment: &Figment) -> Self {
        match self {
            ConfigError::Range {
                key,
                value,
                problem,
                accepted,
                env_hint,
            } => {
                let file = figment
                    .find_metadata(key)
                    .and_then(|m| m.source.as_ref())
                    .and_then(figment::Source::file_path)
                    .map(|path| format!(" (set in {})", path.display()));
                ConfigError::Range {
                    key,
                    value,
                    problem,
                    accepted,
                    env_hint: file.unwrap_or(env_hint),
                }
            }
            other => other,
        }
    }
}

fn env_hint(key: &str) -> String {
    // Every level of a nested key is separated by `__` (`nats.stream.max_bytes`
    // is OUTBOXD_NATS__STREAM__MAX_BYTES).
    let var = format!("OUTBOXD_{}", key.replace('.', "__")).to_ascii_uppercase();
    // The short names that override these (see `load_from`).
    match key {
        "database.url" => format!(" (env DATABASE_URL or {var})"),
        "nats.url" => format!(" (env NATS_URL or {var})"),
        "admin.jwt_secret" => format!(" (env JWT_SECRET or {var})"),
        "admin.jwt_previous_secret" => format!(" (env JWT_PREVIOUS_SECRET or {var})"),
        _ => format!(" (env {var})"),
    }
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
            let kind = describe_kind(&e.kind);
            // The file the value (or the unreadable or unparsable text)
            // came from, when a file it was.
            let file = e
                .metadata
                .as_ref()
                .and_then(|m| m.source.as_ref())
                .and_then(figment::Source::file_path)
                .map(|path| path.display().to_string());
            match (key.is_empty(), file) {
                (true, Some(file)) => format!("{file}: {kind}"),
                (true, None) => kind,
                (false, Some(file)) => format!("{key}: {kind} (set in {file})"),
                (false, None) => format!("{key}: {kind}{}", env_hint(&key)),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether the configuration library's `expected` names an unsigned integer.
fn is_unsigned(expected: &str) -> bool {
    matches!(expected, "u8" | "u16" | "u32" | "u64" | "usize")
}

/// Whether the configuration library's `expected` names an integer.
fn is_integer(expected: &str) -> bool {
    is_unsigned(expected) || matches!(expected, "i8" | "i16" | "i32" | "i64" | "isize")
}

/// What the configuration library says about a value, in the words of
/// `config/default.toml` (which gives each key's range). A whole number
/// that does not fit the key's type is out of any range the key takes.
fn describe_kind(kind: &figment::error::Kind) -> String {
    use figment::error::{Actual, Kind};
    match kind {
        Kind::InvalidValue(Actual::Signed(n), expected) if *n < 0 && is_unsigned(expected) => {
            format!("got {n}, which is negative; config/default.toml gives the key's range")
        }
        Kind::InvalidValue(Actual::Unsigned(n), expected) if is_integer(expected) => {
            format!("got {n}, which is far too large; config/default.toml gives the key's range")
        }
        Kind::InvalidValue(Actual::Signed(n), expected) if is_integer(expected) => {
            format!(
                "got {n}, which is far too large or small; config/default.toml gives the key's range"
            )
        }
        // A whole number too long for any integer arrives as text.
        Kind::InvalidType(Actual::Str(text), expected)
            if is_integer(expected)
                && text
                    .strip_prefix('-')
                    .unwrap_or(text)
                    .bytes()
                    .all(|b| b.is_ascii_digit())
                && text.trim_start_matches('-').len() > 18 =>
        {
            format!(
                "got {text}, which is far too large or small; config/default.toml gives the key's range"
            )
        }
        Kind::InvalidType(_, expected) if expected.starts_with("struct ") => {
            "is a section of keys, not a value: set its keys one by one ([section] in a file, OUTBOXD_<SECTION>__<KEY> in the environment)".to_owned()
        }
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            let expected = match expected.as_str() {
                // Not "0 or more": most keys take a narrower range, which
                // config/default.toml gives.
                e if is_integer(e) => "a whole number (config/default.toml gives the key's range)",
                "f32" | "f64" => "a number",
                "a boolean" | "bool" => "true or false",
                "a string" | "a borrowed string" | "a character" => "text",
                "a sequence" => {
                    "a list such as [\"a\", \"b\"] (in an environment variable too: '[\"a\"]')"
                }
                other => other,
            };
            format!(
                "got {}, expected {expected}",
                actual.to_string().replace('`', "")
            )
        }
        Kind::UnknownField(field, known) => format!(
            "unknown key {field:?} (this section takes: {})",
            known.join(", ")
        ),
        other => other.to_string(),
    }
}
