//! The per-request context of the gate role: gather facts, decide, apply.

use crate::metrics::Metrics;
use crate::shared_store::{CredentialCache, SharedCounters};
use keygate_core::access_log::AccessRecord;
use keygate_core::hash::Digest;
use keygate_core::rate_limit::{CounterCell, RateStatus};
use keygate_core::token::MAX_LOGIN_BODY;
use keygate_core::verdict::Headers;
use keygate_core::verdict::{is_login, login, rate_limit_headers, Host, Login, Outcome};
use keygate_core::{decide, Credential, Denial, Policy};
use log::info;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use proxy_wasm::types::MapType;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

pub struct GateContext {
    policy: Option<Rc<Policy>>,
    cache: Rc<RefCell<CredentialCache>>,
    /// Rate status to report on the upstream's response.
    rate: Option<RateStatus>,
    now_ns: u64,
    /// Request headers of a login, kept for when its body is complete.
    login_headers: Option<Vec<(String, Vec<u8>)>>,
    metrics: Rc<Metrics>,
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
            login_headers: None,
            metrics,
        }
    }

    /// Filter state for Envoy's access log (`%FILTER_STATE(wasm.keygate_<field>:PLAIN)%`),
    /// the decision counter and, if enabled, one JSON log line.
    fn record(&self, record: &AccessRecord, policy: &Policy) {
        if policy.access_log_fields {
            for (name, value) in record.fields() {
                let _ = hostcalls::set_property(vec![name], Some(value.as_bytes()));
            }
        }
        self.metrics.count(&record.outcome());
        if policy.log_decisions {
            if let Ok(line) = serde_json::to_string(record) {
                info!("keygate decision {line}");
            }
        }
    }

    fn reply(&self, denial: &Denial, policy: &Policy) {
        let headers = denial.headers(&policy.realm);
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
        policy: &Policy,
        body: &[u8],
    ) {
        if let Some(rate) = rate {
            headers.extend(rate_limit_headers(
                rate,
                policy.rate_limit_headers,
                self.now_ns,
            ));
        }
        let refs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        self.send_http_response(u32::from(status), refs, Some(body));
    }
}

/// Request headers read from Envoy one by one, on demand, and remembered:
/// fetching the whole map costs more than the few a decision needs. Only
/// valid while the request headers are (in `on_http_request_headers`).
#[derive(Default)]
struct RequestHeaders {
    seen: RefCell<Vec<(String, Option<Vec<u8>>)>>,
}

impl Headers for RequestHeaders {
    fn get(&self, name: &str) -> Option<Vec<u8>> {
        if let Some((_, v)) = self.seen.borrow().iter().find(|(n, _)| n == name) {
            return v.clone();
        }
        // Raw bytes: the String variant of the SDK panics on non-UTF-8 values.
        let value = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten();
        self.seen
            .borrow_mut()
            .push((name.to_owned(), value.clone()));
        value
    }
}

impl RequestHeaders {
    fn snapshot(&self, names: &[&str]) -> Vec<(String, Vec<u8>)> {
        names
            .iter()
            .filter_map(|n| self.get(n).map(|v| ((*n).to_owned(), v)))
            .collect()
    }
}

/// The host side of a decision: shared data and Envoy properties.
struct EnvoyHost<'a> {
    ctx: &'a GateContext,
    counters: SharedCounters,
}

impl Host for EnvoyHost<'_> {
    fn lookup(&mut self, key_hash: &Digest) -> Option<Rc<Credential>> {
        self.ctx.cache.try_borrow_mut().ok()?.lookup(key_hash)
    }

    fn peer_address(&mut self) -> Option<String> {
        let bytes = self.ctx.get_property(vec!["source", "address"])?;
        String::from_utf8(bytes).ok()
    }

    fn counters(&mut self) -> &mut dyn CounterCell {
        &mut self.counters
    }
}

impl GateContext {
    fn answer_login(&mut self, policy: &Policy, headers: &[(String, Vec<u8>)], body: &[u8]) {
        let outcome = {
            let mut host = EnvoyHost {
                ctx: self,
                counters: SharedCounters,
            };
            login(policy, &headers, body, &mut host, self.now_ns)
        };
        self.record(&AccessRecord::of_login(&outcome), policy);
        match outcome {
            Login::Issued { body, rate, .. } => {
                let headers = vec![
                    ("content-type", "application/json".to_owned()),
                    ("cache-control", "no-store".to_owned()),
                ];
                self.send_local(200, headers, rate.as_ref(), policy, &body);
            }
            Login::Denied { denial, .. } => self.reply(&denial, policy),
        }
    }
}

impl Context for GateContext {}

impl HttpContext for GateContext {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        let Some(policy) = self.policy.clone() else {
            let denial = Denial::new(
                keygate_core::denial::Reason::Unavailable,
                "keygate is not configured",
            );
            self.send_http_response(
                u32::from(denial.status()),
                vec![("content-type", "application/json")],
                Some(&denial.body()),
            );
            return Action::Pause;
        };
        self.now_ns = self
            .get_current_time()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        // Raw bytes: the String variants of the SDK panic on non-UTF-8 values.
        let headers = RequestHeaders::default();
        if is_login(&policy, &headers) {
            // Header reads fail once the headers are continued: keep what
            // the login needs now (the client address may come from XFF).
            let kept = headers.snapshot(&["x-forwarded-for"]);
            if end_of_stream {
                self.answer_login(&policy, &kept, b"");
                return Action::Pause;
            }
            // The body follows; Envoy's buffer filter (enabled on the login
            // route) holds the request back from the router meanwhile.
            // Pausing here would keep the body from this filter as well.
            self.login_headers = Some(kept);
            return Action::Continue;
        }
        let decision = {
            let mut host = EnvoyHost {
                ctx: self,
                counters: SharedCounters,
            };
            decide(&policy, &headers, &mut host, self.now_ns)
        };
        self.record(&AccessRecord::of_decision(&decision), &policy);
        let edits = decision.upstream_headers(&policy, &headers);
        for name in &edits.remove {
            self.set_http_request_header(name, None);
        }
        for (name, value) in &edits.set {
            self.set_http_request_header(name, Some(value));
        }
        match &decision.outcome {
            Outcome::Denied { denial, .. } => {
                self.reply(denial, &policy);
                Action::Pause
            }
            Outcome::Allowed { rate, .. } => {
                self.rate = *rate;
                Action::Continue
            }
            Outcome::Public => Action::Continue,
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let (Some(headers), Some(policy)) = (self.login_headers.take(), self.policy.clone()) else {
            return Action::Continue;
        };
        if body_size > MAX_LOGIN_BODY {
            let denial = Denial::new(
                keygate_core::denial::Reason::BadRequest,
                format!("Request body over {MAX_LOGIN_BODY} bytes"),
            );
            self.reply(&denial, &policy);
            return Action::Pause;
        }
        if !end_of_stream {
            self.login_headers = Some(headers);
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        self.answer_login(&policy, &headers, &body);
        Action::Pause
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        if let (Some(rate), Some(policy)) = (&self.rate, &self.policy) {
            for (name, value) in rate_limit_headers(rate, policy.rate_limit_headers, self.now_ns) {
                self.set_http_response_header(name, Some(&value));
            }
        }
        Action::Continue
    }
}
