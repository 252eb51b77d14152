//! `outboxd trigger …`: KV, cron and dead-letter triggers.

use anyhow::bail;
use clap::Subcommand;
use outbox_admin::events_api::change_trigger;
use outbox_core::store::apps;

use outboxd::config::Settings;

use super::topics::{cli_actor, cli_error};

/// `outboxd trigger …`.
#[derive(Debug, Subcommand)]
pub enum TriggerCommand {
    /// List an app's triggers.
    List {
        /// App slug.
        #[arg(long)]
        app: String,
        /// Print one JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Create a trigger: give exactly one of --kv, --cron, --dead-letter.
    Create {
        /// App slug.
        #[arg(long)]
        app: String,
        /// Unique name within the app.
        #[arg(long)]
        name: String,
        /// The handler that runs the trigger's rows.
        #[arg(long)]
        target: String,
        /// KV trigger on collections matching this glob: "*", "prefix:*" or an exact name.
        #[arg(long)]
        kv: Option<String>,
        /// Operations of a KV trigger.
        #[arg(long, value_delimiter = ',', default_value = "put,delete")]
        ops: Vec<String>,
        /// Cron trigger with this schedule (5 fields, or 6 with seconds).
        #[arg(long)]
        cron: Option<String>,
        /// The IANA time zone a cron schedule is read in.
        #[arg(long, default_value = "UTC")]
        timezone: String,
        /// Dead-letter trigger.
        #[arg(long)]
        dead_letter: bool,
        /// Dead-letter trigger: only these topics.
        #[arg(long, value_delimiter = ',')]
        topics: Vec<String>,
        /// Dead-letter trigger: only these sources.
        #[arg(long, value_delimiter = ',')]
        sources: Vec<String>,
    },
    /// Enable a trigger.
    Enable {
        /// App slug.
        #[arg(long)]
        app: String,
        /// The trigger's name or id.
        trigger: String,
    },
    /// Disable a trigger.
    Disable {
        /// App slug.
        #[arg(long)]
        app: String,
        /// The trigger's name or id.
        trigger: String,
    },
    /// Delete a trigger.
    Delete {
        /// App slug.
        #[arg(long)]
        app: String,
        /// The trigger's name or id.
        trigger: String,
    },
}

/// Runs `outboxd trigger …`.
pub async fn run(settings: Settings, cmd: TriggerCommand) -> anyhow::Result<()> {
    use outbox_core::store::triggers::{self, TriggerSpec};
    let pool = outboxd::db::connect(&settings, 0).await?;
    match cmd {
        TriggerCommand::List { app, json } => {
            let app = apps::by_slug(&pool, &app).await?;
            let listed = triggers::list(&pool, app.id).await?;
            if json {
                println!("{}", serde_json::json!({ "items": listed }));
                return Ok(());
            }
            // Said aside, so that a script reading the lines reads none.
            if listed.is_empty() {
                eprintln!("{}: no trigger", app.slug);
            }
            let mut table =
                super::Table::new(&["ID", "KIND", "NAME", "STATE", "TARGET", "FIRES ON"]);
            for t in listed {
                let dead_letters = t.dead_letter_matches();
                let detail = t
                    .collection_glob
                    .map(|g| format!("collection {g} ops {}", t.ops.unwrap_or_default().join(",")))
                    .or(t.schedule.map(|s| format!("cron {s}")))
                    .or(dead_letters)
                    .unwrap_or_default();
                table.row(vec![
                    t.id.to_string(),
                    t.kind,
                    t.name,
                    if t.enabled { "enabled" } else { "disabled" }.to_owned(),
                    t.target,
                    detail,
                ]);
            }
            table.print();
        }
        TriggerCommand::Create {
            app,
            name,
            target,
            kv,
            ops,
            cron,
            timezone,
            dead_letter,
            topics,
            sources,
        } => {
            let spec = match (kv, cron, dead_letter) {
                (Some(collection), None, false) => TriggerSpec::Kv { collection, ops },
                (None, Some(schedule), false) => TriggerSpec::Cron { schedule, timezone },
                (None, None, true) => TriggerSpec::DeadLetter {
                    sources,
                    topics,
                    trigger_ids: Vec::new(),
                },
                _ => bail!("give exactly one of --kv, --cron, --dead-letter"),
            };
            let app = apps::by_slug(&pool, &app).await?;
            let mut tx = pool.begin().await?;
            let id = triggers::create(&mut tx, app.id, &name, &target, Some("cli"), &spec).await?;
            let target = id.to_string();
            let action = outbox_admin::audit::Action {
                action: "trigger.create",
                target: Some(&target),
                rows: 0,
                detail: serde_json::json!({ "name": name }),
            };
            outbox_admin::audit::record(&mut tx, &cli_actor(), app.id, action).await?;
            tx.commit().await?;
            println!("{id}");
        }
        TriggerCommand::Enable { app, trigger } => {
            let app = apps::by_slug(&pool, &app).await?;
            let found = find(&pool, &app, &trigger).await?;
            if found.enabled {
                println!("trigger {} was already enabled", found.name);
                return Ok(());
            }
            change_trigger(&pool, &cli_actor(), app.id, found.id, Some(true))
                .await
                .map_err(cli_error)?;
            println!("trigger {} enabled", found.name);
        }
        TriggerCommand::Disable { app, trigger } => {
            let app = apps::by_slug(&pool, &app).await?;
            let found = find(&pool, &app, &trigger).await?;
            if !found.enabled {
                println!("trigger {} was already disabled", found.name);
                return Ok(());
            }
            change_trigger(&pool, &cli_actor(), app.id, found.id, Some(false))
                .await
                .map_err(cli_error)?;
            println!("trigger {} disabled", found.name);
        }
        TriggerCommand::Delete { app, trigger } => {
            let app = apps::by_slug(&pool, &app).await?;
            let found = find(&pool, &app, &trigger).await?;
            change_trigger(&pool, &cli_actor(), app.id, found.id, None)
                .await
                .map_err(cli_error)?;
            println!("trigger {} deleted", found.name);
        }
    }
    Ok(())
}

/// `app`'s trigger with the id `trigger`, or else the one named so.
async fn find(
    pool: &sqlx::PgPool,
    app: &outbox_core::App,
    trigger: &str,
) -> anyhow::Result<outbox_core::store::triggers::Trigger> {
    match outbox_core::store::triggers::find(pool, app.id, trigger).await {
        Err(outbox_core::Error::NotFound(_)) => anyhow::bail!(
            "{}: no trigger named {trigger:?} (or with that id); `outboxd trigger list --app {}` lists them",
            app.slug,
            app.slug
        ),
        found => Ok(found?),
    }
}
