//! `outboxd user` and `outboxd api-key`.

use std::process::{Command, Output, Stdio};

use outbox_testkit::TestDb;

use crate::support::{TestResult, outboxd, run, text};

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
    let revoked_at = doc["items"][0]["revoked_at"].clone();
    // Revoking it again says so and keeps the first revocation's time; a
    // prefix no key has is not found.
    let out = cli(&["api-key", "revoke", &prefix])?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("obx_{prefix}_… was already revoked")
    );
    let out = cli(&["api-key", "list", "--json"])?;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(doc["items"][0]["revoked_at"], revoked_at);
    let out = cli(&["api-key", "revoke", "nosuchkey"])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no API key with the prefix \"nosuchkey\""),
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
    let out = cli(&["user", "demote", "boss@x.io"])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("last instance admin")
            && text(&out.stderr).contains("outboxd user promote"),
        "{}",
        text(&out.stderr)
    );

    // An existing user becomes an instance admin and back, each said once;
    // with a second admin the first can step down.
    let is_admin = |email: &'static str| {
        sqlx::query_scalar::<_, bool>("SELECT is_admin FROM users WHERE email = $1")
            .bind(email)
            .fetch_one(&db.pool)
    };
    let out = cli(&["user", "promote", "ops@x.io"])?;
    assert_eq!(text(&out.stdout).trim(), "ops@x.io is an instance admin");
    assert!(is_admin("ops@x.io").await?);
    let out = cli(&["user", "promote", "OPS@x.io"])?;
    assert_eq!(
        text(&out.stdout).trim(),
        "ops@x.io was already an instance admin"
    );
    let out = cli(&["user", "demote", "boss@x.io"])?;
    assert_eq!(
        text(&out.stdout).trim(),
        "boss@x.io is no longer an instance admin"
    );
    assert!(!is_admin("boss@x.io").await?);
    let out = cli(&["user", "demote", "boss@x.io"])?;
    assert_eq!(
        text(&out.stdout).trim(),
        "boss@x.io was not an instance admin"
    );
    let out = cli(&["user", "demote", "ops@x.io"])?;
    assert!(
        !out.status.success() && text(&out.stderr).contains("last instance admin"),
        "{}",
        text(&out.stderr)
    );
    assert!(cli(&["user", "promote", "boss@x.io"])?.status.success());
    // Each change (not the repeated ones) is in every app's audit log;
    // here, shop's.
    let audited: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT action, target FROM audit_log
         WHERE action LIKE 'user.%' AND app_id = (SELECT id FROM apps WHERE slug = 'shop')
         ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await?;
    let entry = |action: &str, email: &str| (action.to_owned(), Some(email.to_owned()));
    assert_eq!(
        audited,
        [
            entry("user.promote", "ops@x.io"),
            entry("user.demote", "boss@x.io"),
            entry("user.promote", "boss@x.io"),
        ]
    );
    let out = cli(&["user", "promote", "nobody@x.io"])?;
    assert!(
        text(&out.stderr).contains("no user \"nobody@x.io\""),
        "{}",
        text(&out.stderr)
    );

    assert!(cli(&["user", "delete", "ops@x.io"])?.status.success());
    // An instance admin's deletion and creation are audited too.
    assert!(
        cli(&["user", "create", "third@x.io", "--admin"])?
            .status
            .success()
    );
    let audited: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT action, target FROM audit_log
         WHERE action LIKE 'user.%' AND app_id = (SELECT id FROM apps WHERE slug = 'shop')
         ORDER BY id DESC LIMIT 2",
    )
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(
        audited,
        [
            ("user.promote".to_owned(), Some("third@x.io".to_owned())),
            ("user.delete".to_owned(), Some("ops@x.io".to_owned())),
        ]
    );
    let out = cli(&["user", "delete", "ops@x.io"])?;
    assert!(
        text(&out.stderr).contains("no user \"ops@x.io\""),
        "{}",
        text(&out.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn webhook_targets_get_secrets_of_their_own_through_the_binary() -> TestResult {
    let db = TestDb::new().await?;
    let cli = |args: &[&str]| run(outboxd(Some(&db.url)).args(args));
    assert!(cli(&["app", "create", "shop"])?.status.success());
    let url = "https://partner.example/hook";
    let out = cli(&["webhook", "create", "--app", "shop", url])?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let first = text(&out.stdout).trim().to_owned();
    assert_eq!(first.len(), 64, "a secret, once: {first}");
    let again = cli(&["webhook", "create", "--app", "shop", url])?;
    assert!(!again.status.success() && text(&again.stderr).contains("rotate its secret instead"));
    let out = cli(&["webhook", "rotate", "--app", "shop", url])?;
    let second = text(&out.stdout).trim().to_owned();
    assert!(out.status.success() && second.len() == 64 && second != first);
    let listed = text(&cli(&["webhook", "list", "--app", "shop"])?.stdout);
    assert!(
        listed.contains(url) && !listed.contains(&second),
        "{listed}"
    );
    let listed = text(&cli(&["webhook", "list", "--app", "shop", "--json"])?.stdout);
    let doc: serde_json::Value = serde_json::from_str(&listed)?;
    assert_eq!(doc["items"][0]["url"], url, "{listed}");
    assert!(
        !listed.contains(&second) && !listed.contains(&first),
        "{listed}"
    );
    let bad = cli(&["webhook", "create", "--app", "shop", "ftp://x"])?;
    assert!(!bad.status.success() && text(&bad.stderr).contains("http:// or https://"));
    assert!(text(&cli(&["webhook", "delete", "--app", "shop", url])?.stdout).contains("deleted"));
    // A target the app does not have is an error, naming it and where to look.
    for verb in ["rotate", "delete"] {
        let out = cli(&["webhook", verb, "--app", "shop", url])?;
        let said = text(&out.stderr);
        assert!(
            !out.status.success()
                && said.contains("app shop has no webhook target of that URL")
                && said.contains("outboxd webhook list --app shop"),
            "{verb}: {said}"
        );
    }
    let actions: Vec<String> = sqlx::query_scalar("SELECT action FROM audit_log ORDER BY id")
        .fetch_all(&db.pool)
        .await?;
    assert_eq!(
        actions,
        ["webhook.create", "webhook.rotate", "webhook.delete"]
    );
    Ok(())
}
