//! Black-box tests of the `outboxd` binary against a real PostgreSQL.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use outbox_testkit::{TestDb, wait_until};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn outboxd(db_url: Option<&str>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outboxd"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "OUTBOXD_CONFIG_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../config"),
        )
        .env("OUTBOXD_ENV", "test")
        .env("OUTBOXD_LOG__FILTER", "warn")
        .env("OUTBOXD_HTTP__LISTEN", "127.0.0.1:0");
    if let Some(url) = db_url {
        cmd.env("DATABASE_URL", url);
    }
    cmd
}

fn run(cmd: &mut Command) -> Result<Output, std::io::Error> {
    cmd.stdin(Stdio::null()).output()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A minimal HTTP/1.1 GET, enough for the health and metrics endpoints.
async fn http_get(addr: &str, path: &str) -> Result<(u16, String), Box<dyn std::error::Error>> {
    http_send(addr, "GET", path, None, "").await
}

/// Starts `outboxd <args>` and returns the child and the HTTP address it printed.
async fn spawn_server(
    db_url: &str,
    args: &[&str],
) -> Result<(tokio::process::Child, String), Box<dyn std::error::Error>> {
    let mut cmd = tokio::process::Command::from(outboxd(Some(db_url)));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(url) = line.strip_prefix("outboxd listening on http://") {
                return Ok::<String, std::io::Error>(url.trim().to_owned());
            }
        }
        Err(std::io::Error::other("outboxd exited before listening"))
    })
    .await??;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, addr))
}

async fn stop(
    child: &mut tokio::process::Child,
) -> Result<std::process::ExitStatus, Box<dyn std::error::Error>> {
    let pid = child.id().ok_or("already exited")?;
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    assert!(status.success());
    Ok(tokio::time::timeout(Duration::from_secs(30), child.wait()).await??)
}

#[test]
fn bad_config_is_a_clear_error_and_a_nonzero_exit() -> TestResult {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "OUTBOXD_DISPATCHER__BATCH_SIZE",
            "0",
            &["dispatcher.batch_size", "1..=10000"],
        ),
        (
            "OUTBOXD_TRIGGER_RETRY_MAX_ATTEMPTS",
            "many",
            &[
                "trigger_retry_max_attempts",
                "OUTBOXD_TRIGGER_RETRY_MAX_ATTEMPTS",
            ],
        ),
        (
            "OUTBOXD_DEAD_LETTER_RETENTION_DAYS",
            "-1",
            &["dead_letter_retention_days"],
        ),
        (
            "OUTBOXD_HTTP__LISTEN",
            "nowhere",
            &["http.listen", "socket address"],
        ),
        (
            "DATABASE_URL",
            "mysql://x",
            &["database.url", "PostgreSQL URL"],
        ),
        ("OUTBOXD_DISPATCHER__BOGUS", "1", &["bogus"]),
        (
            "JWT_SECRET",
            "short-secret",
            &["admin.jwt_secret", "12 bytes", "at least 32"],
        ),
    ];
    for (key, value, expected) in cases {
        let out = run(outboxd(None).env(key, value).arg("config"))?;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}={value}: {stderr}");
        for needle in *expected {
            assert!(
                stderr.contains(needle),
                "{key}={value}: {stderr:?} lacks {needle:?}"
            );
        }
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let out = run(outboxd(None).env("OUTBOXD_ENV", "nope").arg("config"))?;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("nope.toml"));
    Ok(())
}

#[test]
fn unreachable_database_is_a_clear_error_without_the_password() -> TestResult {
    let out = run(outboxd(Some("postgres://user:s3cret@127.0.0.1:1/db"))
        .env("OUTBOXD_DATABASE__ACQUIRE_TIMEOUT_MS", "500")
        .arg("migrate"))?;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot connect to PostgreSQL at postgres://user@127.0.0.1:1/db"),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret"), "{stderr}");
    Ok(())
}

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
    assert_eq!(http_get(&addr, "/healthz").await?, (200, "ok".to_owned()));
    let (status, body) = http_get(&addr, "/readyz").await?;
    assert_eq!(status, 200, "{body}");
    // The row has no handler in a plain `run`: it is retried with a clear error.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            sqlx::query_scalar::<_, Option<String>>("SELECT last_error FROM outbox LIMIT 1")
                .fetch_optional(&db.pool)
                .await
                .ok()
                .flatten()
                .flatten()
                .is_some_and(|e| e.contains("no handler registered"))
        })
        .await
    );
    let (status, metrics) = http_get(&addr, "/metrics").await?;
    assert_eq!(status, 200);
    assert!(metrics.contains("outboxd_claimed_total"), "{metrics}");
    assert!(
        metrics.contains("outboxd_oldest_due_age_seconds"),
        "{metrics}"
    );
    let status = stop(&mut child).await?;
    assert!(status.success(), "drain must exit 0, got {status:?}");
    assert_eq!(outbox_core::store::outbox::count_leased(&db.pool).await?, 0);
    Ok(())
}

#[tokio::test]
async fn demo_produces_dead_letters_the_cli_lists_and_exits_cleanly() -> TestResult {
    let db = TestDb::new().await?;
    let (mut child, _addr) = spawn_server(&db.url, &["demo"]).await?;
    // Dead letters of two topics, one of them handled by the demo's
    // dead-letter trigger, and the KV and cron triggers' rows.
    let appeared = wait_until(Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT (SELECT count(DISTINCT topic) FROM dead_letters) >= 2
                AND EXISTS (SELECT 1 FROM dead_letters WHERE resolution = 'handled_by_script')
                AND EXISTS (SELECT 1 FROM kv_entries)
                AND EXISTS (SELECT 1 FROM cron_trigger_details WHERE last_fire_at IS NOT NULL)",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap_or(false)
    })
    .await;
    let status = stop(&mut child).await?;
    assert!(
        appeared,
        "the demo made no dead letters of two topics within 30 s"
    );
    assert!(status.success(), "{status:?}");
    assert_eq!(
        outbox_core::store::outbox::count_leased(&db.pool).await?,
        0,
        "drain left a leased row"
    );

    let out = run(outboxd(Some(&db.url)).args(["dead-letters", "list", "--app", "demo"]))?;
    let listing = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        listing.contains("webhook.deliver") || listing.contains("invoice.render"),
        "{listing}"
    );
    let first_id = listing
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .ok_or("no row in the listing")?
        .to_owned();
    let out =
        run(outboxd(Some(&db.url)).args(["dead-letters", "show", "--app", "demo", &first_id]))?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(shown["id"], first_id);
    assert!(shown["payload"].is_object());
    let out =
        run(outboxd(Some(&db.url)).args(["dead-letters", "show", "--app", "demo", "not-a-uuid"]))?;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not a UUID"));

    // Pages tell the truth, rows carry their state, long errors end in an ellipsis.
    let out = run(outboxd(Some(&db.url)).args([
        "dead-letters",
        "list",
        "--app",
        "demo",
        "--limit",
        "1",
    ]))?;
    let listing = text(&out.stdout);
    let total: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dead_letters d JOIN apps a ON a.id = d.app_id WHERE a.slug = 'demo'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert!(
        listing.contains(&format!("showing 1 of {total} dead letter(s)")),
        "{listing}"
    );
    assert!(
        listing.contains("STATE") && listing.contains("--after"),
        "{listing}"
    );
    let out = run(outboxd(Some(&db.url)).args([
        "dead-letters",
        "list",
        "--app",
        "demo",
        "--all",
        "--limit",
        "2",
        "--json",
    ]))?;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        doc["items"].as_array().map(Vec::len),
        Some(total as usize),
        "--all pages through everything"
    );
    assert_eq!(doc["total"], total);
    // The dead letter remembers its attempt budget; replay keeps it or takes an override.
    let replayable: Vec<(uuid::Uuid, Option<i32>)> = sqlx::query_as(
        "SELECT d.id, d.max_attempts FROM dead_letters d WHERE d.resolved_at IS NULL AND d.topic = 'webhook.deliver' LIMIT 2",
    )
    .fetch_all(&db.pool)
    .await?;
    if let [(keep, budget), (change, _)] = replayable.as_slice() {
        assert_eq!(
            *budget,
            Some(3),
            "webhook.deliver rows are enqueued with 3 attempts"
        );
        for (id, extra) in [(keep, None), (change, Some("9"))] {
            let id = id.to_string();
            let mut args = vec!["dead-letters", "replay", "--app", "demo", id.as_str()];
            args.extend(extra.iter().flat_map(|n| ["--max-attempts", *n]));
            let out = run(outboxd(Some(&db.url)).args(&args))?;
            assert!(out.status.success(), "{}", text(&out.stderr));
        }
        let budgets: Vec<Option<i32>> = sqlx::query_scalar(
            "SELECT max_attempts FROM outbox WHERE replayed_from = ANY($1) ORDER BY replayed_from = $2 DESC",
        )
        .bind(vec![*keep, *change])
        .bind(*keep)
        .fetch_all(&db.pool)
        .await?;
        assert_eq!(budgets, vec![Some(3), Some(9)]);
    }
    // `ignore`, and its older name `resolve`, say the same thing.
    let unresolved: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT id FROM dead_letters WHERE resolved_at IS NULL LIMIT 2")
            .fetch_all(&db.pool)
            .await?;
    for (verb, id) in ["ignore", "resolve"].iter().zip(&unresolved) {
        let out = run(outboxd(Some(&db.url)).args([
            "dead-letters",
            verb,
            "--app",
            "demo",
            &id.to_string(),
        ]))?;
        assert!(
            text(&out.stdout).contains(&format!("ignored {id}")),
            "{verb}: {}",
            text(&out.stderr)
        );
    }
    let out = run(outboxd(Some(&db.url)).args([
        "dead-letters",
        "list",
        "--app",
        "demo",
        "--state",
        "ignored",
        "--json",
    ]))?;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert!(
        doc["items"]
            .as_array()
            .is_some_and(|rows| rows.len() >= unresolved.len()
                && rows.iter().all(|r| r["resolution"] == "ignored")),
        "{doc}"
    );
    Ok(())
}

/// A folder of one test's own, removed with everything in it (a JetStream
/// store preallocates tens of megabytes) when the test ends.
struct ScratchDir(std::path::PathBuf);

impl std::ops::Deref for ScratchDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for ScratchDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for ScratchDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A config folder whose overlay points the stream contract at a stream and
/// subject space of this test's own on the shared nats-server.
fn nats_config_dir(
    prefix: &str,
    max_age_secs: u64,
) -> Result<ScratchDir, Box<dyn std::error::Error>> {
    let dir = ScratchDir(std::env::temp_dir().join(format!("outboxd-{prefix}")));
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/default.toml"),
        dir.join("default.toml"),
    )?;
    std::fs::write(
        dir.join("nats-test.toml"),
        format!(
            "[dispatcher]\npoll_interval_ms = 100\n[nats]\nsubject_template = \"{prefix}.{{app}}.{{topic}}\"\n\
             [nats.stream]\nname = \"S_{prefix}\"\nsubjects = [\"{prefix}.>\"]\nmax_age_secs = {max_age_secs}\n\
             [consumer]\nsubjects = [\"{prefix}.>\"]\n"
        ),
    )?;
    Ok(dir)
}

#[tokio::test]
async fn run_relays_unhandled_topics_to_jetstream_and_refuses_a_mismatched_stream() -> TestResult {
    let nats_url =
        std::env::var("NATS_URL").map_err(|_| "NATS_URL is not set: run scripts/test.sh")?;
    let db = TestDb::new().await?;
    let prefix = format!("b{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let dir = nats_config_dir(&prefix, 3600)?;
    run(outboxd(Some(&db.url)).args(["app", "create", "shop"]))?;
    for n in 0..3 {
        let out = run(outboxd(Some(&db.url)).args([
            "enqueue",
            "--app",
            "shop",
            "--topic",
            "order.created",
            "--payload",
            &format!("{{\"n\":{n}}}"),
        ]))?;
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let mut cmd = tokio::process::Command::from({
        let mut c = outboxd(Some(&db.url));
        c.env("OUTBOXD_CONFIG_DIR", &dir)
            .env("OUTBOXD_ENV", "nats-test")
            .env("NATS_URL", &nats_url)
            .arg("run");
        c
    });
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let drained = wait_until(Duration::from_secs(30), || async {
        outbox_core::store::outbox::count(&db.pool).await.ok() == Some(0)
    })
    .await;
    let status = stop(&mut child).await?;
    assert!(drained, "rows were not relayed");
    assert!(status.success(), "{status:?}");
    let js = async_nats::jetstream::new(async_nats::connect(&nats_url).await?);
    let mut stream = js.get_stream(format!("S_{prefix}")).await?;
    assert_eq!(stream.info().await?.state.messages, 3);

    // `outboxd consume` reads them back through the consumer runtime and acks them.
    let mut consumer = tokio::process::Command::from({
        let mut c = outboxd(Some(&db.url));
        c.env("OUTBOXD_CONFIG_DIR", &dir)
            .env("OUTBOXD_ENV", "nats-test")
            .env("NATS_URL", &nats_url)
            .env("OUTBOXD_CONSUMER__GROUP", &prefix)
            .arg("consume");
        c
    });
    consumer
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut consumer = consumer.spawn()?;
    let durable = outbox_nats::durable_name("consume", &prefix);
    let acked = wait_until(Duration::from_secs(20), || async {
        match stream.consumer_info(&durable).await {
            Ok(info) => info.ack_floor.stream_sequence == 3 && info.num_ack_pending == 0,
            Err(_) => false,
        }
    })
    .await;
    let exit = stop(&mut consumer).await?;
    assert!(acked, "outboxd consume did not ack the relayed events");
    assert!(exit.success(), "{exit:?}");

    // Same stream, different contract: a clear start-up error, nothing replaced.
    let other = nats_config_dir(&format!("{prefix}m"), 60)?;
    std::fs::write(
        other.join("nats-test.toml"),
        format!(
            "[nats]\nsubject_template = \"{prefix}.{{app}}.{{topic}}\"\n[nats.stream]\nname = \"S_{prefix}\"\nsubjects = [\"{prefix}.>\"]\nmax_age_secs = 60\n"
        ),
    )?;
    let out = run(outboxd(Some(&db.url))
        .env("OUTBOXD_CONFIG_DIR", &other)
        .env("OUTBOXD_ENV", "nats-test")
        .env("NATS_URL", &nats_url)
        .arg("run"))?;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("max_age: configured 60s, server 3600s"),
        "{stderr}"
    );
    assert_eq!(
        stream.info().await?.config.max_age,
        Duration::from_secs(3600)
    );
    Ok(())
}

/// A nats-server of this test's own (it gets killed), on a fixed port so a
/// restart comes back at the same address with the same store.
struct OwnNats {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl OwnNats {
    fn start(port: u16, dir: std::path::PathBuf) -> Result<Self, Box<dyn std::error::Error>> {
        Self::start_with(port, dir, &[])
    }

    fn start_with(
        port: u16,
        dir: std::path::PathBuf,
        extra: &[String],
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let bin =
            std::env::var("NATS_BIN").map_err(|_| "NATS_BIN is not set: run scripts/test.sh")?;
        let child = Command::new(bin)
            .args(["-js", "-sd"])
            .arg(dir.join("js"))
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Self { child, port, dir })
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn kill9(&mut self) -> Result<(), std::io::Error> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16, std::io::Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[tokio::test]
async fn nats_outage_makes_readyz_fail_and_relaying_resumes_exactly_once() -> TestResult {
    let db = TestDb::new().await?;
    let prefix = format!("k{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let dir = nats_config_dir(&prefix, 3600)?;
    let mut nats = OwnNats::start(free_port()?, dir.to_path_buf())?;
    let url = nats.url();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            async_nats::connect(&url).await.is_ok()
        })
        .await
    );
    run(outboxd(Some(&db.url)).args(["app", "create", "shop"]))?;
    let mut cmd = tokio::process::Command::from({
        let mut c = outboxd(Some(&db.url));
        c.env("OUTBOXD_CONFIG_DIR", &dir)
            .env("OUTBOXD_ENV", "nats-test")
            .env("NATS_URL", &url)
            .env("OUTBOXD_TRIGGER_RETRY_MAX_ATTEMPTS", "1000")
            .arg("run");
        c
    });
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next_line().await?.ok_or("outboxd exited")?;
        if let Some(a) = line.strip_prefix("outboxd listening on http://") {
            break a.trim().to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let (status, body) = http_get(&addr, "/readyz").await?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"nats\":true"), "{body}");

    let enqueue_some = |from: u32, to: u32| {
        let url = db.url.clone();
        move || -> Result<(), Box<dyn std::error::Error>> {
            for n in from..to {
                let out = run(outboxd(Some(&url)).args([
                    "enqueue",
                    "--app",
                    "shop",
                    "--topic",
                    "t",
                    "--payload",
                    &format!("{{\"n\":{n}}}"),
                ]))?;
                assert!(out.status.success(), "{}", text(&out.stderr));
            }
            Ok(())
        }
    };
    enqueue_some(0, 5)()?;
    // A backlog that is still being relayed when the server is killed.
    let app = outbox_core::store::apps::by_slug(&db.pool, "shop")
        .await?
        .id;
    let mut tx = db.pool.begin().await?;
    let backlog: Vec<outbox_core::NewEvent> = (0..20_000)
        .map(|n| outbox_core::NewEvent::new("t", serde_json::json!({ "backlog": n })))
        .collect();
    outbox_core::enqueue_batch(&mut tx, app, &backlog).await?;
    tx.commit().await?;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            outbox_core::store::outbox::count(&db.pool)
                .await
                .is_ok_and(|n| n < 15_000)
        })
        .await
    );
    nats.kill9()?;
    let remaining_at_kill = outbox_core::store::outbox::count(&db.pool).await?;
    let down = wait_until(Duration::from_secs(15), || async {
        http_get(&addr, "/readyz")
            .await
            .is_ok_and(|(s, _)| s == 503)
    })
    .await;
    assert!(down, "/readyz stayed ready while NATS was down");
    enqueue_some(5, 10)()?;
    let nats = OwnNats::start(nats.port, nats.dir.clone())?;
    let drained = wait_until(Duration::from_secs(60), || async {
        outbox_core::store::outbox::count(&db.pool).await.ok() == Some(0)
    })
    .await;
    let (status, _) = http_get(&addr, "/readyz").await?;
    let exit = stop(&mut child).await?;
    assert!(drained, "relaying did not resume after NATS came back");
    assert_eq!(status, 200);
    assert!(exit.success());
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
    let mut stream = js.get_stream(format!("S_{prefix}")).await?;
    assert!(
        remaining_at_kill > 0,
        "the server was killed only after relaying had finished"
    );
    assert_eq!(
        stream.info().await?.state.messages,
        20_010,
        "every event exactly once"
    );
    Ok(())
}

/// One node of a 3-node JetStream cluster on loopback ports.
fn cluster_node(
    index: usize,
    ports: &[(u16, u16)],
    dir: &std::path::Path,
) -> Result<OwnNats, Box<dyn std::error::Error>> {
    let (client_port, cluster_port) = ports[index];
    let routes = ports
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != index)
        .map(|(_, (_, c))| format!("nats://127.0.0.1:{c}"))
        .collect::<Vec<_>>()
        .join(",");
    let node_dir = dir.join(format!("n{index}"));
    std::fs::create_dir_all(&node_dir)?;
    OwnNats::start_with(
        client_port,
        node_dir,
        &[
            "-n".into(),
            format!("n{index}"),
            "--cluster_name".into(),
            "outboxd-test".into(),
            "--cluster".into(),
            format!("nats://127.0.0.1:{cluster_port}"),
            "--routes".into(),
            routes,
        ],
    )
}

#[tokio::test]
async fn two_dispatchers_relay_into_an_r3_stream_while_a_cluster_node_restarts() -> TestResult {
    const EVENTS: u32 = 20_000;
    let db = TestDb::new().await?;
    let prefix = format!("c{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let dir = nats_config_dir(&prefix, 3600)?;
    std::fs::write(
        dir.join("nats-test.toml"),
        format!(
            "[dispatcher]\npoll_interval_ms = 100\n[nats]\nsubject_template = \"{prefix}.{{app}}.{{topic}}\"\nack_timeout_ms = 2000\n\
             [nats.stream]\nname = \"S_{prefix}\"\nsubjects = [\"{prefix}.>\"]\nreplicas = 3\nmax_age_secs = 3600\n"
        ),
    )?;
    let ports: Vec<(u16, u16)> = (0..3)
        .map(|_| Ok::<_, std::io::Error>((free_port()?, free_port()?)))
        .collect::<Result<_, _>>()?;
    let mut nodes: Vec<OwnNats> = (0..3)
        .map(|i| cluster_node(i, &ports, &dir))
        .collect::<Result<_, _>>()?;
    let urls = ports
        .iter()
        .map(|(p, _)| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    // The cluster is ready when it can create the R3 stream.
    let ready = wait_until(Duration::from_secs(30), || async {
        let Ok(client) = outbox_nats::connect(&urls).await else {
            return false;
        };
        let js = async_nats::jetstream::new(client);
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: format!("S_{prefix}"),
            subjects: vec![format!("{prefix}.>")],
            num_replicas: 3,
            max_age: Duration::from_secs(3600),
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .is_ok()
    })
    .await;
    assert!(ready, "the 3-node cluster did not form");

    let app = outbox_core::store::apps::ensure(&db.pool, "shop", "shop")
        .await?
        .id;
    let mut tx = db.pool.begin().await?;
    let events: Vec<outbox_core::NewEvent> = (0..EVENTS)
        .map(|n| outbox_core::NewEvent::new("t", serde_json::json!({ "n": n })))
        .collect();
    outbox_core::enqueue_batch(&mut tx, app, &events).await?;
    tx.commit().await?;

    let mut dispatchers = Vec::new();
    for _ in 0..2 {
        let mut c = outboxd(Some(&db.url));
        c.env("OUTBOXD_CONFIG_DIR", &dir)
            .env("OUTBOXD_ENV", "nats-test")
            .env("NATS_URL", &urls)
            .env("OUTBOXD_DISPATCHER__BATCH_SIZE", "50")
            .env("OUTBOXD_TRIGGER_RETRY_MAX_ATTEMPTS", "1000")
            .env("OUTBOXD_TRIGGER_RETRY_MAX_MS", "500")
            .arg("run");
        let mut cmd = tokio::process::Command::from(c);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        dispatchers.push(cmd.spawn()?);
    }
    // Restart one node mid-run.
    let midway = wait_until(Duration::from_secs(60), || async {
        outbox_core::store::outbox::count(&db.pool)
            .await
            .is_ok_and(|n| n < i64::from(EVENTS) * 3 / 4)
    })
    .await;
    assert!(midway, "relaying did not start");
    nodes[1].kill9()?;
    let remaining_at_kill = outbox_core::store::outbox::count(&db.pool).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    nodes[1] = cluster_node(1, &ports, &dir)?;

    let drained = wait_until(Duration::from_secs(90), || async {
        outbox_core::store::outbox::count(&db.pool).await.ok() == Some(0)
    })
    .await;
    for child in &mut dispatchers {
        let status = stop(child).await?;
        assert!(status.success(), "{status:?}");
    }
    assert!(drained, "not every row was relayed");
    assert!(
        remaining_at_kill > 0,
        "the node restarted only after relaying had finished"
    );
    let client = outbox_nats::connect(&urls).await?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(format!("S_{prefix}")).await?;
    let info = stream.info().await?;
    assert_eq!(info.config.num_replicas, 3);
    assert_eq!(
        info.state.messages,
        u64::from(EVENTS),
        "every event exactly once in the R3 stream"
    );
    assert_eq!(crate_dead_letters(&db).await?, 0);
    Ok(())
}

async fn crate_dead_letters(db: &TestDb) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&db.pool)
        .await
}

#[tokio::test]
async fn trigger_cli_creates_lists_and_refuses_bad_input() -> TestResult {
    let db = TestDb::new().await?;
    run(outboxd(Some(&db.url)).args(["app", "create", "shop"]))?;
    let out = run(outboxd(Some(&db.url)).args([
        "trigger",
        "create",
        "--app",
        "shop",
        "--name",
        "audit",
        "--target",
        "audit.record",
        "--kv",
        "orders:*",
        "--ops",
        "put",
    ]))?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    let out = run(outboxd(Some(&db.url)).args(["trigger", "list", "--app", "shop"]))?;
    let listing = text(&out.stdout);
    assert!(
        listing.contains(&id) && listing.contains("collection orders:* ops put"),
        "{listing}"
    );
    let out = run(outboxd(Some(&db.url)).args(["trigger", "disable", "--app", "shop", &id]))?;
    assert!(out.status.success());
    let out = run(outboxd(Some(&db.url)).args([
        "trigger",
        "create",
        "--app",
        "shop",
        "--name",
        "tick",
        "--target",
        "t",
        "--cron",
        "sometimes",
    ]))?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("schedule"),
        "{}",
        text(&out.stderr)
    );
    let out = run(outboxd(Some(&db.url)).args([
        "trigger", "create", "--app", "shop", "--name", "x", "--target", "t",
    ]))?;
    assert!(
        text(&out.stderr).contains("exactly one of"),
        "{}",
        text(&out.stderr)
    );
    let out = run(outboxd(Some(&db.url)).args([
        "trigger",
        "delete",
        "--app",
        "shop",
        &uuid::Uuid::new_v4().to_string(),
    ]))?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not found"),
        "{}",
        text(&out.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn gc_once_reports_what_it_deleted() -> TestResult {
    let db = TestDb::new().await?;
    let app = outbox_core::store::apps::ensure(&db.pool, "shop", "shop")
        .await?
        .id;
    sqlx::query(
        "INSERT INTO dead_letters (app_id, original_event_id, source, topic, payload, attempt_count, created_at)
         SELECT $1, gen_random_uuid(), 'queue', 't', '{}', 1, now() - make_interval(days => g) + interval '1 hour'
         FROM generate_series(1, 40) g",
    )
    .bind(app)
    .execute(&db.pool)
    .await?;
    let out = run(outboxd(Some(&db.url))
        .args(["gc", "--once"])
        .env("OUTBOXD_DEAD_LETTER_RETENTION_DAYS", "30"))?;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Rows of days 31..=40 are past 30 days; day 30's is an hour younger than the horizon.
    assert!(
        stdout.contains("deleted 10 dead letters (older than 30 days)"),
        "{stdout}"
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(left, 30);
    let bad = run(outboxd(Some(&db.url))
        .args(["gc", "--once"])
        .env("OUTBOXD_GC__SCHEDULE", "never"))?;
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad.stderr).contains("gc.schedule"));
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

/// An HTTP/1.1 request with a JSON body; returns status and body.
async fn http_send(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Result<(u16, String), Box<dyn std::error::Error>> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    stream
        .write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status line")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

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
        "/api/apps/shop/events/no.handler",
        Some(&token),
        &event,
    )
    .await?;
    assert_eq!(s, 201, "{answer}");
    // A malformed body that carries the password is refused without echoing it.
    let (s, _) = http_send(&addr, "POST", "/api/login", None, &format!("{{{PASSWORD}")).await?;
    assert_eq!(s, 400);
    // The unhandled event fails at least once (and logs why) before we stop.
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
async fn bad_cli_arguments_are_clear_errors_that_change_nothing() -> TestResult {
    use std::os::unix::ffi::OsStrExt;
    let db = TestDb::new().await?;
    run(outboxd(Some(&db.url)).args(["app", "create", "shop"]))?;
    let snapshot = || async {
        sqlx::query_scalar::<_, serde_json::Value>(
            "SELECT jsonb_build_array((SELECT count(*) FROM outbox), (SELECT count(*) FROM apps),
                    (SELECT count(*) FROM triggers), (SELECT count(*) FROM users),
                    (SELECT count(*) FROM app_members), (SELECT jsonb_agg(to_jsonb(a) ORDER BY slug) FROM apps a))",
        )
        .fetch_one(&db.pool)
        .await
    };
    let before = snapshot().await?;
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "enqueue",
                "--app",
                "shop",
                "--topic",
                "t",
                "--payload",
                "{bad",
            ],
            "not valid JSON",
        ),
        (
            &[
                "enqueue",
                "--app",
                "shop",
                "--topic",
                "t",
                "--payload",
                "\"a\\u0000b\"",
            ],
            "payload",
        ),
        (
            &[
                "enqueue",
                "--app",
                "nope",
                "--topic",
                "t",
                "--payload",
                "{}",
            ],
            "unknown app",
        ),
        (
            &["enqueue", "--app", "shop", "--topic", "", "--payload", "{}"],
            "topic: must not be empty",
        ),
        (
            &[
                "enqueue",
                "--app",
                "shop",
                "--topic",
                "t",
                "--payload",
                "{}",
                "--max-attempts",
                "0",
            ],
            "max_attempts",
        ),
        (
            &[
                "enqueue",
                "--app",
                "shop",
                "--topic",
                "t",
                "--payload",
                "{}",
                "--max-attempts",
                "x",
            ],
            "invalid value",
        ),
        (&["app", "create", "BAD_SLUG!"], "invalid slug"),
        (&["app", "create", "' OR 1=1 --"], "invalid slug"),
        (&["app", "retention", "shop", "0"], "days"),
        (&["app", "suspend", "nope"], "unknown app"),
        (
            &["dead-letters", "show", "--app", "shop", "not-a-uuid"],
            "not a UUID",
        ),
        (&["dead-letters", "list", "--app", "nope"], "unknown app"),
        (
            &["dead-letters", "replay", "--app", "shop", "zzz"],
            "not a UUID",
        ),
        (
            &["user", "grant", "nobody@x.io", "shop", "superuser"],
            "invalid role",
        ),
        (&["user", "create", "not-an-email"], "e-mail"),
        (&["api-key", "create", "nobody@x.io"], "no user"),
        (
            &[
                "trigger",
                "create",
                "--app",
                "shop",
                "--name",
                "n",
                "--target",
                "t",
                "--schedule",
                "99 * * * *",
            ],
            "schedule",
        ),
        (&["gc", "--once", "--bogus"], "unexpected argument"),
        (&["no-such-command"], "unrecognized subcommand"),
    ];
    for (args, expected) in cases {
        let out = outboxd(Some(&db.url))
            .args(*args)
            .stdin(Stdio::null())
            .output()?;
        let stderr = text(&out.stderr);
        assert!(
            !out.status.success(),
            "{args:?} succeeded: {}",
            text(&out.stdout)
        );
        assert!(
            stderr.contains(expected),
            "{args:?}: want {expected:?} in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
    // An argument that is not UTF-8 at all.
    let out = outboxd(Some(&db.url))
        .args(["app", "create"])
        .arg(std::ffi::OsStr::from_bytes(b"sh\xffop"))
        .output()?;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("UTF-8"), "{}", text(&out.stderr));
    assert_eq!(snapshot().await?, before, "a refused command changed data");
    Ok(())
}

/// Runs outboxd with `input` on standard input.
fn run_with_input(cmd: &mut Command, input: &str) -> Result<Output, std::io::Error> {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    child.wait_with_output()
}

#[tokio::test]
async fn account_commands_list_change_and_revoke_through_the_binary() -> TestResult {
    let db = TestDb::new().await?;
    let cli = |args: &[&str]| run(outboxd(Some(&db.url)).args(args));
    let out = run_with_input(
        outboxd(Some(&db.url)).args(["user", "create", "boss@x.io", "--admin", "--password-stdin"]),
        "first password 123\n",
    )?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = cli(&["user", "create", "ops@x.io"])?;
    assert!(
        text(&out.stdout).contains("password: "),
        "a generated password is shown once"
    );
    let out = cli(&["app", "create", "shop"])?;
    assert!(out.status.success());
    assert!(
        cli(&["user", "grant", "ops@x.io", "shop", "operator"])?
            .status
            .success()
    );

    let out = cli(&["user", "list"])?;
    let listing = text(&out.stdout);
    assert!(
        listing.contains("boss@x.io")
            && listing.contains("shop:operator")
            && listing.contains("2 user(s)"),
        "{listing}"
    );
    let out = cli(&["user", "list", "--json"])?;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(doc["items"].as_array().map(Vec::len), Some(2));
    assert!(!text(&out.stdout).contains("argon2"), "no hash is shown");

    // Sessions: opened by a login, ended by revoke-sessions and by passwd.
    let boss = outbox_core::store::principals::user_by_email(&db.pool, "boss@x.io")
        .await?
        .ok_or("boss")?;
    let in_an_hour = chrono::Utc::now() + chrono::Duration::hours(1);
    outbox_core::store::sessions::open(&db.pool, boss.id, in_an_hour).await?;
    let out = cli(&["user", "revoke-sessions", "boss@x.io"])?;
    assert!(
        text(&out.stdout).contains("1 session(s) ended"),
        "{}",
        text(&out.stdout)
    );
    outbox_core::store::sessions::open(&db.pool, boss.id, in_an_hour).await?;
    let out = run_with_input(
        outboxd(Some(&db.url)).args(["user", "passwd", "boss@x.io", "--password-stdin"]),
        "second password 456\n",
    )?;
    assert!(
        text(&out.stdout).contains("1 session(s) ended"),
        "{}",
        text(&out.stderr)
    );
    let out = run_with_input(
        outboxd(Some(&db.url)).args(["user", "passwd", "boss@x.io", "--password-stdin"]),
        "short\n",
    )?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("at least 12 characters"),
        "{}",
        text(&out.stderr)
    );

    // unlock clears the login throttle of an account.
    sqlx::query("INSERT INTO login_throttle (key, failures, last_failure_at, blocked_until) VALUES ('account:boss@x.io', 9, now(), now() + interval '10 minutes')")
        .execute(&db.pool)
        .await?;
    let out = cli(&["user", "unlock", "boss@x.io"])?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM login_throttle")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(left, 0);

    // API keys: listed with owner and last use, revoked by prefix.
    let out = cli(&["api-key", "create", "ops@x.io", "--name", "deploy-bot"])?;
    let key = text(&out.stdout).trim().to_owned();
    let prefix = key
        .trim_start_matches("obx_")
        .split('_')
        .next()
        .unwrap_or_default()
        .to_owned();
    let out = cli(&["api-key", "list"])?;
    let listing = text(&out.stdout);
    assert!(
        listing.contains(&prefix)
            && listing.contains("deploy-bot")
            && listing.contains("ops@x.io")
            && listing.contains("never"),
        "{listing}"
    );
    assert!(!listing.contains(&key), "the secret is never listed");
    assert!(cli(&["api-key", "revoke", &prefix])?.status.success());
    let out = cli(&["api-key", "list", "--json"])?;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert!(doc["items"][0]["revoked_at"].is_string(), "{doc}");
    let out = cli(&["api-key", "revoke", &prefix])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("api key not found"),
        "{}",
        text(&out.stderr)
    );

    // Roles and users go; the last instance admin stays.
    let out = cli(&["user", "revoke", "ops@x.io", "shop"])?;
    assert!(text(&out.stdout).contains("no role on shop"));
    let out = cli(&["user", "delete", "boss@x.io"])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("last instance admin"),
        "{}",
        text(&out.stderr)
    );
    assert!(cli(&["user", "delete", "ops@x.io"])?.status.success());
    let out = cli(&["user", "delete", "ops@x.io"])?;
    assert!(
        text(&out.stderr).contains("no user \"ops@x.io\""),
        "{}",
        text(&out.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn config_prints_the_effective_toml_with_secrets_redacted() -> TestResult {
    let out = run(outboxd(Some(
        "postgres://app:hunter2hunter2@db.internal:5432/shop?sslmode=require",
    ))
    .env("JWT_SECRET", "s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t")
    .env("OUTBOXD_DISPATCHER__CONCURRENCY", "17")
    .arg("config"))?;
    let printed = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let parsed: toml::Value = toml::from_str(&printed)?;
    assert_eq!(parsed["dispatcher"]["concurrency"].as_integer(), Some(17));
    assert_eq!(parsed["admin"]["jwt_secret"].as_str(), Some("[redacted]"));
    assert_eq!(
        parsed["database"]["url"].as_str(),
        Some("postgres://app@db.internal:5432/shop")
    );
    for secret in ["hunter2", "s3cr3t", "sslmode"] {
        assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
    }
    // An overlay is looked up in --config-dir, and a missing one names where.
    let dir =
        ScratchDir(std::env::temp_dir().join(format!("outboxd-config-env-{}", std::process::id())));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("staging.toml"), "[dispatcher]\nconcurrency = 5\n")?;
    let out = run(outboxd(None).args([
        "--config-dir",
        dir.to_str().ok_or("utf-8")?,
        "--env",
        "staging",
        "config",
    ]))?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("concurrency = 5"),
        "{}",
        text(&out.stdout)
    );
    let out = run(outboxd(None).args([
        "--config-dir",
        dir.to_str().ok_or("utf-8")?,
        "--env",
        "prod",
        "config",
    ]))?;
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains(&dir.join("prod.toml").display().to_string()),
        "{err}"
    );
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
    assert!(
        !after_stop
            .lines()
            .any(|l| l.contains(" WARN ") || l.contains(" ERROR ")),
        "a clean stop warned:\n{after_stop}"
    );
    assert!(
        !log.contains(&db.url),
        "the database URL is never logged whole"
    );
    Ok(())
}

#[tokio::test]
async fn metrics_are_described_labelled_bounded_and_histograms() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    // More topics than the label cap: the rest are counted as "other".
    let cap = outbox_dispatch::telemetry::MAX_LABELLED;
    let events: Vec<outbox_core::NewEvent> = (0..cap + 5)
        .map(|n| {
            outbox_core::NewEvent::new(format!("t.{n}"), serde_json::json!({})).with_max_attempts(1)
        })
        .collect();
    let mut tx = db.pool.begin().await?;
    outbox_core::enqueue_batch(&mut tx, app, &events).await?;
    tx.commit().await?;
    let (mut child, addr) = spawn_server(&db.url, &["run"]).await?;
    let drained = wait_until(Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM dead_letters")
            .fetch_one(&db.pool)
            .await
            .is_ok_and(|n| n == (cap + 5) as i64)
    })
    .await;
    assert!(drained, "every row was tried once");
    let mut cmd = outboxd(Some(&db.url));
    cmd.args([
        "enqueue",
        "--app",
        "shop",
        "--topic",
        "later",
        "--delay-ms",
        "600000",
    ]);
    assert!(run(&mut cmd)?.status.success());
    // The leader samples row states every second in the test configuration.
    let sampled = wait_until(Duration::from_secs(20), || async {
        http_get(&addr, "/metrics")
            .await
            .is_ok_and(|(_, m)| m.contains(r#"outboxd_rows_scheduled{app="shop",topic="later"} 1"#))
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
    // Counters carry app and topic; past the cap, topic is "other".
    assert!(
        metrics.contains(r#"outboxd_claimed_total{app="shop",topic="t.0"} 1"#),
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
    assert!(
        labelled_topics <= cap + 1,
        "{labelled_topics} claimed series"
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
    Ok(())
}
