//! outboxd's NATS JetStream adapter: the only crate that speaks NATS.
//!
//! Relay every topic without an in-process handler, and consume it back in
//! another service:
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool, contract: outbox_nats::StreamContract) -> Result<(), Box<dyn std::error::Error>> {
//! let js = async_nats::jetstream::new(outbox_nats::connect("nats://127.0.0.1:4222").await?);
//! outbox_nats::ensure_stream(&js, &contract).await?;
//! let mut registry = outbox_dispatch::Registry::new();
//! registry.fallback(outbox_nats::Relay::new(js.clone(), pool.clone(), Default::default()));
//!
//! let consumer = outbox_nats::ConsumerRuntime::new(js, pool, outbox_nats::ConsumerConfig::default())
//!     .route("tenant.*.order.created", |d: outbox_nats::Delivery| async move {
//!         println!("order from {}: {}", d.tenant, d.payload);
//!         Ok::<(), outbox_nats::HandlerError>(())
//!     });
//! consumer.run(async { tokio::signal::ctrl_c().await.ok(); }).await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`contract`]: the stream contract — created when missing, validated when
//!   present; a mismatch is a start-up error that names every differing field.
//! - [`consumer`]: the consumer runtime for services that consume what
//!   outboxd relays (durable pull consumer, explicit acks, dead letters,
//!   de-duplication).
//! - [`headers`]: the headers of the wire contract, named once, with the
//!   helpers that put them on a message and read them back.
//! - [`subject`]: the subject of a relayed row, from a template checked at
//!   start-up that may use fields of the row.
//! - [`peek`]: operators' ad-hoc reads of what was relayed (ephemeral
//!   consumers of their own, bounded, deleted afterwards).
//! - [`relay`]: the relay sink — a dispatcher handler that publishes an outbox
//!   row to a tenant-first subject with `Nats-Msg-Id` = outbox id and returns
//!   only after the PubAck, so the row is deleted only once JetStream has it.
//!
//! A crash between the PubAck and the row's deletion re-publishes the row;
//! the stream's duplicate window drops the copy because the `Nats-Msg-Id` is
//! the same.

pub mod consumer;
pub mod contract;
pub mod headers;
pub mod peek;
pub mod relay;
pub mod subject;

pub use consumer::{ConsumerConfig, ConsumerRuntime, Delivery, HandlerError, durable_name};
pub use contract::{StreamContract, ensure_stream};
pub use headers::new_traceparent;
pub use relay::{PublishStatus, Relay, RelayConfig};

/// Errors of the NATS adapter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting to the server failed.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// The server URL.
        url: String,
        /// Why.
        source: async_nats::ConnectError,
    },
    /// The stream exists with settings other than the configured ones.
    #[error("stream {stream:?} differs from the configured contract: {}", .fields.join("; "))]
    StreamMismatch {
        /// The stream name.
        stream: String,
        /// One entry per differing field: `field: configured X, server Y`.
        fields: Vec<String>,
    },
    /// A JetStream API request failed.
    #[error("JetStream request failed: {0}")]
    JetStream(String),
    /// The configuration is invalid.
    #[error("invalid NATS configuration: {0}")]
    Config(String),
}

/// `urls` (comma-separated server URLs) as errors show them: each
/// without its password or token (`nats://user:secret@h` → `nats://user@h`).
fn without_passwords(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let url = url.trim();
            match (url.find("://"), url.rfind('@')) {
                (Some(scheme), Some(at)) if at > scheme => {
                    let user = url[scheme + 3..at].split(':').next().unwrap_or_default();
                    format!("{}{user}@{}", &url[..scheme + 3], &url[at + 1..])
                }
                _ => url.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Connects with explicit reconnect backoff (capped at 5 s) and a name that
/// shows in the server's connection list. `urls` may list several servers of
/// a cluster, comma-separated.
pub async fn connect(urls: &str) -> Result<async_nats::Client, Error> {
    connect_with(urls, false).await
}

/// [`connect`]; with `fail_fast`, a server that cannot be reached at the
/// first attempt is an error at once instead of a reconnect loop in the
/// background (for tests and development; reconnects after a first
/// connection keep their backoff).
pub async fn connect_with(urls: &str, fail_fast: bool) -> Result<async_nats::Client, Error> {
    let servers = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| Error::Config(format!("{u:?} is not a NATS server address: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if servers.is_empty() {
        return Err(Error::Config("no NATS server address given".into()));
    }
    // A lost connection is what an operator needs to see first when relayed
    // rows stop moving: the client reports it at INFO only.
    let options = async_nats::ConnectOptions::new()
        .name("outboxd")
        // A half-open connection (a partition rather than a stopped server)
        // is noticed within two pings instead of the client's default two
        // minutes, so the relay stops publishing into a dead socket.
        .ping_interval(std::time::Duration::from_secs(10))
        .event_callback({
            // The first connection is the caller's to report (the daemon
            // says what it relays; a one-shot reader says nothing); the
            // ones after a loss are news.
            let connected_before = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            move |event| {
                let connected_before = connected_before.clone();
                async move {
                    match event {
                        async_nats::Event::Disconnected => tracing::warn!(
                            "NATS connection lost: relaying and consuming wait until it is back (relayed rows spend no attempt meanwhile)"
                        ),
                        async_nats::Event::Connected => {
                            if connected_before.swap(true, std::sync::atomic::Ordering::Relaxed) {
                                tracing::info!("NATS connection re-established");
                            } else {
                                tracing::debug!("NATS connection established");
                            }
                        }
                        // The client closing (a one-shot reader done) is
                        // not news.
                        async_nats::Event::Closed => tracing::debug!("NATS client closed"),
                        other => tracing::info!(event = %other, "NATS client event"),
                    }
                }
            }
        });
    let options = if fail_fast {
        options.connection_timeout(std::time::Duration::from_secs(2))
    } else {
        options.retry_on_initial_connect()
    };
    options
        .reconnect_delay_callback(|attempts| {
            outbox_core::store::listen::reconnect_pause(u32::try_from(attempts).unwrap_or(u32::MAX))
                .min(std::time::Duration::from_secs(5))
        })
        .connect(servers)
        .await
        .map_err(|source| Error::Connect {
            url: without_passwords(urls),
            source,
        })
}

/// Describes the relay's and the consumer runtime's metrics (the exporter
/// prints these as `# HELP`). Call once, after installing a recorder.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_histogram};
    describe_histogram!(
        "outboxd_publish_duration_seconds",
        metrics::Unit::Seconds,
        "JetStream publish time, until the PubAck."
    );
    describe_counter!(
        "outboxd_published_total",
        "Events relayed to JetStream (PubAck received)."
    );
    describe_counter!(
        "outboxd_publish_deferred_total",
        "Relay attempts put off, without spending an attempt, because the NATS connection was down."
    );
    describe_counter!(
        "outboxd_published_duplicates_total",
        "Relayed events the stream had already (dropped by its duplicate window)."
    );
    describe_counter!(
        "outboxd_consumer_consumed_total",
        "Messages the consumer runtime handled and acked."
    );
    describe_counter!(
        "outboxd_consumer_retried_total",
        "Messages nak'ed for redelivery."
    );
    describe_counter!(
        "outboxd_consumer_dead_lettered_total",
        "Messages given up and written to dead_letters."
    );
    describe_counter!(
        "outboxd_consumer_poisoned_total",
        "Unknown or undecodable messages, terminated."
    );
    describe_counter!(
        "outboxd_consumer_tenant_rejected_total",
        "Messages whose tenant header disagreed with the subject, terminated."
    );
    describe_counter!(
        "outboxd_consumer_unknown_tenant_total",
        "Messages whose tenant has no app: terminated, parked as dead letters of the reserved app _unrouted."
    );
    describe_counter!(
        "outboxd_consumer_deduped_total",
        "Messages skipped as already processed (de-duplication)."
    );
}
