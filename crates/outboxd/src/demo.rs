//! The demo workload: handlers that succeed, fail for a while, fail for good
//! or panic, and a producer that keeps enqueueing, so every outcome — dead
//! letters included — shows up within seconds.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;

use outbox_core::{NewEvent, enqueue_batch};
use outbox_dispatch::{Event, HandlerError, Registry};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Runs the daemon ([`crate::daemon::run`]) with the demo handlers, its
/// triggers, and a producer that enqueues a few events every two seconds,
/// until `shutdown`.
pub async fn run(
    settings: crate::config::Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    crate::db::require_direct(&settings, "the dispatcher")?;
    // A port in use would stop the daemon only after the demo said it was
    // running and had written its app and triggers: try it first.
    if let Ok(addr) = settings.http.listen.parse::<std::net::SocketAddr>() {
        drop(
            std::net::TcpListener::bind(addr)
                .with_context(|| {
                    format!("cannot listen on {addr} (set http.listen, or OUTBOXD_HTTP__LISTEN, to a free address)")
                })?,
        );
    }
    // The set-up and the producer use two connections beside the daemon's.
    let pool = crate::db::connect_beside(&settings, 2).await?;
    if settings.database.auto_migrate {
        outbox_core::migrate(&pool)
            .await
            .context("migrating on start")?;
    }
    let app = outbox_core::ensure_app(&pool, APP, "Demo app").await?;
    register_triggers(&pool, app.id).await?;
    // The producer stops at the signal, before the daemon drains.
    let stop = outbox_dispatch::cancelled_by(shutdown);
    let producer = tokio::spawn(produce(
        pool.clone(),
        app.id,
        Duration::from_secs(2),
        stop.clone(),
    ));
    println!(
        "demo running: app {APP:?}; its dead letters: `outboxd dead-letters list --app {APP}` (scripts/outboxd.sh with scripts/demo.sh)"
    );
    let report = crate::daemon::run(settings, registry(), stop.clone().cancelled_owned()).await;
    stop.cancel();
    let _ = producer.await;
    pool.close().await;
    report.map(|_| ())
}

/// The demo app's slug.
pub const APP: &str = "demo";

/// Handlers for the demo topics.
pub fn registry() -> Registry {
    let mut registry = Registry::new();
    registry
        .register("order.created", |_event: Event| async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok(())
        })
        .register("email.send", |_event: Event| async move {
            // Flaky: usually succeeds by the second or third attempt. (The
            // dead letter's error says which attempt was the last.)
            if fastrand::u8(..100) < 40 {
                return Err(HandlerError::retry("SMTP 421 service not available"));
            }
            Ok(())
        })
        .register("invoice.render", |event: Event| async move {
            let amount = event.payload["amount"].as_i64().unwrap_or_default();
            if amount < 0 {
                return Err(HandlerError::permanent(format!(
                    "invoice amount must not be negative, got {amount}"
                )));
            }
            Ok(())
        })
        .register("webhook.deliver", |event: Event| async move {
            Err(HandlerError::retry(format!(
                "POST {} failed: connection refused",
                event.payload["url"].as_str().unwrap_or("?")
            )))
        })
        .register("audit.record", |event: Event| async move {
            // Fired by the KV trigger on every write to an orders:* collection.
            tracing::info!(key = %event.payload["key"], op = %event.op, "audit: order entry changed");
            Ok(())
        })
        .register("demo.heartbeat", |_event: Event| async { Ok(()) })
        // The README's HTTP examples post to these two.
        .register("user.signed_up", |event: Event| async move {
            tracing::info!(user = %event.payload["id"], "welcome e-mail queued");
            Ok(())
        })
        .register("reports", |_event: Event| async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(())
        })
        .register("invoice.compensate", |event: Event| async move {
            // Fired by the dead-letter trigger: a failed invoice is voided,
            // which resolves its dead letter as handled_by_script.
            tracing::info!(dead_letter = %event.payload["dead_letter_id"], "voiding a failed invoice");
            Ok(())
        })
        .register("report.build", |event: Event| async move {
            if event.payload["crash"].as_bool() == Some(true) {
                panic!("report template is missing");
            }
            Ok(())
        });
    registry
}

fn workload(round: u64) -> Vec<NewEvent> {
    let mut events = vec![
        NewEvent::new(
            "order.created",
            json!({"order": round, "total_cents": 1299}),
        ),
        NewEvent::new(
            "email.send",
            json!({"to": format!("user{round}@example.com"), "template": "welcome"}),
        )
        .with_max_attempts(5),
        NewEvent::new(
            "invoice.render",
            json!({"invoice": round, "amount": if round % 4 == 3 { -5 } else { 120 }}),
        ),
    ];
    if round.is_multiple_of(3) {
        events.push(
            NewEvent::new(
                "webhook.deliver",
                json!({"url": "http://127.0.0.1:9/hook", "event": round}),
            )
            .with_max_attempts(3),
        );
    }
    if round % 5 == 4 {
        events.push(
            NewEvent::new("report.build", json!({"report": round, "crash": true}))
                .with_max_attempts(2),
        );
    }
    events
}

/// Registers the demo's triggers once: a KV trigger on `orders:*`, a cron
/// trigger every 10 seconds, and a dead-letter trigger for `invoice.render`.
pub async fn register_triggers(pool: &PgPool, app_id: Uuid) -> Result<(), outbox_core::Error> {
    use outbox_core::store::triggers::{self, TriggerSpec};
    let existing = triggers::list(pool, app_id).await?;
    let mut tx = pool.begin().await?;
    if !existing.iter().any(|t| t.name == "audit-orders") {
        let spec = TriggerSpec::Kv {
            collection: "orders:*".into(),
            ops: vec!["put".into(), "delete".into()],
        };
        triggers::create(
            &mut tx,
            app_id,
            "audit-orders",
            "audit.record",
            Some("demo"),
            &spec,
        )
        .await?;
    }
    if !existing.iter().any(|t| t.name == "heartbeat") {
        let spec = TriggerSpec::Cron {
            schedule: "*/10 * * * * *".into(),
            timezone: "UTC".into(),
        };
        triggers::create(
            &mut tx,
            app_id,
            "heartbeat",
            "demo.heartbeat",
            Some("demo"),
            &spec,
        )
        .await?;
    }
    if !existing.iter().any(|t| t.name == "void-failed-invoices") {
        let spec = TriggerSpec::DeadLetter {
            sources: Vec::new(),
            topics: vec!["invoice.render".into()],
            trigger_ids: Vec::new(),
        };
        triggers::create(
            &mut tx,
            app_id,
            "void-failed-invoices",
            "invoice.compensate",
            Some("demo"),
            &spec,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Enqueues a round of demo events every `every` until `stop`.
pub async fn produce(pool: PgPool, app_id: Uuid, every: Duration, stop: CancellationToken) {
    let mut round = 0u64;
    loop {
        let events = workload(round);
        let result = async {
            let mut tx = pool.begin().await?;
            enqueue_batch(&mut tx, app_id, &events).await?;
            // A KV write in the same transaction: its trigger row commits with it.
            outbox_core::store::kv::put(
                &mut tx,
                app_id,
                "orders:eu",
                &format!("order-{round}"),
                &json!({"status": "paid", "round": round}),
                None,
                &outbox_core::store::kv::WriteContext::default(),
            )
            .await?;
            tx.commit().await?;
            Ok::<(), outbox_core::Error>(())
        }
        .await;
        if let Err(err) = result {
            tracing::warn!(error = %err, "demo producer could not enqueue");
        }
        round += 1;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
