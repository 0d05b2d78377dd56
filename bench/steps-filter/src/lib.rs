//! Throwaway: `configuration` is "<step> <n>"; the step runs n times per
//! request. Errors are ignored on purpose: only the time is of interest, and
//! bench/steps.py checks every request still gets its 200.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType, MetricType};
use sha2::Digest;
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default, Clone)]
struct Conf {
    step: String,
    n: u32,
    metric: u32,
}

#[derive(Default)]
struct Root {
    conf: Rc<Conf>,
}

impl Context for Root {}

/// A credential-sized entry (as keygate stores one today) and an 8-byte counter.
const CRED_KEY: &str = "c:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
const COUNTER_KEY: &str = "r:bench-0000000";

impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        let raw = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let text = String::from_utf8(raw).unwrap_or_default();
        let mut parts = text.split_whitespace();
        let step = parts.next().unwrap_or("none").to_owned();
        let n = parts.next().and_then(|s| s.parse().ok()).unwrap_or(1);
        let metric = hostcalls::define_metric(MetricType::Counter, "steps.count").unwrap_or(0);
        let record = br#"1
{"key_id":"bench-0000000","tenant":"t0","scopes":["read"],"allowed_ips":["127.0.0.0/8"],"rate_limit":{"requests":1000000000,"window_secs":60}}"#;
        let _ = hostcalls::set_shared_data(CRED_KEY, Some(record), None);
        let _ = hostcalls::set_shared_data(COUNTER_KEY, Some(&0u64.to_le_bytes()), None);
        self.conf = Rc::new(Conf { step, n, metric });
        true
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Step(self.conf.clone(), None, 0)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Step(Rc<Conf>, Option<Conf>, u64);

fn now_ns() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Context for Step {}

impl HttpContext for Step {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        // Self-timing mode: `x-step: <name> <n>` picks the step per request;
        // the elapsed time of the loop comes back in `x-step-ns`.
        let timed = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-step")
            .ok()
            .flatten()
            .and_then(|v| String::from_utf8(v).ok())
            .map(|t| {
                let mut p = t.split_whitespace();
                Conf {
                    step: p.next().unwrap_or("none").to_owned(),
                    n: p.next().and_then(|s| s.parse().ok()).unwrap_or(1),
                    metric: self.0.metric,
                }
            });
        let Some(c) = timed else {
            return self.run_request(&self.0.clone());
        };
        let start = now_ns();
        self.run_request(&c);
        self.2 = now_ns().saturating_sub(start);
        self.1 = Some(c);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        if let Some(c) = self.1.take() {
            let start = now_ns();
            self.run_response(&c);
            let total = self.2 + now_ns().saturating_sub(start);
            let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, "x-step-ns", &total.to_string());
            return Action::Continue;
        }
        let c = self.0.clone();
        self.run_response(&c)
    }
}

impl Step {
    fn run_request(&mut self, c: &Conf) -> Action {
        for i in 0..c.n {
            match c.step.as_str() {
                "time" => {
                    let _ = hostcalls::get_current_time();
                }
                "hdr" => {
                    let _ = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-api-key");
                }
                "hdr_absent" => {
                    let _ = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-absent");
                }
                "hdr_map" => {
                    let _ = hostcalls::get_map_bytes(MapType::HttpRequestHeaders);
                }
                "set_req" => {
                    let _ = hostcalls::set_map_value(
                        MapType::HttpRequestHeaders,
                        "x-keygate-tenant",
                        Some("t0"),
                    );
                }
                "add_req" => {
                    let _ = hostcalls::add_map_value(MapType::HttpRequestHeaders, "x-keygate-tenant", "t0");
                }
                "remove_req" => {
                    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "x-absent", None);
                }
                "addr" => {
                    let _ = hostcalls::get_property(vec!["source", "address"]);
                }
                "set_prop" => {
                    let _ = hostcalls::set_property(vec!["keygate_key_id"], Some(b"bench-0000000"));
                }
                "shared_get" => {
                    let _ = hostcalls::get_shared_data(CRED_KEY);
                }
                "shared_cas" => {
                    if let Ok((Some(v), cas)) = hostcalls::get_shared_data(COUNTER_KEY) {
                        let n = u64::from_le_bytes(v.try_into().unwrap_or([0; 8])) + 1;
                        let _ = hostcalls::set_shared_data(COUNTER_KEY, Some(&n.to_le_bytes()), cas);
                    }
                }
                "metric" => {
                    let _ = hostcalls::increment_metric(c.metric, 1);
                }
                "sha" => {
                    let d = sha2::Sha256::digest(format!("bench-key-{i}").as_bytes());
                    std::hint::black_box(d);
                }
                _ => {}
            }
        }
        Action::Continue
    }

    fn run_response(&mut self, c: &Conf) -> Action {
        for _ in 0..c.n {
            match c.step.as_str() {
                "set_resp" => {
                    let _ = hostcalls::set_map_value(
                        MapType::HttpResponseHeaders,
                        "x-ratelimit-limit",
                        Some("1000"),
                    );
                }
                "add_resp" => {
                    let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, "x-ratelimit-limit", "1000");
                }
                _ => {}
            }
        }
        Action::Continue
    }
}
