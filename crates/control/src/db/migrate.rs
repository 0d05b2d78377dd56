//! Versioned migrations, the same numbers on both databases. SQLite's are
//! applied by rusqlite_migration (recorded in `PRAGMA user_version`);
//! PostgreSQL's by the few lines below, recorded in `schema_migrations`, each
//! file in one transaction under an advisory lock so that fleet servers
//! starting together apply it once.

use super::{Conn, DbError};
use rusqlite_migration::{Migrations, M};

/// (number, name, SQLite SQL, PostgreSQL SQL), in order, numbered from 1.
const MIGRATIONS: &[(i64, &str, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../migrations/sqlite/0001_init.sql"),
        include_str!("../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "tokens_sessions",
        include_str!("../../migrations/sqlite/0002_tokens_sessions.sql"),
        include_str!("../../migrations/postgres/0002_tokens_sessions.sql"),
    ),
    (
        3,
        "key_identity",
        include_str!("../../migrations/sqlite/0003_key_identity.sql"),
        include_str!("../../migrations/postgres/0003_key_identity.sql"),
    ),
    (
        4,
        "limits",
        include_str!("../../migrations/sqlite/0004_limits.sql"),
        include_str!("../../migrations/postgres/0004_limits.sql"),
    ),
    (
        5,
        "request_log_owner",
        include_str!("../../migrations/sqlite/0005_request_log_owner.sql"),
        include_str!("../../migrations/postgres/0005_request_log_owner.sql"),
    ),
];

/// The schema version this build creates and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The newest migration number, as PostgreSQL records it. Equal to
/// [`SCHEMA_VERSION`] while the numbers run without gaps (branches that add
/// migrations in parallel leave gaps until they are renumbered at merge).
const PG_SCHEMA_VERSION: i64 = match MIGRATIONS.last() {
    Some(m) => m.0,
    None => 0,
};

/// An arbitrary constant naming keygate's migration lock among the
/// database's advisory locks.
const PG_MIGRATION_LOCK: i64 = 0x006b_6579_6761_7465; // "keygate"

pub fn migrate(conn: &mut Conn) -> Result<(), DbError> {
    match conn {
        Conn::Sqlite(c) => migrate_sqlite(c),
        Conn::Postgres(c) => migrate_pg(c),
    }
}

fn migrate_sqlite(conn: &mut rusqlite::Connection) -> Result<(), DbError> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(DbError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    let migrations = Migrations::new(MIGRATIONS.iter().map(|m| M::up(m.2)).collect());
    // BEGIN IMMEDIATE: take the write lock up front, waiting for it, rather
    // than upgrading a read lock that another migrating process also holds.
    conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
    let outcome = migrations.to_latest(conn);
    conn.set_transaction_behavior(rusqlite::TransactionBehavior::Deferred);
    match outcome {
        Ok(()) => Ok(()),
        Err(e) => {
            // Another process opening the same new file (a server and a
            // CLI, say) may have read the same old version and migrated
            // first; our attempt then fails on its tables. Its work stands
            // if the version is now current.
            let now: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
            if now == SCHEMA_VERSION {
                Ok(())
            } else {
                Err(DbError::Migration(e.to_string()))
            }
        }
    }
}

fn migrate_pg(client: &mut postgres::Client) -> Result<(), DbError> {
    // One transaction under the lock: a second server starting at the same
    // moment waits here, then finds everything applied.
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PG_MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version bigint PRIMARY KEY,
            name text NOT NULL,
            applied_at bigint NOT NULL
        )",
    )?;
    let found: i64 = tx
        .query_one(
            "SELECT COALESCE(max(version), 0) FROM schema_migrations",
            &[],
        )?
        .get(0);
    if found > PG_SCHEMA_VERSION {
        return Err(DbError::SchemaTooNew {
            found,
            supported: PG_SCHEMA_VERSION,
        });
    }
    for (version, name, _, sql) in MIGRATIONS.iter().filter(|m| m.0 > found) {
        tx.batch_execute(sql).map_err(|e| {
            DbError::Migration(format!("{version:04}_{name}: {}", super::pg_message(&e)))
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at)
             VALUES ($1, $2, extract(epoch from now())::bigint)",
            &[version, name],
        )?;
    }
    tx.commit()?;
    Ok(())
}
