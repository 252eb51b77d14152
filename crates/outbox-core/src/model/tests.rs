//! The row model's checks: sources, and what `NewEvent::validate` refuses and names.

use super::*;

#[test]
fn source_round_trips() {
    for s in [
        Source::Kv,
        Source::Cron,
        Source::Pubsub,
        Source::Queue,
        Source::DeadLetter,
        Source::Email,
        Source::Nats,
    ] {
        assert_eq!(s.as_str().parse::<Source>().ok(), Some(s));
    }
    assert!("bogus".parse::<Source>().is_err());
}

#[test]
fn validate_names_the_field() {
    let long = "x".repeat(MAX_KEY_LEN + 1);
    let err = NewEvent::new(long, Value::Null).validate().unwrap_err();
    assert!(err.to_string().contains("topic"), "{err}");
    // Characters, not bytes: what plain SQL may write, the library takes too.
    let wide = "é".repeat(MAX_KEY_LEN);
    NewEvent::new(wide.clone(), Value::Null)
        .with_idempotency_key(wide.clone())
        .validate()
        .unwrap();
    let err = NewEvent::new("t", Value::Null)
        .with_partition_key(format!("{wide}é"))
        .validate()
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("partition_key: is 256 characters; at most 255"),
        "{err}"
    );
    let err = NewEvent::new("t", Value::Null)
        .with_max_attempts(0)
        .validate()
        .unwrap_err();
    assert!(err.to_string().contains("max_attempts"), "{err}");
    let err = NewEvent::new("t", Value::Null)
        .with_headers(Value::Bool(true))
        .validate()
        .unwrap_err();
    assert!(err.to_string().contains("headers"), "{err}");
    assert!(NewEvent::new("t", Value::Null).validate().is_ok());
    for far in [
        DateTime::<Utc>::MIN_UTC,
        MIN_RUN_AT - chrono::Duration::seconds(1),
        run_at_end(),
    ] {
        let err = NewEvent::new("t", Value::Null)
            .with_run_at(far)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("run_at"), "{err}");
    }
    assert!(
        NewEvent::new("t", Value::Null)
            .with_run_at(run_at_end() - chrono::Duration::seconds(1))
            .validate()
            .is_ok()
    );
    let mut first_second_at_priority_9 = NewEvent::new("t", Value::Null).with_run_at(MIN_RUN_AT);
    first_second_at_priority_9.priority = MAX_PRIORITY;
    assert!(first_second_at_priority_9.validate().is_err());
}

#[test]
fn nul_anywhere_in_json_is_refused_by_name() {
    for bad in [
        serde_json::json!("a\u{0}b"),
        serde_json::json!({"k\u{0}": 1}),
        serde_json::json!({"deep": [1, {"x": "\u{0}"}]}),
    ] {
        let err = NewEvent::new("t", bad).validate().unwrap_err();
        assert!(err.to_string().contains("payload"), "{err}");
    }
    let err = NewEvent::new("t", Value::Null)
        .with_headers(serde_json::json!({"h": "\u{0}"}))
        .validate()
        .unwrap_err();
    assert!(err.to_string().contains("headers"), "{err}");
}

proptest::proptest! {
    /// Validation never panics, and every refusal names its field.
    #[test]
    fn validate_names_the_field_it_refuses(
        topic in ".{0,300}",
        key in proptest::option::of(".{0,300}"),
        ordering in proptest::option::of(".{0,300}"),
        max in proptest::option::of(-3i32..5),
        text in ".{0,20}",
    ) {
        let mut event = NewEvent::new(topic, serde_json::json!({ "text": text }));
        event.idempotency_key = key;
        event.ordering_key = ordering;
        event.max_attempts = max;
        if let Err(Error::Invalid { field, reason }) = event.validate() {
            proptest::prop_assert!(
                ["topic", "idempotency_key", "ordering_key", "max_attempts", "payload"].contains(&field),
                "{field}: {reason}"
            );
            proptest::prop_assert!(!reason.is_empty());
        }
    }
}
