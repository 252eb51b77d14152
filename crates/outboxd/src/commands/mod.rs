//! Operator commands, one file per noun. Each takes the settings and its
//! parsed arguments and prints what it did; the actions themselves live in
//! the library crates, shared with the admin API and the dashboard.

pub mod accounts;
pub mod apps;
pub mod consume;
pub mod dead_letters;
pub mod enqueue;
pub mod gc;
pub mod stream;
pub mod topics;
pub mod triggers;
pub mod webhooks;

pub use outbox_core::model::ellipsize;
