//! The heartbeat: extends the leases of rows whose handler is still running,
//! so a long handler keeps its row while a dead worker's rows come back
//! after one lease.

use std::sync::Arc;

use outbox_core::store::outbox as store;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::dispatcher::Shared;

impl Shared {
    /// Keeps the leases of running rows fresh.
    pub(crate) async fn heartbeat(self: Arc<Self>, stop: CancellationToken) {
        if self.config.heartbeat_interval.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval(self.config.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let leases = self.running_snapshot();
            if leases.is_empty() {
                continue;
            }
            match store::heartbeat(&self.pool, &leases, self.config.lease).await {
                Ok(kept) if kept.len() < leases.len() => {
                    // Either finished in the meantime or taken over; the
                    // completion of a taken-over row is fenced.
                    debug!(
                        lost = leases.len() - kept.len(),
                        "some leases were not extended"
                    );
                }
                Ok(_) => {}
                Err(err) => warn!(error = %err, "heartbeat failed"),
            }
        }
    }
}
