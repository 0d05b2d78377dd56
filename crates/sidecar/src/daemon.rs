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

use crate::endpoint::{log, Endpoint};
use keygate_control::store::{Snapshot, Store};
use std::collections::BTreeMap;
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
        .map(|e| Endpoint::new(e, opts.takeover))
        .collect::<Result<Vec<_>, _>>()?;
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
        .map(|ep| spawn(ep, Arc::clone(&snap), Arc::clone(&secret), opts.reconcile))
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
    let snap = store.load()?;
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
) -> Result<Sender<Arc<Snapshot>>, Error> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("sync {}", ep.addr))
        .spawn(move || worker(ep, snap, &secret, reconcile, rx))
        .map_err(|e| keygate_control::Error::Other(format!("cannot start a sync thread: {e}")))?;
    Ok(tx)
}

/// One endpoint's loop: push on every new snapshot, check on every
/// reconcile tick, retry failures with its own exponential backoff.
fn worker(
    mut ep: Endpoint,
    mut snap: Arc<Snapshot>,
    secret: &[u8],
    reconcile: Duration,
    rx: Receiver<Arc<Snapshot>>,
) {
    let mut last_check: Option<Instant> = None;
    let mut backoff: Option<Duration> = None;
    let mut last_error: Option<String> = None;
    let mut dirty = true;
    loop {
        if dirty || backoff.is_some() || last_check.is_none_or(|t| t.elapsed() >= reconcile) {
            let check = backoff.is_some() || last_check.is_none_or(|t| t.elapsed() >= reconcile);
            if check {
                last_check = Some(Instant::now());
            }
            let result = ep.sync(&snap, check, secret);
            set_state(
                &ep.addr,
                EndpointState {
                    in_sync: result.is_ok(),
                    store_version: result.is_ok().then_some(snap.version),
                    last_error: result.as_ref().err().map(ToString::to_string),
                    failures: ep.metrics.failures + u64::from(result.is_err()),
                },
            );
            match result {
                Ok(()) => {
                    dirty = false;
                    backoff = None;
                    if last_error.take().is_some() {
                        let m = ep.metrics;
                        log(&format!(
                            "{}: in sync again ({} full, {} incremental pushes, {} failures so far)",
                            ep.addr, m.full_pushes, m.incremental_pushes, m.failures
                        ));
                    }
                }
                Err(e) => {
                    ep.metrics.failures += 1;
                    ep.forget();
                    let e = e.to_string();
                    if last_error.as_deref() != Some(e.as_str()) {
                        log(&format!("{}: {e}", ep.addr));
                    }
                    last_error = Some(e);
                    backoff = Some(backoff.map_or(BACKOFF_MIN, |b| (b * 2).min(BACKOFF_MAX)));
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
