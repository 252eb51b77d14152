//! `outboxd enqueue`: one event from the command line or standard input.

use std::io::{IsTerminal, Read};

use anyhow::Context;
use clap::Args;
use outbox_core::store::apps;
use outbox_core::{NewEvent, Source};

use outboxd::config::Settings;

/// The longest `--delay-ms`: ten years.
const MAX_DELAY_MS: i64 = 3650 * 24 * 3600 * 1000;

/// `outboxd enqueue` arguments.
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// App slug.
    #[arg(long)]
    pub app: String,
    /// Topic.
    #[arg(long)]
    pub topic: String,
    /// JSON payload; read from standard input when absent and stdin is not a
    /// terminal. Empty input means `{}`.
    #[arg(long)]
    pub payload: Option<String>,
    /// Not due before this many milliseconds from now (up to ten years).
    #[arg(long, allow_negative_numbers = true, value_parser = super::number_in(0, MAX_DELAY_MS))]
    pub delay_ms: Option<i64>,
    /// Idempotency key.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Ordering key.
    #[arg(long)]
    pub ordering_key: Option<String>,
    /// Partition key: a topic's per-key concurrency limit counts by it.
    #[arg(long)]
    pub partition_key: Option<String>,
    /// Attempts before dead-lettering (1 or more).
    #[arg(long, allow_negative_numbers = true, value_parser = super::number_in(1, i32::MAX))]
    pub max_attempts: Option<i32>,
    /// 0 (the default) to 9: claimed as if due this many × 10 s earlier.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true,
          value_parser = super::number_in(0, outbox_core::model::MAX_PRIORITY))]
    pub priority: i16,
    /// Source (queue, pubsub, ...).
    #[arg(long, default_value = "queue")]
    pub source: String,
}

/// Runs `outboxd enqueue`.
pub async fn run(settings: Settings, args: EnqueueArgs) -> anyhow::Result<()> {
    let payload_text = match args.payload {
        Some(p) => p,
        None if !std::io::stdin().is_terminal() => {
            let mut buf = String::new();
            std::io::stdin()
                .read_to_string(&mut buf)
                .context("reading the payload from standard input")?;
            buf
        }
        None => "{}".to_owned(),
    };
    let payload: serde_json::Value = if payload_text.trim().is_empty() {
        serde_json::json!({})
    } else {
        serde_json::from_str(payload_text.trim()).context("the payload is not valid JSON")?
    };
    let source: Source = args.source.parse()?;
    let mut event = NewEvent::new(args.topic, payload).with_source(source);
    if let Some(ms) = args.delay_ms {
        let delay = chrono::Duration::try_milliseconds(ms)
            .context("--delay-ms must be at most ten years")?;
        event = event.with_run_at(chrono::Utc::now() + delay);
    }
    event.idempotency_key = args.idempotency_key;
    event.ordering_key = args.ordering_key;
    event.partition_key = args.partition_key;
    event.max_attempts = args.max_attempts;
    event.priority = args.priority;
    event.validate()?;
    let pool = outboxd::db::connect(&settings, 0).await?;
    // One transaction for both: behind a transaction-pooling PgBouncer a
    // statement outside a transaction may reach another server connection
    // between its parse and its execution.
    let mut tx = pool.begin().await?;
    let app = apps::by_slug(&mut *tx, &args.app).await?;
    let id = outbox_core::enqueue(&mut tx, app.id, &event).await?;
    tx.commit().await?;
    println!("{id}");
    Ok(())
}
