use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::{NewEvent, enqueue};
use outbox_dispatch::{Dispatcher, Event, HandlerError, Registry};
use outbox_testkit::{TestDb, wait_until};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{Calls, TestResult, config, recording, spawn_run};

/// Per ordering key, the (producer, n) pairs in the order they were handled.
type HandledByKey = HashMap<String, Vec<(u64, u64)>>;

#[tokio::test]
async fn a_row_is_not_claimed_past_an_open_producer_of_its_key() -> TestResult {
    let db = TestDb::new().await?;
    let app = db.app("shop").await?;
    let calls = Calls::default();
    let order: Arc<Mutex<Vec<u64>>> = Arc::default();
    let seen = order.clone();
    let dispatcher = recording(
        &db,
        "t",
        &calls,
        move |e| {
            seen.lock()
                .expect("lock")
                .push(e.payload["n"].as_u64().unwrap_or(0));
            Ok(())
        },
        config(),
    );
    // T1 starts first and enqueues A for key k, but commits last.
    let mut t1 = db.pool.begin().await?;
    enqueue(
        &mut t1,
        app,
        &NewEvent::new("t", json!({"n": 1})).with_ordering_key("k"),
    )
    .await?;
    let mut t2 = db.pool.begin().await?;
    enqueue(
        &mut t2,
        app,
        &NewEvent::new("t", json!({"n": 2})).with_ordering_key("k"),
    )
    .await?;
    t2.commit().await?;
    // B is committed, but T1 could still commit an earlier row of k.
    assert_eq!(dispatcher.run_once().await?.claimed, 0);
    t1.commit().await?;
    // A transaction of another test on the same server may still hold the
    // snapshot horizon below T1 for a moment: wait for both rows, not one pass.
    let both_ran = wait_until(Duration::from_secs(20), || async {
        let _ = dispatcher.run_once().await;
        order.lock().map(|o| o.len() >= 2).unwrap_or(false)
    })
    .await;
    assert!(both_ran, "ran: {:?}", order.lock().expect("lock"));
    assert_eq!(*order.lock().expect("lock"), vec![1, 2]);
    Ok(())
}

#[tokio::test]
async fn ordering_key_runs_one_at_a_time_in_order_under_concurrent_producers() -> TestResult {
    const PER_PRODUCER: u64 = 150;
    let db = TestDb::with_pool_size(16).await?;
    let app = db.app("shop").await?;
    // handled[key] = sequence of (producer, n); in_flight[key] detects overlap.
    let handled: Arc<Mutex<HandledByKey>> = Arc::default();
    let in_flight: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let overlaps = Arc::new(Mutex::new(0u32));
    let mut registry = Registry::new();
    {
        let (handled, in_flight, overlaps) = (handled.clone(), in_flight.clone(), overlaps.clone());
        registry.register("t", move |e: Event| {
            let (handled, in_flight, overlaps) =
                (handled.clone(), in_flight.clone(), overlaps.clone());
            async move {
                let key = e.ordering_key.clone().unwrap_or_default();
                {
                    let mut f = in_flight.lock().expect("lock");
                    let c = f.entry(key.clone()).or_default();
                    *c += 1;
                    if *c > 1 {
                        *overlaps.lock().expect("lock") += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..2))).await;
                handled
                    .lock()
                    .expect("lock")
                    .entry(key.clone())
                    .or_default()
                    .push((
                        e.payload["producer"].as_u64().unwrap_or(99),
                        e.payload["n"].as_u64().unwrap_or(0),
                    ));
                *in_flight.lock().expect("lock").entry(key).or_default() -= 1;
                Ok::<(), HandlerError>(())
            }
        });
    }
    let mut cfg = config();
    cfg.batch_size = 20;
    let dispatcher = Dispatcher::new(db.pool.clone(), registry, cfg)?;
    let stop = CancellationToken::new();
    let run = spawn_run(dispatcher, &stop);
    // Two producers write to the same keys concurrently, each in order, some
    // transactions holding a row while they sleep.
    let mut producers = Vec::new();
    for producer in 0..2u64 {
        let pool = db.pool.clone();
        producers.push(tokio::spawn(async move {
            for n in 0..PER_PRODUCER {
                let key = format!("k{}", n % 3);
                let mut tx = pool.begin().await?;
                enqueue(
                    &mut tx,
                    app,
                    &NewEvent::new("t", json!({"producer": producer, "n": n}))
                        .with_ordering_key(key),
                )
                .await?;
                if fastrand::u8(..10) == 0 {
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(1..15))).await;
                }
                tx.commit().await?;
            }
            Ok::<(), outbox_core::Error>(())
        }));
    }
    for p in producers {
        p.await??;
    }
    let total = 2 * PER_PRODUCER as usize;
    let done = wait_until(Duration::from_secs(60), || async {
        handled
            .lock()
            .expect("lock")
            .values()
            .map(Vec::len)
            .sum::<usize>()
            == total
    })
    .await;
    stop.cancel();
    run.await??;
    assert!(done, "not every ordered row was handled");
    assert_eq!(
        *overlaps.lock().expect("lock"),
        0,
        "two rows of one key ran at once"
    );
    for (key, seq) in handled.lock().expect("lock").iter() {
        for producer in 0..2u64 {
            let ns: Vec<u64> = seq
                .iter()
                .filter(|(p, _)| *p == producer)
                .map(|(_, n)| *n)
                .collect();
            assert!(
                ns.windows(2).all(|w| w[0] < w[1]),
                "key {key} producer {producer} out of order: {ns:?}"
            );
        }
    }
    Ok(())
}
