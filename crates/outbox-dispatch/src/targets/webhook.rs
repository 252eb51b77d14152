//! HTTP webhooks: a trigger whose target is `webhook:<url>` POSTs the event
//! to `<url>` with an HMAC-SHA256 signature over the timestamp and the body.
//!
//! `Outboxd-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`
//! — receivers recompute it and reject stale timestamps ([`verify`] does
//! both). Each target (app and URL) has a secret of its own when it was
//! created (`outbox_core::store::webhooks`); during a rotation's overlap the
//! header carries a second `v1=` made with the previous secret, so a
//! receiver that still holds it verifies too. Targets without one are signed
//! with the global secret. 2xx is success; a 4xx
//! other than 408 and 429 is permanent (dead letter); anything else, time-outs
//! and connection errors retry with backoff.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use sha2::Sha256;
use tokio::net::TcpStream;

use crate::handler::{Event, Handler, HandlerError, HandlerFuture};

/// Target prefix routed to the webhook handler.
pub const PREFIX: &str = outbox_core::topics::WEBHOOK_PREFIX;

/// Posts events to the URL in their target.
#[derive(Clone)]
pub struct Webhook {
    secret: Arc<Vec<u8>>,
    // Where the targets' own secrets are; without it, the global secret only.
    targets: Option<sqlx::PgPool>,
    timeout: Duration,
    tls: tokio_rustls::TlsConnector,
    // Whether receivers on loopback, private and link-local addresses are
    // sent to (see [`Webhook::deny_private_networks`]).
    private_networks: bool,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Option<Hmac<Sha256>> {
    // HMAC takes keys of any length: this never fails in practice.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).ok()?;
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(mac)
}

/// The signature header value for `body` at `timestamp`.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    signatures(&[secret], timestamp, body)
}

/// The signature header value with one `v1=` per secret (the current one
/// first, then the previous one during a rotation's overlap).
pub fn signatures(secrets: &[&[u8]], timestamp: i64, body: &[u8]) -> String {
    let mut header = format!("t={timestamp}");
    for secret in secrets {
        if let Some(mac) = mac(secret, timestamp, body) {
            let digest: String = mac
                .finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            header.push_str(&format!(",v1={digest}"));
        }
    }
    header
}

/// How a receiver checks a request: the `Outboxd-Signature` header must
/// carry a timestamp within `tolerance_secs` of `now` (an old request
/// replayed is refused) and a `v1=` signature of `body` made with
/// `secret`, compared in constant time.
///
/// ```
/// use outbox_dispatch::targets::webhook::{signature, verify};
/// let body = br#"{"id":"01"}"#;
/// let now = 1_700_000_000;
/// let header = signature(b"the target's secret", now, body);
/// assert!(verify(&header, b"the target's secret", body, now + 5, 300));
/// assert!(!verify(&header, b"the target's secret", body, now + 600, 300), "replayed later");
/// assert!(!verify(&header, b"another secret", body, now, 300));
/// ```
pub fn verify(header: &str, secret: &[u8], body: &[u8], now: i64, tolerance_secs: i64) -> bool {
    let mut timestamp = None;
    let mut candidates = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", sig)) => candidates.push(sig),
            _ => {}
        }
    }
    let Some(t) = timestamp.filter(|t| now.abs_diff(*t) <= tolerance_secs.unsigned_abs()) else {
        return false;
    };
    candidates.into_iter().any(|sig| {
        let Some(expected) = hex(sig) else {
            return false;
        };
        mac(secret, t, body).is_some_and(|mac| mac.verify_slice(&expected).is_ok())
    })
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Webhook {
    /// A webhook target signing with `secret`, each request bounded by `timeout`.
    pub fn new(secret: impl Into<Vec<u8>>, timeout: Duration) -> Self {
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth());
        let config = match config {
            Ok(c) => c,
            Err(_) => tokio_rustls::rustls::ClientConfig::builder()
                .with_root_certificates(tokio_rustls::rustls::RootCertStore::empty())
                .with_no_client_auth(),
        };
        Self {
            secret: Arc::new(secret.into()),
            targets: None,
            timeout,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            private_networks: true,
        }
    }

    /// Refuses receivers whose host resolves to a loopback, private,
    /// link-local, shared or otherwise non-public address (checked on the
    /// addresses it then connects to, so a name cannot change its answer in
    /// between): where an app's admins are not trusted with the network
    /// outboxd sits in, they cannot make it call its neighbours.
    pub fn deny_private_networks(mut self) -> Self {
        self.private_networks = false;
        self
    }

    /// Signs each target's requests with its own secret, from `pool`
    /// (`outbox_core::store::webhooks`); the global secret stays the default
    /// for targets without one (empty: such targets fail permanently).
    pub fn with_targets(mut self, pool: sqlx::PgPool) -> Self {
        self.targets = Some(pool);
        self
    }

    /// The signature header of a request of `app` to `url`.
    async fn sign(
        &self,
        app: uuid::Uuid,
        url: &str,
        timestamp: i64,
        body: &[u8],
    ) -> Result<String, HandlerError> {
        let own = match &self.targets {
            Some(pool) => outbox_core::store::webhooks::signing_secrets(pool, app, url)
                .await
                .map_err(|e| {
                    HandlerError::retry(format!("reading {}'s secret: {e}", shown_url(url)))
                })?,
            None => None,
        };
        match own {
            Some(s) => {
                let mut secrets = vec![s.current.as_bytes()];
                secrets.extend(s.previous.as_deref().map(str::as_bytes));
                Ok(signatures(&secrets, timestamp, body))
            }
            None if !self.secret.is_empty() => Ok(signature(&self.secret, timestamp, body)),
            None => Err(HandlerError::permanent(format!(
                "webhook target {} has no secret: create it (outboxd webhook create) or set webhook.secret",
                shown_url(url)
            ))),
        }
    }

    async fn post(
        &self,
        app: uuid::Uuid,
        url: &str,
        body: Vec<u8>,
        event_id: &str,
    ) -> Result<StatusCode, HandlerError> {
        let uri: hyper::Uri = url.parse().map_err(|e| {
            HandlerError::permanent(format!("webhook URL {:?} is invalid: {e}", shown_url(url)))
        })?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(HandlerError::permanent(format!(
                    "webhook URL {:?} must be http:// or https://",
                    shown_url(url)
                )));
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| {
                HandlerError::permanent(format!("webhook URL {:?} has no host", shown_url(url)))
            })?
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let timestamp = chrono::Utc::now().timestamp();
        let signed = self.sign(app, url, timestamp, &body).await?;
        let request = Request::post(path)
            .header(hyper::header::HOST, format!("{host}:{port}"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header("outboxd-signature", signed)
            .header("outboxd-event-id", event_id)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| HandlerError::permanent(format!("building the request: {e}")))?;
        // An IPv6 literal is bracketed in the URL and the Host header, not
        // for the resolver.
        let address = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let resolved: Vec<std::net::SocketAddr> = tokio::net::lookup_host((address.as_str(), port))
            .await
            .map_err(|e| HandlerError::retry(format!("resolving {host}: {e}")))?
            .collect();
        if !self.private_networks
            && let Some(private) = resolved.iter().find(|a| !is_public(a.ip()))
        {
            return Err(HandlerError::permanent(format!(
                "{host} is {}, not a public address, and webhook.allow_private_networks is off",
                private.ip()
            )));
        }
        let tcp = TcpStream::connect(&resolved[..])
            .await
            .map_err(|e| HandlerError::retry(format!("connecting to {host}:{port}: {e}")))?;
        let response = if https {
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(address)
                .map_err(|e| HandlerError::permanent(format!("TLS name {host:?}: {e}")))?;
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| HandlerError::retry(format!("TLS with {host}: {e}")))?;
            send(TokioIo::new(tls), request).await?
        } else {
            send(TokioIo::new(tcp), request).await?
        };
        Ok(response)
    }
}

/// Whether `ip` is an address of the public internet: not loopback,
/// private (RFC 1918, IPv6 unique local), link-local, shared (100.64/10),
/// unspecified, broadcast, multicast, documentation or benchmarking, nor an
/// IPv4 address of one of those mapped into IPv6.
fn is_public(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (18..20).contains(&b))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let [first, second, ..] = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || (first == 0x2001 && second == 0x0db8))
        }
    }
}

/// How much of a receiver's answer is read, in bytes.
const ANSWER_READ_AT_MOST: usize = 16 * 1024;

/// How long a receiver's answer is read at most, once its status is in.
const ANSWER_READ_FOR_AT_MOST: Duration = Duration::from_secs(1);

async fn send<T>(io: T, request: Request<Full<Bytes>>) -> Result<StatusCode, HandlerError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| HandlerError::retry(format!("HTTP handshake: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| HandlerError::retry(format!("webhook request: {e}")))?;
    let status = response.status();
    // Only the status counts. A little of the answer is read, for a second
    // at most, so that a short one ends cleanly; the rest is dropped with
    // the connection (a receiver's answer of any size was held in memory
    // whole, and a slow one would have turned a success into a timeout).
    let _ = tokio::time::timeout(
        ANSWER_READ_FOR_AT_MOST,
        http_body_util::Limited::new(response.into_body(), ANSWER_READ_AT_MOST).collect(),
    )
    .await;
    Ok(status)
}

/// `url` as errors, logs and dead letters show it (see
/// [`outbox_core::topics::shown`]): scheme, host and port.
fn shown_url(url: &str) -> String {
    let topic = format!("{PREFIX}{url}");
    let shown = outbox_core::topics::shown(&topic);
    shown.strip_prefix(PREFIX).unwrap_or(&shown).to_owned()
}

/// Maps a response status to the outcome; errors name `url` by scheme,
/// host and port.
pub fn classify(status: StatusCode, url: &str) -> Result<(), HandlerError> {
    let url = shown_url(url);
    match status.as_u16() {
        200..=299 => Ok(()),
        408 | 429 => Err(HandlerError::retry(format!("{url} answered {status}"))),
        400..=499 => Err(HandlerError::permanent(format!("{url} answered {status}"))),
        _ => Err(HandlerError::retry(format!("{url} answered {status}"))),
    }
}

impl Handler for Webhook {
    fn handle(&self, event: Event) -> HandlerFuture {
        let this = self.clone();
        Box::pin(async move {
            let url = event
                .topic
                .strip_prefix(PREFIX)
                .unwrap_or(&event.topic)
                .to_owned();
            let body = serde_json::to_vec(&serde_json::json!({
                "id": event.id,
                "topic": event.topic,
                "source": event.source,
                "op": event.op,
                "payload": event.payload,
                "attempt": event.attempt,
            }))
            .map_err(|e| HandlerError::permanent(format!("encoding: {e}")))?;
            let status = tokio::time::timeout(
                this.timeout,
                this.post(event.app_id, &url, body, &event.id.to_string()),
            )
            .await
            .map_err(|_| {
                HandlerError::retry(format!(
                    "{} did not answer within {:?}",
                    shown_url(&url),
                    this.timeout
                ))
            })??;
            classify(status, &url)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_addresses_are_told_from_the_others() {
        for (ip, public) in [
            ("93.184.216.34", true),
            ("2606:2800:220:1::1", true),
            ("::ffff:93.184.216.34", true),
            ("127.0.0.1", false),
            ("10.1.2.3", false),
            ("172.16.0.1", false),
            ("192.168.1.1", false),
            ("169.254.169.254", false),
            ("100.64.0.1", false),
            ("0.0.0.0", false),
            ("::1", false),
            ("fd00::1", false),
            ("fe80::1", false),
            ("::ffff:127.0.0.1", false),
        ] {
            let parsed: Result<std::net::IpAddr, _> = ip.parse();
            assert_eq!(parsed.map(is_public), Ok(public), "{ip}");
        }
    }

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_and_body() {
        // HMAC-SHA256("key", "1.{}") computed independently.
        let sig = signature(b"key", 1, b"{}");
        assert!(sig.starts_with("t=1,v1="));
        assert_eq!(sig.len(), "t=1,v1=".len() + 64);
        assert_ne!(sig, signature(b"other", 1, b"{}"));
        assert_ne!(sig, signature(b"key", 2, b"{}"));
    }

    #[test]
    fn statuses_map_to_outcomes() {
        assert!(classify(StatusCode::NO_CONTENT, "u").is_ok());
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, "u"),
            Err(HandlerError::Permanent(_))
        ));
        assert!(matches!(
            classify(StatusCode::REQUEST_TIMEOUT, "u"),
            Err(HandlerError::Retry(_))
        ));
        assert!(matches!(
            classify(StatusCode::TOO_MANY_REQUESTS, "u"),
            Err(HandlerError::Retry(_))
        ));
        assert!(matches!(
            classify(StatusCode::BAD_GATEWAY, "u"),
            Err(HandlerError::Retry(_))
        ));
    }
}
