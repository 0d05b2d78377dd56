//! Envoy shared data as keygate's dynamic state: credentials pushed by the
//! sidecar (one entry per key hash, see `keygate_core::sync`) and rate-limit
//! counters. Shared data is process-wide for a `vm_id`, so every worker and
//! the sync listener see the same entries.

use keygate_core::hash::Digest;
use keygate_core::rate_limit::CounterCell;
use keygate_core::sync::{
    credential_key, decode_entry, decode_state, is_visible, SyncState, STATE_KEY,
};
use keygate_core::Credential;
use proxy_wasm::hostcalls;
use std::collections::HashMap;
use std::rc::Rc;

/// Most parsed records a worker keeps; past it the cache starts over, which
/// bounds worker memory however many credentials shared data holds.
const CACHE_CAPACITY: usize = 16_384;

/// Per-worker cache of parsed credentials, keyed by hash and validated by the
/// entry's CAS token: a changed entry has a new token and is parsed again, so
/// a revocation takes effect on the very next request. The sync state is
/// cached the same way.
#[derive(Default)]
pub struct CredentialCache {
    entries: HashMap<Digest, (u32, u64, Rc<Credential>)>,
    state: Option<(u32, SyncState)>,
}

impl CredentialCache {
    fn sync_state(&mut self) -> SyncState {
        let Ok((bytes, Some(cas))) = hostcalls::get_shared_data(STATE_KEY) else {
            return SyncState::default();
        };
        match self.state {
            Some((cached, state)) if cached == cas => state,
            _ => {
                let state = decode_state(bytes.as_deref());
                self.state = Some((cas, state));
                state
            }
        }
    }

    pub fn lookup(&mut self, hash: &Digest) -> Option<Rc<Credential>> {
        let (bytes, cas) = hostcalls::get_shared_data(&credential_key(hash)).ok()?;
        let bytes = bytes.filter(|b| !b.is_empty())?;
        let cas = cas.unwrap_or(0);
        let state = self.sync_state();
        if let Some((cached_cas, generation, cred)) = self.entries.get(hash) {
            if *cached_cas == cas {
                return is_visible(*generation, &state).then(|| cred.clone());
            }
        }
        // A corrupt entry is treated as absent: the sync role validates
        // before writing, so this only guards against the unexpected.
        let (generation, cred) = decode_entry(&bytes, hash)?;
        let cred = Rc::new(cred);
        if self.entries.len() >= CACHE_CAPACITY {
            self.entries.clear();
        }
        self.entries.insert(*hash, (cas, generation, cred.clone()));
        is_visible(generation, &state).then_some(cred)
    }
}

/// Rate-limit counters in shared data, with Envoy's CAS semantics.
pub struct SharedCounters;

impl CounterCell for SharedCounters {
    fn load(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn store(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        hostcalls::set_shared_data(key, Some(value), cas).is_ok()
    }
}

/// Makes sure a counter entry exists before traffic uses it. Envoy creates a
/// missing key unconditionally whatever the CAS token, so two workers racing
/// on a brand-new counter could both "win"; an entry that already exists is
/// always updated with a CAS check.
pub fn ensure_counter(key: &str) {
    // An empty value may come back as no bytes; the CAS token tells presence.
    if let Ok((_, None)) = hostcalls::get_shared_data(key) {
        let _ = hostcalls::set_shared_data(key, Some(&[]), None);
    }
}
