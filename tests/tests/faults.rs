//! Fault tests with real processes on 127.0.0.1: a worker killed mid-trial, the coordinator
//! killed and restarted mid-sweep, a worker stopped with SIGTERM, report beside a live
//! coordinator, bad sweep files, and a database that is corrupt, truncated, locked or cannot
//! be written.

use msae_coordinator::model::{TrialRecord, TrialStatus};
use msae_tests::*;
use std::collections::BTreeSet;
use std::time::Duration;

#[test]
fn killed_worker_trial_is_re_leased_and_completes_once() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("kill.yaml");
    std::fs::write(&sweep, noop_sweep("kill", 4, 1500, 3)).unwrap();
    let db = dir.path().join("kill.redb");
    let port = free_port();
    let mut coordinator = spawn_coordinator(
        dir.path(),
        &sweep,
        &db,
        port,
        &["--local-workers", "0", "--lease-ttl", "1s"],
    );
    let mut doomed = spawn_worker(dir.path(), port, "doomed");
    // Wait until the doomed worker holds a lease, then kill it without a chance to say goodbye.
    let victim = wait_until(Duration::from_secs(60), "a running trial", || {
        let r = report_rpc(port)?;
        r.trials.iter().find(|t| t.status == TrialStatus::Running).map(|t| t.index)
    });
    kill9(&mut doomed);
    let mut rescuer = spawn_worker(dir.path(), port, "rescuer");
    let status = wait_exit(&mut coordinator, Duration::from_secs(120), "coordinator");
    assert!(status.success(), "coordinator failed: {status}");
    let _ = wait_exit(&mut rescuer, Duration::from_secs(30), "rescuer");

    let trials = stored_trials(&db);
    assert_eq!(trials.len(), 4);
    assert!(trials.iter().all(|t| t.status == TrialStatus::Completed), "{trials:#?}");
    let re_leased = trials.iter().find(|t| t.index == victim).unwrap();
    assert_eq!(re_leased.attempt, 2, "the killed worker's trial ran a second attempt");
    assert_eq!(re_leased.worker.as_deref(), Some("rescuer"));
    assert!(!re_leased.errors.is_empty(), "the expired lease is recorded: {re_leased:?}");
}

/// Runs `yaml` with a coordinator process and two worker processes, SIGKILLs the coordinator
/// once `kill_after` trials are completed, starts it again on the same database and address,
/// and waits for the sweep to finish. Returns the completed trials before the kill and every
/// trial at the end.
fn kill_and_resume(
    name: &str,
    yaml: &str,
    kill_after: usize,
) -> (Vec<TrialRecord>, Vec<TrialRecord>) {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join(format!("{name}.yaml"));
    std::fs::write(&sweep, yaml).unwrap();
    let db = dir.path().join(format!("{name}.redb"));
    let port = free_port();
    let mut coordinator =
        spawn_coordinator(dir.path(), &sweep, &db, port, &["--local-workers", "0"]);
    let mut workers: Vec<_> =
        ["w1", "w2"].iter().map(|n| spawn_worker(dir.path(), port, n)).collect();
    wait_until(Duration::from_secs(60), "completed trials before the kill", || {
        let r = report_rpc(port)?;
        (count(&r, TrialStatus::Completed) >= kill_after).then_some(())
    });
    kill9(&mut coordinator);
    let before: Vec<_> =
        stored_trials(&db).into_iter().filter(|t| t.status == TrialStatus::Completed).collect();

    // Same YAML, same database, same address: the workers reconnect by themselves.
    let mut coordinator =
        spawn_coordinator(dir.path(), &sweep, &db, port, &["--local-workers", "0"]);
    let status = wait_exit(&mut coordinator, Duration::from_secs(120), "restarted coordinator");
    assert!(status.success(), "restarted coordinator failed: {status}");
    for w in &mut workers {
        let _ = wait_exit(w, Duration::from_secs(30), "worker");
    }
    (before, stored_trials(&db))
}

#[test]
fn coordinator_restart_resumes_without_rerunning_or_losing_trials() {
    let (before, after) = kill_and_resume("restart", &noop_sweep("restart", 16, 250, 3), 4);
    assert!(before.len() >= 4 && before.len() < 16, "{} completed before the kill", before.len());
    assert_eq!(after.len(), 16);
    let indexes: BTreeSet<u64> = after.iter().map(|t| t.index).collect();
    assert_eq!(indexes, (0..16).collect(), "no trial lost or duplicated");
    assert!(after.iter().all(|t| t.status == TrialStatus::Completed));
    for done in &before {
        let now = after.iter().find(|t| t.index == done.index).unwrap();
        assert_eq!(now.finished_ms, done.finished_ms, "trial {} was rerun", done.index);
        assert_eq!(now.attempt, done.attempt, "trial {} was rerun", done.index);
    }
}

#[test]
fn a_killed_coordinator_resumes_a_nelder_mead_search_without_rerunning_a_point() {
    let yaml = "name: nm\nmethod: nelder_mead\nrun_cap: 16\nmax_attempts: 3\n\
         task: {kind: noop, sleep_ms: 250}\nmetric: {name: fvu, goal: minimize}\n\
         parameters:\n  lr: {distribution: log_uniform_values, min: 0.00001, max: 0.1}\n\
         \x20 layer_k: {distribution: int_uniform, min: 2, max: 64}\n\
         \x20 optimizer: {values: [adam, sgd]}\n";
    let (before, after) = kill_and_resume("nm", yaml, 5);
    assert!(before.len() >= 5 && before.len() < 16, "{} completed before the kill", before.len());
    assert_eq!(after.len(), 16, "run_cap trials in all");
    assert!(after.iter().all(|t| t.status == TrialStatus::Completed));
    let points: BTreeSet<String> =
        after.iter().map(|t| serde_json::to_string(&t.params).unwrap()).collect();
    let listing: Vec<String> = after
        .iter()
        .map(|t| format!("{} {}", t.index, serde_json::to_string(&t.params).unwrap()))
        .collect();
    assert_eq!(points.len(), 16, "no point was proposed twice: {listing:#?}");
    for done in &before {
        let now = after.iter().find(|t| t.index == done.index).unwrap();
        assert_eq!(now.finished_ms, done.finished_ms, "trial {} was rerun", done.index);
        assert_eq!(now.params, done.params);
    }
    // The search went on improving after the restart.
    let best_before = before.iter().map(|t| t.metrics["fvu"]).fold(f64::MAX, f64::min);
    let best_after = after.iter().map(|t| t.metrics["fvu"]).fold(f64::MAX, f64::min);
    assert!(best_after <= best_before);
}

#[test]
fn sigterm_hands_the_lease_back() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("term.yaml");
    std::fs::write(&sweep, noop_sweep("term", 2, 3000, 1)).unwrap();
    let db = dir.path().join("term.redb");
    let port = free_port();
    // A long TTL: the trial can only be re-leased quickly if the worker hands it back.
    let mut coordinator = spawn_coordinator(
        dir.path(),
        &sweep,
        &db,
        port,
        &["--local-workers", "0", "--lease-ttl", "120s"],
    );
    let leaving = spawn_worker(dir.path(), port, "leaving");
    let mut leaving = leaving;
    wait_until(Duration::from_secs(60), "a running trial", || {
        let r = report_rpc(port)?;
        (count(&r, TrialStatus::Running) >= 1).then_some(())
    });
    sigterm(&leaving);
    let status = wait_exit(&mut leaving, Duration::from_secs(30), "worker after SIGTERM");
    assert!(status.success(), "worker exits cleanly on SIGTERM: {status}");
    let r = report_rpc(port).unwrap();
    assert_eq!(count(&r, TrialStatus::Running), 0, "the lease was handed back");
    assert_eq!(count(&r, TrialStatus::Failed), 0, "a handed-back trial is not a failure");
    let mut staying = spawn_worker(dir.path(), port, "staying");
    let status = wait_exit(&mut coordinator, Duration::from_secs(60), "coordinator");
    assert!(status.success());
    let _ = wait_exit(&mut staying, Duration::from_secs(30), "worker");
    let trials = stored_trials(&db);
    assert!(trials.iter().all(|t| t.status == TrialStatus::Completed), "{trials:#?}");
}

#[test]
fn report_beside_a_running_coordinator_asks_it() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("live.yaml");
    std::fs::write(&sweep, noop_sweep("live", 3, 200, 1)).unwrap();
    let db = dir.path().join("live.redb");
    let port = free_port();
    let mut coordinator =
        spawn_coordinator(dir.path(), &sweep, &db, port, &["--local-workers", "0"]);
    wait_until(Duration::from_secs(60), "the coordinator to listen", || report_rpc(port));
    // The database is locked by the coordinator: report must go through it.
    let out = std::process::Command::new(bin("e2e-coordinator"))
        .args(["report", "--format", "json", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["sweep"], "live");
    // Trials are proposed as workers ask for them; none has run yet, and the counts still
    // describe the whole planned sweep (regression: they covered proposed trials only).
    assert_eq!(report["counts"]["completed"].as_u64(), Some(0));
    assert_eq!(report["counts"]["total"].as_u64(), Some(3), "{}", report["counts"]);
    assert_eq!(report["counts"]["queued"].as_u64(), Some(3), "{}", report["counts"]);
    assert!(report["rows"].as_array().unwrap().is_empty());
    let mut worker = spawn_worker(dir.path(), port, "w");
    assert!(wait_exit(&mut coordinator, Duration::from_secs(60), "coordinator").success());
    let _ = wait_exit(&mut worker, Duration::from_secs(30), "worker");
    // And after it exits, from the file.
    let out = std::process::Command::new(bin("e2e-coordinator"))
        .args(["report", "--format", "csv", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = String::from_utf8(out.stdout).unwrap();
    assert_eq!(csv.lines().count(), 4, "header + 3 trials:\n{csv}");
}

#[test]
fn bad_sweep_files_are_refused_with_their_line_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bad.redb");
    let cases = [
        ("name: bad\nmethod: grid\nparameters:\n  layer_kk: {values: [1, 2]}\n", "4:", "layer_k"),
        (
            "name: bad\nmethod: grid\nrun_capp: 3\nparameters:\n  lr: {value: 0.1}\n",
            "3:",
            "run_cap",
        ),
        (
            "name: bad\nmethod: grid\nparameters:\n  layer_k: {values: [4, 300]}\n",
            "4:",
            "larger than the code layer",
        ),
        ("name: bad\nmethod: grid\nparameters: [\n", "", "bad.yaml"),
    ];
    for (yaml, location, needle) in cases {
        let sweep = dir.path().join("bad.yaml");
        std::fs::write(&sweep, yaml).unwrap();
        let out = run_to_end(&sweep, &db, &["--quiet"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted:\n{yaml}");
        assert!(stderr.contains(&format!("bad.yaml:{location}")), "no location in: {stderr}");
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
    assert!(!db.exists(), "a refused sweep must not create the database");
}

#[test]
fn changed_sweep_under_the_same_name_is_refused_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("s.yaml");
    let db = dir.path().join("s.redb");
    let run = |extra: &[&str]| {
        run_to_end(&sweep, &db, &[&["--quiet", "--no-report", "--logdir", "none"], extra].concat())
    };
    std::fs::write(&sweep, noop_sweep("same", 2, 0, 1)).unwrap();
    assert!(run(&[]).status.success());
    std::fs::write(&sweep, noop_sweep("same", 3, 0, 1)).unwrap();
    let out = run(&[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("different definition") && stderr.contains("--new-sweep"), "{stderr}");
    assert!(run(&["--new-sweep"]).status.success());
    // Asking again with the same changed definition resumes same-2 instead of a same-3.
    let again = run(&["--new-sweep"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let trials = stored_trials(&db);
    assert!(trials.iter().all(|t| t.sweep != "same-3"), "a third sweep was started");
    assert_eq!(trials.iter().filter(|t| t.sweep == "same").count(), 2, "the first sweep is intact");
    assert_eq!(trials.iter().filter(|t| t.sweep == "same-2").count(), 3);
}

#[test]
fn sigterm_on_the_coordinator_stops_cleanly_and_the_sweep_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("int.yaml");
    std::fs::write(&sweep, noop_sweep("int", 12, 300, 3)).unwrap();
    let db = dir.path().join("int.redb");
    let port = free_port();
    let mut coordinator =
        spawn_coordinator(dir.path(), &sweep, &db, port, &["--local-workers", "0"]);
    let mut worker = spawn_worker(dir.path(), port, "w");
    wait_until(Duration::from_secs(60), "2 completed trials", || {
        let r = report_rpc(port)?;
        (count(&r, TrialStatus::Completed) >= 2).then_some(())
    });
    sigterm(&coordinator);
    let status = wait_exit(&mut coordinator, Duration::from_secs(30), "coordinator after SIGTERM");
    // Not an error, not a finished sweep either: 5 says "stopped, run again to resume".
    assert_eq!(status.code(), Some(5), "a stopped sweep exits 5: {status}");
    let stopped = stored_trials(&db);
    let done = stopped.iter().filter(|t| t.status == TrialStatus::Completed).count();
    assert!((2..12).contains(&done), "{done} completed at the stop");
    assert!(stopped.iter().all(|t| t.status != TrialStatus::Failed), "{stopped:#?}");
    // The running trial was handed back by the remote worker: queued, no attempt spent.
    for t in stopped.iter().filter(|t| t.status != TrialStatus::Completed) {
        assert_eq!(t.status, TrialStatus::Queued, "{t:#?}");
        assert_eq!(t.attempt, 0, "a stop must not cost an attempt: {t:#?}");
    }

    let mut coordinator =
        spawn_coordinator(dir.path(), &sweep, &db, port, &["--local-workers", "0"]);
    assert!(wait_exit(&mut coordinator, Duration::from_secs(120), "resumed coordinator").success());
    let _ = wait_exit(&mut worker, Duration::from_secs(30), "worker");
    let trials = stored_trials(&db);
    assert_eq!(trials.len(), 12);
    assert!(trials.iter().all(|t| t.status == TrialStatus::Completed));
    for before in stopped.iter().filter(|t| t.status == TrialStatus::Completed) {
        let after = trials.iter().find(|t| t.index == before.index).unwrap();
        assert_eq!(after.finished_ms, before.finished_ms, "trial {} rerun", before.index);
    }
}

#[test]
fn a_corrupt_database_is_named_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("c.yaml");
    std::fs::write(&sweep, noop_sweep("c", 2, 0, 1)).unwrap();
    let db = dir.path().join("corrupt.redb");
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    std::fs::write(&db, &garbage).unwrap();
    let out = run_to_end(&sweep, &db, &["--quiet"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("corrupt.redb") && stderr.contains("not a msae/redb database"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&db).unwrap(), garbage, "the file was modified");
    every_command_refuses(&db, &["not a msae/redb database", "damaged"]);
}

/// `report`, `list`, `export` and `delete` (with and without --yes) on a database they cannot
/// read: each exits non-zero with a message naming the file and one of `problems`, and leaves
/// the file's bytes as they were.
fn every_command_refuses(db: &std::path::Path, problems: &[&str]) {
    let name = db.file_name().unwrap().to_string_lossy().into_owned();
    let out_dir = db.with_extension("export");
    let commands: [&[&str]; 5] = [
        &["report"],
        &["list"],
        &["export", "--trial", "0", "--out", out_dir.to_str().unwrap()],
        &["delete", "c"],
        &["delete", "c", "--yes"],
    ];
    let before = file_digest(db);
    for args in commands {
        let mut argv: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        argv.extend([std::ffi::OsStr::new("--db"), db.as_os_str()]);
        let out = coordinator_command(&argv);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted {name}: {stderr}");
        assert!(stderr.contains(&name), "{args:?}: the file is not named: {stderr}");
        assert!(problems.iter().any(|p| stderr.contains(p)), "{args:?}: no problem in: {stderr}");
        assert_eq!(file_digest(db), before, "{args:?} modified {name}");
    }
}

/// A database written by a real sweep, then cut to half its size (a copy that stopped
/// short, a full disk during a backup): every command names it and the damage, and none
/// writes to it, the sweep command (which could repair a file a crash left) included.
#[test]
fn a_truncated_database_is_named_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("c.yaml");
    std::fs::write(&sweep, noop_sweep("c", 40, 0, 1)).unwrap();
    let db = dir.path().join("cut.redb");
    let quiet = ["--quiet", "--no-report", "--logdir", "none"];
    let out = run_to_end(&sweep, &db, &quiet);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let whole = std::fs::read(&db).unwrap();
    std::fs::write(&db, &whole[..whole.len() / 2]).unwrap();
    let before = file_digest(&db);

    let out = run_to_end(&sweep, &db, &quiet);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a sweep ran on a truncated file: {stderr}");
    assert!(stderr.contains("cut.redb") && stderr.contains("truncated"), "{stderr}");
    assert!(stderr.contains("left untouched"), "{stderr}");
    assert_eq!(file_digest(&db), before, "the sweep command modified the file");
    every_command_refuses(&db, &["truncated"]);
}

/// A second coordinator on a database that a running one holds is refused at once, naming
/// the file and the reason, and the first carries on to the end; `delete` is refused too,
/// while `report` and `list` ask the running coordinator.
#[test]
fn a_held_database_refuses_a_second_coordinator_and_the_first_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("c.yaml");
    std::fs::write(&sweep, noop_sweep("c", 6, 100, 1)).unwrap();
    let db = dir.path().join("held.redb");
    let port = free_port();
    let mut first = spawn_coordinator(dir.path(), &sweep, &db, port, &["--local-workers", "0"]);
    wait_until(Duration::from_secs(60), "the first coordinator to listen", || report_rpc(port));

    let out = run_to_end(&sweep, &db, &["--quiet", "--logdir", "none"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second coordinator ran: {stderr}");
    assert!(
        stderr.contains("held.redb") && stderr.contains("in use by another process"),
        "{stderr}"
    );
    let db_arg = db.as_os_str();
    let out = coordinator_command(&[
        "delete".as_ref(),
        "c".as_ref(),
        "--yes".as_ref(),
        "--db".as_ref(),
        db_arg,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "deleted under a running coordinator: {stderr}");
    assert!(stderr.contains("held.redb") && stderr.contains("nothing was changed"), "{stderr}");
    for cmd in ["report", "list"] {
        let out = coordinator_command(&[cmd.as_ref(), "--db".as_ref(), db_arg]);
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    }

    let mut worker = spawn_worker(dir.path(), port, "w");
    assert!(wait_exit(&mut first, Duration::from_secs(60), "first coordinator").success());
    let _ = wait_exit(&mut worker, Duration::from_secs(30), "worker");
    let trials = stored_trials(&db);
    assert_eq!(trials.len(), 6);
    assert!(trials.iter().all(|t| t.status == TrialStatus::Completed), "{trials:#?}");
}

/// A database write that fails (the disk is full; injected after N commits): the coordinator
/// stops, exits non-zero saying which file could not be written and why, and every result a
/// worker saw acknowledged is in the file afterwards.
#[test]
fn a_failing_database_write_stops_the_coordinator_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("full.yaml");
    std::fs::write(&sweep, noop_sweep("full", 40, 50, 3)).unwrap();
    let db = dir.path().join("full.redb");
    let port = free_port();
    let log_path = dir.path().join("coordinator.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut coordinator = std::process::Command::new(bin("e2e-coordinator"))
        .arg(&sweep)
        .arg("--db")
        .arg(&db)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--logdir", "none", "--quiet", "--local-workers", "0"])
        .env("MSAE_FAULT_FAIL_WRITES_AFTER", "15")
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut worker = spawn_worker(dir.path(), port, "w");
    let status = wait_exit(&mut coordinator, Duration::from_secs(60), "coordinator");
    // The worker keeps its undelivered result and retries; it has nothing more to tell.
    kill9(&mut worker);
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(status.code(), Some(1), "{text}");
    let last = text.lines().rfind(|l| l.starts_with("error:")).unwrap_or_default();
    assert!(
        last.contains("database could not be written")
            && last.contains("full.redb")
            && last.contains("no space left on device"),
        "{text}"
    );
    assert!(!msae_coordinator::run::address_file(&db).exists(), "the address file was left");

    let acknowledged: BTreeSet<u64> = std::fs::read_to_string(dir.path().join("worker-w.log"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("result accepted"))
        .filter_map(|l| l.split_once("trial=full/")?.1.split(' ').next()?.parse().ok())
        .collect();
    assert!(!acknowledged.is_empty(), "no result was acknowledged before the failure");
    let trials = stored_trials(&db);
    let completed: BTreeSet<u64> =
        trials.iter().filter(|t| t.status == TrialStatus::Completed).map(|t| t.index).collect();
    assert!(completed.len() < 40, "the failure came after the end of the sweep");
    let lost: Vec<_> = acknowledged.difference(&completed).collect();
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?} ({completed:?})");
}

#[test]
fn token_artifacts_and_max_trials() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("tok.yaml");
    std::fs::write(
        &sweep,
        "name: tok\nmethod: grid\nbase: {steps: 20, eval_every: 10, data: {synthetic: {num_samples: 1024}}}\n\
         parameters:\n  seed: {values: [1, 2]}\n",
    )
    .unwrap();
    let db = dir.path().join("tok.redb");
    let port = free_port();
    let mut coordinator = spawn_coordinator(
        dir.path(),
        &sweep,
        &db,
        port,
        &["--local-workers", "0", "--token", "s3cret"],
    );
    wait_until(Duration::from_secs(60), "the coordinator to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let url = format!("http://127.0.0.1:{port}");
    // The client commands take the token from a file too, and are refused without it.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let client = |args: &[&str], token_file: Option<&std::path::Path>| {
        let mut cmd = std::process::Command::new(bin("e2e-coordinator"));
        cmd.args(args).env_remove("MSAE_TOKEN").env_remove("MSAE_TOKEN_FILE");
        if let Some(file) = token_file {
            cmd.arg("--token-file").arg(file);
        }
        cmd.output().unwrap()
    };
    for args in [vec!["status", "--coordinator", &url], vec!["report", "--coordinator", &url]] {
        let refused = client(&args, None);
        assert!(!refused.status.success(), "{args:?} without a token");
        let answered = client(&args, Some(&token_file));
        let stdout = String::from_utf8_lossy(&answered.stdout);
        assert!(
            answered.status.success() && stdout.contains("tok"),
            "{args:?} --token-file: {stdout} {}",
            String::from_utf8_lossy(&answered.stderr)
        );
    }
    // Without the token: refused, and the worker says why instead of retrying forever.
    let out = std::process::Command::new(bin("e2e-worker"))
        .args(["--coordinator", &url])
        .env_remove("MSAE_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.to_lowercase().contains("token"), "{stderr}");
    // With it: one trial, artifacts kept, then exit.
    let artifacts = dir.path().join("artifacts");
    let out = std::process::Command::new(bin("e2e-worker"))
        .args(["--coordinator", &url, "--name", "one", "--max-trials", "1", "--out"])
        .arg(&artifacts)
        .env("MSAE_TOKEN", "s3cret")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let weights: Vec<_> =
        walk_files(&artifacts).into_iter().filter(|p| p.ends_with("weights.safetensors")).collect();
    assert_eq!(weights.len(), 1, "one trial's weights under {}", artifacts.display());
    let mut rest = std::process::Command::new(bin("e2e-worker"))
        // Without a scheme: HOST:PORT is what people type.
        .args(["--coordinator", &format!("127.0.0.1:{port}"), "--name", "rest"])
        .env("MSAE_TOKEN", "s3cret")
        .spawn()
        .unwrap();
    assert!(wait_exit(&mut coordinator, Duration::from_secs(120), "coordinator").success());
    let _ = wait_exit(&mut rest, Duration::from_secs(30), "worker");
    let trials = stored_trials(&db);
    assert_eq!(trials.len(), 2);
    assert!(trials.iter().all(|t| t.status == TrialStatus::Completed));
    let workers: BTreeSet<_> = trials.iter().filter_map(|t| t.worker.clone()).collect();
    assert_eq!(workers, ["one".to_string(), "rest".to_string()].into_iter().collect());
}

fn walk_files(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

#[test]
fn stopping_the_coordinator_hands_local_trials_back_without_spending_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("loc.yaml");
    // One attempt only: a stop that counted as a failure would fail the trial for good.
    std::fs::write(&sweep, noop_sweep("loc", 2, 3000, 1)).unwrap();
    let db = dir.path().join("loc.redb");
    let port = free_port();
    let mut coordinator =
        spawn_coordinator(dir.path(), &sweep, &db, port, &["--local-workers", "1"]);
    wait_until(Duration::from_secs(60), "a running trial", || {
        let r = report_rpc(port)?;
        (count(&r, TrialStatus::Running) >= 1).then_some(())
    });
    sigterm(&coordinator);
    let status = wait_exit(&mut coordinator, Duration::from_secs(30), "coordinator");
    assert_eq!(status.code(), Some(5), "stopped: {status}");
    let stopped = stored_trials(&db);
    assert!(!stopped.is_empty());
    for t in &stopped {
        assert_eq!(t.status, TrialStatus::Queued, "{t:#?}");
        assert_eq!(t.attempt, 0, "{t:#?}");
    }
    let mut coordinator =
        spawn_coordinator(dir.path(), &sweep, &db, port, &["--local-workers", "1"]);
    assert!(wait_exit(&mut coordinator, Duration::from_secs(60), "resumed coordinator").success());
    let trials = stored_trials(&db);
    assert_eq!(trials.len(), 2);
    assert!(
        trials.iter().all(|t| t.status == TrialStatus::Completed && t.attempt == 1),
        "{trials:#?}"
    );
}

#[test]
fn deterministic_failures_fail_at_once_and_the_exit_status_says_so() {
    let dir = tempfile::tempdir().unwrap();
    // Finite values whose squares overflow f32: every trial's loss is infinite at once.
    let data = dir.path().join("huge.npy");
    // Rows of alternating sign, so no bias (the data-mean start included) fits them.
    let huge: Vec<f32> =
        (0..64 * 8).map(|i| if (i / 8) % 2 == 0 { 1e30f32 } else { -1e30 }).collect();
    let npy = msae_worker::data::npy::encode(
        "<f4",
        false,
        &[64, 8],
        &msae_worker::data::npy::f32_bytes(&huge),
        1,
    );
    std::fs::write(&data, npy).unwrap();
    let run = |name: &str, path: &std::path::Path| {
        let sweep = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &sweep,
            format!(
                "name: {name}\nmethod: grid\nmax_attempts: 3\n\
                 base: {{steps: 20, eval_every: 0, data: {{path: {}}}}}\n\
                 parameters:\n  lr: {{values: [0.001, 0.01]}}\n",
                path.display()
            ),
        )
        .unwrap();
        let db = dir.path().join(format!("{name}.redb"));
        let out = run_to_end(&sweep, &db, &["--quiet", "--logdir", "none"]);
        (out, db)
    };
    // A diverging configuration: every trial fails on its first attempt, and the exit status
    // is 4 (regression: three attempts each, then exit 0).
    let (out, db) = run("div", &data);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    let trials = stored_trials(&db);
    assert_eq!(trials.len(), 2);
    for t in &trials {
        assert_eq!((t.status, t.attempt), (TrialStatus::Failed, 1), "{t:#?}");
        assert!(
            t.errors[0].contains("not retryable") && t.errors[0].contains("diverged"),
            "{t:#?}"
        );
    }
    // A missing data file is found before anything starts: exit 1, the file named, no
    // database created.
    let (out, db) = run("gone", &dir.path().join("missing.npy"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("missing.npy: data file not found"), "{stderr}");
    assert!(!db.exists());
}
