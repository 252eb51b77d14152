//! What every outboxd binary does before its command runs (`outboxd`, the
//! benchmark, the chaos worker): read `--config-dir` and `--env`, load and
//! check the settings, install logging, start the runtime, and report an
//! error as one line and an exit status.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::Settings;

/// The command-line options that choose the configuration.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// Folder with default.toml and the environment overlays.
    #[arg(
        long,
        env = "OUTBOXD_CONFIG_DIR",
        default_value = "config",
        global = true
    )]
    pub config_dir: PathBuf,
    /// Environment overlay to apply (`config/<ENV>.toml`).
    #[arg(long, env = "OUTBOXD_ENV", global = true)]
    pub env: Option<String>,
}

/// Loads the settings `config` chooses and runs `command` with them on a
/// multi-threaded runtime. A configuration error exits with status 2, any
/// other error with 1; both print one line prefixed with `program`.
pub fn launch<F, Fut>(program: &str, config: &ConfigArgs, command: F) -> ExitCode
where
    F: FnOnce(Settings) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let settings = match Settings::load(&config.config_dir, config.env.as_deref()) {
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
            eprintln!("{program}: {err:#}");
            ExitCode::FAILURE
        }
    }
}
