//! Envoy shared data as keygate lays it out, in one place: every key name,
//! the cell the host provides over it, and the one compare-and-swap loop that
//! updates an entry. Shared data is process-wide for a `vm_id`: every worker
//! and the sync listener see the same entries.
//!
//! | key                  | value                                             |
//! |----------------------|---------------------------------------------------|
//! | `sync:state`         | the sync state (generation, version, pending)     |
//! | `c:<b64url hash[..15]>` | one credential pushed by sync and its rate-limit state, binary (`crate::entry`) |
//! | `r:<key id>`         | rate-limit state of a credential from the plugin config (theoretical arrival time, LE) |
//! | `tok:<key id>`       | tokens issued per session (JSON)                  |
//! | `rs:<key id>`        | session revocations `{session: revoked_at_ms}`    |
//! | `k:<key id>`         | the 15-byte hash prefix naming the `c:` entry of the store credential with this id, binary |
//! | `cfg:ids`            | key ids plugin config defines `{id: "credentials[i]"}` |
//! | `pl:<plan>`          | a plan's limits, binary (`crate::limits`), written by sync |
//! | `tl:<tenant>`        | a tenant's limits and their counters, binary (`crate::limits`), written by sync |

use crate::hash::Digest;

/// The sync state entry.
pub const STATE_KEY: &str = "sync:state";

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
    format!("r:{key_id}")
}

/// Tokens issued for a key, by session.
pub fn sessions_key(key_id: &str) -> String {
    format!("tok:{key_id}")
}

/// Shared-data key of the session revocations of a key: JSON {session: revoked_at_ms}.
pub fn revocations_key(key_id: &str) -> String {
    format!("rs:{key_id}")
}

/// Shared-data key of the key-id index of store credentials: tokens name
/// their key by id. In Envoy shared data (the wasm filter's sync role) it
/// holds the [`NAME_HASH_BYTES`]-byte hash prefix that
/// names the credential's entry: 15 bytes fit in Envoy's string without a
/// heap block (a 32-byte hash did not), and the rest of the hash is in the
/// entry, so the prefix is all a lookup needs.
pub fn key_id_key(key_id: &str) -> String {
    format!("k:{key_id}")
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
            key_id_key("k1"),
            CONFIG_IDS_KEY.to_owned(),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in keys.iter().skip(i + 1) {
                assert_ne!(a, b);
            }
        }
        assert!(counter_key("k1").len() <= 15);
        assert_eq!(
            credential_key_of_prefix(name_prefix(&h)),
            credential_key(&h)
        );
        assert_eq!(name_prefix(&h).len(), NAME_HASH_BYTES);
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
}
