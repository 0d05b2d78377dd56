use std::time::Instant;
fn main() {
    let path = std::env::args().nth(1).unwrap();
    let t = Instant::now();
    let bytes = std::fs::read(&path).unwrap();
    let t1 = t.elapsed();
    let snap: keygate_control::store::Snapshot = serde_json::from_slice(&bytes).unwrap();
    let t2 = t.elapsed();
    for k in &snap.keys {
        keygate_core::Credential::try_from(&k.record).unwrap();
    }
    let t3 = t.elapsed();
    snap.validate().unwrap();
    let t4 = t.elapsed();
    keygate_core::credential::check_tenant_limits(snap.keys.iter().map(|k| &k.record)).unwrap();
    let t5 = t.elapsed();
    eprintln!(
        "read {:?} parse {:?} try_from {:?} validate(all) {:?} tenant_limits {:?}",
        t1,
        t2 - t1,
        t3 - t2,
        t4 - t3,
        t5 - t4
    );
}
