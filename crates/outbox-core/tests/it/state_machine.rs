//! The outbox row's life as a state machine, tested against real SQL.
//!
//! Random sequences of enqueue (commit or rollback), claim, complete and fail
//! with a current or a stale fencing token, heartbeat, worker crash (its
//! leases are forgotten), advancing time, retention sweep and replay run
//! against the real statements of `outbox_core::store`; after each step the
//! database must equal a small reference model. A failure shrinks to the
//! shortest sequence that still breaks.
//!
//! Time advances by shifting every stored timestamp into the past, which is
//! what the database clock moving forward looks like to the statements (they
//! all compare with `now()`). The model counts whole seconds; the real time
//! a case takes (milliseconds) never crosses a boundary the model relies on.

use std::sync::OnceLock;
use std::time::Duration;

use outbox_core::model::Lease;
use outbox_core::store::{dead_letters, outbox, retention};
use outbox_core::{NewEvent, enqueue};
use proptest::prelude::*;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};
use sqlx::PgPool;
use uuid::Uuid;

const LEASE_SECS: i64 = 30;
const DAY: i64 = 86_400;
const RETENTION_DAYS: u32 = 1;

/// A row as the model sees it.
#[derive(Debug, Clone, PartialEq)]
enum Row {
    /// Rolled back: never visible.
    RolledBack,
    /// In the outbox.
    Live {
        due_at: i64,
        /// Order among rows due at the same second (when `due_at` was set).
        seq: u64,
        lease_until: Option<i64>,
        attempts: i32,
        token: i64,
    },
    /// Completed and deleted.
    Done,
    /// Moved to `dead_letters`.
    Dead,
}

#[derive(Debug, Clone)]
struct DeadLetter {
    created_at: i64,
    resolved: bool,
    swept: bool,
}

/// A lease a worker believes it holds; it may be stale.
#[derive(Debug, Clone)]
struct Held {
    row: usize,
    token: i64,
    worker: u8,
}

#[derive(Debug, Clone, Default)]
struct Model {
    now: i64,
    seq: u64,
    rows: Vec<Row>,
    dead: Vec<DeadLetter>,
    held: Vec<Held>,
}

impl Model {
    fn claimable(&self) -> Vec<usize> {
        let mut due: Vec<(i64, u64, usize)> = self
            .rows
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match r {
                Row::Live {
                    due_at,
                    seq,
                    lease_until,
                    ..
                } if *due_at <= self.now && lease_until.is_none_or(|u| u <= self.now) => {
                    Some((*due_at, *seq, i))
                }
                _ => None,
            })
            .collect();
        due.sort();
        due.into_iter().map(|(_, _, i)| i).collect()
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// The held lease, if its token is still the row's current one.
    fn current(&self, held: &Held) -> bool {
        matches!(self.rows.get(held.row), Some(Row::Live { token, .. }) if *token == held.token)
    }
}

#[derive(Debug, Clone)]
enum Step {
    Enqueue {
        commit: bool,
    },
    Claim {
        worker: u8,
        limit: u32,
    },
    Complete {
        held: usize,
    },
    Fail {
        held: usize,
        permanent: bool,
        delay_secs: i64,
    },
    Heartbeat {
        worker: u8,
    },
    Crash {
        worker: u8,
    },
    AdvanceTime {
        secs: i64,
    },
    Sweep,
    Replay {
        dead: usize,
    },
}

struct RowMachine;

impl ReferenceStateMachine for RowMachine {
    type State = Model;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model::default()).boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Step> {
        let worker = 0u8..2;
        let mut steps = vec![
            (
                3,
                any::<bool>()
                    .prop_map(|c| Step::Enqueue { commit: c })
                    .boxed(),
            ),
            (
                3,
                (worker.clone(), 1u32..4)
                    .prop_map(|(worker, limit)| Step::Claim { worker, limit })
                    .boxed(),
            ),
            (
                1,
                worker
                    .clone()
                    .prop_map(|worker| Step::Heartbeat { worker })
                    .boxed(),
            ),
            (1, worker.prop_map(|worker| Step::Crash { worker }).boxed()),
            (
                2,
                prop_oneof![Just(1i64), Just(10), Just(LEASE_SECS + 1), Just(DAY)]
                    .prop_map(|secs| Step::AdvanceTime { secs })
                    .boxed(),
            ),
            (1, Just(Step::Sweep).boxed()),
        ];
        if !state.held.is_empty() {
            let n = state.held.len();
            steps.push((3, (0..n).prop_map(|held| Step::Complete { held }).boxed()));
            steps.push((
                2,
                (0..n, any::<bool>(), prop_oneof![Just(0i64), Just(5)])
                    .prop_map(|(held, permanent, delay_secs)| Step::Fail {
                        held,
                        permanent,
                        delay_secs,
                    })
                    .boxed(),
            ));
        }
        if !state.dead.is_empty() {
            let n = state.dead.len();
            steps.push((1, (0..n).prop_map(|dead| Step::Replay { dead }).boxed()));
        }
        proptest::strategy::Union::new_weighted(steps).boxed()
    }

    fn preconditions(state: &Model, step: &Step) -> bool {
        match step {
            Step::Complete { held } | Step::Fail { held, .. } => *held < state.held.len(),
            Step::Replay { dead } => *dead < state.dead.len(),
            _ => true,
        }
    }

    fn apply(mut state: Model, step: &Step) -> Model {
        match *step {
            Step::Enqueue { commit } => {
                let row = if commit {
                    Row::Live {
                        due_at: state.now,
                        seq: state.next_seq(),
                        lease_until: None,
                        attempts: 0,
                        token: 0,
                    }
                } else {
                    Row::RolledBack
                };
                state.rows.push(row);
            }
            Step::Claim { worker, limit } => {
                let picked: Vec<usize> =
                    state.claimable().into_iter().take(limit as usize).collect();
                let now = state.now;
                for i in picked {
                    if let Row::Live {
                        lease_until,
                        attempts,
                        token,
                        ..
                    } = &mut state.rows[i]
                    {
                        *lease_until = Some(now + LEASE_SECS);
                        *attempts += 1;
                        *token += 1;
                        let token = *token;
                        state.held.push(Held {
                            row: i,
                            token,
                            worker,
                        });
                    }
                }
            }
            Step::Complete { held } => {
                let lease = state.held.remove(held);
                if state.current(&lease) {
                    state.rows[lease.row] = Row::Done;
                }
            }
            Step::Fail {
                held,
                permanent,
                delay_secs,
            } => {
                let lease = state.held.remove(held);
                if state.current(&lease) {
                    if permanent {
                        state.rows[lease.row] = Row::Dead;
                        state.dead.push(DeadLetter {
                            created_at: state.now,
                            resolved: false,
                            swept: false,
                        });
                    } else {
                        let seq = state.next_seq();
                        let now = state.now;
                        if let Row::Live {
                            due_at,
                            seq: s,
                            lease_until,
                            ..
                        } = &mut state.rows[lease.row]
                        {
                            *due_at = now + delay_secs;
                            *s = seq;
                            *lease_until = None;
                        }
                    }
                }
            }
            Step::Heartbeat { worker } => {
                let now = state.now;
                let mine: Vec<Held> = state
                    .held
                    .iter()
                    .filter(|h| h.worker == worker)
                    .cloned()
                    .collect();
                for h in mine {
                    if let Some(Row::Live {
                        lease_until: Some(until),
                        token,
                        ..
                    }) = state.rows.get_mut(h.row)
                        && *token == h.token
                    {
                        *until = now + LEASE_SECS;
                    }
                }
            }
            Step::Crash { worker } => state.held.retain(|h| h.worker != worker),
            Step::AdvanceTime { secs } => state.now += secs,
            Step::Sweep => {
                let now = state.now;
                for d in &mut state.dead {
                    if now - d.created_at >= i64::from(RETENTION_DAYS) * DAY {
                        d.swept = true;
                    }
                }
            }
            Step::Replay { dead } => {
                let d = &state.dead[dead];
                if !d.resolved && !d.swept {
                    state.dead[dead].resolved = true;
                    let seq = state.next_seq();
                    state.rows.push(Row::Live {
                        due_at: state.now,
                        seq,
                        lease_until: None,
                        attempts: 0,
                        token: 0,
                    });
                }
            }
        }
        state
    }
}

/// The real thing: a database, and the ids of the model's rows and dead letters.
struct Real {
    rt: tokio::runtime::Runtime,
    pool: PgPool,
    /// A connection like a dispatcher's claim loop's (generic plans).
    claimer: sqlx::PgConnection,
    app: Uuid,
    /// Outbox ids by model row (nil for rolled-back rows).
    ids: Vec<Uuid>,
    /// Dead-letter ids by model dead letter.
    dead_ids: Vec<Uuid>,
    /// The model's held leases before the current step.
    held: Vec<Lease>,
}

/// One database for every case of this test; each case empties it first.
fn database_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            let db = outbox_testkit::TestDb::new()
                .await
                .expect("a test database");
            db.pool.close().await;
            db.url
        })
    })
}

struct RealRows;

/// An outbox row as compared: id, attempts, token, due, leased.
type RowView = (Uuid, i32, i64, bool, bool);

impl StateMachineTest for RealRows {
    type SystemUnderTest = Real;
    type Reference = RowMachine;

    fn init_test(_: &Model) -> Real {
        let url = database_url();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let (pool, claimer, app) = rt.block_on(async {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect(url)
                .await
                .expect("connect");
            sqlx::query("TRUNCATE outbox, dead_letters")
                .execute(&pool)
                .await
                .expect("truncate");
            let app = outbox_core::store::apps::ensure(&pool, "sm", "state machine")
                .await
                .expect("app")
                .id;
            let mut claimer = {
                use sqlx::Connection;
                sqlx::PgConnection::connect_with(&outbox::claim_connect_options(
                    &pool.connect_options(),
                ))
                .await
                .expect("connect the claimer")
            };
            for (setting, want) in [
                ("plan_cache_mode", "force_generic_plan"),
                ("jit", "off"),
                ("enable_seqscan", "off"),
            ] {
                let got: String = sqlx::query_scalar(&format!("SHOW {setting}"))
                    .fetch_one(&mut claimer)
                    .await
                    .expect("show");
                assert_eq!(got, want, "{setting} of a claim connection");
            }
            (pool, claimer, app)
        });
        Real {
            rt,
            pool,
            claimer,
            app,
            ids: Vec::new(),
            dead_ids: Vec::new(),
            held: Vec::new(),
        }
    }

    fn apply(mut real: Real, model: &Model, step: Step) -> Real {
        // `model` is the state after `step`; `real.held` is still the list
        // before it, which is where Complete and Fail find their lease.
        let pool = real.pool.clone();
        let app = real.app;
        match step {
            Step::Enqueue { commit } => {
                let id = real.rt.block_on(async {
                    let mut tx = pool.begin().await.expect("begin");
                    let id = enqueue(&mut tx, app, &NewEvent::new("sm", serde_json::json!({})))
                        .await
                        .expect("enqueue");
                    if commit {
                        tx.commit().await.expect("commit");
                        id
                    } else {
                        tx.rollback().await.expect("rollback");
                        Uuid::nil()
                    }
                });
                real.ids.push(id);
            }
            Step::Claim { worker, limit } => {
                let worker = format!("w{worker}");
                let lease = Duration::from_secs(LEASE_SECS as u64);
                // Odd limits claim as a claim loop does: complete nothing and
                // claim, on a connection that reuses one generic plan.
                let claimed = if limit % 2 == 1 {
                    real.rt
                        .block_on(outbox::complete_and_claim(
                            &mut real.claimer,
                            &outbox::Positions::default(),
                            &outbox_core::topics::Served::everything(),
                            &[],
                            &worker,
                            limit,
                            lease,
                        ))
                        .map(|(_, claimed)| claimed)
                } else {
                    real.rt
                        .block_on(outbox::claim(&pool, &worker, limit, lease))
                }
                .expect("claim");
                let mut got: Vec<(Uuid, i64)> =
                    claimed.iter().map(|c| (c.id, c.lease_token)).collect();
                got.sort();
                let mut want: Vec<(Uuid, i64)> = model.held[real.held.len()..]
                    .iter()
                    .map(|h| (real.ids[h.row], h.token))
                    .collect();
                want.sort();
                assert_eq!(
                    got, want,
                    "claim took other rows (or tokens) than the model"
                );
            }
            Step::Complete { held } => {
                let lease = real.held[held];
                real.rt
                    .block_on(outbox::complete(&pool, &[lease]))
                    .expect("complete");
            }
            Step::Fail {
                held,
                permanent: true,
                ..
            } => {
                let lease = real.held[held];
                let moved = real.rt.block_on(async {
                    let mut conn = pool.acquire().await.expect("conn");
                    outbox::dead_letter(
                        &mut *conn,
                        &[outbox::ToDeadLetter {
                            lease,
                            error: "permanent".into(),
                            handler: None,
                        }],
                        outbox::AttemptHistory::default(),
                    )
                    .await
                    .expect("dead-letter")
                });
                if !moved.is_empty() {
                    let id: Uuid = real
                        .rt
                        .block_on(
                            sqlx::query_scalar(
                                "SELECT id FROM dead_letters WHERE original_event_id = $1",
                            )
                            .bind(lease.id)
                            .fetch_one(&pool),
                        )
                        .expect("the new dead letter");
                    real.dead_ids.push(id);
                }
            }
            Step::Fail {
                held, delay_secs, ..
            } => {
                let lease = real.held[held];
                real.rt
                    .block_on(outbox::reschedule(
                        &pool,
                        &[outbox::Reschedule {
                            lease,
                            delay: Duration::from_secs(delay_secs as u64),
                            error: Some("transient".into()),
                            refund_attempt: false,
                        }],
                        outbox::AttemptHistory::default(),
                    ))
                    .expect("reschedule");
            }
            Step::Heartbeat { worker } => {
                let leases: Vec<Lease> = model
                    .held
                    .iter()
                    .filter(|h| h.worker == worker)
                    .map(|h| Lease {
                        id: real.ids[h.row],
                        token: h.token,
                    })
                    .collect();
                real.rt
                    .block_on(outbox::heartbeat(
                        &pool,
                        &leases,
                        Duration::from_secs(LEASE_SECS as u64),
                    ))
                    .expect("heartbeat");
            }
            Step::Crash { .. } => {}
            Step::AdvanceTime { secs } => {
                real.rt.block_on(async {
                    let shift = format!("{secs} seconds");
                    sqlx::query(
                        "UPDATE outbox SET run_at = run_at - $1::interval,
                                locked_until = locked_until - $1::interval",
                    )
                    .bind(&shift)
                    .execute(&pool)
                    .await
                    .expect("shift outbox");
                    sqlx::query("UPDATE dead_letters SET created_at = created_at - $1::interval")
                        .bind(&shift)
                        .execute(&pool)
                        .await
                        .expect("shift dead letters");
                });
            }
            Step::Sweep => {
                real.rt
                    .block_on(retention::sweep_dead_letters(&pool, RETENTION_DAYS, 1000))
                    .expect("sweep");
            }
            Step::Replay { dead } => {
                let replayed = real
                    .rt
                    .block_on(async {
                        let mut conn = pool.acquire().await?;
                        dead_letters::replay(&mut conn, app, &[real.dead_ids[dead]]).await
                    })
                    .expect("replay");
                if let Some((_, new_id)) = replayed.first() {
                    real.ids.push(*new_id);
                }
            }
        }
        real.held = model
            .held
            .iter()
            .map(|h| Lease {
                id: real.ids[h.row],
                token: h.token,
            })
            .collect();
        real
    }

    fn check_invariants(real: &Real, model: &Model) {
        let (rows, dead): (Vec<RowView>, Vec<(Uuid, bool)>) = real.rt.block_on(async {
            let rows = sqlx::query_as(
                "SELECT id, attempt_count, lease_token, run_at <= now(),
                            coalesce(locked_until >= now(), false)
                     FROM outbox ORDER BY id",
            )
            .fetch_all(&real.pool)
            .await
            .expect("outbox rows");
            let dead =
                sqlx::query_as("SELECT id, resolved_at IS NOT NULL FROM dead_letters ORDER BY id")
                    .fetch_all(&real.pool)
                    .await
                    .expect("dead letters");
            (rows, dead)
        });
        let mut want_rows: Vec<RowView> = model
            .rows
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match r {
                Row::Live {
                    due_at,
                    lease_until,
                    attempts,
                    token,
                    ..
                } => Some((
                    real.ids[i],
                    *attempts,
                    *token,
                    *due_at <= model.now,
                    lease_until.is_some_and(|u| u > model.now),
                )),
                _ => None,
            })
            .collect();
        want_rows.sort();
        assert_eq!(
            rows, want_rows,
            "outbox rows (id, attempts, token, due, leased) differ from the model"
        );
        let mut want_dead: Vec<(Uuid, bool)> = model
            .dead
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.swept)
            .map(|(i, d)| (real.dead_ids[i], d.resolved))
            .collect();
        want_dead.sort();
        assert_eq!(
            dead, want_dead,
            "dead letters (id, resolved) differ from the model"
        );
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        max_shrink_iters: 2000,
        failure_persistence: None,
        .. ProptestConfig::default()
    })]

    #[test]
    fn outbox_rows_follow_the_reference_model(sequential 1..40 => RealRows);
}
