//! What the logs hold: no secrets or PII, retries and dead letters without
//! noise.

use std::process::Stdio;
use std::time::Duration;

use outbox_testkit::{TestDb, wait_until};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::support::{TestResult, http_send, outboxd, run, stop, text};

#[tokio::test]
async fn logs_hold_no_secret_password_token_or_seeded_pii() -> TestResult {
    let db = TestDb::new().await?;
    const JWT: &str = "jwt-secret-NEVER-LOG-0123456789abcdef";
    const WEBHOOK: &str = "whsec-NEVER-LOG-42";
    const DB_PASSWORD: &str = "db-pass-NEVER-LOG";
    const PASSWORD: &str = "Password-NEVER-LOG-1";
    const WRONG: &str = "Wrong-NEVER-LOG-2";
    const EMAIL: &str = "pii.person.never.log@example.com";
    const SSN: &str = "987-65-4321";
    // Trust authentication ignores the password, so it can ride in the URL.
    let url = db.url.replacen(
        "postgres://outboxd@",
        &format!("postgres://outboxd:{DB_PASSWORD}@"),
        1,
    );
    run(outboxd(Some(&url)).args(["app", "create", "shop"]))?;
    let mut create = outboxd(Some(&url));
    create
        .args(["user", "create", EMAIL, "--admin", "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = create.spawn()?;
    use std::io::Write as _;
    child
        .stdin
        .take()
        .ok_or("stdin")?
        .write_all(PASSWORD.as_bytes())?;
    let created = child.wait_with_output()?;
    assert!(created.status.success(), "{}", text(&created.stderr));
    // Its stdout is the answer the operator asked for ("created user …"), not a log.
    let mut captured = text(&created.stderr);

    let mut cmd = tokio::process::Command::from({
        let mut c = outboxd(Some(&url));
        c.env("JWT_SECRET", JWT)
            .env("OUTBOXD_WEBHOOK__SECRET", WEBHOOK)
            // The most talkative level a production might set.
            .env("OUTBOXD_LOG__FILTER", "debug")
            .arg("run");
        c
    });
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut server = cmd.spawn()?;
    let mut stderr = server.stderr.take().ok_or("stderr")?;
    let stderr_task = tokio::spawn(async move {
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all).await;
        all
    });
    let stdout = server.stdout.take().ok_or("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut out = String::new();
    let addr = loop {
        let line = lines.next_line().await?.ok_or("outboxd exited")?;
        out.push_str(&line);
        if let Some(a) = line.strip_prefix("outboxd listening on http://") {
            break a.trim().to_owned();
        }
    };
    let login = |password: &str| format!(r#"{{"email": "{EMAIL}", "password": "{password}"}}"#);
    let (s, _) = http_send(&addr, "POST", "/api/login", None, &login(WRONG)).await?;
    assert_eq!(s, 401);
    let (s, answer) = http_send(&addr, "POST", "/api/login", None, &login(PASSWORD)).await?;
    assert_eq!(s, 200, "{answer}");
    let token = serde_json::from_str::<serde_json::Value>(&answer)?["token"]
        .as_str()
        .ok_or("token")?
        .to_owned();
    let pii = format!(r#"{{"value": {{"email": "{EMAIL}", "ssn": "{SSN}"}}}}"#);
    let (s, answer) = http_send(
        &addr,
        "PUT",
        "/api/apps/shop/kv/people/p1",
        Some(&token),
        &pii,
    )
    .await?;
    assert_eq!(s, 201, "{answer}");
    let event = format!(r#"{{"payload": {{"email": "{EMAIL}", "ssn": "{SSN}"}}}}"#);
    let (s, answer) = http_send(
        &addr,
        "POST",
        // A webhook target that refuses the connection: the row fails.
        "/api/apps/shop/events/webhook:http%3A%2F%2F127.0.0.1%3A9%2Fpii",
        Some(&token),
        &event,
    )
    .await?;
    assert_eq!(s, 201, "{answer}");
    // A malformed body that carries the password is refused without echoing it.
    let (s, _) = http_send(&addr, "POST", "/api/login", None, &format!("{{{PASSWORD}")).await?;
    assert_eq!(s, 400);
    // The event fails at least once (and logs why) before we stop.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            sqlx::query_scalar::<_, i32>("SELECT max(attempt_count) FROM outbox")
                .fetch_one(&db.pool)
                .await
                .is_ok_and(|n| n >= 1)
        })
        .await
    );
    let status = stop(&mut server).await?;
    assert!(status.success());
    while let Ok(Some(line)) = lines.next_line().await {
        out.push_str(&line);
    }
    captured.push_str(&out);
    captured.push_str(&stderr_task.await?);
    assert!(
        captured.contains("dispatcher started") || captured.contains("DEBUG"),
        "the capture is empty: {captured}"
    );
    for secret in [
        JWT,
        WEBHOOK,
        DB_PASSWORD,
        PASSWORD,
        WRONG,
        EMAIL,
        SSN,
        token.as_str(),
    ] {
        assert!(
            !captured.contains(secret),
            "the logs contain {secret:?}:\n{}",
            captured
                .lines()
                .filter(|l| l.contains(secret))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(())
}

#[tokio::test]
async fn logs_show_retries_and_dead_letters_without_noise() -> TestResult {
    let db = TestDb::new().await?;
    // Migrated once by hand: the automatic migration on start then has nothing to say.
    assert!(run(outboxd(Some(&db.url)).arg("migrate"))?.status.success());
    let mut cmd = tokio::process::Command::from(outboxd(Some(&db.url)));
    cmd.env("OUTBOXD_LOG__FILTER", "info")
        .env("JWT_SECRET", "0123456789abcdef0123456789abcdef0123")
        .arg("demo")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let mut stderr = child.stderr.take().ok_or("stderr")?;
    let collected = tokio::spawn(async move {
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all).await;
        all
    });
    // Long enough for retries of one topic to repeat within a 10 s window.
    let failing = wait_until(Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT (SELECT count(*) FROM dead_letters) >= 3
                AND (SELECT count(*) FROM dead_letters WHERE topic = 'webhook.deliver') >= 2",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap_or(false)
    })
    .await;
    assert!(failing, "the demo produced no failures");
    let status = stop(&mut child).await?;
    assert!(status.success(), "{status:?}");
    let log = collected.await?;

    let dead: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("dead-lettered"))
        .collect();
    assert!(!dead.is_empty(), "{log}");
    for line in &dead {
        assert!(line.contains(" WARN "), "{line}");
        for field in ["id=", "app_id=", "topic=", "attempts=", "error="] {
            assert!(line.contains(field), "{field} missing: {line}");
        }
    }
    let retries: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("retry scheduled"))
        .collect();
    assert!(!retries.is_empty(), "{log}");
    assert!(
        retries
            .iter()
            .all(|l| l.contains("next_run_at=") && l.contains("error=")),
        "{retries:?}"
    );
    // One line per topic per 10 s: the run lasted less than two windows.
    for topic in ["webhook.deliver", "email.send"] {
        let lines = retries
            .iter()
            .filter(|l| l.contains(&format!("topic={topic} ")))
            .count();
        assert!(
            lines <= 3,
            "{topic}: {lines} retry lines in one run:\n{retries:#?}"
        );
    }
    // No empty fields, no debug dumps, no migration chatter, no warning on a clean stop.
    assert!(
        !log.contains("correlation_id= ") && !log.contains("correlation_id=}"),
        "{log}"
    );
    assert!(
        !log.contains("BatchReport {") && !log.contains("totals="),
        "{log}"
    );
    assert!(!log.contains("already exists, skipping"), "{log}");
    let after_stop = log
        .split("shutdown signal received")
        .nth(1)
        .ok_or("no shutdown line")?;
    // A row that reaches its last attempt while the process drains is still
    // dead-lettered and logged as such: that line is the work's, not the stop's.
    assert!(
        !after_stop
            .lines()
            .filter(|l| !l.contains("outbox_dispatch::failure_log"))
            .any(|l| l.contains(" WARN ") || l.contains(" ERROR ")),
        "a clean stop warned:\n{after_stop}"
    );
    assert!(
        !log.contains(&db.url),
        "the database URL is never logged whole"
    );
    Ok(())
}
