//! Connecting the durable pull consumer, the run loop, and sending each
//! message's ack / nak / term.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::{ConsumerRuntime, Verdict};
use crate::Error;

/// `+TERM <reason>`: async-nats has no term-with-reason, so send the ack body
/// to the message's reply subject ourselves.
async fn term(message: &jetstream::Message, reason: &str) -> Result<(), async_nats::Error> {
    let Some(reply) = message.message.reply.clone() else {
        return message.ack_with(AckKind::Term).await;
    };
    let reason: String = reason
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    message
        .context
        .client()
        .publish(reply, format!("+TERM {reason}").into())
        .await?;
    Ok(())
}

impl ConsumerRuntime {
    /// Creates the durable pull consumer, or binds to the existing one.
    pub async fn consumer(&self) -> Result<jetstream::consumer::Consumer<pull::Config>, Error> {
        let c = &self.config;
        let stream = self
            .js
            .get_stream(&c.stream)
            .await
            .map_err(|e| Error::JetStream(format!("get stream {}: {e}", c.stream)))?;
        stream
            .get_or_create_consumer(
                &c.durable,
                pull::Config {
                    durable_name: Some(c.durable.clone()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: c.ack_wait,
                    // The runtime enforces max_deliver itself: a message whose
                    // dead letter could not be written is nak'ed, and must
                    // still be redelivered after its last allowed delivery.
                    max_deliver: -1,
                    max_ack_pending: c.concurrency as i64,
                    filter_subjects: c.filter_subjects.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| Error::JetStream(format!("consumer {}: {e}", c.durable)))
    }

    /// Consumes until `shutdown` completes, then lets running handlers
    /// finish within `drain_grace`. Outages are retried with backoff.
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let permits = Arc::new(Semaphore::new(self.config.concurrency));
        let mut tasks = JoinSet::new();
        let mut failures = 0u32;
        tokio::pin!(shutdown);
        'outer: loop {
            let consumer = match self.consumer().await {
                Ok(c) => c,
                Err(err) => {
                    failures = failures.saturating_add(1);
                    let pause = Duration::from_millis((200u64 << failures.min(5)).min(5000));
                    warn!(error = %err, ?pause, "consumer unavailable; retrying");
                    tokio::select! {
                        () = &mut shutdown => break 'outer,
                        () = tokio::time::sleep(pause) => continue 'outer,
                    }
                }
            };
            let mut messages = match consumer
                .stream()
                .max_messages_per_batch(self.config.batch)
                .messages()
                .await
            {
                Ok(m) => m,
                Err(err) => {
                    failures = failures.saturating_add(1);
                    warn!(error = %err, "cannot pull messages; retrying");
                    tokio::select! {
                        () = &mut shutdown => break 'outer,
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue 'outer,
                    }
                }
            };
            info!(durable = %self.config.durable, stream = %self.config.stream, "consuming");
            loop {
                let permit = tokio::select! {
                    () = &mut shutdown => break 'outer,
                    p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break 'outer },
                };
                let next = tokio::select! {
                    () = &mut shutdown => break 'outer,
                    next = messages.next() => next,
                };
                match next {
                    Some(Ok(message)) => {
                        failures = 0;
                        let runtime = self.clone();
                        tasks.spawn(async move {
                            runtime.process(message).await;
                            drop(permit);
                        });
                    }
                    Some(Err(err)) => {
                        warn!(error = %err, "pull failed; re-subscribing");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue 'outer;
                    }
                    None => continue 'outer,
                }
                while tasks.try_join_next().is_some() {}
            }
        }
        let deadline = tokio::time::Instant::now() + self.config.drain_grace;
        while !tasks.is_empty() {
            if tokio::time::timeout_at(deadline, tasks.join_next())
                .await
                .is_err()
            {
                // Unacked messages are redelivered after ack_wait.
                tasks.abort_all();
            }
        }
        Ok(())
    }

    /// Handles one message end to end, including its ack/nak/term.
    pub async fn process(&self, message: jetstream::Message) {
        let verdict = self.decide(&message).await;
        let (label, sent) = match &verdict {
            Verdict::Ack => (
                "ack",
                tokio::time::timeout(self.config.ack_timeout, message.ack_with(AckKind::Ack)).await,
            ),
            Verdict::Nak(delay) => (
                "nak",
                tokio::time::timeout(
                    self.config.ack_timeout,
                    message.ack_with(AckKind::Nak(Some(*delay))),
                )
                .await,
            ),
            Verdict::Term(reason) => (
                "term",
                tokio::time::timeout(self.config.ack_timeout, term(&message, reason)).await,
            ),
        };
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                warn!(subject = %message.subject, error = %err, ack = label, "ack failed; the server redelivers after ack_wait")
            }
            Err(_) => {
                warn!(subject = %message.subject, ack = label, "ack timed out; the server redelivers after ack_wait")
            }
        }
    }

    pub(super) fn nak_delay(&self, delivered: i64) -> Duration {
        let exp = (delivered.max(1) - 1).min(20) as u32;
        self.config
            .nak_base
            .checked_mul(1u32 << exp)
            .map_or(self.config.nak_max, |d| d.min(self.config.nak_max))
    }
}
