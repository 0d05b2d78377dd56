//! Property tests of every parser that sees untrusted input: credential
//! headers, paths, plugin configuration, sync pushes, tokens and login
//! bodies, and the whole decision. Inputs are valid seeds with a few random
//! edits (flip, insert, delete, duplicate a slice, truncate, extend), biased
//! towards bytes that matter to the parsers; proptest shrinks a failure to
//! the fewest edits and records it in crates/core/proptest-regressions/.
//! Properties: nothing panics, and invariants hold (normalised paths are
//! fixed points, refusals are 4xx with a JSON body, forged pushes and
//! tokens are refused).
//!
//! 5,000 cases per property by default; `PROPTEST_CASES=200000 cargo test
//! -p keygate-core --test fuzz` runs a longer search.

use keygate_core::extract::extract;
use keygate_core::hash::{sha256, to_hex};
use keygate_core::path::normalize;
use keygate_core::sync::{plan, sign, SyncState};
use keygate_core::testing::MemoryHost;
use keygate_core::verdict::{decide, login, Outcome};
use keygate_core::Policy;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

const DEFAULT_CASES: u32 = 5_000;

fn config() -> ProptestConfig {
    let mut c = ProptestConfig {
        // Relative to the package root, where cargo runs integration tests.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/fuzz.txt",
        ))),
        ..ProptestConfig::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = DEFAULT_CASES;
    }
    c
}

/// One random edit; positions are taken modulo the input's length.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Duplicate { from: usize, len: usize, to: usize },
    Truncate(usize),
    Extend(Vec<u8>),
}

fn byte() -> impl Strategy<Value = u8> {
    // Bias towards bytes that matter to the parsers.
    const SPECIAL: &[u8] = b" :/\\%.?#=,\"{}[]\x00\xff\xc3\r\n\t0aAzZ+-_";
    prop_oneof![2 => any::<u8>(), 1 => proptest::sample::select(SPECIAL)]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), byte()).prop_map(|(i, b)| Edit::Flip(i, b)),
        (any::<usize>(), byte()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Remove),
        (any::<usize>(), 0..16usize, any::<usize>()).prop_map(|(from, len, to)| Edit::Duplicate {
            from,
            len,
            to
        }),
        any::<usize>().prop_map(Edit::Truncate),
        proptest::collection::vec(byte(), 0..8).prop_map(Edit::Extend),
    ]
}

fn apply(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for e in edits {
        let len = v.len();
        match e {
            Edit::Flip(i, b) if len > 0 => v[i % len] = *b,
            Edit::Insert(i, b) => v.insert(i % (len + 1), *b),
            Edit::Remove(i) if len > 0 => {
                v.remove(i % len);
            }
            Edit::Duplicate { from, len: n, to } if len > 0 => {
                let a = from % len;
                let chunk = v[a..(a + n).min(len)].to_vec();
                let at = to % (len + 1);
                v.splice(at..at, chunk);
            }
            Edit::Truncate(i) => v.truncate(i % (len + 1)),
            Edit::Extend(bytes) => v.extend_from_slice(bytes),
            _ => {}
        }
    }
    v
}

/// A seed, unchanged or with up to five edits.
fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::sample::select(seeds),
        proptest::collection::vec(edit(), 0..=5),
    )
        .prop_map(|(seed, edits)| apply(&seed, &edits))
}

fn seeds(list: &[&[u8]]) -> Vec<Vec<u8>> {
    list.iter().map(|s| s.to_vec()).collect()
}

const CONFIG: &str = r#"{"routes":[{"path":"/health","public":true},{"methods":["GET"],"path_prefix":"/v1","scope":"read"}],
"rate_limit":{"requests":5,"window_secs":60},"scope_hierarchy":["admin","write","read"],
"credentials":[{"key_id":"k1","key_hash":"0000000000000000000000000000000000000000000000000000000000000000","tenant":"t","scopes":["read"],"allowed_ips":["10.0.0.0/8","::1"]}],
"tokens":{"lifetime_secs":60,"signing_keys":[{"id":"a","secret":"0123456789abcdef0123456789abcdef"}]}}"#;

const SYNC_SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

fn sync_seeds() -> Vec<Vec<u8>> {
    let record = format!(
        r#"{{"key_id":"k","key_hash":"{}","tenant":"t","allowed_ips":["10.0.0.0/8"],"rate_limit":{{"requests":1,"window_secs":1}}}}"#,
        to_hex(&sha256(b"k"))
    );
    let full = format!(
        r#"{{"mode":"full","generation":1,"version":1,"batch":0,"last":true,"upserts":[{record}]}}"#
    );
    let incr = format!(
        r#"{{"mode":"incremental","generation":1,"base_version":1,"version":2,"upserts":[{record}],"deletes":["{}"],"revoked_sessions":[{{"key_id":"k","session_id":"s","revoked_at_ms":1}}]}}"#,
        to_hex(&sha256(b"x"))
    );
    vec![full.into_bytes(), incr.into_bytes()]
}

/// Plan and tenant entries as sync stages them.
fn limit_entry_seeds() -> Vec<Vec<u8>> {
    use keygate_core::limits::{encode_plan, retarget_tenant, Limit};
    use keygate_core::sync::{encode_limit_slots, Slot};
    let limits: Vec<Limit> = vec!["3/min".parse().unwrap(), "100/day".parse().unwrap()];
    let slot = |stamp, record| Slot {
        stamp,
        generation: 1,
        record: Some(record),
    };
    vec![
        encode_limit_slots(&[slot(2, encode_plan(&limits))]),
        encode_limit_slots(&[
            slot(1, retarget_tenant(None, &limits)),
            slot(3, retarget_tenant(None, &limits[..1])),
        ]),
        encode_plan(&limits),
    ]
}

fn policy() -> Policy {
    Policy::from_json(CONFIG.as_bytes()).expect("fuzz config is valid")
}

/// A token the fuzz policy issued, valid forever.
fn good_token() -> String {
    let policy = policy();
    let tokens = policy.tokens.as_ref().expect("tokens configured");
    let signer = tokens.signer().expect("a signing key");
    let claims = keygate_core::token::Claims {
        kid: "k1".into(),
        cref: tokens
            .credential_ref(signer, &[0u8; 32], None)
            .expect("cref"),
        tenant: "t".into(),
        env: "live".into(),
        scopes: vec!["read".into()],
        sid: String::new(),
        iat_ms: 0,
        exp_ms: u64::MAX,
        signer: String::new(),
    };
    tokens.issue(&claims).expect("issue")
}

/// `METHOD\nPATH\nname\nvalue\n…` as request headers.
fn headers_of(v: &[u8]) -> Vec<(String, Vec<u8>)> {
    let parts: Vec<&[u8]> = v.split(|&b| b == b'\n').collect();
    let mut headers = vec![
        (
            ":method".to_owned(),
            parts.first().copied().unwrap_or_default().to_vec(),
        ),
        (
            ":path".to_owned(),
            parts.get(1).copied().unwrap_or_default().to_vec(),
        ),
    ];
    for pair in parts[2.min(parts.len())..].chunks(2) {
        let name = String::from_utf8_lossy(pair[0]).to_ascii_lowercase();
        headers.push((name, pair.get(1).copied().unwrap_or_default().to_vec()));
    }
    headers
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn credential_header_parsing_never_panics(v in mutated(seeds(&[
        b"Basic a2V5OnNlY3JldA==",
        b"Bearer abcdef0123456789",
        b"bearer   k",
        b"Basic Og==",
        b"Digest x",
        b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    ]))) {
        let _ = extract(Some(&v), None);
        let _ = extract(Some(&v), Some(&v));
        if let Ok(p) = extract(None, Some(&v)) {
            prop_assert!(!p.key.is_empty() && p.key.bytes().all(|b| (0x21..=0x7e).contains(&b)));
        }
    }

    #[test]
    fn path_normalisation_never_panics_and_is_idempotent(v in mutated(seeds(&[
        b"/v1/items?x=1",
        b"/a/../b/./c//d",
        b"/%61dmin/%2e%2e/x",
        b"/",
        b"//a%2fb",
    ]))) {
        if let Ok(p) = normalize(&v) {
            prop_assert!(p.starts_with('/'));
            prop_assert!(
                !p.contains("//") && !p.split('/').any(|s| s == ".." || s == "."),
                "{}", p
            );
            // Fixed point, unless decoding revealed a new escape or '?'.
            if !p.contains(['%', '?', '#']) {
                let again = normalize(p.as_bytes());
                prop_assert_eq!(again.as_deref(), Ok(&*p));
            }
        }
    }

    #[test]
    fn plugin_config_parsing_never_panics(v in mutated(seeds(&[
        CONFIG.as_bytes(),
        b"{}",
        br#"{"role":"sync","sync_secret":"x"}"#,
    ]))) {
        let _ = Policy::from_json(&v);
    }

    #[test]
    fn sync_push_parsing_never_panics_and_refusals_change_nothing(v in mutated(sync_seeds())) {
        let held = SyncState {
            generation: 1,
            version: 1,
            stamp: 1,
            pending: None,
            store_id: None,
        };
        // Correctly signed, so the fuzzing reaches the parser and validation.
        let sig = sign(SYNC_SECRET, &v);
        if let Ok(p) = plan(SYNC_SECRET, &v, Some(sig.as_bytes()), &held) {
            let next = p.result();
            prop_assert!(next.version >= held.version || next.pending.is_some());
            prop_assert!(p.stamp > held.stamp, "a push never stages under a committed stamp");
        }
        prop_assert!(plan(SYNC_SECRET, &v, Some(b"v1=00"), &held).is_err());
    }

    #[test]
    fn plan_and_tenant_entries_never_panic_and_previous_layout_entries_are_served_as_they_are(
        v in mutated(limit_entry_seeds())
    ) {
        use keygate_core::limits::{acquire_tenant, decode_plan};
        use keygate_core::shared_data::CounterCell;
        use keygate_core::sync::{stage_limit, LimitCell, LimitKind, LimitRecord, LIMIT_SLOTS};
        let held = SyncState { generation: 1, version: 1, stamp: 2, pending: None, store_id: None };
        let mut host = MemoryHost::default();
        host.counters.insert("pl:p".into(), v.clone());
        host.counters.insert("tl:t".into(), v.clone());
        let mut cell = LimitCell::new(&mut host, held);
        let served = cell.load("pl:p").0;
        if v.first().is_some_and(|b| *b != LIMIT_SLOTS) {
            prop_assert_eq!(served.as_deref(), Some(&v[..]));
        }
        let _ = decode_plan(served.as_deref());
        let _ = acquire_tenant(&mut cell, "t", 1_700_000_000_000_000_000);
        let record = LimitRecord {
            kind: LimitKind::Tenant,
            name: "t".into(),
            limits: vec!["5/min".parse().unwrap()],
            quota_used: vec![],
        };
        let staged = stage_limit(Some(&v), &held, 3, 1, &record);
        prop_assert_eq!(staged.first(), Some(&LIMIT_SLOTS));
    }

    #[test]
    fn whole_decisions_and_logins_never_panic_and_refuse_with_4xx_json(v in mutated(seeds(&[
        b"GET\n/v1/items\nx-api-key\nkey",
        b"POST\n/v1/../admin\nauthorization\nBasic a2V5OnNlY3JldA==",
        b"GET\n/health\nx-forwarded-for\n10.0.0.1, ::1",
        b"GET\n/v1\nauthorization\nBearer kg1.a.e30.AAAA",
    ]))) {
        let policy = policy();
        let mut host = MemoryHost {
            peer: Some("127.0.0.1:1".into()),
            ..MemoryHost::default()
        };
        let now = 1_700_000_000_000_000_000;
        let headers = headers_of(&v);
        let d = decide(&policy, &headers, &mut host, now);
        if let Outcome::Denied { denial, .. } = &d.outcome {
            prop_assert!((400..500).contains(&denial.status()), "{:?}", denial);
            prop_assert!(serde_json::from_slice::<serde_json::Value>(&denial.body()).is_ok());
        }
        let _ = d.upstream_headers(&policy, &headers);
        let _ = login(&policy, &headers, &v, &mut host, now);
    }

    #[test]
    fn token_verification_never_panics(v in mutated(vec![
        good_token().into_bytes(),
        b"kg1.a.e30.AAAA".to_vec(),
    ])) {
        let good = good_token();
        let policy = policy();
        let tokens = policy.tokens.as_ref().expect("tokens configured");
        if let Ok(s) = std::str::from_utf8(&v) {
            if s != good {
                prop_assert!(
                    tokens.verify(s, 0).is_err()
                        || s.starts_with(&good[..good.rfind('.').unwrap_or(0)])
                );
            }
        }
    }
}
