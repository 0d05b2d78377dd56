//! The developer portal: server-rendered pages under `/portal` where one
//! tenant manages its keys, sees its request log and its usage.
//!
//! Access: an operator mints a one-time link (API `POST
//! /api/v1/tenants/{tenant}/portal-sessions`, CLI `keygate portal link`).
//! The link and the browser session are tokens of one tenant kept by `mgmt`
//! (only their SHA-256), each with its own purpose, so neither works as an
//! API bearer token, nor an API token as either, and `token list` shows
//! neither: the link expires in minutes and is revoked the moment it is
//! opened, which makes it single-use; opening it mints a session token with
//! a fixed 8-hour lifetime, kept in an HttpOnly, SameSite=Strict cookie
//! (Secure when the request came over TLS, as told by
//! `X-Forwarded-Proto: https`). Logout revokes that token.
//!
//! Every state-changing form carries a CSRF token derived from the
//! session token (SHA-256 of a fixed label and the token, so it cannot be
//! forged without the cookie) and is refused when an `Origin` header names
//! another origin. Every page carries a strict Content-Security-Policy (no
//! inline script or style), `X-Frame-Options: DENY` and
//! `Referrer-Policy: no-referrer`. Templates are askama's, escaped by default.

mod limits;
mod pages;

use crate::error::ApiError;
use crate::extract::{client_ip, Auth};
use crate::{now, AppState};
use askama::Template;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use keygate_control::mgmt::{self, AuditEntry, Principal, Purpose, Role};
use keygate_control::{Conn, DbError};
use keygate_core::hash::{sha256, to_hex};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::net::IpAddr;
use std::sync::Arc;

/// How long a portal link may wait to be opened.
pub const LINK_TTL_SECS: u64 = 10 * 60;
/// Fixed lifetime of a browser session (no sliding renewal).
pub const SESSION_TTL_SECS: u64 = 8 * 3600;
/// The session cookie's name.
pub const COOKIE: &str = "keygate_portal";

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   frame-ancestors 'none'; form-action 'self'; base-uri 'none'";

/// The `/portal` pages and their static files.
pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/portal", get(pages::home))
        .route("/portal/", get(pages::home))
        .route("/portal/open", get(pages::open))
        .route("/portal/logout", post(pages::logout))
        .route("/portal/keys", get(pages::keys).post(pages::create_key))
        .route("/portal/keys/default", post(pages::create_default))
        .route("/portal/keys/{key_id}", get(pages::key))
        .route("/portal/keys/{key_id}/rotate", post(pages::rotate))
        .route("/portal/keys/{key_id}/roll", post(pages::roll))
        .route("/portal/keys/{key_id}/status", post(pages::set_status))
        .route("/portal/keys/{key_id}/ips", post(pages::set_ips))
        .route(
            "/portal/keys/{key_id}/delete",
            get(pages::confirm_delete).post(pages::delete),
        )
        .route(
            "/portal/keys/{key_id}/sessions/{session_id}/revoke",
            post(pages::revoke_session),
        )
        .route("/portal/logs", get(pages::logs))
        .route("/portal/usage", get(pages::usage))
        .route("/portal/limits", get(limits::limits))
        .route("/portal/static/portal.css", get(css))
        .route("/portal/static/portal.js", get(js))
        .layer(middleware::from_fn(security_headers))
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Pages show secrets once: never keep them in a cache.
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        include_str!("../../static/portal.css"),
    )
        .into_response()
}

async fn js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        include_str!("../../static/portal.js"),
    )
        .into_response()
}

/// Was this request made over TLS (directly or through a terminating proxy)?
pub(crate) fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// The URL of a one-time link, from the request's own Host (and scheme).
pub fn link_url(headers: &HeaderMap, token: &str) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("127.0.0.1");
    let scheme = if over_tls(headers) { "https" } else { "http" };
    format!("{scheme}://{host}{}", link_path(token))
}

/// Path and query of a link: the token travels in the query, which the
/// server's access log never records.
pub fn link_path(token: &str) -> String {
    format!("/portal/open?link={token}")
}

/// Mints a one-time link token for `tenant`, valid [`LINK_TTL_SECS`]
/// (or `ttl`). Returns (token, expires_at).
pub fn mint_link(
    db: &mut Conn,
    tenant: &str,
    ttl: Option<u64>,
    now: u64,
) -> Result<(String, u64), ApiError> {
    let expires = now + ttl.unwrap_or(LINK_TTL_SECS).max(1);
    let t = mgmt::create_portal_token(db, Purpose::PortalLink, tenant, expires, now)?;
    if mgmt::get_tenant(db, tenant)?.is_none() {
        mgmt::put_tenant(db, tenant, None, now)?;
    }
    Ok((t.token, expires))
}

fn csrf_for(session_token: &str) -> String {
    let mut b = b"keygate-portal-csrf\0".to_vec();
    b.extend_from_slice(session_token.as_bytes());
    to_hex(&sha256(&b))
}

/// A signed-in portal user: one tenant.
#[derive(Clone)]
pub struct Session {
    pub principal: Principal,
    pub tenant: String,
    pub ip: IpAddr,
    pub csrf: String,
}

impl Session {
    /// The API's caller type, for the shared authorisation helpers.
    pub fn auth(&self) -> Auth {
        Auth {
            principal: self.principal.clone(),
            ip: self.ip,
        }
    }

    /// Records what the tenant did, like the API does; called inside the
    /// change's transaction ([`mgmt::atomically`]).
    pub fn audit(
        &self,
        db: &mut Conn,
        action: &str,
        object: &str,
        detail: Value,
    ) -> Result<(), DbError> {
        audit(
            db,
            &self.principal.token_id,
            self.ip,
            &self.tenant,
            action,
            object,
            detail,
        )
    }

    /// Refuses a form without this session's CSRF token.
    pub fn check_csrf(&self, given: &str) -> Result<(), PortalError> {
        let a = given.as_bytes();
        let b = self.csrf.as_bytes();
        // Constant-time compare: the token is a secret.
        let same =
            a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
        if same {
            Ok(())
        } else {
            Err(PortalError::new(
                StatusCode::FORBIDDEN,
                "This form has expired or did not come from the portal. Go back, reload the page and try again.",
            ))
        }
    }
}

pub(crate) fn audit(
    db: &mut Conn,
    token_id: &str,
    ip: IpAddr,
    tenant: &str,
    action: &str,
    object: &str,
    detail: Value,
) -> Result<(), DbError> {
    let ip = ip.to_string();
    let entry = AuditEntry {
        actor_token_id: Some(token_id),
        actor_ip: Some(&ip),
        tenant: Some(tenant),
        action,
        object: Some(object),
        detail: (!detail.is_null()).then_some(detail),
    };
    mgmt::record(db, &entry)
}

pub(crate) fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// A state-changing request whose `Origin` names another site is refused
/// (browsers send it on cross-site POSTs; a missing one is left to CSRF).
fn origin_ok(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    // With `Referrer-Policy: no-referrer` browsers send `Origin: null` even
    // on same-origin form posts; the CSRF token still guards those.
    if origin == "null" {
        return true;
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let bare = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .unwrap_or("");
    !host.is_empty() && bare == host
}

impl FromRequestParts<Arc<AppState>> for Session {
    type Rejection = PortalError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, PortalError> {
        if parts.method != axum::http::Method::GET && !origin_ok(&parts.headers) {
            return Err(PortalError::new(
                StatusCode::FORBIDDEN,
                "This request came from another site and was refused.",
            ));
        }
        let ip = client_ip(parts);
        let signed_out = || {
            PortalError {
            status: StatusCode::UNAUTHORIZED,
            message: "You are not signed in, or your session has ended. Ask your operator for a new portal link.".into(),
            signed_out: true,
        }
        };
        let Some(token) = cookie_token(&parts.headers) else {
            return Err(signed_out());
        };
        if state.limiter.blocked(ip).is_some() {
            return Err(PortalError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many failed sign-ins from this address; try again later.",
            ));
        }
        let st = Arc::clone(state);
        let tok = token.clone();
        let found = tokio::task::spawn_blocking(move || {
            let mut db = st.db.lock().map_err(|_| ApiError::internal())?;
            mgmt::authenticate_as(&mut db, Purpose::PortalSession, &tok, now())
                .map_err(ApiError::from)
        })
        .await
        .map_err(|_| PortalError::internal())??;
        let Some(principal) = found else {
            state.limiter.failed(ip);
            return Err(signed_out());
        };
        let Some(tenant) = principal
            .tenant
            .clone()
            .filter(|_| principal.role == Role::Tenant)
        else {
            // Only tenant tokens are portal sessions.
            return Err(signed_out());
        };
        if let Some(slot) = parts.extensions.get::<crate::extract::TokenSlot>() {
            if let Ok(mut s) = slot.0.lock() {
                *s = Some(principal.token_id.clone());
            }
        }
        Ok(Session {
            principal,
            tenant,
            ip,
            csrf: csrf_for(&token),
        })
    }
}

/// Path parameters of a page. Wraps axum's `Path` so a parameter that
/// cannot be read (percent-encoding that is not UTF-8) shows an error page
/// (400), not axum's plain text. Handlers take [`Session`] first, so a
/// signed-out visitor is told to sign in before this runs.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = PortalError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, PortalError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Path(v))
            .map_err(|e| {
                let (field, problem) = crate::extract::path_problem(&e);
                PortalError::new(
                    StatusCode::BAD_REQUEST,
                    format!("This address is not valid: its {field} is {problem}."),
                )
            })
    }
}

/// A form body. Wraps axum's `Form` so a body that cannot be read shows an
/// error page with axum's status (400, 413, 415 or 422), not plain text.
pub struct Form<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Form<T> {
    type Rejection = PortalError;

    async fn from_request(req: Request, state: &S) -> Result<Self, PortalError> {
        axum::Form::<T>::from_request(req, state)
            .await
            .map(|axum::Form(v)| Form(v))
            .map_err(|e| {
                let message = match e.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => format!(
                        "This form is larger than {} bytes and was not sent.",
                        crate::MAX_BODY
                    ),
                    _ => "This form could not be read. Go back, reload the page and try again."
                        .to_owned(),
                };
                PortalError::new(e.status(), message)
            })
    }
}

/// A refusal shown as an HTML page.
#[derive(Debug)]
pub struct PortalError {
    pub status: StatusCode,
    pub message: String,
    pub signed_out: bool,
}

impl PortalError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        PortalError {
            status,
            message: message.into(),
            signed_out: false,
        }
    }

    pub fn internal() -> Self {
        PortalError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Something went wrong on our side.",
        )
    }

    pub fn not_found() -> Self {
        PortalError::new(StatusCode::NOT_FOUND, "There is no such page or key.")
    }
}

impl From<ApiError> for PortalError {
    fn from(e: ApiError) -> Self {
        let message = if e.status == StatusCode::NOT_FOUND {
            "There is no such page or key.".to_owned()
        } else {
            e.message
        };
        PortalError::new(e.status, message)
    }
}

impl From<keygate_control::Error> for PortalError {
    fn from(e: keygate_control::Error) -> Self {
        ApiError::from(e).into()
    }
}

impl From<keygate_control::DbError> for PortalError {
    fn from(e: keygate_control::DbError) -> Self {
        ApiError::from(e).into()
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    title: &'a str,
    message: &'a str,
    signed_out: bool,
    tenant: &'a str,
    csrf: &'a str,
    nav: &'a str,
}

impl IntoResponse for PortalError {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("Error");
        let page = ErrorPage {
            title,
            message: &self.message,
            signed_out: self.signed_out,
            tenant: "",
            csrf: "",
            nav: "",
        };
        match page.render() {
            Ok(html) => (self.status, Html(html)).into_response(),
            Err(_) => (self.status, self.message).into_response(),
        }
    }
}

/// Renders a template, or a 500 page.
pub(crate) fn render<T: Template>(status: StatusCode, t: &T) -> Response {
    match t.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(_) => PortalError::internal().into_response(),
    }
}

#[cfg(test)]
mod tests;

/// Body of `POST /api/v1/tenants/{tenant}/portal-sessions`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LinkRequest {
    /// Minutes the link may wait to be opened (default 10, at most 1440).
    #[serde(default)]
    expires_in_minutes: Option<u64>,
}

/// Operator only: a one-time portal link for one tenant.
pub async fn create_link(
    axum::extract::State(st): axum::extract::State<Arc<AppState>>,
    who: Auth,
    crate::extract::Path(tenant): crate::extract::Path<String>,
    headers: HeaderMap,
    crate::extract::JsonOrEmpty(body): crate::extract::JsonOrEmpty<LinkRequest>,
) -> Result<Response, ApiError> {
    who.operator()?;
    keygate_core::credential::check_name("tenant", &tenant)
        .map_err(|e| ApiError::invalid("tenant", e.to_string()))?;
    let minutes = body.expires_in_minutes.unwrap_or(LINK_TTL_SECS / 60);
    if !(1..=1440).contains(&minutes) {
        return Err(ApiError::invalid(
            "expires_in_minutes",
            "must be between 1 and 1440",
        ));
    }
    let st2 = Arc::clone(&st);
    let (token, expires) = tokio::task::spawn_blocking(move || {
        let mut db = st2.db.lock().map_err(|_| ApiError::internal())?;
        let t = now();
        mgmt::atomically(&mut db, |db| {
            let (token, expires) = mint_link(db, &tenant, Some(minutes * 60), t)?;
            audit(
                db,
                &who.principal.token_id,
                who.ip,
                &tenant,
                "portal.link_create",
                &tenant,
                json!({"expires_in_minutes": minutes}),
            )?;
            Ok::<_, ApiError>((token, expires))
        })
    })
    .await
    .map_err(|_| ApiError::internal())??;
    let expires_at = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(expires),
    )
    .to_string();
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"url": link_url(&headers, &token), "expires_at": expires_at})),
    )
        .into_response())
}
