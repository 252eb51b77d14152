//! What every outboxd binary does before its command runs (`outboxd`, the
//! benchmark, the chaos worker): read `--config-dir` and `--env`, load and
//! check the settings, install logging, start the runtime, and report an
//! error as one line and an exit status.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::Settings;

/// The command-line options that choose the configuration. Each falls back
/// to its environment variable, read here rather than by clap: clap counts
/// a value from the environment as given, and its usage lines then showed
/// `--env <ENV>` as if every command required it.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// Folder with default.toml and the environment overlays [env:
    /// OUTBOXD_CONFIG_DIR] [default: config, when it exists; the built-in
    /// defaults otherwise].
    #[arg(long, global = true)]
    pub config_dir: Option<PathBuf>,
    /// Environment overlay to apply (`config/<ENV>.toml`) [env: OUTBOXD_ENV].
    #[arg(long, global = true)]
    pub env: Option<String>,
}

impl ConfigArgs {
    /// The folder given by `--config-dir`, else by `OUTBOXD_CONFIG_DIR`
    /// (unset when empty).
    fn config_dir(&self) -> Option<PathBuf> {
        self.config_dir.clone().or_else(|| {
            std::env::var_os("OUTBOXD_CONFIG_DIR")
                .filter(|dir| !dir.is_empty())
                .map(PathBuf::from)
        })
    }

    /// The overlay given by `--env`, else by `OUTBOXD_ENV` (unset when
    /// empty); an `OUTBOXD_ENV` that is not UTF-8 is an error, not a
    /// silent fall back to the base settings.
    fn env(&self) -> Result<Option<String>, String> {
        if let Some(env) = &self.env {
            return Ok(Some(env.clone()));
        }
        match std::env::var_os("OUTBOXD_ENV") {
            None => Ok(None),
            Some(env) if env.is_empty() => Ok(None),
            Some(env) => env
                .into_string()
                .map(Some)
                .map_err(|env| format!("OUTBOXD_ENV {env:?} is not UTF-8")),
        }
    }
}

/// Loads the settings `config` chooses and runs `command` with them on a
/// multi-threaded runtime. A configuration error exits with status 2, any
/// other error with 1; both print one line prefixed with `program`.
pub fn launch<F, Fut>(program: &str, config: &ConfigArgs, command: F) -> ExitCode
where
    F: FnOnce(Settings) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    // A folder named on purpose must exist: a typo would silently run on
    // the built-in defaults.
    let chosen_dir = config.config_dir();
    if let Some(dir) = chosen_dir.as_deref().filter(|d| !d.is_dir()) {
        let shown = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
        eprintln!(
            "{program}: invalid configuration: --config-dir / OUTBOXD_CONFIG_DIR {} is not a folder",
            shown.display()
        );
        return ExitCode::from(2);
    }
    let config_dir = chosen_dir.unwrap_or_else(|| PathBuf::from("config"));
    let env = match config.env() {
        Ok(env) => env,
        Err(err) => {
            eprintln!("{program}: invalid configuration: {err}");
            return ExitCode::from(2);
        }
    };
    let settings = match Settings::load(&config_dir, env.as_deref()) {
        Ok(s) => s,
        Err(err) => {
            eprintln!("{program}: {err}");
            return ExitCode::from(2);
        }
    };
    crate::logging::init_tracing(&settings);
    crate::logging::log_panics();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("{program}: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{program}: {}", error_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each said once: a library often
/// repeats its source's words in its own message.
pub fn error_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    // 42P01 undefined_table, 42883 undefined_function: outboxd's own tables
    // and functions are missing, so the database has not been migrated.
    let unmigrated = err.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .and_then(sqlx::Error::as_database_error)
            .and_then(|db| db.code())
            .is_some_and(|code| code == "42P01" || code == "42883")
    });
    if unmigrated {
        line.push_str(" (has the database been migrated? run `outboxd migrate`)");
    }
    // What a transaction-pooling PgBouncer answers a client that expects a
    // server of its own: it refuses sqlx's start-up parameter, or hands a
    // session's prepared statements to another.
    if line.contains("unsupported startup parameter")
        || (line.contains("prepared statement \"") && line.contains("already exists"))
    {
        line.push_str(
            " (is DATABASE_URL a PgBouncer? set database.pooler = \"transaction\" for commands that can go through one, and give `outboxd run`, `migrate` and `gc` a direct connection: docs/operations.md, \"Behind PgBouncer\")",
        );
    }
    line
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_from_a_pooler_says_so() {
        for message in [
            "error returned from database: unsupported startup parameter: extra_float_digits",
            "error returned from database: prepared statement \"sqlx_s_1\" already exists",
        ] {
            let err = anyhow::anyhow!("{message}").context("migrating");
            assert!(
                super::error_line(&err).contains("is DATABASE_URL a PgBouncer?"),
                "{message}"
            );
        }
    }

    #[test]
    fn an_error_line_says_each_cause_once() {
        let err = anyhow::anyhow!("database \"x\" does not exist")
            .context("database \"x\" does not exist")
            .context("cannot connect to PostgreSQL at postgres://u@h/x");
        assert_eq!(
            super::error_line(&err),
            "cannot connect to PostgreSQL at postgres://u@h/x: database \"x\" does not exist"
        );
        // A cause that only appears inside an earlier message is still said.
        let err = anyhow::anyhow!("timed out").context("connecting to h timed out after 5 s");
        assert_eq!(
            super::error_line(&err),
            "connecting to h timed out after 5 s: timed out"
        );
    }
}
