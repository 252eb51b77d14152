//! `outboxd enqueue` and `outboxd run`: health, draining on SIGTERM, and
//! maintenance leadership.

use std::time::Duration;

use outbox_testkit::{TestDb, wait_until};

use crate::support::{TestResult, http_get, outboxd, run, spawn_server, stop, text};

#[tokio::test]
async fn cli_enqueues_and_run_serves_health_then_drains_on_sigterm() -> TestResult {
    let db = TestDb::new().await?;
    let out = run(outboxd(Some(&db.url)).args(["app", "create", "shop"]))?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(outboxd(Some(&db.url)).args([
        "enqueue",
        "--app",
        "shop",
        "--topic",
        "t",
        "--payload",
        r#"{"a":1}"#,
        "--idempotency-key",
        "k1",
    ]))?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    uuid::Uuid::parse_str(&id)?;
    let again = run(outboxd(Some(&db.url)).args([
        "enqueue",
        "--app",
        "shop",
        "--topic",
        "t",
        "--payload",
        r#"{"a":2}"#,
        "--idempotency-key",
        "k1",
    ]))?;
    assert_eq!(
        text(&again.stdout).trim(),
        id,
        "idempotent through the CLI too"
    );
    let bad = run(outboxd(Some(&db.url)).args([
        "enqueue",
        "--app",
        "shop",
        "--topic",
        "t",
        "--payload",
        "{not json",
    ]))?;
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("not valid JSON"),
        "{}",
        text(&bad.stderr)
    );
    let unknown = run(outboxd(Some(&db.url)).args(["enqueue", "--app", "nope", "--topic", "t"]))?;
    assert!(
        text(&unknown.stderr).contains("unknown app"),
        "{}",
        text(&unknown.stderr)
    );

    let (mut child, addr) = spawn_server(&db.url, &["run"]).await?;
    assert_eq!(
        http_get(&addr, "/healthz").await?,
        (200, r#"{"nats":null,"status":"ok"}"#.to_owned())
    );
    let (status, body) = http_get(&addr, "/readyz").await?;
    assert_eq!(status, 200, "{body}");
    // A plain `run` has no handler for the row's topic: the row waits for a
    // process that serves it, without spending attempts, and /metrics shows
    // it as unserved once the leader has sampled.
    let unserved = r#"outboxd_rows_unserved{app="shop",topic="t"} 1"#;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let (status, body) = http_get(&addr, "/metrics").await?;
        assert_eq!(status, 200);
        if body.contains(unserved) || tokio::time::Instant::now() >= deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(metrics.contains(unserved), "{metrics}");
    assert!(
        metrics.contains(r#"outboxd_unserved_oldest_age_seconds{app="shop",topic="t"}"#),
        "{metrics}"
    );
    let attempts: i32 = sqlx::query_scalar("SELECT attempt_count FROM outbox")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(attempts, 0);
    assert!(
        metrics.contains(r#"outboxd_rows_due{app="shop",topic="t"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("outboxd_oldest_due_age_seconds"),
        "{metrics}"
    );
    // Paused on purpose, the row is neither unserved nor "falling behind":
    // the alerts built on those must not page anyone for a planned pause.
    let shop: uuid::Uuid = sqlx::query_scalar("SELECT id FROM apps WHERE slug = 'shop'")
        .fetch_one(&db.pool)
        .await?;
    outbox_core::store::pauses::pause(&db.pool, shop, "t", Some("test"), None).await?;
    let paused = r#"outboxd_rows_paused{app="shop",topic="t"} 1"#;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let (_, body) = http_get(&addr, "/metrics").await?;
        if body.contains(paused) || tokio::time::Instant::now() >= deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(metrics.contains(paused), "{metrics}");
    assert!(
        metrics.contains(r#"outboxd_rows_unserved{app="shop",topic="t"} 0"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("\noutboxd_oldest_due_age_seconds 0\n"),
        "{metrics}"
    );
    let status = stop(&mut child).await?;
    assert!(status.success(), "drain must exit 0, got {status:?}");
    assert_eq!(outbox_core::store::outbox::count_leased(&db.pool).await?, 0);
    Ok(())
}

/// Reads the `outboxd_leader` gauge of a running process (None while unreadable).
async fn leads(addr: &str) -> Option<bool> {
    let (_, metrics) = http_get(addr, "/metrics").await.ok()?;
    let line = metrics.lines().find(|l| l.starts_with("outboxd_leader "))?;
    Some(line.trim_end().ends_with(" 1"))
}

#[tokio::test]
async fn maintenance_leadership_moves_when_the_leader_is_killed() -> TestResult {
    let db = TestDb::new().await?;
    let app = outbox_core::store::apps::ensure(&db.pool, "shop", "shop")
        .await?
        .id;
    let mut tx = db.pool.begin().await?;
    let spec = outbox_core::store::triggers::TriggerSpec::Cron {
        schedule: "* * * * * *".into(),
        timezone: "UTC".into(),
    };
    outbox_core::store::triggers::create(&mut tx, app, "tick", "tick", None, &spec).await?;
    tx.commit().await?;
    let (mut first, first_addr) = spawn_server(&db.url, &["run"]).await?;
    let (mut second, second_addr) = spawn_server(&db.url, &["run"]).await?;
    let one_leader = wait_until(Duration::from_secs(15), || async {
        matches!((leads(&first_addr).await, leads(&second_addr).await), (Some(a), Some(b)) if a != b)
    })
    .await;
    assert!(one_leader, "exactly one process should lead");
    let (leader, leader_addr, mut other, other_addr) = if leads(&first_addr).await == Some(true) {
        (&mut first, first_addr.clone(), second, second_addr.clone())
    } else {
        (&mut second, second_addr.clone(), first, first_addr.clone())
    };
    leader.start_kill()?;
    leader.wait().await?;
    let _ = leader_addr;
    let took_over = wait_until(Duration::from_secs(15), || async {
        leads(&other_addr).await == Some(true)
    })
    .await;
    // Ticks keep coming under the new leader, and none was enqueued twice.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let status = stop(&mut other).await?;
    assert!(
        took_over,
        "leadership did not move to the surviving process"
    );
    assert!(status.success());
    let ticks: Vec<(String, i64)> = sqlx::query_as(
        "SELECT tick, count(*) FROM (
            SELECT payload->>'scheduled_at' AS tick FROM outbox WHERE source = 'cron'
            UNION ALL
            SELECT payload->>'scheduled_at' FROM dead_letters WHERE source = 'cron') t
         GROUP BY tick",
    )
    .fetch_all(&db.pool)
    .await?;
    assert!(ticks.len() >= 2, "{ticks:?}");
    assert!(
        ticks.iter().all(|(_, n)| *n == 1),
        "a tick was enqueued twice: {ticks:?}"
    );
    Ok(())
}

/// A process started on a database that lacks this version's migrations,
/// with `database.auto_migrate` off (a roll-out that migrates from a job of
/// its own), is not ready until they are applied: it answers, but could
/// claim and write nothing; nor is one whose outbox is gone.
#[tokio::test]
async fn a_process_on_a_database_behind_its_migrations_is_not_ready_until_migrated() -> TestResult {
    let db = TestDb::migrated_to(37).await?;
    let (mut child, addr) = crate::support::spawn_server_with(
        &db.url,
        &["run"],
        &[("OUTBOXD_DATABASE__AUTO_MIGRATE", "false")],
    )
    .await?;
    let (before, body) = http_get(&addr, "/readyz").await?;
    let out = run(outboxd(Some(&db.url)).arg("migrate"))?;
    let ready = wait_until(Duration::from_secs(10), || async {
        http_get(&addr, "/readyz")
            .await
            .is_ok_and(|(s, _)| s == 200)
    })
    .await;
    // A database that records every migration but lost its outbox (a dump
    // restored without outboxd's tables) is not ready either.
    sqlx::query("DROP TABLE outbox CASCADE")
        .execute(&db.pool)
        .await?;
    let (without_outbox, lost) = http_get(&addr, "/readyz").await?;
    let exit = stop(&mut child).await?;
    assert_eq!(without_outbox, 503, "{lost}");
    assert!(lost.contains(r#""schema":false"#), "{lost}");
    assert_eq!(before, 503, "{body}");
    assert!(
        body.contains(r#""postgres":true"#) && body.contains(r#""schema":false"#),
        "{body}"
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(ready, "/readyz stayed 503 after `outboxd migrate`");
    assert!(exit.success());
    Ok(())
}

/// `OUTBOXD_HTTP_PORT` is the demo script's knob: `outboxd run` says it does
/// nothing there instead of listening elsewhere without a word.
#[tokio::test]
async fn the_demo_scripts_port_knob_is_named_when_it_does_nothing() -> TestResult {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::AsyncBufReadExt;
    let db = TestDb::new().await?;
    let mut cmd = tokio::process::Command::from(outboxd(Some(&db.url)));
    cmd.arg("run")
        .env("OUTBOXD_HTTP_PORT", "1")
        .env("OUTBOXD_HTTP__LISTEN", "127.0.0.1:0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let warned = std::sync::Arc::new(AtomicBool::new(false));
    let mut log = tokio::io::BufReader::new(child.stderr.take().ok_or("no stderr")?).lines();
    tokio::spawn({
        let warned = warned.clone();
        async move {
            while let Ok(Some(line)) = log.next_line().await {
                if line.contains("OUTBOXD_HTTP_PORT is scripts/demo.sh's knob") {
                    warned.store(true, Ordering::SeqCst);
                }
            }
        }
    });
    // Until it listens (a SIGTERM before that finds no handler yet), then
    // on, so the child never blocks on a full pipe.
    let mut out = tokio::io::BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    let listening = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = out.next_line().await {
            if line.starts_with("outboxd listening on") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
    let named = wait_until(Duration::from_secs(10), || async {
        warned.load(Ordering::SeqCst)
    })
    .await;
    let exit = stop(&mut child).await?;
    assert!(listening, "outboxd did not listen");
    assert!(named, "no warning about OUTBOXD_HTTP_PORT");
    assert!(exit.success());
    Ok(())
}

/// Every answer carries `X-Content-Type-Options: nosniff`: the probes,
/// `/metrics`, and an unknown path under the admin's API.
#[tokio::test]
async fn every_answer_says_nosniff() -> TestResult {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::new().await?;
    let (mut child, addr) = crate::support::spawn_server_with(
        &db.url,
        &["run"],
        &[("JWT_SECRET", "0123456789abcdef0123456789abcdef")],
    )
    .await?;
    let mut missing = Vec::new();
    for path in ["/healthz", "/readyz", "/metrics", "/api/nope", "/nope"] {
        let mut stream = tokio::net::TcpStream::connect(&addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let head = response
            .split("\r\n\r\n")
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if !head.contains("x-content-type-options: nosniff") {
            missing.push(path);
        }
    }
    let exit = stop(&mut child).await?;
    assert!(missing.is_empty(), "no nosniff on {missing:?}");
    assert!(exit.success());
    Ok(())
}
