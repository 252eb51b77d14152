//! `outboxd gc`: the GC sweeper once (for an external cron) or on its schedule.

use anyhow::Context;
use outbox_dispatch::maintenance::{Supervisor, Sweeper};

use outboxd::config::Settings;

/// Runs `outboxd gc [--once]`.
pub async fn run(settings: Settings, once: bool) -> anyhow::Result<()> {
    let pool = outboxd::db::connect(&settings, 0).await?;
    let sweeper = Sweeper::new(pool.clone(), settings.sweeper_config());
    if !once {
        if settings.gc_schedule().is_none() {
            anyhow::bail!(
                "gc.schedule is \"off\": run `outboxd gc --once` from your scheduler, or set a schedule"
            );
        }
        eprintln!(
            "outboxd gc: sweeping on gc.schedule {:?} until SIGTERM or Ctrl-C (--once sweeps once and exits)",
            settings.gc.schedule
        );
        Supervisor::new(pool)
            .without_leadership()
            .with(sweeper)
            .run(outboxd::daemon::shutdown_signal())
            .await;
        return Ok(());
    }
    let report = sweeper.run_once().await.context("gc sweep")?;
    println!(
        "deleted {} dead letters ({}), {} abandoned executions (older than {} days), {}, {} expired de-duplication records, {} lapsed login-throttle counts, {} expired sessions, {} stale invocation inboxes",
        report.dead_letters,
        match settings.dead_letter_retention_days {
            0 => "of apps with a retention of their own; dead_letter_retention_days = 0 keeps the others'".to_owned(),
            days => format!("older than {days} days, or an app's own retention"),
        },
        report.abandoned_executions,
        settings.abandoned_executions_retention_days,
        match settings.audit_log_retention_days {
            0 => "no audit-log entries (audit_log_retention_days = 0 keeps them all)".to_owned(),
            days => format!(
                "{} audit-log entries (older than {days} days)",
                report.audit_entries
            ),
        },
        report.processed_messages,
        report.login_counts,
        report.sessions,
        report.invocation_inboxes
    );
    Ok(())
}
