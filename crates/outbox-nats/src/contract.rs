//! The stream contract: every setting that matters is explicit, a missing
//! stream is created, and a present one must match — outboxd never silently
//! replaces a stream.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::Error;

/// The settings of the stream outboxd relays into.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamContract {
    /// Stream name.
    pub name: String,
    /// Subjects the stream captures; the server may capture more.
    pub subjects: Vec<String>,
    /// `limits`, `interest` or `workqueue`.
    pub retention: stream::RetentionPolicy,
    /// `file` or `memory`.
    pub storage: stream::StorageType,
    /// Replicas (1 for a single server, 3 for a cluster).
    pub replicas: usize,
    /// Messages older than this are removed (zero: no limit).
    pub max_age: Duration,
    /// Total size limit in bytes (-1: no limit).
    pub max_bytes: i64,
    /// Message count limit (-1: no limit).
    pub max_messages: i64,
    /// How long a `Nats-Msg-Id` is remembered for de-duplication.
    pub duplicate_window: Duration,
}

impl StreamContract {
    fn to_config(&self) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            subjects: self.subjects.clone(),
            retention: self.retention,
            storage: self.storage,
            num_replicas: self.replicas,
            max_age: self.max_age,
            max_bytes: self.max_bytes,
            max_messages: self.max_messages,
            duplicate_window: self.duplicate_window,
            ..Default::default()
        }
    }

    /// The fields where `actual` differs from this contract, described for an
    /// operator. Extra subjects on the server are accepted.
    pub fn differences(&self, actual: &stream::Config) -> Vec<String> {
        let mut diffs = Vec::new();
        let missing: Vec<&String> = self
            .subjects
            .iter()
            .filter(|s| !actual.subjects.contains(s))
            .collect();
        if !missing.is_empty() {
            diffs.push(format!(
                "subjects: configured {:?} not all captured, server has {:?}",
                self.subjects, actual.subjects
            ));
        }
        let mut check = |field: &str, want: String, got: String| {
            if want != got {
                diffs.push(format!("{field}: configured {want}, server {got}"));
            }
        };
        check(
            "retention",
            format!("{:?}", self.retention),
            format!("{:?}", actual.retention),
        );
        check(
            "storage",
            format!("{:?}", self.storage),
            format!("{:?}", actual.storage),
        );
        check(
            "replicas",
            self.replicas.to_string(),
            actual.num_replicas.to_string(),
        );
        check(
            "max_age",
            format!("{:?}", self.max_age),
            format!("{:?}", actual.max_age),
        );
        check(
            "max_bytes",
            self.max_bytes.to_string(),
            actual.max_bytes.to_string(),
        );
        check(
            "max_msgs",
            self.max_messages.to_string(),
            actual.max_messages.to_string(),
        );
        check(
            "duplicate_window",
            format!("{:?}", self.duplicate_window),
            format!("{:?}", actual.duplicate_window),
        );
        diffs
    }
}

/// Creates the stream when it is missing; when present, checks it against the
/// contract and fails with every mismatching field named.
pub async fn ensure_stream(
    js: &jetstream::Context,
    contract: &StreamContract,
) -> Result<stream::Stream, Error> {
    use jetstream::context::GetStreamErrorKind;
    match js.get_stream(&contract.name).await {
        Ok(stream) => {
            let fields = contract.differences(&stream.cached_info().config);
            if fields.is_empty() {
                Ok(stream)
            } else {
                Err(Error::StreamMismatch {
                    stream: contract.name.clone(),
                    fields,
                })
            }
        }
        Err(err)
            if matches!(err.kind(), GetStreamErrorKind::JetStream(ref e)
                if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            tracing::info!(stream = %contract.name, subjects = ?contract.subjects, "creating stream");
            js.create_stream(contract.to_config())
                .await
                .map_err(|e| Error::JetStream(format!("create stream {}: {e}", contract.name)))
        }
        Err(err) => Err(Error::JetStream(format!(
            "get stream {}: {err}",
            contract.name
        ))),
    }
}
