//! The decision: authenticate → authorize → rate-limit → headers, as a pure
//! function of the request facts, the policy, the credential source, the
//! clock and the counter state. The filter only gathers facts and applies it.

use crate::config::{KeyFormat, Policy, RateLimitHeaders};
use crate::credential::Credential;
use crate::denial::{Denial, Reason};
use crate::extract::{extract, ExtractError, Presented, Scheme};
use crate::hash::{ct_eq, is_hex64, sha256, Digest};
use crate::ip_rules::{client_ip, is_allowed};
use crate::path::normalize;
use crate::rate_limit::{acquire, CounterCell, RateStatus, MAX_CAS_ATTEMPTS};
use crate::scope::{grants, Access};
use crate::token::{self, Claims, IssuedToken, SessionTokens, TokenError, Tokens};
use serde::Serialize;
use std::rc::Rc;

/// What the decision needs from its surroundings (Envoy, or a test double).
pub trait Host {
    /// A credential from the dynamic source (shared data pushed by the sidecar).
    fn lookup(&mut self, key_hash: &Digest) -> Option<Rc<Credential>>;
    /// The peer address as Envoy reports it (`ip:port`); asked only when needed.
    fn peer_address(&mut self) -> Option<String>;
    /// Where rate-limit state lives, shared by every worker.
    fn counters(&mut self) -> &mut dyn CounterCell;
}

#[derive(Debug)]
pub enum Outcome {
    /// A public route: no credential needed.
    Public,
    Allowed {
        credential: Rc<Credential>,
        rate: Option<RateStatus>,
    },
    Denied {
        denial: Denial,
        credential: Option<Rc<Credential>>,
    },
}

#[derive(Debug)]
pub struct Decision {
    pub outcome: Outcome,
    /// The scope the route required, for the access log.
    pub required_scope: Option<String>,
}

/// Header edits on the request before it goes upstream.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UpstreamHeaders<'a> {
    pub remove: Vec<&'a str>,
    pub set: Vec<(&'a str, &'a str)>,
}

/// Request headers as the decision reads them: by lowercase name, a repeated
/// header's values joined with ',' (as Envoy does for inline headers such as
/// `authorization`, and for `x-api-key` when registered inline, see
/// envoy/envoy.yaml). The filter reads each one from Envoy on demand: fetching
/// all headers at once costs more than the few the decision needs.
pub trait Headers {
    fn get(&self, name: &str) -> Option<Vec<u8>>;
}

impl Headers for [(String, Vec<u8>)] {
    fn get(&self, name: &str) -> Option<Vec<u8>> {
        let mut values = self
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice());
        let first = values.next()?;
        Some(values.fold(first.to_vec(), |mut acc, v| {
            acc.push(b',');
            acc.extend_from_slice(v);
            acc
        }))
    }
}

impl Headers for Vec<(String, Vec<u8>)> {
    fn get(&self, name: &str) -> Option<Vec<u8>> {
        Headers::get(self.as_slice(), name)
    }
}

impl Headers for &[(String, Vec<u8>)] {
    fn get(&self, name: &str) -> Option<Vec<u8>> {
        Headers::get(*self, name)
    }
}

/// Shared-data key of a credential's rate-limit state. Short on purpose:
/// up to 15 bytes fit in the string itself, no allocation in Envoy.
pub fn counter_key(key_id: &str) -> String {
    format!("r:{key_id}")
}

fn deny(
    reason: Reason,
    message: impl Into<String>,
    credential: Option<&Rc<Credential>>,
) -> Outcome {
    Outcome::Denied {
        denial: Denial::new(reason, message),
        credential: credential.cloned(),
    }
}

/// Decides one request. `headers` gives request headers by lowercase name
/// (pseudo-headers included); `now_ns` is Unix time in nanoseconds.
pub fn decide(
    policy: &Policy,
    headers: &dyn Headers,
    host: &mut dyn Host,
    now_ns: u64,
) -> Decision {
    let method = headers.get(":method").unwrap_or_default();
    let method = std::str::from_utf8(&method).unwrap_or("");
    let path = match normalize(&headers.get(":path").unwrap_or_default()) {
        Ok(p) => p,
        Err(_) => {
            return Decision {
                outcome: deny(Reason::BadPath, "Malformed request path", None),
                required_scope: None,
            }
        }
    };
    let access = policy.routes.access(method, &path);
    let required_scope = match access {
        Access::Scope(s) => Some(s.name.clone()),
        _ => None,
    };
    let outcome = match access {
        Access::Public => Outcome::Public,
        _ => authorize(policy, headers, access, host, now_ns),
    };
    Decision {
        outcome,
        required_scope,
    }
}

fn authorize(
    policy: &Policy,
    headers: &dyn Headers,
    access: &Access,
    host: &mut dyn Host,
    now_ns: u64,
) -> Outcome {
    let authorization = headers.get("authorization");
    let api_key = headers.get(&policy.api_key_header);
    let presented = match extract(authorization.as_deref(), api_key.as_deref()) {
        Ok(p) => p,
        Err(ExtractError::Missing) => {
            return deny(
                Reason::MissingCredential,
                ExtractError::Missing.message(),
                None,
            )
        }
        Err(e) => return deny(Reason::MalformedCredential, e.message(), None),
    };
    match authenticate(policy, &presented, host, now_ns, true) {
        Ok(cred) => check_credential(policy, headers, access, cred, host, now_ns),
        Err(outcome) => outcome,
    }
}

/// Who is calling: the live credential behind an API key (and secret) or,
/// when `allow_tokens`, behind an issued bearer token.
fn authenticate(
    policy: &Policy,
    presented: &Presented,
    host: &mut dyn Host,
    now_ns: u64,
    allow_tokens: bool,
) -> Result<Rc<Credential>, Outcome> {
    if let Some(tokens) = policy.tokens.as_ref().filter(|_| allow_tokens) {
        if presented.scheme == Scheme::Bearer && presented.key.starts_with(token::PREFIX) {
            return authenticate_token(policy, tokens, &presented.key, host, now_ns);
        }
    }
    let key_hash = match policy.key_format {
        KeyFormat::Any => sha256(presented.key.as_bytes()),
        KeyFormat::Hex64 if is_hex64(presented.key.as_bytes()) => {
            sha256(presented.key.to_ascii_lowercase().as_bytes())
        }
        KeyFormat::Hex64 => {
            return Err(deny(
                Reason::MalformedCredential,
                "Invalid API key format",
                None,
            ))
        }
    };
    let Some(cred) = find(policy, host, &key_hash) else {
        return Err(deny(Reason::UnknownKey, "Invalid API key", None));
    };
    let now_secs = now_ns / 1_000_000_000;
    match (&cred.secret_hash, &presented.secret) {
        (None, None) => Ok(cred),
        (Some(_), Some(secret)) if cred.secret_matches(&sha256(secret.as_bytes()), now_secs) => {
            Ok(cred)
        }
        (Some(_), None) => Err(deny(
            Reason::WrongSecret,
            "This API key requires its secret (Basic key:secret)",
            Some(&cred),
        )),
        _ => Err(deny(
            Reason::WrongSecret,
            "Invalid API key or secret",
            Some(&cred),
        )),
    }
}

fn find(policy: &Policy, host: &mut dyn Host, key_hash: &Digest) -> Option<Rc<Credential>> {
    let found = policy
        .credentials
        .get(key_hash)
        .cloned()
        .or_else(|| host.lookup(key_hash));
    found.filter(|c| ct_eq(&c.key_hash, key_hash))
}

/// A token is only as good as the key behind it: the credential is looked up
/// live, so revoking or deactivating the key stops its tokens at once.
fn authenticate_token(
    policy: &Policy,
    tokens: &Tokens,
    presented: &str,
    host: &mut dyn Host,
    now_ns: u64,
) -> Result<Rc<Credential>, Outcome> {
    let now_ms = now_ns / 1_000_000;
    let claims = match tokens.verify(presented, now_ms) {
        Ok(c) => c,
        Err(TokenError::Expired) => return Err(deny(Reason::Expired, "Token has expired", None)),
        Err(TokenError::Invalid) => return Err(deny(Reason::UnknownKey, "Invalid token", None)),
    };
    let cred = claims
        .key_hash()
        .and_then(|h| find(policy, host, &h))
        .filter(|c| c.key_id == claims.kid)
        .ok_or_else(|| deny(Reason::UnknownKey, "Invalid token", None))?;
    let revocations = token::decode_revocations(
        host.counters()
            .load(&token::revocations_key(&cred.key_id))
            .0
            .as_deref(),
    );
    if revocations
        .get(&claims.sid)
        .is_some_and(|&at| claims.iat_ms <= at)
    {
        return Err(deny(
            Reason::RevokedToken,
            "Token has been revoked",
            Some(&cred),
        ));
    }
    Ok(cred)
}

/// What any credential must pass, however it was presented.
fn check_credential(
    policy: &Policy,
    headers: &dyn Headers,
    access: &Access,
    cred: Rc<Credential>,
    host: &mut dyn Host,
    now_ns: u64,
) -> Outcome {
    if cred.is_expired(now_ns / 1_000_000_000) {
        return deny(Reason::Expired, "API key has expired", Some(&cred));
    }
    if !cred.active {
        return deny(Reason::Inactive, "API key is inactive", Some(&cred));
    }
    if !cred.allowed_ips.is_empty() {
        let peer = host.peer_address();
        let ip = client_ip(
            peer.as_deref(),
            headers.get("x-forwarded-for").as_deref(),
            policy.trusted_xff_hops,
        );
        if !is_allowed(&cred.allowed_ips, ip) {
            return deny(
                Reason::IpNotAllowed,
                "Requests from this IP address are not allowed for this API key",
                Some(&cred),
            );
        }
    }
    if let Access::Scope(need) = access {
        if !grants(&cred, need) {
            return deny(
                Reason::InsufficientScope,
                format!("This endpoint requires '{}' scope", need.name),
                Some(&cred),
            );
        }
    }
    let rate = match cred.rate_limit.or(policy.rate_limit) {
        None => None,
        Some(limit) => {
            let status = acquire(host.counters(), &counter_key(&cred.key_id), limit, now_ns);
            if !status.allowed {
                let message = match status.retry_after_secs() {
                    1 => "Rate limit exceeded. Try again in 1 second.".to_owned(),
                    n => format!("Rate limit exceeded. Try again in {n} seconds."),
                };
                let denial = Denial {
                    rate: Some(status),
                    ..Denial::new(Reason::RateLimited, message)
                };
                return Outcome::Denied {
                    denial,
                    credential: Some(cred),
                };
            }
            Some(status)
        }
    };
    Outcome::Allowed {
        credential: cred,
        rate,
    }
}

/// True for `POST <login_path>` when token exchange is configured: the
/// filter then reads the body and answers with [`login`].
pub fn is_login(policy: &Policy, headers: &dyn Headers) -> bool {
    let Some(tokens) = &policy.tokens else {
        return false;
    };
    headers.get(":method").as_deref() == Some(b"POST")
        && normalize(&headers.get(":path").unwrap_or_default())
            .is_ok_and(|p| p == tokens.login_path)
}

/// The reply to `POST <login_path>`.
#[derive(Debug)]
pub enum Login {
    Issued {
        credential: Rc<Credential>,
        body: Vec<u8>,
        rate: Option<RateStatus>,
    },
    Denied {
        denial: Denial,
        credential: Option<Rc<Credential>>,
    },
}

#[derive(Serialize)]
struct LoginBody<'a> {
    access_token: &'a str,
    expires_in: u64,
    token_type: &'static str,
}

/// Exchanges an API key for a bearer token. The key passes every usual check
/// (inactive 403, IP 403, rate limit 429, which a login spends like any
/// request); a live token for the same key and session is returned again,
/// from any worker, since issued tokens live in shared data.
pub fn login(
    policy: &Policy,
    headers: &dyn Headers,
    body: &[u8],
    host: &mut dyn Host,
    now_ns: u64,
) -> Login {
    let denied = |outcome: Outcome| match outcome {
        Outcome::Denied { denial, credential } => Login::Denied { denial, credential },
        _ => Login::Denied {
            denial: Denial::new(Reason::Unavailable, "Login failed"),
            credential: None,
        },
    };
    let Some(tokens) = &policy.tokens else {
        return denied(deny(
            Reason::Unavailable,
            "Token exchange is not configured",
            None,
        ));
    };
    let request = match token::parse_login(body) {
        Ok(r) => r,
        Err(message) => return denied(deny(Reason::BadRequest, message, None)),
    };
    let presented = Presented {
        key: request.api_key,
        secret: request.api_secret,
        scheme: Scheme::ApiKeyHeader,
    };
    let cred = match authenticate(policy, &presented, host, now_ns, false) {
        Ok(c) => c,
        Err(outcome) => return denied(outcome),
    };
    let (cred, rate) =
        match check_credential(policy, headers, &Access::Authenticated, cred, host, now_ns) {
            Outcome::Allowed { credential, rate } => (credential, rate),
            other => return denied(other),
        };
    let session = request.session_id.unwrap_or_default();
    let Some(issued) = session_token(tokens, &cred, &session, host.counters(), now_ns / 1_000_000)
    else {
        return Login::Denied {
            denial: Denial::new(Reason::Unavailable, "Could not issue a token"),
            credential: Some(cred),
        };
    };
    let body = LoginBody {
        access_token: &issued.token,
        expires_in: issued.exp_ms.saturating_sub(now_ns / 1_000_000) / 1000,
        token_type: "Bearer",
    };
    Login::Issued {
        body: serde_json::to_vec(&body).unwrap_or_default(),
        credential: cred,
        rate,
    }
}

/// The live token for (key, session), or a new one recorded with CAS so
/// every worker hands out the same token.
fn session_token(
    tokens: &Tokens,
    cred: &Credential,
    session: &str,
    cell: &mut dyn CounterCell,
    now_ms: u64,
) -> Option<IssuedToken> {
    let key = token::sessions_key(&cred.key_id);
    let revoked = token::decode_revocations(
        cell.load(&token::revocations_key(&cred.key_id))
            .0
            .as_deref(),
    )
    .get(session)
    .copied();
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (bytes, cas) = cell.load(&key);
        let mut sessions = SessionTokens::decode(bytes.as_deref());
        if let Some(live) = sessions.live(session, now_ms, revoked) {
            return Some(live.clone());
        }
        let claims = Claims {
            kid: cred.key_id.clone(),
            kh: crate::hash::to_hex(&cred.key_hash),
            tenant: cred.tenant.clone(),
            env: cred.environment.clone(),
            scopes: cred.scopes.clone(),
            sid: session.to_owned(),
            iat_ms: now_ms,
            exp_ms: now_ms + tokens.lifetime_secs * 1000,
        };
        let issued = IssuedToken {
            token: tokens.issue(&claims)?,
            iat_ms: claims.iat_ms,
            exp_ms: claims.exp_ms,
        };
        sessions.insert(session, issued.clone(), now_ms, tokens.max_sessions_per_key);
        if cell.store(&key, &sessions.encode(), cas) {
            return Some(issued);
        }
    }
    None
}

impl Decision {
    /// Request header edits: identity headers a client sent are always
    /// dropped; on success the credential is stripped and the identity set.
    pub fn upstream_headers<'a>(
        &'a self,
        policy: &'a Policy,
        headers: &dyn Headers,
    ) -> UpstreamHeaders<'a> {
        let present = |name: &str| headers.get(name).is_some();
        let mut edits = UpstreamHeaders::default();
        match &self.outcome {
            // Removing is one host call; asking first would be one more.
            Outcome::Public => edits.remove = policy.headers.all().to_vec(),
            Outcome::Allowed { credential: c, .. } => {
                edits.remove = ["authorization", policy.api_key_header.as_str()]
                    .into_iter()
                    .filter(|h| present(h))
                    .collect();
                let h = &policy.headers;
                edits.set = vec![
                    (h.tenant.as_str(), c.tenant.as_str()),
                    (h.environment.as_str(), c.environment.as_str()),
                    (h.key_id.as_str(), c.key_id.as_str()),
                    (h.scopes.as_str(), c.scopes_header.as_str()),
                ];
            }
            Outcome::Denied { .. } => {}
        }
        edits
    }

    /// The rate status to report on the response, if the budget was checked.
    pub fn rate(&self) -> Option<&RateStatus> {
        match &self.outcome {
            Outcome::Allowed { rate, .. } => rate.as_ref(),
            Outcome::Denied { denial, .. } => denial.rate.as_ref(),
            Outcome::Public => None,
        }
    }
}

/// Rate-limit response headers, in the enabled styles.
pub fn rate_limit_headers(
    status: &RateStatus,
    styles: RateLimitHeaders,
    now_ns: u64,
) -> Vec<(&'static str, String)> {
    let mut h = Vec::with_capacity(5);
    if styles.x_ratelimit {
        h.push(("x-ratelimit-limit", status.limit.requests.to_string()));
        h.push(("x-ratelimit-remaining", status.remaining.to_string()));
        h.push(("x-ratelimit-reset", status.reset_epoch_secs().to_string()));
    }
    if styles.ietf {
        h.push((
            "ratelimit-policy",
            format!(
                "\"default\";q={};w={}",
                status.limit.requests, status.limit.window_secs
            ),
        ));
        h.push((
            "ratelimit",
            format!(
                "\"default\";r={};t={}",
                status.remaining,
                status.reset_in_secs(now_ns)
            ),
        ));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::{CredentialRecord, Kind, Status};
    use crate::hash::to_hex;
    use std::collections::HashMap;

    const NOW: u64 = 1_700_000_000_000_000_000;

    #[derive(Default)]
    struct FakeHost {
        dynamic: HashMap<Digest, Rc<Credential>>,
        peer: Option<String>,
        counters: HashMap<String, Vec<u8>>,
        peer_asked: bool,
    }

    impl CounterCell for FakeHost {
        fn load(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
            (self.counters.get(key).cloned(), None)
        }
        fn store(&mut self, key: &str, value: &[u8], _: Option<u32>) -> bool {
            self.counters.insert(key.into(), value.to_vec());
            true
        }
    }

    impl Host for FakeHost {
        fn lookup(&mut self, h: &Digest) -> Option<Rc<Credential>> {
            self.dynamic.get(h).cloned()
        }
        fn peer_address(&mut self) -> Option<String> {
            self.peer_asked = true;
            self.peer.clone()
        }
        fn counters(&mut self) -> &mut dyn CounterCell {
            self
        }
    }

    fn rec(key_id: &str, key: &str) -> CredentialRecord {
        CredentialRecord {
            key_id: key_id.into(),
            ..crate::credential::tests::record(key, "acme")
        }
    }

    fn policy(creds: Vec<CredentialRecord>, extra: &str) -> Policy {
        let creds = serde_json::to_string(&creds).unwrap();
        let json = format!(
            r#"{{"credentials":{creds},"routes":[
                {{"path_prefix":"/health","public":true}},
                {{"methods":["GET"],"path_prefix":"/v1","scope":"read"}},
                {{"methods":["POST"],"path_prefix":"/v1","scope":"write"}},
                {{"path_prefix":"/admin","scope":"admin"}}]{extra}}}"#
        );
        Policy::from_json(json.as_bytes()).unwrap()
    }

    fn req(method: &str, path: &str, extra: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        let mut h = vec![
            (":method".to_string(), method.as_bytes().to_vec()),
            (":path".into(), path.as_bytes().to_vec()),
        ];
        h.extend(
            extra
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())),
        );
        h
    }

    fn run(p: &Policy, h: &[(String, Vec<u8>)], host: &mut FakeHost) -> Decision {
        decide(p, &h, host, NOW)
    }

    fn denied(d: &Decision) -> Option<(Reason, &str)> {
        match &d.outcome {
            Outcome::Denied { denial, .. } => Some((denial.reason, denial.message.as_str())),
            _ => None,
        }
    }

    #[test]
    fn valid_key_is_allowed_with_identity_headers() {
        let p = policy(vec![rec("k1", "key-one")], "");
        let h = req(
            "GET",
            "/v1/items",
            &[("x-api-key", "key-one"), ("x-keygate-tenant", "evil")],
        );
        let d = run(&p, &h, &mut FakeHost::default());
        assert!(matches!(d.outcome, Outcome::Allowed { .. }), "{d:?}");
        let edits = d.upstream_headers(&p, &h);
        assert_eq!(edits.remove, vec!["x-api-key"]);
        assert!(edits.set.contains(&("x-keygate-tenant", "acme")));
        assert!(edits.set.contains(&("x-keygate-key-id", "k1")));
    }

    #[test]
    fn public_route_needs_no_key_and_drops_spoofed_identity() {
        let p = policy(vec![], "");
        let h = req("GET", "/health", &[("x-keygate-tenant", "evil")]);
        let d = run(&p, &h, &mut FakeHost::default());
        assert!(matches!(d.outcome, Outcome::Public));
        assert_eq!(d.upstream_headers(&p, &h).remove, p.headers.all().to_vec());
    }

    #[test]
    fn missing_and_unknown_keys_are_401() {
        let p = policy(vec![rec("k1", "key-one")], "");
        let d = run(&p, &req("GET", "/v1", &[]), &mut FakeHost::default());
        assert_eq!(
            denied(&d),
            Some((Reason::MissingCredential, "Missing API key"))
        );
        let d = run(
            &p,
            &req("GET", "/v1", &[("x-api-key", "nope")]),
            &mut FakeHost::default(),
        );
        assert_eq!(denied(&d), Some((Reason::UnknownKey, "Invalid API key")));
    }

    #[test]
    fn dynamic_source_is_consulted_after_config() {
        let p = policy(vec![], "");
        let mut host = FakeHost::default();
        let c = Credential::try_from(&rec("dyn", "dyn-key")).unwrap();
        host.dynamic.insert(c.key_hash, Rc::new(c));
        let d = run(
            &p,
            &req("GET", "/v1", &[("authorization", "Bearer dyn-key")]),
            &mut host,
        );
        assert!(matches!(d.outcome, Outcome::Allowed { .. }));
    }

    #[test]
    fn basic_secret_must_match() {
        let mut r = rec("k1", "key-one");
        r.secret_hash = Some(to_hex(&sha256(b"s3cret")));
        let p = policy(vec![r], "");
        let basic = |s: &str| {
            use base64::Engine;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        };
        let ok = run(
            &p,
            &req("GET", "/v1", &[("authorization", &basic("key-one:s3cret"))]),
            &mut FakeHost::default(),
        );
        assert!(matches!(ok.outcome, Outcome::Allowed { .. }));
        let bad = run(
            &p,
            &req("GET", "/v1", &[("authorization", &basic("key-one:wrong"))]),
            &mut FakeHost::default(),
        );
        assert_eq!(denied(&bad).map(|d| d.0), Some(Reason::WrongSecret));
        let bare = run(
            &p,
            &req("GET", "/v1", &[("x-api-key", "key-one")]),
            &mut FakeHost::default(),
        );
        assert_eq!(denied(&bare).map(|d| d.0), Some(Reason::WrongSecret));
    }

    #[test]
    fn secret_on_a_secretless_key_is_refused() {
        let p = policy(vec![rec("k1", "key-one")], "");
        use base64::Engine;
        let v = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("key-one:x")
        );
        let d = run(
            &p,
            &req("GET", "/v1", &[("authorization", &v)]),
            &mut FakeHost::default(),
        );
        assert_eq!(denied(&d).map(|d| d.0), Some(Reason::WrongSecret));
    }

    #[test]
    fn inactive_key_gets_403_and_expired_gets_401() {
        let mut a = rec("k1", "inactive");
        a.status = Status::Inactive;
        let mut b = rec("k2", "expired");
        b.expires_at = Some(NOW / 1_000_000_000);
        let p = policy(vec![a, b], "");
        let d = run(
            &p,
            &req("GET", "/v1", &[("x-api-key", "inactive")]),
            &mut FakeHost::default(),
        );
        assert_eq!(denied(&d), Some((Reason::Inactive, "API key is inactive")));
        let d = run(
            &p,
            &req("GET", "/v1", &[("x-api-key", "expired")]),
            &mut FakeHost::default(),
        );
        assert_eq!(denied(&d).map(|d| d.0), Some(Reason::Expired));
    }

    #[test]
    fn ip_allowlist_uses_peer_and_is_only_consulted_when_set() {
        let mut a = rec("k1", "restricted");
        a.allowed_ips = vec!["10.0.0.0/8".into()];
        let p = policy(vec![a, rec("k2", "open")], "");
        let mut host = FakeHost {
            peer: Some("127.0.0.1:5555".into()),
            ..Default::default()
        };
        let d = run(
            &p,
            &req("GET", "/v1", &[("x-api-key", "restricted")]),
            &mut host,
        );
        assert_eq!(denied(&d).map(|d| d.0), Some(Reason::IpNotAllowed));
        let mut host = FakeHost {
            peer: Some("10.1.1.1:5555".into()),
            ..Default::default()
        };
        assert!(matches!(
            run(
                &p,
                &req("GET", "/v1", &[("x-api-key", "restricted")]),
                &mut host
            )
            .outcome,
            Outcome::Allowed { .. }
        ));
        let mut host = FakeHost::default();
        run(&p, &req("GET", "/v1", &[("x-api-key", "open")]), &mut host);
        assert!(!host.peer_asked);
    }

    #[test]
    fn spoofed_xff_does_not_pass_the_allowlist_without_trusted_hops() {
        let mut a = rec("k1", "restricted");
        a.allowed_ips = vec!["10.0.0.0/8".into()];
        let p = policy(vec![a.clone()], "");
        let h = req(
            "GET",
            "/v1",
            &[("x-api-key", "restricted"), ("x-forwarded-for", "10.0.0.1")],
        );
        let mut host = FakeHost {
            peer: Some("127.0.0.1:1".into()),
            ..Default::default()
        };
        assert_eq!(
            denied(&run(&p, &h, &mut host)).map(|d| d.0),
            Some(Reason::IpNotAllowed)
        );
        let p = policy(vec![a], r#","trusted_xff_hops":1"#);
        assert!(matches!(
            run(&p, &h, &mut host).outcome,
            Outcome::Allowed { .. }
        ));
    }

    #[test]
    fn scope_rules_apply_to_scoped_keys_and_default_keys_pass_all() {
        let mut d = rec("k2", "default-key");
        d.kind = Kind::Default;
        d.scopes = vec![];
        let mut w = rec("k3", "writer");
        w.scopes = vec!["write".into()];
        let p = policy(vec![rec("k1", "reader"), d, w], "");
        let mut host = FakeHost::default();
        let d = run(
            &p,
            &req("POST", "/v1/items", &[("x-api-key", "reader")]),
            &mut host,
        );
        assert_eq!(
            denied(&d),
            Some((
                Reason::InsufficientScope,
                "This endpoint requires 'write' scope"
            ))
        );
        assert_eq!(d.required_scope.as_deref(), Some("write"));
        for path in ["/v1/x", "/admin/x"] {
            let d = run(
                &p,
                &req("POST", path, &[("x-api-key", "default-key")]),
                &mut host,
            );
            assert!(matches!(d.outcome, Outcome::Allowed { .. }), "{path}");
        }
        // write implies read through the default hierarchy.
        let d = run(
            &p,
            &req("GET", "/v1/x", &[("x-api-key", "writer")]),
            &mut host,
        );
        assert!(matches!(d.outcome, Outcome::Allowed { .. }));
    }

    #[test]
    fn path_tricks_cannot_dodge_the_admin_rule() {
        let p = policy(vec![rec("k1", "reader")], "");
        for path in [
            "/v1/../admin",
            "//admin",
            "/%61dmin",
            "/admin?x=1",
            "/./admin/",
        ] {
            let d = run(
                &p,
                &req("GET", path, &[("x-api-key", "reader")]),
                &mut FakeHost::default(),
            );
            assert_eq!(
                denied(&d).map(|d| d.0),
                Some(Reason::InsufficientScope),
                "{path}"
            );
        }
        let d = run(
            &p,
            &req("GET", "/v1%2f..%2fadmin", &[("x-api-key", "reader")]),
            &mut FakeHost::default(),
        );
        assert_eq!(denied(&d).map(|d| d.0), Some(Reason::BadPath));
    }

    #[test]
    fn hex64_format_is_checked_before_hashing() {
        let key = "ab".repeat(32);
        let p = policy(vec![rec("k1", &key)], r#","key_format":"hex64""#);
        let d = run(
            &p,
            &req("GET", "/v1", &[("x-api-key", "short")]),
            &mut FakeHost::default(),
        );
        assert_eq!(
            denied(&d),
            Some((Reason::MalformedCredential, "Invalid API key format"))
        );
        let d = run(
            &p,
            &req("GET", "/v1", &[("x-api-key", &key.to_uppercase())]),
            &mut FakeHost::default(),
        );
        assert!(matches!(d.outcome, Outcome::Allowed { .. }));
    }

    #[test]
    fn a_one_second_wait_is_said_in_the_singular() {
        let mut r = rec("k1", "key-one");
        r.rate_limit = Some(crate::rate_limit::RateLimit {
            requests: 1,
            window_secs: 1,
        });
        let p = policy(vec![r], "");
        let mut host = FakeHost::default();
        let h = req("GET", "/v1", &[("x-api-key", "key-one")]);
        run(&p, &h, &mut host);
        assert_eq!(
            denied(&run(&p, &h, &mut host)),
            Some((
                Reason::RateLimited,
                "Rate limit exceeded. Try again in 1 second."
            ))
        );
    }

    #[test]
    fn rate_limit_admits_the_budget_then_429_with_message() {
        let mut r = rec("k1", "key-one");
        r.rate_limit = Some(crate::rate_limit::RateLimit {
            requests: 2,
            window_secs: 60,
        });
        let p = policy(
            vec![r, rec("k2", "key-two")],
            r#","rate_limit":{"requests":100,"window_secs":60}"#,
        );
        let mut host = FakeHost::default();
        let h = req("GET", "/v1", &[("x-api-key", "key-one")]);
        let remaining: Vec<_> = (0..2)
            .map(|_| run(&p, &h, &mut host).rate().map(|r| r.remaining))
            .collect();
        assert_eq!(remaining, vec![Some(1), Some(0)]);
        let d = run(&p, &h, &mut host);
        assert_eq!(
            denied(&d),
            Some((
                Reason::RateLimited,
                "Rate limit exceeded. Try again in 30 seconds."
            ))
        );
        // The other key uses the plugin default and its own budget.
        let d = run(
            &p,
            &req("GET", "/v1", &[("x-api-key", "key-two")]),
            &mut host,
        );
        assert_eq!(
            d.rate().map(|r| (r.limit.requests, r.remaining)),
            Some((100, 99))
        );
    }

    #[test]
    fn refused_scope_does_not_spend_rate_budget() {
        let mut r = rec("k1", "key-one");
        r.rate_limit = Some(crate::rate_limit::RateLimit {
            requests: 1,
            window_secs: 60,
        });
        let p = policy(vec![r], "");
        let mut host = FakeHost::default();
        run(
            &p,
            &req("POST", "/v1", &[("x-api-key", "key-one")]),
            &mut host,
        );
        assert!(host.counters.is_empty());
    }

    #[test]
    fn rate_headers_report_both_styles_truthfully() {
        let (s, _) = crate::rate_limit::check(
            crate::rate_limit::RateLimit {
                requests: 100,
                window_secs: 60,
            },
            None,
            NOW,
        );
        let h = rate_limit_headers(&s, RateLimitHeaders::default(), NOW);
        let get = |n: &str| {
            h.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(get("x-ratelimit-limit"), "100");
        assert_eq!(get("x-ratelimit-remaining"), "99");
        assert_eq!(
            get("x-ratelimit-reset"),
            (NOW / 1_000_000_000 + 1).to_string()
        );
        assert_eq!(get("ratelimit-policy"), "\"default\";q=100;w=60");
        assert_eq!(get("ratelimit"), "\"default\";r=99;t=1");
        let only_x = RateLimitHeaders {
            x_ratelimit: true,
            ietf: false,
        };
        assert_eq!(rate_limit_headers(&s, only_x, NOW).len(), 3);
    }

    fn token_policy(creds: Vec<CredentialRecord>) -> Policy {
        policy(
            creds,
            r#","tokens":{"lifetime_secs":60,"signing_keys":[{"id":"k1","secret":"0123456789abcdef0123456789abcdef"}]}"#,
        )
    }

    fn issue(
        p: &Policy,
        host: &mut FakeHost,
        body: &str,
        now: u64,
    ) -> Result<serde_json::Value, (Reason, String)> {
        match login(
            p,
            &req("POST", "/auth/login", &[]),
            body.as_bytes(),
            host,
            now,
        ) {
            Login::Issued { body, .. } => Ok(serde_json::from_slice(&body).unwrap()),
            Login::Denied { denial, .. } => Err((denial.reason, denial.message)),
        }
    }

    fn use_token(p: &Policy, host: &mut FakeHost, token: &str, method: &str, now: u64) -> Decision {
        decide(
            p,
            &req(
                method,
                "/v1/items",
                &[("authorization", &format!("Bearer {token}"))],
            ),
            host,
            now,
        )
    }

    #[test]
    fn login_issues_a_token_that_works_with_the_keys_scopes() {
        let p = token_policy(vec![rec("k1", "key-one")]);
        let mut host = FakeHost::default();
        let body = issue(&p, &mut host, r#"{"api_key":"key-one"}"#, NOW).unwrap();
        assert_eq!(
            (body["token_type"].as_str(), body["expires_in"].as_u64()),
            (Some("Bearer"), Some(60))
        );
        let token = body["access_token"].as_str().unwrap();
        assert!(token.starts_with("kg1.") && !token.contains("key-one"));
        assert!(matches!(
            use_token(&p, &mut host, token, "GET", NOW).outcome,
            Outcome::Allowed { .. }
        ));
        assert_eq!(
            denied(&use_token(&p, &mut host, token, "POST", NOW)).map(|d| d.0),
            Some(Reason::InsufficientScope)
        );
    }

    #[test]
    fn same_session_reuses_the_token_and_a_new_session_gets_a_new_one() {
        let p = token_policy(vec![rec("k1", "key-one")]);
        let mut host = FakeHost::default();
        let a = issue(
            &p,
            &mut host,
            r#"{"api_key":"key-one","session_id":"s1"}"#,
            NOW,
        )
        .unwrap();
        let later = NOW + 20_000_000_000;
        let again = issue(
            &p,
            &mut host,
            r#"{"api_key":"key-one","session_id":"s1"}"#,
            later,
        )
        .unwrap();
        assert_eq!(a["access_token"], again["access_token"]);
        assert_eq!(again["expires_in"], 40);
        let other = issue(
            &p,
            &mut host,
            r#"{"api_key":"key-one","session_id":"s2"}"#,
            later,
        )
        .unwrap();
        assert_ne!(a["access_token"], other["access_token"]);
    }

    #[test]
    fn expired_tampered_and_orphaned_tokens_get_401() {
        let p = token_policy(vec![rec("k1", "key-one")]);
        let mut host = FakeHost::default();
        let token = issue(&p, &mut host, r#"{"api_key":"key-one"}"#, NOW).unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        let expired = use_token(&p, &mut host, &token, "GET", NOW + 60_000_000_000);
        assert_eq!(
            denied(&expired),
            Some((Reason::Expired, "Token has expired"))
        );
        let tampered = format!("{}A", &token[..token.len() - 1]);
        assert_eq!(
            denied(&use_token(&p, &mut host, &tampered, "GET", NOW)).map(|d| d.0),
            Some(Reason::UnknownKey)
        );
        // Signed by the same keys, but its key is gone: refused at once.
        let other = token_policy(vec![]);
        assert_eq!(
            denied(&use_token(&other, &mut host, &token, "GET", NOW)),
            Some((Reason::UnknownKey, "Invalid token"))
        );
    }

    #[test]
    fn deactivating_the_key_stops_its_tokens() {
        let mut host = FakeHost::default();
        let p = token_policy(vec![rec("k1", "key-one")]);
        let token = issue(&p, &mut host, r#"{"api_key":"key-one"}"#, NOW).unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut inactive = rec("k1", "key-one");
        inactive.status = Status::Inactive;
        let p2 = token_policy(vec![inactive]);
        assert_eq!(
            denied(&use_token(&p2, &mut host, &token, "GET", NOW)).map(|d| d.0),
            Some(Reason::Inactive)
        );
    }

    #[test]
    fn revoked_session_refuses_old_tokens_and_login_issues_a_fresh_one() {
        let p = token_policy(vec![rec("k1", "key-one")]);
        let mut host = FakeHost::default();
        let body = r#"{"api_key":"key-one","session_id":"s1"}"#;
        let old = issue(&p, &mut host, body, NOW).unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        let revoked_at = NOW / 1_000_000 + 1;
        host.counters.insert(
            token::revocations_key("k1"),
            format!(r#"{{"s1":{revoked_at}}}"#).into_bytes(),
        );
        let later = NOW + 5_000_000;
        assert_eq!(
            denied(&use_token(&p, &mut host, &old, "GET", later)).map(|d| d.0),
            Some(Reason::RevokedToken)
        );
        let fresh = issue(&p, &mut host, body, later).unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_ne!(fresh, old);
        assert!(matches!(
            use_token(&p, &mut host, &fresh, "GET", later).outcome,
            Outcome::Allowed { .. }
        ));
    }

    #[test]
    fn login_applies_the_usual_rules_and_validates_its_body() {
        let mut inactive = rec("k2", "inactive-key");
        inactive.status = Status::Inactive;
        let p = token_policy(vec![rec("k1", "key-one"), inactive]);
        let mut host = FakeHost::default();
        assert_eq!(
            issue(&p, &mut host, "{", NOW).unwrap_err().0,
            Reason::BadRequest
        );
        assert_eq!(
            issue(&p, &mut host, r#"{"session_id":"s"}"#, NOW).unwrap_err(),
            (Reason::BadRequest, "Missing api_key".into())
        );
        assert_eq!(
            issue(&p, &mut host, r#"{"api_key":"nope"}"#, NOW)
                .unwrap_err()
                .0,
            Reason::UnknownKey
        );
        assert_eq!(
            issue(&p, &mut host, r#"{"api_key":"inactive-key"}"#, NOW)
                .unwrap_err()
                .0,
            Reason::Inactive
        );
        // A token cannot be exchanged for another token.
        let t = issue(&p, &mut host, r#"{"api_key":"key-one"}"#, NOW).unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            issue(&p, &mut host, &format!(r#"{{"api_key":"{t}"}}"#), NOW)
                .unwrap_err()
                .0,
            Reason::UnknownKey
        );
    }
}
