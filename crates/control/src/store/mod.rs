//! Where credentials live: [`file::FileStore`] (one JSON file, the embedded
//! default) or [`pg::PgStore`] (PostgreSQL, shared by a fleet), behind one
//! object-safe [`Store`] trait. Only the service layer changes a store.

pub mod file;
pub mod pg;
pub mod sqlite;

use crate::db::Db;
use crate::error::{Error, Result};
use crate::mgmt::AuditEntry;
use keygate_core::sync::{RevokedSession, StoreId};
use keygate_core::CredentialRecord;
use serde::{Deserialize, Serialize};
use std::sync::mpsc::Sender;

/// A credential as stored: the wire record plus bookkeeping. Hashes only.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoredKey {
    /// A label for people (API `name`); stores made before it load with "".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub created_at: u64,
    pub updated_at: u64,
    pub record: CredentialRecord,
    /// The key's metadata object (at most 4 KiB); only fields a sync
    /// forwards reach Envoy (`record.metadata`, filled at push time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The whole store. `version` grows by one with every change.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Made at `store init`; pushed to Envoy so it knows where its set came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_id: Option<StoreId>,
    pub version: u64,
    pub keys: Vec<StoredKey>,
    /// Token sessions revoked within the longest token lifetime.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_sessions: Vec<RevokedSession>,
}

impl Snapshot {
    pub fn find(&self, key_id: &str) -> Option<&StoredKey> {
        self.keys.iter().find(|k| k.record.key_id == key_id)
    }

    pub fn find_mut(&mut self, key_id: &str) -> Result<&mut StoredKey> {
        self.keys
            .iter_mut()
            .find(|k| k.record.key_id == key_id)
            .ok_or_else(|| Error::NoSuchKey(key_id.to_owned()))
    }

    /// Checks every invariant a stored snapshot must hold.
    pub fn validate(&self) -> Result<()> {
        let mut ids = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        for k in &self.keys {
            let r = &k.record;
            keygate_core::Credential::try_from(r)
                .map_err(|e| Error::Invalid(format!("key '{}': {e}", r.key_id)))?;
            if !ids.insert(&r.key_id) {
                return Err(Error::Invalid(format!(
                    "key id '{}' appears twice",
                    r.key_id
                )));
            }
            if !hashes.insert(&r.key_hash) {
                return Err(Error::Invalid(format!(
                    "key '{}' reuses another key's hash",
                    r.key_id
                )));
            }
        }
        // A rolled key's old value still names it in Envoy: no other key
        // may have that value.
        for k in &self.keys {
            if let Some(old) = &k.record.previous_key_hash {
                if !hashes.insert(old) {
                    return Err(Error::Invalid(format!(
                        "key '{}' keeps a rolled-away value that another key uses",
                        k.record.key_id
                    )));
                }
            }
        }
        keygate_core::credential::check_tenant_limits(self.keys.iter().map(|k| &k.record))
            .map_err(Error::Invalid)
    }
}

/// Which keys a partial read returns.
#[derive(Clone, Copy, Debug)]
pub(crate) enum KeyFilter<'a> {
    All,
    Tenant(&'a str),
    Id(&'a str),
}

impl KeyFilter<'_> {
    /// The WHERE clause (with one `?` placeholder unless `All`) and its value.
    pub(crate) fn clause(&self) -> (&'static str, Option<&str>) {
        match self {
            KeyFilter::All => ("", None),
            KeyFilter::Tenant(t) => ("WHERE tenant = ?", Some(t)),
            KeyFilter::Id(k) => ("WHERE key_id = ?", Some(k)),
        }
    }
}

/// A change applied by [`Store::update`]; its error aborts the update.
pub type Change<'a> = &'a mut dyn FnMut(&mut Snapshot) -> Result<()>;

pub trait Store: Send {
    /// Where the store is, for messages (never a password).
    fn describe(&self) -> String;
    /// Creates an empty store with a new identity; refuses an existing one
    /// (an existing store without identity gets one and keeps its keys).
    fn init(&self) -> Result<Snapshot>;
    /// A consistent read of the whole store; refuses a store that does not exist.
    fn load(&self) -> Result<Snapshot>;
    /// Applies `change` atomically: under a lock, on the latest snapshot; the
    /// result is validated and stored with the version bumped, or nothing
    /// changes if `change` or validation fails. Returns the stored snapshot.
    fn update(&self, change: Change<'_>) -> Result<Snapshot>;
    /// The keys of one tenant, by key id; stores with an index on the
    /// tenant read only those (the API's list and get paths), the others
    /// filter a full read.
    fn tenant_keys(&self, tenant: &str) -> Result<Vec<StoredKey>> {
        Ok(self
            .load()?
            .keys
            .into_iter()
            .filter(|k| k.record.tenant == tenant)
            .collect())
    }
    /// One key by id, read alone where the store can.
    fn key(&self, key_id: &str) -> Result<Option<StoredKey>> {
        Ok(self.load()?.find(key_id).cloned())
    }
    /// [`Store::update`] that also writes `audit` to the audit trail of the
    /// store's own database in the same transaction: both commit or
    /// neither. Only stores that live in a management database
    /// ([`Store::database`]) can; the others refuse and change nothing.
    fn update_audited(&self, change: Change<'_>, audit: &AuditEntry<'_>) -> Result<Snapshot> {
        let _ = (change, audit);
        Err(Error::Other(format!(
            "the store at {} keeps no audit trail",
            self.describe()
        )))
    }
    /// The management database ([`crate::db`]) this store lives in, if any.
    fn database(&self) -> Option<Db> {
        None
    }
    /// A cheap token that changes whenever the store may have changed.
    fn change_token(&self) -> Result<String>;
    /// Sends on `wake` (soon) after the store may have changed, until the
    /// returned guard is dropped. Spurious wakes are allowed; callers compare
    /// [`Store::change_token`].
    fn watch(&self, wake: Sender<()>) -> Result<Box<dyn Send>>;
}

/// `postgres://…` selects PostgreSQL, `sqlite:PATH` or a path ending in
/// `.db`, `.sqlite` or `.sqlite3` the SQLite store, anything else is a JSON
/// file path.
pub fn open(spec: &str) -> Result<Box<dyn Store>> {
    if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        Ok(Box::new(pg::PgStore::new(spec)?))
    } else if let Some(path) = sqlite_path(spec) {
        Ok(Box::new(sqlite::SqliteStore::new(path)))
    } else {
        Ok(Box::new(file::FileStore::new(spec)))
    }
}

/// The SQLite file a store spec names, if it names one.
pub fn sqlite_path(spec: &str) -> Option<&str> {
    if let Some(p) = spec.strip_prefix("sqlite:") {
        return Some(p.strip_prefix("//").unwrap_or(p));
    }
    [".db", ".sqlite", ".sqlite3"]
        .iter()
        .any(|ext| spec.ends_with(ext))
        .then_some(spec)
}

/// A fresh random store identity.
pub fn new_store_id() -> Result<StoreId> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| Error::Random(e.to_string()))?;
    Ok(StoreId(u64::from_be_bytes(b)))
}
