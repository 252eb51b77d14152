//! Strict request parsing: JSON bodies and query strings are read into typed
//! structs that refuse unknown fields, and every refusal is a 400 whose
//! message names the field and what it accepts, in the API's words — never
//! a Rust type, serde or the web framework.

use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The one limit on request bodies, every route included (`413 too_large`).
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

/// Reads a whole request body of at most `limit` bytes (413 `too_large`
/// past it; 400 when it does not arrive whole).
pub async fn body(
    req: axum::extract::Request,
    limit: usize,
) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|err| unread_body(&err, limit))
}

/// The refusal of a body that could not be read: 413 when it was over
/// `limit`, 400 when it broke off or came too slowly (it said 413 for
/// those too).
pub fn unread_body(err: &axum::Error, limit: usize) -> ApiError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(err) = cause {
        if err.is::<http_body_util::LengthLimitError>() {
            return ApiError::TooLarge(limit);
        }
        cause = err.source();
    }
    ApiError::Invalid(
        "body: did not arrive whole (the connection broke, or it came too slowly)".into(),
    )
}

/// Whether the request's `Content-Type` is `application/json` (parameters
/// such as `charset` allowed).
pub fn declares_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// Parses a JSON body into `T`.
pub fn json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let (path, inner) = match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(value) => match de.end() {
            Ok(()) => return Ok(value),
            Err(trailing) => (String::new(), trailing),
        },
        Err(err) => (err.path().to_string(), err.into_inner()),
    };
    {
        {
            Err(ApiError::Invalid(match inner.classify() {
                serde_json::error::Category::Syntax | serde_json::error::Category::Eof
                    if bytes.iter().all(u8::is_ascii_whitespace) =>
                {
                    "the body is empty: send a JSON object".to_owned()
                }
                serde_json::error::Category::Syntax | serde_json::error::Category::Eof => format!(
                    "the body is not valid JSON (line {}, column {})",
                    inner.line(),
                    inner.column()
                ),
                _ => field_message(&path, &inner.to_string()),
            }))
        }
    }
}

/// [`json`], or `T::default()` for an empty body (every field optional).
pub fn json_or_default<T: DeserializeOwned + Default>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        json(bytes)
    }
}

/// The pairs of a query string or a urlencoded form (`what` names one
/// in a refusal: "query: a parameter", "form: a field"), refusing bytes
/// that do not decode to UTF-8 and a name given twice unless `repeatable`
/// lists it. Decoded with replacement characters, `topic=%FF` matched
/// nothing and answered an empty list; a name given twice was read as its
/// first value (`topic=x&topic=y` paused x) or taken for a type error.
pub fn checked_pairs(
    raw: &[u8],
    what: &str,
    repeatable: &[&str],
) -> Result<Vec<(String, String)>, ApiError> {
    if percent_encoding::percent_decode(raw).decode_utf8().is_err() {
        return Err(ApiError::Invalid(format!("{what} is not valid UTF-8")));
    }
    let pairs: Vec<(String, String)> = form_urlencoded::parse(raw).into_owned().collect();
    let mut seen = std::collections::HashSet::new();
    if let Some((name, _)) = pairs
        .iter()
        .find(|(name, _)| !repeatable.contains(&name.as_str()) && !seen.insert(name.as_str()))
    {
        return Err(ApiError::Invalid(format!("{name}: given more than once")));
    }
    Ok(pairs)
}

/// Parses a query string into `T`. A parameter that is not UTF-8 or given
/// twice ([`checked_pairs`]), or holding NUL (which no stored text
/// contains, and which the database took for a value it cannot store), is
/// refused first.
pub fn query<T: DeserializeOwned>(query: Option<&str>) -> Result<T, ApiError> {
    let raw = query.unwrap_or_default().as_bytes();
    let pairs = checked_pairs(raw, "query: a parameter", &[])?;
    if let Some((key, _)) = pairs
        .iter()
        .find(|(key, value)| key.contains('\0') || value.contains('\0'))
    {
        return Err(ApiError::Invalid(format!(
            "{}: must not contain NUL",
            key.replace('\0', "\\0")
        )));
    }
    let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(raw));
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        ApiError::Invalid(field_message(&path, &err.into_inner().to_string()))
    })
}

/// Axum extractor for [`query`].
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, ApiError> {
        query(parts.uri.query()).map(Self)
    }
}

/// Turns serde's message about the value at `path` into the API's words:
/// the field first, then what is wrong and what is accepted.
fn field_message(path: &str, message: &str) -> String {
    // serde appends " at line L column C" for JSON.
    let message = message.rsplit_once(" at line ").map_or(message, |(m, _)| m);
    // What the query-string parser says about a number that is not one.
    if message.contains("invalid digit") || message.contains("number too") {
        return format!("{}: expected a whole number", path.trim_start_matches('.'));
    }
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (field, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let known = expected
            .trim_start_matches(", expected one of ")
            .trim_start_matches(", expected ")
            .replace('`', "");
        // The path may already end with the unknown field itself.
        let field = if path == "." || path.is_empty() {
            field.to_owned()
        } else if path == field || path.ends_with(&format!(".{field}")) {
            path.to_owned()
        } else {
            format!("{path}.{field}")
        };
        return if known.is_empty() || known.starts_with("there are no fields") {
            format!("{field}: unknown field (this object takes no fields)")
        } else {
            format!("{field}: unknown field (accepted: {known})")
        };
    }
    if let Some(rest) = message.strip_prefix("duplicate field `") {
        let field = rest.split('`').next().unwrap_or(rest);
        let field = if path == "." || path.is_empty() {
            field.to_owned()
        } else {
            format!("{path}.{field}")
        };
        return format!("{field}: given more than once");
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or(rest);
        let field = if path == "." || path.is_empty() {
            field.to_owned()
        } else {
            format!("{path}.{field}")
        };
        return format!("{field}: required");
    }
    let field = if path == "." || path.is_empty() {
        "body".to_owned()
    } else {
        path.to_owned()
    };
    if message.starts_with("UUID parsing failed") {
        return format!("{field}: not a UUID (such as 01a2b3c4-0000-7000-8000-000000000000)");
    }
    // What the time parser says about a string that is not an RFC 3339 time.
    if CHRONO_PARSE_ERRORS.contains(&message) {
        return format!("{field}: not an RFC 3339 time with its offset, e.g. 2026-01-31T12:00:00Z");
    }
    // What the query-string parser says about an empty or a bad value.
    if message.contains("from empty string") {
        return format!("{field}: has no value");
    }
    if message.contains("was not `true` or `false`") {
        return format!("{field}: expected true or false");
    }
    // "invalid type: string \"x\", expected u32" / "invalid value: integer `-5`, expected u64"
    let (got, expected) = message
        .split_once(", expected ")
        .map_or((message, ""), |(g, e)| (g, e));
    let got = if got.starts_with("invalid length") {
        // serde reads a JSON array into a struct field by field.
        "sequence".to_owned()
    } else {
        got.trim_start_matches("invalid type: ")
            .trim_start_matches("invalid value: ")
            .replace('`', "")
    };
    let accepted = expectation(expected);
    if accepted.is_empty() {
        format!("{field}: {}", humanize(&got))
    } else {
        format!("{field}: got {}, expected {accepted}", humanize(&got))
    }
}

/// The messages of `chrono`'s parse errors (`chrono::format::ParseError`).
const CHRONO_PARSE_ERRORS: [&str; 7] = [
    "input is out of range",
    "no possible date and time matching input",
    "input is not enough for unique date and time",
    "input contains invalid characters",
    "premature end of input",
    "trailing input",
    "bad or unsupported format string",
];

/// What serde calls an expected value, in the API's words.
fn expectation(expected: &str) -> String {
    let range = |lo: i128, hi: i128| format!("an integer in {lo}..={hi}");
    match expected.trim() {
        "" => String::new(),
        "u8" => range(0, u8::MAX.into()),
        "u16" => range(0, u16::MAX.into()),
        "u32" => range(0, u32::MAX.into()),
        // The field's own range is checked, and named, once it is a number.
        "u64" | "usize" => "a whole number, 0 or more".into(),
        "i8" => range(i8::MIN.into(), i8::MAX.into()),
        "i16" => range(i16::MIN.into(), i16::MAX.into()),
        "i32" => range(i32::MIN.into(), i32::MAX.into()),
        "i64" | "isize" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "a boolean" | "bool" => "true or false".into(),
        "a string" | "a borrowed string" | "a character" => "a string".into(),
        "a sequence" => "an array".into(),
        "a map" => "an object".into(),
        "a UUID string" | "UUID parsing failed" => "a UUID".into(),
        "an RFC 3339 formatted date and time string" => {
            "an RFC 3339 time, e.g. 2026-01-31T12:00:00Z".into()
        }
        other if other.starts_with("struct ") => "an object".into(),
        other if other.starts_with("a sequence") || other.starts_with("tuple") => "an array".into(),
        other if other.starts_with("variant identifier") => "one of the documented values".into(),
        other => other.replace('`', ""),
    }
}

/// serde's names for the kinds of values, in JSON's words.
fn humanize(got: &str) -> String {
    got.replace("map", "an object")
        .replace("sequence", "an array")
        .replace("unit value", "null")
        .replace("integer ", "")
        .replace("floating point ", "")
        .replace("boolean ", "")
        .replace("string ", "the string ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_over_the_limit_is_told_from_one_that_broke_off() {
        let over = axum::body::to_bytes(axum::body::Body::from(vec![b'x'; 11]), 10).await;
        assert!(over.is_err_and(|err| matches!(unread_body(&err, 10), ApiError::TooLarge(10))));
        let broken = axum::body::Body::from_stream(futures::stream::iter([
            Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"{")),
            Err(std::io::Error::other("the client went away")),
        ]));
        let broke_off = axum::body::to_bytes(broken, 10).await;
        assert!(broke_off.is_err_and(|err| matches!(unread_body(&err, 10), ApiError::Invalid(_))));
    }
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        delay_ms: Option<u64>,
        run_at: Option<chrono::DateTime<chrono::Utc>>,
        name: String,
    }

    fn message<T: DeserializeOwned + std::fmt::Debug>(body: &str) -> String {
        match json::<T>(body.as_bytes()) {
            Err(ApiError::Invalid(m)) => m,
            other => format!("unexpected: {other:?}"),
        }
    }

    #[test]
    fn refusals_name_the_field_in_the_apis_words() {
        let cases = [
            (r#"{"name":"a","extra":1}"#, "extra: unknown field"),
            (
                r#"{"name":"a","delay_ms":-5}"#,
                "delay_ms: got -5, expected a whole number, 0 or more",
            ),
            (
                r#"{"name":"a","run_at":"yesterday"}"#,
                "run_at: not an RFC 3339 time with its offset",
            ),
            (
                r#"{"name":"a","run_at":"2030-01-01T00:00:00"}"#,
                "run_at: not an RFC 3339 time with its offset",
            ),
            (r#"{"delay_ms":1}"#, "name: required"),
            (r#"{"name":"a","name":"b"}"#, "name: given more than once"),
            (r#"[]"#, "body: got an array, expected an object"),
            ("", "the body is empty"),
            ("{", "not valid JSON"),
        ];
        for (body, want) in cases {
            let got = message::<Body>(body);
            assert!(got.contains(want), "{body}: {got}");
            for leak in ["struct", "serde", "Body", "u64", "deserialize", "Failed to"] {
                assert!(!got.contains(leak), "{body}: {got} mentions {leak}");
            }
        }
    }

    #[test]
    fn query_strings_are_strict_too() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Q {
            limit: Option<u32>,
        }
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Flags {
            limit: Option<u32>,
            unresolved: Option<bool>,
        }
        for (q, want) in [
            ("limit=", "limit: has no value"),
            ("unresolved=yes", "unresolved: expected true or false"),
            ("limit=5&limit=6", "limit: given more than once"),
            ("unresolved=true&limit=%00", "limit: must not contain NUL"),
            ("limit=%FF", "query: a parameter is not valid UTF-8"),
        ] {
            let err = query::<Flags>(Some(q))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert_eq!(err, want, "{q}");
        }
        let err = query::<Q>(Some("limit=-1")).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|m| m.starts_with("limit: ")),
            "{err:?}"
        );
        let err = query::<Q>(Some("limt=5")).err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|m| m.contains("limt: unknown field")),
            "{err:?}"
        );
    }
}
