//! The gate role per stream: gather facts from Envoy, ask the core, apply
//! the verdict — the same steps, answers, headers and access-log fields as
//! the wasm filter (`src/http_context.rs`).

use crate::abi::{self, EnvoyHttpHeader};
use crate::config::FilterConfig;
use crate::envoy::{log, Stream};
use crate::state::{lookup, Counters};
use keygate_core::access_log::AccessRecord;
use keygate_core::denial::Reason;
use keygate_core::hash::Digest;
use keygate_core::rate_limit::RateStatus;
use keygate_core::shared_data::CounterCell;
use keygate_core::token::MAX_LOGIN_BODY;
use keygate_core::verdict::{
    identity_spellings, is_login, login, rate_limit_headers, Headers, Login,
};
use keygate_core::{decide, Credential, Denial, Host, Outcome, Policy};
use std::borrow::Cow;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Gate {
    config: Arc<FilterConfig>,
    /// Rate status to report on the upstream's response.
    rate: Option<RateStatus>,
    now_ns: u64,
    /// A login waiting for its body: the request headers it needs later.
    login_headers: Option<Vec<(String, Vec<u8>)>>,
}

/// The request headers of one hook, fetched from Envoy in a single call
/// (views, no copies): the decision's reads then cost no host call, and the
/// header edits know which headers the client actually sent.
struct RequestHeaders {
    views: Vec<EnvoyHttpHeader>,
    /// X-Forwarded-For only counts with `trusted_xff_hops` > 0 (the core
    /// then takes the client address from it, else from Envoy).
    xff_trusted: bool,
}

impl RequestHeaders {
    /// # Safety
    /// The result must be dropped before any request header is changed and
    /// before the hook returns (its views point into Envoy's header map).
    unsafe fn fetch(stream: Stream, policy: &Policy) -> RequestHeaders {
        RequestHeaders {
            views: stream.request_header_views(),
            xff_trusted: policy.trusted_xff_hops > 0,
        }
    }

    /// Values of `name` (Envoy keeps names lowercase, as the core asks).
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.views.iter().filter_map(move |h| {
            // SAFETY: views are valid while `self` lives (see `fetch`).
            let key = unsafe { view(h.key_ptr, h.key_length) };
            // SAFETY: as above.
            (key == name.as_bytes()).then(|| unsafe { view(h.value_ptr, h.value_length) })
        })
    }

    fn has(&self, name: &str) -> bool {
        self.values(name).next().is_some()
    }

    /// Names sent that spell an identity header another way
    /// (`x_keygate_tenant`): removed like the identity headers themselves.
    fn identity_spellings(&self, policy: &Policy) -> Vec<String> {
        let names = self.views.iter().map(|h| {
            // SAFETY: views are valid while `self` lives (see `fetch`).
            let key = unsafe { view(h.key_ptr, h.key_length) };
            std::str::from_utf8(key).unwrap_or_default()
        });
        identity_spellings(policy, names)
            .into_iter()
            .map(str::to_owned)
            .collect()
    }
}

/// A slice of Envoy's memory; a null pointer is an empty slice.
///
/// # Safety
/// A non-null `ptr` must point to `len` bytes that outlive the result.
unsafe fn view<'a>(ptr: *const std::ffi::c_char, len: usize) -> &'a [u8] {
    if ptr.is_null() {
        return &[];
    }
    std::slice::from_raw_parts(ptr.cast::<u8>(), len)
}

impl Headers for RequestHeaders {
    /// Repeated values joined with ',', as Envoy joins inline headers.
    fn get(&self, name: &str) -> Option<Vec<u8>> {
        if name == "x-forwarded-for" && !self.xff_trusted {
            return None;
        }
        let mut values = self.values(name);
        let mut joined = values.next()?.to_vec();
        for v in values {
            joined.push(b',');
            joined.extend_from_slice(v);
        }
        Some(joined)
    }
}

/// The host side of a decision: the process-wide tables and Envoy's
/// computed client address.
struct NativeHost {
    stream: Stream,
    counters: Counters,
}

impl Host for NativeHost {
    fn lookup(&mut self, key_hash: &Digest) -> Option<Rc<Credential>> {
        lookup(key_hash)
    }

    fn lookup_key_id(&mut self, key_id: &str) -> Option<Rc<Credential>> {
        crate::state::lookup_key_id(key_id)
    }

    fn peer_address(&mut self) -> Option<String> {
        self.stream.source_address()
    }

    fn counters(&mut self) -> &mut dyn CounterCell {
        &mut self.counters
    }
}

/// The wasm build's filter-state name of an access-record field (its host
/// adds `wasm.`), spelled out for the known fields: no per-request format.
fn filter_state_key(field: &'static str) -> Cow<'static, str> {
    Cow::Borrowed(match field {
        "keygate_decision" => "wasm.keygate_decision",
        "keygate_reason" => "wasm.keygate_reason",
        "keygate_key_id" => "wasm.keygate_key_id",
        "keygate_tenant" => "wasm.keygate_tenant",
        "keygate_environment" => "wasm.keygate_environment",
        "keygate_scope_required" => "wasm.keygate_scope_required",
        "keygate_rate_remaining" => "wasm.keygate_rate_remaining",
        other => return Cow::Owned(format!("wasm.{other}")),
    })
}

/// No policy on this worker (its compilation failed after the main thread
/// validated it, e.g. a changed environment): fail closed.
fn unavailable(stream: Stream) {
    let denial = Denial::new(Reason::Unavailable, "keygate is not configured");
    stream.send_response(
        denial.status(),
        &[("content-type", "application/json")],
        &denial.body(),
        "keygate_unavailable",
    );
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl Gate {
    pub fn new(config: Arc<FilterConfig>) -> Gate {
        Gate {
            config,
            rate: None,
            now_ns: 0,
            login_headers: None,
        }
    }

    /// Filter state for the access log under the wasm build's names
    /// (`wasm.keygate_<field>`), so one envoy.yaml serves both builds; the
    /// decision counter; and, if enabled, one JSON log line.
    fn record(&self, stream: Stream, record: &AccessRecord, policy: &Policy) {
        if policy.access_log_fields {
            for (name, value) in record.fields() {
                stream.set_filter_state(&filter_state_key(name), &value);
            }
        }
        if let Some(id) = self.config.counter(&record.outcome()) {
            stream.increment_counter(id);
        }
        if policy.log_decisions {
            if let Ok(line) = serde_json::to_string(record) {
                log(abi::LOG_INFO, &format!("keygate: decision {line}"));
            }
        }
    }

    fn reply(&self, stream: Stream, denial: &Denial, policy: &Policy) {
        let headers = denial.headers(&policy.realm);
        let details = format!("keygate_{}", denial.reason.as_str());
        self.send_local(
            stream,
            denial.status(),
            headers,
            denial.rate.as_ref(),
            policy,
            &denial.body(),
            &details,
        );
    }

    /// A local reply, with the rate-limit headers when the budget was checked.
    #[allow(clippy::too_many_arguments)]
    fn send_local(
        &self,
        stream: Stream,
        status: u16,
        mut headers: Vec<(&'static str, String)>,
        rate: Option<&RateStatus>,
        policy: &Policy,
        body: &[u8],
        details: &str,
    ) {
        if let Some(rate) = rate {
            headers.extend(rate_limit_headers(
                rate,
                policy.rate_limit_headers,
                self.now_ns,
            ));
        }
        let refs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        stream.send_response(status, &refs, body, details);
    }

    fn answer_login(
        &mut self,
        stream: Stream,
        policy: &Policy,
        headers: &[(String, Vec<u8>)],
        body: &[u8],
    ) {
        let outcome = {
            let mut host = NativeHost {
                stream,
                counters: Counters::default(),
            };
            login(policy, &headers, body, &mut host, self.now_ns)
        };
        self.record(stream, &AccessRecord::of_login(&outcome), policy);
        match outcome {
            Login::Issued { body, rate, .. } => {
                let headers = vec![
                    ("content-type", "application/json".to_owned()),
                    ("cache-control", "no-store".to_owned()),
                ];
                self.send_local(
                    stream,
                    200,
                    headers,
                    rate.as_ref(),
                    policy,
                    &body,
                    "keygate_login",
                );
            }
            Login::Denied { denial, .. } => self.reply(stream, &denial, policy),
        }
    }

    pub fn on_request_headers(&mut self, stream: Stream, end_of_stream: bool) -> u32 {
        let Some(policy) = self.config.policy() else {
            unavailable(stream);
            return abi::HEADERS_STOP_ITERATION;
        };
        self.now_ns = now_ns();
        // SAFETY: dropped below before the first header change.
        let headers = unsafe { RequestHeaders::fetch(stream, &policy) };
        if is_login(&policy, &headers) {
            // The client address may come from X-Forwarded-For: keep it for
            // when the body is complete.
            let kept: Vec<(String, Vec<u8>)> = ["x-forwarded-for"]
                .iter()
                .filter_map(|n| headers.get(n).map(|v| ((*n).to_owned(), v)))
                .collect();
            // No client-sent identity, in any spelling, stays on a login.
            let spellings = headers.identity_spellings(&policy);
            drop(headers);
            for name in spellings
                .iter()
                .map(String::as_str)
                .chain(policy.headers.all())
            {
                stream.set_request_header(name, None);
            }
            if end_of_stream {
                self.answer_login(stream, &policy, &kept, b"");
            } else {
                // The request stays here (never upstream) until the body is
                // complete and answered; Envoy keeps calling this filter.
                self.login_headers = Some(kept);
            }
            return abi::HEADERS_STOP_ITERATION;
        }
        let decision = {
            let mut host = NativeHost {
                stream,
                counters: Counters::default(),
            };
            decide(&policy, &headers, &mut host, self.now_ns)
        };
        self.record(stream, &AccessRecord::of_decision(&decision), &policy);
        // Only headers the client sent need a removal or a replacing set;
        // the others are added, one cheap call each.
        let edits = decision.upstream_headers(&policy, &headers);
        let remove: Vec<&str> = edits
            .remove
            .iter()
            .copied()
            .filter(|n| headers.has(n))
            .collect();
        let set: Vec<(&str, &str, bool)> = edits
            .set
            .iter()
            .map(|&(n, v)| (n, v, headers.has(n)))
            .collect();
        let spellings = match decision.outcome {
            Outcome::Denied { .. } => Vec::new(),
            _ => headers.identity_spellings(&policy),
        };
        drop(headers);
        for name in remove
            .into_iter()
            .chain(spellings.iter().map(String::as_str))
        {
            stream.set_request_header(name, None);
        }
        for (name, value, sent) in set {
            if sent {
                stream.set_request_header(name, Some(value));
            } else {
                // Refused for an empty value: the header stays absent.
                stream.add_request_header(name, value);
            }
        }
        match &decision.outcome {
            Outcome::Denied { denial, .. } => {
                self.reply(stream, denial, &policy);
                abi::HEADERS_STOP_ITERATION
            }
            Outcome::Allowed { rate, .. } => {
                self.rate = *rate;
                abi::HEADERS_CONTINUE
            }
            Outcome::Public => abi::HEADERS_CONTINUE,
        }
    }

    /// A login's body: buffered by Envoy until complete, then answered.
    pub fn on_request_body(&mut self, stream: Stream, end_of_stream: bool) -> u32 {
        if self.login_headers.is_none() {
            return abi::BODY_CONTINUE;
        }
        let Some(policy) = self.config.policy() else {
            self.login_headers = None;
            unavailable(stream);
            return abi::BODY_STOP_ITERATION_NO_BUFFER;
        };
        if stream.request_body_size() > MAX_LOGIN_BODY {
            self.login_headers = None;
            let denial = Denial::new(
                Reason::BadRequest,
                format!("Request body over {MAX_LOGIN_BODY} bytes"),
            );
            self.reply(stream, &denial, &policy);
            return abi::BODY_STOP_ITERATION_NO_BUFFER;
        }
        if !end_of_stream {
            return abi::BODY_STOP_ITERATION_AND_BUFFER;
        }
        self.finish_login(stream, &policy);
        abi::BODY_STOP_ITERATION_NO_BUFFER
    }

    /// Trailers end a login's body too: answer with what arrived.
    pub fn on_request_trailers(&mut self, stream: Stream) -> u32 {
        if self.login_headers.is_none() {
            return abi::TRAILERS_CONTINUE;
        }
        match self.config.policy() {
            Some(policy) => self.finish_login(stream, &policy),
            None => {
                self.login_headers = None;
                unavailable(stream);
            }
        }
        abi::TRAILERS_STOP_ITERATION
    }

    fn finish_login(&mut self, stream: Stream, policy: &Policy) {
        let Some(headers) = self.login_headers.take() else {
            return;
        };
        let body = stream.request_body();
        self.answer_login(stream, policy, &headers, &body);
    }

    pub fn on_response_headers(&mut self, stream: Stream) -> u32 {
        if let (Some(rate), Some(policy)) = (&self.rate, self.config.policy()) {
            for (name, value) in rate_limit_headers(rate, policy.rate_limit_headers, self.now_ns) {
                stream.set_response_header(name, Some(&value));
            }
        }
        abi::HEADERS_CONTINUE
    }
}
