use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream;
use futures::StreamExt;
use outbox_nats::consumer::ConsumeCounters;
use outbox_nats::{
    ConsumerConfig, ConsumerRuntime, Delivery, HandlerError, durable_name, ensure_stream,
};
use outbox_testkit::{TestDb, wait_until};
use tokio_util::sync::CancellationToken;

use crate::{TestResult, contract, jetstream as connect, unique_prefix};

fn config(prefix: &str, group: &str) -> ConsumerConfig {
    ConsumerConfig {
        stream: format!("OUTBOX_{}", prefix.to_uppercase()),
        durable: durable_name("test", group),
        ack_wait: Duration::from_secs(2),
        max_deliver: 3,
        nak_base: Duration::from_millis(200),
        nak_max: Duration::from_millis(800),
        mask_fields: vec!["email".into()],
        drain_grace: Duration::from_secs(1),
        ..ConsumerConfig::default()
    }
}

async fn publish(
    js: &jetstream::Context,
    subject: String,
    tenant: &str,
    id: &str,
    body: &[u8],
) -> Result<(), Box<dyn std::error::Error>> {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    headers.insert("tenant-id", tenant);
    js.publish_with_headers(subject, headers, body.to_vec().into())
        .await?
        .await?;
    Ok(())
}

fn spawn(
    runtime: &ConsumerRuntime,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), outbox_nats::Error>>,
) {
    let stop = CancellationToken::new();
    let runtime = runtime.clone();
    let waiter = stop.clone();
    (
        stop,
        tokio::spawn(async move { runtime.run(waiter.cancelled_owned()).await }),
    )
}

type Seen = Arc<Mutex<Vec<(String, i64, Instant)>>>;

#[tokio::test]
async fn retries_with_nak_backoff_then_one_masked_dead_letter() -> TestResult {
    let js = connect().await?;
    let db = TestDb::new().await?;
    db.app("shop").await?;
    let prefix = unique_prefix();
    ensure_stream(&js, &contract(&prefix)).await?;
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let runtime = ConsumerRuntime::new(js.clone(), db.pool.clone(), config(&prefix, "retry"))
        .route(format!("{prefix}.*.>"), move |d: Delivery| {
            log.lock().expect("lock").push((
                d.message_id.clone().unwrap_or_default(),
                d.delivered,
                Instant::now(),
            ));
            async { Err::<(), _>(HandlerError::Retry("downstream 503".into())) }
        });
    let (stop, task) = spawn(&runtime);
    let id = uuid::Uuid::now_v7().to_string();
    publish(
        &js,
        format!("{prefix}.shop.user.created"),
        "shop",
        &id,
        br#"{"email":"a@b.c","name":"Ann"}"#,
    )
    .await?;
    let dead = wait_until(Duration::from_secs(15), || async {
        ConsumeCounters::get(&runtime.counters.dead_lettered) == 1
    })
    .await;
    stop.cancel();
    task.await??;
    assert!(dead, "no dead letter after max_deliver");
    let seen = seen.lock().expect("lock").clone();
    let deliveries: Vec<i64> = seen.iter().map(|(_, d, _)| *d).collect();
    assert_eq!(
        deliveries,
        vec![1, 2, 3],
        "delivery count comes from the message metadata"
    );
    let gap1 = seen[1].2 - seen[0].2;
    let gap2 = seen[2].2 - seen[1].2;
    assert!(
        gap1 >= Duration::from_millis(180),
        "nak delay 1 not respected: {gap1:?}"
    );
    assert!(
        gap2 >= Duration::from_millis(380),
        "nak delay 2 not respected: {gap2:?}"
    );
    let rows = outbox_core::store::dead_letters::by_original(&db.pool, uuid::Uuid::parse_str(&id)?)
        .await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].source, "nats");
    assert_eq!(rows[0].attempt_count, 3);
    assert_eq!(
        rows[0].payload,
        serde_json::json!({"email": "***", "name": "Ann"}),
        "PII masked"
    );
    assert!(
        rows[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("delivery 3 of 3"))
    );
    Ok(())
}

#[tokio::test]
async fn poison_unknown_subject_and_foreign_tenant_are_terminated_not_redelivered() -> TestResult {
    let js = connect().await?;
    let db = TestDb::new().await?;
    db.app("shop").await?;
    let prefix = unique_prefix();
    ensure_stream(&js, &contract(&prefix)).await?;
    let calls = Arc::new(Mutex::new(0u32));
    let counter = calls.clone();
    let runtime = ConsumerRuntime::new(js.clone(), db.pool.clone(), config(&prefix, "poison"))
        .route(format!("{prefix}.*.known"), move |_d: Delivery| {
            *counter.lock().expect("lock") += 1;
            async { Ok::<(), HandlerError>(()) }
        });
    // The server announces each term with its reason (nats-server 2.10.4+).
    let client = outbox_nats::connect(&std::env::var("NATS_URL")?).await?;
    let mut advisories = client
        .subscribe(format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.OUTBOX_{}.{}",
            prefix.to_uppercase(),
            durable_name("test", "poison")
        ))
        .await?;
    client.flush().await?;
    let (stop, task) = spawn(&runtime);
    publish(
        &js,
        format!("{prefix}.shop.known"),
        "shop",
        "m1",
        b"{not json",
    )
    .await?;
    publish(&js, format!("{prefix}.shop.unknown"), "shop", "m2", b"{}").await?;
    publish(&js, format!("{prefix}.shop.known"), "other", "m3", b"{}").await?;
    publish(
        &js,
        format!("{prefix}.nosuchapp.known"),
        "nosuchapp",
        "m4",
        b"{}",
    )
    .await?;
    publish(&js, format!("{prefix}.shop.known"), "shop", "m5", b"{}").await?;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            *calls.lock().expect("lock") == 1
        })
        .await
    );
    // Past ack_wait: a terminated message would have come back by now.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.cancel();
    task.await??;
    let c = &runtime.counters;
    assert_eq!(
        ConsumeCounters::get(&c.poisoned),
        2,
        "bad JSON, unknown subject"
    );
    assert_eq!(ConsumeCounters::get(&c.tenant_rejected), 1);
    // The unknown app's message is parked under the reserved app, with the
    // tenant it claimed, and terminated with the reason.
    assert_eq!(ConsumeCounters::get(&c.unknown_tenant), 1);
    let unrouted =
        outbox_core::store::apps::by_slug(&db.pool, outbox_core::store::apps::UNROUTED_SLUG)
            .await?;
    let parked = outbox_core::store::dead_letters::list(
        &db.pool,
        unrouted.id,
        &Default::default(),
        None,
        10,
    )
    .await?;
    assert_eq!(parked.len(), 1);
    let parked = outbox_core::store::dead_letters::get(&db.pool, unrouted.id, parked[0].id).await?;
    assert_eq!(parked.topic, format!("{prefix}.nosuchapp.known"));
    assert_eq!(parked.headers["claimed-tenant"], "nosuchapp");
    assert!(
        parked
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("no app \"nosuchapp\"")),
        "{:?}",
        parked.last_error
    );
    assert_eq!(ConsumeCounters::get(&c.consumed), 1);
    assert_eq!(*calls.lock().expect("lock"), 1);
    let mut reasons = Vec::new();
    while let Ok(Some(advisory)) =
        tokio::time::timeout(Duration::from_millis(500), advisories.next()).await
    {
        let body: serde_json::Value = serde_json::from_slice(&advisory.payload)?;
        reasons.push(body["reason"].as_str().unwrap_or_default().to_owned());
    }
    assert!(
        reasons.iter().any(|r| r == "payload is not JSON"),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r == "no handler for this subject"),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("dead-lettered: no app")),
        "{reasons:?}"
    );
    Ok(())
}

#[tokio::test]
async fn dead_letter_error_and_a_failed_dead_letter_insert_that_naks() -> TestResult {
    let js = connect().await?;
    let db = TestDb::new().await?;
    db.app("shop").await?;
    let prefix = unique_prefix();
    ensure_stream(&js, &contract(&prefix)).await?;
    // The database refuses dead letters until the trigger is dropped.
    sqlx::query(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'disk full'; END $$",
    )
    .execute(&db.pool)
    .await?;
    sqlx::query("CREATE TRIGGER refuse BEFORE INSERT ON dead_letters FOR EACH ROW EXECUTE FUNCTION refuse()")
        .execute(&db.pool)
        .await?;
    let runtime = ConsumerRuntime::new(js.clone(), db.pool.clone(), config(&prefix, "dl"))
        .route(format!("{prefix}.>"), |_d: Delivery| async {
            Err::<(), _>(HandlerError::Permanent("invalid order".into()))
        });
    let (stop, task) = spawn(&runtime);
    let id = uuid::Uuid::now_v7();
    publish(
        &js,
        format!("{prefix}.shop.order"),
        "shop",
        &id.to_string(),
        b"{}",
    )
    .await?;
    // Deliveries past max_deliver keep coming while the insert fails.
    assert!(
        wait_until(Duration::from_secs(15), || async {
            ConsumeCounters::get(&runtime.counters.retried) >= 4
        })
        .await,
        "a failed dead-letter insert must nak, not drop the message"
    );
    sqlx::query("DROP TRIGGER refuse ON dead_letters")
        .execute(&db.pool)
        .await?;
    let written = wait_until(Duration::from_secs(15), || async {
        ConsumeCounters::get(&runtime.counters.dead_lettered) == 1
    })
    .await;
    stop.cancel();
    task.await??;
    assert!(written);
    let rows = outbox_core::store::dead_letters::by_original(&db.pool, id).await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].last_error.as_deref(), Some("invalid order"));
    Ok(())
}

#[tokio::test]
async fn dedupe_skips_a_second_copy_but_reruns_a_failed_first_delivery() -> TestResult {
    let js = connect().await?;
    let db = TestDb::new().await?;
    db.app("shop").await?;
    let prefix = unique_prefix();
    let mut short_window = contract(&prefix);
    short_window.duplicate_window = Duration::from_millis(200);
    ensure_stream(&js, &short_window).await?;
    let calls: Arc<Mutex<Vec<i64>>> = Arc::default();
    let log = calls.clone();
    let mut cfg = config(&prefix, "dedupe");
    cfg.dedupe_ttl = Some(Duration::from_secs(60));
    let runtime = ConsumerRuntime::new(js.clone(), db.pool.clone(), cfg).route(
        format!("{prefix}.>"),
        move |d: Delivery| {
            log.lock().expect("lock").push(d.delivered);
            let first = d.delivered == 1;
            async move {
                if first {
                    Err(HandlerError::Retry("flaky".into()))
                } else {
                    Ok(())
                }
            }
        },
    );
    let (stop, task) = spawn(&runtime);
    publish(&js, format!("{prefix}.shop.t"), "shop", "same-id", b"{}").await?;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            ConsumeCounters::get(&runtime.counters.consumed) == 1
        })
        .await
    );
    // Past the stream's duplicate window, the same id is stored a second time.
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish(&js, format!("{prefix}.shop.t"), "shop", "same-id", b"{}").await?;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            ConsumeCounters::get(&runtime.counters.deduped) == 1
        })
        .await
    );
    stop.cancel();
    task.await??;
    assert_eq!(
        *calls.lock().expect("lock"),
        vec![1, 2],
        "the failed first delivery ran again; the copy did not"
    );
    Ok(())
}

#[tokio::test]
async fn two_runtimes_on_one_durable_split_the_work() -> TestResult {
    let js = connect().await?;
    let db = TestDb::new().await?;
    db.app("shop").await?;
    let prefix = unique_prefix();
    ensure_stream(&js, &contract(&prefix)).await?;
    let handled: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let mut runtimes = Vec::new();
    for _ in 0..2 {
        let log = handled.clone();
        // Each runtime on its own connection, as two processes would be.
        let own = connect().await?;
        runtimes.push(
            ConsumerRuntime::new(own, db.pool.clone(), config(&prefix, "shared")).route(
                format!("{prefix}.>"),
                move |d: Delivery| {
                    *log.lock()
                        .expect("lock")
                        .entry(d.message_id.clone().unwrap_or_default())
                        .or_default() += 1;
                    async { Ok::<(), HandlerError>(()) }
                },
            ),
        );
    }
    let tasks: Vec<_> = runtimes.iter().map(spawn).collect();
    for n in 0..200 {
        publish(
            &js,
            format!("{prefix}.shop.t"),
            "shop",
            &format!("m{n}"),
            b"{}",
        )
        .await?;
    }
    let done = wait_until(Duration::from_secs(20), || async {
        handled.lock().expect("lock").len() == 200
    })
    .await;
    for (stop, task) in tasks {
        stop.cancel();
        task.await??;
    }
    assert!(done, "not every message was handled");
    assert!(
        handled.lock().expect("lock").values().all(|n| *n == 1),
        "a message ran twice"
    );
    let per_runtime: Vec<u64> = runtimes
        .iter()
        .map(|r| ConsumeCounters::get(&r.counters.consumed))
        .collect();
    assert_eq!(per_runtime.iter().sum::<u64>(), 200, "{per_runtime:?}");
    Ok(())
}

#[tokio::test]
async fn a_suspended_apps_messages_are_dead_lettered_not_processed() -> TestResult {
    let js = connect().await?;
    let db = TestDb::new().await?;
    db.app("paused").await?;
    outbox_core::store::apps::set_suspended(&db.pool, "paused", true).await?;
    let prefix = unique_prefix();
    ensure_stream(&js, &contract(&prefix)).await?;
    let calls = Arc::new(Mutex::new(0u32));
    let counter = calls.clone();
    let runtime = ConsumerRuntime::new(js.clone(), db.pool.clone(), config(&prefix, "suspended"))
        .route(format!("{prefix}.>"), move |_d: Delivery| {
            *counter.lock().expect("lock") += 1;
            async { Ok::<(), HandlerError>(()) }
        });
    let (stop, task) = spawn(&runtime);
    let id = uuid::Uuid::now_v7();
    publish(
        &js,
        format!("{prefix}.paused.t"),
        "paused",
        &id.to_string(),
        br#"{"email":"x@y.z"}"#,
    )
    .await?;
    let dead = wait_until(Duration::from_secs(10), || async {
        ConsumeCounters::get(&runtime.counters.dead_lettered) == 1
    })
    .await;
    stop.cancel();
    task.await??;
    assert!(dead);
    assert_eq!(*calls.lock().expect("lock"), 0);
    let rows = outbox_core::store::dead_letters::by_original(&db.pool, id).await?;
    assert!(
        rows[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("suspended"))
    );
    assert_eq!(rows[0].payload, serde_json::json!({"email": "***"}));
    Ok(())
}

#[tokio::test]
async fn dedupe_store_claims_busy_duplicate_release_and_takeover() -> TestResult {
    use outbox_core::store::dedupe::{self, Claim};
    let db = TestDb::new().await?;
    let hold = Duration::from_secs(30);
    assert_eq!(
        dedupe::claim(&db.pool, "c", "m", hold).await?,
        Claim::Claimed
    );
    // A concurrent consumer sees it busy and naks for later.
    assert_eq!(dedupe::claim(&db.pool, "c", "m", hold).await?, Claim::Busy);
    // A failed run releases it: the redelivery runs.
    dedupe::release(&db.pool, "c", "m").await?;
    assert_eq!(
        dedupe::claim(&db.pool, "c", "m", hold).await?,
        Claim::Claimed
    );
    dedupe::complete(&db.pool, "c", "m", Duration::from_secs(60)).await?;
    assert_eq!(
        dedupe::claim(&db.pool, "c", "m", hold).await?,
        Claim::Duplicate
    );
    // Another durable consumer keeps its own record.
    assert_eq!(
        dedupe::claim(&db.pool, "other", "m", hold).await?,
        Claim::Claimed
    );
    // An abandoned claim (its consumer died) is taken over once it lapses.
    assert_eq!(
        dedupe::claim(&db.pool, "c", "n", Duration::from_millis(1)).await?,
        Claim::Claimed
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        dedupe::claim(&db.pool, "c", "n", hold).await?,
        Claim::Claimed
    );
    // A done record is forgotten after its TTL.
    dedupe::complete(&db.pool, "c", "n", Duration::from_millis(1)).await?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        dedupe::claim(&db.pool, "c", "n", hold).await?,
        Claim::Claimed
    );
    Ok(())
}

#[tokio::test]
async fn a_handler_sees_the_correlation_and_trace_of_either_header_name() -> TestResult {
    let js = connect().await?;
    let db = TestDb::new().await?;
    db.app("shop").await?;
    let prefix = unique_prefix();
    ensure_stream(&js, &contract(&prefix)).await?;
    let seen: Arc<Mutex<Vec<outbox_nats::headers::TraceContext>>> = Arc::default();
    let log = seen.clone();
    let runtime = ConsumerRuntime::new(js.clone(), db.pool.clone(), config(&prefix, "trace"))
        .route(format!("{prefix}.>"), move |d: Delivery| {
            log.lock().expect("lock").push(d.trace.clone());
            async { Ok::<(), HandlerError>(()) }
        });
    let (stop, task) = spawn(&runtime);
    // A producer that is not outboxd: only x-correlation-id and traceparent.
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "trace-1");
    headers.insert("tenant-id", "shop");
    headers.insert("x-correlation-id", "corr-7");
    headers.insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    js.publish_with_headers(format!("{prefix}.shop.t"), headers, b"{}".to_vec().into())
        .await?
        .await?;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            ConsumeCounters::get(&runtime.counters.consumed) == 1
        })
        .await
    );
    stop.cancel();
    task.await??;
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].correlation_id.as_deref(), Some("corr-7"));
    assert_eq!(
        seen[0].trace_id.as_deref(),
        Some("4bf92f3577b34da6a3ce929d0e0e4736"),
        "derived from traceparent"
    );
    Ok(())
}

#[tokio::test]
async fn a_replayed_consumer_dead_letter_goes_back_to_its_subject_once_per_replay() -> TestResult {
    let js = connect().await?;
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let prefix = unique_prefix();
    let mut stream = ensure_stream(&js, &contract(&prefix)).await?;
    let runtime = ConsumerRuntime::new(js.clone(), db.pool.clone(), config(&prefix, "replay"))
        .route(format!("{prefix}.>"), |_d: Delivery| async {
            Err::<(), _>(HandlerError::Permanent("invalid order".into()))
        });
    let (stop, task) = spawn(&runtime);
    let original = uuid::Uuid::now_v7();
    let subject = format!("{prefix}.shop.order.created");
    publish(
        &js,
        subject.clone(),
        "shop",
        &original.to_string(),
        br#"{"order": 5}"#,
    )
    .await?;
    assert!(
        wait_until(Duration::from_secs(15), || async {
            ConsumeCounters::get(&runtime.counters.dead_lettered) == 1
        })
        .await
    );
    stop.cancel();
    task.await??;
    let dead = outbox_core::store::dead_letters::by_original(&db.pool, original).await?;
    let dead_letter = dead.first().ok_or("no dead letter")?.id;

    // Replayed: through the outbox and the relay, to the same subject, under
    // a message id of its own (the original's is still in the duplicate window).
    let replayed = outbox_core::store::dead_letters::replay(
        &mut *db.pool.acquire().await?,
        app,
        &[dead_letter],
    )
    .await?;
    assert_eq!(replayed.len(), 1);
    let again = outbox_core::store::dead_letters::replay(
        &mut *db.pool.acquire().await?,
        app,
        &[dead_letter],
    )
    .await?;
    assert!(
        again.is_empty(),
        "a second replay of the same dead letter is refused"
    );
    let mut registry = outbox_dispatch::Registry::new();
    registry.fallback(outbox_nats::Relay::new(
        js.clone(),
        db.pool.clone(),
        outbox_nats::RelayConfig {
            subject_template: format!("{prefix}.{{app}}.{{topic}}"),
            ..outbox_nats::RelayConfig::default()
        },
    ));
    let dispatcher = outbox_dispatch::Dispatcher::new(
        db.pool.clone(),
        registry,
        outbox_dispatch::Config::default(),
    )?;
    let report = dispatcher.run_until_idle().await?;
    assert_eq!(report.completed, 1, "{report:?}");
    assert_eq!(
        stream.info().await?.state.messages,
        2,
        "the replay was not dropped"
    );
    let last = stream.get_last_raw_message_by_subject(&subject).await?;
    let id = last
        .headers
        .get("Nats-Msg-Id")
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    assert_eq!(id, format!("{original}:replay:1"));

    // A row cannot borrow the replay's headers to publish into another
    // tenant's subjects.
    let mut tx = db.pool.begin().await?;
    let forged = outbox_core::enqueue(
        &mut tx,
        app,
        &outbox_core::NewEvent::new("x", serde_json::json!({}))
            .with_source(outbox_core::Source::Nats)
            .with_max_attempts(3)
            .with_headers(serde_json::json!({
                "outbox-subject": format!("{prefix}.other.order.created"),
                "outbox-msg-id": "forged-1"
            })),
    )
    .await?;
    tx.commit().await?;
    dispatcher.run_until_idle().await?;
    let refused = outbox_core::store::dead_letters::by_original(&db.pool, forged).await?;
    let error = refused
        .first()
        .and_then(|d| d.last_error.clone())
        .ok_or("not refused")?;
    assert!(
        error.contains("is not one of app shop's subjects"),
        "{error}"
    );
    assert_eq!(
        stream.info().await?.state.messages,
        2,
        "nothing was published"
    );
    Ok(())
}
