//! A small social service that uses outboxd as a library: users register
//! and log in, post notes, like notes and follow each other. Every use case
//! writes through a repository and enqueues its domain event **in the same
//! transaction as its data**, so an event exists if and only if the data
//! committed. A handler turns likes and follows into notifications; topics
//! without a handler are relayed to NATS when `NATS_URL` is set.
//!
//! Layout: [`repo`] (SQL, one module per aggregate), [`usecase`] (a
//! transaction per use case: data + event), [`http`] (axum routes and the
//! bearer-token extractor), [`handlers`] (the notification handler).

use outbox_admin::auth::{AuthConfig, Hasher};
use sqlx::PgPool;
use uuid::Uuid;

/// Applies outboxd's migrations, then the service's own. Both record
/// themselves in `_sqlx_migrations`, so the service numbers its files from
/// 1001 and ignores the versions it does not know (outboxd's).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    outbox_core::migrate(pool).await?;
    let mut own = sqlx::migrate!("./migrations");
    own.set_ignore_missing(true);
    own.run(pool).await?;
    Ok(())
}

/// The outboxd app (tenant) this service's events belong to.
pub const APP: &str = "social";

/// What the routes and handlers share.
#[derive(Clone)]
pub struct State {
    /// The database.
    pub pool: PgPool,
    /// The outboxd app id of [`APP`].
    pub app: Uuid,
    /// Token settings: the admin API's rules (HS256, exp/iat/iss/aud/sub).
    pub auth: AuthConfig,
    /// argon2id hashing off the async runtime.
    pub hasher: Hasher,
}

/// Why a use case refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Bad input (400).
    #[error("{0}")]
    Invalid(String),
    /// Not logged in, or a wrong password (401).
    #[error("authentication required")]
    Unauthorized,
    /// No such row for this caller (404).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The state refuses it, e.g. an e-mail already registered (409).
    #[error("{0}")]
    Conflict(String),
    /// Anything else (500); the detail is logged, not returned.
    #[error("internal error")]
    Internal(String),
}

impl From<sqlx::Error> for AppError {
    fn from(err: sqlx::Error) -> Self {
        Self::Internal(err.to_string())
    }
}

impl From<outbox_core::Error> for AppError {
    fn from(err: outbox_core::Error) -> Self {
        match err {
            outbox_core::Error::Invalid { field, reason } => {
                Self::Invalid(format!("{field}: {reason}"))
            }
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<outbox_admin::ApiError> for AppError {
    fn from(err: outbox_admin::ApiError) -> Self {
        match err.status_and_code().1 {
            "unauthorized" => Self::Unauthorized,
            "invalid" => Self::Invalid(err.to_string()),
            _ => Self::Internal(err.to_string()),
        }
    }
}

/// SQL, one module per aggregate. Every function takes the caller's
/// connection, so a use case decides the transaction.
pub mod repo {
    use sqlx::PgConnection;
    use uuid::Uuid;

    /// Users.
    pub mod users {
        use super::*;

        /// Inserts a user; `None` when the e-mail is taken.
        pub async fn insert(
            conn: &mut PgConnection,
            email: &str,
            hash: &str,
        ) -> Result<Option<Uuid>, sqlx::Error> {
            sqlx::query_scalar(
                "INSERT INTO social.users (email, password_hash) VALUES ($1, $2)
                 ON CONFLICT (email) DO NOTHING RETURNING id",
            )
            .bind(email)
            .bind(hash)
            .fetch_optional(conn)
            .await
        }

        /// (id, password hash) by e-mail.
        pub async fn by_email(
            conn: &mut PgConnection,
            email: &str,
        ) -> Result<Option<(Uuid, String)>, sqlx::Error> {
            sqlx::query_as("SELECT id, password_hash FROM social.users WHERE email = $1")
                .bind(email)
                .fetch_optional(conn)
                .await
        }

        /// Whether the user exists.
        pub async fn exists(conn: &mut PgConnection, id: Uuid) -> Result<bool, sqlx::Error> {
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM social.users WHERE id = $1)")
                .bind(id)
                .fetch_one(conn)
                .await
        }
    }

    /// Notes.
    pub mod notes {
        use super::*;

        /// Inserts a note.
        pub async fn insert(
            conn: &mut PgConnection,
            author: Uuid,
            body: &str,
        ) -> Result<Uuid, sqlx::Error> {
            sqlx::query_scalar(
                "INSERT INTO social.notes (author_id, body) VALUES ($1, $2) RETURNING id",
            )
            .bind(author)
            .bind(body)
            .fetch_one(conn)
            .await
        }

        /// The author of a note that is not deleted.
        pub async fn live_author(
            conn: &mut PgConnection,
            note: Uuid,
        ) -> Result<Option<Uuid>, sqlx::Error> {
            sqlx::query_scalar(
                "SELECT author_id FROM social.notes WHERE id = $1 AND deleted_at IS NULL",
            )
            .bind(note)
            .fetch_optional(conn)
            .await
        }

        /// Soft-deletes the author's note; whether it did.
        pub async fn delete(
            conn: &mut PgConnection,
            note: Uuid,
            author: Uuid,
        ) -> Result<bool, sqlx::Error> {
            Ok(sqlx::query(
                "UPDATE social.notes SET deleted_at = now()
                 WHERE id = $1 AND author_id = $2 AND deleted_at IS NULL",
            )
            .bind(note)
            .bind(author)
            .execute(conn)
            .await?
            .rows_affected()
                == 1)
        }

        /// Records a like; whether it was new.
        pub async fn like(
            conn: &mut PgConnection,
            note: Uuid,
            user: Uuid,
        ) -> Result<bool, sqlx::Error> {
            Ok(sqlx::query(
                "INSERT INTO social.likes (note_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(note)
            .bind(user)
            .execute(conn)
            .await?
            .rows_affected()
                == 1)
        }
    }

    /// Follows.
    pub mod follows {
        use super::*;

        /// Records a follow; whether it was new.
        pub async fn insert(
            conn: &mut PgConnection,
            follower: Uuid,
            followee: Uuid,
        ) -> Result<bool, sqlx::Error> {
            Ok(sqlx::query(
                "INSERT INTO social.follows (follower_id, followee_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(follower)
            .bind(followee)
            .execute(conn)
            .await?
            .rows_affected()
                == 1)
        }
    }

    /// Notifications (written by the handler).
    pub mod notifications {
        use super::*;

        /// Inserts a notification once per event.
        pub async fn insert(
            conn: &mut PgConnection,
            event: Uuid,
            user: Uuid,
            kind: &str,
            actor: Uuid,
            note: Option<Uuid>,
        ) -> Result<(), sqlx::Error> {
            sqlx::query(
                "INSERT INTO social.notifications (event_id, user_id, kind, actor_id, note_id)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING",
            )
            .bind(event)
            .bind(user)
            .bind(kind)
            .bind(actor)
            .bind(note)
            .execute(conn)
            .await?;
            Ok(())
        }
    }
}

/// The use cases: each one a transaction that writes its data and enqueues
/// its event, or does neither.
pub mod usecase {
    use outbox_core::{NewEvent, enqueue};
    use serde_json::json;
    use uuid::Uuid;

    use crate::{AppError, State, repo};

    /// Registers a user (the admin API's rules: an e-mail, a password of at
    /// least 12 characters, argon2id) and enqueues `user.registered`.
    pub async fn register(state: &State, email: &str, password: &str) -> Result<Uuid, AppError> {
        if !email.contains('@') || email.len() > 254 || email.contains('\0') {
            return Err(AppError::Invalid(format!(
                "{email:?} is not an e-mail address"
            )));
        }
        if password.chars().count() < 12 || password.len() > 1024 {
            return Err(AppError::Invalid("password: 12 to 1024 characters".into()));
        }
        // Anyone may sign up: the hash waits with the strangers.
        let lane = outbox_admin::auth::Lane::Stranger;
        let hash = state.hasher.hash_in(password.to_owned(), lane).await?;
        let mut tx = state.pool.begin().await?;
        let id = repo::users::insert(&mut tx, email, &hash)
            .await?
            .ok_or_else(|| AppError::Conflict("this e-mail is already registered".into()))?;
        enqueue(
            &mut tx,
            state.app,
            &NewEvent::new("user.registered", json!({ "user": id })),
        )
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Checks a password; the same error and cost for an unknown e-mail.
    pub async fn login(state: &State, email: &str, password: &str) -> Result<String, AppError> {
        let mut conn = state.pool.acquire().await?;
        let found = if email.contains('\0') {
            None
        } else {
            repo::users::by_email(&mut conn, email).await?
        };
        let hash = found.as_ref().map(|(_, h)| h.clone());
        // No memory of the clients users signed in from here: every check
        // waits in the strangers' lane.
        let lane = outbox_admin::auth::Lane::Stranger;
        if state.hasher.verify(password.to_owned(), hash, lane).await
            && let Some((id, _)) = found
        {
            // This example keeps no server-side sessions: a token lives until it
            // expires, and its session id is only a unique token id.
            return Ok(outbox_admin::auth::issue_token(&state.auth, id, Uuid::new_v4())?.0);
        }
        Err(AppError::Unauthorized)
    }

    /// Posts a note and enqueues `note.posted`.
    pub async fn post_note(state: &State, author: Uuid, body: &str) -> Result<Uuid, AppError> {
        if body.trim().is_empty() || body.len() > 5000 || body.contains('\0') {
            return Err(AppError::Invalid("body: 1 to 5000 bytes of text".into()));
        }
        let mut tx = state.pool.begin().await?;
        let note = repo::notes::insert(&mut tx, author, body).await?;
        enqueue(
            &mut tx,
            state.app,
            &NewEvent::new("note.posted", json!({ "note": note, "author": author })),
        )
        .await?;
        tx.commit().await?;
        Ok(note)
    }

    /// Deletes the caller's note and enqueues `note.deleted`.
    pub async fn delete_note(state: &State, author: Uuid, note: Uuid) -> Result<(), AppError> {
        let mut tx = state.pool.begin().await?;
        if !repo::notes::delete(&mut tx, note, author).await? {
            return Err(AppError::NotFound("note"));
        }
        enqueue(
            &mut tx,
            state.app,
            &NewEvent::new("note.deleted", json!({ "note": note })),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Likes a note and enqueues `note.liked` (once per user and note).
    pub async fn like(state: &State, user: Uuid, note: Uuid) -> Result<(), AppError> {
        let mut tx = state.pool.begin().await?;
        if repo::notes::live_author(&mut tx, note).await?.is_none() {
            return Err(AppError::NotFound("note"));
        }
        if repo::notes::like(&mut tx, note, user).await? {
            enqueue(
                &mut tx,
                state.app,
                &NewEvent::new("note.liked", json!({ "note": note, "by": user })),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Follows a user and enqueues `user.followed` (once per pair).
    pub async fn follow(state: &State, follower: Uuid, followee: Uuid) -> Result<(), AppError> {
        if follower == followee {
            return Err(AppError::Invalid("you cannot follow yourself".into()));
        }
        let mut tx = state.pool.begin().await?;
        if !repo::users::exists(&mut tx, followee).await? {
            return Err(AppError::NotFound("user"));
        }
        if repo::follows::insert(&mut tx, follower, followee).await? {
            enqueue(
                &mut tx,
                state.app,
                &NewEvent::new(
                    "user.followed",
                    json!({ "follower": follower, "followee": followee }),
                ),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// The notification handler.
pub mod handlers {
    use outbox_dispatch::{Event, HandlerError, Registry};
    use serde::Deserialize;
    use sqlx::{PgConnection, PgPool};
    use uuid::Uuid;

    use crate::repo;

    #[derive(Deserialize)]
    struct Liked {
        note: Uuid,
        by: Uuid,
    }

    #[derive(Deserialize)]
    struct Followed {
        follower: Uuid,
        followee: Uuid,
    }

    /// `note.liked` and `user.followed` become notifications: never for
    /// yourself, and a like of a note deleted meanwhile is skipped. In
    /// transactional mode the notification commits with the event's deletion;
    /// otherwise the event id keeps a re-run from notifying twice.
    pub fn notifications(pool: PgPool) -> Registry {
        let mut registry = Registry::new();
        let for_likes = pool.clone();
        registry
            .register("note.liked", move |event: Event| {
                let pool = for_likes.clone();
                async move {
                    let liked: Liked = event.payload_as()?;
                    with_conn(&event, &pool, async |conn: &mut PgConnection| {
                        let Some(author) = repo::notes::live_author(conn, liked.note).await? else {
                            return Ok(()); // deleted since: nothing to say
                        };
                        if author != liked.by {
                            repo::notifications::insert(
                                conn,
                                event.id,
                                author,
                                "like",
                                liked.by,
                                Some(liked.note),
                            )
                            .await?;
                        }
                        Ok(())
                    })
                    .await
                }
            })
            .register("user.followed", move |event: Event| {
                let pool = pool.clone();
                async move {
                    let followed: Followed = event.payload_as()?;
                    if followed.follower == followed.followee {
                        return Ok(());
                    }
                    with_conn(&event, &pool, async |conn: &mut PgConnection| {
                        repo::notifications::insert(
                            conn,
                            event.id,
                            followed.followee,
                            "follow",
                            followed.follower,
                            None,
                        )
                        .await
                    })
                    .await
                }
            });
        registry
    }

    /// Runs `work` on the claim transaction (transactional mode) or on a
    /// transaction of its own.
    async fn with_conn(
        event: &Event,
        pool: &PgPool,
        work: impl AsyncFnOnce(&mut PgConnection) -> Result<(), sqlx::Error>,
    ) -> Result<(), HandlerError> {
        match event.claim_tx() {
            Some(tx) => work(&mut *tx.lock().await?)
                .await
                .map_err(HandlerError::retry),
            None => {
                let mut tx = pool.begin().await.map_err(HandlerError::retry)?;
                work(&mut tx).await.map_err(HandlerError::retry)?;
                tx.commit().await.map_err(HandlerError::retry)
            }
        }
    }
}

/// The HTTP routes.
pub mod http {
    use axum::extract::{FromRequestParts, Path, State as Extract};
    use axum::http::request::Parts;
    use axum::http::{StatusCode, header};
    use axum::response::{IntoResponse, Response};
    use axum::routing::{delete, post};
    use axum::{Json, Router};
    use serde::Deserialize;
    use serde_json::json;
    use uuid::Uuid;

    use crate::{AppError, State, usecase};

    impl IntoResponse for AppError {
        fn into_response(self) -> Response {
            let (status, code) = match &self {
                AppError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
                AppError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
                AppError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
                AppError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
                AppError::Internal(detail) => {
                    tracing::error!(%detail, "request failed");
                    (StatusCode::INTERNAL_SERVER_ERROR, "internal")
                }
            };
            let body = json!({ "error": { "code": code, "message": self.to_string() } });
            (status, Json(body)).into_response()
        }
    }

    /// The caller, from `Authorization: Bearer <token>`.
    pub struct Caller(pub Uuid);

    impl FromRequestParts<State> for Caller {
        type Rejection = AppError;

        async fn from_request_parts(parts: &mut Parts, state: &State) -> Result<Self, AppError> {
            let token = parts
                .headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or(AppError::Unauthorized)?;
            outbox_admin::auth::verify_token(&state.auth, token)
                .map(|(user, _session)| Caller(user))
                .map_err(|_| AppError::Unauthorized)
        }
    }

    #[derive(Deserialize)]
    struct Credentials {
        email: String,
        password: String,
    }

    #[derive(Deserialize)]
    struct NoteBody {
        body: String,
    }

    fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
        serde_json::from_slice(bytes).map_err(|e| AppError::Invalid(format!("bad body: {e}")))
    }

    async fn register(
        Extract(state): Extract<State>,
        bytes: axum::body::Bytes,
    ) -> Result<Response, AppError> {
        let c: Credentials = body(&bytes)?;
        let id = usecase::register(&state, &c.email, &c.password).await?;
        Ok((StatusCode::CREATED, Json(json!({ "id": id }))).into_response())
    }

    async fn login(
        Extract(state): Extract<State>,
        bytes: axum::body::Bytes,
    ) -> Result<Json<serde_json::Value>, AppError> {
        let c: Credentials = body(&bytes)?;
        let token = usecase::login(&state, &c.email, &c.password).await?;
        Ok(Json(json!({ "token": token })))
    }

    async fn post_note(
        Extract(state): Extract<State>,
        Caller(me): Caller,
        bytes: axum::body::Bytes,
    ) -> Result<Response, AppError> {
        let n: NoteBody = body(&bytes)?;
        let id = usecase::post_note(&state, me, &n.body).await?;
        Ok((StatusCode::CREATED, Json(json!({ "id": id }))).into_response())
    }

    fn uuid(s: &str, what: &'static str) -> Result<Uuid, AppError> {
        Uuid::parse_str(s).map_err(|_| AppError::NotFound(what))
    }

    async fn delete_note(
        Extract(state): Extract<State>,
        Caller(me): Caller,
        Path(id): Path<String>,
    ) -> Result<StatusCode, AppError> {
        usecase::delete_note(&state, me, uuid(&id, "note")?).await?;
        Ok(StatusCode::NO_CONTENT)
    }

    async fn like(
        Extract(state): Extract<State>,
        Caller(me): Caller,
        Path(id): Path<String>,
    ) -> Result<StatusCode, AppError> {
        usecase::like(&state, me, uuid(&id, "note")?).await?;
        Ok(StatusCode::NO_CONTENT)
    }

    async fn follow(
        Extract(state): Extract<State>,
        Caller(me): Caller,
        Path(id): Path<String>,
    ) -> Result<StatusCode, AppError> {
        usecase::follow(&state, me, uuid(&id, "user")?).await?;
        Ok(StatusCode::NO_CONTENT)
    }

    /// The service's routes.
    pub fn router(state: State) -> Router {
        Router::new()
            .route("/register", post(register))
            .route("/login", post(login))
            .route("/notes", post(post_note))
            .route("/notes/{id}", delete(delete_note))
            .route("/notes/{id}/like", post(like))
            .route("/users/{id}/follow", post(follow))
            .with_state(state)
    }
}
