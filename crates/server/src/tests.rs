use super::*;
use axum::body::Body;
use axum::http::Request as HttpRequest;
use http_body_util::BodyExt;
use keygate_control::mgmt::{self, Role};
use keygate_control::store::sqlite::SqliteStore;
use keygate_control::Db;
use std::collections::BTreeSet;
use std::time::Duration;
use tower::ServiceExt;

struct Fx {
    _dir: tempfile::TempDir,
    app: Router,
    operator: String,
    acme: String,
}

fn fixture() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.db");
    let svc = Service::new(Box::new(SqliteStore::new(&path)));
    svc.init_store().unwrap();
    let mut db = Db::sqlite(&path).open().unwrap();
    let operator = mgmt::create_token(&mut db, Role::Operator, None, None, now())
        .unwrap()
        .token;
    let acme = mgmt::create_token(&mut db, Role::Tenant, Some("acme"), None, now())
        .unwrap()
        .token;
    let state = Arc::new(AppState::new(
        svc,
        db,
        FailLimiter::new(3, Duration::from_secs(60)),
    ));
    Fx {
        _dir: dir,
        app: router(state),
        operator,
        acme,
    }
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut b = HttpRequest::builder().method(method).uri(uri);
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    let req = b
        .body(body.map_or_else(Body::empty, |s| Body::from(s.to_owned())))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[test]
fn every_route_is_in_the_openapi_document_and_nothing_else() {
    let doc: Value = serde_json::from_str(OPENAPI).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut documented = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for m in ops.as_object().unwrap().keys() {
            documented.insert((m.to_uppercase(), path.clone()));
        }
    }
    let routed: BTreeSet<(String, String)> = api_operations()
        .into_iter()
        .map(|(m, p)| (m.as_str().to_owned(), p.to_owned()))
        .collect();
    assert_eq!(routed, documented);
}

#[tokio::test]
async fn a_tenant_token_gets_404_for_another_tenants_objects() {
    let f = fixture();
    let (s, v) = call(
        &f.app,
        "POST",
        "/api/v1/tenants/other/keys",
        Some(&f.operator),
        Some(r#"{"name":"x","scopes":["read"]}"#),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let id = v["key_id"].as_str().unwrap().to_owned();
    for (m, u) in [
        ("GET", format!("/api/v1/tenants/other/keys/{id}")),
        ("DELETE", format!("/api/v1/tenants/other/keys/{id}")),
        ("GET", "/api/v1/tenants/other/keys".into()),
        ("GET", format!("/api/v1/tenants/acme/keys/{id}")),
        ("DELETE", format!("/api/v1/tenants/acme/keys/{id}")),
    ] {
        let (s, v) = call(&f.app, m, &u, Some(&f.acme), None).await;
        assert_eq!(s, 404, "{m} {u}: {v}");
        assert_eq!(v["error"], "not_found");
    }
    let (s, _) = call(
        &f.app,
        "GET",
        &format!("/api/v1/tenants/other/keys/{id}"),
        Some(&f.operator),
        None,
    )
    .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn the_sixth_scoped_key_is_refused_with_409_saying_why() {
    let f = fixture();
    for _ in 0..5 {
        let (s, _) = call(
            &f.app,
            "POST",
            "/api/v1/tenants/acme/keys",
            Some(&f.acme),
            Some(r#"{"name":"k","scopes":["read"]}"#),
        )
        .await;
        assert_eq!(s, 201);
    }
    let (s, v) = call(
        &f.app,
        "POST",
        "/api/v1/tenants/acme/keys",
        Some(&f.acme),
        Some(r#"{"name":"k","scopes":["read"]}"#),
    )
    .await;
    assert_eq!(s, 409);
    assert!(v["message"].as_str().unwrap().contains("5 scoped"), "{v}");
}

#[tokio::test]
async fn bad_input_names_the_field_and_unknown_fields_are_refused() {
    let f = fixture();
    let (s, v) = call(
        &f.app,
        "POST",
        "/api/v1/tenants/acme/keys",
        Some(&f.acme),
        Some(r#"{"name":"k","scopes":["read"],"colour":1}"#),
    )
    .await;
    assert_eq!(s, 422, "{v}");
    assert!(v["message"].as_str().unwrap().contains("colour"), "{v}");
    let (s, v) = call(
        &f.app,
        "POST",
        "/api/v1/tenants/acme/keys",
        Some(&f.acme),
        Some(r#"{"name":"k","scopes":[7]}"#),
    )
    .await;
    assert_eq!((s, v["field"].as_str()), (422, Some("scopes[0]")), "{v}");
    let (s, v) = call(
        &f.app,
        "POST",
        "/api/v1/tenants/acme/keys",
        Some(&f.operator),
        Some(r#"{"name":"k","scopes":["read"],"rate_limit":"lots"}"#),
    )
    .await;
    assert_eq!((s, v["field"].as_str()), (422, Some("rate_limit")), "{v}");
    let (s, v) = call(
        &f.app,
        "POST",
        "/api/v1/tenants/acme/keys",
        Some(&f.acme),
        Some("{nope"),
    )
    .await;
    assert_eq!((s, v["error"].as_str()), (400, Some("malformed_json")));
    let big = format!(r#"{{"name":"{}"}}"#, "x".repeat(MAX_BODY));
    let (s, v) = call(
        &f.app,
        "POST",
        "/api/v1/tenants/acme/keys",
        Some(&f.acme),
        Some(&big),
    )
    .await;
    assert_eq!((s, v["error"].as_str()), (413, Some("body_too_large")));
}

#[tokio::test]
async fn keys_never_show_secrets_after_creation_and_patch_changes_them() {
    let f = fixture();
    let (_, v) = call(
        &f.app,
        "POST",
        "/api/v1/tenants/acme/keys",
        Some(&f.acme),
        Some(r#"{"name":"k","scopes":["read"],"with_secret":true}"#),
    )
    .await;
    let id = v["key_id"].as_str().unwrap().to_owned();
    let secret = v["secret"].as_str().unwrap().to_owned();
    let api_key = v["api_key"].as_str().unwrap().to_owned();
    let (s, v) = call(
        &f.app,
        "PATCH",
        &format!("/api/v1/tenants/acme/keys/{id}"),
        Some(&f.operator),
        Some(r#"{"status":"inactive","rate_limit":"100/min","name":"renamed"}"#),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (
            v["status"].as_str(),
            v["rate_limit"].as_str(),
            v["name"].as_str()
        ),
        (Some("inactive"), Some("100/60s"), Some("renamed"))
    );
    let (_, list) = call(
        &f.app,
        "GET",
        "/api/v1/tenants/acme/keys",
        Some(&f.acme),
        None,
    )
    .await;
    let text = list.to_string();
    assert!(
        !text.contains(&secret) && !text.contains(&api_key) && !text.contains("hash"),
        "{text}"
    );
}

#[tokio::test]
async fn roles_and_tokens_are_enforced() {
    let f = fixture();
    assert_eq!(
        call(&f.app, "GET", "/api/v1/tenants", None, None).await.0,
        401
    );
    assert_eq!(
        call(&f.app, "GET", "/api/v1/audit", Some(&f.acme), None)
            .await
            .0,
        403
    );
    assert_eq!(
        call(
            &f.app,
            "POST",
            "/api/v1/tenants/acme/tokens",
            Some(&f.acme),
            None
        )
        .await
        .0,
        403
    );
    let (s, v) = call(
        &f.app,
        "POST",
        "/api/v1/tenants/acme/tokens",
        Some(&f.operator),
        None,
    )
    .await;
    assert_eq!(s, 201);
    let token = v["token"].as_str().unwrap().to_owned();
    let token_id = v["token_id"].as_str().unwrap().to_owned();
    assert_eq!(
        call(
            &f.app,
            "GET",
            "/api/v1/tenants/acme/keys",
            Some(&token),
            None
        )
        .await
        .0,
        200
    );
    assert_eq!(
        call(
            &f.app,
            "DELETE",
            &format!("/api/v1/tenants/acme/tokens/{token_id}"),
            Some(&f.operator),
            None
        )
        .await
        .0,
        204
    );
    assert_eq!(
        call(
            &f.app,
            "GET",
            "/api/v1/tenants/acme/keys",
            Some(&token),
            None
        )
        .await
        .0,
        401
    );
    let (_, a) = call(&f.app, "GET", "/api/v1/audit", Some(&f.operator), None).await;
    let text = a.to_string();
    assert!(
        text.contains("token.revoke") && !text.contains(&token),
        "{text}"
    );
}

#[tokio::test]
async fn repeated_bad_tokens_get_429() {
    let f = fixture();
    for _ in 0..3 {
        assert_eq!(
            call(&f.app, "GET", "/api/v1/tenants", Some("kgt_wrong"), None)
                .await
                .0,
            401
        );
    }
    let (s, v) = call(&f.app, "GET", "/api/v1/tenants", Some("kgt_wrong"), None).await;
    assert_eq!((s, v["error"].as_str()), (429, Some("too_many_failures")));
}

#[tokio::test]
async fn a_roll_gives_a_new_value_and_keeps_owner_metadata_and_id() {
    let fx = fixture();
    let (s, created) = call(
        &fx.app,
        "POST",
        "/api/v1/tenants/acme/keys",
        Some(&fx.acme),
        Some(r#"{"name":"billing","scopes":["read"],"owner":"alice@example.com","metadata":{"plan_tier":"gold"}}"#),
    )
    .await;
    assert_eq!(s, 201, "{created}");
    let api_key = created["api_key"].as_str().unwrap().to_owned();
    assert!(api_key.starts_with("kg_live_"), "{api_key}");
    assert_eq!(created["key"]["owner"], "alice@example.com");
    assert_eq!(created["key"]["metadata"]["plan_tier"], "gold");
    let id = created["key_id"].as_str().unwrap().to_owned();
    let uri = format!("/api/v1/tenants/acme/keys/{id}/roll");
    let (s, rolled) = call(
        &fx.app,
        "POST",
        &uri,
        Some(&fx.acme),
        Some(r#"{"grace_seconds":60}"#),
    )
    .await;
    assert_eq!(s, 200, "{rolled}");
    assert_ne!(rolled["api_key"], json!(api_key));
    assert!(rolled["previous_key_valid_until"].is_string());
    let (_, k) = call(
        &fx.app,
        "GET",
        &format!("/api/v1/tenants/acme/keys/{id}"),
        Some(&fx.acme),
        None,
    )
    .await;
    assert_eq!(
        (k["name"].clone(), k["owner"].clone()),
        (json!("billing"), json!("alice@example.com"))
    );
    assert!(k["previous_key_valid_until"].is_string());
    assert_eq!(k["expired"], false);
    let (s, e) = call(
        &fx.app,
        "POST",
        &uri,
        Some(&fx.acme),
        Some(r#"{"grace_seconds":9999999}"#),
    )
    .await;
    assert_eq!(
        (
            s,
            e["message"].as_str().unwrap().starts_with("grace_seconds")
        ),
        (422, true),
        "{e}"
    );
    // hex64 on request.
    let (s, h) = call(
        &fx.app,
        "POST",
        &uri,
        Some(&fx.acme),
        Some(r#"{"key_format":"hex64"}"#),
    )
    .await;
    assert_eq!(s, 200);
    assert!(keygate_core::hash::is_hex64(
        h["api_key"].as_str().unwrap().as_bytes()
    ));
}

#[tokio::test]
async fn bad_metadata_or_owner_is_422_naming_the_field_and_changes_nothing() {
    let fx = fixture();
    let (_, created) = call(
        &fx.app,
        "POST",
        "/api/v1/tenants/acme/keys",
        Some(&fx.acme),
        Some(r#"{"name":"k","scopes":["read"]}"#),
    )
    .await;
    let id = created["key_id"].as_str().unwrap().to_owned();
    let big = format!(
        r#"{{"name":"x","scopes":["read"],"metadata":{{"a":"{}"}}}}"#,
        "x".repeat(5000)
    );
    for (body, field) in [
        (
            r#"{"name":"x","scopes":["read"],"metadata":[1,2]}"#.to_string(),
            "metadata",
        ),
        (big, "metadata"),
        (
            r#"{"name":"x","scopes":["read"],"owner":"has space"}"#.to_string(),
            "owner",
        ),
    ] {
        let (s, e) = call(
            &fx.app,
            "POST",
            "/api/v1/tenants/acme/keys",
            Some(&fx.acme),
            Some(&body),
        )
        .await;
        assert_eq!(s, 422, "{e}");
        assert!(e["message"].as_str().unwrap().starts_with(field), "{e}");
    }
    let uri = format!("/api/v1/tenants/acme/keys/{id}");
    let (_, before) = call(&fx.app, "GET", &uri, Some(&fx.acme), None).await;
    let (s, e) = call(
        &fx.app,
        "PATCH",
        &uri,
        Some(&fx.acme),
        Some(r#"{"name":"new","metadata":"text"}"#),
    )
    .await;
    assert_eq!(s, 422, "{e}");
    let (_, after) = call(&fx.app, "GET", &uri, Some(&fx.acme), None).await;
    assert_eq!(before, after);
    let (s, k) = call(
        &fx.app,
        "PATCH",
        &uri,
        Some(&fx.acme),
        Some(r#"{"owner":"bob","metadata":{"t":1}}"#),
    )
    .await;
    assert_eq!(
        (s, k["owner"].clone(), k["metadata"]["t"].clone()),
        (200, json!("bob"), json!(1))
    );
    let (_, list) = call(
        &fx.app,
        "GET",
        "/api/v1/tenants/acme/keys",
        Some(&fx.acme),
        None,
    )
    .await;
    assert!(list.to_string().contains(r#""owner":"bob""#), "{list}");
}

#[tokio::test]
async fn plans_are_operator_only_and_bad_limits_are_422_naming_the_entry() {
    let f = fixture();
    let (s, v) = call(
        &f.app,
        "POST",
        "/api/v1/plans",
        Some(&f.acme),
        Some(r#"{"name":"free","limits":["10/min"]}"#),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    let (s, v) = call(
        &f.app,
        "POST",
        "/api/v1/plans",
        Some(&f.operator),
        Some(r#"{"name":"free","limits":["10/min","5/hour"]}"#),
    )
    .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["field"], "limits[1]", "{v}");
    let (s, v) = call(
        &f.app,
        "POST",
        "/api/v1/plans",
        Some(&f.operator),
        Some(r#"{"name":"free","limits":["10/fortnight"]}"#),
    )
    .await;
    assert_eq!((s, v["field"].as_str()), (422, Some("limits[0]")), "{v}");
    let (s, v) = call(&f.app, "GET", "/api/v1/plans", Some(&f.operator), None).await;
    assert_eq!(
        (s, v["plans"].as_array().map(Vec::len)),
        (200, Some(0)),
        "nothing was created: {v}"
    );
    let (s, v) = call(
        &f.app,
        "POST",
        "/api/v1/plans",
        Some(&f.operator),
        Some(r#"{"name":"free","limits":["10/min","1000/day"]}"#),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["limits"], json!(["10/min", "1000/day"]));
    let (s, v) = call(
        &f.app,
        "PUT",
        "/api/v1/plans/free",
        Some(&f.operator),
        Some(r#"{"limits":["20/min"]}"#),
    )
    .await;
    assert_eq!((s, v["limits"].clone()), (200, json!(["20/min"])), "{v}");
    let (s, _) = call(&f.app, "GET", "/api/v1/plans/nope", Some(&f.operator), None).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn a_key_on_an_unknown_plan_is_422_and_nothing_is_created() {
    let f = fixture();
    let (s, v) = call(
        &f.app,
        "POST",
        "/api/v1/tenants/acme/keys",
        Some(&f.operator),
        Some(r#"{"name":"x","scopes":["read"],"plan":"gold"}"#),
    )
    .await;
    assert_eq!((s, v["field"].as_str()), (422, Some("plan")), "{v}");
    let (_, v) = call(
        &f.app,
        "GET",
        "/api/v1/tenants/acme/keys",
        Some(&f.operator),
        None,
    )
    .await;
    assert_eq!(v["keys"].as_array().map(Vec::len), Some(0), "{v}");
    // A tenant may not choose its own limits or plan.
    let (s, v) = call(
        &f.app,
        "POST",
        "/api/v1/tenants/acme/keys",
        Some(&f.acme),
        Some(r#"{"name":"x","scopes":["read"],"limits":["1000000/s"]}"#),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    let (s, v) = call(
        &f.app,
        "POST",
        "/api/v1/tenants/acme/keys",
        Some(&f.operator),
        Some(r#"{"name":"x","scopes":["read"],"limits":["100/min","10000/day","200000/month"]}"#),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        v["key"]["limits"],
        json!(["100/min", "10000/day", "200000/month"])
    );
    let id = v["key_id"].as_str().unwrap().to_owned();
    let (s, v) = call(
        &f.app,
        "PATCH",
        &format!("/api/v1/tenants/acme/keys/{id}"),
        Some(&f.operator),
        Some(r#"{"limits":["5/s","5/s"]}"#),
    )
    .await;
    assert_eq!((s, v["field"].as_str()), (422, Some("limits[1]")), "{v}");
    let (s, v) = call(
        &f.app,
        "PATCH",
        &format!("/api/v1/tenants/acme/keys/{id}"),
        Some(&f.acme),
        Some(r#"{"plan":null}"#),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    let (_, v) = call(
        &f.app,
        "GET",
        &format!("/api/v1/tenants/acme/keys/{id}"),
        Some(&f.acme),
        None,
    )
    .await;
    assert_eq!(
        v["limits"],
        json!(["100/min", "10000/day", "200000/month"]),
        "unchanged: {v}"
    );
}

#[tokio::test]
async fn tenant_limits_are_set_by_operators_and_read_by_the_tenant() {
    let f = fixture();
    let (s, v) = call(
        &f.app,
        "PUT",
        "/api/v1/tenants/acme/limits",
        Some(&f.acme),
        Some(r#"{"limits":["1000/min"]}"#),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    let (s, v) = call(
        &f.app,
        "PUT",
        "/api/v1/tenants/acme/limits",
        Some(&f.operator),
        Some(r#"{"plan":"pro"}"#),
    )
    .await;
    assert_eq!((s, v["field"].as_str()), (422, Some("plan")), "{v}");
    let (s, v) = call(
        &f.app,
        "PUT",
        "/api/v1/tenants/acme/limits",
        Some(&f.operator),
        Some(r#"{"limits":["1000/min","50/hour"]}"#),
    )
    .await;
    assert_eq!((s, v["field"].as_str()), (422, Some("limits[1]")), "{v}");
    let (s, v) = call(
        &f.app,
        "PUT",
        "/api/v1/tenants/acme/limits",
        Some(&f.operator),
        Some(r#"{"limits":["1000/min"]}"#),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = call(
        &f.app,
        "GET",
        "/api/v1/tenants/acme/limits",
        Some(&f.acme),
        None,
    )
    .await;
    assert_eq!(
        (s, v["limits"].clone(), v["plan"].clone()),
        (200, json!(["1000/min"]), Value::Null),
        "{v}"
    );
    let (s, _) = call(
        &f.app,
        "GET",
        "/api/v1/tenants/other/limits",
        Some(&f.acme),
        None,
    )
    .await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn credits_are_topped_up_by_operators_only_and_bounded() {
    let f = fixture();
    let (s, v) = call(
        &f.app,
        "POST",
        "/api/v1/tenants/acme/keys",
        Some(&f.operator),
        Some(r#"{"name":"x","scopes":["read"]}"#),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let uri = format!(
        "/api/v1/tenants/acme/keys/{}",
        v["key_id"].as_str().unwrap()
    );
    let (s, v) = call(
        &f.app,
        "PATCH",
        &uri,
        Some(&f.acme),
        Some(r#"{"credits":{"balance":1000000}}"#),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    let (s, v) = call(
        &f.app,
        "PATCH",
        &uri,
        Some(&f.operator),
        Some(r#"{"credits":{"balance":5000000000}}"#),
    )
    .await;
    assert_eq!(
        (s, v["field"].as_str()),
        (422, Some("credits.balance")),
        "{v}"
    );
    let (s, v) = call(
        &f.app,
        "PATCH",
        &uri,
        Some(&f.operator),
        Some(r#"{"credits":{"balance":100,"monthly":true}}"#),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (
            v["credits"]["balance"].as_u64(),
            v["credits"]["monthly"].as_bool()
        ),
        (Some(100), Some(true))
    );
    // What is left, counted from the request log: the allowed requests
    // since the top-up, seen by the tenant in the key and in the list.
    let key_id = uri.rsplit('/').next().unwrap().to_owned();
    let granted = humantime::parse_rfc3339(v["credits"]["granted_at"].as_str().unwrap())
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let keygate_control::Conn::Sqlite(c) = Db::sqlite(f._dir.path().join("k.db")).open().unwrap()
    else {
        panic!("SQLite")
    };
    for (t, decision) in [
        (granted - 1000, "allowed"),
        (granted + 1, "allowed"),
        (granted + 2, "allowed"),
        (granted + 3, "denied"),
        (granted + 4, "allowed"),
    ] {
        c.execute(
            &format!(
                "INSERT INTO request_logs (time_ms, key_id, tenant, decision) \
                 VALUES ({t}, '{key_id}', 'acme', '{decision}')"
            ),
            (),
        )
        .unwrap();
    }
    let (s, v) = call(&f.app, "GET", &uri, Some(&f.acme), None).await;
    assert_eq!(s, 200, "{v}");
    let cr = &v["credits"];
    assert_eq!(
        (
            cr["balance"].as_u64(),
            cr["used"].as_u64(),
            cr["remaining"].as_u64()
        ),
        (Some(100), Some(3), Some(97)),
        "{v}"
    );
    assert!(
        cr["refills_at"]
            .as_str()
            .is_some_and(|t| t.ends_with("-01T00:00:00Z")),
        "{v}"
    );
    let (_, v) = call(
        &f.app,
        "GET",
        "/api/v1/tenants/acme/keys",
        Some(&f.acme),
        None,
    )
    .await;
    assert_eq!(
        v["keys"][0]["credits"]["remaining"].as_u64(),
        Some(97),
        "{v}"
    );
    let (_, v) = call(
        &f.app,
        "PATCH",
        &uri,
        Some(&f.operator),
        Some(r#"{"credits":null}"#),
    )
    .await;
    assert!(v["credits"].is_null(), "{v}");
}

#[tokio::test]
async fn logs_show_the_owner_and_filter_by_it_within_the_tenant_and_refuse_a_bad_one() {
    let fx = fixture();
    let mut db = Db::sqlite(fx._dir.path().join("k.db")).open().unwrap();
    let keygate_control::Conn::Sqlite(c) = &mut db else {
        panic!("sqlite")
    };
    c.execute_batch(
        "INSERT INTO request_logs (time_ms, key_id, tenant, request_id, owner) VALUES \
         (1000, 'k1', 'acme', 'mine', 'alice@example.com'), (2000, 'k2', 'acme', 'none', NULL), \
         (3000, 'k3', 'globex', 'theirs', 'alice@example.com')",
    )
    .unwrap();
    let ids = |v: &Value| -> Vec<(String, Value)> {
        v["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["request_id"].as_str().unwrap().to_owned(),
                    r["owner"].clone(),
                )
            })
            .collect()
    };
    let (s, all) = call(
        &fx.app,
        "GET",
        "/api/v1/tenants/acme/logs",
        Some(&fx.acme),
        None,
    )
    .await;
    assert_eq!(s, 200, "{all}");
    assert_eq!(
        ids(&all),
        vec![
            ("none".to_owned(), Value::Null),
            ("mine".to_owned(), json!("alice@example.com"))
        ]
    );
    let (s, mine) = call(
        &fx.app,
        "GET",
        "/api/v1/tenants/acme/logs?owner=alice@example.com",
        Some(&fx.acme),
        None,
    )
    .await;
    assert_eq!(s, 200, "{mine}");
    assert_eq!(
        ids(&mine),
        vec![("mine".to_owned(), json!("alice@example.com"))]
    );
    for bad in ["has%20space", "", "caf%C3%A9"] {
        let (s, e) = call(
            &fx.app,
            "GET",
            &format!("/api/v1/tenants/acme/logs?owner={bad}"),
            Some(&fx.acme),
            None,
        )
        .await;
        assert_eq!((s, e["field"].as_str()), (422, Some("owner")), "{bad}: {e}");
    }
}

/// A key's own rate limit replaces its plan's limits in the gateway, so a
/// tenant that could set one would lift the limits its operator chose.
#[tokio::test]
async fn a_tenant_token_cannot_set_or_clear_a_keys_rate_limit_but_an_operator_can() {
    let f = fixture();
    let (s, v) = call(
        &f.app,
        "POST",
        "/api/v1/tenants/acme/keys",
        Some(&f.acme),
        Some(r#"{"name":"fast","scopes":["read"],"rate_limit":"1000000/1s"}"#),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["error"], "forbidden");
    assert!(
        v["message"].as_str().unwrap().starts_with("rate_limit: "),
        "{v}"
    );
    let (_, list) = call(
        &f.app,
        "GET",
        "/api/v1/tenants/acme/keys",
        Some(&f.operator),
        None,
    )
    .await;
    assert_eq!(list["keys"].as_array().unwrap().len(), 0, "{list}");

    let (s, v) = call(
        &f.app,
        "POST",
        "/api/v1/tenants/acme/keys",
        Some(&f.operator),
        Some(r#"{"name":"k","scopes":["read"],"rate_limit":"5/min"}"#),
    )
    .await;
    assert_eq!(
        (s, v["key"]["rate_limit"].as_str()),
        (201, Some("5/60s")),
        "{v}"
    );
    let id = v["key_id"].as_str().unwrap().to_owned();
    let uri = format!("/api/v1/tenants/acme/keys/{id}");
    for body in [
        r#"{"rate_limit":"1000000/1s"}"#,
        r#"{"rate_limit":null}"#,
        r#"{"name":"renamed","rate_limit":"10/min"}"#,
    ] {
        let (s, v) = call(&f.app, "PATCH", &uri, Some(&f.acme), Some(body)).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (403, Some("forbidden")),
            "{body}: {v}"
        );
    }
    let (_, k) = call(&f.app, "GET", &uri, Some(&f.acme), None).await;
    assert_eq!(
        (k["rate_limit"].as_str(), k["name"].as_str()),
        (Some("5/60s"), Some("k")),
        "{k}"
    );
    // What the tenant may change still works without the field.
    let (s, v) = call(
        &f.app,
        "PATCH",
        &uri,
        Some(&f.acme),
        Some(r#"{"name":"mine"}"#),
    )
    .await;
    assert_eq!((s, v["rate_limit"].as_str()), (200, Some("5/60s")), "{v}");
    let (s, v) = call(
        &f.app,
        "PATCH",
        &uri,
        Some(&f.operator),
        Some(r#"{"rate_limit":null}"#),
    )
    .await;
    assert_eq!((s, v["rate_limit"].clone()), (200, Value::Null), "{v}");
}

/// Every path parameter of every route, percent-encoded as bytes that are
/// not UTF-8: 400 in the JSON error shape naming the parameter, and 401
/// (not 400) without a token, since authentication comes first.
#[tokio::test]
async fn a_path_parameter_that_is_not_utf8_gets_json_naming_it_and_401_without_a_token() {
    let f = fixture();
    let mut checked = 0;
    for (method, path) in api_operations() {
        let params: Vec<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect();
        for bad in &params {
            let uri = params.iter().fold(path.to_owned(), |u, p| {
                let v = if p == bad { "%FF" } else { "x" };
                u.replace(&format!("{{{p}}}"), v)
            });
            let req = |token: Option<&str>| {
                let mut b = HttpRequest::builder().method(method.clone()).uri(&uri);
                if let Some(t) = token {
                    b = b.header("authorization", format!("Bearer {t}"));
                }
                b.body(Body::empty()).unwrap()
            };
            for (token, want) in [(None, 401), (Some(f.operator.as_str()), 400)] {
                let resp = f.app.clone().oneshot(req(token)).await.unwrap();
                let status = resp.status().as_u16();
                let ctype = resp.headers()[axum::http::header::CONTENT_TYPE]
                    .to_str()
                    .unwrap()
                    .to_owned();
                let bytes = resp.into_body().collect().await.unwrap().to_bytes();
                let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                assert_eq!(status, want, "{method} {uri}: {v}");
                assert_eq!(ctype, "application/json", "{method} {uri}");
                assert!(v["message"].is_string(), "{method} {uri}: {v}");
                if want == 400 {
                    assert_eq!(
                        (v["error"].as_str(), v["field"].as_str()),
                        (Some("bad_path"), Some(*bad)),
                        "{method} {uri}: {v}"
                    );
                } else {
                    assert_eq!(v["error"], "invalid_token", "{method} {uri}: {v}");
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} parameters checked");
}

#[tokio::test]
async fn made_up_methods_do_not_grow_metrics() {
    let f = fixture();
    for i in 0..100 {
        let (s, _) = call(&f.app, &format!("ZZ{i}"), "/healthz", None, None).await;
        assert_eq!(s, 405);
    }
    let req = HttpRequest::builder()
        .uri("/metrics")
        .body(Body::empty())
        .unwrap();
    let resp = f.app.clone().oneshot(req).await.unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("keygate_api_requests_total{"))
        .collect();
    assert_eq!(series.len(), 1, "{text}");
    assert!(
        series[0].contains("method=\"other\"") && series[0].ends_with(" 100"),
        "{text}"
    );
}

/// A store that fails inside (here its connection lock is poisoned by a
/// change that panicked) answers 500 with a generic message: nothing the
/// caller could fix, and no internal text in the answer.
#[tokio::test]
async fn a_store_failing_inside_answers_500_without_its_internal_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.db");
    let svc = Service::new(Box::new(SqliteStore::new(&path)));
    svc.init_store().unwrap();
    let mut db = Db::sqlite(&path).open().unwrap();
    let op = mgmt::create_token(&mut db, Role::Operator, None, None, now())
        .unwrap()
        .token;
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = svc.store().update(&mut |_| panic!("a change that panics"));
    }));
    assert!(panicked.is_err());
    let state = Arc::new(AppState::new(
        svc,
        db,
        FailLimiter::new(3, Duration::from_secs(60)),
    ));
    let app = router(state);
    let (s, v) = call(
        &app,
        "POST",
        "/api/v1/tenants/acme/keys",
        Some(&op),
        Some(r#"{"name":"k","scopes":["read"]}"#),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (500, Some("internal_error")),
        "{v}"
    );
    let text = v.to_string();
    assert!(
        !text.contains("poisoned") && !text.contains("k.db"),
        "{text}"
    );
}
