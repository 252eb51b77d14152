//! `outboxd config`, and configuration errors at start-up.

use crate::support::{ScratchDir, TestResult, outboxd, run, text};

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
    // Why, not only that the pool gave up waiting.
    assert!(stderr.contains("refused"), "{stderr}");
    assert!(!stderr.contains("pool timed out"), "{stderr}");
    Ok(())
}

#[test]
fn a_config_dir_that_does_not_exist_is_refused_not_ignored() -> TestResult {
    let out = run(outboxd(None).args(["--config-dir", "/nonexistent/outboxd-config", "config"]))?;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("/nonexistent/outboxd-config is not a folder"),
        "{stderr}"
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
    .env("NATS_URL", "nats://relay:natsw0rd@n1:4222, nats://n2:4222")
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
    assert_eq!(
        parsed["nats"]["url"].as_str(),
        Some("nats://relay@n1:4222,nats://n2:4222")
    );
    for secret in ["hunter2", "s3cr3t", "sslmode", "natsw0rd"] {
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
    // A value out of range names the file that set it, not a variable
    // nobody set.
    std::fs::write(
        dir.join("tight.toml"),
        "dead_letter_retention_days = 5000\n",
    )?;
    let out = run(outboxd(None).args([
        "--config-dir",
        dir.to_str().ok_or("utf-8")?,
        "--env",
        "tight",
        "config",
    ]))?;
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("dead_letter_retention_days") && err.contains("tight.toml"),
        "{err}"
    );
    assert!(!err.contains("OUTBOXD_DEAD_LETTER_RETENTION_DAYS"), "{err}");
    // The same two through the environment alone.
    let out = run(outboxd(None)
        .env("OUTBOXD_CONFIG_DIR", &*dir)
        .env("OUTBOXD_ENV", "staging")
        .arg("config"))?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("concurrency = 5"));
    let out = run(outboxd(None)
        .env("OUTBOXD_CONFIG_DIR", &*dir)
        .env("OUTBOXD_ENV", "prod")
        .arg("config"))?;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("prod.toml"));
    Ok(())
}

#[test]
fn a_usage_line_shows_what_the_command_needs_not_what_the_environment_set() -> TestResult {
    // OUTBOXD_ENV and OUTBOXD_CONFIG_DIR are set, as scripts/outboxd.sh sets
    // them: clap had listed `--env <ENV>` in the usage as if it were required.
    let out = run(outboxd(None).args(["dead-letters", "show"]))?;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("Usage: outboxd dead-letters show --app <APP> <ID>"),
        "{stderr}"
    );
    let help = text(&run(outboxd(None).arg("--help"))?.stdout);
    assert!(help.contains("[env: OUTBOXD_ENV]"), "{help}");
    Ok(())
}

#[test]
fn output_into_a_pipe_nobody_reads_ends_quietly() -> TestResult {
    // `outboxd … | head`: the reader is gone before the first line.
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let out = outboxd(None)
        .arg("config")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()?;
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panic"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    Ok(())
}
