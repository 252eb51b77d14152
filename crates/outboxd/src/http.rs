//! The operational HTTP endpoints: `/healthz`, `/readyz`, `/metrics`.

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
    // Present when NATS is required (relaying); readiness then includes it.
    nats: Option<async_nats::Client>,
}

/// The router, for serving and for tests; `admin` adds the admin API and dashboard.
pub fn router(
    pool: PgPool,
    metrics: PrometheusHandle,
    nats: Option<async_nats::Client>,
    admin: Option<Router>,
) -> Router {
    let ops = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AppState {
            pool,
            metrics,
            nats,
        });
    match admin {
        Some(admin) => ops.merge(admin),
        None => ops,
    }
}

/// Binds `addr` and serves until `shutdown` completes; returns the bound address
/// through `bound` before serving (port 0 picks a free port).
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        // Connect info gives the login rate limiter the client address.
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await
    });
    Ok((bound, task))
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let check = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pool),
    )
    .await;
    let postgres_ok = matches!(check, Ok(Ok(1)));
    let nats_ok = state
        .nats
        .as_ref()
        .map(|client| client.connection_state() == async_nats::connection::State::Connected);
    let ready = postgres_ok && nats_ok.unwrap_or(true);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({ "ready": ready, "postgres": postgres_ok, "nats": nats_ok })),
    )
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    // Gauges that describe the database are read at scrape time.
    if let Ok(age) = outbox_core::store::outbox::oldest_due_age(&state.pool).await {
        metrics::gauge!("outboxd_oldest_due_age_seconds").set(age);
    }
    if let Ok(rows) = outbox_core::store::dead_letters::unresolved_by_app(&state.pool).await {
        for (app, count) in rows {
            metrics::gauge!("outboxd_dead_letters_unresolved", "app" => app).set(count as f64);
        }
    }
    if let Ok(rows) = outbox_core::store::retention::dead_tuples(&state.pool).await {
        for (table, dead) in rows {
            metrics::gauge!("outboxd_table_dead_tuples", "table" => table).set(dead as f64);
        }
    }
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
