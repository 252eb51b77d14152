//! The operational HTTP endpoints: `/healthz` (the process is up; its body
//! tells the NATS connection's state and the last acknowledged publish),
//! `/readyz` (PostgreSQL, and NATS when configured, answer) and `/metrics`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

#[derive(Clone)]
struct AppState {
    pool: PgPool,
    metrics: PrometheusHandle,
    // Present when NATS is configured; readiness then includes it.
    nats: Option<NatsHealth>,
}

/// What the health endpoints know of NATS.
#[derive(Clone)]
pub struct NatsHealth {
    /// The connection.
    pub client: async_nats::Client,
    /// The relay's last acknowledged publish, and whether the stream
    /// contract is checked.
    pub published: outbox_nats::PublishStatus,
}

impl NatsHealth {
    /// Connected, and the stream checked: relaying can go on.
    fn connected(&self) -> bool {
        self.published.may_publish(&self.client)
    }
}

/// Histogram buckets for handler and publish durations, in seconds: from
/// a millisecond to half a minute (handler_timeout's default is 30 s).
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Histogram buckets for how long rows wait to start, in seconds: from a
/// few milliseconds (a sleeping dispatcher woken) to an hour (a backlog).
const WAIT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Installs the Prometheus recorder (histograms with buckets, so they can
/// be summed across processes) and describes every metric outboxd exports.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    use anyhow::Context;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(DURATION_BUCKETS)
        .context("setting histogram buckets")?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("outboxd_queue_wait_seconds".into()),
            WAIT_BUCKETS,
        )
        .context("setting the queue wait's buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    outbox_dispatch::telemetry::describe();
    outbox_nats::describe_metrics();
    metrics::describe_gauge!(
        "outboxd_oldest_due_age_seconds",
        metrics::Unit::Seconds,
        "Age of the oldest row that is due (0 when none), paused topics and suspended apps left out, read at scrape time."
    );
    metrics::describe_gauge!(
        "outboxd_dead_letters_unresolved",
        "Unresolved dead letters per app, read at scrape time."
    );
    metrics::describe_gauge!(
        "outboxd_table_dead_tuples",
        "Dead tuples of outboxd's tables (PostgreSQL statistics), read at scrape time."
    );
    metrics::describe_gauge!(
        "outboxd_database_up",
        "1 when this scrape read PostgreSQL within its budget; 0 when it did not (the gauges read at scrape time then keep their last values)."
    );
    metrics::describe_gauge!(
        "outboxd_nats_connected",
        "1 while the NATS connection is up and the stream contract checked, 0 otherwise (only when NATS is configured)."
    );
    Ok(handle)
}

/// What the server serves: every route, and the probes alone for the
/// connections of the reserve (see [`PROBE_CONNECTIONS`]).
#[derive(Clone)]
pub struct Routes {
    all: Router,
    probes: Router,
}

/// The routes, for serving and for tests; `admin` adds the admin API and
/// dashboard.
pub fn router(
    pool: PgPool,
    metrics: PrometheusHandle,
    nats: Option<NatsHealth>,
    admin: Option<Router>,
) -> Routes {
    let ops = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AppState {
            pool,
            metrics,
            nats,
        });
    let probes = ops.clone().fallback(busy);
    let all = match admin {
        Some(admin) => ops.merge(admin),
        None => ops,
    };
    let nosniff = axum::middleware::map_response(nosniff);
    Routes {
        all: all.layer(nosniff.clone()),
        probes: probes.layer(nosniff),
    }
}

/// Every answer says what it is and may not be read as anything else (the
/// admin's answers say so already; the probes, `/metrics` and the fallbacks
/// did not).
async fn nosniff(mut res: axum::response::Response) -> axum::response::Response {
    res.headers_mut()
        .entry(axum::http::header::X_CONTENT_TYPE_OPTIONS)
        .or_insert(axum::http::HeaderValue::from_static("nosniff"));
    res
}

/// What a connection of the reserve answers for anything but a probe.
async fn busy() -> impl IntoResponse {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [("retry-after", "1")],
        Json(serde_json::json!({ "error": {
            "code": "busy",
            "message": "every connection of http.max_connections is in use; try again",
        }})),
    )
}

/// Connections kept for `/healthz`, `/readyz` and `/metrics` beyond
/// `http.max_connections`: long requests (synchronous invokes wait up to a
/// minute) filling every slot must not make an orchestrator think the
/// process is dead and restart it. Such a connection serves one request,
/// probes only (anything else answers 503 `busy`), and gets
/// [`PROBE_HEADER_READ_TIMEOUT`] for its headers.
pub const PROBE_CONNECTIONS: usize = 16;

/// How long a connection of the reserve waits for its request's headers.
pub const PROBE_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a write on a connection of the reserve may make no progress: a
/// client that asks for `/metrics` there and reads nothing would otherwise
/// hold a probe's slot for [`WRITE_STALL_TIMEOUT`].
pub const PROBE_WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a client has to send a request's headers, counted from when the
/// server starts waiting for them, so also how long a kept-alive connection
/// may sit idle: a client that holds a connection without finishing a
/// request loses it.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client has to send a request's body, from its headers: a
/// body trickled in byte by byte would hold its connection, and a slot of
/// `http.max_connections`, for ever. 30 s is a megabyte at 35 kB/s.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a write to a client may make no progress: a client that stops
/// reading its responses (pipelining requests it never reads the answers
/// of, or a large read it walks away from) would otherwise hold its
/// connection, and a slot of `http.max_connections`, for ever. Long
/// responses that the client reads are not cut: see [`SEND_BUFFER_BYTES`].
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The send buffer asked for each connection. A write that found the buffer
/// full can go on once about a third of it has gone to the client, so this
/// sets what "progress" means: with the system's default (buffers that grow
/// to megabytes), a client reading 40 KB/s made none for 30 s and was cut.
/// Linux doubles the value asked: about 43 KB must go in
/// [`WRITE_STALL_TIMEOUT`], 1.5 KB/s. The answers here are small pages,
/// and 128 KB in flight still fill a 10 MB/s link at 10 ms.
pub const SEND_BUFFER_BYTES: usize = 64 * 1024;

/// How long a shutdown waits for open connections to finish their request:
/// the longest a request waits by design (a synchronous invoke) and a
/// little more.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(65);

/// Binds `addr` and serves until `shutdown` completes, at most
/// `max_connections` connections at once, and [`PROBE_CONNECTIONS`] more for
/// the probes (further clients wait in the listen queue); returns the bound
/// address before serving (port 0 picks a free port). At shutdown it stops
/// accepting, lets each connection finish its request, and returns when all
/// are closed.
pub async fn serve(
    addr: SocketAddr,
    routes: Routes,
    max_connections: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(accept(listener, routes, max_connections.max(1), shutdown));
    Ok((bound, task))
}

/// The slot a connection holds while it is open.
struct Slot {
    // Given back when the connection closes.
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// One of [`PROBE_CONNECTIONS`]; else one of `http.max_connections`,
    /// for every route, kept alive.
    probes_only: bool,
}

async fn accept(
    listener: tokio::net::TcpListener,
    routes: Routes,
    max_connections: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use std::sync::Arc;
    use tokio::sync::Semaphore;
    let slots = Arc::new(Semaphore::new(max_connections));
    let probe_slots = Arc::new(Semaphore::new(PROBE_CONNECTIONS));
    let closing = tokio_util::sync::CancellationToken::new();
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            biased;
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(permit) => Slot { _permit: permit, probes_only: false },
                Err(_) => break,
            },
            slot = probe_slots.clone().acquire_owned() => match slot {
                Ok(permit) => Slot { _permit: permit, probes_only: true },
                Err(_) => break,
            },
        };
        let (stream, remote) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors, or a connection reset before it
                    // was taken: the listener itself is fine.
                    tracing::warn!(error = %err, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // A slot of the reserve taken while all were busy: one may have
        // come free while the client connected.
        let slot = match slot.probes_only.then(|| slots.clone().try_acquire_owned()) {
            Some(Ok(permit)) => Slot {
                _permit: permit,
                probes_only: false,
            },
            _ => slot,
        };
        let _ = stream.set_nodelay(true);
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER_BYTES);
        tokio::spawn(serve_connection(
            stream,
            remote,
            routes.clone(),
            closing.clone(),
            slot,
        ));
    }
    // Refused from now on, so clients go elsewhere instead of waiting in
    // the listen queue of a process that will not accept them.
    drop(listener);
    closing.cancel();
    // Every connection gives its slot back when it closes.
    let all = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let closed = async {
        let _ = slots.acquire_many(all(max_connections)).await;
        let _ = probe_slots.acquire_many(all(PROBE_CONNECTIONS)).await;
    };
    if tokio::time::timeout(SHUTDOWN_WAIT, closed).await.is_err() {
        tracing::warn!(
            "HTTP connections still open {SHUTDOWN_WAIT:?} after the shutdown began: closing them"
        );
    }
    Ok(())
}

/// A request body that fails once [`BODY_READ_TIMEOUT`] has passed
/// since the request arrived without it having ended.
struct BodyWithDeadline {
    inner: hyper::body::Incoming,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

/// Why a request body was cut off.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
struct BodyTooSlow(Duration);

impl hyper::body::Body for BodyWithDeadline {
    type Data = hyper::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::future::Future;
        if self.deadline.as_mut().poll(cx).is_ready() && !self.inner.is_end_stream() {
            return std::task::Poll::Ready(Some(Err(Box::new(BodyTooSlow(BODY_READ_TIMEOUT)))));
        }
        std::pin::Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A connection whose writes fail once one has waited `limit` without the
/// client taking a byte.
struct WriteStallLimit {
    inner: tokio::net::TcpStream,
    limit: Duration,
    // Since the first write that found the client's window full.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl WriteStallLimit {
    /// `progress`, unless it is pending and has been since the limit.
    fn limit<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        progress: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future;
        if progress.is_ready() {
            self.stalled = None;
            return progress;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if stalled.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing for {limit:?}"),
            )));
        }
        std::task::Poll::Pending
    }
}

impl tokio::io::AsyncRead for WriteStallLimit {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WriteStallLimit {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let progress = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.limit(cx, progress)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let progress = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.limit(cx, progress)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let progress = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.limit(cx, progress)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    routes: Routes,
    closing: tokio_util::sync::CancellationToken,
    slot: Slot,
) {
    use tower::ServiceExt;
    let (router, header_read_timeout, write_stall, keep_alive) = if slot.probes_only {
        (
            routes.probes,
            PROBE_HEADER_READ_TIMEOUT,
            PROBE_WRITE_STALL_TIMEOUT,
            false,
        )
    } else {
        (routes.all, HEADER_READ_TIMEOUT, WRITE_STALL_TIMEOUT, true)
    };
    // Connect info gives the login rate limiter the client address.
    let service =
        hyper::service::service_fn(move |req: axum::extract::Request<hyper::body::Incoming>| {
            let mut req = req.map(|inner| {
                axum::body::Body::new(BodyWithDeadline {
                    inner,
                    deadline: Box::pin(tokio::time::sleep(BODY_READ_TIMEOUT)),
                })
            });
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(remote));
            router.clone().oneshot(req)
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(keep_alive);
    let stream = WriteStallLimit {
        inner: stream,
        limit: write_stall,
        stalled: None,
    };
    let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(connection);
    let outcome = tokio::select! {
        outcome = connection.as_mut() => outcome,
        () = closing.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = outcome {
        tracing::debug!(error = %err, %remote, "HTTP connection ended with an error");
    }
    drop(slot);
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let check = tokio::time::timeout(
        Duration::from_secs(2),
        outbox_core::store::schema_is_current(&state.pool),
    )
    .await;
    // An unmigrated database (or a restore without the outbox) answers, but
    // nothing can be claimed or written there: not ready (the log says to
    // run `outboxd migrate`).
    let schema_ok = match check {
        Ok(Ok(current)) => Some(current),
        Ok(Err(err)) => {
            tracing::debug!(error = %err, "readiness: the database did not answer");
            None
        }
        Err(_) => None,
    };
    let postgres_ok = schema_ok.is_some();
    let nats_ok = state.nats.as_ref().map(NatsHealth::connected);
    let ready = schema_ok == Some(true) && nats_ok.unwrap_or(true);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({
            "ready": ready,
            "postgres": postgres_ok,
            "schema": schema_ok,
            "nats": nats_ok,
        })),
    )
}

/// Always 200 while the process serves; the body says how NATS is doing
/// (null without NATS): its connection state and the last publish the
/// stream acknowledged.
async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let nats = state.nats.as_ref().map(|n| {
        let connection = match n.client.connection_state() {
            async_nats::connection::State::Connected => "connected",
            async_nats::connection::State::Disconnected => "disconnected",
            async_nats::connection::State::Pending => "connecting",
        };
        serde_json::json!({
            "connection": connection,
            "stream_checked": !n.published.stream_check_pending(),
            "last_publish_at": n.published.last_publish_at(),
        })
    });
    Json(serde_json::json!({ "status": "ok", "nats": nats }))
}

/// How long a scrape waits for PostgreSQL: well inside Prometheus's default
/// scrape timeout (10 s), so a database outage still gets every other metric
/// through, with `outboxd_database_up 0`.
const SCRAPE_DATABASE_BUDGET: std::time::Duration = std::time::Duration::from_secs(2);

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    // Gauges that describe the database are read at scrape time, at once.
    let reads = async {
        tokio::join!(
            outbox_core::store::outbox::oldest_due_age(&state.pool),
            outbox_core::store::dead_letters::unresolved_by_app(&state.pool),
            outbox_core::store::retention::dead_tuples(&state.pool),
        )
    };
    let database_up = match tokio::time::timeout(SCRAPE_DATABASE_BUDGET, reads).await {
        Ok((age, unresolved, dead_tuples)) => {
            let up = age.is_ok() && unresolved.is_ok() && dead_tuples.is_ok();
            if let Ok(age) = age {
                metrics::gauge!("outboxd_oldest_due_age_seconds").set(age);
            }
            for (app, count) in unresolved.unwrap_or_default() {
                metrics::gauge!("outboxd_dead_letters_unresolved", "app" => app).set(count as f64);
            }
            for (table, dead) in dead_tuples.unwrap_or_default() {
                metrics::gauge!("outboxd_table_dead_tuples", "table" => table).set(dead as f64);
            }
            up
        }
        Err(_) => false,
    };
    metrics::gauge!("outboxd_database_up").set(f64::from(u8::from(database_up)));
    if let Some(nats) = &state.nats {
        metrics::gauge!("outboxd_nats_connected").set(f64::from(u8::from(nats.connected())));
    }
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
