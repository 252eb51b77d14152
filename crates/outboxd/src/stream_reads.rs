//! The admin API's reads of the message stream (`GET /api/apps/{app}/stream`),
//! backed by NATS JetStream: `outbox_nats::peek` with the tenant's subject
//! filter from the relay's subject template.

use std::time::Duration;

use outbox_admin::{StreamReadError, StreamReader};
use outbox_nats::subject::SubjectTemplate;

/// Reads the stream the relay publishes to.
pub struct NatsStreamReader {
    /// JetStream.
    pub js: async_nats::jetstream::Context,
    /// The stream's name.
    pub stream: String,
    /// The relay's subject template (where a tenant's subjects are).
    pub template: SubjectTemplate,
}

impl StreamReader for NatsStreamReader {
    fn tail(
        &self,
        app: &str,
        subject: &str,
        last: usize,
        since: Duration,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<Vec<serde_json::Value>, StreamReadError>>
                + Send
                + '_,
        >,
    > {
        let filter = self.template.tenant_filter(app, subject);
        let (app, subject) = (app.to_owned(), subject.to_owned());
        Box::pin(async move {
            let filter = filter.ok_or_else(|| {
                StreamReadError::Filter(format!(
                    "subject: {subject:?} is not a subject filter of app {app} (NATS tokens after the tenant's, e.g. order.* or >)"
                ))
            })?;
            let request = outbox_nats::peek::PeekRequest {
                stream: self.stream.clone(),
                filter,
                purpose: format!("{app}-api"),
                last,
                since,
                timeout: Duration::from_secs(3),
            };
            let messages = outbox_nats::peek::tail(&self.js, &request)
                .await
                .map_err(|e| StreamReadError::Unavailable(e.to_string()))?;
            messages
                .into_iter()
                .map(|m| {
                    serde_json::to_value(m).map_err(|e| StreamReadError::Unavailable(e.to_string()))
                })
                .collect()
        })
    }
}
