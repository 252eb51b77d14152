//! Every SQL statement outboxd runs lives in this module. The dispatcher, the
//! admin API and the CLI call these typed functions.

pub mod apps;
pub mod dead_letters;
pub mod dedupe;
pub mod invocations;
pub mod kv;
pub mod login_throttle;
pub mod outbox;
pub mod principals;
pub mod retention;
pub mod sessions;
pub mod triggers;
pub mod wake;
