//! The same scenarios on PostgreSQL, the fleet store. The test starts a
//! throwaway server from Debian's packages (initdb + pg_ctl on a free
//! loopback port in a temp dir, as tests/harness.py does), or uses the
//! server at KEYGATE_TEST_PG_URL. Without either it is skipped, except under
//! CI, where a missing server is a failure.

mod common;

use keygate_control::db::{Conn, Db, SCHEMA_VERSION};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Server {
    /// Base URL without a database name.
    base: String,
    pg_ctl: Option<(PathBuf, PathBuf, Vec<String>)>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some((bin, data, prefix)) = &self.pg_ctl {
            let _ = as_owner(prefix, bin)
                .args(["-D"])
                .arg(data)
                .args(["-m", "immediate", "stop"])
                .output();
        }
    }
}

fn as_owner(prefix: &[String], program: &Path) -> Command {
    match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn bindir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin"))
        .filter(|d| d.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

fn start() -> Option<Server> {
    if let Ok(url) = std::env::var("KEYGATE_TEST_PG_URL") {
        let base = url
            .rsplit_once('/')
            .map_or(url.clone(), |(b, _)| b.to_owned());
        return Some(Server {
            base,
            pg_ctl: None,
            _dir: None,
        });
    }
    let Some(bin) = bindir() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "PostgreSQL server binaries missing under CI (apt-get install postgresql)"
        );
        eprintln!("skipped: no PostgreSQL server binaries (apt-get install postgresql)");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // PostgreSQL refuses to run as root: as root, run it as `postgres`.
    let root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
    let prefix: Vec<String> = if root {
        let ok = Command::new("chown")
            .args(["postgres"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(ok.success());
        ["runuser", "-u", "postgres", "--"]
            .map(String::from)
            .to_vec()
    } else {
        Vec::new()
    };
    let out = as_owner(&prefix, &bin.join("initdb"))
        .args(["-U", "postgres", "--auth=trust", "--no-sync", "-D"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let opts = format!("-h 127.0.0.1 -p {port} -k {} -c fsync=off", data.display());
    let out = as_owner(&prefix, &bin.join("pg_ctl"))
        .arg("-D")
        .arg(&data)
        .args(["-o", &opts, "-l"])
        .arg(dir.path().join("pg.log"))
        .args(["-w", "-t", "60", "start"])
        .output()
        .unwrap();
    let log = std::fs::read_to_string(dir.path().join("pg.log")).unwrap_or_default();
    assert!(out.status.success(), "pg_ctl start: {log}");
    Some(Server {
        base: format!("postgres://postgres@127.0.0.1:{port}"),
        pg_ctl: Some((bin.join("pg_ctl"), data, prefix)),
        _dir: Some(dir),
    })
}

impl Server {
    /// A new empty database.
    fn database(&self, name: &str) -> Db {
        let name = format!("kg_{}_{name}", std::process::id());
        let mut admin =
            postgres::Client::connect(&format!("{}/postgres", self.base), postgres::NoTls).unwrap();
        // One statement per call: neither may run inside a transaction.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        Db::parse(&format!("{}/{name}", self.base))
    }
}

/// The PostgreSQL store counts quota and credit usage from the request-log
/// tables `keygate serve` keeps in the same database.
#[test]
fn postgres_store_reads_quota_and_credit_usage_from_its_log_tables() {
    let Some(server) = start() else {
        return;
    };
    let Db::Postgres(url) = server.database("usage") else {
        panic!("postgres")
    };
    let svc = keygate_control::Service::open(&url).unwrap();
    svc.init_store().unwrap();
    let Conn::Postgres(mut c) = Db::Postgres(url.clone()).open().unwrap() else {
        panic!("postgres")
    };
    let new = keygate_control::service::NewKey {
        key_id: Some("q1".into()),
        name: String::new(),
        tenant: "acme".into(),
        environment: "live".into(),
        kind: keygate_core::credential::Kind::Scoped,
        scopes: vec!["read".into()],
        allowed_ips: vec![],
        rate_limit: None,
        expires_at: None,
        with_secret: false,
        key_value: None,
        secret_value: None,
        ..Default::default()
    };
    let limits = keygate_control::service::KeyLimits {
        limits: vec!["5/day".parse().unwrap()],
        plan: None,
    };
    svc.create_key_limited(new, limits, 1).unwrap();
    let patch = keygate_control::service::KeyPatch {
        credits: Some(Some((10, false))),
        ..Default::default()
    };
    svc.patch_key("acme", "q1", &patch, 1).unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    c.execute(
        "INSERT INTO usage_hourly (tenant, hour_ms, key_id, allowed, denied) VALUES ('acme', $1, 'q1', 3, 1)",
        &[&(now_ms / 3_600_000 * 3_600_000)],
    )
    .unwrap();
    for t in [500_i64, now_ms] {
        c.execute(
            "INSERT INTO request_logs (time_ms, key_id, tenant, decision) VALUES ($1, 'q1', 'acme', 'allowed')",
            &[&t],
        )
        .unwrap();
    }
    let usage = svc.snapshot().unwrap().quota_usage().unwrap();
    let used: Vec<u64> = usage.keys["q1"].iter().map(|u| u.used).collect();
    // 3 today (the day quota); 1 record since the top-up at t=1 s (credits).
    assert_eq!(used, vec![3, 1]);
}

#[test]
fn postgres_migrations_ingestion_and_queries() {
    let Some(server) = start() else {
        return;
    };

    // Migrations: recorded, applied once, safe when servers start together.
    let db = server.database("migrate");
    let opens: Vec<_> = (0..3)
        .map(|_| {
            let db = db.clone();
            std::thread::spawn(move || db.open().map(|_| ()))
        })
        .collect();
    for o in opens {
        o.join().unwrap().unwrap();
    }
    let Conn::Postgres(mut c) = db.open().unwrap() else {
        panic!("postgres")
    };
    let applied: Vec<i64> = c
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Every migration this build knows, once each, in order (numbers may
    // have gaps while branches that add migrations await renumbering).
    assert_eq!(applied.len() as i64, SCHEMA_VERSION);
    assert_eq!(applied.first(), Some(&1));
    assert!(applied.windows(2).all(|w| w[0] < w[1]), "{applied:?}");

    for (name, scenario) in common::ALL {
        let dir = tempfile::tempdir().unwrap();
        let db = server.database(name);
        eprintln!("postgres scenario {name}");
        scenario(&db, dir.path());
    }
}
