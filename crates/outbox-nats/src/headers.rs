//! The headers of the wire contract, named once, with the helpers both
//! sides use: the relay injects them into every message it publishes, the
//! consumer runtime extracts them from every message it reads.
//!
//! Every relayed message carries `Nats-Msg-Id` (the outbox row's id: the
//! stream drops a re-published copy), `tenant-id` (the app's slug, checked
//! against the subject by consumers), `correlation-id` and
//! `x-correlation-id` (the same value: the row's own, else the row's id),
//! `traceparent` (the row's when it is a valid W3C one, else a new trace),
//! `trace-id` (the trace id of that `traceparent`) and `outbox-topic`.

use std::collections::HashMap;

use async_nats::HeaderMap;
use serde_json::Value;

/// The message id JetStream de-duplicates on: the outbox row's id.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// The tenant (app slug) the message belongs to.
pub const TENANT_ID: &str = "tenant-id";
/// The correlation id.
pub const CORRELATION_ID: &str = "correlation-id";
/// The same correlation id, under the name many HTTP stacks use.
pub const X_CORRELATION_ID: &str = "x-correlation-id";
/// The W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// The trace id of `traceparent`, for log search.
pub const TRACE_ID: &str = "trace-id";
/// The outbox row's topic.
pub const OUTBOX_TOPIC: &str = "outbox-topic";

/// Every header a relayed message carries.
pub const REQUIRED: [&str; 7] = [
    MSG_ID,
    TENANT_ID,
    CORRELATION_ID,
    X_CORRELATION_ID,
    TRACEPARENT,
    TRACE_ID,
    OUTBOX_TOPIC,
];

/// A W3C `traceparent` for a new trace.
pub fn new_traceparent() -> String {
    // Trace ids must be unique, not secret: a thread-local generator spares
    // the two `getrandom` system calls per relayed event of a v4 UUID each.
    // Zero is not a valid id.
    let trace = fastrand::u128(1..);
    let span = fastrand::u64(1..);
    format!("00-{trace:032x}-{span:016x}-01")
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), or
/// `None` when it is not one (wrong shape, upper case, an all-zero id, the
/// reserved version `ff`).
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && !zero(trace)
        && hex(span, 16)
        && !zero(span)
        && hex(flags, 2)
        // Version 00 has exactly four fields; later ones may add more.
        && (version != "00" || parts.next().is_none());
    valid.then_some(trace)
}

/// What a row says about its trace and correlation, from its headers.
fn row_header<'a>(row: &'a Value, name: &str) -> Option<&'a str> {
    // A NATS header value cannot hold control characters (CR, LF): such a
    // value, or an overlong one, is left out rather than sent.
    row.get(name)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 512 && !v.chars().any(char::is_control))
}

/// The headers of the message relaying the outbox row `id` of tenant
/// `tenant` and topic `topic`, whose own headers are `row` (a JSON object;
/// its correlation id and `traceparent` are carried on).
pub fn inject(id: &str, tenant: &str, topic: &str, row: &Value) -> HeaderMap {
    let correlation = row_header(row, CORRELATION_ID)
        .or_else(|| row_header(row, X_CORRELATION_ID))
        .unwrap_or(id)
        .to_owned();
    let traceparent = row_header(row, TRACEPARENT)
        .filter(|tp| trace_id_of(tp).is_some())
        .map_or_else(new_traceparent, str::to_owned);
    let trace_id = trace_id_of(&traceparent).unwrap_or_default().to_owned();
    let mut headers = HeaderMap::new();
    headers.insert(MSG_ID, id);
    headers.insert(TENANT_ID, tenant);
    headers.insert(CORRELATION_ID, correlation.as_str());
    headers.insert(X_CORRELATION_ID, correlation.as_str());
    headers.insert(TRACEPARENT, traceparent.as_str());
    headers.insert(TRACE_ID, trace_id.as_str());
    headers.insert(OUTBOX_TOPIC, topic);
    headers
}

/// The trace and correlation of a message a consumer reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext {
    /// `correlation-id`, else `x-correlation-id`.
    pub correlation_id: Option<String>,
    /// `traceparent`, when it is a valid W3C one.
    pub traceparent: Option<String>,
    /// `trace-id`, else the trace id of `traceparent`.
    pub trace_id: Option<String>,
}

/// Reads the trace and correlation headers of a message (first value of
/// each, as the consumer runtime collects them).
pub fn extract(headers: &HashMap<String, String>) -> TraceContext {
    let get = |name: &str| {
        headers
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    let traceparent = get(TRACEPARENT).filter(|tp| trace_id_of(tp).is_some());
    let trace_id = get(TRACE_ID).or_else(|| {
        traceparent
            .as_deref()
            .and_then(trace_id_of)
            .map(str::to_owned)
    });
    TraceContext {
        correlation_id: get(CORRELATION_ID).or_else(|| get(X_CORRELATION_ID)),
        traceparent,
        trace_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn as_map(headers: &HeaderMap) -> HashMap<String, String> {
        headers
            .iter()
            .filter_map(|(k, v)| Some((k.to_string(), v.first()?.as_str().to_owned())))
            .collect()
    }

    #[test]
    fn a_relayed_message_has_every_required_header() {
        let headers = as_map(&inject("row-1", "shop", "order.created", &json!({})));
        for name in REQUIRED {
            assert!(
                headers.get(name).is_some_and(|v| !v.is_empty()),
                "{name} missing: {headers:?}"
            );
        }
        assert_eq!(headers[MSG_ID], "row-1");
        assert_eq!(headers[TENANT_ID], "shop");
        assert_eq!(headers[OUTBOX_TOPIC], "order.created");
        assert_eq!(
            headers[CORRELATION_ID], "row-1",
            "generated from the row's id"
        );
        assert_eq!(headers[X_CORRELATION_ID], headers[CORRELATION_ID]);
        assert_eq!(
            trace_id_of(&headers[TRACEPARENT]),
            Some(headers[TRACE_ID].as_str()),
            "a new trace, and its id"
        );
    }

    #[test]
    fn the_rows_correlation_and_trace_are_carried_on() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let row = json!({ "x-correlation-id": "corr-9", "traceparent": tp });
        let headers = as_map(&inject("row-1", "shop", "t", &row));
        assert_eq!(headers[CORRELATION_ID], "corr-9", "either name is read");
        assert_eq!(headers[X_CORRELATION_ID], "corr-9");
        assert_eq!(headers[TRACEPARENT], tp);
        assert_eq!(headers[TRACE_ID], "0af7651916cd43dd8448eb211c80319c");
        // A correlation id that cannot be a header value is not sent.
        let headers = as_map(&inject(
            "row-1",
            "shop",
            "t",
            &json!({ "correlation-id": "a\nb" }),
        ));
        assert_eq!(headers[CORRELATION_ID], "row-1");
        // An invalid traceparent is replaced, not propagated.
        let headers = as_map(&inject(
            "row-1",
            "shop",
            "t",
            &json!({ "traceparent": "00-xyz" }),
        ));
        assert_ne!(headers[TRACEPARENT], "00-xyz");
        assert!(trace_id_of(&headers[TRACEPARENT]).is_some());
    }

    #[test]
    fn a_consumer_reads_either_correlation_header_and_derives_the_trace_id() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let headers: HashMap<String, String> = [
            ("x-correlation-id".to_owned(), "corr-1".to_owned()),
            ("traceparent".to_owned(), tp.to_owned()),
        ]
        .into();
        assert_eq!(
            extract(&headers),
            TraceContext {
                correlation_id: Some("corr-1".into()),
                traceparent: Some(tp.into()),
                trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            }
        );
        assert_eq!(extract(&HashMap::new()), TraceContext::default());
    }

    #[test]
    fn only_w3c_traceparents_have_a_trace_id() {
        for bad in [
            "",
            "00",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        ] {
            assert_eq!(trace_id_of(bad), None, "{bad:?}");
        }
        let tp = new_traceparent();
        assert!(trace_id_of(&tp).is_some(), "{tp}");
        assert_ne!(new_traceparent(), tp, "every trace is new");
    }
}
