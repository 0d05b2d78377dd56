//! Ingestion and queries on the embedded SQLite store, one fresh database
//! file per test.

mod common;

use keygate_control::db::Db;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run(scenario: common::Scenario) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::sqlite(dir.path().join("keygate.db"));
    scenario(&db, dir.path());
}

#[test]
fn partial_last_line_is_ingested_only_once_complete() {
    run(common::partial_last_line_waits_for_its_newline);
}

#[test]
fn token_sessions_are_recorded_and_revived() {
    run(common::token_sessions_are_recorded_and_revived);
}

#[test]
fn request_owner_is_stored_listed_and_filtered_by_tenant_and_owner() {
    run(common::request_owner_is_stored_listed_and_filtered);
}

#[test]
fn migration_5_keeps_old_records_without_an_owner() {
    run(common::migration_5_keeps_old_records_without_an_owner);
}

#[test]
fn malformed_lines_are_skipped_and_counted() {
    run(common::malformed_lines_are_skipped_and_counted);
}

#[test]
fn over_long_line_is_skipped_and_counted_once() {
    run(common::over_long_line_is_skipped_and_counted_once);
}

#[test]
fn restart_resumes_from_the_stored_offset_without_duplicates() {
    run(common::restart_resumes_without_duplicates_or_gaps);
}

#[test]
fn rotation_finishes_the_old_file_before_switching() {
    run(common::rotation_finishes_the_old_file_before_switching);
}

#[test]
fn restart_after_rotation_finishes_the_rotated_file() {
    run(common::restart_after_rotation_finishes_the_rotated_file);
}

#[test]
fn truncation_starts_again_from_the_top() {
    run(common::truncation_starts_again_from_the_top);
}

#[test]
fn truncated_and_regrown_file_is_detected_by_its_first_bytes() {
    run(common::truncated_and_regrown_file_is_still_read_from_the_top);
}

#[test]
fn retention_prunes_old_records_and_usage() {
    run(common::retention_prunes_old_records_and_usage);
}

#[test]
fn log_queries_filter_and_page_newest_first() {
    run(common::log_queries_filter_and_page_newest_first);
}

#[test]
fn usage_counts_per_hour_day_and_key() {
    run(common::usage_counts_per_bucket_and_key);
}

#[test]
fn last_used_at_follows_the_newest_request() {
    run(common::last_used_at_follows_the_newest_request);
}

#[test]
fn run_until_ingests_in_the_background_and_stops_when_told() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let db = Db::sqlite(dir.path().join("keygate.db"));
    let log = dir.path().join("access.log");
    let mut ing = common::ingester(&db, &log).with_poll_interval(Duration::from_millis(10));
    let stats = ing.stats();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let worker = std::thread::spawn(move || ing.run_until(&stop2));
    // The log does not exist yet; it appears and grows while we watch.
    common::append(&log, &common::lines("r", 50, common::T0));
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats.records.load(Ordering::Relaxed) < 50 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    assert_eq!(common::stored_ids(&db), common::ids("r", 50));
    assert_eq!(stats.last_error(), None);
}

/// Not a test of its own: the child process of the kill -9 test, which
/// runs it with `--ignored --exact` and the paths in the environment.
#[test]
#[ignore = "child process of kill_9_during_ingestion_loses_and_repeats_nothing"]
fn ingest_child_until_killed() {
    let db = Db::sqlite(std::env::var("KEYGATE_CHILD_DB").unwrap());
    let log = std::env::var("KEYGATE_CHILD_LOG").unwrap();
    let mut ing = common::ingester(&db, log.as_ref());
    loop {
        ing.poll_once().unwrap();
    }
}

#[test]
fn kill_9_during_ingestion_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("keygate.db");
    let db = Db::sqlite(&db_path);
    let log = dir.path().join("access.log");
    const N: usize = 60_000;
    common::append(&log, &common::lines("r", N, common::T0));
    // Kill the ingesting child right after it is seen to commit (a commit
    // every ~13,000 records), three times, then let a last ingester finish.
    let mut caught_midway = false;
    for _ in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "ingest_child_until_killed",
                "--nocapture",
            ])
            .env("KEYGATE_CHILD_DB", &db_path)
            .env("KEYGATE_CHILD_LOG", &log)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("child.err")).unwrap())
            .spawn()
            .unwrap();
        let before = common::int(&db, "SELECT count(*) FROM request_logs").unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while common::int(&db, "SELECT count(*) FROM request_logs").unwrap() == before
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let exited = child.try_wait().unwrap();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let n = common::int(&db, "SELECT count(*) FROM request_logs").unwrap() as usize;
        assert!(
            exited.is_none(),
            "the child died by itself: {}",
            std::fs::read_to_string(dir.path().join("child.err")).unwrap_or_default()
        );
        caught_midway |= n > 0 && n < N;
        if n == N {
            break;
        }
    }
    let mut ing = common::ingester(&db, &log);
    while ing.poll_once().unwrap().more {}
    assert_eq!(common::stored_ids(&db), common::ids("r", N));
    assert!(
        caught_midway,
        "no kill landed mid-ingestion; the test proved nothing"
    );
}

#[test]
fn pruning_in_the_background_does_not_stop_ingestion() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let db = Db::sqlite(dir.path().join("keygate.db"));
    let log = dir.path().join("access.log");
    let day = 86_400_000;
    // 40,000 records older than the retention, ingested first.
    common::append(&log, &common::lines("old", 40_000, common::T0 - 40 * day));
    let mut ing = common::ingester(&db, &log).with_poll_interval(Duration::from_millis(5));
    while ing.poll_once().unwrap().more {}
    let stats = ing.stats();
    let stop = Arc::new(AtomicBool::new(false));
    let ingest_stop = Arc::clone(&stop);
    let ingesting = std::thread::spawn(move || ing.run_until(&ingest_stop));
    let pruner = keygate_control::logs::Pruner::new(&db, Duration::from_secs(30 * 86_400));
    let deleted = Arc::clone(&pruner.deleted);
    let pruning = {
        let db = db.clone();
        std::thread::spawn(move || {
            let mut conn = db.open().unwrap();
            pruner.prune_once(&mut conn, common::T0).unwrap()
        })
    };
    // New records keep arriving while the pruner deletes in chunks.
    for batch in 0..20 {
        common::append(
            &log,
            &common::lines(&format!("new{batch}_"), 200, common::T0 + batch * 1000),
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(pruning.join().unwrap(), 40_000);
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats.records.load(Ordering::Relaxed) < 44_000 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    ingesting.join().unwrap();
    assert_eq!(stats.last_error(), None);
    assert_eq!(stats.errors.load(Ordering::Relaxed), 0);
    assert_eq!(deleted.load(Ordering::Relaxed), 40_000);
    let mut want = std::collections::BTreeSet::new();
    for batch in 0..20 {
        want.extend(common::ids(&format!("new{batch}_"), 200));
    }
    assert_eq!(common::stored_ids(&db), want);
}

#[test]
fn dead_sessions_are_pruned_and_live_or_recently_revoked_ones_kept() {
    run(common::dead_sessions_are_pruned_and_live_or_recently_revoked_ones_kept);
}

#[test]
fn store_changes_reach_the_tables_logs_and_sessions_are_read_from() {
    run(common::store_changes_reach_the_tables_logs_and_sessions_are_read_from);
}

#[test]
fn an_audit_record_commits_with_its_change_or_not_at_all() {
    run(common::an_audit_record_commits_with_its_change_or_not_at_all);
}

#[test]
fn migration_2_fences_portal_tokens_made_before_it() {
    run(common::migration_2_fences_portal_tokens_made_before_it);
}

#[test]
fn a_deleted_keys_sessions_go_with_it_and_a_reused_id_lists_none() {
    run(common::a_deleted_keys_sessions_go_with_it_and_a_reused_id_lists_none);
}
