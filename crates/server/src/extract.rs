//! Extractors whose refusals use the API's error shape: a JSON body
//! (size-limited, unknown fields refused by the types, the failing field
//! named) and the bearer token of the caller.

use crate::error::ApiError;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, RawPathParams, Request};
use axum::http::{header, request::Parts, StatusCode};
use keygate_control::mgmt::{self, Principal, Role};
use serde::de::DeserializeOwned;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

/// A JSON body. Wraps axum's body reading so every rejection (too large,
/// not JSON, wrong type, unknown field) answers `{"error", "message"}`.
pub struct Json<T>(pub T);

/// Like [`Json`], but an empty body stands for `T::default()` (`POST`s
/// whose every field is optional need no `-d '{}'`).
pub struct JsonOrEmpty<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for JsonOrEmpty<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let empty = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes() == b"0")
            && req.headers().get(header::CONTENT_TYPE).is_none();
        if empty {
            let bytes = Bytes::from_request(req, state).await.map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "cannot read the body",
                )
            })?;
            if bytes.is_empty() {
                return Ok(JsonOrEmpty(T::default()));
            }
            return parse(&bytes).map(JsonOrEmpty);
        }
        Json::from_request(req, state)
            .await
            .map(|Json(v)| JsonOrEmpty(v))
    }
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
            });
        if !json_type {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("the body is larger than {} bytes", crate::MAX_BODY),
                )
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "cannot read the body",
                )
            }
        })?;
        parse(&bytes).map(Json)
    }
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize(de) {
        Ok(v) => Ok(v),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "malformed_json",
                    format!("the body is not valid JSON: {inner}"),
                ))
            } else {
                let field = if path == "." { "body".to_owned() } else { path };
                Err(ApiError::invalid(field, inner.to_string()))
            }
        }
    }
}

/// Path parameters. Wraps axum's `Path` so a parameter that cannot be read
/// (percent-encoding that is not UTF-8) answers 400 in the API's error
/// shape naming the parameter, not axum's plain text. Handlers take
/// [`Auth`] first, so a request without a token gets 401 before this runs.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Path(v))
            .map_err(|e| {
                let (field, message) = path_problem(&e);
                ApiError {
                    field: Some(field.clone()),
                    ..ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "bad_path",
                        format!("{field}: {message}"),
                    )
                }
            })
    }
}

/// The parameter a path rejection is about and what is wrong with it, in
/// words of our own (axum's text names its internals).
pub(crate) fn path_problem(e: &PathRejection) -> (String, &'static str) {
    use axum::extract::path::ErrorKind;
    let PathRejection::FailedToDeserializePathParams(e) = e else {
        return ("path".into(), "cannot be read");
    };
    match e.kind() {
        ErrorKind::InvalidUtf8InPathParam { key } => {
            (key.clone(), "not valid UTF-8 once percent-decoded")
        }
        ErrorKind::ParseErrorAtKey { key, .. } | ErrorKind::DeserializeError { key, .. } => {
            (key.clone(), "cannot be read")
        }
        _ => ("path".into(), "cannot be read"),
    }
}

/// The caller's address (the TCP peer: the API is not behind a proxy).
pub fn client_ip(parts: &Parts) -> IpAddr {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip())
}

/// Filled by the auth extractor, read by the request log: who made the request.
#[derive(Clone, Default)]
pub struct TokenSlot(pub Arc<Mutex<Option<String>>>);

/// An authenticated caller.
pub struct Auth {
    pub principal: Principal,
    pub ip: IpAddr,
}

impl Auth {
    pub fn operator(&self) -> Result<(), ApiError> {
        match self.principal.role {
            Role::Operator => Ok(()),
            Role::Tenant => Err(ApiError::forbidden("this needs an operator token")),
        }
    }

    /// Another tenant's path answers 404, as if it did not exist.
    pub fn tenant(&self, tenant: &str) -> Result<(), ApiError> {
        if self.principal.may_access(tenant) {
            Ok(())
        } else {
            Err(ApiError::not_found("tenant"))
        }
    }
}

impl FromRequestParts<Arc<AppState>> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let ip = client_ip(parts);
        if let Some(wait) = state.limiter.blocked(ip) {
            return Err(ApiError {
                retry_after: Some(wait),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_failures",
                    "too many failed authentications from this address; try again later",
                )
            });
        }
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_owned());
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err(ApiError::unauthorized(
                "send Authorization: Bearer <token> (make one with `keygate token create`)",
            ));
        };
        let st = Arc::clone(state);
        let found = tokio::task::spawn_blocking(move || {
            let mut db = st.db.lock().map_err(|_| ApiError::internal())?;
            mgmt::authenticate(&mut db, &token, crate::now()).map_err(ApiError::from)
        })
        .await
        .map_err(|_| ApiError::internal())??;
        let Some(principal) = found else {
            state.limiter.failed(ip);
            state.metrics.auth_failure();
            return Err(ApiError::unauthorized(
                "the token is unknown, revoked or expired",
            ));
        };
        if let Some(slot) = parts.extensions.get::<TokenSlot>() {
            if let Ok(mut s) = slot.0.lock() {
                *s = Some(principal.token_id.clone());
            }
        }
        // Before the body is read: another tenant's path answers 404 whatever
        // the body holds, so a body error cannot tell that the path exists.
        if let Ok(params) = RawPathParams::from_request_parts(parts, state).await {
            let tenant = params.iter().find(|(k, _)| *k == "tenant").map(|(_, v)| v);
            if tenant.is_some_and(|t| !principal.may_access(t)) {
                return Err(ApiError::not_found("tenant"));
            }
        }
        Ok(Auth { principal, ip })
    }
}
