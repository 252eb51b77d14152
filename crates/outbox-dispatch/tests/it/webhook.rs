use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use outbox_core::NewEvent;
use outbox_dispatch::targets::{Webhook, webhook};
use outbox_dispatch::{Dispatcher, Registry};
use outbox_testkit::TestDb;

use crate::{TestResult, config, enqueue_committed, payload};

#[tokio::test]
async fn webhooks_are_signed_and_statuses_decide_the_outcome() -> TestResult {
    const SECRET: &[u8] = b"webhook-test-secret";
    let received: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
    let log = received.clone();
    let answer = move |path: &'static str, status: StatusCode| {
        let log = log.clone();
        move |headers: HeaderMap, body: axum::body::Bytes| {
            let log = log.clone();
            async move {
                let header = headers
                    .get("outboxd-signature")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let t: i64 = header
                    .split(',')
                    .next()
                    .and_then(|t| t.strip_prefix("t="))
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
                let valid = header == webhook::signature(SECRET, t, &body)
                    && (chrono::Utc::now().timestamp() - t).abs() < 60;
                log.lock().expect("lock").push((path.to_owned(), valid));
                status
            }
        }
    };
    let app = axum::Router::new()
        .route("/ok", post(answer("ok", StatusCode::NO_CONTENT)))
        .route(
            "/rejected",
            post(answer("rejected", StatusCode::UNPROCESSABLE_ENTITY)),
        )
        .route(
            "/down",
            post(answer("down", StatusCode::SERVICE_UNAVAILABLE)),
        )
        .route("/busy", post(answer("busy", StatusCode::TOO_MANY_REQUESTS)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let db = TestDb::new().await?;
    let shop = db.app("shop").await?;
    let mut registry = Registry::new();
    registry.prefix(
        webhook::PREFIX,
        Webhook::new(SECRET.to_vec(), Duration::from_secs(2)),
    );
    let dispatcher = Dispatcher::new(db.pool.clone(), registry, config())?;
    let mut ids = Vec::new();
    for path in ["ok", "rejected", "down", "busy"] {
        ids.push(
            enqueue_committed(
                &db.pool,
                shop,
                NewEvent::new(format!("webhook:http://{addr}/{path}"), payload(1)),
            )
            .await?,
        );
    }
    let closed = enqueue_committed(
        &db.pool,
        shop,
        NewEvent::new("webhook:http://127.0.0.1:1/nothing", payload(2)),
    )
    .await?;
    let report = dispatcher.run_once().await?;
    assert_eq!(
        (report.completed, report.dead_lettered, report.retried),
        (1, 1, 3),
        "{report:?}"
    );
    let got = received.lock().expect("lock").clone();
    assert_eq!(got.len(), 4);
    assert!(
        got.iter().all(|(_, valid)| *valid),
        "every request carries a valid signature: {got:?}"
    );
    let dead = outbox_core::store::dead_letters::by_original(&db.pool, ids[1]).await?;
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("422")),
        "{dead:?}"
    );
    for id in [ids[2], ids[3], closed] {
        let error: Option<String> =
            sqlx::query_scalar("SELECT last_error FROM outbox WHERE id = $1")
                .bind(id)
                .fetch_one(&db.pool)
                .await?;
        assert!(error.is_some(), "retried with an error");
    }
    Ok(())
}

/// What a receiver got: the path's last segment, the signature header, the body.
type Received = (String, String, Vec<u8>);

#[tokio::test]
async fn each_target_signs_with_its_own_secret_and_both_during_a_rotation() -> TestResult {
    let headers: Arc<Mutex<Vec<Received>>> = Arc::default();
    let log = headers.clone();
    let app = axum::Router::new().route(
        "/{hook}",
        post(
            move |axum::extract::Path(hook): axum::extract::Path<String>,
                  h: HeaderMap,
                  body: axum::body::Bytes| {
                let log = log.clone();
                async move {
                    let sig = h
                        .get("outboxd-signature")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    log.lock().expect("lock").push((hook, sig, body.to_vec()));
                    StatusCode::NO_CONTENT
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let db = TestDb::new().await?;
    let shop = db.app("shop").await?;
    let own = format!("http://{addr}/own");
    let rotated = format!("http://{addr}/rotated");
    let secret = outbox_core::store::webhooks::create(&db.pool, shop, &own).await?;
    let old = outbox_core::store::webhooks::create(&db.pool, shop, &rotated).await?;
    let new =
        outbox_core::store::webhooks::rotate(&db.pool, shop, &rotated, Duration::from_secs(3600))
            .await?;
    assert!(
        outbox_core::store::webhooks::create(&db.pool, shop, &own)
            .await
            .is_err(),
        "a target is created once"
    );
    // No global secret: a target without its own cannot be signed.
    let mut registry = Registry::new();
    registry.prefix(
        webhook::PREFIX,
        Webhook::new(Vec::new(), Duration::from_secs(2)).with_targets(db.pool.clone()),
    );
    let dispatcher = Dispatcher::new(db.pool.clone(), registry, config())?;
    for url in [&own, &rotated] {
        enqueue_committed(
            &db.pool,
            shop,
            NewEvent::new(format!("webhook:{url}"), payload(1)),
        )
        .await?;
    }
    let unsigned = enqueue_committed(
        &db.pool,
        shop,
        NewEvent::new(format!("webhook:http://{addr}/anonymous"), payload(2)),
    )
    .await?;
    let report = dispatcher.run_once().await?;
    assert_eq!(
        (report.completed, report.dead_lettered),
        (2, 1),
        "{report:?}"
    );

    let now = chrono::Utc::now().timestamp();
    let got = headers.lock().expect("lock").clone();
    let request = |hook: &str| got.iter().find(|(h, _, _)| h == hook).cloned();
    let (_, sig, body) = request("own").ok_or("own not called")?;
    assert!(
        webhook::verify(&sig, secret.as_bytes(), &body, now, 300),
        "{sig}"
    );
    assert!(!webhook::verify(&sig, b"the global one", &body, now, 300));
    let (_, sig, body) = request("rotated").ok_or("rotated not called")?;
    assert_eq!(sig.matches("v1=").count(), 2, "{sig}");
    assert!(
        webhook::verify(&sig, new.as_bytes(), &body, now, 300),
        "the new secret"
    );
    assert!(
        webhook::verify(&sig, old.as_bytes(), &body, now, 300),
        "and the previous one"
    );
    assert!(
        !webhook::verify(&sig, new.as_bytes(), &body, now + 3600, 300),
        "not replayed an hour later"
    );
    assert!(request("anonymous").is_none(), "nothing is sent unsigned");
    let dead = outbox_core::store::dead_letters::by_original(&db.pool, unsigned).await?;
    assert!(
        dead.first()
            .and_then(|d| d.last_error.as_deref())
            .is_some_and(|e| e.contains("has no secret")),
        "{dead:?}"
    );
    Ok(())
}

/// A receiver that answers 200 and then sends its body for ever, or sends
/// nothing more: only the status counts, so the delivery completes at once
/// instead of reading (and holding in memory) the answer until the timeout. An IPv6 literal is a
/// receiver like any other.
#[tokio::test]
async fn a_receiver_that_answers_without_end_is_not_read_to_its_end() -> TestResult {
    let listener = tokio::net::TcpListener::bind("[::1]:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let read = socket.read(&mut request).await.unwrap_or(0);
                let head = b"HTTP/1.1 200 OK\r\ncontent-length: 10000000000\r\n\r\n";
                if socket.write_all(head).await.is_err() {
                    return;
                }
                if request[..read].starts_with(b"POST /silent") {
                    // The status, then nothing: held open until dropped.
                    let _ = socket.read(&mut request).await;
                    return;
                }
                let chunk = vec![b'a'; 64 * 1024];
                while socket.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    let db = TestDb::new().await?;
    let shop = db.app("shop").await?;
    let mut registry = Registry::new();
    registry.prefix(
        webhook::PREFIX,
        Webhook::new(b"secret".to_vec(), Duration::from_secs(5)),
    );
    let dispatcher = Dispatcher::new(db.pool.clone(), registry, config())?;
    for path in ["endless", "silent"] {
        enqueue_committed(
            &db.pool,
            shop,
            NewEvent::new(format!("webhook:http://{addr}/{path}"), payload(1)),
        )
        .await?;
    }
    let started = std::time::Instant::now();
    let report = dispatcher.run_once().await?;
    assert_eq!(report.completed, 2, "{report:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "read until the timeout: {:?}",
        started.elapsed()
    );
    Ok(())
}

/// What may be a credential in a webhook URL (its user and password, its
/// path, its query) stays out of the error kept with the row.
#[tokio::test]
async fn a_failed_delivery_names_the_receiver_without_its_credentials() -> TestResult {
    let unavailable = axum::Router::new().fallback(|| async { StatusCode::SERVICE_UNAVAILABLE });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, unavailable).await });
    let db = TestDb::new().await?;
    let shop = db.app("shop").await?;
    let mut registry = Registry::new();
    registry.prefix(
        webhook::PREFIX,
        Webhook::new(b"secret".to_vec(), Duration::from_secs(2)),
    );
    let dispatcher = Dispatcher::new(db.pool.clone(), registry, config())?;
    let id = enqueue_committed(
        &db.pool,
        shop,
        NewEvent::new(
            format!("webhook:http://user:pa55word@{addr}/T0/S3CRET?token=t0k3n"),
            payload(1),
        ),
    )
    .await?;
    dispatcher.run_once().await?;
    let error: Option<String> = sqlx::query_scalar("SELECT last_error FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await?;
    let error = error.ok_or("no error kept")?;
    assert!(
        error.contains(&format!("http://{addr}/… answered 503")),
        "{error}"
    );
    for secret in ["pa55word", "S3CRET", "t0k3n"] {
        assert!(!error.contains(secret), "{error}");
    }
    Ok(())
}

/// With private networks denied, a receiver on loopback is not called: the
/// row is dead-lettered naming the address (an app's admins could make
/// outboxd call its neighbours, or learn which of their ports are open).
#[tokio::test]
async fn a_receiver_on_a_private_network_is_refused_when_they_are_denied() -> TestResult {
    let called: Arc<Mutex<u32>> = Arc::default();
    let count = called.clone();
    let receiver = axum::Router::new().fallback(move || {
        let count = count.clone();
        async move {
            *count.lock().expect("lock") += 1;
            StatusCode::NO_CONTENT
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, receiver).await });
    let db = TestDb::new().await?;
    let shop = db.app("shop").await?;
    let mut registry = Registry::new();
    registry.prefix(
        webhook::PREFIX,
        Webhook::new(b"secret".to_vec(), Duration::from_secs(2)).deny_private_networks(),
    );
    let dispatcher = Dispatcher::new(db.pool.clone(), registry, config())?;
    let id = enqueue_committed(
        &db.pool,
        shop,
        NewEvent::new(
            format!("webhook:http://localhost:{}/x", addr.port()),
            payload(1),
        ),
    )
    .await?;
    let report = dispatcher.run_once().await?;
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    assert_eq!(*called.lock().expect("lock"), 0, "the receiver was called");
    let dead = outbox_core::store::dead_letters::by_original(&db.pool, id).await?;
    let error = dead
        .first()
        .and_then(|d| d.last_error.clone())
        .unwrap_or_default();
    assert!(error.contains("not a public address"), "{error}");
    Ok(())
}
