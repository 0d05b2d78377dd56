//! `keygate sync`: keeps every Envoy's credentials equal to the store.
//!
//! Watches the store (a cheap stat every few milliseconds) and, on a change,
//! pushes the difference to each endpoint as an incremental push on top of
//! the version that endpoint holds. Every `reconcile` interval it asks each
//! endpoint what it holds; anything it cannot account for (an Envoy restart,
//! its own restart, a refused push) triggers a full push under a new
//! generation. If the store becomes unreadable it keeps the last good state
//! and says so; Envoy keeps enforcing its last good set whatever happens here.

use crate::http;
use crate::store::{Snapshot, Store};
use keygate_core::sync::{
    sign, Mode, Push, RevokedSession, SyncState, MAX_PUSH_BYTES, MAX_PUSH_ITEMS, PUSH_PATH,
    SIGNATURE_HEADER, STATE_PATH,
};
use keygate_core::CredentialRecord;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

/// Target size of one batch body; well under the filter's limit.
const BATCH_BYTES: usize = MAX_PUSH_BYTES / 2;
const BATCH_ITEMS: usize = MAX_PUSH_ITEMS / 2;
const TIMEOUT: Duration = Duration::from_secs(5);

pub struct Options {
    pub endpoints: Vec<String>,
    pub secret: Vec<u8>,
    pub poll: Duration,
    pub reconcile: Duration,
    pub once: bool,
}

/// What we know an endpoint holds because we pushed it and it said so.
struct Held {
    generation: u64,
    version: u64,
    set: BTreeMap<String, CredentialRecord>,
    revoked: BTreeSet<RevokedSession>,
}

struct Endpoint {
    addr: String,
    held: Option<Held>,
    last_error: Option<String>,
}

pub fn log(msg: &str) {
    eprintln!(
        "{} keygate sync: {msg}",
        humantime::format_rfc3339_millis(SystemTime::now())
    );
}

fn as_set(snap: &Snapshot) -> BTreeMap<String, CredentialRecord> {
    snap.keys
        .iter()
        .map(|k| (k.record.key_hash.clone(), k.record.clone()))
        .collect()
}

fn revocations(snap: &Snapshot) -> BTreeSet<RevokedSession> {
    snap.revoked_sessions.iter().cloned().collect()
}

impl Endpoint {
    fn state(&self) -> Result<SyncState, String> {
        let r = http::request(&self.addr, "GET", STATE_PATH, &[], b"", TIMEOUT)?;
        if r.status != 200 {
            return Err(format!("state request answered {}", r.status));
        }
        serde_json::from_slice(&r.body).map_err(|e| format!("bad state from Envoy: {e}"))
    }

    fn send(&self, push: &Push, secret: &[u8]) -> Result<SyncState, (u16, String)> {
        let body = serde_json::to_vec(push).map_err(|e| (0, e.to_string()))?;
        let sig = sign(secret, &body);
        let headers = [
            ("content-type", "application/json"),
            (SIGNATURE_HEADER, sig.as_str()),
        ];
        let r = http::request(&self.addr, "POST", PUSH_PATH, &headers, &body, TIMEOUT)
            .map_err(|e| (0, e))?;
        if r.status != 200 {
            return Err((r.status, String::from_utf8_lossy(&r.body).into_owned()));
        }
        serde_json::from_slice(&r.body).map_err(|e| (r.status, format!("bad reply: {e}")))
    }

    /// The whole set under a generation newer than anything the endpoint has seen.
    fn full_push(
        &mut self,
        snap: &Snapshot,
        state: &SyncState,
        secret: &[u8],
    ) -> Result<(), String> {
        let started = Instant::now();
        let generation = state
            .generation
            .max(state.pending.map_or(0, |p| p.generation))
            + 1;
        let set = as_set(snap);
        let mut batches: Vec<Vec<CredentialRecord>> = vec![Vec::new()];
        let mut bytes = 0;
        for r in set.values() {
            let size = serde_json::to_vec(r).map_or(0, |v| v.len()) + 1;
            let current = batches.last().map_or(0, Vec::len);
            if current > 0 && (current >= BATCH_ITEMS || bytes + size > BATCH_BYTES) {
                batches.push(Vec::new());
                bytes = 0;
            }
            bytes += size;
            if let Some(b) = batches.last_mut() {
                b.push(r.clone());
            }
        }
        let n = batches.len();
        for (i, upserts) in batches.into_iter().enumerate() {
            let push = Push {
                mode: Mode::Full,
                generation,
                base_version: 0,
                version: snap.version,
                batch: u32::try_from(i).map_err(|_| "too many batches")?,
                last: i + 1 == n,
                upserts,
                deletes: vec![],
                // Revocations are few and bounded; they ride on the last batch.
                revoked_sessions: if i + 1 == n {
                    snap.revoked_sessions.clone()
                } else {
                    vec![]
                },
            };
            self.send(&push, secret)
                .map_err(|(status, m)| format!("full push batch {i} refused ({status}): {m}"))?;
        }
        log(&format!(
            "{}: full push of {} credentials in {n} batches, generation {generation} version {} ({:.1} ms)",
            self.addr,
            set.len(),
            snap.version,
            started.elapsed().as_secs_f64() * 1e3
        ));
        self.held = Some(Held {
            generation,
            version: snap.version,
            set,
            revoked: revocations(snap),
        });
        Ok(())
    }

    /// Only what changed since what the endpoint holds. Returns false when it
    /// cannot apply (too large, or the endpoint moved): the caller goes full.
    fn incremental_push(&mut self, snap: &Snapshot, secret: &[u8]) -> Result<bool, String> {
        let Some(held) = &self.held else {
            return Ok(false);
        };
        let started = Instant::now();
        let set = as_set(snap);
        let upserts: Vec<CredentialRecord> = set
            .iter()
            .filter(|(h, r)| held.set.get(*h) != Some(r))
            .map(|(_, r)| r.clone())
            .collect();
        let deletes: Vec<String> = held
            .set
            .keys()
            .filter(|h| !set.contains_key(*h))
            .cloned()
            .collect();
        let revoked = revocations(snap);
        let new_revocations: Vec<RevokedSession> =
            revoked.difference(&held.revoked).cloned().collect();
        if upserts.len() + deletes.len() + new_revocations.len() > BATCH_ITEMS
            || snap.version <= held.version
        {
            return Ok(false);
        }
        let push = Push {
            mode: Mode::Incremental,
            generation: held.generation,
            base_version: held.version,
            version: snap.version,
            batch: 0,
            last: true,
            upserts,
            deletes,
            revoked_sessions: new_revocations,
        };
        match self.send(&push, secret) {
            Ok(_) => {
                log(&format!(
                    "{}: pushed {} upserts, {} deletes, {} session revocations, version {} -> {} ({:.1} ms)",
                    self.addr,
                    push.upserts.len(),
                    push.deletes.len(),
                    push.revoked_sessions.len(),
                    push.base_version,
                    push.version,
                    started.elapsed().as_secs_f64() * 1e3
                ));
                self.held = Some(Held {
                    generation: held.generation,
                    version: snap.version,
                    set,
                    revoked,
                });
                Ok(true)
            }
            Err((409, m)) => {
                log(&format!(
                    "{}: incremental push refused ({m}); doing a full push",
                    self.addr
                ));
                Ok(false)
            }
            Err((status, m)) => Err(format!("push refused ({status}): {m}")),
        }
    }

    /// Brings the endpoint to `snap`. `check` asks Envoy what it holds first.
    fn sync(&mut self, snap: &Snapshot, check: bool, secret: &[u8]) -> Result<(), String> {
        let mut state = None;
        if check || self.held.is_none() {
            let s = self.state()?;
            let matches = self.held.as_ref().is_some_and(|h| {
                s.pending.is_none() && s.generation == h.generation && s.version == h.version
            });
            if !matches {
                if self.held.is_some() {
                    log(&format!(
                        "{}: holds generation {} version {}, not what was pushed (Envoy restarted?)",
                        self.addr, s.generation, s.version
                    ));
                }
                self.held = None;
            }
            state = Some(s);
        }
        if self
            .held
            .as_ref()
            .is_some_and(|h| h.version == snap.version)
        {
            return Ok(());
        }
        if self.held.is_some() && self.incremental_push(snap, secret)? {
            return Ok(());
        }
        let state = match state {
            Some(s) => s,
            None => self.state()?,
        };
        self.full_push(snap, &state, secret)
    }
}

pub fn run(store: &impl Store, opts: Options) -> Result<(), String> {
    let mut endpoints: Vec<Endpoint> = opts
        .endpoints
        .iter()
        .map(|e| {
            Ok(Endpoint {
                addr: http::host_port(e)?,
                held: None,
                last_error: None,
            })
        })
        .collect::<Result<_, String>>()?;
    let mut snap: Option<Snapshot> = None;
    let mut token = None;
    let mut last_check = Instant::now() - opts.reconcile;
    log(&format!(
        "watching the store, {} endpoint(s)",
        endpoints.len()
    ));
    loop {
        let new_token = store.change_token();
        if new_token != token || snap.is_none() {
            match store.load() {
                Ok(s) => {
                    snap = Some(s);
                    token = new_token;
                }
                Err(e) => {
                    log(&format!(
                        "cannot use the store: {e}; Envoy keeps the last good set"
                    ));
                    token = new_token;
                    if opts.once {
                        return Err(e);
                    }
                }
            }
        }
        let check = last_check.elapsed() >= opts.reconcile;
        if check {
            last_check = Instant::now();
        }
        let mut failed = false;
        if let Some(snap) = &snap {
            for ep in &mut endpoints {
                match ep.sync(snap, check, &opts.secret) {
                    Ok(()) => {
                        if ep.last_error.take().is_some() {
                            log(&format!("{}: in sync again", ep.addr));
                        }
                    }
                    Err(e) => {
                        failed = true;
                        ep.held = None;
                        if ep.last_error.as_deref() != Some(e.as_str()) {
                            log(&format!("{}: {e}", ep.addr));
                        }
                        ep.last_error = Some(e);
                    }
                }
            }
        }
        if opts.once {
            return if failed {
                Err("some endpoints could not be synced".into())
            } else {
                Ok(())
            };
        }
        std::thread::sleep(opts.poll);
    }
}
