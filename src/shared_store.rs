//! Envoy shared data as keygate's dynamic state: credentials pushed by the
//! sidecar (one entry per key hash, see `keygate_core::sync`) and rate-limit
//! counters. Key layouts: `keygate_core::shared_data`.

use crate::host::{self, HostError, HostResult, Written};
use keygate_core::config::{check_store_ids, merge_config_ids};
use keygate_core::hash::Digest;
use keygate_core::shared_data::{
    credential_key, key_id_key, update, CounterCell, Step, CONFIG_IDS_KEY, STATE_KEY,
};
use keygate_core::sync::{decode_record, decode_slots, decode_state, visible, Slot, SyncState};
use keygate_core::token::VerifiedTokens;
use keygate_core::{Credential, Policy};
use std::collections::HashMap;
use std::rc::Rc;

/// Most parsed records a worker keeps; past it the cache starts over, which
/// bounds worker memory however many credentials shared data holds.
const CACHE_CAPACITY: usize = 16_384;

/// Per-worker cache of parsed credentials, keyed by hash and validated by the
/// entry's CAS token: a changed entry has a new token and is parsed again, so
/// a revocation takes effect on the very next request. The sync state is
/// cached the same way. Also holds the VM's verified tokens, lent to each
/// decision: the policy itself stays immutable.
/// The parsed slots of one entry.
type Slots = Rc<[Slot<Rc<Credential>>]>;

#[derive(Default)]
pub struct CredentialCache {
    entries: HashMap<Digest, (u32, Slots)>,
    state: Option<(u32, SyncState)>,
    pub verified_tokens: VerifiedTokens,
}

impl CredentialCache {
    fn sync_state(&mut self) -> HostResult<SyncState> {
        let (bytes, Some(cas)) = host::shared_get(STATE_KEY)? else {
            return Ok(SyncState::default());
        };
        Ok(match self.state {
            Some((cached, state)) if cached == cas => state,
            _ => {
                let state = decode_state(bytes.as_deref());
                self.state = Some((cas, state));
                state
            }
        })
    }

    /// The live credential stored under `hash`; an error reading shared
    /// data is the caller's to refuse the request over.
    pub fn lookup(&mut self, hash: &Digest) -> HostResult<Option<Rc<Credential>>> {
        let (bytes, cas) = host::shared_get(&credential_key(hash))?;
        let Some(bytes) = bytes.filter(|b| !b.is_empty()) else {
            return Ok(None);
        };
        let cas = cas.unwrap_or(0);
        let state = self.sync_state()?;
        if let Some((cached_cas, slots)) = self.entries.get(hash) {
            if *cached_cas == cas {
                return Ok(visible(slots, &state).cloned());
            }
        }
        // A corrupt entry or record is treated as absent: the sync role
        // validates before writing, so this only guards against the unexpected.
        let Some(raw) = decode_slots(&bytes) else {
            return Ok(None);
        };
        let slots: Slots = raw
            .into_iter()
            .map(|s| Slot {
                stamp: s.stamp,
                generation: s.generation,
                record: s.record.and_then(|r| decode_record(r, hash)).map(Rc::new),
            })
            .collect();
        if self.entries.len() >= CACHE_CAPACITY {
            self.entries.clear();
        }
        self.entries.insert(*hash, (cas, slots.clone()));
        Ok(visible(&slots, &state).cloned())
    }
}

impl CredentialCache {
    /// The live store credential with `key_id`, through the key-id index
    /// the sync role writes; an index entry that leads elsewhere is absent.
    pub fn lookup_key_id(&mut self, key_id: &str) -> HostResult<Option<Rc<Credential>>> {
        let (bytes, _) = host::shared_get(&key_id_key(key_id))?;
        let Some(hash) = bytes.and_then(|b| Digest::try_from(b.as_slice()).ok()) else {
            return Ok(None);
        };
        Ok(self.lookup(&hash)?.filter(|c| c.key_id == key_id))
    }
}

/// Records the key ids plugin config defines (merged with those of other
/// gate configs sharing the VM), so the sync role refuses store keys that
/// reuse one; and refuses a config whose key id the store already holds for
/// another key. Both errors name the two places.
pub fn claim_config_key_ids(policy: &Policy, cache: &mut CredentialCache) -> Result<(), String> {
    let held = |key_id: &str| cache.lookup_key_id(key_id).map(|c| c.map(|c| c.key_hash));
    check_store_ids(policy, held)
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let mut cell = SharedCounters::default();
    let merged = update(&mut cell, CONFIG_IDS_KEY, |bytes| {
        Step::Write(merge_config_ids(bytes, policy), ())
    });
    match (cell.error, merged) {
        (Some(e), _) => Err(e.to_string()),
        (None, Err(_)) => Err("cannot record the config's key ids: contention".into()),
        (None, Ok(())) => Ok(()),
    }
}

/// Shared data as a counter cell, with Envoy's CAS semantics. The first host
/// error is kept and stops further writes: a counter that could not be read
/// must not be overwritten as if fresh, and the request gets a 500.
#[derive(Default)]
pub struct SharedCounters {
    pub error: Option<HostError>,
}

impl CounterCell for SharedCounters {
    fn load(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match host::shared_get(key) {
            Ok(entry) => entry,
            Err(e) => {
                self.error.get_or_insert(e);
                (None, None)
            }
        }
    }

    fn store(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        if self.error.is_some() {
            return false;
        }
        match host::shared_set(key, value, cas) {
            Ok(Written::Yes) => true,
            Ok(Written::CasMismatch) => false,
            Err(e) => {
                self.error.get_or_insert(e);
                false
            }
        }
    }
}

/// Makes sure a counter entry exists before traffic uses it. Envoy creates a
/// missing key unconditionally whatever the CAS token, so two workers racing
/// on a brand-new counter could both "win"; an entry that already exists is
/// always updated with a CAS check.
pub fn ensure_counter(key: &str) -> HostResult<()> {
    // An empty value may come back as no bytes; the CAS token tells presence.
    if let (_, None) = host::shared_get(key)? {
        host::shared_set(key, &[], None)?;
    }
    Ok(())
}
