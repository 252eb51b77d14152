//! The relay and the stream contract against a real nats-server (NATS_URL,
//! started by scripts/test.sh) and a real PostgreSQL.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use outbox_core::{NewEvent, enqueue};
use outbox_dispatch::{Config, Dispatcher, Event, Registry};
use outbox_nats::{Relay, RelayConfig, StreamContract, ensure_stream};
use outbox_testkit::TestDb;
use serde_json::json;

mod consumer;

type TestResult = Result<(), Box<dyn std::error::Error>>;

async fn jetstream() -> Result<jetstream::Context, Box<dyn std::error::Error>> {
    let url = std::env::var("NATS_URL")
        .map_err(|_| "NATS_URL is not set: run the tests through scripts/test.sh")?;
    let client = outbox_nats::connect(&url).await?;
    // `connect` returns before the first connection is made, and the relay
    // publishes nothing until it is.
    let up = outbox_testkit::wait_until(Duration::from_secs(10), || async {
        client.connection_state() == async_nats::connection::State::Connected
    })
    .await;
    if !up {
        return Err(format!("no connection to NATS at {url}").into());
    }
    Ok(jetstream::new(client))
}

/// A stream and subject space of this test's own on the shared server.
fn contract(prefix: &str) -> StreamContract {
    StreamContract {
        name: format!("OUTBOX_{}", prefix.to_uppercase()),
        subjects: vec![format!("{prefix}.>")],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        replicas: 1,
        max_age: Duration::from_secs(3600),
        max_bytes: -1,
        max_messages: -1,
        duplicate_window: Duration::from_secs(120),
    }
}

/// A relay publishing into the subject space of `prefix`.
fn relay_for(js: &jetstream::Context, db: &TestDb, prefix: &str) -> Relay {
    Relay::new(
        js.clone(),
        db.pool.clone(),
        RelayConfig {
            subject_template: format!("{prefix}.{{app}}.{{topic}}"),
            ..RelayConfig::default()
        },
    )
}

/// A claimed row of `app` as the dispatcher hands it to the relay.
fn event_of(app: uuid::Uuid) -> Event {
    Event {
        id: uuid::Uuid::now_v7(),
        app_id: app,
        topic: "t".into(),
        source: "queue".into(),
        op: String::new(),
        payload: json!({"n": 1}),
        headers: json!({}),
        attempt: 1,
        max_attempts: 5,
        enqueued_at: chrono::Utc::now(),
        first_attempt_at: None,
        ordering_key: None,
        depth: 0,
        trigger_id: None,
        principal: None,
        reply: Default::default(),
        claim_tx: None,
    }
}

fn unique_prefix() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

async fn read_all(
    stream: &stream::Stream,
    n: usize,
) -> Result<Vec<jetstream::Message>, Box<dyn std::error::Error>> {
    let consumer = stream
        .create_consumer(pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let mut batch = consumer
        .fetch()
        .max_messages(n + 1)
        .expires(Duration::from_millis(500))
        .messages()
        .await?;
    let mut out = Vec::new();
    while let Some(message) = batch.next().await {
        out.push(message.map_err(|e| e.to_string())?);
    }
    Ok(out)
}

/// A synchronous caller of a relayed topic is answered with where the
/// stream put its event (it got `null`, as if a handler had run it).
#[tokio::test]
async fn a_relayed_invocation_is_answered_with_the_streams_acknowledgement() -> TestResult {
    use outbox_dispatch::Handler;
    let js = jetstream().await?;
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let prefix = unique_prefix();
    let contract = contract(&prefix);
    ensure_stream(&js, &contract).await?;
    let relay = relay_for(&js, &db, &prefix);
    let event = event_of(app);
    let reply = event.reply.clone();
    relay.handle(event).await?;
    let answer = reply.get().ok_or("no answer")?;
    assert_eq!(
        answer["relayed"]["stream"],
        json!(contract.name),
        "{answer}"
    );
    assert_eq!(answer["relayed"]["sequence"], json!(1), "{answer}");
    assert_eq!(answer["relayed"]["duplicate"], json!(false), "{answer}");
    Ok(())
}

#[tokio::test]
async fn relay_publishes_with_headers_and_deletes_after_the_puback() -> TestResult {
    let js = jetstream().await?;
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let prefix = unique_prefix();
    let stream = ensure_stream(&js, &contract(&prefix)).await?;
    let relay = relay_for(&js, &db, &prefix);
    let mut tx = db.pool.begin().await?;
    let traced = enqueue(
        &mut tx,
        app,
        &NewEvent::new("order.created", json!({"order": 1})).with_headers(json!({
            "correlation-id": "corr-1",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        })),
    )
    .await?;
    let plain = enqueue(
        &mut tx,
        app,
        &NewEvent::new("order.paid", json!({"order": 1})),
    )
    .await?;
    tx.commit().await?;

    let mut registry = Registry::new();
    registry.fallback(relay);
    let dispatcher = Dispatcher::new(db.pool.clone(), registry, Config::default())?;
    let report = dispatcher.run_until_idle().await?;
    assert_eq!(report.completed, 2);
    assert_eq!(outbox_core::store::outbox::count(&db.pool).await?, 0);

    let messages = read_all(&stream, 2).await?;
    assert_eq!(messages.len(), 2);
    let by_id = |id: uuid::Uuid| {
        messages.iter().find(|m| {
            m.headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .is_some_and(|v| v.as_str() == id.to_string())
        })
    };
    let m = by_id(traced).ok_or("traced event missing")?;
    assert_eq!(m.subject.as_str(), format!("{prefix}.shop.order.created"));
    let h = m.headers.as_ref().ok_or("no headers")?;
    assert_eq!(h.get("tenant-id").map(|v| v.as_str()), Some("shop"));
    assert_eq!(h.get("correlation-id").map(|v| v.as_str()), Some("corr-1"));
    assert_eq!(
        h.get("traceparent").map(|v| v.as_str()),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(
        h.get("x-correlation-id").map(|v| v.as_str()),
        Some("corr-1")
    );
    assert_eq!(
        h.get("trace-id").map(|v| v.as_str()),
        Some("0af7651916cd43dd8448eb211c80319c")
    );
    let body: serde_json::Value = serde_json::from_slice(&m.payload)?;
    assert_eq!(body, json!({"order": 1}));

    let m = by_id(plain).ok_or("plain event missing")?;
    let h = m.headers.as_ref().ok_or("no headers")?;
    assert_eq!(
        h.get("correlation-id").map(|v| v.as_str().to_owned()),
        Some(plain.to_string()),
        "generated"
    );
    let traceparent = h
        .get("traceparent")
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    assert!(
        traceparent.starts_with("00-") && traceparent.len() == 55,
        "generated: {traceparent}"
    );
    for name in outbox_nats::headers::REQUIRED {
        assert!(
            h.get(name).is_some(),
            "{name} missing on the relayed message"
        );
    }
    assert_eq!(
        h.get("trace-id").map(|v| v.as_str()),
        outbox_nats::headers::trace_id_of(&traceparent)
    );
    Ok(())
}

#[tokio::test]
async fn a_republished_row_is_dropped_by_the_duplicate_window() -> TestResult {
    let js = jetstream().await?;
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let prefix = unique_prefix();
    let mut stream = ensure_stream(&js, &contract(&prefix)).await?;
    let relay = relay_for(&js, &db, &prefix);
    let event = event_of(app);
    // A crash between PubAck and the row's deletion publishes the row again.
    let first = relay.publish(event.clone()).await?;
    let second = relay.publish(event).await?;
    assert!(!first.duplicate);
    assert!(second.duplicate, "the second PubAck must say duplicate");
    assert_eq!(first.sequence, second.sequence);
    assert_eq!(stream.info().await?.state.messages, 1);
    Ok(())
}

#[tokio::test]
async fn stream_contract_is_created_then_validated_field_by_field() -> TestResult {
    let js = jetstream().await?;
    let prefix = unique_prefix();
    let wanted = contract(&prefix);
    ensure_stream(&js, &wanted).await?;
    ensure_stream(&js, &wanted).await?;

    let mut changed = wanted.clone();
    changed.max_age = Duration::from_secs(60);
    changed.duplicate_window = Duration::from_secs(30);
    changed.storage = stream::StorageType::Memory;
    let err = ensure_stream(&js, &changed)
        .await
        .err()
        .ok_or("mismatch accepted")?;
    let text = err.to_string();
    for field in ["max_age", "duplicate_window", "storage"] {
        assert!(text.contains(field), "{text} lacks {field}");
    }
    assert!(!text.contains("replicas"), "{text}");
    // The server stream was not replaced.
    let info = js
        .get_stream(&wanted.name)
        .await?
        .cached_info()
        .config
        .clone();
    assert_eq!(info.max_age, Duration::from_secs(3600));

    // A server stream that captures more subjects is compatible.
    let mut wider = wanted.clone();
    wider.subjects = vec![format!("{prefix}.>")];
    ensure_stream(&js, &wider).await?;
    let mut uncovered = wanted;
    uncovered.subjects = vec![format!("{prefix}x.>")];
    let err = ensure_stream(&js, &uncovered)
        .await
        .err()
        .ok_or("missing subject accepted")?;
    assert!(err.to_string().contains("subjects"), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_missing_stream_is_a_retry_with_a_clear_error() -> TestResult {
    let js = jetstream().await?;
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let prefix = unique_prefix();
    let relay = Relay::new(
        js,
        db.pool.clone(),
        RelayConfig {
            subject_template: format!("{prefix}.{{app}}.{{topic}}"),
            ack_timeout: Duration::from_secs(2),
            ..RelayConfig::default()
        },
    );
    let mut tx = db.pool.begin().await?;
    let id = enqueue(&mut tx, app, &NewEvent::new("t", json!({}))).await?;
    tx.commit().await?;
    let mut registry = Registry::new();
    registry.fallback(relay);
    let report = Dispatcher::new(db.pool.clone(), registry, Config::default())?
        .run_once()
        .await?;
    assert_eq!(report.retried, 1);
    let error: Option<String> = sqlx::query_scalar("SELECT last_error FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await?;
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("no stream captures")),
        "{error:?}"
    );
    Ok(())
}

#[tokio::test]
async fn subjects_from_fields_of_the_row_are_concrete_or_the_row_fails_naming_the_field()
-> TestResult {
    let js = jetstream().await?;
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let prefix = unique_prefix();
    let stream = ensure_stream(&js, &contract(&prefix)).await?;
    let relay = Relay::new(
        js.clone(),
        db.pool.clone(),
        RelayConfig {
            subject_template: format!("{prefix}.{{app}}.aggregate.{{payload.type}}.{{payload.id}}"),
            ..RelayConfig::default()
        },
    );
    let mut tx = db.pool.begin().await?;
    let good = enqueue(
        &mut tx,
        app,
        &NewEvent::new("order.created", json!({"type": "order", "id": 42})),
    )
    .await?;
    let wildcard = enqueue(
        &mut tx,
        app,
        &NewEvent::new("order.created", json!({"type": "order", "id": "*"})).with_max_attempts(5),
    )
    .await?;
    let missing = enqueue(
        &mut tx,
        app,
        &NewEvent::new("order.created", json!({"id": 7})).with_max_attempts(5),
    )
    .await?;
    // Published, it went out as `….a\u{7}b`, which consumers log as `….ab`.
    let control = enqueue(
        &mut tx,
        app,
        &NewEvent::new("order.created", json!({"type": "order", "id": "a\u{7}b"}))
            .with_max_attempts(5),
    )
    .await?;
    tx.commit().await?;
    let mut registry = Registry::new();
    registry.fallback(relay);
    let dispatcher = Dispatcher::new(db.pool.clone(), registry, Config::default())?;
    dispatcher.run_until_idle().await?;

    let messages = read_all(&stream, 1).await?;
    assert_eq!(
        messages.len(),
        1,
        "only the row with a concrete subject is published"
    );
    assert_eq!(
        messages[0].subject.as_str(),
        format!("{prefix}.shop.aggregate.order.42")
    );
    let id_of = |m: &jetstream::Message| {
        m.headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_owned())
    };
    assert_eq!(id_of(&messages[0]), Some(good.to_string()));
    for (id, says) in [
        (wildcard, "subject token {payload.id} is \"*\""),
        (missing, "subject token {payload.type} is missing"),
        (control, "subject token {payload.id} is \"a\\u{7}b\""),
    ] {
        let dead = outbox_core::store::dead_letters::by_original(&db.pool, id).await?;
        let error = dead
            .first()
            .and_then(|d| d.last_error.clone())
            .ok_or("not dead-lettered")?;
        assert!(error.contains(says), "{error}");
        assert_eq!(dead[0].attempt_count, 1, "permanent: one attempt");
    }
    Ok(())
}

/// While the NATS connection is down the relay publishes nothing: the client
/// would buffer the message and send it on reconnect, long after the
/// attempt failed for want of a PubAck, so a dead-lettered row could reach
/// the stream and then again when replayed. The row waits instead, without
/// spending an attempt, and is published once the server is back.
#[tokio::test]
async fn the_relay_waits_without_an_attempt_while_nats_is_down() -> TestResult {
    let bin = std::env::var("NATS_BIN").map_err(|_| "NATS_BIN is not set: run scripts/test.sh")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let store = std::env::temp_dir().join(format!("outboxd-relay-down-{}", unique_prefix()));
    let serve = || {
        std::process::Command::new(&bin)
            .args(["-js", "-sd"])
            .arg(&store)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
    };
    let mut server = serve()?;
    let url = format!("nats://127.0.0.1:{port}");
    let connected = outbox_testkit::wait_until(Duration::from_secs(10), || async {
        async_nats::connect(&url).await.is_ok()
    })
    .await;
    assert!(connected, "the test's nats-server never answered");
    let client = outbox_nats::connect(&url).await?;
    let js = jetstream::new(client.clone());
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let prefix = unique_prefix();
    ensure_stream(&js, &contract(&prefix)).await?;
    let relay = Relay::new(
        js.clone(),
        db.pool.clone(),
        RelayConfig {
            subject_template: format!("{prefix}.{{app}}.{{topic}}"),
            ack_timeout: Duration::from_millis(500),
            ..RelayConfig::default()
        },
    );
    let event = event_of(app);

    server.kill()?;
    server.wait()?;
    let lost = outbox_testkit::wait_until(Duration::from_secs(10), || async {
        client.connection_state() != async_nats::connection::State::Connected
    })
    .await;
    assert!(lost, "the client never noticed the server had gone");
    let answer = relay.publish(event.clone()).await;
    assert!(
        matches!(answer, Err(outbox_dispatch::HandlerError::Snooze(_))),
        "{answer:?}"
    );

    let mut server = serve()?;
    let back = outbox_testkit::wait_until(Duration::from_secs(15), || async {
        client.connection_state() == async_nats::connection::State::Connected
    })
    .await;
    // Right after the reconnect, a publish may still wait or snooze: try
    // until one is acknowledged.
    let mut published = relay.publish(event.clone()).await;
    for _ in 0..20 {
        if published.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        published = relay.publish(event.clone()).await;
    }
    let mut stream = js
        .get_stream(format!("OUTBOX_{}", prefix.to_uppercase()))
        .await?;
    let messages = stream.info().await?.state.messages;
    server.kill()?;
    server.wait()?;
    let _ = std::fs::remove_dir_all(&store);
    assert!(back, "the client never reconnected");
    assert!(published.is_ok(), "{published:?}");
    assert_eq!(messages, 1, "published once, nothing buffered while down");
    Ok(())
}
