//! `keygate sync`: keeps every Envoy's credentials equal to the store.
//!
//! The main thread sleeps until the store says it changed (a filesystem
//! notification for the file store, a PostgreSQL NOTIFY for the shared one;
//! plus a cheap version check every second in case a wake was lost), then
//! hands the new snapshot to one thread per endpoint. Each endpoint thread
//! pushes the difference as an incremental push on top of what that Envoy
//! holds, asks it every `reconcile` interval what it holds (a full push under
//! a new generation if anything is unaccounted for: an Envoy restart, a
//! refused push), and backs off on its own when its Envoy fails, so a slow
//! or dead Envoy delays nobody else. Envoy keeps enforcing its last good set
//! whatever happens here.
//!
//! A push Envoy refuses as such (invalid, too large, wrong secret) is not
//! retried in a loop: the endpoint is reported refused (log line, its
//! `refused_pushes` counter, the status file) and tried again only once the
//! store changes or Envoy's held state does (e.g. it restarted).

use crate::endpoint::{log, Endpoint, Metrics};
use keygate_control::store::{Snapshot, Store};
use keygate_core::sync::SyncState;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Each endpoint's last sync outcome, for `keygate serve`'s /healthz.
#[derive(Clone, Debug, Default)]
pub struct EndpointState {
    pub in_sync: bool,
    pub store_version: Option<u64>,
    pub last_error: Option<String>,
    pub failures: u64,
}

fn states() -> &'static Mutex<BTreeMap<String, EndpointState>> {
    static S: OnceLock<Mutex<BTreeMap<String, EndpointState>>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// The state of every endpoint this process syncs.
pub fn endpoint_states() -> Vec<(String, EndpointState)> {
    states()
        .lock()
        .map(|s| s.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

fn set_state(addr: &str, st: EndpointState) {
    if let Ok(mut s) = states().lock() {
        s.insert(addr.to_owned(), st);
    }
}

/// Without a wake, the store's change token is still compared this often.
const CATCH_UP: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub struct Options {
    pub endpoints: Vec<String>,
    pub secret: Vec<u8>,
    pub reconcile: Duration,
    pub once: bool,
    pub takeover: bool,
    /// The longest token lifetime the filters are configured with: older
    /// session revocations are not pushed.
    pub token_lifetime: Duration,
    /// Where to keep a JSON health report of every endpoint.
    pub status_file: Option<PathBuf>,
    /// Metadata fields pushed with each key (see `Endpoint::forward_metadata`).
    pub forward_metadata: Vec<String>,
}

/// One endpoint's line in the status file.
#[derive(Serialize, Clone, Debug, PartialEq)]
struct EndpointStatus {
    /// `starting`, `in_sync`, `refused` (Envoy refuses the push; needs an
    /// operator) or `failing` (unreachable or erroring; retried).
    state: &'static str,
    /// The store version Envoy acknowledged.
    version: Option<u64>,
    error: Option<String>,
    metrics: Metrics,
}

#[derive(Serialize)]
struct Status<'a> {
    healthy: bool,
    endpoints: &'a BTreeMap<String, EndpointStatus>,
}

/// Every endpoint's status; rewritten (atomically) whenever one changes.
#[derive(Clone)]
struct Health {
    file: Option<Arc<PathBuf>>,
    endpoints: Arc<Mutex<BTreeMap<String, EndpointStatus>>>,
}

impl Health {
    fn set(&self, addr: &str, status: EndpointStatus) {
        let Ok(mut all) = self.endpoints.lock() else {
            return;
        };
        if all.get(addr) == Some(&status) {
            return;
        }
        all.insert(addr.to_owned(), status);
        let Some(file) = &self.file else {
            return;
        };
        let report = Status {
            healthy: all.values().all(|s| s.state == "in_sync"),
            endpoints: &all,
        };
        let written = serde_json::to_vec_pretty(&report)
            .map_err(std::io::Error::other)
            .and_then(|b| keygate_control::store::file::replace_file(file, &b));
        if let Err(e) = written {
            log(&format!(
                "cannot write the status file {}: {e}",
                file.display()
            ));
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Endpoint(#[from] crate::endpoint::Error),
    #[error(transparent)]
    Store(#[from] keygate_control::Error),
    #[error("{failed} of {total} endpoint(s) could not be synced (see the messages above)")]
    NotSynced { failed: usize, total: usize },
}

pub fn run(store: &dyn Store, opts: Options) -> Result<(), Error> {
    let endpoints = opts
        .endpoints
        .iter()
        .map(|e| {
            Endpoint::new(e, opts.takeover).map(|mut ep| {
                ep.token_lifetime = opts.token_lifetime;
                ep.forward_metadata = opts.forward_metadata.clone();
                ep
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let health = Health {
        file: opts.status_file.map(Arc::new),
        endpoints: Arc::default(),
    };
    let secret: Arc<[u8]> = opts.secret.into();
    if opts.once {
        return once(store, endpoints, &secret);
    }
    // Watch first, then read: a change in between is not missed.
    let (wake_tx, wake_rx) = mpsc::channel();
    let _watch = store.watch(wake_tx)?;
    let (mut token, mut snap) = first_read(store)?;
    let workers: Vec<Sender<Arc<Snapshot>>> = endpoints
        .into_iter()
        .map(|ep| {
            spawn(
                ep,
                Arc::clone(&snap),
                Arc::clone(&secret),
                opts.reconcile,
                health.clone(),
            )
        })
        .collect::<Result<_, _>>()?;
    log(&format!(
        "watching {}, {} endpoint(s)",
        store.describe(),
        workers.len()
    ));
    let mut store_error: Option<String> = None;
    loop {
        match wake_rx.recv_timeout(CATCH_UP) {
            Ok(()) => while wake_rx.try_recv().is_ok() {},
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                // The watcher died: keep going on the periodic check alone.
                std::thread::sleep(CATCH_UP);
            }
        }
        let result = store.change_token().and_then(|t| {
            if t == token {
                Ok(None)
            } else {
                read(store).map(Some)
            }
        });
        match result {
            Ok(None) => {}
            Ok(Some((t, s))) => {
                token = t;
                if s.version != snap.version || s.store_id != snap.store_id {
                    snap = s;
                    for w in &workers {
                        // A worker only ends if its thread panicked; the rest go on.
                        let _ = w.send(Arc::clone(&snap));
                    }
                }
                if store_error.take().is_some() {
                    log("the store is readable again");
                }
            }
            Err(e) => {
                let e = e.to_string();
                if store_error.as_deref() != Some(e.as_str()) {
                    log(&format!(
                        "cannot use the store: {e}; Envoy keeps the last good set"
                    ));
                }
                store_error = Some(e);
            }
        }
    }
}

/// The first snapshot. An unreachable database is waited for (it may be
/// starting too); a store that is missing, uninitialised or corrupt is an
/// operator error and ends the daemon.
fn first_read(store: &dyn Store) -> Result<(String, Arc<Snapshot>), keygate_control::Error> {
    let mut said = false;
    loop {
        match read(store) {
            Err(e @ keygate_control::Error::Postgres { .. }) => {
                if !said {
                    log(&format!("{e}; waiting for it"));
                    said = true;
                }
                std::thread::sleep(CATCH_UP);
            }
            other => return other,
        }
    }
}

fn read(store: &dyn Store) -> Result<(String, Arc<Snapshot>), keygate_control::Error> {
    // Token first: a change during the load shows up as a new token next time.
    let token = store.change_token()?;
    Ok((token, Arc::new(store.load()?)))
}

/// Every endpoint at once, each on its own thread; fails if any failed.
fn once(store: &dyn Store, endpoints: Vec<Endpoint>, secret: &[u8]) -> Result<(), Error> {
    let started = Instant::now();
    let snap = Arc::new(store.load()?);
    log(&format!(
        "read {} keys from {} in {:.1} ms",
        snap.keys.len(),
        store.describe(),
        started.elapsed().as_secs_f64() * 1e3
    ));
    let total = endpoints.len();
    let failed = std::thread::scope(|s| {
        let handles: Vec<_> = endpoints
            .into_iter()
            .map(|mut ep| {
                let snap = &snap;
                s.spawn(move || match ep.sync(snap, true, secret) {
                    Ok(()) => true,
                    Err(e) => {
                        log(&format!("{}: {e}", ep.addr));
                        false
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join())
            .filter(|r| !matches!(r, Ok(true)))
            .count()
    });
    match failed {
        0 => Ok(()),
        _ => Err(Error::NotSynced { failed, total }),
    }
}

fn spawn(
    ep: Endpoint,
    snap: Arc<Snapshot>,
    secret: Arc<[u8]>,
    reconcile: Duration,
    health: Health,
) -> Result<Sender<Arc<Snapshot>>, Error> {
    let (tx, rx) = mpsc::channel();
    health.set(
        &ep.addr,
        EndpointStatus {
            state: "starting",
            version: None,
            error: None,
            metrics: ep.metrics,
        },
    );
    std::thread::Builder::new()
        .name(format!("sync {}", ep.addr))
        .spawn(move || worker(ep, snap, &secret, reconcile, rx, &health))
        .map_err(|e| keygate_control::Error::Other(format!("cannot start a sync thread: {e}")))?;
    Ok(tx)
}

/// A refused push: the snapshot it carried and what Envoy held then.
struct Refusal {
    version: u64,
    held: Option<SyncState>,
}

/// One endpoint's loop: push on every new snapshot, check on every
/// reconcile tick, retry failures with its own exponential backoff; a
/// refused push waits for a new snapshot or a change in Envoy.
fn worker(
    mut ep: Endpoint,
    mut snap: Arc<Snapshot>,
    secret: &[u8],
    reconcile: Duration,
    rx: Receiver<Arc<Snapshot>>,
    health: &Health,
) {
    let mut last_check: Option<Instant> = None;
    let mut backoff: Option<Duration> = None;
    let mut last_error: Option<String> = None;
    let mut refused: Option<Refusal> = None;
    let mut dirty = true;
    loop {
        if dirty || backoff.is_some() || last_check.is_none_or(|t| t.elapsed() >= reconcile) {
            let check = backoff.is_some() || last_check.is_none_or(|t| t.elapsed() >= reconcile);
            if check {
                last_check = Some(Instant::now());
            }
            // Same snapshot, same Envoy: the push would be refused again.
            let unchanged = refused
                .as_ref()
                .is_some_and(|r| r.version == snap.version && ep.state().ok() == r.held);
            if !unchanged {
                refused = None;
                let result = ep.sync(&snap, check, secret);
                report(&mut ep, &snap, &result, &mut last_error, health);
                match result {
                    Ok(()) => {
                        dirty = false;
                        backoff = None;
                    }
                    Err(e) if e.is_refusal() => {
                        ep.forget();
                        dirty = false;
                        backoff = None;
                        refused = Some(Refusal {
                            version: snap.version,
                            held: ep.state().ok(),
                        });
                    }
                    Err(_) => {
                        ep.forget();
                        backoff = Some(backoff.map_or(BACKOFF_MIN, |b| (b * 2).min(BACKOFF_MAX)));
                    }
                }
            }
        }
        let wait = match (backoff, last_check) {
            (Some(b), _) => b,
            (None, Some(t)) => reconcile.saturating_sub(t.elapsed()),
            (None, None) => Duration::ZERO,
        };
        match rx.recv_timeout(wait) {
            Ok(s) => {
                snap = s;
                // Only the newest snapshot matters.
                while let Ok(s) = rx.try_recv() {
                    snap = s;
                }
                dirty = true;
                // A new snapshot is worth an immediate try, even while backing off.
                backoff = backoff.map(|_| BACKOFF_MIN);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Logs a change of outcome once, counts failures and refusals, and
/// updates the endpoint's status.
fn report(
    ep: &mut Endpoint,
    snap: &Snapshot,
    result: &Result<(), crate::endpoint::Error>,
    last_error: &mut Option<String>,
    health: &Health,
) {
    let state = match result {
        Ok(()) => {
            if last_error.take().is_some() {
                let m = ep.metrics;
                log(&format!(
                    "{}: in sync again ({} full, {} incremental pushes, {} failures, {} refused so far)",
                    ep.addr, m.full_pushes, m.incremental_pushes, m.failures, m.refused_pushes
                ));
            }
            "in_sync"
        }
        Err(e) => {
            let refusal = e.is_refusal();
            if refusal {
                ep.metrics.refused_pushes += 1;
            } else {
                ep.metrics.failures += 1;
            }
            let msg = e.to_string();
            if last_error.as_deref() != Some(msg.as_str()) {
                if refusal {
                    log(&format!(
                        "{}: {msg}; store version {} not pushed again until the store or Envoy changes",
                        ep.addr, snap.version
                    ));
                } else {
                    log(&format!("{}: {msg}", ep.addr));
                }
            }
            *last_error = Some(msg);
            if refusal {
                "refused"
            } else {
                "failing"
            }
        }
    };
    set_state(
        &ep.addr,
        EndpointState {
            in_sync: result.is_ok(),
            store_version: result.is_ok().then_some(snap.version),
            last_error: result.as_ref().err().map(ToString::to_string),
            failures: ep.metrics.failures + ep.metrics.refused_pushes,
        },
    );
    health.set(
        &ep.addr,
        EndpointStatus {
            state,
            version: ep.held_version(),
            error: last_error.clone(),
            metrics: ep.metrics,
        },
    );
}
