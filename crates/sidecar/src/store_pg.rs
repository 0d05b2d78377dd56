//! The shared store for a fleet: PostgreSQL, selected with
//! `--store postgres://…`. Same contract as the file store: every change is
//! one transaction that serialises on the version row, validates the whole
//! result (one default and five scoped keys per tenant, unique ids and hashes)
//! and bumps the version; only hashes are stored. Each change also sends
//! `NOTIFY keygate_changes`, which every `keygate sync` LISTENs to for an
//! immediate push; a periodic version check catches up on anything missed
//! (a notification lost, a sidecar or PostgreSQL restart).

use crate::store::{Snapshot, Store, StoredKey};
use keygate_core::sync::RevokedSession;
use keygate_core::CredentialRecord;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub const CHANNEL: &str = "keygate_changes";
const SCHEMA_VERSION: i32 = 1;
/// Without a notification, the version is still checked this often.
const CATCH_UP: Duration = Duration::from_secs(1);
const RECONNECT_BACKOFF: Duration = Duration::from_millis(500);
const NOTIFY_WAIT: Duration = Duration::from_millis(1);

const MIGRATIONS: &str = "
CREATE TABLE IF NOT EXISTS keygate_meta (
    id integer PRIMARY KEY CHECK (id = 1),
    version bigint NOT NULL,
    schema_version integer NOT NULL
);
INSERT INTO keygate_meta (id, version, schema_version) VALUES (1, 0, 1) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS keygate_keys (
    key_id text PRIMARY KEY,
    key_hash text NOT NULL UNIQUE,
    tenant text NOT NULL,
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL,
    record text NOT NULL
);
CREATE TABLE IF NOT EXISTS keygate_revoked_sessions (
    key_id text NOT NULL,
    session_id text NOT NULL,
    revoked_at_ms bigint NOT NULL,
    PRIMARY KEY (key_id, session_id)
);
";

pub struct PgStore {
    url: String,
    client: RefCell<Option<Client>>,
    /// The LISTEN connection of `keygate sync`, opened on first use.
    listener: RefCell<Option<Client>>,
    last_check: RefCell<Option<(Instant, String)>>,
    last_attempt: RefCell<Option<Instant>>,
    last_failure: RefCell<Option<Instant>>,
}

fn db_err(e: postgres::Error) -> String {
    // The error text never contains the URL (and so no password).
    format!("PostgreSQL: {e}")
}

impl PgStore {
    pub fn new(url: &str) -> PgStore {
        PgStore {
            url: url.to_owned(),
            client: RefCell::new(None),
            listener: RefCell::new(None),
            last_check: RefCell::new(None),
            last_attempt: RefCell::new(None),
            last_failure: RefCell::new(None),
        }
    }

    fn connect(&self) -> Result<Client, String> {
        Client::connect(&self.url, NoTls).map_err(db_err)
    }

    /// Runs `f` on the connection, reconnecting once if it was lost.
    fn with_client<T>(&self, f: impl Fn(&mut Client) -> Result<T, String>) -> Result<T, String> {
        let mut slot = self.client.borrow_mut();
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            *slot = Some(self.connect()?);
        }
        let client = slot.as_mut().ok_or("no connection")?;
        match f(client) {
            Err(e) if client.is_closed() => {
                *slot = Some(self.connect().map_err(|_| e)?);
                f(slot.as_mut().ok_or("no connection")?)
            }
            other => other,
        }
    }

    /// Creates or upgrades the schema; safe to run again.
    pub fn migrate(&self) -> Result<i32, String> {
        self.with_client(|c| {
            c.batch_execute(MIGRATIONS).map_err(db_err)?;
            let row = c
                .query_one("SELECT schema_version FROM keygate_meta WHERE id = 1", &[])
                .map_err(db_err)?;
            let v: i32 = row.get(0);
            if v > SCHEMA_VERSION {
                return Err(format!(
                    "the database schema ({v}) is newer than this keygate ({SCHEMA_VERSION})"
                ));
            }
            Ok(v)
        })
    }

    fn read(tx: &mut impl postgres::GenericClient, lock: bool) -> Result<Snapshot, String> {
        let sql = if lock {
            "SELECT version FROM keygate_meta WHERE id = 1 FOR UPDATE"
        } else {
            "SELECT version FROM keygate_meta WHERE id = 1"
        };
        let row = tx
            .query_opt(sql, &[])
            .map_err(|e| format!("{} (run `keygate store migrate` first?)", db_err(e)))?
            .ok_or("the store is not initialised: run `keygate store migrate`")?;
        let version: i64 = row.get(0);
        let mut keys = Vec::new();
        for r in tx
            .query(
                "SELECT created_at, updated_at, record FROM keygate_keys ORDER BY key_id",
                &[],
            )
            .map_err(db_err)?
        {
            let record: CredentialRecord = serde_json::from_str(r.get::<_, &str>(2))
                .map_err(|e| format!("a stored key is corrupt ({e}); refusing to use the store"))?;
            keys.push(StoredKey {
                created_at: r.get::<_, i64>(0) as u64,
                updated_at: r.get::<_, i64>(1) as u64,
                record,
            });
        }
        let revoked_sessions = tx
            .query("SELECT key_id, session_id, revoked_at_ms FROM keygate_revoked_sessions ORDER BY 1, 2", &[])
            .map_err(db_err)?
            .iter()
            .map(|r| RevokedSession { key_id: r.get(0), session_id: r.get(1), revoked_at_ms: r.get::<_, i64>(2) as u64 })
            .collect();
        let snap = Snapshot {
            version: version as u64,
            keys,
            revoked_sessions,
        };
        snap.validate()
            .map_err(|e| format!("the store is invalid ({e}); refusing to use it"))?;
        Ok(snap)
    }

    /// Writes the difference between `before` and `after` inside `tx`.
    fn write(
        tx: &mut postgres::Transaction<'_>,
        before: &Snapshot,
        after: &Snapshot,
    ) -> Result<(), String> {
        let old: BTreeMap<&str, &StoredKey> = before
            .keys
            .iter()
            .map(|k| (k.record.key_id.as_str(), k))
            .collect();
        let new: BTreeMap<&str, &StoredKey> = after
            .keys
            .iter()
            .map(|k| (k.record.key_id.as_str(), k))
            .collect();
        for id in old.keys().filter(|id| !new.contains_key(*id)) {
            tx.execute("DELETE FROM keygate_keys WHERE key_id = $1", &[id])
                .map_err(db_err)?;
        }
        for (id, k) in &new {
            if old.get(id) == Some(k) {
                continue;
            }
            let record = serde_json::to_string(&k.record).map_err(|e| e.to_string())?;
            tx.execute(
                "INSERT INTO keygate_keys (key_id, key_hash, tenant, created_at, updated_at, record)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (key_id) DO UPDATE SET key_hash = $2, tenant = $3, updated_at = $5, record = $6",
                &[id, &k.record.key_hash, &k.record.tenant, &(k.created_at as i64), &(k.updated_at as i64), &record],
            )
            .map_err(db_err)?;
        }
        if before.revoked_sessions != after.revoked_sessions {
            tx.execute("DELETE FROM keygate_revoked_sessions", &[])
                .map_err(db_err)?;
            for r in &after.revoked_sessions {
                tx.execute(
                    "INSERT INTO keygate_revoked_sessions (key_id, session_id, revoked_at_ms) VALUES ($1, $2, $3)",
                    &[&r.key_id, &r.session_id, &(r.revoked_at_ms as i64)],
                )
                .map_err(db_err)?;
            }
        }
        Ok(())
    }

    fn version(&self) -> Result<String, String> {
        self.with_client(|c| {
            let row = c
                .query_one("SELECT version FROM keygate_meta WHERE id = 1", &[])
                .map_err(db_err)?;
            Ok(row.get::<_, i64>(0).to_string())
        })
    }

    /// True when a change notification arrived since the last call (or the
    /// LISTEN connection had to be (re)opened, which may have missed some).
    fn notified(&self) -> bool {
        let mut slot = self.listener.borrow_mut();
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            let due = self
                .last_attempt
                .borrow()
                .is_none_or(|t| t.elapsed() >= RECONNECT_BACKOFF);
            if !due {
                return false;
            }
            *self.last_attempt.borrow_mut() = Some(Instant::now());
            match self.connect().and_then(|mut c| {
                c.batch_execute(&format!("LISTEN {CHANNEL}"))
                    .map_err(db_err)?;
                Ok(c)
            }) {
                Ok(c) => {
                    *slot = Some(c);
                    return true;
                }
                Err(_) => return false,
            }
        }
        let Some(client) = slot.as_mut() else {
            return false;
        };
        // A short wait drives the connection; the non-blocking iterator
        // alone did not deliver notifications that had arrived.
        let mut notes = client.notifications();
        let mut any = false;
        let mut iter = notes.timeout_iter(NOTIFY_WAIT);
        while let Ok(Some(_)) = iter.next() {
            any = true;
        }
        any
    }
}

impl Store for PgStore {
    fn load(&self) -> Result<Snapshot, String> {
        self.with_client(|c| {
            let mut tx = c
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(db_err)?;
            let snap = PgStore::read(&mut tx, false)?;
            tx.commit().map_err(db_err)?;
            Ok(snap)
        })
    }

    fn update<T>(
        &self,
        change: impl FnOnce(&mut Snapshot) -> Result<T, String>,
    ) -> Result<T, String> {
        let mut slot = self.client.borrow_mut();
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            *slot = Some(self.connect()?);
        }
        let client = slot.as_mut().ok_or("no connection")?;
        let mut tx = client.transaction().map_err(db_err)?;
        // FOR UPDATE on the version row: concurrent changes wait their turn.
        let before = PgStore::read(&mut tx, true)?;
        let mut after = before.clone();
        let out = change(&mut after)?;
        after.validate()?;
        after.version = before.version + 1;
        PgStore::write(&mut tx, &before, &after)?;
        tx.execute(
            "UPDATE keygate_meta SET version = $1 WHERE id = 1",
            &[&(after.version as i64)],
        )
        .map_err(db_err)?;
        tx.execute(&format!("NOTIFY {CHANNEL}, '{}'", after.version), &[])
            .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(out)
    }

    /// Checked on every daemon tick: a notification, or the catch-up interval,
    /// triggers a read of the version; otherwise the last token stands.
    fn change_token(&self) -> Option<String> {
        let notified = self.notified();
        let stale = self
            .last_check
            .borrow()
            .as_ref()
            .is_none_or(|(t, _)| t.elapsed() >= CATCH_UP);
        let backing_off = self
            .last_failure
            .borrow()
            .is_some_and(|t| t.elapsed() < RECONNECT_BACKOFF);
        if (notified || stale) && !backing_off {
            let version = self.version().ok();
            *self.last_failure.borrow_mut() = version.is_none().then(Instant::now);
            *self.last_check.borrow_mut() = version.clone().map(|v| (Instant::now(), v));
            return version;
        }
        self.last_check.borrow().as_ref().map(|(_, v)| v.clone())
    }
}
