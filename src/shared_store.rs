//! Envoy shared data as keygate's dynamic state: credentials pushed by the
//! sidecar (one entry per key hash, holding its rate-limit state too, see
//! `keygate_core::entry`) and the rate-limit counters of credentials from the
//! plugin config. Key layouts: `keygate_core::shared_data`.

use crate::host::{self, HostError, HostResult, Written};
use keygate_core::config::{check_store_ids, merge_config_ids};
use keygate_core::entry;
use keygate_core::hash::Digest;
use keygate_core::shared_data::{
    counter_key, credential_key, credential_key_of_prefix, key_id_find, key_id_slot, update,
    CounterCell, Step, CONFIG_IDS_KEY, STATE_KEY,
};
use keygate_core::sync::{decode_record, decode_state, visible_record, EntryCell, SyncState};
use keygate_core::token::VerifiedTokens;
use keygate_core::{Credential, Policy};
use std::collections::HashMap;
use std::rc::Rc;

/// Most parsed records a worker keeps; past it the cache starts over, which
/// bounds worker memory however many credentials shared data holds.
const CACHE_CAPACITY: usize = 16_384;

/// Per-worker cache of parsed credentials, keyed by hash and validated by the
/// entry's record bytes (everything but its rate-limit state, which changes
/// on every request): a changed record is parsed again, so a revocation takes
/// effect on the very next request. The sync state is cached by its CAS
/// token. Also holds the VM's verified tokens, lent to each decision: the
/// policy itself stays immutable.
#[derive(Default)]
pub struct CredentialCache {
    entries: HashMap<Digest, (Vec<u8>, Rc<Credential>)>,
    /// Key id → the name prefix the key-id index gave last: a hint tried
    /// before the index (one bucket read and a hash less per token use).
    /// Only a credential that is served and has this id is taken from it,
    /// the same check the index's answer gets; a miss asks the index.
    key_ids: HashMap<String, Vec<u8>>,
    state: Option<(u32, SyncState)>,
    pub verified_tokens: VerifiedTokens,
}

impl CredentialCache {
    /// The sync state held now (one shared-data read; decoded again only
    /// when its CAS token changed).
    pub fn sync_state(&mut self) -> HostResult<SyncState> {
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

    /// The live credential stored under `hash`, with its entry as read (the
    /// rate-limit step starts from it); an error reading shared data is the
    /// caller's to refuse the request over.
    pub fn lookup(&mut self, hash: &Digest) -> HostResult<Option<(Rc<Credential>, EntryCounter)>> {
        let name = credential_key(hash);
        let (bytes, cas) = host::shared_get(&name)?;
        let Some(bytes) = bytes.filter(|b| !b.is_empty()) else {
            return Ok(None);
        };
        // A rolled key's old value: its entry names the credential now (one
        // more read, only for that value; the core checks the deadline).
        let state = self.sync_state()?;
        if let Some(target) =
            visible_record(&bytes, &state).and_then(|r| entry::alias_target(r, hash))
        {
            let name = credential_key(&target);
            let (bytes, cas) = host::shared_get(&name)?;
            let Some(bytes) = bytes.filter(|b| !b.is_empty()) else {
                return Ok(None);
            };
            return self.parsed(&target, name, bytes, cas);
        }
        self.parsed(hash, name, bytes, cas)
    }

    /// The live credential of the entry `name` read as `bytes` under `hash`.
    fn parsed(
        &mut self,
        hash: &Digest,
        name: String,
        bytes: Vec<u8>,
        cas: Option<u32>,
    ) -> HostResult<Option<(Rc<Credential>, EntryCounter)>> {
        let state = self.sync_state()?;
        // The value served now: the newest committed slot (see `sync`).
        let Some(served) = visible_record(&bytes, &state) else {
            return Ok(None);
        };
        let Some(record) = entry::record_bytes(served) else {
            return Ok(None);
        };
        let cached = self
            .entries
            .get(hash)
            .filter(|(kept, _)| kept.as_slice() == record);
        let cred = match cached {
            Some((_, cred)) => cred.clone(),
            None => {
                // A corrupt or foreign entry is treated as absent: the sync
                // role validates before writing, so this only guards against
                // the unexpected.
                let Some(cred) = decode_record(served, hash) else {
                    return Ok(None);
                };
                let cred = Rc::new(cred);
                if self.entries.len() >= CACHE_CAPACITY {
                    self.entries.clear();
                }
                self.entries.insert(*hash, (record.to_vec(), cred.clone()));
                cred
            }
        };
        let counter = EntryCounter {
            counter_key: counter_key(&cred.key_id),
            cell: EntryCell::new(name, bytes, cas, state),
        };
        Ok(Some((cred, counter)))
    }
}

/// The rate-limit state inside a credential entry, as a counter cell: the
/// decision asks for `r:<key id>` and gets the entry's state instead
/// (`keygate_core::sync::EntryCell`, over the host's shared data).
pub struct EntryCounter {
    counter_key: String,
    cell: EntryCell,
}

impl EntryCounter {
    /// The sync state its entry is served under.
    pub fn state(&self) -> SyncState {
        self.cell.state()
    }

    fn load(&mut self) -> HostResult<(Option<Vec<u8>>, Option<u32>)> {
        self.cell.load(&mut host::shared_get)
    }

    fn store(&mut self, value: &[u8], cas: Option<u32>) -> HostResult<bool> {
        let Some((name, updated, cas)) = self.cell.updated(value, cas) else {
            return Ok(false);
        };
        Ok(host::shared_set(name, &updated, Some(cas))? == Written::Yes)
    }
}

impl CredentialCache {
    /// The live store credential with `key_id`, through the key-id index
    /// (bucketed, `shared_data::key_id_slot`) the sync role writes; an index entry that leads elsewhere is absent.
    pub fn lookup_key_id(
        &mut self,
        key_id: &str,
    ) -> HostResult<Option<(Rc<Credential>, EntryCounter)>> {
        if let Some(prefix) = self.key_ids.get(key_id).cloned() {
            if let Some(found) = self.lookup_prefix(key_id, &prefix)? {
                return Ok(Some(found));
            }
        }
        let (bucket, tag) = key_id_slot(key_id);
        let (bucket, _) = host::shared_get(&bucket)?;
        let Some(prefix) = bucket
            .as_deref()
            .and_then(|b| key_id_find(b, &tag))
            .map(<[u8]>::to_vec)
        else {
            return Ok(None);
        };
        let found = self.lookup_prefix(key_id, &prefix)?;
        if found.is_some() {
            if self.key_ids.len() >= CACHE_CAPACITY {
                self.key_ids.clear();
            }
            self.key_ids.insert(key_id.to_owned(), prefix);
        }
        Ok(found)
    }

    /// The live credential with `key_id` in the entry named by `prefix`.
    fn lookup_prefix(
        &mut self,
        key_id: &str,
        prefix: &[u8],
    ) -> HostResult<Option<(Rc<Credential>, EntryCounter)>> {
        let name = credential_key_of_prefix(prefix);
        let (bytes, cas) = host::shared_get(&name)?;
        let state = self.sync_state()?;
        // The served record holds the rest of the hash; with the name's
        // bytes that is the hash the entry is then parsed and checked under,
        // as by key.
        let Some((bytes, hash)) = bytes.and_then(|b| {
            let hash = entry::full_hash(prefix, visible_record(&b, &state)?)?;
            Some((b, hash))
        }) else {
            return Ok(None);
        };
        Ok(self
            .parsed(&hash, name, bytes, cas)?
            .filter(|(c, _)| c.key_id == key_id))
    }
}

/// Records the key ids plugin config defines (merged with those of other
/// gate configs sharing the VM), so the sync role refuses store keys that
/// reuse one; and refuses a config whose key id the store already holds for
/// another key. Both errors name the two places.
pub fn claim_config_key_ids(policy: &Policy, cache: &mut CredentialCache) -> Result<(), String> {
    let held = |key_id: &str| {
        cache
            .lookup_key_id(key_id)
            .map(|c| c.map(|(c, _)| c.key_hash))
    };
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
/// must not be overwritten as if fresh, and the request gets a 500. The
/// counter of a credential found in shared data lives in its entry.
#[derive(Default)]
pub struct SharedCounters {
    pub error: Option<HostError>,
    pub entry: Option<EntryCounter>,
}

impl SharedCounters {
    fn entry_for(&mut self, key: &str) -> Option<&mut EntryCounter> {
        self.entry.as_mut().filter(|e| e.counter_key == key)
    }
}

impl CounterCell for SharedCounters {
    fn load(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        let read = match self.entry_for(key) {
            Some(entry) => entry.load(),
            None => host::shared_get(key),
        };
        match read {
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
        if let Some(entry) = self.entry_for(key) {
            return match entry.store(value, cas) {
                Ok(written) => written,
                Err(e) => {
                    self.error.get_or_insert(e);
                    false
                }
            };
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

/// Makes sure the counter of a credential from the plugin config exists
/// before traffic uses it. Envoy creates a missing key unconditionally
/// whatever the CAS token, so two workers racing on a brand-new counter could
/// both "win"; an entry that already exists is always updated with a CAS
/// check. (Credentials pushed by sync keep theirs in their own entry.)
pub fn ensure_counter(key: &str) -> HostResult<()> {
    // An empty value may come back as no bytes; the CAS token tells presence.
    if let (_, None) = host::shared_get(key)? {
        host::shared_set(key, &[], None)?;
    }
    Ok(())
}
