//! The configuration's refusals and defaults.

use std::time::Duration;

use super::*;

fn load(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    Settings::load_from(
        Path::new("../../config"),
        None,
        vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

/// The refusal of `vars` (empty when they were taken).
fn refusal(vars: &[(&str, &str)]) -> String {
    load(vars).err().map(|e| e.to_string()).unwrap_or_default()
}

#[test]
fn defaults_are_valid() {
    let s = load(&[]).expect("default config");
    assert_eq!(s.dispatcher.batch_size, 500);
    assert!(s.dispatcher_config().validate().is_ok());
}

#[test]
fn env_overrides_flat_and_nested_keys() {
    let s = load(&[
        ("OUTBOXD_TRIGGER_RETRY_MAX_ATTEMPTS", "5"),
        ("OUTBOXD_DISPATCHER__BATCH_SIZE", "7"),
        ("OUTBOXD_ENV", "ignored-here"),
        ("DATABASE_URL", "postgres://x@127.0.0.1:1/db"),
    ])
    .expect("config");
    assert_eq!(s.trigger_retry_max_attempts, 5);
    assert_eq!(s.dispatcher.batch_size, 7);
    assert_eq!(s.database.url.expose(), "postgres://x@127.0.0.1:1/db");
}

#[test]
fn the_scripts_knobs_are_not_settings_but_a_misspelt_setting_is_refused() {
    let s = load(&[
        ("OUTBOXD_BIN", "/opt/outboxd"),
        ("OUTBOXD_STATE_DIR", "/tmp/x"),
        ("OUTBOXD_HTTP_PORT", "18080"),
    ]);
    assert!(s.is_ok(), "{:?}", s.err().map(|e| e.to_string()));
    let err = refusal(&[("OUTBOXD_MAX_TRIGER_DEPTH", "3")]);
    assert!(err.contains("max_triger_depth"), "{err}");
}

#[test]
fn a_value_of_the_wrong_type_is_refused_in_plain_words() {
    for (var, value, want) in [
        (
            "OUTBOXD_DISPATCHER__BATCH_SIZE",
            "-5",
            "got -5, which is negative; config/default.toml gives the key's range",
        ),
        (
            "OUTBOXD_DISPATCHER__CONCURRENCY",
            "99999999999",
            "got 99999999999, which is far too large; config/default.toml gives the key's range",
        ),
        (
            "OUTBOXD_DISPATCHER__BATCH_SIZE",
            "lots",
            "expected a whole number (config/default.toml gives the key's range)",
        ),
        (
            "OUTBOXD_NATS__STREAM__MAX_BYTES",
            "lots",
            "expected a whole number (config/default.toml gives the key's range) (env OUTBOXD_NATS__STREAM__MAX_BYTES)",
        ),
        (
            "OUTBOXD_NATS__RELAY_TOPICS",
            "orders.*",
            "expected a list such as",
        ),
        // Not the configuration library's words ("got string", "struct
        // DispatcherSettings").
        (
            "OUTBOXD_DISPATCHER__LEASE_MS",
            "99999999999999999999999",
            "got 99999999999999999999999, which is far too large or small",
        ),
        (
            "OUTBOXD_DISPATCHER",
            "{}",
            "dispatcher: is a section of keys, not a value",
        ),
        ("OUTBOXD_", "5", "OUTBOXD_ names no setting"),
        ("OUTBOXD_DISPATCHER____LEASE_MS", "5", "names no setting"),
        (
            "OUTBOXD_DISPATCHER__BOGUS",
            "1",
            "unknown key \"bogus\" (this section takes: ",
        ),
    ] {
        let err = refusal(&[(var, value)]);
        assert!(err.contains(want), "{var}={value}: {err}");
        assert!(
            !err.contains("u32") && !err.contains('`'),
            "{var}={value}: {err}"
        );
    }
}

#[test]
fn trusted_proxies_are_addresses_or_networks() {
    let s = load(&[
        ("JWT_SECRET", "0123456789abcdef0123456789abcdef"),
        (
            "OUTBOXD_ADMIN__TRUSTED_PROXIES",
            r#"["10.0.0.0/8", "2001:db8::1"]"#,
        ),
    ])
    .expect("config");
    assert_eq!(s.admin_auth().map(|a| a.trusted_proxies.len()), Some(2));
    let err = refusal(&[("OUTBOXD_ADMIN__TRUSTED_PROXIES", r#"["10.0.0.0/33"]"#)]);
    assert!(
        err.contains("admin.trusted_proxies") && err.contains("0..=32"),
        "{err}"
    );
}

#[test]
fn a_log_filter_that_does_not_parse_is_refused() {
    let err = refusal(&[("OUTBOXD_LOG__FILTER", "[[[")]);
    assert!(
        err.contains("log.filter") && err.contains("OUTBOXD_LOG__FILTER"),
        "{err}"
    );
    assert!(load(&[("OUTBOXD_LOG__FILTER", "info,outbox_dispatch=debug")]).is_ok());
}

#[test]
fn a_bad_url_names_the_variable_that_set_it() {
    let err = refusal(&[("NATS_URL", "not a url")]);
    assert!(
        err.contains("nats.url") && err.contains("env NATS_URL or OUTBOXD_NATS__URL"),
        "{err}"
    );
}

#[test]
fn out_of_range_names_key_range_and_env() {
    let err = load(&[("OUTBOXD_MAX_TRIGGER_DEPTH", "0")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_trigger_depth = 0"), "{err}");
    assert!(err.contains("1..=64"), "{err}");
    assert!(err.contains("OUTBOXD_MAX_TRIGGER_DEPTH"), "{err}");
}

#[test]
fn a_lease_shorter_than_the_heartbeat_is_named_in_the_refusal() {
    let err = load(&[("OUTBOXD_DISPATCHER__LEASE_MS", "1000")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("heartbeat_interval_ms = 10000"), "{err}");
    assert!(
        err.contains("shorter than dispatcher.lease_ms = 1000"),
        "{err}"
    );
}

#[test]
fn wrong_type_names_key() {
    let err = load(&[("OUTBOXD_DISPATCHER__BATCH_SIZE", "lots")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("dispatcher.batch_size"), "{err}");
}

#[test]
fn unknown_key_is_refused() {
    let err = load(&[("OUTBOXD_DISPATCHER__BACH_SIZE", "3")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("bach_size"), "{err}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]
    /// Any value for any setting loads or is refused with the key named.
    #[test]
    fn arbitrary_setting_values_are_named_refusals(
        key in proptest::sample::select(vec![
            "OUTBOXD_DISPATCHER__BATCH_SIZE",
            "OUTBOXD_DISPATCHER__LEASE_MS",
            "OUTBOXD_DISPATCHER__HEARTBEAT_INTERVAL_MS",
            "OUTBOXD_TRIGGER_RETRY_MAX_ATTEMPTS",
            "OUTBOXD_HTTP__LISTEN",
            "OUTBOXD_NATS__STREAM__RETENTION",
            "OUTBOXD_GC__SCHEDULE",
            "OUTBOXD_LOG__FORMAT",
            "OUTBOXD_CONSUMER__MAX_DELIVER",
        ]),
        value in ".{0,20}|-?[0-9]{1,22}",
    ) {
        if let Err(err) = load(&[(key, value.as_str())]) {
            let text = err.to_string().to_lowercase();
            let section_key = key
                .trim_start_matches("OUTBOXD_")
                .replace("__", ".")
                .to_lowercase();
            let leaf = section_key.rsplit('.').next().unwrap_or_default().to_owned();
            proptest::prop_assert!(text.contains(&leaf), "{key}={value:?}: {err}");
        }
    }
}

#[test]
fn the_reference_lists_every_setting() {
    use figment::value::Value;
    fn flatten(prefix: &str, value: &Value, out: &mut std::collections::BTreeSet<String>) {
        match value {
            Value::Dict(_, dict) => {
                for (k, v) in dict {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            _ => {
                out.insert(prefix.to_owned());
            }
        }
    }
    let defaults: Value = Figment::from(Toml::string(EMBEDDED_DEFAULT))
        .extract()
        .expect("the embedded defaults parse");
    let mut keys = std::collections::BTreeSet::new();
    flatten("", &defaults, &mut keys);
    let reference = include_str!("../../../../docs/configuration.md");
    let documented: std::collections::BTreeSet<String> = reference
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split('`').next().map(str::to_owned))
        .collect();
    assert_eq!(
        keys, documented,
        "config/default.toml (left) and docs/configuration.md (right) differ: run python3 scripts/config-reference.py"
    );
}

#[test]
fn handler_timeout_must_be_below_lease_without_heartbeat() {
    let err = load(&[
        ("OUTBOXD_DISPATCHER__LEASE_MS", "5000"),
        ("OUTBOXD_DISPATCHER__HEARTBEAT_INTERVAL_MS", "0"),
        ("OUTBOXD_DISPATCHER__HANDLER_TIMEOUT_MS", "5000"),
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("dispatcher.handler_timeout_ms"), "{err}");
    assert!(err.contains("10..=4999"), "{err}");
}

#[test]
fn heartbeat_lets_handler_timeout_exceed_lease() {
    let settings = load(&[
        ("OUTBOXD_DISPATCHER__LEASE_MS", "5000"),
        ("OUTBOXD_DISPATCHER__HEARTBEAT_INTERVAL_MS", "1000"),
        ("OUTBOXD_DISPATCHER__HANDLER_TIMEOUT_MS", "7500"),
    ])
    .expect("valid");
    assert_eq!(
        settings.dispatcher_config().handler_timeout,
        Duration::from_millis(7500)
    );
}

#[test]
fn short_jwt_secret_is_refused_with_its_length_not_its_value() {
    let err = load(&[("JWT_SECRET", "too-short-secret")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("admin.jwt_secret") && err.contains("16 bytes") && err.contains("at least 32"),
        "{err}"
    );
    assert!(!err.contains("too-short-secret"), "{err}");
    let ok = load(&[("JWT_SECRET", "0123456789abcdef0123456789abcdef")]).expect("32 bytes");
    assert!(ok.admin_auth().is_some());
    assert!(!format!("{ok:?}").contains("0123456789abcdef"));
}

/// The key before a rotation is checked as the key is, never printed, and
/// needs a key beside it.
#[test]
fn the_previous_jwt_secret_is_checked_and_hidden() {
    let key = ("JWT_SECRET", "0123456789abcdef0123456789abcdef");
    let err = load(&[key, ("JWT_PREVIOUS_SECRET", "short-old-secret")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("admin.jwt_previous_secret")
            && err.contains("16 bytes")
            && err.contains("JWT_PREVIOUS_SECRET")
            && !err.contains("short-old-secret"),
        "{err}"
    );
    let err = load(&[("JWT_PREVIOUS_SECRET", "fedcba9876543210fedcba9876543210")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("while admin.jwt_secret is empty"), "{err}");
    let ok = load(&[
        key,
        ("JWT_PREVIOUS_SECRET", "fedcba9876543210fedcba9876543210"),
    ])
    .expect("both 32 bytes");
    let auth = ok.admin_auth().expect("the admin API is on");
    assert_eq!(
        auth.previous_jwt_secret.as_deref(),
        Some(&b"fedcba9876543210fedcba9876543210"[..])
    );
    let shown = format!("{ok:?} {}", ok.to_toml().expect("toml"));
    assert!(!shown.contains("fedcba98"), "{shown}");
}

#[test]
fn secrets_do_not_print() {
    let s = load(&[("DATABASE_URL", "postgres://u:hunter2@127.0.0.1/db")]).expect("config");
    assert!(!format!("{s:?}").contains("hunter2"));
}

#[test]
fn missing_overlay_is_an_error() {
    let err = Settings::load_from(Path::new("../../config"), Some("nope"), Vec::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.toml"), "{err}");
}

#[test]
fn an_unknown_pooler_is_refused_with_the_accepted_values() {
    let err = refusal(&[("OUTBOXD_DATABASE__POOLER", "session")]);
    assert!(
        err.contains("database.pooler") && err.contains("\"transaction\""),
        "{err}"
    );
    let transaction = load(&[("OUTBOXD_DATABASE__POOLER", "transaction")]);
    assert!(transaction.is_ok_and(|s| s.database.pooler() == Pooler::Transaction));
}

#[test]
fn relay_topics_come_from_an_env_array_and_bad_patterns_name_the_rule() {
    let s =
        load(&[("OUTBOXD_NATS__RELAY_TOPICS", r#"["orders.*", "billing.>"]"#)]).expect("config");
    assert_eq!(s.nats.relay_topics, ["orders.*", "billing.>"]);
    let patterns = s.relay_patterns().expect("valid patterns");
    assert!(patterns[1].matches("billing.eu.paid"));
    for (bad, rule) in [
        (r#"["orders.>.eu"]"#, "'>' may only be the last token"),
        (r#"["or*ders"]"#, "a wildcard must be a whole token"),
        ("[]", "is empty"),
    ] {
        let err = load(&[("OUTBOXD_NATS__RELAY_TOPICS", bad)])
            .expect_err(bad)
            .to_string();
        assert!(err.contains("nats.relay_topics"), "{err}");
        assert!(err.contains(rule), "{err}");
        assert!(err.contains("OUTBOXD_NATS__RELAY_TOPICS"), "{err}");
    }
}

#[test]
fn a_subject_template_is_checked_at_start_up() {
    let err = load(&[("OUTBOXD_NATS__SUBJECT_TEMPLATE", "tenant.{app}.{payload}")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nats.subject_template") && err.contains("unknown placeholder {payload}"),
        "{err}"
    );
    let err = load(&[("OUTBOXD_NATS__SUBJECT_TEMPLATE", "tenant.*.{topic}")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("wildcard"), "{err}");
    let fields = "tenant.{app}.aggregate.{payload.type}.{payload.id}";
    let s = load(&[("OUTBOXD_NATS__SUBJECT_TEMPLATE", fields)]).expect("a template of fields");
    assert_eq!(s.nats.subject_template, fields);
}

#[test]
fn a_refusal_names_the_file_a_bad_value_or_bad_text_came_from() {
    let dir = std::env::temp_dir().join(format!("outboxd-config-{}", std::process::id()));
    let write = |text: &str| -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("default.toml"), "")?;
        std::fs::write(dir.join("prod.toml"), text)
    };
    let refusal_of = |text: &str| {
        write(text).map_err(|e| e.to_string())?;
        Settings::load_from(&dir, Some("prod"), std::iter::empty())
            .err()
            .map(|e| e.to_string())
            .ok_or_else(|| format!("{text:?} was taken"))
    };
    let overlay = dir.join("prod.toml").display().to_string();
    let broken = refusal_of("[dispatcher\nconcurrency = 1\n");
    let negative = refusal_of("[dispatcher]\nconcurrency = -3\n");
    let _ = std::fs::remove_dir_all(&dir);
    let broken = broken.unwrap_or_else(|e| e);
    assert!(
        broken.contains(&format!("{overlay}: TOML parse error")),
        "{broken}"
    );
    let negative = negative.unwrap_or_else(|e| e);
    assert!(
        negative.contains("dispatcher.concurrency: got -3, which is negative")
            && negative.contains(&format!("(set in {overlay})")),
        "{negative}"
    );
}
