//! (i) What authenticating an API request costs now that a token is checked
//! against its session row, next to the user lookup a token needed before:
//! alone, and within the database work of a typical request (role check and
//! an unresolved count); rounds in turn, 4 callers at once.

use sqlx::PgPool;

use crate::bench::Bench;
use crate::support::median;

/// Token checks and whole requests per second, before and with sessions.
pub async fn auth(b: &mut Bench) -> anyhow::Result<()> {
    let checks = (b.args.enqueue_rows as usize).clamp(100, 20_000);
    let rates = auth_rates(&b.pool, b.app, checks, b.args.drain_rounds as usize).await?;
    for (what, unit, [before, after]) in [
        ("authentication", "checks/s", rates[0]),
        ("request (auth, role, count)", "requests/s", rates[1]),
    ] {
        b.figure(
            "auth",
            format!("{what}: token + user lookup (before sessions)"),
            before,
            unit,
            None,
        );
        b.figure(
            "auth",
            format!("{what}: token + session lookup"),
            after,
            unit,
            Some((before, "before sessions")),
        );
    }
    Ok(())
}

/// Per second, [before, after] sessions: token checks alone, and the
/// database work of a typical request (authentication, the caller's role on
/// `app`, an unresolved dead-letter count). Medians of `rounds` rounds taken
/// in turn, with 4 callers at once.
async fn auth_rates(
    pool: &PgPool,
    app: uuid::Uuid,
    checks: usize,
    rounds: usize,
) -> anyhow::Result<[[f64; 2]; 2]> {
    use outbox_core::store::{dead_letters, principals};
    let auth = outbox_admin::AuthConfig::new(vec![7u8; 32]).map_err(anyhow::Error::msg)?;
    let email = format!("bench-{}@x.io", uuid::Uuid::new_v4().simple());
    let user = principals::create_user(pool, &email, "not a hash", false).await?;
    principals::set_role(pool, app, user.id, principals::Role::Viewer).await?;
    let issued = outbox_admin::auth::open_session(pool, &auth, user.id).await?;
    // [with sessions][whole request]
    let mut rates: [[Vec<f64>; 2]; 2] = Default::default();
    for _ in 0..rounds.max(1) {
        for whole in [false, true] {
            for with_session in [false, true] {
                let started = std::time::Instant::now();
                let mut callers = tokio::task::JoinSet::new();
                for _ in 0..4 {
                    let (pool, auth, token) = (pool.clone(), auth.clone(), issued.token.clone());
                    callers.spawn(async move {
                        for _ in 0..checks / 4 {
                            let user = if with_session {
                                outbox_admin::auth::authenticate(&pool, &auth, &token)
                                    .await?
                                    .user
                            } else {
                                let (id, _) = outbox_admin::auth::verify_token(&auth, &token)?;
                                principals::user_by_id(&pool, id)
                                    .await?
                                    .ok_or(outbox_admin::ApiError::Unauthorized)?
                            };
                            if whole {
                                principals::role_on(&pool, app, user.id).await?;
                                dead_letters::count_unresolved(&pool, app).await?;
                            }
                        }
                        Ok::<_, outbox_admin::ApiError>(())
                    });
                }
                while let Some(done) = callers.join_next().await {
                    done?.map_err(|e| anyhow::anyhow!("{e}"))?;
                }
                let rate = (checks / 4 * 4) as f64 / started.elapsed().as_secs_f64();
                rates[usize::from(whole)][usize::from(with_session)].push(rate);
            }
        }
    }
    let mut conn = pool.acquire().await?;
    principals::delete_user(&mut conn, user.id).await?;
    Ok(rates.map(|pair| pair.map(median)))
}
