//! The `/api/v1` handlers: each checks the caller's role and tenant, calls
//! the service layer or `mgmt` on the blocking pool, records the change in
//! the audit trail and answers JSON. Another tenant's objects answer 404.

use crate::error::ApiError;
use crate::extract::{Auth, Json, JsonOrEmpty, Path};
use crate::{now, AppState};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post, put, MethodRouter};
use keygate_control::logs::{query_logs, LogQuery};
use keygate_control::mgmt::{self, Audit, Role};
use keygate_control::service::{
    check_key_owner, check_metadata, parse_rate, KeyFormat, KeyPatch, NewKey,
};
use keygate_control::store::{CreditsStatus, StoredKey};
use keygate_control::usage::{query_usage, Bucket, UsageQuery};
use keygate_control::{Conn, Service};
use keygate_core::credential::{Kind, Status};
use keygate_core::rate_limit::RateLimit;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

type St = State<Arc<AppState>>;
type Route = (&'static str, Method, MethodRouter<Arc<AppState>>);

const T: &str = "/api/v1/tenants/{tenant}";
const K: &str = "/api/v1/tenants/{tenant}/keys/{key_id}";

/// Every API route: the router is built from this table, and a test
/// checks it against the OpenAPI document.
pub fn routes() -> Vec<Route> {
    vec![
        ("/api/v1/openapi.json", Method::GET, get(openapi)),
        ("/api/v1/tenants", Method::GET, get(list_tenants)),
        (T, Method::PUT, put(put_tenant)),
        (T, Method::GET, get(get_tenant)),
        ("/api/v1/tenants/{tenant}/keys", Method::GET, get(list_keys)),
        (
            "/api/v1/tenants/{tenant}/keys",
            Method::POST,
            post(create_key),
        ),
        (K, Method::GET, get(get_key)),
        (K, Method::PATCH, patch(update_key)),
        (K, Method::DELETE, delete(delete_key)),
        (
            "/api/v1/tenants/{tenant}/keys/{key_id}/rotate-secret",
            Method::POST,
            post(rotate_secret),
        ),
        (
            "/api/v1/tenants/{tenant}/keys/{key_id}/roll",
            Method::POST,
            post(roll_key),
        ),
        (
            "/api/v1/tenants/{tenant}/sessions",
            Method::GET,
            get(list_tenant_sessions),
        ),
        (
            "/api/v1/tenants/{tenant}/keys/{key_id}/sessions",
            Method::GET,
            get(list_sessions),
        ),
        (
            "/api/v1/tenants/{tenant}/keys/{key_id}/sessions",
            Method::DELETE,
            delete(revoke_all_sessions),
        ),
        (
            "/api/v1/tenants/{tenant}/keys/{key_id}/sessions/{session_id}",
            Method::DELETE,
            delete(revoke_session),
        ),
        (
            "/api/v1/tenants/{tenant}/portal-sessions",
            Method::POST,
            post(crate::portal::create_link),
        ),
        ("/api/v1/tenants/{tenant}/logs", Method::GET, get(logs)),
        ("/api/v1/tenants/{tenant}/usage", Method::GET, get(usage)),
        (
            "/api/v1/tenants/{tenant}/audit",
            Method::GET,
            get(tenant_audit),
        ),
        ("/api/v1/audit", Method::GET, get(all_audit)),
        (
            "/api/v1/tenants/{tenant}/tokens",
            Method::GET,
            get(list_tokens),
        ),
        (
            "/api/v1/tenants/{tenant}/tokens",
            Method::POST,
            post(create_token),
        ),
        (
            "/api/v1/tenants/{tenant}/tokens/{token_id}",
            Method::DELETE,
            delete(revoke_token),
        ),
        (
            "/api/v1/tenants/{tenant}/limits",
            Method::GET,
            get(crate::limits_api::get_tenant_limits),
        ),
        (
            "/api/v1/tenants/{tenant}/limits",
            Method::PUT,
            put(crate::limits_api::put_tenant_limits),
        ),
        (
            "/api/v1/plans",
            Method::GET,
            get(crate::limits_api::list_plans),
        ),
        (
            "/api/v1/plans",
            Method::POST,
            post(crate::limits_api::create_plan),
        ),
        (
            "/api/v1/plans/{plan}",
            Method::GET,
            get(crate::limits_api::get_plan),
        ),
        (
            "/api/v1/plans/{plan}",
            Method::PUT,
            put(crate::limits_api::put_plan),
        ),
        (
            "/api/v1/plans/{plan}",
            Method::DELETE,
            delete(crate::limits_api::delete_plan),
        ),
    ]
}

/// Runs `f` on the blocking pool with the service and the database.
pub(crate) async fn blocking<R: Send + 'static>(
    st: &Arc<AppState>,
    f: impl FnOnce(&Service, &mut Conn) -> Result<R, ApiError> + Send + 'static,
) -> Result<R, ApiError> {
    let st = Arc::clone(st);
    tokio::task::spawn_blocking(move || {
        let svc = st.svc.lock().map_err(|_| ApiError::internal())?;
        let mut db = st.db.lock().map_err(|_| ApiError::internal())?;
        f(&svc, &mut db)
    })
    .await
    .map_err(|_| ApiError::internal())?
}

pub(crate) fn audit_record(
    who: &Auth,
    tenant: &str,
    action: &str,
    object: Option<&str>,
    detail: Value,
) -> Audit {
    Audit {
        actor_token_id: Some(who.principal.token_id.clone()),
        actor_ip: Some(who.ip.to_string()),
        tenant: Some(tenant.to_owned()),
        action: action.to_owned(),
        object: object.map(str::to_owned),
        detail: (!detail.is_null()).then_some(detail),
    }
}

/// Records a change to tokens or tenants; called inside the change's
/// transaction ([`mgmt::atomically`]), so a failure undoes the change.
fn audit_in(
    db: &mut Conn,
    who: &Auth,
    tenant: &str,
    action: &str,
    object: &str,
    detail: Value,
) -> Result<(), ApiError> {
    let a = audit_record(who, tenant, action, Some(object), detail);
    Ok(mgmt::record(db, &a.entry())?)
}

/// Runs a change of the key store with its audit record: in the change's
/// own transaction when the store lives in the management database, else
/// recorded just after the change commits (`object_of` names the object
/// then, e.g. the id of a key just created).
#[allow(clippy::too_many_arguments)]
pub(crate) fn audited<T>(
    svc: &Service,
    db: &mut Conn,
    who: &Auth,
    tenant: &str,
    action: &str,
    object: Option<&str>,
    detail: Value,
    change: impl FnOnce(&Service) -> Result<T, keygate_control::Error>,
    object_of: impl FnOnce(&T) -> String,
) -> Result<T, keygate_control::Error> {
    let record = audit_record(who, tenant, action, object, detail);
    audited_as(svc, db, record, change, object_of)
}

/// [`audited`] with the record already built (e.g. one that names no
/// tenant: plans belong to none).
pub(crate) fn audited_as<T>(
    svc: &Service,
    db: &mut Conn,
    record: Audit,
    change: impl FnOnce(&Service) -> Result<T, keygate_control::Error>,
    object_of: impl FnOnce(&T) -> String,
) -> Result<T, keygate_control::Error> {
    let (out, done) = svc.audited(record.clone(), change)?;
    if !done {
        let mut record = record;
        record.object.get_or_insert_with(|| object_of(&out));
        // The change is made; a lost audit record is reported, not turned
        // into a failure the client would retry (and so repeat the change).
        if let Err(e) = mgmt::record(db, &record.entry()) {
            eprintln!(
                "{}",
                json!({"level": "error", "message": format!("audit record lost: {e}")})
            );
        }
    }
    Ok(out)
}

pub(crate) fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

fn parse_time(field: &str, s: &str) -> Result<u64, ApiError> {
    humantime::parse_rfc3339_weak(s)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .ok_or_else(|| {
            ApiError::invalid(field, "not a time; use RFC 3339, e.g. 2027-01-01T00:00:00Z")
        })
}

fn rate_text(r: &RateLimit) -> String {
    format!("{}/{}s", r.requests, r.window_secs)
}

fn check_tenant_name(tenant: &str) -> Result<(), ApiError> {
    keygate_core::credential::check_name("tenant", tenant)
        .map_err(|e| ApiError::invalid("tenant", e.to_string()))
}

fn query<Q>(q: Result<Query<Q>, QueryRejection>) -> Result<Q, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::invalid("query", e.body_text()))
}

/// The usage credits of `keys`, by key id, with what they used counted
/// from the request log (a log that cannot be read is logged and leaves
/// `used`/`remaining` null).
pub(crate) fn credits_of(svc: &Service, keys: &[StoredKey]) -> BTreeMap<String, CreditsStatus> {
    let (status, error) = svc.credits_status(keys, now());
    if let Some(e) = error {
        eprintln!(
            "{}",
            json!({"level": "warn", "message": format!("usage credits: request log not read: {e}")})
        );
    }
    status
}

fn credits_view(c: &CreditsStatus) -> Value {
    json!({
        "balance": c.balance,
        "used": c.used,
        "remaining": c.remaining,
        "monthly": c.monthly,
        "granted_at": rfc3339(c.granted_at),
        "refills_at": c.refills_at.map(rfc3339),
    })
}

/// A key as the API shows it: never a secret or a hash. `credits` is the
/// key's credit status (from [`credits_of`]).
fn key_view(k: &StoredKey, last_used: Option<u64>, credits: Option<&CreditsStatus>) -> Value {
    let r = &k.record;
    json!({
        "key_id": r.key_id,
        "name": k.name,
        "tenant": r.tenant,
        "environment": r.environment,
        "kind": r.kind,
        "scopes": r.scopes,
        "allowed_ips": r.allowed_ips,
        "rate_limit": r.rate_limit.as_ref().map(rate_text),
        "status": match r.status { Status::Active => "active", Status::Inactive => "inactive" },
        "has_secret": r.secret_hash.is_some(),
        "previous_secret_valid_until": r.previous_secret_expires_at.map(rfc3339),
        "expires_at": r.expires_at.map(rfc3339),
        "expired": r.expires_at.is_some_and(|t| t <= now()),
        "owner": r.owner,
        "metadata": k.metadata,
        "previous_key_valid_until": r.previous_key_expires_at.filter(|t| *t > now()).map(rfc3339),
        "created_at": rfc3339(k.created_at),
        "updated_at": rfc3339(k.updated_at),
        "last_used_at": last_used.map(rfc3339),
        "limits": r.limits.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "plan": r.plan,
        "credits": credits.map(credits_view).or_else(|| r.credits.map(|c| {
            credits_view(&CreditsStatus::new(c, None, now()))
        })),
    })
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], crate::OPENAPI).into_response()
}

// ---- tenants ----

async fn list_tenants(State(st): St, who: Auth) -> Result<Response, ApiError> {
    let mine = who.principal.tenant.clone();
    let role = who.principal.role;
    let out = blocking(&st, move |svc, db| {
        let mut all: BTreeMap<String, Value> = BTreeMap::new();
        for t in mgmt::list_tenants(db)? {
            all.insert(t.tenant.clone(), json!({"tenant": t.tenant, "display_name": t.display_name, "created_at": rfc3339(t.created_at)}));
        }
        // Tenants made by the CLI have keys but no row.
        for k in svc.list_keys(None)? {
            all.entry(k.record.tenant.clone())
                .or_insert_with(|| json!({"tenant": k.record.tenant, "display_name": null, "created_at": null}));
        }
        if role == Role::Tenant {
            all.retain(|t, _| Some(t) == mine.as_ref());
        }
        Ok(all.into_values().collect::<Vec<_>>())
    })
    .await?;
    Ok(axum::Json(json!({"tenants": out})).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PutTenant {
    display_name: Option<String>,
}

async fn put_tenant(
    State(st): St,
    who: Auth,
    Path(tenant): Path<String>,
    JsonOrEmpty(body): JsonOrEmpty<PutTenant>,
) -> Result<Response, ApiError> {
    who.tenant(&tenant)?;
    check_tenant_name(&tenant)?;
    if let Some(n) = &body.display_name {
        if n.chars().count() > 200 || n.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                "display_name",
                "at most 200 characters, no control characters",
            ));
        }
    }
    let (t, created) = blocking(&st, move |_, db| {
        mgmt::atomically(db, |db| {
            let (t, created) = mgmt::put_tenant(db, &tenant, body.display_name.as_deref(), now())?;
            audit_in(
                db,
                &who,
                &tenant,
                if created {
                    "tenant.create"
                } else {
                    "tenant.update"
                },
                &tenant,
                json!({"display_name": t.display_name}),
            )?;
            Ok((t, created))
        })
    })
    .await?;
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, axum::Json(json!({"tenant": t.tenant, "display_name": t.display_name, "created_at": rfc3339(t.created_at)}))).into_response())
}

async fn get_tenant(
    State(st): St,
    who: Auth,
    Path(tenant): Path<String>,
) -> Result<Response, ApiError> {
    who.tenant(&tenant)?;
    let out = blocking(&st, move |svc, db| {
        let keys = svc.list_keys(Some(&tenant))?.len();
        match mgmt::get_tenant(db, &tenant)? {
            Some(t) => Ok(json!({"tenant": t.tenant, "display_name": t.display_name, "created_at": rfc3339(t.created_at), "keys": keys})),
            None if keys > 0 => Ok(json!({"tenant": tenant, "display_name": null, "created_at": null, "keys": keys})),
            None => Err(ApiError::not_found("tenant")),
        }
    })
    .await?;
    Ok(axum::Json(out).into_response())
}

// ---- keys ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    limit: Option<u32>,
    cursor: Option<String>,
}

const MAX_PAGE: u32 = 500;

async fn list_keys(
    State(st): St,
    who: Auth,
    Path(tenant): Path<String>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    who.tenant(&tenant)?;
    let q = query(q)?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::invalid(
            "limit",
            format!("must be between 1 and {MAX_PAGE}"),
        ));
    }
    // The cursor is the last key id of the previous page, hex-encoded.
    let after = match &q.cursor {
        Some(c) => Some(
            hex::decode(c)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| ApiError::invalid("cursor", "not a cursor from a previous page"))?,
        ),
        None => None,
    };
    let out = blocking(&st, move |svc, db| {
        let mut keys = svc.list_keys(Some(&tenant))?;
        keys.sort_by(|a, b| a.record.key_id.cmp(&b.record.key_id));
        let used: BTreeMap<String, u64> = mgmt::last_used(db, &tenant)?.into_iter().collect();
        let page: Vec<&StoredKey> = keys
            .iter()
            .filter(|k| after.as_ref().is_none_or(|a| k.record.key_id.as_str() > a.as_str()))
            .take(limit as usize + 1)
            .collect();
        let more = page.len() > limit as usize;
        let page = &page[..page.len().min(limit as usize)];
        let next = if more {
            page.last().map(|k| hex::encode(k.record.key_id.as_bytes()))
        } else {
            None
        };
        let owned: Vec<StoredKey> = page.iter().map(|k| (*k).clone()).collect();
        let credits = credits_of(svc, &owned);
        Ok(json!({
            "keys": page.iter().map(|k| key_view(k, used.get(&k.record.key_id).copied(), credits.get(&k.record.key_id))).collect::<Vec<_>>(),
            "next_cursor": next,
        }))
    })
    .await?;
    Ok(axum::Json(out).into_response())
}

#[derive(Deserialize, Clone, Copy, Default)]
#[serde(rename_all = "lowercase")]
enum KindIn {
    Default,
    #[default]
    Scoped,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    #[serde(default)]
    kind: KindIn,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    allowed_ips: Vec<String>,
    /// Operator only: the key's own rate limit, e.g. `100/min`.
    rate_limit: Option<String>,
    environment: Option<String>,
    #[serde(default)]
    with_secret: bool,
    expires_at: Option<String>,
    /// The user of the tenant the key is for.
    owner: Option<String>,
    /// A JSON object, at most 4 KiB serialised.
    metadata: Option<Value>,
    /// `identifiable` or `hex64`; default: the server's.
    key_format: Option<KeyFormat>,
    /// Operator only: `["100/min", "10000/day"]` (`keygate_core::limits`).
    #[serde(default)]
    limits: Vec<String>,
    /// Operator only: the key's plan.
    plan: Option<String>,
}

async fn create_key(
    State(st): St,
    who: Auth,
    Path(tenant): Path<String>,
    Json(body): Json<CreateKey>,
) -> Result<Response, ApiError> {
    who.tenant(&tenant)?;
    check_tenant_name(&tenant)?;
    if body.name.trim().is_empty() {
        return Err(ApiError::invalid("name", "is required"));
    }
    // A key's own rate limit replaces its plan's limits and the gateway's
    // default, so it is a limit like `limits`: operators set it.
    if body.rate_limit.is_some() {
        crate::limits_api::operator_for(&who, "rate_limit")?;
    }
    let rate_limit = body
        .rate_limit
        .as_deref()
        .map(parse_rate)
        .transpose()
        .map_err(|m| ApiError::invalid("rate_limit", m))?;
    let expires_at = body
        .expires_at
        .as_deref()
        .map(|s| parse_time("expires_at", s))
        .transpose()?;
    let metadata = body
        .metadata
        .as_ref()
        .map(|m| check_metadata("metadata", m))
        .transpose()?;
    if let Some(o) = &body.owner {
        keygate_control::service::check_key_owner("owner", o)?;
    }
    let key_limits = crate::limits_api::key_limits(&who, &body.limits, body.plan.clone())?;
    let new = NewKey {
        key_id: None,
        name: body.name,
        tenant: tenant.clone(),
        environment: body.environment.unwrap_or_else(|| "live".into()),
        kind: match body.kind {
            KindIn::Default => Kind::Default,
            KindIn::Scoped => Kind::Scoped,
        },
        scopes: body.scopes,
        allowed_ips: body.allowed_ips,
        rate_limit,
        expires_at,
        with_secret: body.with_secret,
        key_value: None,
        secret_value: None,
        owner: body.owner,
        metadata,
        key_format: body.key_format,
    };
    let out = blocking(&st, move |svc, db| {
        let detail =
            json!({"kind": new.kind, "scopes": new.scopes, "with_secret": new.with_secret});
        let c = audited(
            svc,
            db,
            &who,
            &tenant,
            "key.create",
            None,
            detail,
            |svc| svc.create_key_limited(new, key_limits, now()),
            |c| c.key_id.clone(),
        )?;
        let k = svc.tenant_key(&tenant, &c.key_id)?;
        if mgmt::get_tenant(db, &tenant)?.is_none() {
            mgmt::put_tenant(db, &tenant, None, now())?;
        }
        let mut v =
            json!({"key_id": c.key_id, "api_key": c.api_key, "key": key_view(&k, None, None)});
        if let Some(s) = c.secret {
            v["secret"] = json!(s);
        }
        Ok(v)
    })
    .await?;
    Ok((StatusCode::CREATED, axum::Json(out)).into_response())
}

async fn get_key(
    State(st): St,
    who: Auth,
    Path((tenant, key_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    who.tenant(&tenant)?;
    let out = blocking(&st, move |svc, db| {
        let k = svc.tenant_key(&tenant, &key_id)?;
        let used = mgmt::last_used(db, &tenant)?
            .into_iter()
            .find(|(id, _)| *id == key_id)
            .map(|(_, t)| t);
        let credits = credits_of(svc, std::slice::from_ref(&k));
        Ok(key_view(&k, used, credits.get(&k.record.key_id)))
    })
    .await?;
    Ok(axum::Json(out).into_response())
}

/// `Some(value)` when the field is present, even as `null`.
fn present<'de, D: Deserializer<'de>, V: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<V>>, D::Error> {
    Option::<V>::deserialize(d).map(Some)
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum StatusIn {
    Active,
    Inactive,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateKey {
    name: Option<String>,
    scopes: Option<Vec<String>>,
    allowed_ips: Option<Vec<String>>,
    /// Operator only; `null` removes the key's own rate limit.
    #[serde(default, deserialize_with = "present")]
    rate_limit: Option<Option<String>>,
    status: Option<StatusIn>,
    #[serde(default, deserialize_with = "present")]
    expires_at: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    owner: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    metadata: Option<Option<Value>>,
    /// Operator only; `[]` clears the key's own limits.
    limits: Option<Vec<String>>,
    /// Operator only; `null` takes the key off its plan.
    #[serde(default, deserialize_with = "present")]
    plan: Option<Option<String>>,
    /// Operator only: a top-up of usage credits; `null` removes them.
    #[serde(default, deserialize_with = "present")]
    credits: Option<Option<crate::limits_api::CreditsIn>>,
}

async fn update_key(
    State(st): St,
    who: Auth,
    Path((tenant, key_id)): Path<(String, String)>,
    Json(body): Json<UpdateKey>,
) -> Result<Response, ApiError> {
    who.tenant(&tenant)?;
    let mut changed = Vec::new();
    let mut p = KeyPatch::default();
    if let Some(n) = body.name {
        if n.trim().is_empty() {
            return Err(ApiError::invalid("name", "must not be empty"));
        }
        changed.push("name");
        p.name = Some(n);
    }
    if let Some(s) = body.scopes {
        changed.push("scopes");
        p.scopes = Some(s);
    }
    if let Some(ips) = body.allowed_ips {
        changed.push("allowed_ips");
        p.allowed_ips = Some(ips);
    }
    if let Some(r) = body.rate_limit {
        // Also `null`: clearing the key's own rate limit changes its limits.
        crate::limits_api::operator_for(&who, "rate_limit")?;
        changed.push("rate_limit");
        p.rate_limit = Some(
            r.as_deref()
                .map(parse_rate)
                .transpose()
                .map_err(|m| ApiError::invalid("rate_limit", m))?,
        );
    }
    if let Some(s) = body.status {
        changed.push("status");
        p.status = Some(match s {
            StatusIn::Active => Status::Active,
            StatusIn::Inactive => Status::Inactive,
        });
    }
    crate::limits_api::patch_limits(&who, body.limits, body.plan, &mut p, &mut changed)?;
    crate::limits_api::patch_credits(&who, body.credits, &mut p, &mut changed)?;
    if let Some(e) = body.expires_at {
        changed.push("expires_at");
        p.expires_at = Some(
            e.as_deref()
                .map(|s| parse_time("expires_at", s))
                .transpose()?,
        );
    }
    if let Some(o) = body.owner {
        changed.push("owner");
        p.owner = Some(o);
    }
    if let Some(m) = body.metadata {
        changed.push("metadata");
        p.metadata = Some(
            m.as_ref()
                .map(|m| check_metadata("metadata", m))
                .transpose()?,
        );
    }
    let out = blocking(&st, move |svc, db| {
        let k = audited(
            svc,
            db,
            &who,
            &tenant,
            "key.update",
            Some(&key_id),
            json!({"fields": changed}),
            |svc| svc.patch_key(&tenant, &key_id, &p, now()),
            |_| key_id.clone(),
        )?;
        let credits = credits_of(svc, std::slice::from_ref(&k));
        Ok(key_view(&k, None, credits.get(&k.record.key_id)))
    })
    .await?;
    Ok(axum::Json(out).into_response())
}

async fn delete_key(
    State(st): St,
    who: Auth,
    Path((tenant, key_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    who.tenant(&tenant)?;
    blocking(&st, move |svc, db| {
        audited(
            svc,
            db,
            &who,
            &tenant,
            "key.delete",
            Some(&key_id),
            Value::Null,
            |svc| svc.delete_key(&tenant, &key_id),
            |_| key_id.clone(),
        )?;
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Rotate {
    /// Seconds the old secret keeps working.
    #[serde(default)]
    grace_seconds: u64,
}

/// Longest grace period for an old secret.
const MAX_GRACE: u64 = 30 * 86_400;

async fn rotate_secret(
    State(st): St,
    who: Auth,
    Path((tenant, key_id)): Path<(String, String)>,
    JsonOrEmpty(body): JsonOrEmpty<Rotate>,
) -> Result<Response, ApiError> {
    who.tenant(&tenant)?;
    if body.grace_seconds > MAX_GRACE {
        return Err(ApiError::invalid(
            "grace_seconds",
            format!("at most {MAX_GRACE} (30 days)"),
        ));
    }
    let grace = body.grace_seconds;
    let out = blocking(&st, move |svc, db| {
        let t = now();
        let secret = audited(
            svc,
            db,
            &who,
            &tenant,
            "key.rotate_secret",
            Some(&key_id),
            json!({"grace_seconds": grace}),
            |svc| svc.rotate_secret_of(&tenant, &key_id, grace, t),
            |_| key_id.clone(),
        )?;
        Ok(json!({
            "key_id": key_id,
            "secret": secret,
            "previous_secret_valid_until": (grace > 0).then(|| rfc3339(t + grace)),
        }))
    })
    .await?;
    Ok(axum::Json(out).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Roll {
    /// Seconds the old value keeps working (0: refused at once).
    #[serde(default)]
    grace_seconds: u64,
    /// `identifiable` or `hex64`; default: the server's.
    key_format: Option<KeyFormat>,
}

/// A new value for the key: everything else stays (id, name, scopes,
/// owner, metadata, rate-limit state, logs, usage).
async fn roll_key(
    State(st): St,
    who: Auth,
    Path((tenant, key_id)): Path<(String, String)>,
    JsonOrEmpty(body): JsonOrEmpty<Roll>,
) -> Result<Response, ApiError> {
    who.tenant(&tenant)?;
    if body.grace_seconds > MAX_GRACE {
        return Err(ApiError::invalid(
            "grace_seconds",
            format!("at most {MAX_GRACE} (30 days)"),
        ));
    }
    let out = blocking(&st, move |svc, db| {
        let r = audited(
            svc,
            db,
            &who,
            &tenant,
            "key.roll",
            Some(&key_id),
            json!({"grace_seconds": body.grace_seconds}),
            |svc| {
                svc.roll_key(
                    Some(&tenant),
                    &key_id,
                    body.grace_seconds,
                    body.key_format,
                    now(),
                )
            },
            |_| key_id.clone(),
        )?;
        Ok(json!({
            "key_id": r.key_id,
            "api_key": r.api_key,
            "previous_key_valid_until": r.previous_key_expires_at.map(rfc3339),
        }))
    })
    .await?;
    Ok(axum::Json(out).into_response())
}

// ---- sessions ----

async fn list_sessions(
    State(st): St,
    who: Auth,
    Path((tenant, key_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    who.tenant(&tenant)?;
    let out = blocking(&st, move |svc, db| {
        // Another tenant's key is 404.
        svc.tenant_key(&tenant, &key_id)?;
        let s = mgmt::list_sessions(db, &key_id)?;
        Ok(json!({"sessions": s.iter().map(session_view).collect::<Vec<_>>()}))
    })
    .await?;
    Ok(axum::Json(out).into_response())
}

fn session_view(s: &mgmt::SessionInfo) -> Value {
    json!({
        "key_id": s.key_id,
        "session_id": s.session_id,
        "created_at": rfc3339(s.created_at),
        "expires_at": rfc3339(s.expires_at),
        "last_seen_at": s.last_seen_at.map(rfc3339),
        "revoked": s.revoked_at_ms.is_some(),
    })
}

/// Every session recorded for the tenant's keys.
async fn list_tenant_sessions(
    State(st): St,
    who: Auth,
    Path(tenant): Path<String>,
) -> Result<Response, ApiError> {
    who.tenant(&tenant)?;
    let out = blocking(&st, move |svc, db| {
        let mut all = Vec::new();
        for k in svc.list_keys(Some(&tenant))? {
            all.extend(
                mgmt::list_sessions(db, &k.record.key_id)?
                    .iter()
                    .map(session_view),
            );
        }
        Ok(json!({ "sessions": all }))
    })
    .await?;
    Ok(axum::Json(out).into_response())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn revoke_session(
    State(st): St,
    who: Auth,
    Path((tenant, key_id, session_id)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    who.tenant(&tenant)?;
    blocking(&st, move |svc, db| {
        svc.tenant_key(&tenant, &key_id)?;
        audited(
            svc,
            db,
            &who,
            &tenant,
            "session.revoke",
            Some(&key_id),
            json!({"session_id": session_id}),
            |svc| svc.revoke_session(&key_id, &session_id, now_ms()),
            |_| key_id.clone(),
        )
        .map_err(|e| match e {
            keygate_control::Error::BadInput { message, .. } => {
                ApiError::invalid("session_id", message)
            }
            other => other.into(),
        })?;
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Revokes every session the store knows for the key, and logins made
/// without a session id.
async fn revoke_all_sessions(
    State(st): St,
    who: Auth,
    Path((tenant, key_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    who.tenant(&tenant)?;
    let n = blocking(&st, move |svc, db| {
        // Another tenant's key is 404.
        svc.tenant_key(&tenant, &key_id)?;
        let mut ids: Vec<String> = mgmt::list_sessions(db, &key_id)?
            .into_iter()
            .map(|s| s.session_id)
            .collect();
        if !ids.iter().any(String::is_empty) {
            ids.push(String::new());
        }
        audited(
            svc,
            db,
            &who,
            &tenant,
            "session.revoke_all",
            Some(&key_id),
            json!({"sessions": ids.len()}),
            |svc| {
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                svc.revoke_sessions(&key_id, &ids, now_ms())
            },
            |_| key_id.clone(),
        )?;
        Ok(ids.len())
    })
    .await?;
    Ok(axum::Json(json!({"revoked": n})).into_response())
}

// ---- logs, usage, audit ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogParams {
    key_id: Option<String>,
    status: Option<String>,
    decision: Option<String>,
    path: Option<String>,
    client_ip: Option<String>,
    owner: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

fn time_ms(field: &str, s: &Option<String>) -> Result<Option<i64>, ApiError> {
    s.as_deref()
        .map(|v| {
            parse_time(field, v).map(|t| i64::try_from(t).unwrap_or(i64::MAX).saturating_mul(1000))
        })
        .transpose()
}

async fn logs(
    State(st): St,
    who: Auth,
    Path(tenant): Path<String>,
    q: Result<Query<LogParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    who.tenant(&tenant)?;
    let q = query(q)?;
    // Checked as a key's owner is: a value no key can have is a mistake
    // (a typo, a quoted name), not an empty result.
    if let Some(o) = &q.owner {
        check_key_owner("owner", o)?;
    }
    let lq = LogQuery {
        tenant: Some(tenant),
        key_id: q.key_id,
        status: q.status.as_deref().map(str::parse).transpose()?,
        decision: q.decision,
        path_prefix: q.path,
        client_ip: q.client_ip,
        owner: q.owner,
        since_ms: time_ms("since", &q.since)?,
        until_ms: time_ms("until", &q.until)?,
        limit: q.limit,
        cursor: q.cursor,
    };
    let page = blocking(&st, move |_, db| Ok(query_logs(db, &lq)?)).await?;
    Ok(axum::Json(json!({
        "records": page.records.iter().map(|r| json!({
            "time": r.time,
            "key_id": r.key_id,
            "key_name": r.key_name,
            "owner": r.owner,
            "method": r.method,
            "path": r.path,
            "client_ip": r.client_ip,
            "status": r.status,
            "decision": r.decision,
            "reason": r.reason,
            "request_id": r.request_id,
        })).collect::<Vec<_>>(),
        "next_cursor": page.next_cursor,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageParams {
    key_id: Option<String>,
    granularity: Option<String>,
    since: Option<String>,
    until: Option<String>,
}

async fn usage(
    State(st): St,
    who: Auth,
    Path(tenant): Path<String>,
    q: Result<Query<UsageParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    who.tenant(&tenant)?;
    let q = query(q)?;
    let bucket: Bucket = q
        .granularity
        .as_deref()
        .unwrap_or("hour")
        .parse()
        .map_err(|_| ApiError::invalid("granularity", "must be hour or day"))?;
    let now_ms = i64::try_from(now_ms()).unwrap_or(i64::MAX);
    let span: i64 = match bucket {
        Bucket::Hour => 24 * 3_600_000,
        Bucket::Day => 30 * 86_400_000,
    };
    let until = time_ms("until", &q.until)?.unwrap_or(now_ms);
    let since = time_ms("since", &q.since)?.unwrap_or(until - span);
    let uq = UsageQuery {
        tenant: tenant.clone(),
        key_id: q.key_id.clone(),
        per_key: true,
        bucket,
        since_ms: since,
        until_ms: until,
    };
    let out = blocking(&st, move |svc, db| {
        let points = query_usage(db, &uq)?;
        let used: BTreeMap<String, u64> = mgmt::last_used(db, &tenant)?.into_iter().collect();
        let keys: Vec<Value> = svc
            .list_keys(Some(&tenant))?
            .iter()
            .filter(|k| q.key_id.as_ref().is_none_or(|id| *id == k.record.key_id))
            .map(|k| json!({
                "key_id": k.record.key_id,
                "name": k.name,
                "last_used_at": used.get(&k.record.key_id).copied().map(rfc3339),
            }))
            .collect();
        // Another tenant's key (or none) answers 404, not an empty series.
        if q.key_id.is_some() && keys.is_empty() {
            return Err(ApiError::not_found("key"));
        }
        Ok(json!({
            "tenant": tenant,
            "granularity": bucket,
            "points": points.iter().map(|p| json!({
                "start": humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(u64::try_from(p.start_ms).unwrap_or(0))).to_string(),
                "key_id": p.key_id,
                "allowed": p.allowed,
                "denied": p.denied,
            })).collect::<Vec<_>>(),
            "keys": keys,
        }))
    })
    .await?;
    Ok(axum::Json(out).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    limit: Option<u32>,
    cursor: Option<String>,
}

async fn audit_page(
    st: &Arc<AppState>,
    tenant: Option<String>,
    q: AuditParams,
) -> Result<Response, ApiError> {
    let before = q
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<i64>()
                .map_err(|_| ApiError::invalid("cursor", "not a cursor from a previous page"))
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(100);
    let recs = blocking(st, move |_, db| {
        Ok(mgmt::list_audit(db, tenant.as_deref(), limit, before)?)
    })
    .await?;
    let next = (recs.len() == limit as usize)
        .then(|| recs.last().map(|r| r.id.to_string()))
        .flatten();
    Ok(axum::Json(json!({"records": recs, "next_cursor": next})).into_response())
}

async fn all_audit(
    State(st): St,
    who: Auth,
    q: Result<Query<AuditParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    who.operator()?;
    audit_page(&st, None, query(q)?).await
}

async fn tenant_audit(
    State(st): St,
    who: Auth,
    Path(tenant): Path<String>,
    q: Result<Query<AuditParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    who.tenant(&tenant)?;
    audit_page(&st, Some(tenant), query(q)?).await
}

// ---- tokens ----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    expires_at: Option<String>,
}

async fn create_token(
    State(st): St,
    who: Auth,
    Path(tenant): Path<String>,
    JsonOrEmpty(body): JsonOrEmpty<CreateToken>,
) -> Result<Response, ApiError> {
    who.tenant(&tenant)?;
    who.operator()?;
    check_tenant_name(&tenant)?;
    let expires_at = body
        .expires_at
        .as_deref()
        .map(|s| parse_time("expires_at", s))
        .transpose()?;
    let out = blocking(&st, move |_, db| {
        let t = mgmt::atomically(db, |db| {
            let t = mgmt::create_token(db, Role::Tenant, Some(&tenant), expires_at, now())?;
            audit_in(db, &who, &tenant, "token.create", &t.token_id, Value::Null)?;
            Ok::<_, ApiError>(t)
        })?;
        Ok(json!({
            "token_id": t.token_id,
            "token": t.token,
            "role": t.role,
            "tenant": t.tenant,
            "expires_at": t.expires_at.map(rfc3339),
        }))
    })
    .await?;
    Ok((StatusCode::CREATED, axum::Json(out)).into_response())
}

async fn list_tokens(
    State(st): St,
    who: Auth,
    Path(tenant): Path<String>,
) -> Result<Response, ApiError> {
    who.tenant(&tenant)?;
    who.operator()?;
    let out = blocking(&st, move |_, db| Ok(mgmt::list_tokens(db, Some(&tenant))?)).await?;
    Ok(axum::Json(json!({"tokens": out})).into_response())
}

async fn revoke_token(
    State(st): St,
    who: Auth,
    Path((tenant, token_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    who.tenant(&tenant)?;
    who.operator()?;
    blocking(&st, move |_, db| {
        mgmt::atomically(db, |db| {
            if !mgmt::revoke_token(db, &token_id, Some(&tenant), now())? {
                return Err(ApiError::not_found("token"));
            }
            audit_in(db, &who, &tenant, "token.revoke", &token_id, Value::Null)
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
