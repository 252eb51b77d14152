//! The example service: `DATABASE_URL` and `JWT_SECRET` (at least 32 bytes)
//! required, `NATS_URL` optional, `LISTEN` (default 127.0.0.1:3000).
//! It migrates outboxd's schema and its own, serves the routes of
//! [`example_social::http`], and runs a dispatcher in transactional mode with
//! the notification handler (and, with NATS, a relay for every other topic)
//! until Ctrl-C or SIGTERM.

use std::time::Duration;

use anyhow::Context;
use example_social::{APP, State, handlers, http};
use outbox_admin::auth::{AuthConfig, Hasher};
use outbox_dispatch::{Config, Dispatcher};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let url = std::env::var("DATABASE_URL").context("set DATABASE_URL")?;
    let secret = std::env::var("JWT_SECRET").context("set JWT_SECRET (at least 32 bytes)")?;
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());

    let pool = sqlx::PgPool::connect(&url)
        .await
        .context("connecting to PostgreSQL")?;
    example_social::migrate(&pool)
        .await
        .context("migrating the database")?;
    let app = outbox_core::store::apps::ensure(&pool, APP, "Social example")
        .await?
        .id;
    let mut auth = AuthConfig::new(secret.into_bytes()).map_err(anyhow::Error::msg)?;
    auth.audience = "social-example".into();
    let state = State {
        pool: pool.clone(),
        app,
        auth,
        hasher: Hasher::new()?,
    };

    // The notification handler; every other topic goes to NATS when configured.
    let mut registry = handlers::notifications(pool.clone());
    if let Ok(nats_url) = std::env::var("NATS_URL") {
        let client = outbox_nats::connect(&nats_url).await?;
        let js = async_nats::jetstream::new(client);
        // outboxd's default stream contract (config/default.toml, [nats.stream]).
        let contract = outbox_nats::StreamContract {
            name: "OUTBOX".into(),
            subjects: vec!["tenant.>".into()],
            retention: async_nats::jetstream::stream::RetentionPolicy::Limits,
            storage: async_nats::jetstream::stream::StorageType::File,
            replicas: 1,
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: -1,
            max_messages: -1,
            duplicate_window: Duration::from_secs(120),
        };
        outbox_nats::ensure_stream(&js, &contract)
            .await
            .context("the NATS stream")?;
        registry.fallback(outbox_nats::Relay::new(
            js,
            pool.clone(),
            Default::default(),
        ));
    }
    let dispatcher = Dispatcher::new(
        pool.clone(),
        registry,
        Config {
            in_transaction: true,
            poll_interval: Duration::from_millis(500),
            ..Config::default()
        },
    )?;

    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    println!("social example on http://{}", listener.local_addr()?);
    let server = axum::serve(listener, http::router(state)).with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    let dispatching = tokio::spawn(async move {
        dispatcher
            .run(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
    });
    server.await?;
    dispatching.await??;
    Ok(())
}
