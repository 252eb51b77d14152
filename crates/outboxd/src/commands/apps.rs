//! `outboxd app …`: apps (tenants), their suspension, replay policy and retention.

use clap::Subcommand;
use outbox_core::store::{apps, dead_letters};

use outboxd::config::Settings;

use super::topics::{cli_actor, cli_error};

/// `outboxd app …`.
#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// Create an app (or show the existing one with this slug).
    Create {
        /// URL-safe identifier: a-z, 0-9, '_' and '-'.
        slug: String,
        /// Display name (defaults to the slug).
        #[arg(long)]
        name: Option<String>,
    },
    /// List apps.
    List {
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Suspend an app: its outbox rows wait and its NATS messages are dead-lettered.
    Suspend {
        /// App slug.
        slug: String,
    },
    /// Resume a suspended app.
    Resume {
        /// App slug.
        slug: String,
    },
    /// Replay an app's dead letters automatically: after --delay-secs, doubling per round, --rounds times.
    ReplayPolicy {
        /// App slug.
        slug: String,
        /// Only this topic.
        #[arg(long)]
        topic: Option<String>,
        /// Only this source.
        #[arg(long)]
        source: Option<String>,
        /// Quarantine before the first replay, in seconds (1..=604800, a week).
        #[arg(long, allow_negative_numbers = true, value_parser = super::number_in(1u32, 604_800))]
        delay_secs: u32,
        /// Replays before the dead letter waits for an operator (1..=20).
        #[arg(long, allow_negative_numbers = true, value_parser = super::number_in(1u32, 20))]
        rounds: u32,
    },
    /// List an app's automatic replay policies.
    ReplayPolicies {
        /// App slug.
        slug: String,
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop replaying an app's dead letters automatically: remove the policy for exactly this --topic and --source (neither: the app-wide one).
    ReplayPolicyRemove {
        /// App slug.
        slug: String,
        /// The policy's topic.
        #[arg(long)]
        topic: Option<String>,
        /// The policy's source.
        #[arg(long)]
        source: Option<String>,
    },
    /// Show an app's own dead-letter retention, or set it in days (0 keeps them for good; "default" for the global setting).
    Retention {
        /// App slug.
        slug: String,
        /// Days (0..=3650; 0 keeps them for good) or "default"; without it, the retention is shown.
        #[arg(allow_negative_numbers = true)]
        days: Option<String>,
    },
}

/// Runs `outboxd app …`.
pub async fn run(settings: Settings, cmd: AppCommand) -> anyhow::Result<()> {
    let pool = outboxd::db::connect(&settings, 0).await?;
    match cmd {
        AppCommand::Create { slug, name } => {
            let name = name.unwrap_or_else(|| slug.clone());
            let app = apps::ensure(&pool, &slug, &name).await?;
            println!("{}\t{}", app.id, app.slug);
        }
        AppCommand::List { json } => {
            let listed = apps::list(&pool).await?;
            if json {
                println!("{}", serde_json::json!({ "items": listed }));
                return Ok(());
            }
            let mut table = super::Table::new(&["ID", "SLUG", "NAME", "STATE"]);
            for app in listed {
                let state = if app.suspended_at.is_some() {
                    "suspended"
                } else {
                    "active"
                };
                table.row(vec![
                    app.id.to_string(),
                    app.slug,
                    app.name,
                    state.to_owned(),
                ]);
            }
            table.print();
        }
        AppCommand::Suspend { slug } => {
            if suspend(&pool, &slug, true).await? {
                println!("{slug} suspended");
            } else {
                println!("{slug} was already suspended");
            }
        }
        AppCommand::Resume { slug } => {
            if suspend(&pool, &slug, false).await? {
                println!("{slug} resumed");
            } else {
                println!("{slug} was not suspended");
            }
        }
        AppCommand::ReplayPolicy {
            slug,
            topic,
            source,
            delay_secs,
            rounds,
        } => {
            let app = apps::by_slug(&pool, &slug).await?;
            let mut tx = pool.begin().await?;
            dead_letters::set_replay_policy(
                &mut *tx,
                app.id,
                source.as_deref(),
                topic.as_deref(),
                delay_secs,
                rounds,
            )
            .await?;
            let detail = serde_json::json!({
                "source": source, "topic": topic, "delay_secs": delay_secs, "rounds": rounds,
            });
            record(&mut tx, app.id, "app.replay_policy", detail).await?;
            tx.commit().await?;
            println!(
                "{slug}: dead letters replay after {delay_secs}s, doubling, {rounds} round(s)"
            );
        }
        AppCommand::ReplayPolicies { slug, json } => {
            let app = apps::by_slug(&pool, &slug).await?;
            let policies = dead_letters::replay_policies(&pool, app.id).await?;
            if json {
                println!("{}", serde_json::json!({ "items": policies }));
            } else if policies.is_empty() {
                println!("{slug}: no automatic replay");
            } else {
                println!(
                    "{:<24} {:<10} {:>10} {:>6}",
                    "TOPIC", "SOURCE", "DELAY_SECS", "ROUNDS"
                );
                for p in policies {
                    println!(
                        "{:<24} {:<10} {:>10} {:>6}",
                        p.topic.as_deref().unwrap_or("(any)"),
                        p.source.as_deref().unwrap_or("(any)"),
                        p.initial_delay_secs,
                        p.max_rounds
                    );
                }
            }
        }
        AppCommand::ReplayPolicyRemove {
            slug,
            topic,
            source,
        } => {
            let app = apps::by_slug(&pool, &slug).await?;
            let mut tx = pool.begin().await?;
            let removed = dead_letters::remove_replay_policy(
                &mut *tx,
                app.id,
                source.as_deref(),
                topic.as_deref(),
            )
            .await?;
            if !removed {
                anyhow::bail!(
                    "{slug} has no replay policy for topic {} and source {} (outboxd app replay-policies {slug} lists them)",
                    topic.as_deref().unwrap_or("(any)"),
                    source.as_deref().unwrap_or("(any)")
                );
            }
            let detail = serde_json::json!({ "source": source, "topic": topic });
            record(&mut tx, app.id, "app.replay_policy_remove", detail).await?;
            tx.commit().await?;
            println!("{slug}: automatic replay removed");
        }
        AppCommand::Retention { slug, days: None } => {
            let kept = outbox_core::store::retention::app_retention(&pool, &slug).await?;
            println!(
                "{slug}: dead letters kept {}",
                match kept {
                    None => "per the global setting (dead_letter_retention_days)".to_owned(),
                    Some(outbox_core::store::retention::KEEP_FOR_GOOD_DAYS) =>
                        "for good".to_owned(),
                    Some(d) => format!("{d} days"),
                }
            );
        }
        AppCommand::Retention {
            slug,
            days: Some(days),
        } => {
            let days = match days.as_str() {
                "default" => None,
                n => Some(n.parse::<u32>().map_err(|_| {
                    anyhow::anyhow!(
                        "{n:?} is not a number of days in 0..=3650 (0 keeps them for good) or \"default\""
                    )
                })?),
            };
            let app = apps::by_slug(&pool, &slug).await?;
            let mut tx = pool.begin().await?;
            outbox_core::store::retention::set_app_retention(&mut *tx, &slug, days).await?;
            record(
                &mut tx,
                app.id,
                "app.retention",
                serde_json::json!({ "days": days }),
            )
            .await?;
            tx.commit().await?;
            println!(
                "{slug}: dead letters kept {}",
                match days {
                    None => "per the global setting (dead_letter_retention_days)".to_owned(),
                    Some(0) => "for good".to_owned(),
                    Some(d) => format!("{d} days"),
                }
            );
        }
    }
    Ok(())
}

/// Suspends or resumes an app, recorded in its audit log; returns false
/// (and records nothing) when it already was as asked.
async fn suspend(pool: &sqlx::PgPool, slug: &str, suspended: bool) -> anyhow::Result<bool> {
    let app = apps::by_slug(pool, slug).await?;
    if app.suspended_at.is_some() == suspended {
        return Ok(false);
    }
    let mut tx = pool.begin().await?;
    apps::set_suspended(&mut *tx, slug, suspended).await?;
    let action = if suspended {
        "app.suspend"
    } else {
        "app.resume"
    };
    record(&mut tx, app.id, action, serde_json::json!({})).await?;
    tx.commit().await?;
    Ok(true)
}

/// Records a command's action on an app in its audit log, in the command's
/// transaction.
async fn record(
    tx: &mut sqlx::PgConnection,
    app_id: uuid::Uuid,
    action: &str,
    detail: serde_json::Value,
) -> anyhow::Result<()> {
    let action = outbox_admin::audit::Action {
        action,
        target: None,
        rows: 0,
        detail,
    };
    outbox_admin::audit::record(tx, &cli_actor(), app_id, action)
        .await
        .map_err(cli_error)
}
