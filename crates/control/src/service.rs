//! The service layer: every change to keys and sessions goes through here.
//! It validates input (naming the option at fault), enforces the per-tenant
//! limits with refusals that say what to do, generates keys and secrets
//! (shown once by the caller; only SHA-256 hashes are stored) and applies
//! the change atomically through the [`Store`], whose change wakes every
//! `keygate sync` watching it.

use crate::db::Db;
use crate::error::{Error, Result};
use crate::mgmt::Audit;
use crate::store::{self, Snapshot, Store, StoredKey};
use base64::Engine as _;
use keygate_core::credential::{Kind, Status, MAX_DEFAULT_PER_TENANT, MAX_SCOPED_PER_TENANT};
use keygate_core::hash::{sha256, to_hex};
use keygate_core::ip_rules::parse_allowed;
use keygate_core::rate_limit::RateLimit;
use keygate_core::CredentialRecord;
use serde::Serialize;
use std::cell::RefCell;

/// Shortest key or secret accepted from the operator (`--key-value`).
pub const MIN_GIVEN_SECRET_LEN: usize = 16;

/// `Default` is for tests and struct-update syntax; callers set every field
/// that matters (an empty environment is refused).
#[derive(Default)]
pub struct NewKey {
    pub key_id: Option<String>,
    /// A label for people; "" for none.
    pub name: String,
    pub tenant: String,
    pub environment: String,
    pub kind: Kind,
    pub scopes: Vec<String>,
    pub allowed_ips: Vec<String>,
    pub rate_limit: Option<RateLimit>,
    pub expires_at: Option<u64>,
    pub with_secret: bool,
    /// A given key value instead of a random one (demo stores, migrations).
    pub key_value: Option<String>,
    /// A given secret instead of a random one; implies a secret.
    pub secret_value: Option<String>,
    /// The user of the tenant the key belongs to.
    pub owner: Option<String>,
    /// A JSON object of at most 4 KiB.
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// The format of the generated value (default: the deployment's).
    pub key_format: Option<KeyFormat>,
}

/// A partial change to a key (API PATCH); `None` leaves a field as it is.
#[derive(Default, Debug, Clone)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub allowed_ips: Option<Vec<String>>,
    /// `Some(None)` clears the key's own limit (the filter's default applies).
    pub rate_limit: Option<Option<RateLimit>>,
    pub status: Option<Status>,
    /// `Some(None)` removes the expiry.
    pub expires_at: Option<Option<u64>>,
    /// `Some(None)` removes the owner.
    pub owner: Option<Option<String>>,
    /// `Some(None)` removes the metadata.
    pub metadata: Option<Option<serde_json::Map<String, serde_json::Value>>>,
    /// The key's own limits (`Some(vec![])` clears them: its plan applies).
    pub limits: Option<Vec<keygate_core::limits::Limit>>,
    /// `Some(None)` takes the key off its plan (its tenant's then applies).
    pub plan: Option<Option<String>>,
    /// A top-up: `Some(Some((balance, monthly)))` grants `balance` uses
    /// from now (monthly: again on every 1st); `Some(None)` removes credits.
    pub credits: Option<Option<(u64, bool)>>,
}

/// What `key create` shows, exactly once.
#[derive(Serialize, Debug)]
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

mod limits;
pub use limits::{KeyLimits, TenantLimitsChange};

pub struct Service {
    store: Box<dyn Store>,
    /// The store lives in the management database whose audit trail the
    /// API shows ([`Service::with_audit_db`]): records go in with changes.
    audit_in_store: bool,
    /// The record [`Service::audited`] hands to the next store change.
    pending_audit: RefCell<Option<Audit>>,
    key_style: KeyStyle,
}

mod identity;
pub use identity::{
    check_key_owner, check_metadata, forwarded_metadata, parse_metadata, KeyFormat, KeyStyle,
    Rolled, MAX_METADATA_BYTES, MAX_ROLL_GRACE_SECS,
};

/// 32 bytes from the OS CSPRNG as 64 lowercase hex digits.
pub fn random_hex32() -> Result<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| Error::Random(e.to_string()))?;
    Ok(hex::encode(b))
}

fn random_suffix() -> Result<String> {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).map_err(|e| Error::Random(e.to_string()))?;
    Ok(hex::encode(b))
}

pub fn basic_header(key: &str, secret: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:{secret}"))
    )
}

/// Bad names are bad input naming the field, so an API answers 422 with it.
fn check_name(field: &str, value: &str) -> Result<()> {
    keygate_core::credential::check_name(field, value).map_err(|e| Error::bad(&e.field, e.message))
}

fn check_scopes(scopes: &[String]) -> Result<()> {
    scopes.iter().try_for_each(|s| {
        keygate_core::scope::check_scope_name(s).map_err(|m| Error::bad("--scope", m))
    })
}

fn check_ips(field: &str, ips: &[String]) -> Result<()> {
    ips.iter().try_for_each(|s| {
        parse_allowed(s)
            .map(|_| ())
            .map_err(|m| Error::bad(field, m))
    })
}

/// Longest key name accepted.
pub const MAX_KEY_NAME_LEN: usize = 100;

pub fn check_key_name(name: &str) -> Result<()> {
    if name.chars().count() > MAX_KEY_NAME_LEN || name.chars().any(char::is_control) {
        return Err(Error::bad(
            "name",
            format!("at most {MAX_KEY_NAME_LEN} characters, no control characters"),
        ));
    }
    Ok(())
}

/// The key if it belongs to `tenant`, else "no such key" (never revealing
/// that another tenant has it).
fn owned(k: StoredKey, tenant: &str, key_id: &str) -> Result<StoredKey> {
    if k.record.tenant == tenant {
        Ok(k)
    } else {
        Err(Error::NoSuchKey(key_id.to_owned()))
    }
}

fn rename_field(e: Error, field: &str) -> Error {
    match e {
        Error::BadInput { message, .. } => Error::bad(field, message),
        other => other,
    }
}

fn check_given(field: &str, value: &str) -> Result<()> {
    if value.len() < MIN_GIVEN_SECRET_LEN || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::bad(
            field,
            format!("must be at least {MIN_GIVEN_SECRET_LEN} printable characters without spaces"),
        ));
    }
    Ok(())
}

/// Refuses a key the tenant has no room for, before the store would.
fn check_room(snap: &Snapshot, tenant: &str, kind: Kind) -> Result<()> {
    let count = snap
        .keys
        .iter()
        .filter(|k| k.record.tenant == tenant && k.record.kind == kind)
        .count();
    let (limit, name) = match kind {
        Kind::Default => (MAX_DEFAULT_PER_TENANT, "default"),
        Kind::Scoped => (MAX_SCOPED_PER_TENANT, "scoped"),
    };
    if count >= limit {
        return Err(Error::TenantLimit {
            tenant: tenant.to_owned(),
            kind: name,
            limit,
        });
    }
    Ok(())
}

impl Service {
    pub fn new(store: Box<dyn Store>) -> Service {
        Service {
            store,
            audit_in_store: false,
            pending_audit: RefCell::new(None),
            key_style: KeyStyle::default(),
        }
    }

    /// Tells the service where the audit trail is kept: when the store
    /// lives in that same database, [`Service::audited`] writes each record
    /// in the transaction of the change it describes.
    pub fn with_audit_db(mut self, db: &Db) -> Service {
        self.audit_in_store = self.store.database().is_some_and(|d| d.same_as(db));
        self
    }

    /// Runs `f`; its first store change carries `audit`, committed in the
    /// same transaction (an unnamed object becomes the id of the key the
    /// change creates). Returns `f`'s result and whether the record was
    /// written so; when it was not (the audit trail is in another database,
    /// or `f` changed nothing), the caller records it after the change.
    pub fn audited<T>(
        &self,
        audit: Audit,
        f: impl FnOnce(&Service) -> Result<T>,
    ) -> Result<(T, bool)> {
        if !self.audit_in_store {
            return f(self).map(|v| (v, false));
        }
        *self.pending_audit.borrow_mut() = Some(audit);
        let out = f(self);
        let unused = self.pending_audit.borrow_mut().take();
        out.map(|v| (v, unused.is_none()))
    }

    /// Opens the store named by `spec` (a path or a postgres:// URL).
    pub fn open(spec: &str) -> Result<Service> {
        Ok(Service::new(store::open(spec)?))
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    fn update<T>(&self, mut change: impl FnMut(&mut Snapshot) -> Result<T>) -> Result<T> {
        let mut out = None;
        let mut apply = |s: &mut Snapshot| {
            out = Some(change(s)?);
            Ok(())
        };
        let audit = self.pending_audit.borrow_mut().take();
        match &audit {
            Some(a) => self.store.update_audited(&mut apply, &a.entry())?,
            None => self.store.update(&mut apply)?,
        };
        out.ok_or_else(|| Error::Internal("the change produced no result".into()))
    }

    pub fn init_store(&self) -> Result<Snapshot> {
        self.store.init()
    }

    /// The usage credits of `keys` with credits, with what they used
    /// counted from the store's request log (see
    /// [`store::UsageSource::credits_used`]). A log that cannot be read
    /// leaves `used` unknown rather than failing the read of the keys; its
    /// error is returned beside for the caller to log.
    pub fn credits_status(
        &self,
        keys: &[StoredKey],
        now_secs: u64,
    ) -> (
        std::collections::BTreeMap<String, store::CreditsStatus>,
        Option<Error>,
    ) {
        let (used, error) = if keys.iter().any(|k| k.record.credits.is_some()) {
            match self.store.usage_source().credits_used(keys) {
                Ok(u) => (u, None),
                Err(e) => (None, Some(e)),
            }
        } else {
            (None, None)
        };
        let status = keys
            .iter()
            .filter_map(|k| {
                let c = k.record.credits?;
                let u = used
                    .as_ref()
                    .map(|m| m.get(&k.record.key_id).copied().unwrap_or(0));
                Some((
                    k.record.key_id.clone(),
                    store::CreditsStatus::new(c, u, now_secs),
                ))
            })
            .collect();
        (status, error)
    }

    pub fn snapshot(&self) -> Result<Snapshot> {
        self.store.load()
    }

    /// One tenant's keys (read by tenant, not from the whole store), or all.
    pub fn list_keys(&self, tenant: Option<&str>) -> Result<Vec<StoredKey>> {
        match tenant {
            Some(t) => self.store.tenant_keys(t),
            None => Ok(self.store.load()?.keys),
        }
    }

    pub fn show_key(&self, key_id: &str) -> Result<StoredKey> {
        self.store
            .key(key_id)?
            .ok_or_else(|| Error::NoSuchKey(key_id.to_owned()))
    }

    pub fn create_key(&self, new: NewKey, now: u64) -> Result<Created> {
        self.create_key_limited(new, KeyLimits::default(), now)
    }

    /// [`Service::create_key`] with the key's own limits and plan.
    pub fn create_key_limited(
        &self,
        new: NewKey,
        key_limits: KeyLimits,
        now: u64,
    ) -> Result<Created> {
        key_limits.check()?;
        check_name("--tenant", &new.tenant)?;
        check_name("--env", &new.environment)?;
        if let Some(id) = &new.key_id {
            check_name("--id", id)?;
        }
        check_key_name(&new.name)?;
        check_scopes(&new.scopes)?;
        check_ips("--allow-ip", &new.allowed_ips)?;
        match (new.kind, new.scopes.is_empty()) {
            (Kind::Scoped, true) => return Err(Error::bad(
                "--scope",
                "a scoped key needs at least one --scope (or use --kind default for full access)",
            )),
            (Kind::Default, false) => {
                return Err(Error::bad(
                    "--scope",
                    "a default key has every scope; drop --scope, or use --kind scoped",
                ))
            }
            _ => {}
        }
        if new.expires_at.is_some_and(|t| t <= now) {
            return Err(Error::bad("--expires", "is in the past"));
        }
        if let Some(v) = &new.key_value {
            check_given("--key-value", v)?;
        }
        if let Some(v) = &new.secret_value {
            check_given("--secret-value", v)?;
        }
        if let Some(o) = &new.owner {
            check_key_owner("--owner", o)?;
        }
        if let Some(m) = &new.metadata {
            check_metadata("--metadata", &serde_json::Value::Object(m.clone()))?;
        }
        // Generated outside the transaction: the randomness cannot fail inside it.
        let api_key = match &new.key_value {
            Some(v) => v.clone(),
            None => self.key_style.generate(new.key_format, &new.environment)?,
        };
        let secret = match &new.secret_value {
            Some(v) => Some(v.clone()),
            None => new.with_secret.then(random_hex32).transpose()?,
        };
        let key_id = match &new.key_id {
            Some(id) => id.clone(),
            None => format!("{}-{}", new.tenant, random_suffix()?),
        };
        if let Some(a) = self.pending_audit.borrow_mut().as_mut() {
            a.object.get_or_insert_with(|| key_id.clone());
        }
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
            allowed_ips: new.allowed_ips.clone(),
            rate_limit: new.rate_limit,
            status: Status::Active,
            expires_at: new.expires_at,
            owner: new.owner.clone(),
            previous_key_hash: None,
            previous_key_expires_at: None,
            metadata: Default::default(),
            limits: key_limits.limits.clone(),
            plan: key_limits.plan.clone(),
            tenant_limits: false,
            quota_used: vec![],
            credits: None,
        };
        keygate_core::Credential::try_from(&record).map_err(|e| Error::Other(e.to_string()))?;
        self.update(|snap| {
            if snap.find(&key_id).is_some() {
                return Err(Error::KeyExists(key_id.clone()));
            }
            if snap.keys.iter().any(|k| {
                k.record.key_hash == record.key_hash
                    || k.record.previous_key_hash.as_ref() == Some(&record.key_hash)
            }) {
                return Err(Error::bad(
                    "--key-value",
                    "another key already has this value; choose another",
                ));
            }
            check_room(snap, &new.tenant, new.kind)?;
            limits::check_plan_exists(snap, "plan", record.plan.as_deref())?;
            snap.keys.push(StoredKey {
                name: new.name.clone(),
                created_at: now,
                updated_at: now,
                record: record.clone(),
                metadata: new.metadata.clone(),
            });
            Ok(())
        })?;
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
    pub fn rotate_secret(&self, key_id: &str, grace_secs: u64, now: u64) -> Result<String> {
        self.rotate(None, key_id, grace_secs, now)
    }

    /// [`Service::rotate_secret`] for one key of `tenant`.
    pub fn rotate_secret_of(
        &self,
        tenant: &str,
        key_id: &str,
        grace_secs: u64,
        now: u64,
    ) -> Result<String> {
        self.rotate(Some(tenant), key_id, grace_secs, now)
    }

    fn rotate(
        &self,
        tenant: Option<&str>,
        key_id: &str,
        grace_secs: u64,
        now: u64,
    ) -> Result<String> {
        let secret = random_hex32()?;
        let hash = to_hex(&sha256(secret.as_bytes()));
        self.update(|snap| {
            let k = snap.find_mut(key_id)?;
            if tenant.is_some_and(|t| t != k.record.tenant) {
                return Err(Error::NoSuchKey(key_id.to_owned()));
            }
            let Some(old) = k.record.secret_hash.clone() else {
                return Err(Error::Other(format!(
                    "key '{key_id}' has no secret to rotate (create keys with --with-secret to have one)"
                )));
            };
            k.record.secret_hash = Some(hash.clone());
            if grace_secs > 0 {
                k.record.previous_secret_hash = Some(old);
                k.record.previous_secret_expires_at = Some(now + grace_secs);
            } else {
                k.record.previous_secret_hash = None;
                k.record.previous_secret_expires_at = None;
            }
            k.updated_at = now;
            Ok(())
        })?;
        Ok(secret)
    }

    /// One key of `tenant`; another tenant's key is "no such key".
    pub fn tenant_key(&self, tenant: &str, key_id: &str) -> Result<StoredKey> {
        self.show_key(key_id).and_then(|k| owned(k, tenant, key_id))
    }

    /// Applies `patch` to one key of `tenant`, all or nothing.
    pub fn patch_key(
        &self,
        tenant: &str,
        key_id: &str,
        patch: &KeyPatch,
        now: u64,
    ) -> Result<StoredKey> {
        if let Some(n) = &patch.name {
            check_key_name(n)?;
        }
        if let Some(s) = &patch.scopes {
            check_scopes(s).map_err(|e| rename_field(e, "scopes"))?;
        }
        if let Some(ips) = &patch.allowed_ips {
            check_ips("allowed_ips", ips)?;
        }
        if patch.expires_at.flatten().is_some_and(|t| t <= now) {
            return Err(Error::bad("expires_at", "is in the past"));
        }
        if let Some(Some(o)) = &patch.owner {
            check_key_owner("owner", o)?;
        }
        if let Some(Some(m)) = &patch.metadata {
            check_metadata("metadata", &serde_json::Value::Object(m.clone()))?;
        }
        if let Some(l) = &patch.limits {
            keygate_core::limits::check_limits("limits", l)
                .map_err(|e| Error::bad(&e.field, e.message))?;
        }
        if let Some(Some(p)) = &patch.plan {
            check_name("plan", p)?;
        }
        if let Some(Some((balance, _))) = patch.credits {
            if balance > u64::from(u32::MAX) {
                return Err(Error::bad(
                    "credits.balance",
                    format!("at most {}", u32::MAX),
                ));
            }
        }
        self.update(|snap| {
            let k = snap.find_mut(key_id)?;
            if k.record.tenant != tenant {
                return Err(Error::NoSuchKey(key_id.to_owned()));
            }
            if let Some(n) = &patch.name {
                k.name = n.clone();
            }
            if let Some(s) = &patch.scopes {
                if k.record.kind == Kind::Default {
                    return Err(Error::bad(
                        "scopes",
                        "a default key has every scope; scopes apply to scoped keys only",
                    ));
                }
                if s.is_empty() {
                    return Err(Error::bad(
                        "scopes",
                        "a scoped key needs at least one scope",
                    ));
                }
                k.record.scopes = s.clone();
            }
            if let Some(ips) = &patch.allowed_ips {
                k.record.allowed_ips = ips.clone();
            }
            if let Some(r) = patch.rate_limit {
                k.record.rate_limit = r;
            }
            if let Some(s) = patch.status {
                k.record.status = s;
            }
            if let Some(e) = patch.expires_at {
                k.record.expires_at = e;
            }
            if let Some(o) = &patch.owner {
                k.record.owner = o.clone();
            }
            if let Some(m) = &patch.metadata {
                k.metadata = m.clone();
            }
            if let Some(l) = &patch.limits {
                k.record.limits = l.clone();
            }
            if let Some(p) = &patch.plan {
                k.record.plan = p.clone();
            }
            if let Some(c) = patch.credits {
                // Each top-up is a new grant (serial): Envoy counts it from zero.
                let serial = k.record.credits.map_or(1, |old| old.serial.wrapping_add(1));
                k.record.credits = c.map(|(balance, monthly)| keygate_core::limits::Credits {
                    balance,
                    serial,
                    monthly,
                    granted_at: now,
                });
            }
            // Checked against the plans of this very snapshot.
            let plan = k.record.plan.clone();
            limits::check_plan_exists(snap, "plan", plan.as_deref())?;
            let k = snap.find_mut(key_id)?;
            k.updated_at = now;
            Ok(k.clone())
        })
    }

    /// Removes one key of `tenant`.
    pub fn delete_key(&self, tenant: &str, key_id: &str) -> Result<StoredKey> {
        self.update(|snap| {
            let i = snap
                .keys
                .iter()
                .position(|k| k.record.key_id == key_id && k.record.tenant == tenant)
                .ok_or_else(|| Error::NoSuchKey(key_id.to_owned()))?;
            Ok(remove_key(snap, i))
        })
    }

    /// Removes the key: from the next push on, it is unknown (401).
    pub fn revoke_key(&self, key_id: &str) -> Result<StoredKey> {
        self.update(|snap| {
            let i = snap
                .keys
                .iter()
                .position(|k| k.record.key_id == key_id)
                .ok_or_else(|| Error::NoSuchKey(key_id.to_owned()))?;
            Ok(remove_key(snap, i))
        })
    }

    pub fn set_status(&self, key_id: &str, status: Status, now: u64) -> Result<StoredKey> {
        self.update(|snap| {
            let k = snap.find_mut(key_id)?;
            k.record.status = status;
            k.updated_at = now;
            Ok(k.clone())
        })
    }

    pub fn allow_ip(&self, key_id: &str, cidr: &str, add: bool, now: u64) -> Result<StoredKey> {
        let net = parse_allowed(cidr)
            .map_err(|m| Error::bad("CIDR", m))?
            .to_string();
        let same =
            |s: &String| parse_allowed(s).map(|n| n.to_string()).as_deref() == Ok(net.as_str());
        self.update(|snap| {
            let k = snap.find_mut(key_id)?;
            let ips = &mut k.record.allowed_ips;
            let present = ips.iter().any(same);
            match (add, present) {
                (true, true) => {
                    return Err(Error::Other(format!(
                        "{net} is already allowed for '{key_id}'"
                    )))
                }
                (true, false) => ips.push(net.clone()),
                (false, false) => {
                    return Err(Error::Other(format!(
                        "{net} is not in the allowlist of '{key_id}'"
                    )))
                }
                (false, true) => ips.retain(|s| !same(s)),
            }
            k.updated_at = now;
            Ok(k.clone())
        })
    }

    pub fn set_scopes(&self, key_id: &str, scopes: &[String], now: u64) -> Result<StoredKey> {
        check_scopes(scopes)?;
        self.update(|snap| {
            let k = snap.find_mut(key_id)?;
            if k.record.kind == Kind::Default {
                return Err(Error::bad(
                    "scopes",
                    "a default key has every scope; scopes apply to scoped keys only",
                ));
            }
            if scopes.is_empty() {
                return Err(Error::bad(
                    "scopes",
                    "a scoped key needs at least one scope",
                ));
            }
            k.record.scopes = scopes.to_vec();
            k.updated_at = now;
            Ok(k.clone())
        })
    }

    /// Refuses the session's tokens issued until now; revocations older than
    /// any token can live are dropped on the way.
    pub fn revoke_session(&self, key_id: &str, session_id: &str, now_ms: u64) -> Result<()> {
        self.revoke_sessions(key_id, &[session_id], now_ms)
    }

    /// [`Service::revoke_session`] for several sessions of one key, in one change.
    pub fn revoke_sessions(&self, key_id: &str, session_ids: &[&str], now_ms: u64) -> Result<()> {
        for s in session_ids.iter().filter(|s| !s.is_empty()) {
            check_name("--session", s)?;
        }
        self.update(|snap| {
            snap.find(key_id)
                .ok_or_else(|| Error::NoSuchKey(key_id.to_owned()))?;
            let horizon = now_ms.saturating_sub(keygate_core::token::MAX_LIFETIME_SECS * 1000);
            snap.revoked_sessions.retain(|r| {
                r.revoked_at_ms >= horizon
                    && !(r.key_id == key_id && session_ids.contains(&r.session_id.as_str()))
            });
            // Once each: a session is one revocation (one row in the stores).
            let unique: std::collections::BTreeSet<&str> = session_ids.iter().copied().collect();
            for session_id in unique {
                snap.revoked_sessions
                    .push(keygate_core::sync::RevokedSession {
                        key_id: key_id.to_owned(),
                        session_id: session_id.to_owned(),
                        revoked_at_ms: now_ms,
                    });
            }
            Ok(())
        })
    }
}

/// Removes the key at `i` with its session revocations: the key's tokens
/// die with it (they are checked against the live credential), and a later
/// key given the same id (`--id`), maybe another tenant's, must not inherit
/// or list them.
fn remove_key(snap: &mut Snapshot, i: usize) -> StoredKey {
    let k = snap.keys.remove(i);
    snap.revoked_sessions
        .retain(|r| r.key_id != k.record.key_id);
    k
}

/// `100/60s`, `100/min`, `5000/1h`, `10/sec`.
pub fn parse_rate(s: &str) -> std::result::Result<RateLimit, String> {
    const FORMS: &str =
        "use REQUESTS/WINDOW, e.g. 100/60s, 100/min, 5000/1h, 10/sec (windows: s, sec, min, h, hour, d, day, or a duration like 90s)";
    let (n, per) = s
        .split_once('/')
        .ok_or_else(|| format!("'{s}' is not a rate; {FORMS}"))?;
    let requests: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("'{n}' is not a whole number of requests; {FORMS}"))?;
    let window_secs = match per.trim() {
        "s" | "sec" | "second" => 1,
        "m" | "min" | "minute" => 60,
        "h" | "hour" => 3600,
        "d" | "day" => 86_400,
        d => humantime::parse_duration(d)
            .map_err(|_| format!("'{d}' is not a window; {FORMS}"))?
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
mod tests;
