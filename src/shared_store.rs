//! Envoy shared data as keygate's dynamic state: credentials pushed by the
//! sidecar (one entry per key hash) and rate-limit counters. Shared data is
//! process-wide for a `vm_id`, so every worker sees the same entries.

use keygate_core::hash::{to_hex, Digest};
use keygate_core::rate_limit::CounterCell;
use keygate_core::Credential;
use proxy_wasm::hostcalls;
use std::collections::HashMap;
use std::rc::Rc;

/// Shared-data key of the credential whose key hashes to `hash`.
pub fn credential_key(hash: &Digest) -> String {
    format!("c:{}", to_hex(hash))
}

/// Most parsed records a worker keeps; past it the cache starts over, which
/// bounds worker memory however many credentials shared data holds.
const CACHE_CAPACITY: usize = 16_384;

/// Per-worker cache of parsed credentials, keyed by hash and validated by the
/// entry's CAS token: a changed entry has a new token and is parsed again, so
/// a revocation takes effect on the very next request.
#[derive(Default)]
pub struct CredentialCache {
    entries: HashMap<Digest, (u32, Rc<Credential>)>,
}

impl CredentialCache {
    pub fn lookup(&mut self, hash: &Digest) -> Option<Rc<Credential>> {
        let (bytes, cas) = hostcalls::get_shared_data(&credential_key(hash)).ok()?;
        let bytes = bytes.filter(|b| !b.is_empty())?;
        let cas = cas.unwrap_or(0);
        if let Some((cached_cas, cred)) = self.entries.get(hash) {
            if *cached_cas == cas {
                return Some(cred.clone());
            }
        }
        // A record that fails to parse or validate is treated as absent: the
        // sync role validates before writing, so this only guards corruption.
        let cred = Rc::new(Credential::from_json(&bytes).ok()?);
        if self.entries.len() >= CACHE_CAPACITY {
            self.entries.clear();
        }
        self.entries.insert(*hash, (cas, cred.clone()));
        Some(cred)
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
