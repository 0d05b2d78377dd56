use crate::portal::{mint_link, COOKIE};
use crate::{now, router, AppState, FailLimiter};
use axum::body::Body;
use axum::http::Request;
use axum::Router;
use http_body_util::BodyExt;
use keygate_control::mgmt::{self, Role};
use keygate_control::store::sqlite::SqliteStore;
use keygate_control::{Db, Service};
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

struct Fx {
    _dir: tempfile::TempDir,
    app: Router,
    state: Arc<AppState>,
}

fn fixture() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.db");
    let svc = Service::new(Box::new(SqliteStore::new(&path)));
    svc.init_store().unwrap();
    let db = Db::sqlite(&path).open().unwrap();
    let state = Arc::new(AppState::new(
        svc,
        db,
        FailLimiter::new(100, Duration::from_secs(60)),
    ));
    Fx {
        _dir: dir,
        app: router(Arc::clone(&state)),
        state,
    }
}

async fn send(
    app: &Router,
    method: &str,
    uri: &str,
    cookie: Option<&str>,
    form: Option<&str>,
) -> (u16, axum::http::HeaderMap, String) {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "portal.test");
    if let Some(c) = cookie {
        b = b.header("cookie", c);
    }
    if form.is_some() {
        b = b.header("content-type", "application/x-www-form-urlencoded");
    }
    let req = b
        .body(form.map_or_else(Body::empty, |s| Body::from(s.to_owned())))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn link(fx: &Fx, tenant: &str) -> String {
    let mut db = fx.state.db.lock().unwrap();
    let (token, _) = mint_link(&mut db, tenant, None, now()).unwrap();
    crate::portal::link_path(&token)
}

/// Opens a link and returns the session cookie (`name=value`) and a CSRF token.
async fn sign_in(fx: &Fx, tenant: &str) -> (String, String) {
    let (s, h, _) = send(&fx.app, "GET", &link(fx, tenant), None, None).await;
    assert_eq!(s, 200);
    let cookie = h["set-cookie"].to_str().unwrap();
    let pair = cookie.split(';').next().unwrap().to_owned();
    let (_, _, page) = send(&fx.app, "GET", "/portal/keys", Some(&pair), None).await;
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    (pair, csrf)
}

#[tokio::test]
async fn a_link_opens_one_session_with_a_strict_cookie_and_works_only_once() {
    let fx = fixture();
    let url = link(&fx, "acme");
    let (s, h, _) = send(&fx.app, "GET", &url, None, None).await;
    assert_eq!(s, 200);
    let c = h["set-cookie"].to_str().unwrap();
    assert!(c.starts_with(&format!("{COOKIE}=kgt_")));
    for flag in [
        "HttpOnly",
        "SameSite=Strict",
        "Max-Age=28800",
        "Path=/portal",
    ] {
        assert!(c.contains(flag), "{c}");
    }
    assert!(!c.contains("Secure"));
    assert_eq!(h["x-frame-options"], "DENY");
    assert!(h["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("script-src 'self'"));
    let (again, _, body) = send(&fx.app, "GET", &url, None, None).await;
    assert_eq!(again, 410);
    assert!(body.contains("already been used"));
}

#[tokio::test]
async fn the_cookie_is_secure_when_the_request_came_over_tls() {
    let fx = fixture();
    let req = Request::builder()
        .uri(link(&fx, "acme"))
        .header("x-forwarded-proto", "https")
        .body(Body::empty())
        .unwrap();
    let resp = fx.app.clone().oneshot(req).await.unwrap();
    assert!(resp.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("; Secure"));
}

#[tokio::test]
async fn pages_need_a_session_and_an_operator_token_is_not_one() {
    let fx = fixture();
    let (s, _, _) = send(&fx.app, "GET", "/portal/keys", None, None).await;
    assert_eq!(s, 401);
    let op = {
        let mut db = fx.state.db.lock().unwrap();
        mgmt::create_token(&mut db, Role::Operator, None, None, now())
            .unwrap()
            .token
    };
    let (s, _, _) = send(
        &fx.app,
        "GET",
        "/portal/keys",
        Some(&format!("{COOKIE}={op}")),
        None,
    )
    .await;
    assert_eq!(s, 401);
}

#[tokio::test]
async fn portal_links_and_sessions_are_no_api_tokens_and_api_tokens_no_portal_sessions() {
    let fx = fixture();
    let url = link(&fx, "acme");
    let link_token = url.split("link=").nth(1).unwrap().to_owned();
    let (cookie, _) = sign_in(&fx, "acme").await;
    let session_token = cookie.split_once('=').unwrap().1.to_owned();
    for t in [&link_token, &session_token] {
        let req = Request::builder()
            .uri("/api/v1/tenants/acme/keys")
            .header("authorization", format!("Bearer {t}"))
            .body(Body::empty())
            .unwrap();
        let resp = fx.app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), 401);
    }
    let (tenant_token, listed) = {
        let mut db = fx.state.db.lock().unwrap();
        let t = mgmt::create_token(&mut db, Role::Tenant, Some("acme"), None, now()).unwrap();
        (t.token, mgmt::list_tokens(&mut db, Some("acme")).unwrap())
    };
    // Only the API token is listed (the link and the session are not).
    assert_eq!(listed.len(), 1);
    let (s, _, _) = send(
        &fx.app,
        "GET",
        "/portal/keys",
        Some(&format!("{COOKIE}={tenant_token}")),
        None,
    )
    .await;
    assert_eq!(s, 401);
    // A session token is no link either.
    let (s, _, _) = send(
        &fx.app,
        "GET",
        &crate::portal::link_path(&session_token),
        None,
        None,
    )
    .await;
    assert_eq!(s, 410);
}

#[tokio::test]
async fn a_form_without_the_csrf_token_is_refused_and_html_in_a_name_is_text() {
    let fx = fixture();
    let (cookie, csrf) = sign_in(&fx, "acme").await;
    let (s, _, _) = send(
        &fx.app,
        "POST",
        "/portal/keys",
        Some(&cookie),
        Some("name=x"),
    )
    .await;
    assert_eq!(s, 403);
    let form =
        format!("csrf={csrf}&name=%3Cscript%3Ealert(1)%3C%2Fscript%3E&scopes=read&with_secret=on");
    let (s, _, page) = send(&fx.app, "POST", "/portal/keys", Some(&cookie), Some(&form)).await;
    assert_eq!(s, 201, "{page}");
    assert!(page.contains("id=\"secret\""));
    let (_, _, list) = send(&fx.app, "GET", "/portal/keys", Some(&cookie), None).await;
    assert!(list.contains("&#60;script&#62;alert(1)&#60;/script&#62;"));
    assert!(!list.contains("<script>alert"));
}

#[tokio::test]
async fn another_tenants_key_answers_404_and_a_bad_cidr_is_shown_at_its_field() {
    let fx = fixture();
    let (acme, acme_csrf) = sign_in(&fx, "acme").await;
    let (globex, csrf) = sign_in(&fx, "globex").await;
    let form = format!("csrf={csrf}&name=theirs&scopes=read");
    let (s, _, page) = send(&fx.app, "POST", "/portal/keys", Some(&globex), Some(&form)).await;
    assert_eq!(s, 201);
    let kid = page
        .split("href=\"/portal/keys/")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    let (s, _, _) = send(
        &fx.app,
        "GET",
        &format!("/portal/keys/{kid}"),
        Some(&acme),
        None,
    )
    .await;
    assert_eq!(s, 404);
    let del = format!("csrf={acme_csrf}");
    let (s, _, _) = send(
        &fx.app,
        "POST",
        &format!("/portal/keys/{kid}/delete"),
        Some(&acme),
        Some(&del),
    )
    .await;
    assert_eq!(s, 404);
    let (s, _, _) = send(
        &fx.app,
        "GET",
        &format!("/portal/keys/{kid}"),
        Some(&globex),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let bad = format!("csrf={csrf}&allowed_ips=10.0.0.0%2F33");
    let (s, _, page) = send(
        &fx.app,
        "POST",
        &format!("/portal/keys/{kid}/ips"),
        Some(&globex),
        Some(&bad),
    )
    .await;
    assert_eq!(s, 422, "{page}");
    assert!(page.contains("id=\"allowed_ips-error\""));
    assert!(page.contains("10.0.0.0/33"));
}

#[test]
fn the_usage_chart_has_one_bar_per_bucket_and_keeps_the_totals() {
    let (a, d, n) = super::pages::chart_for_test(&[(0, 3, 1), (25, 2, 0), (99, 5, 5)]);
    // The point at 99 is outside the three 10 ms buckets starting at 0.
    assert_eq!((a, d, n), (5, 1, 3));
}

#[tokio::test]
async fn the_key_page_shows_the_keys_limits_and_plan() {
    let fx = fixture();
    let kid = {
        let svc = fx.state.svc.lock().unwrap();
        svc.create_plan("pro", vec!["100/min".parse().unwrap()], now())
            .unwrap();
        let new = keygate_control::service::NewKey {
            key_id: None,
            name: "limited".into(),
            tenant: "acme".into(),
            environment: "live".into(),
            kind: keygate_core::credential::Kind::Scoped,
            scopes: vec!["read".into()],
            allowed_ips: vec![],
            rate_limit: None,
            expires_at: None,
            with_secret: false,
            key_value: None,
            secret_value: None,
            ..Default::default()
        };
        let limits = keygate_control::service::KeyLimits {
            limits: vec!["10/s".parse().unwrap(), "10000/day".parse().unwrap()],
            plan: Some("pro".into()),
        };
        svc.create_key_limited(new, limits, now()).unwrap().key_id
    };
    let (cookie, _) = sign_in(&fx, "acme").await;
    let (s, _, page) = send(
        &fx.app,
        "GET",
        &format!("/portal/keys/{kid}"),
        Some(&cookie),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert!(
        page.contains("<dt>Limits</dt><dd>10/s, 10000/day</dd>"),
        "{page}"
    );
    assert!(page.contains("<dt>Plan</dt><dd>pro</dd>"), "{page}");
    assert!(
        page.contains("<dt>Usage credits</dt><dd id=\"credits\">-</dd>"),
        "{page}"
    );
    // The key's own limits win over its plan's.
    assert!(
        page.contains("<dd id=\"effective-limits\">10/s, 10000/day (the key&#39;s own)</dd>"),
        "{page}"
    );
}

/// A scoped key for `tenant` named `name`, on `plan` if given.
fn limited_key(fx: &Fx, tenant: &str, name: &str, plan: Option<&str>) -> String {
    let svc = fx.state.svc.lock().unwrap();
    let new = keygate_control::service::NewKey {
        name: name.into(),
        tenant: tenant.into(),
        environment: "live".into(),
        kind: keygate_core::credential::Kind::Scoped,
        scopes: vec!["read".into()],
        ..Default::default()
    };
    let limits = keygate_control::service::KeyLimits {
        limits: vec![],
        plan: plan.map(Into::into),
    };
    svc.create_key_limited(new, limits, now()).unwrap().key_id
}

/// Allowed requests of `key_id` in the request log, `n` of them, now.
fn log_allowed(fx: &Fx, tenant: &str, key_id: &str, n: usize) {
    let db = fx.state.db.lock().unwrap();
    let keygate_control::Conn::Sqlite(c) = &*db else {
        panic!("the fixture's database is SQLite")
    };
    let t = (now() * 1000 + 500) as i64;
    for i in 0..n {
        c.execute(
            &format!(
                "INSERT INTO request_logs (time_ms, key_id, tenant, decision) \
                 VALUES ({}, '{key_id}', '{tenant}', 'allowed')",
                t + i as i64
            ),
            (),
        )
        .unwrap();
    }
}

#[tokio::test]
async fn the_limits_page_shows_the_tenants_plan_shared_limits_and_each_keys_limits_only_its_own() {
    use keygate_control::service::TenantLimitsChange;
    let fx = fixture();
    {
        let svc = fx.state.svc.lock().unwrap();
        let l = |v: &[&str]| v.iter().map(|s| s.parse().unwrap()).collect::<Vec<_>>();
        svc.create_plan("free", l(&["10/min"]), now()).unwrap();
        svc.create_plan("pro", l(&["100/min", "5000/day"]), now())
            .unwrap();
        svc.create_plan("secretplan", l(&["7/min"]), now()).unwrap();
        for (tenant, plan, limits) in [
            ("acme", "free", l(&["1000/min"])),
            ("other", "secretplan", l(&["4242/hour"])),
        ] {
            svc.set_tenant_limits(
                tenant,
                &TenantLimitsChange {
                    plan: Some(Some(plan.into())),
                    limits: Some(limits),
                },
            )
            .unwrap();
        }
    }
    let via_tenant = limited_key(&fx, "acme", "bytenant", None);
    let on_pro = limited_key(&fx, "acme", "onpro", Some("pro"));
    let theirs = limited_key(&fx, "other", "theirkey", None);
    {
        let svc = fx.state.svc.lock().unwrap();
        let patch = keygate_control::service::KeyPatch {
            credits: Some(Some((100, false))),
            ..Default::default()
        };
        svc.patch_key("acme", &on_pro, &patch, now()).unwrap();
    }
    log_allowed(&fx, "acme", &on_pro, 3);
    let (cookie, _) = sign_in(&fx, "acme").await;
    let (s, _, page) = send(&fx.app, "GET", "/portal/limits", Some(&cookie), None).await;
    assert_eq!(s, 200);
    assert!(page.contains("<strong>free</strong>: 10/min"), "{page}");
    assert!(
        page.contains("<dd id=\"tenant-limits\">1000/min</dd>"),
        "{page}"
    );
    assert!(page.contains("<a href=\"/portal/limits\" aria-current=\"page\">Limits</a>"));
    assert!(
        page.contains(&format!("/portal/keys/{via_tenant}")),
        "{page}"
    );
    assert!(
        page.contains("10/min (plan free, your tenant&#39;s)"),
        "{page}"
    );
    assert!(page.contains("100/min, 5000/day (plan pro)"), "{page}");
    assert!(page.contains("97 of 100 left (3 used since"), "{page}");
    // Read-only: no form but sign-out's.
    assert_eq!(page.matches("<form").count(), 1, "{page}");
    // Nothing of the other tenant.
    for secret in [theirs.as_str(), "theirkey", "secretplan", "7/min", "4242"] {
        assert!(!page.contains(secret), "{secret} shown to acme: {page}");
    }
    // The key page says the same for one key, and another tenant's key is 404.
    let (s, _, page) = send(
        &fx.app,
        "GET",
        &format!("/portal/keys/{on_pro}"),
        Some(&cookie),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert!(
        page.contains("<dd id=\"effective-limits\">100/min, 5000/day (plan pro)</dd>"),
        "{page}"
    );
    assert!(
        page.contains("<dd id=\"tenant-limits\">1000/min</dd>"),
        "{page}"
    );
    assert!(
        page.contains("<dd id=\"credits\">97 of 100 left (3 used since"),
        "{page}"
    );
    let (s, _, page) = send(
        &fx.app,
        "GET",
        &format!("/portal/keys/{theirs}"),
        Some(&cookie),
        None,
    )
    .await;
    assert_eq!(s, 404);
    assert!(
        !page.contains("4242") && !page.contains("secretplan"),
        "{page}"
    );
    // Signed out: no limits page.
    let (s, _, _) = send(&fx.app, "GET", "/portal/limits", None, None).await;
    assert_ne!(s, 200);
}

/// Only operators set limits: the create form offers no rate limit, and a
/// crafted form that carries one is refused and makes no key.
#[tokio::test]
async fn the_create_form_has_no_rate_limit_and_a_posted_one_is_refused() {
    let fx = fixture();
    let (cookie, csrf) = sign_in(&fx, "acme").await;
    let (_, _, page) = send(&fx.app, "GET", "/portal/keys", Some(&cookie), None).await;
    assert!(!page.contains("name=\"rate_limit\""), "{page}");
    assert!(page.contains("id=\"limits-note\""), "{page}");
    let form = format!("csrf={csrf}&name=fast&scopes=read&rate_limit=1000000%2F1s");
    let (s, _, page) = send(&fx.app, "POST", "/portal/keys", Some(&cookie), Some(&form)).await;
    assert_eq!(s, 403, "{page}");
    assert!(page.contains("set by your operator"), "{page}");
    let keys = fx
        .state
        .svc
        .lock()
        .unwrap()
        .list_keys(Some("acme"))
        .unwrap();
    assert!(keys.is_empty(), "a key was made");
    // The same form without the field makes a key without a rate limit of its own.
    let form = format!("csrf={csrf}&name=plain&scopes=read&rate_limit=");
    let (s, _, page) = send(&fx.app, "POST", "/portal/keys", Some(&cookie), Some(&form)).await;
    assert_eq!(s, 201, "{page}");
    let keys = fx
        .state
        .svc
        .lock()
        .unwrap()
        .list_keys(Some("acme"))
        .unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].record.rate_limit, None);
}

/// Axum's own refusals (a path parameter that is not UTF-8, a body that is
/// not a form) are shown as the portal's error page, after the sign-in check.
#[tokio::test]
async fn an_unreadable_path_or_form_shows_an_error_page_not_plain_text() {
    let fx = fixture();
    let (s, h, page) = send(&fx.app, "GET", "/portal/keys/%FF", None, None).await;
    assert_eq!(s, 401, "{page}");
    assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));
    let (cookie, csrf) = sign_in(&fx, "acme").await;
    for (method, uri) in [
        ("GET", "/portal/keys/%FF"),
        ("GET", "/portal/keys/%FF/delete"),
        ("POST", "/portal/keys/k/sessions/%C3%28/revoke"),
    ] {
        let form = format!("csrf={csrf}");
        let body = (method == "POST").then_some(form.as_str());
        let (s, h, page) = send(&fx.app, method, uri, Some(&cookie), body).await;
        assert_eq!(s, 400, "{uri}: {page}");
        assert!(
            h["content-type"].to_str().unwrap().starts_with("text/html"),
            "{uri}"
        );
        assert!(page.contains("This address is not valid"), "{uri}: {page}");
        assert!(!page.contains("Invalid URL"), "{uri}: {page}");
    }
    let req = Request::builder()
        .method("POST")
        .uri("/portal/keys")
        .header("host", "portal.test")
        .header("cookie", &cookie)
        .header("content-type", "text/plain")
        .body(Body::from(format!("csrf={csrf}&name=x")))
        .unwrap();
    let resp = fx.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 415);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&bytes).contains("This form could not be read"));
}
