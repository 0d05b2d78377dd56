//! Prometheus text exposition, hand-rolled: a few counters do not need a
//! metrics framework.

use crate::AppState;
use axum::extract::State;
use axum::http::{header, Method};
use axum::response::IntoResponse;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// (method, route template, status) → (count, total seconds).
type Counts = BTreeMap<(String, String, u16), (u64, f64)>;

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<Counts>,
    auth_failures: AtomicU64,
}

impl Metrics {
    pub fn request(&self, method: &Method, route: &str, status: u16, took: Duration) {
        if let Ok(mut m) = self.requests.lock() {
            let e = m
                .entry((method_label(method).to_owned(), route.to_owned(), status))
                .or_insert((0, 0.0));
            e.0 += 1;
            e.1 += took.as_secs_f64();
        }
    }

    pub fn auth_failure(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// The method as a label. Clients choose the method, so any other than the
/// standard ones counts as "other": each label is a series kept forever,
/// and an unauthenticated client must not be able to add them without end.
/// (Routes are the router's templates or "unmatched", statuses are ours.)
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub async fn render(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    let mut o = String::new();
    o.push_str("# HELP keygate_api_requests_total API requests by method, route and status.\n# TYPE keygate_api_requests_total counter\n");
    let snapshot = st
        .metrics
        .requests
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    for ((m, r, s), (n, _)) in &snapshot {
        let _ = writeln!(
            o,
            "keygate_api_requests_total{{method=\"{m}\",route=\"{}\",status=\"{s}\"}} {n}",
            esc(r)
        );
    }
    o.push_str("# HELP keygate_api_request_seconds_sum Time spent answering, by method and route.\n# TYPE keygate_api_request_seconds_sum counter\n");
    for ((m, r, s), (_, secs)) in &snapshot {
        let _ = writeln!(
            o,
            "keygate_api_request_seconds_sum{{method=\"{m}\",route=\"{}\",status=\"{s}\"}} {secs}",
            esc(r)
        );
    }
    let _ = writeln!(
        o,
        "# HELP keygate_api_auth_failures_total Requests with an unknown, revoked or expired token.\n# TYPE keygate_api_auth_failures_total counter\nkeygate_api_auth_failures_total {}",
        st.metrics.auth_failures.load(Ordering::Relaxed)
    );
    if let Some(i) = &st.ingest {
        let lag = i.lag(crate::keygate_control_now_ms());
        let _ = writeln!(
            o,
            "# TYPE keygate_ingest_records_total counter\nkeygate_ingest_records_total {}",
            i.records.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "# TYPE keygate_ingest_errors_total counter\nkeygate_ingest_errors_total {}",
            i.errors.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "# TYPE keygate_ingest_bytes_behind gauge\nkeygate_ingest_bytes_behind {}",
            lag.bytes_behind
        );
        if let Some(s) = lag.seconds {
            let _ = writeln!(
                o,
                "# TYPE keygate_ingest_lag_seconds gauge\nkeygate_ingest_lag_seconds {s}"
            );
        }
    }
    if let Some(f) = &st.sync {
        o.push_str("# HELP keygate_sync_in_sync 1 when the endpoint holds the store's current set.\n# TYPE keygate_sync_in_sync gauge\n");
        let eps = f();
        for e in &eps {
            let _ = writeln!(
                o,
                "keygate_sync_in_sync{{endpoint=\"{}\"}} {}",
                esc(&e.endpoint),
                u8::from(e.in_sync)
            );
        }
        o.push_str("# TYPE keygate_sync_failures_total counter\n");
        for e in &eps {
            let _ = writeln!(
                o,
                "keygate_sync_failures_total{{endpoint=\"{}\"}} {}",
                esc(&e.endpoint),
                e.failures
            );
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_a_client_makes_up_share_one_series() {
        let m = Metrics::default();
        for i in 0..300 {
            let method = Method::from_bytes(format!("ZZ{i}").as_bytes()).unwrap();
            m.request(&method, "/healthz", 405, Duration::from_millis(1));
        }
        m.request(&Method::GET, "/healthz", 200, Duration::from_millis(1));
        m.request(&Method::PATCH, "/healthz", 405, Duration::from_millis(1));
        let counts = m.requests.lock().unwrap().clone();
        let keys: Vec<(&str, u64)> = counts
            .iter()
            .map(|((method, _, _), (n, _))| (method.as_str(), *n))
            .collect();
        assert_eq!(keys, vec![("GET", 1), ("PATCH", 1), ("other", 300)]);
    }
}
