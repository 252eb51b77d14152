//! The subject a relayed row is published to, from a template checked at
//! start-up: `tenant.{app}.{topic}` by default, or built from fields of the
//! row, e.g. `tenant.{app}.aggregate.{payload.aggregate_type}.{payload.aggregate_id}`,
//! so that consumers partitioned by aggregate filter with wildcards.
//!
//! Every produced subject is concrete. A placeholder whose value is missing,
//! empty, not a string, number or boolean, or holds `.`, `*`, `>` or
//! whitespace makes the row fail permanently with a message naming it —
//! never a publish to a wildcard or to a subject with more tokens than the
//! template has. Only `{topic}` may span several tokens (topics are dotted).

use outbox_core::topics::is_unprintable;
use outbox_dispatch::Event;
use serde_json::Value;

/// A template that cannot make subjects, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("subject template {template:?}: {problem}")]
pub struct InvalidTemplate {
    /// The template.
    pub template: String,
    /// What is wrong with it.
    pub problem: String,
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    App,
    Topic,
    OrderingKey,
    Payload(Vec<String>),
    Header(String),
}

/// A checked subject template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate {
    parts: Vec<Part>,
}

/// The placeholders a template may use, for messages.
pub const PLACEHOLDERS: &str =
    "{app} (required), {topic}, {ordering_key}, {payload.<key>[.<key>…]}, {headers.<name>}";

impl SubjectTemplate {
    /// Checks `template`: balanced braces, known placeholders, `{app}`
    /// present, no wildcard or whitespace, no empty token.
    pub fn parse(template: &str) -> Result<Self, InvalidTemplate> {
        let invalid = |problem: String| InvalidTemplate {
            template: template.to_owned(),
            problem,
        };
        let mut parts = Vec::new();
        let mut rest = template;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                Some(0) if rest.starts_with('}') => {
                    return Err(invalid("a '}' without its '{'".into()));
                }
                Some(0) => {
                    let end = rest
                        .find('}')
                        .ok_or_else(|| invalid("a '{' without its '}'".into()))?;
                    let name = &rest[1..end];
                    if name.contains('{') {
                        return Err(invalid("placeholders do not nest".into()));
                    }
                    parts.push(placeholder(name).ok_or_else(|| {
                        invalid(format!(
                            "unknown placeholder {{{name}}}; known: {PLACEHOLDERS}"
                        ))
                    })?);
                    rest = &rest[end + 1..];
                }
                found => {
                    let end = found.unwrap_or(rest.len());
                    let literal = &rest[..end];
                    if literal.contains(['*', '>']) || literal.chars().any(char::is_whitespace) {
                        return Err(invalid(format!(
                            "{literal:?} holds a wildcard or whitespace; a subject must be concrete"
                        )));
                    }
                    parts.push(Part::Literal(literal.to_owned()));
                    rest = &rest[end..];
                }
            }
        }
        let app = parts.iter().position(|p| *p == Part::App).ok_or_else(|| {
            invalid("lacks {app}: consumers read the tenant from the subject".into())
        })?;
        // {app} and {topic} are whole tokens: glued to other text, two
        // tenants (or topics) could make the same subject.
        for (i, part) in parts.iter().enumerate() {
            if !matches!(part, Part::App | Part::Topic) {
                continue;
            }
            let before = i == 0 || matches!(&parts[i - 1], Part::Literal(t) if t.ends_with('.'));
            let after = i + 1 == parts.len()
                || matches!(&parts[i + 1], Part::Literal(t) if t.starts_with('.'));
            if !(before && after) {
                return Err(invalid(
                    "{app} and {topic} must each be whole tokens, between dots".into(),
                ));
            }
        }
        if parts[..app].contains(&Part::Topic) {
            return Err(invalid(
                "has {topic} before {app}: a topic spans a varying number of tokens, and consumers find the tenant by its position".into(),
            ));
        }
        // Placeholders stand for one token at least: check the shape with a
        // stand-in value.
        let shape: String = parts
            .iter()
            .map(|p| match p {
                Part::Literal(text) => text.as_str(),
                _ => "x",
            })
            .collect();
        if shape.split('.').any(str::is_empty) {
            return Err(invalid(
                "has an empty token (a leading, trailing or doubled '.')".into(),
            ));
        }
        Ok(Self { parts })
    }

    /// The subject filter of every subject of the tenant `app`, narrowed by
    /// `rest` (NATS wildcards, after the tenant's token; `>` for all), or
    /// `None` when a placeholder other than `{app}` comes before it (no
    /// filter then holds exactly one tenant), or `rest` is not a filter.
    pub fn tenant_filter(&self, app: &str, rest: &str) -> Option<String> {
        let mut prefix = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => prefix.push_str(text),
                Part::App => break,
                _ => return None,
            }
        }
        let tokens: Vec<&str> = rest.split('.').collect();
        let valid = tokens.iter().enumerate().all(|(i, t)| {
            !t.is_empty()
                && !t.chars().any(|c| c.is_whitespace() || is_unprintable(c))
                && (*t == "*" || *t == ">" || !t.contains(['*', '>']))
                && (*t != ">" || i == tokens.len() - 1)
        });
        (valid && token("{app}", Some(app)).is_ok()).then(|| format!("{prefix}{app}.{rest}"))
    }

    /// The position of the tenant's token (`{app}`) in every subject, as
    /// the consumer runtime's `tenant_token` takes it.
    pub fn app_token(&self) -> usize {
        let before: String = self
            .parts
            .iter()
            .take_while(|p| **p != Part::App)
            .map(|p| match p {
                Part::Literal(text) => text.as_str(),
                _ => "x",
            })
            .collect();
        before.matches('.').count()
    }

    /// The subject of `event` of the app `app` (its slug), or why it has
    /// none, naming the placeholder.
    pub fn render(&self, app: &str, event: &Event) -> Result<String, String> {
        let mut subject = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => subject.push_str(text),
                Part::App => subject.push_str(token("{app}", Some(app))?),
                Part::Topic => {
                    for (i, t) in event.topic.split('.').enumerate() {
                        if i > 0 {
                            subject.push('.');
                        }
                        subject.push_str(token("{topic}", Some(t))?);
                    }
                }
                Part::OrderingKey => {
                    subject.push_str(token("{ordering_key}", event.ordering_key.as_deref())?);
                }
                Part::Payload(path) => {
                    let name = format!("{{payload.{}}}", path.join("."));
                    let value = path
                        .iter()
                        .try_fold(&event.payload, |v, key| v.get(key.as_str()));
                    subject.push_str(&scalar(&name, value)?);
                }
                Part::Header(header) => {
                    let name = format!("{{headers.{header}}}");
                    subject.push_str(&scalar(&name, event.headers.get(header.as_str()))?);
                }
            }
        }
        Ok(subject)
    }
}

fn placeholder(name: &str) -> Option<Part> {
    let keys = |rest: &str| {
        let keys: Vec<String> = rest.split('.').map(str::to_owned).collect();
        (!keys.iter().any(String::is_empty)).then_some(keys)
    };
    match name {
        "app" => Some(Part::App),
        "topic" => Some(Part::Topic),
        "ordering_key" => Some(Part::OrderingKey),
        _ => {
            if let Some(path) = name.strip_prefix("payload.") {
                keys(path).map(Part::Payload)
            } else if let Some(header) = name.strip_prefix("headers.") {
                (!header.is_empty()).then(|| Part::Header(header.to_owned()))
            } else {
                None
            }
        }
    }
}

/// `value` as one subject token, or why it cannot be one.
fn token<'a>(name: &str, value: Option<&'a str>) -> Result<&'a str, String> {
    match value {
        None => Err(format!("subject token {name} is missing")),
        Some("") => Err(format!("subject token {name} is empty")),
        // The rule of a topic's tokens (`outbox_core::topics`): a control or
        // invisible character in a subject is one that consumers' logs show
        // as another subject, or not at all.
        Some(v) => match v
            .chars()
            .find(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || is_unprintable(*c))
        {
            Some(c) => Err(format!(
                "subject token {name} is {v:?}, which holds {c:?} (a subject token holds no '.', '*', '>', whitespace, control or invisible characters)"
            )),
            None => Ok(v),
        },
    }
}

/// A JSON value as one subject token: a string, a number or a boolean.
fn scalar(name: &str, value: Option<&Value>) -> Result<String, String> {
    let text = match value {
        None | Some(Value::Null) => return Err(format!("subject token {name} is missing")),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(_) => {
            return Err(format!(
                "subject token {name} is an object or an array, not a string or a number"
            ));
        }
    };
    token(name, Some(&text)).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(topic: &str, payload: Value) -> Event {
        Event {
            id: uuid::Uuid::nil(),
            app_id: uuid::Uuid::nil(),
            topic: topic.into(),
            source: "queue".into(),
            op: String::new(),
            payload,
            headers: json!({"region": "eu-1"}),
            attempt: 1,
            max_attempts: 5,
            enqueued_at: chrono::Utc::now(),
            first_attempt_at: None,
            ordering_key: None,
            depth: 0,
            trigger_id: None,
            principal: None,
            reply: Default::default(),
            claim_tx: None,
        }
    }

    #[test]
    fn the_default_template_is_tenant_first() -> Result<(), InvalidTemplate> {
        let t = SubjectTemplate::parse("tenant.{app}.{topic}")?;
        assert_eq!(t.app_token(), 1);
        assert_eq!(SubjectTemplate::parse("{app}.x")?.app_token(), 0);
        assert_eq!(
            SubjectTemplate::parse("a.{payload.r}.{app}")?.app_token(),
            2
        );
        assert_eq!(
            t.render("shop", &event("order.created", json!({}))),
            Ok("tenant.shop.order.created".to_owned())
        );
        Ok(())
    }

    #[test]
    fn subjects_take_fields_of_the_row() -> Result<(), InvalidTemplate> {
        let t = SubjectTemplate::parse(
            "tenant.{app}.aggregate.{payload.aggregate.type}.{payload.id}.{headers.region}",
        )?;
        let e = event("t", json!({"aggregate": {"type": "order"}, "id": 42}));
        assert_eq!(
            t.render("shop", &e),
            Ok("tenant.shop.aggregate.order.42.eu-1".to_owned())
        );
        Ok(())
    }

    #[test]
    fn a_missing_empty_or_wildcard_token_names_the_field() -> Result<(), InvalidTemplate> {
        let t = SubjectTemplate::parse("tenant.{app}.{payload.id}")?;
        for (payload, says) in [
            (json!({}), "{payload.id} is missing"),
            (json!({"id": ""}), "{payload.id} is empty"),
            (json!({"id": "a.b"}), "{payload.id} is \"a.b\""),
            (json!({"id": "*"}), "{payload.id} is \"*\""),
            (json!({"id": ">"}), "{payload.id} is \">\""),
            (json!({"id": "a b"}), "{payload.id} is \"a b\""),
            (json!({"id": "a\u{7}b"}), "{payload.id} is \"a\\u{7}b\""),
            (json!({"id": "c\u{7f}d"}), "{payload.id} is \"c\\u{7f}d\""),
            (
                json!({"id": "e\u{200b}f"}),
                "{payload.id} is \"e\\u{200b}f\"",
            ),
            (json!({"id": {"x": 1}}), "{payload.id} is an object"),
            (json!({"id": null}), "{payload.id} is missing"),
        ] {
            let err = t
                .render("shop", &event("t", payload.clone()))
                .expect_err("no subject");
            assert!(err.contains(says), "{payload}: {err}");
        }
        let keyed = SubjectTemplate::parse("k.{app}.{ordering_key}")?;
        let err = keyed
            .render("shop", &event("t", json!({})))
            .expect_err("no key");
        assert!(err.contains("{ordering_key} is missing"), "{err}");
        Ok(())
    }

    #[test]
    fn a_tenants_filter_stays_within_its_subjects() -> Result<(), InvalidTemplate> {
        let t = SubjectTemplate::parse("tenant.{app}.{topic}")?;
        assert_eq!(
            t.tenant_filter("shop", ">").as_deref(),
            Some("tenant.shop.>")
        );
        assert_eq!(
            t.tenant_filter("shop", "order.*").as_deref(),
            Some("tenant.shop.order.*")
        );
        for bad in ["", "a..b", ">.x", "a b", "a*", "a\u{7}b", "a\u{200b}b"] {
            assert_eq!(t.tenant_filter("shop", bad), None, "{bad:?}");
        }
        assert_eq!(t.tenant_filter("a.b", ">"), None, "a slug is one token");
        let keyed = SubjectTemplate::parse("x.{payload.region}.{app}.{topic}")?;
        assert_eq!(keyed.tenant_filter("shop", ">"), None);
        Ok(())
    }

    #[test]
    fn bad_templates_are_refused_at_start_up() {
        for (template, says) in [
            ("tenant.{topic}", "lacks {app}"),
            ("tenant.{app}-{topic}", "whole tokens"),
            ("tenant.x{app}.{topic}", "whole tokens"),
            ("tenant.{app}.{topic}{payload.id}", "whole tokens"),
            ("{topic}.{app}", "{topic} before {app}"),
            ("tenant.{app}.{colour}", "unknown placeholder {colour}"),
            ("tenant.{app}.{payload.}", "unknown placeholder"),
            ("tenant.{app}.{topic", "without its '}'"),
            ("tenant.{app}}.x", "without its '{'"),
            ("tenant.*.{app}", "wildcard"),
            ("tenant.{app}.>", "wildcard"),
            ("tenant .{app}", "whitespace"),
            (".{app}", "empty token"),
            ("{app}..{topic}", "empty token"),
            ("{app}.", "empty token"),
        ] {
            let err = SubjectTemplate::parse(template).expect_err(template);
            assert!(err.to_string().contains(says), "{template}: {err}");
        }
    }
}
