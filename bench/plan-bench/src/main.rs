//! plan() of one 1,000-key full batch of the bench's records, as JSON and
//! as a binary body: the fastest of 60 runs each, and the HMAC alone.
use keygate_core::sync::{encode_binary, plan, sign, verify, Push, SyncState};
use std::hint::black_box;
use std::time::Instant;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
const RUNS: usize = 60;

fn record(i: usize) -> serde_json::Value {
    let hash = format!("{:064x}", (i as u128) * 0x9e37_79b9_7f4a_7c15 + 12_345);
    serde_json::json!({"key_id": format!("bench-{i:07}"), "key_hash": hash, "tenant": format!("t{}", i / 5),
        "scopes": ["read"], "allowed_ips": ["127.0.0.0/8"],
        "rate_limit": {"requests": 1_000_000_000u32, "window_secs": 60}})
}

fn fastest(mut f: impl FnMut()) -> f64 {
    (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::MAX, f64::min)
}

fn main() -> Result<(), String> {
    let records: Vec<_> = (0..1000).map(record).collect();
    let push = serde_json::json!({"mode": "full", "generation": 1, "version": 1, "last": true, "upserts": records});
    let json = serde_json::to_vec(&push).map_err(|e| e.to_string())?;
    let push: Push = serde_json::from_slice(&json).map_err(|e| e.to_string())?;
    let binary = encode_binary(&push)?;
    let state = SyncState::default();
    println!("bytes: JSON {}, binary {}", json.len(), binary.len());
    for (name, body) in [("JSON", &json), ("binary", &binary)] {
        let sig = sign(SECRET, body);
        let all = fastest(|| {
            black_box(plan(SECRET, body, Some(sig.as_bytes()), &state).ok());
        });
        let hmac = fastest(|| {
            black_box(verify(SECRET, body, Some(sig.as_bytes())));
        });
        println!("{name}: plan {all:.3} ms, of it HMAC {hmac:.3} ms");
    }
    Ok(())
}
