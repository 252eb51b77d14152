//! `outboxd` as a library: what the `outboxd` binary, the demo, the chaos
//! worker and the benchmark all start.
//!
//! - [`config`]: layered settings (`config/default.toml`, an environment
//!   overlay, `OUTBOXD_*` variables), each section checked next to the
//!   component it configures.
//! - [`db`]: the pool, sized from the one connection budget.
//! - [`daemon`]: [`daemon::run`] — dispatcher, HTTP endpoints, relay and
//!   maintenance until shutdown.
//! - [`http`]: health, readiness and metrics endpoints.
//! - [`demo`]: the demo workload.
//! - [`logging`]: the tracing subscriber and the panic hook.
//! - [`launch`]: what every outboxd binary does before its command runs.

pub mod config;
pub mod daemon;
pub mod db;
pub mod demo;
pub mod http;
pub mod launch;
pub mod logging;
pub mod stream_reads;
