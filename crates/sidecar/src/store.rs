//! The source of truth for credentials on one machine. [`Store`] is the seam
//! for other backends (a shared PostgreSQL store for fleets); [`FileStore`]
//! is the embedded default: one JSON file, replaced atomically under an
//! exclusive lock so concurrent CLI calls cannot lose an update.

use keygate_core::CredentialRecord;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

/// A credential as stored: the wire record plus bookkeeping. Hashes only.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoredKey {
    pub created_at: u64,
    pub updated_at: u64,
    pub record: CredentialRecord,
}

/// The whole store. `version` grows by one with every change.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub version: u64,
    pub keys: Vec<StoredKey>,
    /// Token sessions revoked within the longest token lifetime.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_sessions: Vec<keygate_core::sync::RevokedSession>,
}

impl Snapshot {
    pub fn find(&self, key_id: &str) -> Option<&StoredKey> {
        self.keys.iter().find(|k| k.record.key_id == key_id)
    }

    pub fn find_mut(&mut self, key_id: &str) -> Result<&mut StoredKey, String> {
        self.keys
            .iter_mut()
            .find(|k| k.record.key_id == key_id)
            .ok_or_else(|| format!("no key with id '{key_id}'"))
    }

    /// Checks every invariant a stored snapshot must hold.
    pub fn validate(&self) -> Result<(), String> {
        let mut ids = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        for k in &self.keys {
            let r = &k.record;
            keygate_core::Credential::try_from(r)
                .map_err(|e| format!("key '{}': {e}", r.key_id))?;
            if !ids.insert(&r.key_id) {
                return Err(format!("key id '{}' appears twice", r.key_id));
            }
            if !hashes.insert(&r.key_hash) {
                return Err(format!("key '{}' reuses another key's hash", r.key_id));
            }
        }
        keygate_core::credential::check_tenant_limits(self.keys.iter().map(|k| &k.record))
    }
}

pub trait Store {
    /// A consistent read of the whole store.
    fn load(&self) -> Result<Snapshot, String>;
    /// Applies `change` atomically: under a lock, on the latest snapshot; the
    /// result is validated and stored with the version bumped, or nothing
    /// changes if `change` or validation fails.
    fn update<T>(
        &self,
        change: impl FnOnce(&mut Snapshot) -> Result<T, String>,
    ) -> Result<T, String>;
    /// A cheap token that changes whenever the store may have changed.
    fn change_token(&self) -> Option<String>;
}

pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    pub fn new(path: impl Into<PathBuf>) -> FileStore {
        FileStore { path: path.into() }
    }

    #[cfg(test)]
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn lock_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".lock");
        PathBuf::from(p)
    }

    fn lock(&self) -> Result<File, String> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.lock_path())
            .map_err(|e| format!("cannot open lock file: {e}"))?;
        f.lock()
            .map_err(|e| format!("cannot lock the store: {e}"))?;
        Ok(f)
    }

    fn read(&self) -> Result<Snapshot, String> {
        match fs::read(&self.path) {
            Ok(bytes) => {
                let snap: Snapshot = serde_json::from_slice(&bytes).map_err(|e| {
                    format!(
                        "store {} is corrupt ({e}); refusing to use it",
                        self.path.display()
                    )
                })?;
                snap.validate().map_err(|e| {
                    format!(
                        "store {} is invalid ({e}); refusing to use it",
                        self.path.display()
                    )
                })?;
                Ok(snap)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Snapshot::default()),
            Err(e) => Err(format!("cannot read {}: {e}", self.path.display())),
        }
    }

    /// Write to a temporary file, fsync, rename over the store, fsync the directory.
    fn write(&self, snap: &Snapshot) -> Result<(), String> {
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let bytes = serde_json::to_vec_pretty(snap).map_err(|e| e.to_string())?;
        let mut f =
            File::create(&tmp).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        f.write_all(&bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("cannot write store: {e}"))?;
        fs::rename(&tmp, &self.path).map_err(|e| format!("cannot replace store: {e}"))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Store for FileStore {
    fn load(&self) -> Result<Snapshot, String> {
        // Readers need no lock: the file is only ever replaced whole.
        self.read()
    }

    fn update<T>(
        &self,
        change: impl FnOnce(&mut Snapshot) -> Result<T, String>,
    ) -> Result<T, String> {
        let _lock = self.lock()?;
        let mut snap = self.read()?;
        let out = change(&mut snap)?;
        snap.validate()?;
        snap.version += 1;
        self.write(&snap)?;
        Ok(out)
    }

    fn change_token(&self) -> Option<String> {
        let m = fs::metadata(&self.path).ok()?;
        let modified = m
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        Some(format!(
            "{}:{}:{}",
            modified.as_nanos(),
            m.len(),
            std::os::unix::fs::MetadataExt::ino(&m)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::credential::{Kind, Status};

    fn temp_store() -> (tempdir::TempDir, FileStore) {
        let dir = tempdir::TempDir::new();
        let store = FileStore::new(dir.0.join("store.json"));
        (dir, store)
    }

    /// A minimal temp dir, removed on drop (keeps the dependency tree lean).
    mod tempdir {
        pub struct TempDir(pub std::path::PathBuf);
        impl TempDir {
            pub fn new() -> TempDir {
                let mut b = [0u8; 8];
                getrandom::fill(&mut b).unwrap();
                let p = std::env::temp_dir().join(format!("keygate-test-{}", hex::encode(b)));
                std::fs::create_dir_all(&p).unwrap();
                TempDir(p)
            }
        }
        impl Drop for TempDir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn key(id: &str, tenant: &str, kind: Kind) -> StoredKey {
        StoredKey {
            created_at: 1,
            updated_at: 1,
            record: CredentialRecord {
                key_id: id.into(),
                key_hash: hex::encode(keygate_core::hash::sha256(id.as_bytes())),
                secret_hash: None,
                previous_secret_hash: None,
                previous_secret_expires_at: None,
                kind,
                tenant: tenant.into(),
                environment: "live".into(),
                scopes: vec![],
                allowed_ips: vec![],
                rate_limit: None,
                status: Status::Active,
                expires_at: None,
            },
        }
    }

    fn add(s: &mut Snapshot, k: StoredKey) -> Result<(), String> {
        s.keys.push(k);
        Ok(())
    }

    #[test]
    fn missing_store_reads_as_empty_and_updates_bump_the_version() {
        let (_d, store) = temp_store();
        assert_eq!(store.load().unwrap(), Snapshot::default());
        store
            .update(|s| add(s, key("a", "t", Kind::Scoped)))
            .unwrap();
        store
            .update(|s| add(s, key("b", "t", Kind::Scoped)))
            .unwrap();
        let snap = store.load().unwrap();
        assert_eq!((snap.version, snap.keys.len()), (2, 2));
    }

    #[test]
    fn a_failed_or_invalid_change_leaves_the_store_untouched() {
        let (_d, store) = temp_store();
        store
            .update(|s| add(s, key("d", "t", Kind::Default)))
            .unwrap();
        let err = store
            .update(|s| add(s, key("d2", "t", Kind::Default)))
            .unwrap_err();
        assert!(err.contains("default"), "{err}");
        assert!(store.update(|_| Err::<(), _>("nope".into())).is_err());
        assert_eq!(store.load().unwrap().version, 1);
    }

    #[test]
    fn corrupt_store_is_refused_loudly() {
        let (_d, store) = temp_store();
        std::fs::write(store.path(), b"{\"version\": 3, \"keys\": [").unwrap();
        assert!(store.load().unwrap_err().contains("corrupt"));
        assert!(store.update(|_| Ok(())).unwrap_err().contains("corrupt"));
        // Still the corrupt bytes: nothing overwrote them.
        assert_eq!(
            std::fs::read(store.path()).unwrap(),
            b"{\"version\": 3, \"keys\": ["
        );
    }

    #[test]
    fn concurrent_updates_lose_nothing() {
        let (_d, store) = temp_store();
        let path = store.path().to_path_buf();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let store = FileStore::new(path);
                    for i in 0..5 {
                        store
                            .update(|s| {
                                add(
                                    s,
                                    key(&format!("k{t}-{i}"), &format!("t{t}-{i}"), Kind::Scoped),
                                )
                            })
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let snap = store.load().unwrap();
        assert_eq!((snap.version, snap.keys.len()), (40, 40));
    }
}
