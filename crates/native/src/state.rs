//! keygate's dynamic state in process-wide native memory: credentials pushed
//! by the sidecar and the counters (rate limits, issued tokens, session
//! revocations). The wasm build keeps the same things in Envoy shared data;
//! here every worker reads one table directly.
//!
//! - Credentials: an immutable sharded table behind an [`ArcSwap`] (see
//!   [`Table`]): each shard its entries ordered by bucket after a directory
//!   of where each bucket starts, all the shards a commit builds in one
//!   allocation (~100 B per credential at the bench's ~80-byte records).
//!   Workers read it without locks; a push's batches are staged aside, and
//!   its last batch builds the next table (rebuilding only the shards it
//!   touches, sharing the rest) and swaps it in with its new state in one
//!   store, so a push is applied atomically.
//! - The key-id index (tokens name their key by id) is a second such table,
//!   key id → the 15-byte hash prefix of its credential.
//! - Counters: one slot per key, created at first use, locked from the read
//!   to the write of one update ([`Counters`]): the core's compare-and-swap
//!   always lands on the first attempt, so workers never retry against each
//!   other.

use arc_swap::ArcSwap;
use keygate_core::entry::full_hash;
use keygate_core::hash::Digest;
use keygate_core::shared_data::{CounterCell, NAME_HASH_BYTES};
use keygate_core::sync::{decode_record, SyncState};
use keygate_core::Credential;
use parking_lot::{ArcMutexGuard, Mutex, RawMutex};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};

/// Shards per table: a push rebuilds only the shards it touches (at 1M
/// credentials ~250 each, ~25 KB).
const SHARDS: usize = 4096;

/// 64-bit FNV-1a: spreads key ids and hash prefixes over shards and
/// buckets. Not keyed: crafted key ids could crowd one shard, which slows
/// their lookups and nothing else.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn shard_of(h: u64) -> usize {
    (h >> 52) as usize % SHARDS
}

/// The hash a shard orders and buckets its entries by: mixed again so its
/// top bits are not the shard's bits, which every entry of a shard shares.
fn bucket_hash(h: u64) -> u64 {
    h.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Entries per bucket of the credential table's shards: a lookup reads the
/// bucket's start in the directory, then ~1–2 records of ~100 B.
const CREDENTIALS_PER_BUCKET: usize = 2;
/// Entries per bucket of the key-id table (entries of ~30 B).
const KEY_IDS_PER_BUCKET: usize = 4;

/// One entry of an arena: key length (1 byte), key, value length (LEB128
/// varint), value. Returns (key, value, next offset).
fn entry_at(data: &[u8], at: usize) -> Option<(&[u8], &[u8], usize)> {
    let klen = usize::from(*data.get(at)?);
    let key = data.get(at + 1..at + 1 + klen)?;
    let mut vat = at + 1 + klen;
    let mut vlen = 0usize;
    for shift in (0..32).step_by(7) {
        let b = *data.get(vat)?;
        vat += 1;
        vlen |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            let value = data.get(vat..vat.checked_add(vlen)?)?;
            return Some((key, value, vat + vlen));
        }
    }
    None
}

/// Keys are hash prefixes (15 bytes) or key ids (checked to 64 bytes).
fn stored_key(key: &[u8]) -> &[u8] {
    key.get(..255).unwrap_or(key)
}

/// Bytes [`put_entry`] writes.
fn entry_len(key: &[u8], value_len: usize) -> usize {
    let varint = (usize::BITS - (value_len | 1).leading_zeros()).div_ceil(7) as usize;
    1 + stored_key(key).len() + varint + value_len
}

/// Writes an entry whose value is `flag` (if any) followed by `value`.
fn put_entry(out: &mut Vec<u8>, key: &[u8], flag: Option<u8>, value: &[u8]) {
    let key = stored_key(key);
    out.push(key.len() as u8);
    out.extend_from_slice(key);
    let mut n = value.len() + usize::from(flag.is_some());
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    out.extend(flag);
    out.extend_from_slice(value);
}

fn u32_at(data: &[u8], at: usize) -> Option<usize> {
    let bytes = data.get(at..at + 4)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?) as usize)
}

/// One shard: a range of a chunk (the one allocation a commit writes all
/// the shards it builds into), made of the bucket count `B` (u32), a
/// directory of `B + 1` slots, and the entries, ordered by bucket. A slot
/// is where its bucket's entries start (u32, from the shard's start; the
/// last slot: the end) and a 32-bit filter of their hashes (two bits an
/// entry), so a key that is not there is mostly refused from the
/// directory alone. The directory costs 8 bytes per bucket, 2–4 per entry,
/// where a hash table of offsets cost ~10 (slots for twice the entries,
/// plus control bytes); and one chunk per commit wastes none of the ~18 B
/// per entry that rounding 4,096 separate ~25 KB blocks up to the
/// allocator's size classes did.
#[derive(Clone)]
struct Shard {
    chunk: Arc<Box<[u8]>>,
    start: usize,
    end: usize,
    len: u32,
}

/// A write to a shard being built: bucket hash, key, arrival, value (None:
/// removed).
type Write<'a> = (u64, &'a [u8], u32, Option<&'a [u8]>);

/// A directory slot's bytes.
const SLOT: usize = 8;

/// The bits `mixed` sets in its bucket's filter: from bits the bucket
/// (the top 32) and the shard do not use.
fn filter_bits(mixed: u64) -> u32 {
    (1 << ((mixed >> 16) & 31)) | (1 << ((mixed >> 21) & 31))
}

/// The bucket of `mixed` (a [`bucket_hash`]) among `buckets`: monotone in
/// `mixed`, so entries sorted by it are sorted by bucket for any count.
fn bucket_of(mixed: u64, buckets: usize) -> usize {
    (((mixed >> 32) * buckets as u64) >> 32) as usize
}

impl Shard {
    fn data(&self) -> &[u8] {
        self.chunk.get(self.start..self.end).unwrap_or_default()
    }

    fn get(&self, key: &[u8], h: u64) -> Option<&[u8]> {
        let data = self.data();
        let buckets = u32_at(data, 0)?;
        let mixed = bucket_hash(h);
        let slot = 4 + SLOT * bucket_of(mixed, buckets);
        let bits = filter_bits(mixed);
        if u32_at(data, slot + 4)? as u32 & bits != bits {
            return None;
        }
        let mut at = u32_at(data, slot)?;
        let end = u32_at(data, slot + SLOT)?;
        while at < end {
            let (k, v, next) = entry_at(data, at)?;
            if k == stored_key(key) {
                return Some(v);
            }
            at = next;
        }
        None
    }

    fn entries(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let data = self.data();
        let buckets = u32_at(data, 0).unwrap_or(0);
        let mut at = 4 + SLOT * (buckets + 1);
        std::iter::from_fn(move || {
            let (k, v, next) = entry_at(data, at)?;
            at = next;
            Some((k, v))
        })
    }

    /// A shard of exactly these entries in a chunk of its own.
    #[cfg(test)]
    fn build<'a>(
        entries: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
        per_bucket: usize,
    ) -> Shard {
        let mut out = Vec::new();
        let len = write_shard(entries, per_bucket, SHARD_LIMIT, &mut out)
            .expect("a test shard under 4 GiB");
        let end = out.len();
        Shard {
            chunk: Arc::new(out.into_boxed_slice()),
            start: 0,
            end,
            len,
        }
    }
}

/// Most bytes a shard (and a push's staging arena) may hold: offsets in
/// them are u32.
const SHARD_LIMIT: usize = u32::MAX as usize;

/// A commit that would not fit the tables' u32 offsets (a shard or a
/// push's staged writes over 4 GiB). Nothing is dropped silently: the push
/// is refused and the tables stay as they were.
#[derive(Debug, PartialEq, Eq)]
pub struct TooBig;

/// Appends to `out` a shard of exactly these entries (the last of equal
/// keys wins; None values are left out), `per_bucket` entries to a bucket;
/// returns how many it holds, or `TooBig` past `limit` bytes.
fn write_shard<'a>(
    entries: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    per_bucket: usize,
    limit: usize,
    out: &mut Vec<u8>,
) -> Result<u32, TooBig> {
    // Sorted by bucket hash, then key, then arrival: equal keys end up
    // side by side with the last write last.
    let mut all: Vec<Write> = entries
        .enumerate()
        .map(|(seq, (k, v))| {
            let k = stored_key(k);
            (bucket_hash(fnv(k)), k, seq as u32, v)
        })
        .collect();
    all.sort_unstable_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
    let mut live: Vec<(u64, &[u8], &[u8])> = Vec::with_capacity(all.len());
    for (i, &(mixed, k, _, v)) in all.iter().enumerate() {
        let last_of_key = all.get(i + 1).is_none_or(|next| next.1 != k);
        if let (true, Some(v)) = (last_of_key, v) {
            live.push((mixed, k, v));
        }
    }
    drop(all);
    let buckets = live.len().div_ceil(per_bucket).max(1);
    let start = out.len();
    let head = 4 + SLOT * (buckets + 1);
    out.extend_from_slice(&(buckets as u32).to_le_bytes());
    out.resize(start + head, 0);
    let mut len = 0u32;
    let mut next_bucket = 0;
    let slot = |bucket: usize| start + 4 + SLOT * bucket;
    let mark = |out: &mut Vec<u8>, bucket: usize| {
        let at = out.len() - start;
        if let Some(offset) = out.get_mut(slot(bucket)..slot(bucket) + 4) {
            offset.copy_from_slice(&(at as u32).to_le_bytes());
        }
    };
    if head > limit {
        return Err(TooBig);
    }
    for (mixed, k, v) in live {
        // Offsets are u32: a shard over 4 GiB (16 TiB a table) is refused
        // rather than cut short (a cut could lose a staged delete).
        if out.len() - start + entry_len(k, v.len()) > limit {
            return Err(TooBig);
        }
        let b = bucket_of(mixed, buckets);
        while next_bucket <= b {
            mark(out, next_bucket);
            next_bucket += 1;
        }
        if let Some(filter) = out.get_mut(slot(b) + 4..slot(b) + 8) {
            let bits = u32_at(filter, 0).unwrap_or(0) as u32 | filter_bits(mixed);
            filter.copy_from_slice(&bits.to_le_bytes());
        }
        put_entry(out, k, None, v);
        len += 1;
    }
    while next_bucket <= buckets {
        mark(out, next_bucket);
        next_bucket += 1;
    }
    Ok(len)
}

/// An immutable map of byte keys to byte values in [`SHARDS`] shards.
#[derive(Clone)]
pub struct Table {
    shards: Arc<[Shard]>,
}

impl Default for Table {
    fn default() -> Table {
        let empty = Shard {
            chunk: Arc::new(Box::default()),
            start: 0,
            end: 0,
            len: 0,
        };
        Table {
            shards: (0..SHARDS).map(|_| empty.clone()).collect(),
        }
    }
}

impl Table {
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        let h = fnv(stored_key(key));
        self.shards.get(shard_of(h))?.get(key, h)
    }

    /// The table with `changes` applied in order (None: remove). `replace`:
    /// the changes are the whole new content (a full push).
    fn apply(&self, changes: &Staging, replace: bool, per_bucket: usize) -> Result<Table, TooBig> {
        self.apply_within(changes, replace, per_bucket, SHARD_LIMIT)
    }

    /// [`Table::apply`] with shards and the staging arena held to `limit`
    /// bytes (tests use a small one).
    fn apply_within(
        &self,
        changes: &Staging,
        replace: bool,
        per_bucket: usize,
        limit: usize,
    ) -> Result<Table, TooBig> {
        // Nothing to change (a push that staged nothing for this table):
        // every chunk is as live as after the last commit.
        if changes.data.is_empty() && !replace {
            return Ok(self.clone());
        }
        // Staged entries are addressed by u32 offsets: an arena past the
        // limit is refused, not cut short.
        if changes.data.len() > limit {
            return Err(TooBig);
        }
        // The staged entries grouped by shard in one list (a counting sort:
        // no per-shard vectors growing on the way).
        let staged: Vec<(u16, u32)> = changes
            .offsets()
            .map(|at| {
                let (k, _, _) = entry_at(&changes.data, at).ok_or(TooBig)?;
                let at = u32::try_from(at).map_err(|_| TooBig)?;
                Ok((shard_of(fnv(k)) as u16, at))
            })
            .collect::<Result<_, TooBig>>()?;
        let mut starts = vec![0usize; SHARDS + 1];
        for &(shard, _) in &staged {
            if let Some(n) = starts.get_mut(usize::from(shard) + 1) {
                *n += 1;
            }
        }
        // Running sums: starts[i] becomes where shard i's entries begin.
        let mut total = 0;
        for n in starts.iter_mut() {
            total += *n;
            *n = total;
        }
        let staged_count = staged.len();
        let mut fill = starts.clone();
        let mut grouped = vec![0u32; staged.len()];
        for (shard, at) in staged {
            if let Some(slot) = fill.get_mut(usize::from(shard)) {
                if let Some(g) = grouped.get_mut(*slot) {
                    *g = at;
                }
                *slot += 1;
            }
        }
        // Shard i's staged entries (empty for a shard out of range).
        let range = |i: usize| match (starts.get(i), starts.get(i + 1)) {
            (Some(&a), Some(&b)) => a..b,
            _ => 0..0,
        };
        let rebuilt = |i: usize| replace || !range(i).is_empty();
        // Shards this commit replaces leave their bytes in the chunk they
        // were in. A chunk that would keep less than two thirds of its
        // bytes live gives its remaining shards to the new chunk (copied as
        // they are), so it is freed once no snapshot holds it and the
        // table never holds more than 1.5 times its shards' bytes; a chunk
        // is reclaimed every few incremental commits, not at each one.
        let mut live: HashMap<*const Box<[u8]>, (usize, usize)> = HashMap::new();
        for (i, old) in self.shards.iter().enumerate() {
            let held = live
                .entry(Arc::as_ptr(&old.chunk))
                .or_insert((old.chunk.len(), 0));
            if !rebuilt(i) {
                held.1 += old.end - old.start;
            }
        }
        let moved = |old: &Shard| {
            live.get(&Arc::as_ptr(&old.chunk))
                .is_some_and(|&(size, kept)| 3 * kept < 2 * size)
        };
        // Room for every shard rebuilt: the staged bytes (each entry there
        // is longer than its copy), the entries kept and each directory;
        // and for the shards moved. Pages a large chunk does not touch cost
        // nothing, and the chunk is cut to what was written.
        let room: usize = changes.data.len()
            + self
                .shards
                .iter()
                .enumerate()
                .filter(|&(i, old)| !rebuilt(i) && moved(old))
                .map(|(_, old)| old.end - old.start)
                .sum::<usize>()
            + (0..SHARDS)
                .filter(|&i| rebuilt(i))
                .filter_map(|i| self.shards.get(i))
                .map(|old| {
                    let kept = if replace { 0 } else { old.end - old.start };
                    kept + 4 + SLOT + SLOT * old.len as usize
                })
                .sum::<usize>()
            + SLOT * (staged_count + SHARDS);
        let mut chunk = Vec::with_capacity(room);
        let mut placed = Vec::with_capacity(SHARDS);
        for (i, old) in self.shards.iter().enumerate() {
            if !rebuilt(i) {
                placed.push(moved(old).then(|| {
                    let start = chunk.len();
                    chunk.extend_from_slice(old.data());
                    (start, chunk.len(), old.len)
                }));
                continue;
            }
            let changed = grouped.get(range(i)).unwrap_or_default();
            // A full push keeps nothing: the old entries are not even read.
            let kept = (!replace)
                .then(|| old.entries().map(|(k, v)| (k, Some(v))))
                .into_iter()
                .flatten();
            let new = changed.iter().filter_map(|&at| {
                let (k, v, _) = entry_at(&changes.data, at as usize)?;
                // A staged value starts with 1 (upsert) or 0 (delete).
                let (flag, v) = v.split_first()?;
                Some((k, (*flag == 1).then_some(v)))
            });
            let start = chunk.len();
            let len = write_shard(kept.chain(new), per_bucket, limit, &mut chunk)?;
            placed.push(Some((start, chunk.len(), len)));
        }
        let chunk = Arc::new(chunk.into_boxed_slice());
        let shards = self
            .shards
            .iter()
            .zip(placed)
            .map(|(old, placed)| match placed {
                Some((start, end, len)) => Shard {
                    chunk: chunk.clone(),
                    start,
                    end,
                    len,
                },
                None => old.clone(),
            })
            .collect();
        Ok(Table { shards })
    }

    /// Entries and bytes held (the chunks the shards are in), for the
    /// sync log.
    pub fn size(&self) -> (usize, usize) {
        let mut chunks: Vec<(*const Box<[u8]>, usize)> = self
            .shards
            .iter()
            .map(|s| (Arc::as_ptr(&s.chunk), s.chunk.len()))
            .collect();
        chunks.sort_unstable();
        chunks.dedup();
        (
            self.shards.iter().map(|s| s.len as usize).sum(),
            chunks.iter().map(|c| c.1).sum(),
        )
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len as usize).sum()
    }
}

/// The writes of the push in progress, in arrival order, in one arena
/// (entries as in a shard, values flagged upsert or delete).
#[derive(Default)]
pub struct Staging {
    data: Vec<u8>,
}

impl Staging {
    pub fn put(&mut self, key: &[u8], value: Option<&[u8]>) {
        put_entry(
            &mut self.data,
            key,
            Some(u8::from(value.is_some())),
            value.unwrap_or_default(),
        );
    }

    fn offsets(&self) -> impl Iterator<Item = usize> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let start = at;
            let (_, _, next) = entry_at(&self.data, at)?;
            at = next;
            Some(start)
        })
    }
}

/// What the sync role has applied: read by the gate as one snapshot.
#[derive(Clone, Default)]
pub struct Snapshot {
    /// The committed set: hash prefix → record. Every entry is current:
    /// a full push replaces the table and an incremental one writes under
    /// the generation held, so no generation is kept per entry (nor does
    /// the record carry one: `keygate_core::entry`).
    pub credentials: Table,
    /// Key id → hash prefix of its credential (may lead to a deleted one).
    pub key_ids: Table,
    pub state: SyncState,
}

/// The push in progress: what its batches staged, applied at its commit.
#[derive(Default)]
pub struct Staged {
    /// The stamp of the push these writes belong to.
    pub stamp: u64,
    pub credentials: Staging,
    pub key_ids: Staging,
}

impl Staged {
    /// Bytes the push staged so far.
    pub fn bytes(&self) -> usize {
        self.credentials.data.len() + self.key_ids.data.len()
    }

    pub fn upsert(&mut self, hash: &Digest, record: &[u8]) {
        self.credentials.put(
            hash.get(..NAME_HASH_BYTES).unwrap_or_default(),
            Some(record),
        );
    }

    pub fn delete(&mut self, hash: &Digest) {
        self.credentials
            .put(hash.get(..NAME_HASH_BYTES).unwrap_or_default(), None);
    }

    pub fn key_id(&mut self, key_id: &str, hash: &Digest) {
        self.key_ids.put(
            key_id.as_bytes(),
            Some(hash.get(..NAME_HASH_BYTES).unwrap_or_default()),
        );
    }

    /// The snapshot `current` becomes when this push commits with `state`;
    /// a full push's set replaces the committed one. `TooBig`: the push
    /// cannot be applied whole, so it is not applied at all.
    pub fn commit(
        &self,
        current: &Snapshot,
        state: SyncState,
        full: bool,
    ) -> Result<Snapshot, TooBig> {
        Ok(Snapshot {
            credentials: current.credentials.apply(
                &self.credentials,
                full,
                CREDENTIALS_PER_BUCKET,
            )?,
            key_ids: current
                .key_ids
                .apply(&self.key_ids, full, KEY_IDS_PER_BUCKET)?,
            state,
        })
    }
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

/// Counter slots by shared-data name. Hashed with foldhash (seeded per
/// process): SipHash cost ~20 ns of every rate-limited request here, and the
/// names are the table's own (`r:<key id>` of configured or pushed keys),
/// never inserted from a request.
type CounterMap = imbl::GenericHashMap<
    String,
    SlotRef,
    foldhash::fast::RandomState,
    imbl::shared_ptr::DefaultSharedPtr,
>;

pub struct Tables {
    snapshot: ArcSwap<Snapshot>,
    /// The push in progress (the sync role's, under the writer lock).
    staged: Mutex<Staged>,
    counters: ArcSwap<CounterMap>,
    /// Serialises writers (sync pushes); readers never take it.
    writer: Mutex<()>,
    /// Serialises new counter slots. Not `writer`: a push creates slots
    /// (plan and tenant entries) while it holds that one.
    new_slots: Mutex<()>,
    /// Snapshots replaced while a worker may still hold them (the sync
    /// role's, under the writer lock). Held here so a worker's guard is
    /// never the last reference: freeing a table (one `munmap` of up to
    /// ~100 MB, see allocator.rs) happens at a later update, on the sync
    /// side, never on a request.
    retired: Mutex<Vec<Arc<Snapshot>>>,
}

/// The process's tables, shared by every worker and both roles.
pub fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| Tables {
        snapshot: ArcSwap::from_pointee(Snapshot::default()),
        staged: Mutex::new(Staged::default()),
        counters: ArcSwap::from_pointee(CounterMap::default()),
        writer: Mutex::new(()),
        new_slots: Mutex::new(()),
        retired: Mutex::new(Vec::new()),
    })
}

impl Tables {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Runs `f` with the current snapshot and the staged writes under the
    /// writer lock and stores the snapshot it returns (None: unchanged), so
    /// concurrent pushes apply one after the other.
    pub fn update<T, E>(
        &self,
        f: impl FnOnce(&Snapshot, &mut Staged) -> Result<(Option<Snapshot>, T), E>,
    ) -> Result<T, E> {
        let _writer = self.writer.lock();
        let current = self.snapshot.load_full();
        let mut staged = self.staged.lock();
        let result = f(&current, &mut staged);
        let mut retired = self.retired.lock();
        // Snapshots no worker holds any more (only this list does) are
        // freed here, by the sync role. `store` pays off arc_swap's
        // borrowed references, so a worker's guard is counted in
        // `strong_count` from then on.
        retired.retain(|old| Arc::strong_count(old) > 1);
        let (next, out) = result?;
        if let Some(next) = next {
            self.snapshot.store(Arc::new(next));
            retired.push(current);
        }
        Ok(out)
    }

    /// The counter slot of `key`, locked (created first if new). One
    /// reference count for the guard, none for a lookup.
    fn lock_slot(&self, key: &str) -> ArcMutexGuard<RawMutex, Slot> {
        if let Some(slot) = self.counters.load().get(key) {
            return slot.lock_arc();
        }
        self.slot(key).lock_arc()
    }

    fn slot(&self, key: &str) -> SlotRef {
        if let Some(slot) = self.counters.load().get(key) {
            return slot.clone();
        }
        let _new_slots = self.new_slots.lock();
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
        let _new_slots = self.new_slots.lock();
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
        let guard = tables().lock_slot(key);
        let out = (guard.value.clone(), Some(guard.cas));
        self.held = Some(guard);
        out
    }

    fn store_slot(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        // Another key's slot is released before this one is locked: at
        // most one slot is held at a time.
        let mut guard = match self.held.take() {
            Some(guard) if &*guard.key == key => guard,
            other => {
                drop(other);
                tables().lock_slot(key)
            }
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

/// The sync state of the committed snapshot: which slots of plan and
/// tenant entries are served (`keygate_core::sync::LimitCell`). Read when
/// the entry is, so always the newest commit.
pub fn committed_state() -> SyncState {
    tables().snapshot.load().state
}

/// Most parsed credentials a worker keeps; past it the cache starts over.
const CACHE_CAPACITY: usize = 16_384;

/// A parsed credential and the record bytes it was parsed from.
type WorkerCache = HashMap<Digest, (Box<[u8]>, Rc<Credential>)>;

thread_local! {
    /// Per-worker parsed copies of pushed credentials (the core works with
    /// `Rc`), valid while the table holds the same record bytes.
    static CACHE: RefCell<WorkerCache> = RefCell::new(HashMap::new());
}

/// A pushed credential, if the last committed push still includes it.
pub fn lookup(hash: &Digest) -> Option<Rc<Credential>> {
    let snapshot = tables().snapshot.load();
    let record = snapshot.credentials.get(hash.get(..NAME_HASH_BYTES)?)?;
    // A rolled key's old value names the credential now (the core checks
    // the deadline); one hop only.
    if let Some(target) = keygate_core::entry::alias_target(record, hash) {
        let record = snapshot.credentials.get(target.get(..NAME_HASH_BYTES)?)?;
        return parsed(record, &target);
    }
    parsed(record, hash)
}

/// The credential `record` (stored under `hash`), parsed once per worker.
fn parsed(record: &[u8], hash: &Digest) -> Option<Rc<Credential>> {
    CACHE.with(|cache| {
        let mut cache = cache.try_borrow_mut().ok()?;
        if let Some((cached, cred)) = cache.get(hash) {
            if **cached == *record {
                return Some(cred.clone());
            }
        }
        // Validated when the push was applied; a failure here (or another
        // key sharing the prefix) fails closed.
        let cred = Rc::new(decode_record(record, hash)?);
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(*hash, (record.into(), cred.clone()));
        Some(cred)
    })
}

/// The pushed credential with `key_id` (tokens name their key by id),
/// through the id → hash-prefix index the sync role keeps; an index entry
/// that leads elsewhere is absent.
pub fn lookup_key_id(key_id: &str) -> Option<Rc<Credential>> {
    let hash = {
        let snapshot = tables().snapshot.load();
        let prefix = snapshot.key_ids.get(key_id.as_bytes())?;
        full_hash(prefix, snapshot.credentials.get(prefix)?)?
    };
    lookup(&hash).filter(|c| c.key_id == key_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::credential::CredentialRecord;
    use keygate_core::rate_limit::{acquire, RateLimit};
    use keygate_core::sync::{encode_entry, SyncState};

    const NOW: u64 = 1_700_000_000_000_000_000;

    fn record(key_id: &str, hash: Digest) -> Vec<u8> {
        let record = CredentialRecord {
            key_id: key_id.into(),
            key_hash: keygate_core::hash::to_hex(&hash),
            tenant: "t".into(),
            ..serde_json::from_str(r#"{"key_id":"x","key_hash":"","tenant":"t"}"#).unwrap()
        };
        encode_entry(&record)
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

    fn state(generation: u64) -> SyncState {
        SyncState {
            generation,
            version: generation,
            stamp: generation,
            pending: None,
            store_id: None,
        }
    }

    #[test]
    fn a_failed_update_changes_nothing_and_a_full_set_replaces_the_old_one() {
        let t = tables();
        let (old, new, kept) = ([7u8; 32], [8u8; 32], [9u8; 32]);
        t.update(|s, staged| {
            for (hash, id) in [(old, "gen-1"), (kept, "kept-1")] {
                staged.upsert(&hash, &record(id, hash));
                staged.key_id(id, &hash);
            }
            let next = staged.commit(s, state(1), true).unwrap();
            *staged = Staged::default();
            Ok::<_, ()>((Some(next), ()))
        })
        .unwrap();
        assert!(lookup(&old).is_some());
        assert_eq!(lookup_key_id("gen-1").unwrap().key_hash, old);
        let refused: Result<(), &str> = t.update(|_, _| Err("refused"));
        assert!(refused.is_err());
        assert!(
            lookup(&old).is_some(),
            "a refused update left the table as it was"
        );
        // An incremental push: a new key, another deleted.
        t.update(|s, staged| {
            staged.upsert(&new, &record("gen-2", new));
            staged.key_id("gen-2", &new);
            staged.delete(&kept);
            let next = staged.commit(s, state(1), false).unwrap();
            *staged = Staged::default();
            Ok::<_, ()>((Some(next), ()))
        })
        .unwrap();
        assert!(lookup(&old).is_some() && lookup(&new).is_some());
        assert!(lookup(&kept).is_none(), "deleted");
        assert!(lookup_key_id("kept-1").is_none());
        // A full set of `new` only: `old` is gone, `new` answers.
        t.update(|s, staged| {
            staged.upsert(&new, &record("gen-2", new));
            staged.key_id("gen-2", &new);
            let next = staged.commit(s, state(2), true).unwrap();
            *staged = Staged::default();
            Ok::<_, ()>((Some(next), ()))
        })
        .unwrap();
        assert!(lookup(&old).is_none(), "left out of the committed full set");
        assert!(lookup_key_id("gen-1").is_none());
        assert_eq!(
            lookup(&new).map(|c| c.key_id.clone()).as_deref(),
            Some("gen-2")
        );
        assert_eq!(t.snapshot().credentials.len(), 1);
    }

    #[test]
    fn a_shard_of_any_size_finds_each_of_its_keys_and_no_other() {
        for n in [0usize, 1, 2, 3, 7, 64, 1000] {
            for per_bucket in [1, 2, 4] {
                let keys: Vec<Vec<u8>> = (0..n).map(|i| format!("k{i}").into_bytes()).collect();
                let values: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; i % 300]).collect();
                let shard = Shard::build(
                    keys.iter()
                        .zip(&values)
                        .map(|(k, v)| (k.as_slice(), Some(v.as_slice()))),
                    per_bucket,
                );
                assert_eq!(shard.len as usize, n);
                for (k, v) in keys.iter().zip(&values) {
                    assert_eq!(shard.get(k, fnv(k)), Some(v.as_slice()), "n={n}");
                }
                for miss in [&b"k-1"[..], b"", b"other"] {
                    assert_eq!(shard.get(miss, fnv(miss)), None);
                }
                let mut listed: Vec<_> = shard.entries().map(|(k, _)| k.to_vec()).collect();
                listed.sort();
                let mut expected = keys.clone();
                expected.sort();
                assert_eq!(listed, expected);
            }
        }
    }

    #[test]
    fn a_shard_takes_exactly_its_size() {
        let keys: Vec<[u8; 15]> = (0..250u8).map(|i| [i; 15]).collect();
        let record = [7u8; 80];
        let shard = Shard::build(keys.iter().map(|k| (&k[..], Some(&record[..]))), 2);
        // Directory: the count and 126 slots; entries: length, key,
        // length, record.
        let expected = 4 + 8 * (125 + 1) + 250 * (1 + 15 + 1 + 80);
        assert_eq!(shard.data().len(), expected);
        assert_eq!(shard.chunk.len(), expected);
    }

    #[test]
    fn a_table_keeps_the_last_write_of_a_key_and_finds_every_key() {
        let mut changes = Staging::default();
        let keys: Vec<String> = (0..20_000).map(|i| format!("key-{i}")).collect();
        for k in &keys {
            changes.put(k.as_bytes(), Some(b"first"));
        }
        changes.put(b"key-5", Some(b"second"));
        changes.put(b"key-6", None);
        let table = Table::default().apply(&changes, true, 2).unwrap();
        assert_eq!(table.len(), 19_999);
        assert_eq!(table.get(b"key-5"), Some(&b"second"[..]));
        assert_eq!(table.get(b"key-6"), None);
        assert_eq!(table.get(b"key-19999"), Some(&b"first"[..]));
        assert_eq!(table.get(b"nope"), None);
        // An incremental change rebuilds one shard and shares the others.
        let mut one = Staging::default();
        one.put(b"key-6", Some(b"back"));
        let next = table.apply(&one, false, 2).unwrap();
        assert_eq!(next.len(), 20_000);
        assert_eq!(next.get(b"key-6"), Some(&b"back"[..]));
        let shared = table
            .shards
            .iter()
            .zip(next.shards.iter())
            .filter(|(a, b)| Arc::ptr_eq(&a.chunk, &b.chunk) && a.start == b.start)
            .count();
        assert_eq!(shared, SHARDS - 1);
        let same = next.apply(&Staging::default(), false, 2).unwrap();
        assert!(Arc::ptr_eq(&same.shards, &next.shards));
        assert_eq!(Table::default().apply(&one, true, 2).unwrap().len(), 1);
    }

    #[test]
    fn incremental_changes_keep_every_key_and_hold_at_most_half_again_the_live_shards() {
        let mut all = Staging::default();
        for i in 0..20_000 {
            all.put(format!("key-{i}").as_bytes(), Some(b"0"));
        }
        let mut table = Table::default().apply(&all, true, 2).unwrap();
        let (_, full) = table.size();
        for round in 1..=40u8 {
            let mut some = Staging::default();
            for i in (usize::from(round)..20_000).step_by(37) {
                some.put(format!("key-{i}").as_bytes(), Some(&[round]));
            }
            table = table.apply(&some, false, 2).unwrap();
            let live: usize = table.shards.iter().map(|s| s.end - s.start).sum();
            let (n, held) = table.size();
            assert_eq!(n, 20_000);
            assert!(
                2 * held <= 3 * live,
                "round {round}: {held} held for {live}"
            );
            assert!(2 * held <= 3 * full);
        }
        for i in 0..20_000usize {
            let last = (1..=40u8)
                .rev()
                .find(|r| i >= usize::from(*r) && (i - usize::from(*r)) % 37 == 0);
            let expected = last.map_or(b"0".to_vec(), |r| vec![r]);
            assert_eq!(
                table.get(format!("key-{i}").as_bytes()),
                Some(&expected[..]),
                "key-{i}"
            );
        }
    }

    fn fresh_tables() -> Tables {
        Tables {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            staged: Mutex::new(Staged::default()),
            counters: ArcSwap::from_pointee(CounterMap::default()),
            writer: Mutex::new(()),
            new_slots: Mutex::new(()),
            retired: Mutex::new(Vec::new()),
        }
    }

    fn commit_one(t: &Tables, hash: Digest, generation: u64) {
        t.update(|s, staged| {
            staged.upsert(&hash, &record("retire", hash));
            let next = staged.commit(s, state(generation), true)?;
            *staged = Staged::default();
            Ok::<_, TooBig>((Some(next), ()))
        })
        .unwrap();
    }

    #[test]
    fn a_replaced_snapshot_a_worker_still_reads_is_freed_by_the_sync_role_not_the_worker() {
        let t = fresh_tables();
        commit_one(&t, [1u8; 32], 1);
        // A worker mid-lookup holds the committed snapshot.
        let reader = t.snapshot.load();
        let first = Arc::downgrade(&*reader);
        commit_one(&t, [2u8; 32], 2);
        assert_eq!(t.retired.lock().len(), 1);
        assert_eq!(first.strong_count(), 2, "the retired list and the worker");
        drop(reader);
        assert!(
            first.upgrade().is_some(),
            "the worker's drop was not the last reference"
        );
        // The next update frees it (only the list held it) and retires the
        // snapshot it replaces: the list holds what readers may still use.
        commit_one(&t, [3u8; 32], 3);
        assert!(first.upgrade().is_none(), "freed by the sync role's update");
        assert_eq!(t.retired.lock().len(), 1);
        let refused: Result<(), ()> = t.update(|_, _| Err(()));
        assert!(refused.is_err());
        assert!(
            t.retired.lock().is_empty(),
            "drained once no reader holds it"
        );
    }

    #[test]
    fn a_commit_over_the_shard_limit_is_refused_and_changes_nothing() {
        let mut all = Staging::default();
        for i in 0..200 {
            all.put(format!("key-{i}").as_bytes(), Some(&[7u8; 40]));
        }
        let table = Table::default().apply(&all, true, 2).unwrap();
        // Every shard holds at most a few entries: ~50 bytes each plus its
        // directory, so 1 KiB fits any shard and 64 bytes fits none that
        // holds one.
        let mut change = Staging::default();
        change.put(b"key-1", None);
        change.put(b"key-new", Some(&[9u8; 40]));
        assert_eq!(
            table.apply_within(&change, false, 2, 64).err(),
            Some(TooBig)
        );
        assert_eq!(table.apply_within(&all, true, 2, 64).err(), Some(TooBig));
        // A staging arena past the limit is refused before any shard is built.
        assert!(change.data.len() > 20);
        assert_eq!(
            table.apply_within(&change, false, 2, 20).err(),
            Some(TooBig)
        );
        // Nothing changed, and the same change under a roomy limit applies
        // whole (the delete included).
        assert_eq!(table.len(), 200);
        assert!(table.get(b"key-1").is_some());
        let next = table.apply_within(&change, false, 2, 1024).unwrap();
        assert_eq!(next.len(), 200);
        assert_eq!(next.get(b"key-1"), None);
        assert_eq!(next.get(b"key-new"), Some(&[9u8; 40][..]));
    }
}
