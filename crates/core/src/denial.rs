//! Every refusal keygate makes: one type, one place that renders the body.

use crate::rate_limit::RateStatus;
use serde::Serialize;

/// Why a request was refused. Stable strings: they appear in access logs and
/// metric names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    MissingCredential,
    MalformedCredential,
    UnknownKey,
    WrongSecret,
    Expired,
    Inactive,
    IpNotAllowed,
    InsufficientScope,
    RateLimited,
    BadPath,
    /// A body the filter itself consumes (login) is malformed.
    BadRequest,
    /// A token issued for a session that was revoked since.
    RevokedToken,
    /// The filter has no usable configuration: fail closed.
    Unavailable,
    /// The host (Envoy) answered a call with an error: fail closed.
    Internal,
}

impl Reason {
    pub const ALL: [Reason; 14] = [
        Reason::MissingCredential,
        Reason::MalformedCredential,
        Reason::UnknownKey,
        Reason::WrongSecret,
        Reason::Expired,
        Reason::Inactive,
        Reason::IpNotAllowed,
        Reason::InsufficientScope,
        Reason::RateLimited,
        Reason::BadPath,
        Reason::BadRequest,
        Reason::RevokedToken,
        Reason::Unavailable,
        Reason::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MissingCredential => "missing_credential",
            Reason::MalformedCredential => "malformed_credential",
            Reason::UnknownKey => "unknown_key",
            Reason::WrongSecret => "wrong_secret",
            Reason::Expired => "expired",
            Reason::Inactive => "inactive",
            Reason::IpNotAllowed => "ip_not_allowed",
            Reason::InsufficientScope => "insufficient_scope",
            Reason::RateLimited => "rate_limited",
            Reason::BadPath => "bad_path",
            Reason::BadRequest => "bad_request",
            Reason::RevokedToken => "revoked_token",
            Reason::Unavailable => "unavailable",
            Reason::Internal => "internal_error",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            Reason::MissingCredential
            | Reason::MalformedCredential
            | Reason::UnknownKey
            | Reason::WrongSecret
            | Reason::Expired
            | Reason::RevokedToken => 401,
            Reason::Inactive | Reason::IpNotAllowed | Reason::InsufficientScope => 403,
            Reason::RateLimited => 429,
            Reason::BadPath | Reason::BadRequest => 400,
            Reason::Unavailable => 503,
            Reason::Internal => 500,
        }
    }

    /// The `error` field of the JSON body.
    pub fn error_code(self) -> &'static str {
        match self.status() {
            401 => "authentication_failed",
            429 => "rate_limit_exceeded",
            400 => "invalid_request",
            503 => "unavailable",
            500 => "internal_error",
            _ if self == Reason::InsufficientScope => "insufficient_scope",
            _ => "forbidden",
        }
    }
}

/// A refusal: status, JSON body, and the extra headers that go with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub reason: Reason,
    pub message: String,
    /// Set on 429, and on refusals after the key's budget was checked.
    pub rate: Option<RateStatus>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    message: &'a str,
}

impl Denial {
    pub fn new(reason: Reason, message: impl Into<String>) -> Denial {
        Denial {
            reason,
            message: message.into(),
            rate: None,
        }
    }

    pub fn status(&self) -> u16 {
        self.reason.status()
    }

    pub fn body(&self) -> Vec<u8> {
        let body = Body {
            error: self.reason.error_code(),
            message: &self.message,
        };
        // Serializing two strings cannot fail; an empty body is the safe fallback.
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// Headers of the local reply, besides any rate-limit headers.
    pub fn headers(&self, realm: &str) -> Vec<(&'static str, String)> {
        let mut h = vec![("content-type", "application/json".to_owned())];
        if self.status() == 401 {
            h.push((
                "www-authenticate",
                format!("Bearer realm=\"{realm}\", Basic realm=\"{realm}\""),
            ));
        }
        if let Some(rate) = self.rate.filter(|r| !r.allowed) {
            h.push(("retry-after", rate.retry_after_secs().to_string()));
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limit::{check, RateLimit};

    #[test]
    fn each_reason_maps_to_the_documented_status_and_code() {
        let expect = [
            (Reason::MissingCredential, 401, "authentication_failed"),
            (Reason::UnknownKey, 401, "authentication_failed"),
            (Reason::Expired, 401, "authentication_failed"),
            (Reason::Inactive, 403, "forbidden"),
            (Reason::IpNotAllowed, 403, "forbidden"),
            (Reason::InsufficientScope, 403, "insufficient_scope"),
            (Reason::RateLimited, 429, "rate_limit_exceeded"),
            (Reason::BadPath, 400, "invalid_request"),
            (Reason::Unavailable, 503, "unavailable"),
            (Reason::Internal, 500, "internal_error"),
        ];
        for (r, status, code) in expect {
            assert_eq!((r.status(), r.error_code()), (status, code), "{r:?}");
        }
    }

    #[test]
    fn body_is_exact_json() {
        let d = Denial::new(
            Reason::InsufficientScope,
            "This endpoint requires 'write' scope",
        );
        assert_eq!(
            String::from_utf8(d.body()).unwrap(),
            r#"{"error":"insufficient_scope","message":"This endpoint requires 'write' scope"}"#
        );
    }

    #[test]
    fn host_failure_is_a_500_with_an_internal_error_body() {
        let d = Denial::new(
            Reason::Internal,
            "The gateway could not process this request",
        );
        assert_eq!(d.status(), 500);
        assert_eq!(
            String::from_utf8(d.body()).unwrap(),
            r#"{"error":"internal_error","message":"The gateway could not process this request"}"#
        );
        assert!(!d.headers("r").iter().any(|(n, _)| *n == "www-authenticate"));
    }

    #[test]
    fn messages_are_json_escaped() {
        let d = Denial::new(Reason::BadPath, "quote \" and \\ and \n");
        let v: serde_json::Value = serde_json::from_slice(&d.body()).unwrap();
        assert_eq!(v["message"], "quote \" and \\ and \n");
    }

    #[test]
    fn unauthenticated_gets_www_authenticate_and_429_gets_retry_after() {
        let d = Denial::new(Reason::UnknownKey, "Invalid API key");
        assert!(d
            .headers("keygate")
            .iter()
            .any(|(n, _)| *n == "www-authenticate"));
        let (rate, _) = check(
            RateLimit {
                requests: 1,
                window_secs: 60,
            },
            Some(u64::MAX / 2),
            u64::MAX / 2 - 45_000_000_000,
        );
        let d = Denial {
            rate: Some(rate),
            ..Denial::new(Reason::RateLimited, "x")
        };
        let h = d.headers("keygate");
        assert!(h.contains(&("retry-after", "45".into())), "{h:?}");
        assert!(!h.iter().any(|(n, _)| *n == "www-authenticate"));
    }
}
