//! Black-box tests of the `outboxd` binary against a real PostgreSQL.

mod accounts;
mod cli;
mod config;
mod dead_letters;
mod gc;
mod http;
mod logs;
mod nats;
mod nats_cluster;
mod pgbouncer;
mod run;
mod support;
mod triggers;
