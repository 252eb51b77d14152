//! The `/metrics` endpoint: described, labelled, bounded, histograms.

use std::time::Duration;

use outbox_testkit::{TestDb, wait_until};

use crate::support::{TestResult, http_get, outboxd, run, spawn_server_with, stop};

#[tokio::test]
async fn metrics_are_described_labelled_bounded_and_histograms() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    // More topics than the label caps: the rest are counted as "other". Each
    // is a webhook target that refuses the connection, so every row fails;
    // each has a host of its own (127/8 is all loopback), since a webhook
    // topic's label keeps its host only, not its path and query.
    let cap = outbox_dispatch::telemetry::MAX_LABELLED;
    let events: Vec<outbox_core::NewEvent> = (0..cap + 5)
        .map(|n| {
            outbox_core::NewEvent::new(
                format!(
                    "webhook:http://127.0.{}.{}:9/t/{n}?token=t",
                    n / 250,
                    n % 250 + 1
                ),
                serde_json::json!({}),
            )
            .with_max_attempts(1)
        })
        .collect();
    let mut tx = db.pool.begin().await?;
    outbox_core::enqueue_batch(&mut tx, app, &events).await?;
    tx.commit().await?;
    let (mut child, addr) = spawn_server_with(
        &db.url,
        &["run"],
        &[("OUTBOXD_WEBHOOK__SECRET", "metrics-test-secret")],
    )
    .await?;
    let drained = wait_until(Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM dead_letters")
            .fetch_one(&db.pool)
            .await
            .is_ok_and(|n| n == (cap + 5) as i64)
    })
    .await;
    assert!(drained, "every row was tried once");
    // In an app of its own: the sampler may have labelled shop's topics up
    // to its cap while the webhook rows waited, and a pair keeps its label,
    // so a new topic of shop's may be summed under "other"; an app always
    // gets a few labels.
    db.app("calendar").await?;
    let mut cmd = outboxd(Some(&db.url));
    cmd.args([
        "enqueue",
        "--app",
        "calendar",
        "--topic",
        "later",
        "--delay-ms",
        "600000",
    ]);
    assert!(run(&mut cmd)?.status.success());
    // The leader samples row states every second in the test configuration.
    let sampled = wait_until(Duration::from_secs(20), || async {
        http_get(&addr, "/metrics").await.is_ok_and(|(_, m)| {
            m.contains(r#"outboxd_rows_scheduled{app="calendar",topic="later"} 1"#)
        })
    })
    .await;
    let (_, metrics) = http_get(&addr, "/metrics").await?;
    let status = stop(&mut child).await?;
    assert!(status.success());
    assert!(sampled, "no row-state gauges:\n{metrics}");

    // Every family has HELP and TYPE.
    let families: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("outboxd_"))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|name| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name)
        })
        .collect();
    assert!(families.len() >= 8, "{families:?}");
    for family in &families {
        assert!(
            metrics.contains(&format!("# HELP {family} ")),
            "no HELP for {family}"
        );
        assert!(
            metrics.contains(&format!("# TYPE {family} ")),
            "no TYPE for {family}"
        );
    }
    // Counters carry app and topic; past the cap, topic is "other". Which
    // topics come first depends on the order claims and their metrics run
    // in, so only the shape is checked: some topics labelled, one claim
    // each, every claim counted once.
    let claimed: Vec<(&str, f64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix(r#"outboxd_claimed_total{app="shop",topic=""#))
        .filter_map(|l| l.split_once(r#""} "#))
        .filter_map(|(topic, n)| n.parse().ok().map(|n| (topic, n)))
        .collect();
    assert!(
        claimed
            .iter()
            .any(|(topic, n)| topic.starts_with("webhook:http://127.0.") && *n == 1.0),
        "{metrics}"
    );
    assert!(
        claimed
            .iter()
            .all(|(topic, _)| *topic == "other" || topic.ends_with(":9/…")),
        "a webhook topic's path or query in a label: {metrics}"
    );
    assert!(
        claimed.iter().any(|(topic, _)| *topic == "other"),
        "{metrics}"
    );
    assert_eq!(
        claimed.iter().map(|(_, n)| n).sum::<f64>(),
        (cap + 5) as f64,
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"outboxd_dead_lettered_total{app="shop",topic="other"}"#),
        "{metrics}"
    );
    let labelled_topics = metrics
        .lines()
        .filter(|l| l.starts_with("outboxd_claimed_total{"))
        .count();
    // One app: its share of the labels, and "other".
    assert_eq!(
        labelled_topics,
        outbox_dispatch::telemetry::MAX_LABELLED_PER_APP + 1,
        "claimed series"
    );
    // Durations are histograms (they sum across processes), not summaries.
    assert!(
        metrics.contains("# TYPE outboxd_handler_duration_seconds histogram"),
        "{metrics}"
    );
    assert!(
        metrics.contains("outboxd_handler_duration_seconds_bucket{"),
        "{metrics}"
    );
    // How long rows waited to start, with buckets up to an hour.
    assert!(
        metrics.lines().any(
            |l| l.starts_with("outboxd_queue_wait_seconds_bucket{app=\"shop\"")
                && l.contains("le=\"3600\"")
        ),
        "{metrics}"
    );
    Ok(())
}

/// Connections held open without finishing a request are closed after
/// [`outboxd::http::HEADER_READ_TIMEOUT`], and no more than
/// `http.max_connections` are served at once: a client holding connections
/// (a slowloris) could take every file descriptor of the process, which the
/// database pool and webhook deliveries need too. While all of them are
/// taken, [`outboxd::http::PROBE_CONNECTIONS`] more serve the probes only
/// (before, long requests filling every slot made `/healthz` time out, and
/// an orchestrator would restart a process that was merely busy); those
/// are capped and closed sooner too.
#[tokio::test]
async fn connections_held_without_a_request_are_capped_and_closed() -> TestResult {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::new().await?;
    let (mut child, addr) = spawn_server_with(
        &db.url,
        &["run"],
        &[
            ("OUTBOXD_HTTP__MAX_CONNECTIONS", "3"),
            ("JWT_SECRET", "a-test-secret-of-at-least-32-bytes!!"),
        ],
    )
    .await?;
    let hold = |count: usize| {
        let addr = addr.clone();
        async move {
            let mut held = Vec::new();
            for _ in 0..count {
                let mut socket = tokio::net::TcpStream::connect(&addr).await?;
                socket
                    .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
                    .await?;
                held.push(socket);
            }
            Ok::<_, std::io::Error>(held)
        }
    };
    let started = std::time::Instant::now();
    let mut held = hold(3).await?;
    // Every slot is taken: the probes still answer, nothing else does.
    let (status, body) =
        tokio::time::timeout(Duration::from_secs(2), http_get(&addr, "/healthz")).await??;
    assert_eq!(status, 200, "{body}");
    let (status, body) =
        tokio::time::timeout(Duration::from_secs(5), http_get(&addr, "/readyz")).await??;
    assert_eq!(status, 200, "{body}");
    let (status, body) =
        tokio::time::timeout(Duration::from_secs(2), http_get(&addr, "/api/apps")).await??;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"busy\""), "{body}");
    // The reserve is capped as well: a probe past it is answered only once
    // a held connection of the reserve has closed, which happens within its
    // shorter header time.
    let reserve_held = hold(outboxd::http::PROBE_CONNECTIONS).await?;
    let reserve_started = std::time::Instant::now();
    let probe = async {
        let answer = tokio::time::timeout(Duration::from_secs(10), http_get(&addr, "/healthz"))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|(status, _)| status);
        (answer, std::time::Instant::now())
    };
    let closes = async {
        let mut first_closed = None;
        for mut socket in reserve_held {
            let mut rest = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut rest)).await;
            first_closed.get_or_insert_with(std::time::Instant::now);
        }
        first_closed.unwrap_or(reserve_started)
    };
    let ((answer, answered_at), first_closed) = tokio::join!(probe, closes);
    assert_eq!(answer, Some(200));
    assert!(
        answered_at + Duration::from_millis(200) >= first_closed,
        "a connection past the reserve was served {:?} before one of it closed",
        first_closed - answered_at
    );
    assert!(
        first_closed - reserve_started < Duration::from_secs(3),
        "the reserve's connections were held {:?}",
        first_closed - reserve_started
    );
    // The held ones are closed when their headers are overdue; another
    // header line does not buy time.
    for socket in &mut held {
        let _ = socket.write_all(b"x-more: 1\r\n").await;
    }
    for socket in &mut held {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), socket.read_to_end(&mut rest)).await??;
    }
    let closed_after = started.elapsed();
    let (status, body) =
        tokio::time::timeout(Duration::from_secs(10), http_get(&addr, "/api/apps")).await??;
    let exit = stop(&mut child).await?;
    assert_eq!(status, 401, "served again: {body}");
    assert!(
        closed_after >= outboxd::http::HEADER_READ_TIMEOUT - Duration::from_secs(1),
        "closed after {closed_after:?}"
    );
    assert!(exit.success());
    Ok(())
}

/// Sends `GET /metrics` requests one after another without waiting for the
/// answers (HTTP/1.1 pipelining), until the server stops taking them.
async fn pipeline_requests(
    mut requests: tokio::net::tcp::OwnedWriteHalf,
) -> tokio::net::tcp::OwnedWriteHalf {
    use tokio::io::AsyncWriteExt;
    for _ in 0..200_000 {
        if requests
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .is_err()
        {
            break;
        }
    }
    requests
}

/// A client that stops reading its answers loses its connection once a
/// write has waited [`outboxd::http::WRITE_STALL_TIMEOUT`]: before, it held
/// the connection, and a slot of `http.max_connections`, for as long as it
/// liked (here: requests pipelined without reading a byte of the answers).
#[tokio::test]
async fn a_client_that_stops_reading_its_answers_loses_the_connection() -> TestResult {
    let db = TestDb::new().await?;
    let (mut child, addr) =
        spawn_server_with(&db.url, &["run"], &[("OUTBOXD_HTTP__MAX_CONNECTIONS", "1")]).await?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let (unread, requests) = socket.connect(addr.parse()?).await?.into_split();
    let started = std::time::Instant::now();
    let writer = tokio::spawn(pipeline_requests(requests));
    // The one slot is taken (the reserve answers 503 busy) until the
    // stalled connection is cut; then the slot serves any route again.
    let freed = wait_until(
        outboxd::http::WRITE_STALL_TIMEOUT + Duration::from_secs(20),
        || async {
            tokio::time::timeout(Duration::from_secs(3), http_get(&addr, "/no-such-page"))
                .await
                .is_ok_and(|answer| answer.is_ok_and(|(status, _)| status == 404))
        },
    )
    .await;
    let waited = started.elapsed();
    writer.abort();
    drop(unread);
    let exit = stop(&mut child).await?;
    assert!(freed, "the slot was not given back within {waited:?}");
    assert!(
        waited >= outboxd::http::WRITE_STALL_TIMEOUT - Duration::from_secs(1),
        "cut after {waited:?}: the slot was never taken"
    );
    assert!(exit.success());
    Ok(())
}

/// A client that reads its answers slowly, but steadily, keeps its
/// connection: the stall limit counts progress by what leaves a small send
/// buffer (with the system's buffers of megabytes, one reading 40 KB/s was
/// cut after 30 s as if it read nothing).
#[tokio::test]
async fn a_client_that_reads_slowly_keeps_its_connection() -> TestResult {
    use tokio::io::AsyncReadExt;
    let db = TestDb::new().await?;
    let (mut child, addr) = spawn_server_with(&db.url, &["run"], &[]).await?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let (mut answers, requests) = socket.connect(addr.parse()?).await?.into_split();
    let writer = tokio::spawn(pipeline_requests(requests));
    // 4 KB/s for longer than the stall limit.
    let started = std::time::Instant::now();
    let mut read = 0usize;
    let mut chunk = [0u8; 400];
    let outcome = loop {
        if started.elapsed() > outboxd::http::WRITE_STALL_TIMEOUT + Duration::from_secs(10) {
            break Ok(());
        }
        match tokio::time::timeout(Duration::from_secs(5), answers.read(&mut chunk)).await {
            Ok(Ok(0)) => break Err(format!("closed after {:?}", started.elapsed())),
            Ok(Ok(n)) => read += n,
            Ok(Err(err)) => break Err(format!("{err} after {:?}", started.elapsed())),
            Err(_) => break Err("no answer for 5 s".to_owned()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    writer.abort();
    drop(answers);
    let exit = stop(&mut child).await?;
    assert_eq!(outcome, Ok(()), "after {read} bytes");
    assert!(exit.success());
    Ok(())
}

/// A body trickled in too slowly is cut off after
/// [`outboxd::http::BODY_READ_TIMEOUT`], so it cannot hold a connection (and
/// a slot of `http.max_connections`) for ever.
#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_cut_off() -> TestResult {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::new().await?;
    let (mut child, addr) = spawn_server_with(
        &db.url,
        &["run"],
        &[("JWT_SECRET", "a-test-secret-of-at-least-32-bytes!!")],
    )
    .await?;
    let started = std::time::Instant::now();
    let mut socket = tokio::net::TcpStream::connect(&addr).await?;
    socket
        .write_all(
            b"POST /api/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"email\":",
        )
        .await?;
    let mut answer = Vec::new();
    let limit = outboxd::http::BODY_READ_TIMEOUT + Duration::from_secs(15);
    tokio::time::timeout(limit, socket.read_to_end(&mut answer)).await??;
    let waited = started.elapsed();
    let exit = stop(&mut child).await?;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        waited >= outboxd::http::BODY_READ_TIMEOUT - Duration::from_secs(1),
        "cut off after {waited:?}"
    );
    assert!(exit.success());
    Ok(())
}
