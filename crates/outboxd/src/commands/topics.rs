//! `outboxd topic …`, `outboxd processes` and `outboxd cancel`: pausing,
//! resuming and limiting topics, who serves what, and cancelling rows that
//! have not run.

use clap::{Args, Subcommand};
use outbox_admin::{ApiError, api};
use outbox_core::store::{apps, limits, pauses, processes};
use uuid::Uuid;

use outboxd::config::Settings;

/// An error of an action shared with the API, for the command line: the
/// detail an API client is not shown (a database error) is the message here.
pub(crate) fn cli_error(err: ApiError) -> anyhow::Error {
    match err {
        ApiError::Internal(detail) => anyhow::anyhow!(detail),
        other => anyhow::anyhow!(other),
    }
}

/// A limit's refusal in the words of `topic limit`'s flags: the store names
/// the API's fields (`max_running: is 0; …`).
fn in_flags(err: anyhow::Error) -> anyhow::Error {
    anyhow::anyhow!(outbox_core::text::rename_fields(
        &err.to_string(),
        &[
            ("max_running_per_key", "--max-running-per-key"),
            ("max_running", "--max-running"),
            ("rate_per_sec", "--rate"),
            ("burst", "--burst"),
        ],
    ))
}

/// Who the audit log, a pause and a cancelled row name for a command run
/// here: `cli`, with the account that ran it when the shell says.
pub(crate) fn cli_actor() -> String {
    match std::env::var("USER").or_else(|_| std::env::var("LOGNAME")) {
        Ok(user) if !user.is_empty() => format!("cli ({user})"),
        _ => "cli".to_owned(),
    }
}

/// `outboxd topic …`.
#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Pause a topic of an app in every process (within about a second); running rows finish.
    Pause {
        /// App slug.
        #[arg(long)]
        app: String,
        /// The topic.
        #[arg(long)]
        topic: String,
        /// Why, for the operators who read it later.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resume a paused topic (no restart needed).
    Resume {
        /// App slug.
        #[arg(long)]
        app: String,
        /// The topic.
        #[arg(long)]
        topic: String,
    },
    /// List an app's paused topics.
    Paused {
        /// App slug.
        #[arg(long)]
        app: String,
        /// Print one JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Limit a topic across every process (within about a second): how many of its rows run at once (in all, or per partition key), how many start per second, or both. The limits given replace the topic's earlier ones: give every limit to keep.
    #[command(group(clap::ArgGroup::new("limits").required(true).multiple(true).args(["max_running", "max_running_per_key", "rate"])))]
    Limit {
        /// App slug.
        #[arg(long)]
        app: String,
        /// The topic.
        #[arg(long)]
        topic: String,
        /// At most this many of its rows run at once (1 to 10000).
        #[arg(long, allow_negative_numbers = true)]
        max_running: Option<i64>,
        /// At most this many of its rows with one partition key run at once (1 to 10000; 1 runs each key's rows one at a time).
        #[arg(long, allow_negative_numbers = true)]
        max_running_per_key: Option<i64>,
        /// At most this many of its rows start per second (0.001 up to 100000).
        #[arg(long, allow_negative_numbers = true)]
        rate: Option<f64>,
        /// With --rate: how many may start at once after a quiet spell (default: one second's worth).
        #[arg(long, allow_negative_numbers = true, requires = "rate")]
        burst: Option<i64>,
    },
    /// Remove a topic's limits (concurrency and rate).
    Unlimit {
        /// App slug.
        #[arg(long)]
        app: String,
        /// The topic.
        #[arg(long)]
        topic: String,
    },
    /// List an app's limited topics, with how many of each run now.
    Limits {
        /// App slug.
        #[arg(long)]
        app: String,
        /// Print one JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
}

/// The rows `outboxd cancel` and `outboxd retry` act on: some by id, or
/// every one of a topic that the action takes.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("rows").required(true).args(["ids", "topic"])))]
pub struct RowsArgs {
    /// App slug.
    #[arg(long)]
    app: String,
    /// A row (repeat --id for several).
    #[arg(
        long = "id",
        required_unless_present = "topic",
        conflicts_with = "topic"
    )]
    ids: Vec<Uuid>,
    /// Every row of this topic the action takes: not running (cancel), or
    /// waiting for a delay or a retry's backoff (retry).
    #[arg(long)]
    topic: Option<String>,
}

/// `outboxd cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    #[command(flatten)]
    rows: RowsArgs,
    /// Why (kept on each dead letter).
    #[arg(long)]
    reason: String,
}

/// Runs `outboxd retry`: rows waiting for a delay or a backoff become due
/// now, as the dashboard's "retry now" does.
pub async fn retry(settings: Settings, args: RowsArgs) -> anyhow::Result<()> {
    let pool = outboxd::db::connect(&settings, 0).await?;
    let app = apps::by_slug(&pool, &args.app).await?.id;
    let actor = cli_actor();
    let total = match args.topic {
        Some(topic) => {
            // As many batches as rows waited at the start: a retried row
            // that fails again waits again, and would be taken again.
            let waiting = outbox_core::store::outbox::RowFilter {
                topic: Some(topic.clone()),
                waiting_only: true,
                ..Default::default()
            };
            let at_start = outbox_core::store::outbox::count_matching(
                &pool,
                app,
                &waiting,
                i64::MAX,
                std::time::Duration::from_secs(10),
            )
            .await?
            .rows;
            let selection = api::Selection::Topic(topic);
            in_batches(at_start, || api::retry_rows(&pool, &actor, app, &selection)).await?
        }
        None => {
            let asked = args.ids.clone();
            let done = api::retry_rows(&pool, &actor, app, &api::Selection::Ids(args.ids))
                .await
                .map_err(cli_error)?;
            note_untouched(
                &args.app,
                &asked,
                &done.ids,
                "waiting for a delay or a backoff in",
                "retried",
                "due already, running, finished, or a dead letter",
            );
            done.rows
        }
    };
    println!("{}: {total} row(s) due now", args.app);
    if total == 0 {
        println!(
            "no row of app {} was waiting for a delay or a backoff: a row due already, running or finished is left as it is",
            args.app
        );
    }
    Ok(())
}

/// Runs `act` batch after batch while it says more may match, for at most
/// as many batches as `rows` fill; returns how many rows it changed.
async fn in_batches<F, Fut>(rows: i64, mut act: F) -> anyhow::Result<usize>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<api::Acted, ApiError>>,
{
    let batch = outbox_core::store::outbox::MAX_CANCEL_BATCH;
    let rounds = rows.saturating_add(batch - 1) / batch;
    let mut total = 0;
    for _ in 0..rounds.max(1) {
        let done = act().await.map_err(cli_error)?;
        total += done.rows;
        if !done.more {
            break;
        }
    }
    Ok(total)
}

/// Notes, aside, the ids asked for that an action did not touch.
fn note_untouched(
    app: &str,
    asked: &[Uuid],
    touched: &[Uuid],
    waiting: &str,
    done: &str,
    why: &str,
) {
    let missed: Vec<String> = asked
        .iter()
        .filter(|id| !touched.contains(id))
        .map(Uuid::to_string)
        .collect();
    if !missed.is_empty() {
        eprintln!(
            "note: not {waiting} {app}'s outbox, so not {done}: {} ({why})",
            missed.join(", ")
        );
    }
}

/// Runs `outboxd topic …`.
pub async fn topic(settings: Settings, cmd: TopicCommand) -> anyhow::Result<()> {
    let pool = outboxd::db::connect(&settings, 0).await?;
    match cmd {
        TopicCommand::Pause { app, topic, reason } => {
            let id = apps::by_slug(&pool, &app).await?.id;
            let actor = cli_actor();
            let paused = api::pause_topic(&pool, &actor, id, &topic, reason.as_deref())
                .await
                .map_err(cli_error)?;
            if paused.now {
                println!("{app}: {topic} paused");
                note_if_unseen(paused.seen, &app, &topic);
            } else {
                println!("{app}: {topic} was already paused");
            }
        }
        TopicCommand::Resume { app, topic } => {
            let id = apps::by_slug(&pool, &app).await?.id;
            match api::resume_topic(&pool, &cli_actor(), id, &topic).await {
                Ok(()) => println!("{app}: {topic} resumed"),
                // As `pause` of a paused topic and `app resume`: the wanted
                // state holds, so a script that resumes twice does not fail.
                Err(ApiError::NotFound(_)) => println!("{app}: {topic} was not paused"),
                Err(err) => return Err(cli_error(err)),
            }
        }
        TopicCommand::Paused { app, json } => {
            let id = apps::by_slug(&pool, &app).await?.id;
            let paused = pauses::list(&pool, id).await?;
            if json {
                println!("{}", serde_json::json!({ "items": paused }));
                return Ok(());
            }
            // Said aside, so that a script reading the lines reads none.
            if paused.is_empty() {
                eprintln!("{app}: no topic is paused");
            }
            let mut table = super::Table::new(&["TOPIC", "SINCE", "BY", "REASON"]);
            for p in paused {
                table.row(vec![
                    p.topic,
                    super::when(p.paused_at),
                    p.paused_by.unwrap_or_default(),
                    p.reason.unwrap_or_default(),
                ]);
            }
            table.print();
        }
        TopicCommand::Limit {
            app,
            topic,
            max_running,
            max_running_per_key,
            rate,
            burst,
        } => {
            let id = apps::by_slug(&pool, &app).await?.id;
            let before = limits::list(&pool, id)
                .await?
                .into_iter()
                .find(|l| l.topic == topic);
            let wanted = limits::Limits {
                max_running,
                max_running_per_key,
                rate_per_sec: rate,
                burst,
            };
            let api::Limited { limits: set, seen } =
                api::limit_topic(&pool, &cli_actor(), id, &topic, &wanted)
                    .await
                    .map_err(|err| in_flags(cli_error(err)))?;
            let now = describe(set.max_running(), set.max_running_per_key(), set.rate());
            // The limits given replace the earlier ones: say what went, so
            // that a limit dropped by leaving its flag out is not a surprise.
            let dropped = before.map(|l| {
                describe(
                    l.max_running.filter(|_| set.max_running().is_none()),
                    l.max_running_per_key
                        .filter(|_| set.max_running_per_key().is_none()),
                    l.rate_per_sec.zip(l.burst).filter(|_| set.rate().is_none()),
                )
            });
            match dropped.filter(|d| !d.is_empty()) {
                Some(dropped) => println!(
                    "{app}: {topic} limited to {now}; no longer {dropped} (give every limit to keep)"
                ),
                None => println!("{app}: {topic} limited to {now}"),
            }
            note_if_unseen(seen, &app, &topic);
        }
        TopicCommand::Unlimit { app, topic } => {
            let id = apps::by_slug(&pool, &app).await?.id;
            match api::unlimit_topic(&pool, &cli_actor(), id, &topic).await {
                Ok(()) => println!("{app}: {topic} is no longer limited"),
                Err(ApiError::NotFound(_)) => println!("{app}: {topic} had no limit"),
                Err(err) => return Err(cli_error(err)),
            }
        }
        TopicCommand::Limits { app, json } => {
            let id = apps::by_slug(&pool, &app).await?.id;
            let limited = limits::list(&pool, id).await?;
            if json {
                println!("{}", serde_json::json!({ "items": limited }));
                return Ok(());
            }
            if limited.is_empty() {
                eprintln!("{app}: no topic is limited");
            }
            let mut table = super::Table::new(&["TOPIC", "LIMITS", "RUNNING", "SINCE", "BY"]);
            for l in limited {
                let rate = l.rate_per_sec.zip(l.burst);
                table.row(vec![
                    l.topic,
                    describe(l.max_running, l.max_running_per_key, rate),
                    l.running.to_string(),
                    super::when(l.set_at),
                    l.set_by.unwrap_or_default(),
                ]);
            }
            table.print();
        }
    }
    Ok(())
}

/// A topic's limits in words: "2 at once, 1 at once per key, 20/s (burst 20)".
fn describe(max_running: Option<i32>, per_key: Option<i32>, rate: Option<(f64, i32)>) -> String {
    let mut parts = Vec::new();
    if let Some(n) = max_running {
        parts.push(format!("{n} at once"));
    }
    if let Some(n) = per_key {
        parts.push(format!("{n} at once per key"));
    }
    if let Some((r, b)) = rate {
        parts.push(format!("{r}/s (burst {b})"));
    }
    parts.join(", ")
}

/// Runs `outboxd processes`: the live dispatchers and what each serves, as
/// lines or (`json`) one JSON document.
pub async fn list_processes(settings: Settings, json: bool) -> anyhow::Result<()> {
    let pool = outboxd::db::connect(&settings, 0).await?;
    let live = processes::live(&pool).await?;
    if json {
        println!("{}", serde_json::json!({ "items": live }));
        return Ok(());
    }
    if live.is_empty() {
        eprintln!("no dispatcher process is up");
    }
    let mut table = super::Table::new(&["ID", "WORKER", "PID@HOST", "VERSION", "SINCE", "SERVES"]);
    for p in live {
        let serves = p.serves();
        table.row(vec![
            p.id.to_string(),
            p.worker,
            format!("{}@{}", p.pid, p.host),
            p.version,
            super::when(p.started_at),
            serves,
        ]);
    }
    table.print();
    Ok(())
}

/// Notes, aside, a pause or limit of a topic nothing in the app names yet:
/// most often a typo, and the pause or limit holds either way.
fn note_if_unseen(seen: bool, slug: &str, topic: &str) {
    if !seen {
        eprintln!(
            "note: nothing names {topic:?} in {slug} yet (no rows sampled, no process serving it by name, no dead letters): check the spelling; `outboxd processes` lists what is served"
        );
    }
}

/// Runs `outboxd cancel`: a topic's rows in batches until none is left.
pub async fn cancel(settings: Settings, args: CancelArgs) -> anyhow::Result<()> {
    let pool = outboxd::db::connect(&settings, 0).await?;
    let app = apps::by_slug(&pool, &args.rows.app).await?.id;
    let actor = cli_actor();
    let total = match args.rows.topic {
        // A cancelled row leaves the outbox: the batches end by themselves.
        Some(topic) => {
            let selection = api::Selection::Topic(topic);
            in_batches(i64::MAX, || {
                api::cancel_rows(&pool, &actor, app, &selection, &args.reason)
            })
            .await?
        }
        None => {
            let asked = args.rows.ids.clone();
            let selection = api::Selection::Ids(args.rows.ids);
            let done = api::cancel_rows(&pool, &actor, app, &selection, &args.reason)
                .await
                .map_err(cli_error)?;
            note_untouched(
                &args.rows.app,
                &asked,
                &done.ids,
                "waiting in",
                "cancelled",
                "running now, finished, or a dead letter already: `outboxd dead-letters show` finds one by its row's id too",
            );
            done.rows
        }
    };
    println!(
        "{}: {total} row(s) cancelled (now ignored dead letters)",
        args.rows.app
    );
    if total == 0 {
        println!(
            "no waiting row of app {} matched: a row that has run, is running or belongs to another app is not cancelled",
            args.rows.app
        );
    }
    Ok(())
}
