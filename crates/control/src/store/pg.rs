//! The shared store for a fleet: PostgreSQL, selected with
//! `--store postgres://…`. Same contract as the file store: every change is
//! one transaction that serialises on the version row, validates the whole
//! result and bumps the version; only hashes are stored. Each change also
//! sends `NOTIFY keygate_changes`, which [`Store::watch`] turns into a wake
//! by blocking on a LISTEN connection (no polling).
//!
//! The key store's own tables (`keygate_*`) stay the source of truth. When
//! the same database also holds the management schema (`keygate serve`'s
//! migrations: request logs, tokens, audit), each change is mirrored, in
//! the same transaction, into its `keys` and `sessions` tables, which log
//! ingestion (`last_used_at`, live sessions), the log queries (a key's
//! name) and the session listing (revocations) read, as on SQLite.

use super::{new_store_id, Change, KeyFilter, Snapshot, Store, StoredKey};
use crate::db::Db;
use crate::error::{Error, Result};
use crate::mgmt::AuditEntry;
use crate::pg_tls::{self, MakeRustlsConnect};
use keygate_core::sync::{RevokedSession, StoreId};
use keygate_core::CredentialRecord;
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Config};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::mpsc::Sender;
use std::time::Duration;

pub const CHANNEL: &str = "keygate_changes";
const SCHEMA_VERSION: i32 = 5;
const RECONNECT_MIN: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How long the LISTEN connection sits silent before it is probed; a dead
/// peer that sent no FIN is noticed this late at worst (the daemon's
/// periodic version check covers the gap).
const LISTEN_PROBE: Duration = Duration::from_secs(30);

/// Versioned, idempotent steps; `schema_version` records the last applied.
const MIGRATIONS: [&str; 6] = [
    "
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
",
    "ALTER TABLE keygate_meta ADD COLUMN IF NOT EXISTS store_id text;
     UPDATE keygate_meta SET schema_version = 2 WHERE id = 1 AND schema_version < 2;",
    // Key names (the record holds none): existing keys get "".
    "ALTER TABLE keygate_keys ADD COLUMN IF NOT EXISTS name text NOT NULL DEFAULT '';
     UPDATE keygate_meta SET schema_version = 3 WHERE id = 1 AND schema_version < 3;",
    // The API's per-tenant reads; every step runs on each migrate, so a
    // store at version 3 gets it at its next `store migrate` (or init).
    "CREATE INDEX IF NOT EXISTS keygate_keys_tenant ON keygate_keys (tenant);",
    // Key metadata objects (the record carries only what a push forwards).
    "ALTER TABLE keygate_keys ADD COLUMN IF NOT EXISTS metadata text;
     UPDATE keygate_meta SET schema_version = 4 WHERE id = 1 AND schema_version < 4;",
    // Plans and tenant limits, one JSON document (keys carry their own
    // limits and plan in their record).
    "CREATE TABLE IF NOT EXISTS keygate_limit_sets (
         id integer PRIMARY KEY CHECK (id = 1),
         body text NOT NULL
     );
     UPDATE keygate_meta SET schema_version = 5 WHERE id = 1 AND schema_version < 5;",
];

/// The `keygate_limit_sets` document.
#[derive(serde::Serialize, serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitSets {
    #[serde(default)]
    plans: Vec<super::PlanDef>,
    #[serde(default)]
    tenant_limits: Vec<super::TenantLimits>,
}

pub struct PgStore {
    /// As given (it may hold a password: never shown).
    url: String,
    config: Config,
    /// TLS per the URL's sslmode/sslrootcert (see `pg_tls`).
    tls: MakeRustlsConnect,
    host: String,
    port: u16,
    client: RefCell<Option<Client>>,
}

impl PgStore {
    pub fn new(url: &str) -> Result<PgStore> {
        let pg_tls::Target { config, tls, .. } =
            pg_tls::parse(url).map_err(|e| Error::bad("--store", e))?;
        let host = match config.get_hosts().first() {
            Some(postgres::config::Host::Tcp(h)) => h.clone(),
            Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        Ok(PgStore {
            url: url.to_owned(),
            config,
            tls,
            host,
            port,
            client: RefCell::new(None),
        })
    }

    fn err(&self) -> impl Fn(postgres::Error) -> Error + '_ {
        // The error text never contains the URL (and so no password).
        move |e| Error::Postgres {
            host: self.host.clone(),
            port: self.port,
            detail: crate::db::pg_message(&e),
        }
    }

    fn connect(&self) -> Result<Client> {
        self.config.connect(self.tls.clone()).map_err(self.err())
    }

    /// Runs `f` on the connection, reconnecting once if it was lost.
    fn with_client<T>(&self, mut f: impl FnMut(&mut Client) -> Result<T>) -> Result<T> {
        let mut slot = self.client.borrow_mut();
        let client = match &mut *slot {
            Some(c) if !c.is_closed() => c,
            other => other.insert(self.connect()?),
        };
        match f(client) {
            Err(e) if client.is_closed() => {
                let fresh = slot.insert(self.connect().map_err(|_| e)?);
                f(fresh)
            }
            other => other,
        }
    }

    /// Applies pending migrations and gives the store an identity if it has
    /// none. Returns the schema version, the identity and whether it was made now.
    pub fn migrate(&self) -> Result<(i32, StoreId, bool)> {
        self.with_client(|c| {
            let mut tx = c.transaction().map_err(self.err())?;
            // Serialises concurrent migrations.
            tx.batch_execute("SELECT pg_advisory_xact_lock(7131)")
                .map_err(self.err())?;
            for step in MIGRATIONS {
                tx.batch_execute(step).map_err(self.err())?;
            }
            let row = tx
                .query_one(
                    "SELECT schema_version, store_id FROM keygate_meta WHERE id = 1",
                    &[],
                )
                .map_err(self.err())?;
            let found: i32 = row.get(0);
            if found > SCHEMA_VERSION {
                return Err(Error::SchemaTooNew {
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
            let existing: Option<String> = row.get(1);
            let (id, created) = match existing {
                Some(s) => (parse_id(&s)?, false),
                None => {
                    let id = new_store_id()?;
                    tx.execute(
                        "UPDATE keygate_meta SET store_id = $1 WHERE id = 1",
                        &[&id.to_string()],
                    )
                    .map_err(self.err())?;
                    (id, true)
                }
            };
            tx.commit().map_err(self.err())?;
            Ok((found, id, created))
        })
    }

    fn read(&self, tx: &mut impl postgres::GenericClient, lock: bool) -> Result<Snapshot> {
        self.read_filtered(tx, lock, KeyFilter::All)
    }

    /// [`PgStore::read`] of some keys only (the revocations are all read).
    fn read_filtered(
        &self,
        tx: &mut impl postgres::GenericClient,
        lock: bool,
        filter: KeyFilter<'_>,
    ) -> Result<Snapshot> {
        let sql = if lock {
            "SELECT version, store_id FROM keygate_meta WHERE id = 1 FOR UPDATE"
        } else {
            "SELECT version, store_id FROM keygate_meta WHERE id = 1"
        };
        let row = match tx.query_opt(sql, &[]) {
            Ok(Some(row)) => row,
            // No table, no row or no store_id column: not (fully) initialised.
            Ok(None) => return Err(Error::PgNotInitialised),
            Err(e)
                if e.code() == Some(&SqlState::UNDEFINED_TABLE)
                    || e.code() == Some(&SqlState::UNDEFINED_COLUMN) =>
            {
                return Err(Error::PgNotInitialised)
            }
            Err(e) => return Err(self.err()(e)),
        };
        let version: i64 = row.get(0);
        let store_id: Option<String> = row.get(1);
        let store_id = Some(parse_id(&store_id.ok_or(Error::PgNotInitialised)?)?);
        let mut keys = Vec::new();
        let (filter_sql, filter_arg) = filter.clause();
        let args: Vec<&(dyn postgres::types::ToSql + Sync)> = match &filter_arg {
            Some(a) => vec![a],
            None => vec![],
        };
        let rows = match tx.query(
            &crate::db::pg_placeholders(&format!(
                "SELECT created_at, updated_at, record, name, metadata FROM keygate_keys {filter_sql} ORDER BY key_id"
            )),
            &args,
        ) {
            Ok(rows) => rows,
            // A store made by an older keygate, before `store migrate`.
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_COLUMN) => {
                return Err(Error::PgNeedsMigration)
            }
            Err(e) => return Err(self.err()(e)),
        };
        for r in rows {
            let record: CredentialRecord =
                serde_json::from_str(r.get::<_, &str>(2)).map_err(|e| Error::Corrupt {
                    path: self.describe(),
                    detail: format!("a stored key: {e}"),
                })?;
            keys.push(StoredKey {
                name: r.get(3),
                created_at: r.get::<_, i64>(0) as u64,
                updated_at: r.get::<_, i64>(1) as u64,
                record,
                metadata: r
                    .get::<_, Option<&str>>(4)
                    .map(serde_json::from_str)
                    .transpose()
                    .map_err(|e| Error::Corrupt {
                        path: self.describe(),
                        detail: format!("a stored key's metadata: {e}"),
                    })?,
            });
        }
        let revoked_sessions = tx
            .query(
                "SELECT key_id, session_id, revoked_at_ms FROM keygate_revoked_sessions ORDER BY 1, 2",
                &[],
            )
            .map_err(self.err())?
            .iter()
            .map(|r| RevokedSession {
                key_id: r.get(0),
                session_id: r.get(1),
                revoked_at_ms: r.get::<_, i64>(2) as u64,
            })
            .collect();
        let sets: LimitSets = match tx
            .query_opt("SELECT body FROM keygate_limit_sets WHERE id = 1", &[])
            .map_err(self.err())?
        {
            Some(row) => serde_json::from_str(row.get::<_, &str>(0))
                .map_err(|e| Error::Invalid(format!("plans and tenant limits: {e}")))?,
            None => LimitSets::default(),
        };
        let snap = Snapshot {
            store_id,
            version: version as u64,
            keys,
            revoked_sessions,
            plans: sets.plans,
            tenant_limits: sets.tenant_limits,
            usage_source: self.log_usage(),
        };
        snap.validate()?;
        Ok(snap)
    }

    /// Writes the difference between `before` and `after` inside `tx`.
    fn write(
        &self,
        tx: &mut postgres::Transaction<'_>,
        before: &Snapshot,
        after: &Snapshot,
    ) -> Result<()> {
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
                .map_err(self.err())?;
        }
        for (id, k) in &new {
            if old.get(id) == Some(k) {
                continue;
            }
            let record =
                serde_json::to_string(&k.record).map_err(|e| Error::Internal(e.to_string()))?;
            tx.execute(
                "INSERT INTO keygate_keys (key_id, key_hash, tenant, created_at, updated_at, record, name)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (key_id) DO UPDATE SET key_hash = $2, tenant = $3, updated_at = $5, record = $6, name = $7",
                &[id, &k.record.key_hash, &k.record.tenant, &(k.created_at as i64), &(k.updated_at as i64), &record, &k.name],
            )
            .map_err(self.err())?;
            let metadata = k
                .metadata
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(|e| Error::Internal(e.to_string()))?;
            tx.execute(
                "UPDATE keygate_keys SET metadata = $2 WHERE key_id = $1",
                &[id, &metadata],
            )
            .map_err(self.err())?;
        }
        self.mirror(tx, before, after)?;
        if before.revoked_sessions != after.revoked_sessions {
            tx.execute("DELETE FROM keygate_revoked_sessions", &[])
                .map_err(self.err())?;
            for r in &after.revoked_sessions {
                tx.execute(
                    "INSERT INTO keygate_revoked_sessions (key_id, session_id, revoked_at_ms) VALUES ($1, $2, $3)",
                    &[&r.key_id, &r.session_id, &(r.revoked_at_ms as i64)],
                )
                .map_err(self.err())?;
            }
        }
        if before.plans != after.plans || before.tenant_limits != after.tenant_limits {
            let body = serde_json::to_string(&LimitSets {
                plans: after.plans.clone(),
                tenant_limits: after.tenant_limits.clone(),
            })
            .map_err(|e| Error::Internal(e.to_string()))?;
            tx.execute(
                "INSERT INTO keygate_limit_sets (id, body) VALUES (1, $1)
                 ON CONFLICT (id) DO UPDATE SET body = $1",
                &[&body],
            )
            .map_err(self.err())?;
        }
        Ok(())
    }
}

impl PgStore {
    /// The keys `filter` selects (by primary key, or by the tenant index).
    fn read_some(&self, filter: KeyFilter<'_>) -> Result<Vec<StoredKey>> {
        self.with_client(|c| {
            let mut tx = c
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(self.err())?;
            let snap = self.read_filtered(&mut tx, false, filter)?;
            tx.commit().map_err(self.err())?;
            Ok(snap.keys)
        })
    }

    /// Applies `change` in one transaction, with `audit` written in it
    /// when given (into the management schema's `audit`, which must exist).
    fn update_with(&self, change: Change<'_>, audit: Option<&AuditEntry<'_>>) -> Result<Snapshot> {
        let mut slot = self.client.borrow_mut();
        let client = match &mut *slot {
            Some(c) if !c.is_closed() => c,
            other => other.insert(self.connect()?),
        };
        let mut tx = client.transaction().map_err(self.err())?;
        // FOR UPDATE on the version row: concurrent changes wait their turn.
        let before = self.read(&mut tx, true)?;
        let mut after = before.clone();
        change(&mut after)?;
        after.validate()?;
        after.version = before.version + 1;
        self.write(&mut tx, &before, &after)?;
        tx.execute(
            "UPDATE keygate_meta SET version = $1 WHERE id = 1",
            &[&(after.version as i64)],
        )
        .map_err(self.err())?;
        tx.execute(&format!("NOTIFY {CHANNEL}, '{}'", after.version), &[])
            .map_err(self.err())?;
        if let Some(a) = audit {
            let params = crate::mgmt::audit_params(a);
            let params: Vec<_> = params.iter().map(|p| p.as_pg()).collect();
            tx.execute(
                &crate::db::pg_placeholders(&crate::mgmt::audit_insert_sql(true)),
                &params,
            )
            .map_err(self.err())?;
        }
        tx.commit().map_err(self.err())?;
        Ok(after)
    }

    /// Mirrors the change into the management schema's `keys` and
    /// `sessions`, if this database has them (see the module note). Only
    /// what changed is written, keys before sessions (the order log
    /// ingestion takes its row locks in), and `last_used_at` is left to
    /// ingestion. A mirror that has drifted (a store whose keys predate the
    /// management schema) is rewritten whole.
    fn mirror(
        &self,
        tx: &mut postgres::Transaction<'_>,
        before: &Snapshot,
        after: &Snapshot,
    ) -> Result<()> {
        let present: bool = tx
            .query_one(
                "SELECT to_regclass('keys') IS NOT NULL AND to_regclass('sessions') IS NOT NULL",
                &[],
            )
            .map_err(self.err())?
            .get(0);
        if !present {
            return Ok(());
        }
        let mirrored: i64 = tx
            .query_one("SELECT count(*) FROM keys", &[])
            .map_err(self.err())?
            .get(0);
        let whole = usize::try_from(mirrored).ok() != Some(before.keys.len());
        let old: BTreeMap<&str, &StoredKey> = before
            .keys
            .iter()
            .map(|k| (k.record.key_id.as_str(), k))
            .collect();
        let kept: Vec<String> = after.keys.iter().map(|k| k.record.key_id.clone()).collect();
        if whole {
            tx.execute("DELETE FROM keys WHERE NOT (key_id = ANY($1))", &[&kept])
                .map_err(self.err())?;
            tx.execute(
                "DELETE FROM sessions WHERE NOT (key_id = ANY($1))",
                &[&kept],
            )
            .map_err(self.err())?;
        }
        // A new key starts without sessions: rows under its id are an
        // earlier key's that the log ingester read after its deletion.
        for id in kept.iter().filter(|id| !old.contains_key(id.as_str())) {
            tx.execute("DELETE FROM sessions WHERE key_id = $1", &[id])
                .map_err(self.err())?;
        }
        // Deletions first: a new key may reuse a deleted key's hash.
        for id in old.keys().filter(|id| !kept.iter().any(|k| k == *id)) {
            tx.execute("DELETE FROM keys WHERE key_id = $1", &[id])
                .map_err(self.err())?;
            // Its revocations too, as on SQLite (the service drops them
            // from the snapshot with the key).
            tx.execute("DELETE FROM sessions WHERE key_id = $1", &[id])
                .map_err(self.err())?;
        }
        let upsert = tx
            .prepare(
                "INSERT INTO keys (key_id, tenant, name, kind, environment, scopes, allowed_ips, \
                 rate_limit_requests, rate_limit_window_secs, status, key_hash, secret_hash, \
                 previous_secret_hash, previous_secret_expires_at, expires_at, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7::text::jsonb, $8, $9, $10, $11, $12, \
                 $13, $14, $15, $16, $17) \
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
            .map_err(self.err())?;
        let mut changed: Vec<&StoredKey> = after
            .keys
            .iter()
            .filter(|k| whole || old.get(k.record.key_id.as_str()) != Some(k))
            .collect();
        changed.sort_by(|a, b| a.record.key_id.cmp(&b.record.key_id));
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for k in changed {
            let r = &k.record;
            let json = |v: &Vec<String>| {
                serde_json::to_string(v).map_err(|e| Error::Internal(e.to_string()))
            };
            let kind = match r.kind {
                keygate_core::credential::Kind::Default => "default",
                keygate_core::credential::Kind::Scoped => "scoped",
            };
            let status = match r.status {
                keygate_core::credential::Status::Active => "active",
                keygate_core::credential::Status::Inactive => "inactive",
            };
            tx.execute(
                &upsert,
                &[
                    &r.key_id,
                    &r.tenant,
                    &k.name,
                    &kind,
                    &r.environment,
                    &json(&r.scopes)?,
                    &json(&r.allowed_ips)?,
                    &r.rate_limit.map(|l| i64::from(l.requests)),
                    &r.rate_limit.map(|l| i64::from(l.window_secs)),
                    &status,
                    &r.key_hash,
                    &r.secret_hash,
                    &r.previous_secret_hash,
                    &r.previous_secret_expires_at.map(int),
                    &r.expires_at.map(int),
                    &int(k.created_at),
                    &int(k.updated_at),
                ],
            )
            .map_err(self.err())?;
        }
        // Revocations: `revoked_at` in ms, as on SQLite. A lifted one (aged
        // out) leaves a session the log showed, and drops a bare mark.
        let marked = |r: &RevokedSession, set: &[RevokedSession]| {
            set.iter()
                .any(|x| x.key_id == r.key_id && x.session_id == r.session_id)
        };
        for r in before
            .revoked_sessions
            .iter()
            .filter(|r| !marked(r, &after.revoked_sessions))
        {
            tx.execute(
                "DELETE FROM sessions WHERE key_id = $1 AND session_id = $2 AND last_seen_at IS NULL",
                &[&r.key_id, &r.session_id],
            )
            .map_err(self.err())?;
            tx.execute(
                "UPDATE sessions SET revoked_at = NULL WHERE key_id = $1 AND session_id = $2",
                &[&r.key_id, &r.session_id],
            )
            .map_err(self.err())?;
        }
        let horizon = int(keygate_core::token::MAX_LIFETIME_SECS);
        for r in after
            .revoked_sessions
            .iter()
            .filter(|r| whole || !before.revoked_sessions.contains(r))
        {
            let at = int(r.revoked_at_ms / 1000);
            // As on SQLite: a session logged in again after it keeps the
            // mark, and the listing shows it live.
            tx.execute(
                "INSERT INTO sessions (key_id, session_id, created_at, expires_at, revoked_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key_id, session_id) \
                 DO UPDATE SET revoked_at = excluded.revoked_at",
                &[
                    &r.key_id,
                    &r.session_id,
                    &at,
                    &at.saturating_add(horizon),
                    &int(r.revoked_at_ms),
                ],
            )
            .map_err(self.err())?;
        }
        Ok(())
    }

    /// Quota usage from the request-log tables `keygate serve` keeps in
    /// this same database (its management database defaults to the store's
    /// URL), through a connection of its own: the sync daemon asks from its
    /// endpoint threads when it pushes a full set. Where those tables do not
    /// exist (a separate `--db`), the push goes on without usage and says so.
    fn log_usage(&self) -> super::UsageSource {
        let (config, tls) = (self.config.clone(), self.tls.clone());
        let (host, port) = (self.host.clone(), self.port);
        super::UsageSource(Some(std::sync::Arc::new(move |snap: &Snapshot| {
            let err = |e: postgres::Error| Error::Postgres {
                host: host.clone(),
                port,
                detail: crate::db::pg_message(&e),
            };
            let mut c = config.connect(tls.clone()).map_err(err)?;
            let mut one = |q: &str, p: &[&(dyn postgres::types::ToSql + Sync)]| -> Result<u64> {
                let n: i64 = c.query_one(q, p).map_err(err)?.get(0);
                Ok(u64::try_from(n).unwrap_or(0))
            };
            super::count_quota_usage(snap, &mut |q| match q {
                super::UsageCount::Key {
                    tenant,
                    key_id,
                    since_ms,
                } => one(
                    "SELECT COALESCE(SUM(allowed), 0)::bigint FROM usage_hourly \
                     WHERE tenant = $1 AND key_id = $2 AND hour_ms >= $3",
                    &[&tenant, &key_id, &since_ms],
                ),
                super::UsageCount::Tenant { tenant, since_ms } => one(
                    "SELECT COALESCE(SUM(allowed), 0)::bigint FROM usage_hourly \
                     WHERE tenant = $1 AND hour_ms >= $2",
                    &[&tenant, &since_ms],
                ),
                super::UsageCount::Records { key_id, since_ms } => one(
                    "SELECT count(*) FROM request_logs \
                     WHERE key_id = $1 AND time_ms >= $2 AND decision = 'allowed'",
                    &[&key_id, &since_ms],
                ),
            })
        })))
    }
}

fn parse_id(s: &str) -> Result<StoreId> {
    s.parse()
        .map_err(|e: &str| Error::Invalid(format!("store id '{s}': {e}")))
}

impl Store for PgStore {
    fn usage_source(&self) -> super::UsageSource {
        self.log_usage()
    }

    fn describe(&self) -> String {
        format!("PostgreSQL at {}:{}", self.host, self.port)
    }

    fn init(&self) -> Result<Snapshot> {
        let (_, id, created) = self.migrate()?;
        if !created {
            return Err(Error::StoreExists {
                path: self.describe(),
                store_id: id.to_string(),
            });
        }
        self.load()
    }

    fn load(&self) -> Result<Snapshot> {
        self.with_client(|c| {
            let mut tx = c
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(self.err())?;
            let snap = self.read(&mut tx, false)?;
            tx.commit().map_err(self.err())?;
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
        Some(Db::Postgres(self.url.clone()))
    }

    fn change_token(&self) -> Result<String> {
        self.with_client(|c| {
            let row = c
                .query_opt(
                    "SELECT version, store_id FROM keygate_meta WHERE id = 1",
                    &[],
                )
                .map_err(self.err())?
                .ok_or(Error::PgNotInitialised)?;
            Ok(format!(
                "{}:{}",
                row.get::<_, i64>(0),
                row.get::<_, Option<String>>(1).unwrap_or_default()
            ))
        })
    }

    /// A thread holding its own LISTEN connection, blocked on it until a
    /// notification arrives. Every (re)connection also wakes, since
    /// notifications sent while disconnected are lost.
    fn watch(&self, wake: Sender<()>) -> Result<Box<dyn Send>> {
        let config = self.config.clone();
        let tls = self.tls.clone();
        let (host, port) = (self.host.clone(), self.port);
        std::thread::Builder::new()
            .name("keygate-pg-listen".into())
            .spawn(move || {
                let mut backoff = RECONNECT_MIN;
                // Said once per outage, not on every retry.
                let mut said = false;
                loop {
                    let listening = config.connect(tls.clone()).and_then(|mut c| {
                        c.batch_execute(&format!("LISTEN {CHANNEL}"))?;
                        Ok(c)
                    });
                    match listening {
                        Ok(mut client) => {
                            backoff = RECONNECT_MIN;
                            said = false;
                            if wake.send(()).is_err() {
                                return;
                            }
                            if !listen(&mut client, &wake) {
                                return;
                            }
                        }
                        Err(e) if !said => {
                            said = true;
                            eprintln!(
                                "keygate: PostgreSQL at {host}:{port}: cannot LISTEN for changes ({e}); retrying"
                            );
                        }
                        Err(_) => {}
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the LISTEN thread: {e}")))?;
        // The thread ends by itself once the receiver is gone.
        Ok(Box::new(()))
    }
}

/// Forwards notifications until the connection fails (true: reconnect) or
/// nobody listens any more (false).
fn listen(client: &mut Client, wake: &Sender<()>) -> bool {
    loop {
        let next = client.notifications().timeout_iter(LISTEN_PROBE).next();
        match next {
            Ok(Some(_)) => {
                if wake.send(()).is_err() {
                    return false;
                }
            }
            Ok(None) => {
                // Quiet for a while: make sure the connection is still alive.
                if client.simple_query("SELECT 1").is_err() {
                    return true;
                }
            }
            Err(_) => return true,
        }
    }
}
