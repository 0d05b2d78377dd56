//! Credential extraction from request headers: `X-API-Key`, `Authorization:
//! Bearer` and `Authorization: Basic base64(key:secret)`.
//!
//! Strict by design: anything ambiguous (two different credentials, a
//! repeated Authorization header, bad base64, empty parts, non-printable
//! bytes, oversized values) is an error, which the caller answers with 401.

use base64::Engine as _;

/// Longest header value we inspect; longer is refused before any work.
pub const MAX_CREDENTIAL_LEN: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    ApiKeyHeader,
    Bearer,
    Basic,
}

/// A credential as the client presented it. Never logged.
#[derive(PartialEq, Eq)]
pub struct Presented {
    pub key: String,
    pub secret: Option<String>,
    pub scheme: Scheme,
}

impl std::fmt::Debug for Presented {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presented")
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtractError {
    Missing,
    Malformed,
    UnsupportedScheme,
    Conflicting,
    TooLong,
}

impl ExtractError {
    pub fn message(self) -> &'static str {
        match self {
            ExtractError::Missing => "Missing API key",
            ExtractError::Malformed => "Malformed credentials",
            ExtractError::UnsupportedScheme => "Unsupported authorization scheme",
            ExtractError::Conflicting => "Conflicting credentials in request",
            ExtractError::TooLong => "Credential too long",
        }
    }
}

/// Printable ASCII without spaces: what keys and secrets may contain.
fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// Strips optional whitespace (RFC 9110 OWS: space and tab) around a
/// credential, wherever it came from (header or login body). Keys are
/// hashed as trimmed: `keygate` (the CLI) must trim a key the same way
/// before hashing one it is given.
pub fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let end = v.iter().rposition(|b| !matches!(b, b' ' | b'\t'));
    match (start, end) {
        (Some(s), Some(e)) => v.get(s..=e).unwrap_or_default(),
        _ => &[],
    }
}

fn trim(v: &[u8]) -> &[u8] {
    trim_ows(v)
}

fn token(v: &[u8]) -> Result<String, ExtractError> {
    if !is_token(v) {
        return Err(ExtractError::Malformed);
    }
    // is_token admits ASCII only, so this cannot fail.
    String::from_utf8(v.to_vec()).map_err(|_| ExtractError::Malformed)
}

fn parse_authorization(v: &[u8]) -> Result<Presented, ExtractError> {
    let v = trim(v);
    if v.is_empty() {
        return Err(ExtractError::Malformed);
    }
    let mut parts = v.splitn(2, |&b| b == b' ');
    let scheme = parts.next().unwrap_or_default();
    let rest = trim(parts.next().unwrap_or_default());
    if scheme.eq_ignore_ascii_case(b"bearer") {
        return Ok(Presented {
            key: token(rest)?,
            secret: None,
            scheme: Scheme::Bearer,
        });
    }
    if scheme.eq_ignore_ascii_case(b"basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .map_err(|_| ExtractError::Malformed)?;
        let mut parts = decoded.splitn(2, |&b| b == b':');
        let key = token(parts.next().unwrap_or_default())?;
        let secret = token(parts.next().ok_or(ExtractError::Malformed)?)?;
        return Ok(Presented {
            key,
            secret: Some(secret),
            scheme: Scheme::Basic,
        });
    }
    Err(ExtractError::UnsupportedScheme)
}

/// Splits a header value that Envoy joined from repeated headers; repeats
/// must all carry the same value.
fn single(value: &[u8]) -> Result<&[u8], ExtractError> {
    let mut parts = value.split(|&b| b == b',').map(trim);
    let first = parts.next().unwrap_or_default();
    if parts.any(|p| p != first) {
        return Err(ExtractError::Conflicting);
    }
    Ok(first)
}

/// Finds the one credential in the `authorization` and API-key header
/// values (repeated headers joined with ','). Neither a base64 Basic value nor
/// a key or token contains ',', so a ',' in `authorization` means it was
/// sent twice, which is refused.
pub fn extract(
    authorization: Option<&[u8]>,
    api_key: Option<&[u8]>,
) -> Result<Presented, ExtractError> {
    if authorization.is_some_and(|v| v.len() > MAX_CREDENTIAL_LEN)
        || api_key.is_some_and(|v| v.len() > MAX_CREDENTIAL_LEN)
    {
        return Err(ExtractError::TooLong);
    }
    if authorization.is_some_and(|v| v.contains(&b',')) {
        return Err(ExtractError::Conflicting);
    }
    let from_header = api_key
        .map(|v| {
            Ok(Presented {
                key: token(single(v)?)?,
                secret: None,
                scheme: Scheme::ApiKeyHeader,
            })
        })
        .transpose()?;
    let from_auth = authorization.map(parse_authorization).transpose()?;
    match (from_header, from_auth) {
        (None, None) => Err(ExtractError::Missing),
        (Some(p), None) | (None, Some(p)) => Ok(p),
        (Some(h), Some(a)) if a.secret.is_none() && a.key == h.key => Ok(a),
        _ => Err(ExtractError::Conflicting),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;

    /// Joins repeated headers with ',' as Envoy does for inline headers.
    fn joined(h: &[(&str, &[u8])], name: &str) -> Option<Vec<u8>> {
        let values: Vec<&[u8]> = h
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .collect();
        (!values.is_empty()).then(|| values.join(&b","[..]))
    }

    fn ex_bytes(h: &[(&str, &[u8])]) -> Result<Presented, ExtractError> {
        extract(
            joined(h, "authorization").as_deref(),
            joined(h, "x-api-key").as_deref(),
        )
    }

    fn ex(h: &[(&str, &str)]) -> Result<Presented, ExtractError> {
        let h: Vec<(&str, &[u8])> = h.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
        ex_bytes(&h)
    }

    fn basic(s: &str) -> String {
        format!("Basic {}", STANDARD.encode(s))
    }

    #[test]
    fn api_key_header_is_read() {
        let p = ex(&[("x-api-key", " k1 ")]).unwrap();
        assert_eq!((p.key.as_str(), p.scheme), ("k1", Scheme::ApiKeyHeader));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for v in ["Bearer k1", "bearer k1", "BEARER   k1"] {
            let p = ex(&[("authorization", v)]).unwrap();
            assert_eq!((p.key.as_str(), p.scheme), ("k1", Scheme::Bearer), "{v}");
        }
    }

    #[test]
    fn basic_splits_key_and_secret_at_first_colon() {
        let p = ex(&[("authorization", &basic("key:se:cret"))]).unwrap();
        assert_eq!(
            (p.key.as_str(), p.secret.as_deref()),
            ("key", Some("se:cret"))
        );
        let p = ex(&[("authorization", &basic("key:s").replace("Basic", "bAsIc"))]).unwrap();
        assert_eq!(p.scheme, Scheme::Basic);
    }

    #[test]
    fn malformed_basic_is_refused() {
        for v in [
            "Basic !!!".to_string(),
            basic("nocolon"),
            basic(":secret"),
            basic("key:"),
            basic(":"),
            "Basic ".to_string(),
            format!("Basic {}", STANDARD.encode([b'k', b':', 0xff])),
            format!("Basic {}", STANDARD.encode("k:sx").trim_end_matches('=')),
            "Basic a2V5OnNlY3JldA==x".to_string(),
        ] {
            assert_eq!(
                ex(&[("authorization", &v)]).unwrap_err(),
                ExtractError::Malformed,
                "{v}"
            );
        }
    }

    #[test]
    fn missing_unsupported_and_empty() {
        assert_eq!(ex(&[("other", "x")]).unwrap_err(), ExtractError::Missing);
        assert_eq!(
            ex(&[("authorization", "Digest abc")]).unwrap_err(),
            ExtractError::UnsupportedScheme
        );
        assert_eq!(
            ex(&[("authorization", "k1")]).unwrap_err(),
            ExtractError::UnsupportedScheme
        );
        assert_eq!(
            ex(&[("authorization", "Bearer ")]).unwrap_err(),
            ExtractError::Malformed
        );
        assert_eq!(
            ex(&[("x-api-key", "")]).unwrap_err(),
            ExtractError::Malformed
        );
        assert_eq!(
            ex(&[("x-api-key", "a b")]).unwrap_err(),
            ExtractError::Malformed
        );
    }

    #[test]
    fn non_printable_bytes_are_refused() {
        assert_eq!(
            ex_bytes(&[("x-api-key", b"k\xffk")]).unwrap_err(),
            ExtractError::Malformed
        );
        assert_eq!(
            ex_bytes(&[("x-api-key", b"k\x00k")]).unwrap_err(),
            ExtractError::Malformed
        );
    }

    #[test]
    fn two_different_credentials_conflict() {
        assert_eq!(
            ex(&[("x-api-key", "a"), ("x-api-key", "b")]).unwrap_err(),
            ExtractError::Conflicting
        );
        assert_eq!(
            ex(&[("authorization", "Bearer a"), ("authorization", "Bearer a")]).unwrap_err(),
            ExtractError::Conflicting
        );
        assert_eq!(
            ex(&[("x-api-key", "a"), ("authorization", "Bearer b")]).unwrap_err(),
            ExtractError::Conflicting
        );
        assert_eq!(
            ex(&[("x-api-key", "a"), ("authorization", &basic("a:s"))]).unwrap_err(),
            ExtractError::Conflicting
        );
        // The same key twice is one credential.
        assert!(ex(&[("x-api-key", "a"), ("x-api-key", "a")]).is_ok());
        assert_eq!(
            ex(&[("x-api-key", "a"), ("authorization", "Bearer a")])
                .unwrap()
                .scheme,
            Scheme::Bearer
        );
    }

    #[test]
    fn oversized_values_are_refused_before_parsing() {
        let big = "a".repeat(MAX_CREDENTIAL_LEN + 1);
        assert_eq!(
            ex(&[("x-api-key", &big)]).unwrap_err(),
            ExtractError::TooLong
        );
        assert_eq!(
            ex(&[("authorization", &format!("Bearer {big}"))]).unwrap_err(),
            ExtractError::TooLong
        );
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let p = ex(&[("authorization", &basic("topsecretkey:topsecret"))]).unwrap();
        assert!(!format!("{p:?}").contains("topsecret"));
    }
}
