//! Request-log store benchmark on SQLite: ingest rate, then query latency
//! over a large synthetic table.
//!
//!   cargo run --release -p keygate-control --example bench_logs
//!
//! Environment: KEYGATE_BENCH_ROWS (stored rows for the query part, default
//! 10,000,000), KEYGATE_BENCH_INGEST (records ingested from a log file,
//! default 500,000), KEYGATE_BENCH_DIR (where the database goes, default a
//! temp dir, removed at the end); KEYGATE_BENCH_OWNERS=0 (ingested lines
//! without the `owner` field; default: half the keys have one);
//! KEYGATE_BENCH_PG_URL (also ingest the log
//! into that empty PostgreSQL database). The queries expect at least
//! 100,000 rows.

use keygate_control::db::{Conn, Db};
use keygate_control::ingest::Ingester;
use keygate_control::logs::{query_logs, LogQuery, StatusFilter};
use keygate_control::usage::{query_usage, Bucket, UsageQuery};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

const TENANTS: u64 = 100;
const KEYS_PER_TENANT: u64 = 10;
const KEYS: u64 = TENANTS * KEYS_PER_TENANT;
const DAY_MS: i64 = 86_400_000;
/// The stored rows span this many days (the default retention).
const DAYS: i64 = 30;
/// 2026-11-01T00:00:00Z
const START_MS: i64 = 1_793_491_200_000;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows = env_num("KEYGATE_BENCH_ROWS", 10_000_000);
    let ingest_n = env_num("KEYGATE_BENCH_INGEST", 500_000);
    let tmp;
    let dir = match std::env::var("KEYGATE_BENCH_DIR") {
        Ok(d) => std::path::PathBuf::from(d),
        Err(_) => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    println!("bench_logs: SQLite, {rows} stored rows, {ingest_n} ingested records");

    // 1. Ingest rate: a log file of Envoy records into an empty database.
    let db = Db::sqlite(dir.join("ingest.db"));
    let log = dir.join("access.log");
    write_log(&log, ingest_n, START_MS)?;
    let size = std::fs::metadata(&log)?.len();
    let rate = ingest(&db, &log, ingest_n)?;
    println!(
        "ingest into an empty database: {rate:.0} records/s ({:.1} MB/s of log)",
        rate * size as f64 / ingest_n as f64 / 1e6
    );

    // 1b. The same log into PostgreSQL (the fleet store), when given one.
    if let Ok(url) = std::env::var("KEYGATE_BENCH_PG_URL") {
        let rate = ingest(&Db::parse(&url), &log, ingest_n)?;
        println!("ingest into PostgreSQL: {rate:.0} records/s");
    }

    // 2. A large table, bulk-loaded synthetically (not through the ingester).
    let db = Db::sqlite(dir.join("big.db"));
    let t = Instant::now();
    bulk_load(&db, rows)?;
    println!(
        "bulk load of {rows} rows (+ usage rollup, indexes): {:.1} s; database {:.0} MB",
        t.elapsed().as_secs_f64(),
        std::fs::metadata(dir.join("big.db"))?.len() as f64 / 1e6
    );

    // 3. Ingest rate into the large database (bigger indexes).
    let log2 = dir.join("access2.log");
    let after = START_MS + DAYS * DAY_MS;
    write_log(&log2, ingest_n / 2, after)?;
    let rate = ingest(&db, &log2, ingest_n / 2)?;
    println!("ingest into the {rows}-row database: {rate:.0} records/s");

    // 4. Query latency.
    let mut conn = db.open()?;
    let last_day = START_MS + (DAYS - 1) * DAY_MS;
    let mut n = 0u64;
    measure("last 50 records of one key", || {
        n += 1;
        let key = format!("k{}", (n * 7919) % KEYS);
        let page = query_logs(
            &mut conn,
            &LogQuery {
                key_id: Some(key),
                limit: Some(50),
                ..LogQuery::default()
            },
        )
        .map(|p| p.records.len());
        assert_eq!(page.ok(), Some(50));
    });
    measure("last 50 records of one tenant", || {
        n += 1;
        let page = query_logs(
            &mut conn,
            &LogQuery {
                tenant: Some(format!("t{}", n % TENANTS)),
                ..LogQuery::default()
            },
        );
        assert_eq!(page.map(|p| p.records.len()).ok(), Some(50));
    });
    measure("tenant page 20 deep (cursor)", || {
        n += 1;
        let mut q = LogQuery {
            tenant: Some(format!("t{}", n % TENANTS)),
            ..LogQuery::default()
        };
        for _ in 0..20 {
            let page = query_logs(&mut conn, &q);
            q.cursor = page.ok().and_then(|p| p.next_cursor);
        }
        assert!(q.cursor.is_some());
    });
    measure("last 50 records of one owner in a tenant", || {
        n += 1;
        let tenant = n % TENANTS;
        let page = query_logs(
            &mut conn,
            &LogQuery {
                tenant: Some(format!("t{tenant}")),
                owner: Some(format!("user{}", tenant * KEYS_PER_TENANT)),
                ..LogQuery::default()
            },
        );
        assert_eq!(page.map(|p| p.records.len()).ok(), Some(50));
    });
    measure("tenant 4xx in one day, 50", || {
        n += 1;
        let page = query_logs(
            &mut conn,
            &LogQuery {
                tenant: Some(format!("t{}", n % TENANTS)),
                status: Some(StatusFilter::Class(4)),
                since_ms: Some(last_day),
                until_ms: Some(last_day + DAY_MS),
                ..LogQuery::default()
            },
        );
        assert!(page.is_ok_and(|p| !p.records.is_empty()));
    });
    measure("one-day usage of a tenant, hourly per key", || {
        n += 1;
        let points = query_usage(
            &mut conn,
            &UsageQuery {
                tenant: format!("t{}", n % TENANTS),
                key_id: None,
                per_key: true,
                bucket: Bucket::Hour,
                since_ms: last_day,
                until_ms: last_day + DAY_MS,
            },
        );
        assert!(points.is_ok_and(|p| !p.is_empty()));
    });
    measure("30-day usage of a tenant, daily", || {
        n += 1;
        let points = query_usage(
            &mut conn,
            &UsageQuery {
                tenant: format!("t{}", n % TENANTS),
                key_id: None,
                per_key: false,
                bucket: Bucket::Day,
                since_ms: START_MS,
                until_ms: START_MS + DAYS * DAY_MS,
            },
        );
        assert!(points.is_ok_and(|p| !p.is_empty()));
    });
    Ok(())
}

fn record(i: u64, time_ms: i64) -> String {
    let key = i % KEYS;
    let denied = i.is_multiple_of(10);
    let at = std::time::UNIX_EPOCH + Duration::from_millis(time_ms as u64);
    format!(
        concat!(
            r#"{{"time":"{}","method":"GET","path":"/v1/items/{}","status":{},"#,
            r#""client_ip":"10.1.{}.{}","duration_ms":1,"request_id":"{:08x}-7c1d-4f1e-9a55-{:012x}","#,
            r#""decision":"{}","reason":{},"key_id":"k{}","tenant":"t{}","environment":"live","#,
            r#""scope_required":"read","rate_remaining":"41","owner":{}}}"#,
            "\n"
        ),
        humantime::format_rfc3339_millis(at),
        i % 997,
        if denied { 429 } else { 200 },
        (i / 256) % 256,
        i % 256,
        i,
        i,
        if denied { "denied" } else { "allowed" },
        if denied { r#""rate_limited""# } else { "null" },
        key,
        key / KEYS_PER_TENANT,
        owner(key).map_or("null".into(), |o| format!(r#""{o}""#)),
    )
}

/// Half the keys have an owner (one per key), so half the records carry one;
/// none with KEYGATE_BENCH_OWNERS=0 (the access log before owners).
fn owner(key: u64) -> Option<String> {
    static OWNERS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let owners = *OWNERS.get_or_init(|| env_num("KEYGATE_BENCH_OWNERS", 1) != 0);
    (owners && key.is_multiple_of(2)).then(|| format!("user{key}"))
}

fn write_log(path: &Path, n: u64, start_ms: i64) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for i in 0..n {
        // ~1,000 requests a second.
        f.write_all(record(i, start_ms + i as i64).as_bytes())?;
    }
    f.flush()
}

fn ingest(db: &Db, log: &Path, n: u64) -> Result<f64, Box<dyn std::error::Error>> {
    let mut ing = Ingester::new(db, log)?;
    let cpu0 = cpu_secs();
    let t = Instant::now();
    let mut done = 0;
    loop {
        let r = ing.poll_once()?;
        done += r.records;
        if !r.more {
            break;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu0;
    assert_eq!(done, n, "every record ingested");
    println!(
        "  ({:.0} records per CPU-second of this process; {secs:.2} s wall, {cpu:.2} s on CPU)",
        n as f64 / cpu
    );
    Ok(n as f64 / secs)
}

/// Rows generated inside SQLite, indexes built once at the end (much faster
/// than maintaining them row by row), usage rolled up from the rows.
fn bulk_load(db: &Db, rows: u64) -> Result<(), Box<dyn std::error::Error>> {
    let Conn::Sqlite(c) = db.open()? else {
        return Err("bench_logs runs on SQLite".into());
    };
    let span = DAYS * DAY_MS;
    c.execute_batch(
        "DROP INDEX request_logs_tenant_time; DROP INDEX request_logs_key_time;
         DROP INDEX request_logs_time; DROP INDEX request_logs_tenant_owner_time;",
    )?;
    c.execute_batch("BEGIN")?;
    for k in 0..KEYS {
        c.execute(
            "INSERT INTO keys (key_id, tenant, name, kind, key_hash, created_at, updated_at)
             VALUES (?1, ?2, ?3, 'scoped', ?4, 0, 0)",
            rusqlite::params![
                format!("k{k}"),
                format!("t{}", k / KEYS_PER_TENANT),
                format!("key number {k}"),
                format!("{k:064x}")
            ],
        )?;
    }
    c.execute(
        &format!(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n LIMIT {rows})
             INSERT INTO request_logs (time_ms, key_id, tenant, environment, method, path,
                 client_ip, status, decision, reason, request_id, owner)
             SELECT {START_MS} + i * {span} / {rows}, 'k' || (i % {KEYS}),
                 't' || ((i % {KEYS}) / {KEYS_PER_TENANT}), 'live', 'GET',
                 '/v1/items/' || (i % 997), '10.1.' || ((i / 256) % 256) || '.' || (i % 256),
                 CASE WHEN i % 10 = 0 THEN 429 ELSE 200 END,
                 CASE WHEN i % 10 = 0 THEN 'denied' ELSE 'allowed' END,
                 CASE WHEN i % 10 = 0 THEN 'rate_limited' END,
                 printf('%08x-7c1d-4f1e-9a55-%012x', i, i),
                 CASE WHEN i % 2 = 0 THEN 'user' || (i % {KEYS}) END
             FROM n"
        ),
        [],
    )?;
    c.execute_batch(
        "INSERT INTO usage_hourly (tenant, hour_ms, key_id, allowed, denied)
           SELECT tenant, time_ms / 3600000 * 3600000, key_id,
                  sum(decision = 'allowed'), sum(decision = 'denied')
           FROM request_logs GROUP BY 1, 2, 3;
         CREATE INDEX request_logs_tenant_time ON request_logs (tenant, time_ms);
         CREATE INDEX request_logs_key_time ON request_logs (key_id, time_ms);
         CREATE INDEX request_logs_time ON request_logs (time_ms);
         CREATE INDEX request_logs_tenant_owner_time ON request_logs (tenant, owner, time_ms)
             WHERE owner IS NOT NULL;
         COMMIT;
         ANALYZE;",
    )?;
    Ok(())
}

/// Runs `f` 200 times after 10 warm-up runs and prints p50 / p99 / max.
fn measure(what: &str, mut f: impl FnMut()) {
    for _ in 0..10 {
        f();
    }
    let mut ms: Vec<f64> = (0..200)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    println!(
        "{what:<45} p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms",
        ms[ms.len() / 2],
        ms[ms.len() * 99 / 100],
        ms[ms.len() - 1]
    );
}

/// This thread's time on CPU (Linux schedstat), to tell the ingester's own
/// cost from time lost to other processes on a shared machine.
fn cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |ns| ns / 1e9)
}
