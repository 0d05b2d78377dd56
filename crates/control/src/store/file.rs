//! The embedded store: one JSON file, replaced atomically under an exclusive
//! lock so concurrent CLI calls cannot lose an update. Created only by
//! `store init`; every other operation refuses a file that does not exist.
//!
//! Files are never reached through a symbolic link: a store path (or its
//! lock file) that is one is refused, so nobody who can plant a link beside
//! the store can redirect keygate's writes or reads. A replacement is
//! written to a fresh, exclusively created temporary file beside the target
//! (random name, mode 0600 until it takes the target's mode), fsynced,
//! renamed over the target, and the directory fsynced.
//!
//! Every write is validated first, so a file keygate wrote needs no
//! validation when it is read back: beside the store, `<store>.checked`
//! holds the CRC-32 and length of the bytes last written, and the keygate
//! version and validation rules that checked them. A read by the same
//! keygate whose bytes match it skips [`Snapshot::validate`] (at a million
//! keys a third of the load); any other file (edited by hand, restored from a backup, a
//! write that crashed before the note) is validated in full as before. The
//! note guards against accidents, not attackers: whoever can write the
//! store can write valid records of their choosing anyway.

use super::{new_store_id, Change, Snapshot, Store};

/// Bumped whenever [`Snapshot::validate`] checks something it did not
/// before: notes written under older rules are then not trusted.
const VALIDATION_RULES: u32 = 1;
use crate::error::{Error, Result};
use notify::Watcher as _;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

pub struct FileStore {
    path: PathBuf,
}

/// Mode of a file keygate creates: the store holds key hashes.
pub const NEW_FILE_MODE: u32 = 0o600;

/// Refuses `path` if it is a symbolic link; Ok when it is anything else or absent.
pub fn refuse_symlink(path: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "it is a symbolic link; keygate does not follow links for its files (use the real path)",
        )),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Replaces `path` with `bytes` atomically: an exclusively created
/// temporary file beside it (never a link, never a name an attacker can
/// pre-create), fsynced, given the target's mode (or [`NEW_FILE_MODE`]),
/// renamed over it; then the directory is fsynced so the rename survives a
/// crash. A `path` that is a symbolic link is refused.
pub fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    refuse_symlink(path)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mode = match fs::metadata(path) {
        Ok(m) => m.permissions().mode() & 0o7777,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => NEW_FILE_MODE,
        Err(e) => return Err(e),
    };
    // O_CREAT | O_EXCL with a random name, mode 0600: fails rather than
    // follow anything already there.
    let mut tmp = tempfile::Builder::new()
        .prefix(".keygate-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()
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
        // O_NOFOLLOW: a link planted at the lock's name is refused, not
        // created or truncated through.
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(NEW_FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&lock)
            .map_err(io("open the lock file", &lock))?;
        f.lock().map_err(io("lock", &lock))?;
        Ok(f)
    }

    /// The note of the bytes last written and validated: which keygate
    /// validated them and by which rules, then "crc len". A keygate of
    /// another version (whose validation may check more) trusts no note
    /// but its own, so after an upgrade the first read validates in full.
    fn check_note(bytes: &[u8]) -> String {
        format!(
            "keygate-store-note {} rules {VALIDATION_RULES} {:08x} {}\n",
            env!("CARGO_PKG_VERSION"),
            crc32fast::hash(bytes),
            bytes.len()
        )
    }

    /// Whether `bytes` are what keygate last wrote (and so validated).
    fn written_by_us(&self, bytes: &[u8]) -> bool {
        let note = self.sibling(".checked");
        refuse_symlink(&note).is_ok()
            && fs::read(&note).is_ok_and(|n| n == Self::check_note(bytes).as_bytes())
    }

    /// `None` when the file does not exist.
    fn read_raw(&self) -> Result<Option<Snapshot>> {
        refuse_symlink(&self.path).map_err(io("read", &self.path))?;
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("read", &self.path)(e)),
        };
        let snap: Snapshot = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
            path: self.shown(),
            detail: e.to_string(),
        })?;
        if !self.written_by_us(&bytes) {
            snap.validate().map_err(|e| Error::Corrupt {
                path: self.shown(),
                detail: e.to_string(),
            })?;
        }
        Ok(Some(snap))
    }

    fn read(&self) -> Result<Snapshot> {
        let snap = self.read_raw()?.ok_or_else(|| self.missing())?;
        if snap.store_id.is_none() {
            return Err(Error::NoIdentity { path: self.shown() });
        }
        Ok(snap)
    }

    /// Writes a validated snapshot, then notes its bytes as validated.
    fn write(&self, snap: &Snapshot) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(snap).map_err(|e| Error::Internal(e.to_string()))?;
        let note = self.sibling(".checked");
        // Dropped first: a crash between the two writes leaves no note that
        // could vouch for the old bytes should they come back.
        match fs::remove_file(&note) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("remove", &note)(e))
            }
            _ => {}
        }
        replace_file(&self.path, &bytes).map_err(io("write", &self.path))?;
        replace_file(&note, Self::check_note(&bytes).as_bytes()).map_err(io("write", &note))
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
        .map_err(|e| Error::Internal(format!("cannot watch {}: {e}", dir.display())))?;
        watcher
            .watch(&dir, notify::RecursiveMode::NonRecursive)
            .map_err(|e| Error::Internal(format!("cannot watch {}: {e}", dir.display())))?;
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
                owner: None,
                previous_key_hash: None,
                previous_key_expires_at: None,
                metadata: Default::default(),
                limits: vec![],
                plan: None,
                tenant_limits: false,
                quota_used: vec![],
                credits: None,
            },
            metadata: None,
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
    fn a_store_edited_by_hand_is_validated_and_one_keygate_wrote_is_trusted() {
        let (d, store) = temp_store();
        store.init().unwrap();
        add(&store, key("a", "t", Kind::Scoped)).unwrap();
        assert!(d.0.join("store.json.checked").exists());
        // The same bytes keygate wrote (and validated) load without validation...
        let written = fs::read(store.path()).unwrap();
        assert!(store.written_by_us(&written));
        // ...an edit that breaks an invariant is caught: two keys with one id.
        let mut snap: Snapshot = serde_json::from_slice(&written).unwrap();
        snap.keys.push(snap.keys[0].clone());
        fs::write(store.path(), serde_json::to_vec(&snap).unwrap()).unwrap();
        let err = store.load().unwrap_err();
        assert!(err.to_string().contains("appears twice"), "{err}");
        // A valid edit loads (validated), and the next write notes it again.
        snap.keys.pop();
        snap.keys[0].record.scopes = vec!["read".into()];
        fs::write(store.path(), serde_json::to_vec(&snap).unwrap()).unwrap();
        assert_eq!(store.load().unwrap().keys[0].record.scopes, ["read"]);
        add(&store, key("b", "t", Kind::Scoped)).unwrap();
        assert!(store.written_by_us(&fs::read(store.path()).unwrap()));
        // A note written by another keygate version or under other
        // validation rules is not believed (e.g. one from before an upgrade).
        let note = d.0.join("store.json.checked");
        let current = fs::read_to_string(&note).unwrap();
        let older = current.replacen(env!("CARGO_PKG_VERSION"), "0.0.1", 1);
        fs::write(&note, &older).unwrap();
        assert!(!store.written_by_us(&fs::read(store.path()).unwrap()));
        let crc_and_len = current.splitn(5, ' ').nth(4).unwrap();
        fs::write(&note, crc_and_len).unwrap(); // the note format before versions
        assert!(!store.written_by_us(&fs::read(store.path()).unwrap()));
        fs::write(&note, &current).unwrap();
        assert!(store.written_by_us(&fs::read(store.path()).unwrap()));
        // A note that is a link is not believed.
        let note = d.0.join("store.json.checked");
        let elsewhere = d.0.join("elsewhere");
        fs::rename(&note, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &note).unwrap();
        assert!(!store.written_by_us(&fs::read(store.path()).unwrap()));
    }

    #[test]
    fn a_large_store_is_refused_for_the_first_bad_record_as_a_small_one_is() {
        // From 20,000 keys validation runs on two threads; what it reports
        // must not depend on that: the first record in store order that
        // fails, its own checks before uniqueness, then rolled values.
        for n in [50, 30_000] {
            let store = |edit: &dyn Fn(&mut Vec<StoredKey>)| {
                let mut keys: Vec<StoredKey> = (0..n)
                    .map(|i| key(&format!("k{i}"), &format!("t{}", i / 5), Kind::Scoped))
                    .collect();
                edit(&mut keys);
                Snapshot {
                    keys,
                    ..Snapshot::default()
                }
                .validate()
                .map_err(|e| e.to_string())
            };
            let (early, late) = (n - 20, n - 10);
            assert_eq!(store(&|_| {}), Ok(()));
            let invalid = |k: &mut StoredKey| k.record.key_hash = "not hex".into();
            let dup_id = |k: &mut StoredKey| k.record.key_id = "k0".into();
            // An invalid record before a duplicate: the invalid one.
            let err = store(&|ks| {
                invalid(&mut ks[early]);
                dup_id(&mut ks[late]);
            })
            .unwrap_err();
            assert!(err.contains(&format!("(key 'k{early}': ")), "{n}: {err}");
            // A duplicate before an invalid record: the duplicate.
            let err = store(&|ks| {
                dup_id(&mut ks[early]);
                invalid(&mut ks[late]);
            })
            .unwrap_err();
            assert!(err.contains("key id 'k0' appears twice"), "{n}: {err}");
            // One record both: its own check first.
            let err = store(&|ks| {
                invalid(&mut ks[late]);
                dup_id(&mut ks[late]);
            })
            .unwrap_err();
            assert!(err.contains("key 'k0': "), "{n}: {err}");
            let err = store(&|ks| ks[late].record.key_hash = ks[early].record.key_hash.clone())
                .unwrap_err();
            assert!(
                err.contains(&format!("key 'k{late}' reuses another key's hash")),
                "{n}: {err}"
            );
            // A rolled-away value that another key has.
            let err = store(&|ks| {
                ks[early].record.previous_key_hash = Some(ks[0].record.key_hash.clone());
                ks[early].record.previous_key_expires_at = Some(u64::MAX);
            })
            .unwrap_err();
            assert!(
                err.contains(&format!("key 'k{early}' keeps a rolled-away value")),
                "{n}: {err}"
            );
        }
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

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_new_store_is_private_and_an_update_keeps_the_operators_mode() {
        let (_d, store) = temp_store();
        store.init().unwrap();
        assert_eq!(mode(store.path()), 0o600);
        fs::set_permissions(store.path(), fs::Permissions::from_mode(0o640)).unwrap();
        add(&store, key("a", "t", Kind::Scoped)).unwrap();
        assert_eq!(mode(store.path()), 0o640);
        assert_eq!(store.load().unwrap().keys.len(), 1);
    }

    #[test]
    fn links_at_the_old_fixed_temp_name_and_the_lock_name_are_never_followed() {
        let (d, store) = temp_store();
        store.init().unwrap();
        let victim = d.0.join("victim");
        fs::write(&victim, b"precious").unwrap();
        // The fixed temp name earlier releases used: a planted link there
        // must not receive the store.
        std::os::unix::fs::symlink(&victim, d.0.join("store.json.tmp")).unwrap();
        add(&store, key("a", "t", Kind::Scoped)).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(fs::symlink_metadata(d.0.join("store.json.tmp"))
            .unwrap()
            .file_type()
            .is_symlink());
        // A link at the lock's name refuses the update instead of creating through it.
        fs::remove_file(d.0.join("store.json.lock")).unwrap();
        let target = d.0.join("made-through-the-link");
        std::os::unix::fs::symlink(&target, d.0.join("store.json.lock")).unwrap();
        assert!(add(&store, key("b", "t", Kind::Scoped)).is_err());
        assert!(!target.exists());
        assert_eq!(store.load().unwrap().keys.len(), 1);
        // No temporary file is left behind.
        let leftovers: Vec<_> = fs::read_dir(&d.0)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".keygate-"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn a_store_path_that_is_a_symlink_is_refused_and_its_target_untouched() {
        let (d, real) = temp_store();
        real.init().unwrap();
        let before = fs::read(real.path()).unwrap();
        let link = d.0.join("link.json");
        std::os::unix::fs::symlink(real.path(), &link).unwrap();
        let store = FileStore::new(&link);
        let err = store.load().unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(add(&store, key("a", "t", Kind::Scoped)).is_err());
        assert!(store.init().is_err());
        assert_eq!(fs::read(real.path()).unwrap(), before);
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn replace_file_fsyncs_into_place_beside_the_target() {
        let d = TempDir::new();
        let p = d.0.join("status.json");
        replace_file(&p, b"one").unwrap();
        replace_file(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(mode(&p), NEW_FILE_MODE);
        assert_eq!(fs::read_dir(&d.0).unwrap().count(), 1);
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
