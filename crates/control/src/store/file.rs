//! The embedded store: one JSON file, replaced atomically under an exclusive
//! lock so concurrent CLI calls cannot lose an update. Created only by
//! `store init`; every other operation refuses a file that does not exist.

use super::{new_store_id, Change, Snapshot, Store};
use crate::error::{Error, Result};
use notify::Watcher as _;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

pub struct FileStore {
    path: PathBuf,
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.display().to_string();
    move |source| Error::Io {
        action,
        path,
        source,
    }
}

impl FileStore {
    pub fn new(path: impl Into<PathBuf>) -> FileStore {
        FileStore { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn shown(&self) -> String {
        self.path.display().to_string()
    }

    fn dir(&self) -> Option<&Path> {
        self.path.parent().filter(|d| !d.as_os_str().is_empty())
    }

    fn sibling(&self, suffix: &str) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(suffix);
        PathBuf::from(p)
    }

    fn missing(&self) -> Error {
        Error::StoreMissing {
            path: self.path.clone(),
        }
    }

    fn lock(&self) -> Result<File> {
        let lock = self.sibling(".lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .map_err(io("open the lock file", &lock))?;
        f.lock().map_err(io("lock", &lock))?;
        Ok(f)
    }

    /// `None` when the file does not exist.
    fn read_raw(&self) -> Result<Option<Snapshot>> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("read", &self.path)(e)),
        };
        let snap: Snapshot = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
            path: self.shown(),
            detail: e.to_string(),
        })?;
        snap.validate().map_err(|e| Error::Corrupt {
            path: self.shown(),
            detail: e.to_string(),
        })?;
        Ok(Some(snap))
    }

    fn read(&self) -> Result<Snapshot> {
        let snap = self.read_raw()?.ok_or_else(|| self.missing())?;
        if snap.store_id.is_none() {
            return Err(Error::NoIdentity { path: self.shown() });
        }
        Ok(snap)
    }

    /// Write to a temporary file, fsync, rename over the store, fsync the directory.
    fn write(&self, snap: &Snapshot) -> Result<()> {
        let tmp = self.sibling(".tmp");
        let bytes = serde_json::to_vec_pretty(snap).map_err(|e| Error::Other(e.to_string()))?;
        let mut f = File::create(&tmp).map_err(io("write", &tmp))?;
        f.write_all(&bytes)
            .and_then(|_| f.sync_all())
            .map_err(io("write", &tmp))?;
        fs::rename(&tmp, &self.path).map_err(io("replace", &self.path))?;
        if let Some(dir) = self.dir() {
            if let Ok(d) = File::open(dir) {
                // Best effort: the rename is already visible to readers.
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    fn check_dir(&self) -> Result<()> {
        match self.dir() {
            Some(dir) if !dir.is_dir() => Err(Error::Other(format!(
                "directory {} does not exist: create it first (keygate does not create directories)",
                dir.display()
            ))),
            _ => Ok(()),
        }
    }
}

impl Store for FileStore {
    fn describe(&self) -> String {
        self.shown()
    }

    fn init(&self) -> Result<Snapshot> {
        self.check_dir()?;
        let _lock = self.lock()?;
        let snap = match self.read_raw()? {
            Some(s) if s.store_id.is_some() => {
                return Err(Error::StoreExists {
                    path: self.shown(),
                    store_id: s.store_id.map(|i| i.to_string()).unwrap_or_default(),
                })
            }
            // A store from before identities: keep its keys, give it an id.
            Some(s) => Snapshot {
                store_id: Some(new_store_id()?),
                version: s.version + 1,
                ..s
            },
            None => Snapshot {
                store_id: Some(new_store_id()?),
                ..Snapshot::default()
            },
        };
        self.write(&snap)?;
        Ok(snap)
    }

    fn load(&self) -> Result<Snapshot> {
        // Readers need no lock: the file is only ever replaced whole.
        self.read()
    }

    fn update(&self, change: Change<'_>) -> Result<Snapshot> {
        // Checked before locking so a wrong path creates no lock file.
        if !self.path.exists() {
            return Err(self.missing());
        }
        let _lock = self.lock()?;
        let mut snap = self.read()?;
        change(&mut snap)?;
        snap.validate()?;
        snap.version += 1;
        self.write(&snap)?;
        Ok(snap)
    }

    fn change_token(&self) -> Result<String> {
        let m = fs::metadata(&self.path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                self.missing()
            } else {
                io("stat", &self.path)(e)
            }
        })?;
        let modified = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        Ok(format!(
            "{modified}:{}:{}",
            m.len(),
            std::os::unix::fs::MetadataExt::ino(&m)
        ))
    }

    /// Watches the directory (the file is replaced by rename, so a watch on
    /// the file itself would go stale after the first change).
    fn watch(&self, wake: Sender<()>) -> Result<Box<dyn Send>> {
        let dir = self
            .dir()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let name = self.path.file_name().map(|n| n.to_owned());
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            let relevant = match &ev {
                Ok(ev) => ev
                    .paths
                    .iter()
                    .any(|p| p.file_name().map(|n| n.to_owned()) == name),
                // A watcher error (e.g. queue overflow): re-check to be safe.
                Err(_) => true,
            };
            if relevant {
                // The receiver gone means the daemon is stopping.
                let _ = wake.send(());
            }
        })
        .map_err(|e| Error::Other(format!("cannot watch {}: {e}", dir.display())))?;
        watcher
            .watch(&dir, notify::RecursiveMode::NonRecursive)
            .map_err(|e| Error::Other(format!("cannot watch {}: {e}", dir.display())))?;
        Ok(Box::new(watcher))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoredKey;
    use keygate_core::credential::{Kind, Status};
    use keygate_core::CredentialRecord;

    pub struct TempDir(pub PathBuf);
    impl TempDir {
        pub fn new() -> TempDir {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).unwrap();
            let p = std::env::temp_dir().join(format!("keygate-test-{}", hex::encode(b)));
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn temp_store() -> (TempDir, FileStore) {
        let dir = TempDir::new();
        let store = FileStore::new(dir.0.join("store.json"));
        (dir, store)
    }

    fn key(id: &str, tenant: &str, kind: Kind) -> StoredKey {
        StoredKey {
            name: String::new(),
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

    fn add(store: &FileStore, k: StoredKey) -> Result<Snapshot> {
        let mut k = Some(k);
        store.update(&mut |s| {
            s.keys.extend(k.take());
            Ok(())
        })
    }

    #[test]
    fn a_missing_store_is_refused_and_nothing_is_created() {
        let (d, store) = temp_store();
        assert!(matches!(store.load(), Err(Error::StoreMissing { .. })));
        assert!(matches!(
            add(&store, key("a", "t", Kind::Scoped)),
            Err(Error::StoreMissing { .. })
        ));
        assert!(store.change_token().is_err());
        assert_eq!(fs::read_dir(&d.0).unwrap().count(), 0);
        let deep = FileStore::new(d.0.join("no/such/dir/s.json"));
        assert!(deep.init().is_err());
        assert!(!d.0.join("no").exists());
    }

    #[test]
    fn init_gives_an_identity_once_and_updates_bump_the_version() {
        let (_d, store) = temp_store();
        let created = store.init().unwrap();
        assert!(created.store_id.is_some());
        assert!(matches!(store.init(), Err(Error::StoreExists { .. })));
        add(&store, key("a", "t", Kind::Scoped)).unwrap();
        let snap = add(&store, key("b", "t", Kind::Scoped)).unwrap();
        assert_eq!((snap.version, snap.keys.len()), (2, 2));
        assert_eq!(store.load().unwrap().store_id, created.store_id);
    }

    #[test]
    fn a_store_without_identity_is_refused_until_init_keeps_its_keys() {
        let (_d, store) = temp_store();
        let old = Snapshot {
            version: 4,
            keys: vec![key("a", "t", Kind::Scoped)],
            ..Snapshot::default()
        };
        fs::write(store.path(), serde_json::to_vec(&old).unwrap()).unwrap();
        assert!(matches!(store.load(), Err(Error::NoIdentity { .. })));
        let snap = store.init().unwrap();
        assert_eq!((snap.version, snap.keys.len()), (5, 1));
        assert!(store.load().unwrap().store_id.is_some());
    }

    #[test]
    fn a_failed_or_invalid_change_leaves_the_store_untouched() {
        let (_d, store) = temp_store();
        store.init().unwrap();
        add(&store, key("d", "t", Kind::Default)).unwrap();
        let err = add(&store, key("d2", "t", Kind::Default)).unwrap_err();
        assert!(err.to_string().contains("default"), "{err}");
        assert!(store
            .update(&mut |_| Err(Error::Other("nope".into())))
            .is_err());
        assert_eq!(store.load().unwrap().version, 1);
    }

    #[test]
    fn corrupt_store_is_refused_loudly() {
        let (_d, store) = temp_store();
        fs::write(store.path(), b"{\"version\": 3, \"keys\": [").unwrap();
        assert!(matches!(store.load(), Err(Error::Corrupt { .. })));
        assert!(matches!(
            store.update(&mut |_| Ok(())),
            Err(Error::Corrupt { .. })
        ));
        assert_eq!(
            fs::read(store.path()).unwrap(),
            b"{\"version\": 3, \"keys\": ["
        );
    }

    #[test]
    fn concurrent_updates_lose_nothing() {
        let (_d, store) = temp_store();
        store.init().unwrap();
        let path = store.path().to_path_buf();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let store = FileStore::new(path);
                    for i in 0..5 {
                        let k = key(&format!("k{t}-{i}"), &format!("t{t}-{i}"), Kind::Scoped);
                        add(&store, k).unwrap();
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

    #[test]
    fn a_change_wakes_the_watcher() {
        let (_d, store) = temp_store();
        store.init().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let _guard = store.watch(tx).unwrap();
        add(&store, key("a", "t", Kind::Scoped)).unwrap();
        assert!(rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok());
    }
}
