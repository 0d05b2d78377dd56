//! One Envoy sync endpoint: its HTTP client, what it is known to hold, and
//! the pushes that bring it to a store snapshot. Each endpoint is driven by
//! its own thread (see `daemon`), so a slow or dead Envoy delays only itself.

use keygate_control::store::Snapshot;
use keygate_core::sync::{
    is_foreign, sign, Mode, Push, RevokedSession, StoreId, SyncState, MAX_PUSH_BYTES,
    MAX_PUSH_ITEMS, PUSH_PATH, SIGNATURE_HEADER, STATE_PATH,
};
use keygate_core::CredentialRecord;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Target size of one batch body; well under the filter's limit.
const BATCH_BYTES: usize = MAX_PUSH_BYTES / 2;
const BATCH_ITEMS: usize = MAX_PUSH_ITEMS / 2;
const TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REPLY: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("endpoint '{0}' should look like http://127.0.0.1:10001")]
    BadEndpoint(String),
    #[error("cannot reach Envoy ({0}); is it running, with its sync listener on this port?")]
    Unreachable(String),
    #[error("Envoy refused the {what} ({status}): {body}")]
    Refused {
        what: &'static str,
        status: u16,
        body: String,
    },
    #[error("Envoy's reply to the {what} is not understood ({detail}); are Envoy and keygate the same release?")]
    BadReply { what: &'static str, detail: String },
    #[error(
        "Envoy holds the credentials of store {held}, not of this store ({ours}); \
         nothing pushed. If this store should replace them, run keygate sync with --takeover"
    )]
    ForeignStore { held: String, ours: String },
}

/// What we know an endpoint holds because we pushed it and it said so.
struct Held {
    generation: u64,
    version: u64,
    set: BTreeMap<String, CredentialRecord>,
    revoked: BTreeSet<RevokedSession>,
}

/// Counters of one endpoint, shown in its log lines.
#[derive(Default, Debug, Clone, Copy)]
pub struct Metrics {
    pub full_pushes: u64,
    pub incremental_pushes: u64,
    pub failures: u64,
}

pub struct Endpoint {
    pub addr: String,
    url: String,
    agent: ureq::Agent,
    held: Option<Held>,
    pub metrics: Metrics,
    pub takeover: bool,
}

pub fn log(msg: &str) {
    eprintln!(
        "{} keygate sync: {msg}",
        humantime::format_rfc3339_millis(std::time::SystemTime::now())
    );
}

/// `http://127.0.0.1:10001`, `127.0.0.1:10001` → `127.0.0.1:10001`.
pub fn host_port(endpoint: &str) -> Result<String, Error> {
    let rest = endpoint
        .strip_prefix("http://")
        .unwrap_or(endpoint)
        .trim_end_matches('/');
    if endpoint.starts_with("https://")
        || rest.is_empty()
        || rest.contains('/')
        || !rest.contains(':')
    {
        return Err(Error::BadEndpoint(endpoint.to_owned()));
    }
    Ok(rest.to_owned())
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

fn id_str(id: Option<StoreId>) -> String {
    id.map_or_else(|| "-".into(), |i| i.to_string())
}

impl Endpoint {
    pub fn new(endpoint: &str, takeover: bool) -> Result<Endpoint, Error> {
        let addr = host_port(endpoint)?;
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(TIMEOUT))
            .http_status_as_error(false)
            .build()
            .new_agent();
        Ok(Endpoint {
            url: format!("http://{addr}"),
            addr,
            agent,
            held: None,
            metrics: Metrics::default(),
            takeover,
        })
    }

    /// Forget what we believe it holds: the next sync asks Envoy first.
    pub fn forget(&mut self) {
        self.held = None;
    }

    fn reply(
        &self,
        what: &'static str,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<SyncState, Error> {
        let mut r = r.map_err(|e| Error::Unreachable(e.to_string()))?;
        let status = r.status().as_u16();
        let body = r
            .body_mut()
            .with_config()
            .limit(MAX_REPLY)
            .read_to_vec()
            .map_err(|e| Error::Unreachable(e.to_string()))?;
        if status != 200 {
            return Err(Error::Refused {
                what,
                status,
                body: String::from_utf8_lossy(&body).trim().to_owned(),
            });
        }
        serde_json::from_slice(&body).map_err(|e| Error::BadReply {
            what,
            detail: e.to_string(),
        })
    }

    pub fn state(&self) -> Result<SyncState, Error> {
        let url = format!("{}{STATE_PATH}", self.url);
        self.reply("state request", self.agent.get(&url).call())
    }

    fn send(&self, push: &Push, secret: &[u8]) -> Result<SyncState, Error> {
        let body = serde_json::to_vec(push).map_err(|e| Error::BadReply {
            what: "push",
            detail: e.to_string(),
        })?;
        let sig = sign(secret, &body);
        let url = format!("{}{PUSH_PATH}", self.url);
        let r = self
            .agent
            .post(&url)
            .header("content-type", "application/json")
            .header(SIGNATURE_HEADER, &sig)
            .send(&body[..]);
        self.reply("push", r)
    }

    /// The whole set under a generation newer than anything the endpoint has seen.
    fn full_push(
        &mut self,
        snap: &Snapshot,
        state: &SyncState,
        secret: &[u8],
    ) -> Result<(), Error> {
        let started = Instant::now();
        let generation = state
            .generation
            .max(state.pending.map_or(0, |p| p.generation))
            + 1;
        let probe = Push {
            mode: Mode::Full,
            generation,
            base_version: 0,
            version: snap.version,
            batch: 0,
            last: false,
            upserts: vec![],
            deletes: vec![],
            revoked_sessions: vec![],
            store_id: snap.store_id,
            takeover: self.takeover,
        };
        // Checked here too, so the operator gets the reason without a refused push.
        if !self.takeover && is_foreign(&probe, state) {
            return Err(Error::ForeignStore {
                held: id_str(state.store_id),
                ours: id_str(snap.store_id),
            });
        }
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
                batch: u32::try_from(i).unwrap_or(u32::MAX),
                last: i + 1 == n,
                upserts,
                // Revocations are few and bounded; they ride on the last batch.
                revoked_sessions: if i + 1 == n {
                    snap.revoked_sessions.clone()
                } else {
                    vec![]
                },
                ..probe.clone()
            };
            self.send(&push, secret)?;
        }
        self.metrics.full_pushes += 1;
        log(&format!(
            "{}: full push of {} credentials in {n} batches, store {} generation {generation} version {} ({:.1} ms)",
            self.addr,
            set.len(),
            id_str(snap.store_id),
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
    fn incremental_push(&mut self, snap: &Snapshot, secret: &[u8]) -> Result<bool, Error> {
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
            store_id: snap.store_id,
            takeover: false,
        };
        match self.send(&push, secret) {
            Ok(_) => {
                self.metrics.incremental_pushes += 1;
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
                    generation: push.generation,
                    version: snap.version,
                    set,
                    revoked,
                });
                Ok(true)
            }
            Err(Error::Refused {
                status: 409, body, ..
            }) => {
                log(&format!(
                    "{}: incremental push refused ({body}); doing a full push",
                    self.addr
                ));
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Brings the endpoint to `snap`. `check` asks Envoy what it holds first.
    pub fn sync(&mut self, snap: &Snapshot, check: bool, secret: &[u8]) -> Result<(), Error> {
        let mut state = None;
        if check || self.held.is_none() {
            let s = self.state()?;
            let matches = self.held.as_ref().is_some_and(|h| {
                s.pending.is_none()
                    && s.generation == h.generation
                    && s.version == h.version
                    && s.store_id == snap.store_id
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_with_or_without_scheme() {
        assert_eq!(
            host_port("http://127.0.0.1:10001/").unwrap(),
            "127.0.0.1:10001"
        );
        assert_eq!(host_port("127.0.0.1:10001").unwrap(), "127.0.0.1:10001");
        assert!(host_port("https://127.0.0.1:10001").is_err());
        assert!(host_port("http://127.0.0.1:10001/path").is_err());
        assert!(host_port("localhost").is_err());
    }

    #[test]
    fn an_unreachable_endpoint_fails_fast_with_a_hint() {
        // A port nobody listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let ep = Endpoint::new(&format!("http://127.0.0.1:{port}"), false).unwrap();
        let started = Instant::now();
        let err = ep.state().unwrap_err();
        assert!(started.elapsed() < TIMEOUT, "{err}");
        assert!(err.to_string().contains("is it running"), "{err}");
    }
}
