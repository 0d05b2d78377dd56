//! The database under the management plane: SQLite (one file, WAL) by
//! default, PostgreSQL for a fleet. [`Db`] says where it is and opens
//! connections ([`Conn`]) with the schema migrated; each thread that writes
//! (the service, the log ingester, the pruner) holds its own connection.

mod migrate;

pub use migrate::{migrate, SCHEMA_VERSION};

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a SQLite writer waits for another writer's transaction before
/// giving up. Writers keep transactions short (one ingest batch, one pruning
/// chunk), so this is only reached when something is stuck.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Page cache per connection, in KiB when negative (SQLite's convention).
const SQLITE_CACHE_KIB: i64 = -65_536;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The text of a PostgreSQL error; never the connection URL.
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    #[error("migrating the schema: {0}")]
    Migration(String),
    #[error("the database schema (version {found}) is newer than this keygate (version {supported}): upgrade keygate")]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Bad query input, naming the parameter at fault (an API answers 400).
    #[error("{field}: {message}")]
    BadInput {
        field: &'static str,
        message: String,
    },
}

impl From<postgres::Error> for DbError {
    fn from(e: postgres::Error) -> Self {
        DbError::Postgres(pg_message(&e))
    }
}

/// The server's message (postgres::Error alone says just "db error"), or
/// the client-side cause. Neither holds the URL, so never a password.
pub(crate) fn pg_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

impl DbError {
    /// SQLite's "database is locked": another connection holds the lock.
    fn is_sqlite_busy(&self) -> bool {
        matches!(
            self,
            DbError::Sqlite(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
        )
    }

    pub(crate) fn bad_input(field: &'static str, message: impl Into<String>) -> Self {
        DbError::BadInput {
            field,
            message: message.into(),
        }
    }
}

/// Where the database is. Cheap to clone, so every background thread can
/// open its own connection.
#[derive(Clone)]
pub enum Db {
    Sqlite(PathBuf),
    Postgres(String),
}

impl fmt::Debug for Db {
    // The URL may carry a password: show only which kind of store it is.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Db::Sqlite(p) => write!(f, "Db::Sqlite({})", p.display()),
            Db::Postgres(_) => f.write_str("Db::Postgres(..)"),
        }
    }
}

impl Db {
    /// A `postgres://` or `postgresql://` URL, or else a SQLite file path.
    pub fn parse(location: &str) -> Db {
        if location.starts_with("postgres://") || location.starts_with("postgresql://") {
            Db::Postgres(location.to_owned())
        } else {
            Db::Sqlite(PathBuf::from(location))
        }
    }

    pub fn sqlite(path: impl AsRef<Path>) -> Db {
        Db::Sqlite(path.as_ref().to_path_buf())
    }

    /// Do both name the same database (one file, or one URL)?
    pub fn same_as(&self, other: &Db) -> bool {
        match (self, other) {
            (Db::Sqlite(a), Db::Sqlite(b)) => {
                a == b
                    || matches!(
                        (std::fs::canonicalize(a), std::fs::canonicalize(b)),
                        (Ok(x), Ok(y)) if x == y
                    )
            }
            (Db::Postgres(a), Db::Postgres(b)) => a == b,
            _ => false,
        }
    }

    /// A connection with the schema migrated to this build's version.
    pub fn open(&self) -> Result<Conn, DbError> {
        // Processes opening a new SQLite file together (a server and a CLI,
        // an ingester restarted after kill -9) race to switch it to WAL and
        // migrate it. Some of those lock upgrades SQLite refuses at once,
        // without calling the busy handler (waiting could deadlock), so
        // such a refusal is retried here until the same busy timeout.
        let deadline = std::time::Instant::now() + SQLITE_BUSY_TIMEOUT;
        loop {
            let attempt = self.connect().and_then(|mut conn| {
                migrate(&mut conn)?;
                Ok(conn)
            });
            match attempt {
                Err(e) if e.is_sqlite_busy() && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                other => return other,
            }
        }
    }

    /// A connection as the database is, without migrating.
    pub fn connect(&self) -> Result<Conn, DbError> {
        match self {
            Db::Sqlite(path) => {
                let conn = rusqlite::Connection::open(path)?;
                // First, so every statement below waits for a lock too: the
                // journal-mode pragma needs one while another process (a
                // CLI, a restarted server) recovers or checkpoints the WAL.
                conn.busy_timeout(SQLITE_BUSY_TIMEOUT)?;
                // WAL: readers never block the writer nor it them; NORMAL
                // sync in WAL mode loses no committed transaction when the
                // process dies (only on power loss may the last ones go).
                conn.pragma_update(None, "journal_mode", "WAL")?;
                conn.pragma_update(None, "synchronous", "NORMAL")?;
                conn.pragma_update(None, "foreign_keys", "ON")?;
                // The request-log indexes take a page write per tenant and
                // per key in every batch; SQLite's default 2 MB cache makes
                // those page reads from disk once the table is large.
                conn.pragma_update(None, "cache_size", SQLITE_CACHE_KIB)?;
                // Checkpoint (copy the WAL into the database, with fsync)
                // every ~32 MB of WAL rather than every 4 MB: one ingest
                // batch alone writes several MB.
                conn.pragma_update(None, "wal_autocheckpoint", 8192)?;
                Ok(Conn::Sqlite(conn))
            }
            Db::Postgres(url) => {
                // The same sslmode/sslrootcert handling as the key store.
                let target = crate::pg_tls::parse(url).map_err(DbError::Postgres)?;
                let client = target.config.connect(target.tls)?;
                Ok(Conn::Postgres(Box::new(client)))
            }
        }
    }
}

/// One open connection to either database.
pub enum Conn {
    Sqlite(rusqlite::Connection),
    Postgres(Box<postgres::Client>),
}

/// A query parameter, bound the same way on both databases.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Param {
    Int(i64),
    Text(String),
}

impl Param {
    pub(crate) fn as_sqlite(&self) -> &dyn rusqlite::ToSql {
        match self {
            Param::Int(v) => v,
            Param::Text(v) => v,
        }
    }

    pub(crate) fn as_pg(&self) -> &(dyn postgres::types::ToSql + Sync) {
        match self {
            Param::Int(v) => v,
            Param::Text(v) => v,
        }
    }
}

/// SQL written with `?` placeholders, numbered `$1, $2…` for PostgreSQL.
/// Only for SQL this crate writes: it has no `?` inside string literals.
pub(crate) fn pg_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_in_order_for_postgres() {
        assert_eq!(
            pg_placeholders("a = ? AND (b < ? OR c = ?)"),
            "a = $1 AND (b < $2 OR c = $3)"
        );
    }

    #[test]
    fn location_picks_the_database_and_debug_hides_the_url() {
        assert!(matches!(Db::parse("/var/lib/keygate.db"), Db::Sqlite(_)));
        let pg = Db::parse("postgres://u:hunter2@db/keygate");
        assert!(matches!(pg, Db::Postgres(_)));
        assert!(!format!("{pg:?}").contains("hunter2"));
    }

    #[test]
    fn the_log_database_takes_the_key_stores_tls_options() {
        // Refused before any connection is tried, naming the option and not the password.
        let err = Db::parse("postgres://u:hunter2@127.0.0.1:1/keygate?sslmode=verify-full")
            .connect()
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("sslrootcert"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn opening_a_new_sqlite_file_creates_the_schema_in_wal_mode() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::sqlite(dir.path().join("k.db"));
        let Conn::Sqlite(c) = db.open().unwrap() else {
            panic!("sqlite")
        };
        let mode: String = c
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        for table in [
            "tenants",
            "keys",
            "sessions",
            "api_tokens",
            "audit",
            "request_logs",
            "usage_hourly",
            "ingest_state",
            "store_meta",
        ] {
            let n: i64 = c
                .query_row(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                    [table],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(n, 1, "{table}");
        }
        drop(c);
        // Opening again applies nothing twice.
        let Conn::Sqlite(c) = db.open().unwrap() else {
            panic!("sqlite")
        };
        let v: i64 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
    }

    #[test]
    fn a_schema_newer_than_this_build_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::sqlite(dir.path().join("k.db"));
        let Conn::Sqlite(c) = db.open().unwrap() else {
            panic!("sqlite")
        };
        c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(c);
        let err = db.open().err().unwrap();
        assert!(matches!(err, DbError::SchemaTooNew { .. }), "{err}");
        assert!(err.to_string().contains("upgrade keygate"));
    }

    #[test]
    fn processes_opening_a_new_sqlite_file_together_all_succeed() {
        // Many rounds: a lost race (a lock upgrade SQLite refuses without
        // waiting) shows only now and then.
        for round in 0..40 {
            let dir = tempfile::tempdir().unwrap();
            let db = Db::sqlite(dir.path().join("k.db"));
            let opens: Vec<_> = (0..6)
                .map(|_| {
                    let db = db.clone();
                    std::thread::spawn(move || db.open().map(|_| ()))
                })
                .collect();
            for o in opens {
                if let Err(e) = o.join().unwrap() {
                    panic!("round {round}: {e}");
                }
            }
        }
    }
}
