//! `outboxd stream tail|get`: read what was relayed, as an operator, without
//! touching the durable consumers (see `outbox_nats::peek`).

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use outbox_admin::StreamReader;
use outbox_nats::subject::SubjectTemplate;
use outboxd::config::Settings;

/// The most `--last` takes: what a read of the stream returns at most.
const MAX_LAST: u16 = outbox_nats::peek::MAX_MESSAGES as u16;
const _: () = assert!(outbox_nats::peek::MAX_MESSAGES <= u16::MAX as usize);

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
        #[arg(long, default_value_t = 10, allow_negative_numbers = true,
              value_parser = super::number_in(1u16, MAX_LAST))]
        last: u16,
        /// Only messages stored at most this many seconds ago (1..=604800, a week).
        #[arg(long, default_value_t = 3600, allow_negative_numbers = true,
              value_parser = super::number_in(1u32, 604_800))]
        since_secs: u32,
    },
    /// Print the message at this stream sequence as a JSON document.
    Get {
        /// The message's sequence in the stream (1 for the first message).
        #[arg(allow_negative_numbers = true, value_parser = super::number_in(1u64, u64::MAX))]
        sequence: u64,
    },
}

/// Runs `outboxd stream …`.
pub async fn run(settings: Settings, command: StreamCommand) -> anyhow::Result<()> {
    if settings.nats.url.is_empty() {
        bail!("stream needs NATS: set NATS_URL (or [nats] url)");
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
            let since = Duration::from_secs(u64::from(since_secs));
            let messages = reader
                .tail(&app, &subject, usize::from(last), since)
                .await?;
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
