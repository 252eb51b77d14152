//! Ad-hoc reads of what was relayed, for operators: the latest messages of
//! one tenant's subjects through an ephemeral consumer of this read's own
//! (a unique name, no acks, a short inactivity limit so the server drops it
//! if this process cannot), bounded in count and time and deleted
//! afterwards; and one message by its stream sequence. The durable
//! consumers are never touched.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use serde::Serialize;

use crate::Error;

/// The most messages one read returns.
pub const MAX_MESSAGES: usize = 100;

/// One message as an operator reads it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Peeked {
    /// Its subject.
    pub subject: String,
    /// Its sequence in the stream.
    pub stream_sequence: u64,
    /// When the stream stored it.
    pub published_at: chrono::DateTime<chrono::Utc>,
    /// Its headers (first value of each).
    pub headers: BTreeMap<String, String>,
    /// Its body: JSON when it parses, else the text.
    pub payload: serde_json::Value,
}

/// What to read.
#[derive(Debug, Clone)]
pub struct PeekRequest {
    /// The stream.
    pub stream: String,
    /// The subject filter (NATS wildcards), within one tenant's subjects.
    pub filter: String,
    /// Names the read in its consumer's name: the tenant and the purpose.
    pub purpose: String,
    /// At most this many, the latest (1..=[`MAX_MESSAGES`]).
    pub last: usize,
    /// Messages stored at most this long ago.
    pub since: Duration,
    /// The longest the read waits for messages.
    pub timeout: Duration,
}

/// The stream, or an error that says what a missing one means.
async fn open(js: &jetstream::Context, name: &str) -> Result<jetstream::stream::Stream, Error> {
    js.get_stream(name).await.map_err(|e| {
        if e.to_string().contains("stream not found") {
            Error::JetStream(format!(
                "stream {name} does not exist yet: outboxd run creates it when it first connects to NATS"
            ))
        } else {
            Error::JetStream(format!("stream {name}: {e}"))
        }
    })
}

fn body(payload: &[u8]) -> serde_json::Value {
    serde_json::from_slice(payload).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(payload).into_owned())
    })
}

fn headers(map: Option<&async_nats::HeaderMap>) -> BTreeMap<String, String> {
    map.map(|h| {
        h.iter()
            .filter_map(|(k, v)| Some((k.to_string(), v.first()?.as_str().to_owned())))
            .collect()
    })
    .unwrap_or_default()
}

/// The latest `last` messages matching the filter stored within `since`,
/// oldest first — of at most ten pages of 1,000 read forward from `since`
/// within the timeout: on a busy subject, a shorter `since` reaches the
/// newest.
pub async fn tail(js: &jetstream::Context, request: &PeekRequest) -> Result<Vec<Peeked>, Error> {
    let failed = |what: &str, e: &dyn std::fmt::Display| Error::JetStream(format!("{what}: {e}"));
    let stream = open(js, &request.stream).await?;
    let name = format!(
        "peek-{}-{}",
        request
            .purpose
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            })
            .collect::<String>(),
        uuid::Uuid::now_v7().simple()
    );
    let since = chrono::Duration::from_std(request.since).unwrap_or(chrono::Duration::hours(1));
    let now = chrono::Utc::now();
    let start = now.checked_sub_signed(since).unwrap_or(now);
    let consumer = stream
        .create_consumer(pull::Config {
            name: Some(name.clone()),
            filter_subject: request.filter.clone(),
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartTime { start_time: start },
            ack_policy: jetstream::consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            memory_storage: true,
            ..Default::default()
        })
        .await
        .map_err(|e| failed("creating the read's consumer", &e))?;
    let last = request.last.clamp(1, MAX_MESSAGES);
    let mut kept: std::collections::VecDeque<Peeked> = std::collections::VecDeque::new();
    let read = async {
        // Up to ten pages of the bound: enough to reach the latest of a
        // busy hour without reading it all.
        for _ in 0..10 {
            let mut batch = consumer
                .fetch()
                .max_messages(MAX_MESSAGES * 10)
                .expires(Duration::from_millis(300))
                .messages()
                .await
                .map_err(|e| failed("reading", &e))?;
            let mut got = 0;
            while let Some(message) = batch.next().await {
                let message = message.map_err(|e| failed("reading", &e))?;
                got += 1;
                let info = message.info().map_err(|e| failed("reading", &e))?;
                kept.push_back(Peeked {
                    subject: message.subject.to_string(),
                    stream_sequence: info.stream_sequence,
                    published_at: info.published,
                    headers: headers(message.headers.as_ref()),
                    payload: body(&message.payload),
                });
                if kept.len() > last {
                    kept.pop_front();
                }
            }
            if got == 0 {
                break;
            }
        }
        Ok::<(), Error>(())
    };
    let outcome = tokio::time::timeout(request.timeout, read).await;
    // Best effort: the server drops it after 30 s idle anyway.
    let _ = stream.delete_consumer(&name).await;
    // Past the time limit, what was read so far is the answer.
    if let Ok(result) = outcome {
        result?;
    }
    Ok(kept.into_iter().collect())
}

/// The message at `sequence` of `stream`, if it is still there.
pub async fn get(
    js: &jetstream::Context,
    stream: &str,
    sequence: u64,
) -> Result<Option<Peeked>, Error> {
    let failed = |e: &dyn std::fmt::Display| Error::JetStream(format!("stream {stream}: {e}"));
    let stream = open(js, stream).await?;
    match stream.get_raw_message(sequence).await {
        Ok(message) => Ok(Some(Peeked {
            subject: message.subject.to_string(),
            stream_sequence: message.sequence,
            published_at: message.time,
            headers: headers(Some(&message.headers)),
            payload: body(&message.payload),
        })),
        Err(e)
            if matches!(
                e.kind(),
                jetstream::stream::LastRawMessageErrorKind::NoMessageFound
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(failed(&e)),
    }
}
