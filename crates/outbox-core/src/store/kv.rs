//! The KV store. A write changes the entry and inserts one outbox row per
//! enabled KV trigger whose collection glob and ops match — in the caller's
//! transaction, so the entry and its trigger rows commit or roll back together.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::model::{NewEvent, Source};
use crate::{Error, enqueue_batch};

/// A stored entry.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Entry {
    /// Collection name.
    pub collection: String,
    /// Key within the collection.
    pub key: String,
    /// The value.
    pub value: Value,
    /// Bumped on every write; pass it back as `expected_version`.
    pub version: i64,
    /// Last write.
    pub updated_at: DateTime<Utc>,
}

/// A write's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Written {
    /// The entry's version after the write (for a delete, the deleted version).
    pub version: i64,
    /// The outbox rows the write fired, one per matching trigger.
    pub fired: Vec<Uuid>,
}

/// Who writes and how deep in a trigger chain.
#[derive(Debug, Clone, Default)]
pub struct WriteContext {
    /// The writer's trigger-chain depth: 0 for a client, the handler's event depth + 1
    /// for a write made by a handler.
    pub depth: i32,
}

fn check(collection: &str, key: &str) -> Result<(), Error> {
    let bad = |field: &'static str, reason: &str| Err(Error::invalid(field, reason.to_owned()));
    if collection.is_empty() || collection.len() > 255 || collection.contains('\0') {
        return bad("collection", "must be 1 to 255 bytes without NUL");
    }
    if collection.contains('*') {
        return bad(
            "collection",
            "must not contain '*' (globs are for triggers)",
        );
    }
    if key.is_empty() || key.len() > 512 || key.contains('\0') {
        return bad("key", "must be 1 to 512 bytes without NUL");
    }
    Ok(())
}

/// Reads an entry.
pub async fn get<'e>(
    conn: impl sqlx::PgExecutor<'e>,
    app_id: Uuid,
    collection: &str,
    key: &str,
) -> Result<Option<Entry>, Error> {
    Ok(sqlx::query_as(
        "SELECT collection, key, value, version, updated_at FROM kv_entries
         WHERE app_id = $1 AND collection = $2 AND key = $3",
    )
    .bind(app_id)
    .bind(collection)
    .bind(key)
    .fetch_optional(conn)
    .await?)
}

/// Writes an entry. `expected_version`: `None` writes unconditionally, `Some(0)`
/// only creates, `Some(v)` only replaces version `v`. A failed expectation is
/// [`Error::Conflict`] and changes nothing.
pub async fn put(
    conn: &mut PgConnection,
    app_id: Uuid,
    collection: &str,
    key: &str,
    value: &Value,
    expected_version: Option<i64>,
    ctx: &WriteContext,
) -> Result<Written, Error> {
    check(collection, key)?;
    crate::model::check_storable_json("value", value)?;
    let version: Option<i64> =
        match expected_version {
            None => sqlx::query_scalar(
                "INSERT INTO kv_entries (app_id, collection, key, value) VALUES ($1, $2, $3, $4)
             ON CONFLICT (app_id, collection, key) DO UPDATE
                SET value = EXCLUDED.value, version = kv_entries.version + 1, updated_at = now()
             RETURNING version",
            )
            .bind(app_id)
            .bind(collection)
            .bind(key)
            .bind(value)
            .fetch_optional(&mut *conn)
            .await?,
            Some(0) => sqlx::query_scalar(
                "INSERT INTO kv_entries (app_id, collection, key, value) VALUES ($1, $2, $3, $4)
             ON CONFLICT (app_id, collection, key) DO NOTHING
             RETURNING version",
            )
            .bind(app_id)
            .bind(collection)
            .bind(key)
            .bind(value)
            .fetch_optional(&mut *conn)
            .await?,
            Some(expected) => {
                sqlx::query_scalar(
                    "UPDATE kv_entries SET value = $4, version = version + 1, updated_at = now()
             WHERE app_id = $1 AND collection = $2 AND key = $3 AND version = $5
             RETURNING version",
                )
                .bind(app_id)
                .bind(collection)
                .bind(key)
                .bind(value)
                .bind(expected)
                .fetch_optional(&mut *conn)
                .await?
            }
        };
    let version = version.ok_or_else(|| {
        Error::Conflict(format!(
            "{collection}/{key} is not at version {}",
            expected_version.unwrap_or_default()
        ))
    })?;
    let fired = fire(
        conn,
        app_id,
        collection,
        key,
        "put",
        Some(value),
        version,
        ctx,
    )
    .await?;
    Ok(Written { version, fired })
}

/// Deletes an entry (optionally only at `expected_version`); `Ok(None)` when
/// there was nothing to delete.
pub async fn delete(
    conn: &mut PgConnection,
    app_id: Uuid,
    collection: &str,
    key: &str,
    expected_version: Option<i64>,
    ctx: &WriteContext,
) -> Result<Option<Written>, Error> {
    check(collection, key)?;
    let version: Option<i64> = sqlx::query_scalar(
        "DELETE FROM kv_entries
         WHERE app_id = $1 AND collection = $2 AND key = $3 AND ($4::int8 IS NULL OR version = $4)
         RETURNING version",
    )
    .bind(app_id)
    .bind(collection)
    .bind(key)
    .bind(expected_version)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(version) = version else {
        if expected_version.is_some() && get(conn, app_id, collection, key).await?.is_some() {
            return Err(Error::Conflict(format!(
                "{collection}/{key} is not at version {}",
                expected_version.unwrap_or_default()
            )));
        }
        return Ok(None);
    };
    let fired = fire(conn, app_id, collection, key, "delete", None, version, ctx).await?;
    Ok(Some(Written { version, fired }))
}

/// Every prefix of a collection name: what `prefix:*` triggers can match.
fn prefixes(collection: &str) -> Vec<&str> {
    collection
        .char_indices()
        .map(|(i, c)| &collection[..i + c.len_utf8()])
        .collect()
}

#[allow(clippy::too_many_arguments)]
async fn fire(
    conn: &mut PgConnection,
    app_id: Uuid,
    collection: &str,
    key: &str,
    op: &str,
    value: Option<&Value>,
    version: i64,
    ctx: &WriteContext,
) -> Result<Vec<Uuid>, Error> {
    let matching: Vec<(Uuid, String, Option<String>)> = sqlx::query_as(
        "SELECT t.id, t.target, t.registered_by_principal
         FROM kv_trigger_details d JOIN triggers t ON t.id = d.trigger_id
         WHERE d.app_id = $1 AND t.enabled AND $2 = ANY(d.ops)
           AND ((d.match_kind = 'all' AND d.match_value = '')
             OR (d.match_kind = 'exact' AND d.match_value = $3)
             OR (d.match_kind = 'prefix' AND d.match_value = ANY($4)))
         ORDER BY t.created_at, t.id",
    )
    .bind(app_id)
    .bind(op)
    .bind(collection)
    .bind(prefixes(collection))
    .fetch_all(&mut *conn)
    .await?;
    if matching.is_empty() {
        return Ok(Vec::new());
    }
    let payload = json!({ "collection": collection, "key": key, "op": op, "value": value, "version": version });
    let events: Vec<NewEvent> = matching
        .into_iter()
        .map(|(trigger_id, target, principal)| {
            let mut event = NewEvent::new(target.clone(), payload.clone()).with_source(Source::Kv);
            event.op = op.to_owned();
            event.trigger_id = Some(trigger_id);
            event.target = Some(target);
            event.depth = ctx.depth;
            event.registered_by_principal = principal;
            event
        })
        .collect();
    // A target written before the rules for a topic: say which trigger
    // refuses the write, not only what is wrong with a topic the writer
    // never named.
    for event in &events {
        if let Err(Error::Invalid { reason, .. }) = crate::topics::validate_new_topic(&event.topic)
        {
            return Err(Error::invalid(
                "trigger",
                format!(
                    "the KV trigger {} writes its rows to {:?}, which is refused ({reason}): delete the trigger and create it with a valid target",
                    event.trigger_id.unwrap_or_default(),
                    event.topic
                ),
            ));
        }
    }
    enqueue_batch(conn, app_id, &events).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefixes_cover_every_leading_substring() {
        assert_eq!(super::prefixes("ab:c"), vec!["a", "ab", "ab:", "ab:c"]);
        assert_eq!(super::prefixes("é1"), vec!["é", "é1"]);
    }
}
