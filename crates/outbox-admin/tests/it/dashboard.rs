//! The dashboard: a session and a CSRF token on the dead-letter forms, and
//! the triggers page.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use outbox_core::store::dead_letters;
use tower::ServiceExt;

use super::{PASSWORD, PRE_LOGIN_CSRF, TestResult, World, urlencode};

#[tokio::test]
async fn dashboard_needs_a_session_and_a_csrf_token() -> TestResult {
    let w = World::new().await?;
    let a1 = w.dead_letter(w.app_a, "a.one").await?;
    let app = || outbox_admin::router(w.state.clone());
    let res = app()
        .oneshot(Request::get("/apps").body(Body::empty())?)
        .await?;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        res.headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok()),
        Some("/login?next=%2Fapps")
    );
    let login = |site: &str| {
        Request::post("/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::COOKIE, format!("outboxd_csrf={PRE_LOGIN_CSRF}"))
            .header("sec-fetch-site", site)
            .body(Body::from(format!(
                "csrf={PRE_LOGIN_CSRF}&email=operator%40x.io&password={}",
                urlencode(PASSWORD)
            )))
    };
    // A page elsewhere (a sibling subdomain can plant the cookie) posting
    // a matching form does not sign the browser in, nor change the cookie.
    for site in ["cross-site", "same-site"] {
        let res = app().oneshot(login(site)?).await?;
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{site}");
        assert!(res.headers().get(header::SET_COOKIE).is_none(), "{site}");
    }
    let res = app().oneshot(login("same-origin")?).await?;
    assert_eq!(res.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        res.headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok()),
        Some("/apps"),
        "no page asked for: the apps"
    );
    let cookies: Vec<String> = res
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    assert!(
        cookies
            .iter()
            .all(|c| c.contains("HttpOnly") && c.contains("SameSite=Strict")),
        "{cookies:?}"
    );
    let jar: String = cookies
        .iter()
        .filter_map(|c| c.split(';').next())
        .collect::<Vec<_>>()
        .join("; ");
    let csrf = cookies
        .iter()
        .find_map(|c| c.strip_prefix("outboxd_csrf="))
        .and_then(|c| c.split(';').next())
        .ok_or("no csrf cookie")?
        .to_owned();
    let page = app()
        .oneshot(
            Request::get("/apps")
                .header(header::COOKIE, &jar)
                .body(Body::empty())?,
        )
        .await?;
    assert_eq!(page.status(), StatusCode::OK);
    let html = String::from_utf8(
        axum::body::to_bytes(page.into_body(), 1 << 20)
            .await?
            .to_vec(),
    )?;
    assert!(html.contains("app-a") && !html.contains("app-b"), "{html}");
    // A form post without the token changes nothing.
    let forged = Request::post(format!("/apps/app-a/dead-letters/{a1}/ignore"))
        .header(header::COOKIE, &jar)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from("csrf=wrong"))?;
    let res = app().oneshot(forged).await?;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let said = axum::body::to_bytes(res.into_body(), 1 << 20).await?;
    // Not said as a matter of role: most often the form predates a sign-in.
    assert!(
        String::from_utf8_lossy(&said).contains("this form has expired"),
        "{said:?}"
    );
    assert!(
        dead_letters::get(&w.db.pool, w.app_a, a1)
            .await?
            .resolved_at
            .is_none()
    );
    let real = Request::post(format!("/apps/app-a/dead-letters/{a1}/ignore"))
        .header(header::COOKIE, &jar)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!("csrf={csrf}")))?;
    assert_eq!(app().oneshot(real).await?.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        dead_letters::get(&w.db.pool, w.app_a, a1)
            .await?
            .resolution
            .as_deref(),
        Some("ignored")
    );
    // GET never changes state.
    let res = app()
        .oneshot(
            Request::get(format!("/apps/app-a/dead-letters/{a1}/replay"))
                .header(header::COOKIE, &jar)
                .body(Body::empty())?,
        )
        .await?;
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    Ok(())
}

#[tokio::test]
async fn the_triggers_page_creates_lists_and_disables_with_csrf_and_roles() -> TestResult {
    let w = World::new().await?;
    let app = || outbox_admin::router(w.state.clone());
    let session = |email: &'static str| w.dashboard_session(email);
    let post = |jar: String, uri: String, body: String| {
        let app = app();
        async move {
            let req = Request::post(uri)
                .header(header::COOKIE, jar)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(body))?;
            Ok::<_, Box<dyn std::error::Error>>(app.oneshot(req).await?.status())
        }
    };
    let (admin_jar, admin_csrf) = session("a-admin@x.io").await?;
    let (viewer_jar, viewer_csrf) = session("viewer@x.io").await?;
    let create = format!(
        "csrf={admin_csrf}&kind=cron&name=nightly&target=report.build&schedule=0+3+*+*+*&timezone=Europe%2FParis"
    );
    assert_eq!(
        post(admin_jar.clone(), "/apps/app-a/triggers".into(), create).await?,
        StatusCode::SEE_OTHER
    );
    let forged = "csrf=nope&kind=kv&name=x&target=y&collection=*".to_owned();
    assert_eq!(
        post(admin_jar.clone(), "/apps/app-a/triggers".into(), forged).await?,
        StatusCode::FORBIDDEN
    );
    let viewer_try = format!("csrf={viewer_csrf}&kind=kv&name=x&target=y&collection=*");
    assert_eq!(
        post(
            viewer_jar.clone(),
            "/apps/app-a/triggers".into(),
            viewer_try
        )
        .await?,
        StatusCode::FORBIDDEN
    );
    let listed = principals_triggers(&w).await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].timezone.as_deref(), Some("Europe/Paris"));
    let page = app()
        .oneshot(
            Request::get("/apps/app-a/triggers")
                .header(header::COOKIE, &viewer_jar)
                .body(Body::empty())?,
        )
        .await?;
    let html = String::from_utf8(
        axum::body::to_bytes(page.into_body(), 1 << 20)
            .await?
            .to_vec(),
    )?;
    assert!(
        html.contains("nightly") && html.contains("0 3 * * * Europe/Paris"),
        "{html}"
    );
    // The next tick is a time element, not its markup shown as text.
    assert!(
        html.contains("· next <time datetime=") && !html.contains("&lt;time"),
        "{html}"
    );
    let disable = format!("/apps/app-a/triggers/{}/disable", listed[0].id);
    assert_eq!(
        post(admin_jar.clone(), disable, format!("csrf={admin_csrf}")).await?,
        StatusCode::SEE_OTHER
    );
    assert!(!principals_triggers(&w).await?[0].enabled);
    Ok(())
}

async fn principals_triggers(
    w: &World,
) -> Result<Vec<outbox_core::store::triggers::Trigger>, Box<dyn std::error::Error>> {
    Ok(outbox_core::store::triggers::list(&w.db.pool, w.app_a).await?)
}

#[tokio::test]
async fn the_topics_page_pauses_and_resumes_with_csrf_and_roles() -> TestResult {
    use outbox_core::store::pauses;
    let w = World::new().await?;
    let app = || outbox_admin::router(w.state.clone());
    let post = |jar: String, uri: &'static str, body: String| {
        let app = app();
        async move {
            let req = Request::post(uri)
                .header(header::COOKIE, jar)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(body))?;
            Ok::<_, Box<dyn std::error::Error>>(app.oneshot(req).await?.status())
        }
    };
    let page = |jar: String| {
        let app = app();
        async move {
            let res = app
                .oneshot(
                    Request::get("/apps/app-a/topics")
                        .header(header::COOKIE, jar)
                        .body(Body::empty())?,
                )
                .await?;
            let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await?;
            Ok::<_, Box<dyn std::error::Error>>(String::from_utf8(bytes.to_vec())?)
        }
    };
    let (operator_jar, operator_csrf) = w.dashboard_session("operator@x.io").await?;
    let (viewer_jar, viewer_csrf) = w.dashboard_session("viewer@x.io").await?;
    let html = page(viewer_jar.clone()).await?;
    assert!(
        html.contains("data-paused=none")
            && html.contains("data-processes=none")
            && html.contains("data-states=none"),
        "{html}"
    );

    // Rows nobody serves stand out, once the leader has counted them.
    let mut tx = w.db.pool.begin().await?;
    outbox_core::enqueue(
        &mut tx,
        w.app_a,
        &outbox_core::NewEvent::new("mail", serde_json::json!({})),
    )
    .await?;
    tx.commit().await?;
    outbox_core::store::outbox::record_state_counts(&w.db.pool).await?;
    let html = page(viewer_jar.clone()).await?;
    assert!(
        html.contains(r#"data-topic-states="mail""#) && html.contains("1 waiting since"),
        "{html}"
    );

    let pause = |csrf: &str| format!("csrf={csrf}&topic=mail&reason=SMTP+%3Cdown%3E");
    assert_eq!(
        post(
            viewer_jar.clone(),
            "/apps/app-a/topics/pause",
            pause(&viewer_csrf)
        )
        .await?,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        post(
            operator_jar.clone(),
            "/apps/app-a/topics/pause",
            pause("forged")
        )
        .await?,
        StatusCode::FORBIDDEN
    );
    // A token planted in the cookie too (a sibling subdomain can set one)
    // matches no session: the session's token is derived from it.
    let planted_jar = operator_jar
        .split("; ")
        .map(|c| {
            if c.starts_with("outboxd_csrf=") {
                "outboxd_csrf=planted-planted-planted-planted".to_owned()
            } else {
                c.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("; ");
    assert_ne!(planted_jar, operator_jar);
    assert_eq!(
        post(
            planted_jar,
            "/apps/app-a/topics/pause",
            pause("planted-planted-planted-planted")
        )
        .await?,
        StatusCode::FORBIDDEN
    );
    // Bytes that are not UTF-8, or a control character: refused, as the
    // API refuses them (they paused a topic of replacement characters).
    for topic in ["%FF%FE", "a%1Bb"] {
        assert_eq!(
            post(
                operator_jar.clone(),
                "/apps/app-a/topics/pause",
                format!("csrf={operator_csrf}&topic={topic}")
            )
            .await?,
            StatusCode::BAD_REQUEST,
            "{topic}"
        );
    }
    assert!(pauses::list(&w.db.pool, w.app_a).await?.is_empty());
    assert_eq!(
        post(
            operator_jar.clone(),
            "/apps/app-a/topics/pause",
            pause(&operator_csrf)
        )
        .await?,
        StatusCode::SEE_OTHER
    );
    let html = page(viewer_jar.clone()).await?;
    assert!(
        html.contains(r#"data-paused="mail""#) && html.contains("SMTP &lt;down&gt;"),
        "{html}"
    );
    assert_eq!(
        post(
            operator_jar.clone(),
            "/apps/app-a/topics/resume",
            format!("csrf={operator_csrf}&topic=mail")
        )
        .await?,
        StatusCode::SEE_OTHER
    );
    assert!(pauses::list(&w.db.pool, w.app_a).await?.is_empty());

    // Limits: set from the form, shown with how many run, removed.
    use outbox_core::store::limits;
    assert!(page(viewer_jar.clone()).await?.contains("data-limits=none"));
    assert_eq!(
        post(
            viewer_jar.clone(),
            "/apps/app-a/topics/limit",
            format!("csrf={viewer_csrf}&topic=report&max_running=2")
        )
        .await?,
        StatusCode::FORBIDDEN
    );
    for bad in ["0", "two", ""] {
        assert_eq!(
            post(
                operator_jar.clone(),
                "/apps/app-a/topics/limit",
                format!("csrf={operator_csrf}&topic=report&max_running={bad}")
            )
            .await?,
            StatusCode::BAD_REQUEST,
            "{bad:?}"
        );
    }
    assert!(limits::list(&w.db.pool, w.app_a).await?.is_empty());
    assert_eq!(
        post(
            operator_jar.clone(),
            "/apps/app-a/topics/limit",
            format!("csrf={operator_csrf}&topic=report&max_running=2&max_running_per_key=1")
        )
        .await?,
        StatusCode::SEE_OTHER
    );
    let html = page(viewer_jar.clone()).await?;
    assert!(
        html.contains(r#"data-limited="report""#) && html.contains("0 / 2</td><td>1</td>"),
        "{html}"
    );
    assert_eq!(
        post(
            operator_jar.clone(),
            "/apps/app-a/topics/unlimit",
            format!("csrf={operator_csrf}&topic=report")
        )
        .await?,
        StatusCode::SEE_OTHER
    );
    assert!(limits::list(&w.db.pool, w.app_a).await?.is_empty());
    Ok(())
}

/// The topics page's table of rows refreshes by itself: the page marks it
/// with the URL of its fragment and loads the script (allowed by the page's
/// policy, fetches included), and the fragment answers the app's viewers
/// only, escaped like the page.
#[tokio::test]
async fn the_topics_rows_refresh_from_a_fragment_for_the_apps_viewers() -> TestResult {
    let w = World::new().await?;
    let get = |jar: String, uri: String| {
        let app = outbox_admin::router(w.state.clone());
        async move {
            let res = app
                .oneshot(
                    Request::get(uri)
                        .header(header::COOKIE, jar)
                        .body(Body::empty())?,
                )
                .await?;
            let status = res.status();
            let headers = res.headers().clone();
            let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await?;
            Ok::<_, Box<dyn std::error::Error>>((
                status,
                headers,
                String::from_utf8(bytes.to_vec())?,
            ))
        }
    };
    let (viewer_jar, _) = w.dashboard_session("viewer@x.io").await?;
    let (_, headers, html) = get(viewer_jar.clone(), "/apps/app-a/topics".into()).await?;
    assert!(
        html.contains(r#"data-refresh="/apps/app-a/topics/rows""#)
            && html.contains(r#"<script src="/assets/console.js" defer></script>"#),
        "{html}"
    );
    let csp = headers
        .get(header::CONTENT_SECURITY_POLICY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );

    let (status, headers, js) = get(String::new(), "/assets/console.js".into()).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("text/javascript")),
        "{headers:?}"
    );
    assert!(js.contains("data-refresh") && js.contains("visibilitychange"));

    let mut tx = w.db.pool.begin().await?;
    // Written by plain SQL: enqueue refuses a '>' within a name, but rows
    // written before that rule, or by hand, are still shown, escaped.
    sqlx::query("INSERT INTO outbox (id, app_id, topic) VALUES (outbox_uuid_v7(), $1, $2)")
        .bind(w.app_a)
        .bind("<b>mail</b>")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    outbox_core::store::outbox::record_state_counts(&w.db.pool).await?;
    let (status, _, fragment) = get(viewer_jar.clone(), "/apps/app-a/topics/rows".into()).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(
        fragment.contains(r#"data-topic-states="&lt;b&gt;mail&lt;/b&gt;""#)
            && !fragment.contains("<b>mail")
            && !fragment.contains("<html"),
        "{fragment}"
    );
    // The overview: charts of the last hour from the attempts counted, and
    // per topic its pause and unresolved dead letters.
    outbox_core::store::activity::record(
        &w.db.pool,
        &[outbox_core::store::activity::ActivityDelta {
            app_id: w.app_a,
            topic: "<b>mail</b>".into(),
            completed: 120,
            failed: 40,
            dead_lettered: 1,
        }],
    )
    .await?;
    // A complete minute: the one before this.
    sqlx::query("UPDATE outbox_activity SET minute = minute - interval '1 minute'")
        .execute(&w.db.pool)
        .await?;
    w.dead_letter(w.app_a, "<b>mail</b>").await?;
    outbox_core::store::pauses::pause(&w.db.pool, w.app_a, "<b>mail</b>", None, Some("test"))
        .await?;
    let (_, _, fragment) = get(viewer_jar.clone(), "/apps/app-a/topics/rows".into()).await?;
    for wanted in [
        "Completed per second: <strong>0/s</strong> <span class=muted>peak 2/s",
        "Failed attempts: <strong>0 %</strong> <span class=muted>peak 25 %",
        "<polyline",
        "<td><strong>paused</strong></td>",
        r#"dead-letters?unresolved=true&amp;topic=%3Cb%3Email%3C%2Fb%3E">1</a>"#,
    ] {
        assert!(fragment.contains(wanted), "{wanted} missing: {fragment}");
    }
    // The instance overview: the app's rows and the processes (none here).
    let (status, _, apps) = get(viewer_jar.clone(), "/apps".into()).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(
        apps.contains(r#"<tr data-app-row="app-a">"#)
            && apps.contains("<td>1</td>")
            && apps.contains("data-processes=none")
            && !apps.contains("app-b"),
        "{apps}"
    );
    // An app's own address leads to its overview.
    let (status, headers, _) = get(viewer_jar.clone(), "/apps/app-a".into()).await?;
    assert_eq!(
        (
            status,
            headers.get("location").and_then(|v| v.to_str().ok())
        ),
        (StatusCode::SEE_OTHER, Some("/apps/app-a/topics"))
    );
    let (status, _, _) = get(viewer_jar, "/apps/app-b/topics/rows".into()).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "another app's rows");
    let (status, headers, _) = get(String::new(), "/apps/app-a/topics/rows".into()).await?;
    assert_eq!(status, StatusCode::SEE_OTHER, "no session: {headers:?}");
    Ok(())
}

/// A rotation of the key with the old one kept as the previous key signs
/// nobody out: the session's cookie still opens pages, and a form opened
/// before the rotation (its CSRF token made with the old key) goes through.
/// Without the previous key the session is gone.
#[tokio::test]
async fn a_form_opened_before_a_key_rotation_goes_through_after_it() -> TestResult {
    let w = World::new().await?;
    let (jar, csrf) = w.dashboard_session("operator@x.io").await?;
    let pause = |state: outbox_admin::AdminState| {
        let request = Request::post("/apps/app-a/topics/pause")
            .header(header::COOKIE, &jar)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("csrf={csrf}&topic=mail")));
        async move {
            let answer = outbox_admin::router(state).oneshot(request?).await?;
            let to = answer
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            Ok::<_, Box<dyn std::error::Error>>((answer.status(), to))
        }
    };
    let new_key = vec![42u8; 32];
    let rotated = outbox_admin::AuthConfig::new(new_key.clone())?
        .with_previous_secret(w.state.auth.jwt_secret.clone())?;
    let (status, to) = pause(outbox_admin::AdminState::new(w.db.pool.clone(), rotated)?).await?;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(
        to.as_deref()
            .is_some_and(|to| to.starts_with("/apps/app-a/topics")),
        "{to:?}"
    );
    let paused = outbox_core::store::pauses::list(&w.db.pool, w.app_a).await?;
    assert_eq!(paused.len(), 1);
    let (_, to) = pause(outbox_admin::AdminState::new(
        w.db.pool.clone(),
        outbox_admin::AuthConfig::new(new_key)?,
    )?)
    .await?;
    // The sign-in page says the action was not taken.
    assert_eq!(to.as_deref(), Some("/login?ended=1"));
    let answer = outbox_admin::router(w.state.clone())
        .oneshot(Request::get("/login?ended=1").body(Body::empty())?)
        .await?;
    let html = String::from_utf8(
        axum::body::to_bytes(answer.into_body(), 1 << 20)
            .await?
            .to_vec(),
    )?;
    assert!(
        html.contains("Your session had ended, so that action was not taken"),
        "{html}"
    );
    // Signing out of an ended session is no action left undone.
    let answer = outbox_admin::router(w.state.clone())
        .oneshot(
            Request::post("/logout")
                .header(header::COOKIE, "outboxd_session=ended")
                .body(Body::empty())?,
        )
        .await?;
    assert_eq!(
        answer
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok()),
        Some("/login")
    );
    Ok(())
}

#[tokio::test]
async fn signing_in_leads_back_to_the_page_asked_for_and_nowhere_else() -> TestResult {
    let w = World::new().await?;
    let dead = w.dead_letter(w.app_a, "a.one").await?;
    let app = || outbox_admin::router(w.state.clone());
    let asked = format!("/apps/app-a/dead-letters/{dead}?x=1");
    let res = app()
        .oneshot(Request::get(&asked).body(Body::empty())?)
        .await?;
    let to_login = res
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or("no redirect")?
        .to_owned();
    let encoded: String = form_urlencoded::byte_serialize(asked.as_bytes()).collect();
    assert_eq!(to_login, format!("/login?next={encoded}"));
    // The sign-in page carries it in its form.
    let res = app()
        .oneshot(Request::get(&to_login).body(Body::empty())?)
        .await?;
    let html = String::from_utf8(
        axum::body::to_bytes(res.into_body(), 1 << 20)
            .await?
            .to_vec(),
    )?;
    assert!(
        html.contains(&format!(
            r#"name=next value="/apps/app-a/dead-letters/{dead}?x=1""#
        )),
        "{html}"
    );
    // Signed in, it leads there; another site, or the sign-in page, it does not.
    for (next, lands) in [
        (asked.as_str(), asked.as_str()),
        ("//evil.example/x", "/apps"),
        ("https://evil.example/x", "/apps"),
        ("/\\evil.example", "/apps"),
        ("/login?next=/apps", "/apps"),
        // An action's result fields in a link are dropped: they would make
        // the page report an action nobody took.
        (
            "/apps/app-a/topics?done=pause&rows=1&named=mail&x=1",
            "/apps/app-a/topics?x=1",
        ),
    ] {
        let next: String = form_urlencoded::byte_serialize(next.as_bytes()).collect();
        let req = Request::post("/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::COOKIE, format!("outboxd_csrf={PRE_LOGIN_CSRF}"))
            .body(Body::from(format!(
                "csrf={PRE_LOGIN_CSRF}&email=operator%40x.io&password={}&next={next}",
                urlencode(PASSWORD)
            )))?;
        let res = app().oneshot(req).await?;
        assert_eq!(res.status(), StatusCode::SEE_OTHER, "{next}");
        assert_eq!(
            res.headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok()),
            Some(lands),
            "{next}"
        );
        assert!(
            !res.headers()
                .get_all(header::SET_COOKIE)
                .iter()
                .any(|c| c.to_str().is_ok_and(|c| c.starts_with("outboxd_flash="))),
            "{next}: no result to show"
        );
    }
    Ok(())
}
