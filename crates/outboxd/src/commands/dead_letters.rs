//! `outboxd dead-letters …`: the same actions, under the same names, as the
//! admin API (`…/dead-letters/{id}/replay`, `…/ignore`) and the dashboard's
//! Replay and Ignore buttons. `resolve` is accepted for `ignore`.

use anyhow::bail;
use clap::Subcommand;
use outbox_core::store::{apps, dead_letters};
use uuid::Uuid;

use outboxd::config::Settings;

use super::topics::{cli_actor, cli_error};

/// Counting matching rows stops here ("showing 50 of 10000+").
const COUNT_BOUND: i64 = 10_000;

/// `outboxd dead-letters …`; every subcommand names the app.
#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// List an app's dead letters, newest first, a page at a time.
    List {
        /// App slug.
        #[arg(long)]
        app: String,
        /// Only unresolved rows (same as --state unresolved).
        #[arg(long)]
        unresolved: bool,
        /// Only this state: unresolved, replayed, ignored, handled_by_script, handler_failed.
        #[arg(long)]
        state: Option<String>,
        /// Only this topic.
        #[arg(long)]
        topic: Option<String>,
        /// Only this source.
        #[arg(long)]
        source: Option<String>,
        /// Rows per page (1..=1000).
        #[arg(long, default_value_t = 50, allow_negative_numbers = true,
              value_parser = super::number_in(1u32, 1000))]
        limit: u32,
        /// Continue after this cursor (printed under the previous page).
        #[arg(long)]
        after: Option<String>,
        /// Every matching row, not one page.
        #[arg(long, conflicts_with = "after")]
        all: bool,
        /// Print one JSON document (items, total, next_cursor) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its payload, headers and error.
    Show {
        /// App slug.
        #[arg(long)]
        app: String,
        /// Dead letter id.
        id: String,
    },
    /// Replay a dead letter, or every unresolved one of a topic, source or
    /// trigger: a fresh outbox row each (same payload, headers and attempts
    /// as the original, unless --max-attempts), the dead letter marked replayed.
    Replay {
        /// App slug.
        #[arg(long)]
        app: String,
        /// Dead letter id (or the id of the row it was); or give a filter.
        id: Option<String>,
        #[command(flatten)]
        filter: BulkArgs,
        /// Attempts the replayed rows get (default: each original row's).
        #[arg(long, allow_negative_numbers = true)]
        max_attempts: Option<i64>,
    },
    /// Ignore a dead letter, or every unresolved one of a topic, source or
    /// trigger: mark it resolved as ignored.
    #[command(alias = "resolve")]
    Ignore {
        /// App slug.
        #[arg(long)]
        app: String,
        /// Dead letter id (or the id of the row it was); or give a filter.
        id: Option<String>,
        #[command(flatten)]
        filter: BulkArgs,
    },
}

/// Which unresolved dead letters a replay or an ignore without an id takes.
#[derive(Debug, clap::Args)]
pub struct BulkArgs {
    /// Every unresolved dead letter of this topic.
    #[arg(long, conflicts_with = "id")]
    topic: Option<String>,
    /// Every unresolved dead letter of this source.
    #[arg(long, conflicts_with = "id")]
    source: Option<String>,
    /// Every unresolved dead letter of this trigger (its name or id).
    #[arg(long, conflicts_with = "id")]
    trigger: Option<String>,
    /// Every unresolved dead letter of the app.
    #[arg(long, conflicts_with_all = ["id", "topic", "source", "trigger"])]
    all: bool,
}

/// Says, aside, that dead letters still match after a bulk action.
fn note_left(left: i64) {
    if left > 0 {
        eprintln!(
            "note: {left} unresolved dead letter(s) still match: new ones, or replays that failed again; run it again to take them too"
        );
    }
}

/// Replays or ignores (`action`) the unresolved dead letters `filter`
/// names, a bulk request of up to `MAX_BULK` at a time, as many rounds as
/// there were matches at the start (replays that fail again become new dead
/// letters, which would otherwise keep the loop going); returns how many
/// changed and how many still match.
async fn act_on_all(
    pool: &sqlx::PgPool,
    app: &outbox_core::App,
    action: &str,
    filter: BulkArgs,
    max_attempts: Option<i64>,
) -> anyhow::Result<(usize, i64)> {
    let trigger_id = match &filter.trigger {
        Some(trigger) => Some(
            outbox_core::store::triggers::find(pool, app.id, trigger)
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "{}: no trigger named {trigger:?} (or with that id); `outboxd trigger list --app {}` lists them",
                        app.slug,
                        app.slug
                    )
                })?
                .id,
        ),
        None => None,
    };
    let matching = outbox_admin::api::BulkFilter {
        source: filter.source,
        topic: filter.topic,
        trigger_id,
    };
    if !filter.all && matching.names_nothing() {
        bail!(
            "give a dead letter's id, or --topic, --source, --trigger or --all for every unresolved one they match"
        );
    }
    let count = || outbox_admin::api::count_unresolved_matching(pool, app.id, &matching);
    let at_start = count().await.map_err(cli_error)?;
    if at_start == 0 {
        eprintln!(
            "note: no unresolved dead letter of {} matches; `outboxd dead-letters list --app {} --unresolved` lists them",
            app.slug, app.slug
        );
    }
    let body = outbox_admin::api::BulkBody {
        action: action.to_owned(),
        ids: None,
        filter: (!filter.all).then_some(matching.clone()),
        all: filter.all,
        max_attempts,
    };
    let batch = i64::from(outbox_admin::api::MAX_BULK);
    let mut total = 0;
    for _ in 0..(at_start + batch - 1) / batch {
        let done = outbox_admin::api::run_bulk(pool, &cli_actor(), app.id, &body)
            .await
            .map_err(cli_error)?;
        total += done.changed;
        if !done.more {
            break;
        }
    }
    Ok((total, count().await.map_err(cli_error)?))
}

/// The widest the list's topic column grows.
const MAX_TOPIC_WIDTH: usize = 60;

fn parse_id(id: &str) -> anyhow::Result<Uuid> {
    // The parser's own words ("invalid character: found `n` at 0") add nothing.
    Uuid::parse_str(id.trim()).map_err(|_| {
        anyhow::anyhow!("{id:?} is not a UUID (a dead letter's id, or the id of the row it was)")
    })
}

/// Runs `outboxd dead-letters …`.
pub async fn run(settings: Settings, cmd: DeadLetterCommand) -> anyhow::Result<()> {
    let pool = outboxd::db::connect(&settings, 0).await?;
    match cmd {
        DeadLetterCommand::List {
            app,
            unresolved,
            state: wanted,
            topic,
            source,
            limit,
            after,
            all,
            json,
        } => {
            let (unresolved_only, resolution) = match wanted.as_deref() {
                None => (unresolved, None),
                Some("unresolved") => (true, None),
                Some(r @ ("replayed" | "ignored" | "handled_by_script" | "handler_failed"))
                    if !unresolved =>
                {
                    (false, Some(r.to_owned()))
                }
                Some(
                    resolved @ ("replayed" | "ignored" | "handled_by_script" | "handler_failed"),
                ) => {
                    bail!(
                        "--state {resolved} lists resolved dead letters, --unresolved the others: give one of the two"
                    )
                }
                Some(other) => bail!(
                    "--state {other:?} is not one of unresolved, replayed, ignored, handled_by_script, handler_failed"
                ),
            };
            let app = apps::by_slug(&pool, &app).await?;
            let filter = dead_letters::Filter {
                source,
                topic,
                resolution,
                unresolved_only,
                ..Default::default()
            };
            let total = dead_letters::count(&pool, app.id, &filter, COUNT_BOUND).await?;
            let mut cursor = after
                .as_deref()
                .map(|after| {
                    outbox_admin::api::decode_cursor(after).map_err(|_| {
                        anyhow::anyhow!("--after: {after:?} is not a cursor from a previous page")
                    })
                })
                .transpose()?;
            let mut rows = Vec::new();
            let next = loop {
                // One row more than shown says whether there is a next page
                // (a page exactly full said "more" at the end).
                let mut page =
                    dead_letters::list(&pool, app.id, &filter, cursor, limit.saturating_add(1))
                        .await?;
                let full = page.len() > limit as usize;
                page.truncate(limit as usize);
                rows.extend(page);
                let next = full
                    .then(|| rows.last().map(outbox_admin::api::encode_cursor))
                    .flatten();
                match next {
                    Some(_) if all => {
                        cursor = rows.last().map(|r| dead_letters::Cursor {
                            created_at: r.created_at,
                            id: r.id,
                        });
                    }
                    next => break next,
                }
            };
            let total_shown = if total >= COUNT_BOUND {
                format!("{COUNT_BOUND}+")
            } else {
                total.to_string()
            };
            if json {
                let doc = serde_json::json!({
                    "items": rows,
                    "total": total,
                    "total_is_lower_bound": total >= COUNT_BOUND,
                    "next_cursor": next,
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
                return Ok(());
            }
            // As wide as the page's topics, up to 60, longer ones cut in
            // the middle: webhook targets differ at their ends.
            let width = rows
                .iter()
                .map(|row| row.topic.chars().count())
                .max()
                .unwrap_or(0)
                .clamp("TOPIC".len(), MAX_TOPIC_WIDTH);
            println!(
                "{:<36}  {:<17}  {:<8}  {:<width$}  {:>8}  {:<20}  LAST ERROR",
                "ID", "STATE", "SOURCE", "TOPIC", "ATTEMPTS", "CREATED"
            );
            for row in &rows {
                println!(
                    "{:<36}  {:<17}  {:<8}  {:<width$}  {:>8}  {:<20}  {}",
                    row.id,
                    row.state(),
                    super::ellipsize(&row.source, 8),
                    super::elide_middle(&row.topic, width),
                    row.attempt_count,
                    super::when(row.created_at),
                    row.error_summary(60)
                );
            }
            println!("showing {} of {total_shown} dead letter(s)", rows.len());
            if let Some(next) = next {
                println!("more: --after {next}  (or --all)");
            }
        }
        DeadLetterCommand::Show { app, id } => {
            let app = apps::by_slug(&pool, &app).await?;
            let id = dead_letters::resolve_id(&pool, app.id, parse_id(&id)?).await?;
            let row = dead_letters::get(&pool, app.id, id).await?;
            println!("{}", serde_json::to_string_pretty(&row)?);
        }
        DeadLetterCommand::Replay {
            app,
            id: None,
            filter,
            max_attempts,
        } => {
            let found = apps::by_slug(&pool, &app).await?;
            let (n, left) = act_on_all(&pool, &found, "replay", filter, max_attempts).await?;
            println!("{app}: {n} dead letter(s) replayed as new outbox rows");
            note_left(left);
        }
        DeadLetterCommand::Ignore {
            app,
            id: None,
            filter,
        } => {
            let found = apps::by_slug(&pool, &app).await?;
            let (n, left) = act_on_all(&pool, &found, "ignore", filter, None).await?;
            println!("{app}: {n} dead letter(s) ignored");
            note_left(left);
        }
        DeadLetterCommand::Replay {
            app,
            id: Some(id),
            max_attempts,
            ..
        } => {
            let app = apps::by_slug(&pool, &app).await?;
            let id = parse_id(&id)?;
            let max_attempts = outbox_admin::api::replay_attempts(max_attempts)
                .map_err(|e| anyhow::anyhow!("--{}", e.to_string().replace('_', "-")))?;
            let (id, outbox_id) =
                outbox_admin::api::replay_one(&pool, &cli_actor(), app.id, id, max_attempts)
                    .await
                    .map_err(cli_error)?;
            println!("replayed {id} as outbox row {outbox_id}");
        }
        DeadLetterCommand::Ignore {
            app, id: Some(id), ..
        } => {
            let app = apps::by_slug(&pool, &app).await?;
            let id = parse_id(&id)?;
            let id = outbox_admin::api::ignore_one(&pool, &cli_actor(), app.id, id)
                .await
                .map_err(cli_error)?;
            println!("ignored {id}");
        }
    }
    Ok(())
}
