//! Triggers: a parent row per trigger, details per kind. Creation validates
//! everything (glob, ops, cron expression, target) with errors that say what
//! is accepted.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::Error;
use crate::cron::next_tick_in;

/// What a new trigger listens to.
#[derive(Debug, Clone, PartialEq)]
pub enum TriggerSpec {
    /// KV writes to collections matching `collection` (`*`, `prefix:*`, or an
    /// exact name) with one of `ops` (`put`, `delete`).
    Kv {
        /// The collection glob.
        collection: String,
        /// The operations.
        ops: Vec<String>,
    },
    /// A cron schedule (5 fields, or 6 with seconds) in an IANA time zone.
    Cron {
        /// The cron expression.
        schedule: String,
        /// The zone the schedule is read in (`UTC`, `Europe/Paris`, ...).
        timezone: String,
    },
    /// Dead letters of these sources / topics / triggers (empty: any).
    DeadLetter {
        /// Sources to match.
        sources: Vec<String>,
        /// Topics to match.
        topics: Vec<String>,
        /// Triggers to match.
        trigger_ids: Vec<Uuid>,
    },
}

/// A trigger as listed.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Trigger {
    /// Primary key.
    pub id: Uuid,
    /// `kv`, `cron` or `dead_letter`.
    pub kind: String,
    /// Unique per app.
    pub name: String,
    /// Disabled triggers fire nothing.
    pub enabled: bool,
    /// The handler that runs its rows.
    pub target: String,
    /// Who registered it; its work runs as this principal.
    pub registered_by_principal: Option<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// KV: the collection glob.
    pub collection_glob: Option<String>,
    /// KV: the operations.
    pub ops: Option<Vec<String>>,
    /// Cron: the expression.
    pub schedule: Option<String>,
    /// Cron: the zone the schedule is read in.
    pub timezone: Option<String>,
    /// Cron: the next due tick.
    pub next_fire_at: Option<DateTime<Utc>>,
    /// Dead letters: the sources it takes (empty: every source).
    pub sources: Option<Vec<String>>,
    /// Dead letters: the topics it takes (empty: every topic).
    pub topics: Option<Vec<String>>,
    /// Dead letters: the triggers whose dead letters it takes (empty: any).
    pub trigger_ids: Option<Vec<Uuid>>,
}

impl Trigger {
    /// What a dead-letter trigger takes, in words: "dead letters of topics
    /// a, b from sources s of triggers t", each part only when it narrows;
    /// `None` for other kinds.
    pub fn dead_letter_matches(&self) -> Option<String> {
        if self.kind != "dead_letter" {
            return None;
        }
        let mut said = "dead letters".to_owned();
        let trigger_ids: Vec<String> = self
            .trigger_ids
            .iter()
            .flatten()
            .map(Uuid::to_string)
            .collect();
        for (words, values) in [
            ("of topics", self.topics.clone().unwrap_or_default()),
            ("from sources", self.sources.clone().unwrap_or_default()),
            ("of triggers", trigger_ids),
        ] {
            if !values.is_empty() {
                said.push_str(&format!(" {words} {}", values.join(", ")));
            }
        }
        Some(said)
    }
}

/// The name of the app's trigger `id`.
pub async fn name<'e>(db: impl PgExecutor<'e>, app_id: Uuid, id: Uuid) -> Result<String, Error> {
    sqlx::query_scalar("SELECT name FROM triggers WHERE app_id = $1 AND id = $2")
        .bind(app_id)
        .bind(id)
        .fetch_optional(db)
        .await?
        .ok_or_else(|| Error::NotFound(format!("trigger {id}")))
}

/// The most entries a dead-letter trigger's list of sources, topics or
/// triggers takes: a filter, not a data set.
pub const MAX_DEAD_LETTER_MATCHES: usize = 100;

/// The longest cron schedule kept: six fields with lists fit many times over.
const MAX_SCHEDULE_BYTES: usize = 255;

/// Parses a collection glob into (match_kind, match_value).
pub fn parse_glob(glob: &str) -> Result<(&'static str, String), Error> {
    let bad = |reason: &str| {
        Err(Error::invalid(
            "collection",
            format!("{glob:?}: {reason}; use \"*\", \"prefix:*\" or an exact name"),
        ))
    };
    if glob.is_empty() || glob.len() > 255 {
        return bad("must be 1 to 255 bytes");
    }
    if glob.contains('\0') || crate::topics::first_unprintable(glob).is_some() {
        return bad("must not contain control characters");
    }
    if glob == "*" {
        return Ok(("all", String::new()));
    }
    match glob.find('*') {
        None => Ok(("exact", glob.to_owned())),
        Some(i) if i == glob.len() - 1 => Ok(("prefix", glob[..i].to_owned())),
        Some(_) => bad("'*' may only end the glob"),
    }
}

fn validate_name_target(name: &str, target: &str) -> Result<(), Error> {
    // Characters, as the table's checks count them.
    if name.is_empty() || name.chars().count() > 100 {
        return Err(Error::invalid("name", "must be 1 to 100 characters"));
    }
    crate::topics::check_printable("name", name)?;
    if name.trim() != name {
        return Err(Error::invalid(
            "name",
            "must not start or end with whitespace",
        ));
    }
    // A trigger is found by its id or its name, the id first: a name that
    // reads as an id (in any of its spellings) would find another trigger.
    if Uuid::try_parse(name).is_ok() {
        return Err(Error::invalid(
            "name",
            "must not be a UUID: paths take a trigger's id or its name",
        ));
    }
    if target.is_empty() || target.chars().count() > 255 || target.contains(char::is_whitespace) {
        return Err(Error::invalid(
            "target",
            "must be a handler name: 1 to 255 characters, no spaces",
        ));
    }
    crate::topics::check_webhook_prefix_case("target", target)?;
    if let Some(url) = target.strip_prefix(crate::topics::WEBHOOK_PREFIX)
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return Err(Error::invalid(
            "target",
            format!("{target:?}: a webhook target is webhook:http(s)://host/path"),
        ));
    }
    // The target is the topic of every row the trigger writes: a pattern or
    // a control character would be refused at each write, failing the KV
    // write or the cron tick instead of the trigger's creation.
    crate::topics::validate_new_topic(target).map_err(|err| match err {
        Error::Invalid { reason, .. } => Error::invalid("target", reason),
        other => other,
    })
}

/// Creates a trigger in the caller's transaction; returns its id.
pub async fn create(
    conn: &mut PgConnection,
    app_id: Uuid,
    name: &str,
    target: &str,
    principal: Option<&str>,
    spec: &TriggerSpec,
) -> Result<Uuid, Error> {
    validate_name_target(name, target)?;
    let kind = match spec {
        TriggerSpec::Kv { .. } => "kv",
        TriggerSpec::Cron { .. } => "cron",
        TriggerSpec::DeadLetter { .. } => "dead_letter",
    };
    // Validate before writing anything.
    let kv = match spec {
        TriggerSpec::Kv { collection, ops } => {
            let (match_kind, match_value) = parse_glob(collection)?;
            if let Some(bad) = ops.iter().find(|o| *o != "put" && *o != "delete") {
                return Err(Error::invalid(
                    "ops",
                    format!("{bad:?} is not an operation: give put, delete or both"),
                ));
            }
            if ops.is_empty() {
                return Err(Error::invalid("ops", "give put, delete or both"));
            }
            Some((match_kind, match_value))
        }
        _ => None,
    };
    // A topic no row can have would match nothing, silently.
    if let TriggerSpec::DeadLetter {
        sources,
        topics,
        trigger_ids,
    } = spec
    {
        for (field, len) in [
            ("sources", sources.len()),
            ("topics", topics.len()),
            ("trigger_ids", trigger_ids.len()),
        ] {
            if len > MAX_DEAD_LETTER_MATCHES {
                return Err(Error::invalid(
                    field,
                    format!("{len} entries; at most {MAX_DEAD_LETTER_MATCHES} are accepted"),
                ));
            }
        }
        for source in sources {
            if source.is_empty() || source.len() > 255 {
                return Err(Error::invalid(
                    "sources",
                    format!("{source:?}: must be 1 to 255 bytes"),
                ));
            }
            crate::topics::check_printable("sources", source)?;
        }
        // Another app's trigger would match nothing here, silently.
        let known: i64 =
            sqlx::query_scalar("SELECT count(*) FROM triggers WHERE app_id = $1 AND id = ANY ($2)")
                .bind(app_id)
                .bind(trigger_ids)
                .fetch_one(&mut *conn)
                .await?;
        let mut distinct = trigger_ids.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if usize::try_from(known).ok() != Some(distinct.len()) {
            return Err(Error::invalid(
                "trigger_ids",
                "each must be a trigger of this app",
            ));
        }
        for topic in topics {
            crate::topics::validate_topic(topic)
                .and_then(|()| crate::topics::check_printable("topics", topic))
                .map_err(|err| match err {
                    Error::Invalid { reason, .. } => {
                        Error::invalid("topics", format!("{topic:?}: {reason}"))
                    }
                    other => other,
                })?;
        }
    }
    if let TriggerSpec::Cron { schedule, .. } = spec
        && schedule.len() > MAX_SCHEDULE_BYTES
    {
        return Err(Error::invalid(
            "schedule",
            format!(
                "is {} bytes; at most {MAX_SCHEDULE_BYTES} are accepted",
                schedule.len()
            ),
        ));
    }
    // The database's clock, as firing uses: a host whose clock is off would
    // put the first tick as far off.
    let next = match spec {
        TriggerSpec::Cron { schedule, timezone } => {
            let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
                .fetch_one(&mut *conn)
                .await?;
            Some(next_tick_in(schedule, timezone, now)?)
        }
        _ => None,
    };
    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO triggers (app_id, kind, name, target, registered_by_principal)
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(app_id)
    .bind(kind)
    .bind(name)
    .bind(target)
    .bind(principal)
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(d) if d.constraint() == Some("triggers_app_name_key") => {
            Error::Conflict(format!("a trigger named {name:?} exists"))
        }
        _ => Error::Database(e),
    })?;
    match spec {
        TriggerSpec::Kv { collection, ops } => {
            let (match_kind, match_value) = kv.unwrap_or(("exact", String::new()));
            // Each operation once, in a fixed order: ["put", "put"] is "put".
            let ops: Vec<&str> = ["put", "delete"]
                .into_iter()
                .filter(|op| ops.iter().any(|o| o == op))
                .collect();
            sqlx::query(
                "INSERT INTO kv_trigger_details (trigger_id, app_id, collection_glob, match_kind, match_value, ops)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id)
            .bind(app_id)
            .bind(collection)
            .bind(match_kind)
            .bind(match_value)
            .bind(ops)
            .execute(&mut *conn)
            .await?;
        }
        TriggerSpec::Cron { schedule, timezone } => {
            sqlx::query(
                "INSERT INTO cron_trigger_details (trigger_id, schedule, timezone, next_fire_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(id)
            .bind(schedule)
            .bind(timezone)
            .bind(next)
            .execute(&mut *conn)
            .await?;
        }
        TriggerSpec::DeadLetter {
            sources,
            topics,
            trigger_ids,
        } => {
            sqlx::query(
                "INSERT INTO dead_letter_trigger_details (trigger_id, sources, topics, trigger_ids)
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(id)
            .bind(sources)
            .bind(topics)
            .bind(trigger_ids)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(id)
}

/// A trigger with the details of its kind, as [`Trigger`] reads it.
macro_rules! trigger_select {
    () => {
        "SELECT t.id, t.kind, t.name, t.enabled, t.target, t.registered_by_principal, t.created_at,
                k.collection_glob, k.ops, c.schedule, c.timezone, c.next_fire_at,
                d.sources, d.topics, d.trigger_ids
         FROM triggers t
         LEFT JOIN kv_trigger_details k ON k.trigger_id = t.id
         LEFT JOIN cron_trigger_details c ON c.trigger_id = t.id
         LEFT JOIN dead_letter_trigger_details d ON d.trigger_id = t.id
         WHERE t.app_id = $1"
    };
}

/// Lists an app's triggers by name.
pub async fn list<'e>(db: impl PgExecutor<'e>, app_id: Uuid) -> Result<Vec<Trigger>, Error> {
    Ok(
        sqlx::query_as(concat!(trigger_select!(), " ORDER BY t.name"))
            .bind(app_id)
            .fetch_all(db)
            .await?,
    )
}

/// The app's trigger with the id `id_or_name`, or else the one named so (an
/// id wins: a name may look like another trigger's id).
pub async fn find<'e>(
    db: impl PgExecutor<'e>,
    app_id: Uuid,
    id_or_name: &str,
) -> Result<Trigger, Error> {
    sqlx::query_as(concat!(
        trigger_select!(),
        " AND (t.id = $2 OR t.name = $3) ORDER BY t.id = $2 DESC LIMIT 1"
    ))
    .bind(app_id)
    .bind(Uuid::parse_str(id_or_name).ok())
    .bind(id_or_name)
    .fetch_optional(db)
    .await?
    .ok_or_else(|| Error::NotFound(format!("trigger {id_or_name:?}")))
}

/// Enables or disables an app's trigger. A cron trigger enabled again
/// fires at its next tick from now, not at the one it missed while
/// disabled (a nightly job enabled at noon ran at noon); enabling one that
/// is enabled changes nothing. Run it in a transaction: it writes twice.
/// Returns whether the state changed.
pub async fn set_enabled(
    conn: &mut PgConnection,
    app_id: Uuid,
    id: Uuid,
    enabled: bool,
) -> Result<bool, Error> {
    type Changed = (bool, Option<String>, Option<String>, DateTime<Utc>);
    let changed: Option<Changed> = sqlx::query_as(
        "UPDATE triggers t SET enabled = $3
         FROM (SELECT id, enabled FROM triggers WHERE app_id = $1 AND id = $2 FOR UPDATE) was
         WHERE t.id = was.id
         RETURNING was.enabled,
                   (SELECT c.schedule FROM cron_trigger_details c WHERE c.trigger_id = t.id),
                   (SELECT c.timezone FROM cron_trigger_details c WHERE c.trigger_id = t.id),
                   now()",
    )
    .bind(app_id)
    .bind(id)
    .bind(enabled)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((was_enabled, schedule, timezone, now)) = changed else {
        return Err(Error::NotFound(format!("trigger {id}")));
    };
    if let (true, false, Some(schedule), Some(timezone)) =
        (enabled, was_enabled, schedule, timezone)
    {
        // A schedule an earlier version took and this one refuses keeps
        // its tick; the scheduler skips it with a warning.
        if let Ok(next) = next_tick_in(&schedule, &timezone, now) {
            sqlx::query("UPDATE cron_trigger_details SET next_fire_at = $2 WHERE trigger_id = $1")
                .bind(id)
                .bind(next)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(was_enabled != enabled)
}

/// Deletes an app's trigger.
pub async fn delete<'e>(db: impl PgExecutor<'e>, app_id: Uuid, id: Uuid) -> Result<(), Error> {
    let changed = sqlx::query("DELETE FROM triggers WHERE app_id = $1 AND id = $2")
        .bind(app_id)
        .bind(id)
        .execute(db)
        .await?
        .rows_affected();
    if changed == 0 {
        return Err(Error::NotFound(format!("trigger {id}")));
    }
    Ok(())
}

/// A cron trigger whose tick is due.
#[derive(sqlx::FromRow)]
struct DueCron {
    trigger_id: Uuid,
    app_id: Uuid,
    target: String,
    schedule: String,
    timezone: String,
    principal: Option<String>,
    tick: DateTime<Utc>,
}

/// What one pass of [`fire_due_cron`] did.
#[derive(Debug, Default)]
pub struct CronPass {
    /// The outbox ids of the rows the due ticks wrote.
    pub fired: Vec<Uuid>,
    /// Ticks that wrote nothing because their row would be refused (a
    /// target written before the rules for a topic), with the reason; the
    /// trigger moved on to its next tick all the same.
    pub skipped: Vec<SkippedTick>,
}

/// A cron tick that wrote no row.
#[derive(Debug)]
pub struct SkippedTick {
    /// The trigger.
    pub trigger_id: Uuid,
    /// Its app.
    pub app_id: Uuid,
    /// Why its row was refused.
    pub error: Error,
}

/// Enqueues one row per due cron trigger and moves it to its next tick.
/// Each tick's row carries the idempotency key `cron:<trigger>:<tick>`, and
/// due triggers are locked with `SKIP LOCKED`, so several schedulers never
/// enqueue a tick twice. Ticks missed while nothing ran fire once, not once
/// per missed tick. A trigger whose row would be refused skips its tick
/// (see [`CronPass::skipped`]) rather than hold back every other trigger.
pub async fn fire_due_cron(conn: &mut PgConnection, limit: i64) -> Result<CronPass, Error> {
    let due: Vec<DueCron> = sqlx::query_as(
        "SELECT t.id AS trigger_id, t.app_id, t.target, c.schedule, c.timezone,
                t.registered_by_principal AS principal, c.next_fire_at AS tick
         FROM cron_trigger_details c JOIN triggers t ON t.id = c.trigger_id
         WHERE t.enabled AND c.next_fire_at <= now()
         ORDER BY c.next_fire_at
         LIMIT $1
         FOR UPDATE OF c SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *conn)
        .await?;
    let mut pass = CronPass::default();
    for DueCron {
        trigger_id,
        app_id,
        target,
        schedule,
        timezone,
        principal,
        tick,
    } in due
    {
        let mut event = crate::NewEvent::new(
            target.clone(),
            serde_json::json!({ "trigger_id": trigger_id, "scheduled_at": tick }),
        )
        .with_source(crate::Source::Cron)
        .with_idempotency_key(format!("cron:{trigger_id}:{}", tick.timestamp_millis()));
        event.trigger_id = Some(trigger_id);
        event.target = Some(target);
        event.registered_by_principal = principal;
        match event.validate() {
            Ok(()) => pass.fired.push(crate::enqueue(conn, app_id, &event).await?),
            Err(error) => pass.skipped.push(SkippedTick {
                trigger_id,
                app_id,
                error,
            }),
        }
        let next = next_tick_in(&schedule, &timezone, now)?;
        sqlx::query("UPDATE cron_trigger_details SET last_fire_at = $2, next_fire_at = $3 WHERE trigger_id = $1")
            .bind(trigger_id)
            .bind(tick)
            .bind(next)
            .execute(&mut *conn)
            .await?;
    }
    Ok(pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Any text as a schedule, a time zone or a glob is an answer or a
        /// named refusal, never a panic.
        #[test]
        fn schedules_zones_and_globs_never_panic(
            schedule in "([0-9*/,-]{1,4} ){4,6}|.{0,40}",
            zone in "[A-Za-z_/+-]{0,24}",
            glob in ".{0,40}",
        ) {
            if let Err(Error::Invalid { field, .. }) =
                next_tick_in(&schedule, &zone, chrono::Utc::now())
            {
                proptest::prop_assert!(field == "schedule" || field == "timezone");
            }
            let _ = parse_glob(&glob);
        }
    }

    #[test]
    fn globs() {
        assert_eq!(parse_glob("*").ok(), Some(("all", String::new())));
        assert_eq!(
            parse_glob("orders:*").ok(),
            Some(("prefix", "orders:".into()))
        );
        assert_eq!(parse_glob("orders").ok(), Some(("exact", "orders".into())));
        assert!(parse_glob("or*ders").is_err());
        assert!(parse_glob("").is_err());
    }
}
