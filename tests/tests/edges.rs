//! The edges of the `msae-coordinator report` command as a user meets them: a sweep too large
//! for one gRPC message beside a running coordinator, output into a pipe closed early, errors
//! printed once, `--top 0`.

use msae_coordinator::bench::bench_sweep_yaml;
use msae_coordinator::bench::report::fill_store;
use msae_coordinator::run::address_file;
use msae_tests::*;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A database holding one noop grid sweep `name` of `planned` points, the first `completed`
/// of them completed.
fn stored_sweep(
    dir: &std::path::Path,
    name: &str,
    planned: usize,
    completed: usize,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let yaml = bench_sweep_yaml(name, planned);
    let sweep = dir.join(format!("{name}.yaml"));
    std::fs::write(&sweep, &yaml).unwrap();
    let db = dir.join(format!("{name}.redb"));
    fill_store(&db, &yaml, completed).unwrap();
    (sweep, db)
}

fn report(args: &[&str], db: &std::path::Path) -> std::process::Output {
    Command::new(bin("e2e-coordinator"))
        .arg("report")
        .args(args)
        .arg("--db")
        .arg(db)
        .env("RUST_LOG", "warn")
        .env_remove("MSAE_DB")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Item 9: `report` beside a running coordinator whose sweep is far over what one 4 MB
/// message held (about 2,650 trial records): the report is streamed and complete.
#[test]
fn report_of_a_large_sweep_beside_a_running_coordinator() {
    const DONE: usize = 6_000;
    let dir = tempfile::tempdir().unwrap();
    // One point left to run and no worker: the coordinator keeps running.
    let (sweep, db) = stored_sweep(dir.path(), "big", DONE + 1, DONE);
    let records = serde_json::to_string(&stored_trials(&db)).unwrap();
    assert!(records.len() > 4 << 20, "the records must not fit one message: {}", records.len());
    let port = free_port();
    let mut coordinator =
        spawn_coordinator(dir.path(), &sweep, &db, port, &["--local-workers", "0"]);
    wait_until(Duration::from_secs(60), "the coordinator to listen", || {
        std::fs::read_to_string(address_file(&db)).ok().filter(|a| !a.trim().is_empty())
    });
    let out = report(&["--format", "json"], &db);
    kill9(&mut coordinator);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stderr}", out.status);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["sweep"], "big");
    assert_eq!(report["rows"].as_array().unwrap().len(), DONE);
    assert_eq!(report["counts"]["completed"].as_u64(), Some(DONE as u64));
}

/// Item 10: `report | head -1`: the reader closes the pipe after one line; the report ends
/// quietly with status 0 instead of panicking (exit 101).
#[test]
fn report_into_a_pipe_closed_early_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    // Far more output than a pipe buffers (64 KiB), so writing must meet the closed pipe.
    let (_, db) = stored_sweep(dir.path(), "piped", 20_000, 20_000);
    let mut child = Command::new(bin("e2e-coordinator"))
        .arg("report")
        .arg("--db")
        .arg(&db)
        .env("RUST_LOG", "warn")
        .env_remove("MSAE_DB")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.starts_with("sweep piped: 20000 trials"), "{first}");
    drop(stdout);
    let status = wait_exit(&mut child, Duration::from_secs(60), "report into a closed pipe");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(status.code(), Some(0), "{status}: {stderr}");
    assert!(stderr.trim().is_empty(), "a closed pipe is no error: {stderr}");
}

/// Item 12b: an error's cause is printed once.
#[test]
fn report_errors_print_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = report(&[], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.matches("Is a directory").count(), 1, "{stderr}");
    let out = report(&[], &dir.path().join("none.redb"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.matches("no such database").count(), 1, "{stderr}");
}

/// Item 12a: `--top 0` is a usage error (status 2), not "no completed trials yet".
#[test]
fn report_top_zero_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_, db) = stored_sweep(dir.path(), "top", 3, 3);
    let out = report(&["--top", "0"], &db);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--top") && stderr.contains("at least 1"), "{stderr}");
    assert!(out.stdout.is_empty());
    let out = report(&["--top", "1"], &db);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.lines().count(), 3, "title, header, one row: {stdout}");
}

/// Item 8: `report --metric foo` ranked every trial by nothing and exited 0. An unknown metric
/// is refused with a suggestion, from the file and from a running coordinator alike.
#[test]
fn report_by_an_unknown_metric_is_refused_with_a_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let (sweep, db) = stored_sweep(dir.path(), "m", 4, 3);
    let check = |out: std::process::Output| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains("unknown metric `fuv`; did you mean `fvu`?"), "{stderr}");
        assert!(out.stdout.is_empty());
    };
    check(report(&["--metric", "fuv"], &db));
    let ok = report(&["--metric", "mmcs"], &db);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    // The same answer through a running coordinator (one point left, no worker).
    let port = free_port();
    let mut coordinator =
        spawn_coordinator(dir.path(), &sweep, &db, port, &["--local-workers", "0"]);
    wait_until(Duration::from_secs(60), "the coordinator to listen", || {
        std::fs::read_to_string(address_file(&db)).ok().filter(|a| !a.trim().is_empty())
    });
    let out = report(&["--metric", "fuv"], &db);
    kill9(&mut coordinator);
    check(out);
}
