//! `keygate serve`: the management API, the sync daemon, the access-log
//! ingester and the retention pruner in one process.
//!
//! One process on purpose: the API changes the store through the same
//! SQLite file the daemon watches, and an in-process wake pushes the
//! change to every Envoy at once (a separate daemon would see it only at
//! its once-a-second check). The daemon and the ingester run on their own
//! threads, so a slow Envoy or a large log never stalls an API request.

use crate::cli::ServeArgs;
use crate::{daemon, management_db, CliError};
use keygate_control::{Ingester, Pruner, Service};
use keygate_server::{AppState, EndpointHealth, FailLimiter};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How often the access log is read: a request shows in the API within
/// this plus one batch.
const INGEST_POLL: Duration = Duration::from_millis(250);

fn log(msg: &str) {
    eprintln!(
        "{}",
        serde_json::json!({
            "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            "component": "serve",
            "message": msg,
        })
    );
}

pub fn run(
    store: &str,
    args: ServeArgs,
    style: keygate_control::service::KeyStyle,
) -> Result<(), CliError> {
    let db = management_db(Some(store), args.db.as_deref())?;
    // Audit records commit with their changes when the store is this database.
    let mut svc = Service::open(store)?.with_audit_db(&db);
    svc.set_key_style(style);
    // A missing store is the operator's to fix, before anything listens.
    svc.snapshot()?;
    let conn = db.open()?;
    let limiter = FailLimiter::new(
        args.auth_failures.requests,
        Duration::from_secs(u64::from(args.auth_failures.window_secs)),
    );
    let mut state = AppState::new(svc, conn, limiter);
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();

    if !args.endpoints.is_empty() {
        let secret = crate::read_sync_secret(args.secret_file.as_deref())?;
        let opts = daemon::Options {
            endpoints: args.endpoints.clone(),
            secret,
            reconcile: args.reconcile,
            once: false,
            takeover: args.takeover,
            // The longest lifetime a filter accepts: never drops a revocation
            // a live token still needs; /healthz reports endpoint health.
            token_lifetime: Duration::from_secs(keygate_core::token::MAX_LIFETIME_SECS),
            status_file: None,
            forward_metadata: args.forward_metadata.clone(),
        };
        let daemon_store = keygate_control::store::open(store)?;
        // The daemon runs until the process ends; it holds no buffered state.
        std::thread::Builder::new()
            .name("sync".into())
            .spawn(move || {
                if let Err(e) = daemon::run(daemon_store.as_ref(), opts) {
                    log(&format!("the sync daemon stopped: {e}"));
                }
            })
            .map_err(|e| CliError::Usage(format!("cannot start the sync thread: {e}")))?;
        let endpoints = args.endpoints.clone();
        state.sync = Some(Arc::new(move || {
            let known = daemon::endpoint_states();
            endpoints
                .iter()
                .map(|ep| {
                    let st = known
                        .iter()
                        .find(|(addr, _)| ep.contains(addr.as_str()) || addr == ep)
                        .map(|(_, s)| s.clone())
                        .unwrap_or_default();
                    EndpointHealth {
                        endpoint: ep.clone(),
                        in_sync: st.in_sync,
                        store_version: st.store_version,
                        last_error: st.last_error,
                        failures: st.failures,
                    }
                })
                .collect()
        }));
    }

    if let Some(path) = &args.access_log {
        let mut ingester = Ingester::new(&db, path)?.with_poll_interval(INGEST_POLL);
        state.ingest = Some(ingester.stats());
        let stop = Arc::clone(&stop);
        threads.push(
            std::thread::Builder::new()
                .name("ingest".into())
                .spawn(move || ingester.run_until(&stop))
                .map_err(|e| CliError::Usage(format!("cannot start the ingest thread: {e}")))?,
        );
    }
    let pruner = Pruner::new(&db, args.retention);
    {
        let stop = Arc::clone(&stop);
        threads.push(
            std::thread::Builder::new()
                .name("prune".into())
                .spawn(move || pruner.run_until(&stop))
                .map_err(|e| CliError::Usage(format!("cannot start the pruning thread: {e}")))?,
        );
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let state = Arc::new(state);
    let listen = args.listen;
    let served = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| CliError::Usage(format!("--listen: cannot listen on {listen}: {e}")))?;
        log(&format!(
            "listening on http://{}",
            listener.local_addr().unwrap_or(listen)
        ));
        keygate_server::serve(listener, state)
            .await
            .map_err(CliError::from)
    });
    // In-flight requests are done; let the ingester commit its batch.
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    log("stopped");
    served
}
