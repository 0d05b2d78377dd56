//! The sync protocol between the sidecar and Envoy: wire format, signature,
//! and the pure planning step that validates a push against the state Envoy
//! holds before anything is written.
//!
//! Envoy holds, in shared data:
//! - `sync:state`: the [`SyncState`] (generation, version, pending full push);
//! - `c:<key hash prefix>`: one entry per credential, a binary record with
//!   its generation and rate-limit state ([`crate::entry`]), or empty once
//!   deleted.
//!
//! An incremental push applies on top of exactly the version Envoy holds
//! (`base_version`), so a stale or replayed push is refused. A full push
//! (after an Envoy restart, or whenever the sidecar cannot prove what Envoy
//! holds) writes the whole set under a new, higher generation in batches; the
//! last batch commits it. An entry is visible while its generation is not
//! older than the committed one, so credentials keep working during a full
//! push and those absent from the new set disappear at commit.

use crate::credential::{Credential, CredentialRecord};
use crate::entry;
use crate::error::ConfigError;
use crate::hash::{parse_hex_digest, Digest};
use crate::names::check_name;
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

pub const STATE_PATH: &str = "/keygate/sync/v1/state";
pub const PUSH_PATH: &str = "/keygate/sync/v1/push";
pub const SIGNATURE_HEADER: &str = "x-keygate-signature";
/// Largest push body Envoy accepts; below Envoy's default 1 MiB buffer limit.
pub const MAX_PUSH_BYTES: usize = 768 * 1024;
/// Most records (upserts + deletes) in one push.
pub const MAX_PUSH_ITEMS: usize = 2_000;
pub const MIN_SECRET_LEN: usize = 32;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    pub generation: u64,
    pub next_batch: u32,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
    /// The store the committed set came from (none: nothing pushed, or an
    /// anonymous push).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_id: Option<StoreId>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Incremental,
    Full,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Push {
    pub mode: Mode,
    pub generation: u64,
    /// Incremental: the version Envoy must hold. Full: ignored (0).
    #[serde(default)]
    pub base_version: u64,
    /// The store version Envoy holds once this push (or, full, its last batch) applies.
    pub version: u64,
    /// Full: 0-based batch index.
    #[serde(default)]
    pub batch: u32,
    /// Full: this batch commits the generation.
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

/// The writes a valid push turns into, in the order to apply them.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// Credential entries to write, rate-limit state unused: the sync role
    /// keeps the state an existing entry already holds.
    pub upserts: Vec<(Digest, Vec<u8>)>,
    /// The key-id index entries (`k:<key id>` → hash) of the upserts.
    pub key_ids: Vec<(String, Digest)>,
    pub deletes: Vec<Digest>,
    pub revoked_sessions: Vec<RevokedSession>,
    /// Written last: commits the push.
    pub state: SyncState,
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

/// The entry of a record at `generation` (as a push plans it), rate-limit
/// state unused; empty — read back as deleted — for an invalid record, which
/// a push refuses before it gets here.
pub fn encode_entry(generation: u64, record: &CredentialRecord) -> Vec<u8> {
    Credential::try_from(record)
        .map(|c| entry::encode(generation, &c))
        .unwrap_or_default()
}

/// The generation and credential of the entry stored under `hash`; None for
/// a deleted or corrupt one.
pub fn decode_entry(bytes: &[u8], hash: &Digest) -> Option<(u64, Credential)> {
    entry::decode(bytes, hash)
}

/// Entries older than the committed generation were left out of the last full set.
pub fn is_visible(entry_generation: u64, state: &SyncState) -> bool {
    entry_generation >= state.generation
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
    let push: Push = serde_json::from_slice(body).map_err(|e| SyncError::Invalid(e.to_string()))?;
    if push.upserts.len() + push.deletes.len() + push.revoked_sessions.len() > MAX_PUSH_ITEMS {
        return Err(SyncError::TooLarge);
    }
    let next = check_sequence(&push, state)?;
    let mut upserts = Vec::with_capacity(push.upserts.len());
    let mut key_ids = Vec::with_capacity(push.upserts.len());
    for (i, r) in push.upserts.iter().enumerate() {
        let c = Credential::try_from(r)
            .map_err(|e| SyncError::Invalid(e.under(&format!("upserts[{i}]")).to_string()))?;
        key_ids.push((c.key_id.clone(), c.key_hash));
        upserts.push((c.key_hash, entry::encode(push.generation, &c)));
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
    for (i, r) in push.revoked_sessions.iter().enumerate() {
        let field = |f: &str| format!("revoked_sessions[{i}].{f}");
        check_name(&field("key_id"), &r.key_id).map_err(|e| SyncError::Invalid(e.to_string()))?;
        // A login without session_id uses the default session "".
        if !r.session_id.is_empty() {
            check_name(&field("session_id"), &r.session_id)
                .map_err(|e| SyncError::Invalid(e.to_string()))?;
        }
    }
    Ok(Plan {
        upserts,
        key_ids,
        deletes,
        revoked_sessions: push.revoked_sessions.clone(),
        state: next,
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

/// A committed set from an identified store, and a push from another one.
pub fn is_foreign(push: &Push, state: &SyncState) -> bool {
    state.generation > 0 && state.store_id.is_some() && push.store_id != state.store_id
}

/// The state after `push`, if it applies on top of `state`.
fn check_sequence(push: &Push, state: &SyncState) -> Result<SyncState, SyncError> {
    match push.mode {
        Mode::Incremental => {
            if state.pending.is_some() {
                return Err(SyncError::Conflict("a full push is in progress".into()));
            }
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
            Ok(SyncState {
                version: push.version,
                ..*state
            })
        }
        Mode::Full => {
            let expected = match state.pending {
                Some(p) if p.generation == push.generation => p.next_batch,
                _ => 0,
            };
            if push.batch != expected {
                return Err(SyncError::Conflict(format!(
                    "expected batch {expected}, got {}",
                    push.batch
                )));
            }
            let floor = state
                .pending
                .map_or(state.generation, |p| p.generation.max(state.generation));
            if push.batch == 0 && push.generation <= floor {
                return Err(SyncError::Conflict(format!(
                    "generation {} is not newer than {floor}",
                    push.generation
                )));
            }
            if push.batch == 0 && !push.takeover && is_foreign(push, state) {
                return Err(SyncError::Conflict(format!(
                    "Envoy holds the credentials of store {}, this push is from store {}; \
                     refusing to replace them (keygate sync --takeover does)",
                    state.store_id.map_or("-".into(), |id| id.to_string()),
                    push.store_id.map_or("-".into(), |id| id.to_string()),
                )));
            }
            if push.last {
                Ok(SyncState {
                    generation: push.generation,
                    version: push.version,
                    pending: None,
                    store_id: push.store_id,
                })
            } else {
                let pending = Pending {
                    generation: push.generation,
                    next_batch: push.batch + 1,
                };
                Ok(SyncState {
                    pending: Some(pending),
                    ..*state
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::tests::record;

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
        }
    }

    fn run(p: &Push, state: &SyncState) -> Result<Plan, SyncError> {
        let body = serde_json::to_vec(p).unwrap();
        plan(SECRET, &body, Some(sign(SECRET, &body).as_bytes()), state)
    }

    fn held(generation: u64, version: u64) -> SyncState {
        SyncState {
            generation,
            version,
            pending: None,
            store_id: None,
        }
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
        assert_eq!(plan.state, held(1, 7));
        assert_eq!(plan.upserts.len(), 1);
        let (hash, entry) = &plan.upserts[0];
        assert_eq!(crate::entry::tat(entry), Some(None), "counter unused");
        let (generation, cred) = decode_entry(entry, hash).unwrap();
        assert_eq!((generation, cred.key_id.as_str()), (1, "id-k1"));
    }

    #[test]
    fn incremental_push_must_build_on_the_held_version() {
        assert_eq!(
            run(&push(Mode::Incremental, 1, 7, 8), &held(1, 7))
                .unwrap()
                .state,
            held(1, 8)
        );
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
        let s1 = run(&p, &held(1, 7)).unwrap().state;
        assert_eq!(
            s1,
            SyncState {
                generation: 1,
                version: 7,
                pending: Some(Pending {
                    generation: 2,
                    next_batch: 1
                }),
                store_id: None,
            }
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
        assert_eq!(run(&p, &s1).unwrap().state, held(2, 9));
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
            pending: Some(Pending {
                generation: 3,
                next_batch: 4,
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
    fn visibility_hides_entries_older_than_the_committed_generation() {
        assert!(is_visible(2, &held(2, 0)));
        assert!(is_visible(3, &held(2, 0)));
        assert!(!is_visible(1, &held(2, 0)));
    }

    #[test]
    fn state_and_entries_survive_corruption_as_empty() {
        assert_eq!(decode_state(Some(b"garbage")), SyncState::default());
        assert_eq!(decode_state(None), SyncState::default());
        let s = SyncState {
            generation: 3,
            version: 9,
            pending: Some(Pending {
                generation: 4,
                next_batch: 1,
            }),
            store_id: Some(StoreId(0xfeed)),
        };
        assert_eq!(decode_state(Some(&encode_state(&s))), s);
        let h = [7u8; 32];
        assert!(decode_entry(b"", &h).is_none());
        assert!(decode_entry(b"x\n{}", &h).is_none());
        assert!(decode_entry(b"1\n{}", &h).is_none());
    }

    #[test]
    fn a_full_push_from_another_store_is_refused_unless_it_takes_over() {
        let mine = Push {
            store_id: Some(StoreId(1)),
            ..push(Mode::Full, 1, 0, 7)
        };
        let state = run(&mine, &SyncState::default()).unwrap().state;
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
        .state;
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
}
