//! The row model: what producers enqueue, what dispatchers claim, and what
//! exhausted rows become.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::Error;

/// Where a row came from. Every source writes rows of the same shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A KV write fired a trigger.
    Kv,
    /// A cron trigger ticked.
    Cron,
    /// An event published to a topic.
    Pubsub,
    /// A job enqueued for a named queue (the default for library enqueues).
    Queue,
    /// A dead-letter trigger's work.
    DeadLetter,
    /// Reserved for e-mail delivery.
    Email,
    /// A message consumed from NATS.
    Nats,
}

impl Source {
    /// The value stored in the `source` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kv => "kv",
            Self::Cron => "cron",
            Self::Pubsub => "pubsub",
            Self::Queue => "queue",
            Self::DeadLetter => "dead_letter",
            Self::Email => "email",
            Self::Nats => "nats",
        }
    }
}

impl std::str::FromStr for Source {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "kv" => Self::Kv,
            "cron" => Self::Cron,
            "pubsub" => Self::Pubsub,
            "queue" => Self::Queue,
            "dead_letter" => Self::DeadLetter,
            "email" => Self::Email,
            "nats" => Self::Nats,
            other => {
                return Err(Error::invalid(
                    "source",
                    format!(
                        "{other:?} is not one of kv, cron, pubsub, queue, dead_letter, email, nats"
                    ),
                ));
            }
        })
    }
}

/// Longest accepted topic, idempotency, ordering or partition key, in
/// characters (the schema's checks count characters too).
pub const MAX_KEY_LEN: usize = 255;

/// An event to enqueue. Build it with [`NewEvent::new`] and the `with_*` methods.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Routing key: dispatchers pick the handler by topic.
    pub topic: String,
    /// The event body.
    pub payload: Value,
    /// Where the row came from; [`Source::Queue`] unless set.
    pub source: Source,
    /// The operation for sources that have one (e.g. `put`/`delete` for KV).
    pub op: String,
    /// Trace and tenant headers (`correlation-id`, `traceparent`, ...), a JSON object.
    pub headers: Value,
    /// Not due before this time; `None` means now (the database clock).
    pub run_at: Option<DateTime<Utc>>,
    /// A second enqueue with the same key, while the first row exists, returns the first id.
    pub idempotency_key: Option<String>,
    /// Rows of one app with the same key run one at a time, in enqueue order.
    pub ordering_key: Option<String>,
    /// The value a topic's per-key concurrency limit counts by (a customer,
    /// a tenant): at most `max_running_per_key` rows of one key run at once,
    /// in no strict order (migration 0024). No effect without such a limit.
    pub partition_key: Option<String>,
    /// Attempts before dead-lettering; `None` uses the dispatcher's default.
    pub max_attempts: Option<i32>,
    /// Trigger-chain depth; handlers that enqueue pass their event's depth + 1.
    pub depth: i32,
    /// The trigger that produced the row, if any.
    pub trigger_id: Option<Uuid>,
    /// What runs the row when it is not routed by topic.
    pub target: Option<String>,
    /// Inbox of a synchronous caller; its presence means "do not retry".
    pub reply_to: Option<String>,
    /// The principal the work runs as.
    pub registered_by_principal: Option<String>,
    /// 0 (the default) to [`MAX_PRIORITY`]: a row of priority `p` is claimed
    /// as if it had been due `p` × [`PRIORITY_STEP_SECS`] earlier, so higher
    /// priorities run first and lower ones still age in (migration 0022).
    pub priority: i16,
}

/// The highest priority.
pub const MAX_PRIORITY: i16 = 9;

/// The earliest `run_at` a row may have (1970-01-01, UTC).
pub const MIN_RUN_AT: DateTime<Utc> = DateTime::UNIX_EPOCH;

/// The end of the years a `run_at` may fall in (10000-01-01, UTC, not
/// included): the database refuses later ones (migration 0039), which
/// clients could not read back.
pub fn run_at_end() -> DateTime<Utc> {
    DateTime::from_timestamp(253_402_300_800, 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// A time read from a page cursor (`micros` since the epoch), when it lies
/// within the years rows are stored in ([`MIN_RUN_AT`] to [`run_at_end`]):
/// no row lies outside them, and PostgreSQL refuses times before 4713 BC,
/// which the text of a cursor can name.
pub fn cursor_time(micros: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros).filter(|t| *t >= MIN_RUN_AT && *t < run_at_end())
}

/// How many seconds earlier each step of priority makes a row look due.
pub const PRIORITY_STEP_SECS: i64 = 10;

impl NewEvent {
    /// An event for `topic` with `payload`, due now, with default options.
    pub fn new(topic: impl Into<String>, payload: Value) -> Self {
        Self {
            topic: topic.into(),
            payload,
            source: Source::Queue,
            op: String::new(),
            headers: Value::Object(Default::default()),
            run_at: None,
            idempotency_key: None,
            ordering_key: None,
            partition_key: None,
            max_attempts: None,
            depth: 0,
            trigger_id: None,
            target: None,
            reply_to: None,
            registered_by_principal: None,
            priority: 0,
        }
    }

    /// Sets the priority (0 to [`MAX_PRIORITY`]; see [`NewEvent::priority`]).
    pub fn with_priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the due time (a delay).
    pub fn with_run_at(mut self, run_at: DateTime<Utc>) -> Self {
        self.run_at = Some(run_at);
        self
    }

    /// Sets the idempotency key.
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Sets the ordering key.
    pub fn with_ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// Sets the partition key (see [`NewEvent::partition_key`]).
    pub fn with_partition_key(mut self, key: impl Into<String>) -> Self {
        self.partition_key = Some(key.into());
        self
    }

    /// Sets the maximum number of attempts.
    pub fn with_max_attempts(mut self, max_attempts: i32) -> Self {
        self.max_attempts = Some(max_attempts);
        self
    }

    /// Sets the headers (a JSON object).
    pub fn with_headers(mut self, headers: Value) -> Self {
        self.headers = headers;
        self
    }

    /// Sets the source.
    pub fn with_source(mut self, source: Source) -> Self {
        self.source = source;
        self
    }

    /// Checks the limits the schema enforces, so callers get a named error
    /// instead of a constraint violation.
    pub fn validate(&self) -> Result<(), Error> {
        crate::topics::validate_new_topic(&self.topic)?;
        check_key("idempotency_key", self.idempotency_key.as_deref())?;
        check_key("ordering_key", self.ordering_key.as_deref())?;
        check_key("partition_key", self.partition_key.as_deref())?;
        if let Some(max) = self.max_attempts
            && max < 1
        {
            return Err(Error::invalid(
                "max_attempts",
                format!("{max} is below the minimum of 1"),
            ));
        }
        if self.depth < 0 {
            return Err(Error::invalid("depth", "must not be negative"));
        }
        if !(0..=MAX_PRIORITY).contains(&self.priority) {
            return Err(Error::invalid(
                "priority",
                format!(
                    "is {}; it must be between 0 and {MAX_PRIORITY}",
                    self.priority
                ),
            ));
        }
        // A priority stores run_at earlier by its tens of seconds, and the
        // stored value must fall in the range too.
        let moved_back = chrono::Duration::seconds(i64::from(self.priority.max(0)) * 10);
        if let Some(at) = self.run_at
            && !(MIN_RUN_AT + moved_back..run_at_end()).contains(&at)
        {
            return Err(Error::invalid(
                "run_at",
                format!("is {at}; it must fall in the years 1970 to 9999 (UTC)"),
            ));
        }
        if !self.headers.is_object() {
            return Err(Error::invalid("headers", "must be a JSON object"));
        }
        check_storable_json("payload", &self.payload)?;
        check_storable_json("headers", &self.headers)?;
        Ok(())
    }
}

/// PostgreSQL's `jsonb` cannot hold the character U+0000 in a string or a
/// key; refuse it by name instead of failing the insert.
pub(crate) fn check_storable_json(field: &'static str, value: &Value) -> Result<(), Error> {
    fn has_nul(value: &Value) -> bool {
        match value {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().any(has_nul),
            Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
            _ => false,
        }
    }
    if has_nul(value) {
        return Err(Error::invalid(
            field,
            "must not contain \\u0000 (PostgreSQL jsonb cannot store it)",
        ));
    }
    Ok(())
}

pub(crate) fn check_key(field: &'static str, value: Option<&str>) -> Result<(), Error> {
    match value {
        Some("") => Err(Error::invalid(field, "must not be empty")),
        // Characters, as the table's check and outbox_enqueue() count them:
        // a topic of 200 "é" that plain SQL wrote must stay reachable.
        Some(v) if v.chars().count() > MAX_KEY_LEN => Err(Error::invalid(
            field,
            format!(
                "is {} characters; at most {MAX_KEY_LEN} are accepted",
                v.chars().count()
            ),
        )),
        Some(v) if v.contains('\0') => Err(Error::invalid(field, "must not contain NUL")),
        _ => Ok(()),
    }
}

/// A tenant. Every row is scoped by its app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct App {
    /// Primary key.
    pub id: Uuid,
    /// Unique, URL-safe name used by the CLI, the API and `outbox_enqueue()`.
    pub slug: String,
    /// Display name.
    pub name: String,
    /// When the app was created.
    pub created_at: DateTime<Utc>,
    /// Set while the app is suspended: its rows wait, its messages are dead-lettered.
    pub suspended_at: Option<DateTime<Utc>>,
}

/// A row a dispatcher has claimed: the event plus its lease.
///
/// Decoded by column position (see `store::outbox`), in field order.
#[derive(Debug, Clone)]
pub struct ClaimedEvent {
    /// The outbox id (UUIDv7); also the NATS `Nats-Msg-Id`.
    pub id: Uuid,
    /// The tenant.
    pub app_id: Uuid,
    /// Where the row came from (`kv`, `queue`, ...).
    pub source: String,
    /// Source-specific operation.
    pub op: String,
    /// Routing key.
    pub topic: String,
    /// The trigger that produced the row, if any.
    pub trigger_id: Option<Uuid>,
    /// What runs the row when it is not routed by topic.
    pub target: Option<String>,
    /// The event body.
    pub payload: Value,
    /// Trace and tenant headers.
    pub headers: Value,
    /// Idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// Ordering key, if any.
    pub ordering_key: Option<String>,
    /// Trigger-chain depth.
    pub depth: i32,
    /// Attempts so far, this one included (incremented at claim).
    pub attempt_count: i32,
    /// Per-row attempt limit; `None` means the dispatcher's default.
    pub max_attempts: Option<i32>,
    /// Fencing token of this claim; completions must present it.
    pub lease_token: i64,
    /// When the lease expires unless heartbeated (database clock).
    pub locked_until: Option<DateTime<Utc>>,
    /// First claim time.
    pub first_attempt_at: Option<DateTime<Utc>>,
    /// Synchronous caller's inbox; its presence means "do not retry".
    pub reply_to: Option<String>,
    /// Who the work runs as.
    pub registered_by_principal: Option<String>,
    /// Enqueue time.
    pub created_at: DateTime<Utc>,
    /// When the row became due as stored (a priority moves it earlier):
    /// with `id`, its place in the claim order. `None` for a `run_at` that
    /// is not a finite time (`-infinity` is allowed).
    pub run_at: Option<DateTime<Utc>>,
    /// When the row was due (its delay or backoff over, a priority's move
    /// undone): how long it waited for this attempt is its claim time
    /// minus this. `None` with `run_at`.
    pub due_at: Option<DateTime<Utc>>,
}

impl ClaimedEvent {
    /// The claim this row is held under: what fences its completion.
    pub fn lease(&self) -> Lease {
        Lease {
            id: self.id,
            token: self.lease_token,
        }
    }
}

/// A row id with the fencing token of one claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    /// The outbox id.
    pub id: Uuid,
    /// The token the claim set.
    pub token: i64,
}

/// A row that exhausted its attempts or failed permanently.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    /// Primary key.
    pub id: Uuid,
    /// The tenant.
    pub app_id: Uuid,
    /// The outbox id the row had.
    pub original_event_id: Uuid,
    /// Where the row came from.
    pub source: String,
    /// Source-specific operation.
    pub op: String,
    /// Routing key.
    pub topic: String,
    /// The trigger that produced the row, if any.
    pub trigger_id: Option<Uuid>,
    /// The handler or target that failed.
    pub handler: Option<String>,
    /// The event body.
    pub payload: Value,
    /// The event headers.
    pub headers: Value,
    /// Its row's ordering key (a replay keeps it).
    pub ordering_key: Option<String>,
    /// Its row's partition key (a replay keeps it).
    pub partition_key: Option<String>,
    /// Attempts made.
    pub attempt_count: i32,
    /// First attempt.
    pub first_attempt_at: Option<DateTime<Utc>>,
    /// Last attempt.
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// The last error.
    pub last_error: Option<String>,
    /// When it was dead-lettered.
    pub created_at: DateTime<Utc>,
    /// When it was resolved; set together with `resolution`.
    pub resolved_at: Option<DateTime<Utc>>,
    /// `replayed`, `ignored`, `handled_by_script` or `handler_failed`.
    pub resolution: Option<String>,
    /// The attempts its row was allowed; `None` means the configured default.
    /// A replay starts over with this budget unless told otherwise.
    pub max_attempts: Option<i32>,
    /// Its row's last failed attempts, oldest first (`None`: none recorded).
    #[sqlx(json(nullable))]
    pub attempts: Option<Vec<Attempt>>,
    /// The outbox row a replay made of it (its `replayed_from` points back).
    pub replayed_as: Option<Uuid>,
    /// The dead letter whose replay its row was: the chain back through
    /// replays that failed again.
    pub replay_of: Option<Uuid>,
}

/// A row of the outbox that has not finished, as operators inspect it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct OutboxRow {
    /// Primary key (also the NATS message id).
    pub id: Uuid,
    /// The tenant.
    pub app_id: Uuid,
    /// `running` (a handler holds its lease), `retrying` (a failed attempt
    /// waits for its backoff), `scheduled` (due later) or `due`.
    pub state: String,
    /// Where the row came from.
    pub source: String,
    /// Source-specific operation.
    pub op: String,
    /// Routing key.
    pub topic: String,
    /// The trigger that produced the row, if any.
    pub trigger_id: Option<Uuid>,
    /// Where a trigger's row goes (a handler topic, `nats:`, `webhook:`).
    pub target: Option<String>,
    /// The event body.
    pub payload: Value,
    /// The event headers.
    pub headers: Value,
    /// Deduplicates enqueues while the row lives.
    pub idempotency_key: Option<String>,
    /// Rows with the same key run one at a time, in order.
    pub ordering_key: Option<String>,
    /// The key of per-key concurrency limits.
    pub partition_key: Option<String>,
    /// Higher runs first within its app.
    pub priority: i16,
    /// Position in a trigger chain.
    pub depth: i32,
    /// Attempts started.
    pub attempt_count: i32,
    /// Its attempt budget; `None` means the configured default.
    pub max_attempts: Option<i32>,
    /// When it is (or was) due.
    pub due_at: DateTime<Utc>,
    /// The process holding (or that last held) its lease.
    pub locked_by: Option<String>,
    /// When that lease expires.
    pub locked_until: Option<DateTime<Utc>>,
    /// First attempt.
    pub first_attempt_at: Option<DateTime<Utc>>,
    /// Last attempt.
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// The last error.
    pub last_error: Option<String>,
    /// The principal its trigger runs as.
    pub registered_by_principal: Option<String>,
    /// The dead letter it was replayed from.
    pub replayed_from: Option<Uuid>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// Its last failed attempts, oldest first (`None`: none recorded).
    #[sqlx(json(nullable))]
    pub attempts: Option<Vec<Attempt>>,
}

/// One failed attempt of a row, as its attempt history keeps it (migration
/// 0026). An attempt number missing from a history had no outcome written:
/// its process stopped or its lease expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// The attempt's number, from 1.
    pub attempt: i32,
    /// When it was claimed (lease mode) or its handler started
    /// (transactional mode).
    pub started_at: Option<DateTime<Utc>>,
    /// When its failure was written.
    pub ended_at: DateTime<Utc>,
    /// The process that ran it (`dispatcher.worker_id`).
    pub worker: Option<String>,
    /// Why it failed, cut to `dispatcher.attempt_error_chars`.
    pub error: Option<String>,
}

impl DeadLetter {
    /// What the dashboard and the CLI show as its state: `unresolved`, or
    /// its resolution.
    pub fn state(&self) -> &str {
        self.resolution.as_deref().unwrap_or("unresolved")
    }

    /// The last error shortened to at most `max` characters at a word
    /// boundary (see [`crate::text::ellipsize`]), for a row of a list.
    pub fn error_summary(&self, max: usize) -> String {
        crate::text::ellipsize(self.last_error.as_deref().unwrap_or(""), max)
    }
}

#[cfg(test)]
mod tests;
