//! Request-log ingestion: follows Envoy's JSON access log (the format in
//! envoy/envoy.yaml) and stores its records in `request_logs`.
//!
//! What makes it exact: the file position (device, inode, offset and the
//! file's first bytes) is committed in the same transaction as the records
//! read up to it, so a process killed at any point resumes where the last
//! commit left it: nothing committed is lost and nothing is stored twice.
//! Only complete lines are read; a line still being written waits for its
//! newline. Rotation (the path names another file) finishes the old file
//! first, and switches only once the writer has moved to the new one;
//! truncation (the file shrank, or its first bytes changed) starts again at
//! the top. Usage counts (`usage_hourly`) and each key's `last_used_at` are
//! kept in the same transaction.

use crate::db::{now_ms, Conn, Db, DbError};
use serde::{Deserialize, Deserializer};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Bytes read (and records committed) per transaction: about 13,000 Envoy
/// records. Each batch rewrites the index pages of every key it touches, so
/// larger batches write less per record (measured: 1 MiB batches ingest at
/// half the rate); a batch still commits within ~100 ms, which bounds how
/// long another writer waits. Also the longest line accepted.
const CHUNK: usize = 4 << 20;
/// Bytes one `poll_once` reads at most, so `run_until` sees its stop flag
/// often even while catching up on a large backlog.
const MAX_BYTES_PER_POLL: u64 = 64 << 20;
/// How many of the file's first bytes identify it (see `head_hex`).
const HEAD_LEN: usize = 256;
/// Longest path stored; longer ones are cut (at a character boundary).
const MAX_PATH_LEN: usize = 2048;
/// Longest value stored for the other text fields.
const MAX_FIELD_LEN: usize = 256;
const HOUR_MS: i64 = 3_600_000;

/// One access-log line as Envoy writes it; other fields are ignored.
#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow, default)]
    time: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    key_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tenant: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    environment: Option<Cow<'a, str>>,
    /// The key's owner (absent in lines from before owners were logged).
    #[serde(borrow, default)]
    owner: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    path: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    client_ip: Option<Cow<'a, str>>,
    #[serde(default, deserialize_with = "number_or_numeric_text")]
    status: Option<i64>,
    #[serde(borrow, default)]
    decision: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reason: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    request_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    session_id: Option<Cow<'a, str>>,
    #[serde(default, deserialize_with = "number_or_numeric_text")]
    session_issued_ms: Option<i64>,
    #[serde(default, deserialize_with = "number_or_numeric_text")]
    session_expires_ms: Option<i64>,
}

/// Envoy writes `%RESPONSE_CODE%` as a number; accept a numeric string too
/// (the filter's own numbers come as strings: filter state is text). Also
/// what `keygate logs` reads the same records with.
pub fn number_or_numeric_text<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + std::str::FromStr,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Code<T> {
        Num(T),
        Text(String),
    }
    Ok(match Option::<Code<T>>::deserialize(d)? {
        Some(Code::Num(n)) => Some(n),
        Some(Code::Text(s)) => s.parse().ok(),
        None => None,
    })
}

/// A record ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub time_ms: i64,
    pub key_id: Option<String>,
    pub tenant: Option<String>,
    pub environment: Option<String>,
    /// The key's owner as the filter saw it at request time.
    pub owner: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub client_ip: Option<String>,
    pub status: Option<i64>,
    pub decision: Option<String>,
    pub reason: Option<String>,
    pub request_id: Option<String>,
    /// The issued token's session, for a login answer or a request a token
    /// got through (never the token).
    pub session: Option<SeenSession>,
}

/// A token session as one access record shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenSession {
    /// Empty for a login without a `session_id`.
    pub id: String,
    pub issued_ms: i64,
    pub expires_ms: i64,
}

fn cut(v: Option<Cow<'_, str>>, max: usize) -> Option<String> {
    let v = v?;
    // Envoy writes "-" for an absent value in some fields; store NULL.
    if v.is_empty() || v == "-" {
        return None;
    }
    if v.len() <= max {
        return Some(v.into_owned());
    }
    let mut end = max;
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    Some(v[..end].to_owned())
}

fn parse_time_ms(t: &str) -> Option<i64> {
    let at = humantime::parse_rfc3339(t)
        .or_else(|_| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')))
        .ok()?;
    let ms = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
    i64::try_from(ms).ok()
}

/// Parses one line; `None` for anything that is not a record with a time.
pub fn parse_line(line: &[u8]) -> Option<Row> {
    let l: Line = serde_json::from_slice(line).ok()?;
    let time_ms = parse_time_ms(l.time.as_deref()?)?;
    // The expiry marks a token's record; the id may be empty (Envoy may
    // then print "" or "-"), which is the login-without-session_id session.
    let session = match (l.session_issued_ms, l.session_expires_ms) {
        (Some(issued_ms), Some(expires_ms)) => Some(SeenSession {
            id: cut(l.session_id, MAX_FIELD_LEN).unwrap_or_default(),
            issued_ms,
            expires_ms,
        }),
        _ => None,
    };
    let decision = cut(l.decision, 32);
    // The identity fields of envoy/envoy.yaml's format read request headers
    // keygate sets. Envoy logs a request it refuses before any filter runs
    // (a missing Host header) with the headers the client sent: only a
    // record keygate decided (it writes the decision as filter state, which
    // no client can) attributes a request to a key and tenant.
    fn ours<T>(decided: bool, v: Option<T>) -> Option<T> {
        v.filter(|_| decided)
    }
    let decided = decision.is_some();
    Some(Row {
        session: ours(decided, session),
        time_ms,
        key_id: ours(decided, cut(l.key_id, MAX_FIELD_LEN)),
        tenant: ours(decided, cut(l.tenant, MAX_FIELD_LEN)),
        environment: ours(decided, cut(l.environment, MAX_FIELD_LEN)),
        owner: ours(decided, cut(l.owner, MAX_FIELD_LEN)),
        method: cut(l.method, 16),
        path: cut(l.path, MAX_PATH_LEN),
        client_ip: cut(l.client_ip, 64),
        status: l.status,
        decision,
        reason: cut(l.reason, 64),
        request_id: cut(l.request_id, 128),
    })
}

/// What one poll did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PollReport {
    pub records: u64,
    pub malformed: u64,
    pub bytes: u64,
    pub rotations: u64,
    pub truncations: u64,
    /// The poll stopped at its byte budget: there is more to read now.
    pub more: bool,
}

/// Counters and lag, shared with whoever reports metrics while the
/// ingester runs in its own thread.
#[derive(Debug, Default)]
pub struct IngestStats {
    pub records: AtomicU64,
    pub malformed: AtomicU64,
    pub rotations: AtomicU64,
    pub truncations: AtomicU64,
    pub errors: AtomicU64,
    /// Time of the newest stored record (Unix ms), 0 before the first.
    pub newest_record_ms: AtomicI64,
    /// Bytes in the log not yet ingested, as of the last poll.
    pub bytes_behind: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// How far ingestion is behind.
#[derive(Debug, Clone, PartialEq)]
pub struct Lag {
    /// Seconds between the newest stored record and now; `None` before the
    /// first record. Grows while Envoy is idle: read it with `bytes_behind`.
    pub seconds: Option<f64>,
    pub bytes_behind: u64,
}

impl IngestStats {
    pub fn lag(&self, now_ms: i64) -> Lag {
        let newest = self.newest_record_ms.load(Ordering::Relaxed);
        Lag {
            seconds: (newest > 0).then(|| (now_ms - newest).max(0) as f64 / 1000.0),
            bytes_behind: self.bytes_behind.load(Ordering::Relaxed),
        }
    }

    /// The last error `run_until` met and retried, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    fn set_error(&self, e: Option<String>) {
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = e;
        }
    }
}

/// An open log file and how far it has been ingested.
struct Tail {
    file: File,
    dev: u64,
    ino: u64,
    /// Bytes consumed: everything before is stored (or was malformed).
    offset: u64,
    /// The file's first `min(HEAD_LEN, offset)` bytes.
    head: Vec<u8>,
    /// Inside a line longer than `CHUNK`: skip to its end.
    skipping: bool,
}

impl Tail {
    fn open(path: &Path) -> std::io::Result<Tail> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        Ok(Tail {
            file,
            dev: meta.dev(),
            ino: meta.ino(),
            offset: 0,
            head: Vec::new(),
            skipping: false,
        })
    }

    fn len(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// The file still starts with the bytes we consumed from it.
    fn head_matches(&self) -> std::io::Result<bool> {
        if self.head.is_empty() {
            return Ok(true);
        }
        let mut now = vec![0; self.head.len()];
        let n = read_full_at(&self.file, &mut now, 0)?;
        Ok(n == self.head.len() && now == self.head)
    }

    fn head_after(&self, offset: u64) -> std::io::Result<Vec<u8>> {
        let want = usize::try_from(offset).map_or(HEAD_LEN, |o| o.min(HEAD_LEN));
        if want == self.head.len() {
            return Ok(self.head.clone());
        }
        let mut head = vec![0; want];
        let n = read_full_at(&self.file, &mut head, 0)?;
        head.truncate(n);
        Ok(head)
    }

    fn restart(&mut self) {
        self.offset = 0;
        self.head.clear();
        self.skipping = false;
    }
}

fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

/// The stored position of one log.
struct Position {
    dev: u64,
    ino: u64,
    offset: u64,
    head: Vec<u8>,
}

/// Follows one access log into the database. Run it in its own thread with
/// [`Ingester::run_until`], or drive it with [`Ingester::poll_once`].
pub struct Ingester {
    db: Db,
    conn: Option<Conn>,
    path: PathBuf,
    source: String,
    stats: Arc<IngestStats>,
    poll_interval: Duration,
    /// In-memory position, loaded from the database on first poll and after
    /// any error (the database is the truth).
    loaded: bool,
    current: Option<Tail>,
    /// A rotated-away file still being finished.
    draining: Option<Tail>,
    last_record_id: Option<i64>,
    buf: Vec<u8>,
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DbError + 'a {
    move |source| DbError::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}

impl Ingester {
    /// An ingester for the log at `path`, with its own connection to `db`.
    ///
    /// Its position is stored under a source name: on SQLite (one machine)
    /// the log's absolute path; on PostgreSQL `<hostname>:<path>`, so fleet
    /// nodes sharing one database keep apart positions even when their logs
    /// have the same path. Where the hostname is not stable (a container
    /// recreated over a kept log file), give a stable node name with
    /// [`Ingester::with_source`], or the log is read again from the start.
    pub fn new(db: &Db, path: impl AsRef<Path>) -> Result<Ingester, DbError> {
        let path = path.as_ref().to_path_buf();
        let abs = std::path::absolute(&path).unwrap_or_else(|_| path.clone());
        let source = match db {
            Db::Sqlite(_) => abs.display().to_string(),
            Db::Postgres(_) => {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|_| "localhost".into());
                format!("{host}:{}", abs.display())
            }
        };
        let conn = db.open()?;
        Ok(Ingester {
            db: db.clone(),
            conn: Some(conn),
            source,
            path,
            stats: Arc::default(),
            poll_interval: Duration::from_millis(200),
            loaded: false,
            current: None,
            draining: None,
            last_record_id: None,
            buf: vec![0; CHUNK],
        })
    }

    /// Names the position this ingester keeps (unique per node and log).
    pub fn with_source(mut self, source: impl Into<String>) -> Ingester {
        self.source = source.into();
        self.loaded = false;
        self
    }

    /// How long `run_until` sleeps when the log has nothing new.
    pub fn with_poll_interval(mut self, every: Duration) -> Ingester {
        self.poll_interval = every;
        self
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn stats(&self) -> Arc<IngestStats> {
        Arc::clone(&self.stats)
    }

    /// Polls until `stop` is set. Errors (database gone, file unreadable)
    /// are counted, kept in [`IngestStats::last_error`] and retried after a
    /// pause from the last committed position, with a new connection.
    pub fn run_until(&mut self, stop: &AtomicBool) {
        let mut backoff = self.poll_interval;
        while !stop.load(Ordering::Relaxed) {
            let pause = match self.poll_once() {
                Ok(r) => {
                    backoff = self.poll_interval;
                    self.stats.set_error(None);
                    if r.more {
                        continue;
                    }
                    self.poll_interval
                }
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    self.stats.set_error(Some(e.to_string()));
                    self.conn = None;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    backoff
                }
            };
            sleep_unless(stop, pause);
        }
    }

    /// Reads what the log has now (up to a budget) and stores it.
    pub fn poll_once(&mut self) -> Result<PollReport, DbError> {
        let result = self.poll_inner();
        if result.is_err() {
            // Forget the in-memory position: the next poll resumes from the
            // last commit, which is where the records stored end.
            self.loaded = false;
            self.current = None;
            self.draining = None;
        }
        result
    }

    fn poll_inner(&mut self) -> Result<PollReport, DbError> {
        if self.conn.is_none() {
            self.conn = Some(self.db.open()?);
        }
        if !self.loaded {
            self.resume()?;
            self.loaded = true;
        }
        let mut report = PollReport::default();
        let mut budget = MAX_BYTES_PER_POLL;

        // Has the path been pointed at another file?
        if let Some(cur) = &self.current {
            if let Ok(meta) = std::fs::metadata(&self.path) {
                if (meta.dev(), meta.ino()) != (cur.dev, cur.ino) {
                    report.rotations += 1;
                    self.stats.rotations.fetch_add(1, Ordering::Relaxed);
                    // (Nothing is draining: a new file is followed only
                    // once the old one is finished.)
                    self.draining = self.current.take();
                }
            }
        }

        if let Some(mut old) = self.draining.take() {
            // Look at the new file before the last read of the old one: once
            // the writer has written to the new file, it writes no more to
            // the old, so this read of the old one is its last.
            let writer_moved = std::fs::metadata(&self.path).is_ok_and(|m| m.len() > 0);
            budget = budget.saturating_sub(self.read_available(&mut old, &mut report, budget)?);
            if !writer_moved || report.more {
                self.draining = Some(old);
                self.publish_lag();
                return Ok(report);
            }
        }

        if self.current.is_none() {
            match Tail::open(&self.path) {
                Ok(tail) => {
                    self.commit(&[], 0, &tail_position(&tail, 0, Vec::new()))?;
                    self.current = Some(tail);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.publish_lag();
                    return Ok(report);
                }
                Err(e) => return Err(io_err("open", &self.path)(e)),
            }
        }

        if let Some(mut cur) = self.current.take() {
            let result = self.follow(&mut cur, &mut report, budget);
            self.current = Some(cur);
            result?;
        }
        self.publish_lag();
        Ok(report)
    }

    fn follow(
        &mut self,
        cur: &mut Tail,
        report: &mut PollReport,
        budget: u64,
    ) -> Result<(), DbError> {
        let len = cur.len().map_err(io_err("read", &self.path))?;
        let rewritten = !cur.head_matches().map_err(io_err("read", &self.path))?;
        if len < cur.offset || rewritten {
            report.truncations += 1;
            self.stats.truncations.fetch_add(1, Ordering::Relaxed);
            cur.restart();
            self.commit(&[], 0, &tail_position(cur, 0, Vec::new()))?;
        }
        self.read_available(cur, report, budget)?;
        Ok(())
    }

    /// Reads complete lines from `tail` until its end (or `budget` bytes),
    /// committing each chunk with the position after it. Returns the bytes
    /// consumed.
    fn read_available(
        &mut self,
        tail: &mut Tail,
        report: &mut PollReport,
        budget: u64,
    ) -> Result<u64, DbError> {
        let mut consumed_total = 0u64;
        let mut buf = std::mem::take(&mut self.buf);
        let result = (|| {
            loop {
                if consumed_total >= budget {
                    report.more = true;
                    return Ok(());
                }
                let n = read_full_at(&tail.file, &mut buf, tail.offset)
                    .map_err(io_err("read", &self.path))?;
                if n == 0 {
                    return Ok(());
                }
                let data = &buf[..n];
                let (consumed, rows, malformed, skipping) =
                    match data.iter().rposition(|&b| b == b'\n') {
                        Some(last) => {
                            let (rows, malformed) = parse_lines(&data[..=last], tail.skipping);
                            (last + 1, rows, malformed, false)
                        }
                        // A line longer than the buffer: drop it, counted once.
                        None if n == buf.len() => (n, Vec::new(), u64::from(!tail.skipping), true),
                        // A line still being written: wait for its newline.
                        None => return Ok(()),
                    };
                let offset = tail.offset + consumed as u64;
                let head = tail
                    .head_after(offset)
                    .map_err(io_err("read", &self.path))?;
                let pos = tail_position(tail, offset, head);
                self.commit(&rows, malformed, &pos)?;
                tail.offset = offset;
                tail.head = pos.head;
                tail.skipping = skipping;
                report.records += rows.len() as u64;
                report.malformed += malformed;
                report.bytes += consumed as u64;
                consumed_total += consumed as u64;
                if n < buf.len() {
                    return Ok(());
                }
            }
        })();
        self.buf = buf;
        result.map(|()| consumed_total)
    }

    /// Loads the stored position and reopens the file it names: the same
    /// file at the stored offset; a rotated-away file found beside it, to
    /// finish first; or else the file now at the path, from its start.
    fn resume(&mut self) -> Result<(), DbError> {
        self.current = None;
        self.draining = None;
        let conn = self.conn.as_mut().ok_or_else(no_conn)?;
        let (stored, newest) = load_position(conn, &self.source)?;
        if let Some(newest) = newest {
            self.stats
                .newest_record_ms
                .fetch_max(newest, Ordering::Relaxed);
        }
        let Some((pos, last_id)) = stored else {
            return Ok(());
        };
        self.last_record_id = last_id;
        let at_path = std::fs::metadata(&self.path).ok();
        if at_path.as_ref().map(|m| (m.dev(), m.ino())) == Some((pos.dev, pos.ino)) {
            let mut tail = Tail::open(&self.path).map_err(io_err("open", &self.path))?;
            if (tail.dev, tail.ino) == (pos.dev, pos.ino) {
                tail.offset = pos.offset;
                tail.head = pos.head;
                // A shrunk or rewritten file is caught by `follow`.
                self.current = Some(tail);
                return Ok(());
            }
        }
        if let Some(mut old) = find_rotated(&self.path, &pos) {
            old.offset = pos.offset;
            old.head = pos.head;
            if old.head_matches().unwrap_or(false) && old.len().is_ok_and(|l| l >= old.offset) {
                self.draining = Some(old);
            }
        }
        Ok(())
    }

    fn commit(&mut self, rows: &[Row], malformed: u64, pos: &Position) -> Result<(), DbError> {
        let conn = self.conn.as_mut().ok_or_else(no_conn)?;
        let now = now_ms();
        let last_id = match conn {
            Conn::Sqlite(c) => commit_sqlite(c, &self.source, &self.path, rows, pos, now)?,
            Conn::Postgres(c) => commit_pg(c, &self.source, &self.path, rows, pos, now)?,
        };
        if last_id.is_some() {
            self.last_record_id = last_id;
        }
        let stats = &self.stats;
        stats
            .records
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        stats.malformed.fetch_add(malformed, Ordering::Relaxed);
        if let Some(newest) = rows.iter().map(|r| r.time_ms).max() {
            stats.newest_record_ms.fetch_max(newest, Ordering::Relaxed);
        }
        Ok(())
    }

    fn publish_lag(&self) {
        let behind = |t: &Option<Tail>| {
            t.as_ref()
                .and_then(|t| t.len().ok().map(|l| l.saturating_sub(t.offset)))
                .unwrap_or(0)
        };
        let mut bytes = behind(&self.current) + behind(&self.draining);
        if self.current.is_none() && self.draining.is_some() {
            // The new file waits until the old one is finished.
            bytes += std::fs::metadata(&self.path).map_or(0, |m| m.len());
        }
        self.stats.bytes_behind.store(bytes, Ordering::Relaxed);
    }

    /// The id of the last record this source stored, if any.
    pub fn last_record_id(&self) -> Option<i64> {
        self.last_record_id
    }
}

fn no_conn() -> DbError {
    DbError::Migration("no database connection".into())
}

fn tail_position(t: &Tail, offset: u64, head: Vec<u8>) -> Position {
    Position {
        dev: t.dev,
        ino: t.ino,
        offset,
        head,
    }
}

fn sleep_unless(stop: &AtomicBool, total: Duration) {
    let step = Duration::from_millis(20);
    let mut left = total;
    while !left.is_zero() && !stop.load(Ordering::Relaxed) {
        let d = left.min(step);
        std::thread::sleep(d);
        left -= d;
    }
}

/// Rows and the malformed-line count of `data`, complete lines only. With
/// `skipping`, the first line is the rest of an over-long line, dropped.
fn parse_lines(data: &[u8], skipping: bool) -> (Vec<Row>, u64) {
    let mut rows = Vec::with_capacity(data.len() / 256 + 1);
    let mut malformed = 0;
    let mut lines = data.split(|&b| b == b'\n');
    if skipping {
        lines.next();
    }
    for line in lines {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        match parse_line(line) {
            Some(r) => rows.push(r),
            None => malformed += 1,
        }
    }
    (rows, malformed)
}

/// A file beside `path` (e.g. `access.log.1`) that is the one `pos` names.
fn find_rotated(path: &Path, pos: &Position) -> Option<Tail> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| {
            e.metadata()
                .is_ok_and(|m| (m.dev(), m.ino()) == (pos.dev, pos.ino))
        })
        .find_map(|e| Tail::open(&e.path()).ok())
        .filter(|t| (t.dev, t.ino) == (pos.dev, pos.ino))
}

type Stored = (Option<(Position, Option<i64>)>, Option<i64>);

fn position_from(dev: i64, ino: i64, offset: i64, head_hex: &str) -> Position {
    Position {
        dev: dev as u64,
        ino: ino as u64,
        offset: u64::try_from(offset).unwrap_or(0),
        head: hex::decode(head_hex).unwrap_or_default(),
    }
}

fn load_position(conn: &mut Conn, source: &str) -> Result<Stored, DbError> {
    const POS: &str =
        "SELECT device, inode, file_offset, head_hex, last_record_id FROM ingest_state WHERE source = ";
    const NEWEST: &str = "SELECT max(time_ms) FROM request_logs";
    match conn {
        Conn::Sqlite(c) => {
            use rusqlite::OptionalExtension;
            let pos = c
                .query_row(&format!("{POS}?1"), [source], |r| {
                    Ok((
                        position_from(r.get(0)?, r.get(1)?, r.get(2)?, &r.get::<_, String>(3)?),
                        r.get(4)?,
                    ))
                })
                .optional()?;
            let newest = c.query_row(NEWEST, [], |r| r.get(0))?;
            Ok((pos, newest))
        }
        Conn::Postgres(c) => {
            let pos = c.query_opt(&format!("{POS}$1"), &[&source])?.map(|r| {
                (
                    position_from(r.get(0), r.get(1), r.get(2), r.get(3)),
                    r.get(4),
                )
            });
            let newest = c.query_one(NEWEST, &[])?.get(0);
            Ok((pos, newest))
        }
    }
}

/// Per (tenant, hour, key): allowed and denied counts of a batch, in a fixed
/// order so concurrent fleet ingesters lock rows in the same order.
type Rollup<'a> = BTreeMap<(&'a str, i64, &'a str), (i64, i64)>;

fn rollup(rows: &[Row]) -> (Rollup<'_>, BTreeMap<&str, i64>) {
    let mut usage = Rollup::new();
    let mut last_used = BTreeMap::new();
    for r in rows {
        let Some(key) = r.key_id.as_deref() else {
            continue;
        };
        let seen = last_used.entry(key).or_insert(r.time_ms);
        *seen = (*seen).max(r.time_ms);
        let Some(tenant) = r.tenant.as_deref() else {
            continue;
        };
        let (allowed, denied) = match r.decision.as_deref() {
            Some("allowed") => (1, 0),
            Some("denied") => (0, 1),
            _ => continue,
        };
        let hour = r.time_ms.div_euclid(HOUR_MS) * HOUR_MS;
        let c = usage.entry((tenant, hour, key)).or_insert((0, 0));
        c.0 += allowed;
        c.1 += denied;
    }
    (usage, last_used)
}

/// Per (key, session): earliest and newest token issue, latest expiry and
/// last use (ms), in a fixed order as the usage rollup.
type SessionRollup<'a> = BTreeMap<(&'a str, &'a str), [i64; 4]>;

fn session_rollup(rows: &[Row]) -> SessionRollup<'_> {
    let mut out = SessionRollup::new();
    for r in rows {
        let (Some(key), Some(s)) = (r.key_id.as_deref(), r.session.as_ref()) else {
            continue;
        };
        let e = out.entry((key, s.id.as_str())).or_insert([
            s.issued_ms,
            s.issued_ms,
            s.expires_ms,
            r.time_ms,
        ]);
        e[0] = e[0].min(s.issued_ms);
        e[1] = e[1].max(s.issued_ms);
        e[2] = e[2].max(s.expires_ms);
        e[3] = e[3].max(r.time_ms);
    }
    out
}

/// The parameters of [`UPSERT_SESSION_SQLITE`] / [`UPSERT_SESSION_PG`]:
/// key, session, created (s), expires (s), last seen (s), newest issue (ms),
/// newest issue (s).
fn session_params<'a>(key: &'a str, id: &'a str, v: &[i64; 4]) -> (&'a str, &'a str, [i64; 5]) {
    let secs = |ms: i64| ms.div_euclid(1000);
    (
        key,
        id,
        [secs(v[0]), secs(v[2]), secs(v[3]), v[1], secs(v[1])],
    )
}

// A session is created by its first record (or its token's issue time);
// a token issued after the session's revocation (a new login with the same
// session id) makes it live again, created anew (once: its newest token,
// `issued_ms`, then postdates the revocation). The revocation itself stays:
// on SQLite it is the store's record, which still refuses the tokens issued
// before it; the session listing shows a session revoked only while its
// newest token predates the revocation. Times in seconds, as the rest of
// the table; `revoked_at` and `issued_ms` in ms, as the store writes it.
const UPSERT_SESSION_SQLITE: &str = "INSERT INTO sessions \
     (key_id, session_id, created_at, expires_at, last_seen_at, issued_ms) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
     ON CONFLICT (key_id, session_id) DO UPDATE SET \
     created_at = CASE WHEN sessions.revoked_at IS NOT NULL \
       AND coalesce(sessions.issued_ms, sessions.created_at * 1000) <= sessions.revoked_at \
       AND ?6 > sessions.revoked_at THEN ?7 \
       WHEN sessions.last_seen_at IS NULL THEN excluded.created_at \
       ELSE min(sessions.created_at, excluded.created_at) END, \
     expires_at = CASE WHEN sessions.last_seen_at IS NULL \
       OR (sessions.revoked_at IS NOT NULL \
           AND coalesce(sessions.issued_ms, sessions.created_at * 1000) <= sessions.revoked_at \
           AND ?6 > sessions.revoked_at) THEN excluded.expires_at \
       ELSE max(sessions.expires_at, excluded.expires_at) END, \
     last_seen_at = max(coalesce(sessions.last_seen_at, 0), excluded.last_seen_at), \
     issued_ms = max(coalesce(sessions.issued_ms, 0), excluded.issued_ms)";
const UPSERT_SESSION_PG: &str = "INSERT INTO sessions \
     (key_id, session_id, created_at, expires_at, last_seen_at, issued_ms) \
     VALUES ($1, $2, $3, $4, $5, $6) \
     ON CONFLICT (key_id, session_id) DO UPDATE SET \
     created_at = CASE WHEN sessions.revoked_at IS NOT NULL \
       AND coalesce(sessions.issued_ms, sessions.created_at * 1000) <= sessions.revoked_at \
       AND $6 > sessions.revoked_at THEN $7 \
       WHEN sessions.last_seen_at IS NULL THEN excluded.created_at \
       ELSE LEAST(sessions.created_at, excluded.created_at) END, \
     expires_at = CASE WHEN sessions.last_seen_at IS NULL \
       OR (sessions.revoked_at IS NOT NULL \
           AND coalesce(sessions.issued_ms, sessions.created_at * 1000) <= sessions.revoked_at \
           AND $6 > sessions.revoked_at) THEN excluded.expires_at \
       ELSE GREATEST(sessions.expires_at, excluded.expires_at) END, \
     last_seen_at = GREATEST(coalesce(sessions.last_seen_at, 0), excluded.last_seen_at), \
     issued_ms = GREATEST(coalesce(sessions.issued_ms, 0), excluded.issued_ms)";

const INSERT_COLUMNS: &str = "time_ms, key_id, tenant, environment, method, path, client_ip, \
     status, decision, reason, request_id, owner";
const UPSERT_USAGE: &str = "INSERT INTO usage_hourly (tenant, hour_ms, key_id, allowed, denied) \
     VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant, hour_ms, key_id) DO UPDATE SET \
     allowed = usage_hourly.allowed + excluded.allowed, \
     denied = usage_hourly.denied + excluded.denied";
// Only moves forward, and writes only when it does: most batches repeat the
// same busy keys.
const UPDATE_LAST_USED: &str = "UPDATE keys SET last_used_at = ? \
     WHERE key_id = ? AND (last_used_at IS NULL OR last_used_at < ?)";
const UPSERT_STATE: &str = "INSERT INTO ingest_state \
     (source, path, device, inode, file_offset, head_hex, last_record_id, updated_at) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (source) DO UPDATE SET \
     path = excluded.path, device = excluded.device, inode = excluded.inode, \
     file_offset = excluded.file_offset, head_hex = excluded.head_hex, \
     last_record_id = COALESCE(excluded.last_record_id, ingest_state.last_record_id), \
     updated_at = excluded.updated_at";

fn commit_sqlite(
    c: &mut rusqlite::Connection,
    source: &str,
    path: &Path,
    rows: &[Row],
    pos: &Position,
    now: i64,
) -> Result<Option<i64>, DbError> {
    // IMMEDIATE: take the write lock up front, so waiting for another
    // writer goes through the busy timeout instead of failing mid-way.
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut last_id = None;
    if !rows.is_empty() {
        let mut insert = tx.prepare_cached(&format!(
            "INSERT INTO request_logs ({INSERT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
        ))?;
        for r in rows {
            insert.execute(rusqlite::params![
                r.time_ms,
                r.key_id,
                r.tenant,
                r.environment,
                r.method,
                r.path,
                r.client_ip,
                r.status,
                r.decision,
                r.reason,
                r.request_id,
                r.owner
            ])?;
        }
        last_id = Some(tx.last_insert_rowid());
        let (usage, last_used) = rollup(rows);
        let mut up = tx.prepare_cached(UPSERT_USAGE)?;
        for ((tenant, hour, key), (a, d)) in usage {
            up.execute(rusqlite::params![tenant, hour, key, a, d])?;
        }
        let mut lu = tx.prepare_cached(UPDATE_LAST_USED)?;
        for (key, ms) in last_used {
            let secs = ms.div_euclid(1000);
            lu.execute(rusqlite::params![secs, key, secs])?;
        }
        let mut ss = tx.prepare_cached(UPSERT_SESSION_SQLITE)?;
        for ((key, id), v) in &session_rollup(rows) {
            let (key, id, [c, e, l, newest_ms, newest]) = session_params(key, id, v);
            ss.execute(rusqlite::params![key, id, c, e, l, newest_ms, newest])?;
        }
    }
    tx.prepare_cached(UPSERT_STATE)?.execute(rusqlite::params![
        source,
        path.display().to_string(),
        pos.dev as i64,
        pos.ino as i64,
        pos.offset as i64,
        hex::encode(&pos.head),
        last_id,
        now
    ])?;
    tx.commit()?;
    Ok(last_id)
}

fn commit_pg(
    c: &mut postgres::Client,
    source: &str,
    path: &Path,
    rows: &[Row],
    pos: &Position,
    now: i64,
) -> Result<Option<i64>, DbError> {
    use crate::db::pg_placeholders;
    use postgres::types::Type;
    let mut tx = c.transaction()?;
    let mut last_id = None;
    if !rows.is_empty() {
        // COPY: one round trip for the whole batch.
        let sink = tx.copy_in(&format!(
            "COPY request_logs ({INSERT_COLUMNS}) FROM STDIN (FORMAT binary)"
        ))?;
        let t = Type::TEXT;
        let mut w = postgres::binary_copy::BinaryCopyInWriter::new(
            sink,
            &[
                Type::INT8,
                t.clone(),
                t.clone(),
                t.clone(),
                t.clone(),
                t.clone(),
                t.clone(),
                Type::INT8,
                t.clone(),
                t.clone(),
                t.clone(),
                t,
            ],
        );
        for r in rows {
            w.write(&[
                &r.time_ms,
                &r.key_id,
                &r.tenant,
                &r.environment,
                &r.method,
                &r.path,
                &r.client_ip,
                &r.status,
                &r.decision,
                &r.reason,
                &r.request_id,
                &r.owner,
            ])?;
        }
        w.finish()?;
        // COPY drew the ids from the sequence in this session.
        last_id = Some(
            tx.query_one(
                "SELECT currval(pg_get_serial_sequence('request_logs', 'id'))",
                &[],
            )?
            .get(0),
        );
        let (usage, last_used) = rollup(rows);
        let up = tx.prepare(&pg_placeholders(UPSERT_USAGE))?;
        for ((tenant, hour, key), (a, d)) in usage {
            tx.execute(&up, &[&tenant, &hour, &key, &a, &d])?;
        }
        let lu = tx.prepare(&pg_placeholders(UPDATE_LAST_USED))?;
        for (key, ms) in last_used {
            let secs = ms.div_euclid(1000);
            tx.execute(&lu, &[&secs, &key, &secs])?;
        }
        let ss = tx.prepare(UPSERT_SESSION_PG)?;
        for ((key, id), v) in &session_rollup(rows) {
            let (key, id, [c, e, l, newest_ms, newest]) = session_params(key, id, v);
            tx.execute(&ss, &[&key, &id, &c, &e, &l, &newest_ms, &newest])?;
        }
    }
    tx.execute(
        &pg_placeholders(UPSERT_STATE),
        &[
            &source,
            &path.display().to_string(),
            &(pos.dev as i64),
            &(pos.ino as i64),
            &(pos.offset as i64),
            &hex::encode(&pos.head),
            &last_id,
            &now,
        ],
    )?;
    tx.commit()?;
    Ok(last_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_parses_with_envoys_field_shapes() {
        let r = parse_line(
            br#"{"time":"2026-11-24T02:12:24.582Z","key_id":"k1","tenant":"acme","environment":"live","method":"GET","path":"/v1","client_ip":"127.0.0.1","status":"403","decision":"denied","reason":"insufficient_scope","request_id":"-","duration_ms":3}"#,
        )
        .unwrap();
        assert_eq!(r.time_ms, 1_795_486_344_582);
        assert_eq!(r.status, Some(403));
        assert_eq!(r.key_id.as_deref(), Some("k1"));
        assert_eq!(r.request_id, None, "Envoy's '-' is stored as NULL");
        let public = parse_line(br#"{"time":"2026-11-24T02:12:24.582Z","status":200,"decision":"public","key_id":null}"#).unwrap();
        assert_eq!((public.status, public.key_id), (Some(200), None));
    }

    #[test]
    fn the_owner_field_is_stored_and_lines_without_it_have_none() {
        let line = |owner: &str| {
            format!(
                r#"{{"time":"2026-11-24T02:12:24.582Z","key_id":"k1","tenant":"acme","status":200,"decision":"allowed"{owner}}}"#
            )
        };
        let with = parse_line(line(r#","owner":"alice@example.com""#).as_bytes()).unwrap();
        assert_eq!(with.owner.as_deref(), Some("alice@example.com"));
        // Lines written before the access log had the field, and Envoy's
        // empty filter state ("" or "-"), store NULL.
        for old in ["", r#","owner":"""#, r#","owner":"-""#, r#","owner":null"#] {
            let r = parse_line(line(old).as_bytes()).unwrap();
            assert_eq!((r.owner, r.key_id.as_deref()), (None, Some("k1")), "{old}");
        }
    }

    #[test]
    fn identity_counts_only_in_a_record_keygate_decided() {
        // Envoy refused this request before keygate ran (no Host header):
        // the identity fields show what the client sent.
        let spoofed = parse_line(
            br#"{"time":"2026-11-24T02:12:24.582Z","status":400,"key_id":"victim-key","tenant":"victim","environment":"live","owner":"bob","session_issued_ms":"1","session_expires_ms":"2"}"#,
        )
        .unwrap();
        assert_eq!(
            (
                spoofed.key_id,
                spoofed.tenant,
                spoofed.environment,
                spoofed.owner,
                spoofed.session
            ),
            (None, None, None, None, None)
        );
        // The record format of envoy/envoy.yaml: absent fields left out, a
        // two-source field "" when neither source has it.
        let public = parse_line(
            br#"{"time":"2026-11-24T02:12:24.582Z","status":200,"decision":"public","key_id":"","tenant":""}"#,
        )
        .unwrap();
        assert_eq!((public.key_id, public.tenant), (None, None));
        let allowed = parse_line(
            br#"{"time":"2026-11-24T02:12:24.582Z","status":200,"decision":"allowed","key_id":"k1","tenant":"acme","rate_remaining":"4"}"#,
        )
        .unwrap();
        assert_eq!(
            (allowed.key_id.as_deref(), allowed.tenant.as_deref()),
            (Some("k1"), Some("acme"))
        );
    }

    #[test]
    fn lines_without_a_valid_time_are_not_records() {
        for bad in [
            &br#"{"status":200}"#[..],
            br#"{"time":"yesterday"}"#,
            br#"{"time":null}"#,
            br#"{"time":"2026-11-24T02:12:24.582Z""#,
            b"[1]",
            b"",
        ] {
            assert!(
                parse_line(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn long_values_are_cut_at_a_character_boundary() {
        let path = format!("/{}", "é".repeat(MAX_PATH_LEN));
        let line = serde_json::json!({"time": "2026-11-24T02:12:24Z", "path": path}).to_string();
        let r = parse_line(line.as_bytes()).unwrap();
        let stored = r.path.unwrap();
        assert!(stored.len() <= MAX_PATH_LEN && stored.len() > MAX_PATH_LEN - 2);
        assert!(path.starts_with(&stored));
    }

    #[test]
    fn usage_rollup_counts_allowed_and_denied_per_hour_and_key() {
        let row = |ms: i64, key: &str, decision: &str| Row {
            time_ms: ms,
            key_id: Some(key.into()),
            tenant: Some("t".into()),
            environment: None,
            owner: None,
            method: None,
            path: None,
            client_ip: None,
            status: None,
            decision: Some(decision.into()),
            reason: None,
            request_id: None,
            session: None,
        };
        let rows = [
            row(HOUR_MS + 5, "a", "allowed"),
            row(HOUR_MS + 9, "a", "denied"),
            row(2 * HOUR_MS, "a", "allowed"),
            row(HOUR_MS + 1, "b", "allowed"),
            row(3 * HOUR_MS, "b", "public"),
        ];
        let (usage, last_used) = rollup(&rows);
        let got: Vec<_> = usage.into_iter().collect();
        assert_eq!(
            got,
            vec![
                (("t", HOUR_MS, "a"), (1, 1)),
                (("t", HOUR_MS, "b"), (1, 0)),
                (("t", 2 * HOUR_MS, "a"), (1, 0)),
            ]
        );
        assert_eq!(last_used.get("a"), Some(&(2 * HOUR_MS)));
        assert_eq!(last_used.get("b"), Some(&(3 * HOUR_MS)));
    }
}
