//! Synchronous invocations: the handler's answer, its error, no handler,
//! and a timeout that records the abandoned execution.

use axum::http::StatusCode;
use serde_json::json;

use super::{TestResult, World};

/// A dispatcher on its own pool (as another process would have) running these handlers.
async fn dispatcher_for(
    w: &World,
) -> Result<
    (
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<Result<outbox_dispatch::DrainReport, outbox_dispatch::Error>>,
    ),
    Box<dyn std::error::Error>,
> {
    use outbox_dispatch::{Config, Dispatcher, Event, HandlerError, Registry};
    let mut registry = Registry::new();
    registry.register("echo", |e: Event| async move {
        e.set_reply(json!({ "echo": e.payload }));
        Ok::<(), HandlerError>(())
    });
    registry.register("fail", |_e: Event| async {
        Err::<(), _>(HandlerError::retry("upstream said no"))
    });
    // What the NATS relay answers while the connection is down.
    registry.register("outage", |_e: Event| async {
        Err::<(), _>(HandlerError::Snooze(std::time::Duration::from_secs(2)))
    });
    registry.register("slow", |e: Event| async move {
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        e.set_reply(json!("late"));
        Ok::<(), HandlerError>(())
    });
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&w.db.url)
        .await?;
    let config = Config {
        poll_interval: std::time::Duration::from_millis(50),
        ..Config::default()
    };
    let dispatcher = Dispatcher::new(pool, registry, config)?;
    let id = dispatcher.process_id();
    let stop = tokio_util::sync::CancellationToken::new();
    let waiter = stop.clone();
    let run = tokio::spawn(async move { dispatcher.run(waiter.cancelled_owned()).await });
    // Invoke answers no_handler at once while no live process serves the
    // topic, so wait until this one has recorded itself.
    let pool = w.db.pool.clone();
    let up = outbox_testkit::wait_until(std::time::Duration::from_secs(10), || {
        let pool = pool.clone();
        async move {
            outbox_core::store::processes::live(&pool)
                .await
                .is_ok_and(|live| live.iter().any(|p| p.id == id))
        }
    })
    .await;
    if !up {
        return Err("the dispatcher never recorded itself".into());
    }
    Ok((stop, run))
}

#[tokio::test]
async fn invoke_returns_the_answer_the_error_or_times_out_and_records_abandonment() -> TestResult {
    let w = World::new().await?;
    let operator = w.login("operator@x.io").await?;
    let (stop, run) = dispatcher_for(&w).await?;

    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/invoke/echo",
            Some(&operator),
            Some(json!({"payload": {"n": 7}})),
        )
        .await?;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["result"], json!({"echo": {"n": 7}}));

    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/invoke/fail",
            Some(&operator),
            Some(json!({})),
        )
        .await?;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (StatusCode::BAD_GATEWAY, Some("handler_failed"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("upstream said no"),
        "{body}"
    );

    // A target that cannot take the row now (the relay while NATS is
    // down): nothing ran, and the caller is told to try again (it got 502
    // "handler failed: snoozed for 1s").
    let answer = {
        use tower::ServiceExt;
        let request = axum::http::Request::post("/api/apps/app-a/invoke/outage")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {operator}"))
            .body(axum::body::Body::from("{}"))?;
        outbox_admin::router(w.state.clone())
            .oneshot(request)
            .await?
    };
    let (s, headers) = (answer.status(), answer.headers().clone());
    let body: serde_json::Value =
        serde_json::from_slice(&axum::body::to_bytes(answer.into_body(), 1 << 20).await?)?;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable")),
        "{body}"
    );
    assert_eq!(
        headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("2")
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nothing was run or published")),
        "{body}"
    );

    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/invoke/nobody",
            Some(&operator),
            Some(json!({})),
        )
        .await?;
    // Nobody serves the topic: its own code, not a handler failure.
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "no retries, the error comes back: {body}"
    );
    assert_eq!(body["error"]["code"], "no_handler", "{body}");
    // A topic that could never be written is refused as such, served or not.
    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/invoke/a%09b",
            Some(&operator),
            Some(json!({})),
        )
        .await?;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid")),
        "{body}"
    );

    // A paused topic, and a suspended app, answer at once: their row would
    // wait past the timeout and run after the caller was told it timed out.
    let held_back = async |why: &str| -> TestResult {
        let asked = std::time::Instant::now();
        let (s, body) = w
            .call(
                "POST",
                "/api/apps/app-a/invoke/echo",
                Some(&operator),
                Some(json!({"timeout_ms": 5000})),
            )
            .await?;
        assert_eq!(
            (s, body["error"]["code"].as_str()),
            (StatusCode::CONFLICT, Some("conflict")),
            "{body}"
        );
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{body}");
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(4),
            "answered at once"
        );
        Ok(())
    };
    outbox_core::store::pauses::pause(&w.db.pool, w.app_a, "echo", None, None).await?;
    held_back("paused").await?;
    outbox_core::store::pauses::resume(&w.db.pool, w.app_a, "echo").await?;
    outbox_core::store::apps::set_suspended(&w.db.pool, "app-a", true).await?;
    held_back("suspended").await?;
    outbox_core::store::apps::set_suspended(&w.db.pool, "app-a", false).await?;
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE topic = 'echo'")
        .fetch_one(&w.db.pool)
        .await?;
    assert_eq!(waiting, 0, "nothing was enqueued");

    // A row no handler took before the timeout is withdrawn: the caller was
    // told it timed out, and it must not run when the rate allows, later.
    let slowly = outbox_core::store::limits::Limits {
        rate_per_sec: Some(0.001),
        burst: Some(1),
        ..Default::default()
    };
    outbox_core::store::limits::set(&w.db.pool, w.app_a, "echo", &slowly, None).await?;
    // Processes take the limit up on their next beat: call until one waits.
    let mut timed_out = None;
    let asked = std::time::Instant::now();
    while asked.elapsed() < std::time::Duration::from_secs(15) {
        let (s, body) = w
            .call(
                "POST",
                "/api/apps/app-a/invoke/echo",
                Some(&operator),
                Some(json!({"timeout_ms": 1500})),
            )
            .await?;
        if s != StatusCode::OK {
            timed_out = Some((s, body));
            break;
        }
    }
    let (s, body) = timed_out.ok_or("the rate limit never held a row back")?;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("withdrawn before any handler took it")),
        "{body}"
    );
    outbox_core::store::limits::remove(&w.db.pool, w.app_a, "echo").await?;
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE topic = 'echo'")
        .fetch_one(&w.db.pool)
        .await?;
    assert_eq!(waiting, 0, "the withdrawn row is gone");
    let traced: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM abandoned_executions WHERE topic = 'echo' AND outcome = 'withdrawn'",
    )
    .fetch_one(&w.db.pool)
    .await?;
    assert_eq!(traced, 1, "and leaves a trace");

    let (s, body) = w
        .call(
            "POST",
            "/api/apps/app-a/invoke/slow",
            Some(&operator),
            Some(json!({"timeout_ms": 300})),
        )
        .await?;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (StatusCode::GATEWAY_TIMEOUT, Some("timeout"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("a handler has taken it or is taking it (row ")),
        "{body}"
    );
    // The caller is gone when the handler finishes: one abandoned execution.
    let recorded = outbox_testkit::wait_until(std::time::Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM abandoned_executions WHERE topic = 'slow' AND outcome = 'succeeded'")
            .fetch_one(&w.db.pool)
            .await
            .is_ok_and(|n| n == 1)
    })
    .await;
    stop.cancel();
    run.await??;
    assert!(recorded, "no abandoned_executions row");
    let (rows, dead, inboxes): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox), (SELECT count(*) FROM dead_letters), (SELECT count(*) FROM invocation_inboxes)",
    )
    .fetch_one(&w.db.pool)
    .await?;
    assert_eq!(
        (rows, dead, inboxes),
        (0, 0, 0),
        "no retries, no dead letters, no leftover inboxes"
    );
    Ok(())
}
