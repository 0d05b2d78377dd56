//! The one refusal type of the API. Its body has the filter's shape,
//! `{"error": code, "message": text}` (plus `field` for invalid input), so
//! clients parse one shape whether Envoy or the API refused them.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use keygate_control::{DbError, Error};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        let field = field.into();
        let message = message.into();
        ApiError {
            message: format!("{field}: {message}"),
            field: Some(field),
            ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", "")
        }
    }

    pub fn unauthorized(message: &str) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "invalid_token", message)
    }

    pub fn forbidden(message: &str) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// Also what another tenant's object answers: it never reveals it exists.
    pub fn not_found(what: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such {what}"),
        )
    }

    pub fn internal() -> Self {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the server could not process this request",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.code, "message": self.message});
        if let Some(f) = self.field {
            body["field"] = json!(f);
        }
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self
            .retry_after
            .and_then(|s| HeaderValue::from_str(&s.to_string()).ok())
        {
            r.headers_mut().insert(header::RETRY_AFTER, s);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// Field names of the service layer (CLI options) as API fields.
fn api_field(f: &str) -> String {
    match f {
        "--scope" => "scopes",
        "--allow-ip" | "CIDR" => "allowed_ips",
        "--expires" => "expires_at",
        "--env" => "environment",
        "--tenant" => "tenant",
        "--id" => "key_id",
        other => other.trim_start_matches("--"),
    }
    .to_owned()
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::NoSuchKey(_) => ApiError::not_found("key"),
            Error::NoSuchPlan(_) => ApiError::not_found("plan"),
            Error::KeyExists(_) => ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string()),
            Error::TenantLimit {
                tenant,
                kind,
                limit,
            } => ApiError::new(
                StatusCode::CONFLICT,
                "tenant_limit",
                format!(
                    "tenant '{tenant}' already has {limit} {kind} key(s), the most allowed; \
                     delete one first"
                ),
            ),
            Error::BadInput { field, message } => ApiError::invalid(api_field(&field), message),
            Error::Other(m) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", m)
            }
            // Our failure, not the caller's: its text (paths, library
            // errors) goes to the server log only.
            Error::Internal(m) => {
                eprintln!("{}", json!({"level": "error", "message": m}));
                ApiError::internal()
            }
            other => {
                eprintln!(
                    "{}",
                    json!({"level": "error", "message": other.to_string()})
                );
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the key store cannot be used right now",
                )
            }
        }
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::BadInput { field, message } => ApiError::invalid(field, message),
            other => {
                eprintln!(
                    "{}",
                    json!({"level": "error", "message": other.to_string()})
                );
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    "the database cannot be used right now",
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_internal_store_failure_is_a_500_with_a_generic_message() {
        let text = "the store connection lock is poisoned at /var/lib/keygate/keygate.db";
        let e = ApiError::from(Error::Internal(text.into()));
        assert_eq!(
            (e.status, e.code),
            (StatusCode::INTERNAL_SERVER_ERROR, "internal_error")
        );
        assert!(!e.message.contains("poisoned") && !e.message.contains("/var/lib"));
        assert_eq!(e.field, None);
        // A refusal meant for the user still says what is wrong.
        let e = ApiError::from(Error::Other("key 'k' has no secret to rotate".into()));
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(e.message.contains("no secret to rotate"));
    }
}
