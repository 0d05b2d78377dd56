//! A credential's shared-data entry: a compact binary record that also holds
//! the key's rate-limit state.
//!
//! Why binary and why the counter inside: at a million credentials every
//! byte of an entry is paid a million times in Envoy's memory. The JSON
//! record plus a separate `r:<key id>` counter entry cost ~417 B of Envoy RSS
//! per credential; one binary entry costs ~180 B.
//!
//! Why the counter inside is exact: Envoy creates a missing shared-data key
//! whatever CAS token the write carries, so a counter entry created on first
//! use could be created by two workers at once, each admitting "the first"
//! request. The credential entry always exists before a request can use it
//! (the sync role writes it; a deletion leaves an empty entry, never a
//! missing key), so every rate-limit update is a CAS write on an existing
//! entry: two workers never both admit on the same old state. A counter
//! starts as 0 (never used) and costs nothing until then.
//!
//! Layout (little endian):
//!
//! | bytes | field |
//! |---|---|
//! | 1 | format, [`FORMAT`] |
//! | 8 | rate-limit state: GCRA theoretical arrival time, 0 = unused |
//! | 17 | the key hash bytes the entry's name leaves out (`shared_data::credential_key`) |
//! | varint | generation |
//! | 1 | flags: default kind, inactive, secret, previous secret, rate limit, expiry |
//! | 32 / 40 / 8 / 8 | secret hash, previous secret hash + until, limit (requests, window), expires at — each only when flagged |
//! | str × 3 | key id, tenant, environment (empty = `live`), each a length byte and UTF-8 |
//! | list × 2 | scopes, allowed IPs: a count byte (IPs: two bytes), then strings |
//! | 1 | limit flags: own limits, plan, tenant limits |
//! | list / str | own limits (a count byte, then period byte and u32 each), plan name — each only when flagged |
//! | tagged × n | optional fields, each a tag byte and its value: [`T_OWNER`] a string; [`T_PREVIOUS_KEY`] 32-byte hash + 8-byte until; [`T_METADATA`] a count byte, then name and value strings |
//! | 9 × n + 1 | counters of the limits besides the single window (tag, u64 each), then n: the entry's only part that grows with use |
//!
//! The counters trailer ends the entry and is read from its end, so a key
//! with one limit (or none) pays one byte for it, and one with five pays 37:
//! a counter appears when its limit is first used (`crate::limits`).
//!
//! A rolled key's old value has an alias entry under its own name:
//! [`ALIAS`], the 17 hash bytes its name leaves out, and the full hash of
//! the credential it now names (50 bytes, no counter: the credential's
//! counter is the one both values spend).

use crate::credential::{Credential, CredentialRecord, Kind, Status};
use crate::hash::Digest;
use crate::limits::Counters;
use crate::rate_limit::RateLimit;
use crate::shared_data::NAME_HASH_BYTES;
use subtle::ConstantTimeEq;

/// Version byte of the layout above.
pub const FORMAT: u8 = 2;
const TAT_AT: usize = 1;
const SUFFIX_AT: usize = 9;
const HEAD: usize = SUFFIX_AT + 32 - NAME_HASH_BYTES;

const F_DEFAULT: u8 = 1;
const F_INACTIVE: u8 = 2;
const F_SECRET: u8 = 4;
const F_PREVIOUS: u8 = 8;
const F_LIMIT: u8 = 16;
const F_EXPIRES: u8 = 32;

/// Optional fields after the lists, each behind its tag (absent: not set).
pub const T_OWNER: u8 = 1;
pub const T_PREVIOUS_KEY: u8 = 2;
pub const T_METADATA: u8 = 3;

/// Version byte of an alias entry (a rolled key's old value).
pub const ALIAS: u8 = 0xa1;
// Limit flags (their own byte after the allowed IPs).
const L_LIMITS: u8 = 1;
const L_PLAN: u8 = 2;
const L_TENANT: u8 = 4;
const L_CREDITS: u8 = 8;

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Names are checked to at most 64 bytes (`check_name`), scopes and IPs
    // are short too; a longer string is cut rather than corrupting the layout
    // (and then fails validation on the way back).
    let bytes = s.as_bytes();
    let len = bytes.len().min(255);
    out.push(len as u8);
    out.extend_from_slice(bytes.get(..len).unwrap_or_default());
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The entry for a validated credential at `generation`, counter unused.
pub fn encode(generation: u64, c: &Credential) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    out.push(FORMAT);
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(c.key_hash.get(NAME_HASH_BYTES..).unwrap_or_default());
    put_varint(&mut out, generation);
    let mut flags = 0;
    if c.kind == Kind::Default {
        flags |= F_DEFAULT;
    }
    if !c.active {
        flags |= F_INACTIVE;
    }
    flags |= [
        (c.secret_hash.is_some(), F_SECRET),
        (c.previous_secret.is_some(), F_PREVIOUS),
        (c.rate_limit.is_some(), F_LIMIT),
        (c.expires_at.is_some(), F_EXPIRES),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .fold(0, |acc, (_, f)| acc | f);
    out.push(flags);
    if let Some(h) = &c.secret_hash {
        out.extend_from_slice(h);
    }
    if let Some((h, until)) = &c.previous_secret {
        out.extend_from_slice(h);
        out.extend_from_slice(&until.to_le_bytes());
    }
    if let Some(l) = &c.rate_limit {
        out.extend_from_slice(&l.requests.to_le_bytes());
        out.extend_from_slice(&l.window_secs.to_le_bytes());
    }
    if let Some(at) = c.expires_at {
        out.extend_from_slice(&at.to_le_bytes());
    }
    put_str(&mut out, &c.key_id);
    put_str(&mut out, &c.tenant);
    put_str(
        &mut out,
        if c.environment == "live" {
            ""
        } else {
            &c.environment
        },
    );
    out.push(c.scopes.len().min(255) as u8);
    for s in c.scopes.iter().take(255) {
        put_str(&mut out, s);
    }
    let ips = c.allowed_ips.len().min(u16::MAX as usize);
    out.extend_from_slice(&(ips as u16).to_le_bytes());
    for ip in c.allowed_ips.iter().take(ips) {
        put_str(&mut out, &ip.to_string());
    }
    let mut limit_flags = 0;
    if !c.limits.is_empty() {
        limit_flags |= L_LIMITS;
    }
    if c.plan.is_some() {
        limit_flags |= L_PLAN;
    }
    if c.tenant_limits {
        limit_flags |= L_TENANT;
    }
    if c.credits.is_some() {
        limit_flags |= L_CREDITS;
    }
    out.push(limit_flags);
    if !c.limits.is_empty() {
        out.extend_from_slice(&crate::limits::encode_plan(&c.limits));
    }
    if let Some(plan) = &c.plan {
        put_str(&mut out, plan);
    }
    if let Some(cr) = &c.credits {
        out.extend_from_slice(&cr.balance.to_le_bytes());
        out.extend_from_slice(&cr.serial.to_le_bytes());
        out.push(u8::from(cr.monthly));
        out.extend_from_slice(&cr.granted_at.to_le_bytes());
    }
    put_tagged(&mut out, c);
    // No counters yet, or those seeded from the request log.
    let seeds: Vec<&(u8, u64)> = c.seed.0.iter().filter(|(t, _)| *t != 0).take(255).collect();
    for (tag, v) in &seeds {
        out.push(*tag);
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.push(seeds.len() as u8);
    out
}

/// The length of the counters trailer that ends `bytes`.
fn trailer_len(bytes: &[u8]) -> Option<usize> {
    let n = usize::from(*bytes.last()?);
    let len = 9 * n + 1;
    (bytes.len() >= HEAD + len).then_some(len)
}

fn put_tagged(out: &mut Vec<u8>, c: &Credential) {
    if let Some(owner) = &c.owner {
        out.push(T_OWNER);
        put_str(out, owner);
    }
    if let Some((h, until)) = &c.previous_key {
        out.push(T_PREVIOUS_KEY);
        out.extend_from_slice(h);
        out.extend_from_slice(&until.to_le_bytes());
    }
    if !c.metadata.is_empty() {
        out.push(T_METADATA);
        out.push(c.metadata.len().min(255) as u8);
        for (k, v) in c.metadata.iter().take(255) {
            put_str(out, k);
            put_str(out, v);
        }
    }
}

/// The alias entry naming `target` under `old`'s name.
pub fn encode_alias(old: &Digest, target: &Digest) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 32 - NAME_HASH_BYTES + 32);
    out.push(ALIAS);
    out.extend_from_slice(old.get(NAME_HASH_BYTES..).unwrap_or_default());
    out.extend_from_slice(target);
    out
}

/// The credential hash an alias entry stored under `hash` names; None for
/// anything else (a credential entry, a foreign or corrupt alias).
pub fn alias_target(bytes: &[u8], hash: &Digest) -> Option<Digest> {
    let mut r = Reader(bytes);
    if r.byte()? != ALIAS {
        return None;
    }
    let suffix = r.take(32 - NAME_HASH_BYTES)?;
    if !bool::from(suffix.ct_eq(hash.get(NAME_HASH_BYTES..)?)) {
        return None;
    }
    let target = r.array::<32>()?;
    r.0.is_empty().then_some(target)
}

/// Reads the layout; every read is bounds-checked (entries come from the
/// host).
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn byte(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f).checked_shl(shift)?;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    fn string(&mut self) -> Option<String> {
        let len = usize::from(self.byte()?);
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

/// The generation and credential stored in `bytes` under the name of
/// `hash`; None for a deleted, corrupt or foreign entry (one whose other
/// hash bytes differ: two keys sharing a 15-byte prefix).
pub fn decode(bytes: &[u8], hash: &Digest) -> Option<(u64, Credential)> {
    let mut r = Reader(bytes);
    if r.byte()? != FORMAT {
        return None;
    }
    r.take(8)?;
    let suffix = r.take(32 - NAME_HASH_BYTES)?;
    if !bool::from(suffix.ct_eq(hash.get(NAME_HASH_BYTES..)?)) {
        return None;
    }
    let generation = r.varint()?;
    let flags = r.byte()?;
    let on = |f: u8| flags & f != 0;
    let secret_hash = if on(F_SECRET) {
        Some(hex::encode(r.take(32)?))
    } else {
        None
    };
    let (previous_secret_hash, previous_secret_expires_at) = if on(F_PREVIOUS) {
        (Some(hex::encode(r.take(32)?)), Some(r.u64()?))
    } else {
        (None, None)
    };
    let rate_limit = if on(F_LIMIT) {
        Some(RateLimit {
            requests: r.u32()?,
            window_secs: r.u32()?,
        })
    } else {
        None
    };
    let expires_at = if on(F_EXPIRES) { Some(r.u64()?) } else { None };
    let key_id = r.string()?;
    let tenant = r.string()?;
    let environment = Some(r.string()?)
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "live".to_owned());
    let scopes = (0..r.byte()?)
        .map(|_| r.string())
        .collect::<Option<Vec<_>>>()?;
    let ips = u16::from_le_bytes(r.array()?);
    let allowed_ips = (0..ips).map(|_| r.string()).collect::<Option<Vec<_>>>()?;
    let limit_flags = r.byte()?;
    let limits = if limit_flags & L_LIMITS != 0 {
        let n = usize::from(*r.0.first()?);
        crate::limits::decode_plan(r.take(1 + 5 * n))?
    } else {
        vec![]
    };
    let plan = if limit_flags & L_PLAN != 0 {
        Some(r.string()?)
    } else {
        None
    };
    let credits = if limit_flags & L_CREDITS != 0 {
        Some(crate::limits::Credits {
            balance: r.u64()?,
            serial: r.u32()?,
            monthly: r.byte()? != 0,
            granted_at: r.u64()?,
        })
    } else {
        None
    };
    if limit_flags & !(L_LIMITS | L_PLAN | L_TENANT | L_CREDITS) != 0 {
        return None;
    }
    // Then the tagged fields, up to the counters trailer.
    let trailer = trailer_len(bytes)?;
    let (mut owner, mut previous_key, mut metadata) = (None, None, Default::default());
    let mut last_tag = 0;
    while r.0.len() > trailer {
        let tag = r.byte()?;
        // Each tag once, in order: one encoding per credential.
        if tag <= last_tag {
            return None;
        }
        last_tag = tag;
        match tag {
            T_OWNER => owner = Some(r.string()?),
            T_PREVIOUS_KEY => previous_key = Some((r.array::<32>()?, r.u64()?)),
            T_METADATA => {
                metadata = (0..r.byte()?)
                    .map(|_| Some((r.string()?, r.string()?)))
                    .collect::<Option<_>>()?;
            }
            _ => return None,
        }
    }
    if r.0.len() != trailer {
        return None;
    }
    let record = CredentialRecord {
        key_id,
        key_hash: hex::encode(hash),
        secret_hash,
        previous_secret_hash,
        previous_secret_expires_at,
        kind: if on(F_DEFAULT) {
            Kind::Default
        } else {
            Kind::Scoped
        },
        tenant,
        environment,
        scopes,
        allowed_ips,
        rate_limit,
        status: if on(F_INACTIVE) {
            Status::Inactive
        } else {
            Status::Active
        },
        expires_at,
        owner,
        previous_key_hash: previous_key.map(|(h, _)| hex::encode(h)),
        previous_key_expires_at: previous_key.map(|(_, until)| until),
        metadata,
        limits,
        plan,
        tenant_limits: limit_flags & L_TENANT != 0,
        quota_used: vec![],
        credits,
    };
    // Validated again: the entry came from the host.
    let cred = Credential::try_from(&record).ok()?;
    Some((generation, cred))
}

/// The rate-limit state an entry holds: None for a deleted or foreign one,
/// Some(None) for a counter not used yet.
pub fn tat(bytes: &[u8]) -> Option<Option<u64>> {
    if bytes.first() != Some(&FORMAT) {
        return None;
    }
    let tat = u64::from_le_bytes(bytes.get(TAT_AT..SUFFIX_AT)?.try_into().ok()?);
    Some((tat != 0).then_some(tat))
}

/// `bytes` with its rate-limit state replaced (None when it is no entry).
pub fn with_tat(bytes: &[u8], tat: u64) -> Option<Vec<u8>> {
    if bytes.first() != Some(&FORMAT) || bytes.len() < HEAD {
        return None;
    }
    let mut out = bytes.to_vec();
    out.get_mut(TAT_AT..SUFFIX_AT)?
        .copy_from_slice(&tat.max(1).to_le_bytes());
    Some(out)
}

/// The full key hash of the entry named by `prefix`: the name's bytes and
/// the rest the entry holds. None for a deleted or corrupt entry.
pub fn full_hash(prefix: &[u8], bytes: &[u8]) -> Option<Digest> {
    if prefix.len() != NAME_HASH_BYTES || bytes.first() != Some(&FORMAT) {
        return None;
    }
    let mut hash = [0u8; 32];
    hash.get_mut(..NAME_HASH_BYTES)?.copy_from_slice(prefix);
    hash.get_mut(NAME_HASH_BYTES..)?
        .copy_from_slice(bytes.get(SUFFIX_AT..HEAD)?);
    Some(hash)
}

/// Everything but the rate-limit state: what a parsed copy depends on.
pub fn record_bytes(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = bytes.len().checked_sub(trailer_len(bytes)?)?;
    Some((bytes.get(..TAT_AT)?, bytes.get(SUFFIX_AT..end)?))
}

/// Every counter an entry holds: the single window's state (tag 0) and the
/// trailer's. None for a deleted or foreign entry.
pub fn counters(bytes: &[u8]) -> Option<Counters> {
    let tat = tat(bytes)?;
    let len = trailer_len(bytes)?;
    let trailer = bytes.get(bytes.len() - len..bytes.len() - 1)?;
    let mut c: Vec<(u8, u64)> = tat.map(|t| (0, t)).into_iter().collect();
    c.extend(
        Counters::decode(Some(trailer))
            .0
            .into_iter()
            .filter(|(t, _)| *t != 0),
    );
    Some(Counters(c))
}

/// `bytes` with its counters replaced (None when it is no entry). The
/// trailer is rewritten to exactly the counters besides tag 0.
pub fn with_counters(bytes: &[u8], counters: &Counters) -> Option<Vec<u8>> {
    let len = trailer_len(bytes)?;
    let tat = counters.get(0);
    let mut out = match tat {
        Some(t) => with_tat(bytes, t)?,
        None => bytes.to_vec(),
    };
    out.truncate(out.len() - len);
    let others: Vec<&(u8, u64)> = counters
        .0
        .iter()
        .filter(|(t, _)| *t != 0)
        .take(255)
        .collect();
    for (tag, v) in &others {
        out.push(*tag);
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.push(others.len() as u8);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::sha256;

    fn record(extra: impl FnOnce(&mut CredentialRecord)) -> CredentialRecord {
        let mut r = CredentialRecord {
            key_id: "bench-0000001".into(),
            key_hash: hex::encode(sha256(b"bench-key-1")),
            secret_hash: None,
            previous_secret_hash: None,
            previous_secret_expires_at: None,
            kind: Kind::Scoped,
            tenant: "t0".into(),
            environment: "live".into(),
            scopes: vec!["read".into()],
            allowed_ips: vec!["127.0.0.0/8".into()],
            rate_limit: Some(RateLimit {
                requests: 1_000_000_000,
                window_secs: 60,
            }),
            status: Status::Active,
            expires_at: None,
            owner: None,
            previous_key_hash: None,
            previous_key_expires_at: None,
            metadata: Default::default(),
            limits: vec![],
            plan: None,
            tenant_limits: false,
            quota_used: vec![],
            credits: None,
        };
        extra(&mut r);
        r
    }

    #[test]
    fn every_field_round_trips() {
        let full = record(|r| {
            r.secret_hash = Some(hex::encode(sha256(b"s")));
            r.previous_secret_hash = Some(hex::encode(sha256(b"old")));
            r.previous_secret_expires_at = Some(1_800_000_000);
            r.kind = Kind::Default;
            r.environment = "test".into();
            r.scopes = vec!["read".into(), "write".into()];
            r.allowed_ips = vec!["10.0.0.0/8".into(), "2001:db8::/32".into()];
            r.status = Status::Inactive;
            r.expires_at = Some(1_900_000_000);
            r.owner = Some("alice@example.com".into());
            r.previous_key_hash = Some(hex::encode(sha256(b"rolled-away")));
            r.previous_key_expires_at = Some(1_800_000_100);
            r.metadata = [
                ("plan_tier".into(), "gold".into()),
                ("region".into(), "eu 1".into()),
            ]
            .into_iter()
            .collect();
            r.limits = vec!["100/min".parse().unwrap(), "10000/day".parse().unwrap()];
            r.plan = Some("pro".into());
            r.tenant_limits = true;
            r.credits = Some(crate::limits::Credits {
                balance: 5_000,
                serial: 3,
                monthly: true,
                granted_at: 1_750_000_000,
            });
        });
        for r in [record(|_| {}), full, record(|r| r.rate_limit = None)] {
            let c = Credential::try_from(&r).unwrap();
            let bytes = encode(7, &c);
            assert_eq!(decode(&bytes, &c.key_hash), Some((7, c)));
        }
    }

    #[test]
    fn a_typical_entry_is_small_and_its_name_fits_a_short_string() {
        let c = Credential::try_from(&record(|_| {})).unwrap();
        assert!(encode(1, &c).len() <= 80, "{}", encode(1, &c).len());
        assert_eq!(crate::shared_data::credential_key(&c.key_hash).len(), 22);
    }

    #[test]
    fn a_key_sharing_the_name_prefix_is_not_found() {
        let c = Credential::try_from(&record(|_| {})).unwrap();
        let bytes = encode(1, &c);
        let mut other = c.key_hash;
        other[31] ^= 1;
        let name = crate::shared_data::credential_key;
        assert_eq!(name(&other), name(&c.key_hash));
        assert_eq!(decode(&bytes, &other), None);
    }

    #[test]
    fn the_name_prefix_and_the_entry_give_back_the_full_hash() {
        let c = Credential::try_from(&record(|_| {})).unwrap();
        let bytes = with_tat(&encode(1, &c), 9).unwrap();
        let prefix = crate::shared_data::name_prefix(&c.key_hash);
        assert_eq!(full_hash(prefix, &bytes), Some(c.key_hash));
        assert_eq!(full_hash(prefix, b""), None);
        assert_eq!(full_hash(&c.key_hash, &bytes), None);
        assert_eq!(full_hash(prefix, bytes.get(..20).unwrap()), None);
    }

    #[test]
    fn the_counter_starts_unused_and_survives_in_place() {
        let c = Credential::try_from(&record(|_| {})).unwrap();
        let bytes = encode(3, &c);
        assert_eq!(tat(&bytes), Some(None));
        let used = with_tat(&bytes, 42).unwrap();
        assert_eq!(tat(&used), Some(Some(42)));
        assert_eq!(record_bytes(&used), record_bytes(&bytes));
        assert_eq!(decode(&used, &c.key_hash), Some((3, c)));
        assert_eq!(tat(b""), None);
        assert_eq!(with_tat(b"", 1), None);
    }

    #[test]
    fn each_optional_field_round_trips_alone() {
        let variants: [fn(&mut CredentialRecord); 3] = [
            |r| r.owner = Some("svc:billing".into()),
            |r| {
                r.previous_key_hash = Some(hex::encode(sha256(b"old")));
                r.previous_key_expires_at = Some(5);
            },
            |r| r.metadata = [("tier".into(), "1".into())].into_iter().collect(),
        ];
        for v in variants {
            let c = Credential::try_from(&record(v)).unwrap();
            assert_eq!(decode(&encode(2, &c), &c.key_hash), Some((2, c)));
        }
    }

    #[test]
    fn an_owner_costs_its_length_and_two_bytes() {
        let plain = Credential::try_from(&record(|_| {})).unwrap();
        let owned = Credential::try_from(&record(|r| r.owner = Some("alice".into()))).unwrap();
        assert_eq!(encode(1, &owned).len(), encode(1, &plain).len() + 2 + 5);
    }

    #[test]
    fn repeated_or_unknown_tags_are_refused() {
        let c = Credential::try_from(&record(|r| r.owner = Some("a".into()))).unwrap();
        let bytes = encode(1, &c);
        // Tagged fields sit before the counters trailer (here its count
        // byte alone): insert there, as an encoder would have written them.
        let before_trailer = |b: &[u8], extra: &[u8]| {
            let mut out = b.to_vec();
            let at = out.len() - 1;
            out.splice(at..at, extra.iter().copied());
            out
        };
        assert_eq!(
            decode(&before_trailer(&bytes, &[]), &c.key_hash).map(|d| d.0),
            Some(1)
        );
        let twice = before_trailer(&bytes, &[T_OWNER, 1, b'b']);
        assert_eq!(decode(&twice, &c.key_hash), None);
        let plain = encode(1, &Credential::try_from(&record(|_| {})).unwrap());
        let unknown = before_trailer(&plain, &[0x7f, 0]);
        assert_eq!(decode(&unknown, &c.key_hash), None);
    }

    #[test]
    fn an_alias_names_its_target_only_under_its_own_hash() {
        let (old, new) = (sha256(b"old"), sha256(b"new"));
        let alias = encode_alias(&old, &new);
        assert_eq!(alias.len(), 50);
        assert_eq!(alias_target(&alias, &old), Some(new));
        assert_eq!(alias_target(&alias, &new), None);
        assert_eq!(alias_target(alias.get(..49).unwrap(), &old), None);
        // An alias is no credential entry, and has no counter.
        assert_eq!(decode(&alias, &old), None);
        assert_eq!(tat(&alias), None);
        let c = Credential::try_from(&record(|_| {})).unwrap();
        assert_eq!(alias_target(&encode(1, &c), &c.key_hash), None);
    }

    #[test]
    fn counters_grow_the_trailer_only_and_never_change_the_record() {
        let c = Credential::try_from(&record(|r| {
            r.limits = vec!["10/s".parse().unwrap(), "100/day".parse().unwrap()]
        }))
        .unwrap();
        let bytes = encode(3, &c);
        assert_eq!(counters(&bytes), Some(Counters::default()));
        let used = Counters(vec![(0, 7), (1, 99), (4, 5)]);
        let written = with_counters(&bytes, &used).unwrap();
        assert_eq!(written.len(), bytes.len() + 18);
        assert_eq!(counters(&written), Some(used));
        assert_eq!(record_bytes(&written), record_bytes(&bytes));
        assert_eq!(decode(&written, &c.key_hash), Some((3, c.clone())));
        // One limit pays one trailer byte; the single window none more.
        let one = Credential::try_from(&record(|_| {})).unwrap();
        let plain = encode(1, &one);
        let once = with_counters(&plain, &Counters(vec![(0, 9)])).unwrap();
        assert_eq!(once.len(), plain.len());
        assert_eq!(tat(&once), Some(Some(9)));
    }

    #[test]
    fn truncated_or_padded_entries_are_refused() {
        let c = Credential::try_from(&record(|_| {})).unwrap();
        let bytes = encode(1, &c);
        for n in 0..bytes.len() {
            assert_eq!(decode(bytes.get(..n).unwrap(), &c.key_hash), None);
        }
        let mut padded = bytes.clone();
        padded.push(0);
        assert_eq!(decode(&padded, &c.key_hash), None);
    }
}
