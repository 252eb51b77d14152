//! `outboxd webhook …`: webhook targets with secrets of their own.

use std::time::Duration;

use clap::Subcommand;
use outbox_admin::ApiError;
use outbox_core::store::{apps, webhooks};
use outboxd::config::Settings;

use super::topics::{cli_actor, cli_error};

/// `outboxd webhook …`.
#[derive(Debug, Subcommand)]
pub enum WebhookCommand {
    /// Create a target with a secret of its own; prints the secret once.
    Create {
        /// The app.
        #[arg(long)]
        app: String,
        /// The URL (what follows `webhook:` in a row's topic or a trigger's target).
        url: String,
    },
    /// Give a target a new secret (printed once); the previous one keeps
    /// signing for `webhook.rotation_overlap_secs`.
    Rotate {
        /// The app.
        #[arg(long)]
        app: String,
        /// The target's URL.
        url: String,
    },
    /// List an app's targets (never their secrets).
    List {
        /// The app.
        #[arg(long)]
        app: String,
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a target: its requests are signed with the global secret again.
    Delete {
        /// The app.
        #[arg(long)]
        app: String,
        /// The target's URL.
        url: String,
    },
}

/// Runs `outboxd webhook …`.
pub async fn run(settings: Settings, command: WebhookCommand) -> anyhow::Result<()> {
    let pool = outboxd::db::connect(&settings, 0).await?;
    let actor = cli_actor();
    match command {
        WebhookCommand::Create { app, url } => {
            let app = apps::by_slug(&pool, &app).await?;
            let secret = outbox_admin::webhooks::create_target(&pool, &actor, app.id, &url)
                .await
                .map_err(cli_error)?;
            println!("{secret}");
            eprintln!("{url}: its secret is above; it is not shown again");
        }
        WebhookCommand::Rotate { app, url } => {
            let app = apps::by_slug(&pool, &app).await?;
            let overlap = Duration::from_secs(settings.webhook.rotation_overlap_secs);
            let secret =
                outbox_admin::webhooks::rotate_secret(&pool, &actor, app.id, &url, overlap)
                    .await
                    .map_err(|err| match err {
                        ApiError::NotFound(_) => no_such_target(&app.slug, &url),
                        other => cli_error(other),
                    })?;
            println!("{secret}");
            eprintln!(
                "{url}: the new secret is above; the previous one signs too for {} s",
                overlap.as_secs()
            );
        }
        WebhookCommand::List { app, json } => {
            let app = apps::by_slug(&pool, &app).await?;
            let listed = webhooks::list(&pool, app.id).await?;
            if json {
                println!("{}", serde_json::json!({ "items": listed }));
                return Ok(());
            }
            // Said aside, so that a script reading the lines reads none.
            if listed.is_empty() {
                eprintln!("{}: no webhook target has a secret of its own", app.slug);
            }
            let mut table =
                super::Table::new(&["URL", "CREATED", "ROTATED", "PREVIOUS SECRET VALID UNTIL"]);
            for t in listed {
                table.row(vec![
                    t.url,
                    super::when(t.created_at),
                    t.rotated_at.map_or("-".to_owned(), super::when),
                    t.previous_until.map_or("-".to_owned(), super::when),
                ]);
            }
            table.print();
        }
        WebhookCommand::Delete { app, url } => {
            let app = apps::by_slug(&pool, &app).await?;
            if outbox_admin::webhooks::delete_target(&pool, &actor, app.id, &url)
                .await
                .map_err(cli_error)?
            {
                if settings.webhook.secret.expose().is_empty() {
                    println!(
                        "{url}: deleted; with no secret of its own and webhook.secret unset, rows for it are not sent until one is set"
                    );
                } else {
                    println!("{url}: deleted; its requests are signed with webhook.secret");
                }
            } else {
                return Err(no_such_target(&app.slug, &url));
            }
        }
    }
    Ok(())
}

/// A target the app does not have, said as `trigger delete` says it of a
/// trigger: an error, with where to look.
fn no_such_target(app: &str, url: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{url}: app {app} has no webhook target of that URL (`outboxd webhook list --app {app}` lists them)"
    )
}
