//! Envoy shared data as keygate lays it out, in one place: every key name,
//! the cell the host provides over it, and the one compare-and-swap loop that
//! updates an entry. Shared data is process-wide for a `vm_id`: every worker
//! and the sync listener see the same entries.
//!
//! | key                  | value                                             |
//! |----------------------|---------------------------------------------------|
//! | `sync:state`         | the sync state (generation, version, pending)     |
//! | `sync:layout`        | the [`LAYOUT`] the committed set was written in (decimal) |
//! | `c:<b64url hash[..15]>` | one credential pushed by sync and its rate-limit state: slots (`crate::sync::encode_slots`) of binary records (`crate::entry`) |
//! | `r:<key id>`         | rate-limit state of a credential from the plugin config (theoretical arrival time, LE) |
//! | `tok:<key id>`       | tokens issued per session (JSON)                  |
//! | `rs:<key id>`        | session revocations `{session: revoked_at_ms}`    |
//! | `kx:<4 hex>`         | one bucket of the key-id index of store credentials: per key id hashed into it, an 8-byte tag and the 15-byte hash prefix naming its `c:` entry, binary |
//! | `cfg:ids`            | key ids plugin config defines `{id: "credentials[i]"}` |
//! | `pl:<plan>`          | a plan's limits, binary (`crate::limits`), in slots staged by sync (`crate::sync::stage_limit`) |
//! | `tl:<tenant>`        | a tenant's limits and their counters, binary (`crate::limits`), in slots staged by sync |

use crate::hash::Digest;

/// The sync state entry.
pub const STATE_KEY: &str = "sync:state";

/// The entry naming the layout the committed set was written in.
pub const LAYOUT_KEY: &str = "sync:layout";

/// The layout of the entries below as this build reads and writes them.
/// Raise it with every change to it (an entry format, an index's shape):
/// shared data outlives a filter update in a running Envoy (same `vm_id`),
/// and a build that finds the set written in another layout asks the
/// sidecar for a full push (`sync::reported_state`, `sync::check_layout`)
/// instead of serving or patching entries it would misread.
///
/// 2: the key-id index in `kx:` buckets (1 had one `k:<key id>` per key);
/// credential entries in format 2 (own limits, tagged owner / rolled key /
/// metadata, counters trailer); plan and tenant-limit entries.
/// 3: credential entries in format 3 (no generation, varint numbers,
/// scopes as bits, binary networks, the window's state in the trailer) in
/// slots with varint headers (`crate::sync::encode_slots`).
/// 4: plan and tenant-limit entries in such slots too, after a first byte
/// `crate::sync::LIMIT_SLOTS`, staged by a push and served from its commit
/// (`crate::sync::stage_limit`).
pub const LAYOUT: u32 = 4;

/// Whether the `sync:layout` entry names this build's [`LAYOUT`].
pub fn is_current_layout(entry: Option<&[u8]>) -> bool {
    entry.and_then(|b| std::str::from_utf8(b).ok()?.parse::<u32>().ok()) == Some(LAYOUT)
}

/// The `sync:layout` value a full push commits.
pub fn layout_value() -> Vec<u8> {
    LAYOUT.to_string().into_bytes()
}

/// Most attempts of one compare-and-swap update before giving up.
pub const MAX_CAS_ATTEMPTS: u32 = 64;

/// Key-hash bytes in a credential entry's name: 15 bytes are 20 base64url
/// characters, and `c:` + 20 = 22 bytes still fit in a libc++ string without
/// a heap block (Envoy's map key). The other 17 bytes are inside the entry
/// and checked on every read (`crate::entry`).
pub const NAME_HASH_BYTES: usize = 15;

/// `c:<base64url of the first 15 bytes of the key hash>`.
pub fn credential_key(hash: &Digest) -> String {
    credential_key_of_prefix(name_prefix(hash))
}

/// The key-hash bytes a credential entry's name carries.
pub fn name_prefix(hash: &Digest) -> &[u8] {
    hash.get(..NAME_HASH_BYTES).unwrap_or_default()
}

/// `c:<base64url of prefix>`: the entry name from the prefix alone (what
/// the key-id index stores).
pub fn credential_key_of_prefix(prefix: &[u8]) -> String {
    use base64::Engine as _;
    let mut name = String::with_capacity(2 + 20);
    name.push_str("c:");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(prefix, &mut name);
    name
}

/// Shared-data key of a credential's rate-limit state. Short on purpose:
/// up to 15 bytes fit in the string itself, no allocation in Envoy.
pub fn counter_key(key_id: &str) -> String {
    // Built by hand: this runs on every rate-limited request, where
    // `format!`'s machinery cost more than the copy itself.
    let mut key = String::with_capacity(2 + key_id.len());
    key.push_str("r:");
    key.push_str(key_id);
    key
}

/// [`counter_key`] handed to `f` from a stack buffer: no allocation for a
/// key id up to 62 bytes (the usual one; a longer one gets a `String`).
/// Runs on every rate-limited request.
pub fn with_counter_key<R>(key_id: &str, f: impl FnOnce(&str) -> R) -> R {
    let mut buf = [0u8; 64];
    let len = 2 + key_id.len();
    if let Some(key) = buf.get_mut(..len) {
        let (prefix, id) = key.split_at_mut(2);
        prefix.copy_from_slice(b"r:");
        id.copy_from_slice(key_id.as_bytes());
        // ASCII prefix + a whole `str`: always UTF-8.
        if let Ok(key) = std::str::from_utf8(key) {
            return f(key);
        }
    }
    f(&counter_key(key_id))
}

/// Tokens issued for a key, by session.
pub fn sessions_key(key_id: &str) -> String {
    format!("tok:{key_id}")
}

/// Shared-data key of the session revocations of a key: JSON {session: revoked_at_ms}.
pub fn revocations_key(key_id: &str) -> String {
    // By hand, as `counter_key`: read on every token request.
    let mut key = String::with_capacity(3 + key_id.len());
    key.push_str("rs:");
    key.push_str(key_id);
    key
}

/// Buckets of the key-id index (tokens name their key by id). One entry
/// per key id cost a whole node of Envoy's shared-data tree (~95 B at 1M
/// keys) and, inserted in random order, most of a million-key load's time;
/// 65,536 buckets hold ~15 ids each at 1M keys (~25 B per id) and stay few
/// enough to keep the tree warm.
pub const KEY_ID_BUCKETS: u32 = 1 << 16;
/// Bytes of one index item: the key id's tag, then its entry's name prefix.
const KEY_ID_TAG: usize = 8;
const KEY_ID_ITEM: usize = KEY_ID_TAG + NAME_HASH_BYTES;

/// Where a key id sits in the index: its bucket's shared-data key and its
/// tag there. Both from SHA-256 of the id: finding another id with the same
/// tag in a given bucket (which would hide that id's tokens) takes ~2^64
/// tries. A tag can still lead to another key's entry; readers check the
/// key id of the credential they reach.
pub fn key_id_slot(key_id: &str) -> (String, [u8; KEY_ID_TAG]) {
    let h = crate::hash::sha256(key_id.as_bytes());
    let mut tag = [0u8; KEY_ID_TAG];
    tag.copy_from_slice(h.get(2..2 + KEY_ID_TAG).unwrap_or(&[0; KEY_ID_TAG]));
    (format!("kx:{:04x}", bucket_of(&h)), tag)
}

/// The number of a key id's bucket in the index (its shared-data key is
/// `kx:` and this number in four hex digits, so ordering by number orders
/// by key). For a sidecar ordering a million keys without building a
/// million key strings.
pub fn key_id_bucket(key_id: &str) -> u32 {
    bucket_of(&crate::hash::sha256(key_id.as_bytes()))
}

fn bucket_of(h: &[u8; 32]) -> u32 {
    u32::from_be_bytes([0, 0, h[0], h[1]]) % KEY_ID_BUCKETS
}

/// The name prefix a bucket's value holds for `tag`; None when absent (or
/// the value is malformed).
pub fn key_id_find<'a>(bucket: &'a [u8], tag: &[u8; KEY_ID_TAG]) -> Option<&'a [u8]> {
    bucket
        .chunks_exact(KEY_ID_ITEM)
        .find(|item| item.get(..KEY_ID_TAG) == Some(&tag[..]))
        .and_then(|item| item.get(KEY_ID_TAG..))
}

/// A bucket's value with each `(tag, hash)` set: an id already there is
/// pointed at its new entry, a new one appended. A malformed value starts
/// over (it could only hide tokens of the ids it held, which this rewrites).
pub fn key_id_merge(bucket: Option<&[u8]>, items: &[([u8; KEY_ID_TAG], &Digest)]) -> Vec<u8> {
    let mut out = match bucket {
        Some(b) if b.len() % KEY_ID_ITEM == 0 => b.to_vec(),
        _ => Vec::new(),
    };
    out.reserve(items.len() * KEY_ID_ITEM);
    for (tag, hash) in items {
        let at = out
            .chunks_exact(KEY_ID_ITEM)
            .position(|item| item.get(..KEY_ID_TAG) == Some(&tag[..]));
        let prefix = name_prefix(hash);
        match at.and_then(|i| out.get_mut(i * KEY_ID_ITEM + KEY_ID_TAG..(i + 1) * KEY_ID_ITEM)) {
            Some(slot) => slot.copy_from_slice(prefix),
            None => {
                out.extend_from_slice(tag);
                out.extend_from_slice(prefix);
            }
        }
    }
    out
}

/// Key ids the gate's plugin config defines, so that the sync role refuses
/// a store credential reusing one: JSON `{key_id: "credentials[i]"}`.
pub const CONFIG_IDS_KEY: &str = "cfg:ids";

/// A shared cell the host provides (Envoy shared data in the filter).
pub trait CounterCell {
    /// The stored bytes and their CAS token (None, None when absent).
    fn load(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Stores `value` if the CAS token still matches; false on a mismatch.
    fn store(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool;
}

/// What one attempt of [`update`] decided, from the bytes it read.
pub enum Step<T> {
    /// Nothing to write: the update is done with this result.
    Done(T),
    /// Write these bytes; the result stands if the write lands.
    Write(Vec<u8>, T),
}

/// Read, compute, write with the CAS token read, and retry on a conflict,
/// so two workers never both apply an update to the same old value. Gives
/// up after [`MAX_CAS_ATTEMPTS`] conflicts with the last attempt's result
/// (None if none was computed): callers decide how to fail closed.
pub fn update<T>(
    cell: &mut dyn CounterCell,
    key: &str,
    mut step: impl FnMut(Option<&[u8]>) -> Step<T>,
) -> Result<T, Option<T>> {
    let mut last = None;
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (bytes, cas) = cell.load(key);
        match step(bytes.as_deref()) {
            Step::Done(result) => return Ok(result),
            Step::Write(value, result) => {
                if cell.store(key, &value, cas) {
                    return Ok(result);
                }
                last = Some(result);
            }
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemoryHost;

    #[test]
    fn key_layouts_are_short_and_distinct() {
        let h = [7u8; 32];
        assert_eq!(credential_key(&h).len(), 22);
        let keys = [
            STATE_KEY.to_owned(),
            credential_key(&h),
            counter_key("k1"),
            sessions_key("k1"),
            revocations_key("k1"),
            key_id_slot("k1").0,
            CONFIG_IDS_KEY.to_owned(),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in keys.iter().skip(i + 1) {
                assert_ne!(a, b);
            }
        }
        assert!(counter_key("k1").len() <= 15);
        // Stored names: the sync side and older workers spell them the same.
        assert_eq!(counter_key("k-1"), "r:k-1");
        assert_eq!(revocations_key("k-1"), "rs:k-1");
        assert_eq!(
            credential_key_of_prefix(name_prefix(&h)),
            credential_key(&h)
        );
        assert_eq!(name_prefix(&h).len(), NAME_HASH_BYTES);
    }

    #[test]
    fn the_stack_built_counter_key_is_the_stored_name_at_every_length() {
        for id in [
            String::new(),
            "k-1".to_owned(),
            "é-ü".to_owned(),
            "x".repeat(61),
            "x".repeat(62),
            "x".repeat(63),
            "ü".repeat(40),
        ] {
            assert_eq!(
                with_counter_key(&id, str::to_owned),
                counter_key(&id),
                "{id}"
            );
        }
    }

    #[test]
    fn update_retries_conflicts_and_gives_up_with_the_last_result() {
        let mut cell = MemoryHost::default();
        cell.store("k", b"0", None);
        cell.interfere = 2;
        let mut attempts = 0;
        let r = update(&mut cell, "k", |_| {
            attempts += 1;
            Step::Write(b"1".to_vec(), attempts)
        });
        assert_eq!(r, Ok(3));
        assert_eq!(cell.load("k").0.as_deref(), Some(&b"1"[..]));
        cell.interfere = u32::MAX;
        let r = update(&mut cell, "k", |_| Step::Write(b"2".to_vec(), "tried"));
        assert_eq!(r, Err(Some("tried")));
        let r: Result<u8, _> = update(&mut cell, "k", |_| Step::Done(9));
        assert_eq!(r, Ok(9));
    }

    #[test]
    fn the_key_id_index_finds_each_id_and_repoints_a_recreated_one() {
        let (name, tag) = key_id_slot("acme-read");
        assert_eq!(name, format!("kx:{:04x}", key_id_bucket("acme-read")));
        assert!(name.starts_with("kx:") && name.len() == 7, "{name}");
        assert_eq!(key_id_slot("acme-read"), (name.clone(), tag));
        let (h1, h2, h3) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let (_, other) = key_id_slot("acme-write");
        let bucket = key_id_merge(None, &[(tag, &h1), (other, &h2)]);
        assert_eq!(key_id_find(&bucket, &tag), Some(name_prefix(&h1)));
        assert_eq!(key_id_find(&bucket, &other), Some(name_prefix(&h2)));
        // The id re-created under another hash: pointed at it, not duplicated.
        let bucket = key_id_merge(Some(&bucket), &[(tag, &h3)]);
        assert_eq!(key_id_find(&bucket, &tag), Some(name_prefix(&h3)));
        assert_eq!(key_id_find(&bucket, &other), Some(name_prefix(&h2)));
        assert_eq!(bucket.len(), 2 * (8 + NAME_HASH_BYTES));
        assert_eq!(key_id_find(&bucket, &[9; 8]), None);
        // A malformed bucket starts over.
        let bucket = key_id_merge(Some(b"junk"), &[(tag, &h1)]);
        assert_eq!(key_id_find(&bucket, &tag), Some(name_prefix(&h1)));
        assert_eq!(key_id_find(b"junk", &tag), None);
    }
}
