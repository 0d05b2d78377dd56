//! A credential's shared-data entry: a compact binary record that also holds
//! the key's rate-limit state.
//!
//! Why binary and why the counter inside: at a million credentials every
//! byte of an entry is paid a million times in Envoy's memory. The JSON
//! record plus a separate `r:<key id>` counter entry cost ~417 B of Envoy RSS
//! per credential; one binary entry costs ~160 B (tree node 96 B, value
//! block 64 B: see bench/RESULTS.md, "p4-entry").
//!
//! Why the counter inside is exact: Envoy creates a missing shared-data key
//! whatever CAS token the write carries, so a counter entry created on first
//! use could be created by two workers at once, each admitting "the first"
//! request. The credential entry always exists before a request can use it
//! (the sync role writes it; a deletion leaves an entry without a record,
//! never a missing key), so every rate-limit update is a CAS write on an
//! existing entry: two workers never both admit on the same old state.
//!
//! Layout (varints are LEB128, fixed-width integers little endian):
//!
//! | bytes | field |
//! |---|---|
//! | 1 | format, [`FORMAT`] |
//! | 17 | the key hash bytes the entry's name leaves out (`shared_data::credential_key`) |
//! | 1 | flags: default kind, inactive, secret, previous secret, rate limit, expiry, environment, more flags |
//! | 1 | more flags (only when flagged): own limits, plan, tenant limits, credits |
//! | 32 / 32 + varint / 2 varints / varint | secret hash, previous secret hash + until, rate limit (requests, window), expires at — each only when flagged |
//! | str × 2 (+ 1) | key id, tenant, then the environment only when flagged (else `live`); each a varint length and UTF-8 |
//! | 1 | scopes: bits 0–2 for `read`, `write`, `admin` when the scopes are those in this order; else `0x80` + n, then n strings |
//! | varint + n × (1 + 0–16) | allowed IPs: n, then per network a code (IPv4: prefix length 0–32; IPv6: 33 + prefix length) and the network's address bytes the prefix covers |
//! | list / str / 4 varints | own limits (`crate::limits::encode_plan`), plan name, credits (balance, serial, monthly as 0/1, granted at) — each only when flagged |
//! | tagged × n | optional fields, each a tag byte and its value: [`T_OWNER`] a string; [`T_PREVIOUS_KEY`] 32-byte hash + varint until; [`T_METADATA`] a count byte, then name and value strings |
//! | 9 × n (+ 8) + 1 | the counters trailer: the counters of limits besides the single window (tag, u64 each), then the single window's state (GCRA theoretical arrival time, u64) when it was used, then n, plus `0x80` when the window's state is there |
//!
//! No generation: the slot an entry's record sits in carries it
//! (`crate::sync::encode_slots`), and the native build keeps none per entry.
//!
//! The counters trailer ends the entry and is read from its end, so an
//! unused key pays one byte for it, one with the single window used nine,
//! and every other limit's counter nine more once it is first used
//! (`crate::limits`). The native build keeps its counters apart and stores
//! this record with the trailer its push wrote (one byte, or the seeded
//! quota counters).
//!
//! Why the entry keeps all 17 hash bytes its name leaves out: the name's
//! 15 bytes (120 bits) find the entry, these complete the key's SHA-256, and
//! a key is served only if all 32 bytes match (a wrong key never matches:
//! two keys sharing a 15-byte prefix each read the other's entry as absent).
//! Fewer bytes would still make a wrong key's match hopeless, but the token
//! path needs the full hash: a token names its key by id, and its
//! credential reference is an HMAC of the full key hash
//! (`crate::token::Tokens::credential_ref`), rebuilt from the name and these
//! bytes ([`full_hash`]).
//!
//! A rolled key's old value has an alias entry under its own name:
//! [`ALIAS`], the 17 hash bytes its name leaves out, and the full hash of
//! the credential it now names (50 bytes, no counter: the credential's
//! counter is the one both values spend).

use crate::credential::{Credential, CredentialRecord, Kind, Status, MAX_ALLOWED_IPS};
use crate::hash::Digest;
use crate::limits::{CounterList, Counters};
use crate::rate_limit::RateLimit;
use crate::shared_data::NAME_HASH_BYTES;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use subtle::ConstantTimeEq;

/// Version byte of the layout above.
pub const FORMAT: u8 = 3;
const SUFFIX_AT: usize = 1;
const SUFFIX: usize = 32 - NAME_HASH_BYTES;
/// Format, hash suffix, flags: the shortest entry before its trailer.
const HEAD: usize = SUFFIX_AT + SUFFIX + 1;

const F_DEFAULT: u8 = 1;
const F_INACTIVE: u8 = 2;
const F_SECRET: u8 = 4;
const F_PREVIOUS: u8 = 8;
const F_LIMIT: u8 = 0x10;
const F_EXPIRES: u8 = 0x20;
const F_ENVIRONMENT: u8 = 0x40;
const F_MORE: u8 = 0x80;

// More flags (their own byte, only when [`F_MORE`] is set).
const L_LIMITS: u8 = 1;
const L_PLAN: u8 = 2;
const L_TENANT: u8 = 4;
const L_CREDITS: u8 = 8;

/// Scopes stored as bits (in this order) when a key's scopes are these.
const STANDARD_SCOPES: [&str; 3] = ["read", "write", "admin"];
/// The scopes byte of a list of names.
const S_NAMED: u8 = 0x80;

/// The trailer's last byte: set when the single window's state is there.
const C_WINDOW: u8 = 0x80;
/// Most counters the trailer holds besides the single window's.
const MAX_COUNTERS: usize = 0x7f;

/// Optional fields after the lists, each behind its tag (absent: not set).
pub const T_OWNER: u8 = 1;
pub const T_PREVIOUS_KEY: u8 = 2;
pub const T_METADATA: u8 = 3;

/// Version byte of an alias entry (a rolled key's old value).
pub const ALIAS: u8 = 0xa1;

fn put_str(out: &mut Vec<u8>, s: &str) {
    // A varint length: one byte up to 127, two for the longest values
    // (metadata values up to 256 characters, names up to 128).
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// LEB128: 7 bits a byte, low bits first.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a [`put_varint`] from the front of `bytes`; None past its end,
/// past 64 bits, or for any encoding [`put_varint`] does not write: one
/// encoding per value, as for the rest of an entry (no bits dropped from a
/// tenth byte, no zero last byte padding a shorter value).
pub(crate) fn take_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (b, rest) = bytes.split_first()?;
        *bytes = rest;
        let low = u64::from(b & 0x7f);
        // The tenth byte carries bit 63 alone.
        if shift == 63 && low > 1 {
            return None;
        }
        v |= low << shift;
        if b & 0x80 == 0 {
            return (shift == 0 || low != 0).then_some(v);
        }
    }
    None
}

fn put_scopes(out: &mut Vec<u8>, scopes: &[String]) {
    // Bits when the scopes are standard names in their order (so the
    // scopes header sent upstream reads the same); names otherwise.
    let bits = scopes.iter().try_fold((0u8, 0usize), |(bits, next), s| {
        let at = STANDARD_SCOPES.iter().position(|x| x == s)?;
        (at >= next).then_some((bits | 1 << at, at + 1))
    });
    match bits {
        Some((bits, _)) => out.push(bits),
        None => {
            let n = scopes.len().min(usize::from(!S_NAMED));
            out.push(S_NAMED | n as u8);
            for s in scopes.iter().take(n) {
                put_str(out, s);
            }
        }
    }
}

fn put_net(out: &mut Vec<u8>, net: &IpNet) {
    let len = net.prefix_len();
    let covered = usize::from(len).div_ceil(8);
    match net {
        IpNet::V4(n) => {
            out.push(len);
            out.extend_from_slice(n.network().octets().get(..covered).unwrap_or_default());
        }
        IpNet::V6(n) => {
            out.push(33 + len);
            out.extend_from_slice(n.network().octets().get(..covered).unwrap_or_default());
        }
    }
}

/// The counters trailer: `others` (tag, value), then the window's state.
fn put_counters<'a>(
    out: &mut Vec<u8>,
    window: Option<u64>,
    others: impl Iterator<Item = &'a (u8, u64)>,
) {
    let mut n = 0u8;
    for (tag, v) in others.filter(|(t, _)| *t != 0).take(MAX_COUNTERS) {
        out.push(*tag);
        out.extend_from_slice(&v.to_le_bytes());
        n += 1;
    }
    if let Some(tat) = window {
        out.extend_from_slice(&tat.to_le_bytes());
        n |= C_WINDOW;
    }
    out.push(n);
}

/// The entry for a validated credential, counters unused (or those seeded
/// from the request log).
pub fn encode(c: &Credential) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(FORMAT);
    out.extend_from_slice(c.key_hash.get(NAME_HASH_BYTES..).unwrap_or_default());
    let more = [
        (!c.limits.is_empty(), L_LIMITS),
        (c.plan.is_some(), L_PLAN),
        (c.tenant_limits, L_TENANT),
        (c.credits.is_some(), L_CREDITS),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .fold(0, |acc, (_, f)| acc | f);
    let flags = [
        (c.kind == Kind::Default, F_DEFAULT),
        (!c.active, F_INACTIVE),
        (c.secret_hash.is_some(), F_SECRET),
        (c.previous_secret.is_some(), F_PREVIOUS),
        (c.rate_limit.is_some(), F_LIMIT),
        (c.expires_at.is_some(), F_EXPIRES),
        (c.environment != "live", F_ENVIRONMENT),
        (more != 0, F_MORE),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .fold(0, |acc, (_, f)| acc | f);
    out.push(flags);
    if more != 0 {
        out.push(more);
    }
    if let Some(h) = &c.secret_hash {
        out.extend_from_slice(h);
    }
    if let Some((h, until)) = &c.previous_secret {
        out.extend_from_slice(h);
        put_varint(&mut out, *until);
    }
    if let Some(l) = &c.rate_limit {
        put_varint(&mut out, u64::from(l.requests));
        put_varint(&mut out, u64::from(l.window_secs));
    }
    if let Some(at) = c.expires_at {
        put_varint(&mut out, at);
    }
    put_str(&mut out, &c.key_id);
    put_str(&mut out, &c.tenant);
    if flags & F_ENVIRONMENT != 0 {
        put_str(&mut out, &c.environment);
    }
    put_scopes(&mut out, &c.scopes);
    let ips = c.allowed_ips.len().min(MAX_ALLOWED_IPS);
    put_varint(&mut out, ips as u64);
    for net in c.allowed_ips.iter().take(ips) {
        put_net(&mut out, net);
    }
    if !c.limits.is_empty() {
        out.extend_from_slice(&crate::limits::encode_plan(&c.limits));
    }
    if let Some(plan) = &c.plan {
        put_str(&mut out, plan);
    }
    if let Some(cr) = &c.credits {
        put_varint(&mut out, cr.balance);
        put_varint(&mut out, u64::from(cr.serial));
        out.push(u8::from(cr.monthly));
        put_varint(&mut out, cr.granted_at);
    }
    put_tagged(&mut out, c);
    // No counters yet, or those seeded from the request log.
    put_counters(&mut out, None, c.seed.0.iter());
    out
}

fn put_tagged(out: &mut Vec<u8>, c: &Credential) {
    if let Some(owner) = &c.owner {
        out.push(T_OWNER);
        put_str(out, owner);
    }
    if let Some((h, until)) = &c.previous_key {
        out.push(T_PREVIOUS_KEY);
        out.extend_from_slice(h);
        put_varint(out, *until);
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
    let mut out = Vec::with_capacity(1 + SUFFIX + 32);
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
    let suffix = r.take(SUFFIX)?;
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
    fn varint(&mut self) -> Option<u64> {
        take_varint(&mut self.0)
    }
    fn u32(&mut self) -> Option<u32> {
        u32::try_from(self.varint()?).ok()
    }
    fn string(&mut self) -> Option<String> {
        let len = usize::try_from(self.varint()?).ok()?;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
    fn scopes(&mut self) -> Option<Vec<String>> {
        let b = self.byte()?;
        if b & S_NAMED != 0 {
            return (0..b & !S_NAMED).map(|_| self.string()).collect();
        }
        if usize::from(b) >> STANDARD_SCOPES.len() != 0 {
            return None;
        }
        Some(
            STANDARD_SCOPES
                .iter()
                .enumerate()
                .filter(|(i, _)| b >> i & 1 != 0)
                .map(|(_, s)| (*s).to_owned())
                .collect(),
        )
    }
    fn net(&mut self) -> Option<IpNet> {
        let code = self.byte()?;
        let net = if code <= 32 {
            let mut a = [0u8; 4];
            let k = usize::from(code).div_ceil(8);
            a.get_mut(..k)?.copy_from_slice(self.take(k)?);
            IpNet::V4(Ipv4Net::new(a.into(), code).ok()?)
        } else {
            let len = code - 33;
            let mut a = [0u8; 16];
            let k = usize::from(len).div_ceil(8);
            a.get_mut(..k)?.copy_from_slice(self.take(k)?);
            IpNet::V6(Ipv6Net::new(a.into(), len).ok()?)
        };
        // As `crate::ip_rules::parse_allowed` requires: no host bits.
        (net.trunc() == net).then_some(net)
    }
}

/// The counters trailer that ends a credential entry: where it starts, the
/// single window's state, and the other counters' bytes (9 each).
struct Trailer<'a> {
    start: usize,
    window: Option<u64>,
    others: &'a [u8],
}

fn trailer(bytes: &[u8]) -> Option<Trailer<'_>> {
    if bytes.first() != Some(&FORMAT) {
        return None;
    }
    let last = *bytes.last()?;
    let n = usize::from(last & !C_WINDOW);
    let window_len = if last & C_WINDOW != 0 { 8 } else { 0 };
    let end = bytes.len() - 1;
    let start = end.checked_sub(9 * n + window_len)?;
    if start < HEAD {
        return None;
    }
    let window = match bytes.get(end - window_len..end)? {
        [] => None,
        w => Some(u64::from_le_bytes(w.try_into().ok()?)),
    };
    Some(Trailer {
        start,
        window,
        others: bytes.get(start..end - window_len)?,
    })
}

/// The credential stored in `bytes` under the name of `hash`; None for a
/// deleted, corrupt or foreign entry (one whose other hash bytes differ:
/// two keys sharing a 15-byte prefix).
pub fn decode(bytes: &[u8], hash: &Digest) -> Option<Credential> {
    let t = trailer(bytes)?;
    let mut r = Reader(bytes.get(..t.start)?);
    r.byte()?;
    let suffix = r.take(SUFFIX)?;
    if !bool::from(suffix.ct_eq(hash.get(NAME_HASH_BYTES..)?)) {
        return None;
    }
    let flags = r.byte()?;
    let on = |f: u8| flags & f != 0;
    let more = if on(F_MORE) { r.byte()? } else { 0 };
    // A more-flags byte is written only when it has a flag set.
    if (on(F_MORE) && more == 0) || more & !(L_LIMITS | L_PLAN | L_TENANT | L_CREDITS) != 0 {
        return None;
    }
    let secret_hash = if on(F_SECRET) {
        Some(hex::encode(r.take(32)?))
    } else {
        None
    };
    let (previous_secret_hash, previous_secret_expires_at) = if on(F_PREVIOUS) {
        (Some(hex::encode(r.take(32)?)), Some(r.varint()?))
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
    let expires_at = if on(F_EXPIRES) {
        Some(r.varint()?)
    } else {
        None
    };
    let key_id = r.string()?;
    let tenant = r.string()?;
    let environment = if on(F_ENVIRONMENT) {
        // "live" is the flag's absence: one encoding per credential.
        Some(r.string()?).filter(|e| e != "live")?
    } else {
        "live".to_owned()
    };
    let scopes = r.scopes()?;
    let ips = usize::try_from(r.varint()?).ok()?;
    if ips > MAX_ALLOWED_IPS {
        return None;
    }
    let allowed_ips = (0..ips).map(|_| r.net()).collect::<Option<Vec<_>>>()?;
    let limits = if more & L_LIMITS != 0 {
        let n = usize::from(*r.0.first()?);
        crate::limits::decode_plan(r.take(1 + 5 * n))?
    } else {
        vec![]
    };
    let plan = if more & L_PLAN != 0 {
        Some(r.string()?)
    } else {
        None
    };
    let credits = if more & L_CREDITS != 0 {
        Some(crate::limits::Credits {
            balance: r.varint()?,
            serial: r.u32()?,
            monthly: match r.byte()? {
                0 => false,
                1 => true,
                _ => return None,
            },
            granted_at: r.varint()?,
        })
    } else {
        None
    };
    // Then the tagged fields, up to the counters trailer.
    let (mut owner, mut previous_key, mut metadata) = (None, None, Default::default());
    let mut last_tag = 0;
    while !r.0.is_empty() {
        let tag = r.byte()?;
        // Each tag once, in order: one encoding per credential.
        if tag <= last_tag {
            return None;
        }
        last_tag = tag;
        match tag {
            T_OWNER => owner = Some(r.string()?),
            T_PREVIOUS_KEY => previous_key = Some((r.array::<32>()?, r.varint()?)),
            T_METADATA => {
                metadata = (0..r.byte()?)
                    .map(|_| Some((r.string()?, r.string()?)))
                    .collect::<Option<_>>()?;
            }
            _ => return None,
        }
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
        // Checked above as `parse_allowed` checks them, and set below:
        // already binary, no need to print and parse them again.
        allowed_ips: vec![],
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
        tenant_limits: more & L_TENANT != 0,
        quota_used: vec![],
        credits,
    };
    // Validated again: the entry came from the host.
    let cred = Credential::try_from(&record).ok()?;
    Some(Credential {
        allowed_ips,
        ..cred
    })
}

/// The rate-limit state an entry holds: None for a deleted or foreign one,
/// Some(None) for a counter not used yet.
pub fn tat(bytes: &[u8]) -> Option<Option<u64>> {
    trailer(bytes).map(|t| t.window)
}

/// `bytes` with its rate-limit state replaced (None when it is no entry).
pub fn with_tat(bytes: &[u8], tat: u64) -> Option<Vec<u8>> {
    let t = trailer(bytes)?;
    let mut out = Vec::with_capacity(t.start + t.others.len() + 9);
    out.extend_from_slice(bytes.get(..t.start)?);
    out.extend_from_slice(t.others);
    out.extend_from_slice(&tat.to_le_bytes());
    out.push((t.others.len() / 9) as u8 | C_WINDOW);
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
        .copy_from_slice(bytes.get(SUFFIX_AT..SUFFIX_AT + SUFFIX)?);
    Some(hash)
}

/// Everything but the counters: what a parsed copy depends on.
pub fn record_bytes(bytes: &[u8]) -> Option<&[u8]> {
    bytes.get(..trailer(bytes)?.start)
}

/// Every counter an entry holds: the single window's state (tag 0) and the
/// trailer's others. None for a deleted or foreign entry.
pub fn counters(bytes: &[u8]) -> Option<Counters> {
    let t = trailer(bytes)?;
    let mut c: CounterList = t.window.map(|w| (0, w)).into_iter().collect();
    if !t.others.is_empty() {
        c.extend(
            Counters::decode(Some(t.others))
                .0
                .into_iter()
                .filter(|(t, _)| *t != 0),
        );
    }
    Some(Counters(c))
}

/// `bytes` with its counters replaced (None when it is no entry). The
/// trailer is rewritten to exactly these counters.
pub fn with_counters(bytes: &[u8], counters: &Counters) -> Option<Vec<u8>> {
    let t = trailer(bytes)?;
    let mut out = Vec::with_capacity(t.start + 9 * counters.0.len() + 1);
    out.extend_from_slice(bytes.get(..t.start)?);
    // Without the window's state, the one held stays (as the other
    // counters, it only ever goes on).
    put_counters(&mut out, counters.get(0).or(t.window), counters.0.iter());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::sha256;
    use smallvec::smallvec;

    fn record(extra: impl FnOnce(&mut CredentialRecord)) -> CredentialRecord {
        let mut r = crate::testing::record("bench-key-1", "t199999");
        r.key_id = "bench-0000001".into();
        r.allowed_ips = vec!["127.0.0.0/8".into()];
        r.rate_limit = Some(RateLimit {
            requests: 1_000_000_000,
            window_secs: 60,
        });
        extra(&mut r);
        r
    }

    fn cred(extra: impl FnOnce(&mut CredentialRecord)) -> Credential {
        Credential::try_from(&record(extra)).unwrap()
    }

    fn round_trips(c: &Credential) {
        let bytes = encode(c);
        assert_eq!(decode(&bytes, &c.key_hash).as_ref(), Some(c), "{bytes:?}");
    }

    #[test]
    fn every_field_round_trips() {
        let full = cred(|r| {
            r.secret_hash = Some(hex::encode(sha256(b"s")));
            r.previous_secret_hash = Some(hex::encode(sha256(b"old")));
            r.previous_secret_expires_at = Some(1_800_000_000);
            r.kind = Kind::Default;
            r.environment = "test".into();
            r.scopes = vec!["read".into(), "write".into(), "billing:export".into()];
            r.allowed_ips = vec![
                "10.0.0.0/8".into(),
                "2001:db8::/32".into(),
                "192.168.1.7".into(),
                "::1".into(),
                "172.16.0.0/12".into(),
                "0.0.0.0/0".into(),
                "::/0".into(),
            ];
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
                balance: u64::from(u32::MAX),
                serial: u32::MAX,
                monthly: true,
                granted_at: u64::MAX,
            });
        });
        for c in [cred(|_| {}), full, cred(|r| r.rate_limit = None)] {
            round_trips(&c);
        }
    }

    #[test]
    fn the_bench_entry_fits_a_64_byte_heap_block_used_or_not() {
        // Envoy's value is a libc++ string: a heap block of (n + 16) & !15
        // bytes for n over 22, so n ≤ 63 is the 64-byte class; the slot
        // header (`crate::sync::encode_slots`) takes 2 bytes of it.
        let c = cred(|_| {});
        let bytes = encode(&c);
        assert_eq!(bytes.len(), 52, "{bytes:?}");
        let used = with_tat(&bytes, u64::MAX).unwrap();
        assert_eq!(used.len(), 60);
        assert!(2 + used.len() <= 63);
        assert_eq!(crate::shared_data::credential_key(&c.key_hash).len(), 22);
    }

    #[test]
    fn standard_scopes_are_one_byte_and_any_other_list_keeps_its_order() {
        let size = |scopes: &[&str]| {
            let c = cred(|r| r.scopes = scopes.iter().map(|s| (*s).to_owned()).collect());
            round_trips(&c);
            encode(&c).len()
        };
        let base = size(&[]);
        assert_eq!(size(&["read"]), base);
        assert_eq!(size(&["read", "write", "admin"]), base);
        assert_eq!(size(&["write", "admin"]), base);
        // Another order is sent upstream as written: stored as names.
        assert_eq!(size(&["write", "read"]), base + 11);
        assert_eq!(size(&["read", "read"]), base + 10);
        assert_eq!(size(&["orders"]), base + 7);
        assert_eq!(size(&["read", "orders"]), base + 12);
        // Bits beyond the three standard scopes are refused.
        let c = cred(|r| r.scopes = vec![]);
        let mut bytes = encode(&c);
        let at = 1 + SUFFIX + 1 + 6 + 14 + 8;
        assert_eq!(bytes[at], 0);
        bytes[at] = 8;
        assert_eq!(decode(&bytes, &c.key_hash), None);
        bytes[at] = 7;
        assert!(decode(&bytes, &c.key_hash).is_some());
    }

    #[test]
    fn every_prefix_length_round_trips_and_costs_the_bytes_it_covers() {
        let plain = encode(&cred(|r| r.allowed_ips = vec![])).len();
        for len in 0..=32u8 {
            let net = format!(
                "{}/{len}",
                Ipv4Net::new([255; 4].into(), len)
                    .unwrap()
                    .trunc()
                    .network()
            );
            let c = cred(|r| r.allowed_ips = vec![net]);
            round_trips(&c);
            assert_eq!(encode(&c).len(), plain + 1 + usize::from(len).div_ceil(8));
        }
        for len in 0..=128u8 {
            let net = Ipv6Net::new([0xffff; 8].into(), len)
                .unwrap()
                .trunc()
                .to_string();
            let c = cred(|r| r.allowed_ips = vec![net]);
            round_trips(&c);
            assert_eq!(encode(&c).len(), plain + 1 + usize::from(len).div_ceil(8));
        }
        let most: Vec<String> = (0..MAX_ALLOWED_IPS)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
            .collect();
        round_trips(&cred(|r| r.allowed_ips = most));
    }

    #[test]
    fn a_network_with_host_bits_or_a_bad_prefix_is_refused() {
        let c = cred(|r| r.allowed_ips = vec!["10.0.0.0/7".into()]);
        let bytes = encode(&c);
        let at = bytes.iter().rposition(|b| *b == 7).unwrap();
        assert_eq!(bytes[at + 1], 10);
        let mut host_bits = bytes.clone();
        host_bits[at + 1] = 11;
        assert_eq!(decode(&host_bits, &c.key_hash), None);
        let mut bad_prefix = bytes.clone();
        bad_prefix[at] = 33 + 129;
        assert_eq!(decode(&bad_prefix, &c.key_hash), None);
    }

    #[test]
    fn live_is_the_environment_flag_absent() {
        let live = cred(|_| {});
        let test = cred(|r| r.environment = "test".into());
        assert_eq!(encode(&test).len(), encode(&live).len() + 5);
        round_trips(&test);
        // "live" written out is not this layout's encoding of it.
        let mut bytes = encode(&cred(|r| r.environment = "lave".into()));
        let at = bytes.windows(4).position(|w| w == b"lave").unwrap();
        bytes[at + 1] = b'i';
        assert_eq!(decode(&bytes, &live.key_hash), None);
    }

    #[test]
    fn a_key_sharing_the_name_prefix_is_not_found() {
        let c = cred(|_| {});
        let bytes = encode(&c);
        let mut other = c.key_hash;
        other[31] ^= 1;
        let name = crate::shared_data::credential_key;
        assert_eq!(name(&other), name(&c.key_hash));
        assert_eq!(decode(&bytes, &other), None);
    }

    #[test]
    fn the_name_prefix_and_the_entry_give_back_the_full_hash() {
        let c = cred(|_| {});
        let bytes = with_tat(&encode(&c), 9).unwrap();
        let prefix = crate::shared_data::name_prefix(&c.key_hash);
        assert_eq!(full_hash(prefix, &bytes), Some(c.key_hash));
        assert_eq!(full_hash(prefix, b""), None);
        assert_eq!(full_hash(&c.key_hash, &bytes), None);
        assert_eq!(full_hash(prefix, bytes.get(..10).unwrap()), None);
    }

    #[test]
    fn the_counter_starts_unused_and_survives_in_place() {
        let c = cred(|_| {});
        let bytes = encode(&c);
        assert_eq!(tat(&bytes), Some(None));
        let used = with_tat(&bytes, 42).unwrap();
        assert_eq!(tat(&used), Some(Some(42)));
        assert_eq!(tat(&with_tat(&used, 43).unwrap()), Some(Some(43)));
        assert_eq!(record_bytes(&used), record_bytes(&bytes));
        assert_eq!(decode(&used, &c.key_hash), Some(c));
        assert_eq!(tat(b""), None);
        assert_eq!(with_tat(b"", 1), None);
    }

    #[test]
    fn each_optional_field_round_trips_alone() {
        let variants: [fn(&mut CredentialRecord); 10] = [
            |r| r.owner = Some("svc:billing".into()),
            |r| {
                r.previous_key_hash = Some(hex::encode(sha256(b"old")));
                r.previous_key_expires_at = Some(5);
            },
            |r| r.metadata = [("tier".into(), "1".into())].into_iter().collect(),
            |r| r.secret_hash = Some(hex::encode(sha256(b"s"))),
            |r| r.expires_at = Some(0),
            |r| r.kind = Kind::Default,
            |r| r.limits = vec!["5/s".parse().unwrap()],
            |r| r.plan = Some("free".into()),
            |r| r.tenant_limits = true,
            |r| {
                r.credits = Some(crate::limits::Credits {
                    balance: 0,
                    serial: 0,
                    monthly: false,
                    granted_at: 0,
                })
            },
        ];
        for v in variants {
            round_trips(&cred(v));
        }
    }

    #[test]
    fn the_longest_values_round_trip_whole() {
        let c = cred(|r| {
            r.key_id = "k".repeat(128);
            r.owner = Some("o".repeat(crate::credential::MAX_OWNER_LEN));
            r.metadata = [(
                "m".repeat(64),
                "v".repeat(crate::credential::MAX_METADATA_VALUE_LEN),
            )]
            .into_iter()
            .collect();
        });
        round_trips(&c);
    }

    #[test]
    fn an_owner_costs_its_length_and_two_bytes() {
        let plain = cred(|_| {});
        let owned = cred(|r| r.owner = Some("alice".into()));
        assert_eq!(encode(&owned).len(), encode(&plain).len() + 2 + 5);
    }

    #[test]
    fn repeated_or_unknown_tags_and_flags_are_refused() {
        let c = cred(|r| r.owner = Some("a".into()));
        let bytes = encode(&c);
        // Tagged fields sit before the counters trailer (here its count
        // byte alone): insert there, as an encoder would have written them.
        let before_trailer = |b: &[u8], extra: &[u8]| {
            let mut out = b.to_vec();
            let at = out.len() - 1;
            out.splice(at..at, extra.iter().copied());
            out
        };
        assert!(decode(&before_trailer(&bytes, &[]), &c.key_hash).is_some());
        let twice = before_trailer(&bytes, &[T_OWNER, 1, b'b']);
        assert_eq!(decode(&twice, &c.key_hash), None);
        let plain = encode(&cred(|_| {}));
        let unknown = before_trailer(&plain, &[0x7f, 0]);
        assert_eq!(decode(&unknown, &c.key_hash), None);
        // A more-flags byte with no flag, or an unknown one.
        let mut more = plain.clone();
        more[1 + SUFFIX] |= F_MORE;
        for extra in [0, 0x10] {
            let mut b = more.clone();
            b.insert(1 + SUFFIX + 1, extra);
            assert_eq!(decode(&b, &c.key_hash), None);
        }
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
        assert_eq!(counters(&alias), None);
        let c = cred(|_| {});
        assert_eq!(alias_target(&encode(&c), &c.key_hash), None);
    }

    #[test]
    fn counters_grow_the_trailer_only_and_never_change_the_record() {
        let c = cred(|r| r.limits = vec!["10/s".parse().unwrap(), "100/day".parse().unwrap()]);
        let bytes = encode(&c);
        assert_eq!(counters(&bytes), Some(Counters::default()));
        let used = Counters(smallvec![(0, 7), (1, 99), (4, 5)]);
        let written = with_counters(&bytes, &used).unwrap();
        assert_eq!(written.len(), bytes.len() + 8 + 18);
        assert_eq!(counters(&written), Some(used));
        assert_eq!(record_bytes(&written), record_bytes(&bytes));
        assert_eq!(decode(&written, &c.key_hash), Some(c.clone()));
        // Counters without the window's state keep the one held.
        let others = Counters(smallvec![(1, 100)]);
        let kept = with_counters(&written, &others).unwrap();
        assert_eq!(counters(&kept), Some(Counters(smallvec![(0, 7), (1, 100)])));
        // The single window used: eight bytes more, no tag.
        let plain = encode(&cred(|_| {}));
        let once = with_counters(&plain, &Counters(smallvec![(0, 9)])).unwrap();
        assert_eq!(once.len(), plain.len() + 8);
        assert_eq!(tat(&once), Some(Some(9)));
        assert_eq!(counters(&once), Some(Counters(smallvec![(0, 9)])));
    }

    #[test]
    fn seeded_counters_start_in_the_trailer() {
        let c = cred(|r| {
            r.limits = vec!["100/day".parse().unwrap()];
            r.quota_used = vec![crate::limits::QuotaUsed {
                period: crate::limits::QuotaPeriod::Day,
                since: 1_700_000_000,
                used: 12,
            }];
        });
        let bytes = encode(&c);
        let held = counters(&bytes).unwrap();
        assert_eq!(held.0.len(), 1, "{held:?}");
        assert_eq!(tat(&bytes), Some(None));
        // The record read back has no seed of its own: it lives in the trailer.
        let back = decode(&bytes, &c.key_hash).unwrap();
        assert_eq!(back.key_id, c.key_id);
    }

    #[test]
    fn a_varint_reads_back_only_as_put_varint_writes_it() {
        let read = |b: &[u8]| {
            let mut rest = b;
            take_varint(&mut rest).filter(|_| rest.is_empty())
        };
        for v in [
            0,
            1,
            127,
            128,
            300,
            u64::from(u32::MAX),
            u64::MAX >> 1,
            u64::MAX,
        ] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(read(&b), Some(v), "{b:?}");
        }
        let mut max = vec![0xff; 9];
        max.push(0x01);
        assert_eq!(read(&max), Some(u64::MAX));
        // A tenth byte above 1 would drop its bits: another value's bytes.
        for last in [0x02, 0x03, 0x7f] {
            *max.last_mut().unwrap() = last;
            assert_eq!(read(&max), None, "{last:#x}");
        }
        // Eleven bytes, and a zero last byte padding a shorter value.
        assert_eq!(read(&[0xff; 11]), None);
        for padded in [&[0x80, 0x00][..], &[0x81, 0x00], &[0xac, 0x82, 0x00]] {
            assert_eq!(read(padded), None, "{padded:?}");
        }
        assert_eq!(read(&[0xac, 0x02]), Some(300));
    }

    #[test]
    fn truncated_or_padded_entries_are_refused() {
        for c in [cred(|_| {}), cred(|r| r.owner = Some("o".into()))] {
            let bytes = with_tat(&encode(&c), 77).unwrap();
            for n in 0..bytes.len() {
                assert_eq!(decode(bytes.get(..n).unwrap(), &c.key_hash), None, "{n}");
            }
            let mut padded = bytes.clone();
            padded.push(0);
            assert_eq!(decode(&padded, &c.key_hash), None);
        }
    }
}
