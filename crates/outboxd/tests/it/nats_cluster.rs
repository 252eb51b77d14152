//! Relaying into a replicated stream of a 3-node JetStream cluster while a
//! node restarts.

use std::process::Stdio;
use std::time::Duration;

use outbox_testkit::{TestDb, wait_until};

use crate::nats::{OwnNats, free_port, nats_config_dir};
use crate::support::{TestResult, stop};

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
        let mut c = crate::nats::with_nats(&db.url, &dir, &urls);
        c.env("OUTBOXD_DISPATCHER__BATCH_SIZE", "50")
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
