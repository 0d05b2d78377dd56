//! `keygate serve`: the management API (`/api/v1`, described by the
//! OpenAPI document at `/api/v1/openapi.json`), `/healthz` and Prometheus
//! `/metrics`, over the keygate-control service layer. Handlers only
//! translate: the service validates and changes the store, `mgmt` keeps
//! tokens, tenants and the audit trail. Store and database calls are
//! blocking and run on tokio's blocking pool.

mod api;
mod error;
mod extract;
mod limiter;
mod limits_api;
mod metrics;
pub mod portal;

pub use error::ApiError;
pub use limiter::FailLimiter;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use axum::Router;
use keygate_control::ingest::IngestStats;
use keygate_control::{Conn, Service};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Largest request body accepted (413 above).
pub const MAX_BODY: usize = 64 * 1024;

/// The sync daemon's view of each Envoy endpoint, for `/healthz` and `/metrics`.
pub type SyncReport = Arc<dyn Fn() -> Vec<EndpointHealth> + Send + Sync>;

#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointHealth {
    pub endpoint: String,
    pub in_sync: bool,
    pub store_version: Option<u64>,
    pub last_error: Option<String>,
    pub failures: u64,
}

pub struct AppState {
    pub svc: Mutex<Service>,
    /// The management database (tokens, tenants, audit, logs).
    pub db: Mutex<Conn>,
    pub limiter: FailLimiter,
    pub metrics: metrics::Metrics,
    pub ingest: Option<Arc<IngestStats>>,
    pub sync: Option<SyncReport>,
}

impl AppState {
    pub fn new(svc: Service, db: Conn, limiter: FailLimiter) -> AppState {
        AppState {
            svc: Mutex::new(svc),
            db: Mutex::new(db),
            limiter,
            metrics: metrics::Metrics::default(),
            ingest: None,
            sync: None,
        }
    }
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The HTTP interface. Every API route comes from [`api::routes`], the
/// same table the OpenAPI test compares with the document.
pub fn router(state: Arc<AppState>) -> Router {
    let mut by_path: BTreeMap<&str, MethodRouter<Arc<AppState>>> = BTreeMap::new();
    for (path, _, mr) in api::routes() {
        let merged = match by_path.remove(path) {
            Some(prev) => prev.merge(mr),
            None => mr,
        };
        by_path.insert(path, merged);
    }
    let mut r = Router::new();
    for (path, mr) in by_path {
        r = r.route(path, mr);
    }
    r.merge(portal::router())
        .route("/healthz", axum::routing::get(healthz))
        .route("/metrics", axum::routing::get(metrics::render))
        .fallback(|| async { ApiError::not_found("route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this method is not allowed here",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            access_log,
        ))
        .with_state(state)
}

/// One JSON line per request: method, path, status, duration, token id
/// (never a token, never the query string, which may hold filters).
async fn access_log(State(st): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let slot = extract::TokenSlot::default();
    req.extensions_mut().insert(slot.clone());
    let resp = next.run(req).await;
    let took = start.elapsed();
    let status = resp.status().as_u16();
    let token_id = slot.0.lock().ok().and_then(|s| s.clone());
    st.metrics.request(&method, &route, status, took);
    eprintln!(
        "{}",
        json!({
            "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            "method": method.as_str(),
            "path": path,
            "status": status,
            "duration_ms": (took.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
            "token_id": token_id,
        })
    );
    resp
}

/// 200 when the store answers, 503 when it does not; with each Envoy's
/// sync state and how far log ingestion is behind.
async fn healthz(State(st): State<Arc<AppState>>) -> Response {
    let st2 = Arc::clone(&st);
    let store = tokio::task::spawn_blocking(move || {
        st2.svc
            .lock()
            .map_err(|_| "lock poisoned".to_owned())
            .and_then(|s| s.store().change_token().map_err(|e| e.to_string()))
    })
    .await
    .unwrap_or_else(|_| Err("health check failed".into()));
    let sync = st.sync.as_ref().map(|f| f()).unwrap_or_default();
    let ingest = st.ingest.as_ref().map(|s| {
        let lag = s.lag(keygate_control_now_ms());
        json!({
            "lag_seconds": lag.seconds,
            "bytes_behind": lag.bytes_behind,
            "records": s.records.load(std::sync::atomic::Ordering::Relaxed),
            "last_error": s.last_error(),
        })
    });
    let ok = store.is_ok();
    let body = json!({
        "status": if !ok { "unavailable" } else if sync.iter().all(|e| e.in_sync) { "ok" } else { "degraded" },
        "store": match &store {
            Ok(_) => json!({"reachable": true}),
            Err(e) => json!({"reachable": false, "error": e}),
        },
        "sync": sync,
        "ingest": ingest.unwrap_or(Value::Null),
    });
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

fn keygate_control_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Serves until SIGTERM or Ctrl-C; requests in flight finish first.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<AppState>) -> std::io::Result<()> {
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        // If the handler cannot be installed, only SIGTERM stops us.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// The methods and paths of the API, for the OpenAPI test.
pub fn api_operations() -> Vec<(Method, &'static str)> {
    api::routes().into_iter().map(|(p, m, _)| (m, p)).collect()
}

/// The OpenAPI 3.1 document served at `/api/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

#[cfg(test)]
mod tests;
