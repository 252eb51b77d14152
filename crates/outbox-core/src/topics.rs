//! Which topics a dispatcher serves: the topics of its handlers, the
//! prefixes of its prefix handlers, and NATS-style patterns for a fallback
//! (the relay). A claim takes only rows whose topic its process serves, so
//! several services with different handlers can share one database.
//!
//! Patterns use NATS subject wildcards over `.`-separated tokens: `*`
//! matches exactly one token, `>` (last token only) matches one or more.
//! `orders.*` matches `orders.created` but not `orders.eu.created`;
//! `billing.>` matches both `billing.paid` and `billing.eu.paid`; `>` alone
//! matches every topic.
//!
//! It also holds the rules for a topic's name: what a filter, an action
//! (pause, limit, cancel by topic) and a new row accept.

use crate::Error;

/// The prefix of a topic (or trigger target) that outboxd POSTs to the URL
/// after it: `webhook:https://example.com/hook`.
pub const WEBHOOK_PREFIX: &str = "webhook:";

/// `topic` as logs and metric labels show it. A webhook topic keeps its
/// scheme, host and port, and `/…` for whatever followed: its user, path
/// and query often hold credentials (`user:password@`, a token in the path
/// or in `?token=`), and logs and `/metrics` are read by more people than
/// the app's admins who may see the topic itself.
pub fn shown(topic: &str) -> std::borrow::Cow<'_, str> {
    let Some(url) = topic.strip_prefix(WEBHOOK_PREFIX) else {
        return std::borrow::Cow::Borrowed(topic);
    };
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let separator = if scheme.is_empty() { "" } else { "://" };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    // A host is letters, digits, dots, hyphens, an optional port and IPv6
    // brackets; anything else (an '@' further on: a password holding a '/')
    // may be part of a credential, and only the scheme is shown.
    let plain_host = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]_".contains(c))
        && !rest[end..].contains('@');
    if !plain_host {
        return std::borrow::Cow::Owned(format!("{WEBHOOK_PREFIX}{scheme}{separator}…"));
    }
    let more = if rest[end..].is_empty() || &rest[end..] == "/" {
        ""
    } else {
        "/…"
    };
    std::borrow::Cow::Owned(format!("{WEBHOOK_PREFIX}{scheme}{separator}{host}{more}"))
}

/// The longest pattern accepted, as the longest topic (characters).
const MAX_PATTERN_LEN: usize = 255;

/// A validated NATS-style topic pattern (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicPattern(String);

impl TopicPattern {
    /// Parses `pattern`, refusing what could never match as meant: an empty
    /// pattern or token, whitespace, a wildcard inside a token, or `>`
    /// anywhere but as the last token.
    pub fn parse(pattern: &str) -> Result<Self, Error> {
        let refuse = |why: &str| {
            Error::invalid(
                "topic pattern",
                format!(
                    "{pattern:?}: {why} (tokens separated by '.', '*' for one token, '>' as the last token for the rest)"
                ),
            )
        };
        if pattern.is_empty() || pattern.chars().count() > MAX_PATTERN_LEN {
            return Err(refuse("must be 1 to 255 characters"));
        }
        if pattern.contains(char::is_whitespace) {
            return Err(refuse("must not contain whitespace"));
        }
        let tokens: Vec<&str> = pattern.split('.').collect();
        for (i, token) in tokens.iter().enumerate() {
            if token.is_empty() {
                return Err(refuse("has an empty token"));
            }
            if token.len() > 1 && token.contains(['*', '>']) {
                return Err(refuse("a wildcard must be a whole token"));
            }
            if *token == ">" && i + 1 != tokens.len() {
                return Err(refuse("'>' may only be the last token"));
            }
        }
        Ok(Self(pattern.to_owned()))
    }

    /// `>`: every topic.
    pub fn everything() -> Self {
        Self(">".to_owned())
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the pattern matches every topic (`>`).
    pub fn is_everything(&self) -> bool {
        self.0 == ">"
    }

    /// Whether `topic` matches.
    pub fn matches(&self, topic: &str) -> bool {
        let mut topic_tokens = topic.split('.');
        for token in self.0.split('.') {
            match token {
                ">" => return topic_tokens.next().is_some_and(|t| !t.is_empty()),
                "*" => {
                    if topic_tokens.next().is_none_or(str::is_empty) {
                        return false;
                    }
                }
                literal => {
                    if topic_tokens.next() != Some(literal) {
                        return false;
                    }
                }
            }
        }
        topic_tokens.next().is_none()
    }

    /// The same match as a PostgreSQL regular expression (`topic ~ regex`).
    pub fn to_regex(&self) -> String {
        let body: Vec<String> = self
            .0
            .split('.')
            .map(|token| match token {
                "*" => "[^.]+".to_owned(),
                ">" => "[^.].*".to_owned(),
                literal => escape_regex(literal),
            })
            .collect();
        format!("^{}$", body.join("\\."))
    }
}

impl std::fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A regular expression matching every topic that starts with `prefix`.
pub fn prefix_regex(prefix: &str) -> String {
    format!("^{}", escape_regex(prefix))
}

fn escape_regex(literal: &str) -> String {
    let mut out = String::with_capacity(literal.len());
    for c in literal.chars() {
        if "\\.^$|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// What a claim takes, as the claim statements bind it: every topic, or the
/// exact topics plus the topics matching the regular expressions except the
/// excluded ones (the exact topics of other live processes, which a
/// fallback leaves to them); in either case, no topic that is paused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Served {
    /// Every topic (a fallback for `>` with nothing excluded).
    pub all: bool,
    /// Topics served by name.
    pub exact: Vec<String>,
    /// PostgreSQL regular expressions of prefix handlers and patterns.
    pub regexes: Vec<String>,
    /// Topics a regular expression does not take.
    pub excluded: Vec<String>,
    /// Paused topics, as `store::pauses::pause_key` names them (app id,
    /// `/`, topic): not taken whatever the rest says.
    pub paused: Vec<String>,
}

impl Served {
    /// Serves every topic (tests, one-off runs, the benchmark).
    pub fn everything() -> Self {
        Self {
            all: true,
            ..Self::default()
        }
    }
}

/// Checks a topic a filter names: 1 to 255 characters, no NUL.
pub fn validate_topic(topic: &str) -> Result<(), Error> {
    crate::model::check_key("topic", Some(topic))
}

/// Checks a topic an action names as a whole (a cancel by topic):
/// [`validate_topic`]'s rules, and no `*` or `>` token, which would be taken
/// literally, not as a pattern. Rows a producer wrote with such a topic
/// through plain SQL stay reachable through filters.
pub fn validate_named_topic(topic: &str) -> Result<(), Error> {
    validate_topic(topic)?;
    if topic.split('.').any(|token| token == "*" || token == ">") {
        return Err(Error::invalid(
            "topic",
            format!(
                "{topic:?} is a pattern: name one topic here (the wildcards * and > are for patterns such as nats.relay_topics)"
            ),
        ));
    }
    Ok(())
}

/// Checks a topic a pause or a limit stores: [`validate_named_topic`]'s
/// rules and no control or invisible characters (it is shown in the
/// console and the CLI), but not [`validate_new_topic`]'s subject rules, so
/// that the rows of a topic written before them can still be paused and
/// limited.
pub fn validate_shown_topic(topic: &str) -> Result<(), Error> {
    validate_named_topic(topic)?;
    if topic.trim().is_empty() {
        // A pause of " " (a no-break space) was taken and shown as nothing.
        return Err(Error::invalid("topic", "must not be blank"));
    }
    // A topic is shown in logs, metrics, the console and the CLI: a line
    // break could forge a log line, a bidirectional control reorder what an
    // operator reads, an invisible character make two topics look alike.
    check_printable("topic", topic)
}

/// Refuses `text` of `field` when it holds a [`first_unprintable`]
/// character: text shown in the console and the CLI, where an escape
/// sequence would reach an operator's terminal.
pub fn check_printable(field: &'static str, text: &str) -> Result<(), Error> {
    match first_unprintable(text) {
        Some(c) => Err(Error::invalid(
            field,
            format!(
                "must not contain {} characters (found U+{:04X})",
                if is_invisible(c) {
                    "invisible"
                } else {
                    "control"
                },
                u32::from(c)
            ),
        )),
        None => Ok(()),
    }
}

/// Refuses a topic (or target) spelt `WEBHOOK:…` or `Webhook:…`, where the
/// API and the triggers take new ones: served by nothing today, it would
/// become a webhook that skipped the checks of one (and the admin-only rule
/// for writing them) if a prefix were ever matched without case. Not part
/// of [`validate_new_topic`], so that rows and triggers written before keep
/// working.
pub fn check_webhook_prefix_case(field: &'static str, topic: &str) -> Result<(), Error> {
    if !topic.starts_with(WEBHOOK_PREFIX)
        && topic
            .get(..WEBHOOK_PREFIX.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(WEBHOOK_PREFIX))
    {
        return Err(Error::invalid(
            field,
            format!("{topic:?}: a webhook topic starts with {WEBHOOK_PREFIX:?}, in lower case"),
        ));
    }
    Ok(())
}

/// Checks the topic of a row about to be written: [`validate_shown_topic`]'s
/// rules and (but for a webhook's URL) what a NATS subject's tokens need: no
/// whitespace, no empty name, no `*` or `>` within a name. A row the relay
/// takes becomes subject tokens (under the default subject template); a
/// topic without them was accepted and its row then dead-lettered on its
/// first relay, or never claimed by a `>` pattern, so one naming rule holds
/// for every topic, relayed or not.
pub fn validate_new_topic(topic: &str) -> Result<(), Error> {
    validate_shown_topic(topic)?;
    if let Some(url) = topic.strip_prefix(WEBHOOK_PREFIX) {
        // The shape a POST needs, checked here: `webhook:not-a-url` was
        // accepted and dead-lettered on its first attempt.
        let host = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"));
        if host.is_none_or(|h| h.is_empty() || h.starts_with('/'))
            || url.chars().any(char::is_whitespace)
        {
            return Err(Error::invalid(
                "topic",
                format!(
                    "{topic:?}: a webhook topic is webhook:http(s)://host/path, without spaces"
                ),
            ));
        }
    } else {
        if let Some(c) = topic.chars().find(|c| c.is_whitespace()) {
            return Err(Error::invalid(
                "topic",
                format!(
                    "{topic:?} holds whitespace (U+{:04X}): a topic is dot-separated names such as orders.created",
                    u32::from(c)
                ),
            ));
        }
        if topic.split('.').any(str::is_empty) {
            return Err(Error::invalid(
                "topic",
                format!(
                    "{topic:?} has an empty name (a dot at its start or end, or two in a row): a topic is dot-separated names such as orders.created"
                ),
            ));
        }
        if let Some(c) = topic.chars().find(|c| matches!(c, '*' | '>')) {
            return Err(Error::invalid(
                "topic",
                format!(
                    "{topic:?} holds {c:?}, a wildcard of patterns such as nats.relay_topics; a topic's names hold no '*' or '>'"
                ),
            ));
        }
    }
    Ok(())
}

/// The first control character of `text`, or the first that changes the
/// direction of the text around it, or an invisible one (a zero-width space
/// or joiner, a byte-order mark) that makes two names look alike: what a
/// name shown in logs, the console and the CLI must not contain.
pub fn first_unprintable(text: &str) -> Option<char> {
    text.chars().find(|c| is_unprintable(*c))
}

/// Whether `c` is a character [`first_unprintable`] finds.
pub fn is_unprintable(c: char) -> bool {
    c.is_control() || is_bidi_control(c) || is_invisible(c)
}

/// Characters that take no room: `a` U+200B `b` looks like `ab`.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}')
}

/// The Unicode characters that change the direction of the text around them.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_webhook_topic_is_shown_without_what_may_be_a_credential() {
        for (topic, shown_as) in [
            ("orders.created", "orders.created"),
            (
                "webhook:https://hooks.example.com",
                "webhook:https://hooks.example.com",
            ),
            ("webhook:http://127.0.0.1:9/", "webhook:http://127.0.0.1:9"),
            (
                "webhook:https://user:s3cret@hooks.example.com:8443/T0/B0/XXXX?token=t",
                "webhook:https://hooks.example.com:8443/…",
            ),
            (
                "webhook:http://[::1]:80?token=t",
                "webhook:http://[::1]:80/…",
            ),
            ("webhook:a@b/c", "webhook:b/…"),
            (
                "webhook:https://bot:ab/cd+ef@hooks.example.com/x",
                "webhook:https://…",
            ),
            ("webhook:https://h\u{1b}[31m/x", "webhook:https://…"),
        ] {
            assert_eq!(shown(topic), shown_as, "{topic}");
        }
    }

    #[test]
    fn a_new_topic_is_what_a_nats_subject_can_carry() {
        for ok in [
            "orders.created",
            "a",
            "billing:invoice.v2",
            "webhook:https://hooks.example.com/a..b",
            "webhook:http://127.0.0.1:9/",
        ] {
            assert!(validate_new_topic(ok).is_ok(), "{ok}");
        }
        for bad in [
            "webhook:",
            "webhook:not-a-url",
            "webhook:ftp://x",
            "webhook:https://",
            "webhook:https:///path",
            "webhook:https://hooks.example.com/a b",
        ] {
            let err = validate_new_topic(bad).err().map(|e| e.to_string());
            assert!(
                err.as_deref()
                    .is_some_and(|e| e.contains("a webhook topic is webhook:http(s)://host/path")),
                "{bad:?}: {err:?}"
            );
        }
        for (bad, says) in [
            ("a b", "holds whitespace (U+0020)"),
            ("a\u{a0}b", "holds whitespace (U+00A0)"),
            ("a..b", "empty name"),
            (".a", "empty name"),
            ("a.", "empty name"),
            ("a*b", "holds '*'"),
            ("orders.>x", "holds '>'"),
            ("a.*", "is a pattern"),
            ("a\nb", "control characters (found U+000A)"),
            ("a\u{200b}b", "invisible characters (found U+200B)"),
            ("a\u{feff}b", "invisible characters (found U+FEFF)"),
        ] {
            let err = validate_new_topic(bad).err().map(|e| e.to_string());
            assert!(
                err.as_deref().is_some_and(|e| e.contains(says)),
                "{bad:?}: {err:?}"
            );
        }
    }

    #[test]
    fn a_webhook_prefix_is_taken_in_lower_case_only() {
        for bad in [
            "WEBHOOK:http://127.0.0.1:9/x",
            "Webhook:https://hooks.example.com/",
        ] {
            let err = check_webhook_prefix_case("topic", bad)
                .err()
                .map(|e| e.to_string());
            assert!(
                err.as_deref()
                    .is_some_and(|e| e.contains("starts with \"webhook:\", in lower case")),
                "{bad:?}: {err:?}"
            );
        }
        for ok in [
            "webhook:https://hooks.example.com/",
            "web",
            "orders.created",
            "é",
        ] {
            assert!(check_webhook_prefix_case("topic", ok).is_ok(), "{ok}");
        }
    }

    fn pattern(p: &str) -> TopicPattern {
        TopicPattern::parse(p).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    #[test]
    fn wildcards_match_as_in_nats() {
        let cases = [
            ("orders.*", "orders.created", true),
            ("orders.*", "orders.eu.created", false),
            ("orders.*", "orders", false),
            ("orders.*", "orders.", false),
            ("billing.>", "billing.paid", true),
            ("billing.>", "billing.eu.paid", true),
            ("billing.>", "billing", false),
            (">", "anything.at.all", true),
            (">", "x", true),
            ("*.created", "order.created", true),
            ("*.created", "order.updated", false),
            ("email.send", "email.send", true),
            ("email.send", "email.sends", false),
            ("a+b.c", "a+b.c", true),
            ("a+b.c", "aab.c", false),
        ];
        for (p, topic, expected) in cases {
            assert_eq!(pattern(p).matches(topic), expected, "{p} ~ {topic}");
        }
    }

    #[test]
    fn regexes_escape_literal_tokens() {
        assert_eq!(pattern("orders.*").to_regex(), "^orders\\.[^.]+$");
        assert_eq!(pattern("billing.>").to_regex(), "^billing\\.[^.].*$");
        assert_eq!(pattern("a+b").to_regex(), "^a\\+b$");
        assert_eq!(prefix_regex("webhook:"), "^webhook:");
    }

    #[test]
    fn malformed_patterns_are_refused_with_the_rule() {
        for bad in ["", "a..b", "a.>.b", "a*", "or ders", ".a", "a.", "b>"] {
            let err = TopicPattern::parse(bad).err().map(|e| e.to_string());
            let err = err.unwrap_or_else(|| panic!("{bad:?} was accepted"));
            assert!(err.contains("topic pattern"), "{err}");
        }
        assert!(TopicPattern::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn a_new_topic_with_a_control_character_or_a_wildcard_is_refused_by_name() {
        for topic in [
            "a\nforged log line",
            "tab\there",
            "esc\u{1b}[31m",
            "rtl\u{202E}txt.exe",
        ] {
            let err = crate::NewEvent::new(topic, serde_json::json!({}))
                .validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.contains("topic") && err.contains("control characters"),
                "{topic:?}: {err}"
            );
        }
        assert!(
            crate::NewEvent::new("orders.créé", serde_json::json!({}))
                .validate()
                .is_ok()
        );
        for pattern in ["orders.*", "billing.>", "*", ">"] {
            let err = crate::NewEvent::new(pattern, serde_json::json!({}))
                .validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("is a pattern"), "{pattern:?}: {err}");
        }
        // A wildcard within a name is no pattern, but no subject token
        // either: refused as such.
        let err = crate::NewEvent::new("orders.a*b.>x", serde_json::json!({}))
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("holds '*'"), "{err}");
        // A filter still finds a row that plain SQL wrote with one, a
        // cancel can still name it, and a pause or a limit too (without a
        // control character); not a pattern.
        assert!(validate_shown_topic("orders created").is_ok());
        assert!(validate_shown_topic("a\u{1b}b").is_err());
        let blank = validate_shown_topic("\u{a0}").err().map(|e| e.to_string());
        assert!(
            blank
                .as_deref()
                .is_some_and(|e| e.contains("must not be blank")),
            "{blank:?}"
        );
        assert!(validate_topic("a\nb").is_ok());
        assert!(validate_named_topic("a\nb").is_ok());
        assert!(validate_named_topic("a.*").is_err());
    }
}
