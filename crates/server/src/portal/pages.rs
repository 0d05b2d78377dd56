//! The portal's page handlers. Each takes the signed-in [`Session`] (one
//! tenant), checks the form's CSRF token on every change, calls the service
//! layer on the blocking pool with the session's tenant (another tenant's
//! key id answers 404), records the change in the audit trail and renders
//! an askama template.

use super::{render, Form, Path, PortalError, Session, COOKIE, SESSION_TTL_SECS};
use crate::error::ApiError;
use crate::{now, AppState};
use askama::Template;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use keygate_control::logs::{query_logs, LogQuery};
use keygate_control::mgmt::{self, Purpose, Role};
use keygate_control::service::{KeyPatch, NewKey};
use keygate_control::store::StoredKey;
use keygate_control::usage::{query_usage, Bucket, UsageQuery};
use keygate_control::{Conn, Service};
use keygate_core::credential::{Kind, Status};
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

type St = State<Arc<AppState>>;

pub(super) async fn blocking<R: Send + 'static>(
    st: &Arc<AppState>,
    f: impl FnOnce(&Service, &mut Conn) -> Result<R, PortalError> + Send + 'static,
) -> Result<R, PortalError> {
    let st = Arc::clone(st);
    tokio::task::spawn_blocking(move || {
        let svc = st.svc.lock().map_err(|_| PortalError::internal())?;
        let mut db = st.db.lock().map_err(|_| PortalError::internal())?;
        f(&svc, &mut db)
    })
    .await
    .map_err(|_| PortalError::internal())?
}

pub(super) fn time_text(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs))
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC")
}

/// A key as the pages show it: never a secret or a hash.
pub struct KeyRow {
    pub key_id: String,
    pub name: String,
    pub kind: &'static str,
    pub scopes: String,
    pub environment: String,
    pub allowed_ips: String,
    pub allowed_ips_lines: String,
    pub rate_limit: String,
    pub active: bool,
    pub has_secret: bool,
    pub created: String,
    pub last_used: String,
    /// "—" for none.
    pub owner: String,
    /// "never", or the time, and whether it has passed.
    pub expires: String,
    pub expired: bool,
    /// The metadata object as JSON text ("" for none).
    pub metadata: String,
    /// Until when a rolled-away value still works ("" for none).
    pub previous_key_until: String,
    /// The key's own limits (`100/min, 10000/day`), or "-".
    pub limits: String,
    /// The key's plan, or "-" (its tenant's plan, if any, applies).
    pub plan: String,
    /// The key's usage credits (`10000, refilled monthly`), or "-"; on the
    /// key page what is left of them.
    pub credits: String,
    /// On the key page: the limits the key meets and where they come from.
    pub effective_limits: String,
    /// On the key page: its tenant's shared limits ("none").
    pub tenant_limits: String,
}

fn key_row(k: &StoredKey, used: Option<u64>) -> KeyRow {
    let r = &k.record;
    KeyRow {
        key_id: r.key_id.clone(),
        name: k.name.clone(),
        kind: match r.kind {
            Kind::Default => "default",
            Kind::Scoped => "scoped",
        },
        scopes: if r.scopes.is_empty() {
            "(all)".into()
        } else {
            r.scopes.join(", ")
        },
        environment: r.environment.clone(),
        allowed_ips: if r.allowed_ips.is_empty() {
            "any".into()
        } else {
            r.allowed_ips.join(", ")
        },
        allowed_ips_lines: r.allowed_ips.join("\n"),
        rate_limit: r.rate_limit.as_ref().map_or_else(
            || "default".into(),
            |l| format!("{}/{}s", l.requests, l.window_secs),
        ),
        active: matches!(r.status, Status::Active),
        has_secret: r.secret_hash.is_some(),
        created: time_text(k.created_at),
        last_used: used.map_or_else(|| "never".into(), time_text),
        owner: r.owner.clone().unwrap_or_else(|| "—".into()),
        expires: r.expires_at.map_or_else(|| "never".into(), time_text),
        expired: r.expires_at.is_some_and(|t| t <= now()),
        metadata: k
            .metadata
            .as_ref()
            .and_then(|m| serde_json::to_string_pretty(m).ok())
            .unwrap_or_default(),
        previous_key_until: r
            .previous_key_expires_at
            .filter(|t| *t > now())
            .map(time_text)
            .unwrap_or_default(),
        limits: if r.limits.is_empty() {
            "-".into()
        } else {
            r.limits
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        },
        plan: r.plan.clone().unwrap_or_else(|| "-".into()),
        credits: r.credits.map_or_else(
            || "-".into(),
            |c| {
                format!(
                    "{} from {}{}",
                    c.balance,
                    time_text(c.granted_at),
                    if c.monthly { ", refilled monthly" } else { "" }
                )
            },
        ),
        effective_limits: String::new(),
        tenant_limits: String::new(),
    }
}

/// A form's error, shown next to its field.
#[derive(Default)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    fn on(&self, field: &str) -> &str {
        if self.field == field {
            &self.message
        } else {
            ""
        }
    }
}

fn field_error(e: PortalError, field: &str) -> Result<FieldError, PortalError> {
    if e.status == StatusCode::UNPROCESSABLE_ENTITY || e.status == StatusCode::CONFLICT {
        Ok(FieldError {
            field: field.to_owned(),
            message: e.message,
        })
    } else {
        Err(e)
    }
}

// ---- sign-in ----

#[derive(Deserialize)]
pub struct OpenParams {
    link: Option<String>,
}

#[derive(Template)]
#[template(path = "opened.html")]
struct Opened<'a> {
    tenant: &'a str,
    csrf: &'a str,
    nav: &'a str,
}

/// Opens a one-time link: revokes it (so a second use fails) and starts a
/// browser session with a fresh tenant token in the cookie.
pub async fn open(State(st): St, req: axum::extract::Request) -> Result<Response, PortalError> {
    let headers = req.headers().clone();
    let ip = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |c| {
            c.0.ip()
        });
    let q = Query::<OpenParams>::try_from_uri(req.uri())
        .map(|Query(q)| q)
        .unwrap_or(OpenParams { link: None });
    let gone = || {
        PortalError::new(
            StatusCode::GONE,
            "This portal link has already been used or has expired. Ask your operator for a new one.",
        )
    };
    let Some(link) = q.link.filter(|l| !l.is_empty()) else {
        return Err(gone());
    };
    if st.limiter.blocked(ip).is_some() {
        return Err(PortalError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many failed sign-ins from this address; try again later.",
        ));
    }
    let st2 = Arc::clone(&st);
    // The link's single use, the session and the record: all or nothing.
    let out = blocking(&st, move |_, db| {
        mgmt::atomically(db, |db| {
            let t = now();
            let Some(p) = mgmt::authenticate_as(db, Purpose::PortalLink, &link, t)? else {
                return Ok(None);
            };
            let tenant = match (p.role, &p.tenant) {
                (Role::Tenant, Some(tn)) => tn.clone(),
                _ => return Ok(None),
            };
            // The revocation is the single use: only one opener wins it.
            if !mgmt::revoke_as(db, Purpose::PortalLink, &p.token_id, Some(&tenant), t)? {
                return Ok(None);
            }
            let s = mgmt::create_portal_token(
                db,
                Purpose::PortalSession,
                &tenant,
                t + SESSION_TTL_SECS,
                t,
            )?;
            super::audit(
                db,
                &s.token_id,
                ip,
                &tenant,
                "portal.login",
                &s.token_id,
                json!({"link_token_id": p.token_id}),
            )?;
            Ok(Some((tenant, s.token)))
        })
    })
    .await?;
    let Some((tenant, token)) = out else {
        st2.limiter.failed(ip);
        return Err(gone());
    };
    let secure = if super::over_tls(&headers) {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={token}; Path=/portal; HttpOnly; SameSite=Strict; Max-Age={SESSION_TTL_SECS}{secure}"
    );
    let csrf = super::csrf_for(&token);
    let mut resp = render(
        StatusCode::OK,
        &Opened {
            tenant: &tenant,
            csrf: &csrf,
            nav: "",
        },
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}

#[derive(Deserialize)]
pub struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

#[derive(Template)]
#[template(path = "error.html")]
struct LoggedOut<'a> {
    title: &'a str,
    message: &'a str,
    signed_out: bool,
    tenant: &'a str,
    csrf: &'a str,
    nav: &'a str,
}

pub async fn logout(
    State(st): St,
    s: Session,
    Form(f): Form<CsrfOnly>,
) -> Result<Response, PortalError> {
    s.check_csrf(&f.csrf)?;
    let tenant = s.tenant.clone();
    blocking(&st, move |_, db| {
        mgmt::atomically(db, |db| {
            mgmt::revoke_as(
                db,
                Purpose::PortalSession,
                &s.principal.token_id,
                Some(&tenant),
                now(),
            )?;
            s.audit(
                db,
                "portal.logout",
                &s.principal.token_id,
                serde_json::Value::Null,
            )?;
            Ok(())
        })
    })
    .await?;
    let mut resp = render(
        StatusCode::OK,
        &LoggedOut {
            title: "Signed out",
            message: "You are signed out. Use a new portal link to sign in again.",
            signed_out: true,
            tenant: "",
            csrf: "",
            nav: "",
        },
    );
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "keygate_portal=; Path=/portal; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    Ok(resp)
}

pub async fn home() -> Redirect {
    Redirect::to("/portal/keys")
}

// ---- keys ----

#[derive(Template)]
#[template(path = "keys.html")]
struct KeysPage<'a> {
    tenant: &'a str,
    csrf: &'a str,
    nav: &'a str,
    keys: Vec<KeyRow>,
    has_default: bool,
    scoped_count: usize,
    err: FieldError,
    form: CreateForm,
}

#[derive(Deserialize, Default)]
pub struct CreateForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    scopes: String,
    #[serde(default)]
    allowed_ips: String,
    /// Not offered: a key's own rate limit replaces its plan's limits, and
    /// only operators set limits. Read to refuse a posted one.
    #[serde(default)]
    rate_limit: Option<String>,
    #[serde(default)]
    with_secret: Option<String>,
}

fn list(text: &str) -> Vec<String> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn keys_page(
    st: &Arc<AppState>,
    s: &Session,
    status: StatusCode,
    err: FieldError,
    form: CreateForm,
) -> Result<Response, PortalError> {
    let tenant = s.tenant.clone();
    let keys = blocking(st, move |svc, db| {
        let used: BTreeMap<String, u64> = mgmt::last_used(db, &tenant)?.into_iter().collect();
        let mut ks = svc.list_keys(Some(&tenant))?;
        // The default credential first, then scoped ones oldest first.
        ks.sort_by_key(|k| (matches!(k.record.kind, Kind::Scoped), k.created_at));
        Ok(ks
            .iter()
            .map(|k| key_row(k, used.get(&k.record.key_id).copied()))
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(render(
        status,
        &KeysPage {
            tenant: &s.tenant,
            csrf: &s.csrf,
            nav: "keys",
            has_default: keys.iter().any(|k| k.kind == "default"),
            scoped_count: keys.iter().filter(|k| k.kind == "scoped").count(),
            keys,
            err,
            form,
        },
    ))
}

pub async fn keys(State(st): St, s: Session) -> Result<Response, PortalError> {
    keys_page(
        &st,
        &s,
        StatusCode::OK,
        FieldError::default(),
        CreateForm {
            with_secret: Some("on".into()),
            ..CreateForm::default()
        },
    )
    .await
}

/// Shown once after a key or secret is made.
#[derive(Template)]
#[template(path = "created.html")]
struct CreatedPage<'a> {
    tenant: &'a str,
    csrf: &'a str,
    nav: &'a str,
    heading: &'a str,
    key_id: &'a str,
    api_key: Option<String>,
    secret: Option<String>,
    basic: Option<String>,
}

pub async fn create_key(
    State(st): St,
    s: Session,
    Form(f): Form<CreateForm>,
) -> Result<Response, PortalError> {
    s.check_csrf(&f.csrf)?;
    // Refused whatever else the form holds: only operators set limits.
    if f.rate_limit
        .as_deref()
        .is_some_and(|r| !r.trim().is_empty())
    {
        return Err(PortalError::new(
            StatusCode::FORBIDDEN,
            "Rate limits are set by your operator (see Limits); a key made here meets your plan's limits.",
        ));
    }
    let bad = |field: &str, message: String| FieldError {
        field: field.into(),
        message,
    };
    if f.name.trim().is_empty() {
        let e = bad("name", "A name is required.".into());
        return keys_page(&st, &s, StatusCode::UNPROCESSABLE_ENTITY, e, f).await;
    }
    let new = NewKey {
        key_id: None,
        name: f.name.trim().to_owned(),
        tenant: s.tenant.clone(),
        environment: "live".into(),
        kind: Kind::Scoped,
        scopes: list(&f.scopes),
        allowed_ips: list(&f.allowed_ips),
        rate_limit: None,
        expires_at: None,
        with_secret: f.with_secret.is_some(),
        key_value: None,
        secret_value: None,
        owner: Some(session_owner(&s)),
        metadata: None,
        key_format: None,
    };
    made(&st, s, new, f).await
}

pub async fn create_default(
    State(st): St,
    s: Session,
    Form(f): Form<CsrfOnly>,
) -> Result<Response, PortalError> {
    s.check_csrf(&f.csrf)?;
    let new = NewKey {
        key_id: None,
        name: "default".into(),
        tenant: s.tenant.clone(),
        environment: "live".into(),
        kind: Kind::Default,
        scopes: Vec::new(),
        allowed_ips: Vec::new(),
        rate_limit: None,
        expires_at: None,
        with_secret: true,
        key_value: None,
        secret_value: None,
        owner: Some(session_owner(&s)),
        metadata: None,
        key_format: None,
    };
    made(&st, s, new, CreateForm::default()).await
}

async fn made(
    st: &Arc<AppState>,
    s: Session,
    new: NewKey,
    form: CreateForm,
) -> Result<Response, PortalError> {
    let tenant = s.tenant.clone();
    let s2 = s.clone();
    let made = blocking(st, move |svc, db| {
        let detail = json!({"kind": new.kind, "scopes": new.scopes, "with_secret": new.with_secret, "via": "portal"});
        let made = crate::api::audited(
            svc,
            db,
            &s2.auth(),
            &tenant,
            "key.create",
            None,
            detail,
            |svc| svc.create_key(new, now()),
            |c| c.key_id.clone(),
        );
        let c = match made {
            Ok(c) => c,
            Err(e) => return Ok(Err(PortalError::from(e))),
        };
        if mgmt::get_tenant(db, &tenant)?.is_none() {
            mgmt::put_tenant(db, &tenant, None, now())?;
        }
        Ok(Ok(c))
    })
    .await?;
    let c = match made {
        Ok(c) => c,
        Err(e) => {
            let field = if e.message.contains("IP")
                || e.message.contains("allowed")
                || e.message.contains("CIDR")
            {
                "allowed_ips"
            } else if e.message.contains("scope") {
                "scopes"
            } else {
                "name"
            };
            let e = field_error(e, field)?;
            return keys_page(st, &s, StatusCode::UNPROCESSABLE_ENTITY, e, form).await;
        }
    };
    let basic = c
        .secret
        .as_deref()
        .map(|sec| keygate_control::service::basic_header(&c.api_key, sec));
    Ok(render(
        StatusCode::CREATED,
        &CreatedPage {
            tenant: &s.tenant,
            csrf: &s.csrf,
            nav: "keys",
            heading: "Your new key",
            key_id: &c.key_id,
            api_key: Some(c.api_key.clone()),
            secret: c.secret.clone(),
            basic,
        },
    ))
}

#[derive(Template)]
#[template(path = "key.html")]
struct KeyPage<'a> {
    tenant: &'a str,
    csrf: &'a str,
    nav: &'a str,
    k: KeyRow,
    sessions: Vec<SessionRow>,
    err: FieldError,
    ips_value: String,
}

pub struct SessionRow {
    pub session_id: String,
    pub created: String,
    pub expires: String,
    pub last_seen: String,
    pub revoked: bool,
}

async fn key_page(
    st: &Arc<AppState>,
    s: &Session,
    key_id: String,
    status: StatusCode,
    err: FieldError,
    ips_value: Option<String>,
) -> Result<Response, PortalError> {
    let tenant = s.tenant.clone();
    let (k, sessions) = blocking(st, move |svc, db| {
        let k = svc.tenant_key(&tenant, &key_id)?;
        let used = mgmt::last_used(db, &tenant)?
            .into_iter()
            .find(|(id, _)| *id == key_id)
            .map(|(_, t)| t);
        let sessions = mgmt::list_sessions(db, &key_id)?
            .iter()
            .map(|x| SessionRow {
                session_id: x.session_id.clone(),
                created: time_text(x.created_at),
                expires: time_text(x.expires_at),
                last_seen: x.last_seen_at.map_or_else(|| "—".into(), time_text),
                revoked: x.revoked_at_ms.is_some(),
            })
            .collect::<Vec<_>>();
        let mut row = key_row(&k, used);
        // What the key meets, read-only: operators set limits and plans.
        let snap = svc.snapshot()?;
        row.effective_limits = super::limits::effective_text(&snap, &k);
        row.tenant_limits = snap
            .tenant_limits_of(&tenant)
            .map_or_else(|| "none".into(), |t| super::limits::limits_text(&t.limits));
        let credits = crate::api::credits_of(svc, std::slice::from_ref(&k));
        if k.record.credits.is_some() {
            row.credits = super::limits::credits_text(credits.get(&k.record.key_id));
        }
        Ok((row, sessions))
    })
    .await?;
    let ips_value = ips_value.unwrap_or_else(|| k.allowed_ips_lines.clone());
    Ok(render(
        status,
        &KeyPage {
            tenant: &s.tenant,
            csrf: &s.csrf,
            nav: "keys",
            k,
            sessions,
            err,
            ips_value,
        },
    ))
}

pub async fn key(
    State(st): St,
    s: Session,
    Path(key_id): Path<String>,
) -> Result<Response, PortalError> {
    key_page(&st, &s, key_id, StatusCode::OK, FieldError::default(), None).await
}

pub async fn rotate(
    State(st): St,
    s: Session,
    Path(key_id): Path<String>,
    Form(f): Form<CsrfOnly>,
) -> Result<Response, PortalError> {
    s.check_csrf(&f.csrf)?;
    let tenant = s.tenant.clone();
    let s2 = s.clone();
    let kid = key_id.clone();
    let secret = blocking(&st, move |svc, db| {
        // Regenerating replaces the secret at once (no grace period): the
        // portal's button is for a secret that may have leaked.
        Ok(crate::api::audited(
            svc,
            db,
            &s2.auth(),
            &tenant,
            "key.rotate_secret",
            Some(&kid),
            json!({"grace_seconds": 0, "via": "portal"}),
            |svc| svc.rotate_secret_of(&tenant, &kid, 0, now()),
            |_| kid.clone(),
        )?)
    })
    .await?;
    Ok(render(
        StatusCode::OK,
        &CreatedPage {
            tenant: &s.tenant,
            csrf: &s.csrf,
            nav: "keys",
            heading: "Your new secret",
            key_id: &key_id,
            api_key: None,
            secret: Some(secret),
            basic: None,
        },
    ))
}

/// The owner of keys made in a portal session: the session's label (its
/// token id), since a portal link names a tenant, not a person.
fn session_owner(s: &Session) -> String {
    format!("portal:{}", s.principal.token_id)
}

#[derive(Deserialize)]
pub struct RollForm {
    #[serde(default)]
    csrf: String,
    /// Seconds the old value keeps working.
    #[serde(default)]
    grace_seconds: String,
}

/// Grace periods the portal offers for a roll.
const ROLL_GRACES: [u64; 4] = [0, 3600, 86_400, 7 * 86_400];

/// A new value for the key; the old one works for the chosen grace.
pub async fn roll(
    State(st): St,
    s: Session,
    Path(key_id): Path<String>,
    Form(f): Form<RollForm>,
) -> Result<Response, PortalError> {
    s.check_csrf(&f.csrf)?;
    let grace = match f.grace_seconds.trim().parse::<u64>() {
        Ok(g) if ROLL_GRACES.contains(&g) => g,
        _ => {
            let e = FieldError {
                field: "grace_seconds".into(),
                message: "Choose one of the offered grace periods.".into(),
            };
            return key_page(&st, &s, key_id, StatusCode::UNPROCESSABLE_ENTITY, e, None).await;
        }
    };
    let tenant = s.tenant.clone();
    let s2 = s.clone();
    let kid = key_id.clone();
    let rolled = blocking(&st, move |svc, db| {
        Ok(crate::api::audited(
            svc,
            db,
            &s2.auth(),
            &tenant,
            "key.roll",
            Some(&kid),
            json!({"grace_seconds": grace, "via": "portal"}),
            |svc| svc.roll_key(Some(&tenant), &kid, grace, None, now()),
            |_| kid.clone(),
        )?)
    })
    .await?;
    let heading = if grace > 0 {
        "Your new API key (the old one works for the grace period)"
    } else {
        "Your new API key (the old one no longer works)"
    };
    Ok(render(
        StatusCode::OK,
        &CreatedPage {
            tenant: &s.tenant,
            csrf: &s.csrf,
            nav: "keys",
            heading,
            key_id: &key_id,
            api_key: Some(rolled.api_key),
            secret: None,
            basic: None,
        },
    ))
}

#[derive(Deserialize)]
pub struct StatusForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    status: String,
}

pub async fn set_status(
    State(st): St,
    s: Session,
    Path(key_id): Path<String>,
    Form(f): Form<StatusForm>,
) -> Result<Response, PortalError> {
    s.check_csrf(&f.csrf)?;
    let status = match f.status.as_str() {
        "active" => Status::Active,
        "inactive" => Status::Inactive,
        _ => {
            return Err(PortalError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "status must be active or inactive",
            ))
        }
    };
    let tenant = s.tenant.clone();
    let kid = key_id.clone();
    let word = f.status.clone();
    let s2 = s.clone();
    blocking(&st, move |svc, db| {
        let patch = KeyPatch {
            status: Some(status),
            ..KeyPatch::default()
        };
        crate::api::audited(
            svc,
            db,
            &s2.auth(),
            &tenant,
            "key.update",
            Some(&kid),
            json!({"status": word, "via": "portal"}),
            |svc| svc.patch_key(&tenant, &kid, &patch, now()),
            |_| kid.clone(),
        )?;
        Ok(())
    })
    .await?;
    Ok(Redirect::to(&format!("/portal/keys/{key_id}")).into_response())
}

#[derive(Deserialize)]
pub struct IpsForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    allowed_ips: String,
}

pub async fn set_ips(
    State(st): St,
    s: Session,
    Path(key_id): Path<String>,
    Form(f): Form<IpsForm>,
) -> Result<Response, PortalError> {
    s.check_csrf(&f.csrf)?;
    let tenant = s.tenant.clone();
    let kid = key_id.clone();
    let ips = list(&f.allowed_ips);
    let s2 = s.clone();
    let out = blocking(&st, move |svc, db| {
        let patch = KeyPatch {
            allowed_ips: Some(ips.clone()),
            ..KeyPatch::default()
        };
        // The service checks each CIDR; a bad one is shown next to the field.
        let patched = crate::api::audited(
            svc,
            db,
            &s2.auth(),
            &tenant,
            "key.update",
            Some(&kid),
            json!({"allowed_ips": ips, "via": "portal"}),
            |svc| svc.patch_key(&tenant, &kid, &patch, now()),
            |_| kid.clone(),
        );
        match patched {
            Ok(_) => Ok(Ok(())),
            Err(e) => Ok(Err(PortalError::from(e))),
        }
    })
    .await?;
    match out {
        Ok(()) => Ok(Redirect::to(&format!("/portal/keys/{key_id}")).into_response()),
        Err(e) => {
            let e = field_error(e, "allowed_ips")?;
            key_page(
                &st,
                &s,
                key_id,
                StatusCode::UNPROCESSABLE_ENTITY,
                e,
                Some(f.allowed_ips),
            )
            .await
        }
    }
}

#[derive(Template)]
#[template(path = "confirm_delete.html")]
struct ConfirmDelete<'a> {
    tenant: &'a str,
    csrf: &'a str,
    nav: &'a str,
    k: KeyRow,
}

pub async fn confirm_delete(
    State(st): St,
    s: Session,
    Path(key_id): Path<String>,
) -> Result<Response, PortalError> {
    let tenant = s.tenant.clone();
    let k = blocking(&st, move |svc, _| {
        Ok(key_row(&svc.tenant_key(&tenant, &key_id)?, None))
    })
    .await?;
    Ok(render(
        StatusCode::OK,
        &ConfirmDelete {
            tenant: &s.tenant,
            csrf: &s.csrf,
            nav: "keys",
            k,
        },
    ))
}

pub async fn delete(
    State(st): St,
    s: Session,
    Path(key_id): Path<String>,
    Form(f): Form<CsrfOnly>,
) -> Result<Response, PortalError> {
    s.check_csrf(&f.csrf)?;
    let tenant = s.tenant.clone();
    blocking(&st, move |svc, db| {
        crate::api::audited(
            svc,
            db,
            &s.auth(),
            &tenant,
            "key.delete",
            Some(&key_id),
            json!({"via": "portal"}),
            |svc| svc.delete_key(&tenant, &key_id),
            |_| key_id.clone(),
        )?;
        Ok(())
    })
    .await?;
    Ok(Redirect::to("/portal/keys").into_response())
}

pub async fn revoke_session(
    State(st): St,
    s: Session,
    Path((key_id, session_id)): Path<(String, String)>,
    Form(f): Form<CsrfOnly>,
) -> Result<Response, PortalError> {
    s.check_csrf(&f.csrf)?;
    let tenant = s.tenant.clone();
    let kid = key_id.clone();
    blocking(&st, move |svc, db| {
        svc.tenant_key(&tenant, &kid)?;
        let now_ms = u64::try_from(keygate_control_now_ms()).unwrap_or(0);
        crate::api::audited(
            svc,
            db,
            &s.auth(),
            &tenant,
            "session.revoke",
            Some(&kid),
            json!({"session_id": session_id, "via": "portal"}),
            |svc| svc.revoke_session(&kid, &session_id, now_ms),
            |_| kid.clone(),
        )
        .map_err(|e| PortalError::from(ApiError::from(e)))?;
        Ok(())
    })
    .await?;
    Ok(Redirect::to(&format!("/portal/keys/{key_id}")).into_response())
}

fn keygate_control_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

// ---- logs ----

#[derive(Deserialize, Default)]
pub struct LogParams {
    #[serde(default)]
    key: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    #[serde(default)]
    cursor: String,
}

pub struct LogRow {
    pub time: String,
    pub key_name: String,
    /// The key's owner when the request was made ("—" without one).
    pub owner: String,
    pub method: String,
    pub path: String,
    pub client_ip: String,
    pub status: String,
    pub decision: String,
    pub denied: bool,
}

pub struct KeyOption {
    pub key_id: String,
    pub label: String,
    pub selected: bool,
}

#[derive(Template)]
#[template(path = "logs.html")]
struct LogsPage<'a> {
    tenant: &'a str,
    csrf: &'a str,
    nav: &'a str,
    rows: Vec<LogRow>,
    keys: Vec<KeyOption>,
    q: LogParams,
    next: Option<String>,
    err: FieldError,
}

/// `2026-01-02T03:04`, as `<input type=datetime-local>` sends it (UTC), or RFC 3339.
fn form_time(field: &str, s: &str) -> Result<Option<i64>, FieldError> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let full = if s.len() == 16 {
        format!("{s}:00Z")
    } else {
        s.to_owned()
    };
    humantime::parse_rfc3339_weak(full.trim_end_matches('Z'))
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| Some(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
        .ok_or_else(|| FieldError {
            field: field.into(),
            message: "Not a time; use YYYY-MM-DD HH:MM (UTC).".into(),
        })
}

pub async fn logs(
    State(st): St,
    s: Session,
    q: Result<Query<LogParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, PortalError> {
    let q = q.map(|Query(q)| q).unwrap_or_default();
    let mut err = FieldError::default();
    let status = if q.status.trim().is_empty() {
        None
    } else {
        match q.status.trim().parse() {
            Ok(v) => Some(v),
            Err(_) => {
                err = FieldError {
                    field: "status".into(),
                    message: "Use a status like 401 or a class like 4xx.".into(),
                };
                None
            }
        }
    };
    let since = form_time("since", &q.since).unwrap_or_else(|e| {
        err = e;
        None
    });
    let until = form_time("until", &q.until).unwrap_or_else(|e| {
        err = e;
        None
    });
    let lq = LogQuery {
        tenant: Some(s.tenant.clone()),
        key_id: Some(q.key.clone()).filter(|k| !k.is_empty()),
        status,
        since_ms: since,
        until_ms: until,
        limit: Some(50),
        cursor: Some(q.cursor.clone()).filter(|c| !c.is_empty()),
        ..LogQuery::default()
    };
    let tenant = s.tenant.clone();
    let failed = !err.field.is_empty();
    let (page, keys) = blocking(&st, move |svc, db| {
        let keys = svc.list_keys(Some(&tenant))?;
        if failed {
            return Ok((None, keys));
        }
        match query_logs(db, &lq) {
            Ok(p) => Ok((Some(p), keys)),
            Err(e) => {
                let e = PortalError::from(e);
                if e.status.is_client_error() {
                    Ok((None, keys))
                } else {
                    Err(e)
                }
            }
        }
    })
    .await?;
    let rows = page
        .as_ref()
        .map(|p| {
            p.records
                .iter()
                .map(|r| LogRow {
                    time: r.time.replace('T', " ").replace('Z', ""),
                    key_name: r
                        .key_name
                        .clone()
                        .filter(|n| !n.is_empty())
                        .or_else(|| r.key_id.clone())
                        .unwrap_or_else(|| "—".into()),
                    owner: r.owner.clone().unwrap_or_else(|| "—".into()),
                    method: r.method.clone().unwrap_or_default(),
                    path: r.path.clone().unwrap_or_default(),
                    client_ip: r.client_ip.clone().unwrap_or_default(),
                    status: r.status.map(|s| s.to_string()).unwrap_or_default(),
                    decision: r.decision.clone().unwrap_or_default(),
                    denied: r.status.is_some_and(|s| s >= 400),
                })
                .collect()
        })
        .unwrap_or_default();
    let next = page.and_then(|p| p.next_cursor);
    let keys = keys
        .iter()
        .map(|k| KeyOption {
            key_id: k.record.key_id.clone(),
            label: if k.name.is_empty() {
                k.record.key_id.clone()
            } else {
                format!("{} ({})", k.name, k.record.key_id)
            },
            selected: k.record.key_id == q.key,
        })
        .collect();
    let code = if failed {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    Ok(render(
        code,
        &LogsPage {
            tenant: &s.tenant,
            csrf: &s.csrf,
            nav: "logs",
            rows,
            keys,
            q,
            next,
            err,
        },
    ))
}

impl LogsPage<'_> {
    /// The link to the next page: the same filters and the cursor.
    fn next_href(&self) -> String {
        let mut u = String::from("/portal/logs?");
        let enc = |s: &str| -> String {
            s.bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect()
        };
        for (k, v) in [
            ("key", &self.q.key),
            ("status", &self.q.status),
            ("since", &self.q.since),
            ("until", &self.q.until),
        ] {
            u.push_str(&format!("{k}={}&", enc(v)));
        }
        u.push_str(&format!(
            "cursor={}",
            enc(self.next.as_deref().unwrap_or(""))
        ));
        u
    }
}

// ---- usage ----

pub struct Chart {
    pub key_label: String,
    pub title: String,
    pub width: u32,
    pub height: u32,
    pub bars: Vec<Bar>,
    pub max: i64,
    pub total_allowed: i64,
    pub total_denied: i64,
    pub first_label: String,
    pub last_label: String,
}

pub struct Bar {
    pub x: u32,
    pub w: u32,
    pub allowed_y: u32,
    pub allowed_h: u32,
    pub denied_y: u32,
    pub denied_h: u32,
    pub tip: String,
}

#[derive(Template)]
#[template(path = "usage.html")]
struct UsagePage<'a> {
    tenant: &'a str,
    csrf: &'a str,
    nav: &'a str,
    charts: Vec<Chart>,
}

const CHART_W: u32 = 480;
const CHART_H: u32 = 120;

/// One bar per bucket (empty buckets included), allowed stacked under denied.
fn chart(
    key_label: &str,
    title: &str,
    points: &[(i64, i64, i64)],
    start_ms: i64,
    step_ms: i64,
    n: usize,
) -> Chart {
    let mut by: Vec<(i64, i64)> = vec![(0, 0); n];
    for &(at, a, d) in points {
        let i = (at - start_ms).div_euclid(step_ms);
        if let Some(slot) = usize::try_from(i).ok().and_then(|i| by.get_mut(i)) {
            slot.0 += a;
            slot.1 += d;
        }
    }
    let max = by.iter().map(|(a, d)| a + d).max().unwrap_or(0).max(1);
    let n32 = u32::try_from(n.max(1)).unwrap_or(1);
    let slot_w = CHART_W / n32;
    let scale = |v: i64| -> u32 {
        u32::try_from(v.saturating_mul(i64::from(CHART_H)) / max).unwrap_or(CHART_H)
    };
    let bars = by
        .iter()
        .enumerate()
        .map(|(i, &(a, d))| {
            let ah = scale(a);
            let dh = scale(d);
            let at = start_ms + step_ms * i64::try_from(i).unwrap_or(0);
            let label = humantime::format_rfc3339_seconds(
                UNIX_EPOCH + Duration::from_millis(u64::try_from(at).unwrap_or(0)),
            )
            .to_string();
            Bar {
                x: slot_w * u32::try_from(i).unwrap_or(0),
                w: slot_w.saturating_sub(1).max(1),
                allowed_y: CHART_H - ah,
                allowed_h: ah,
                denied_y: CHART_H - ah - dh.min(CHART_H - ah),
                denied_h: dh.min(CHART_H - ah),
                tip: format!("{label}: {a} allowed, {d} denied"),
            }
        })
        .collect();
    let fmt = |ms: i64, hours: bool| {
        let t = humantime::format_rfc3339_seconds(
            UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0)),
        )
        .to_string();
        if hours {
            t.get(5..16).unwrap_or("").replace('T', " ")
        } else {
            t.get(0..10).unwrap_or("").to_owned()
        }
    };
    let hours = step_ms < 86_400_000;
    Chart {
        key_label: key_label.to_owned(),
        title: title.to_owned(),
        width: CHART_W,
        height: CHART_H,
        bars,
        max,
        total_allowed: by.iter().map(|x| x.0).sum(),
        total_denied: by.iter().map(|x| x.1).sum(),
        first_label: fmt(start_ms, hours),
        last_label: fmt(start_ms + step_ms * i64::try_from(n).unwrap_or(0), hours),
    }
}

pub async fn usage(State(st): St, s: Session) -> Result<Response, PortalError> {
    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 86_400_000;
    let now_ms = keygate_control_now_ms();
    let hour_start = now_ms - now_ms.rem_euclid(HOUR) - 23 * HOUR;
    let day_start = now_ms - now_ms.rem_euclid(DAY) - 6 * DAY;
    let tenant = s.tenant.clone();
    let (keys, hourly, daily) = blocking(&st, move |svc, db| {
        let keys = svc.list_keys(Some(&tenant))?;
        let q = |bucket, since_ms| UsageQuery {
            tenant: tenant.clone(),
            key_id: None,
            per_key: true,
            bucket,
            since_ms,
            until_ms: now_ms,
        };
        let hourly = query_usage(db, &q(Bucket::Hour, hour_start))?;
        let daily = query_usage(db, &q(Bucket::Day, day_start))?;
        Ok((keys, hourly, daily))
    })
    .await?;
    let mut charts = Vec::new();
    for k in &keys {
        let id = &k.record.key_id;
        let label = if k.name.is_empty() {
            id.clone()
        } else {
            format!("{} ({id})", k.name)
        };
        let pick = |ps: &[keygate_control::UsagePoint]| -> Vec<(i64, i64, i64)> {
            ps.iter()
                .filter(|p| p.key_id.as_deref() == Some(id.as_str()))
                .map(|p| (p.start_ms, p.allowed, p.denied))
                .collect()
        };
        charts.push(chart(
            &label,
            "Last 24 hours, per hour",
            &pick(&hourly),
            hour_start,
            HOUR,
            24,
        ));
        charts.push(chart(
            &label,
            "Last 7 days, per day",
            &pick(&daily),
            day_start,
            DAY,
            7,
        ));
    }
    Ok(render(
        StatusCode::OK,
        &UsagePage {
            tenant: &s.tenant,
            csrf: &s.csrf,
            nav: "usage",
            charts,
        },
    ))
}

#[cfg(test)]
pub(crate) fn chart_for_test(points: &[(i64, i64, i64)]) -> (i64, i64, usize) {
    let c = chart("k", "t", points, 0, 10, 3);
    (c.total_allowed, c.total_denied, c.bars.len())
}
