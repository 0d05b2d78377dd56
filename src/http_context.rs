//! The per-request context of the gate role: gather facts, decide, apply.
//! Every host call goes through [`crate::host`]; one that fails refuses the
//! request with a 500 (fail closed), it never traps the VM.

use crate::host::{self, HostError};
use crate::metrics::Metrics;
use crate::shared_store::{CredentialCache, SharedCounters};
use keygate_core::access_log::{decision_fields, decision_outcome, AccessRecord};
use keygate_core::denial::Reason;
use keygate_core::hash::Digest;
use keygate_core::rate_limit::RateStatus;
use keygate_core::shared_data::CounterCell;
use keygate_core::sync::SyncState;
use keygate_core::token::{VerifiedTokens, MAX_LOGIN_BODY};
use keygate_core::verdict::{
    decide, identity_spellings, is_login, login, rate_limit_headers, Decision, Headers, Host,
    Login, Outcome,
};
use keygate_core::{Credential, Denial, Policy};
use log::{error, info, warn};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::borrow::Cow;
use std::cell::{Cell, OnceCell, RefCell, RefMut};
use std::rc::Rc;

/// The body message of a 500: what failed is logged, not told the client.
const INTERNAL_MESSAGE: &str = "The gateway could not process this request";

pub struct GateContext {
    policy: Option<Rc<Policy>>,
    cache: Rc<RefCell<CredentialCache>>,
    /// Rate status to report on the upstream's response.
    rate: Option<RateStatus>,
    now_ns: u64,
    stage: Stage,
    metrics: Rc<Metrics>,
}

/// Where a request stands. Every callback that can end a request (headers,
/// body, trailers) consults it, so none lets an undecided request through.
enum Stage {
    /// The request headers have not been seen yet.
    Headers,
    /// A token login waiting for its body (and trailers): it is always
    /// answered locally. Keeps the request headers the login needs.
    Login(Vec<(String, Vec<u8>)>),
    /// Decided and allowed (or public): the rest of the request follows.
    Forwarded,
    /// Answered locally (or refused): nothing more goes anywhere.
    Answered,
}

impl GateContext {
    pub fn new(
        policy: Option<Rc<Policy>>,
        cache: Rc<RefCell<CredentialCache>>,
        metrics: Rc<Metrics>,
    ) -> GateContext {
        GateContext {
            policy,
            cache,
            rate: None,
            now_ns: 0,
            stage: Stage::Headers,
            metrics,
        }
    }

    /// Filter state for Envoy's access log (`%FILTER_STATE(wasm.keygate_<field>:…)%`,
    /// only what no header carries: see [`AccessRecord::fields`]), the
    /// decision counter and, if enabled, one JSON log line.
    fn record(&self, record: &AccessRecord, policy: &Policy) {
        if policy.access_log_fields {
            for (name, value) in record.fields(policy.rate_limit_headers.x_ratelimit) {
                // The decision stands without its log fields: say so once.
                if let Err(e) = host::set_property(name, value.as_bytes()) {
                    warn!("access-log fields incomplete: {e}");
                    break;
                }
            }
        }
        self.metrics.count(&record.outcome());
        if policy.log_decisions {
            if let Ok(line) = serde_json::to_string(record) {
                info!("decision {line}");
            }
        }
    }

    /// [`GateContext::record`] for a decision, without building its record
    /// (copies of the credential's strings, a vector, the outcome's name)
    /// unless the decision log line asks for one.
    fn record_decision(&self, decision: &Decision, policy: &Policy) {
        if policy.access_log_fields {
            let mut failed = None;
            decision_fields(
                decision,
                policy.rate_limit_headers.x_ratelimit,
                |name, value| {
                    if failed.is_none() {
                        failed = host::set_property(name, value.as_bytes()).err();
                    }
                },
            );
            if let Some(e) = failed {
                warn!("access-log fields incomplete: {e}");
            }
        }
        self.metrics.count(&decision_outcome(&decision.outcome));
        if policy.log_decisions {
            if let Ok(line) = serde_json::to_string(&AccessRecord::of_decision(decision)) {
                info!("decision {line}");
            }
        }
    }

    fn reply(&self, denial: &Denial, policy: Option<&Policy>) {
        let headers = denial.headers(policy.map_or("keygate", |p| p.realm.as_str()));
        self.send_local(
            denial.status(),
            headers,
            denial.rate.as_ref(),
            policy,
            &denial.body(),
        );
    }

    /// A local reply, with the rate-limit headers when the budget was checked.
    fn send_local(
        &self,
        status: u16,
        mut headers: Vec<(&'static str, String)>,
        rate: Option<&RateStatus>,
        policy: Option<&Policy>,
        body: &[u8],
    ) {
        if let (Some(rate), Some(policy)) = (rate, policy) {
            headers.extend(rate_limit_headers(
                rate,
                policy.rate_limit_headers,
                self.now_ns,
            ));
        }
        let refs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        if let Err(e) = host::send_reply(status, &refs, body) {
            // Nothing else can answer the client; the request stays paused
            // and never reaches upstream.
            error!("cannot send the {status} reply: {e}");
        }
    }

    /// Fail closed: a host call failed, so the request is refused with a
    /// 500 and the failure logged; the access log shows `internal_error`.
    fn fail(&mut self, e: HostError, policy: Option<&Policy>) -> Action {
        self.stage = Stage::Answered;
        error!("refusing a request: {e}");
        let denial = Denial::new(Reason::Internal, INTERNAL_MESSAGE);
        if let Some(policy) = policy {
            // The access log reads identity from the request headers: a
            // client's copies must not stand in this record. Best effort
            // (the host is failing; after a login's headers the calls are
            // refused, and the login removed them already).
            for name in policy.headers.all() {
                let _ = host::set_request_header(name, None);
            }
            let decision = Decision {
                outcome: Outcome::Denied {
                    denial: denial.clone(),
                    credential: None,
                },
                required_scope: None,
                session: None,
            };
            self.record_decision(&decision, policy);
        }
        self.reply(&denial, policy);
        Action::Pause
    }
}

/// The request headers, fetched from Envoy in one call on first use: one
/// copy of the whole map costs Envoy less CPU than the 4–5 single reads a
/// decision makes (bench/RESULTS.md "p5-wasm"), and the header edits need
/// the whole list anyway. Only valid while the request headers are (in
/// `on_http_request_headers`). A failed fetch counts as no headers for the
/// decision, and is kept so that the request is refused with a 500 whatever
/// the decision said.
#[derive(Default)]
struct RequestHeaders {
    all: OnceCell<Vec<(String, Vec<u8>)>>,
    error: Cell<Option<HostError>>,
}

impl Headers for RequestHeaders {
    /// The first value of `name`, as Envoy's single-header read gives it.
    fn get(&self, name: &str) -> Option<Vec<u8>> {
        self.get_ref(name).map(Cow::into_owned)
    }

    fn has(&self, name: &str) -> bool {
        self.pairs().iter().any(|(n, _)| n == name)
    }

    /// The map is held for the whole callback: no copy.
    fn get_ref(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        self.pairs()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| Cow::Borrowed(v.as_slice()))
    }
}

impl RequestHeaders {
    /// Every header the client sent (after Envoy's own edits), in order.
    fn pairs(&self) -> &[(String, Vec<u8>)] {
        self.all.get_or_init(|| {
            host::request_headers().unwrap_or_else(|e| {
                self.error.set(self.error.get().or(Some(e)));
                Vec::new()
            })
        })
    }

    fn snapshot(&self, names: &[&str]) -> Vec<(String, Vec<u8>)> {
        names
            .iter()
            .filter_map(|n| self.get(n).map(|v| ((*n).to_owned(), v)))
            .collect()
    }

    fn error(&self) -> Option<HostError> {
        self.error.get()
    }
}

/// The host side of a decision: shared data and Envoy properties. Keeps the
/// first host error; the caller refuses the request if there was one.
struct EnvoyHost<'a> {
    /// The VM's credential cache, borrowed for this decision (None only if
    /// it is borrowed already, which would be a bug: dynamic keys are then
    /// not found, which refuses rather than admits).
    borrowed: Option<RefMut<'a, CredentialCache>>,
    counters: SharedCounters,
    error: Option<HostError>,
}

impl<'a> EnvoyHost<'a> {
    fn new(cache: &'a RefCell<CredentialCache>) -> EnvoyHost<'a> {
        EnvoyHost {
            borrowed: cache.try_borrow_mut().ok(),
            counters: SharedCounters::default(),
            error: None,
        }
    }

    fn failure(&self) -> Option<HostError> {
        self.error.or(self.counters.error)
    }

    fn keep(&mut self, e: HostError) {
        self.error.get_or_insert(e);
    }
}

impl Host for EnvoyHost<'_> {
    fn lookup(&mut self, key_hash: &Digest) -> Option<Rc<Credential>> {
        match self.borrowed.as_deref_mut()?.lookup(key_hash) {
            Ok(Some((cred, entry))) => {
                // Its rate-limit state is counted in the entry just read.
                self.counters.entry = Some(entry);
                Some(cred)
            }
            Ok(None) => None,
            Err(e) => {
                self.keep(e);
                None
            }
        }
    }

    fn lookup_key_id(&mut self, key_id: &str) -> Option<Rc<Credential>> {
        match self.borrowed.as_deref_mut()?.lookup_key_id(key_id) {
            Ok(Some((cred, entry))) => {
                // A token's requests count in its key's entry too.
                self.counters.entry = Some(entry);
                Some(cred)
            }
            Ok(None) => None,
            Err(e) => {
                self.keep(e);
                None
            }
        }
    }

    fn peer_address(&mut self) -> Option<String> {
        match host::property(&["source", "address"]) {
            Ok(bytes) => String::from_utf8(bytes?).ok(),
            Err(e) => {
                self.keep(e);
                None
            }
        }
    }

    fn counters(&mut self) -> &mut dyn CounterCell {
        &mut self.counters
    }

    fn sync_state(&mut self, fresh: bool) -> SyncState {
        // The state the credential was looked up under: no second read.
        if let Some(entry) = self.counters.entry.as_ref().filter(|_| !fresh) {
            return entry.state();
        }
        let read = self.borrowed.as_deref_mut().map(|c| c.sync_state());
        match read {
            Some(Ok(state)) => state,
            Some(Err(e)) => {
                self.keep(e);
                SyncState::default()
            }
            // The cache is borrowed already (a bug): plans read as missing,
            // which refuses.
            None => SyncState::default(),
        }
    }

    fn verified_tokens(&mut self) -> Option<&mut VerifiedTokens> {
        self.borrowed.as_deref_mut().map(|c| &mut c.verified_tokens)
    }
}

impl GateContext {
    fn answer_login(&mut self, policy: &Policy, headers: &[(String, Vec<u8>)], body: &[u8]) {
        self.stage = Stage::Answered;
        let (outcome, failure) = {
            let mut host = EnvoyHost::new(&self.cache);
            let outcome = login(policy, &headers, body, &mut host, self.now_ns);
            (outcome, host.failure())
        };
        if let Some(e) = failure {
            self.fail(e, Some(policy));
            return;
        }
        self.record(&AccessRecord::of_login(&outcome), policy);
        match outcome {
            Login::Issued { body, rate, .. } => {
                let headers = vec![
                    ("content-type", "application/json".to_owned()),
                    ("cache-control", "no-store".to_owned()),
                ];
                self.send_local(200, headers, rate.as_ref(), Some(policy), &body);
            }
            Login::Denied { denial, .. } => self.reply(&denial, Some(policy)),
        }
    }

    /// Applies the decision's header edits in one call, the first failure
    /// returned. Envoy replaces the whole map with the list given, so the
    /// list is what the old per-header calls left: the client's headers in
    /// their order without the removed and replaced names, then the set
    /// ones in order (a replace in Envoy removes and appends). No call when
    /// nothing changes.
    fn edit_request_headers(
        decision: &Decision,
        policy: &Policy,
        headers: &RequestHeaders,
    ) -> Result<(), HostError> {
        let edits = decision.upstream_headers(policy, headers);
        let sent = headers.pairs();
        if let Some(e) = headers.error() {
            return Err(e);
        }
        // Identity headers spelled another way (`x_keygate_tenant`): many
        // upstream frameworks read them as the real one. The shipped Envoy
        // configs reject such requests outright (`headers_with_underscores_action:
        // REJECT_REQUEST`); this covers configs that do not. A denial goes
        // nowhere: only the exact names matter to its record.
        let spellings = match decision.outcome {
            Outcome::Denied { .. } => Vec::new(),
            _ => identity_spellings(policy, sent.iter().map(|(n, _)| n.as_str())),
        };
        let dropped = |name: &str| {
            edits.remove.contains(&name)
                || spellings.contains(&name)
                || edits.set.iter().any(|(n, _)| *n == name)
        };
        if edits.set.is_empty() && !sent.iter().any(|(n, _)| dropped(n)) {
            return Ok(());
        }
        let kept = sent
            .iter()
            .filter(|(n, _)| !dropped(n))
            .map(|(n, v)| (n.as_str(), v.as_slice()));
        let set = edits.set.iter().map(|(n, v)| (*n, v.as_bytes()));
        let pairs: Vec<(&str, &[u8])> = kept.chain(set).collect();
        if fits_one_map_write(&pairs) {
            return host::set_request_headers(pairs);
        }
        // Over the host's limits for one map: it would read the list as
        // empty and leave the request with no headers at all. One call per
        // edit instead (rare: only where Envoy accepts this many headers).
        let mut removed: Vec<&str> = Vec::new();
        for (name, _) in sent.iter().filter(|(n, _)| dropped(n)) {
            if !removed.contains(&name.as_str()) {
                removed.push(name);
                host::set_request_header(name, None)?;
            }
        }
        for (name, value) in &edits.set {
            host::set_request_header(name, Some(value))?;
        }
        Ok(())
    }

    /// A login never goes upstream, but the buffer filter after keygate
    /// sees its headers, and the access log reads identity from them: no
    /// client-sent identity, in any spelling, stays.
    fn strip_all_identity(policy: &Policy, headers: &RequestHeaders) -> Result<(), HostError> {
        let names: Vec<&str> = headers.pairs().iter().map(|(n, _)| n.as_str()).collect();
        if let Some(e) = headers.error() {
            return Err(e);
        }
        let identity = policy.headers.all();
        let sent = identity.iter().copied().filter(|n| names.contains(n));
        for name in sent.chain(identity_spellings(policy, names.iter().copied())) {
            host::set_request_header(name, None)?;
        }
        Ok(())
    }

    /// The login body as buffered so far, at most one byte over the limit.
    fn login_body(&mut self, policy: &Policy, body_size: usize) -> Option<Vec<u8>> {
        if body_size > MAX_LOGIN_BODY {
            let denial = Denial::new(
                Reason::BadRequest,
                format!("Request body over {MAX_LOGIN_BODY} bytes"),
            );
            self.stage = Stage::Answered;
            self.reply(&denial, Some(policy));
            return None;
        }
        match host::request_body(body_size) {
            Ok(body) => Some(body.unwrap_or_default()),
            Err(e) => {
                self.fail(e, Some(policy));
                None
            }
        }
    }
}

impl Context for GateContext {}

impl HttpContext for GateContext {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        let Some(policy) = self.policy.clone() else {
            self.stage = Stage::Answered;
            let denial = Denial::new(Reason::Unavailable, "keygate is not configured");
            self.reply(&denial, None);
            return Action::Pause;
        };
        self.now_ns = match host::now_ns() {
            Ok(t) => t,
            Err(e) => return self.fail(e, Some(&policy)),
        };
        let headers = RequestHeaders::default();
        let is_login = is_login(&policy, &headers);
        if let Some(e) = headers.error() {
            return self.fail(e, Some(&policy));
        }
        if is_login {
            // Header reads fail once the headers are continued: keep what
            // the login needs now (the client address may come from XFF).
            let kept = headers.snapshot(&["x-forwarded-for"]);
            if let Some(e) = headers.error() {
                return self.fail(e, Some(&policy));
            }
            if let Err(e) = Self::strip_all_identity(&policy, &headers) {
                return self.fail(e, Some(&policy));
            }
            if end_of_stream {
                self.answer_login(&policy, &kept, b"");
                return Action::Pause;
            }
            // The body follows. Pausing the headers would keep the body
            // from this filter too (Envoy turns a paused header callback
            // into StopAllIteration), so the headers continue, and Envoy's
            // buffer filter, enabled on the login route, holds the request
            // back from the router until keygate has answered it.
            self.stage = Stage::Login(kept);
            return Action::Continue;
        }
        let (decision, failure) = {
            let mut host = EnvoyHost::new(&self.cache);
            let decision = decide(&policy, &headers, &mut host, self.now_ns);
            (decision, host.failure())
        };
        // A decision on facts the host failed to give is no decision.
        let applied = match failure.or(headers.error()) {
            Some(e) => Err(e),
            None => Self::edit_request_headers(&decision, &policy, &headers),
        };
        if let Err(e) = applied {
            return self.fail(e, Some(&policy));
        }
        self.record_decision(&decision, &policy);
        match &decision.outcome {
            Outcome::Denied { denial, .. } => {
                self.stage = Stage::Answered;
                self.reply(denial, Some(&policy));
                Action::Pause
            }
            Outcome::Allowed { rate, .. } => {
                self.stage = Stage::Forwarded;
                self.rate = *rate;
                Action::Continue
            }
            Outcome::Public => {
                self.stage = Stage::Forwarded;
                Action::Continue
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Stage::Login(headers) = &self.stage else {
            return self.undecided_or_continue();
        };
        let headers = headers.clone();
        let Some(policy) = self.policy.clone() else {
            return Action::Pause;
        };
        if !end_of_stream {
            if body_size > MAX_LOGIN_BODY {
                self.login_body(&policy, body_size);
            }
            // Buffered here until the end of the stream (or its trailers).
            return Action::Pause;
        }
        if let Some(body) = self.login_body(&policy, body_size) {
            self.answer_login(&policy, &headers, &body);
        }
        Action::Pause
    }

    /// A request that ends with trailers (HTTP/2, or chunked HTTP/1.1 when
    /// Envoy is told to keep trailers) ends here: a pending login is
    /// answered from the body buffered so far, exactly as at the end of
    /// its body; it never continues.
    fn on_http_request_trailers(&mut self, _: usize) -> Action {
        let Stage::Login(headers) = &self.stage else {
            return self.undecided_or_continue();
        };
        let headers = headers.clone();
        let Some(policy) = self.policy.clone() else {
            return Action::Pause;
        };
        // The whole buffered body, and one byte more: the login refuses an
        // oversized body itself.
        match host::request_body(MAX_LOGIN_BODY + 1) {
            Ok(body) => self.answer_login(&policy, &headers, &body.unwrap_or_default()),
            Err(e) => return self.fail(e, Some(&policy)),
        }
        Action::Pause
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        if let (Some(rate), Some(policy)) = (&self.rate, &self.policy) {
            // Set one call each, replacing any copy the upstream sent (as
            // the native build does: a client sees keygate's budget once,
            // and the access log's `rate_remaining` reads it); not as one
            // read and rewrite of the whole map: measured, that cost Envoy
            // more CPU than five single calls (bench/RESULTS.md "p5-wasm").
            for (name, value) in rate_limit_headers(rate, policy.rate_limit_headers, self.now_ns) {
                // The upstream already answered: missing headers are logged,
                // the response still goes out.
                if let Err(e) = host::set_response_header(name, &value) {
                    warn!("rate-limit headers incomplete: {e}");
                    break;
                }
            }
        }
        Action::Continue
    }
}

impl GateContext {
    /// Body or trailers of a request that is not a pending login: only a
    /// request decided and allowed goes on; anything else stays held.
    fn undecided_or_continue(&self) -> Action {
        match self.stage {
            Stage::Forwarded => Action::Continue,
            Stage::Headers | Stage::Login(_) | Stage::Answered => Action::Pause,
        }
    }
}

/// Whether proxy-wasm-cpp-host takes `pairs` as one header map: it reads a
/// map of more than 1024 pairs or 1 MiB serialized (`PROXY_WASM_HOST_PAIRS_MAX_COUNT`,
/// `…_MAX_BYTES`) as an empty one, and Envoy would then replace every
/// request header with nothing.
fn fits_one_map_write(pairs: &[(&str, &[u8])]) -> bool {
    const MAX_PAIRS: usize = 1024;
    const MAX_BYTES: usize = 1 << 20;
    // The SDK's layout: a count, two lengths per pair, each name and value
    // followed by a NUL.
    let bytes = 4 + pairs
        .iter()
        .map(|(n, v)| 8 + n.len() + 1 + v.len() + 1)
        .sum::<usize>();
    pairs.len() <= MAX_PAIRS && bytes <= MAX_BYTES
}
