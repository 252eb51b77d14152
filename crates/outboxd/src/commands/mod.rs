//! Operator commands, one file per noun. Each takes the settings and its
//! parsed arguments and prints what it did; the actions themselves live in
//! the library crates, shared with the admin API and the dashboard.

pub mod accounts;
pub mod apps;
pub mod consume;
pub mod dead_letters;
pub mod enqueue;
pub mod gc;
pub mod triggers;

/// Shortens `text` to at most `max` characters at a word boundary, marking
/// the cut with an ellipsis (never half a word, unless one word is longer
/// than the whole width).
pub fn ellipsize(text: &str, max: usize) -> String {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.chars().count() <= max {
        return text;
    }
    let budget = max.saturating_sub(1);
    let cut: String = text.chars().take(budget).collect();
    let at_word = match cut.rfind(' ') {
        Some(i) if i > budget / 2 => &cut[..i],
        _ => cut.as_str(),
    };
    format!("{}…", at_word.trim_end())
}

#[cfg(test)]
mod tests {
    use super::ellipsize;

    #[test]
    fn ellipsize_cuts_between_words() {
        assert_eq!(ellipsize("short", 10), "short");
        assert_eq!(
            ellipsize("connection refused by upstream server", 20),
            "connection refused…"
        );
        assert!(ellipsize(&"x".repeat(50), 10).chars().count() <= 10);
        assert_eq!(ellipsize("a\nb", 10), "a b");
    }
}
