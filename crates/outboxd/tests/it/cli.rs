//! Bad command-line arguments.

use std::process::Stdio;

use outbox_testkit::TestDb;

use crate::support::{TestResult, outboxd, run, text};

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
                "--delay-ms",
                "18446744073709551615",
            ],
            "18446744073709551615 is not in 0..=315360000000",
        ),
        (
            &[
                "enqueue",
                "--app",
                "shop",
                "--topic",
                "t",
                "--priority",
                "99999999999",
            ],
            "99999999999 is not in 0..=9",
        ),
        (
            &["dead-letters", "list", "--app", "shop", "--limit", "-3"],
            "-3 is not in 1..=1000",
        ),
        (
            &[
                "app",
                "replay-policy",
                "shop",
                "--delay-secs",
                "-1",
                "--rounds",
                "2",
            ],
            "-1 is not in 1..=604800",
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
            "0 is not in 1..=2147483647",
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
        (&["app", "retention", "shop", "3651"], "days"),
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

/// What `outboxd args…` printed, or an error with what it said when it failed.
fn succeeds(db: &TestDb, args: &[&str]) -> Result<String, Box<dyn std::error::Error>> {
    let out = run(outboxd(Some(&db.url)).args(args))?;
    if !out.status.success() {
        return Err(format!("{args:?}: {}", text(&out.stderr)).into());
    }
    Ok(text(&out.stdout))
}

#[tokio::test]
async fn topics_are_paused_resumed_and_cancelled_from_the_cli() -> TestResult {
    let db = TestDb::new().await?;
    let ok = |args: &[&str]| succeeds(&db, args);
    ok(&["app", "create", "shop"])?;
    for _ in 0..3 {
        ok(&["enqueue", "--app", "shop", "--topic", "mail"])?;
    }
    ok(&[
        "enqueue",
        "--app",
        "shop",
        "--topic",
        "urgent",
        "--priority",
        "9",
    ])?;
    // A pause of a topic nothing names is likely a typo, and is told so; a
    // topic with rows in the leader's sample is not.
    outbox_core::store::outbox::record_state_counts(&db.pool).await?;
    let typo =
        run(outboxd(Some(&db.url)).args(["topic", "pause", "--app", "shop", "--topic", "mial"]))?;
    assert!(typo.status.success());
    assert!(
        text(&typo.stderr).contains("check the spelling"),
        "{}",
        text(&typo.stderr)
    );
    ok(&["topic", "resume", "--app", "shop", "--topic", "mial"])?;
    let known =
        run(outboxd(Some(&db.url)).args(["topic", "pause", "--app", "shop", "--topic", "urgent"]))?;
    assert!(
        known.status.success() && !text(&known.stderr).contains("spelling"),
        "{}",
        text(&known.stderr)
    );
    ok(&["topic", "resume", "--app", "shop", "--topic", "urgent"])?;
    // A limit is told the same.
    let typo = run(outboxd(Some(&db.url)).args([
        "topic", "limit", "--app", "shop", "--topic", "mial", "--rate", "5",
    ]))?;
    assert!(
        typo.status.success() && text(&typo.stderr).contains("check the spelling"),
        "{}",
        text(&typo.stderr)
    );
    ok(&["topic", "unlimit", "--app", "shop", "--topic", "mial"])?;
    assert!(
        ok(&[
            "topic",
            "pause",
            "--app",
            "shop",
            "--topic",
            "mail",
            "--reason",
            "SMTP down"
        ])?
        .contains("mail paused")
    );
    let listed = ok(&["topic", "paused", "--app", "shop"])?;
    assert!(
        listed.starts_with("mail\t") && listed.contains("SMTP down"),
        "{listed}"
    );
    assert_eq!(ok(&["processes"])?, "", "no dispatcher runs");
    // Scripts read the same lists as JSON.
    let doc: serde_json::Value = serde_json::from_str(&ok(&["processes", "--json"])?)?;
    assert_eq!(doc, serde_json::json!({ "items": [] }));
    let doc: serde_json::Value =
        serde_json::from_str(&ok(&["topic", "paused", "--app", "shop", "--json"])?)?;
    assert_eq!(
        (
            doc["items"][0]["topic"].as_str(),
            doc["items"][0]["reason"].as_str()
        ),
        (Some("mail"), Some("SMTP down")),
        "{doc}"
    );
    assert!(
        ok(&[
            "cancel", "--app", "shop", "--topic", "mail", "--reason", "retired"
        ])?
        .contains("3 row(s) cancelled")
    );
    let ignored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dead_letters WHERE resolution = 'ignored'")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(ignored, 3);
    assert!(ok(&["topic", "resume", "--app", "shop", "--topic", "mail"])?.contains("resumed"));
    assert!(
        ok(&[
            "topic",
            "limit",
            "--app",
            "shop",
            "--topic",
            "report",
            "--max-running",
            "2"
        ])?
        .contains("report limited to 2 at once")
    );
    let doc: serde_json::Value =
        serde_json::from_str(&ok(&["topic", "limits", "--app", "shop", "--json"])?)?;
    assert_eq!(
        (
            doc["items"][0]["topic"].as_str(),
            doc["items"][0]["max_running"].as_i64()
        ),
        (Some("report"), Some(2)),
        "{doc}"
    );
    let limited = ok(&["topic", "limits", "--app", "shop"])?;
    assert!(limited.starts_with("report\t2 at once\t0\t"), "{limited}");
    assert!(
        ok(&[
            "topic", "limit", "--app", "shop", "--topic", "partner", "--rate", "2.5"
        ])?
        .contains("partner limited to 2.5/s (burst 3)")
    );
    // The limits given replace the earlier ones, and it says which went.
    assert_eq!(
        ok(&[
            "topic",
            "limit",
            "--app",
            "shop",
            "--topic",
            "partner",
            "--max-running",
            "4"
        ])?
        .trim(),
        "shop: partner limited to 4 at once; no longer 2.5/s (burst 3) (give every limit to keep)"
    );
    assert!(
        ok(&[
            "topic",
            "limit",
            "--app",
            "shop",
            "--topic",
            "invoice.sync",
            "--max-running-per-key",
            "1"
        ])?
        .contains("invoice.sync limited to 1 at once per key")
    );
    assert!(
        ok(&[
            "enqueue",
            "--app",
            "shop",
            "--topic",
            "invoice.sync",
            "--partition-key",
            "acme"
        ])
        .is_ok()
    );
    let key: Option<String> =
        sqlx::query_scalar("SELECT partition_key FROM outbox WHERE topic = 'invoice.sync'")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(key.as_deref(), Some("acme"));
    assert!(ok(&["topic", "unlimit", "--app", "shop", "--topic", "report"])?.contains("no longer"));
    // Each action is in the audit log, as done from the command line.
    let recorded: Vec<(String, String)> =
        sqlx::query_as("SELECT actor, action FROM audit_log ORDER BY id")
            .fetch_all(&db.pool)
            .await?;
    let actions: Vec<&str> = recorded.iter().map(|(_, a)| a.as_str()).collect();
    for expected in [
        "topic.pause",
        "topic.resume",
        "outbox.cancel",
        "topic.limit",
        "topic.unlimit",
    ] {
        assert!(
            actions.contains(&expected),
            "{expected} missing from {recorded:?}"
        );
    }
    assert!(
        recorded.iter().all(|(actor, _)| actor.starts_with("cli")),
        "{recorded:?}"
    );

    // Asking for the state a topic is already in succeeds and says so, as
    // `pause` of a paused topic and `app resume` of a running app do.
    assert_eq!(
        ok(&["topic", "resume", "--app", "shop", "--topic", "mail"])?.trim(),
        "shop: mail was not paused"
    );
    assert_eq!(
        ok(&["topic", "unlimit", "--app", "shop", "--topic", "report"])?.trim(),
        "shop: report had no limit"
    );

    // Mistakes are errors that say what is wrong.
    let cases: &[(&[&str], &str)] = &[
        (
            &["topic", "pause", "--app", "nope", "--topic", "mail"],
            "unknown app",
        ),
        (&["cancel", "--app", "shop", "--reason", "r"], "--topic"),
        (
            &[
                "enqueue",
                "--app",
                "shop",
                "--topic",
                "t",
                "--priority",
                "12",
            ],
            "priority",
        ),
        (
            &[
                "topic",
                "limit",
                "--app",
                "shop",
                "--topic",
                "report",
                "--max-running",
                "0",
            ],
            "--max-running: is 0",
        ),
        (
            &[
                "topic",
                "limit",
                "--app",
                "shop",
                "--topic",
                "report",
                "--max-running",
                "-3",
            ],
            "between 1 and 10000",
        ),
        (
            &[
                "topic", "limit", "--app", "shop", "--topic", "report", "--rate", "0",
            ],
            "--rate: is 0",
        ),
        (
            &["topic", "limit", "--app", "shop", "--topic", "report"],
            "--max-running",
        ),
        (
            &[
                "topic",
                "limit",
                "--app",
                "shop",
                "--topic",
                "report",
                "--max-running-per-key",
                "0",
            ],
            "--max-running-per-key: is 0",
        ),
        (
            &[
                "cancel", "--app", "shop", "--topic", "mail", "--reason", " ",
            ],
            "reason",
        ),
        (
            &[
                "cancel",
                "--app",
                "shop",
                "--id",
                "not-a-uuid",
                "--reason",
                "r",
            ],
            "not-a-uuid",
        ),
        // One topic, not a pattern: a wildcard would be taken literally.
        (
            &["topic", "pause", "--app", "shop", "--topic", "mail.*"],
            "is a pattern",
        ),
        (
            &[
                "cancel", "--app", "shop", "--topic", "mail.>", "--reason", "r",
            ],
            "is a pattern",
        ),
    ];
    for (args, expected) in cases {
        let out = run(outboxd(Some(&db.url)).args(*args))?;
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    Ok(())
}

#[tokio::test]
async fn suspending_twice_says_so_and_audits_once() -> TestResult {
    let db = TestDb::new().await?;
    run(outboxd(Some(&db.url)).args(["app", "create", "shop"]))?;
    let first = run(outboxd(Some(&db.url)).args(["app", "suspend", "shop"]))?;
    assert_eq!(text(&first.stdout).trim(), "shop suspended");
    let again = run(outboxd(Some(&db.url)).args(["app", "suspend", "shop"]))?;
    assert!(again.status.success());
    assert_eq!(text(&again.stdout).trim(), "shop was already suspended");
    let resumed = run(outboxd(Some(&db.url)).args(["app", "resume", "shop"]))?;
    assert_eq!(text(&resumed.stdout).trim(), "shop resumed");
    let again = run(outboxd(Some(&db.url)).args(["app", "resume", "shop"]))?;
    assert_eq!(text(&again.stdout).trim(), "shop was not suspended");
    let out = run(outboxd(Some(&db.url)).args(["app", "list", "--json"]))?;
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let shop = listed["items"]
        .as_array()
        .and_then(|apps| apps.iter().find(|a| a["slug"] == "shop"))
        .ok_or_else(|| format!("no shop in {listed}"))?;
    assert_eq!(shop["suspended_at"], serde_json::Value::Null, "{listed}");
    let audited: Vec<String> = sqlx::query_scalar("SELECT action FROM audit_log ORDER BY id")
        .fetch_all(&db.pool)
        .await?;
    assert_eq!(audited, ["app.suspend", "app.resume"]);
    Ok(())
}

#[tokio::test]
async fn an_apps_retention_is_set_and_shown_from_the_cli() -> TestResult {
    let db = TestDb::new().await?;
    let ok = |args: &[&str]| succeeds(&db, args);
    ok(&["app", "create", "shop"])?;
    let shown = |db: &TestDb| succeeds(db, &["app", "retention", "shop"]);
    assert_eq!(
        shown(&db)?.trim(),
        "shop: dead letters kept per the global setting (dead_letter_retention_days)"
    );
    assert_eq!(
        ok(&["app", "retention", "shop", "0"])?.trim(),
        "shop: dead letters kept for good"
    );
    assert_eq!(shown(&db)?.trim(), "shop: dead letters kept for good");
    ok(&["app", "retention", "shop", "45"])?;
    assert_eq!(shown(&db)?.trim(), "shop: dead letters kept 45 days");
    for bad in ["-1", "abc", "3651", "36500"] {
        let out = run(outboxd(Some(&db.url)).args(["app", "retention", "shop", bad]))?;
        assert!(
            !out.status.success() && text(&out.stderr).contains("0..=3650"),
            "{bad}: {}",
            text(&out.stderr)
        );
    }
    assert_eq!(shown(&db)?.trim(), "shop: dead letters kept 45 days");
    Ok(())
}

/// A service's own migrations, numbered from 1001 in the same table as the
/// README says, do not stop outboxd's (it failed with "migration 1001 was
/// previously applied but is missing"); an outboxd migration this build
/// does not know means a newer outboxd migrated the database, and says so.
#[tokio::test]
async fn migrate_leaves_a_services_own_migrations_and_refuses_a_newer_schema() -> TestResult {
    let db = TestDb::new().await?;
    let record = |version: i64| {
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES ($1, 'elsewhere', true, '\\x00', 1)",
        )
        .bind(version)
        .execute(&db.pool)
    };
    record(1001).await?;
    let out = run(outboxd(Some(&db.url)).arg("migrate"))?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("the database is up to date"),
        "{}",
        text(&out.stdout)
    );
    outbox_core::migrate(&db.pool).await?;
    record(999).await?;
    for args in [&["migrate"][..], &["run"][..]] {
        let out = run(outboxd(Some(&db.url)).args(args))?;
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(
            err.contains("migrated by a newer outboxd (its migration 999 is unknown to this one"),
            "{args:?}: {err}"
        );
    }
    Ok(())
}

/// `outboxd migrate` says how many migrations it applied itself: two
/// migrators started at once apply every missing one between them, each
/// once, and count only their own (the count was read before the
/// migrator's lock, so both could say "applied").
#[tokio::test]
async fn migrate_counts_only_what_it_applied_itself() -> TestResult {
    let db = TestDb::migrated_to(36).await?;
    let missing = usize::try_from(outbox_core::last_migration() - 36)?;
    let (first, second) = tokio::join!(
        outbox_core::migrate(&db.pool),
        outbox_core::migrate(&db.pool)
    );
    let (first, second) = (first?, second?);
    assert_eq!(first + second, missing, "{first} and {second}");
    assert!(first == 0 || second == 0, "{first} and {second}");

    let db = TestDb::migrated_to(38).await?;
    let out = run(outboxd(Some(&db.url)).arg("migrate"))?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let missing = outbox_core::last_migration() - 38;
    assert!(
        text(&out.stdout).starts_with(&format!("{missing} migration(s) applied")),
        "{}",
        text(&out.stdout)
    );
    Ok(())
}

/// A command run against a database that was never migrated says what to do.
#[tokio::test]
async fn a_command_on_an_unmigrated_database_says_to_migrate() -> TestResult {
    let db = TestDb::migrated_to(0).await?;
    let out = run(outboxd(Some(&db.url)).args(["app", "list"]))?;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("relation \"apps\" does not exist") && err.contains("run `outboxd migrate`"),
        "{err}"
    );
    Ok(())
}

/// The demo on a port in use stops before it says it runs or writes a thing.
#[tokio::test]
async fn the_demo_on_a_port_in_use_stops_before_it_starts() -> TestResult {
    let db = TestDb::new().await?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let out = run(outboxd(Some(&db.url))
        .env("OUTBOXD_HTTP__LISTEN", &addr)
        .arg("demo"))?;
    assert!(!out.status.success());
    assert!(
        !text(&out.stdout).contains("demo running"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains(&format!(
            "cannot listen on {addr} (set http.listen, or OUTBOXD_HTTP__LISTEN, to a free address)"
        )),
        "{}",
        text(&out.stderr)
    );
    let apps: i64 = sqlx::query_scalar("SELECT count(*) FROM apps WHERE slug = 'demo'")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(apps, 0, "the demo wrote its app");
    Ok(())
}

/// An automatic replay policy set during an incident can be listed and
/// removed without SQL, and the removal is audited.
#[tokio::test]
async fn replay_policies_are_listed_and_removed_from_the_cli() -> TestResult {
    let db = TestDb::new().await?;
    run(outboxd(Some(&db.url)).args(["app", "create", "shop"]))?;
    for args in [
        &[
            "app",
            "replay-policy",
            "shop",
            "--delay-secs",
            "30",
            "--rounds",
            "2",
        ][..],
        &[
            "app",
            "replay-policy",
            "shop",
            "--topic",
            "mail.send",
            "--delay-secs",
            "5",
            "--rounds",
            "1",
        ][..],
    ] {
        let out = run(outboxd(Some(&db.url)).args(args))?;
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let out = run(outboxd(Some(&db.url)).args(["app", "replay-policies", "shop", "--json"]))?;
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        listed,
        serde_json::json!({ "items": [
            {"source": null, "topic": null, "initial_delay_secs": 30, "max_rounds": 2},
            {"source": null, "topic": "mail.send", "initial_delay_secs": 5, "max_rounds": 1},
        ]})
    );
    let out = run(outboxd(Some(&db.url)).args(["app", "replay-policy-remove", "shop"]))?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let again = run(outboxd(Some(&db.url)).args(["app", "replay-policy-remove", "shop"]))?;
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("has no replay policy"),
        "{}",
        text(&again.stderr)
    );
    let out = run(outboxd(Some(&db.url)).args(["app", "replay-policies", "shop"]))?;
    let table = text(&out.stdout);
    assert!(
        table.contains("mail.send") && !table.lines().any(|l| l.starts_with("(any)")),
        "{table}"
    );
    let audited: Vec<String> = sqlx::query_scalar("SELECT action FROM audit_log ORDER BY id")
        .fetch_all(&db.pool)
        .await?;
    assert_eq!(
        audited,
        [
            "app.replay_policy",
            "app.replay_policy",
            "app.replay_policy_remove"
        ]
    );
    Ok(())
}

#[tokio::test]
async fn dead_letters_are_replayed_and_ignored_and_rows_retried_by_topic_from_the_cli() -> TestResult
{
    let db = TestDb::new().await?;
    let ok = |args: &[&str]| succeeds(&db, args);
    ok(&["app", "create", "shop"])?;
    let app: uuid::Uuid = sqlx::query_scalar("SELECT id FROM apps WHERE slug = 'shop'")
        .fetch_one(&db.pool)
        .await?;
    for topic in ["mail.send", "mail.send", "mail.send", "sms.send"] {
        outbox_core::store::dead_letters::insert_external(
            &db.pool,
            &outbox_core::store::dead_letters::External {
                app_id: app,
                original_event_id: uuid::Uuid::now_v7(),
                source: "queue",
                topic,
                handler: None,
                payload: &serde_json::json!({}),
                headers: &serde_json::json!({}),
                attempt_count: 3,
                last_error: "smtp down",
            },
        )
        .await?;
    }
    // Neither an id nor a filter: refused, nothing done.
    let bare = run(outboxd(Some(&db.url)).args(["dead-letters", "replay", "--app", "shop"]))?;
    assert!(!bare.status.success());
    let said = ok(&[
        "dead-letters",
        "replay",
        "--app",
        "shop",
        "--topic",
        "mail.send",
        "--max-attempts",
        "5",
    ])?;
    assert!(said.contains("shop: 3 dead letter(s) replayed"), "{said}");
    let replayed: Vec<(String, Option<i32>)> =
        sqlx::query_as("SELECT topic, max_attempts FROM outbox ORDER BY topic")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(replayed, vec![("mail.send".to_owned(), Some(5)); 3]);
    let said = ok(&["dead-letters", "ignore", "--app", "shop", "--all"])?;
    assert!(said.contains("shop: 1 dead letter(s) ignored"), "{said}");
    // More than one request takes: the CLI goes on until none is left.
    sqlx::query(
        "INSERT INTO dead_letters (app_id, original_event_id, source, topic, payload, attempt_count)
         SELECT $1, gen_random_uuid(), 'queue', 'bulk.t', '{}', 1 FROM generate_series(1, 10001)",
    )
    .bind(app)
    .execute(&db.pool)
    .await?;
    let said = ok(&[
        "dead-letters",
        "ignore",
        "--app",
        "shop",
        "--topic",
        "bulk.t",
    ])?;
    assert!(
        said.contains("shop: 10001 dead letter(s) ignored"),
        "{said}"
    );

    // Retry now: rows waiting for a delay become due.
    ok(&[
        "enqueue",
        "--app",
        "shop",
        "--topic",
        "report.build",
        "--delay-ms",
        "3600000",
    ])?;
    let said = ok(&["retry", "--app", "shop", "--topic", "report.build"])?;
    assert!(said.contains("shop: 1 row(s) due now"), "{said}");
    let due: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE topic = 'report.build' AND run_at <= now()",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(due, 1);
    Ok(())
}
