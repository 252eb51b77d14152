//! The scenarios, one function each, in the order `bench::run` calls them;
//! each takes the shared `Bench` and adds its figures (and series) to it.
//!
//! - `drain`: the raw ceiling (always), and outboxd draining the same backlog.
//! - `history`: a backlog failing once per row, attempt history on and off.
//! - `enqueue`: single-row and batch enqueue against plain INSERTs.
//! - `latency`: commit → handler start, idle and under load.
//! - `steady`, `bloat`: a fixed offered load, then with a snapshot held open.
//! - `phases`: a steady load through phases of trouble, each with a recovery.
//! - `backlog`: a small and a large backlog.
//! - `paused`: claims past a large backlog of a paused topic.
//! - `relay`: relay to JetStream and the consumer runtime (needs NATS_URL).
//! - `auth`: what authenticating an API request costs.
//! - `scale_out`: several dispatcher processes on one database.
//! - `console`: the console's pages with a large outbox and many dead letters.

mod auth;
mod backlog;
mod console;
mod drain;
mod enqueue;
mod history;
mod latency;
mod paused;
mod phases;
mod relay;
mod scale_out;
mod steady;

pub use self::auth::auth;
pub use self::backlog::backlog;
pub use self::console::console;
pub use self::drain::drain;
pub use self::enqueue::enqueue;
pub use self::history::history;
pub use self::latency::latency;
pub use self::paused::paused;
pub use self::phases::phases;
pub use self::relay::relay;
pub use self::scale_out::scale_out;
pub use self::steady::{bloat, steady};
