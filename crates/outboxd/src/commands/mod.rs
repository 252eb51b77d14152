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

pub use outbox_core::text::{ellipsize, printable};

/// Shortens `text` to at most `max` characters by cutting out its middle:
/// for names that differ at their ends (webhook URLs of one host); the
/// text is made [`printable`] first.
pub fn elide_middle(text: &str, max: usize) -> String {
    let text = printable(text);
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= max {
        return text;
    }
    let keep = max.saturating_sub(1);
    let head = keep.div_ceil(2);
    let tail = keep - head;
    let mut out: String = chars[..head].iter().collect();
    out.push('…');
    out.extend(&chars[chars.len() - tail..]);
    out
}

#[cfg(test)]
mod tests {
    use super::elide_middle;

    #[test]
    fn the_middle_goes_and_the_ends_stay() {
        assert_eq!(elide_middle("short", 10), "short");
        let a = elide_middle(
            "webhook:https://hooks.example.com/a/very/long/path/number/one?x=1",
            30,
        );
        let b = elide_middle(
            "webhook:https://hooks.example.com/a/very/long/path/number/two?x=1",
            30,
        );
        assert_eq!(a.chars().count(), 30);
        assert_ne!(a, b, "told apart by their ends");
        assert!(
            a.starts_with("webhook:https:/") && a.ends_with("one?x=1"),
            "{a}"
        );
        assert_eq!(elide_middle("a\u{1b}b", 10), "a\u{FFFD}b");
    }
}
