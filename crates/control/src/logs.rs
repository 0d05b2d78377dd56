//! Reading request logs: one tenant's records (or every tenant's, for an
//! operator) newest first, filtered, in pages with an opaque cursor; and
//! pruning them by age.
//!
//! Pages use keyset pagination on (time, id): a cursor names the last record
//! returned and the next page starts strictly below it, so records arriving
//! meanwhile neither shift nor repeat a page, and each page is an index range
//! scan however deep it is.

use crate::db::{now_ms, pg_placeholders, Conn, Db, DbError, Param};
use serde::Serialize;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 1000;
/// How long records are kept unless configured otherwise.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Rows deleted per pruning transaction: short enough that the ingester
/// (the other writer) waits a few milliseconds at most.
const PRUNE_CHUNK: i64 = 5_000;

/// `403` (that status) or `4xx` (the class).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    Exact(u16),
    Class(u8),
}

impl FromStr for StatusFilter {
    type Err = DbError;

    fn from_str(s: &str) -> Result<Self, DbError> {
        let bad = || DbError::bad_input("status", format!("'{s}' should look like 403 or 4xx"));
        let b = s.as_bytes();
        match b {
            [c @ b'1'..=b'5', b'x', b'x'] => Ok(StatusFilter::Class(c - b'0')),
            [b'1'..=b'5', b'0'..=b'9', b'0'..=b'9'] => {
                s.parse().map(StatusFilter::Exact).map_err(|_| bad())
            }
            _ => Err(bad()),
        }
    }
}

/// What to list. `tenant: None` lists every tenant's records (operators).
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    pub tenant: Option<String>,
    pub key_id: Option<String>,
    pub status: Option<StatusFilter>,
    pub decision: Option<String>,
    pub path_prefix: Option<String>,
    pub client_ip: Option<String>,
    /// The key owner the access log recorded (exact match).
    pub owner: Option<String>,
    /// Inclusive, Unix ms.
    pub since_ms: Option<i64>,
    /// Exclusive, Unix ms.
    pub until_ms: Option<i64>,
    /// Default [`DEFAULT_LIMIT`], at most [`MAX_LIMIT`].
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogRecord {
    pub id: i64,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub time_ms: i64,
    pub key_id: Option<String>,
    /// The key's name now (joined at query time), if the key still exists.
    pub key_name: Option<String>,
    pub tenant: Option<String>,
    pub environment: Option<String>,
    /// The key's owner at request time, as the access log recorded it.
    pub owner: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub client_ip: Option<String>,
    pub status: Option<i64>,
    pub decision: Option<String>,
    pub reason: Option<String>,
    pub request_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogPage {
    pub records: Vec<LogRecord>,
    /// Present when more records follow.
    pub next_cursor: Option<String>,
}

/// The cursor is the (time, id) of the last record of a page, hex-encoded:
/// opaque to clients, checked on the way back in.
fn encode_cursor(time_ms: i64, id: i64) -> String {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&time_ms.to_be_bytes());
    b[8..].copy_from_slice(&id.to_be_bytes());
    hex::encode(b)
}

fn decode_cursor(c: &str) -> Result<(i64, i64), DbError> {
    let bad = || DbError::bad_input("cursor", "not a cursor from a previous page");
    let b: [u8; 16] = hex::decode(c)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(bad)?;
    let mut t = [0u8; 8];
    let mut i = [0u8; 8];
    t.copy_from_slice(&b[..8]);
    i.copy_from_slice(&b[8..]);
    Ok((i64::from_be_bytes(t), i64::from_be_bytes(i)))
}

fn rfc3339_ms(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(at).to_string()
}

const SELECT: &str = "SELECT l.id, l.time_ms, l.key_id, k.name, l.tenant, l.environment, \
     l.method, l.path, l.client_ip, l.status, l.decision, l.reason, l.request_id, l.owner \
     FROM request_logs l LEFT JOIN keys k ON k.key_id = l.key_id WHERE 1 = 1";

fn build(q: &LogQuery) -> Result<(String, Vec<Param>, u32), DbError> {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(DbError::bad_input(
            "limit",
            format!("must be between 1 and {MAX_LIMIT}"),
        ));
    }
    let mut sql = String::from(SELECT);
    let mut p = Vec::new();
    let mut eq = |sql: &mut String, col: &str, v: &Option<String>| {
        if let Some(v) = v {
            sql.push_str(&format!(" AND l.{col} = ?"));
            p.push(Param::Text(v.clone()));
        }
    };
    eq(&mut sql, "tenant", &q.tenant);
    eq(&mut sql, "key_id", &q.key_id);
    eq(&mut sql, "decision", &q.decision);
    eq(&mut sql, "client_ip", &q.client_ip);
    // With the tenant, an index range (request_logs_tenant_owner_time).
    eq(&mut sql, "owner", &q.owner);
    if let Some(prefix) = &q.path_prefix {
        // Not LIKE: SQLite's LIKE ignores case and both treat % and _ as
        // wildcards; this compares the prefix exactly on both databases.
        sql.push_str(" AND substr(l.path, 1, length(?)) = ?");
        p.push(Param::Text(prefix.clone()));
        p.push(Param::Text(prefix.clone()));
    }
    let (lo, hi) = match q.status {
        Some(StatusFilter::Exact(s)) => (Some(i64::from(s)), Some(i64::from(s) + 1)),
        Some(StatusFilter::Class(c)) => (Some(i64::from(c) * 100), Some(i64::from(c) * 100 + 100)),
        None => (None, None),
    };
    for (bound, v) in [(" AND l.status >= ?", lo), (" AND l.status < ?", hi)] {
        if let Some(v) = v {
            sql.push_str(bound);
            p.push(Param::Int(v));
        }
    }
    if let Some(s) = q.since_ms {
        sql.push_str(" AND l.time_ms >= ?");
        p.push(Param::Int(s));
    }
    if let Some(u) = q.until_ms {
        sql.push_str(" AND l.time_ms < ?");
        p.push(Param::Int(u));
    }
    if let Some(c) = &q.cursor {
        let (t, id) = decode_cursor(c)?;
        // Spelled out rather than a row-value comparison so both planners
        // turn it into an index range.
        sql.push_str(" AND l.time_ms <= ? AND (l.time_ms < ? OR l.id < ?)");
        p.extend([Param::Int(t), Param::Int(t), Param::Int(id)]);
    }
    sql.push_str(" ORDER BY l.time_ms DESC, l.id DESC LIMIT ?");
    // One more than asked tells whether another page follows.
    p.push(Param::Int(i64::from(limit) + 1));
    Ok((sql, p, limit))
}

/// One page of records, newest first.
pub fn query_logs(conn: &mut Conn, q: &LogQuery) -> Result<LogPage, DbError> {
    let (sql, params, limit) = build(q)?;
    type Raw = (
        i64,
        i64,
        [Option<String>; 8],
        Option<i64>,
        [Option<String>; 3],
    );
    let raw: Vec<Raw> = match conn {
        Conn::Sqlite(c) => {
            let mut st = c.prepare_cached(&sql)?;
            let refs: Vec<&dyn rusqlite::ToSql> = params.iter().map(Param::as_sqlite).collect();
            let rows = st.query_map(refs.as_slice(), |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    [
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                        r.get(8)?,
                        r.get(13)?,
                    ],
                    r.get(9)?,
                    [r.get(10)?, r.get(11)?, r.get(12)?],
                ))
            })?;
            rows.collect::<Result<_, _>>()?
        }
        Conn::Postgres(c) => {
            let refs: Vec<_> = params.iter().map(Param::as_pg).collect();
            c.query(&pg_placeholders(&sql), &refs)?
                .iter()
                .map(|r| {
                    (
                        r.get(0),
                        r.get(1),
                        [
                            r.get(2),
                            r.get(3),
                            r.get(4),
                            r.get(5),
                            r.get(6),
                            r.get(7),
                            r.get(8),
                            r.get(13),
                        ],
                        r.get(9),
                        [r.get(10), r.get(11), r.get(12)],
                    )
                })
                .collect()
        }
    };
    let mut records: Vec<LogRecord> = raw
        .into_iter()
        .map(|(id, time_ms, s, status, [decision, reason, request_id])| {
            let [key_id, key_name, tenant, environment, method, path, client_ip, owner] = s;
            LogRecord {
                id,
                time: rfc3339_ms(time_ms),
                time_ms,
                key_id,
                key_name,
                tenant,
                environment,
                owner,
                method,
                path,
                client_ip,
                status,
                decision,
                reason,
                request_id,
            }
        })
        .collect();
    let more = records.len() > limit as usize;
    records.truncate(limit as usize);
    let next_cursor = if more {
        records.last().map(|r| encode_cursor(r.time_ms, r.id))
    } else {
        None
    };
    Ok(LogPage {
        records,
        next_cursor,
    })
}

/// Deletes records (and hourly usage) older than `cutoff_ms`, a chunk per
/// transaction so the ingester is never held up for long. Returns the
/// number of request records deleted.
pub fn prune(conn: &mut Conn, cutoff_ms: i64) -> Result<u64, DbError> {
    const CHUNK_SQL: &str = "DELETE FROM request_logs WHERE id IN \
         (SELECT id FROM request_logs WHERE time_ms < ? ORDER BY time_ms LIMIT ?)";
    // Whole hours only: an hour partly inside the window keeps its counts.
    const USAGE_SQL: &str = "DELETE FROM usage_hourly WHERE hour_ms < ?";
    let hour_cutoff = cutoff_ms.div_euclid(3_600_000) * 3_600_000;
    let mut total = 0u64;
    loop {
        let n = match conn {
            Conn::Sqlite(c) => {
                c.execute(CHUNK_SQL, rusqlite::params![cutoff_ms, PRUNE_CHUNK])? as u64
            }
            Conn::Postgres(c) => {
                c.execute(&pg_placeholders(CHUNK_SQL), &[&cutoff_ms, &PRUNE_CHUNK])?
            }
        };
        total += n;
        if n < PRUNE_CHUNK as u64 {
            break;
        }
    }
    match conn {
        Conn::Sqlite(c) => {
            c.execute(USAGE_SQL, [hour_cutoff])?;
        }
        Conn::Postgres(c) => {
            c.execute(&pg_placeholders(USAGE_SQL), &[&hour_cutoff])?;
        }
    }
    Ok(total)
}

/// Deletes session rows nobody can use any more: expired, and either never
/// revoked or revoked longer ago than any token lives (every token issued
/// before the revocation has expired, so the store drops the revocation
/// too). Returns the number deleted.
pub fn prune_sessions(conn: &mut Conn, now_ms: i64) -> Result<u64, DbError> {
    const SQL: &str = "DELETE FROM sessions WHERE expires_at < ? \
         AND (revoked_at IS NULL OR revoked_at < ?)";
    let max_life_ms = i64::try_from(keygate_core::token::MAX_LIFETIME_SECS)
        .unwrap_or(i64::MAX)
        .saturating_mul(1000);
    let now_s = now_ms.div_euclid(1000);
    let horizon = now_ms.saturating_sub(max_life_ms);
    Ok(match conn {
        Conn::Sqlite(c) => c.execute(SQL, rusqlite::params![now_s, horizon])? as u64,
        Conn::Postgres(c) => c.execute(&pg_placeholders(SQL), &[&now_s, &horizon])?,
    })
}

/// Prunes by age in the background, with its own connection: request
/// records and usage past the retention, and dead sessions.
pub struct Pruner {
    db: Db,
    retention: Duration,
    every: Duration,
    pub deleted: Arc<AtomicU64>,
}

impl Pruner {
    pub fn new(db: &Db, retention: Duration) -> Pruner {
        Pruner {
            db: db.clone(),
            retention,
            every: Duration::from_secs(300),
            deleted: Arc::default(),
        }
    }

    pub fn with_interval(mut self, every: Duration) -> Pruner {
        self.every = every;
        self
    }

    /// One pass: deletes what is older than the retention as of `now_ms`.
    pub fn prune_once(&self, conn: &mut Conn, now_ms: i64) -> Result<u64, DbError> {
        let keep_ms = i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX);
        let n = prune(conn, now_ms.saturating_sub(keep_ms))?;
        self.deleted.fetch_add(n, Ordering::Relaxed);
        prune_sessions(conn, now_ms)?;
        Ok(n)
    }

    /// Prunes every interval until `stop` is set; errors are retried on
    /// the next pass with a new connection.
    pub fn run_until(&self, stop: &AtomicBool) {
        let mut conn = None;
        while !stop.load(Ordering::Relaxed) {
            if conn.is_none() {
                conn = self.db.open().ok();
            }
            if let Some(c) = conn.as_mut() {
                if self.prune_once(c, now_ms()).is_err() {
                    conn = None;
                }
            }
            let mut left = self.every;
            while !left.is_zero() && !stop.load(Ordering::Relaxed) {
                let d = left.min(Duration::from_millis(50));
                std::thread::sleep(d);
                left -= d;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let c = encode_cursor(1_764_000_000_123, 42);
        assert_eq!(decode_cursor(&c).unwrap(), (1_764_000_000_123, 42));
        for bad in ["", "zz", "00", &c[..30], &format!("{c}00")] {
            assert!(
                matches!(
                    decode_cursor(bad),
                    Err(DbError::BadInput {
                        field: "cursor",
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn status_filters_parse_codes_and_classes() {
        assert_eq!(
            "403".parse::<StatusFilter>().unwrap(),
            StatusFilter::Exact(403)
        );
        assert_eq!(
            "4xx".parse::<StatusFilter>().unwrap(),
            StatusFilter::Class(4)
        );
        for bad in ["4", "x4x", "40", "abc", "4xxx", "603", "0xx"] {
            assert!(bad.parse::<StatusFilter>().is_err(), "{bad}");
        }
    }

    #[test]
    fn limits_outside_the_range_are_refused() {
        for limit in [0, MAX_LIMIT + 1] {
            let q = LogQuery {
                limit: Some(limit),
                ..LogQuery::default()
            };
            assert!(matches!(
                build(&q),
                Err(DbError::BadInput { field: "limit", .. })
            ));
        }
    }
}
