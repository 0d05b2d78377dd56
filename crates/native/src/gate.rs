//! The gate role per stream: gather facts from Envoy, ask the core, apply
//! the verdict — the same steps, answers, headers and access-log fields as
//! the wasm filter (`src/http_context.rs`).

use crate::abi;
use crate::config::FilterConfig;
use crate::envoy::{log, Stream, ViewBuf};
use crate::profile::{self, Step};
use crate::state::{lookup, Counters};
use keygate_core::access_log::{decision_fields, AccessRecord};
use keygate_core::config::RateLimitHeaders;
use keygate_core::denial::Reason;
use keygate_core::hash::Digest;
use keygate_core::rate_limit::{policy_name, RateStatus};
use keygate_core::shared_data::CounterCell;
use keygate_core::sync::SyncState;
use keygate_core::token::{VerifiedTokens, MAX_LOGIN_BODY};
use keygate_core::verdict::{
    identity_spellings, is_login, login, policy_header, rate_limit_headers, Headers, Login,
};
use keygate_core::{decide, Credential, Decision, Denial, Host, Outcome, Policy};
use std::borrow::Cow;
use std::cell::RefMut;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Gate {
    config: Arc<FilterConfig>,
    /// Rate status to report on the upstream's response, and in which
    /// header styles (kept from the request: the response hook then needs
    /// no policy lookup).
    rate: Option<(RateStatus, RateLimitHeaders)>,
    now_ns: u64,
    /// A login waiting for its body: the request headers it needs later.
    login_headers: Option<Vec<(String, Vec<u8>)>>,
}

/// The request headers of one hook, fetched from Envoy in a single call
/// (views, no copies): the decision's reads then cost no host call, and the
/// header edits know which headers the client actually sent.
struct HeaderViews<'b> {
    views: &'b [crate::abi::EnvoyHttpHeader],
    /// One bit per name present ([`name_bit`]): most names a request is
    /// asked about (identity headers, `authorization`) are absent, and a
    /// clear bit says so without a scan.
    names: u64,
    /// X-Forwarded-For only counts with `trusted_xff_hops` > 0 (the core
    /// then takes the client address from it, else from Envoy).
    xff_trusted: bool,
}

impl<'b> HeaderViews<'b> {
    /// # Safety
    /// The result must be dropped before any request header is changed and
    /// before the hook returns (its views point into Envoy's header map).
    unsafe fn fetch(stream: Stream, policy: &Policy, buf: &'b mut ViewBuf) -> HeaderViews<'b> {
        HeaderViews::new(
            stream.request_header_views(buf),
            policy.trusted_xff_hops > 0,
        )
    }

    fn new(views: &'b [crate::abi::EnvoyHttpHeader], xff_trusted: bool) -> HeaderViews<'b> {
        let names = views.iter().fold(0, |bits, h| {
            // SAFETY: views Envoy just filled, valid as `views` is (see `fetch`).
            bits | name_bit(unsafe { view(h.key_ptr, h.key_length) })
        });
        HeaderViews {
            views,
            names,
            xff_trusted,
        }
    }

    /// The response headers, the same way (only `has` is used on them).
    ///
    /// # Safety
    /// As [`HeaderViews::fetch`], for response headers.
    unsafe fn fetch_response(stream: Stream, buf: &'b mut ViewBuf) -> HeaderViews<'b> {
        HeaderViews::new(stream.response_header_views(buf), false)
    }

    /// Where the views stop being read: they point into Envoy's header map,
    /// which the next header change may move (nothing to free: a marker
    /// the borrow checker enforces, as no read can follow it).
    fn end(self) {}

    /// Values of `name` (Envoy keeps names lowercase, as the core asks).
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        let maybe_present = self.names & name_bit(name.as_bytes()) != 0;
        let views = if maybe_present { self.views } else { &[] };
        views.iter().filter_map(move |h| {
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
        // Filtered on bytes first: UTF-8 is checked only for the rare
        // candidate, and without one the core (which lists the identity
        // names first) is not asked at all.
        let names = || {
            self.views.iter().filter_map(|h| {
                // SAFETY: views are valid while `self` lives (see `fetch`).
                let key = unsafe { view(h.key_ptr, h.key_length) };
                may_respell(key).then(|| std::str::from_utf8(key).unwrap_or_default())
            })
        };
        if names().next().is_none() {
            return Vec::new();
        }
        identity_spellings(policy, names())
            .into_iter()
            .map(str::to_owned)
            .collect()
    }
}

/// A name's bit in [`HeaderViews::names`]: from its length and two of its
/// bytes, so equal names always share it (different ones may too).
fn name_bit(name: &[u8]) -> u64 {
    let last = name.last().copied().unwrap_or_default();
    let middle = name.get(name.len() / 2).copied().unwrap_or_default();
    let mixed =
        (name.len() as u64).wrapping_mul(0x9e37_79b9) ^ u64::from(last) ^ (u64::from(middle) << 2);
    1 << (mixed & 63)
}

/// Whether `name` could be another spelling of an identity header: only a
/// name with a `_` or an uppercase letter can (without either, a match is the
/// exact name, which `identity_spellings` leaves out). Envoy hands names in
/// lowercase with `-`, so this usually skips every header in one scan.
fn may_respell(name: &[u8]) -> bool {
    // Eight bytes at a time (every request scans every header name, and the
    // answer is almost always "no"); the tail byte by byte.
    let mut words = name.chunks_exact(8);
    let any_word = words
        .by_ref()
        .filter_map(|w| <[u8; 8]>::try_from(w).ok())
        .any(|w| respell_bytes_in(u64::from_le_bytes(w)));
    any_word
        || words
            .remainder()
            .iter()
            .any(|&b| b == b'_' || b.is_ascii_uppercase())
}

/// Whether any byte of `w` is `_` or `A`..=`Z` (bit-parallel, exact: see
/// `the_word_scan_finds_every_respell_byte`).
fn respell_bytes_in(w: u64) -> bool {
    const ONES: u64 = u64::MAX / 255; // 0x0101…
    const HIGH: u64 = ONES * 0x80;
    const LOW7: u64 = ONES * 0x7f;
    // Each byte's low 7 bits: adding up to 0x7f to them never carries into
    // the next byte, and sets the byte's high bit exactly when the sum
    // reaches 0x80.
    let low = w & LOW7;
    // Bytes with the high bit set (non-ASCII) are neither.
    let ascii = !w & HIGH;
    // '_' (0x5f): its low bits xor 0x5f are zero, so adding 0x7f leaves the
    // high bit clear.
    let underscore = !((low ^ (ONES * 0x5f)) + LOW7) & ascii;
    // 'A'..='Z': low bits at least 0x41 and below 0x5b.
    let at_least_a = (low + ONES * (0x80 - 0x41)) & HIGH;
    let above_z = (low + ONES * (0x80 - 0x5b)) & HIGH;
    let upper = at_least_a & !above_z & ascii;
    (underscore | upper) != 0
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

impl Headers for HeaderViews<'_> {
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

    /// A single value (the usual case) as a view, no copy.
    fn get_ref(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        if name == "x-forwarded-for" && !self.xff_trusted {
            return None;
        }
        if self.names & name_bit(name.as_bytes()) == 0 {
            return None;
        }
        let mut first: Option<&[u8]> = None;
        for h in self.views {
            // SAFETY: views are valid while `self` lives (see `fetch`).
            if unsafe { view(h.key_ptr, h.key_length) } == name.as_bytes() {
                if first.is_some() {
                    // Repeated: joined, as `get` does.
                    return self.get(name).map(Cow::Owned);
                }
                // SAFETY: as above.
                first = Some(unsafe { view(h.value_ptr, h.value_length) });
            }
        }
        first.map(Cow::Borrowed)
    }

    /// No copy of the value: presence is all the header edits ask.
    fn has(&self, name: &str) -> bool {
        if name == "x-forwarded-for" && !self.xff_trusted {
            return false;
        }
        self.values(name).next().is_some()
    }
}

/// The host side of a decision: the process-wide tables, Envoy's
/// computed client address and this worker's verified tokens.
struct NativeHost<'t> {
    stream: Stream,
    counters: Counters,
    verified_tokens: Option<RefMut<'t, VerifiedTokens>>,
}

impl Host for NativeHost<'_> {
    fn lookup(&mut self, key_hash: &Digest) -> Option<Rc<Credential>> {
        lookup(key_hash)
    }

    fn lookup_key_id(&mut self, key_id: &str) -> Option<Rc<Credential>> {
        crate::state::lookup_key_id(key_id)
    }

    fn peer_address(&mut self) -> Option<String> {
        self.peer_address_ref().map(Cow::into_owned)
    }

    /// Envoy's own string, no copy: a view of the stream's remote address,
    /// valid during this hook (the borrow of `self` keeps it there).
    fn peer_address_ref(&mut self) -> Option<Cow<'_, str>> {
        profile::within(Step::PeerAddress, || self.stream.source_address()).map(Cow::Borrowed)
    }

    fn counters(&mut self) -> &mut dyn CounterCell {
        &mut self.counters
    }

    fn sync_state(&mut self, _fresh: bool) -> SyncState {
        crate::state::committed_state()
    }

    fn verified_tokens(&mut self) -> Option<&mut VerifiedTokens> {
        self.verified_tokens.as_deref_mut()
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
        "keygate_owner" => "wasm.keygate_owner",
        "keygate_scope_required" => "wasm.keygate_scope_required",
        "keygate_rate_remaining" => "wasm.keygate_rate_remaining",
        "keygate_session_id" => "wasm.keygate_session_id",
        "keygate_session_issued_ms" => "wasm.keygate_session_issued_ms",
        "keygate_session_expires_ms" => "wasm.keygate_session_expires_ms",
        other => return Cow::Owned(format!("wasm.{other}")),
    })
}

/// Every name [`rate_headers`] may set.
const RATE_HEADER_NAMES: [&str; 5] = [
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "ratelimit-policy",
    "ratelimit",
];

/// The response headers of `rate_limit_headers` (same names, values and
/// order; `rate_headers_match_the_core` checks it), each rendered into one
/// stack buffer and handed to `f`: no string, no formatting machinery, no
/// allocation per header (these run on every allowed response).
fn rate_headers(
    rate: &RateStatus,
    styles: RateLimitHeaders,
    now_ns: u64,
    mut f: impl FnMut(&'static str, &str),
) {
    if styles.x_ratelimit {
        let mut digits = itoa::Buffer::new();
        f("x-ratelimit-limit", digits.format(rate.limit.requests));
        f("x-ratelimit-remaining", digits.format(rate.remaining));
        f("x-ratelimit-reset", digits.format(rate.reset_epoch_secs()));
    }
    if styles.ietf {
        let mut out = ValueBuf::new();
        // The one limit of the status when it lists none (as the core's
        // `policy_header`), else every limit it lists.
        let one = rate.policies.is_empty().then_some((rate.tag, rate.limit));
        for (i, (tag, limit)) in one.into_iter().chain(rate.policies.iter()).enumerate() {
            if i > 0 {
                out.text(", ");
            }
            out.quoted(policy_name(tag))
                .text(";q=")
                .num(limit.requests)
                .text(";w=")
                .num(limit.window_secs);
        }
        match out.fits() {
            Some(value) => f("ratelimit-policy", value),
            // Cannot happen for MAX_POLICIES limits (see VALUE_BUF); kept
            // exact all the same.
            None => f("ratelimit-policy", &policy_header(rate)),
        }
        out.start()
            .quoted(policy_name(rate.tag))
            .text(";r=")
            .num(rate.remaining)
            .text(";t=")
            .num(rate.reset_in_secs(now_ns));
        if let Some(value) = out.fits() {
            f("ratelimit", value);
        }
    }
}

/// Room for the longest rate-limit header value: `RateLimit-Policy` with
/// `MAX_POLICIES` limits of ~45 bytes each (`"tenant-minute";q=<u32>;w=<u32>, `).
const VALUE_BUF: usize = 48 * keygate_core::rate_limit::MAX_POLICIES;

/// A header value written in place; past its room it only records that it
/// overflowed (then `fits` is None and the caller falls back).
struct ValueBuf {
    bytes: [u8; VALUE_BUF],
    len: usize,
    overflow: bool,
}

impl ValueBuf {
    fn new() -> ValueBuf {
        ValueBuf {
            bytes: [0; VALUE_BUF],
            len: 0,
            overflow: false,
        }
    }

    fn start(&mut self) -> &mut ValueBuf {
        self.len = 0;
        self.overflow = false;
        self
    }

    fn text(&mut self, s: &str) -> &mut ValueBuf {
        let end = self.len + s.len();
        match self.bytes.get_mut(self.len..end) {
            Some(dst) => {
                dst.copy_from_slice(s.as_bytes());
                self.len = end;
            }
            None => self.overflow = true,
        }
        self
    }

    fn quoted(&mut self, s: &str) -> &mut ValueBuf {
        self.text("\"").text(s).text("\"")
    }

    fn num(&mut self, n: impl itoa::Integer) -> &mut ValueBuf {
        let mut digits = itoa::Buffer::new();
        self.text(digits.format(n))
    }

    fn fits(&self) -> Option<&str> {
        if self.overflow {
            return None;
        }
        // Only ASCII was written (digits, names, punctuation).
        std::str::from_utf8(self.bytes.get(..self.len)?).ok()
    }
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
    /// (`wasm.keygate_<field>`, only what no header carries), so one
    /// envoy.yaml serves both builds; the
    /// decision counter; and, if enabled, one JSON log line.
    fn record(&self, stream: Stream, record: &AccessRecord, policy: &Policy) {
        if policy.access_log_fields {
            for (name, value) in record.fields(policy.rate_limit_headers.x_ratelimit) {
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

    /// [`Gate::record`] for a decision, without building its record unless
    /// the decision log line asks for one.
    fn record_decision(&self, stream: Stream, decision: &Decision, policy: &Policy) {
        if policy.access_log_fields {
            profile::within(Step::FilterState, || {
                decision_fields(
                    decision,
                    policy.rate_limit_headers.x_ratelimit,
                    |name, value| stream.set_filter_state(&filter_state_key(name), value),
                );
            });
        }
        if let Some(id) = self.config.decision_counter(decision) {
            profile::within(Step::Metric, || stream.increment_counter(id));
        }
        if policy.log_decisions {
            let record = AccessRecord::of_decision(decision);
            if let Ok(line) = serde_json::to_string(&record) {
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
                verified_tokens: None,
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
        let mut timer = profile::Timer::start();
        let Some(worker) = self.config.worker() else {
            unavailable(stream);
            return abi::HEADERS_STOP_ITERATION;
        };
        let policy = worker.policy;
        self.now_ns = now_ns();
        timer.lap(Step::Policy);
        // SAFETY: dropped below before the first header change.
        let mut buf = ViewBuf::new();
        let headers = unsafe { HeaderViews::fetch(stream, &policy, &mut buf) };
        timer.lap(Step::Headers);
        if is_login(&policy, &headers) {
            // The client address may come from X-Forwarded-For: keep it for
            // when the body is complete.
            let kept: Vec<(String, Vec<u8>)> = ["x-forwarded-for"]
                .iter()
                .filter_map(|n| headers.get(n).map(|v| ((*n).to_owned(), v)))
                .collect();
            // No client-sent identity, in any spelling, stays on a login.
            let spellings = headers.identity_spellings(&policy);
            headers.end();
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
                verified_tokens: worker.verified_tokens.try_borrow_mut().ok(),
            };
            decide(&policy, &headers, &mut host, self.now_ns)
        };
        timer.lap(Step::Decide);
        self.record_decision(stream, &decision, &policy);
        timer.reset();
        // Only headers the client sent need a removal or a replacing set;
        // the others are added, one cheap call each. Which were sent is
        // noted on the stack (the views die at the first change); past
        // `MAX_EDITS` an edit is assumed sent, which only costs a lookup.
        const MAX_EDITS: usize = 16;
        let edits = decision.upstream_headers(&policy, &headers);
        let mut remove_sent = [true; MAX_EDITS];
        for (sent, name) in remove_sent.iter_mut().zip(&edits.remove) {
            *sent = headers.has(name);
        }
        let mut set_sent = [true; MAX_EDITS];
        for (sent, (name, _)) in set_sent.iter_mut().zip(&edits.set) {
            *sent = headers.has(name);
        }
        // Usually none: no allocation then.
        let spellings = match decision.outcome {
            Outcome::Denied { .. } => Vec::new(),
            _ => headers.identity_spellings(&policy),
        };
        headers.end();
        timer.lap(Step::EditPlan);
        let remove_sent = remove_sent.iter().chain(std::iter::repeat(&true));
        let remove = edits
            .remove
            .iter()
            .zip(remove_sent)
            .filter(|(_, s)| **s)
            .map(|(name, _)| *name);
        for name in remove.chain(spellings.iter().map(String::as_str)) {
            stream.set_request_header(name, None);
        }
        let set_sent = set_sent.iter().chain(std::iter::repeat(&true));
        for (&(name, value), &sent) in edits.set.iter().zip(set_sent) {
            if sent {
                stream.set_request_header(name, Some(value));
            } else if !value.is_empty() {
                // Envoy refuses to add an empty value: the header stays
                // absent either way, so the call is skipped.
                stream.add_request_header(name, value);
            }
        }
        timer.lap(Step::EditCalls);
        profile::request_done();
        match &decision.outcome {
            Outcome::Denied { denial, .. } => {
                self.reply(stream, denial, &policy);
                abi::HEADERS_STOP_ITERATION
            }
            Outcome::Allowed { rate, .. } => {
                self.rate = rate.map(|r| (r, policy.rate_limit_headers));
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
        let mut timer = profile::Timer::start();
        if let Some((rate, styles)) = &self.rate {
            // As on the request: a header the upstream sent is replaced, the
            // others are added, which costs Envoy less than a replacing set.
            // Which of RATE_HEADER_NAMES the upstream sent, one bit each.
            let sent: u8 = {
                // SAFETY: dropped before the first response header change.
                let mut buf = ViewBuf::new();
                let present = unsafe { HeaderViews::fetch_response(stream, &mut buf) };
                RATE_HEADER_NAMES
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| present.has(n))
                    .fold(0, |bits, (i, _)| bits | 1 << i)
            };
            timer.lap(Step::ResponsePlan);
            rate_headers(rate, *styles, self.now_ns, |name, value| {
                let was_sent = RATE_HEADER_NAMES
                    .iter()
                    .position(|n| *n == name)
                    .is_some_and(|i| sent & 1 << i != 0);
                if was_sent || !stream.add_response_header(name, value) {
                    stream.set_response_header(name, Some(value));
                }
            });
            timer.lap(Step::ResponseHeaders);
        }
        abi::HEADERS_CONTINUE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::testing::{MemoryHost, NOW};

    const KEY: &str = "native-test-key";

    fn policy() -> Policy {
        let hash = keygate_core::hash::to_hex(&keygate_core::hash::sha256(KEY.as_bytes()));
        let json = format!(
            r#"{{"credentials":[{{"key_id":"k1","key_hash":"{hash}","tenant":"acme",
                "environment":"test","scopes":["read"],
                "rate_limit":{{"requests":2,"window_secs":60}}}}],
              "routes":[{{"path_prefix":"/health","public":true}},
                {{"methods":["GET"],"path_prefix":"/v1","scope":"read"}},
                {{"path_prefix":"/admin","scope":"admin"}}]}}"#
        );
        Policy::from_json(json.as_bytes()).unwrap()
    }

    fn request(method: &str, path: &str, key: Option<&str>) -> Vec<(String, Vec<u8>)> {
        let mut h = vec![
            (":method".to_owned(), method.as_bytes().to_vec()),
            (":path".to_owned(), path.as_bytes().to_vec()),
        ];
        if let Some(key) = key {
            h.push(("x-api-key".to_owned(), key.as_bytes().to_vec()));
        }
        h
    }

    /// Allowed (with rate), public, unknown key, missing key, wrong scope
    /// (with credential), rate-limited (with rate and credential).
    fn decisions() -> Vec<Decision> {
        let p = policy();
        let mut host = MemoryHost::default();
        [
            ("GET", "/v1/items", Some(KEY)),
            ("GET", "/health", None),
            ("GET", "/v1/items", Some("nope")),
            ("GET", "/v1/items", None),
            ("GET", "/admin/x", Some(KEY)),
            ("GET", "/v1/items", Some(KEY)),
            ("GET", "/v1/items", Some(KEY)),
        ]
        .iter()
        .map(|(m, path, key)| decide(&p, &request(m, path, *key), &mut host, NOW))
        .collect()
    }

    #[test]
    fn decision_counters_are_the_core_outcome_names() {
        for d in decisions() {
            let slot = crate::config::decision_slot(&d.outcome);
            assert_eq!(
                crate::config::decision_outcome(slot),
                AccessRecord::of_decision(&d).outcome()
            );
        }
    }

    #[test]
    fn rate_headers_match_the_core() {
        use keygate_core::rate_limit::RateLimit;
        let statuses = [
            (3, 60, 2, NOW + 1),
            (u32::MAX, u32::MAX, u32::MAX, u64::MAX),
        ];
        for (requests, window_secs, remaining, reset_at_ns) in statuses {
            let rate = RateStatus {
                allowed: true,
                limit: RateLimit {
                    requests,
                    window_secs,
                },
                remaining,
                reset_at_ns,
                retry_after_ns: 0,
                tag: 0,
                policies: Default::default(),
            };
            let mut several = rate;
            several.tag = 0x12;
            for (tag, q, w) in [(2, 100, 60), (4, 10_000, 86_400), (0x12, 50, 60)] {
                several.policies.push(
                    tag,
                    RateLimit {
                        requests: q,
                        window_secs: w,
                    },
                );
            }
            for (rate, (x_ratelimit, ietf)) in [rate, several].into_iter().flat_map(|r| {
                [(true, true), (true, false), (false, true), (false, false)].map(|s| (r, s))
            }) {
                let styles = RateLimitHeaders { x_ratelimit, ietf };
                let mut ours = Vec::new();
                rate_headers(&rate, styles, NOW, |n, v| ours.push((n, v.to_owned())));
                assert_eq!(ours, rate_limit_headers(&rate, styles, NOW));
                assert!(ours.iter().all(|(n, _)| RATE_HEADER_NAMES.contains(n)));
            }
        }
    }

    /// Views over Rust strings, as Envoy's `get_headers` hands them.
    fn views(headers: &[(&'static str, &'static str)], xff_trusted: bool) -> HeaderViews<'static> {
        let list: Vec<_> = headers
            .iter()
            .map(|(k, v)| crate::abi::EnvoyHttpHeader {
                key_ptr: k.as_ptr().cast(),
                key_length: k.len(),
                value_ptr: v.as_ptr().cast(),
                value_length: v.len(),
            })
            .collect();
        // A few views per test, kept for the test's run.
        HeaderViews::new(Vec::leak(list), xff_trusted)
    }

    #[test]
    fn borrowed_header_reads_agree_with_copied_ones() {
        let h = views(
            &[
                (":path", "/v1/items"),
                ("x-api-key", "a"),
                ("x-api-key", "b"),
                ("x-forwarded-for", "10.0.0.1"),
            ],
            false,
        );
        for name in [":path", "x-api-key", "x-forwarded-for", "authorization"] {
            let got = Headers::get(&h, name);
            assert_eq!(h.get_ref(name).map(|v| v.into_owned()), got, "{name}");
            assert_eq!(Headers::has(&h, name), got.is_some(), "{name}");
        }
        assert!(matches!(
            h.get_ref(":path"),
            Some(Cow::Borrowed(b"/v1/items"))
        ));
        assert_eq!(h.get_ref("x-api-key").as_deref(), Some(&b"a,b"[..]));
        assert_eq!(h.get_ref("x-forwarded-for"), None);
        let trusted = views(&[("x-forwarded-for", "10.0.0.1")], true);
        assert_eq!(
            trusted.get_ref("x-forwarded-for").as_deref(),
            Some(&b"10.0.0.1"[..])
        );
    }

    #[test]
    fn the_name_bits_never_hide_a_header_that_was_sent() {
        let names: Vec<&'static str> = [
            ":authority",
            ":path",
            ":method",
            ":scheme",
            "x-api-key",
            "authorization",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-request-id",
            "user-agent",
            "accept",
            "x-keygate-tenant",
            "x-keygate-environment",
            "x-keygate-key-id",
            "x-keygate-scopes",
            "x-keygate-owner",
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
            "ratelimit-policy",
            "ratelimit",
            "content-type",
            "content-length",
            "date",
            "server",
            "",
            "a",
            "x_keygate_tenant",
        ]
        .into_iter()
        .chain((0..40).map(|i| &*String::leak(format!("x-custom-{i}"))))
        .collect();
        let all: Vec<(&'static str, &'static str)> = names.iter().map(|n| (*n, "v")).collect();
        for sent in names.chunks(3).chain([&names[..]]) {
            let pairs: Vec<_> = all
                .iter()
                .filter(|(n, _)| sent.contains(n))
                .copied()
                .collect();
            let h = views(&pairs, true);
            for name in &names {
                assert_eq!(Headers::has(&h, name), sent.contains(name), "{name}");
                assert_eq!(h.get_ref(name).is_some(), sent.contains(name), "{name}");
            }
        }
    }

    #[test]
    fn the_word_scan_finds_every_respell_byte() {
        let simple = |n: &[u8]| n.iter().any(|&b| b == b'_' || b.is_ascii_uppercase());
        // Every byte value at every position of names across the 8-byte
        // boundary, in a lowercase name and next to other bytes.
        for len in 1..=17 {
            for at in 0..len {
                for b in 0..=255u8 {
                    for fill in [b'a', b'-', 0x7f, 0xff, b'Z' + 1, b'A' - 1] {
                        let mut name = vec![fill; len];
                        name[at] = b;
                        assert_eq!(may_respell(&name), simple(&name), "{name:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn prefiltered_identity_spellings_are_the_core_ones() {
        let p = policy();
        let names = [
            ":path",
            "x-api-key",
            "x-keygate-tenant",
            "x_keygate_tenant",
            "X-Keygate-Key-Id",
            "x_keygate-scopes",
            "x-keygate-tenant_",
            "user_agent",
            "X-Other",
        ];
        let all = identity_spellings(&p, names);
        assert!(all.len() >= 3, "{all:?}");
        assert_eq!(
            identity_spellings(&p, names.into_iter().filter(|n| may_respell(n.as_bytes()))),
            all
        );
    }
}
