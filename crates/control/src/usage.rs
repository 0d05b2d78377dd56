//! Usage: allowed and denied requests per hour or day (UTC), per tenant and
//! optionally per key. Read from `usage_hourly`, which ingestion keeps in the
//! same transaction as the records, so a day costs 24 rows per key however
//! many requests it saw.

use crate::db::{pg_placeholders, Conn, DbError, Param};
use serde::Serialize;
use std::str::FromStr;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
/// The widest window one query may cover, in buckets: a year of days or
/// ~46 days of hours; enough for charts, bounded for the server.
const MAX_BUCKETS: i64 = 1100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bucket {
    Hour,
    Day,
}

impl Bucket {
    fn ms(self) -> i64 {
        match self {
            Bucket::Hour => HOUR_MS,
            Bucket::Day => DAY_MS,
        }
    }
}

impl FromStr for Bucket {
    type Err = DbError;

    fn from_str(s: &str) -> Result<Self, DbError> {
        match s {
            "hour" => Ok(Bucket::Hour),
            "day" => Ok(Bucket::Day),
            _ => Err(DbError::bad_input("bucket", "must be hour or day")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct UsageQuery {
    pub tenant: String,
    /// Only this key's requests.
    pub key_id: Option<String>,
    /// One series per key instead of the tenant's total.
    pub per_key: bool,
    pub bucket: Bucket,
    /// Inclusive, Unix ms; rounded down to the bucket's start.
    pub since_ms: i64,
    /// Exclusive, Unix ms; rounded up to the next bucket's start.
    pub until_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsagePoint {
    /// Start of the bucket, Unix ms (UTC).
    pub start_ms: i64,
    /// Set when the query asked for one series per key.
    pub key_id: Option<String>,
    pub allowed: i64,
    pub denied: i64,
}

/// Buckets with at least one request, oldest first (then by key).
pub fn query_usage(conn: &mut Conn, q: &UsageQuery) -> Result<Vec<UsagePoint>, DbError> {
    let size = q.bucket.ms();
    let since = q.since_ms.div_euclid(size) * size;
    let until = (q.until_ms.saturating_add(size - 1)).div_euclid(size) * size;
    if until <= since {
        return Err(DbError::bad_input("until", "must be after since"));
    }
    if (until - since) / size > MAX_BUCKETS {
        return Err(DbError::bad_input(
            "since",
            format!(
                "the window spans more than {MAX_BUCKETS} buckets: narrow it or use day buckets"
            ),
        ));
    }
    let key_col = if q.per_key { "key_id" } else { "NULL" };
    let mut sql = format!(
        "SELECT (hour_ms / ?) * ? AS b, {key_col} AS k, \
         CAST(SUM(allowed) AS BIGINT), CAST(SUM(denied) AS BIGINT) \
         FROM usage_hourly WHERE tenant = ? AND hour_ms >= ? AND hour_ms < ?"
    );
    let mut p = vec![
        Param::Int(size),
        Param::Int(size),
        Param::Text(q.tenant.clone()),
        Param::Int(since),
        Param::Int(until),
    ];
    if let Some(k) = &q.key_id {
        sql.push_str(" AND key_id = ?");
        p.push(Param::Text(k.clone()));
    }
    sql.push_str(if q.per_key {
        " GROUP BY b, key_id ORDER BY b, key_id"
    } else {
        " GROUP BY b ORDER BY b"
    });
    Ok(match conn {
        Conn::Sqlite(c) => {
            let mut st = c.prepare_cached(&sql)?;
            let refs: Vec<&dyn rusqlite::ToSql> = p.iter().map(Param::as_sqlite).collect();
            let rows = st.query_map(refs.as_slice(), |r| {
                Ok(UsagePoint {
                    start_ms: r.get(0)?,
                    key_id: r.get(1)?,
                    allowed: r.get(2)?,
                    denied: r.get(3)?,
                })
            })?;
            rows.collect::<Result<_, _>>()?
        }
        Conn::Postgres(c) => {
            // PostgreSQL types the NULL placeholder column as text.
            let sql = pg_placeholders(&sql).replace("NULL AS k", "NULL::text AS k");
            let refs: Vec<_> = p.iter().map(Param::as_pg).collect();
            c.query(&sql, &refs)?
                .iter()
                .map(|r| UsagePoint {
                    start_ms: r.get(0),
                    key_id: r.get(1),
                    allowed: r.get(2),
                    denied: r.get(3),
                })
                .collect()
        }
    })
}
