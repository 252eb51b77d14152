//! The daemon: everything `outboxd run` does, as one library call, so the
//! binary, the demo and the chaos worker start the same thing (the shape of
//! mini-redis's `server::run`).

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use outbox_dispatch::maintenance::{
    Compactor, Replayer, Rotator, Sampler, Scheduler, Supervisor, Sweeper,
};
use outbox_dispatch::{Dispatcher, DrainReport, Registry};
use tracing::info;

use crate::config::Settings;
use crate::{db, http};

/// Runs the dispatcher with `registry`'s handlers, the HTTP endpoints (health,
/// metrics, and the admin API and dashboard when configured), the NATS relay
/// for unhandled topics (when `nats.url` is set), webhook targets (when
/// `webhook.secret` is set) and the maintenance services, until `shutdown`
/// completes; then drains and returns what the dispatcher did.
///
/// Prints `outboxd listening on http://<addr>` once the HTTP endpoints are up.
pub async fn run(
    settings: Settings,
    mut registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<DrainReport> {
    db::require_direct(&settings, "the dispatcher")?;
    let dispatcher_config = settings.dispatcher_config();
    // Before anything starts: a refusal must not leave a server running.
    dispatcher_config.validate()?;
    // The leader's connection leaves the pool while it leads (one more).
    let own = dispatcher_config.own_connections() + 1;
    let pool = db::connect(&settings, own).await?;
    if settings.database.auto_migrate {
        outbox_core::migrate(&pool)
            .await
            .context("migrating on start")?;
        if let Ok(false) = outbox_core::store::schema_is_current(&pool).await {
            tracing::warn!(
                "the database records every migration but lacks outboxd's tables (restored from a dump that left them out?): \
                 /readyz answers 503, and claims and writes fail; restore them, or start from an empty database"
            );
        }
    } else {
        // It keeps running, not ready (`/readyz` 503), so that a roll-out
        // which migrates from another process finds it waiting.
        match outbox_core::store::schema_is_current(&pool).await {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                "the database lacks migrations this version needs, or their tables (database.auto_migrate is off): \
                 run `outboxd migrate` (or restore the tables a dump left out); until then /readyz answers 503, \
                 and claims and writes may fail"
            ),
            Err(err) => tracing::warn!(
                error = %err,
                "could not read the database's migrations (_sqlx_migrations); /readyz answers 503 until it can"
            ),
        }
    }
    let metrics = http::install_metrics()?;

    let stop = outbox_dispatch::cancelled_by(async {
        shutdown.await;
        info!("shutdown signal received");
    });
    // Whatever way this function returns, everything it started stops.
    let _stop_on_return = stop.clone().drop_guard();

    // NATS first: a stream-contract mismatch must stop start-up before
    // anything serves. When no server answers yet (and `nats.fail_fast` is
    // off) the process serves, not ready, and checks the contract once
    // connected; a mismatch found then stops it.
    let publish_status = outbox_nats::PublishStatus::default();
    let mut late_stream_check = None;
    let (nats_client, jetstream) = if settings.nats.url.is_empty() {
        (None, None)
    } else {
        let client = outbox_nats::connect_with(&settings.nats.url, settings.nats.fail_fast).await?;
        let js = async_nats::jetstream::new(client.clone());
        let contract = settings.stream_contract();
        let checked = if settings.nats.fail_fast
            || connected_within(&client, FIRST_CONNECT_WAIT).await
        {
            match outbox_nats::ensure_stream(&js, &contract).await {
                Ok(_) => true,
                // A stream that differs stops start-up; so does any failure
                // when told to fail fast.
                Err(err @ outbox_nats::Error::StreamMismatch { .. }) => {
                    return Err(err).context("checking the NATS stream contract");
                }
                Err(err) if settings.nats.fail_fast => {
                    return Err(err).context("checking the NATS stream contract");
                }
                // JetStream not ready yet (a cluster still forming): as if
                // no server answered.
                Err(err) => {
                    tracing::warn!(error = %err, "the NATS stream contract could not be checked yet");
                    false
                }
            }
        } else {
            false
        };
        if !checked {
            tracing::warn!(
                url = %db::redact_url(&settings.nats.url),
                "NATS does not answer yet: serving with /readyz 503 and relaying nothing; \
                 the stream contract is checked once it does"
            );
            publish_status.hold_until_stream_checked();
            late_stream_check = Some(tokio::spawn(check_stream_once_connected(
                client.clone(),
                js.clone(),
                contract,
                publish_status.clone(),
                stop.clone(),
            )));
        }
        (Some(client), Some(js))
    };

    let admin = match settings.admin_auth() {
        Some(auth) => {
            let mut state = outbox_admin::AdminState::new(pool.clone(), auth)?;
            state.body_limit = usize::try_from(settings.http.max_body_bytes)
                .context("http.max_body_bytes does not fit this machine")?;
            state.api_servers = settings.api_servers();
            if let Some(js) = &jetstream {
                let template =
                    outbox_nats::subject::SubjectTemplate::parse(&settings.nats.subject_template)?;
                state.stream_reader =
                    Some(std::sync::Arc::new(crate::stream_reads::NatsStreamReader {
                        js: js.clone(),
                        stream: settings.nats.stream.name.clone(),
                        template,
                    }));
            }
            Some(outbox_admin::router(state))
        }
        None => {
            tracing::warn!(
                "admin API and dashboard are off: set JWT_SECRET (at least 32 bytes) to turn them on"
            );
            None
        }
    };
    let addr: std::net::SocketAddr = settings
        .http
        .listen
        .parse()
        .context("http.listen is not a socket address")?;
    // The README has demo users export it; in a service unit it would do
    // nothing without a word.
    if let Ok(port) = std::env::var("OUTBOXD_HTTP_PORT")
        && port.trim() != addr.port().to_string()
    {
        tracing::warn!(
            OUTBOXD_HTTP_PORT = %port,
            listen = %addr,
            "OUTBOXD_HTTP_PORT is scripts/demo.sh's knob, not a setting: outboxd listens on http.listen (set OUTBOXD_HTTP__LISTEN)"
        );
    }
    let max_connections = usize::try_from(settings.http.max_connections)
        .context("http.max_connections does not fit this machine")?;
    let (bound, server) = http::serve(
        addr,
        http::router(
            pool.clone(),
            metrics,
            nats_client.map(|client| http::NatsHealth {
                client,
                published: publish_status.clone(),
            }),
            admin,
        ),
        max_connections,
        stop.clone().cancelled_owned(),
    )
    .await
    .with_context(|| {
        format!(
            "cannot listen on {addr} (set http.listen, or OUTBOXD_HTTP__LISTEN, to a free address)"
        )
    })?;
    info!(%bound, "http listening: /healthz /readyz /metrics");
    println!("outboxd listening on http://{bound}");
    if settings.admin_auth().is_some() {
        println!("dashboard: http://{bound}/login");
    }

    if settings.webhook.secret.expose().is_empty() {
        info!(
            "webhook targets without a secret of their own are off: set OUTBOXD_WEBHOOK__SECRET, or create them with `outboxd webhook create`"
        );
    }
    let webhook = outbox_dispatch::targets::Webhook::new(
        settings.webhook.secret.expose().as_bytes().to_vec(),
        Duration::from_millis(settings.webhook.timeout_ms),
    )
    .with_targets(pool.clone());
    let webhook = if settings.webhook.allow_private_networks {
        webhook
    } else {
        webhook.deny_private_networks()
    };
    registry.prefix(outbox_dispatch::targets::webhook::PREFIX, webhook);
    if let Some(js) = jetstream.filter(|_| settings.nats.relay_unhandled) {
        registry.fallback_for(
            settings.relay_patterns()?,
            outbox_nats::Relay::new(
                js,
                pool.clone(),
                outbox_nats::RelayConfig {
                    subject_template: settings.nats.subject_template.clone(),
                    ack_timeout: Duration::from_millis(settings.nats.ack_timeout_ms),
                    status: publish_status.clone(),
                },
            ),
        );
        info!(url = %db::redact_url(&settings.nats.url), stream = %settings.nats.stream.name, topics = ?settings.nats.relay_topics, "relaying unhandled topics to NATS JetStream");
    }

    // The GC schedule, segment rotation, compaction, automatic replays, the
    // row-state sample and the cron scheduler run on the elected leader only.
    let mut supervisor = Supervisor::new(pool.clone());
    if settings.gc_schedule().is_some() {
        supervisor = supervisor.with(Sweeper::new(pool.clone(), settings.sweeper_config()));
    } else {
        info!("gc.schedule is off: no sweeps here; run `outboxd gc --once` from a scheduler");
    }
    let maintenance = tokio::spawn(
        supervisor
            .with(Rotator::new(pool.clone(), settings.rotation_policy()))
            .with(Compactor::new(pool.clone(), settings.compaction_policy()))
            .with(Replayer::new(pool.clone(), Duration::from_secs(1)))
            .with(Sampler::new(
                pool.clone(),
                Duration::from_secs(settings.http.metrics_sample_secs),
            ))
            .with(Scheduler::new(pool.clone(), Default::default()))
            .run(stop.clone().cancelled_owned()),
    );
    let dispatcher = Dispatcher::new(pool.clone(), registry, dispatcher_config)?;
    let report = dispatcher.run(stop.clone().cancelled_owned()).await?;
    stop.cancel();
    let _ = maintenance.await;
    let _ = server.await;
    pool.close().await;
    if let Some(check) = late_stream_check {
        check.await.context("the NATS stream check")??;
    }
    info!(
        completed = report.totals.completed,
        released = report.released,
        "bye"
    );
    Ok(report)
}

/// How long start-up waits for a first NATS connection before it serves
/// without one (as long as `nats.fail_fast` waits before it gives up).
const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(2);

/// Whether `client` is connected within `wait`.
async fn connected_within(client: &async_nats::Client, wait: Duration) -> bool {
    let connected = || client.connection_state() == async_nats::connection::State::Connected;
    let deadline = tokio::time::Instant::now() + wait;
    while !connected() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    connected()
}

/// Checks the stream contract once `client` connects, then lets the relays
/// publish (`status`). A contract that does not hold stops the process,
/// which then exits with the differences, as it would have at start-up;
/// any other failure (a JetStream request timing out) is tried again.
async fn check_stream_once_connected(
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    contract: outbox_nats::StreamContract,
    status: outbox_nats::PublishStatus,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let mut pause = Duration::from_millis(250);
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(pause) => {}
        }
        if client.connection_state() != async_nats::connection::State::Connected {
            continue;
        }
        match outbox_nats::ensure_stream(&js, &contract).await {
            Ok(_) => {
                status.mark_stream_checked();
                info!(stream = %contract.name, "NATS answers and the stream contract holds: relaying starts");
                return Ok(());
            }
            Err(err @ outbox_nats::Error::StreamMismatch { .. }) => {
                tracing::error!(error = %err, "the NATS stream contract does not hold: stopping");
                stop.cancel();
                return Err(anyhow::Error::new(err).context("checking the NATS stream contract"));
            }
            Err(err) => {
                tracing::warn!(error = %err, "checking the NATS stream contract failed: trying again");
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
