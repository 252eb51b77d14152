//! Text for a terminal or a table cell: stored text made printable, and
//! shortened to a column's width.

/// `text` fit for a terminal: runs of whitespace become one space, and
/// control and invisible characters become U+FFFD (a handler's error may
/// echo its input, and an escape sequence in it would drive the terminal
/// that lists it).
pub fn printable(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .map(|c| {
            if crate::topics::is_unprintable(c) {
                char::REPLACEMENT_CHARACTER
            } else {
                c
            }
        })
        .collect()
}

/// Shortens [`printable`] `text` to at most `max` characters at a word
/// boundary, marking the cut with an ellipsis (never half a word, unless
/// one word is longer than the whole width).
pub fn ellipsize(text: &str, max: usize) -> String {
    let text = printable(text);
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

/// `message` with the field names it uses before its first quote given
/// other names (`names` as (field, name), in order: a longer field that holds
/// a shorter one goes first). After a quote may come the user's own text (a
/// topic), which keeps its words: the API's messages name its fields, a form
/// or a command line names them otherwise.
pub fn rename_fields(message: &str, names: &[(&str, &str)]) -> String {
    let (head, tail) = message.split_at(message.find('"').unwrap_or(message.len()));
    let head = names.iter().fold(head.to_owned(), |head, (field, name)| {
        head.replace(field, name)
    });
    format!("{head}{tail}")
}

#[cfg(test)]
mod tests {
    use super::{ellipsize, rename_fields};

    #[test]
    fn field_names_are_renamed_before_the_users_own_text_only() {
        let names = [
            ("max_running_per_key", "--per-key"),
            ("max_running", "--max"),
        ];
        assert_eq!(
            rename_fields("max_running_per_key: is 0; topic \"max_running\"", &names),
            "--per-key: is 0; topic \"max_running\""
        );
        assert_eq!(rename_fields("give max_running", &names), "give --max");
    }

    #[test]
    fn ellipsize_cuts_between_words() {
        assert_eq!(ellipsize("short", 10), "short");
        assert_eq!(
            ellipsize("connection refused by upstream server", 20),
            "connection refused…"
        );
        assert!(ellipsize(&"x".repeat(50), 10).chars().count() <= 10);
        assert_eq!(ellipsize("a\nb", 10), "a b");
        // An escape sequence, a bell, a direction override: none reaches a terminal.
        assert_eq!(
            ellipsize("\u{1b}]0;PWNED\u{7}\u{1b}[2Jx\u{202E}y", 40),
            "\u{FFFD}]0;PWNED\u{FFFD}\u{FFFD}[2Jx\u{FFFD}y"
        );
    }
}
