//! Routing subjects to handlers.

use std::sync::Arc;

use super::{ConsumerRuntime, MessageHandler};

impl ConsumerRuntime {
    /// Routes subjects matching `pattern` (NATS wildcards `*` and `>`) to `handler`.
    /// The first matching route wins.
    pub fn route(mut self, pattern: impl Into<String>, handler: impl MessageHandler) -> Self {
        Arc::make_mut(&mut self.routes).push((pattern.into(), Arc::new(handler)));
        self
    }
}

/// NATS subject matching: `*` matches one token, `>` the rest (one or more).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(subject_matches(
            "tenant.*.order.created",
            "tenant.shop.order.created"
        ));
        assert!(subject_matches("tenant.>", "tenant.shop.order.created"));
        assert!(!subject_matches("tenant.>", "tenant"));
        assert!(!subject_matches(
            "tenant.*.order",
            "tenant.shop.order.created"
        ));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.c"));
    }
}
