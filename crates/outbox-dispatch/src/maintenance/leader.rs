//! Leadership for maintenance that should run on one process at a time (the
//! GC schedule, the cron scheduler): a session-level PostgreSQL advisory lock
//! held on a dedicated connection.
//!
//! The leader is whoever holds the lock. When the leader dies, its session
//! ends and the server releases the lock; the other candidates retry every
//! `retry` and one takes over, so hand-over takes at most about `retry` after
//! the server notices the dead connection (at once for a killed process; TCP
//! keepalive or `idle_session_timeout` bounds it for a cut-off network).
//! The services stay correct without a leader too (`SKIP LOCKED` and
//! idempotency keys); leadership keeps them from doing the work twice.

use std::time::Duration;

use outbox_core::store::leader;
use sqlx::{Connection, PgPool};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The advisory lock key of outboxd's maintenance leader ("outboxd" in ASCII).
pub const LEADER_LOCK_KEY: i64 = 0x006f_7574_626f_7864;

/// Campaigns for leadership until `stop`; the returned receiver says whether
/// this process leads right now.
pub fn campaign(
    pool: PgPool,
    retry: Duration,
    stop: CancellationToken,
) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        loop {
            let held = async {
                let mut conn = pool.acquire().await?.detach();
                if !leader::try_lead(&mut conn, LEADER_LOCK_KEY).await? {
                    let _ = conn.close().await;
                    return Ok::<bool, crate::Error>(false);
                }
                info!("elected maintenance leader");
                metrics::gauge!("outboxd_leader").set(1.0);
                let _ = tx.send(true);
                // Hold the session; a failed ping means the lock is gone with it.
                loop {
                    tokio::select! {
                        () = stop.cancelled() => {
                            let _ = conn.close().await;
                            return Ok(true);
                        }
                        () = tokio::time::sleep(retry) => {}
                    }
                    leader::ping(&mut conn).await?;
                }
            }
            .await;
            if let Err(err) = held {
                warn!(error = %err, "leadership connection lost");
            }
            if *tx.borrow() {
                info!("no longer the maintenance leader");
            }
            metrics::gauge!("outboxd_leader").set(0.0);
            let _ = tx.send(false);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(retry) => {}
            }
        }
    });
    (rx, task)
}
