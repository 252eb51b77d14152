//! Background services besides the dispatcher. Each has the same shape: a
//! documented config, a `run_once()` that returns what it did (tests step it
//! instead of sleeping), and a `run()` loop that only handles timing and
//! shutdown.

pub mod leader;
pub mod replayer;
pub mod sampler;
pub mod scheduler;
pub mod sweeper;

pub use replayer::Replayer;
pub use sampler::Sampler;
pub use scheduler::Scheduler;
pub use sweeper::Sweeper;

/// The loop every periodic service shares: run `pass` every `interval` until
/// `shutdown`, skipping passes while `leader` (when given) says another
/// process leads, and logging failures as `what failed`.
pub(crate) async fn every<F, Fut, T>(
    interval: std::time::Duration,
    leader: Option<tokio::sync::watch::Receiver<bool>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
    what: &'static str,
    mut pass: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::Error>>,
{
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = tick.tick() => {}
        }
        if leader.as_ref().is_some_and(|l| !*l.borrow()) {
            continue;
        }
        if let Err(err) = pass().await {
            tracing::warn!(error = %err, "{what} failed");
        }
    }
}
