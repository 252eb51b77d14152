//! LISTEN for the dispatcher's wake-ups and the synchronous callers'
//! answers: one kind of listener, so the callers' reconnect loops deal
//! with one error type and one notion of "missed notifications".

use sqlx::PgPool;
use sqlx::postgres::PgListener;

use crate::Error;

/// A connection listening on some channels.
pub struct Listener(PgListener);

/// What a wait on a [`Listener`] brought.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// A notification with this payload.
    Notification(String),
    /// The connection was lost and replaced (LISTEN is in force again);
    /// notifications sent meanwhile are gone, so look for yourself.
    Reconnected,
}

impl Listener {
    /// Connects and listens on `channels`.
    pub async fn connect(pool: &PgPool, channels: &[&str]) -> Result<Self, Error> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen_all(channels.iter().copied()).await?;
        Ok(Self(listener))
    }

    /// Waits for the next notification (or a reconnection).
    pub async fn next(&mut self) -> Result<Heard, Error> {
        Ok(match self.0.try_recv().await? {
            Some(n) => Heard::Notification(n.payload().to_owned()),
            None => Heard::Reconnected,
        })
    }
}

/// How long to wait before reconnecting after `failures` failures in a row:
/// 100 ms, doubling, at most 6.4 s.
pub fn reconnect_pause(failures: u32) -> std::time::Duration {
    std::time::Duration::from_millis(100u64 << failures.min(6))
}
