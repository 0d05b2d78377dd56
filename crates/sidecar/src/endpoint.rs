//! One Envoy sync endpoint: its HTTP client, what it is known to hold, and
//! the pushes that bring it to a store snapshot. Each endpoint is driven by
//! its own thread (see `daemon`), so a slow or dead Envoy delays only itself.

use keygate_control::service::forwarded_metadata;
use keygate_control::store::{QuotaUsage, Snapshot, StoredKey};
use keygate_core::shared_data::{key_id_bucket, KEY_ID_BUCKETS};
use keygate_core::sync::{
    binary_body, encode_binary_record, is_foreign, sign, LimitKind, LimitRecord, Mode, Push,
    RevokedSession, StoreId, SyncState, BINARY_VERSION_TEXT, FORMAT_HEADER, MAX_PUSH_BYTES,
    MAX_PUSH_ITEMS, PUSH_PATH, SIGNATURE_HEADER, STATE_PATH,
};
use keygate_core::CredentialRecord;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Target size of one batch body; well under the filter's limit.
const BATCH_BYTES: usize = MAX_PUSH_BYTES / 2;
const BATCH_ITEMS: usize = MAX_PUSH_ITEMS / 2;
/// Batch bodies built ahead of the one being sent: building and signing
/// the next batches overlaps Envoy applying this one.
const AHEAD: usize = 2;
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
    /// The snapshot it was brought to (shared with the daemon, not copied).
    snap: Arc<Snapshot>,
    /// When it was pushed (Unix seconds): which roll aliases it still held.
    at: u64,
    revoked: BTreeSet<RevokedSession>,
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

/// One item of a push.
enum Item<'a> {
    Upsert(&'a CredentialRecord),
    /// An upsert already in the binary format (see [`encode_in_entry_order`]).
    Encoded(&'a [u8]),
    Delete(&'a str),
    Revoked(&'a RevokedSession),
    /// A plan's or a tenant's limits.
    Limit(&'a LimitRecord),
}

/// How a push body is written: binary (`keygate_core::sync`'s format, a
/// third of the bytes for Envoy to authenticate and parse) when the filter
/// says it reads it, else JSON (an older filter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum Format {
    #[default]
    Json,
    Binary,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Json => "JSON",
            Format::Binary => "binary",
        }
    }
}

/// One batch: its upserts already serialized (each record once, straight
/// into the body; see [`body`]), its other items as the push carries them.
#[derive(Default)]
struct Batch {
    /// The upserts: JSON objects separated by commas, or binary records.
    upserts: Vec<u8>,
    upsert_count: usize,
    items: usize,
    deletes: Vec<String>,
    revoked: Vec<RevokedSession>,
    limits: Vec<LimitRecord>,
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

/// Takes items into one batch of at most [`BATCH_ITEMS`] items and about
/// [`BATCH_BYTES`] bytes (at least one item, if any is left). Fails only
/// for a record the binary format cannot carry (a digest that is not hex,
/// which a valid store never holds and the filter would refuse anyway).
fn next_batch<'a>(
    items: &mut std::iter::Peekable<impl Iterator<Item = Item<'a>>>,
    format: Format,
) -> Result<Batch, String> {
    let mut b = Batch::default();
    let mut bytes = 0;
    while b.items < BATCH_ITEMS {
        let size = match items.peek() {
            None => break,
            // A record is ~250 bytes; the one that crosses the target still
            // fits under the filter's limit.
            Some(Item::Upsert(_) | Item::Encoded(_)) => 0,
            Some(Item::Delete(d)) => d.len() + 3,
            Some(Item::Revoked(r)) => serde_json::to_vec(r).map_or(0, |v| v.len()) + 1,
            Some(Item::Limit(r)) => serde_json::to_vec(r).map_or(0, |v| v.len()) + 1,
        };
        if b.items > 0 && bytes + size > BATCH_BYTES {
            break;
        }
        match items.next() {
            Some(Item::Upsert(r)) => {
                let before = b.upserts.len();
                match format {
                    Format::Binary => encode_binary_record(&mut b.upserts, r)?,
                    Format::Json => {
                        if !b.upserts.is_empty() {
                            b.upserts.push(b',');
                        }
                        // Serializing a record into a Vec cannot fail (string keys only).
                        if serde_json::to_writer(&mut b.upserts, r).is_err() {
                            b.upserts.truncate(before);
                        }
                    }
                }
                b.upsert_count += 1;
                bytes += b.upserts.len() - before + 1;
            }
            Some(Item::Encoded(record)) => {
                if format != Format::Binary {
                    return Err("a binary record in a JSON push".into());
                }
                b.upserts.extend_from_slice(record);
                b.upsert_count += 1;
                bytes += record.len() + 1;
            }
            Some(Item::Delete(d)) => {
                b.deletes.push(d.to_owned());
                bytes += size;
            }
            Some(Item::Revoked(r)) => {
                b.revoked.push(r.clone());
                bytes += size;
            }
            Some(Item::Limit(r)) => {
                b.limits.push(r.clone());
                bytes += size;
            }
            None => break,
        }
        b.items += 1;
    }
    Ok(b)
}

/// The body of `push` with the batch's upserts (`push` itself carries none).
fn body(push: &Push, count: usize, upserts: &[u8], format: Format) -> Result<Vec<u8>, String> {
    match format {
        Format::Binary => binary_body(push, count, upserts),
        Format::Json => json_body(push, upserts).map_err(|e| e.to_string()),
    }
}

/// The push's JSON with `upserts` (records already serialized, comma
/// separated) as its upserts: `push` itself carries none, so its
/// `"upserts":[]` is the one place they go. A key can never contain that
/// text unescaped inside a JSON string, so this finds the field itself.
fn json_body(push: &Push, upserts: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    const EMPTY: &[u8] = b"\"upserts\":[]";
    let mut out = Vec::with_capacity(upserts.len() + 512);
    serde_json::to_writer(&mut out, push)?;
    if upserts.is_empty() {
        return Ok(out);
    }
    let Some(at) = out.windows(EMPTY.len()).position(|w| w == EMPTY) else {
        return Err(serde::ser::Error::custom("a push without an upserts field"));
    };
    let insert_at = at + EMPTY.len() - 1;
    out.splice(insert_at..insert_at, upserts.iter().copied());
    Ok(out)
}

pub struct Endpoint {
    pub addr: String,
    url: String,
    agent: ureq::Agent,
    held: Option<Held>,
    /// How pushes are written, from the filter's last state reply.
    format: Format,
    pub metrics: Metrics,
    pub takeover: bool,
    /// Revocations older than this cannot match a live token: not pushed.
    pub token_lifetime: Duration,
    /// Metadata fields pushed with each key (the gates' `headers.metadata`
    /// names); no other metadata reaches Envoy.
    pub forward_metadata: Vec<String>,
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

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The record Envoy should hold for a key: with the forwarded metadata
/// fields only, and without a rolled-away value whose grace has ended at
/// `now`, so the next push deletes its alias entry. (Not a push of its own:
/// the gate already refuses the old value by the deadline the credential
/// carries, and at a million keys a full push to drop 50 bytes would cost
/// far more than it saves.) Borrowed, not copied, when nothing changes: the
/// common case, and what keeps a million-key push cheap.
fn pushed<'a>(
    snap: &Snapshot,
    k: &'a StoredKey,
    forward: &[String],
    now: u64,
) -> Cow<'a, CredentialRecord> {
    let metadata = forwarded_metadata(k.metadata.as_ref(), forward);
    let alias_ended = k.record.previous_key_expires_at.is_some_and(|t| t <= now);
    let (plan, tenant_limits) = snap.wire_limits(&k.record);
    if metadata == k.record.metadata
        && !alias_ended
        && plan == k.record.plan.as_ref()
        && tenant_limits == k.record.tenant_limits
    {
        return Cow::Borrowed(&k.record);
    }
    let mut r = k.record.clone();
    r.metadata = metadata;
    r.plan = plan.cloned();
    r.tenant_limits = tenant_limits;
    if alias_ended {
        r.previous_key_hash = None;
        r.previous_key_expires_at = None;
    }
    Cow::Owned(r)
}

/// A full set carries the quota usage counted from the request log (see
/// `full_push`): the record with its key's, if any.
fn with_usage<'a>(r: Cow<'a, CredentialRecord>, usage: &QuotaUsage) -> Cow<'a, CredentialRecord> {
    match usage.keys.get(&r.key_id) {
        Some(used) => Cow::Owned(CredentialRecord {
            quota_used: used.clone(),
            ..r.into_owned()
        }),
        None => r,
    }
}

/// The records a snapshot pushes (see [`pushed`]), in store order.
fn pushed_set<'a>(
    snap: &'a Snapshot,
    forward: &[String],
    now: u64,
) -> Vec<Cow<'a, CredentialRecord>> {
    snap.keys
        .iter()
        .map(|k| pushed(snap, k, forward, now))
        .collect()
}

/// The pushed records by key hash.
fn by_hash<'a>(set: &'a [Cow<'a, CredentialRecord>]) -> HashMap<&'a str, &'a CredentialRecord> {
    set.iter()
        .map(|r| (r.key_hash.as_str(), r.as_ref()))
        .collect()
}

/// Every entry a set occupies in Envoy: each key's hash and, during a
/// roll's grace, the alias under its old value's hash.
fn occupied<'a>(set: &'a [Cow<'a, CredentialRecord>]) -> BTreeSet<&'a str> {
    set.iter()
        .flat_map(|r| std::iter::once(r.key_hash.as_str()).chain(r.previous_key_hash.as_deref()))
        .collect()
}

/// Records in the order of their key ids' buckets in the wasm build's
/// key-id index (`shared_data::key_id_slot`): a batch then rewrites ~65
/// buckets of ~15 ids each instead of one bucket per key. Order does not
/// matter to correctness: a push applies as a whole.
fn in_entry_order<'a>(
    records: impl Iterator<Item = &'a CredentialRecord>,
) -> Vec<&'a CredentialRecord> {
    by_bucket(records.map(|r| (key_id_bucket(&r.key_id), r)).collect())
}

/// Each record encoded once, in store order, into one buffer, and the
/// records' places in it in [`in_entry_order`]'s order. Encoding in bucket
/// order instead touched each record's strings at a random place in a
/// gigabyte of them: at a million keys ~1.5 s of cache misses, where one
/// pass in the order they sit in memory costs a fraction of that and the
/// batches then copy ~95 contiguous bytes per key.
///
/// A large set is encoded in two halves on two threads (the pass is serial
/// work before the first batch can go); the result is the same. `prepare`
/// makes each item's pushed record in the same pass (at a million keys a
/// separate walk over the store's records first cost ~0.2 s of misses).
fn encode_in_entry_order<'a, T: Sync>(
    records: &'a [T],
    prepare: impl Fn(&'a T) -> Cow<'a, CredentialRecord> + Sync,
) -> Result<(Vec<u8>, Vec<std::ops::Range<usize>>), String> {
    type Part = Result<(Vec<u8>, Vec<(u32, std::ops::Range<usize>)>), String>;
    let encode = |records: &'a [T]| -> Part {
        let mut bytes = Vec::with_capacity(records.len() * 100);
        let mut keyed = Vec::with_capacity(records.len());
        for item in records {
            let r = prepare(item);
            let start = bytes.len();
            encode_binary_record(&mut bytes, &r)?;
            keyed.push((key_id_bucket(&r.key_id), start..bytes.len()));
        }
        Ok((bytes, keyed))
    };
    let (first, second) = records.split_at(if records.len() >= PARALLEL_ENCODE_FROM {
        records.len() / 2
    } else {
        records.len()
    });
    // No second thread for a small set, nor when the OS refuses one.
    let (first, second) = std::thread::scope(|s| {
        let later = match second {
            [] => None,
            _ => std::thread::Builder::new()
                .spawn_scoped(s, || encode(second))
                .ok(),
        };
        let first_part = encode(first);
        let second_part = match later {
            Some(later) => later
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e)),
            None => encode(second),
        };
        (first_part, second_part)
    });
    // In store order: the first half's error, if any, is the first one.
    let (mut bytes, mut keyed) = first?;
    let (more, more_keyed) = second?;
    let offset = bytes.len();
    bytes.extend_from_slice(&more);
    keyed.extend(
        more_keyed
            .into_iter()
            .map(|(b, r)| (b, r.start + offset..r.end + offset)),
    );
    Ok((bytes, by_bucket(keyed)))
}

/// From this many records [`encode_in_entry_order`] uses a second thread.
const PARALLEL_ENCODE_FROM: usize = 20_000;

/// Items ordered by bucket number, keeping their order within a bucket: a
/// counting sort. At a million keys, sorting by the buckets' names (a
/// string built per key, compared O(n log n) times) was ~0.3 s of the
/// push's start, before the first batch could go.
fn by_bucket<T>(keyed: Vec<(u32, T)>) -> Vec<T> {
    // Counted per bucket, then turned into where each bucket's items
    // begin in the output.
    let mut starts = vec![0usize; KEY_ID_BUCKETS as usize];
    for (b, _) in &keyed {
        if let Some(n) = starts.get_mut(*b as usize) {
            *n += 1;
        }
    }
    let mut sum = 0;
    for n in starts.iter_mut() {
        let count = *n;
        *n = sum;
        sum += count;
    }
    let mut out: Vec<Option<T>> = std::iter::repeat_with(|| None).take(keyed.len()).collect();
    for (b, item) in keyed {
        if let Some(at) = starts.get_mut(b as usize) {
            if let Some(slot) = out.get_mut(*at) {
                *slot = Some(item);
            }
            *at += 1;
        }
    }
    out.into_iter().flatten().collect()
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
            format: Format::Json,
            metrics: Metrics::default(),
            takeover,
            token_lifetime: Duration::from_secs(keygate_core::token::MAX_LIFETIME_SECS),
            forward_metadata: Vec::new(),
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
                body: refusal_text(&body),
            });
        }
        serde_json::from_slice(&body).map_err(|e| Error::BadReply {
            what,
            detail: e.to_string(),
        })
    }

    /// What Envoy holds; also learns which push format its filter reads.
    pub fn state(&mut self) -> Result<SyncState, Error> {
        let url = format!("{}{STATE_PATH}", self.url);
        let r = self.agent.get(&url).call();
        let binary = r.as_ref().ok().is_some_and(|r| {
            r.headers()
                .get(FORMAT_HEADER)
                .is_some_and(|v| v.as_bytes() == BINARY_VERSION_TEXT.as_bytes())
        });
        let state = self.reply("state request", r)?;
        let format = if binary { Format::Binary } else { Format::Json };
        if format != self.format && format == Format::Json {
            log(&format!(
                "{}: Envoy's keygate filter does not read binary pushes (format {BINARY_VERSION_TEXT}; \
                 an older or newer release than this sidecar): pushing JSON, which Envoy applies more slowly",
                self.addr
            ));
        }
        self.format = format;
        Ok(state)
    }

    /// The whole set under a generation newer than anything the endpoint has seen.
    fn full_push(
        &mut self,
        snap: &Arc<Snapshot>,
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
        let at = now_secs();
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
        let forward = &self.forward_metadata;
        // The JSON format's records, which its batches borrow.
        let set: Vec<Cow<CredentialRecord>>;
        let limit_items: Vec<LimitRecord> = limits
            .values()
            .map(|r| LimitRecord {
                quota_used: match r.kind {
                    LimitKind::Tenant => usage.tenants.get(&r.name).cloned().unwrap_or_default(),
                    LimitKind::Plan => vec![],
                },
                ..r.clone()
            })
            .collect();
        // Plan and tenant limit records first (the filter stages them like
        // the keys and serves both from the commit, so the order is not
        // needed for that any more; it keeps them in the first batch). Key
        // hashes are unique in a valid store: each key is one upsert.
        let (encoded, spans, in_order) = match self.format {
            Format::Binary => {
                let (bytes, spans) = encode_in_entry_order(&snap.keys, |k| {
                    with_usage(pushed(snap, k, forward, at), &usage)
                })
                .map_err(|detail| Error::BadReply {
                    what: "push",
                    detail,
                })?;
                (bytes, spans, vec![])
            }
            Format::Json => {
                set = pushed_set(snap, forward, at)
                    .into_iter()
                    .map(|r| with_usage(r, &usage))
                    .collect();
                (
                    vec![],
                    vec![],
                    in_entry_order(set.iter().map(|r| r.as_ref())),
                )
            }
        };
        let upserts = spans
            .iter()
            .filter_map(|span| encoded.get(span.clone()))
            .map(Item::Encoded)
            .chain(in_order.into_iter().map(Item::Upsert));
        let items = limit_items
            .iter()
            .map(Item::Limit)
            .chain(upserts)
            .chain(revoked.iter().map(Item::Revoked));
        let n = self.send_batches(&probe, items, secret)?;
        self.metrics.full_pushes += 1;
        log(&format!(
            "{}: full push of {} credentials and {} session revocations in {n} batches ({}), store {} generation {generation} version {} ({:.1} ms)",
            self.addr,
            snap.keys.len(),
            revoked.len(),
            self.format.name(),
            id_str(snap.store_id),
            snap.version,
            started.elapsed().as_secs_f64() * 1e3
        ));
        self.held = Some(Held {
            generation,
            version: snap.version,
            snap: Arc::clone(snap),
            at,
            revoked,
        });
        Ok(())
    }

    /// Sends `items` as the batches of one push described by `base`, in
    /// order; the last commits it. Returns the number of batches.
    ///
    /// Batches must arrive one after the other (each claims the push's next
    /// batch number, and the last commits), so one connection sends them in
    /// order and waits for each answer; a second thread builds and signs the
    /// next [`AHEAD`] bodies meanwhile, so the sidecar's work overlaps
    /// Envoy's instead of adding to it.
    fn send_batches<'a>(
        &mut self,
        base: &Push,
        items: impl Iterator<Item = Item<'a>> + Send,
        secret: &[u8],
    ) -> Result<usize, Error> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(Vec<u8>, String), Error>>(AHEAD);
        let format = self.format;
        let failed = |detail: String| Error::BadReply {
            what: "push",
            detail,
        };
        std::thread::scope(|s| {
            s.spawn(move || {
                let mut items = items.peekable();
                for i in 0u32.. {
                    let part = match next_batch(&mut items, format) {
                        Ok(part) => part,
                        Err(e) => {
                            let _ = tx.send(Err(failed(e)));
                            return;
                        }
                    };
                    let push = Push {
                        batch: i,
                        last: items.peek().is_none(),
                        deletes: part.deletes,
                        revoked_sessions: part.revoked,
                        limit_records: part.limits,
                        ..base.clone()
                    };
                    let built = body(&push, part.upsert_count, &part.upserts, format)
                        .map(|b| {
                            let sig = sign(secret, &b);
                            (b, sig)
                        })
                        .map_err(failed);
                    // The sender stopped (a batch failed): nothing more to build.
                    if tx.send(built).is_err() || push.last {
                        return;
                    }
                }
            });
            let mut n = 0;
            // Ends when the builder has sent the last batch; an error drops
            // `rx`, which stops the builder.
            for built in rx {
                let (body, sig) = built?;
                self.post(&body, &sig)?;
                self.metrics.batches += 1;
                n += 1;
            }
            Ok(n)
        })
    }

    fn post(&self, body: &[u8], sig: &str) -> Result<SyncState, Error> {
        let url = format!("{}{PUSH_PATH}", self.url);
        let content_type = match self.format {
            Format::Binary => "application/octet-stream",
            Format::Json => "application/json",
        };
        let r = self
            .agent
            .post(&url)
            .header("content-type", content_type)
            .header(SIGNATURE_HEADER, sig)
            .send(body);
        self.reply("push", r)
    }

    /// Only what changed since what the endpoint holds. Returns false when it
    /// cannot apply (too large, or the endpoint moved): the caller goes full.
    fn incremental_push(&mut self, snap: &Arc<Snapshot>, secret: &[u8]) -> Result<bool, Error> {
        let Some(held) = &self.held else {
            return Ok(false);
        };
        if snap.version <= held.version {
            return Ok(false);
        }
        let started = Instant::now();
        let (generation, version) = (held.generation, held.version);
        let held_snap = Arc::clone(&held.snap);
        let held_limits = held_snap.limit_records();
        let revoked = revocations(snap, self.token_lifetime);
        let new_revocations: Vec<&RevokedSession> = revoked
            .iter()
            .filter(|r| !held.revoked.contains(r))
            .collect();
        let at = now_secs();
        let held_set = pushed_set(&held_snap, &self.forward_metadata, held.at);
        let set = pushed_set(snap, &self.forward_metadata, at);
        let before = by_hash(&held_set);
        let upserts: Vec<&CredentialRecord> = set
            .iter()
            .map(|r| r.as_ref())
            .filter(|r| before.get(r.key_hash.as_str()) != Some(r))
            .collect();
        let occupied_now = occupied(&set);
        let deletes: Vec<&str> = occupied(&held_set)
            .into_iter()
            .filter(|h| !occupied_now.contains(h))
            .collect();
        let base = Push {
            mode: Mode::Incremental,
            generation,
            base_version: version,
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
        let limit_items = limit_changes(&held_limits, &limits);
        let items = limit_items
            .iter()
            .map(Item::Limit)
            .chain(upserts.into_iter().map(Item::Upsert))
            .chain(deletes.into_iter().map(Item::Delete))
            .chain(new_revocations.into_iter().map(Item::Revoked));
        let sent = self.send_batches(&base, items, secret);
        match sent {
            Ok(n) => {
                self.metrics.incremental_pushes += 1;
                log(&format!(
                    "{}: pushed {} upserts, {} deletes, {} session revocations in {n} batches ({}), version {} -> {} ({:.1} ms)",
                    self.addr,
                    counts.0,
                    counts.1,
                    counts.2,
                    self.format.name(),
                    base.base_version,
                    base.version,
                    started.elapsed().as_secs_f64() * 1e3
                ));
                self.held = Some(Held {
                    generation: base.generation,
                    version: snap.version,
                    snap: Arc::clone(snap),
                    at,
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
    pub fn sync(&mut self, snap: &Arc<Snapshot>, check: bool, secret: &[u8]) -> Result<(), Error> {
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

/// What a refusal says: the `message` of the filter's error body
/// (`{"error": <code>, "message": <text>}`), or, from an older filter,
/// its `error` text; anything else as it came.
fn refusal_text(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Refusal {
        error: Option<String>,
        message: Option<String>,
    }
    match serde_json::from_slice::<Refusal>(body) {
        Ok(Refusal {
            message: Some(m), ..
        }) => m,
        Ok(Refusal { error: Some(e), .. }) => e,
        _ => String::from_utf8_lossy(body).trim().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_reported_by_its_message_from_any_filter_release() {
        use keygate_core::sync::{ListenerError, SyncError};
        let now = ListenerError::Push(SyncError::Invalid("upserts[1].tenant: bad".into())).body();
        assert_eq!(refusal_text(&now), "invalid push: upserts[1].tenant: bad");
        // Before the error bodies had a code, `error` held the text.
        assert_eq!(
            refusal_text(br#"{"error":"bad or missing signature"}"#),
            "bad or missing signature"
        );
        assert_eq!(refusal_text(b" no json\n"), "no json");
    }

    fn all_batches<'a>(items: impl Iterator<Item = Item<'a>>, format: Format) -> Vec<Push> {
        let mut items = items.peekable();
        let mut out = vec![];
        loop {
            let part = next_batch(&mut items, format).unwrap();
            let push = Push {
                batch: out.len() as u32,
                last: items.peek().is_none(),
                deletes: part.deletes,
                revoked_sessions: part.revoked,
                ..Push::default()
            };
            let bytes = body(&push, part.upsert_count, &part.upserts, format).unwrap();
            assert!(bytes.len() <= MAX_PUSH_BYTES, "{} bytes", bytes.len());
            assert_eq!(bytes.starts_with(b"KGP"), format == Format::Binary);
            let back = keygate_core::sync::decode_push(&bytes).unwrap();
            assert!(
                back.upserts.len() + back.deletes.len() + back.revoked_sessions.len()
                    <= BATCH_ITEMS
            );
            out.push(back);
            if push.last {
                return out;
            }
        }
    }

    fn record(i: usize) -> CredentialRecord {
        serde_json::from_value(serde_json::json!({
            "key_id": format!("key-{i}"),
            "key_hash": format!("{i:064x}"),
            "tenant": format!("tenant-{}", i / 5),
            "scopes": ["read", "write"],
            "allowed_ips": ["10.0.0.0/8", "192.0.2.7"],
        }))
        .unwrap()
    }

    #[test]
    fn a_full_push_orders_records_by_index_bucket_name_keeping_store_order_within_one() {
        // 200,000 ids fill 65,536 buckets ~3 deep: ties are common.
        let records: Vec<CredentialRecord> = (0..200_000).map(record).collect();
        let mut expected: Vec<(String, usize)> = records
            .iter()
            .enumerate()
            .map(|(i, r)| (keygate_core::shared_data::key_id_slot(&r.key_id).0, i))
            .collect();
        expected.sort();
        let got: Vec<usize> = in_entry_order(records.iter())
            .into_iter()
            .map(|r| r.key_id["key-".len()..].parse().unwrap())
            .collect();
        assert_eq!(
            got,
            expected.into_iter().map(|(_, i)| i).collect::<Vec<_>>()
        );
    }

    #[test]
    fn records_encoded_ahead_in_store_order_make_the_same_batches_as_encoded_one_by_one() {
        // Above PARALLEL_ENCODE_FROM: encoded in two halves.
        let records: Vec<CredentialRecord> = (0..25_000).map(record).collect();
        let refs: Vec<&CredentialRecord> = records.iter().collect();
        let one_by_one = all_batches(
            in_entry_order(records.iter()).into_iter().map(Item::Upsert),
            Format::Binary,
        );
        let (bytes, spans) = encode_in_entry_order(&refs, |r| Cow::Borrowed(*r)).unwrap();
        let ahead = all_batches(
            spans.iter().map(|s| Item::Encoded(&bytes[s.clone()])),
            Format::Binary,
        );
        assert_eq!(one_by_one.len(), ahead.len());
        assert!(one_by_one.len() > 1);
        assert_eq!(one_by_one, ahead);
        // A record the binary format cannot carry fails before any batch, in
        // either half; with one in each, the first in store order is named.
        let mut bad = records.clone();
        bad[20_000].key_hash = "not hex".into();
        let err = encode_in_entry_order(&bad, Cow::Borrowed).unwrap_err();
        assert!(err.starts_with("key_hash: "), "{err}");
        bad[4000].secret_hash = Some("not hex either".into());
        let err = encode_in_entry_order(&bad, Cow::Borrowed).unwrap_err();
        assert!(err.starts_with("secret_hash: "), "{err}");
        // And such a record never goes into a JSON push.
        let mut items = std::iter::once(Item::Encoded(&bytes[spans[0].clone()])).peekable();
        assert!(next_batch(&mut items, Format::Json).is_err());
    }

    #[test]
    fn any_number_of_items_is_split_into_batches_the_filter_accepts() {
        for format in [Format::Json, Format::Binary] {
            split_into_accepted_batches(format);
        }
    }

    fn split_into_accepted_batches(format: Format) {
        let revoked: Vec<RevokedSession> = (0..50_000)
            .map(|i| RevokedSession {
                key_id: format!("key-{}", i % 10),
                session_id: format!("flood-{i:05}"),
                revoked_at_ms: 1,
            })
            .collect();
        let deletes: Vec<String> = (0..1500).map(|i| format!("{i:064x}")).collect();
        let records: Vec<CredentialRecord> = (0..5000).map(record).collect();
        let items = records
            .iter()
            .map(Item::Upsert)
            .chain(deletes.iter().map(|d| Item::Delete(d)))
            .chain(revoked.iter().map(Item::Revoked));
        let parts = all_batches(items, format);
        assert!(parts.len() >= 26, "{}", parts.len());
        assert_eq!(parts.iter().filter(|p| p.last).count(), 1);
        assert!(parts.last().unwrap().last);
        // Every item arrives once, in order, as it was.
        let upserts: Vec<CredentialRecord> = parts.iter().flat_map(|p| p.upserts.clone()).collect();
        assert_eq!(upserts, records);
        let sent_deletes: Vec<String> = parts.iter().flat_map(|p| p.deletes.clone()).collect();
        assert_eq!(sent_deletes, deletes);
        let sent_revoked: Vec<RevokedSession> = parts
            .iter()
            .flat_map(|p| p.revoked_sessions.clone())
            .collect();
        assert_eq!(sent_revoked, revoked);
        // Nothing to push is still one (empty) batch that commits the version.
        let empty = all_batches(std::iter::empty(), format);
        assert_eq!(empty.len(), 1);
        assert!(empty[0].last && empty[0].upserts.is_empty());
    }

    #[test]
    fn a_batch_body_is_the_push_with_its_records() {
        let records: Vec<CredentialRecord> = (0..3).map(record).collect();
        let mut joined = vec![];
        for (i, r) in records.iter().enumerate() {
            if i > 0 {
                joined.push(b',');
            }
            serde_json::to_writer(&mut joined, r).unwrap();
        }
        let push = Push {
            mode: Mode::Full,
            generation: 3,
            version: 9,
            batch: 2,
            last: true,
            revoked_sessions: vec![RevokedSession {
                key_id: "k".into(),
                session_id: "s".into(),
                revoked_at_ms: 5,
            }],
            store_id: Some(StoreId(7)),
            ..Push::default()
        };
        let back: Push = serde_json::from_slice(&json_body(&push, &joined).unwrap()).unwrap();
        assert_eq!(
            back,
            Push {
                upserts: records.clone(),
                ..push.clone()
            }
        );
        // No records: the push as it is.
        assert_eq!(
            json_body(&push, b"").unwrap(),
            serde_json::to_vec(&push).unwrap()
        );
        // The binary body decodes to the same push.
        let mut records_bin = vec![];
        for r in &records {
            encode_binary_record(&mut records_bin, r).unwrap();
        }
        let bin = body(&push, records.len(), &records_bin, Format::Binary).unwrap();
        assert_eq!(
            keygate_core::sync::decode_push(&bin).unwrap(),
            Push {
                upserts: records,
                ..push.clone()
            }
        );
        assert!(bin.len() * 2 < json_body(&push, &joined).unwrap().len());
    }

    #[test]
    fn the_pushed_set_forwards_only_named_metadata_and_drops_ended_aliases() {
        let record: CredentialRecord = serde_json::from_value(serde_json::json!({
            "key_id": "k", "key_hash": "a".repeat(64), "tenant": "t",
            "previous_key_hash": "b".repeat(64), "previous_key_expires_at": 100
        }))
        .unwrap();
        let meta = serde_json::json!({"tier": "gold", "secret_note": "x"});
        let snap = Snapshot {
            keys: vec![StoredKey {
                name: String::new(),
                created_at: 1,
                updated_at: 1,
                record,
                metadata: meta.as_object().cloned(),
            }],
            ..Snapshot::default()
        };
        let during = pushed_set(&snap, &["tier".to_string()], 99);
        let r = &during[0];
        assert_eq!(r.metadata.len(), 1);
        assert_eq!(r.metadata["tier"], "gold");
        assert_eq!(occupied(&during).len(), 2, "the key and its alias");
        let after = pushed_set(&snap, &[], 100);
        assert_eq!(occupied(&after).len(), 1);
        assert!(after.iter().all(|r| r.metadata.is_empty()));
        // Nothing to strip: the store's record itself, not a copy.
        let plain = Snapshot {
            keys: vec![StoredKey {
                metadata: None,
                ..snap.keys[0].clone()
            }],
            ..Snapshot::default()
        };
        assert!(matches!(
            pushed(&plain, &plain.keys[0], &[], 99),
            Cow::Borrowed(_)
        ));
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

    /// A one-request HTTP server answering the state request with `extra`
    /// headers; returns its address.
    fn state_server(extra: &'static str) -> String {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let body = r#"{"generation":1,"version":2,"stamp":1}"#;
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            conn.write_all(reply.as_bytes()).unwrap();
        });
        addr
    }

    #[test]
    fn binary_pushes_are_sent_only_to_a_filter_that_names_the_format() {
        for (extra, expected) in [
            ("x-keygate-push-format: 1\r\n", Format::Binary),
            // An older filter names none; a newer one may name another format.
            ("", Format::Json),
            ("x-keygate-push-format: 2\r\n", Format::Json),
        ] {
            let mut ep = Endpoint::new(&state_server(extra), false).unwrap();
            let state = ep.state().unwrap();
            assert_eq!((state.generation, state.version), (1, 2));
            assert_eq!(ep.format, expected, "{extra:?}");
        }
    }

    #[test]
    fn an_unreachable_endpoint_fails_fast_with_a_hint() {
        // A port nobody listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut ep = Endpoint::new(&format!("http://127.0.0.1:{port}"), false).unwrap();
        let started = Instant::now();
        let err = ep.state().unwrap_err();
        assert!(started.elapsed() < TIMEOUT, "{err}");
        assert!(err.to_string().contains("is it running"), "{err}");
    }
}
