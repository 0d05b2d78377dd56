//! The access-log record of a decision: what the filter exposes to Envoy's
//! access log, to the optional decision log line, and to the metrics. Never
//! a key, secret or token.
//!
//! Envoy's access log reads each fact from the cheapest place that holds
//! it (envoy/envoy.yaml): the identity of an allowed request from the
//! identity request headers the filter sets for the upstream, the remaining
//! budget from the `x-ratelimit-remaining` response header, everything else
//! from filter state `wasm.keygate_<field>` ([`AccessRecord::fields`]). A
//! filter-state object costs Envoy ~0.5 µs per request (created, then freed
//! at stream end); an allowed request writes one, the decision.

use crate::credential::Credential;
use crate::denial::{Denial, Reason};
use crate::verdict::decide::{Decision, Outcome, TokenSession};
use crate::verdict::login::Login;
use serde::Serialize;

/// One record per decided request.
#[derive(Serialize, Debug, Default, PartialEq, Eq)]
pub struct AccessRecord {
    /// `allowed`, `denied` or `public`.
    pub decision: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope_required: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_remaining: Option<u32>,
    /// The issued token's session (a login's answer, or a request the token
    /// got through): its id, never the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// When that token was issued and expires, Unix milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_issued_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_expires_ms: Option<u64>,
    /// The key's owner, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// Every metric outcome, for defining the counters once at start.
pub fn outcomes() -> impl Iterator<Item = String> {
    [
        "allowed".to_owned(),
        "public".to_owned(),
        "login".to_owned(),
    ]
    .into_iter()
    .chain(Reason::ALL.iter().map(|r| format!("denied_{}", r.as_str())))
}

impl AccessRecord {
    fn with_credential(mut self, c: Option<&Credential>) -> AccessRecord {
        if let Some(c) = c {
            self.key_id = Some(c.key_id.clone());
            self.tenant = Some(c.tenant.clone());
            self.environment = Some(c.environment.clone());
            self.owner = c.owner.clone();
        }
        self
    }

    fn with_session(mut self, s: Option<&TokenSession>) -> AccessRecord {
        if let Some(s) = s {
            self.session_id = Some(s.id.clone());
            self.session_issued_ms = Some(s.issued_ms);
            self.session_expires_ms = Some(s.expires_ms);
        }
        self
    }

    fn denied(denial: &Denial, c: Option<&Credential>) -> AccessRecord {
        AccessRecord {
            decision: "denied",
            reason: Some(denial.reason.as_str()),
            rate_remaining: denial.rate.map(|r| r.remaining),
            ..AccessRecord::default()
        }
        .with_credential(c)
    }

    pub fn of_decision(d: &Decision) -> AccessRecord {
        let record = match &d.outcome {
            Outcome::Public => AccessRecord {
                decision: "public",
                ..AccessRecord::default()
            },
            Outcome::Allowed { credential, rate } => AccessRecord {
                decision: "allowed",
                rate_remaining: rate.map(|r| r.remaining),
                ..AccessRecord::default()
            }
            .with_credential(Some(credential)),
            Outcome::Denied { denial, credential } => {
                AccessRecord::denied(denial, credential.as_deref())
            }
        };
        AccessRecord {
            scope_required: d.required_scope.as_deref().map(str::to_owned),
            ..record
        }
        .with_session(d.session.as_ref())
    }

    pub fn of_login(l: &Login) -> AccessRecord {
        match l {
            Login::Issued {
                credential,
                rate,
                session,
                ..
            } => AccessRecord {
                decision: "allowed",
                reason: Some("login"),
                rate_remaining: rate.map(|r| r.remaining),
                ..AccessRecord::default()
            }
            .with_credential(Some(credential))
            .with_session(Some(session)),
            Login::Denied { denial, credential } => {
                AccessRecord::denied(denial, credential.as_deref())
            }
        }
    }

    /// The metric outcome: `allowed`, `public`, `login` or `denied_<reason>`.
    pub fn outcome(&self) -> String {
        match (self.decision, self.reason) {
            ("denied", Some(r)) => format!("denied_{r}"),
            ("allowed", Some("login")) => "login".into(),
            (d, _) => d.into(),
        }
    }

    /// Whether the identity (key id, tenant, environment, owner) reaches the
    /// access log through the identity request headers the filter set for
    /// the upstream: true for an allowed request, which is the hot path and
    /// carries them anyway. A login never goes upstream (and in the wasm
    /// build is answered where request headers can no longer be written), a
    /// denial is answered locally: their identity is filter state.
    pub fn identity_in_request_headers(&self) -> bool {
        self.decision == "allowed" && self.reason.is_none()
    }

    /// `(filter-state name, value)` pairs the access log needs, only those
    /// known: what no header carries. The names are what the access-log
    /// format reads as `%FILTER_STATE(wasm.<name>:PLAIN)%`; constants, so the
    /// hot path builds none of them. `x_ratelimit`: the response carries
    /// `x-ratelimit-remaining` (the format reads it there), so the remaining
    /// budget is not written twice.
    ///
    /// Always written: `keygate_decision`. It is the record's proof that
    /// keygate decided the request: the identity headers the format reads
    /// can also come from a client on a request Envoy answers before any
    /// filter runs (a missing Host header), and consumers trust the
    /// identity only next to a decision.
    pub fn fields(&self, x_ratelimit: bool) -> Vec<(&'static str, String)> {
        let mut f = vec![("keygate_decision", self.decision.to_owned())];
        let from_headers = self.identity_in_request_headers();
        let identity = |v: &Option<String>| v.clone().filter(|_| !from_headers);
        let opt = [
            ("keygate_reason", self.reason.map(str::to_owned)),
            ("keygate_key_id", identity(&self.key_id)),
            ("keygate_tenant", identity(&self.tenant)),
            ("keygate_environment", identity(&self.environment)),
            ("keygate_owner", identity(&self.owner)),
            // An allowed request's scope is its route's: not worth an object.
            (
                "keygate_scope_required",
                self.scope_required
                    .clone()
                    .filter(|_| self.decision != "allowed"),
            ),
            (
                "keygate_rate_remaining",
                self.rate_remaining
                    .filter(|_| !x_ratelimit)
                    .map(|r| r.to_string()),
            ),
            ("keygate_session_id", self.session_id.clone()),
            (
                "keygate_session_issued_ms",
                self.session_issued_ms.map(|v| v.to_string()),
            ),
            (
                "keygate_session_expires_ms",
                self.session_expires_ms.map(|v| v.to_string()),
            ),
        ];
        f.extend(opt.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
        f
    }
}

/// The metric outcome of a decision, as [`AccessRecord::outcome`] names it,
/// without building the record (no allocation but for a denial).
pub fn decision_outcome(outcome: &Outcome) -> std::borrow::Cow<'static, str> {
    match outcome {
        Outcome::Allowed { .. } => "allowed".into(),
        Outcome::Public => "public".into(),
        Outcome::Denied { denial, .. } => format!("denied_{}", denial.reason.as_str()).into(),
    }
}

/// The filter-state fields of a decision, as [`AccessRecord::fields`] names
/// and renders them (a test checks it), handed to `f` without building the
/// record: no copies of the credential's strings, no vector. Both builds
/// write an allowed request's fields through this on the hot path.
pub fn decision_fields(d: &Decision, x_ratelimit: bool, mut f: impl FnMut(&'static str, &str)) {
    let (decision, reason, credential, rate) = match &d.outcome {
        Outcome::Public => ("public", None, None, None),
        // Its identity is in the request headers set for the upstream.
        // The rate status is borrowed: it is ~200 bytes, read for one number.
        Outcome::Allowed { rate, .. } => ("allowed", None, None, rate.as_ref()),
        Outcome::Denied { denial, credential } => (
            "denied",
            Some(denial.reason.as_str()),
            credential.as_deref(),
            denial.rate.as_ref(),
        ),
    };
    f("keygate_decision", decision);
    if let Some(reason) = reason {
        f("keygate_reason", reason);
    }
    if let Some(c) = credential {
        f("keygate_key_id", &c.key_id);
        f("keygate_tenant", &c.tenant);
        f("keygate_environment", &c.environment);
        if let Some(owner) = &c.owner {
            f("keygate_owner", owner);
        }
    }
    if let Some(scope) = d.required_scope.as_ref().filter(|_| decision != "allowed") {
        f("keygate_scope_required", scope);
    }
    let mut buf = [0u8; 20];
    if let Some(rate) = rate.filter(|_| !x_ratelimit) {
        f(
            "keygate_rate_remaining",
            decimal(rate.remaining.into(), &mut buf),
        );
    }
    if let Some(s) = &d.session {
        f("keygate_session_id", &s.id);
        f("keygate_session_issued_ms", decimal(s.issued_ms, &mut buf));
        f(
            "keygate_session_expires_ms",
            decimal(s.expires_ms, &mut buf),
        );
    }
}

/// `n` in decimal, written into `buf` (a u64 has at most 20 digits).
fn decimal(n: u64, buf: &mut [u8; 20]) -> &str {
    let (mut rest, mut used) = (n, 0);
    for slot in buf.iter_mut().rev() {
        // `rest % 10` < 10: the cast cannot truncate.
        *slot = b'0' + (rest % 10) as u8;
        rest /= 10;
        used += 1;
        if rest == 0 {
            break;
        }
    }
    buf.get(buf.len() - used..)
        .and_then(|digits| std::str::from_utf8(digits).ok())
        .unwrap_or("0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::tests::record;
    use std::rc::Rc;

    fn cred() -> Rc<Credential> {
        Rc::new(Credential::try_from(&record("k", "acme")).unwrap())
    }

    #[test]
    fn allowed_record_names_the_key_not_the_secret() {
        let d = Decision {
            outcome: Outcome::Allowed {
                credential: cred(),
                rate: None,
            },
            required_scope: Some("read".into()),
            session: None,
        };
        let r = AccessRecord::of_decision(&d);
        assert_eq!(r.outcome(), "allowed");
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"decision":"allowed","key_id":"id-k","tenant":"acme","environment":"live","scope_required":"read"}"#
        );
        assert!(!json.contains(&record("k", "acme").key_hash));
    }

    #[test]
    fn a_token_request_records_its_session_but_never_the_token() {
        let d = Decision {
            outcome: Outcome::Allowed {
                credential: cred(),
                rate: None,
            },
            required_scope: None,
            session: Some(TokenSession {
                id: "phone".into(),
                issued_ms: 1_000,
                expires_ms: 61_000,
            }),
        };
        let f = AccessRecord::of_decision(&d).fields(true);
        for field in [
            ("keygate_session_id", "phone"),
            ("keygate_session_issued_ms", "1000"),
            ("keygate_session_expires_ms", "61000"),
        ] {
            assert!(f.contains(&(field.0, field.1.into())), "{field:?} in {f:?}");
        }
    }

    #[test]
    fn denial_records_carry_the_reason_and_metric_outcome() {
        let denial = Denial::new(Reason::IpNotAllowed, "x");
        let d = Decision {
            outcome: Outcome::Denied {
                denial,
                credential: Some(cred()),
            },
            required_scope: None,
            session: None,
        };
        let r = AccessRecord::of_decision(&d);
        assert_eq!(
            (r.reason, r.outcome().as_str()),
            (Some("ip_not_allowed"), "denied_ip_not_allowed")
        );
        assert!(r.fields(true).contains(&("keygate_key_id", "id-k".into())));
        let anon = Decision {
            outcome: Outcome::Denied {
                denial: Denial::new(Reason::UnknownKey, "x"),
                credential: None,
            },
            required_scope: None,
            session: None,
        };
        assert_eq!(
            AccessRecord::of_decision(&anon).fields(true),
            vec![
                ("keygate_decision", "denied".into()),
                ("keygate_reason", "unknown_key".into())
            ]
        );
    }

    #[test]
    fn an_allowed_request_writes_only_its_decision_the_headers_carry_the_rest() {
        let rate = crate::rate_limit::check(
            crate::rate_limit::RateLimit {
                requests: 10,
                window_secs: 60,
            },
            None,
            crate::testing::NOW,
        )
        .0;
        let d = Decision {
            outcome: Outcome::Allowed {
                credential: cred(),
                rate: Some(rate),
            },
            required_scope: Some("read".into()),
            session: None,
        };
        let r = AccessRecord::of_decision(&d);
        assert!(r.identity_in_request_headers());
        assert_eq!(r.fields(true), vec![("keygate_decision", "allowed".into())]);
        // Without the x-ratelimit-* headers the budget has no other way out.
        assert_eq!(
            r.fields(false),
            vec![
                ("keygate_decision", "allowed".into()),
                ("keygate_rate_remaining", "9".into())
            ]
        );
        // The decision log line still has everything.
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""key_id":"id-k""#) && json.contains(r#""scope_required":"read""#));
    }

    #[test]
    fn a_login_and_a_denial_write_their_identity_as_filter_state() {
        let login = AccessRecord {
            decision: "allowed",
            reason: Some("login"),
            ..AccessRecord::default()
        }
        .with_credential(Some(&cred()));
        assert!(!login.identity_in_request_headers());
        let f = login.fields(true);
        for name in ["keygate_key_id", "keygate_tenant", "keygate_environment"] {
            assert!(f.iter().any(|(n, _)| *n == name), "{name} in {f:?}");
        }
        let denied = Decision {
            outcome: Outcome::Denied {
                denial: Denial::new(Reason::InsufficientScope, "x"),
                credential: Some(cred()),
            },
            required_scope: Some("write".into()),
            session: None,
        };
        let f = AccessRecord::of_decision(&denied).fields(true);
        assert!(f.contains(&("keygate_tenant", "acme".into())));
        assert!(f.contains(&("keygate_scope_required", "write".into())));
    }

    #[test]
    fn decision_fields_match_the_record_and_its_outcome() {
        use crate::testing::{policy, rec, req, MemoryHost, NOW};
        let mut r = rec("k1", "key-one");
        r.rate_limit = Some(crate::rate_limit::RateLimit {
            requests: 2,
            window_secs: 60,
        });
        r.owner = Some("alice".into());
        let p = policy(vec![r], "");
        let mut host = MemoryHost::default();
        let mut decisions: Vec<Decision> = [
            ("GET", "/v1/items", Some("key-one")),
            ("GET", "/health", None),
            ("GET", "/v1/items", Some("nope")),
            ("GET", "/v1/items", None),
            ("GET", "/admin/x", Some("key-one")),
            ("GET", "/v1/items", Some("key-one")),
            ("GET", "/v1/items", Some("key-one")),
        ]
        .iter()
        .map(|(m, path, key)| {
            let h: Vec<(&str, &str)> = key.iter().map(|k| ("x-api-key", *k)).collect();
            crate::verdict::decide(&p, &req(m, path, &h), &mut host, NOW)
        })
        .collect();
        assert!(decisions.iter().any(|d| matches!(&d.outcome,
            Outcome::Denied { denial, .. } if denial.reason == Reason::RateLimited)));
        let mut token = crate::verdict::decide(&p, &req("GET", "/v1/items", &[]), &mut host, NOW);
        token.session = Some(TokenSession {
            id: "phone".into(),
            issued_ms: 1_000,
            expires_ms: u64::MAX,
        });
        decisions.push(token);
        for d in &decisions {
            let record = AccessRecord::of_decision(d);
            assert_eq!(decision_outcome(&d.outcome), record.outcome());
            for x_ratelimit in [true, false] {
                let mut written = Vec::new();
                decision_fields(d, x_ratelimit, |k, v| written.push((k, v.to_owned())));
                assert_eq!(written, record.fields(x_ratelimit), "{d:?}");
            }
        }
    }

    #[test]
    fn decimal_renders_like_to_string() {
        for n in [0, 7, 10, 99, 1000, 4_294_967_295, u64::MAX] {
            let mut buf = [0u8; 20];
            assert_eq!(decimal(n, &mut buf), n.to_string());
        }
    }

    #[test]
    fn every_outcome_has_a_predefined_metric() {
        let all: Vec<String> = outcomes().collect();
        for r in Reason::ALL {
            assert!(all.contains(&format!("denied_{}", r.as_str())));
        }
        assert!(all.contains(&"public".to_owned()) && all.contains(&"login".to_owned()));
    }
}
