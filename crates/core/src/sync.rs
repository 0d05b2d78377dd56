//! The sync protocol between the sidecar and Envoy: wire format, signature,
//! and the pure planning step that validates a push against the state Envoy
//! holds before anything is written.
//!
//! Envoy holds, in shared data:
//! - `sync:state`: the [`SyncState`] (generation, version, committed stamp,
//!   pending push);
//! - `c:<key hash prefix>`: one entry per credential: up to two [`Slot`]s,
//!   the committed value and one staged by the push in progress, each its
//!   stamp and generation around a binary record that holds the key's
//!   rate-limit state ([`crate::entry`], [`encode_slots`]);
//! - `pl:<plan>`, `tl:<tenant>`: a plan's limits, a tenant's limits and
//!   counters, in slots the same way ([`stage_limit`], [`LimitCell`]).
//!
//! Every push, incremental or full, may span any number of batches and
//! becomes visible all at once: its batches stage their writes under a new
//! stamp (a slot beside the committed one), and its last batch commits by
//! writing the state with that stamp; one shared-data write switches every
//! entry. Readers take, per entry, the newest slot whose stamp is committed.
//! A push left half-delivered never commits, so nothing it staged is served.
//!
//! An incremental push applies on top of exactly the version Envoy holds
//! (`base_version`), so a stale or replayed push is refused. A full push
//! (after an Envoy restart, or whenever the sidecar cannot prove what Envoy
//! holds) writes the whole set under a new, higher generation; once it
//! commits, an entry whose slot carries an older generation was left out of
//! the set and is gone. A deleted entry's slot carries no record.
//!
//! Plan and tenant limit records are staged the same way: a push that
//! changes a plan and its keys switches both at its commit, and a push
//! that never commits changes no limit. Session revocations are the one
//! exception to staging: they apply as soon as their batch arrives,
//! because they only ever refuse more and the store already holds them.
//!
//! A push travels as JSON or, what the sidecar sends to a filter that says
//! it reads it ([`FORMAT_HEADER`]), in the binary form described at
//! [`BINARY_MAGIC`]; both decode into the same [`Push`] ([`decode_push`]).

use crate::credential::{Credential, CredentialRecord, RecordHashes};
use crate::entry;
use crate::error::ConfigError;
use crate::hash::{parse_hex_digest, Digest};
use crate::names::check_name;
use crate::shared_data::STATE_KEY;
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::borrow::Cow;

pub const STATE_PATH: &str = "/keygate/sync/v1/state";
pub const PUSH_PATH: &str = "/keygate/sync/v1/push";
pub const SIGNATURE_HEADER: &str = "x-keygate-signature";
/// Largest push body Envoy accepts; below Envoy's default 1 MiB buffer limit.
pub const MAX_PUSH_BYTES: usize = 768 * 1024;
/// Most records (upserts + deletes) in one push.
pub const MAX_PUSH_ITEMS: usize = 2_000;
pub const MIN_SECRET_LEN: usize = 32;

/// A push whose batches are arriving: what the next batch must continue.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    pub mode: Mode,
    pub generation: u64,
    pub next_batch: u32,
    /// The stamp its writes are staged under.
    pub stamp: u64,
    /// Incremental: the version it builds on.
    #[serde(default)]
    pub base_version: u64,
    /// The version it commits.
    pub version: u64,
}

/// Which store a set of credentials came from: random, made when the store
/// is created, written as 16 hex digits. Envoy keeps the id of the store its
/// committed set came from, so a sidecar pointed at another store cannot
/// silently replace it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StoreId(pub u64);

impl core::fmt::Display for StoreId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl core::str::FromStr for StoreId {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<StoreId, Self::Err> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("a store id is 16 hex digits");
        }
        u64::from_str_radix(s, 16)
            .map(StoreId)
            .map_err(|_| "a store id is 16 hex digits")
    }
}

impl Serialize for StoreId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StoreId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<StoreId, D::Error> {
        let s = <&str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What Envoy holds. All zero: nothing pushed since Envoy started.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct SyncState {
    pub generation: u64,
    pub version: u64,
    /// The stamp of the last committed push: staged slots above it are not served.
    #[serde(default)]
    pub stamp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
    /// The store the committed set came from (none: nothing pushed, or an
    /// anonymous push).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_id: Option<StoreId>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Incremental,
    Full,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Push {
    pub mode: Mode,
    pub generation: u64,
    /// Incremental: the version Envoy must hold. Full: ignored (0).
    #[serde(default)]
    pub base_version: u64,
    /// The store version Envoy holds once this push (or, full, its last batch) applies.
    pub version: u64,
    /// 0-based batch index.
    #[serde(default)]
    pub batch: u32,
    /// This batch commits the push.
    #[serde(default)]
    pub last: bool,
    #[serde(default)]
    pub upserts: Vec<CredentialRecord>,
    /// Key hashes (hex) to remove.
    #[serde(default)]
    pub deletes: Vec<String>,
    /// Sessions whose tokens issued up to `revoked_at_ms` are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_sessions: Vec<RevokedSession>,
    /// The store this push comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_id: Option<StoreId>,
    /// Full: replace a set that came from another store.
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub takeover: bool,
    /// Plans and tenant limits to write, staged like credentials
    /// ([`stage_limit`]): served from the push's commit, with its keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limit_records: Vec<LimitRecord>,
}

/// What a [`LimitRecord`] names.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum LimitKind {
    /// A plan (`pl:<name>`): limits of every key that refers to it.
    Plan,
    /// A tenant (`tl:<name>`): limits shared by all of its keys.
    Tenant,
}

/// A plan's or a tenant's limits as a push carries them; no limits removes
/// them (the entry stays, empty, so a key still naming it reads "none").
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitRecord {
    pub kind: LimitKind,
    pub name: String,
    #[serde(default)]
    pub limits: Vec<crate::limits::Limit>,
    /// A tenant's quota usage from the request log (full pushes): the
    /// entry starts from it when Envoy holds none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quota_used: Vec<crate::limits::QuotaUsed>,
}

impl LimitRecord {
    /// The shared-data key of its entry.
    pub fn key(&self) -> String {
        match self.kind {
            LimitKind::Plan => crate::limits::plan_key(&self.name),
            LimitKind::Tenant => crate::limits::tenant_key(&self.name),
        }
    }

    /// Its value in a slot of its entry ([`stage_limit`]), given the value
    /// served (a tenant's counters go on).
    pub fn entry(&self, current: Option<&[u8]>) -> Vec<u8> {
        match self.kind {
            LimitKind::Plan => crate::limits::encode_plan(&self.limits),
            LimitKind::Tenant => crate::limits::retarget_tenant_seeded(
                current,
                &self.limits,
                &crate::limits::seed_counters(&self.quota_used, true),
            ),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(deny_unknown_fields)]
pub struct RevokedSession {
    pub key_id: String,
    pub session_id: String,
    pub revoked_at_ms: u64,
}

/// Why a push was refused. Nothing was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncError {
    /// Missing or wrong signature: 401.
    BadSignature,
    /// Unparseable or invalid content: 400, with the field at fault.
    Invalid(String),
    /// Does not apply on top of what Envoy holds (stale, replayed, out of order): 409.
    Conflict(String),
    /// Over [`MAX_PUSH_BYTES`] or [`MAX_PUSH_ITEMS`]: 413.
    TooLarge,
    /// The host failed a write before the push committed: 500. The state
    /// was not advanced, so the sidecar's next full push repairs it.
    Host(String),
}

impl SyncError {
    pub fn status(&self) -> u16 {
        match self {
            SyncError::BadSignature => 401,
            SyncError::Invalid(_) => 400,
            SyncError::Conflict(_) => 409,
            SyncError::TooLarge => 413,
            SyncError::Host(_) => 500,
        }
    }

    pub fn message(&self) -> String {
        match self {
            SyncError::BadSignature => "bad or missing signature".into(),
            SyncError::Invalid(m) => format!("invalid push: {m}"),
            SyncError::Conflict(m) => format!("conflict: {m}"),
            SyncError::TooLarge => {
                format!("push too large (max {MAX_PUSH_BYTES} bytes, {MAX_PUSH_ITEMS} items)")
            }
            SyncError::Host(m) => format!("internal error: {m}"),
        }
    }
}

impl SyncError {
    /// The `error` code of its reply body.
    pub fn code(&self) -> &'static str {
        match self {
            SyncError::BadSignature => "invalid_signature",
            SyncError::Invalid(_) => "invalid_request",
            SyncError::Conflict(_) => "conflict",
            SyncError::TooLarge => "payload_too_large",
            SyncError::Host(_) => "internal_error",
        }
    }
}

/// What the sync listener refuses, on either build, with the project's
/// error body `{"error": <code>, "message": <text>}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerError {
    /// A push refused as such.
    Push(SyncError),
    /// Another path or method: 404.
    NotFound,
    /// A push request that ends with its headers: 400.
    NoBody,
    /// The module has no sync secret to check pushes with: 503.
    NotConfigured,
}

impl ListenerError {
    pub fn status(&self) -> u16 {
        match self {
            ListenerError::Push(e) => e.status(),
            ListenerError::NotFound => 404,
            ListenerError::NoBody => 400,
            ListenerError::NotConfigured => 503,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ListenerError::Push(e) => e.code(),
            ListenerError::NotFound => "not_found",
            ListenerError::NoBody => "invalid_request",
            ListenerError::NotConfigured => "unavailable",
        }
    }

    pub fn message(&self) -> String {
        match self {
            ListenerError::Push(e) => e.message(),
            ListenerError::NotFound => "not found".into(),
            ListenerError::NoBody => "push without a body".into(),
            ListenerError::NotConfigured => "sync is not configured".into(),
        }
    }

    /// The reply body.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "error": self.code(), "message": self.message() }))
            .unwrap_or_default()
    }
}

impl From<SyncError> for ListenerError {
    fn from(e: SyncError) -> ListenerError {
        ListenerError::Push(e)
    }
}

/// The writes a valid push turns into, in the order to apply them.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// Entries to stage, each a binary record ([`crate::entry`]); the sync
    /// role carries over the rate-limit state the served value holds.
    pub upserts: Vec<(Digest, Vec<u8>)>,
    /// The key-id index entries (`k:<key id>` → hash) of the upserts.
    pub key_ids: Vec<(String, Digest)>,
    pub deletes: Vec<Digest>,
    pub revoked_sessions: Vec<RevokedSession>,
    /// Written first (with CAS): claims this batch, so a concurrent push
    /// conflicts instead of interleaving.
    pub claim: SyncState,
    /// Written last, on the last batch: commits the push.
    pub commit: Option<SyncState>,
    /// The stamp and generation the writes are staged under.
    pub stamp: u64,
    pub generation: u64,
    /// Full push: an unchanged record keeps its committed slot (re-tagged
    /// with the new generation) instead of staging a copy.
    pub full: bool,
    /// Rolled keys (new hash, old hash): the old value's entry becomes an
    /// alias (among `upserts`), and the sync role carries the rate-limit
    /// state the old entry held over to the new one.
    pub rolled: Vec<(Digest, Digest)>,
    /// Plan and tenant limits to stage ([`stage_limit`]).
    pub limit_records: Vec<LimitRecord>,
}

impl Plan {
    /// What Envoy holds once the batch applies.
    pub fn result(&self) -> SyncState {
        self.commit.unwrap_or(self.claim)
    }
}

type HmacSha256 = hmac::Hmac<Sha256>;

/// `v1=<hex HMAC-SHA256(secret, body)>`: the signature header value.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length, so this cannot fail; an empty signature
    // would only be refused by Envoy.
    let Ok(mut mac) = HmacSha256::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Constant-time check of a signature header value.
pub fn verify(secret: &[u8], body: &[u8], header: Option<&[u8]>) -> bool {
    let Some(sig) = header.and_then(|h| h.strip_prefix(b"v1=")) else {
        return false;
    };
    let mut tag = [0u8; 32];
    if hex::decode_to_slice(sig, &mut tag).is_err() {
        return false;
    }
    let Ok(mut mac) = HmacSha256::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&tag).is_ok()
}

/// The entry of a record (as a push plans it), rate-limit state unused;
/// empty — read back as deleted — for an invalid record, which a push
/// refuses before it gets here. Its generation is its slot's.
pub fn encode_entry(record: &CredentialRecord) -> Vec<u8> {
    Credential::try_from(record)
        .map(|c| entry::encode(&c))
        .unwrap_or_default()
}

/// The credential a slot's record (an entry) holds; None for a deleted or
/// corrupt one.
pub fn decode_record(bytes: &[u8], hash: &Digest) -> Option<Credential> {
    entry::decode(bytes, hash)
}

/// One value of an entry, written by the push with `stamp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot<R> {
    pub stamp: u64,
    pub generation: u64,
    /// None: deleted.
    pub record: Option<R>,
}

impl<R> Slot<R> {
    /// Committed (`stamp` not above the held one) and current (not left out
    /// of the last full set).
    fn committed(&self, state: &SyncState) -> bool {
        self.stamp <= state.stamp
    }
}

/// An entry stamped with `entry_generation` belongs to the committed full
/// set (the native build keeps committed entries in a map of its own and
/// needs only this rule).
pub fn is_visible(entry_generation: u64, state: &SyncState) -> bool {
    entry_generation >= state.generation
}

/// The slot readers use: the newest committed one, if it holds a record
/// that the last full set did not leave out.
pub fn visible<'a, R>(slots: &'a [Slot<R>], state: &SyncState) -> Option<&'a R> {
    let slot = slots
        .iter()
        .filter(|s| s.committed(state))
        .max_by_key(|s| s.stamp)?;
    if !is_visible(slot.generation, state) {
        return None;
    }
    slot.record.as_ref()
}

/// The record the reader of an entry's bytes is served, if any. Reads the
/// slots in place: no allocation on the request path.
pub fn visible_record<'a>(entry: &'a [u8], state: &SyncState) -> Option<&'a [u8]> {
    let mut rest = entry;
    let mut newest: Option<Slot<&[u8]>> = None;
    while !rest.is_empty() {
        let s = next_slot(&mut rest)?;
        if s.committed(state) && newest.as_ref().is_none_or(|n| s.stamp >= n.stamp) {
            newest = Some(s);
        }
    }
    let slot = newest?;
    if !is_visible(slot.generation, state) {
        return None;
    }
    slot.record
}

/// The entry with its served record replaced by `f` of it (the gate's
/// rate-limit step updates the state inside it); None when nothing is served.
///
/// `f` also rewrites each staged record (a push in progress, above the
/// committed stamp), in the same write: the push copied the counters into
/// it when it staged it ([`stage`]), and takes over with them at its
/// commit, so a request counted in between must be counted there too, or
/// the commit would hand the key back the budget it spent meanwhile. A
/// staged record `f` cannot rewrite (a delete, an alias) stays as it is.
///
/// Committed slots older than the served one are left out: an entry a push
/// updated would otherwise keep its old value beside the new one until its
/// next update. A worker that read the state before that commit finds then
/// no slot it serves, and reads the state again ([`EntryCell`]).
pub fn update_visible_record(
    entry: &[u8],
    state: &SyncState,
    mut f: impl FnMut(&[u8]) -> Option<Vec<u8>>,
) -> Option<Vec<u8>> {
    rewrite_slots(entry, state, |r, _| f(r))
}

/// [`update_visible_record`] with `f` told whether the record it rewrites
/// is the served one (true) or a staged one (false).
#[inline]
fn rewrite_slots(
    entry: &[u8],
    state: &SyncState,
    mut f: impl FnMut(&[u8], bool) -> Option<Vec<u8>>,
) -> Option<Vec<u8>> {
    let slots = decode_slots(entry)?;
    let served = visible(&slots, state)?.as_ptr();
    let served_stamp = slots
        .iter()
        .find(|s| s.record.is_some_and(|r| r.as_ptr() == served))?
        .stamp;
    let mut out = Vec::with_capacity(slots.len());
    for s in &slots {
        if s.committed(state) && s.stamp < served_stamp {
            continue;
        }
        let record = match s.record {
            Some(r) if r.as_ptr() == served => Some(f(r, true)?),
            Some(r) if !s.committed(state) => Some(f(r, false).unwrap_or_else(|| r.to_vec())),
            other => other.map(<[u8]>::to_vec),
        };
        out.push(Slot {
            stamp: s.stamp,
            generation: s.generation,
            record,
        });
    }
    Some(encode_slots(&out))
}

/// A shared-data read: an entry's bytes and CAS token ((None, None) when
/// absent), or the host's error.
pub type SharedRead<'a, E> = &'a mut dyn FnMut(&str) -> Result<(Option<Vec<u8>>, Option<u32>), E>;

/// The rate-limit state inside a credential entry, as the gate's counter
/// cell sees it (the host's side lives with the host: the filter's
/// `shared_store::EntryCounter`). The first read reuses the entry as the
/// lookup read it (no host call); after a CAS conflict the entry is read
/// again. A deleted entry is never written back: the update then gives up
/// and the request is refused.
#[derive(Debug, Clone)]
pub struct EntryCell {
    name: String,
    /// The entry as last read; None once it turned out deleted or foreign.
    bytes: Option<Vec<u8>>,
    cas: Option<u32>,
    /// `bytes` comes from the lookup and was not handed out yet.
    fresh: bool,
    /// Which of the entry's slots is served.
    state: SyncState,
}

impl EntryCell {
    /// The entry `name` as the lookup read it under `state`.
    pub fn new(name: String, bytes: Vec<u8>, cas: Option<u32>, state: SyncState) -> EntryCell {
        EntryCell {
            name,
            bytes: Some(bytes),
            cas,
            fresh: true,
            state,
        }
    }

    /// The sync state the entry is served under (the lookup's, or the one
    /// read again after a commit).
    pub fn state(&self) -> SyncState {
        self.state
    }

    /// The counters of the served record (encoded as
    /// [`crate::limits::Counters`]) and the CAS token to write them back
    /// with; (None, None) once the entry serves nothing.
    pub fn load<E>(&mut self, get: SharedRead<'_, E>) -> Result<(Option<Vec<u8>>, Option<u32>), E> {
        if !self.fresh && self.bytes.is_some() {
            (self.bytes, self.cas) = get(&self.name)?;
            let unserved = self
                .bytes
                .as_deref()
                .is_some_and(|b| visible_record(b, &self.state).is_none());
            if unserved {
                // A push committed after this request read the state, and a
                // worker that read the new one wrote the entry without the
                // slot served before (`update_visible_record`). The state
                // as it is now serves the entry's newest value: take it, or
                // a key well under its budget would be refused. Once per
                // conflict, so bounded by the update's attempts.
                let (state, _) = get(STATE_KEY)?;
                self.state = decode_state(state.as_deref());
            }
        }
        self.fresh = false;
        let served = self
            .bytes
            .as_deref()
            .and_then(|b| visible_record(b, &self.state));
        match served.and_then(entry::counters) {
            Some(c) => Ok(((!c.0.is_empty()).then(|| c.encode()), self.cas)),
            None => {
                self.bytes = None;
                Ok((None, None))
            }
        }
    }

    /// The entry with `value` (encoded counters) as its served record's
    /// counters, staged records' too (see [`update_visible_record`]), and
    /// the CAS token to write it with; None when there is nothing to write
    /// (the entry serves nothing).
    pub fn updated(&self, value: &[u8], cas: Option<u32>) -> Option<(&str, Vec<u8>, u32)> {
        let (Some(bytes), Some(cas)) = (&self.bytes, cas) else {
            return None;
        };
        let counters = crate::limits::Counters::decode(Some(value));
        let updated =
            update_visible_record(bytes, &self.state, |r| entry::with_counters(r, &counters))?;
        Some((&self.name, updated, cas))
    }
}

/// Slots as bytes. Per slot: a varint of its stamp times two, plus one when
/// another slot follows; a varint of its generation; when another slot
/// follows, a varint of its record's length (0: deleted); then the record.
/// The last slot's record is the rest of the entry (none: deleted), so the
/// usual entry, one committed slot, pays two or three bytes for its header
/// (20 before: at a million keys the difference decides the size class of
/// Envoy's heap block for the value, bench/RESULTS.md "p4-entry").
pub fn encode_slots(slots: &[Slot<Vec<u8>>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        slots
            .iter()
            .map(|s| 12 + s.record.as_ref().map_or(0, Vec::len))
            .sum(),
    );
    for (i, s) in slots.iter().enumerate() {
        let record = s.record.as_deref().unwrap_or_default();
        let more = i + 1 < slots.len();
        // Stamps count pushes from 1: never near 2^63.
        entry::put_varint(
            &mut out,
            (s.stamp.min(u64::MAX >> 1) << 1) | u64::from(more),
        );
        entry::put_varint(&mut out, s.generation);
        if more {
            entry::put_varint(&mut out, record.len() as u64);
        }
        out.extend_from_slice(record);
    }
    out
}

/// The next slot at the front of `bytes`, which then holds the rest; None
/// for a malformed one.
fn next_slot<'a>(bytes: &mut &'a [u8]) -> Option<Slot<&'a [u8]>> {
    let head = entry::take_varint(bytes)?;
    let generation = entry::take_varint(bytes)?;
    let len = if head & 1 == 1 {
        let len = usize::try_from(entry::take_varint(bytes)?).ok()?;
        // Another slot follows: it cannot be empty.
        if len >= bytes.len() {
            return None;
        }
        len
    } else {
        bytes.len()
    };
    let (record, rest) = (bytes.get(..len)?, bytes.get(len..)?);
    *bytes = rest;
    Some(Slot {
        stamp: head >> 1,
        generation,
        record: (len > 0).then_some(record),
    })
}

/// The slots of an entry; None for a malformed one (treated as absent).
pub fn decode_slots(mut bytes: &[u8]) -> Option<Vec<Slot<&[u8]>>> {
    let mut slots = Vec::with_capacity(2);
    while !bytes.is_empty() {
        slots.push(next_slot(&mut bytes)?);
    }
    Some(slots)
}

/// The entry after staging `record` (None: a delete) into `current` under
/// the plan's stamp. Keeps only the slot readers use today; drops slots of
/// abandoned pushes and older committed ones. In a full push an unchanged
/// record keeps its slot, only re-tagged with the new generation: readers
/// see the same record before and after the commit, and a set without it
/// still removes it.
pub fn stage(
    current: Option<&[u8]>,
    held: &SyncState,
    plan: &Plan,
    hash: &Digest,
    record: Option<&[u8]>,
) -> Vec<u8> {
    let slots = current.and_then(decode_slots).unwrap_or_default();
    let served = slots
        .iter()
        .filter(|s| s.committed(held))
        .max_by_key(|s| s.stamp)
        .filter(|s| s.record.is_some() && s.generation >= held.generation);
    let served_record = served.and_then(|s| s.record);
    // The key's rate-limit state goes on with its new value.
    let record = record.map(|r| {
        served_record
            .and_then(entry::counters)
            .filter(|c| !c.0.is_empty())
            .and_then(|c| entry::with_counters(r, &c))
            .unwrap_or_else(|| r.to_vec())
    });
    let unchanged = plan.full
        && served_record.and_then(|s| decode_record(s, hash)).is_some()
        && served_record.and_then(|s| decode_record(s, hash))
            == record.as_deref().and_then(|r| decode_record(r, hash));
    let staged = Slot {
        stamp: plan.stamp,
        generation: plan.generation,
        record,
    };
    let out = match served {
        // The same credential re-tagged with the new generation, kept at its
        // committed stamp: served identically before and after the commit.
        Some(s) if unchanged => vec![Slot {
            stamp: s.stamp,
            ..staged
        }],
        Some(s) => vec![staged_from(s), staged],
        None => vec![staged],
    };
    encode_slots(&out)
}

fn staged_from(s: &Slot<&[u8]>) -> Slot<Vec<u8>> {
    Slot {
        stamp: s.stamp,
        generation: s.generation,
        record: s.record.map(<[u8]>::to_vec),
    }
}

// ---- Plan and tenant limit entries ----
//
// A `pl:<plan>` or `tl:<tenant>` entry holds slots as a credential entry
// does ([`encode_slots`]), around the plan's limits or the tenant's limits
// and counters (`crate::limits`): a push stages its limit records under its
// stamp and generation beside the value served, so they are served from
// its commit, together with its keys, and a push that never commits is
// never served. A full set leaves out, by generation, a plan it does not
// carry. Limit entries are few, so they may take the slot headers, and a
// first byte [`LIMIT_SLOTS`] that no entry of the previous layout starts
// with (its limit count, at most 5). An entry of the previous layout (a
// wasm module upgraded in a running Envoy keeps shared data) is served and
// counted as it is, as the committed value, until a push stages over it:
// the module's first full push does, and hides it by generation.

/// The first byte of a plan or tenant entry in slots.
pub const LIMIT_SLOTS: u8 = 0x80;

/// The slots of a plan or tenant entry; None for one without them.
fn limit_slots(entry: &[u8]) -> Option<&[u8]> {
    entry.strip_prefix(&[LIMIT_SLOTS])
}

/// An entry of the previous layout: the value itself, served as committed.
fn legacy_limit(entry: &[u8]) -> Option<&[u8]> {
    match entry.first() {
        Some(&b) if b != LIMIT_SLOTS => Some(entry),
        _ => None,
    }
}

/// A plan or tenant entry of `slots`.
pub fn encode_limit_slots(slots: &[Slot<Vec<u8>>]) -> Vec<u8> {
    let mut out = vec![LIMIT_SLOTS];
    out.extend(encode_slots(slots));
    out
}

/// The entry of `record` after staging it into `current` (None: no entry)
/// under `stamp` and `generation`, given the state `held` before the batch.
/// Keeps only the slot served now and adds the push's; a tenant's counters
/// go on from the served value (`LimitRecord::entry`).
pub fn stage_limit(
    current: Option<&[u8]>,
    held: &SyncState,
    stamp: u64,
    generation: u64,
    record: &LimitRecord,
) -> Vec<u8> {
    let legacy = current.and_then(legacy_limit);
    let slots = match legacy {
        // Served as the value committed under `held`, beside the push's.
        Some(value) => vec![Slot {
            stamp: held.stamp,
            generation: held.generation,
            record: Some(value),
        }],
        None => current
            .and_then(limit_slots)
            .and_then(decode_slots)
            .unwrap_or_default(),
    };
    let served = slots
        .iter()
        .filter(|s| s.committed(held))
        .max_by_key(|s| s.stamp)
        .filter(|s| s.record.is_some() && is_visible(s.generation, held));
    let staged = Slot {
        stamp,
        generation,
        record: Some(record.entry(served.and_then(|s| s.record))),
    };
    let out = match served {
        Some(s) => vec![staged_from(s), staged],
        None => vec![staged],
    };
    encode_limit_slots(&out)
}

/// A plan's or tenant's entry as the gate reads and counts it: over the
/// host's cell, `load` gives the value served under `state` (None when
/// nothing is) and `store` writes it back into its slot, the staged slots'
/// counters too (as [`update_visible_record`] does for a key: a request
/// counted before a push commits stays counted after it).
pub struct LimitCell<'a> {
    inner: &'a mut dyn crate::shared_data::CounterCell,
    state: SyncState,
    /// The entry as last loaded.
    held: Option<Vec<u8>>,
    stale: bool,
}

impl<'a> LimitCell<'a> {
    pub fn new(inner: &'a mut dyn crate::shared_data::CounterCell, state: SyncState) -> Self {
        LimitCell {
            inner,
            state,
            held: None,
            stale: false,
        }
    }

    /// An entry held a value but served none under `state`: the state may
    /// be older than the entry's last commit (a push committed and the
    /// next one staged since it was read), so the caller reads it again.
    pub fn stale(&self) -> bool {
        self.stale
    }
}

impl crate::shared_data::CounterCell for LimitCell<'_> {
    fn load(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        let (bytes, cas) = self.inner.load(key);
        let served = bytes.as_deref().and_then(|b| match legacy_limit(b) {
            Some(value) => Some(value.to_vec()),
            None => limit_slots(b)
                .and_then(|b| visible_record(b, &self.state))
                .map(<[u8]>::to_vec),
        });
        self.stale |= served.is_none() && bytes.as_deref().is_some_and(|b| !b.is_empty());
        self.held = bytes;
        (served, cas)
    }

    fn store(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        let Some(held) = self.held.take() else {
            return false;
        };
        if legacy_limit(&held).is_some() {
            // Counted in place, as the previous layout did, until a push
            // stages over it.
            return self.inner.store(key, value, cas);
        }
        // A staged tenant value keeps its own limits and takes the counters
        // of the periods it still limits.
        let updated = limit_slots(&held).and_then(|slots| {
            rewrite_slots(slots, &self.state, |r, served| {
                if served {
                    return Some(value.to_vec());
                }
                let (limits, _) = crate::limits::decode_tenant(Some(r))?;
                Some(crate::limits::retarget_tenant(Some(value), &limits))
            })
        });
        updated.is_some_and(|u| {
            let mut entry = Vec::with_capacity(1 + u.len());
            entry.push(LIMIT_SLOTS);
            entry.extend_from_slice(&u);
            self.inner.store(key, &entry, cas)
        })
    }
}

pub fn decode_state(bytes: Option<&[u8]>) -> SyncState {
    bytes
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or_default()
}

pub fn encode_state(state: &SyncState) -> Vec<u8> {
    serde_json::to_vec(state).unwrap_or_default()
}

/// Parses, authenticates and validates a push against `state`; returns the
/// writes to make. Pure: nothing is applied on any error.
pub fn plan(
    secret: &[u8],
    body: &[u8],
    signature: Option<&[u8]>,
    state: &SyncState,
) -> Result<Plan, SyncError> {
    if body.len() > MAX_PUSH_BYTES {
        return Err(SyncError::TooLarge);
    }
    if !verify(secret, body, signature) {
        return Err(SyncError::BadSignature);
    }
    let (push, records) = decode_for_plan(body)?;
    if records.len() + push.deletes.len() + push.revoked_sessions.len() + push.limit_records.len()
        > MAX_PUSH_ITEMS
    {
        return Err(SyncError::TooLarge);
    }
    let (claim, commit, stamp) = check_sequence(&push, state)?;
    let mut upserts = Vec::with_capacity(records.len());
    let mut key_ids = Vec::with_capacity(records.len());
    let mut rolled = Vec::new();
    for (i, (r, hashes)) in records.into_iter().enumerate() {
        // The record moves into its credential: nothing is copied twice.
        let c = Credential::from_parts(r, hashes)
            .map_err(|e| SyncError::Invalid(e.under(&format!("upserts[{i}]")).to_string()))?;
        key_ids.push((c.key_id.clone(), c.key_hash));
        upserts.push((c.key_hash, entry::encode(&c)));
        if let Some((old, _)) = c.previous_key {
            rolled.push((c.key_hash, old));
        }
    }
    // A rolled key's old value names the new credential until its deadline
    // (checked by the gate against the credential's own copy of it).
    for (new, old) in &rolled {
        upserts.push((*old, entry::encode_alias(old, new)));
    }
    let aliased: std::collections::HashSet<Digest> = rolled.iter().map(|(_, old)| *old).collect();
    let mut seen = std::collections::HashSet::with_capacity(upserts.len());
    if let Some((h, _)) = upserts.iter().find(|(h, _)| !seen.insert(*h)) {
        return Err(SyncError::Invalid(format!(
            "upserts: key hash {} is used twice (a rolled key's previous_key_hash may not be another key's)",
            crate::hash::to_hex(h)
        )));
    }
    let deletes = push
        .deletes
        .iter()
        .enumerate()
        .map(|(i, h)| {
            parse_hex_digest(h).map_err(|e| {
                SyncError::Invalid(ConfigError::new(&format!("deletes[{i}]"), e).to_string())
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The sidecar deletes the hash a roll replaced; its alias takes the place.
    let deletes: Vec<Digest> = deletes
        .into_iter()
        .filter(|h| !aliased.contains(h))
        .collect();
    for (i, r) in push.revoked_sessions.iter().enumerate() {
        let field = |f: &str| format!("revoked_sessions[{i}].{f}");
        check_name(&field("key_id"), &r.key_id).map_err(|e| SyncError::Invalid(e.to_string()))?;
        // A login without session_id uses the default session "".
        if !r.session_id.is_empty() {
            check_name(&field("session_id"), &r.session_id)
                .map_err(|e| SyncError::Invalid(e.to_string()))?;
        }
    }
    for (i, r) in push.limit_records.iter().enumerate() {
        let field = |f: &str| format!("limit_records[{i}].{f}");
        check_name(&field("name"), &r.name).map_err(|e| SyncError::Invalid(e.to_string()))?;
        crate::limits::check_limits(&field("limits"), &r.limits)
            .map_err(|e| SyncError::Invalid(e.to_string()))?;
    }
    Ok(Plan {
        upserts,
        key_ids,
        deletes,
        revoked_sessions: push.revoked_sessions.clone(),
        claim,
        commit,
        stamp,
        generation: push.generation,
        full: push.mode == Mode::Full,
        rolled,
        limit_records: push.limit_records,
    })
}

/// Refuses a push whose upserts reuse a key id the gate's plugin config
/// defines (`config_ids`: the `cfg:ids` entry), naming both: a token names
/// its key by id, and one id must mean one credential.
pub fn check_config_ids(plan: &Plan, config_ids: Option<&[u8]>) -> Result<(), SyncError> {
    let ids: std::collections::BTreeMap<String, String> = match config_ids {
        None | Some([]) => return Ok(()),
        Some(b) => serde_json::from_slice(b)
            .map_err(|_| SyncError::Host("the plugin config's key ids are unreadable".into()))?,
    };
    for (i, (key_id, _)) in plan.key_ids.iter().enumerate() {
        if let Some(at) = ids.get(key_id) {
            return Err(SyncError::Invalid(format!(
                "upserts[{i}].key_id: '{key_id}' is already defined in the plugin config ({at}); key ids must be unique across plugin config and store"
            )));
        }
    }
    Ok(())
}

/// What the state endpoint reports when the committed set is in `layout`
/// (the `sync:layout` entry): the state itself, or, when the set was
/// written by a build with another layout (the filter was updated in a
/// running Envoy), the state at version 0, which no sidecar holds, so
/// every sidecar, old or new, answers with a full push that rewrites the
/// set in this build's layout.
pub fn reported_state(state: SyncState, layout: Option<&[u8]>) -> SyncState {
    if state.generation == 0 || crate::shared_data::is_current_layout(layout) {
        state
    } else {
        SyncState {
            version: 0,
            ..state
        }
    }
}

/// Refuses an incremental push onto a set written in another layout
/// (see [`reported_state`]): only a full push may rewrite it.
pub fn check_layout(plan: &Plan, layout: Option<&[u8]>) -> Result<(), SyncError> {
    if plan.full || crate::shared_data::is_current_layout(layout) {
        Ok(())
    } else {
        Err(SyncError::Conflict(
            "Envoy holds credentials written by another keygate build; a full push is needed"
                .into(),
        ))
    }
}

/// A committed set from an identified store, and a push from another one.
pub fn is_foreign(push: &Push, state: &SyncState) -> bool {
    state.generation > 0 && state.store_id.is_some() && push.store_id != state.store_id
}

/// The state claiming this batch, the state committing the push (last
/// batch only) and the stamp its writes are staged under, if `push` applies
/// on top of `state`.
fn check_sequence(
    push: &Push,
    state: &SyncState,
) -> Result<(SyncState, Option<SyncState>, u64), SyncError> {
    // Stamps are never reused: an abandoned push's slots stay above every
    // stamp until a newer full set leaves them out by generation.
    let fresh_stamp = state.stamp.max(state.pending.map_or(0, |p| p.stamp)) + 1;
    let (stamp, pending) = match push.mode {
        Mode::Incremental => {
            if push.store_id != state.store_id {
                return Err(SyncError::Conflict(
                    "push is from another store than the one Envoy holds".into(),
                ));
            }
            if push.generation != state.generation || push.base_version != state.version {
                return Err(SyncError::Conflict(format!(
                    "push is for generation {} version {}, Envoy holds generation {} version {}",
                    push.generation, push.base_version, state.generation, state.version
                )));
            }
            if push.version <= state.version {
                return Err(SyncError::Conflict(format!(
                    "version {} is not newer than {}",
                    push.version, state.version
                )));
            }
            match state.pending {
                None if push.batch == 0 => (fresh_stamp, None),
                Some(p)
                    if p.mode == Mode::Incremental
                        && p.generation == push.generation
                        && p.base_version == push.base_version
                        && p.version == push.version
                        && p.next_batch == push.batch =>
                {
                    (p.stamp, Some(p))
                }
                Some(p) if p.mode == Mode::Full => {
                    return Err(SyncError::Conflict("a full push is in progress".into()))
                }
                Some(p) => {
                    return Err(SyncError::Conflict(format!(
                        "expected batch {} of the push to version {}, got batch {} to version {}",
                        p.next_batch, p.version, push.batch, push.version
                    )))
                }
                None => {
                    return Err(SyncError::Conflict(format!(
                        "expected batch 0, got {}",
                        push.batch
                    )))
                }
            }
        }
        Mode::Full => {
            let continued = state
                .pending
                .filter(|p| p.mode == Mode::Full && p.generation == push.generation);
            let expected = continued.map_or(0, |p| p.next_batch);
            if push.batch != expected {
                return Err(SyncError::Conflict(format!(
                    "expected batch {expected}, got {}",
                    push.batch
                )));
            }
            if let Some(p) = continued.filter(|_| push.batch > 0) {
                if p.version != push.version {
                    return Err(SyncError::Conflict(format!(
                        "batch {} is for version {}, the push in progress for {}",
                        push.batch, push.version, p.version
                    )));
                }
                (p.stamp, Some(p))
            } else {
                let floor = state
                    .pending
                    .map_or(state.generation, |p| p.generation.max(state.generation));
                if push.generation <= floor {
                    return Err(SyncError::Conflict(format!(
                        "generation {} is not newer than {floor}",
                        push.generation
                    )));
                }
                if !push.takeover && is_foreign(push, state) {
                    return Err(SyncError::Conflict(format!(
                        "Envoy holds the credentials of store {}, this push is from store {}; \
                         refusing to replace them (keygate sync --takeover does)",
                        state.store_id.map_or("-".into(), |id| id.to_string()),
                        push.store_id.map_or("-".into(), |id| id.to_string()),
                    )));
                }
                (fresh_stamp, None)
            }
        }
    };
    let claim = SyncState {
        pending: Some(Pending {
            mode: push.mode,
            generation: push.generation,
            next_batch: push.batch.saturating_add(1),
            stamp,
            base_version: pending.map_or(push.base_version, |p| p.base_version),
            version: push.version,
        }),
        ..*state
    };
    let commit = push.last.then_some(SyncState {
        generation: push.generation,
        version: push.version,
        stamp,
        pending: None,
        store_id: match push.mode {
            Mode::Full => push.store_id,
            Mode::Incremental => state.store_id,
        },
    });
    Ok((claim, commit, stamp))
}

// ---- The binary push body ----
//
// A batch as JSON is ~290 bytes per key, most of it hex digests and field
// names, and Envoy's sync role authenticates and parses every byte of it
// (in the wasm VM at that). The binary body carries the same push in
// ~90 bytes per key: digests as their 32 bytes, no field names, integers
// as varints (postcard). Its first bytes are [`BINARY_MAGIC`] and the
// format version, which no JSON text starts with: the filter reads both,
// and refuses a binary version it does not know by name. The signature
// covers the exact bytes, prefix included. Validation is the JSON path's:
// the binary body decodes into the same [`Push`] that [`plan`] checks.

/// First bytes of a binary push body, followed by the format version byte.
pub const BINARY_MAGIC: &[u8; 3] = b"KGP";
/// The binary push format this build writes and reads.
pub const BINARY_VERSION: u8 = 1;
/// [`BINARY_VERSION`] as the value of [`FORMAT_HEADER`].
pub const BINARY_VERSION_TEXT: &str = "1";
/// Header of the state reply naming the binary push format version the
/// filter reads. Absent (an older filter): the sidecar pushes JSON.
pub const FORMAT_HEADER: &str = "x-keygate-push-format";

/// A credential record as a binary push carries it: [`CredentialRecord`]
/// field for field (so validation and its messages stay the record's),
/// digests as bytes. Every field is written: postcard has no field names,
/// so nothing may be skipped.
#[derive(Serialize, Deserialize)]
struct WireRecord<'a> {
    key_id: Cow<'a, str>,
    key_hash: Digest,
    secret_hash: Option<Digest>,
    previous_secret_hash: Option<Digest>,
    previous_secret_expires_at: Option<u64>,
    kind: crate::credential::Kind,
    tenant: Cow<'a, str>,
    environment: Cow<'a, str>,
    scopes: Cow<'a, [String]>,
    allowed_ips: Cow<'a, [String]>,
    rate_limit: Option<crate::rate_limit::RateLimit>,
    status: crate::credential::Status,
    expires_at: Option<u64>,
    owner: Option<Cow<'a, str>>,
    previous_key_hash: Option<Digest>,
    previous_key_expires_at: Option<u64>,
    metadata: Cow<'a, std::collections::BTreeMap<String, String>>,
    limits: Cow<'a, [crate::limits::Limit]>,
    plan: Option<Cow<'a, str>>,
    tenant_limits: bool,
    quota_used: Cow<'a, [crate::limits::QuotaUsed]>,
    /// balance, serial, monthly, granted_at.
    credits: Option<(u64, u32, bool, u64)>,
}

/// A [`LimitRecord`] as a binary push carries it.
#[derive(Serialize, Deserialize)]
struct WireLimitRecord<'a> {
    kind: LimitKind,
    name: Cow<'a, str>,
    limits: Cow<'a, [crate::limits::Limit]>,
    quota_used: Cow<'a, [crate::limits::QuotaUsed]>,
}

/// Everything of a binary push but its upserts, which follow it: a count,
/// then the records (so the sidecar can append records one by one as it
/// fills a batch).
#[derive(Serialize, Deserialize)]
struct WireHead<'a> {
    mode: Mode,
    generation: u64,
    base_version: u64,
    version: u64,
    batch: u32,
    last: bool,
    store_id: Option<u64>,
    takeover: bool,
    deletes: Vec<Digest>,
    revoked_sessions: Cow<'a, [RevokedSession]>,
    limit_records: Vec<WireLimitRecord<'a>>,
}

fn wire_digest(field: &str, hex: &str) -> Result<Digest, String> {
    parse_hex_digest(hex).map_err(|e| format!("{field}: {e}"))
}

fn wire_digest_opt(field: &str, hex: Option<&str>) -> Result<Option<Digest>, String> {
    hex.map(|h| wire_digest(field, h)).transpose()
}

/// Appends `r` in the binary format to `out` (a batch's upserts). Fails,
/// naming the field, only for a digest that is not 64 hex characters: a
/// record the filter would refuse anyway.
pub fn encode_binary_record(out: &mut Vec<u8>, r: &CredentialRecord) -> Result<(), String> {
    let wire = WireRecord {
        key_id: Cow::Borrowed(&r.key_id),
        key_hash: wire_digest("key_hash", &r.key_hash)?,
        secret_hash: wire_digest_opt("secret_hash", r.secret_hash.as_deref())?,
        previous_secret_hash: wire_digest_opt(
            "previous_secret_hash",
            r.previous_secret_hash.as_deref(),
        )?,
        previous_secret_expires_at: r.previous_secret_expires_at,
        kind: r.kind,
        tenant: Cow::Borrowed(&r.tenant),
        environment: Cow::Borrowed(&r.environment),
        scopes: Cow::Borrowed(&r.scopes),
        allowed_ips: Cow::Borrowed(&r.allowed_ips),
        rate_limit: r.rate_limit,
        status: r.status,
        expires_at: r.expires_at,
        owner: r.owner.as_deref().map(Cow::Borrowed),
        previous_key_hash: wire_digest_opt("previous_key_hash", r.previous_key_hash.as_deref())?,
        previous_key_expires_at: r.previous_key_expires_at,
        metadata: Cow::Borrowed(&r.metadata),
        limits: Cow::Borrowed(&r.limits),
        plan: r.plan.as_deref().map(Cow::Borrowed),
        tenant_limits: r.tenant_limits,
        quota_used: Cow::Borrowed(&r.quota_used),
        credits: r
            .credits
            .map(|c| (c.balance, c.serial, c.monthly, c.granted_at)),
    };
    postcard::to_extend(&wire, core::mem::take(out))
        .map(|v| *out = v)
        .map_err(|e| format!("key '{}': {e}", r.key_id))
}

/// The binary body of `push` whose upserts are `count` records already
/// encoded into `records` ([`encode_binary_record`]); `push.upserts` itself
/// is left out.
pub fn binary_body(push: &Push, count: usize, records: &[u8]) -> Result<Vec<u8>, String> {
    let head = WireHead {
        mode: push.mode,
        generation: push.generation,
        base_version: push.base_version,
        version: push.version,
        batch: push.batch,
        last: push.last,
        store_id: push.store_id.map(|s| s.0),
        takeover: push.takeover,
        deletes: push
            .deletes
            .iter()
            .enumerate()
            .map(|(i, h)| wire_digest(&format!("deletes[{i}]"), h))
            .collect::<Result<_, _>>()?,
        revoked_sessions: Cow::Borrowed(&push.revoked_sessions),
        limit_records: push
            .limit_records
            .iter()
            .map(|r| WireLimitRecord {
                kind: r.kind,
                name: Cow::Borrowed(&r.name),
                limits: Cow::Borrowed(&r.limits),
                quota_used: Cow::Borrowed(&r.quota_used),
            })
            .collect(),
    };
    let count = u32::try_from(count).map_err(|_| "too many upserts".to_string())?;
    let mut out = Vec::with_capacity(records.len() + 64);
    out.extend_from_slice(BINARY_MAGIC);
    out.push(BINARY_VERSION);
    let out = postcard::to_extend(&head, out).map_err(|e| e.to_string())?;
    let mut out = postcard::to_extend(&count, out).map_err(|e| e.to_string())?;
    out.extend_from_slice(records);
    Ok(out)
}

/// The whole of `push` (its upserts included) as a binary body.
pub fn encode_binary(push: &Push) -> Result<Vec<u8>, String> {
    let mut records = Vec::new();
    for r in &push.upserts {
        encode_binary_record(&mut records, r)?;
    }
    binary_body(push, push.upserts.len(), &records)
}

/// The record with its digests in hex, as JSON carries it.
fn wire_to_record(w: WireRecord<'_>) -> CredentialRecord {
    wire_to_record_with(w, crate::hash::to_hex)
}

fn wire_to_record_with(w: WireRecord<'_>, hex: impl Fn(&Digest) -> String) -> CredentialRecord {
    let opt = |d: Option<Digest>| d.as_ref().map(&hex);
    CredentialRecord {
        key_id: w.key_id.into_owned(),
        key_hash: hex(&w.key_hash),
        secret_hash: opt(w.secret_hash),
        previous_secret_hash: opt(w.previous_secret_hash),
        previous_secret_expires_at: w.previous_secret_expires_at,
        kind: w.kind,
        tenant: w.tenant.into_owned(),
        environment: w.environment.into_owned(),
        scopes: w.scopes.into_owned(),
        allowed_ips: w.allowed_ips.into_owned(),
        rate_limit: w.rate_limit,
        status: w.status,
        expires_at: w.expires_at,
        owner: w.owner.map(Cow::into_owned),
        previous_key_hash: opt(w.previous_key_hash),
        previous_key_expires_at: w.previous_key_expires_at,
        metadata: w.metadata.into_owned(),
        limits: w.limits.into_owned(),
        plan: w.plan.map(Cow::into_owned),
        tenant_limits: w.tenant_limits,
        quota_used: w.quota_used.into_owned(),
        credits: w.credits.map(
            |(balance, serial, monthly, granted_at)| crate::limits::Credits {
                balance,
                serial,
                monthly,
                granted_at,
            },
        ),
    }
}

/// A record [`plan`] validates: its digests as bytes (its hex fields left
/// empty), so they are neither written out as hex nor parsed back.
fn wire_to_parts(w: WireRecord<'_>) -> (CredentialRecord, RecordHashes) {
    let hashes = RecordHashes::of_bytes(
        w.key_hash,
        w.secret_hash,
        w.previous_secret_hash,
        w.previous_key_hash,
    );
    let record = CredentialRecord {
        key_hash: String::new(),
        secret_hash: None,
        previous_secret_hash: None,
        previous_key_hash: None,
        ..wire_to_record_with(w, |_| String::new())
    };
    (record, hashes)
}

/// A push's upserts as [`plan`] takes them.
type Records = Vec<(CredentialRecord, RecordHashes)>;

/// The push without its upserts, and the upserts as [`plan`] validates them.
fn decode_for_plan(body: &[u8]) -> Result<(Push, Records), SyncError> {
    match body.strip_prefix(BINARY_MAGIC.as_slice()) {
        Some(rest) => {
            let (push, wire) = decode_binary(rest)?;
            Ok((push, wire.into_iter().map(wire_to_parts).collect()))
        }
        None => {
            let mut push: Push =
                serde_json::from_slice(body).map_err(|e| SyncError::Invalid(e.to_string()))?;
            let records = core::mem::take(&mut push.upserts)
                .into_iter()
                .map(|r| {
                    let hashes = RecordHashes::parse(&r);
                    (r, hashes)
                })
                .collect();
            Ok((push, records))
        }
    }
}

/// Reads a binary body (after its magic): the version, the head, then
/// exactly the upserts it counts, and nothing after them. The push comes
/// without its upserts, which follow as read.
fn decode_binary(body: &[u8]) -> Result<(Push, Vec<WireRecord<'_>>), SyncError> {
    let invalid = |what: &str, e: postcard::Error| {
        SyncError::Invalid(format!(
            "binary push (format {BINARY_VERSION}): {what}: {e}"
        ))
    };
    let (version, rest) = body
        .split_first()
        .ok_or_else(|| SyncError::Invalid("binary push without a format version".into()))?;
    if *version != BINARY_VERSION {
        return Err(SyncError::Invalid(format!(
            "binary push format {version} is not one this filter reads (it reads format \
             {BINARY_VERSION}); run the keygate sidecar of the filter's release, or update the filter"
        )));
    }
    let (head, rest) =
        postcard::take_from_bytes::<WireHead>(rest).map_err(|e| invalid("head", e))?;
    let (count, mut rest) =
        postcard::take_from_bytes::<u32>(rest).map_err(|e| invalid("upserts", e))?;
    // Refused before anything is allocated for them.
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    if count > MAX_PUSH_ITEMS {
        return Err(SyncError::TooLarge);
    }
    let mut upserts = Vec::with_capacity(count);
    for i in 0..count {
        let (r, next) = postcard::take_from_bytes::<WireRecord>(rest)
            .map_err(|e| invalid(&format!("upserts[{i}]"), e))?;
        upserts.push(r);
        rest = next;
    }
    if !rest.is_empty() {
        return Err(SyncError::Invalid(format!(
            "binary push (format {BINARY_VERSION}): {} bytes after the last upsert",
            rest.len()
        )));
    }
    let push = Push {
        mode: head.mode,
        generation: head.generation,
        base_version: head.base_version,
        version: head.version,
        batch: head.batch,
        last: head.last,
        upserts: vec![],
        deletes: head.deletes.iter().map(crate::hash::to_hex).collect(),
        revoked_sessions: head.revoked_sessions.into_owned(),
        store_id: head.store_id.map(StoreId),
        takeover: head.takeover,
        limit_records: head
            .limit_records
            .into_iter()
            .map(|r| LimitRecord {
                kind: r.kind,
                name: r.name.into_owned(),
                limits: r.limits.into_owned(),
                quota_used: r.quota_used.into_owned(),
            })
            .collect(),
    };
    Ok((push, upserts))
}

/// A push body, binary (it starts with [`BINARY_MAGIC`]) or JSON.
pub fn decode_push(body: &[u8]) -> Result<Push, SyncError> {
    match body.strip_prefix(BINARY_MAGIC.as_slice()) {
        Some(rest) => {
            let (push, wire) = decode_binary(rest)?;
            Ok(Push {
                upserts: wire.into_iter().map(wire_to_record).collect(),
                ..push
            })
        }
        None => serde_json::from_slice(body).map_err(|e| SyncError::Invalid(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::tests::record;
    use crate::hash::to_hex;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn push(mode: Mode, generation: u64, base: u64, version: u64) -> Push {
        Push {
            mode,
            generation,
            base_version: base,
            version,
            batch: 0,
            last: true,
            upserts: vec![record("k1", "t")],
            deletes: vec![],
            revoked_sessions: vec![],
            store_id: None,
            takeover: false,
            limit_records: vec![],
        }
    }

    #[test]
    fn limit_records_are_validated_naming_the_record_and_carried_in_the_plan() {
        let tenant = LimitRecord {
            kind: LimitKind::Tenant,
            name: "acme".into(),
            limits: vec!["100/min".parse().unwrap()],
            quota_used: vec![],
        };
        let ok = Push {
            limit_records: vec![tenant.clone()],
            ..push(Mode::Full, 1, 0, 7)
        };
        let plan = run(&ok, &SyncState::default()).unwrap();
        assert_eq!(plan.limit_records, vec![tenant.clone()]);
        assert_eq!(tenant.key(), "tl:acme");
        let bad = Push {
            limit_records: vec![
                tenant.clone(),
                LimitRecord {
                    kind: LimitKind::Plan,
                    name: "pro".into(),
                    limits: vec!["10/min".parse().unwrap(), "20/min".parse().unwrap()],
                    quota_used: vec![],
                },
            ],
            ..push(Mode::Full, 1, 0, 7)
        };
        match run(&bad, &SyncState::default()) {
            Err(SyncError::Invalid(m)) => assert!(m.contains("limit_records[1].limits[1]"), "{m}"),
            other => panic!("{other:?}"),
        }
        let body = br#"{"mode":"full","generation":1,"version":1,"limit_records":[{"kind":"plan","name":"x","limits":["1/fortnight"]}]}"#;
        assert!(matches!(
            plan_body(body),
            Err(SyncError::Invalid(m)) if m.contains("fortnight")
        ));
    }

    fn plan_body(body: &[u8]) -> Result<Plan, SyncError> {
        plan(
            SECRET,
            body,
            Some(sign(SECRET, body).as_bytes()),
            &SyncState::default(),
        )
    }

    #[test]
    fn a_full_push_seeds_quota_usage_only_where_envoy_counts_nothing_yet() {
        use crate::limits::{Counters, QuotaPeriod, QuotaUsed};
        let mut r = record("k1", "t");
        r.limits = vec!["10/day".parse().unwrap()];
        let used = |n| QuotaUsed {
            period: QuotaPeriod::Day,
            since: 1_700_000_000 / 86_400 * 86_400,
            used: n,
        };
        r.quota_used = vec![used(4)];
        let h = crate::hash::sha256(b"k1");
        let p1 = run(
            &Push {
                upserts: vec![r.clone()],
                ..push(Mode::Full, 1, 0, 1)
            },
            &SyncState::default(),
        )
        .unwrap();
        let mut entries = std::collections::HashMap::new();
        apply(&mut entries, &SyncState::default(), &p1);
        let s1 = p1.result();
        let seeded = crate::entry::counters(visible_record(&entries[&h], &s1).unwrap()).unwrap();
        assert_eq!(
            seeded.0.len(),
            1,
            "an Envoy that just started gets the log's count"
        );
        let live = Counters(smallvec::smallvec![(4, seeded.0[0].1 + 3)]);
        let e = update_visible_record(&entries[&h], &s1, |rec| {
            crate::entry::with_counters(rec, &live)
        })
        .unwrap();
        entries.insert(h, e);
        r.quota_used = vec![used(5)];
        let p2 = run(
            &Push {
                upserts: vec![r],
                ..push(Mode::Full, 2, 0, 2)
            },
            &s1,
        )
        .unwrap();
        apply(&mut entries, &s1, &p2);
        let served = visible_record(&entries[&h], &p2.result()).unwrap();
        assert_eq!(
            crate::entry::counters(served),
            Some(live),
            "what Envoy counted wins"
        );
    }

    #[test]
    fn a_pushed_update_keeps_every_counter_of_the_key() {
        let mut r = record("k1", "t");
        r.limits = vec!["10/s".parse().unwrap(), "100/day".parse().unwrap()];
        let p1 = run(
            &Push {
                upserts: vec![r.clone()],
                ..push(Mode::Full, 1, 0, 1)
            },
            &SyncState::default(),
        )
        .unwrap();
        let mut entries = std::collections::HashMap::new();
        apply(&mut entries, &SyncState::default(), &p1);
        let s1 = p1.result();
        let h = crate::hash::sha256(b"k1");
        let used = crate::limits::Counters(smallvec::smallvec![(1, 5), (4, 6)]);
        let e = update_visible_record(&entries[&h], &s1, |rec| {
            crate::entry::with_counters(rec, &used)
        })
        .unwrap();
        entries.insert(h, e);
        r.scopes = vec!["write".into()];
        let p2 = run(
            &Push {
                upserts: vec![r],
                ..push(Mode::Incremental, 1, 1, 2)
            },
            &s1,
        )
        .unwrap();
        apply(&mut entries, &s1, &p2);
        let s2 = p2.result();
        let served = visible_record(&entries[&h], &s2).unwrap();
        assert_eq!(crate::entry::counters(served), Some(used));
    }

    /// Plans `p` sent as JSON and as a binary body: both must plan alike.
    fn run(p: &Push, state: &SyncState) -> Result<Plan, SyncError> {
        let json = serde_json::to_vec(p).unwrap();
        let out = plan(SECRET, &json, Some(sign(SECRET, &json).as_bytes()), state);
        match encode_binary(p) {
            Ok(binary) => {
                let bin = plan(
                    SECRET,
                    &binary,
                    Some(sign(SECRET, &binary).as_bytes()),
                    state,
                );
                assert_eq!(bin, out, "binary and JSON bodies plan alike");
            }
            // Only a digest that is not hex cannot be encoded: JSON refuses it too.
            Err(_) => assert!(matches!(out, Err(SyncError::Invalid(_))), "{out:?}"),
        }
        out
    }

    /// A record with every optional field set.
    fn full_record() -> CredentialRecord {
        let mut r = record("k9", "t");
        r.secret_hash = Some(to_hex(&crate::hash::sha256(b"s")));
        r.previous_secret_hash = Some(to_hex(&crate::hash::sha256(b"s0")));
        r.previous_secret_expires_at = Some(99);
        r.kind = crate::credential::Kind::Default;
        r.environment = "test".into();
        r.scopes = vec!["read".into(), "write".into()];
        r.allowed_ips = vec!["10.0.0.0/8".into(), "2001:db8::1".into()];
        r.rate_limit = Some(crate::rate_limit::RateLimit {
            requests: 5,
            window_secs: 60,
        });
        r.status = crate::credential::Status::Inactive;
        r.expires_at = Some(1_900_000_000);
        r.owner = Some("alice@example.com".into());
        r.previous_key_hash = Some(to_hex(&crate::hash::sha256(b"k9-old")));
        r.previous_key_expires_at = Some(1_800_000_000);
        r.metadata = [("tier".to_string(), "gold".to_string())].into();
        r.limits = vec!["10/day".parse().unwrap(), "100/month".parse().unwrap()];
        r.plan = Some("pro".into());
        r.tenant_limits = true;
        r.quota_used = vec![crate::limits::QuotaUsed {
            period: crate::limits::QuotaPeriod::Day,
            since: 1_700_006_400,
            used: 3,
        }];
        r.credits = Some(crate::limits::Credits {
            balance: 1000,
            serial: 2,
            monthly: true,
            granted_at: 1_700_000_000,
        });
        r
    }

    fn full_push() -> Push {
        Push {
            upserts: vec![record("k1", "t"), full_record()],
            deletes: vec![to_hex(&crate::hash::sha256(b"gone"))],
            revoked_sessions: vec![RevokedSession {
                key_id: "id-k1".into(),
                session_id: "s1".into(),
                revoked_at_ms: 5,
            }],
            store_id: Some(StoreId(0xfeed)),
            takeover: true,
            limit_records: vec![LimitRecord {
                kind: LimitKind::Tenant,
                name: "t".into(),
                limits: vec!["100/min".parse().unwrap()],
                quota_used: vec![crate::limits::QuotaUsed {
                    period: crate::limits::QuotaPeriod::Month,
                    since: 1_698_796_800,
                    used: 7,
                }],
            }],
            batch: 3,
            last: false,
            ..push(Mode::Full, 4, 0, 12)
        }
    }

    #[test]
    fn a_binary_push_round_trips_every_field() {
        let p = full_push();
        let body = encode_binary(&p).unwrap();
        assert!(body.starts_with(b"KGP\x01"));
        assert_eq!(decode_push(&body).unwrap(), p);
        // Incremental pushes too, with their base version.
        let inc = Push {
            base_version: 11,
            ..push(Mode::Incremental, 2, 11, 12)
        };
        assert_eq!(decode_push(&encode_binary(&inc).unwrap()).unwrap(), inc);
        // Records appended one by one make the same body.
        let mut records = Vec::new();
        for r in &p.upserts {
            encode_binary_record(&mut records, r).unwrap();
        }
        let head = Push {
            upserts: vec![],
            ..p.clone()
        };
        assert_eq!(binary_body(&head, 2, &records).unwrap(), body);
    }

    #[test]
    fn a_binary_record_is_under_half_the_size_of_its_json() {
        // The bench's record shape.
        let mut r = record("bench-key-1", "t0");
        r.key_id = "bench-0000001".into();
        r.allowed_ips = vec!["127.0.0.0/8".into()];
        r.rate_limit = Some(crate::rate_limit::RateLimit {
            requests: 1_000_000_000,
            window_secs: 60,
        });
        let mut bin = Vec::new();
        encode_binary_record(&mut bin, &r).unwrap();
        let json = serde_json::to_vec(&r).unwrap();
        assert!(bin.len() <= 100, "{} bytes", bin.len());
        assert!(
            bin.len() * 2 < json.len(),
            "{} vs {}",
            bin.len(),
            json.len()
        );
    }

    #[test]
    fn truncated_extended_and_garbage_binary_bodies_are_refused_without_panic() {
        let body = encode_binary(&full_push()).unwrap();
        for n in 0..body.len() {
            let cut = &body[..n];
            assert!(
                matches!(plan_body(cut), Err(SyncError::Invalid(_))),
                "a body cut at {n} of {} bytes",
                body.len()
            );
        }
        let mut longer = body.clone();
        longer.push(0);
        assert!(
            matches!(plan_body(&longer), Err(SyncError::Invalid(m)) if m.contains("after the last upsert"))
        );
        // Deterministic garbage after the magic: refused, never a panic.
        let mut x: u32 = 0x9e37_79b9;
        for len in [1usize, 5, 40, 300, 5000] {
            for _ in 0..50 {
                let mut g = b"KGP\x01".to_vec();
                g.extend((0..len).map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                }));
                assert!(plan_body(&g).is_err());
            }
        }
    }

    #[test]
    fn a_binary_body_claiming_too_many_upserts_is_refused_before_reading_them() {
        let head = encode_binary(&Push {
            upserts: vec![],
            ..push(Mode::Full, 1, 0, 1)
        })
        .unwrap();
        // The head's last byte is its upsert count, 0: claim 2^32 - 1 instead.
        let mut body = head[..head.len() - 1].to_vec();
        body.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert_eq!(plan_body(&body), Err(SyncError::TooLarge));
        let too_many = Push {
            upserts: (0..=MAX_PUSH_ITEMS)
                .map(|i| record(&format!("k{i}"), "t"))
                .collect(),
            ..push(Mode::Full, 1, 0, 1)
        };
        let body = encode_binary(&too_many).unwrap();
        assert!(body.len() <= MAX_PUSH_BYTES);
        assert_eq!(plan_body(&body), Err(SyncError::TooLarge));
        let mut big = b"KGP\x01".to_vec();
        big.resize(MAX_PUSH_BYTES + 1, 0);
        assert_eq!(plan_body(&big), Err(SyncError::TooLarge));
    }

    #[test]
    fn the_format_header_names_the_binary_version() {
        assert_eq!(BINARY_VERSION_TEXT, BINARY_VERSION.to_string());
    }

    #[test]
    fn an_unknown_binary_format_version_is_refused_by_name() {
        let mut body = encode_binary(&push(Mode::Full, 1, 0, 1)).unwrap();
        body[3] = 2;
        match plan_body(&body) {
            Err(SyncError::Invalid(m)) => {
                assert!(
                    m.contains("format 2") && m.contains("reads format 1"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_signature_covers_every_byte_of_a_binary_body() {
        let p = Push {
            batch: 0,
            ..full_push()
        };
        let body = encode_binary(&p).unwrap();
        let sig = sign(SECRET, &body);
        let state = SyncState::default();
        assert!(plan(SECRET, &body, Some(sig.as_bytes()), &state).is_ok());
        for i in 0..body.len() {
            let mut changed = body.clone();
            changed[i] ^= 0x01;
            assert_eq!(
                plan(SECRET, &changed, Some(sig.as_bytes()), &state),
                Err(SyncError::BadSignature),
                "byte {i}"
            );
        }
        // The same push as JSON has another signature.
        let json = serde_json::to_vec(&p).unwrap();
        assert_eq!(
            plan(SECRET, &json, Some(sig.as_bytes()), &state),
            Err(SyncError::BadSignature)
        );
    }

    #[test]
    fn a_bad_record_in_a_binary_push_is_refused_naming_its_field() {
        let mut p = push(Mode::Full, 1, 0, 1);
        let mut bad = record("k2", "t");
        bad.allowed_ips = vec!["nonsense".into()];
        p.upserts.push(bad);
        let body = encode_binary(&p).unwrap();
        assert!(
            matches!(plan_body(&body), Err(SyncError::Invalid(m)) if m.starts_with("upserts[1].allowed_ips[0]"))
        );
        // A digest that is not hex cannot be put into a binary body at all.
        let mut p = push(Mode::Full, 1, 0, 1);
        p.upserts[0].key_hash = "xyz".into();
        assert!(encode_binary(&p).unwrap_err().contains("key_hash"));
    }

    fn held(generation: u64, version: u64) -> SyncState {
        SyncState {
            generation,
            version,
            stamp: generation + version,
            pending: None,
            store_id: None,
        }
    }

    fn committed(state: &SyncState, generation: u64, version: u64) -> bool {
        state.generation == generation && state.version == version && state.pending.is_none()
    }

    /// Applies a plan to an in-memory entry map as the sync role does.
    fn apply(entries: &mut std::collections::HashMap<Digest, Vec<u8>>, held: &SyncState, p: &Plan) {
        for (hash, record) in &p.upserts {
            let e = stage(
                entries.get(hash).map(Vec::as_slice),
                held,
                p,
                hash,
                Some(record),
            );
            entries.insert(*hash, e);
        }
        for hash in &p.deletes {
            let e = stage(entries.get(hash).map(Vec::as_slice), held, p, hash, None);
            entries.insert(*hash, e);
        }
    }

    fn served(
        entries: &std::collections::HashMap<Digest, Vec<u8>>,
        state: &SyncState,
        key: &str,
    ) -> Option<String> {
        let hash = crate::hash::sha256(key.as_bytes());
        let slots = decode_slots(entries.get(&hash)?)?;
        let record = visible(&slots, state)?;
        decode_record(record, &hash).map(|c| c.key_id)
    }

    #[test]
    fn signature_round_trips_and_rejects_forgeries() {
        let sig = sign(SECRET, b"body");
        assert!(verify(SECRET, b"body", Some(sig.as_bytes())));
        assert!(!verify(SECRET, b"body2", Some(sig.as_bytes())));
        assert!(!verify(
            b"another secret of enough length!",
            b"body",
            Some(sig.as_bytes())
        ));
        assert!(!verify(SECRET, b"body", None));
        assert!(!verify(SECRET, b"body", Some(b"v1=zz")));
        assert!(!verify(SECRET, b"body", Some(&sig.as_bytes()[3..])));
    }

    #[test]
    fn a_set_written_in_another_layout_asks_for_a_full_push() {
        use crate::shared_data::layout_value;
        let current = layout_value();
        let state = held(3, 9);
        // Nothing pushed yet, or the set in this build's layout: as held.
        assert_eq!(
            reported_state(SyncState::default(), None),
            SyncState::default()
        );
        assert_eq!(reported_state(state, Some(&current)), state);
        // Written by an older filter (no marker) or another layout: version
        // 0, which no sidecar holds, so it answers with a full push.
        for other in [None, Some(&b"1"[..]), Some(&b"2"[..]), Some(&b"x"[..])] {
            let reported = reported_state(state, other);
            assert_eq!(reported.version, 0, "{other:?}");
            assert_eq!(reported.generation, 3);
        }
        // That full push applies; an incremental one onto the old set does not.
        let full = run(&push(Mode::Full, 4, 0, 10), &state).unwrap();
        assert!(check_layout(&full, Some(b"1")).is_ok());
        let incremental = run(&push(Mode::Incremental, 3, 9, 10), &state).unwrap();
        assert!(check_layout(&incremental, Some(&current)).is_ok());
        let err = check_layout(&incremental, Some(b"1")).unwrap_err();
        assert_eq!(err.status(), 409);
        assert!(err.message().contains("full push"), "{}", err.message());
        assert_eq!(check_layout(&incremental, None).unwrap_err().status(), 409);
    }

    #[test]
    fn a_store_key_reusing_a_config_key_id_is_refused_naming_both() {
        let plan = run(&push(Mode::Full, 1, 0, 7), &SyncState::default()).unwrap();
        assert_eq!(plan.key_ids.len(), 1);
        assert_eq!(plan.key_ids[0].0, "id-k1");
        assert!(check_config_ids(&plan, None).is_ok());
        assert!(check_config_ids(&plan, Some(br#"{"other":"credentials[0]"}"#)).is_ok());
        let err = check_config_ids(&plan, Some(br#"{"id-k1":"credentials[2]"}"#)).unwrap_err();
        assert_eq!(err.status(), 400);
        let message = err.message();
        assert!(
            message.contains("upserts[0].key_id")
                && message.contains("'id-k1'")
                && message.contains("plugin config (credentials[2])"),
            "{message}"
        );
        // Unreadable: refused as a host failure, never let through.
        assert_eq!(
            check_config_ids(&plan, Some(b"{")).unwrap_err().status(),
            500
        );
    }

    #[test]
    fn first_full_push_commits_generation_and_version() {
        let plan = run(&push(Mode::Full, 1, 0, 7), &SyncState::default()).unwrap();
        let state = plan.result();
        assert!(committed(&state, 1, 7), "{state:?}");
        assert_eq!(state.stamp, 1);
        assert_eq!(plan.upserts.len(), 1);
        let (hash, entry) = &plan.upserts[0];
        assert_eq!(crate::entry::tat(entry), Some(None), "counter unused");
        let cred = decode_record(entry, hash).unwrap();
        assert_eq!((plan.generation, cred.key_id.as_str()), (1, "id-k1"));
    }

    #[test]
    fn incremental_push_must_build_on_the_held_version() {
        let next = run(&push(Mode::Incremental, 1, 7, 8), &held(1, 7))
            .unwrap()
            .result();
        assert!(committed(&next, 1, 8), "{next:?}");
        assert!(next.stamp > held(1, 7).stamp);
        // Replayed (already applied) and out-of-order pushes are refused.
        assert!(matches!(
            run(&push(Mode::Incremental, 1, 6, 7), &held(1, 7)),
            Err(SyncError::Conflict(_))
        ));
        assert!(matches!(
            run(&push(Mode::Incremental, 1, 7, 7), &held(1, 7)),
            Err(SyncError::Conflict(_))
        ));
        assert!(matches!(
            run(&push(Mode::Incremental, 2, 7, 8), &held(1, 7)),
            Err(SyncError::Conflict(_))
        ));
    }

    #[test]
    fn full_push_in_batches_commits_on_the_last() {
        let mut p = push(Mode::Full, 2, 0, 9);
        p.last = false;
        let s1 = run(&p, &held(1, 7)).unwrap().result();
        assert_eq!((s1.generation, s1.version, s1.stamp), (1, 7, 8));
        assert_eq!(
            s1.pending,
            Some(Pending {
                mode: Mode::Full,
                generation: 2,
                next_batch: 1,
                stamp: 9,
                base_version: 0,
                version: 9,
            })
        );
        // Out of order and incremental pushes wait for the full push.
        p.batch = 2;
        assert!(matches!(run(&p, &s1), Err(SyncError::Conflict(_))));
        assert!(matches!(
            run(&push(Mode::Incremental, 1, 7, 8), &s1),
            Err(SyncError::Conflict(_))
        ));
        p.batch = 1;
        p.last = true;
        let s2 = run(&p, &s1).unwrap().result();
        assert!(committed(&s2, 2, 9), "{s2:?}");
        assert_eq!(s2.stamp, 9);
    }

    #[test]
    fn old_or_equal_generation_full_push_is_refused() {
        assert!(matches!(
            run(&push(Mode::Full, 1, 0, 9), &held(1, 7)),
            Err(SyncError::Conflict(_))
        ));
        assert!(matches!(
            run(&push(Mode::Full, 0, 0, 9), &held(1, 7)),
            Err(SyncError::Conflict(_))
        ));
        // An abandoned full push is superseded by a newer one.
        let s = SyncState {
            generation: 1,
            version: 7,
            stamp: 2,
            pending: Some(Pending {
                mode: Mode::Full,
                generation: 3,
                next_batch: 4,
                stamp: 3,
                base_version: 0,
                version: 9,
            }),
            store_id: None,
        };
        assert!(run(&push(Mode::Full, 4, 0, 9), &s).is_ok());
        assert!(matches!(
            run(&push(Mode::Full, 3, 0, 9), &s),
            Err(SyncError::Conflict(_))
        ));
    }

    #[test]
    fn one_bad_record_refuses_the_whole_push() {
        let mut p = push(Mode::Full, 1, 0, 1);
        let mut bad = record("k2", "t");
        bad.allowed_ips = vec!["nonsense".into()];
        p.upserts.push(bad);
        match run(&p, &SyncState::default()) {
            Err(SyncError::Invalid(m)) => {
                assert!(m.starts_with("upserts[1].allowed_ips[0]"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        let mut p = push(Mode::Full, 1, 0, 1);
        p.deletes = vec!["xyz".into()];
        assert!(
            matches!(run(&p, &SyncState::default()), Err(SyncError::Invalid(m)) if m.starts_with("deletes[0]"))
        );
    }

    #[test]
    fn a_rolled_key_gets_an_alias_under_its_old_hash_instead_of_a_delete() {
        let old = crate::hash::sha256(b"old-value");
        let mut p = push(Mode::Incremental, 1, 1, 2);
        p.upserts[0].previous_key_hash = Some(to_hex(&old));
        p.upserts[0].previous_key_expires_at = Some(100);
        p.deletes = vec![to_hex(&old)];
        let plan = run(&p, &held(1, 1)).unwrap();
        let new = crate::hash::sha256(b"k1");
        assert_eq!(plan.rolled, vec![(new, old)]);
        assert!(plan.deletes.is_empty());
        let (_, alias) = plan.upserts.iter().find(|(h, _)| *h == old).unwrap();
        assert_eq!(crate::entry::alias_target(alias, &old), Some(new));
        // An old hash that is another key's is refused.
        let mut p = push(Mode::Full, 1, 0, 1);
        let other = record("k2", "t");
        p.upserts[0].previous_key_hash = Some(other.key_hash.clone());
        p.upserts[0].previous_key_expires_at = Some(100);
        p.upserts.push(other);
        assert!(
            matches!(run(&p, &SyncState::default()), Err(SyncError::Invalid(m)) if m.contains("used twice"))
        );
    }

    #[test]
    fn forged_malformed_and_oversized_pushes_are_refused() {
        let body = serde_json::to_vec(&push(Mode::Full, 1, 0, 1)).unwrap();
        let forged = sign(b"wrong secret wrong secret wrong!!", &body);
        assert_eq!(
            plan(
                SECRET,
                &body,
                Some(forged.as_bytes()),
                &SyncState::default()
            ),
            Err(SyncError::BadSignature)
        );
        let junk = b"{not json";
        let sig = sign(SECRET, junk);
        assert!(matches!(
            plan(SECRET, junk, Some(sig.as_bytes()), &SyncState::default()),
            Err(SyncError::Invalid(_))
        ));
        let big = vec![b' '; MAX_PUSH_BYTES + 1];
        assert_eq!(
            plan(SECRET, &big, None, &SyncState::default()),
            Err(SyncError::TooLarge)
        );
    }

    #[test]
    fn session_revocations_are_validated_and_planned() {
        let mut p = push(Mode::Full, 1, 0, 1);
        let r = RevokedSession {
            key_id: "k".into(),
            session_id: "s1".into(),
            revoked_at_ms: 5,
        };
        p.revoked_sessions = vec![
            r.clone(),
            RevokedSession {
                session_id: String::new(),
                ..r.clone()
            },
        ];
        assert_eq!(
            run(&p, &SyncState::default())
                .unwrap()
                .revoked_sessions
                .len(),
            2
        );
        p.revoked_sessions = vec![RevokedSession {
            session_id: "bad id".into(),
            ..r
        }];
        assert!(
            matches!(run(&p, &SyncState::default()), Err(SyncError::Invalid(m)) if m.starts_with("revoked_sessions[0].session_id"))
        );
    }

    #[test]
    fn a_multi_batch_incremental_push_switches_at_its_last_batch() {
        let mut entries = Default::default();
        let p0 = run(&push(Mode::Full, 1, 0, 1), &SyncState::default()).unwrap();
        apply(&mut entries, &SyncState::default(), &p0);
        let s0 = p0.result();
        assert_eq!(served(&entries, &s0, "k1").as_deref(), Some("id-k1"));
        // Batch 0 adds k2, batch 1 deletes k1: neither shows until batch 1 commits.
        let mut b0 = push(Mode::Incremental, 1, 1, 2);
        b0.upserts = vec![record("k2", "t")];
        b0.last = false;
        let p1 = run(&b0, &s0).unwrap();
        apply(&mut entries, &s0, &p1);
        let s1 = p1.result();
        assert!(s1.pending.is_some() && s1.version == 1);
        assert_eq!(served(&entries, &s1, "k2"), None, "staged, not served");
        // Another push cannot start meanwhile; batches must come in order.
        assert!(run(&push(Mode::Incremental, 1, 1, 3), &s1).is_err());
        let mut b1 = push(Mode::Incremental, 1, 1, 2);
        b1.upserts = vec![];
        b1.deletes = vec![hex::encode(crate::hash::sha256(b"k1"))];
        b1.batch = 2;
        assert!(run(&b1, &s1).is_err());
        b1.batch = 1;
        let p2 = run(&b1, &s1).unwrap();
        apply(&mut entries, &s1, &p2);
        assert_eq!(
            served(&entries, &s1, "k1").as_deref(),
            Some("id-k1"),
            "until the commit"
        );
        let s2 = p2.result();
        assert!(committed(&s2, 1, 2), "{s2:?}");
        assert_eq!(served(&entries, &s2, "k1"), None, "deleted at the commit");
        assert_eq!(served(&entries, &s2, "k2").as_deref(), Some("id-k2"));
    }

    #[test]
    fn an_abandoned_push_is_never_served_and_a_full_set_drops_absent_entries() {
        let mut entries = Default::default();
        let mut first = push(Mode::Full, 1, 0, 1);
        first.upserts = vec![record("k1", "t"), record("k2", "t")];
        let p0 = run(&first, &SyncState::default()).unwrap();
        apply(&mut entries, &SyncState::default(), &p0);
        let s0 = p0.result();
        // A full push that never finishes: changes k1, adds k3.
        let mut half = push(Mode::Full, 2, 0, 5);
        half.upserts = vec![record("k1", "other"), record("k3", "t")];
        half.last = false;
        let p1 = run(&half, &s0).unwrap();
        apply(&mut entries, &s0, &p1);
        let s1 = p1.result();
        assert_eq!(served(&entries, &s1, "k3"), None);
        let slots = decode_slots(&entries[&crate::hash::sha256(b"k1")]).unwrap();
        assert_eq!(
            decode_record(visible(&slots, &s1).unwrap(), &crate::hash::sha256(b"k1"))
                .unwrap()
                .tenant,
            "t",
            "the committed value still answers"
        );
        // The next full push supersedes it with only k2: k1, k3 and the
        // abandoned slots are gone once it commits.
        let mut next = push(Mode::Full, 3, 0, 6);
        next.upserts = vec![record("k2", "t")];
        let p2 = run(&next, &s1).unwrap();
        assert!(p2.stamp > p1.stamp, "stamps are never reused");
        apply(&mut entries, &s1, &p2);
        let s2 = p2.result();
        assert!(committed(&s2, 3, 6));
        assert_eq!(served(&entries, &s2, "k1"), None);
        assert_eq!(served(&entries, &s2, "k3"), None);
        assert_eq!(served(&entries, &s2, "k2").as_deref(), Some("id-k2"));
        // An unchanged record kept its one slot instead of gaining a copy.
        let k2 = decode_slots(&entries[&crate::hash::sha256(b"k2")]).unwrap();
        assert_eq!(k2.len(), 1);
    }

    #[test]
    fn the_served_slot_carries_the_rate_limit_state_and_a_staged_update_keeps_it() {
        let mut entries = Default::default();
        let p0 = run(&push(Mode::Full, 1, 0, 1), &SyncState::default()).unwrap();
        apply(&mut entries, &SyncState::default(), &p0);
        let s0 = p0.result();
        let h = crate::hash::sha256(b"k1");
        // The gate counts a request in the served record.
        let counted =
            update_visible_record(&entries[&h], &s0, |r| crate::entry::with_tat(r, 42)).unwrap();
        entries.insert(h, counted);
        let tat = |e: &std::collections::HashMap<Digest, Vec<u8>>, s: &SyncState| {
            visible_record(&e[&h], s).and_then(crate::entry::tat)
        };
        assert_eq!(tat(&entries, &s0), Some(Some(42)));
        // A change of k1 is staged, then committed: its budget goes on.
        let mut change = push(Mode::Incremental, 1, 1, 2);
        change.upserts = vec![record("k1", "other")];
        let p1 = run(&change, &s0).unwrap();
        apply(&mut entries, &s0, &p1);
        assert_eq!(
            tat(&entries, &s0),
            Some(Some(42)),
            "served before the commit"
        );
        let s1 = p1.result();
        assert_eq!(tat(&entries, &s1), Some(Some(42)), "kept by the new value");
        assert_eq!(served(&entries, &s1, "k1").as_deref(), Some("id-k1"));
        // Two slots since the change; the next counted request leaves the
        // old value out (no reader takes it again) and changes nothing else.
        assert_eq!(decode_slots(&entries[&h]).unwrap().len(), 2);
        let counted =
            update_visible_record(&entries[&h], &s1, |r| crate::entry::with_tat(r, 43)).unwrap();
        let slots = decode_slots(&counted).unwrap();
        assert_eq!(slots.len(), 1);
        assert_eq!(slots[0].stamp, s1.stamp);
        entries.insert(h, counted);
        assert_eq!(tat(&entries, &s1), Some(Some(43)));
        assert_eq!(served(&entries, &s1, "k1").as_deref(), Some("id-k1"));
        // A push in progress keeps its staged slot through a counted request.
        let mut next = push(Mode::Incremental, 1, 2, 3);
        next.upserts = vec![record("k1", "third")];
        let p2 = run(&next, &s1).unwrap();
        apply(&mut entries, &s1, &p2);
        let counted =
            update_visible_record(&entries[&h], &s1, |r| crate::entry::with_tat(r, 44)).unwrap();
        assert_eq!(decode_slots(&counted).unwrap().len(), 2);
        entries.insert(h, counted);
        assert_eq!(tat(&entries, &s1), Some(Some(44)));
        assert!(visible_record(&entries[&h], &p2.result()).is_some());
    }

    #[test]
    fn an_entry_as_the_previous_layout_wrote_it_is_never_served() {
        // Layout 2: 20-byte slot headers (stamp, generation u64; length
        // u32) around a format-2 record. After a filter update the gate
        // reads it as nothing, until the full push the state endpoint asks
        // for (`reported_state`) rewrites it.
        let hash = crate::hash::sha256(b"k1");
        let mut record = vec![2u8];
        record.extend_from_slice(&[0; 8]);
        record.extend_from_slice(&hash[15..]);
        record.extend_from_slice(b"\x01\x00\x05id-k1\x01t\x00\x00\x00\x00\x00\x00");
        let mut old = Vec::new();
        for (stamp, generation) in [(1u64, 1u64), (2, 1)] {
            old.extend_from_slice(&stamp.to_le_bytes());
            old.extend_from_slice(&generation.to_le_bytes());
            old.extend_from_slice(&(record.len() as u32).to_le_bytes());
            old.extend_from_slice(&record);
        }
        for state in [held(1, 1), held(1, 7), SyncState::default()] {
            let served = visible_record(&old, &state);
            assert!(served.and_then(|r| decode_record(r, &hash)).is_none());
            assert!(served.and_then(crate::entry::counters).is_none());
        }
    }

    #[test]
    fn slots_round_trip_and_malformed_entries_are_absent() {
        let slots = vec![
            Slot {
                stamp: 1,
                generation: 2,
                record: Some(b"{}".to_vec()),
            },
            Slot {
                stamp: 3,
                generation: 2,
                record: None,
            },
        ];
        let bytes = encode_slots(&slots);
        let back = decode_slots(&bytes).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!((back[0].stamp, back[0].record), (1, Some(&b"{}"[..])));
        assert_eq!((back[1].stamp, back[1].record), (3, None));
        assert!(decode_slots(&bytes[..bytes.len() - 1]).is_none());
        assert!(decode_slots(b"short").is_none());
        // One committed slot, the usual entry: a two-byte header while
        // stamps and generations stay under 64 and 128.
        let one = |stamp, generation, record: Option<&[u8]>| {
            encode_slots(&[Slot {
                stamp,
                generation,
                record: record.map(<[u8]>::to_vec),
            }])
        };
        assert_eq!(one(63, 127, Some(b"rec")).len(), 2 + 3);
        assert_eq!(one(64, 128, Some(b"rec")).len(), 4 + 3);
        assert_eq!(one(5, 1, None).len(), 2, "a delete is its header");
        // Any stamp, generation and record length reads back, in either slot.
        for (stamp, generation, len) in [(1, 1, 1), (300, 70_000, 200), (1 << 40, u64::MAX, 3)] {
            let record = vec![0x5a; len];
            let slots = vec![
                Slot {
                    stamp,
                    generation,
                    record: Some(record.clone()),
                },
                Slot {
                    stamp: stamp + 1,
                    generation: generation / 2,
                    record: Some(record[..len / 2 + 1].to_vec()),
                },
            ];
            let bytes = encode_slots(&slots);
            let back: Vec<Slot<Vec<u8>>> = decode_slots(&bytes)
                .unwrap()
                .into_iter()
                .map(|s| Slot {
                    stamp: s.stamp,
                    generation: s.generation,
                    record: s.record.map(<[u8]>::to_vec),
                })
                .collect();
            assert_eq!(back, slots);
        }
        // A first slot claiming the whole rest leaves no room for the next.
        assert!(decode_slots(&[3, 1, 2, 0xaa, 0xbb]).is_none());
        // A delete committed at stamp 3 hides the record of stamp 1.
        let state = SyncState {
            generation: 2,
            stamp: 3,
            ..SyncState::default()
        };
        assert_eq!(visible(&back, &state), None);
        let before = SyncState { stamp: 2, ..state };
        assert!(visible(&back, &before).is_some());
        let newer_set = SyncState {
            generation: 3,
            ..before
        };
        assert_eq!(visible(&back, &newer_set), None);
    }

    #[test]
    fn state_and_entries_survive_corruption_as_empty() {
        assert_eq!(decode_state(Some(b"garbage")), SyncState::default());
        assert_eq!(decode_state(None), SyncState::default());
        let s = SyncState {
            generation: 3,
            version: 9,
            stamp: 5,
            pending: Some(Pending {
                mode: Mode::Incremental,
                generation: 4,
                next_batch: 1,
                stamp: 6,
                base_version: 9,
                version: 10,
            }),
            store_id: Some(StoreId(0xfeed)),
        };
        assert_eq!(decode_state(Some(&encode_state(&s))), s);
        let h = [7u8; 32];
        assert!(decode_record(b"", &h).is_none());
        assert!(decode_record(b"{}", &h).is_none());
    }

    #[test]
    fn a_full_push_from_another_store_is_refused_unless_it_takes_over() {
        let mine = Push {
            store_id: Some(StoreId(1)),
            ..push(Mode::Full, 1, 0, 7)
        };
        let state = run(&mine, &SyncState::default()).unwrap().result();
        assert_eq!(state.store_id, Some(StoreId(1)));
        let other = Push {
            store_id: Some(StoreId(2)),
            ..push(Mode::Full, 2, 0, 3)
        };
        let err = run(&other, &state).unwrap_err();
        assert!(
            matches!(&err, SyncError::Conflict(m) if m.contains("0000000000000001") && m.contains("--takeover")),
            "{err:?}"
        );
        // An anonymous push does not replace an identified set either.
        assert!(run(&push(Mode::Full, 2, 0, 3), &state).is_err());
        let taken = run(
            &Push {
                takeover: true,
                ..other.clone()
            },
            &state,
        )
        .unwrap()
        .result();
        assert_eq!((taken.generation, taken.store_id), (2, Some(StoreId(2))));
        // The same store may always replace its own set (e.g. after a sidecar restart).
        assert!(run(
            &Push {
                generation: 2,
                ..mine.clone()
            },
            &state
        )
        .is_ok());
        // An incremental push from another store does not apply either.
        let inc = Push {
            store_id: Some(StoreId(2)),
            ..push(Mode::Incremental, 1, 7, 8)
        };
        assert!(matches!(run(&inc, &state), Err(SyncError::Conflict(_))));
    }

    #[test]
    fn store_ids_are_sixteen_hex_digits_on_the_wire() {
        assert_eq!(
            serde_json::to_string(&StoreId(0xab)).unwrap(),
            "\"00000000000000ab\""
        );
        assert_eq!("00000000000000AB".parse::<StoreId>(), Ok(StoreId(0xab)));
        for bad in ["", "ab", "00000000000000zz", "+000000000000000"] {
            assert!(bad.parse::<StoreId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn listener_refusals_have_the_projects_error_shape() {
        let cases = [
            (
                ListenerError::Push(SyncError::BadSignature),
                401,
                "invalid_signature",
            ),
            (
                ListenerError::Push(SyncError::Invalid("x".into())),
                400,
                "invalid_request",
            ),
            (
                ListenerError::Push(SyncError::Conflict("x".into())),
                409,
                "conflict",
            ),
            (
                ListenerError::Push(SyncError::TooLarge),
                413,
                "payload_too_large",
            ),
            (
                ListenerError::Push(SyncError::Host("x".into())),
                500,
                "internal_error",
            ),
            (ListenerError::NotFound, 404, "not_found"),
            (ListenerError::NoBody, 400, "invalid_request"),
            (ListenerError::NotConfigured, 503, "unavailable"),
        ];
        for (e, status, code) in cases {
            assert_eq!(e.status(), status);
            let body: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
            assert_eq!(
                body,
                serde_json::json!({"error": code, "message": e.message()}),
                "{e:?}"
            );
        }
    }

    // ---- Plan and tenant limit entries ----

    fn limit(kind: LimitKind, name: &str, limits: &[&str]) -> LimitRecord {
        LimitRecord {
            kind,
            name: name.into(),
            limits: limits.iter().map(|l| l.parse().unwrap()).collect(),
            quota_used: vec![],
        }
    }

    /// Plans `p` on `held`, stages its limit records into `entries` as both
    /// builds do, and returns the state it leaves.
    fn push_limits(
        entries: &mut crate::testing::MemoryHost,
        held: &SyncState,
        p: &Push,
    ) -> SyncState {
        let plan = run(p, held).unwrap();
        for r in &plan.limit_records {
            let current = entries.counters.get(&r.key()).cloned();
            let staged = stage_limit(current.as_deref(), held, plan.stamp, plan.generation, r);
            entries.counters.insert(r.key(), staged);
        }
        plan.result()
    }

    /// The plan's limits the gate reads under `state`, as text.
    fn plan_read(entries: &mut crate::testing::MemoryHost, state: &SyncState) -> Option<String> {
        let mut cell = LimitCell::new(entries, *state);
        let (bytes, _) = crate::shared_data::CounterCell::load(&mut cell, "pl:free");
        crate::limits::decode_plan(bytes.as_deref()).map(|l| {
            l.iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
    }

    fn with_limits(p: Push, records: Vec<LimitRecord>, batch: u32, last: bool) -> Push {
        Push {
            limit_records: records,
            batch,
            last,
            ..p
        }
    }

    #[test]
    fn a_plan_change_is_served_only_from_its_pushs_commit() {
        let mut entries = crate::testing::MemoryHost::default();
        let free = |l: &str| vec![limit(LimitKind::Plan, "free", &[l])];
        let s1 = push_limits(
            &mut entries,
            &SyncState::default(),
            &with_limits(push(Mode::Full, 1, 0, 1), free("100/min"), 0, true),
        );
        assert_eq!(plan_read(&mut entries, &s1).as_deref(), Some("100/min"));
        // Batch 0 of 2 of an incremental push sets 1/min: staged, not served.
        let b0 = with_limits(push(Mode::Incremental, 1, 1, 2), free("1/min"), 0, false);
        let s2 = push_limits(&mut entries, &s1, &b0);
        assert!(s2.pending.is_some());
        assert_eq!(plan_read(&mut entries, &s2).as_deref(), Some("100/min"));
        // Its last batch commits it, carrying no limit record itself.
        let b1 = with_limits(push(Mode::Incremental, 1, 1, 2), vec![], 1, true);
        let s3 = push_limits(&mut entries, &s2, &b1);
        assert_eq!(s3.pending, None);
        assert_eq!(plan_read(&mut entries, &s3).as_deref(), Some("1/min"));
    }

    #[test]
    fn an_abandoned_push_changes_no_limit_and_its_successor_replaces_its_slot() {
        let mut entries = crate::testing::MemoryHost::default();
        let free = |l: &[&str]| vec![limit(LimitKind::Plan, "free", l)];
        let s1 = push_limits(
            &mut entries,
            &SyncState::default(),
            &with_limits(push(Mode::Full, 1, 0, 1), free(&["100/min"]), 0, true),
        );
        // A full push empties the plan in its batch 0 and never sends batch 1.
        let abandoned = with_limits(push(Mode::Full, 2, 0, 2), free(&[]), 0, false);
        let s2 = push_limits(&mut entries, &s1, &abandoned);
        assert_eq!(plan_read(&mut entries, &s2).as_deref(), Some("100/min"));
        // The next full push (a newer generation) takes over and commits.
        let next = with_limits(push(Mode::Full, 3, 0, 3), free(&["7/min"]), 0, true);
        let s3 = push_limits(&mut entries, &s2, &next);
        assert!(
            s3.stamp > s2.pending.unwrap().stamp,
            "stamps are not reused"
        );
        assert_eq!(plan_read(&mut entries, &s3).as_deref(), Some("7/min"));
        let slots = decode_slots(&entries.counters["pl:free"][1..])
            .unwrap()
            .len();
        assert_eq!(slots, 2, "the abandoned slot is gone: served and the new");
    }

    #[test]
    fn a_full_set_drops_the_plans_it_leaves_out_at_its_commit() {
        let mut entries = crate::testing::MemoryHost::default();
        let both = vec![
            limit(LimitKind::Plan, "free", &["100/min"]),
            limit(LimitKind::Tenant, "acme", &["10/min"]),
        ];
        let s1 = push_limits(
            &mut entries,
            &SyncState::default(),
            &with_limits(push(Mode::Full, 1, 0, 1), both, 0, true),
        );
        let b0 = with_limits(push(Mode::Full, 2, 0, 2), vec![], 0, false);
        let s2 = push_limits(&mut entries, &s1, &b0);
        assert_eq!(plan_read(&mut entries, &s2).as_deref(), Some("100/min"));
        let b1 = with_limits(
            push(Mode::Full, 2, 0, 2),
            vec![limit(LimitKind::Tenant, "acme", &["20/min"])],
            1,
            true,
        );
        let s3 = push_limits(&mut entries, &s2, &b1);
        let mut cell = LimitCell::new(&mut entries, s3);
        assert_eq!(
            crate::shared_data::CounterCell::load(&mut cell, "pl:free").0,
            None
        );
        assert!(
            cell.stale(),
            "an entry serving nothing asks for the state again"
        );
        let (tenant, _) = crate::shared_data::CounterCell::load(&mut cell, "tl:acme");
        let (limits, _) = crate::limits::decode_tenant(tenant.as_deref()).unwrap();
        assert_eq!(limits, vec!["20/min".parse().unwrap()]);
        // An incremental push re-creates the plan under the new generation.
        let again = with_limits(
            push(Mode::Incremental, 2, 2, 3),
            vec![limit(LimitKind::Plan, "free", &["5/min"])],
            0,
            true,
        );
        let s4 = push_limits(&mut entries, &s3, &again);
        assert_eq!(plan_read(&mut entries, &s4).as_deref(), Some("5/min"));
    }

    #[test]
    fn tenant_requests_counted_before_a_commit_stay_counted_after_it() {
        use crate::limits::acquire_tenant;
        const NOW: u64 = 1_700_000_000_000_000_000;
        let mut entries = crate::testing::MemoryHost::default();
        let acme = |l: &[&str]| vec![limit(LimitKind::Tenant, "acme", l)];
        let s1 = push_limits(
            &mut entries,
            &SyncState::default(),
            &with_limits(
                push(Mode::Full, 1, 0, 1),
                acme(&["5/min", "100/day"]),
                0,
                true,
            ),
        );
        let take = |entries: &mut crate::testing::MemoryHost, s: &SyncState| {
            acquire_tenant(&mut LimitCell::new(entries, *s), "acme", NOW)
                .unwrap()
                .unwrap()
        };
        assert!(take(&mut entries, &s1).allowed);
        // A push dropping the day limit is staged with the count so far; a
        // request meanwhile counts in both slots.
        let b0 = with_limits(push(Mode::Incremental, 1, 1, 2), acme(&["5/min"]), 0, false);
        let s2 = push_limits(&mut entries, &s1, &b0);
        let during = take(&mut entries, &s2);
        assert_eq!((during.limit.requests, during.remaining), (5, 3));
        let b1 = with_limits(push(Mode::Incremental, 1, 1, 2), vec![], 1, true);
        let s3 = push_limits(&mut entries, &s2, &b1);
        let after = take(&mut entries, &s3);
        assert_eq!(
            (after.limit.requests, after.remaining),
            (5, 2),
            "two counted before the commit, one after"
        );
        assert_eq!(after.policies.len(), 1, "the day limit went with the push");
        assert_eq!(
            decode_slots(&entries.counters["tl:acme"][1..])
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn a_limit_entry_as_layout_3_wrote_it_is_served_until_a_push_stages_over_it() {
        use crate::limits::{encode_plan, retarget_tenant, Limit};
        use crate::shared_data::CounterCell;
        let state = SyncState {
            generation: 1,
            version: 1,
            stamp: 1,
            ..SyncState::default()
        };
        let committed = SyncState { stamp: 2, ..state };
        let next_full = SyncState {
            generation: 2,
            stamp: 3,
            ..state
        };
        for count in (1..300u32).chain([1_000, 65_536, 1 << 24]) {
            for unit in ["s", "min", "hour", "day", "month"] {
                let l: Limit = format!("{count}/{unit}").parse().unwrap();
                for legacy in [encode_plan(&[l]), retarget_tenant(None, &[l])] {
                    assert_ne!(legacy.first(), Some(&LIMIT_SLOTS), "{count}/{unit}");
                    // Served as it is, and counted in place.
                    let mut host = crate::testing::MemoryHost::default();
                    host.counters.insert("tl:acme".into(), legacy.clone());
                    let mut cell = LimitCell::new(&mut host, state);
                    let (value, cas) = cell.load("tl:acme");
                    assert_eq!(value.as_deref(), Some(&legacy[..]), "{count}/{unit}");
                    assert!(!cell.stale());
                    assert!(cell.store("tl:acme", b"\x01counted", cas));
                    assert_eq!(host.counters["tl:acme"], b"\x01counted");
                    // A push stages beside it: still served until the commit.
                    let r = limit(LimitKind::Plan, "free", &["9/min"]);
                    let staged = stage_limit(Some(&legacy), &state, 2, 1, &r);
                    let slots = decode_slots(&staged[1..]).unwrap();
                    assert_eq!(slots.len(), 2, "{count}/{unit}");
                    assert_eq!(visible_record(&staged[1..], &state), Some(&legacy[..]));
                    let pushed = r.entry(Some(&legacy));
                    assert_eq!(visible_record(&staged[1..], &committed), Some(&pushed[..]));
                    // A later full set that left the plan out hides both.
                    assert_eq!(visible_record(&staged[1..], &next_full), None);
                }
            }
        }
    }

    #[test]
    fn a_reader_whose_state_predates_a_commit_and_restage_is_told_to_read_it_again() {
        let mut entries = crate::testing::MemoryHost::default();
        let free = |l: &str| vec![limit(LimitKind::Plan, "free", &[l])];
        let s1 = push_limits(
            &mut entries,
            &SyncState::default(),
            &with_limits(push(Mode::Full, 1, 0, 1), free("1/min"), 0, true),
        );
        let s2 = push_limits(
            &mut entries,
            &s1,
            &with_limits(push(Mode::Incremental, 1, 1, 2), free("2/min"), 0, true),
        );
        push_limits(
            &mut entries,
            &s2,
            &with_limits(push(Mode::Incremental, 1, 2, 3), free("3/min"), 0, false),
        );
        // Only the slots of s2 and of the push in progress are left.
        let mut cell = LimitCell::new(&mut entries, s1);
        assert_eq!(
            crate::shared_data::CounterCell::load(&mut cell, "pl:free").0,
            None
        );
        assert!(cell.stale());
        assert_eq!(plan_read(&mut entries, &s2).as_deref(), Some("2/min"));
    }
}
