//! The embedded default store: the `keys`, `sessions` and `store_meta`
//! tables of the management database ([`crate::db`]) in one SQLite file, so
//! keys, API tokens, audit records and request logs share one file and one
//! schema (and the log queries can join a key's name).
//!
//! Changes run in one `BEGIN IMMEDIATE` transaction (SQLite's single writer
//! is the lock) and write only the rows that changed, so columns other
//! writers keep (a key's `last_used_at`, kept by log ingestion) survive.
//!
//! Wakes: SQLite has no notifications across processes. Changes made by
//! this process (the API in `keygate serve`) wake every watcher of the same
//! file through an in-process registry at once; changes made by another
//! process (the CLI) are noticed by a filesystem watch on the database and
//! its write-ahead log (every commit writes the WAL), with the sync daemon's
//! once-a-second [`Store::change_token`] check behind both. A wake from a
//! write that changed no key (log ingestion) costs one version query.

use super::{Change, KeyFilter, Snapshot, Store, StoredKey};
use crate::db::{Conn, Db, DbError};
use crate::error::{Error, Result};
use crate::mgmt::AuditEntry;
use keygate_core::credential::{Kind, Status};
use keygate_core::rate_limit::RateLimit;
use keygate_core::sync::{RevokedSession, StoreId};
use keygate_core::CredentialRecord;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Mutex, OnceLock};

pub struct SqliteStore {
    path: PathBuf,
    /// One connection reused across calls (the schema check runs once).
    conn: Mutex<Option<Connection>>,
}

type Watchers = Mutex<HashMap<PathBuf, Vec<(u64, Sender<()>)>>>;

/// Watchers per database file, for in-process wakes.
fn watchers() -> &'static Watchers {
    static W: OnceLock<Watchers> = OnceLock::new();
    W.get_or_init(|| Mutex::new(HashMap::new()))
}

struct WatchGuard {
    path: PathBuf,
    id: u64,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        if let Ok(mut w) = watchers().lock() {
            if let Some(list) = w.get_mut(&self.path) {
                list.retain(|(id, _)| *id != self.id);
            }
        }
    }
}

fn key_of(path: &Path) -> PathBuf {
    // Two spellings of one file must share watchers; a file not made yet
    // keeps its given spelling (it is canonical once `store init` ran).
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn notify(path: &Path) {
    if let Ok(mut w) = watchers().lock() {
        if let Some(list) = w.get_mut(&key_of(path)) {
            // A watcher whose receiver is gone is dropped here.
            list.retain(|(_, tx)| tx.send(()).is_ok());
        }
    }
}

fn kind_str(k: Kind) -> &'static str {
    match k {
        Kind::Default => "default",
        Kind::Scoped => "scoped",
    }
}

fn status_str(s: Status) -> &'static str {
    match s {
        Status::Active => "active",
        Status::Inactive => "inactive",
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl SqliteStore {
    pub fn new(path: impl AsRef<Path>) -> SqliteStore {
        SqliteStore {
            path: path.as_ref().to_path_buf(),
            conn: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn corrupt(&self, detail: impl std::fmt::Display) -> Error {
        Error::Corrupt {
            path: self.describe(),
            detail: detail.to_string(),
        }
    }

    fn db_err(&self) -> impl Fn(DbError) -> Error + '_ {
        move |e| match e {
            DbError::SchemaTooNew { found, supported } => Error::SchemaTooNew {
                found: i32::try_from(found).unwrap_or(i32::MAX),
                supported: i32::try_from(supported).unwrap_or(i32::MAX),
            },
            other => self.corrupt(other),
        }
    }

    fn sql_err(&self) -> impl Fn(rusqlite::Error) -> Error + '_ {
        move |e| self.corrupt(e)
    }

    /// Runs `f` on the cached connection; `create` allows making the file.
    fn with_conn<T>(
        &self,
        create: bool,
        f: impl FnOnce(&mut Connection) -> Result<T>,
    ) -> Result<T> {
        let mut guard = self
            .conn
            .lock()
            .map_err(|_| Error::Internal("the store connection lock is poisoned".into()))?;
        if guard.is_none() {
            if !create && !self.path.exists() {
                return Err(Error::StoreMissing {
                    path: self.path.clone(),
                });
            }
            let Conn::Sqlite(c) = Db::sqlite(&self.path).open().map_err(self.db_err())? else {
                return Err(Error::Internal("not a SQLite connection".into()));
            };
            *guard = Some(c);
        }
        match guard.as_mut() {
            Some(c) => f(c),
            None => Err(Error::Internal("no store connection".into())),
        }
    }

    fn read(&self, c: &Connection) -> Result<Snapshot> {
        self.read_filtered(c, KeyFilter::All)
    }

    /// [`SqliteStore::read`] of some keys only (the revocations are all read).
    fn read_filtered(&self, c: &Connection, filter: KeyFilter<'_>) -> Result<Snapshot> {
        let meta: Option<(String, i64)> = c
            .query_row(
                "SELECT store_id, version FROM store_meta WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.sql_err())?;
        let Some((id, version)) = meta else {
            return Err(Error::StoreMissing {
                path: self.path.clone(),
            });
        };
        let store_id: StoreId = id.parse().map_err(|e| self.corrupt(e))?;
        let (filter_sql, filter_arg) = filter.clause();
        let mut stmt = c
            .prepare_cached(&format!(
                "SELECT key_id, tenant, name, kind, environment, scopes, allowed_ips, \
                 rate_limit_requests, rate_limit_window_secs, status, key_hash, secret_hash, \
                 previous_secret_hash, previous_secret_expires_at, expires_at, created_at, \
                 updated_at FROM keys {filter_sql} ORDER BY key_id",
            ))
            .map_err(self.sql_err())?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(filter_arg), |r| {
                Ok((
                    (
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, String>(6)?,
                    ),
                    (
                        r.get::<_, Option<i64>>(7)?,
                        r.get::<_, Option<i64>>(8)?,
                        r.get::<_, String>(9)?,
                        r.get::<_, String>(10)?,
                        r.get::<_, Option<String>>(11)?,
                        r.get::<_, Option<String>>(12)?,
                        r.get::<_, Option<i64>>(13)?,
                        r.get::<_, Option<i64>>(14)?,
                        r.get::<_, i64>(15)?,
                        r.get::<_, i64>(16)?,
                    ),
                ))
            })
            .map_err(self.sql_err())?;
        let mut keys = Vec::new();
        for row in rows {
            let (
                (key_id, tenant, name, kind, environment, scopes, allowed_ips),
                (rl_n, rl_w, status, key_hash, secret_hash, prev, prev_exp, exp, created, updated),
            ) = row.map_err(self.sql_err())?;
            let kind = match kind.as_str() {
                "default" => Kind::Default,
                _ => Kind::Scoped,
            };
            let status = match status.as_str() {
                "inactive" => Status::Inactive,
                _ => Status::Active,
            };
            let rate_limit = match (rl_n, rl_w) {
                (Some(n), Some(w)) => Some(RateLimit {
                    requests: u32::try_from(n).map_err(|e| self.corrupt(e))?,
                    window_secs: u32::try_from(w).map_err(|e| self.corrupt(e))?,
                }),
                _ => None,
            };
            let list = |s: &str| -> Result<Vec<String>> {
                serde_json::from_str(s).map_err(|e| self.corrupt(format!("key '{key_id}': {e}")))
            };
            keys.push(StoredKey {
                name,
                created_at: to_u64(created),
                updated_at: to_u64(updated),
                record: CredentialRecord {
                    scopes: list(&scopes)?,
                    allowed_ips: list(&allowed_ips)?,
                    key_id,
                    key_hash,
                    secret_hash,
                    previous_secret_hash: prev,
                    previous_secret_expires_at: prev_exp.map(to_u64),
                    kind,
                    tenant,
                    environment,
                    rate_limit,
                    status,
                    expires_at: exp.map(to_u64),
                    owner: None,
                    previous_key_hash: None,
                    previous_key_expires_at: None,
                    metadata: Default::default(),
                    // Filled from `key_limits` (see `sqlite_limits`).
                    limits: vec![],
                    plan: None,
                    tenant_limits: false,
                    quota_used: vec![],
                    credits: None,
                },
                metadata: None,
            });
        }
        self.read_identity(c, &mut keys)?;
        // `revoked_at` holds Unix milliseconds here (not seconds as the other
        // `*_at` columns): a revocation refuses tokens issued before that
        // instant, and a re-login in the same second must still work.
        let mut stmt = c
            .prepare_cached(
                "SELECT key_id, session_id, revoked_at FROM sessions \
                 WHERE revoked_at IS NOT NULL ORDER BY key_id, session_id",
            )
            .map_err(self.sql_err())?;
        let revoked_sessions = stmt
            .query_map([], |r| {
                Ok(RevokedSession {
                    key_id: r.get(0)?,
                    session_id: r.get(1)?,
                    revoked_at_ms: to_u64(r.get(2)?),
                })
            })
            .map_err(self.sql_err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.sql_err())?;
        let mut snap = Snapshot {
            store_id: Some(store_id),
            version: to_u64(version),
            keys,
            revoked_sessions,
            ..Snapshot::default()
        };
        super::sqlite_limits::read(c, &mut snap, &self.sql_err(), &|e| self.corrupt(e))?;
        snap.usage_source = self.log_usage();
        Ok(snap)
    }

    /// Usage counted from this file's request log, through a read-only
    /// connection of its own: the sync daemon asks from its endpoint
    /// threads, when it pushes a full set.
    fn log_usage(&self) -> super::UsageSource {
        let path = self.path.clone();
        super::UsageSource(Some(std::sync::Arc::new(move |s: &Snapshot| {
            // Its own read-only connection: the sync daemon asks from its
            // endpoint threads, when it pushes a full set.
            let shown = path.display().to_string();
            let err = |e: rusqlite::Error| Error::Internal(format!("quota usage in {shown}: {e}"));
            let c = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(err)?;
            c.busy_timeout(std::time::Duration::from_secs(5))
                .map_err(err)?;
            super::sqlite_limits::read_quota_used(&c, s, &err)
        })))
    }

    /// Fills each key's owner, metadata and rolled-away value (columns of
    /// their own, read apart from the rest).
    fn read_identity(&self, c: &Connection, keys: &mut [StoredKey]) -> Result<()> {
        let mut stmt = c
            .prepare_cached(
                "SELECT key_id, owner, metadata, previous_key_hash, previous_key_expires_at \
                 FROM keys WHERE owner IS NOT NULL OR metadata IS NOT NULL \
                 OR previous_key_hash IS NOT NULL",
            )
            .map_err(self.sql_err())?;
        type Row = (
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<i64>,
        );
        let rows = stmt
            .query_map([], |r| -> rusqlite::Result<Row> {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .map_err(self.sql_err())?;
        for row in rows {
            let (key_id, owner, metadata, prev, prev_exp) = row.map_err(self.sql_err())?;
            let Some(k) = keys.iter_mut().find(|k| k.record.key_id == key_id) else {
                continue;
            };
            k.record.owner = owner;
            k.record.previous_key_hash = prev;
            k.record.previous_key_expires_at = prev_exp.map(to_u64);
            k.metadata = metadata
                .map(|m| serde_json::from_str(&m))
                .transpose()
                .map_err(|e| self.corrupt(format!("key '{key_id}' metadata: {e}")))?;
        }
        Ok(())
    }

    /// Writes the rows that differ between `old` and `new`.
    fn write(&self, tx: &Connection, old: &Snapshot, new: &Snapshot) -> Result<()> {
        let e = self.sql_err();
        let before: HashMap<&str, &StoredKey> = old
            .keys
            .iter()
            .map(|k| (k.record.key_id.as_str(), k))
            .collect();
        let after: HashMap<&str, &StoredKey> = new
            .keys
            .iter()
            .map(|k| (k.record.key_id.as_str(), k))
            .collect();
        for id in before.keys().filter(|id| !after.contains_key(*id)) {
            tx.execute("DELETE FROM keys WHERE key_id = ?1", [id])
                .map_err(&e)?;
            // Its revocations too (the service drops them from the
            // snapshot with the key): a later key given the same id, maybe
            // another tenant's, must not list them.
            tx.execute("DELETE FROM sessions WHERE key_id = ?1", [id])
                .map_err(&e)?;
        }
        // A new key starts without sessions: rows under its id are an
        // earlier key's that the log ingester read after its deletion.
        for id in after.keys().filter(|id| !before.contains_key(*id)) {
            tx.execute("DELETE FROM sessions WHERE key_id = ?1", [id])
                .map_err(&e)?;
        }
        // Deletions first: a new key may reuse a deleted key's hash.
        let mut upsert = tx
            .prepare_cached(
                "INSERT INTO keys (key_id, tenant, name, kind, environment, scopes, allowed_ips, \
                 rate_limit_requests, rate_limit_window_secs, status, key_hash, secret_hash, \
                 previous_secret_hash, previous_secret_expires_at, expires_at, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17) \
                 ON CONFLICT (key_id) DO UPDATE SET tenant = excluded.tenant, name = excluded.name, \
                 kind = excluded.kind, environment = excluded.environment, scopes = excluded.scopes, \
                 allowed_ips = excluded.allowed_ips, rate_limit_requests = excluded.rate_limit_requests, \
                 rate_limit_window_secs = excluded.rate_limit_window_secs, status = excluded.status, \
                 key_hash = excluded.key_hash, secret_hash = excluded.secret_hash, \
                 previous_secret_hash = excluded.previous_secret_hash, \
                 previous_secret_expires_at = excluded.previous_secret_expires_at, \
                 expires_at = excluded.expires_at, created_at = excluded.created_at, \
                 updated_at = excluded.updated_at",
            )
            .map_err(&e)?;
        for k in &new.keys {
            if before.get(k.record.key_id.as_str()) == Some(&k) {
                continue;
            }
            let r = &k.record;
            let json = |v: &Vec<String>| serde_json::to_string(v).map_err(|e| self.corrupt(e));
            upsert
                .execute(params![
                    r.key_id,
                    r.tenant,
                    k.name,
                    kind_str(r.kind),
                    r.environment,
                    json(&r.scopes)?,
                    json(&r.allowed_ips)?,
                    r.rate_limit.map(|l| i64::from(l.requests)),
                    r.rate_limit.map(|l| i64::from(l.window_secs)),
                    status_str(r.status),
                    r.key_hash,
                    r.secret_hash,
                    r.previous_secret_hash,
                    r.previous_secret_expires_at.map(to_i64),
                    r.expires_at.map(to_i64),
                    to_i64(k.created_at),
                    to_i64(k.updated_at),
                ])
                .map_err(&e)?;
            let metadata = k
                .metadata
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(|e| self.corrupt(e))?;
            tx.prepare_cached(
                "UPDATE keys SET owner = ?2, metadata = ?3, previous_key_hash = ?4, \
                 previous_key_expires_at = ?5 WHERE key_id = ?1",
            )
            .and_then(|mut st| {
                st.execute(params![
                    r.key_id,
                    r.owner,
                    metadata,
                    r.previous_key_hash,
                    r.previous_key_expires_at.map(to_i64),
                ])
            })
            .map_err(&e)?;
        }
        if old.revoked_sessions != new.revoked_sessions {
            // Sessions the access log showed keep their row (created, last
            // seen) and lose only their mark; the others were marks alone.
            tx.execute_batch(
                "UPDATE sessions SET revoked_at = NULL \
                 WHERE revoked_at IS NOT NULL AND last_seen_at IS NOT NULL; \
                 DELETE FROM sessions WHERE revoked_at IS NOT NULL;",
            )
            .map_err(&e)?;
            let horizon = keygate_core::token::MAX_LIFETIME_SECS;
            // Every revocation is kept, also on a session logged in again
            // after it (a newer token, recorded by the ingester): its older
            // tokens stay refused. The listing shows such a session live.
            for s in &new.revoked_sessions {
                let at = to_i64(s.revoked_at_ms / 1000);
                tx.execute(
                    "INSERT INTO sessions (key_id, session_id, created_at, expires_at, revoked_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (key_id, session_id) \
                     DO UPDATE SET revoked_at = excluded.revoked_at",
                    params![
                        s.key_id,
                        s.session_id,
                        at,
                        at.saturating_add(to_i64(horizon)),
                        to_i64(s.revoked_at_ms)
                    ],
                )
                .map_err(&e)?;
            }
        }
        super::sqlite_limits::write(tx, old, new, &self.sql_err())?;
        tx.execute(
            "UPDATE store_meta SET version = ?1 WHERE id = 1",
            [to_i64(new.version)],
        )
        .map_err(&e)?;
        Ok(())
    }

    /// The keys `filter` selects, read through the `keys` indexes.
    fn read_some(&self, filter: KeyFilter<'_>) -> Result<Vec<StoredKey>> {
        self.with_conn(false, |c| {
            let tx = c.transaction().map_err(self.sql_err())?;
            let snap = self.read_filtered(&tx, filter)?;
            tx.commit().map_err(self.sql_err())?;
            Ok(snap.keys)
        })
    }

    /// Applies `change` in one `BEGIN IMMEDIATE` transaction, with `audit`
    /// written in it when given.
    fn update_with(&self, change: Change<'_>, audit: Option<&AuditEntry<'_>>) -> Result<Snapshot> {
        let snap = self.with_conn(false, |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(self.sql_err())?;
            let old = self.read(&tx)?;
            let mut new = old.clone();
            change(&mut new)?;
            new.validate()?;
            new.version = old.version + 1;
            new.store_id = old.store_id;
            self.write(&tx, &old, &new)?;
            if let Some(a) = audit {
                tx.execute(
                    &crate::mgmt::audit_insert_sql(false),
                    rusqlite::params_from_iter(
                        crate::mgmt::audit_params(a).iter().map(|p| p.as_sqlite()),
                    ),
                )
                .map_err(self.sql_err())?;
            }
            tx.commit().map_err(self.sql_err())?;
            Ok(new)
        })?;
        notify(&self.path);
        Ok(snap)
    }

    /// Fills an empty store with a JSON store's keys and revocations, and
    /// takes over its identity so Envoys fed from the JSON store accept the
    /// SQLite store's pushes without `--takeover`. Refuses a store with keys.
    pub fn import(&self, from: &Snapshot) -> Result<Snapshot> {
        from.validate()?;
        let snap = self.with_conn(false, |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(self.sql_err())?;
            let old = self.read(&tx)?;
            if !old.keys.is_empty() {
                return Err(Error::Other(format!(
                    "the store at {} already has {} key(s); import only into a new store \
                     (`keygate --store NEW.db store init`)",
                    self.describe(),
                    old.keys.len()
                )));
            }
            let mut new = from.clone();
            new.store_id = from.store_id.or(old.store_id);
            new.version = old.version.max(from.version) + 1;
            self.write(&tx, &old, &new)?;
            if let Some(id) = new.store_id {
                tx.execute(
                    "UPDATE store_meta SET store_id = ?1 WHERE id = 1",
                    [id.to_string()],
                )
                .map_err(self.sql_err())?;
            }
            tx.commit().map_err(self.sql_err())?;
            Ok(new)
        })?;
        notify(&self.path);
        Ok(snap)
    }
}

impl SqliteStore {
    /// Wakes on writes to the database file or its WAL by any process.
    fn watch_files(&self, wake: Sender<()>) -> Result<notify::RecommendedWatcher> {
        use notify::Watcher as _;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = self
            .path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        let mut wal = name.clone();
        wal.push("-wal");
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            let relevant = match &ev {
                Ok(ev) => {
                    matches!(
                        ev.kind,
                        notify::EventKind::Modify(_) | notify::EventKind::Create(_)
                    ) && ev
                        .paths
                        .iter()
                        .any(|p| p.file_name().is_some_and(|n| n == name || n == wal))
                }
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
        Ok(watcher)
    }
}

impl Store for SqliteStore {
    fn usage_source(&self) -> super::UsageSource {
        self.log_usage()
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn init(&self) -> Result<Snapshot> {
        let id = super::new_store_id()?;
        self.with_conn(true, |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(self.sql_err())?;
            let existing: Option<String> = tx
                .query_row("SELECT store_id FROM store_meta WHERE id = 1", [], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(self.sql_err())?;
            if let Some(store_id) = existing {
                return Err(Error::StoreExists {
                    path: self.describe(),
                    store_id,
                });
            }
            tx.execute(
                "INSERT INTO store_meta (id, store_id, version) VALUES (1, ?1, 0)",
                [id.to_string()],
            )
            .map_err(self.sql_err())?;
            let snap = self.read(&tx)?;
            tx.commit().map_err(self.sql_err())?;
            Ok(snap)
        })
    }

    fn load(&self) -> Result<Snapshot> {
        self.with_conn(false, |c| {
            // One read transaction: keys and sessions from the same moment.
            let tx = c.transaction().map_err(self.sql_err())?;
            let snap = self.read(&tx)?;
            tx.commit().map_err(self.sql_err())?;
            Ok(snap)
        })
    }

    fn update(&self, change: Change<'_>) -> Result<Snapshot> {
        self.update_with(change, None)
    }

    fn tenant_keys(&self, tenant: &str) -> Result<Vec<StoredKey>> {
        self.read_some(KeyFilter::Tenant(tenant))
    }

    fn key(&self, key_id: &str) -> Result<Option<StoredKey>> {
        Ok(self.read_some(KeyFilter::Id(key_id))?.into_iter().next())
    }

    fn update_audited(&self, change: Change<'_>, audit: &AuditEntry<'_>) -> Result<Snapshot> {
        self.update_with(change, Some(audit))
    }

    fn database(&self) -> Option<Db> {
        Some(Db::sqlite(&self.path))
    }

    fn change_token(&self) -> Result<String> {
        self.with_conn(false, |c| {
            c.query_row(
                "SELECT store_id || ':' || version FROM store_meta WHERE id = 1",
                [],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map_err(self.sql_err())?
            .ok_or_else(|| Error::StoreMissing {
                path: self.path.clone(),
            })
        })
    }

    fn watch(&self, wake: Sender<()>) -> Result<Box<dyn Send>> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = key_of(&self.path);
        let fs_watch = self.watch_files(wake.clone())?;
        watchers()
            .lock()
            .map_err(|_| Error::Internal("the watcher registry is poisoned".into()))?
            .entry(path.clone())
            .or_default()
            .push((id, wake));
        Ok(Box::new((WatchGuard { path, id }, fs_watch)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{NewKey, Service};
    use std::time::Duration;

    fn new_key(tenant: &str, name: &str) -> NewKey {
        NewKey {
            key_id: None,
            name: name.into(),
            tenant: tenant.into(),
            environment: "live".into(),
            kind: Kind::Scoped,
            scopes: vec!["read".into()],
            allowed_ips: vec!["10.0.0.0/8".into()],
            rate_limit: Some(RateLimit {
                requests: 5,
                window_secs: 60,
            }),
            expires_at: Some(9_999_999_999),
            with_secret: true,
            key_value: None,
            secret_value: None,
            owner: None,
            metadata: None,
            key_format: None,
        }
    }

    #[test]
    fn keys_and_revocations_round_trip_through_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let svc = Service::new(Box::new(SqliteStore::new(&path)));
        let init = svc.init_store().unwrap();
        assert!(init.store_id.is_some());
        let c = svc.create_key(new_key("acme", "billing"), 10).unwrap();
        svc.rotate_secret(&c.key_id, 60, 20).unwrap();
        svc.revoke_session(&c.key_id, "s1", 1_234_567).unwrap();
        let snap = svc.snapshot().unwrap();
        assert_eq!(snap.version, 3);
        assert_eq!(snap.store_id, init.store_id);
        let k = snap.find(&c.key_id).unwrap();
        assert_eq!(k.name, "billing");
        assert_eq!(k.record.allowed_ips, vec!["10.0.0.0/8"]);
        assert!(k.record.previous_secret_hash.is_some());
        assert_eq!(snap.revoked_sessions[0].revoked_at_ms, 1_234_567);
        // A second store object on the same file sees the same thing.
        let again = SqliteStore::new(&path).load().unwrap();
        assert_eq!(again, snap);
    }

    #[test]
    fn owner_metadata_and_a_rolled_value_round_trip_through_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let svc = Service::new(Box::new(SqliteStore::new(&path)));
        svc.init_store().unwrap();
        let meta =
            crate::service::parse_metadata("m", r#"{"plan_tier":"gold","n":[1,2]}"#).unwrap();
        let c = svc
            .create_key(
                NewKey {
                    owner: Some("alice@example.com".into()),
                    metadata: Some(meta.clone()),
                    ..new_key("acme", "billing")
                },
                10,
            )
            .unwrap();
        svc.roll_key(None, &c.key_id, 60, None, 20).unwrap();
        let again = SqliteStore::new(&path).load().unwrap();
        let k = again.find(&c.key_id).unwrap();
        assert_eq!(k.record.owner.as_deref(), Some("alice@example.com"));
        assert_eq!(k.metadata.as_ref(), Some(&meta));
        assert_eq!(
            k.record.previous_key_hash.as_deref(),
            Some(
                keygate_core::hash::to_hex(&keygate_core::hash::sha256(c.api_key.as_bytes()))
                    .as_str()
            )
        );
        assert_eq!(k.record.previous_key_expires_at, Some(80));
        assert_eq!(again, svc.snapshot().unwrap());
    }

    #[test]
    fn a_missing_file_says_how_to_create_it_and_init_refuses_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let s = SqliteStore::new(&path);
        assert!(matches!(s.load(), Err(Error::StoreMissing { .. })));
        assert!(!path.exists(), "a read must not create the file");
        s.init().unwrap();
        assert!(matches!(s.init(), Err(Error::StoreExists { .. })));
    }

    #[test]
    fn tenant_limits_hold_and_a_failed_change_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let svc = Service::new(Box::new(SqliteStore::new(dir.path().join("k.db"))));
        svc.init_store().unwrap();
        for _ in 0..5 {
            svc.create_key(new_key("acme", ""), 10).unwrap();
        }
        let before = svc.snapshot().unwrap();
        let err = svc.create_key(new_key("acme", ""), 10).unwrap_err();
        assert!(matches!(err, Error::TenantLimit { .. }), "{err}");
        assert_eq!(svc.snapshot().unwrap(), before);
    }

    #[test]
    fn a_change_in_this_process_wakes_a_watcher_of_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let svc = Service::new(Box::new(SqliteStore::new(&path)));
        svc.init_store().unwrap();
        let watcher = SqliteStore::new(&path);
        let (tx, rx) = std::sync::mpsc::channel();
        let guard = watcher.watch(tx).unwrap();
        let before = watcher.change_token().unwrap();
        svc.create_key(new_key("acme", ""), 10).unwrap();
        rx.recv_timeout(Duration::from_secs(2)).unwrap();
        assert_ne!(watcher.change_token().unwrap(), before);
        drop(guard);
        // Wakes of the first change still on their way (the filesystem's too).
        std::thread::sleep(Duration::from_millis(100));
        while rx.try_recv().is_ok() {}
        svc.create_key(new_key("acme", ""), 10).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
    }

    #[test]
    fn a_commit_through_another_connection_wakes_a_watcher_through_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        SqliteStore::new(&path).init().unwrap();
        let watcher = SqliteStore::new(&path);
        let (tx, rx) = std::sync::mpsc::channel();
        let _guard = watcher.watch(tx).unwrap();
        while rx.try_recv().is_ok() {}
        // A raw connection stands for another process: no in-process wake.
        let Conn::Sqlite(raw) = Db::sqlite(&path).open().unwrap() else {
            panic!("sqlite")
        };
        raw.execute("UPDATE store_meta SET version = version + 1", [])
            .unwrap();
        rx.recv_timeout(Duration::from_secs(2)).unwrap();
    }

    #[test]
    fn a_rewrite_keeps_the_last_used_time_kept_by_log_ingestion() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let svc = Service::new(Box::new(SqliteStore::new(&path)));
        svc.init_store().unwrap();
        let c = svc.create_key(new_key("acme", ""), 10).unwrap();
        let Conn::Sqlite(raw) = Db::sqlite(&path).open().unwrap() else {
            panic!("sqlite")
        };
        raw.execute("UPDATE keys SET last_used_at = 77", [])
            .unwrap();
        svc.set_status(&c.key_id, Status::Inactive, 20).unwrap();
        let used: i64 = raw
            .query_row("SELECT last_used_at FROM keys", [], |r| r.get(0))
            .unwrap();
        assert_eq!(used, 77);
    }

    #[test]
    fn import_takes_a_json_stores_keys_and_identity_once() {
        let dir = tempfile::tempdir().unwrap();
        let json = Service::new(Box::new(super::super::file::FileStore::new(
            dir.path().join("s.json"),
        )));
        let id = json.init_store().unwrap().store_id;
        json.create_key(new_key("acme", ""), 10).unwrap();
        let from = json.snapshot().unwrap();
        let s = SqliteStore::new(dir.path().join("k.db"));
        s.init().unwrap();
        let got = s.import(&from).unwrap();
        assert_eq!(got.store_id, id);
        assert_eq!(s.load().unwrap().keys, from.keys);
        assert!(s.import(&from).is_err(), "a second import is refused");
    }

    #[test]
    fn plans_tenant_limits_and_key_limits_round_trip_through_sqlite() {
        use crate::service::{KeyLimits, TenantLimitsChange};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let svc = Service::new(Box::new(SqliteStore::new(&path)));
        svc.init_store().unwrap();
        let l = |v: &[&str]| v.iter().map(|s| s.parse().unwrap()).collect::<Vec<_>>();
        svc.create_plan("pro", l(&["100/min", "10000/day"]), 5)
            .unwrap();
        let c = svc
            .create_key_limited(
                new_key("acme", "a"),
                KeyLimits {
                    limits: l(&["10/s", "200000/month"]),
                    plan: Some("pro".into()),
                },
                10,
            )
            .unwrap();
        svc.set_tenant_limits(
            "acme",
            &TenantLimitsChange {
                plan: Some(Some("pro".into())),
                limits: Some(l(&["500/min"])),
            },
        )
        .unwrap();
        let snap = svc.snapshot().unwrap();
        let again = SqliteStore::new(&path).load().unwrap();
        assert_eq!(again, snap);
        let k = again.find(&c.key_id).unwrap();
        assert_eq!(k.record.limits, l(&["10/s", "200000/month"]));
        assert_eq!(k.record.plan.as_deref(), Some("pro"));
        assert_eq!(again.plans.len(), 1);
        assert_eq!(again.tenant_limits[0].limits, l(&["500/min"]));
        // Removing them removes their rows.
        svc.revoke_key(&c.key_id).unwrap();
        svc.set_tenant_limits(
            "acme",
            &TenantLimitsChange {
                plan: Some(None),
                limits: Some(vec![]),
            },
        )
        .unwrap();
        svc.delete_plan("pro").unwrap();
        let empty = SqliteStore::new(&path).load().unwrap();
        assert!(empty.plans.is_empty() && empty.tenant_limits.is_empty());
        let rows: i64 = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM key_limits", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0);
    }

    #[test]
    fn quota_usage_is_counted_from_the_hourly_usage_of_the_current_period() {
        use crate::service::{KeyLimits, TenantLimitsChange};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let svc = Service::new(Box::new(SqliteStore::new(&path)));
        svc.init_store().unwrap();
        let l = |v: &[&str]| v.iter().map(|s| s.parse().unwrap()).collect::<Vec<_>>();
        let quota = svc
            .create_key_limited(
                new_key("acme", "q"),
                KeyLimits {
                    limits: l(&["100/min", "1000/day", "9000/month"]),
                    plan: None,
                },
                1,
            )
            .unwrap();
        let mut window = new_key("acme", "w");
        window.kind = Kind::Default;
        window.scopes = vec![];
        let window = svc.create_key(window, 1).unwrap();
        svc.set_tenant_limits(
            "acme",
            &TenantLimitsChange {
                plan: None,
                limits: Some(l(&["5000/day"])),
            },
        )
        .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let this_hour = now / 3600 * 3600 * 1000;
        let c = rusqlite::Connection::open(&path).unwrap();
        for (hour, key, n) in [
            (this_hour, &quota.key_id, 7),
            (this_hour - 40 * 86_400_000, &quota.key_id, 500), // another month
            (this_hour, &window.key_id, 3),
        ] {
            c.execute(
                "INSERT INTO usage_hourly (tenant, hour_ms, key_id, allowed, denied) VALUES ('acme', ?1, ?2, ?3, 0)",
                params![hour, key, n],
            )
            .unwrap();
        }
        let usage = svc.snapshot().unwrap().quota_usage().unwrap();
        let counts =
            |v: &Vec<keygate_core::limits::QuotaUsed>| v.iter().map(|u| u.used).collect::<Vec<_>>();
        assert_eq!(counts(&usage.keys[&quota.key_id]), vec![7, 7]);
        assert!(
            !usage.keys.contains_key(&window.key_id),
            "a key without quotas costs no query"
        );
        assert_eq!(counts(&usage.tenants["acme"]), vec![10]);
        // Credits: uses since the top-up, from the request records.
        let patch = crate::service::KeyPatch {
            credits: Some(Some((10, false))),
            ..Default::default()
        };
        let topped = svc.patch_key("acme", &window.key_id, &patch, 1).unwrap();
        let granted_ms = topped.record.credits.unwrap().granted_at as i64 * 1000;
        for (t, decision) in [
            (granted_ms - 5, "allowed"),
            (granted_ms + 5, "allowed"),
            (granted_ms + 6, "denied"),
        ] {
            c.execute(
                "INSERT INTO request_logs (time_ms, key_id, tenant, decision) VALUES (?1, ?2, 'acme', ?3)",
                params![t, window.key_id, decision],
            )
            .unwrap();
        }
        let usage = svc.snapshot().unwrap().quota_usage().unwrap();
        assert_eq!(
            usage.keys[&window.key_id]
                .iter()
                .map(|u| (u.period, u.used))
                .collect::<Vec<_>>(),
            vec![(keygate_core::limits::QuotaPeriod::Credits, 1)],
            "only the allowed request after the top-up"
        );
    }

    #[test]
    fn credits_status_counts_the_allowed_requests_since_the_top_up_from_the_request_log() {
        use crate::service::KeyLimits;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let svc = Service::new(Box::new(SqliteStore::new(&path)));
        svc.init_store().unwrap();
        // A key with a day quota as well: only its credits are counted.
        let k = svc
            .create_key_limited(
                new_key("acme", "c"),
                KeyLimits {
                    limits: vec!["1000/day".parse().unwrap()],
                    plan: None,
                },
                1,
            )
            .unwrap();
        let plain = svc.create_key(new_key("acme", "p"), 1).unwrap();
        let patch = crate::service::KeyPatch {
            credits: Some(Some((10, true))),
            ..Default::default()
        };
        // Monthly credits count from the later of the top-up and the
        // month's start: a top-up made now.
        let real_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let topped = svc.patch_key("acme", &k.key_id, &patch, real_now).unwrap();
        let granted_ms = topped.record.credits.unwrap().granted_at as i64 * 1000;
        let c = rusqlite::Connection::open(&path).unwrap();
        for (t, decision) in [
            (granted_ms - 5, "allowed"),
            (granted_ms + 1, "allowed"),
            (granted_ms + 2, "allowed"),
            (granted_ms + 3, "allowed"),
            (granted_ms + 4, "denied"),
        ] {
            c.execute(
                "INSERT INTO request_logs (time_ms, key_id, tenant, decision) VALUES (?1, ?2, 'acme', ?3)",
                params![t, k.key_id, decision],
            )
            .unwrap();
        }
        let keys = svc.list_keys(Some("acme")).unwrap();
        let now = topped.record.credits.unwrap().granted_at;
        let (status, error) = svc.credits_status(&keys, now);
        assert!(error.is_none(), "{error:?}");
        assert!(!status.contains_key(&plain.key_id), "no credits, no entry");
        let st = status[&k.key_id];
        assert_eq!((st.balance, st.used, st.remaining), (10, Some(3), Some(7)));
        assert!(st.monthly);
        let next_month = keygate_core::limits::QuotaPeriod::Month.end(now);
        assert_eq!(st.refills_at, Some(next_month));
        assert!(next_month > now && next_month - now <= 31 * 86_400);
    }

    #[test]
    fn credits_status_of_a_store_without_a_request_log_shows_the_balance_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let svc = Service::new(Box::new(crate::store::file::FileStore::new(&path)));
        svc.init_store().unwrap();
        let k = svc.create_key(new_key("acme", "c"), 1).unwrap();
        let patch = crate::service::KeyPatch {
            credits: Some(Some((5, false))),
            ..Default::default()
        };
        svc.patch_key("acme", &k.key_id, &patch, 1).unwrap();
        let (status, error) = svc.credits_status(&svc.list_keys(None).unwrap(), 2);
        assert!(error.is_none());
        let st = status[&k.key_id];
        assert_eq!(
            (st.balance, st.used, st.remaining, st.refills_at),
            (5, None, None, None)
        );
    }
}
