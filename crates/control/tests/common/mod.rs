//! Ingestion and query scenarios run against both databases: each takes a
//! fresh database and a fresh directory for the access log.

#![allow(dead_code)]

use keygate_control::db::{Conn, Db};
use keygate_control::ingest::Ingester;
use keygate_control::logs::{query_logs, LogQuery, Pruner, StatusFilter};
use keygate_control::usage::{query_usage, Bucket, UsageQuery};
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// 2026-11-24T10:00:00Z
pub const T0: i64 = 1_795_514_400_000;
const HOUR: i64 = 3_600_000;

pub fn rfc3339(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(ms as u64);
    humantime::format_rfc3339_millis(at).to_string()
}

pub struct Rec<'a> {
    pub ms: i64,
    pub key: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub decision: &'a str,
    pub status: u16,
    pub path: &'a str,
    pub id: String,
}

pub fn rec(ms: i64, id: impl Into<String>) -> Rec<'static> {
    Rec {
        ms,
        key: Some("k1"),
        tenant: Some("acme"),
        decision: "allowed",
        status: 200,
        path: "/v1/items",
        id: id.into(),
    }
}

/// One line as envoy/envoy.yaml's json_format writes it.
pub fn line(r: &Rec) -> String {
    serde_json::json!({
        "time": rfc3339(r.ms),
        "method": "GET",
        "path": r.path,
        "status": r.status,
        "client_ip": "127.0.0.1",
        "duration_ms": 1,
        "request_id": r.id,
        "decision": r.decision,
        "reason": if r.decision == "denied" { Some("rate_limited") } else { None },
        "key_id": r.key,
        "tenant": r.tenant,
        "environment": r.key.map(|_| "live"),
        "scope_required": null,
        "rate_remaining": null,
    })
    .to_string()
        + "\n"
}

pub fn append(path: &Path, text: &str) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// Lines for request ids `prefix0..prefixN`, one second apart from `start`.
pub fn lines(prefix: &str, n: usize, start: i64) -> String {
    (0..n)
        .map(|i| line(&rec(start + i as i64 * 1000, format!("{prefix}{i}"))))
        .collect()
}

pub fn ids(prefix: &str, n: usize) -> BTreeSet<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

pub fn exec(db: &Db, sql: &str) {
    match db.open().unwrap() {
        Conn::Sqlite(c) => c.execute_batch(sql).unwrap(),
        Conn::Postgres(mut c) => c.batch_execute(sql).unwrap(),
    }
}

pub fn int(db: &Db, sql: &str) -> Option<i64> {
    match db.open().unwrap() {
        Conn::Sqlite(c) => c.query_row(sql, [], |r| r.get(0)).unwrap(),
        Conn::Postgres(mut c) => c.query_one(sql, &[]).unwrap().get(0),
    }
}

/// Every stored request id, failing on a duplicate.
pub fn stored_ids(db: &Db) -> BTreeSet<String> {
    let all: Vec<String> = match db.open().unwrap() {
        Conn::Sqlite(c) => {
            let mut st = c.prepare("SELECT request_id FROM request_logs").unwrap();
            let v = st
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            v
        }
        Conn::Postgres(mut c) => c
            .query("SELECT request_id FROM request_logs", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect(),
    };
    let set: BTreeSet<String> = all.iter().cloned().collect();
    assert_eq!(set.len(), all.len(), "duplicate records stored");
    set
}

pub fn ingester(db: &Db, log: &Path) -> Ingester {
    Ingester::new(db, log).unwrap().with_source("test-node")
}

pub fn partial_last_line_waits_for_its_newline(db: &Db, dir: &Path) {
    let log = dir.join("access.log");
    let third = line(&rec(T0 + 2000, "r2"));
    let (start, end) = third.split_at(40);
    append(&log, &lines("r", 2, T0));
    append(&log, start);
    let mut ing = ingester(db, &log);
    let r = ing.poll_once().unwrap();
    assert_eq!((r.records, r.malformed), (2, 0));
    assert_eq!(ing.poll_once().unwrap().records, 0);
    append(&log, end);
    assert_eq!(ing.poll_once().unwrap().records, 1);
    assert_eq!(stored_ids(db), ids("r", 3));
    assert_eq!(ing.stats().lag(T0 + 3000).bytes_behind, 0);
    assert_eq!(ing.stats().lag(T0 + 3000).seconds, Some(1.0));
}

pub fn malformed_lines_are_skipped_and_counted(db: &Db, dir: &Path) {
    let log = dir.join("access.log");
    append(&log, &line(&rec(T0, "good0")));
    append(&log, "not json at all\n");
    append(&log, "{\"no_time\": 1}\n");
    append(&log, "{\"time\": \"yesterday\"}\n");
    append(&log, "\n");
    append(&log, "[1, 2]\n");
    append(&log, &line(&rec(T0 + 1, "good1")));
    let mut ing = ingester(db, &log);
    let r = ing.poll_once().unwrap();
    assert_eq!((r.records, r.malformed), (2, 4));
    assert_eq!(
        ing.stats()
            .malformed
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
    assert_eq!(stored_ids(db), ids("good", 2));
}

pub fn over_long_line_is_skipped_and_counted_once(db: &Db, dir: &Path) {
    let log = dir.join("access.log");
    append(&log, &line(&rec(T0, "a0")));
    // 9 MB without a newline: more than two read buffers.
    append(&log, &"x".repeat(9 << 20));
    let mut ing = ingester(db, &log);
    let mut malformed = 0;
    for _ in 0..5 {
        malformed += ing.poll_once().unwrap().malformed;
    }
    append(&log, &format!("\n{}", line(&rec(T0 + 1, "a1"))));
    let r = ing.poll_once().unwrap();
    assert_eq!((r.records, malformed + r.malformed), (1, 1));
    assert_eq!(stored_ids(db), ids("a", 2));
}

pub fn restart_resumes_without_duplicates_or_gaps(db: &Db, dir: &Path) {
    let log = dir.join("access.log");
    append(&log, &lines("a", 5, T0));
    {
        let mut ing = ingester(db, &log);
        assert_eq!(ing.poll_once().unwrap().records, 5);
    }
    append(&log, &lines("b", 3, T0 + 10_000));
    let mut ing = ingester(db, &log);
    assert_eq!(ing.poll_once().unwrap().records, 3);
    let mut want = ids("a", 5);
    want.extend(ids("b", 3));
    assert_eq!(stored_ids(db), want);
    assert_eq!(
        ing.last_record_id(),
        int(db, "SELECT max(id) FROM request_logs")
    );
}

pub fn rotation_finishes_the_old_file_before_switching(db: &Db, dir: &Path) {
    let log = dir.join("access.log");
    let old = dir.join("access.log.1");
    append(&log, &lines("a", 3, T0));
    let mut ing = ingester(db, &log);
    assert_eq!(ing.poll_once().unwrap().records, 3);
    std::fs::rename(&log, &old).unwrap();
    // The writer has not reopened yet: it still appends to the old file.
    append(&old, &lines("b", 2, T0 + 10_000));
    File::create(&log).unwrap();
    let r = ing.poll_once().unwrap();
    assert_eq!((r.records, r.rotations), (2, 1));
    let rotations = ing
        .stats()
        .rotations
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(rotations, 1);
    append(&old, &lines("c", 1, T0 + 20_000));
    // Now it has reopened: new records go to the new file.
    append(&log, &lines("d", 2, T0 + 30_000));
    assert_eq!(ing.poll_once().unwrap().records, 3);
    append(&log, &lines("e", 1, T0 + 40_000));
    assert_eq!(ing.poll_once().unwrap().records, 1);
    let mut want = ids("a", 3);
    for (p, n) in [("b", 2), ("c", 1), ("d", 2), ("e", 1)] {
        want.extend(ids(p, n));
    }
    assert_eq!(stored_ids(db), want);
}

pub fn restart_after_rotation_finishes_the_rotated_file(db: &Db, dir: &Path) {
    let log = dir.join("access.log");
    let old = dir.join("access.log.1");
    append(&log, &lines("a", 3, T0));
    {
        let mut ing = ingester(db, &log);
        assert_eq!(ing.poll_once().unwrap().records, 3);
    }
    // While the server is down: more records, rotation, records in the new file.
    append(&log, &lines("b", 2, T0 + 10_000));
    std::fs::rename(&log, &old).unwrap();
    append(&log, &lines("c", 2, T0 + 20_000));
    let mut ing = ingester(db, &log);
    let mut total = 0;
    for _ in 0..3 {
        total += ing.poll_once().unwrap().records;
    }
    assert_eq!(total, 4);
    let mut want = ids("a", 3);
    want.extend(ids("b", 2));
    want.extend(ids("c", 2));
    assert_eq!(stored_ids(db), want);
}

pub fn truncation_starts_again_from_the_top(db: &Db, dir: &Path) {
    let log = dir.join("access.log");
    append(&log, &lines("a", 4, T0));
    let mut ing = ingester(db, &log);
    assert_eq!(ing.poll_once().unwrap().records, 4);
    // copytruncate: same file, emptied, then fewer bytes than we had read.
    File::create(&log).unwrap();
    append(&log, &lines("b", 2, T0 + 10_000));
    let r = ing.poll_once().unwrap();
    assert_eq!((r.records, r.truncations), (2, 1));
    let mut want = ids("a", 4);
    want.extend(ids("b", 2));
    assert_eq!(stored_ids(db), want);
}

pub fn truncated_and_regrown_file_is_still_read_from_the_top(db: &Db, dir: &Path) {
    let log = dir.join("access.log");
    append(&log, &lines("a", 2, T0));
    let mut ing = ingester(db, &log);
    assert_eq!(ing.poll_once().unwrap().records, 2);
    // Truncated and written past the old offset before the next poll: the
    // size alone cannot tell; the file's first bytes do.
    File::create(&log).unwrap();
    append(&log, &lines("b", 5, T0 + 10_000));
    let r = ing.poll_once().unwrap();
    assert_eq!((r.records, r.truncations), (5, 1));
    drop(ing);
    // And after a restart too.
    File::create(&log).unwrap();
    append(&log, &lines("c", 7, T0 + 20_000));
    let mut ing = ingester(db, &log);
    assert_eq!(ing.poll_once().unwrap().records, 7);
    let mut want = ids("a", 2);
    want.extend(ids("b", 5));
    want.extend(ids("c", 7));
    assert_eq!(stored_ids(db), want);
}

pub fn retention_prunes_old_records_and_usage(db: &Db, dir: &Path) {
    let log = dir.join("access.log");
    let day = 24 * HOUR;
    append(&log, &lines("old", 3, T0 - 40 * day));
    append(&log, &lines("new", 2, T0 - day));
    let mut ing = ingester(db, &log);
    assert_eq!(ing.poll_once().unwrap().records, 5);
    assert_eq!(int(db, "SELECT count(*) FROM usage_hourly"), Some(2));
    let pruner = Pruner::new(db, Duration::from_secs(30 * 24 * 3600));
    let mut conn = db.open().unwrap();
    assert_eq!(pruner.prune_once(&mut conn, T0).unwrap(), 3);
    assert_eq!(stored_ids(db), ids("new", 2));
    assert_eq!(int(db, "SELECT count(*) FROM usage_hourly"), Some(1));
    assert_eq!(pruner.prune_once(&mut conn, T0).unwrap(), 0);
}

fn seed_queries(db: &Db, dir: &Path) {
    exec(
        db,
        "INSERT INTO keys (key_id, tenant, name, kind, key_hash, created_at, updated_at) \
         VALUES ('k1', 'acme', 'Checkout', 'default', 'h1', 0, 0), \
                ('k2', 'acme', 'Reports', 'scoped', 'h2', 0, 0)",
    );
    let log = dir.join("access.log");
    let mut text = String::new();
    // 30 records for acme over 3 hours: k1 and k2 alternating, every third
    // denied with 429; 5 for another tenant; 2 public ones.
    for i in 0..30i64 {
        let mut r = rec(T0 + i * 6 * 60_000, format!("q{i}"));
        r.key = Some(if i % 2 == 0 { "k1" } else { "k2" });
        r.path = if i % 5 == 0 { "/admin/x" } else { "/v1/items" };
        if i % 3 == 0 {
            r.decision = "denied";
            r.status = 429;
        }
        text += &line(&r);
    }
    for i in 0..5i64 {
        let mut r = rec(T0 + i, format!("o{i}"));
        r.key = Some("other-key");
        r.tenant = Some("other");
        text += &line(&r);
    }
    for i in 0..2i64 {
        let mut r = rec(T0 + i, format!("p{i}"));
        r.key = None;
        r.tenant = None;
        r.decision = "public";
        text += &line(&r);
    }
    append(&log, &text);
    let mut ing = ingester(db, &log);
    assert_eq!(ing.poll_once().unwrap().records, 37);
}

pub fn log_queries_filter_and_page_newest_first(db: &Db, dir: &Path) {
    seed_queries(db, dir);
    let mut conn = db.open().unwrap();
    let acme = |q: LogQuery| LogQuery {
        tenant: Some("acme".into()),
        ..q
    };
    // Pages of 7 cover the tenant's 30 records once each, newest first.
    let mut seen = Vec::new();
    let mut cursor = None;
    for _ in 0..10 {
        let page = query_logs(
            &mut conn,
            &acme(LogQuery {
                limit: Some(7),
                cursor: cursor.clone(),
                ..LogQuery::default()
            }),
        )
        .unwrap();
        assert!(page.records.len() <= 7);
        seen.extend(page.records);
        cursor = page.next_cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(seen.len(), 30);
    let want: Vec<String> = (0..30).rev().map(|i| format!("q{i}")).collect();
    let got: Vec<String> = seen.iter().filter_map(|r| r.request_id.clone()).collect();
    assert_eq!(got, want);
    assert_eq!(seen[0].key_name.as_deref(), Some("Reports"));
    assert_eq!(seen[1].key_name.as_deref(), Some("Checkout"));
    assert_eq!(seen[0].time, rfc3339(T0 + 29 * 6 * 60_000));

    let count = |conn: &mut Conn, q: LogQuery| {
        query_logs(
            conn,
            &LogQuery {
                limit: Some(1000),
                ..q
            },
        )
        .unwrap()
        .records
        .len()
    };
    let q = |f: fn(&mut LogQuery)| {
        let mut q = acme(LogQuery::default());
        f(&mut q);
        q
    };
    assert_eq!(count(&mut conn, q(|q| q.key_id = Some("k1".into()))), 15);
    assert_eq!(
        count(&mut conn, q(|q| q.status = Some(StatusFilter::Class(4)))),
        10
    );
    assert_eq!(
        count(&mut conn, q(|q| q.status = Some(StatusFilter::Exact(200)))),
        20
    );
    assert_eq!(
        count(&mut conn, q(|q| q.decision = Some("denied".into()))),
        10
    );
    assert_eq!(
        count(&mut conn, q(|q| q.path_prefix = Some("/admin".into()))),
        6
    );
    assert_eq!(
        count(&mut conn, q(|q| q.path_prefix = Some("/ADMIN".into()))),
        0
    );
    assert_eq!(
        count(&mut conn, q(|q| q.path_prefix = Some("/v1/%".into()))),
        0
    );
    assert_eq!(
        count(&mut conn, q(|q| q.client_ip = Some("127.0.0.1".into()))),
        30
    );
    assert_eq!(
        count(&mut conn, q(|q| q.client_ip = Some("10.0.0.1".into()))),
        0
    );
    assert_eq!(
        count(
            &mut conn,
            q(|q| {
                q.since_ms = Some(T0 + 60 * 60_000);
                q.until_ms = Some(T0 + 120 * 60_000);
            })
        ),
        10
    );
    // Another tenant's records never show; no tenant (an operator) sees all.
    assert_eq!(
        count(&mut conn, q(|q| q.key_id = Some("other-key".into()))),
        0
    );
    assert_eq!(count(&mut conn, LogQuery::default()), 37);
}

pub fn usage_counts_per_bucket_and_key(db: &Db, dir: &Path) {
    seed_queries(db, dir);
    let mut conn = db.open().unwrap();
    let base = UsageQuery {
        tenant: "acme".into(),
        key_id: None,
        per_key: false,
        bucket: Bucket::Hour,
        since_ms: T0,
        until_ms: T0 + 24 * HOUR,
    };
    let hours = query_usage(&mut conn, &base).unwrap();
    // 10 records per hour; denied are i % 3 == 0.
    let got: Vec<(i64, i64, i64)> = hours
        .iter()
        .map(|p| (p.start_ms, p.allowed, p.denied))
        .collect();
    assert_eq!(
        got,
        vec![(T0, 6, 4), (T0 + HOUR, 7, 3), (T0 + 2 * HOUR, 7, 3)]
    );
    let day = query_usage(
        &mut conn,
        &UsageQuery {
            bucket: Bucket::Day,
            ..base.clone()
        },
    )
    .unwrap();
    assert_eq!(day.len(), 1);
    assert_eq!((day[0].allowed, day[0].denied), (20, 10));
    assert_eq!(day[0].start_ms % (24 * HOUR), 0);
    let per_key = query_usage(
        &mut conn,
        &UsageQuery {
            bucket: Bucket::Day,
            per_key: true,
            ..base.clone()
        },
    )
    .unwrap();
    let got: Vec<(Option<String>, i64, i64)> = per_key
        .iter()
        .map(|p| (p.key_id.clone(), p.allowed, p.denied))
        .collect();
    assert_eq!(
        got,
        vec![(Some("k1".into()), 10, 5), (Some("k2".into()), 10, 5)]
    );
    let one_key = query_usage(
        &mut conn,
        &UsageQuery {
            bucket: Bucket::Day,
            key_id: Some("k2".into()),
            ..base.clone()
        },
    )
    .unwrap();
    assert_eq!((one_key[0].allowed, one_key[0].denied), (10, 5));
    assert!(query_usage(
        &mut conn,
        &UsageQuery {
            until_ms: T0 - HOUR,
            ..base
        }
    )
    .is_err());
}

pub fn last_used_at_follows_the_newest_request(db: &Db, dir: &Path) {
    seed_queries(db, dir);
    // k1's newest is q28, k2's q29 (seconds).
    assert_eq!(
        int(db, "SELECT last_used_at FROM keys WHERE key_id = 'k1'"),
        Some((T0 + 28 * 6 * 60_000) / 1000)
    );
    assert_eq!(
        int(db, "SELECT last_used_at FROM keys WHERE key_id = 'k2'"),
        Some((T0 + 29 * 6 * 60_000) / 1000)
    );
    // An older record ingested later does not move it back.
    let log = dir.join("access.log");
    append(&log, &line(&rec(T0 - HOUR, "late")));
    ingester(db, &log).poll_once().unwrap();
    assert_eq!(
        int(db, "SELECT last_used_at FROM keys WHERE key_id = 'k1'"),
        Some((T0 + 28 * 6 * 60_000) / 1000)
    );
}

/// Every scenario, for a test that has one database server for them all.
pub type Scenario = fn(&Db, &Path);
/// A token's record: the session fields the filter adds (numbers as text,
/// as Envoy prints filter state).
fn session_line(ms: i64, id: &str, session: &str, iat: i64, exp: i64) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&line(&rec(ms, id))).unwrap();
    v["session_id"] = session.into();
    v["session_issued_ms"] = iat.to_string().into();
    v["session_expires_ms"] = exp.to_string().into();
    v.to_string() + "\n"
}

fn session_row(db: &Db, session: &str) -> (i64, i64, Option<i64>, Option<i64>) {
    let q = |col: &str| {
        int(
            db,
            &format!("SELECT {col} FROM sessions WHERE key_id = 'k1' AND session_id = '{session}'"),
        )
    };
    (
        q("created_at").unwrap(),
        q("expires_at").unwrap(),
        q("last_seen_at"),
        q("revoked_at"),
    )
}

/// Token records upsert their session in the batch: created at the token's
/// issue, last seen at the newest use; a revoked session stays revoked for
/// its old token and comes back with a token issued after the revocation.
pub fn token_sessions_are_recorded_and_revived(db: &Db, dir: &Path) {
    let log = dir.join("access.log");
    let mut ing = ingester(db, &log);
    let exp = T0 + 3_600_000;
    append(
        &log,
        &(session_line(T0 + 500, "a", "phone", T0, exp)
            + &session_line(T0 + 9_000, "b", "phone", T0, exp)
            + &session_line(T0 + 2_000, "c", "", T0 + 2_000, exp + 2_000)
            + &line(&rec(T0 + 3_000, "d"))),
    );
    ing.poll_once().unwrap();
    let s = T0 / 1000;
    assert_eq!(session_row(db, "phone"), (s, exp / 1000, Some(s + 9), None));
    assert_eq!(session_row(db, "").0, s + 2, "login without a session id");
    assert_eq!(int(db, "SELECT count(*) FROM sessions"), Some(2));

    // Revoked (as the store marks it); a late record of the old token
    // leaves it revoked, a token issued later makes it live again.
    let revoked_ms = T0 + 10_000;
    exec(
        db,
        &format!("UPDATE sessions SET revoked_at = {revoked_ms} WHERE session_id = 'phone'"),
    );
    append(&log, &session_line(T0 + 9_500, "e", "phone", T0, exp));
    ing.poll_once().unwrap();
    assert_eq!(session_row(db, "phone").3, Some(revoked_ms));
    let iat = T0 + 20_000;
    append(
        &log,
        &session_line(T0 + 21_000, "f", "phone", iat, iat + 60_000),
    );
    ing.poll_once().unwrap();
    // Live again, created anew; the revocation stays (it still refuses the
    // tokens issued before it), and the listing shows the session live.
    assert_eq!(
        session_row(db, "phone"),
        (
            iat / 1000,
            (iat + 60_000) / 1000,
            Some(s + 21),
            Some(revoked_ms)
        )
    );
    let mut conn = db.open().unwrap();
    let listed = keygate_control::mgmt::list_sessions(&mut conn, "k1").unwrap();
    let phone = listed.iter().find(|x| x.session_id == "phone");
    // (T0 is in the past: the listing hides it as expired by the clock.)
    assert!(phone.is_none_or(|p| p.revoked_at_ms.is_none()), "{phone:?}");
    // A later token of the revived session is not "created anew" again.
    append(
        &log,
        &session_line(T0 + 40_000, "g", "phone", iat + 30_000, iat + 90_000),
    );
    ing.poll_once().unwrap();
    assert_eq!(session_row(db, "phone").0, iat / 1000);
}

pub fn dead_sessions_are_pruned_and_live_or_recently_revoked_ones_kept(db: &Db, _dir: &Path) {
    let now_ms = T0;
    let s = now_ms / 1000;
    let life = keygate_core::token::MAX_LIFETIME_SECS as i64;
    let old_revocation = now_ms - (life + 60) * 1000;
    let recent_revocation = now_ms - 60_000;
    exec(
        db,
        &format!(
            "INSERT INTO sessions (key_id, session_id, created_at, expires_at, last_seen_at, revoked_at) VALUES \
             ('k1', 'expired', {a}, {b}, {b}, NULL), \
             ('k1', 'live', {a}, {c}, {a}, NULL), \
             ('k1', 'revoked-recently', {a}, {b}, {b}, {recent_revocation}), \
             ('k1', 'revoked-long-ago', {a}, {b}, NULL, {old_revocation})",
            a = s - 7200,
            b = s - 3600,
            c = s + 3600,
        ),
    );
    let pruner = Pruner::new(db, Duration::from_secs(30 * 24 * 3600));
    let mut conn = db.open().unwrap();
    pruner.prune_once(&mut conn, now_ms).unwrap();
    let left: BTreeSet<String> = match db.open().unwrap() {
        Conn::Sqlite(c) => {
            let mut st = c.prepare("SELECT session_id FROM sessions").unwrap();
            let ids = st
                .query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            ids
        }
        Conn::Postgres(mut c) => c
            .query("SELECT session_id FROM sessions", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect(),
    };
    assert_eq!(
        left,
        ["live", "revoked-recently"]
            .into_iter()
            .map(String::from)
            .collect()
    );
}

/// The key store over the same database: SQLite's file, or PostgreSQL's
/// store (whose own tables are mirrored into the management schema).
fn store_over(db: &Db) -> Box<dyn keygate_control::store::Store> {
    match db {
        Db::Sqlite(p) => Box::new(keygate_control::store::sqlite::SqliteStore::new(p)),
        Db::Postgres(url) => Box::new(keygate_control::store::pg::PgStore::new(url).unwrap()),
    }
}

pub fn store_changes_reach_the_tables_logs_and_sessions_are_read_from(db: &Db, dir: &Path) {
    use keygate_control::mgmt;
    use keygate_control::service::{NewKey, Service};
    use keygate_core::credential::Kind;
    // Now, not t0: the session listing hides sessions expired by the clock.
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut conn = db.open().unwrap();
    let svc = Service::new(store_over(db));
    svc.init_store().unwrap();
    let new = |name: &str| NewKey {
        key_id: None,
        name: name.into(),
        tenant: "acme".into(),
        environment: "live".into(),
        kind: Kind::Scoped,
        scopes: vec!["read".into()],
        allowed_ips: vec![],
        rate_limit: None,
        expires_at: None,
        with_secret: false,
        key_value: None,
        secret_value: None,
        ..NewKey::default()
    };
    let k = svc.create_key(new("Checkout"), 10).unwrap();
    let other = svc.create_key(new("Other"), 10).unwrap();
    let mut elsewhere = new("Elsewhere");
    elsewhere.tenant = "globex".into();
    let theirs = svc.create_key(elsewhere, 10).unwrap();
    // Reads by tenant and by id see what a full read sees, and nothing else.
    let all = svc.snapshot().unwrap().keys;
    let acme = svc.list_keys(Some("acme")).unwrap();
    let expect: Vec<_> = all
        .iter()
        .filter(|x| x.record.tenant == "acme")
        .cloned()
        .collect();
    assert_eq!(acme, expect);
    assert_eq!(acme.len(), 2);
    assert_eq!(svc.list_keys(Some("nobody")).unwrap(), vec![]);
    assert_eq!(svc.show_key(&theirs.key_id).unwrap().name, "Elsewhere");
    assert!(svc.tenant_key("acme", &theirs.key_id).is_err());
    assert!(svc.show_key("no-such-key").is_err());
    // A request and a token session of the key, ingested from the log.
    let log = dir.join("access.log");
    let mut r = rec(t0, "m1");
    r.key = Some(&k.key_id);
    append(&log, &line(&r));
    let mut sess: serde_json::Value =
        serde_json::from_str(session_line(t0 + 10, "m2", "phone", t0, t0 + 3_600_000).trim())
            .unwrap();
    sess["key_id"] = k.key_id.clone().into();
    append(&log, &(sess.to_string() + "\n"));
    ingester(db, &log).poll_once().unwrap();
    let page = query_logs(
        &mut conn,
        &LogQuery {
            tenant: Some("acme".into()),
            ..LogQuery::default()
        },
    )
    .unwrap();
    assert!(page
        .records
        .iter()
        .all(|x| x.key_name.as_deref() == Some("Checkout")));
    assert_eq!(page.records.len(), 2);
    let used = mgmt::last_used(&mut conn, "acme").unwrap();
    assert_eq!(used, vec![(k.key_id.clone(), (t0 + 10) as u64 / 1000)]);

    // Revoked through the service: listed as revoked, keeping what the log showed.
    svc.revoke_session(&k.key_id, "phone", (t0 + 20) as u64)
        .unwrap();
    svc.revoke_session(&k.key_id, "never-seen", (t0 + 30) as u64)
        .unwrap();
    let listed = mgmt::list_sessions(&mut conn, &k.key_id).unwrap();
    let phone = listed.iter().find(|x| x.session_id == "phone").unwrap();
    assert_eq!(phone.revoked_at_ms, Some((t0 + 20) as u64));
    assert_eq!(phone.last_seen_at, Some((t0 + 10) as u64 / 1000));
    assert!(listed.iter().any(|x| x.session_id == "never-seen"));

    // The same session id logged in again (a newer token): listed live,
    // while its revocation stays in the store for the older tokens, also
    // across a later change of the revocations.
    // 5 ms after the revocation (at t0 + 20): within the same second.
    let iat = t0 + 25;
    let mut again: serde_json::Value =
        serde_json::from_str(session_line(t0 + 30, "m3", "phone", iat, iat + 3_600_000).trim())
            .unwrap();
    again["key_id"] = k.key_id.clone().into();
    append(&log, &(again.to_string() + "\n"));
    ingester(db, &log).poll_once().unwrap();
    svc.revoke_session(&k.key_id, "another", (t0 + 7_000) as u64)
        .unwrap();
    let phone = mgmt::list_sessions(&mut conn, &k.key_id)
        .unwrap()
        .into_iter()
        .find(|x| x.session_id == "phone")
        .unwrap();
    assert_eq!(
        (phone.created_at, phone.revoked_at_ms),
        ((iat / 1000) as u64, None)
    );
    assert!(svc
        .snapshot()
        .unwrap()
        .revoked_sessions
        .iter()
        .any(|r| r.session_id == "phone" && r.revoked_at_ms == (t0 + 20) as u64));

    // Deleting a key removes it (and its live sessions) from what the queries read.
    svc.delete_key("acme", &other.key_id).unwrap();
    assert_eq!(
        int(
            db,
            &format!(
                "SELECT count(*) FROM keys WHERE key_id = '{}'",
                other.key_id
            )
        ),
        Some(0)
    );
    assert_eq!(int(db, "SELECT count(*) FROM keys"), Some(2));
}

/// An audited change and its record commit together: a refused change
/// leaves no record, a refused record leaves no change.
pub fn an_audit_record_commits_with_its_change_or_not_at_all(db: &Db, _dir: &Path) {
    use keygate_control::mgmt::Audit;
    use keygate_control::service::{NewKey, Service};
    use keygate_core::credential::Kind;
    db.open().unwrap();
    let svc = Service::new(store_over(db)).with_audit_db(db);
    svc.init_store().unwrap();
    let new = |id: &str| NewKey {
        key_id: Some(id.into()),
        name: String::new(),
        tenant: "acme".into(),
        environment: "live".into(),
        kind: Kind::Default,
        scopes: vec![],
        allowed_ips: vec![],
        rate_limit: None,
        expires_at: None,
        with_secret: false,
        key_value: None,
        secret_value: None,
        ..NewKey::default()
    };
    let record = Audit {
        actor_token_id: Some("tok_1".into()),
        tenant: Some("acme".into()),
        action: "key.create".into(),
        ..Audit::default()
    };
    let (made, with_change) = svc
        .audited(record.clone(), |svc| svc.create_key(new("first"), 10))
        .unwrap();
    assert!(with_change);
    assert_eq!(
        int(
            db,
            "SELECT count(*) FROM audit WHERE object = 'first' AND action = 'key.create'"
        ),
        Some(1),
        "the record names the key the change made"
    );
    // A second default key is refused: no record either.
    assert!(svc
        .audited(record.clone(), |svc| svc.create_key(new("second"), 10))
        .is_err());
    assert_eq!(int(db, "SELECT count(*) FROM audit"), Some(1));
    // A record the database refuses takes its change with it.
    match db {
        Db::Sqlite(_) => exec(
            db,
            "CREATE TRIGGER refuse BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'refused'); END",
        ),
        Db::Postgres(_) => exec(
            db,
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'refused'; END $$; \
             CREATE TRIGGER refuse BEFORE INSERT ON audit FOR EACH ROW EXECUTE FUNCTION refuse()",
        ),
    }
    assert!(svc
        .audited(record, |svc| svc.delete_key("acme", &made.key_id))
        .is_err());
    assert!(svc.show_key(&made.key_id).is_ok(), "the change was undone");
    // Without a pending record, changes need no audit table.
    svc.delete_key("acme", &made.key_id).unwrap();
}

/// Portal tokens made before tokens had a purpose were plain tenant
/// tokens; migration 2 finds them through the audit trail and fences them.
pub fn migration_2_fences_portal_tokens_made_before_it(db: &Db, _dir: &Path) {
    use keygate_control::mgmt;
    let v1 = match db {
        Db::Sqlite(_) => {
            include_str!("../../migrations/sqlite/0001_init.sql").to_owned()
                + "PRAGMA user_version = 1;"
        }
        Db::Postgres(_) => {
            include_str!("../../migrations/postgres/0001_init.sql").to_owned()
                + "CREATE TABLE schema_migrations (version bigint PRIMARY KEY, name text NOT NULL, \
                   applied_at bigint NOT NULL); INSERT INTO schema_migrations VALUES (1, 'init', 0);"
        }
    };
    let hash = mgmt::hash_token;
    let rows = format!(
        "INSERT INTO api_tokens (token_id, token_hash, role, tenant, created_at) VALUES \
         ('tok_api', '{}', 'tenant', 'acme', 1), ('tok_link', '{}', 'tenant', 'acme', 1), \
         ('tok_session', '{}', 'tenant', 'acme', 1), ('tok_cli_link', '{}', 'tenant', 'acme', 1); \
         INSERT INTO audit (time_ms, tenant, action, object, detail) VALUES \
         (1, 'acme', 'portal.login', 'tok_session', '{{\"link_token_id\": \"tok_link\"}}'), \
         (2, 'acme', 'portal.link_create', 'tok_cli_link', NULL), \
         (3, 'acme', 'portal.link_create', 'acme', NULL);",
        hash("kgt_api"),
        hash("kgt_link"),
        hash("kgt_session"),
        hash("kgt_cli_link"),
    );
    match db.connect().unwrap() {
        Conn::Sqlite(c) => c.execute_batch(&(v1 + &rows)).unwrap(),
        Conn::Postgres(mut c) => c.batch_execute(&(v1 + &rows)).unwrap(),
    }
    let mut conn = db.open().unwrap();
    assert!(mgmt::authenticate(&mut conn, "kgt_api", 2)
        .unwrap()
        .is_some());
    for t in ["kgt_link", "kgt_session", "kgt_cli_link"] {
        assert!(
            mgmt::authenticate(&mut conn, t, 2).unwrap().is_none(),
            "{t}"
        );
    }
    let listed: Vec<_> = mgmt::list_tokens(&mut conn, Some("acme"))
        .unwrap()
        .into_iter()
        .map(|t| t.token_id)
        .collect();
    assert_eq!(listed, vec!["tok_api".to_owned()]);
    assert!(
        mgmt::authenticate_as(&mut conn, mgmt::Purpose::PortalSession, "kgt_session", 2)
            .unwrap()
            .is_some()
    );
}

/// `line(r)` with the access log's `owner` field set to `owner`.
fn owner_line(r: &Rec, owner: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&line(r)).unwrap();
    v["owner"] = owner.into();
    v.to_string() + "\n"
}

pub fn request_owner_is_stored_listed_and_filtered(db: &Db, dir: &Path) {
    let log = dir.join("access.log");
    let mut text = String::new();
    // acme: 3 records of alice's key, 2 old-format lines without the field,
    // 1 with Envoy's empty filter state; another tenant: 2 of an "alice"
    // there (owners are per tenant, the filter must not cross).
    for i in 0..3i64 {
        text += &owner_line(&rec(T0 + i * 1000, format!("a{i}")), "alice@example.com");
    }
    for i in 0..2i64 {
        let mut r = rec(T0 + 10_000 + i, format!("n{i}"));
        r.key = Some("k2");
        text += &line(&r);
    }
    text += &owner_line(&rec(T0 + 20_000, "dash"), "-");
    for i in 0..2i64 {
        let mut r = rec(T0 + 30_000 + i, format!("o{i}"));
        r.key = Some("other-key");
        r.tenant = Some("other");
        text += &owner_line(&r, "alice@example.com");
    }
    append(&log, &text);
    assert_eq!(ingester(db, &log).poll_once().unwrap().records, 8);

    let mut conn = db.open().unwrap();
    let page = |conn: &mut Conn, tenant: &str, owner: Option<&str>, limit, cursor| {
        query_logs(
            conn,
            &LogQuery {
                tenant: Some(tenant.into()),
                owner: owner.map(Into::into),
                limit: Some(limit),
                cursor,
                ..LogQuery::default()
            },
        )
        .unwrap()
    };
    let all = page(&mut conn, "acme", None, 100, None);
    let got: Vec<_> = all
        .records
        .iter()
        .map(|r| (r.request_id.clone().unwrap(), r.owner.clone()))
        .collect();
    let alice = || Some("alice@example.com".to_owned());
    assert_eq!(
        got,
        vec![
            ("dash".to_owned(), None),
            ("n1".to_owned(), None),
            ("n0".to_owned(), None),
            ("a2".to_owned(), alice()),
            ("a1".to_owned(), alice()),
            ("a0".to_owned(), alice()),
        ]
    );

    // The filter, paged: alice's three acme records and none of the other
    // tenant's, newest first, across a cursor.
    let first = page(&mut conn, "acme", Some("alice@example.com"), 2, None);
    let rest = page(
        &mut conn,
        "acme",
        Some("alice@example.com"),
        2,
        first.next_cursor.clone(),
    );
    assert!(rest.next_cursor.is_none());
    let ids: Vec<_> = first
        .records
        .iter()
        .chain(&rest.records)
        .map(|r| r.request_id.clone().unwrap())
        .collect();
    assert_eq!(ids, ["a2", "a1", "a0"]);
    let other = page(&mut conn, "other", Some("alice@example.com"), 100, None);
    assert_eq!(other.records.len(), 2);
    assert!(other
        .records
        .iter()
        .all(|r| r.tenant.as_deref() == Some("other")));
    assert!(page(&mut conn, "acme", Some("alice"), 100, None)
        .records
        .is_empty());

    // At 10M rows a rare owner must not scan the tenant's records: the
    // filter is a range of the partial (tenant, owner, time) index.
    if let Conn::Sqlite(c) = &conn {
        let plan: Vec<String> = c
            .prepare(
                "EXPLAIN QUERY PLAN SELECT l.id FROM request_logs l \
                 LEFT JOIN keys k ON k.key_id = l.key_id WHERE 1 = 1 \
                 AND l.tenant = ?1 AND l.owner = ?2 ORDER BY l.time_ms DESC, l.id DESC LIMIT 51",
            )
            .unwrap()
            .query_map(["acme", "alice@example.com"], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|p| p.contains("request_logs_tenant_owner_time")),
            "{plan:?}"
        );
        assert!(!plan.iter().any(|p| p.contains("TEMP B-TREE")), "{plan:?}");
    }
}

/// A database made before migration 5 keeps its records (owner NULL) and
/// stores owners from then on.
pub fn migration_5_keeps_old_records_without_an_owner(db: &Db, dir: &Path) {
    let (files, done) = match db {
        Db::Sqlite(_) => (
            [
                include_str!("../../migrations/sqlite/0001_init.sql"),
                include_str!("../../migrations/sqlite/0002_tokens_sessions.sql"),
                include_str!("../../migrations/sqlite/0003_key_identity.sql"),
                include_str!("../../migrations/sqlite/0004_limits.sql"),
            ],
            "PRAGMA user_version = 4;".to_owned(),
        ),
        Db::Postgres(_) => (
            [
                include_str!("../../migrations/postgres/0001_init.sql"),
                include_str!("../../migrations/postgres/0002_tokens_sessions.sql"),
                include_str!("../../migrations/postgres/0003_key_identity.sql"),
                include_str!("../../migrations/postgres/0004_limits.sql"),
            ],
            "CREATE TABLE schema_migrations (version bigint PRIMARY KEY, name text NOT NULL, \
             applied_at bigint NOT NULL); INSERT INTO schema_migrations VALUES \
             (1, 'init', 0), (2, 'tokens_sessions', 0), (3, 'key_identity', 0), (4, 'limits', 0);"
                .to_owned(),
        ),
    };
    let old = files.concat()
        + "INSERT INTO request_logs (time_ms, key_id, tenant, request_id) \
           VALUES (1795514400000, 'k1', 'acme', 'before');"
        + &done;
    match db.connect().unwrap() {
        Conn::Sqlite(c) => c.execute_batch(&old).unwrap(),
        Conn::Postgres(mut c) => c.batch_execute(&old).unwrap(),
    }
    let log = dir.join("access.log");
    append(&log, &owner_line(&rec(T0 + 1000, "after"), "bob"));
    // The ingester's own connection (db.open) applies migration 5.
    assert_eq!(ingester(db, &log).poll_once().unwrap().records, 1);
    let mut conn = db.open().unwrap();
    let got: Vec<_> = query_logs(
        &mut conn,
        &LogQuery {
            tenant: Some("acme".into()),
            ..LogQuery::default()
        },
    )
    .unwrap()
    .records
    .into_iter()
    .map(|r| (r.request_id.unwrap(), r.owner))
    .collect();
    assert_eq!(
        got,
        vec![
            ("after".to_owned(), Some("bob".to_owned())),
            ("before".to_owned(), None)
        ]
    );
}

/// Deleting a key deletes its session rows, revoked ones included, and a
/// key later given the same id (here another tenant's) lists none of the
/// old key's sessions, also one the ingester wrote after the deletion.
pub fn a_deleted_keys_sessions_go_with_it_and_a_reused_id_lists_none(db: &Db, dir: &Path) {
    use keygate_control::mgmt;
    use keygate_control::service::{NewKey, Service};
    // Now: the listing hides sessions expired by the clock.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let now_s = (now_ms / 1000) as u64;
    let mut conn = db.open().unwrap();
    let svc = Service::new(store_over(db));
    svc.init_store().unwrap();
    let new = |tenant: &str| NewKey {
        key_id: Some("reused".into()),
        name: "k".into(),
        tenant: tenant.into(),
        scopes: vec!["read".into()],
        environment: "live".into(),
        ..NewKey::default()
    };
    svc.create_key(new("acme"), now_s - 100).unwrap();
    let log = dir.join("access.log");
    let session = |id: &str, sid: &str, iat: i64| {
        let mut v: serde_json::Value =
            serde_json::from_str(session_line(iat + 10, id, sid, iat, iat + 3_600_000).trim())
                .unwrap();
        v["key_id"] = "reused".into();
        v.to_string() + "\n"
    };
    append(&log, &session("s1", "phone", now_ms - 60_000));
    ingester(db, &log).poll_once().unwrap();
    svc.revoke_session("reused", "laptop", (now_ms - 50_000) as u64)
        .unwrap();
    let listed: Vec<String> = mgmt::list_sessions(&mut conn, "reused")
        .unwrap()
        .into_iter()
        .map(|s| s.session_id)
        .collect();
    assert_eq!(listed, vec!["phone", "laptop"]);

    svc.delete_key("acme", "reused").unwrap();
    assert_eq!(
        int(db, "SELECT count(*) FROM sessions WHERE key_id = 'reused'"),
        Some(0)
    );
    assert!(svc.snapshot().unwrap().revoked_sessions.is_empty());
    // A request of the old key's session read from the log only now.
    append(&log, &session("s2", "tablet", now_ms - 40_000));
    ingester(db, &log).poll_once().unwrap();
    svc.create_key(new("globex"), now_s).unwrap();
    let listed = mgmt::list_sessions(&mut conn, "reused").unwrap();
    assert_eq!(listed, vec![], "the new key lists the old one's sessions");
    // The new key's own login under the same session id is listed, live,
    // whatever the old row's times were.
    append(&log, &session("s3", "tablet", now_ms - 1_000));
    ingester(db, &log).poll_once().unwrap();
    let listed: Vec<(String, Option<u64>)> = mgmt::list_sessions(&mut conn, "reused")
        .unwrap()
        .into_iter()
        .map(|s| (s.session_id, s.revoked_at_ms))
        .collect();
    assert_eq!(listed, vec![("tablet".to_owned(), None)]);
}

pub const ALL: &[(&str, Scenario)] = &[
    ("partial_last_line", partial_last_line_waits_for_its_newline),
    ("malformed", malformed_lines_are_skipped_and_counted),
    ("over_long", over_long_line_is_skipped_and_counted_once),
    ("restart", restart_resumes_without_duplicates_or_gaps),
    ("rotation", rotation_finishes_the_old_file_before_switching),
    (
        "restart_rotation",
        restart_after_rotation_finishes_the_rotated_file,
    ),
    ("truncation", truncation_starts_again_from_the_top),
    (
        "regrown",
        truncated_and_regrown_file_is_still_read_from_the_top,
    ),
    ("retention", retention_prunes_old_records_and_usage),
    ("logs", log_queries_filter_and_page_newest_first),
    ("usage", usage_counts_per_bucket_and_key),
    ("last_used", last_used_at_follows_the_newest_request),
    ("sessions", token_sessions_are_recorded_and_revived),
    (
        "session_pruning",
        dead_sessions_are_pruned_and_live_or_recently_revoked_ones_kept,
    ),
    (
        "audit_tx",
        an_audit_record_commits_with_its_change_or_not_at_all,
    ),
    (
        "migration_2",
        migration_2_fences_portal_tokens_made_before_it,
    ),
    (
        "store_tables",
        store_changes_reach_the_tables_logs_and_sessions_are_read_from,
    ),
    ("owner", request_owner_is_stored_listed_and_filtered),
    (
        "migration_5",
        migration_5_keeps_old_records_without_an_owner,
    ),
    (
        "deleted_key_sessions",
        a_deleted_keys_sessions_go_with_it_and_a_reused_id_lists_none,
    ),
];
