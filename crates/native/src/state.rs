//! keygate's dynamic state in process-wide native memory: credentials pushed
//! by the sidecar and the counters (rate limits, issued tokens, session
//! revocations). The wasm build keeps the same things in Envoy shared data;
//! here every worker reads one table directly.
//!
//! - Credentials: an immutable persistent map behind an [`ArcSwap`]. Workers
//!   read it without locks; a sync push builds the next map (sharing all
//!   untouched entries) and swaps it in with its new state in one store, so a
//!   push is applied atomically.
//! - Counters: one slot per key, created at first use, locked from the read
//!   to the write of one update ([`Counters`]): the core's compare-and-swap
//!   always lands on the first attempt, so workers never retry against each
//!   other.

use arc_swap::ArcSwap;
use keygate_core::hash::Digest;
use keygate_core::shared_data::{key_id_key, CounterCell};
use keygate_core::sync::{decode_record, is_visible, SyncState};
use keygate_core::Credential;
use parking_lot::{ArcMutexGuard, Mutex, RawMutex};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};

/// One pushed credential, kept as the push carried it (the record, see
/// `keygate_core::sync::encode_entry`, and its generation): a few hundred bytes
/// instead of a parsed record's many allocations. Each worker parses it once
/// into its cache.
pub struct Entry {
    pub generation: u64,
    pub bytes: Box<[u8]>,
}

/// What the sync role has applied: read by the gate as one snapshot.
#[derive(Clone, Default)]
pub struct Snapshot {
    /// The committed set: the only one the gate reads.
    pub credentials: imbl::HashMap<Digest, Arc<Entry>>,
    /// Writes of the push in progress (None: a delete), applied to
    /// `credentials` when its last batch commits.
    pub staged: imbl::HashMap<Digest, Option<Arc<Entry>>>,
    pub state: SyncState,
}

/// A counter's bytes and its compare-and-swap token.
#[derive(Default)]
struct Slot {
    /// The slot's own key, so a held guard knows what it locks without a
    /// per-decision copy of the key.
    key: Box<str>,
    value: Option<Vec<u8>>,
    cas: u32,
}

fn new_slot(key: &str) -> SlotRef {
    Arc::new(Mutex::new(Slot {
        key: key.into(),
        ..Slot::default()
    }))
}

type SlotRef = Arc<Mutex<Slot>>;

pub struct Tables {
    snapshot: ArcSwap<Snapshot>,
    counters: ArcSwap<imbl::HashMap<String, SlotRef>>,
    /// Serialises writers (sync pushes, new counter slots); readers never take it.
    writer: Mutex<()>,
}

/// The process's tables, shared by every worker and both roles.
pub fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| Tables {
        snapshot: ArcSwap::from_pointee(Snapshot::default()),
        counters: ArcSwap::from_pointee(imbl::HashMap::new()),
        writer: Mutex::new(()),
    })
}

impl Tables {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Runs `f` with the current snapshot under the writer lock and stores
    /// what it returns, so concurrent pushes apply one after the other.
    pub fn update<T, E>(
        &self,
        f: impl FnOnce(&Snapshot) -> Result<(Snapshot, T), E>,
    ) -> Result<T, E> {
        let _writer = self.writer.lock();
        let current = self.snapshot.load_full();
        let (next, out) = f(&current)?;
        self.snapshot.store(Arc::new(next));
        Ok(out)
    }

    fn slot(&self, key: &str) -> SlotRef {
        if let Some(slot) = self.counters.load().get(key) {
            return slot.clone();
        }
        let _writer = self.writer.lock();
        let current = self.counters.load_full();
        if let Some(slot) = current.get(key) {
            return slot.clone();
        }
        let slot = new_slot(key);
        let mut next = (*current).clone();
        next.insert(key.to_owned(), slot.clone());
        self.counters.store(Arc::new(next));
        slot
    }

    /// Creates counter slots ahead of traffic (credentials from config or a push).
    pub fn ensure_counters<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        let _writer = self.writer.lock();
        let mut next = (*self.counters.load_full()).clone();
        for key in keys {
            if !next.contains_key(key) {
                next.insert(key.to_owned(), new_slot(key));
            }
        }
        self.counters.store(Arc::new(next));
    }

    /// A counter's bytes, without creating its slot (so a lookup by a name
    /// that comes from a request never grows the table).
    pub fn read(&self, key: &str) -> Option<Vec<u8>> {
        let counters = self.counters.load();
        let slot = counters.get(key)?;
        let value = slot.lock().value.clone();
        value
    }

    /// Read-modify-write of one counter outside a decision (sync role).
    pub fn modify(&self, key: &str, f: impl FnOnce(Option<&[u8]>) -> Vec<u8>) {
        let slot = self.slot(key);
        let mut slot = slot.lock();
        let value = f(slot.value.as_deref());
        slot.value = Some(value);
        slot.cas = slot.cas.wrapping_add(1);
    }
}

/// The counter view of one decision. `load` locks the key's slot and keeps
/// it locked until the matching `store` (or the next `load`, or the end of
/// the decision), so the core's compare-and-swap never meets a concurrent
/// writer. At most one slot is held at a time: no lock-order deadlocks.
#[derive(Default)]
pub struct Counters {
    held: Option<ArcMutexGuard<RawMutex, Slot>>,
}

impl CounterCell for Counters {
    fn load(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        crate::profile::within(crate::profile::Step::RateCounter, || self.load_slot(key))
    }

    fn store(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        crate::profile::within(crate::profile::Step::RateCounter, || {
            self.store_slot(key, value, cas)
        })
    }
}

impl Counters {
    fn load_slot(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        self.held = None;
        let guard = tables().slot(key).lock_arc();
        let out = (guard.value.clone(), Some(guard.cas));
        self.held = Some(guard);
        out
    }

    fn store_slot(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        let mut guard = match self.held.take() {
            Some(guard) if &*guard.key == key => guard,
            _ => tables().slot(key).lock_arc(),
        };
        if cas.is_some_and(|c| c != guard.cas) {
            return false;
        }
        // The slot's buffer is reused: a counter keeps its size.
        match &mut guard.value {
            Some(held) => {
                held.clear();
                held.extend_from_slice(value);
            }
            None => guard.value = Some(value.to_vec()),
        }
        guard.cas = guard.cas.wrapping_add(1);
        true
    }
}

/// Most parsed credentials a worker keeps; past it the cache starts over.
const CACHE_CAPACITY: usize = 16_384;

type WorkerCache = HashMap<Digest, (Arc<Entry>, Rc<Credential>)>;

thread_local! {
    /// Per-worker `Rc` copies of pushed credentials (the core works with
    /// `Rc`), valid while the table still holds the same entry.
    static CACHE: RefCell<WorkerCache> = RefCell::new(HashMap::new());
}

/// A pushed credential, if the last committed push still includes it.
pub fn lookup(hash: &Digest) -> Option<Rc<Credential>> {
    let snapshot = tables().snapshot.load();
    let entry = snapshot.credentials.get(hash)?;
    if !is_visible(entry.generation, &snapshot.state) {
        return None;
    }
    // A rolled key's old value names the credential now (the core checks
    // the deadline); one hop only.
    if let Some(target) = keygate_core::entry::alias_target(&entry.bytes, hash) {
        return lookup_entry(&snapshot, &target);
    }
    lookup_entry(&snapshot, hash)
}

fn lookup_entry(snapshot: &Snapshot, hash: &Digest) -> Option<Rc<Credential>> {
    let entry = snapshot.credentials.get(hash)?;
    if !is_visible(entry.generation, &snapshot.state) {
        return None;
    }
    CACHE.with(|cache| {
        let mut cache = cache.try_borrow_mut().ok()?;
        if let Some((cached, cred)) = cache.get(hash) {
            if Arc::ptr_eq(cached, entry) {
                return Some(cred.clone());
            }
        }
        // Validated when the push was applied; a failure here fails closed.
        let cred = decode_record(&entry.bytes, hash)?;
        let cred = Rc::new(cred);
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(*hash, (entry.clone(), cred.clone()));
        Some(cred)
    })
}

/// The pushed credential with `key_id` (tokens name their key by id),
/// through the id → hash index the sync role keeps; an index entry that
/// leads elsewhere is absent.
pub fn lookup_key_id(key_id: &str) -> Option<Rc<Credential>> {
    let bytes = tables().read(&key_id_key(key_id))?;
    let hash = Digest::try_from(bytes.as_slice()).ok()?;
    lookup(&hash).filter(|c| c.key_id == key_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::credential::CredentialRecord;
    use keygate_core::rate_limit::{acquire, RateLimit};
    use keygate_core::sync::{encode_entry, SyncState};

    const NOW: u64 = 1_700_000_000_000_000_000;

    fn entry(key_id: &str, hash: Digest, generation: u64) -> Arc<Entry> {
        let record = CredentialRecord {
            key_id: key_id.into(),
            key_hash: keygate_core::hash::to_hex(&hash),
            tenant: "t".into(),
            ..serde_json::from_str(r#"{"key_id":"x","key_hash":"","tenant":"t"}"#).unwrap()
        };
        Arc::new(Entry {
            generation,
            bytes: encode_entry(generation, &record).into_boxed_slice(),
        })
    }

    #[test]
    fn workers_racing_on_one_key_never_over_admit() {
        let limit = RateLimit {
            requests: 50,
            window_secs: 60,
        };
        let admitted: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        (0..100)
                            .filter(|_| {
                                let mut cell = Counters::default();
                                acquire(&mut cell, "r:race-test", limit, NOW).allowed
                            })
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(admitted, 50);
    }

    #[test]
    fn a_store_with_a_stale_cas_token_is_refused() {
        let mut cell = Counters::default();
        let (_, cas) = cell.load("s:stale-test");
        assert!(cell.store("s:stale-test", b"a", cas));
        assert!(!cell.store("s:stale-test", b"b", cas));
        assert_eq!(cell.load("s:stale-test").0.as_deref(), Some(&b"a"[..]));
    }

    #[test]
    fn a_failed_update_changes_nothing_and_old_generations_are_hidden() {
        let t = tables();
        let old = [7u8; 32];
        let new = [8u8; 32];
        t.update(|s| {
            let mut next = s.clone();
            for (hash, generation) in [(old, 1), (new, 2)] {
                next.credentials
                    .insert(hash, entry(&format!("gen-{generation}"), hash, generation));
            }
            next.state = SyncState {
                generation: 1,
                version: 1,
                stamp: 1,
                pending: None,
                store_id: None,
            };
            Ok::<_, ()>((next, ()))
        })
        .unwrap();
        assert!(lookup(&old).is_some());
        let refused: Result<(), &str> = t.update(|_| Err("refused"));
        assert!(refused.is_err());
        assert!(
            lookup(&old).is_some(),
            "a refused update left the table as it was"
        );
        t.update(|s| {
            let mut next = s.clone();
            next.state.generation = 2;
            Ok::<_, ()>((next, ()))
        })
        .unwrap();
        assert!(lookup(&old).is_none(), "left out of the committed full set");
        assert_eq!(
            lookup(&new).map(|c| c.key_id.clone()).as_deref(),
            Some("gen-2")
        );
    }
}
