//! The `/metrics` endpoint: described, labelled, bounded, histograms.

use std::time::Duration;

use outbox_testkit::{TestDb, wait_until};

use crate::support::{TestResult, http_get, outboxd, run, spawn_server_with, stop};

#[tokio::test]
async fn metrics_are_described_labelled_bounded_and_histograms() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    // More topics than the label cap: the rest are counted as "other". Each
    // is a webhook target that refuses the connection, so every row fails.
    let cap = outbox_dispatch::telemetry::MAX_LABELLED;
    let events: Vec<outbox_core::NewEvent> = (0..cap + 5)
        .map(|n| {
            outbox_core::NewEvent::new(
                format!("webhook:http://127.0.0.1:9/t/{n}"),
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
            .any(|(topic, n)| topic.starts_with("webhook:http://127.0.0.1:9/t/") && *n == 1.0),
        "{metrics}"
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
