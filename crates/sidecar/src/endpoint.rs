//! One Envoy sync endpoint: its HTTP client, what it is known to hold, and
//! the pushes that bring it to a store snapshot. Each endpoint is driven by
//! its own thread (see `daemon`), so a slow or dead Envoy delays only itself.

use keygate_control::store::Snapshot;
use keygate_core::sync::{
    is_foreign, sign, LimitKind, LimitRecord, Mode, Push, RevokedSession, StoreId, SyncState,
    MAX_PUSH_BYTES, MAX_PUSH_ITEMS, PUSH_PATH, SIGNATURE_HEADER, STATE_PATH,
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

impl Error {
    /// Envoy refused the push itself (invalid, too large, wrong secret, a
    /// foreign store): sending it again unchanged would be refused again.
    pub fn is_refusal(&self) -> bool {
        match self {
            Error::Refused { status, .. } => (400..500).contains(status) && *status != 409,
            Error::ForeignStore { .. } => true,
            _ => false,
        }
    }
}

/// What we know an endpoint holds because we pushed it and it said so.
struct Held {
    generation: u64,
    version: u64,
    set: BTreeMap<String, CredentialRecord>,
    revoked: BTreeSet<RevokedSession>,
    /// Plans and tenant limits.
    limits: LimitSet,
}

type LimitSet = BTreeMap<(LimitKind, String), LimitRecord>;

/// Counters of one endpoint, shown in its log lines and status.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Metrics {
    pub full_pushes: u64,
    pub incremental_pushes: u64,
    /// Batches sent, over every push.
    pub batches: u64,
    pub failures: u64,
    /// Pushes Envoy refused as invalid (not a conflict): not retried in a loop.
    pub refused_pushes: u64,
}

/// One push's items, split into batches under the filter's limits.
#[derive(Default)]
struct Batch {
    upserts: Vec<CredentialRecord>,
    deletes: Vec<String>,
    revoked: Vec<RevokedSession>,
    limits: Vec<LimitRecord>,
}

impl Batch {
    fn len(&self) -> usize {
        self.upserts.len() + self.deletes.len() + self.revoked.len() + self.limits.len()
    }
}

/// Plan and tenant limit records go in batches of their own ahead of the
/// others: the filter writes them as their batch arrives, so every plan a
/// pushed key names exists before the push commits.
fn with_limit_records(records: Vec<LimitRecord>, parts: Vec<Batch>) -> Vec<Batch> {
    let mut out: Vec<Batch> = records
        .chunks(BATCH_ITEMS)
        .map(|c| Batch {
            limits: c.to_vec(),
            ..Batch::default()
        })
        .collect();
    out.extend(parts);
    out
}

/// The limit records that turn `held` into `now`: new or changed ones, and
/// an empty one for each that went (the filter keeps no stale limits).
fn limit_changes(held: &LimitSet, now: &LimitSet) -> Vec<LimitRecord> {
    let changed = now
        .iter()
        .filter(|(k, r)| held.get(*k) != Some(r))
        .map(|(_, r)| r.clone());
    let gone = held
        .iter()
        .filter(|(k, _)| !now.contains_key(*k))
        .map(|(_, r)| LimitRecord {
            limits: vec![],
            ..r.clone()
        });
    changed.chain(gone).collect()
}

/// Packs items into batches of at most [`BATCH_ITEMS`] items and about
/// [`BATCH_BYTES`] bytes; always at least one (possibly empty) batch, so
/// any number of items can be pushed.
fn batches(
    upserts: Vec<CredentialRecord>,
    deletes: Vec<String>,
    revoked: Vec<RevokedSession>,
) -> Vec<Batch> {
    let mut out = vec![Batch::default()];
    let mut bytes = 0;
    let mut room = |out: &mut Vec<Batch>, size: usize| {
        let current = out.last().map_or(0, Batch::len);
        if current > 0 && (current >= BATCH_ITEMS || bytes + size > BATCH_BYTES) {
            out.push(Batch::default());
            bytes = 0;
        }
        bytes += size;
    };
    let size = |v: Result<Vec<u8>, serde_json::Error>| v.map_or(0, |v| v.len()) + 1;
    for r in upserts {
        room(&mut out, size(serde_json::to_vec(&r)));
        if let Some(b) = out.last_mut() {
            b.upserts.push(r);
        }
    }
    for d in deletes {
        room(&mut out, d.len() + 3);
        if let Some(b) = out.last_mut() {
            b.deletes.push(d);
        }
    }
    for r in revoked {
        room(&mut out, size(serde_json::to_vec(&r)));
        if let Some(b) = out.last_mut() {
            b.revoked.push(r);
        }
    }
    out
}

pub struct Endpoint {
    pub addr: String,
    url: String,
    agent: ureq::Agent,
    held: Option<Held>,
    pub metrics: Metrics,
    pub takeover: bool,
    /// Revocations older than this cannot match a live token: not pushed.
    pub token_lifetime: Duration,
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
        .map(|k| (k.record.key_hash.clone(), snap.wire_record(k)))
        .collect()
}

/// The revocations that can still refuse a token: one revoked at `t`
/// refuses tokens issued up to `t`, and those have all expired by
/// `t + lifetime`.
fn revocations(snap: &Snapshot, lifetime: Duration) -> BTreeSet<RevokedSession> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let lifetime_ms = u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX);
    snap.revoked_sessions
        .iter()
        .filter(|r| r.revoked_at_ms.saturating_add(lifetime_ms) > now_ms)
        .cloned()
        .collect()
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
            token_lifetime: Duration::from_secs(keygate_core::token::MAX_LIFETIME_SECS),
        })
    }

    /// The version Envoy acknowledged last, if we know it.
    pub fn held_version(&self) -> Option<u64> {
        self.held.as_ref().map(|h| h.version)
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
            limit_records: vec![],
        };
        // Checked here too, so the operator gets the reason without a refused push.
        if !self.takeover && is_foreign(&probe, state) {
            return Err(Error::ForeignStore {
                held: id_str(state.store_id),
                ours: id_str(snap.store_id),
            });
        }
        let set = as_set(snap);
        let revoked = revocations(snap, self.token_lifetime);
        let limits = snap.limit_records();
        // A full set carries the quota usage counted from the request log
        // now: after an Envoy restart, day and month quotas go on from it.
        let usage = snap.quota_usage().unwrap_or_else(|e| {
            log(&format!(
                "{}: no quota usage from the request log ({e}); quotas restart from zero",
                self.addr
            ));
            Default::default()
        });
        let used = |r: &CredentialRecord| CredentialRecord {
            quota_used: usage.keys.get(&r.key_id).cloned().unwrap_or_default(),
            ..r.clone()
        };
        let tenant_used = |r: &LimitRecord| LimitRecord {
            quota_used: match r.kind {
                LimitKind::Tenant => usage.tenants.get(&r.name).cloned().unwrap_or_default(),
                LimitKind::Plan => vec![],
            },
            ..r.clone()
        };
        let parts = with_limit_records(
            limits.values().map(tenant_used).collect(),
            batches(
                set.values().map(used).collect(),
                vec![],
                revoked.iter().cloned().collect(),
            ),
        );
        let n = self.send_batches(&probe, parts, secret)?;
        self.metrics.full_pushes += 1;
        log(&format!(
            "{}: full push of {} credentials and {} session revocations in {n} batches, store {} generation {generation} version {} ({:.1} ms)",
            self.addr,
            set.len(),
            revoked.len(),
            id_str(snap.store_id),
            snap.version,
            started.elapsed().as_secs_f64() * 1e3
        ));
        self.held = Some(Held {
            generation,
            version: snap.version,
            set,
            revoked,
            limits,
        });
        Ok(())
    }

    /// Sends `parts` as the batches of one push described by `base`; the
    /// last commits it. Returns the number of batches.
    fn send_batches(
        &mut self,
        base: &Push,
        parts: Vec<Batch>,
        secret: &[u8],
    ) -> Result<usize, Error> {
        let n = parts.len();
        for (i, part) in parts.into_iter().enumerate() {
            let push = Push {
                batch: u32::try_from(i).unwrap_or(u32::MAX),
                last: i + 1 == n,
                upserts: part.upserts,
                deletes: part.deletes,
                revoked_sessions: part.revoked,
                limit_records: part.limits,
                ..base.clone()
            };
            self.send(&push, secret)?;
            self.metrics.batches += 1;
        }
        Ok(n)
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
        let revoked = revocations(snap, self.token_lifetime);
        let new_revocations: Vec<RevokedSession> =
            revoked.difference(&held.revoked).cloned().collect();
        if snap.version <= held.version {
            return Ok(false);
        }
        let base = Push {
            mode: Mode::Incremental,
            generation: held.generation,
            base_version: held.version,
            version: snap.version,
            batch: 0,
            last: false,
            upserts: vec![],
            deletes: vec![],
            revoked_sessions: vec![],
            store_id: snap.store_id,
            takeover: false,
            limit_records: vec![],
        };
        let counts = (upserts.len(), deletes.len(), new_revocations.len());
        let limits = snap.limit_records();
        let parts = with_limit_records(
            limit_changes(&held.limits, &limits),
            batches(upserts, deletes, new_revocations),
        );
        match self.send_batches(&base, parts, secret) {
            Ok(n) => {
                self.metrics.incremental_pushes += 1;
                log(&format!(
                    "{}: pushed {} upserts, {} deletes, {} session revocations in {n} batches, version {} -> {} ({:.1} ms)",
                    self.addr,
                    counts.0,
                    counts.1,
                    counts.2,
                    base.base_version,
                    base.version,
                    started.elapsed().as_secs_f64() * 1e3
                ));
                self.held = Some(Held {
                    generation: base.generation,
                    version: snap.version,
                    set,
                    revoked,
                    limits,
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
    fn any_number_of_items_is_split_into_batches_the_filter_accepts() {
        let revoked: Vec<RevokedSession> = (0..50_000)
            .map(|i| RevokedSession {
                key_id: format!("key-{}", i % 10),
                session_id: format!("flood-{i:05}"),
                revoked_at_ms: 1,
            })
            .collect();
        let deletes: Vec<String> = (0..1500).map(|i| format!("{i:064x}")).collect();
        let parts = batches(vec![], deletes, revoked);
        assert_eq!(parts.iter().map(Batch::len).sum::<usize>(), 51_500);
        assert!(parts.len() >= 52);
        for p in &parts {
            assert!(p.len() <= BATCH_ITEMS);
            let body = serde_json::to_vec(&Push {
                deletes: p.deletes.clone(),
                revoked_sessions: p.revoked.clone(),
                ..Push::default()
            })
            .unwrap();
            assert!(body.len() <= MAX_PUSH_BYTES);
        }
        // Nothing to push is still one (empty) batch that commits the version.
        assert_eq!(batches(vec![], vec![], vec![]).len(), 1);
    }

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
