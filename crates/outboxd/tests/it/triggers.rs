//! `outboxd trigger`.

use outbox_testkit::TestDb;

use crate::support::{TestResult, outboxd, run, text};

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
    let out = run(outboxd(Some(&db.url)).args(["trigger", "list", "--app", "shop", "--json"]))?;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let listed = &doc["items"][0];
    assert_eq!(
        (
            listed["id"].as_str(),
            listed["enabled"].as_bool(),
            listed["collection_glob"].as_str()
        ),
        (Some(id.as_str()), Some(false), Some("orders:*")),
        "{doc}"
    );
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
        text(&out.stderr).contains("shop: no trigger named"),
        "{}",
        text(&out.stderr)
    );
    // A trigger is named by its name as well as by its id; a name spelt as
    // an id (which would find that trigger) is refused.
    let out = run(outboxd(Some(&db.url)).args(["trigger", "enable", "--app", "shop", "audit"]))?;
    assert_eq!(text(&out.stdout).trim(), "trigger audit enabled");
    let out = run(outboxd(Some(&db.url)).args(["trigger", "enable", "--app", "shop", "audit"]))?;
    assert_eq!(
        text(&out.stdout).trim(),
        "trigger audit was already enabled"
    );
    let out = run(outboxd(Some(&db.url)).args([
        "trigger", "create", "--app", "shop", "--name", &id, "--target", "t", "--kv", "x:*",
    ]))?;
    assert!(
        !out.status.success() && text(&out.stderr).contains("name: must not be a UUID"),
        "{}",
        text(&out.stderr)
    );
    let out = run(outboxd(Some(&db.url)).args(["trigger", "disable", "--app", "shop", &id]))?;
    assert_eq!(text(&out.stdout).trim(), "trigger audit disabled");
    let out = run(outboxd(Some(&db.url)).args(["trigger", "delete", "--app", "shop", &id]))?;
    assert_eq!(text(&out.stdout).trim(), "trigger audit deleted");
    let out = run(outboxd(Some(&db.url)).args(["trigger", "disable", "--app", "shop", "audit"]))?;
    assert!(
        !out.status.success() && text(&out.stderr).contains("no trigger named \"audit\""),
        "{}",
        text(&out.stderr)
    );
    Ok(())
}
