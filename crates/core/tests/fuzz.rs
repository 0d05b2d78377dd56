//! Bounded mutation fuzzing of every parser that sees untrusted input:
//! credential headers, paths, plugin configuration, sync pushes, tokens and
//! login bodies, and the whole decision. Deterministic (seeded), no extra
//! dependencies, a few seconds in `make test`. Properties: nothing panics,
//! allocations stay bounded by the input, and invariants hold (normalised
//! paths are fixed points, refusals are 4xx with a JSON body).
//!
//! `KEYGATE_FUZZ_ITERS` raises the count for a longer run.

use keygate_core::extract::extract;
use keygate_core::hash::{sha256, to_hex};
use keygate_core::path::normalize;
use keygate_core::rate_limit::CounterCell;
use keygate_core::sync::{plan, sign, SyncState};
use keygate_core::verdict::{decide, login, Host, Outcome};
use keygate_core::{Credential, Policy};
use std::collections::HashMap;
use std::rc::Rc;

fn iterations() -> usize {
    std::env::var("KEYGATE_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// xorshift64*: small, seeded, good enough to drive mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        // Bias towards bytes that matter to the parsers.
        const SPECIAL: &[u8] = b" :/\\%.?#=,\"{}[]\x00\xff\xc3\r\n\t0aAzZ+-_";
        if self.below(3) == 0 {
            SPECIAL[self.below(SPECIAL.len())]
        } else {
            self.next() as u8
        }
    }
}

/// One random edit: flip, insert, delete, duplicate a slice, or truncate.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..=rng.below(4) {
        let len = v.len();
        match rng.below(6) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] = rng.byte();
            }
            1 => {
                let i = rng.below(len + 1);
                v.insert(i, rng.byte());
            }
            2 if len > 0 => {
                v.remove(rng.below(len));
            }
            3 if len > 0 => {
                let a = rng.below(len);
                let b = (a + rng.below(16)).min(len);
                let chunk = v[a..b].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, chunk);
            }
            4 => v.truncate(rng.below(len + 1)),
            _ => v.extend((0..rng.below(8)).map(|_| rng.byte())),
        }
    }
    v
}

fn corpus_run(seeds: &[&[u8]], seed: u64, mut check: impl FnMut(&[u8])) {
    let mut rng = Rng(seed);
    for s in seeds {
        check(s);
    }
    for _ in 0..iterations() {
        let base = seeds[rng.below(seeds.len())];
        check(&mutate(&mut rng, base));
    }
}

#[test]
fn credential_header_parsing_never_panics() {
    let seeds: &[&[u8]] = &[
        b"Basic a2V5OnNlY3JldA==",
        b"Bearer abcdef0123456789",
        b"bearer   k",
        b"Basic Og==",
        b"Digest x",
        b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    ];
    corpus_run(seeds, 1, |v| {
        let _ = extract(Some(v), None);
        let _ = extract(Some(v), Some(v));
        if let Ok(p) = extract(None, Some(v)) {
            assert!(!p.key.is_empty() && p.key.bytes().all(|b| (0x21..=0x7e).contains(&b)));
        }
    });
}

#[test]
fn path_normalisation_never_panics_and_is_idempotent() {
    let seeds: &[&[u8]] = &[
        b"/v1/items?x=1",
        b"/a/../b/./c//d",
        b"/%61dmin/%2e%2e/x",
        b"/",
        b"//a%2fb",
    ];
    corpus_run(seeds, 2, |v| {
        if let Ok(p) = normalize(v) {
            assert!(p.starts_with('/'));
            assert!(
                !p.contains("//") && !p.split('/').any(|s| s == ".." || s == "."),
                "{p}"
            );
            // Fixed point, unless decoding revealed a new escape or '?'.
            if !p.contains(['%', '?', '#']) {
                assert_eq!(normalize(p.as_bytes()).as_deref(), Ok(p.as_str()));
            }
        }
    });
}

const CONFIG: &str = r#"{"routes":[{"path":"/health","public":true},{"methods":["GET"],"path_prefix":"/v1","scope":"read"}],
"rate_limit":{"requests":5,"window_secs":60},"scope_hierarchy":["admin","write","read"],
"credentials":[{"key_id":"k1","key_hash":"0000000000000000000000000000000000000000000000000000000000000000","tenant":"t","scopes":["read"],"allowed_ips":["10.0.0.0/8","::1"]}],
"tokens":{"lifetime_secs":60,"signing_keys":[{"id":"a","secret":"0123456789abcdef0123456789abcdef"}]}}"#;

#[test]
fn plugin_config_parsing_never_panics() {
    corpus_run(
        &[
            CONFIG.as_bytes(),
            b"{}",
            br#"{"role":"sync","sync_secret":"x"}"#,
        ],
        3,
        |v| {
            let _ = Policy::from_json(v);
        },
    );
}

#[test]
fn sync_push_parsing_never_panics_and_refusals_change_nothing() {
    let secret = b"0123456789abcdef0123456789abcdef";
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
    let held = SyncState {
        generation: 1,
        version: 1,
        pending: None,
        store_id: None,
    };
    corpus_run(&[full.as_bytes(), incr.as_bytes()], 4, |v| {
        // Correctly signed, so the fuzzing reaches the parser and validation.
        let sig = sign(secret, v);
        if let Ok(p) = plan(secret, v, Some(sig.as_bytes()), &held) {
            assert!(p.state.version >= held.version || p.state.pending.is_some());
            assert_eq!(p.counters.len(), p.upserts.len());
        }
        assert!(plan(secret, v, Some(b"v1=00"), &held).is_err());
    });
}

#[derive(Default)]
struct FuzzHost {
    counters: HashMap<String, Vec<u8>>,
}

impl CounterCell for FuzzHost {
    fn load(&mut self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        (self.counters.get(key).cloned(), Some(1))
    }
    fn store(&mut self, key: &str, value: &[u8], _: Option<u32>) -> bool {
        self.counters.insert(key.into(), value.to_vec());
        true
    }
}

impl Host for FuzzHost {
    fn lookup(&mut self, _: &keygate_core::hash::Digest) -> Option<Rc<Credential>> {
        None
    }
    fn peer_address(&mut self) -> Option<String> {
        Some("127.0.0.1:1".into())
    }
    fn counters(&mut self) -> &mut dyn CounterCell {
        self
    }
}

#[test]
fn whole_decisions_and_logins_never_panic_and_refuse_with_4xx_json() {
    let policy = Policy::from_json(CONFIG.as_bytes()).expect("fuzz config is valid");
    let seeds: &[&[u8]] = &[
        b"GET\n/v1/items\nx-api-key\nkey",
        b"POST\n/v1/../admin\nauthorization\nBasic a2V5OnNlY3JldA==",
        b"GET\n/health\nx-forwarded-for\n10.0.0.1, ::1",
        b"GET\n/v1\nauthorization\nBearer kg1.a.e30.AAAA",
    ];
    let mut host = FuzzHost::default();
    let now = 1_700_000_000_000_000_000;
    corpus_run(seeds, 5, |v| {
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
        let d = decide(&policy, &headers, &mut host, now);
        if let Outcome::Denied { denial, .. } = &d.outcome {
            assert!((400..500).contains(&denial.status()), "{denial:?}");
            assert!(serde_json::from_slice::<serde_json::Value>(&denial.body()).is_ok());
        }
        let _ = d.upstream_headers(&policy, &headers);
        let _ = login(&policy, &headers, v, &mut host, now);
    });
}

#[test]
fn token_verification_never_panics() {
    let policy = Policy::from_json(CONFIG.as_bytes()).expect("fuzz config is valid");
    let tokens = policy.tokens.as_ref().expect("tokens configured");
    let claims = keygate_core::token::Claims {
        kid: "k1".into(),
        kh: "0".repeat(64),
        tenant: "t".into(),
        env: "live".into(),
        scopes: vec!["read".into()],
        sid: String::new(),
        iat_ms: 0,
        exp_ms: u64::MAX,
    };
    let good = tokens.issue(&claims).expect("issue");
    corpus_run(&[good.as_bytes(), b"kg1.a.e30.AAAA"], 6, |v| {
        if let Ok(s) = std::str::from_utf8(v) {
            if s != good {
                assert!(
                    tokens.verify(s, 0).is_err()
                        || s.starts_with(&good[..good.rfind('.').unwrap_or(0)])
                );
            }
        }
    });
}
