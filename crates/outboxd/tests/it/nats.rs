//! Relaying to NATS JetStream and consuming back, the stream contract, and a
//! nats-server outage.

use std::process::{Command, Stdio};
use std::time::Duration;

use outbox_testkit::{TestDb, wait_until};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::{
    ScratchDir, TestResult, http_get, http_send_with, outboxd, run, spawn_server_with, stop, text,
};

/// A config folder whose overlay points the stream contract at a stream and
/// subject space of this test's own on the shared nats-server.
pub(crate) fn nats_config_dir(
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

/// `outboxd` against `db_url` and the NATS servers `nats_url`, with the
/// overlay of a [`nats_config_dir`].
pub(crate) fn with_nats(db_url: &str, dir: &std::path::Path, nats_url: &str) -> Command {
    let mut c = outboxd(Some(db_url));
    c.env("OUTBOXD_CONFIG_DIR", dir)
        .env("OUTBOXD_ENV", "nats-test")
        .env("NATS_URL", nats_url);
    c
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
    let mut cmd = tokio::process::Command::from(with_nats(&db.url, &dir, &nats_url));
    cmd.arg("run")
        .stdin(Stdio::null())
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
        let mut c = with_nats(&db.url, &dir, &nats_url);
        c.env("OUTBOXD_CONSUMER__GROUP", &prefix).arg("consume");
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
    let out = run(with_nats(&db.url, &other, &nats_url).arg("run"))?;
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
pub(crate) struct OwnNats {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl OwnNats {
    fn start(port: u16, dir: std::path::PathBuf) -> Result<Self, Box<dyn std::error::Error>> {
        Self::start_with(port, dir, &[])
    }

    pub(crate) fn start_with(
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

    pub(crate) fn kill9(&mut self) -> Result<(), std::io::Error> {
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

pub(crate) fn free_port() -> Result<u16, std::io::Error> {
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
        let mut c = with_nats(&db.url, &dir, &url);
        c
            // Few attempts, spent fast: a row that spent attempts while NATS
            // was down would be a dead letter long before it came back.
            .env("OUTBOXD_TRIGGER_RETRY_MAX_ATTEMPTS", "4")
            .env("OUTBOXD_TRIGGER_RETRY_BASE_MS", "100")
            .env("OUTBOXD_TRIGGER_RETRY_MAX_MS", "200")
            .env("OUTBOXD_NATS__ACK_TIMEOUT_MS", "1000")
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
    // The process is up all the same; its health says what is wrong and
    // when the stream last took a message.
    let (status, body) = http_get(&addr, "/healthz").await?;
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body)?;
    assert_ne!(health["nats"]["connection"], "connected", "{body}");
    assert!(health["nats"]["last_publish_at"].is_string(), "{body}");
    enqueue_some(5, 10)()?;
    // The outage itself: long enough for six attempts of every waiting row
    // had they been spent.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (_, metrics) = http_get(&addr, "/metrics").await?;
    assert!(
        metrics.contains("\noutboxd_nats_connected 0\n"),
        "{metrics}"
    );
    let nats = OwnNats::start(nats.port, nats.dir.clone())?;
    let drained = wait_until(Duration::from_secs(60), || async {
        outbox_core::store::outbox::count(&db.pool).await.ok() == Some(0)
    })
    .await;
    let (status, _) = http_get(&addr, "/readyz").await?;
    let (_, health) = http_get(&addr, "/healthz").await?;
    let exit = stop(&mut child).await?;
    assert!(drained, "relaying did not resume after NATS came back");
    assert_eq!(status, 200);
    assert!(health.contains(r#""connection":"connected""#), "{health}");
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
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(dead, 0, "rows spent their attempts while NATS was down");
    Ok(())
}

/// The README's recipe for two processes: the demo, and a relay started
/// beside it with NATS. The relay leaves the demo's topics to the demo: it
/// claims none of its rows and publishes none of them.
#[tokio::test]
async fn a_relay_started_beside_the_demo_leaves_the_demos_rows_to_it() -> TestResult {
    use outbox_core::store::processes;
    let nats_url =
        std::env::var("NATS_URL").map_err(|_| "NATS_URL is not set: run scripts/test.sh")?;
    let db = TestDb::new().await?;
    let prefix = format!("d{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let dir = nats_config_dir(&prefix, 3600)?;
    let (mut demo, _) = crate::support::spawn_server(&db.url, &["demo"]).await?;
    let up = |n: usize| {
        let pool = db.pool.clone();
        async move {
            wait_until(Duration::from_secs(20), || {
                let pool = pool.clone();
                async move { processes::live(&pool).await.is_ok_and(|l| l.len() == n) }
            })
            .await
        }
    };
    assert!(up(1).await, "the demo never recorded itself");
    let config_dir = dir
        .to_str()
        .ok_or("the scratch folder's path is not UTF-8")?;
    let (mut relay, relay_addr) = crate::support::spawn_server_with(
        &db.url,
        &["run"],
        &[
            ("OUTBOXD_CONFIG_DIR", config_dir),
            ("OUTBOXD_ENV", "nats-test"),
            ("OUTBOXD_HTTP__LISTEN", "127.0.0.1:0"),
            ("NATS_URL", &nats_url),
        ],
    )
    .await?;
    assert!(up(2).await, "the relay never recorded itself");
    // The demo keeps producing and handling: wait until three more of its
    // rows failed for good while both ran (its rows also succeed, retry
    // and panic in between).
    let dead_letters = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM dead_letters")
            .fetch_one(&pool)
            .await
    };
    let before = dead_letters(db.pool.clone()).await?;
    let produced = wait_until(Duration::from_secs(30), || {
        let pool = db.pool.clone();
        async move { dead_letters(pool).await.is_ok_and(|n| n >= before + 3) }
    })
    .await;
    assert!(produced, "the demo did not run while the relay was up");
    let (_, metrics) = http_get(&relay_addr, "/metrics").await?;
    let relay_stopped = stop(&mut relay).await?;
    let demo_stopped = stop(&mut demo).await?;
    assert!(relay_stopped.success() && demo_stopped.success());
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("outboxd_claimed_total{")),
        "the relay claimed rows: {}",
        metrics
            .lines()
            .filter(|l| l.starts_with("outboxd_claimed_total{"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let js = async_nats::jetstream::new(async_nats::connect(&nats_url).await?);
    let mut stream = js.get_stream(format!("S_{prefix}")).await?;
    assert_eq!(
        stream.info().await?.state.messages,
        0,
        "the relay published demo rows"
    );
    Ok(())
}

#[tokio::test]
async fn fail_fast_stops_start_up_when_no_nats_server_answers() -> TestResult {
    let db = TestDb::new().await?;
    let port = free_port()?;
    let started = std::time::Instant::now();
    let out = run(outboxd(Some(&db.url))
        .env("NATS_URL", format!("nats://relay:s3cr3t@127.0.0.1:{port}"))
        .env("OUTBOXD_NATS__FAIL_FAST", "true")
        .arg("run"))?;
    assert!(!out.status.success(), "started without NATS");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot connect to NATS at nats://relay@127.0.0.1:"),
        "{err}"
    );
    assert!(!err.contains("s3cr3t"), "{err}");
    Ok(())
}

/// Without `nats.fail_fast`, a process started before any NATS server
/// answers serves at once, not ready, relays nothing and spends no attempt;
/// once a server answers it creates the stream and relays every row once.
#[tokio::test]
async fn a_process_started_before_nats_serves_unready_and_relays_once_nats_answers() -> TestResult {
    let db = TestDb::new().await?;
    let prefix = format!("l{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let dir = nats_config_dir(&prefix, 3600)?;
    let port = free_port()?;
    let url = format!("nats://127.0.0.1:{port}");
    run(outboxd(Some(&db.url)).args(["app", "create", "shop"]))?;
    let config_dir = dir.to_string_lossy().into_owned();
    let (mut child, addr) = spawn_server_with(
        &db.url,
        &["run"],
        &[
            ("OUTBOXD_CONFIG_DIR", config_dir.as_str()),
            ("OUTBOXD_ENV", "nats-test"),
            ("NATS_URL", url.as_str()),
            ("OUTBOXD_TRIGGER_RETRY_MAX_ATTEMPTS", "2"),
            ("OUTBOXD_TRIGGER_RETRY_BASE_MS", "100"),
            ("OUTBOXD_TRIGGER_RETRY_MAX_MS", "100"),
        ],
    )
    .await?;
    let (status, body) = http_get(&addr, "/readyz").await?;
    assert_eq!(status, 503, "{body}");
    let (status, body) = http_get(&addr, "/healthz").await?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""stream_checked":false"#), "{body}");
    for n in 0..3 {
        let out = run(outboxd(Some(&db.url)).args([
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
    // Long enough for both attempts of every row, had they been spent.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let nats = OwnNats::start(port, dir.to_path_buf())?;
    let drained = wait_until(Duration::from_secs(30), || async {
        outbox_core::store::outbox::count(&db.pool).await.ok() == Some(0)
    })
    .await;
    let (ready, _) = http_get(&addr, "/readyz").await?;
    let (_, health) = http_get(&addr, "/healthz").await?;
    let exit = stop(&mut child).await?;
    assert!(drained, "nothing was relayed after NATS came up");
    assert_eq!(ready, 200);
    assert!(health.contains(r#""stream_checked":true"#), "{health}");
    assert!(exit.success());
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
    let mut stream = js.get_stream(format!("S_{prefix}")).await?;
    assert_eq!(stream.info().await?.state.messages, 3);
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(dead, 0, "rows spent their attempts before NATS answered");
    Ok(())
}

/// The stream contract found broken only once NATS answers stops the
/// process with the differences, as it would have at start-up, having
/// published nothing into that stream.
#[tokio::test]
async fn a_stream_found_different_once_nats_answers_stops_the_process() -> TestResult {
    let db = TestDb::new().await?;
    let prefix = format!("m{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let dir = nats_config_dir(&prefix, 3600)?;
    let port = free_port()?;
    let url = format!("nats://127.0.0.1:{port}");
    let mut nats = OwnNats::start(port, dir.to_path_buf())?;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            async_nats::connect(&url).await.is_ok()
        })
        .await
    );
    let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: format!("S_{prefix}"),
        subjects: vec![format!("{prefix}.>")],
        max_age: Duration::from_secs(60),
        ..Default::default()
    })
    .await?;
    drop(js);
    nats.kill9()?;
    run(outboxd(Some(&db.url)).args(["app", "create", "shop"]))?;
    let out = run(outboxd(Some(&db.url)).args(["enqueue", "--app", "shop", "--topic", "t"]))?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut cmd = tokio::process::Command::from(with_nats(&db.url, &dir, &url));
    cmd.arg("run")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    loop {
        let line = lines.next_line().await?.ok_or("outboxd exited")?;
        if line.starts_with("outboxd listening on http://") {
            break;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let nats = OwnNats::start(port, nats.dir.clone())?;
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await??;
    let err = text(&out.stderr);
    assert!(!out.status.success(), "kept running: {err}");
    assert!(
        err.contains("differs from the configured contract") && err.contains("max_age"),
        "{err}"
    );
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
    let mut stream = js.get_stream(format!("S_{prefix}")).await?;
    assert_eq!(stream.info().await?.state.messages, 0, "published into it");
    Ok(())
}

#[tokio::test]
async fn one_traceparent_runs_from_the_http_call_to_the_consumers_log() -> TestResult {
    let nats_url =
        std::env::var("NATS_URL").map_err(|_| "NATS_URL is not set: run scripts/test.sh")?;
    let db = TestDb::new().await?;
    let prefix = format!("tr{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let dir = nats_config_dir(&prefix, 3600)?;
    run(outboxd(Some(&db.url)).args(["app", "create", "shop"]))?;
    outbox_admin::create_user(&db.pool, "ops@x.io", "a long enough password", true).await?;
    let out = run(outboxd(Some(&db.url)).args(["api-key", "create", "ops@x.io"]))?;
    let key = text(&out.stdout).trim().to_owned();
    assert!(key.starts_with("obx_"), "{}", text(&out.stderr));
    let dir_path = dir.to_string_lossy().into_owned();
    let envs = [
        ("OUTBOXD_CONFIG_DIR", dir_path.as_str()),
        ("OUTBOXD_ENV", "nats-test"),
        ("NATS_URL", nats_url.as_str()),
        ("JWT_SECRET", "0123456789abcdef0123456789abcdef-trace"),
    ];
    let (mut server, addr) = spawn_server_with(&db.url, &["run"], &envs).await?;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
    let (status, body) = http_send_with(
        &addr,
        "POST",
        "/api/apps/shop/events/order.created",
        Some(&key),
        &[
            ("traceparent", &traceparent),
            ("x-correlation-id", "checkout-77"),
        ],
        r#"{"payload": {"order": 77}}"#,
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    let relayed = wait_until(Duration::from_secs(30), || async {
        outbox_core::store::outbox::count(&db.pool).await.ok() == Some(0)
    })
    .await;
    // The console's read of the stream, through the API.
    let (status, body) = http_send_with(
        &addr,
        "GET",
        "/api/apps/shop/stream?subject=order.*&last=5",
        Some(&key),
        &[],
        "",
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    let read: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(
        read[0]["headers"]["traceparent"],
        traceparent.as_str(),
        "{body}"
    );
    let (status, body) = http_send_with(
        &addr,
        "GET",
        "/api/apps/shop/stream?subject=a..b",
        Some(&key),
        &[],
        "",
    )
    .await?;
    assert_eq!(status, 400, "{body}");
    assert!(stop(&mut server).await?.success());
    assert!(relayed, "the event was not relayed");

    // On the NATS message ...
    let js = async_nats::jetstream::new(async_nats::connect(&nats_url).await?);
    let message = js
        .get_stream(format!("S_{prefix}"))
        .await?
        .get_last_raw_message_by_subject(&format!("{prefix}.shop.order.created"))
        .await?;
    // (An app of another tenant, for the read below.)
    run(outboxd(Some(&db.url)).args(["app", "create", "other"]))?;
    let header = |name: &str| {
        message
            .headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(header("traceparent"), traceparent);
    assert_eq!(header("trace-id"), trace);
    assert_eq!(header("correlation-id"), "checkout-77");

    // An operator reads it back without a consumer left behind.
    let cli = |args: &[&str]| run(outboxd(Some(&db.url)).envs(envs).arg("stream").args(args));
    let out = cli(&["tail", "--app", "shop"])?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 1, "{}", text(&out.stdout));
    assert_eq!(lines[0]["headers"]["traceparent"], traceparent.as_str());
    assert_eq!(lines[0]["payload"], serde_json::json!({"order": 77}));
    let sequence = lines[0]["stream_sequence"].to_string();
    let out = cli(&["get", &sequence])?;
    assert!(
        text(&out.stdout).contains("checkout-77"),
        "{}",
        text(&out.stderr)
    );
    let out = cli(&["tail", "--app", "other"])?;
    assert!(
        out.status.success() && text(&out.stdout).is_empty(),
        "another tenant's subjects"
    );
    // Nothing on stdout, and a word on stderr: a slug typed wrong looks
    // like an empty stream otherwise.
    assert!(
        text(&out.stderr).contains("no message of app \"other\""),
        "{}",
        text(&out.stderr)
    );
    let out = cli(&["tail", "--app", "shop", "--subject", "a..b"])?;
    assert!(!out.status.success() && text(&out.stderr).contains("is not a subject filter"));
    let mut stream = js.get_stream(format!("S_{prefix}")).await?;
    assert_eq!(
        stream.info().await?.state.consumer_count,
        0,
        "the reads' consumers are deleted"
    );

    // ... and on the consumer handler's span: its log line carries the trace.
    let mut consumer = tokio::process::Command::from({
        let mut c = outboxd(Some(&db.url));
        c.envs(envs)
            .env("OUTBOXD_CONSUMER__GROUP", &prefix)
            .env("OUTBOXD_LOG__FILTER", "info")
            .arg("consume");
        c
    });
    consumer
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut consumer = consumer.spawn()?;
    let stderr = consumer.stderr.take().ok_or("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let consumed = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if line.contains("consumed") {
                return Ok::<String, std::io::Error>(line);
            }
        }
        Err(std::io::Error::other("outboxd consume exited first"))
    })
    .await??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    assert!(stop(&mut consumer).await?.success());
    assert!(
        consumed.contains(&format!("trace_id={trace}"))
            && consumed.contains("correlation_id=checkout-77"),
        "{consumed}"
    );
    Ok(())
}
