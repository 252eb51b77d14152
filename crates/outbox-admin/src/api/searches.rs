//! Room for row searches: a fifth of the pool's connections, shared by
//! every user, so that slow searches cannot take what the dispatcher's
//! maintenance and the readiness check need.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

use super::rows::PAGE_BUDGET;

/// How many row searches (a page, a count) run at once, across every user
/// and app. A search for a rare payload value reads the whole app for up to
/// its budget on two connections, and the admin shares its pool with the
/// dispatcher's maintenance and the readiness check: forty such searches
/// from one viewer at once took every connection, so the console answered
/// in seconds, other requests failed and `/readyz` said 503.
#[derive(Debug, Clone)]
pub struct RowSearches(Arc<Semaphore>);

impl RowSearches {
    /// Room for searches on a fifth of `pool`'s connections (each search
    /// runs on two at once), at least one search.
    pub fn for_pool(pool: &sqlx::PgPool) -> Self {
        Self::new(Self::room_for(pool.options().get_max_connections()))
    }

    /// How many searches a pool of `connections` has room for.
    fn room_for(connections: u32) -> usize {
        (connections / 10).max(1) as usize
    }

    /// Room for `searches` at once.
    pub fn new(searches: usize) -> Self {
        Self(Arc::new(Semaphore::new(searches)))
    }

    /// Waits for room, up to a page's budget; then refuses with 503 and
    /// `Retry-After`, the pool untouched.
    pub(super) async fn enter(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        let busy = || {
            ApiError::Unavailable(
                "too many row searches are running at once; try again in a moment, or narrow the filter (a topic or a key)".into(),
                Duration::from_secs(1),
            )
        };
        tokio::time::timeout(PAGE_BUDGET, self.0.clone().acquire_owned())
            .await
            .map_err(|_| busy())?
            .map_err(|_| busy())
    }
}

#[cfg(test)]
mod tests {
    use super::RowSearches;

    #[test]
    fn searches_get_a_fifth_of_the_pool_two_connections_each() {
        assert_eq!(RowSearches::room_for(2), 1, "at least one");
        assert_eq!(RowSearches::room_for(10), 1);
        assert_eq!(RowSearches::room_for(50), 5);
    }
}
