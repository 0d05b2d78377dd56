//! The request decision: authenticate → authorize → rate-limit, as a pure
//! function of the request facts, the policy, the credential source, the
//! clock and the counter state. The filter only gathers facts and applies it.

use crate::config::{KeyFormat, Policy};
use crate::credential::Credential;
use crate::denial::{Denial, Reason};
use crate::extract::{extract, ExtractError, Presented, Scheme};
use crate::hash::{ct_eq, is_hex64, sha256, Digest};
use crate::ip_rules::{client_ip, is_allowed};
use crate::key_format::{self, Shape};
use crate::limits::{
    acquire_rules, acquire_tenant, combine, decode_plan, plan_key, refusal_message, release_rules,
    rules, tenant_policies, Rule,
};
use crate::path::normalize;
use crate::rate_limit::RateStatus;
use crate::scope::{grants, Access};
use crate::shared_data::{revocations_key, with_counter_key, CounterCell};
use crate::sync::{LimitCell, SyncState};
use crate::token::{self, Claims, TokenError, Tokens, VerifiedTokens};
use std::borrow::Cow;
use std::rc::Rc;

/// What the decision needs from its surroundings (Envoy, or a test double).
pub trait Host {
    /// A credential from the dynamic source (shared data pushed by the sidecar).
    fn lookup(&mut self, key_hash: &Digest) -> Option<Rc<Credential>>;
    /// The peer address as Envoy reports it (`ip:port`); asked only when needed.
    fn peer_address(&mut self) -> Option<String>;
    /// [`Host::peer_address`], borrowed where the host can hand out its own
    /// copy (the native build: Envoy's): no allocation per request.
    fn peer_address_ref(&mut self) -> Option<Cow<'_, str>> {
        self.peer_address().map(Cow::Owned)
    }
    /// A credential from the dynamic source by key id (the token path: a
    /// token names its key by id, not by hash).
    fn lookup_key_id(&mut self, _key_id: &str) -> Option<Rc<Credential>> {
        None
    }
    /// Where rate-limit state lives, shared by every worker.
    fn counters(&mut self) -> &mut dyn CounterCell;
    /// The sync state plan and tenant entries are read under (which of
    /// their slots is served, `crate::sync::LimitCell`): the one the
    /// credential lookup of this decision read if any, else (and when
    /// `fresh`) the one held now.
    fn sync_state(&mut self, fresh: bool) -> SyncState;
    /// Tokens already verified on this VM, if the host keeps them: the
    /// policy stays immutable, so the cache is the host's to own.
    fn verified_tokens(&mut self) -> Option<&mut VerifiedTokens> {
        None
    }
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
    pub required_scope: Option<Rc<str>>,
    /// The session of the issued token an allowed request presented, for
    /// the access log (the management plane lists sessions from it).
    pub session: Option<TokenSession>,
}

/// An issued token's session as the access log shows it: never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSession {
    /// The login's `session_id` (empty for a login without one).
    pub id: String,
    pub issued_ms: u64,
    pub expires_ms: u64,
}

impl TokenSession {
    fn of(claims: &Claims) -> TokenSession {
        TokenSession {
            id: claims.sid.clone(),
            issued_ms: claims.iat_ms,
            expires_ms: claims.exp_ms,
        }
    }
}

impl Decision {
    /// The rate status to report on the response, if the budget was checked.
    pub fn rate(&self) -> Option<&RateStatus> {
        match &self.outcome {
            Outcome::Allowed { rate, .. } => rate.as_ref(),
            Outcome::Denied { denial, .. } => denial.rate.as_ref(),
            Outcome::Public => None,
        }
    }
}

/// Request headers as the decision reads them: by lowercase name, a repeated
/// header's values joined with ',' (as Envoy does for inline headers such as
/// `authorization`, and for `x-api-key` when registered inline, see
/// envoy/envoy.yaml). The filter reads each one from Envoy on demand: fetching
/// all headers at once costs more than the few the decision needs.
pub trait Headers {
    fn get(&self, name: &str) -> Option<Vec<u8>>;

    /// Whether the request has `name`; a host that can tell without
    /// copying the value overrides this.
    fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// [`Headers::get`], borrowed where the host can (a single value it
    /// holds already): the headers every decision reads cost no copy then.
    fn get_ref(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        self.get(name).map(Cow::Owned)
    }
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

pub(super) fn deny(
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
    let method = headers.get_ref(":method").unwrap_or_default();
    let method = std::str::from_utf8(&method).unwrap_or("");
    let raw_path = headers.get_ref(":path").unwrap_or_default();
    let path = match normalize(&raw_path) {
        Ok(p) => p,
        Err(_) => {
            return Decision {
                outcome: deny(Reason::BadPath, "Malformed request path", None),
                required_scope: None,
                session: None,
            }
        }
    };
    let access = policy.routes.access(method, &path);
    let required_scope = match access {
        Access::Scope(s) => Some(s.name.clone()),
        _ => None,
    };
    let (outcome, session) = match access {
        Access::Public => (Outcome::Public, None),
        _ => authorize(policy, headers, access, host, now_ns),
    };
    // Only a request the token got through counts as the session's use.
    let session = session.filter(|_| matches!(outcome, Outcome::Allowed { .. }));
    Decision {
        outcome,
        required_scope,
        session,
    }
}

fn authorize(
    policy: &Policy,
    headers: &dyn Headers,
    access: &Access,
    host: &mut dyn Host,
    now_ns: u64,
) -> (Outcome, Option<TokenSession>) {
    let authorization = headers.get_ref("authorization");
    let api_key = headers.get_ref(&policy.api_key_header);
    let presented = match extract(authorization.as_deref(), api_key.as_deref()) {
        Ok(p) => p,
        Err(ExtractError::Missing) => {
            return (
                deny(
                    Reason::MissingCredential,
                    ExtractError::Missing.message(),
                    None,
                ),
                None,
            )
        }
        Err(e) => return (deny(Reason::MalformedCredential, e.message(), None), None),
    };
    match authenticate(policy, &presented, host, now_ns, true) {
        Ok((cred, session)) => (
            check_credential(policy, headers, access, cred, host, now_ns),
            session,
        ),
        Err(outcome) => (outcome, None),
    }
}

/// Who is calling: the live credential behind an API key (and secret) or,
/// when `allow_tokens`, behind an issued bearer token (then with its session).
// The refusal carries its rate status, whose policy list is inline (no
// allocation per request): a large error value, on the cold path.
#[allow(clippy::result_large_err)]
pub(super) fn authenticate(
    policy: &Policy,
    presented: &Presented,
    host: &mut dyn Host,
    now_ns: u64,
    allow_tokens: bool,
) -> Result<(Rc<Credential>, Option<TokenSession>), Outcome> {
    if let Some(tokens) = policy.tokens.as_ref().filter(|_| allow_tokens) {
        if presented.scheme == Scheme::Bearer && presented.key.starts_with(token::PREFIX) {
            return authenticate_token(policy, tokens, &presented.key, host, now_ns)
                .map(|(cred, session)| (cred, Some(session)));
        }
    }
    // An identifiable key is checked by its checksum first: a typo or a
    // made-up key of that shape costs no lookup.
    match key_format::classify(&presented.key, &policy.key_prefixes) {
        Shape::Other => {}
        Shape::Valid => {
            let key_hash = sha256(presented.key.as_bytes());
            return authenticate_hash(policy, presented, host, now_ns, &key_hash);
        }
        Shape::Malformed => {
            return Err(deny(
                Reason::MalformedCredential,
                "Invalid API key format",
                None,
            ))
        }
        Shape::BadChecksum => {
            return Err(deny(
                Reason::MalformedCredential,
                "Invalid API key: checksum mismatch (mistyped or truncated key?)",
                None,
            ))
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
    authenticate_hash(policy, presented, host, now_ns, &key_hash)
}

/// The credential behind a presented key's hash, its secret checked.
#[allow(clippy::result_large_err)]
fn authenticate_hash(
    policy: &Policy,
    presented: &Presented,
    host: &mut dyn Host,
    now_ns: u64,
    key_hash: &Digest,
) -> Result<(Rc<Credential>, Option<TokenSession>), Outcome> {
    let now_secs = now_ns / 1_000_000_000;
    let Some(cred) = find(policy, host, key_hash, now_secs) else {
        return Err(deny(Reason::UnknownKey, "Invalid API key", None));
    };
    match (&cred.secret_hash, &presented.secret) {
        (None, None) => Ok((cred, None)),
        (Some(_), Some(secret)) if cred.secret_matches(&sha256(secret.as_bytes()), now_secs) => {
            Ok((cred, None))
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

/// The credential `key_hash` names: its own key, or the value a roll
/// replaced while the grace lasts (the host resolves that hash to the rolled
/// credential, which carries the old hash and its deadline).
fn find(
    policy: &Policy,
    host: &mut dyn Host,
    key_hash: &Digest,
    now_secs: u64,
) -> Option<Rc<Credential>> {
    let found = policy
        .credentials
        .get(key_hash)
        .cloned()
        .or_else(|| host.lookup(key_hash));
    found.filter(|c| c.key_matches(key_hash, now_secs))
}

/// The credential with `key_id`: plugin config first, then the store.
fn find_by_key_id(policy: &Policy, host: &mut dyn Host, key_id: &str) -> Option<Rc<Credential>> {
    let found = match policy.by_key_id.get(key_id) {
        Some(hash) => policy.credentials.get(hash).cloned(),
        None => host.lookup_key_id(key_id),
    };
    found.filter(|c| c.key_id == key_id)
}

/// Whether `claims` were issued for exactly `cred`: its key hash and the
/// secret current now, or the previous secret while its grace window lasts
/// (a token issued under a rotated secret ends with that window).
pub(super) fn is_bound(tokens: &Tokens, claims: &Claims, cred: &Credential, now_secs: u64) -> bool {
    let matches_key = |key_hash: &Digest, secret: Option<&Digest>| {
        tokens
            .credential_ref(&claims.signer, key_hash, secret)
            .is_some_and(|r| ct_eq(&sha256(r.as_bytes()), &sha256(claims.cref.as_bytes())))
    };
    let matches = |secret: Option<&Digest>| matches_key(&cred.key_hash, secret);
    let current = matches(cred.secret_hash.as_ref());
    let previous = cred
        .previous_secret
        .is_some_and(|(h, until)| now_secs < until && matches(Some(&h)));
    // A token issued under a rolled key's old value lasts as long as that value.
    let rolled = cred.previous_key.is_some_and(|(old, until)| {
        now_secs < until && matches_key(&old, cred.secret_hash.as_ref())
    });
    current || previous || rolled
}

/// A token is only as good as the key behind it: the credential is looked up
/// live and the token's reference recomputed, so revoking, deactivating,
/// re-creating or re-secreting the key stops its tokens at once.
// The refusal carries its rate status, whose policy list is inline (no
// allocation per request): a large error value, on the cold path.
#[allow(clippy::result_large_err)]
fn authenticate_token(
    policy: &Policy,
    tokens: &Tokens,
    presented: &str,
    host: &mut dyn Host,
    now_ns: u64,
) -> Result<(Rc<Credential>, TokenSession), Outcome> {
    let now_ms = now_ns / 1_000_000;
    let verified = match host.verified_tokens() {
        Some(cache) => tokens.verify_cached(presented, now_ms, cache),
        None => tokens.verify(presented, now_ms),
    };
    let claims = match verified {
        Ok(c) => c,
        Err(TokenError::Expired) => return Err(deny(Reason::Expired, "Token has expired", None)),
        Err(TokenError::Invalid) => return Err(deny(Reason::UnknownKey, "Invalid token", None)),
    };
    let cred = find_by_key_id(policy, host, &claims.kid)
        .filter(|c| is_bound(tokens, &claims, c, now_ns / 1_000_000_000))
        .ok_or_else(|| deny(Reason::UnknownKey, "Invalid token", None))?;
    let Ok(revocations) = token::decode_revocations(
        host.counters()
            .load(&revocations_key(&cred.key_id))
            .0
            .as_deref(),
    ) else {
        return Err(unreadable_revocations(&cred));
    };
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
    Ok((cred, TokenSession::of(&claims)))
}

/// Fail closed: a revocation list that cannot be read refuses the request.
pub(super) fn unreadable_revocations(cred: &Rc<Credential>) -> Outcome {
    deny(
        Reason::Internal,
        "The gateway could not process this request",
        Some(cred),
    )
}

/// What any credential must pass, however it was presented.
pub(super) fn check_credential(
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
        // Each fact is a host call on the request path: the peer address
        // only when no hops are trusted, X-Forwarded-For only when some are.
        let allowed = {
            let peer = (policy.trusted_xff_hops == 0)
                .then(|| host.peer_address_ref())
                .flatten();
            let xff = (policy.trusted_xff_hops > 0)
                .then(|| headers.get("x-forwarded-for"))
                .flatten();
            let ip = client_ip(peer.as_deref(), xff.as_deref(), policy.trusted_xff_hops);
            is_allowed(&cred.allowed_ips, ip)
        };
        if !allowed {
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
    let rate = match limit(policy, &cred, host, now_ns) {
        Ok(rate) => rate,
        Err(refusal) => return refusal,
    };
    Outcome::Allowed {
        credential: cred,
        rate,
    }
}

/// Takes the request from every budget it counts against (`crate::limits`):
/// the key's own limits, else its plan's, else the plugin's default; then
/// its tenant's. The status to report, or the refusal.
// The refusal carries its rate status, whose policy list is inline (no
// allocation per request): a large error value, on the cold path.
#[allow(clippy::result_large_err)]
fn limit(
    policy: &Policy,
    cred: &Rc<Credential>,
    host: &mut dyn Host,
    now_ns: u64,
) -> Result<Option<RateStatus>, Outcome> {
    let plan_rules;
    let default_rule;
    let key_rules: &[Rule] = if !cred.own_rules.is_empty() {
        &cred.own_rules
    } else {
        let plan = match &cred.plan {
            None => None,
            // Sync serves a plan from the same commit as the first key on
            // it, if not before: one that cannot be read refuses the request.
            Some(name) => Some(
                with_limits(host, |cell| {
                    decode_plan(cell.load(&plan_key(name)).0.as_deref())
                })
                .ok_or_else(|| unreadable_limits(cred))?,
            ),
        };
        match plan.filter(|limits| !limits.is_empty()) {
            Some(limits) => {
                plan_rules = rules(&limits, false);
                &plan_rules
            }
            None => {
                default_rule = policy.rate_limit.map(Rule::of_rate_limit);
                default_rule.as_slice()
            }
        }
    };
    // Credits count on top of whichever limits apply.
    let with_credits;
    let key_rules: &[Rule] = match cred.credits {
        None => key_rules,
        Some(c) => {
            with_credits = key_rules
                .iter()
                .copied()
                .chain([c.rule()])
                .collect::<Vec<_>>();
            &with_credits
        }
    };
    let key = (!key_rules.is_empty()).then(|| {
        with_counter_key(&cred.key_id, |key| {
            acquire_rules(host.counters(), key, key_rules, now_ns)
        })
    });
    if let Some(mut status) = key.filter(|s| !s.allowed) {
        // Refused by the key: the tenant's budget is not touched, but its
        // limits are listed too.
        if cred.tenant_limits {
            let tenant = with_limits(host, |cell| tenant_policies(cell, &cred.tenant, now_ns));
            status.policies.extend(&tenant);
        }
        return Err(rate_limited(status, cred));
    }
    let tenant = if cred.tenant_limits {
        with_limits(host, |cell| acquire_tenant(cell, &cred.tenant, now_ns))
            .map_err(|_| unreadable_limits(cred))?
    } else {
        None
    };
    match combine(key, tenant) {
        Some(status) if !status.allowed => {
            // The tenant refused what the key admitted: the key gets it back.
            if key.is_some() {
                with_counter_key(&cred.key_id, |key| {
                    release_rules(host.counters(), key, key_rules, now_ns)
                });
            }
            Err(rate_limited(status, cred))
        }
        status => Ok(status),
    }
}

fn rate_limited(status: RateStatus, cred: &Rc<Credential>) -> Outcome {
    let denial = Denial {
        rate: Some(status),
        ..Denial::new(Reason::RateLimited, refusal_message(&status))
    };
    Outcome::Denied {
        denial,
        credential: Some(cred.clone()),
    }
}

/// `f` over the plan and tenant entries as served under the sync state
/// (`crate::sync::LimitCell`); once more under the state held now if an
/// entry served nothing under the one this decision read (a push committed
/// since). `f` writes nothing to an entry that serves nothing.
fn with_limits<T>(host: &mut dyn Host, mut f: impl FnMut(&mut dyn CounterCell) -> T) -> T {
    let mut state = host.sync_state(false);
    let mut out;
    // A stale read wrote nothing, so it can be made again; each retry needs
    // a newer commit than the last, so a few cover any real interleaving.
    let mut tries = 0;
    loop {
        let mut cell = LimitCell::new(host.counters(), state);
        out = f(&mut cell);
        tries += 1;
        if !cell.stale() || tries == LIMIT_READS {
            return out;
        }
        let fresh = host.sync_state(true);
        if fresh == state {
            return out;
        }
        state = fresh;
    }
}

/// Most reads of a plan or tenant entry in one request (see [`with_limits`]).
const LIMIT_READS: u32 = 4;

/// Fail closed: a plan or tenant entry that cannot be read refuses.
fn unreadable_limits(cred: &Rc<Credential>) -> Outcome {
    deny(
        Reason::Internal,
        "The gateway could not process this request",
        Some(cred),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::{Kind, Status};
    use crate::hash::to_hex;
    use crate::testing::{committed_limit, denied, policy, rec, req, run, MemoryHost, NOW};

    fn store_key(
        host: &mut MemoryHost,
        key: &str,
        edit: impl FnOnce(&mut crate::CredentialRecord),
    ) {
        let mut r = crate::credential::tests::record(key, "acme");
        r.key_id = format!("k-{key}");
        edit(&mut r);
        let c = Credential::try_from(&r).unwrap();
        host.dynamic.insert(c.key_hash, Rc::new(c));
    }

    fn get(p: &crate::Policy, host: &mut MemoryHost, key: &str) -> Decision {
        run(p, &req("GET", "/v1/items", &[("x-api-key", key)]), host)
    }

    #[test]
    fn a_key_on_a_plan_meets_the_plans_limits_and_a_missing_plan_refuses() {
        use crate::limits::{encode_plan, plan_key};
        let p = policy(vec![], r#","rate_limit":{"requests":100,"window_secs":60}"#);
        let mut host = MemoryHost::default();
        store_key(&mut host, "planned", |r| r.plan = Some("free".into()));
        assert_eq!(
            denied(&get(&p, &mut host, "planned")).map(|(r, _)| r),
            Some(Reason::Internal),
            "a plan that cannot be read refuses"
        );
        host.counters.insert(
            plan_key("free"),
            committed_limit(encode_plan(&["1/min".parse().unwrap()])),
        );
        let d = get(&p, &mut host, "planned");
        assert_eq!(d.rate().map(|r| (r.limit.requests, r.tag)), Some((1, 2)));
        let refused = get(&p, &mut host, "planned");
        assert_eq!(denied(&refused).map(|(r, _)| r), Some(Reason::RateLimited));
        // A plan without limits leaves the plugin's default.
        host.counters
            .insert(plan_key("free"), committed_limit(encode_plan(&[])));
        let d = get(&p, &mut host, "planned");
        assert_eq!(d.rate().map(|r| (r.limit.requests, r.tag)), Some((100, 0)));
    }

    /// A host whose key `planned` is on plan `free`, whose entry holds only
    /// the slot a commit at `stamp` left (7/min); the decision's lookup read
    /// the state of stamp 1.
    fn plan_restaged_at(stamp: u64) -> MemoryHost {
        use crate::limits::{encode_plan, plan_key};
        use crate::sync::{encode_limit_slots, Slot};
        let mut host = MemoryHost::default();
        store_key(&mut host, "planned", |r| r.plan = Some("free".into()));
        host.counters.insert(
            plan_key("free"),
            encode_limit_slots(&[Slot {
                stamp,
                generation: 0,
                record: Some(encode_plan(&["7/min".parse().unwrap()])),
            }]),
        );
        host.state = state_at(1);
        host
    }

    fn state_at(stamp: u64) -> crate::sync::SyncState {
        crate::sync::SyncState {
            stamp,
            ..Default::default()
        }
    }

    #[test]
    fn a_plan_entry_serving_nothing_under_the_lookups_state_is_read_again_under_the_current_one() {
        let p = policy(vec![], "");
        let mut host = plan_restaged_at(2);
        assert_eq!(
            denied(&get(&p, &mut host, "planned")).map(|(r, _)| r),
            Some(Reason::Internal),
            "no newer state to read: refused"
        );
        host.fresh_state = Some(state_at(2));
        let d = get(&p, &mut host, "planned");
        assert_eq!(d.rate().map(|r| r.limit.requests), Some(7));
    }

    #[test]
    fn a_plan_entry_restaged_by_commits_during_the_request_is_read_until_one_serves_it() {
        let p = policy(vec![], "");
        let mut host = plan_restaged_at(3);
        // A commit at 2 (whose slot a commit at 3 already replaced), then 3.
        host.later_states = vec![state_at(2), state_at(3)];
        let d = get(&p, &mut host, "planned");
        assert_eq!(d.rate().map(|r| r.limit.requests), Some(7), "{d:?}");
        // Reads stop when the state no longer moves: refused, not a loop.
        host.state = state_at(1);
        host.later_states = vec![state_at(2), state_at(2)];
        assert_eq!(
            denied(&get(&p, &mut host, "planned")).map(|(r, _)| r),
            Some(Reason::Internal)
        );
    }

    #[test]
    fn own_limits_win_over_the_plan_and_the_tenant_limit_counts_on_top() {
        use crate::limits::{encode_plan, plan_key, retarget_tenant, tenant_key};
        let p = policy(vec![], "");
        let mut host = MemoryHost::default();
        host.counters.insert(
            plan_key("free"),
            committed_limit(encode_plan(&["1/min".parse().unwrap()])),
        );
        host.counters.insert(
            tenant_key("acme"),
            committed_limit(retarget_tenant(None, &["3/min".parse().unwrap()])),
        );
        for key in ["a", "b"] {
            store_key(&mut host, key, |r| {
                r.plan = Some("free".into());
                r.limits = vec!["10/min".parse().unwrap(), "1000/day".parse().unwrap()];
                r.tenant_limits = true;
            });
        }
        let d = get(&p, &mut host, "a");
        let rate = d.rate().unwrap();
        let names: Vec<u8> = rate.policies.iter().map(|(t, _)| t).collect();
        assert_eq!(
            names,
            vec![2, 4, 0x12],
            "own minute and day, the tenant's minute"
        );
        assert_eq!((rate.tag, rate.remaining), (0x12, 2));
        assert!(matches!(
            get(&p, &mut host, "b").outcome,
            Outcome::Allowed { .. }
        ));
        assert!(matches!(
            get(&p, &mut host, "a").outcome,
            Outcome::Allowed { .. }
        ));
        let before = host.counters.get("r:k-b").cloned();
        let refused = get(&p, &mut host, "b");
        let (reason, message) = denied(&refused).unwrap();
        assert_eq!(reason, Reason::RateLimited);
        assert!(
            message.starts_with("Tenant rate limit exceeded"),
            "{message}"
        );
        let counted = |c: Option<&Vec<u8>>| crate::limits::Counters::decode(c.map(Vec::as_slice));
        assert_eq!(
            counted(host.counters.get("r:k-b")),
            counted(before.as_ref()),
            "what the tenant refused does not use the key's budget"
        );
        // A key flagged for tenant limits whose tenant entry is missing refuses.
        host.counters.remove(&tenant_key("acme"));
        assert_eq!(
            denied(&get(&p, &mut host, "a")).map(|(r, _)| r),
            Some(Reason::Internal)
        );
    }

    #[test]
    fn a_key_refusal_lists_the_tenant_limits_without_counting_them() {
        use crate::limits::{retarget_tenant, tenant_key};
        let p = policy(vec![], "");
        let mut host = MemoryHost::default();
        host.counters.insert(
            tenant_key("acme"),
            committed_limit(retarget_tenant(None, &["3/min".parse().unwrap()])),
        );
        store_key(&mut host, "a", |r| {
            r.limits = vec!["1/min".parse().unwrap()];
            r.tenant_limits = true;
        });
        assert!(matches!(
            get(&p, &mut host, "a").outcome,
            Outcome::Allowed { .. }
        ));
        let tenant_before = host.counters.get(&tenant_key("acme")).cloned();
        let refused = get(&p, &mut host, "a");
        let rate = refused.rate().unwrap();
        assert!(!rate.allowed);
        let tags: Vec<u8> = rate.policies.iter().map(|(t, _)| t).collect();
        assert_eq!(tags, vec![2, 0x12]);
        assert_eq!(
            host.counters.get(&tenant_key("acme")),
            tenant_before.as_ref()
        );
    }

    #[test]
    fn valid_key_is_allowed_with_identity_headers() {
        let p = policy(vec![rec("k1", "key-one")], "");
        let h = req(
            "GET",
            "/v1/items",
            &[("x-api-key", "key-one"), ("x-keygate-tenant", "evil")],
        );
        let d = run(&p, &h, &mut MemoryHost::default());
        assert!(matches!(d.outcome, Outcome::Allowed { .. }), "{d:?}");
        let edits = d.upstream_headers(&p, &h);
        // A key without owner: a client-sent owner header goes too.
        assert_eq!(edits.remove.to_vec(), vec!["x-api-key", "x-keygate-owner"]);
        assert!(edits.set.contains(&("x-keygate-tenant", "acme")));
        assert!(edits.set.contains(&("x-keygate-key-id", "k1")));
    }

    fn identifiable(env: &str) -> String {
        let mut n = 7u8;
        let random = crate::key_format::random_chars(|b: &mut [u8]| {
            b.iter_mut().for_each(|x| {
                n = n.wrapping_mul(31).wrapping_add(11);
                *x = n;
            });
            Ok::<_, ()>(())
        })
        .unwrap();
        crate::key_format::compose("kg", env, &random)
    }

    #[test]
    fn an_identifiable_key_with_a_bad_checksum_is_refused_without_a_lookup() {
        let key = identifiable("live");
        let p = policy(vec![], "");
        let mut host = MemoryHost::default();
        let c = Credential::try_from(&rec("dyn", &key)).unwrap();
        host.dynamic.insert(c.key_hash, Rc::new(c));
        let d = run(&p, &req("GET", "/v1", &[("x-api-key", &key)]), &mut host);
        assert!(matches!(d.outcome, Outcome::Allowed { .. }), "{d:?}");
        assert_eq!(host.lookups, 1);
        let mut typo = key.clone().into_bytes();
        let last = typo.len() - 1;
        typo[last] = if typo[last] == b'0' { b'1' } else { b'0' };
        let typo = String::from_utf8(typo).unwrap();
        let d = run(&p, &req("GET", "/v1", &[("x-api-key", &typo)]), &mut host);
        assert_eq!(
            denied(&d),
            Some((
                Reason::MalformedCredential,
                "Invalid API key: checksum mismatch (mistyped or truncated key?)"
            ))
        );
        let d = run(
            &p,
            &req("GET", "/v1", &[("x-api-key", "kg_live_short")]),
            &mut host,
        );
        assert_eq!(
            denied(&d),
            Some((Reason::MalformedCredential, "Invalid API key format"))
        );
        assert_eq!(host.lookups, 1, "refused keys cost no lookup");
        // A valid checksum on an unknown key is looked up (and unknown).
        let d = run(
            &p,
            &req("GET", "/v1", &[("x-api-key", &identifiable("test"))]),
            &mut host,
        );
        assert_eq!(denied(&d), Some((Reason::UnknownKey, "Invalid API key")));
        assert_eq!(host.lookups, 2);
    }

    #[test]
    fn identifiable_keys_pass_a_hex64_gate_and_other_keys_still_must_be_hex() {
        let key = identifiable("live");
        let p = policy(vec![rec("k1", &key)], r#","key_format":"hex64""#);
        let d = run(
            &p,
            &req("GET", "/v1", &[("x-api-key", &key)]),
            &mut MemoryHost::default(),
        );
        assert!(matches!(d.outcome, Outcome::Allowed { .. }), "{d:?}");
        let d = run(
            &p,
            &req("GET", "/v1", &[("x-api-key", "not-hex-key")]),
            &mut MemoryHost::default(),
        );
        assert_eq!(
            denied(&d),
            Some((Reason::MalformedCredential, "Invalid API key format"))
        );
    }

    #[test]
    fn without_key_prefixes_an_identifiable_key_is_only_looked_up() {
        let p = policy(vec![], r#","key_prefixes":[]"#);
        let mut host = MemoryHost::default();
        let d = run(
            &p,
            &req("GET", "/v1", &[("x-api-key", "kg_live_short")]),
            &mut host,
        );
        assert_eq!(denied(&d), Some((Reason::UnknownKey, "Invalid API key")));
        assert_eq!(host.lookups, 1);
    }

    #[test]
    fn owner_and_allowlisted_metadata_go_upstream_and_spoofed_copies_go() {
        let mut r = rec("k1", "key-one");
        r.owner = Some("alice@example.com".into());
        r.metadata = [("plan_tier".into(), "gold".into())].into_iter().collect();
        let p = policy(
            vec![r],
            r#","headers":{"metadata":{"plan_tier":"x-keygate-meta-plan-tier","region":"x-keygate-meta-region"}}"#,
        );
        let h = req(
            "GET",
            "/v1",
            &[
                ("x-api-key", "key-one"),
                ("x-keygate-owner", "mallory"),
                ("x-keygate-meta-region", "spoofed"),
            ],
        );
        let d = run(&p, &h, &mut MemoryHost::default());
        let edits = d.upstream_headers(&p, &h);
        assert!(edits
            .set
            .contains(&("x-keygate-owner", "alice@example.com")));
        assert!(edits.set.contains(&("x-keygate-meta-plan-tier", "gold")));
        assert!(edits.remove.contains(&"x-keygate-meta-region"));
        // Public routes drop every identity header, owner and metadata included.
        let h = req("GET", "/health", &[("x-keygate-owner", "mallory")]);
        let d = run(&p, &h, &mut MemoryHost::default());
        let remove = d.upstream_headers(&p, &h).remove;
        for name in [
            "x-keygate-owner",
            "x-keygate-meta-plan-tier",
            "x-keygate-meta-region",
        ] {
            assert!(remove.contains(&name), "{name}");
        }
    }

    #[test]
    fn a_rolled_key_old_value_works_until_its_deadline_and_shares_the_counter() {
        let now_secs = NOW / 1_000_000_000;
        let mut r = rec("k1", "new-value");
        r.previous_key_hash = Some(to_hex(&sha256(b"old-value")));
        r.previous_key_expires_at = Some(now_secs + 10);
        r.rate_limit = Some(crate::rate_limit::RateLimit {
            requests: 2,
            window_secs: 60,
        });
        // From the plugin config.
        let p = policy(vec![r.clone()], "");
        let mut host = MemoryHost::default();
        let get = |key: &str| req("GET", "/v1", &[("x-api-key", key)]);
        let d = decide(&p, &get("old-value"), &mut host, NOW);
        assert!(matches!(d.outcome, Outcome::Allowed { .. }), "{d:?}");
        let d = decide(&p, &get("new-value"), &mut host, NOW);
        assert!(matches!(d.outcome, Outcome::Allowed { .. }), "{d:?}");
        // One budget for both values.
        let d = decide(&p, &get("old-value"), &mut host, NOW);
        assert_eq!(denied(&d).map(|d| d.0), Some(Reason::RateLimited));
        let later = NOW + 10 * 1_000_000_000;
        let d = decide(&p, &get("old-value"), &mut MemoryHost::default(), later);
        assert_eq!(denied(&d), Some((Reason::UnknownKey, "Invalid API key")));
        // From the dynamic source: the host resolves the old hash to the
        // rolled credential.
        let p = policy(vec![], "");
        let mut host = MemoryHost::default();
        let c = Rc::new(Credential::try_from(&r).unwrap());
        host.dynamic.insert(sha256(b"old-value"), c.clone());
        host.dynamic.insert(c.key_hash, c);
        let d = decide(&p, &get("old-value"), &mut host, NOW);
        assert!(matches!(d.outcome, Outcome::Allowed { .. }), "{d:?}");
        let d = decide(&p, &get("old-value"), &mut host, later);
        assert_eq!(denied(&d), Some((Reason::UnknownKey, "Invalid API key")));
    }

    #[test]
    fn public_route_needs_no_key_and_drops_spoofed_identity() {
        let p = policy(vec![], "");
        let h = req("GET", "/health", &[("x-keygate-tenant", "evil")]);
        let d = run(&p, &h, &mut MemoryHost::default());
        assert!(matches!(d.outcome, Outcome::Public));
        assert_eq!(d.upstream_headers(&p, &h).remove.to_vec(), p.headers.all());
    }

    #[test]
    fn a_denial_drops_spoofed_identity_too_for_the_access_log() {
        let p = policy(vec![rec("k1", "key-one")], "");
        let h = req(
            "GET",
            "/v1",
            &[("x-api-key", "no-such-key"), ("x-keygate-tenant", "evil")],
        );
        let d = run(&p, &h, &mut MemoryHost::default());
        assert!(matches!(d.outcome, Outcome::Denied { .. }));
        let edits = d.upstream_headers(&p, &h);
        assert_eq!(
            (edits.remove.to_vec(), edits.set.to_vec()),
            (p.headers.all(), vec![])
        );
    }

    #[test]
    fn missing_and_unknown_keys_are_401() {
        let p = policy(vec![rec("k1", "key-one")], "");
        let d = run(&p, &req("GET", "/v1", &[]), &mut MemoryHost::default());
        assert_eq!(
            denied(&d),
            Some((Reason::MissingCredential, "Missing API key"))
        );
        let d = run(
            &p,
            &req("GET", "/v1", &[("x-api-key", "nope")]),
            &mut MemoryHost::default(),
        );
        assert_eq!(denied(&d), Some((Reason::UnknownKey, "Invalid API key")));
    }

    #[test]
    fn dynamic_source_is_consulted_after_config() {
        let p = policy(vec![], "");
        let mut host = MemoryHost::default();
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
            &mut MemoryHost::default(),
        );
        assert!(matches!(ok.outcome, Outcome::Allowed { .. }));
        let bad = run(
            &p,
            &req("GET", "/v1", &[("authorization", &basic("key-one:wrong"))]),
            &mut MemoryHost::default(),
        );
        assert_eq!(denied(&bad).map(|d| d.0), Some(Reason::WrongSecret));
        let bare = run(
            &p,
            &req("GET", "/v1", &[("x-api-key", "key-one")]),
            &mut MemoryHost::default(),
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
            &mut MemoryHost::default(),
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
            &mut MemoryHost::default(),
        );
        assert_eq!(denied(&d), Some((Reason::Inactive, "API key is inactive")));
        let d = run(
            &p,
            &req("GET", "/v1", &[("x-api-key", "expired")]),
            &mut MemoryHost::default(),
        );
        assert_eq!(denied(&d).map(|d| d.0), Some(Reason::Expired));
    }

    #[test]
    fn ip_allowlist_uses_peer_and_is_only_consulted_when_set() {
        let mut a = rec("k1", "restricted");
        a.allowed_ips = vec!["10.0.0.0/8".into()];
        let p = policy(vec![a, rec("k2", "open")], "");
        let mut host = MemoryHost {
            peer: Some("127.0.0.1:5555".into()),
            ..Default::default()
        };
        let d = run(
            &p,
            &req("GET", "/v1", &[("x-api-key", "restricted")]),
            &mut host,
        );
        assert_eq!(denied(&d).map(|d| d.0), Some(Reason::IpNotAllowed));
        let mut host = MemoryHost {
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
        let mut host = MemoryHost::default();
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
        let mut host = MemoryHost {
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
        let mut host = MemoryHost::default();
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
    fn a_default_key_tells_the_upstream_every_scope_the_gate_knows() {
        let mut d = rec("k2", "default-key");
        d.kind = Kind::Default;
        d.scopes = vec![];
        let scopes_sent = |extra: &str| {
            let p = policy(vec![rec("k1", "reader"), d.clone()], extra);
            let mut host = MemoryHost::default();
            let mut sent = vec![];
            for key in ["default-key", "reader"] {
                let h = req("GET", "/v1/x", &[("x-api-key", key)]);
                let decision = run(&p, &h, &mut host);
                let edits = decision.upstream_headers(&p, &h);
                let scopes = edits.set.iter().find(|(n, _)| *n == "x-keygate-scopes");
                sent.push(scopes.map(|(_, v)| v.to_string()));
            }
            sent
        };
        // The hierarchy first, then scopes only rules name.
        assert_eq!(
            scopes_sent(""),
            [Some("admin write read".into()), Some("read".into())]
        );
        assert_eq!(
            scopes_sent(r#","scope_hierarchy":["write","read","audit"]"#),
            [Some("write read audit admin".into()), Some("read".into())]
        );
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
                &mut MemoryHost::default(),
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
            &mut MemoryHost::default(),
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
            &mut MemoryHost::default(),
        );
        assert_eq!(
            denied(&d),
            Some((Reason::MalformedCredential, "Invalid API key format"))
        );
        let d = run(
            &p,
            &req("GET", "/v1", &[("x-api-key", &key.to_uppercase())]),
            &mut MemoryHost::default(),
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
        let mut host = MemoryHost::default();
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
        let mut host = MemoryHost::default();
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
        let mut host = MemoryHost::default();
        run(
            &p,
            &req("POST", "/v1", &[("x-api-key", "key-one")]),
            &mut host,
        );
        assert!(host.counters.is_empty());
    }

    #[test]
    fn client_address_facts_are_read_only_when_the_hop_setting_needs_them() {
        /// Records every header the decision asks for.
        struct Asked<'a>(&'a [(String, Vec<u8>)], std::cell::RefCell<Vec<String>>);
        impl Headers for Asked<'_> {
            fn get(&self, name: &str) -> Option<Vec<u8>> {
                self.1.borrow_mut().push(name.to_owned());
                Headers::get(self.0, name)
            }
        }
        let mut r = rec("k1", "key-one");
        r.allowed_ips = vec!["127.0.0.0/8".into()];
        let h = req(
            "GET",
            "/v1",
            &[("x-api-key", "key-one"), ("x-forwarded-for", "127.0.0.9")],
        );
        let asked_xff = |a: &Asked| a.1.borrow().iter().any(|n| n == "x-forwarded-for");
        for (extra, want_peer) in [("", true), (r#","trusted_xff_hops":1"#, false)] {
            let p = policy(vec![r.clone()], extra);
            let asked = Asked(&h, Default::default());
            let mut host = MemoryHost {
                peer: Some("127.0.0.1:5000".into()),
                ..Default::default()
            };
            let d = decide(&p, &asked, &mut host, NOW);
            assert!(matches!(d.outcome, Outcome::Allowed { .. }), "{extra}");
            assert_eq!(host.peer_asked, want_peer, "{extra}");
            assert_eq!(asked_xff(&asked), !want_peer, "{extra}");
        }
    }
}
