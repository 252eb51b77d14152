//! Room for row searches: about a fifth of the pool's connections (two
//! searches at least from twelve connections), one at a time per user, so that slow searches cannot take
//! what the dispatcher's maintenance and the readiness check need, and one
//! user's searches cannot keep everyone else's waiting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::error::ApiError;

use super::rows::PAGE_BUDGET;

/// How many row searches (a page, a count) run at once, across every user
/// and app, and one at a time per user. A search for a rare payload value
/// reads the whole app for up to its budget on two connections, and the
/// admin shares its pool with the dispatcher's maintenance and the
/// readiness check: forty such searches from one viewer at once took every
/// connection, so the console answered in seconds, other requests failed and
/// `/readyz` said 503. With room for one search only, four loops of such
/// searches from one viewer of one app kept every other user of every app
/// waiting for the room until they were refused.
#[derive(Debug, Clone)]
pub struct RowSearches {
    room: Arc<Semaphore>,
    /// One search at a time per user: a user's next search waits here, not
    /// for the room.
    users: Arc<Mutex<HashMap<Uuid, UserSearches>>>,
}

/// A user's searches: the one running and those waiting behind it.
#[derive(Debug)]
struct UserSearches {
    one_at_a_time: Arc<Semaphore>,
    /// Searches of this user that run or wait; the entry goes at 0.
    entered: usize,
}

/// A user's claim on their entry, from the moment a search starts waiting
/// until it ends or gives up (or its request is dropped): the entry goes
/// with the last claim.
#[derive(Debug)]
struct UserClaim {
    user: Uuid,
    users: Arc<Mutex<HashMap<Uuid, UserSearches>>>,
}

impl Drop for UserClaim {
    fn drop(&mut self) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = users.get_mut(&self.user) {
            entry.entered = entry.entered.saturating_sub(1);
            if entry.entered == 0 {
                users.remove(&self.user);
            }
        }
    }
}

/// Room for one search, held while it runs.
#[derive(Debug)]
pub(super) struct SearchRoom {
    _room: OwnedSemaphorePermit,
    _own: OwnedSemaphorePermit,
    // Dropped last: the permits are given back before the entry may go.
    _claim: UserClaim,
}

impl RowSearches {
    /// Room for searches on about a fifth of `pool`'s connections (each
    /// search runs on two at once).
    pub fn for_pool(pool: &sqlx::PgPool) -> Self {
        Self::new(Self::room_for(pool.options().get_max_connections()))
    }

    /// How many searches a pool of `connections` has room for: two at least
    /// when it has twelve connections or more, so that a user searching
    /// without pause leaves room for the others.
    fn room_for(connections: u32) -> usize {
        let floor = if connections >= 12 { 2 } else { 1 };
        (connections.saturating_add(5) / 10).max(floor) as usize
    }

    /// Room for `searches` at once.
    pub fn new(searches: usize) -> Self {
        Self {
            room: Arc::new(Semaphore::new(searches)),
            users: Arc::default(),
        }
    }

    /// Waits for `user`'s previous search to end and for room, up to a
    /// page's budget in all; then refuses with 503 and `Retry-After`, the
    /// pool untouched.
    pub(super) async fn enter(&self, user: Uuid) -> Result<SearchRoom, ApiError> {
        let busy = || {
            ApiError::Unavailable(
                "too many row searches are running at once; try again in a moment, or narrow the filter (a topic or a key)".into(),
                Duration::from_secs(1),
            )
        };
        let (claim, own) = {
            let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
            let entry = users.entry(user).or_insert_with(|| UserSearches {
                one_at_a_time: Arc::new(Semaphore::new(1)),
                entered: 0,
            });
            entry.entered += 1;
            let claim = UserClaim {
                user,
                users: self.users.clone(),
            };
            (claim, entry.one_at_a_time.clone())
        };
        let permits = async {
            let own = own.acquire_owned().await.ok()?;
            let room = self.room.clone().acquire_owned().await.ok()?;
            Some((own, room))
        };
        match tokio::time::timeout(PAGE_BUDGET, permits).await {
            Ok(Some((own, room))) => Ok(SearchRoom {
                _room: room,
                _own: own,
                _claim: claim,
            }),
            // The claim goes with this answer.
            _ => Err(busy()),
        }
    }

    /// How many users have a search running or waiting (for tests).
    #[cfg(test)]
    fn users_tracked(&self) -> usize {
        self.users.lock().map_or(0, |u| u.len())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use uuid::Uuid;

    use super::RowSearches;

    #[test]
    fn searches_get_about_a_fifth_of_the_pool_two_connections_each() {
        assert_eq!(RowSearches::room_for(2), 1, "at least one");
        assert_eq!(RowSearches::room_for(11), 1, "a fifth");
        assert_eq!(RowSearches::room_for(12), 2, "two once the pool has room");
        assert_eq!(RowSearches::room_for(15), 2, "the default pool");
        assert_eq!(RowSearches::room_for(50), 5);
    }

    #[tokio::test]
    async fn one_user_searches_one_at_a_time_and_leaves_room_for_others() {
        let searches = RowSearches::new(2);
        let (viewer, admin) = (Uuid::now_v7(), Uuid::now_v7());
        let first = searches.enter(viewer).await.map_err(|e| format!("{e:?}"));
        assert!(first.is_ok());
        // The viewer's second search waits for the first, not for the room...
        let second = tokio::spawn({
            let searches = searches.clone();
            async move { searches.enter(viewer).await.is_ok() }
        });
        tokio::task::yield_now().await;
        // ...so the admin gets the room that is left at once.
        let admin_room = tokio::time::timeout(Duration::from_millis(500), searches.enter(admin))
            .await
            .map(|r| r.is_ok());
        assert_eq!(admin_room, Ok(true));
        drop(first);
        assert!(
            second.await.unwrap_or(false),
            "the viewer's next search ran"
        );
        // Rooms given back leave no entry behind.
        assert_eq!(searches.users_tracked(), 0);
    }

    #[tokio::test]
    async fn a_search_that_gives_up_or_is_dropped_leaves_no_entry_behind() {
        let searches = RowSearches::new(1);
        let (holder, waiter) = (Uuid::now_v7(), Uuid::now_v7());
        let running = searches.enter(holder).await.map_err(|e| format!("{e:?}"));
        assert!(running.is_ok());
        // A waiter whose request goes away while it waits for the room.
        let dropped = tokio::time::timeout(Duration::from_millis(50), searches.enter(waiter)).await;
        assert!(dropped.is_err(), "it waited");
        // The holder's second search gives up behind the first (after a
        // page's budget), then the first ends.
        let again = searches.enter(holder).await;
        assert!(again.is_err());
        drop(running);
        assert_eq!(searches.users_tracked(), 0);
    }
}
