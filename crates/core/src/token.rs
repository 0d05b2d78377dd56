//! Issued access tokens: `POST /auth/login` exchanges an API key for a
//! short-lived bearer token, accepted wherever the key is.
//!
//! Format: `kg1.<signing key id>.<base64url claims JSON>.<base64url HMAC-SHA256>`,
//! the MAC over everything before the last dot. The claims ([`Claims`]) name
//! the key by its id and bind the token to exactly one credential with an
//! opaque reference (`cref`, see [`Tokens::credential_ref`]): a keyed MAC of
//! the key's hash and the secret it was issued under, so neither the key's
//! hash nor anything else about the key is in the token. Every use looks the
//! credential up by id and recomputes the reference: another key with the
//! same id, a deleted, deactivated or re-created key, or a secret rotated
//! past its grace window stops the token. Several signing keys may be
//! configured: the first signs, all verify (rotation without breaking tokens).

use crate::error::ConfigError;
use crate::hash::Digest;
use crate::names::check_name;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::BTreeMap;

pub const PREFIX: &str = "kg1.";
pub const MIN_SIGNING_SECRET_LEN: usize = 32;
pub const MAX_LOGIN_BODY: usize = 4096;
pub const MIN_LIFETIME_SECS: u64 = 1;
/// A week: also how long a session revocation must be remembered.
pub const MAX_LIFETIME_SECS: u64 = 7 * 86_400;
/// Environment variable with `id:secret[,id:secret…]` signing keys.
pub const SIGNING_KEYS_ENV: &str = "KEYGATE_TOKEN_KEYS";

type HmacSha256 = hmac::Hmac<Sha256>;

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct SigningKeyConfig {
    pub id: String,
    pub secret: String,
}

impl std::fmt::Debug for SigningKeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKeyConfig({}, ..)", self.id)
    }
}

fn default_login_path() -> String {
    "/auth/login".into()
}
fn default_lifetime() -> u64 {
    7200
}
fn default_max_sessions() -> usize {
    64
}

#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    #[serde(default = "default_login_path")]
    pub login_path: String,
    #[serde(default = "default_lifetime")]
    pub lifetime_secs: u64,
    /// Live sessions remembered per key for token reuse; the oldest go first.
    #[serde(default = "default_max_sessions")]
    pub max_sessions_per_key: usize,
    /// First signs, all verify. Absent: taken from KEYGATE_TOKEN_KEYS.
    #[serde(default)]
    pub signing_keys: Option<Vec<SigningKeyConfig>>,
}

pub struct SigningKey {
    pub id: String,
    secret: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({}, ..)", self.id)
    }
}

/// Validated token settings.
#[derive(Debug)]
pub struct Tokens {
    pub login_path: String,
    pub lifetime_secs: u64,
    pub max_sessions_per_key: usize,
    keys: Vec<SigningKey>,
}

/// Tokens whose signature was checked, by their exact text: a client reuses
/// its token for many requests, and re-checking the MAC and re-parsing the
/// claims each time is avoidable work on the hot path. Bounded; expiry is
/// still checked on every use. The adapter keeps one per VM and lends it to
/// the decision, so the policy itself stays immutable.
#[derive(Debug, Default)]
pub struct VerifiedTokens {
    by_token: std::collections::HashMap<String, Claims>,
}

impl VerifiedTokens {
    pub fn len(&self) -> usize {
        self.by_token.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_token.is_empty()
    }
}

/// Most verified tokens remembered (per VM); past it the cache starts over.
const VERIFIED_CAPACITY: usize = 1024;

/// Parses `id:secret,id:secret` (the environment form).
pub fn parse_signing_keys_env(s: &str) -> Vec<SigningKeyConfig> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| match p.trim().split_once(':') {
            Some((id, secret)) => SigningKeyConfig {
                id: id.into(),
                secret: secret.into(),
            },
            None => SigningKeyConfig {
                id: String::new(),
                secret: p.trim().into(),
            },
        })
        .collect()
}

impl Tokens {
    pub fn compile(cfg: TokenConfig, env_keys: Option<String>) -> Result<Tokens, ConfigError> {
        if !cfg.login_path.starts_with('/') || cfg.login_path.contains(['?', '#', '%']) {
            return Err(ConfigError::new(
                "tokens.login_path",
                "must be a plain path starting with '/'",
            ));
        }
        if !(MIN_LIFETIME_SECS..=MAX_LIFETIME_SECS).contains(&cfg.lifetime_secs) {
            return Err(ConfigError::new(
                "tokens.lifetime_secs",
                format!("must be {MIN_LIFETIME_SECS} to {MAX_LIFETIME_SECS}"),
            ));
        }
        if !(1..=1024).contains(&cfg.max_sessions_per_key) {
            return Err(ConfigError::new(
                "tokens.max_sessions_per_key",
                "must be 1 to 1024",
            ));
        }
        let raw = match cfg.signing_keys {
            Some(k) => k,
            None => env_keys
                .as_deref()
                .map(parse_signing_keys_env)
                .unwrap_or_default(),
        };
        if raw.is_empty() {
            return Err(ConfigError::new(
                "tokens.signing_keys",
                format!("at least one signing key is needed (or {SIGNING_KEYS_ENV} in vm_config.environment_variables)"),
            ));
        }
        let mut keys = Vec::with_capacity(raw.len());
        for (i, k) in raw.into_iter().enumerate() {
            let at = format!("tokens.signing_keys[{i}]");
            check_name(&format!("{at}.id"), &k.id)?;
            if k.id.contains('.') {
                return Err(ConfigError::new(&format!("{at}.id"), "may not contain '.'"));
            }
            if k.secret.len() < MIN_SIGNING_SECRET_LEN {
                return Err(ConfigError::new(
                    &format!("{at}.secret"),
                    format!("must be at least {MIN_SIGNING_SECRET_LEN} characters"),
                ));
            }
            if keys.iter().any(|x: &SigningKey| x.id == k.id) {
                return Err(ConfigError::new(&format!("{at}.id"), "is used twice"));
            }
            keys.push(SigningKey {
                id: k.id,
                secret: k.secret.into_bytes(),
            });
        }
        Ok(Tokens {
            login_path: cfg.login_path,
            lifetime_secs: cfg.lifetime_secs,
            max_sessions_per_key: cfg.max_sessions_per_key,
            keys,
        })
    }

    fn mac(&self, key: &SigningKey, signed: &[u8]) -> Option<HmacSha256> {
        let mut mac = HmacSha256::new_from_slice(&key.secret).ok()?;
        mac.update(signed);
        Some(mac)
    }

    /// The id of the key that signs new tokens.
    pub fn signer(&self) -> Option<&str> {
        self.keys.first().map(|k| k.id.as_str())
    }

    /// The credential reference a token signed by `signer` carries: the
    /// first 16 bytes of HMAC-SHA256(signing secret, domain ‖ key hash ‖
    /// secret hash), base64url. Keyed, so it reveals nothing about the key
    /// and cannot be forged for another credential; it changes with the
    /// key's hash and with its secret (a rotation is a new generation).
    pub fn credential_ref(
        &self,
        signer: &str,
        key_hash: &Digest,
        secret_hash: Option<&Digest>,
    ) -> Option<String> {
        let key = self.keys.iter().find(|k| k.id == signer)?;
        let mut mac = self.mac(key, b"keygate-cref-v1\0")?;
        mac.update(key_hash);
        if let Some(secret) = secret_hash {
            mac.update(secret);
        }
        let tag = mac.finalize().into_bytes();
        Some(URL_SAFE_NO_PAD.encode(tag.get(..16)?))
    }

    /// Signs `claims` with the first signing key.
    pub fn issue(&self, claims: &Claims) -> Option<String> {
        let key = self.keys.first()?;
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).ok()?);
        let signed = format!("{PREFIX}{}.{payload}", key.id);
        let tag = self.mac(key, signed.as_bytes())?.finalize().into_bytes();
        Some(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag)))
    }

    /// Checks signature and expiry; the caller checks the live credential.
    pub fn verify(&self, token: &str, now_ms: u64) -> Result<Claims, TokenError> {
        self.verify_uncached(token, now_ms)
    }

    /// As [`Tokens::verify`], remembering tokens that passed in `cache`: a
    /// remembered token skips the MAC check but not the expiry check.
    pub fn verify_cached(
        &self,
        token: &str,
        now_ms: u64,
        cache: &mut VerifiedTokens,
    ) -> Result<Claims, TokenError> {
        if let Some(claims) = cache.by_token.get(token) {
            return if now_ms >= claims.exp_ms {
                Err(TokenError::Expired)
            } else {
                Ok(claims.clone())
            };
        }
        let claims = self.verify_uncached(token, now_ms)?;
        if cache.by_token.len() >= VERIFIED_CAPACITY {
            cache.by_token.clear();
        }
        cache.by_token.insert(token.to_owned(), claims.clone());
        Ok(claims)
    }

    fn verify_uncached(&self, token: &str, now_ms: u64) -> Result<Claims, TokenError> {
        let rest = token.strip_prefix(PREFIX).ok_or(TokenError::Invalid)?;
        let (signed_rest, tag_b64) = rest.rsplit_once('.').ok_or(TokenError::Invalid)?;
        let (kid, payload) = signed_rest.split_once('.').ok_or(TokenError::Invalid)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id == kid)
            .ok_or(TokenError::Invalid)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag_b64)
            .map_err(|_| TokenError::Invalid)?;
        let signed_len = PREFIX.len() + signed_rest.len();
        let mac = self
            .mac(
                key,
                token
                    .as_bytes()
                    .get(..signed_len)
                    .ok_or(TokenError::Invalid)?,
            )
            .ok_or(TokenError::Invalid)?;
        mac.verify_slice(&tag).map_err(|_| TokenError::Invalid)?;
        let mut claims: Claims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Invalid)?;
        claims.signer = key.id.clone();
        if now_ms >= claims.exp_ms {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Invalid,
    Expired,
}

/// What a token says (all of it: the README lists these fields). Never
/// carries the key, its hash or a secret.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// Key id: the live credential is looked up by it.
    pub kid: String,
    /// Credential reference ([`Tokens::credential_ref`]): binds the token
    /// to the one credential (key hash and secret generation) it was issued for.
    pub cref: String,
    pub tenant: String,
    pub env: String,
    pub scopes: Vec<String>,
    pub sid: String,
    pub iat_ms: u64,
    pub exp_ms: u64,
    /// The signing key that verified the token (not part of the payload).
    #[serde(skip)]
    pub signer: String,
}

/// `POST /auth/login` body.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub api_key: String,
    #[serde(default)]
    pub api_secret: Option<String>,
    #[serde(default)]
    pub session_id: Option<String>,
}

pub fn parse_login(body: &[u8]) -> Result<LoginRequest, String> {
    if body.len() > MAX_LOGIN_BODY {
        return Err(format!("Request body over {MAX_LOGIN_BODY} bytes"));
    }
    let req: LoginRequest = serde_json::from_slice(body).map_err(|e| {
        if e.to_string().contains("missing field `api_key`") {
            "Missing api_key".to_owned()
        } else {
            "Request body must be JSON: {\"api_key\": \"...\", \"session_id\": \"optional\"}"
                .to_owned()
        }
    })?;
    if req.api_key.is_empty() {
        return Err("Missing api_key".into());
    }
    if let Some(sid) = &req.session_id {
        check_name("session_id", sid).map_err(|e| format!("Invalid session_id: {}", e.message))?;
    }
    Ok(req)
}

/// Tokens issued per key, by session, shared by all workers (one shared-data
/// entry per key), so a login on any worker reuses a live token.
#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq, Eq)]
pub struct SessionTokens {
    pub sessions: BTreeMap<String, IssuedToken>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    pub token: String,
    pub iat_ms: u64,
    pub exp_ms: u64,
    /// The credential reference it carries: reused only for the same one.
    #[serde(default)]
    pub cref: String,
}

impl SessionTokens {
    pub fn decode(bytes: Option<&[u8]>) -> SessionTokens {
        bytes
            .and_then(|b| serde_json::from_slice(b).ok())
            .unwrap_or_default()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A live token for `session`, bound to `cref`, not issued before
    /// `revoked_at_ms`.
    pub fn live(
        &self,
        session: &str,
        cref: &str,
        now_ms: u64,
        revoked_at_ms: Option<u64>,
    ) -> Option<&IssuedToken> {
        self.sessions.get(session).filter(|t| {
            t.cref == cref && t.exp_ms > now_ms && revoked_at_ms.is_none_or(|r| t.iat_ms > r)
        })
    }

    /// Records a token, dropping expired sessions and then the oldest beyond `cap`.
    pub fn insert(&mut self, session: &str, token: IssuedToken, now_ms: u64, cap: usize) {
        self.sessions.retain(|_, t| t.exp_ms > now_ms);
        self.sessions.insert(session.to_owned(), token);
        while self.sessions.len() > cap {
            let oldest = self
                .sessions
                .iter()
                .min_by_key(|(_, t)| t.iat_ms)
                .map(|(s, _)| s.clone());
            match oldest {
                Some(s) => self.sessions.remove(&s),
                None => break,
            };
        }
    }
}

/// A key's session revocations as the sync role keeps them (`rs:<key id>`).
/// `at` is when each session was revoked *by Envoy's clock*, the clock
/// tokens are issued by (`iat_ms`): comparing a token with a time from the
/// sidecar's clock would let a skew between the two machines revoke too
/// little (or keep refusing fresh logins). `pushed` is the sidecar's own
/// time for the revocation, to recognise a re-sent one.
#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Revocations {
    pub at: BTreeMap<String, u64>,
    pub pushed: BTreeMap<String, u64>,
}

/// When each session of a key was revoked (Envoy's clock). Absent or
/// empty: none. Unreadable: an error, which the gate answers by refusing
/// the request (fail closed): a revocation list it cannot read might
/// revoke this very token.
pub fn decode_revocations(
    bytes: Option<&[u8]>,
) -> Result<BTreeMap<String, u64>, UnreadableRevocations> {
    match bytes {
        None | Some([]) => Ok(BTreeMap::new()),
        Some(b) => serde_json::from_slice::<Revocations>(b)
            .map(|r| r.at)
            .map_err(|_| UnreadableRevocations),
    }
}

/// A revocation list that is present but cannot be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnreadableRevocations;

/// Merges pushed revocations (`(session, sidecar time)`) into a key's list,
/// stamping each new one with Envoy's `now_ms`: every token issued up to
/// now for that session is refused. A revocation sent again (same or older
/// sidecar time, e.g. in a full push) keeps its first stamp, so tokens
/// issued since stay valid. An unreadable list is replaced.
pub fn merge_revocations(current: Option<&[u8]>, new: &[(&str, u64)], now_ms: u64) -> Vec<u8> {
    let mut list: Revocations = current
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or_default();
    for (session, pushed) in new {
        if list.pushed.get(*session).is_some_and(|p| p >= pushed) {
            continue;
        }
        list.pushed.insert((*session).to_owned(), *pushed);
        let at = list.at.entry((*session).to_owned()).or_insert(0);
        *at = (*at).max(now_ms);
    }
    serde_json::to_vec(&list).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(keys: &[(&str, &str)]) -> Tokens {
        let cfg = TokenConfig {
            login_path: "/auth/login".into(),
            lifetime_secs: 7200,
            max_sessions_per_key: 3,
            signing_keys: Some(
                keys.iter()
                    .map(|(i, s)| SigningKeyConfig {
                        id: i.to_string(),
                        secret: s.to_string(),
                    })
                    .collect(),
            ),
        };
        Tokens::compile(cfg, None).unwrap()
    }

    const A: &str = "signing-secret-a-0123456789abcdefghij";
    const B: &str = "signing-secret-b-0123456789abcdefghij";

    fn claims(exp_ms: u64) -> Claims {
        Claims {
            kid: "k1".into(),
            cref: "c".into(),
            tenant: "acme".into(),
            env: "live".into(),
            scopes: vec!["read".into()],
            sid: "s1".into(),
            iat_ms: 1,
            exp_ms,
            signer: String::new(),
        }
    }

    fn signed_by(signer: &str, exp_ms: u64) -> Claims {
        Claims {
            signer: signer.into(),
            ..claims(exp_ms)
        }
    }

    #[test]
    fn issued_token_verifies_until_expiry() {
        let t = tokens(&[("a", A)]);
        let tok = t.issue(&claims(1000)).unwrap();
        assert!(tok.starts_with("kg1.a."));
        assert_eq!(t.verify(&tok, 999).unwrap(), signed_by("a", 1000));
        assert_eq!(t.verify(&tok, 1000), Err(TokenError::Expired));
    }

    #[test]
    fn tampering_anywhere_is_detected() {
        let t = tokens(&[("a", A)]);
        let tok = t.issue(&claims(1000)).unwrap();
        let (head, tag) = tok.rsplit_once('.').unwrap();
        let mut forged_claims = claims(u64::MAX);
        forged_claims.scopes = vec!["admin".into()];
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged_claims).unwrap());
        for bad in [
            format!("kg1.a.{forged_payload}.{tag}"),
            format!("{head}.{}", URL_SAFE_NO_PAD.encode([0u8; 32])),
            format!("{head}x.{tag}"),
            tok.replacen("kg1.a.", "kg1.b.", 1),
            tok.replacen("kg1.", "kg2.", 1),
            "kg1.".into(),
            "kg1.a".into(),
            format!("{tok}.extra"),
        ] {
            assert_eq!(t.verify(&bad, 0), Err(TokenError::Invalid), "{bad}");
        }
        // Signed with another secret under the same id.
        let other = tokens(&[("a", B)]).issue(&claims(1000)).unwrap();
        assert_eq!(t.verify(&other, 0), Err(TokenError::Invalid));
    }

    #[test]
    fn verified_tokens_are_remembered_but_still_expire() {
        let t = tokens(&[("a", A)]);
        let mut cache = VerifiedTokens::default();
        let tok = t.issue(&claims(1000)).unwrap();
        assert!(t.verify_cached(&tok, 10, &mut cache).is_ok());
        assert_eq!(cache.len(), 1);
        assert_eq!(
            t.verify_cached(&tok, 20, &mut cache).unwrap(),
            signed_by("a", 1000)
        );
        assert_eq!(
            t.verify_cached(&tok, 1000, &mut cache),
            Err(TokenError::Expired)
        );
        // A near miss is not the remembered token: it is checked in full.
        let forged = format!("{}x", &tok[..tok.len() - 1]);
        assert_eq!(
            t.verify_cached(&forged, 20, &mut cache),
            Err(TokenError::Invalid)
        );
        assert_eq!(cache.len(), 1, "failures are not remembered");
    }

    #[test]
    fn credential_refs_differ_by_key_secret_and_signer_and_hide_the_hash() {
        let t = tokens(&[("a", A), ("b", B)]);
        let (k1, k2, s1, s2) = ([1u8; 32], [2u8; 32], [3u8; 32], [4u8; 32]);
        let r = |signer, k, s: Option<&Digest>| t.credential_ref(signer, k, s).unwrap();
        let base = r("a", &k1, None);
        assert_eq!(base, r("a", &k1, None), "deterministic");
        for other in [r("a", &k2, None), r("a", &k1, Some(&s1)), r("b", &k1, None)] {
            assert_ne!(base, other);
        }
        assert_ne!(r("a", &k1, Some(&s1)), r("a", &k1, Some(&s2)));
        assert_eq!(base.len(), 22);
        assert!(t.credential_ref("nope", &k1, None).is_none());
    }

    #[test]
    fn rotation_keeps_old_tokens_valid() {
        let old = tokens(&[("a", A)]).issue(&claims(1000)).unwrap();
        let rotated = tokens(&[("b", B), ("a", A)]);
        assert!(rotated.verify(&old, 0).is_ok());
        assert!(rotated.issue(&claims(1000)).unwrap().starts_with("kg1.b."));
    }

    #[test]
    fn config_errors_name_the_field() {
        let bad = |f: fn(&mut TokenConfig), env: Option<&str>| {
            let mut cfg = TokenConfig {
                login_path: "/auth/login".into(),
                lifetime_secs: 7200,
                max_sessions_per_key: 64,
                signing_keys: Some(vec![SigningKeyConfig {
                    id: "a".into(),
                    secret: A.into(),
                }]),
            };
            f(&mut cfg);
            Tokens::compile(cfg, env.map(Into::into))
                .map(|_| ())
                .map_err(|e| e.field)
        };
        assert_eq!(
            bad(|c| c.login_path = "auth".into(), None),
            Err("tokens.login_path".into())
        );
        assert_eq!(
            bad(|c| c.lifetime_secs = 0, None),
            Err("tokens.lifetime_secs".into())
        );
        assert_eq!(
            bad(|c| c.lifetime_secs = MAX_LIFETIME_SECS + 1, None),
            Err("tokens.lifetime_secs".into())
        );
        assert_eq!(
            bad(|c| c.signing_keys = None, None),
            Err("tokens.signing_keys".into())
        );
        assert_eq!(
            bad(
                |c| c.signing_keys = Some(vec![SigningKeyConfig {
                    id: "a".into(),
                    secret: "short".into()
                }]),
                None
            ),
            Err("tokens.signing_keys[0].secret".into())
        );
        assert_eq!(
            bad(
                |c| c.signing_keys = None,
                Some(&format!("env1:{A},env0:{B}"))
            ),
            Ok(())
        );
    }

    #[test]
    fn login_body_is_strict() {
        assert_eq!(
            parse_login(br#"{"api_key":"k","session_id":"s-1"}"#)
                .unwrap()
                .session_id
                .as_deref(),
            Some("s-1")
        );
        assert_eq!(
            parse_login(br#"{"session_id":"s"}"#).unwrap_err(),
            "Missing api_key"
        );
        assert_eq!(
            parse_login(br#"{"api_key":""}"#).unwrap_err(),
            "Missing api_key"
        );
        assert!(parse_login(b"not json")
            .unwrap_err()
            .contains("must be JSON"));
        assert!(parse_login(br#"{"api_key":"k","session_id":"bad id"}"#)
            .unwrap_err()
            .contains("session_id"));
        assert!(parse_login(&vec![b' '; MAX_LOGIN_BODY + 1]).is_err());
    }

    #[test]
    fn revocations_are_stamped_by_envoys_clock_once() {
        let first = merge_revocations(None, &[("s1", 5_000)], 100);
        assert_eq!(decode_revocations(Some(&first)).unwrap()["s1"], 100);
        // Sent again (a full push): the first stamp stands.
        let again = merge_revocations(Some(&first), &[("s1", 5_000)], 900);
        assert_eq!(decode_revocations(Some(&again)).unwrap()["s1"], 100);
        // Revoked anew by the operator: stamped anew.
        let anew = merge_revocations(Some(&again), &[("s1", 6_000), ("s2", 1)], 950);
        let map = decode_revocations(Some(&anew)).unwrap();
        assert_eq!((map["s1"], map["s2"]), (950, 950));
        assert!(decode_revocations(Some(b"{")).is_err());
        assert!(decode_revocations(Some(b"")).unwrap().is_empty());
    }

    #[test]
    fn sessions_reuse_live_tokens_and_stay_bounded() {
        let mut s = SessionTokens::default();
        let tok = |iat, exp| IssuedToken {
            token: format!("t{iat}"),
            iat_ms: iat,
            exp_ms: exp,
            cref: "c".into(),
        };
        s.insert("a", tok(1, 100), 0, 3);
        assert_eq!(s.live("a", "c", 50, None).unwrap().token, "t1");
        assert!(
            s.live("a", "other", 50, None).is_none(),
            "another credential"
        );
        assert!(s.live("a", "c", 100, None).is_none());
        assert!(
            s.live("a", "c", 50, Some(1)).is_none(),
            "revoked after issue"
        );
        assert!(s.live("b", "c", 50, None).is_none());
        for (i, sid) in ["b", "c", "d"].iter().enumerate() {
            s.insert(sid, tok(10 + i as u64, 1000), 5, 3);
        }
        assert_eq!(s.sessions.len(), 3);
        assert!(!s.sessions.contains_key("a"), "oldest dropped");
        assert_eq!(SessionTokens::decode(Some(&s.encode())), s);
    }
}
