//! The gate's rate-limit writes into credential entries while pushes stage
//! and commit, with several gate workers sharing Envoy's shared data (a
//! `MemoryHost`, with its compare-and-swap): each worker reads the state
//! and the entry at its lookup (`sync::EntryCell`), counts with the same
//! CAS loop the gate uses (`limits::acquire_rules`), and the sync role
//! stages and commits as `src/sync_context.rs` does.

use keygate_core::entry;
use keygate_core::hash::{sha256, Digest};
use keygate_core::limits::{acquire_rules, rules, Counters, Rule};
use keygate_core::shared_data::{counter_key, credential_key, CounterCell, STATE_KEY};
use keygate_core::sync::{
    decode_record, decode_slots, decode_state, encode_state, plan, sign, stage, visible_record,
    EntryCell, Mode, Push, SyncState,
};
use keygate_core::testing::MemoryHost;
use keygate_core::CredentialRecord;
use std::convert::Infallible;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
const NOW: u64 = 1_700_000_000_000_000_000;

fn record(key: &str, tenant: &str) -> CredentialRecord {
    CredentialRecord {
        limits: vec!["100/min".parse().unwrap(), "1000/day".parse().unwrap()],
        ..keygate_core::testing::record(key, tenant)
    }
}

fn key_rules() -> Vec<Rule> {
    rules(&record("k1", "t").limits, false)
}

fn state(shared: &mut MemoryHost) -> SyncState {
    decode_state(shared.load(STATE_KEY).0.as_deref())
}

/// One batch of a push, applied as the sync role does: claim, stage every
/// upsert (CAS on each entry), and commit when `commit` (else left
/// pending, to be committed by [`commit`]).
fn push_batch(shared: &mut MemoryHost, p: &Push) -> SyncState {
    let held = state(shared);
    let body = serde_json::to_vec(p).unwrap();
    let plan = plan(SECRET, &body, Some(sign(SECRET, &body).as_bytes()), &held).unwrap();
    shared.store(STATE_KEY, &encode_state(&plan.claim), None);
    for (hash, rec) in &plan.upserts {
        let name = credential_key(hash);
        let (old, cas) = shared.load(&name);
        let staged = stage(old.as_deref(), &held, &plan, hash, Some(rec));
        assert!(shared.store(&name, &staged, cas));
    }
    plan.commit.unwrap_or(plan.claim)
}

fn commit(shared: &mut MemoryHost, s: &SyncState) {
    shared.store(STATE_KEY, &encode_state(s), None);
}

fn full(generation: u64, version: u64, upserts: Vec<CredentialRecord>) -> Push {
    Push {
        mode: Mode::Full,
        generation,
        version,
        last: true,
        upserts,
        ..Push::default()
    }
}

fn incremental(generation: u64, base: u64, version: u64, last: bool) -> Push {
    Push {
        mode: Mode::Incremental,
        generation,
        base_version: base,
        version,
        last,
        upserts: vec![record("k1", "other")],
        ..Push::default()
    }
}

/// A gate worker's request, from its lookup on: the entry and the state
/// as it read them.
struct Request<'a> {
    shared: &'a mut MemoryHost,
    counter_key: String,
    cell: EntryCell,
}

impl<'a> Request<'a> {
    fn lookup(shared: &'a mut MemoryHost, hash: &Digest) -> Request<'a> {
        let name = credential_key(hash);
        let (bytes, cas) = shared.load(&name);
        let s = state(shared);
        let bytes = bytes.unwrap();
        let served = visible_record(&bytes, &s).expect("the key is served at its lookup");
        let cred = decode_record(served, hash).unwrap();
        Request {
            shared,
            counter_key: counter_key(&cred.key_id),
            cell: EntryCell::new(name, bytes, cas, s),
        }
    }

    fn count(&mut self) -> bool {
        let key = self.counter_key.clone();
        acquire_rules(self, &key, &key_rules(), NOW).allowed
    }
}

impl CounterCell for Request<'_> {
    fn load(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        assert_eq!(key, self.counter_key);
        let shared = &mut *self.shared;
        let read = self.cell.load::<Infallible>(&mut |k| Ok(shared.load(k)));
        read.unwrap_or_else(|e| match e {})
    }

    fn store(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        assert_eq!(key, self.counter_key);
        match self.cell.updated(value, cas) {
            Some((name, bytes, cas)) => self.shared.store(name, &bytes, Some(cas)),
            None => false,
        }
    }
}

/// The counters `n` admitted requests leave, counted in a plain cell.
fn after(n: usize) -> Counters {
    let mut cell = MemoryHost::default();
    cell.store("c", &[], None);
    for _ in 0..n {
        assert!(acquire_rules(&mut cell, "c", &key_rules(), NOW).allowed);
    }
    Counters::decode(cell.load("c").0.as_deref())
}

fn served_counters(shared: &mut MemoryHost, hash: &Digest) -> Option<Counters> {
    let s = state(shared);
    let (bytes, _) = shared.load(&credential_key(hash));
    visible_record(&bytes?, &s).and_then(entry::counters)
}

#[test]
fn a_request_that_read_the_state_before_a_commit_is_counted_after_it() {
    let mut shared = MemoryHost::default();
    let h = sha256(b"k1");
    let s1 = push_batch(&mut shared, &full(1, 1, vec![record("k1", "t")]));
    commit(&mut shared, &s1);
    // An update of k1 staged, not committed yet.
    let s2 = push_batch(&mut shared, &incremental(1, 1, 2, true));
    // Worker B looks the key up: it holds the state before the commit.
    let mut stale = Request::lookup(&mut shared, &h);
    let stale_state = stale.cell.clone();
    drop(stale);
    commit(&mut shared, &s2);
    // Worker A, after the commit, counts a request: its write leaves the
    // slot B serves out.
    assert!(Request::lookup(&mut shared, &h).count());
    assert_eq!(
        decode_slots(&shared.load(&credential_key(&h)).0.unwrap())
            .unwrap()
            .len(),
        1
    );
    // B's first write loses its CAS; it reads the entry again and must
    // count in the value served now instead of refusing a key under budget.
    stale = Request {
        counter_key: counter_key("id-k1"),
        cell: stale_state,
        shared: &mut shared,
    };
    assert!(stale.count(), "refused a key under its budget");
    assert_eq!(served_counters(&mut shared, &h), Some(after(2)));
}

#[test]
fn requests_counted_between_staging_and_commit_stay_counted() {
    let mut shared = MemoryHost::default();
    let h = sha256(b"k1");
    let s1 = push_batch(&mut shared, &full(1, 1, vec![record("k1", "t")]));
    commit(&mut shared, &s1);
    assert!(Request::lookup(&mut shared, &h).count());
    // A two-batch push: the first stages k1's update (with the one request
    // counted so far), the second commits.
    let _ = push_batch(&mut shared, &incremental(1, 1, 2, false));
    for _ in 0..4 {
        assert!(Request::lookup(&mut shared, &h).count());
    }
    let mut last = incremental(1, 1, 2, true);
    last.batch = 1;
    last.upserts = vec![];
    let s2 = push_batch(&mut shared, &last);
    commit(&mut shared, &s2);
    assert_eq!(state(&mut shared).stamp, s2.stamp);
    let served = served_counters(&mut shared, &h);
    assert_eq!(served, Some(after(5)), "the 4 requests in between are lost");
    // And the next request goes on from there.
    assert!(Request::lookup(&mut shared, &h).count());
    assert_eq!(served_counters(&mut shared, &h), Some(after(6)));
}

/// An entry as layout 2 wrote it (`shared_data::LAYOUT`): per slot a
/// 20-byte header (stamp, generation u64; record length u32, all LE) and a
/// format-2 record, here with its single window used.
fn layout_2_entry(hash: &Digest, slots: &[(u64, u64)]) -> Vec<u8> {
    let mut record = vec![2u8];
    record.extend_from_slice(&[0; 8]);
    record.extend_from_slice(&hash[15..]);
    record.extend_from_slice(b"\x01\x00\x05id-k1\x01t\x00\x00\x00\x00\x00");
    record.extend_from_slice(&(NOW + 5).to_le_bytes());
    record.push(0x80);
    let mut out = Vec::new();
    for (stamp, generation) in slots {
        out.extend_from_slice(&stamp.to_le_bytes());
        out.extend_from_slice(&generation.to_le_bytes());
        out.extend_from_slice(&(record.len() as u32).to_le_bytes());
        out.extend_from_slice(&record);
    }
    out
}

#[test]
fn a_full_push_over_entries_of_the_previous_layout_serves_them_with_fresh_counters() {
    let h = sha256(b"k1");
    let olds: [&[(u64, u64)]; 5] = [
        &[(1, 1)],
        &[(1, 1), (2, 1)],
        &[(3, 2), (4, 3)],
        &[(200, 7)],
        &[(300, 70_000), (1 << 40, u64::MAX)],
    ];
    for old in olds {
        let mut shared = MemoryHost::default();
        let &(stamp, generation) = old.last().unwrap();
        let held = SyncState {
            generation: generation.min(1 << 40),
            version: 9,
            stamp,
            ..SyncState::default()
        };
        commit(&mut shared, &held);
        shared.store(&credential_key(&h), &layout_2_entry(&h, old), None);
        // Never served as it is (the state endpoint asks for a full push).
        assert_eq!(served_counters(&mut shared, &h), None, "{old:?}");
        let s = push_batch(
            &mut shared,
            &full(
                held.generation + 1,
                1,
                vec![record("k1", "t"), record("k2", "t")],
            ),
        );
        assert_eq!(
            served_counters(&mut shared, &h),
            None,
            "before the commit {old:?}"
        );
        commit(&mut shared, &s);
        let (bytes, _) = shared.load(&credential_key(&h));
        let bytes = bytes.unwrap();
        assert_eq!(decode_slots(&bytes).map(|s| s.len()), Some(1), "{old:?}");
        let served = visible_record(&bytes, &s).unwrap();
        assert_eq!(
            decode_record(served, &h).map(|c| c.key_id),
            Some("id-k1".into())
        );
        assert_eq!(
            served_counters(&mut shared, &h),
            Some(Counters::default()),
            "{old:?}"
        );
        // The gate counts in it from there.
        assert!(Request::lookup(&mut shared, &h).count());
        assert_eq!(served_counters(&mut shared, &h), Some(after(1)), "{old:?}");
    }
}
