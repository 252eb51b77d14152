//! Built-in targets the daemon offers besides in-process handlers.

pub mod webhook;

pub use webhook::Webhook;
