//! Apps (tenants).

use sqlx::PgExecutor;
use uuid::Uuid;

use crate::{App, Error};

/// Creates an app, or returns the existing one with this slug.
pub async fn ensure<'e>(db: impl PgExecutor<'e>, slug: &str, name: &str) -> Result<App, Error> {
    validate_slug(slug)?;
    let app = sqlx::query_as(
        "INSERT INTO apps (slug, name) VALUES ($1, $2)
         ON CONFLICT (slug) DO UPDATE SET slug = EXCLUDED.slug
         RETURNING id, slug, name, created_at, suspended_at",
    )
    .bind(slug)
    .bind(name)
    .fetch_one(db)
    .await?;
    Ok(app)
}

/// Finds an app by slug.
///
/// Unprepared (an unnamed statement), like enqueue: producers call it, and a
/// producer's connection may pass through a transaction-pooling PgBouncer.
pub async fn by_slug<'e>(db: impl PgExecutor<'e>, slug: &str) -> Result<App, Error> {
    sqlx::query_as("SELECT id, slug, name, created_at, suspended_at FROM apps WHERE slug = $1")
        .persistent(false)
        .bind(slug)
        .fetch_optional(db)
        .await?
        .ok_or_else(|| Error::UnknownApp(slug.to_owned()))
}

/// Finds an app by id.
pub async fn by_id<'e>(db: impl PgExecutor<'e>, id: Uuid) -> Result<App, Error> {
    sqlx::query_as("SELECT id, slug, name, created_at, suspended_at FROM apps WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await?
        .ok_or_else(|| Error::UnknownApp(id.to_string()))
}

/// Lists all apps by slug.
pub async fn list<'e>(db: impl PgExecutor<'e>) -> Result<Vec<App>, Error> {
    Ok(
        sqlx::query_as("SELECT id, slug, name, created_at, suspended_at FROM apps ORDER BY slug")
            .fetch_all(db)
            .await?,
    )
}

/// Suspends (`true`) or resumes (`false`) an app: a suspended app's rows wait.
pub async fn set_suspended<'e>(
    db: impl PgExecutor<'e>,
    slug: &str,
    suspended: bool,
) -> Result<App, Error> {
    sqlx::query_as(
        "UPDATE apps SET suspended_at = CASE WHEN $2 THEN coalesce(suspended_at, now()) END
         WHERE slug = $1
         RETURNING id, slug, name, created_at, suspended_at",
    )
    .bind(slug)
    .bind(suspended)
    .fetch_optional(db)
    .await?
    .ok_or_else(|| Error::UnknownApp(slug.to_owned()))
}

/// The reserved app that holds, as dead letters, the messages the consumer
/// runtime could not route to an app (migration 0030); only instance
/// admins see it.
pub const UNROUTED_SLUG: &str = "_unrouted";

/// Checks a slug against the schema's rule, with a message that says the rule.
pub fn validate_slug(slug: &str) -> Result<(), Error> {
    let ok = !slug.is_empty()
        && slug.len() <= 63
        && slug
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && slug
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "slug",
            format!("{slug:?}: use 1-63 of a-z, 0-9, '_' and '-', starting with a letter or digit"),
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn slugs() {
        for good in ["demo", "a", "shop-1", "x_y"] {
            assert!(super::validate_slug(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "Demo", "a b", "a;drop", &"a".repeat(64)] {
            assert!(super::validate_slug(bad).is_err(), "{bad}");
        }
    }
}
