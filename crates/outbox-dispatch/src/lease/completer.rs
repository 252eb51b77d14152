//! The completer: writes outcomes in batches. Failures arrive on a channel;
//! successes wait in [`Shared`]'s `succeeded` list, where the next claim
//! statement of a busy claim loop deletes them in the same commit, and the
//! completer writes whatever no claim loop picked up within
//! [`SUCCESS_LINGER`].

use std::sync::Arc;
use std::time::Duration;

use outbox_core::store::listen::reconnect_pause;
use tokio::sync::mpsc;
use tracing::{error, warn};

use crate::dispatcher::{BatchReport, Shared};
use crate::outcome::Finished;

/// Outcomes of one claimed batch arrive within moments of each other: the
/// completer waits this long for more so they share one statement (one commit).
const LINGER: Duration = Duration::from_millis(1);

/// A busy claim loop deletes successes with its next claim; the completer
/// gives it this long before writing them with a statement of their own.
const SUCCESS_LINGER: Duration = Duration::from_millis(5);

/// Most outcomes taken off the channel at once.
const RECEIVE_AT_MOST: usize = 4096;

/// Attempts at writing one batch of outcomes before giving up (the rows then
/// run again when their leases expire).
const WRITE_TRIES: u32 = 5;

impl Shared {
    /// Writes outcomes as they arrive, batching whatever is waiting: failures
    /// from the channel, and successes no claim loop picked up within a moment.
    pub(crate) async fn complete(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Finished>) {
        let mut batch = Vec::new();
        let target = self.config.batch_size as usize;
        loop {
            tokio::select! {
                received = rx.recv_many(&mut batch, RECEIVE_AT_MOST) => {
                    if received == 0 {
                        break;
                    }
                    let deadline = tokio::time::Instant::now() + LINGER;
                    while batch.len() < target {
                        match tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, RECEIVE_AT_MOST)).await {
                            Ok(n) if n > 0 => {}
                            _ => break,
                        }
                    }
                }
                () = self.succeeded_ready.notified() => {
                    tokio::time::sleep(SUCCESS_LINGER).await;
                    batch.extend(self.take_succeeded());
                }
            }
            self.flush_with_retries(&batch).await;
            // Dropping the batch returns its permits to the claim loops.
            batch.clear();
        }
        batch.extend(self.take_succeeded());
        self.flush_with_retries(&batch).await;
    }

    async fn flush_with_retries(&self, batch: &[Finished]) {
        if batch.is_empty() {
            return;
        }
        let mut tries = 0u32;
        loop {
            match self.flush(batch).await {
                Ok(report) => {
                    self.add_totals(BatchReport {
                        claimed: batch.len(),
                        ..report
                    });
                    return;
                }
                Err(err) if tries < WRITE_TRIES => {
                    tries += 1;
                    let pause = reconnect_pause(tries);
                    warn!(error = %err, rows = batch.len(), ?pause, "writing outcomes failed; retrying");
                    tokio::time::sleep(pause).await;
                }
                Err(err) => {
                    error!(error = %err, rows = batch.len(), "giving up writing outcomes; the rows run again when their leases expire");
                    return;
                }
            }
        }
    }
}
