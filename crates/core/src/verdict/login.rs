//! The login exchange: `POST <login_path>` trades an API key for a
//! short-lived bearer token, after every check a request would pass.

use super::decide::{authenticate, check_credential, deny, Headers, Host, Outcome, TokenSession};
use crate::config::Policy;
use crate::credential::Credential;
use crate::denial::{Denial, Reason};
use crate::extract::{trim_ows, Presented, Scheme};
use crate::hash::sha256;
use crate::path::normalize;
use crate::rate_limit::RateStatus;
use crate::scope::Access;
use crate::shared_data::{revocations_key, sessions_key, update, CounterCell, Step};
use crate::token::{self, Claims, IssuedToken, SessionTokens, Tokens};
use serde::Serialize;
use std::rc::Rc;

/// True for `POST <login_path>` when token exchange is configured: the
/// filter then reads the body and answers with [`login`].
pub fn is_login(policy: &Policy, headers: &dyn Headers) -> bool {
    let Some(tokens) = &policy.tokens else {
        return false;
    };
    // Runs on every request of a config with tokens: borrowed reads.
    headers.get_ref(":method").as_deref() == Some(b"POST")
        && normalize(&headers.get_ref(":path").unwrap_or_default())
            .is_ok_and(|p| p == tokens.login_path)
}

/// The reply to `POST <login_path>`.
#[derive(Debug)]
pub enum Login {
    Issued {
        credential: Rc<Credential>,
        body: Vec<u8>,
        rate: Option<RateStatus>,
        /// The issued (or reused) token's session, for the access log.
        session: TokenSession,
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
    // Trimmed like a header value, so a key works the same in both places.
    let ows = |s: &str| String::from_utf8_lossy(trim_ows(s.as_bytes())).into_owned();
    let presented = Presented {
        key: ows(&request.api_key),
        secret: request.api_secret.as_deref().map(ows),
        scheme: Scheme::ApiKeyHeader,
    };
    let cred = match authenticate(policy, &presented, host, now_ns, false) {
        Ok((c, _)) => c,
        Err(outcome) => return denied(outcome),
    };
    let (cred, rate) =
        match check_credential(policy, headers, &Access::Authenticated, cred, host, now_ns) {
            Outcome::Allowed { credential, rate } => (credential, rate),
            other => return denied(other),
        };
    // The secret this login proved (current, or previous within its grace
    // window): the token lives only as long as that secret does.
    let generation = cred
        .secret_hash
        .and(presented.secret.as_deref())
        .map(|s| sha256(s.as_bytes()));
    let session = request.session_id.unwrap_or_default();
    // The key value this login proved: a rolled key's old value binds the
    // token to that value, so the token ends with the value's grace.
    let proved = [
        sha256(presented.key.as_bytes()),
        sha256(presented.key.to_ascii_lowercase().as_bytes()),
    ];
    let key_hash = match cred.previous_key {
        Some((old, _)) if proved.iter().any(|h| crate::hash::ct_eq(h, &old)) => old,
        _ => cred.key_hash,
    };
    let issued = tokens.signer().and_then(|signer| {
        let cref = tokens.credential_ref(signer, &key_hash, generation.as_ref())?;
        session_token(
            tokens,
            &cred,
            &cref,
            &session,
            host.counters(),
            now_ns / 1_000_000,
        )
    });
    let Some(issued) = issued else {
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
        session: TokenSession {
            id: session,
            issued_ms: issued.iat_ms,
            expires_ms: issued.exp_ms,
        },
    }
}

/// The live token for (key, session), or a new one recorded with CAS so
/// every worker hands out the same token.
fn session_token(
    tokens: &Tokens,
    cred: &Credential,
    cref: &str,
    session: &str,
    cell: &mut dyn CounterCell,
    now_ms: u64,
) -> Option<IssuedToken> {
    let key = sessions_key(&cred.key_id);
    let revoked = token::decode_revocations(cell.load(&revocations_key(&cred.key_id)).0.as_deref())
        .ok()?
        .get(session)
        .copied();
    let issue = |bytes: Option<&[u8]>| {
        let mut sessions = SessionTokens::decode(bytes);
        if let Some(live) = sessions.live(session, cref, now_ms, revoked) {
            return Step::Done(Some(live.clone()));
        }
        let claims = Claims {
            kid: cred.key_id.clone(),
            cref: cref.to_owned(),
            tenant: cred.tenant.clone(),
            env: cred.environment.clone(),
            scopes: cred.scopes.clone(),
            sid: session.to_owned(),
            iat_ms: now_ms,
            exp_ms: now_ms + tokens.lifetime_secs * 1000,
            signer: String::new(),
        };
        let Some(token) = tokens.issue(&claims) else {
            return Step::Done(None);
        };
        let issued = IssuedToken {
            token,
            iat_ms: claims.iat_ms,
            exp_ms: claims.exp_ms,
            cref: cref.to_owned(),
        };
        sessions.insert(session, issued.clone(), now_ms, tokens.max_sessions_per_key);
        Step::Write(sessions.encode(), Some(issued))
    };
    // Contention past every attempt: no token rather than two for one session.
    update(cell, &key, issue).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::{CredentialRecord, Status};
    use crate::testing::{denied, policy, rec, req, MemoryHost, NOW};
    use crate::verdict::decide::{decide, Decision};

    fn token_policy(creds: Vec<CredentialRecord>) -> Policy {
        policy(
            creds,
            r#","tokens":{"lifetime_secs":60,"signing_keys":[{"id":"k1","secret":"0123456789abcdef0123456789abcdef"}]}"#,
        )
    }

    fn issue(
        p: &Policy,
        host: &mut MemoryHost,
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

    fn use_token(
        p: &Policy,
        host: &mut MemoryHost,
        token: &str,
        method: &str,
        now: u64,
    ) -> Decision {
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
        let mut host = MemoryHost::default();
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
    fn login_and_token_requests_name_the_session_for_the_access_log() {
        let p = token_policy(vec![rec("k1", "key-one")]);
        let mut host = MemoryHost::default();
        let answer = login(
            &p,
            &req("POST", "/auth/login", &[]),
            br#"{"api_key":"key-one","session_id":"phone"}"#,
            &mut host,
            NOW,
        );
        let Login::Issued { body, session, .. } = answer else {
            panic!("login refused")
        };
        let now_ms = NOW / 1_000_000;
        assert_eq!(
            session,
            TokenSession {
                id: "phone".into(),
                issued_ms: now_ms,
                expires_ms: now_ms + 60_000
            }
        );
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let token = body["access_token"].as_str().unwrap();
        let used = use_token(&p, &mut host, token, "GET", NOW + 1_000_000_000);
        assert_eq!(used.session, Some(session));
        // A refused use is no use of the session.
        let refused = use_token(&p, &mut host, token, "POST", NOW);
        assert_eq!(refused.session, None);
    }

    #[test]
    fn same_session_reuses_the_token_and_a_new_session_gets_a_new_one() {
        let p = token_policy(vec![rec("k1", "key-one")]);
        let mut host = MemoryHost::default();
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
        let mut host = MemoryHost::default();
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
        let mut host = MemoryHost::default();
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
        let mut host = MemoryHost::default();
        let body = r#"{"api_key":"key-one","session_id":"s1"}"#;
        let old = issue(&p, &mut host, body, NOW).unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        let revoked_at = NOW / 1_000_000 + 1;
        host.counters.insert(
            crate::shared_data::revocations_key("k1"),
            crate::token::merge_revocations(None, &[("s1", 1)], revoked_at),
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
    fn token_of_a_store_key_reusing_a_config_key_id_is_not_that_key() {
        let mut admin = rec("k1", "config-key");
        admin.kind = crate::credential::Kind::Default;
        let p = token_policy(vec![admin]);
        let mut host = MemoryHost::default();
        // A store credential created with the config key's id.
        let c = Credential::try_from(&rec("k1", "store-key")).unwrap();
        host.dynamic.insert(c.key_hash, Rc::new(c));
        let token = issue(&p, &mut host, r#"{"api_key":"store-key"}"#, NOW).unwrap()
            ["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            denied(&use_token(&p, &mut host, &token, "DELETE", NOW)),
            Some((Reason::UnknownKey, "Invalid token"))
        );
        let claims = p
            .tokens
            .as_ref()
            .unwrap()
            .verify(&token, NOW / 1_000_000)
            .unwrap();
        assert!(!token.contains(&crate::hash::to_hex(&crate::hash::sha256(b"store-key"))));
        assert!(!format!("{claims:?}").contains("key_hash"));
    }

    #[test]
    fn tokens_end_with_the_secret_they_were_issued_under() {
        use crate::hash::{sha256, to_hex};
        let mut r = rec("k1", "key-one");
        r.secret_hash = Some(to_hex(&sha256(b"old")));
        let p = token_policy(vec![r.clone()]);
        let mut host = MemoryHost::default();
        let body = r#"{"api_key":"key-one","api_secret":"old","session_id":"s"}"#;
        let token = issue(&p, &mut host, body, NOW).unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        let now_secs = NOW / 1_000_000_000;
        // Rotated: the old secret stays valid for 10 s of grace.
        r.secret_hash = Some(to_hex(&sha256(b"new")));
        r.previous_secret_hash = Some(to_hex(&sha256(b"old")));
        r.previous_secret_expires_at = Some(now_secs + 10);
        let rotated = token_policy(vec![r.clone()]);
        let in_grace = NOW + 5_000_000_000;
        assert!(matches!(
            use_token(&rotated, &mut host, &token, "GET", in_grace).outcome,
            Outcome::Allowed { .. }
        ));
        let after = NOW + 10_000_000_000;
        assert_eq!(
            denied(&use_token(&rotated, &mut host, &token, "GET", after)),
            Some((Reason::UnknownKey, "Invalid token"))
        );
        // A login with the new secret gets a new token, valid after the window;
        // the session's old token is not handed out again.
        let fresh = issue(
            &rotated,
            &mut host,
            r#"{"api_key":"key-one","api_secret":"new","session_id":"s"}"#,
            in_grace,
        )
        .unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_ne!(fresh, token);
        assert!(matches!(
            use_token(&rotated, &mut host, &fresh, "GET", after).outcome,
            Outcome::Allowed { .. }
        ));
    }

    #[test]
    fn a_token_from_a_rolled_key_old_value_ends_with_its_grace() {
        use crate::hash::{sha256, to_hex};
        let now_secs = NOW / 1_000_000_000;
        let mut r = rec("k1", "new-value");
        r.previous_key_hash = Some(to_hex(&sha256(b"old-value")));
        r.previous_key_expires_at = Some(now_secs + 10);
        let p = token_policy(vec![r]);
        let mut host = MemoryHost::default();
        let token = |host: &mut MemoryHost, key: &str| {
            let body = format!(r#"{{"api_key":"{key}","session_id":"s"}}"#);
            issue(&p, host, &body, NOW).unwrap()["access_token"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let old = token(&mut host, "old-value");
        let new = token(&mut host, "new-value");
        assert_ne!(old, new, "the new value gets its own token");
        let in_grace = NOW + 5_000_000_000;
        let after = NOW + 10_000_000_000;
        for t in [&old, &new] {
            assert!(matches!(
                use_token(&p, &mut host, t, "GET", in_grace).outcome,
                Outcome::Allowed { .. }
            ));
        }
        assert_eq!(
            denied(&use_token(&p, &mut host, &old, "GET", after)),
            Some((Reason::UnknownKey, "Invalid token"))
        );
        assert!(matches!(
            use_token(&p, &mut host, &new, "GET", after).outcome,
            Outcome::Allowed { .. }
        ));
    }

    #[test]
    fn unreadable_revocations_refuse_the_token_and_the_login() {
        let p = token_policy(vec![rec("k1", "key-one")]);
        let mut host = MemoryHost::default();
        let body = r#"{"api_key":"key-one","session_id":"s1"}"#;
        let token = issue(&p, &mut host, body, NOW).unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        host.counters.insert(
            crate::shared_data::revocations_key("k1"),
            b"{not json".to_vec(),
        );
        assert_eq!(
            denied(&use_token(&p, &mut host, &token, "GET", NOW)).map(|d| d.0),
            Some(Reason::Internal)
        );
        assert!(issue(
            &p,
            &mut host,
            r#"{"api_key":"key-one","session_id":"s2"}"#,
            NOW
        )
        .is_err());
    }

    #[test]
    fn login_applies_the_usual_rules_and_validates_its_body() {
        let mut inactive = rec("k2", "inactive-key");
        inactive.status = Status::Inactive;
        let p = token_policy(vec![rec("k1", "key-one"), inactive]);
        let mut host = MemoryHost::default();
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
        // Surrounding OWS is trimmed, as in a header value.
        assert!(issue(&p, &mut host, "{\"api_key\":\" \\tkey-one \"}", NOW).is_ok());
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
