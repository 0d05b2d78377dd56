//! Key management: the changes the CLI makes to a [`Snapshot`]. Keys and
//! secrets are generated here, shown once by the caller, and only their
//! SHA-256 hashes are kept.

use crate::store::{Snapshot, StoredKey};
use base64::Engine as _;
use keygate_core::credential::{Kind, Status};
use keygate_core::hash::{sha256, to_hex};
use keygate_core::ip_rules::parse_allowed;
use keygate_core::rate_limit::RateLimit;
use keygate_core::CredentialRecord;
use serde::Serialize;

/// 32 bytes from the OS CSPRNG as 64 lowercase hex digits.
pub fn random_hex32() -> Result<String, String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| format!("no randomness from the OS: {e}"))?;
    Ok(hex::encode(b))
}

fn random_suffix() -> Result<String, String> {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).map_err(|e| format!("no randomness from the OS: {e}"))?;
    Ok(hex::encode(b))
}

pub struct NewKey {
    pub key_id: Option<String>,
    pub tenant: String,
    pub environment: String,
    pub kind: Kind,
    pub scopes: Vec<String>,
    pub allowed_ips: Vec<String>,
    pub rate_limit: Option<RateLimit>,
    pub expires_at: Option<u64>,
    pub with_secret: bool,
}

/// What `key create` shows, exactly once.
#[derive(Serialize)]
pub struct Created {
    pub key_id: String,
    pub tenant: String,
    pub environment: String,
    pub kind: Kind,
    pub scopes: Vec<String>,
    pub api_key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization_basic: Option<String>,
}

pub fn basic_header(key: &str, secret: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:{secret}"))
    )
}

fn check_scopes(scopes: &[String]) -> Result<(), String> {
    scopes
        .iter()
        .try_for_each(|s| keygate_core::scope::check_scope_name(s))
}

fn check_ips(ips: &[String]) -> Result<(), String> {
    ips.iter().try_for_each(|s| parse_allowed(s).map(|_| ()))
}

pub fn create(snap: &mut Snapshot, new: NewKey, now: u64) -> Result<Created, String> {
    check_scopes(&new.scopes)?;
    check_ips(&new.allowed_ips)?;
    if new.kind == Kind::Scoped && new.scopes.is_empty() {
        return Err(
            "a scoped key needs at least one --scope (or use --kind default for full access)"
                .into(),
        );
    }
    if new.expires_at.is_some_and(|t| t <= now) {
        return Err("--expires is in the past".into());
    }
    let key_id = match new.key_id {
        Some(id) => id,
        None => format!("{}-{}", new.tenant, random_suffix()?),
    };
    if snap.find(&key_id).is_some() {
        return Err(format!("a key with id '{key_id}' already exists"));
    }
    let api_key = random_hex32()?;
    let secret = new.with_secret.then(random_hex32).transpose()?;
    let record = CredentialRecord {
        key_id: key_id.clone(),
        key_hash: to_hex(&sha256(api_key.as_bytes())),
        secret_hash: secret.as_ref().map(|s| to_hex(&sha256(s.as_bytes()))),
        previous_secret_hash: None,
        previous_secret_expires_at: None,
        kind: new.kind,
        tenant: new.tenant.clone(),
        environment: new.environment.clone(),
        scopes: new.scopes.clone(),
        allowed_ips: new.allowed_ips,
        rate_limit: new.rate_limit,
        status: Status::Active,
        expires_at: new.expires_at,
    };
    keygate_core::Credential::try_from(&record).map_err(|e| e.to_string())?;
    snap.keys.push(StoredKey {
        created_at: now,
        updated_at: now,
        record,
    });
    Ok(Created {
        authorization_basic: secret.as_ref().map(|s| basic_header(&api_key, s)),
        key_id,
        tenant: new.tenant,
        environment: new.environment,
        kind: new.kind,
        scopes: new.scopes,
        api_key,
        secret,
    })
}

/// Replaces the secret; with a grace period the old one keeps working until then.
pub fn rotate_secret(
    snap: &mut Snapshot,
    key_id: &str,
    grace_secs: u64,
    now: u64,
) -> Result<String, String> {
    let k = snap.find_mut(key_id)?;
    let Some(old) = k.record.secret_hash.clone() else {
        return Err(format!(
            "key '{key_id}' has no secret (create it with --with-secret)"
        ));
    };
    let secret = random_hex32()?;
    k.record.secret_hash = Some(to_hex(&sha256(secret.as_bytes())));
    if grace_secs > 0 {
        k.record.previous_secret_hash = Some(old);
        k.record.previous_secret_expires_at = Some(now + grace_secs);
    } else {
        k.record.previous_secret_hash = None;
        k.record.previous_secret_expires_at = None;
    }
    k.updated_at = now;
    Ok(secret)
}

/// Removes the key: from the next push on, it is unknown (401).
pub fn revoke(snap: &mut Snapshot, key_id: &str) -> Result<StoredKey, String> {
    let i = snap
        .keys
        .iter()
        .position(|k| k.record.key_id == key_id)
        .ok_or_else(|| format!("no key with id '{key_id}'"))?;
    Ok(snap.keys.remove(i))
}

pub fn set_status(
    snap: &mut Snapshot,
    key_id: &str,
    status: Status,
    now: u64,
) -> Result<(), String> {
    let k = snap.find_mut(key_id)?;
    k.record.status = status;
    k.updated_at = now;
    Ok(())
}

pub fn allow_ip(
    snap: &mut Snapshot,
    key_id: &str,
    cidr: &str,
    add: bool,
    now: u64,
) -> Result<(), String> {
    let net = parse_allowed(cidr)?.to_string();
    let k = snap.find_mut(key_id)?;
    let ips = &mut k.record.allowed_ips;
    let present = ips
        .iter()
        .any(|s| parse_allowed(s).map(|n| n.to_string()).as_deref() == Ok(net.as_str()));
    match (add, present) {
        (true, true) => return Err(format!("{net} is already allowed for '{key_id}'")),
        (true, false) => ips.push(net),
        (false, false) => return Err(format!("{net} is not in the allowlist of '{key_id}'")),
        (false, true) => {
            ips.retain(|s| parse_allowed(s).map(|n| n.to_string()).as_deref() != Ok(net.as_str()))
        }
    }
    k.updated_at = now;
    Ok(())
}

pub fn set_scopes(
    snap: &mut Snapshot,
    key_id: &str,
    scopes: Vec<String>,
    now: u64,
) -> Result<(), String> {
    check_scopes(&scopes)?;
    let k = snap.find_mut(key_id)?;
    if k.record.kind == Kind::Scoped && scopes.is_empty() {
        return Err("a scoped key needs at least one scope".into());
    }
    k.record.scopes = scopes;
    k.updated_at = now;
    Ok(())
}

/// Refuses the session's tokens issued until now; older revocations than
/// any token can live are dropped on the way.
pub fn revoke_session(
    snap: &mut Snapshot,
    key_id: &str,
    session_id: &str,
    now_ms: u64,
) -> Result<(), String> {
    snap.find(key_id)
        .ok_or_else(|| format!("no key with id '{key_id}'"))?;
    if !session_id.is_empty() {
        keygate_core::credential::check_name("session", session_id).map_err(|e| e.to_string())?;
    }
    let horizon = now_ms.saturating_sub(keygate_core::token::MAX_LIFETIME_SECS * 1000);
    snap.revoked_sessions.retain(|r| {
        r.revoked_at_ms >= horizon && !(r.key_id == key_id && r.session_id == session_id)
    });
    snap.revoked_sessions
        .push(keygate_core::sync::RevokedSession {
            key_id: key_id.to_owned(),
            session_id: session_id.to_owned(),
            revoked_at_ms: now_ms,
        });
    Ok(())
}

/// `100/60s`, `100/min`, `5000/1h`, `10/sec`.
pub fn parse_rate(s: &str) -> Result<RateLimit, String> {
    let (n, per) = s
        .split_once('/')
        .ok_or_else(|| format!("rate '{s}' should look like 100/60s or 100/min"))?;
    let requests: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("rate '{s}': '{n}' is not a whole number"))?;
    let window_secs = match per.trim() {
        "s" | "sec" | "second" => 1,
        "m" | "min" | "minute" => 60,
        "h" | "hour" => 3600,
        "d" | "day" => 86_400,
        d => humantime::parse_duration(d)
            .map_err(|e| format!("rate '{s}': {e}"))?
            .as_secs(),
    };
    let limit = RateLimit {
        requests,
        window_secs: u32::try_from(window_secs).unwrap_or(u32::MAX),
    };
    limit.validate().map_err(|e| format!("rate '{s}': {e}"))?;
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_key(tenant: &str, kind: Kind) -> NewKey {
        NewKey {
            key_id: None,
            tenant: tenant.into(),
            environment: "live".into(),
            kind,
            scopes: if kind == Kind::Scoped {
                vec!["read".into()]
            } else {
                vec![]
            },
            allowed_ips: vec![],
            rate_limit: None,
            expires_at: None,
            with_secret: false,
        }
    }

    #[test]
    fn created_key_is_random_hex_and_only_its_hash_is_stored() {
        let mut snap = Snapshot::default();
        let a = create(&mut snap, new_key("acme", Kind::Scoped), 10).unwrap();
        let b = create(&mut snap, new_key("acme", Kind::Scoped), 10).unwrap();
        assert_ne!(a.api_key, b.api_key);
        assert!(keygate_core::hash::is_hex64(a.api_key.as_bytes()));
        let stored = serde_json::to_string(&snap).unwrap();
        assert!(!stored.contains(&a.api_key));
        assert!(stored.contains(&to_hex(&sha256(a.api_key.as_bytes()))));
        assert!(a.key_id.starts_with("acme-"));
    }

    #[test]
    fn with_secret_gives_a_basic_header_and_stores_the_secret_hash() {
        let mut snap = Snapshot::default();
        let c = create(
            &mut snap,
            NewKey {
                with_secret: true,
                ..new_key("acme", Kind::Scoped)
            },
            10,
        )
        .unwrap();
        let secret = c.secret.clone().unwrap();
        assert_eq!(
            c.authorization_basic.unwrap(),
            basic_header(&c.api_key, &secret)
        );
        assert!(!serde_json::to_string(&snap).unwrap().contains(&secret));
    }

    #[test]
    fn bad_arguments_change_nothing() {
        let mut snap = Snapshot::default();
        let bad = [
            NewKey {
                scopes: vec!["Bad Scope".into()],
                ..new_key("t", Kind::Scoped)
            },
            NewKey {
                allowed_ips: vec!["10.0.0/8".into()],
                ..new_key("t", Kind::Scoped)
            },
            NewKey {
                scopes: vec![],
                ..new_key("t", Kind::Scoped)
            },
            NewKey {
                expires_at: Some(5),
                ..new_key("t", Kind::Scoped)
            },
            NewKey {
                tenant: "bad tenant".into(),
                ..new_key("t", Kind::Scoped)
            },
        ];
        for k in bad {
            assert!(create(&mut snap, k, 10).is_err());
        }
        assert!(snap.keys.is_empty());
    }

    #[test]
    fn rotation_keeps_the_old_secret_only_with_grace() {
        let mut snap = Snapshot::default();
        let c = create(
            &mut snap,
            NewKey {
                with_secret: true,
                ..new_key("t", Kind::Scoped)
            },
            10,
        )
        .unwrap();
        let old_hash = snap.keys[0].record.secret_hash.clone();
        rotate_secret(&mut snap, &c.key_id, 600, 100).unwrap();
        let r = &snap.keys[0].record;
        assert_eq!(
            (r.previous_secret_hash.clone(), r.previous_secret_expires_at),
            (old_hash, Some(700))
        );
        rotate_secret(&mut snap, &c.key_id, 0, 200).unwrap();
        assert!(snap.keys[0].record.previous_secret_hash.is_none());
        let plain = create(&mut snap, new_key("u", Kind::Scoped), 10).unwrap();
        assert!(rotate_secret(&mut snap, &plain.key_id, 0, 1)
            .unwrap_err()
            .contains("no secret"));
    }

    #[test]
    fn allowlist_add_and_remove_normalise_addresses() {
        let mut snap = Snapshot::default();
        let c = create(&mut snap, new_key("t", Kind::Scoped), 10).unwrap();
        allow_ip(&mut snap, &c.key_id, "10.0.0.0/8", true, 11).unwrap();
        allow_ip(&mut snap, &c.key_id, "192.0.2.7", true, 11).unwrap();
        assert!(allow_ip(&mut snap, &c.key_id, "10.0.0.0/8", true, 11).is_err());
        allow_ip(&mut snap, &c.key_id, "192.0.2.7/32", false, 12).unwrap();
        assert_eq!(snap.keys[0].record.allowed_ips, vec!["10.0.0.0/8"]);
        assert!(allow_ip(&mut snap, &c.key_id, "10.1.0.0/16", false, 12).is_err());
        assert!(allow_ip(&mut snap, "nope", "10.0.0.0/8", true, 12).is_err());
    }

    #[test]
    fn session_revocation_needs_a_known_key_and_replaces_older_entries() {
        let mut snap = Snapshot::default();
        let c = create(&mut snap, new_key("t", Kind::Scoped), 10).unwrap();
        assert!(revoke_session(&mut snap, "nope", "s1", 5).is_err());
        assert!(revoke_session(&mut snap, &c.key_id, "bad id", 5).is_err());
        revoke_session(&mut snap, &c.key_id, "s1", 5).unwrap();
        revoke_session(&mut snap, &c.key_id, "s1", 9).unwrap();
        assert_eq!(snap.revoked_sessions.len(), 1);
        assert_eq!(snap.revoked_sessions[0].revoked_at_ms, 9);
        // Past the longest token lifetime an entry is useless and dropped.
        let week_later = 9 + keygate_core::token::MAX_LIFETIME_SECS * 1000 + 1;
        revoke_session(&mut snap, &c.key_id, "s2", week_later).unwrap();
        assert_eq!(snap.revoked_sessions.len(), 1);
    }

    #[test]
    fn rates_parse_in_several_spellings() {
        assert_eq!(
            parse_rate("100/60s").unwrap(),
            RateLimit {
                requests: 100,
                window_secs: 60
            }
        );
        assert_eq!(
            parse_rate("100/min").unwrap(),
            RateLimit {
                requests: 100,
                window_secs: 60
            }
        );
        assert_eq!(
            parse_rate("5000/1h").unwrap(),
            RateLimit {
                requests: 5000,
                window_secs: 3600
            }
        );
        assert!(parse_rate("0/min").is_err());
        assert!(parse_rate("100").is_err());
        assert!(parse_rate("x/min").is_err());
        assert!(parse_rate("1/2d").is_err());
    }
}
