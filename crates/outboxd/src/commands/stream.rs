//! `outboxd stream tail|get`: read what was relayed, as an operator, without
//! touching the durable consumers (see `outbox_nats::peek`).

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use outbox_admin::StreamReader;
use outbox_nats::subject::SubjectTemplate;
use outboxd::config::Settings;

/// `outboxd stream …`.
#[derive(Debug, Subcommand)]
pub enum StreamCommand {
    /// Print the latest messages relayed for an app, one JSON document a line.
    Tail {
        /// The app (tenant) whose subjects to read.
        #[arg(long)]
        app: String,
        /// A subject filter after the tenant's token (NATS wildcards).
        #[arg(long, default_value = ">")]
        subject: String,
        /// At most this many, the latest (1..=100).
        #[arg(long, default_value_t = 10)]
        last: usize,
        /// Only messages stored at most this many seconds ago.
        #[arg(long, default_value_t = 3600)]
        since_secs: u64,
    },
    /// Print the message at this stream sequence as a JSON document.
    Get {
        /// The message's sequence in the stream.
        sequence: u64,
    },
}

/// Runs `outboxd stream …`.
pub async fn run(settings: Settings, command: StreamCommand) -> anyhow::Result<()> {
    if settings.nats.url.is_empty() {
        bail!("stream needs NATS: set NATS_URL (or [nats] url)");
    }
    // The arguments are checked before anything connects.
    if let StreamCommand::Tail {
        last, since_secs, ..
    } = &command
    {
        if !(1..=604_800).contains(since_secs) {
            bail!("--since-secs {since_secs} is not between 1 and 604800 (a week)");
        }
        if !(1..=outbox_nats::peek::MAX_MESSAGES).contains(last) {
            bail!(
                "--last {last} is not between 1 and {}",
                outbox_nats::peek::MAX_MESSAGES
            );
        }
    }
    let client = outbox_nats::connect_with(&settings.nats.url, true).await?;
    let js = async_nats::jetstream::new(client);
    let stream = settings.nats.stream.name.clone();
    match command {
        StreamCommand::Tail {
            app,
            subject,
            last,
            since_secs,
        } => {
            let reader = outboxd::stream_reads::NatsStreamReader {
                js: js.clone(),
                stream: stream.clone(),
                template: SubjectTemplate::parse(&settings.nats.subject_template)?,
            };
            let since = Duration::from_secs(since_secs);
            let messages = reader.tail(&app, &subject, last, since).await?;
            if messages.is_empty() {
                // Said on stderr, so a pipe still reads nothing: an app's
                // slug typed wrong reads as an empty stream otherwise.
                eprintln!(
                    "no message of app {app:?} matching {subject:?} in the last {since_secs} s of stream {stream} (`outboxd app list` shows the apps' slugs)"
                );
            }
            for message in messages {
                println!("{}", serde_json::to_string(&message)?);
            }
        }
        StreamCommand::Get { sequence } => {
            let message = outbox_nats::peek::get(&js, &stream, sequence)
                .await?
                .with_context(|| format!("stream {stream} has no message {sequence}"))?;
            println!("{}", serde_json::to_string_pretty(&message)?);
        }
    }
    Ok(())
}
