//! `outboxd consume`: the consumer runtime reading relayed events from
//! JetStream and logging each one (a demo of the library's consumer API).

use anyhow::{Context, bail};
use outboxd::config::Settings;
use tracing::info;

/// Runs `outboxd consume` until SIGTERM or SIGINT.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    if settings.nats.url.is_empty() {
        bail!("consume needs NATS: set NATS_URL (or [nats] url)");
    }
    let pool = outboxd::db::connect(&settings, 0).await?;
    if settings.database.auto_migrate {
        outbox_core::migrate(&pool)
            .await
            .context("migrating on start")?;
    }
    let client = outbox_nats::connect(&settings.nats.url).await?;
    let js = async_nats::jetstream::new(client);
    outbox_nats::ensure_stream(&js, &settings.stream_contract())
        .await
        .context("checking the NATS stream contract")?;
    let config = settings.consumer_config();
    println!(
        "consuming {:?} from stream {} as {}",
        config.filter_subjects, config.stream, config.durable
    );
    let runtime = outbox_nats::ConsumerRuntime::new(js, pool, config).route(
        ">",
        |delivery: outbox_nats::Delivery| async move {
            info!(
                subject = %delivery.subject,
                tenant = %delivery.tenant,
                delivered = delivery.delivered,
                message_id = delivery.message_id.as_deref().unwrap_or(""),
                "consumed"
            );
            Ok::<(), outbox_nats::HandlerError>(())
        },
    );
    runtime.run(outboxd::daemon::shutdown_signal()).await?;
    Ok(())
}
