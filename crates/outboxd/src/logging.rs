//! Logging: the tracing subscriber as `[log]` configures it, and a panic
//! hook that logs a panic as one line.

use crate::config::Settings;

/// Installs the subscriber `settings.log` describes (text or JSON, on stderr).
pub fn init_tracing(settings: &Settings) {
    let mut filter = tracing_subscriber::EnvFilter::try_new(&settings.log.filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // PostgreSQL's notices ("relation … already exists, skipping" on every
    // migrate) are noise at info; a filter that names sqlx decides itself.
    if !settings.log.filter.contains("sqlx")
        && let Ok(directive) = "sqlx::postgres::notice=warn".parse()
    {
        filter = filter.add_directive(directive);
    }
    // The NATS client's own connection lines repeat outboxd's (which says
    // when a connection is lost and back), on every `stream tail` too.
    if !settings.log.filter.contains("async_nats")
        && let Ok(directive) = "async_nats=warn".parse()
    {
        filter = filter.add_directive(directive);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a person at a terminal, not in log files
        // (formatting them is also a measurable cost per dispatched event).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if settings.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Logs a panic as one error line (a panicking handler is a failed attempt,
/// not a crash).
pub fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        // The reader of our output went away (`outboxd … | head`): end as
        // a command killed by SIGPIPE does, without a panic report. (The
        // runtime ignores SIGPIPE, so printing fails instead.)
        if message.starts_with("failed printing to stdout") && message.contains("os error 32") {
            std::process::exit(141);
        }
        tracing::error!(%location, %message, "panic");
    }));
}
