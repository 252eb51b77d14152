//! (k) The console's pages with a large outbox and many dead letters: each
//! page (and the row API) is asked for in turn, round after round, through
//! the admin router with a signed-in session, on the daemon's pool
//! settings; the figures are each page's p95 and p50 in milliseconds.

use std::time::Instant;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use outbox_core::store::outbox::{self as store, PageAt, RowFilter};
use outbox_core::store::{dead_letters, principals, stats};
use tower::ServiceExt;

use crate::bench::Bench;
use crate::support::{ScratchDatabase, checkpoint};

/// Requests per page: one per round, the pages in turn.
const ROUNDS: usize = 40;

/// Asks the admin router for pages as a signed-in instance admin.
struct Client {
    router: axum::Router,
    cookie: String,
    bearer: String,
}

impl Client {
    /// Each page's answer times in milliseconds, the pages asked in turn,
    /// [`ROUNDS`] rounds; fails on an answer other than 200.
    async fn time(&self, pages: &[(String, String)]) -> anyhow::Result<Vec<Vec<f64>>> {
        let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(ROUNDS); pages.len()];
        for _ in 0..ROUNDS {
            for (i, (name, uri)) in pages.iter().enumerate() {
                let request = Request::get(uri.as_str())
                    .header(header::COOKIE, &self.cookie)
                    .header(header::AUTHORIZATION, &self.bearer)
                    .body(Body::empty())?;
                let started = Instant::now();
                let response = self.router.clone().oneshot(request).await?;
                let status = response.status();
                let body = axum::body::to_bytes(response.into_body(), 16 << 20).await?;
                times[i].push(started.elapsed().as_secs_f64() * 1000.0);
                if status != StatusCode::OK {
                    anyhow::bail!(
                        "console page {name} ({uri}) answered {status}: {}",
                        String::from_utf8_lossy(&body[..body.len().min(300)])
                    );
                }
            }
        }
        Ok(times)
    }
}

/// Fills a scratch database with `--backlogs`' large size of rows and a
/// tenth as many dead letters, and times every console page.
pub async fn console(b: &mut Bench) -> anyhow::Result<()> {
    let rows = b.args.backlogs[1];
    let dead = (rows / 10).max(1);
    let db = ScratchDatabase::create(&b.pool, "outboxd_bench_console").await?;
    let app = outbox_core::store::apps::ensure(&db.pool, "bench", "bench outboxd")
        .await?
        .id;
    eprintln!("bench: console, filling {rows} rows and {dead} dead letters");
    let mut filled = 0;
    while filled < rows {
        let n = (rows - filled).min(50_000);
        stats::fill_console_rows(&db.pool, app, filled, n).await?;
        filled += n;
    }
    stats::fill_console_dead_letters(&db.pool, app, dead).await?;
    stats::vacuum_analyze_outbox(&db.pool).await?;
    stats::vacuum_analyze_dead_letters(&db.pool).await?;
    store::record_state_counts(&db.pool).await?;
    checkpoint(&db.pool).await;

    let auth = outbox_admin::AuthConfig::new(vec![7u8; 32]).map_err(anyhow::Error::msg)?;
    let user = principals::create_user(&db.pool, "bench@x.io", "not a hash", true).await?;
    let session = outbox_admin::auth::open_session(&db.pool, &auth, user.id).await?;
    let state = outbox_admin::AdminState::new(db.pool.clone(), auth).map_err(anyhow::Error::msg)?;
    let router = outbox_admin::router(state);

    let first = store::browse(
        &db.pool,
        app,
        &RowFilter::default(),
        PageAt::First,
        50,
        std::time::Duration::from_secs(10),
    )
    .await?;
    let row = first
        .rows
        .first()
        .map(|r| r.id)
        .ok_or_else(|| anyhow::anyhow!("no row"))?;
    let next = first.after.map(|c| c.encode()).unwrap_or_default();
    let filter = dead_letters::Filter {
        unresolved_only: true,
        ..Default::default()
    };
    let dead_letter = dead_letters::list(&db.pool, app, &filter, None, 1)
        .await?
        .first()
        .map(|d| d.id)
        .ok_or_else(|| anyhow::anyhow!("no dead letter"))?;
    let pages: Vec<(String, String)> = [
        ("apps", "/apps".to_owned()),
        ("topics", "/apps/bench/topics".to_owned()),
        ("rows", "/apps/bench/outbox".to_owned()),
        (
            "rows, next page",
            format!("/apps/bench/outbox?after={next}"),
        ),
        (
            "rows of a topic",
            "/apps/bench/outbox?topic=console.t3".to_owned(),
        ),
        (
            "rows retrying",
            "/apps/bench/outbox?state=retrying".to_owned(),
        ),
        (
            "rows scheduled",
            "/apps/bench/outbox?state=scheduled".to_owned(),
        ),
        (
            "rows running (none: every row is read)",
            "/apps/bench/outbox?state=running".to_owned(),
        ),
        (
            "rows of a partition key",
            "/apps/bench/outbox?partition_key=p-42".to_owned(),
        ),
        (
            "rows of a customer (payload field)",
            "/apps/bench/outbox?field=customer.id%3Dc-7".to_owned(),
        ),
        (
            "rows of a customer (payload contains)",
            "/apps/bench/outbox?payload=%7B%22customer%22%3A%7B%22id%22%3A%22c-7%22%7D%7D"
                .to_owned(),
        ),
        (
            "rows of an idempotency key (none)",
            "/apps/bench/outbox?idempotency_key=nothing".to_owned(),
        ),
        ("row", format!("/apps/bench/outbox/{row}")),
        (
            "dead letters",
            "/apps/bench/dead-letters?unresolved=true".to_owned(),
        ),
        (
            "dead letter",
            format!("/apps/bench/dead-letters/{dead_letter}"),
        ),
        ("audit log", "/apps/bench/audit".to_owned()),
        (
            "API: rows of a topic",
            "/api/apps/bench/outbox?topic=console.t3".to_owned(),
        ),
        ("API: topics", "/api/apps/bench/topics".to_owned()),
    ]
    .into_iter()
    .map(|(name, uri)| (name.to_owned(), uri))
    .collect();

    let cookie = format!("outboxd_session={}; outboxd_csrf=bench", session.token);
    let bearer = format!("Bearer {}", session.token);
    let client = Client {
        router,
        cookie,
        bearer,
    };
    let mut times = client.time(&pages).await?;
    // With the optional GIN index on the payload (docs/operations.md).
    eprintln!("bench: console, adding the optional payload index");
    stats::create_payload_index(&db.pool).await?;
    let contains: Vec<(String, String)> = pages
        .iter()
        .filter(|(name, _)| name.contains("payload contains"))
        .map(|(name, uri)| (format!("{name}, with the payload index"), uri.clone()))
        .collect();
    let with_index = client.time(&contains).await?;
    let mut pages = pages;
    pages.extend(contains);
    times.extend(with_index);
    db.drop_it(&b.pool).await?;
    for ((name, _), mut samples) in pages.into_iter().zip(times) {
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        let (p50, p95) = (at(0.5), at(0.95));
        b.figure(
            "console",
            format!("{name}, p95 ({rows} rows, {dead} dead letters)"),
            p95,
            "ms",
            None,
        );
        b.figure("console", format!("{name}, p50"), p50, "ms", None);
    }
    Ok(())
}
