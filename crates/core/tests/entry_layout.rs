//! Property tests of the credential entry layout (`keygate_core::entry`)
//! and the slots around it (`keygate_core::sync::encode_slots`): every
//! valid credential, with any counters, reads back as written, in the slot
//! the gate serves; any edit of an entry reads back as a valid credential
//! or as nothing, never a panic.
//!
//! 2,000 cases per property by default; `PROPTEST_CASES=100000 cargo test
//! -p keygate-core --test entry_layout` runs a longer search.

use keygate_core::credential::{Kind, Status};
use keygate_core::entry::{
    counters, decode, encode, full_hash, record_bytes, tat, with_counters, with_tat,
};
use keygate_core::hash::{sha256, to_hex};
use keygate_core::limits::{Counters, Credits};
use keygate_core::rate_limit::RateLimit;
use keygate_core::shared_data::name_prefix;
use keygate_core::sync::{decode_slots, encode_slots, visible_record, Slot, SyncState};
use keygate_core::{Credential, CredentialRecord};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

fn config() -> ProptestConfig {
    let mut c = ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/entry_layout.txt",
        ))),
        ..ProptestConfig::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 2_000;
    }
    c
}

fn name(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[A-Za-z0-9._:-]{{1,{max}}}")).unwrap()
}

fn digest() -> impl Strategy<Value = String> {
    any::<[u8; 32]>().prop_map(|b| to_hex(&b))
}

fn scopes() -> impl Strategy<Value = Vec<String>> {
    let scope = prop_oneof![
        3 => proptest::sample::select(vec!["read", "write", "admin"]).prop_map(String::from),
        1 => proptest::string::string_regex("[a-z][a-z0-9:._-]{0,63}").unwrap(),
    ];
    proptest::collection::vec(scope, 0..6)
}

fn network() -> impl Strategy<Value = String> {
    prop_oneof![
        (any::<[u8; 4]>(), 0..=32u8).prop_map(|(a, len)| {
            ipnet::Ipv4Net::new(a.into(), len)
                .unwrap()
                .trunc()
                .to_string()
        }),
        (any::<[u8; 16]>(), 0..=128u8).prop_map(|(a, len)| {
            ipnet::Ipv6Net::new(a.into(), len)
                .unwrap()
                .trunc()
                .to_string()
        }),
        any::<[u8; 4]>().prop_map(|a| std::net::Ipv4Addr::from(a).to_string()),
    ]
}

fn limits() -> impl Strategy<Value = Vec<keygate_core::limits::Limit>> {
    proptest::sample::select(vec![
        vec![],
        vec!["10/s"],
        vec!["100/min", "10000/day"],
        vec!["5/s", "100/min", "1000/hour", "10000/day", "100000/month"],
    ])
    .prop_map(|l| l.iter().map(|s| s.parse().unwrap()).collect())
}

fn metadata() -> impl Strategy<Value = std::collections::BTreeMap<String, String>> {
    let value = proptest::string::string_regex("[!-~]([ -~]{0,254}[!-~])?").unwrap();
    proptest::collection::btree_map(name(64), value, 0..4)
}

prop_compose! {
    fn record()(
        key_id in name(128),
        key_hash in digest(),
        secret in proptest::option::of(digest()),
        previous_secret in proptest::option::of((digest(), any::<u64>())),
        default in any::<bool>(),
        tenant in name(128),
        environment in prop_oneof![3 => Just("live".to_owned()), 1 => name(16)],
        scopes in scopes(),
        allowed_ips in proptest::collection::vec(network(), 0..4),
        rate_limit in proptest::option::of((1..=u32::MAX, 1..=86_400u32)),
        inactive in any::<bool>(),
        expires_at in proptest::option::of(any::<u64>()),
        owner in proptest::option::of(proptest::string::string_regex("[A-Za-z0-9@+._:-]{1,128}").unwrap()),
        previous_key in proptest::option::of((digest(), any::<u64>())),
        metadata in metadata(),
        limits in limits(),
        plan in proptest::option::of(name(32)),
        tenant_limits in any::<bool>(),
        credits in proptest::option::of((0..=u64::from(u32::MAX), any::<u32>(), any::<bool>(), any::<u64>())),
    ) -> CredentialRecord {
        let secret = secret.or_else(|| previous_secret.as_ref().map(|_| to_hex(&sha256(b"s"))));
        CredentialRecord {
            key_id,
            previous_key_hash: previous_key.as_ref().map(|(h, _)| h.clone()).filter(|h| *h != key_hash),
            previous_key_expires_at: previous_key.as_ref().filter(|(h, _)| *h != key_hash).map(|(_, t)| *t),
            key_hash,
            secret_hash: secret,
            previous_secret_hash: previous_secret.as_ref().map(|(h, _)| h.clone()),
            previous_secret_expires_at: previous_secret.map(|(_, t)| t),
            kind: if default { Kind::Default } else { Kind::Scoped },
            tenant,
            environment,
            scopes,
            allowed_ips,
            rate_limit: rate_limit.map(|(requests, window_secs)| RateLimit { requests, window_secs }),
            status: if inactive { Status::Inactive } else { Status::Active },
            expires_at,
            owner,
            metadata,
            limits,
            plan,
            tenant_limits,
            quota_used: vec![],
            credits: credits.map(|(balance, serial, monthly, granted_at)| Credits {
                balance,
                serial,
                monthly,
                granted_at,
            }),
        }
    }
}

fn counter_set() -> impl Strategy<Value = Counters> {
    (
        proptest::option::of(any::<u64>()),
        proptest::collection::btree_map(1..=0x7fu8, any::<u64>(), 0..6),
    )
        .prop_map(|(window, others)| {
            Counters(window.map(|w| (0, w)).into_iter().chain(others).collect())
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_credential_reads_back_as_written_with_any_counters(
        r in record(),
        used in counter_set(),
        stamp in 1..u64::MAX >> 1,
        generation in 1..u64::MAX,
    ) {
        let c = Credential::try_from(&r).expect("the strategy builds valid records");
        let hash = c.key_hash;
        let fresh = encode(&c);
        prop_assert_eq!(decode(&fresh, &hash), Some(c.clone()));
        prop_assert_eq!(tat(&fresh), Some(None));
        prop_assert_eq!(full_hash(name_prefix(&hash), &fresh), Some(hash));
        let entry = with_counters(&fresh, &used).unwrap();
        prop_assert_eq!(counters(&entry), Some(used.clone()));
        prop_assert_eq!(tat(&entry), Some(used.get(0)));
        prop_assert_eq!(record_bytes(&entry), record_bytes(&fresh));
        prop_assert_eq!(decode(&entry, &hash), Some(c.clone()));
        let bumped = with_tat(&entry, 7).unwrap();
        prop_assert_eq!(decode(&bumped, &hash), Some(c.clone()));
        prop_assert_eq!(tat(&bumped), Some(Some(7)));
        // In its slot, beside a staged delete not committed yet: served.
        let slots = encode_slots(&[
            Slot { stamp, generation, record: Some(entry.clone()) },
            Slot { stamp: stamp + 1, generation, record: None },
        ]);
        let state = SyncState { generation, version: 1, stamp, ..SyncState::default() };
        prop_assert_eq!(visible_record(&slots, &state), Some(&entry[..]));
        prop_assert_eq!(decode_slots(&slots).map(|s| s.len()), Some(2));
        // Another key under the same name never reads it.
        let mut other = hash;
        other[20] ^= 1;
        prop_assert_eq!(decode(&entry, &other), None);
    }

    #[test]
    fn an_edited_entry_reads_as_a_valid_credential_or_as_nothing(
        r in record(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0..3u8), 1..4),
    ) {
        let c = Credential::try_from(&r).unwrap();
        let mut bytes = encode(&c);
        for (at, b, kind) in edits {
            let at = at % (bytes.len() + 1);
            match kind {
                0 if at < bytes.len() => bytes[at] = b,
                1 => bytes.insert(at, b),
                _ if at < bytes.len() => { bytes.remove(at); }
                _ => bytes.push(b),
            }
        }
        if let Some(back) = decode(&bytes, &c.key_hash) {
            // Validated on the way back: it is a credential the push could
            // have carried, under the same key.
            // Only under that key: its other hash bytes are checked, and
            // with the name's they give back the full hash.
            let mut other = c.key_hash;
            other[31] ^= 1;
            prop_assert_eq!(decode(&bytes, &other), None);
            prop_assert_eq!(full_hash(name_prefix(&c.key_hash), &bytes), Some(c.key_hash));
            let again = encode(&back);
            prop_assert_eq!(decode(&again, &c.key_hash), Some(back.clone()));
        }
        let _ = (tat(&bytes), counters(&bytes), record_bytes(&bytes), with_tat(&bytes, 1));
        let _ = (decode_slots(&bytes), visible_record(&bytes, &SyncState::default()));
    }
}
