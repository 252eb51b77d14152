//! `outboxd dead-letters` against the dead letters `outboxd demo` produces.

use std::time::Duration;

use outbox_testkit::{TestDb, wait_until};

use crate::support::{TestResult, outboxd, run, spawn_server, stop, text};

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
    // A page that holds the last rows exactly offers no next page.
    let out = run(outboxd(Some(&db.url)).args([
        "dead-letters",
        "list",
        "--app",
        "demo",
        "--limit",
        &total.to_string(),
    ]))?;
    let listing = text(&out.stdout);
    assert!(
        listing.contains(&format!("showing {total} of {total}")) && !listing.contains("--after"),
        "{listing}"
    );
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
    // Mistakes are named as such: a resolved state with --unresolved, and a
    // cursor that is not one (its flag said once).
    for (args, said) in [
        (
            vec!["--state", "ignored", "--unresolved"],
            "--state ignored lists resolved dead letters, --unresolved the others",
        ),
        (
            vec!["--after", "garbage"],
            "--after: \"garbage\" is not a cursor",
        ),
    ] {
        let out = run(outboxd(Some(&db.url))
            .args(["dead-letters", "list", "--app", "demo"])
            .args(&args))?;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(said), "{args:?}: {stderr}");
    }
    // Webhook targets that differ at their ends are told apart, and an
    // escape sequence in an error does not reach the terminal.
    let demo = outbox_core::store::apps::by_slug(&db.pool, "demo")
        .await?
        .id;
    // Over the 60-character column: cut in the middle, the ends kept.
    let long = "webhook:https://hooks.example.com/v1/tenants/acme/partners/integrations";
    for target in ["orders", "refunds"] {
        let topic = format!("{long}/{target}");
        outbox_core::store::dead_letters::insert_external(
            &db.pool,
            &outbox_core::store::dead_letters::External {
                app_id: demo,
                original_event_id: uuid::Uuid::now_v7(),
                source: "queue",
                topic: &topic,
                handler: None,
                payload: &serde_json::json!({}),
                headers: &serde_json::json!({}),
                attempt_count: 1,
                last_error: "POST \u{1b}]0;PWNED\u{7}\u{1b}[2J failed",
            },
        )
        .await?;
    }
    let out = run(outboxd(Some(&db.url)).args(["dead-letters", "list", "--app", "demo"]))?;
    let listing = text(&out.stdout);
    let shown: Vec<&str> = listing
        .lines()
        .filter_map(|line| {
            line.split_whitespace()
                .find(|w| w.starts_with("webhook:https://hooks"))
        })
        .collect();
    assert_eq!(shown.len(), 2, "{listing}");
    assert!(
        shown[0] != shown[1]
            && shown
                .iter()
                .all(|t| t.chars().count() == 60 && t.contains('…')),
        "{shown:?}"
    );
    assert!(
        shown.iter().any(|t| t.ends_with("/orders"))
            && shown.iter().any(|t| t.ends_with("/refunds")),
        "{shown:?}"
    );
    assert!(
        !listing.contains('\u{1b}') && !listing.contains('\u{7}'),
        "{listing:?}"
    );
    Ok(())
}
