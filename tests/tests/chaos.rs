//! Chaos: a no-op sweep of a few hundred trials while worker processes are SIGKILLed and
//! replaced, frozen with SIGSTOP past their lease and resumed, and the coordinator is SIGKILLed
//! and restarted on the same database and address. Whatever the order in which things happen,
//! every trial must end completed exactly once, none failed, and the frozen workers' late
//! results must have been refused.

use msae_coordinator::model::TrialStatus;
use msae_tests::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

const TRIALS: usize = 400;
/// Long enough that 4 workers need at least 20 s for the sweep: the chaos rounds (5 s in all on
/// a 2-core machine, most of it waiting for leases to expire) must all happen before it ends.
const SLEEP_MS: u64 = 200;
const WORKERS: usize = 4;
const ROUNDS: usize = 3;
/// A round costs at most one failed attempt for the killed worker's lease, one for the frozen
/// worker's, and one per worker for leases lost with the coordinator: 2 + 4 = 6, so 18 over the
/// test. Even if every one of them hit the same trial, 25 attempts cannot run out: a failed
/// trial here would be a scheduler bug, not bad luck.
const MAX_ATTEMPTS: u32 = 25;
const REFUSED: &str = "the coordinator refused the result (stale lease)";

/// The processes of the test: killed when it ends, so a failed assertion leaves no frozen or
/// orphaned process behind.
#[derive(Default)]
struct Fleet {
    coordinator: Option<Child>,
    workers: Vec<(String, Child)>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let children = self.coordinator.iter_mut().chain(self.workers.iter_mut().map(|(_, c)| c));
        for child in children {
            // SIGKILL ends a stopped process too.
            kill9(child);
        }
    }
}

#[test]
fn chaos_every_trial_completes_exactly_once() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("chaos.yaml");
    std::fs::write(&sweep, noop_sweep("chaos", TRIALS, SLEEP_MS, MAX_ATTEMPTS)).unwrap();
    let db = dir.path().join("chaos.redb");
    let port = free_port();
    let flags = ["--local-workers", "0", "--lease-ttl", "1s"];
    let start_coordinator = || spawn_coordinator(dir.path(), &sweep, &db, port, &flags);
    let mut fleet = Fleet::default();
    fleet.coordinator = Some(start_coordinator());
    for i in 0..WORKERS {
        let name = format!("w{i}");
        fleet.workers.push((name.clone(), spawn_worker(dir.path(), port, &name)));
    }
    // How often each worker (by name, so by log file) was frozen past its lease.
    let mut frozen: BTreeMap<String, usize> = BTreeMap::new();
    let mut completed_before = 0;

    for round in 0..ROUNDS {
        // Some progress since the last round (and since the restart): the workers are back.
        completed_before = wait_until(Duration::from_secs(60), "progress", || {
            let done = count(&report_rpc(port)?, TrialStatus::Completed);
            (done >= completed_before + 10).then_some(done)
        });
        assert!(
            completed_before < TRIALS * 3 / 4,
            "the sweep outran the chaos: {completed_before}"
        );

        // A worker dies without a word; a new one (another name, its own log) takes its place.
        let victim = round % WORKERS;
        kill9(&mut fleet.workers[victim].1);
        let name = format!("w{victim}-{}", round + 1);
        fleet.workers[victim] = (name.clone(), spawn_worker(dir.path(), port, &name));

        // Another worker stalls past its lease's TTL. It must hold a lease while frozen, as
        // the coordinator sees it once requests it had in flight are answered; otherwise it is
        // resumed and another is tried.
        let (i, name) =
            wait_until(Duration::from_secs(30), "a frozen worker holding a lease", || {
                let r = report_rpc(port)?;
                let (i, name) =
                    r.trials.iter().filter(|t| t.status == TrialStatus::Running).find_map(|t| {
                        let holder = t.worker.as_deref()?;
                        let i = fleet.workers.iter().position(|(n, _)| n == holder)?;
                        (i != victim).then(|| (i, holder.to_string()))
                    })?;
                sigstop(&fleet.workers[i].1);
                std::thread::sleep(Duration::from_millis(200));
                if report_rpc(port).is_some_and(|r| holds_lease(&r, &name)) {
                    return Some((i, name));
                }
                sigcont(&fleet.workers[i].1);
                None
            });
        let refused_before = log_of(dir.path(), &name).matches(REFUSED).count();
        wait_until(Duration::from_secs(30), "the frozen worker's lease to expire", || {
            (!holds_lease(&report_rpc(port)?, &name)).then_some(())
        });
        sigcont(&fleet.workers[i].1);
        *frozen.entry(name.clone()).or_default() += 1;
        // Back, it delivers a result for a trial that is no longer its own (before the
        // coordinator goes down, or the restarted one would refuse it as well).
        wait_until(Duration::from_secs(30), "the frozen worker's stale result refused", || {
            (log_of(dir.path(), &name).matches(REFUSED).count() > refused_before).then_some(())
        });

        // The coordinator dies mid-sweep and comes back on the same file and address.
        kill9(fleet.coordinator.as_mut().unwrap());
        fleet.coordinator = Some(start_coordinator());
        wait_until(Duration::from_secs(60), "the restarted coordinator", || report_rpc(port));
    }

    let status =
        wait_exit(fleet.coordinator.as_mut().unwrap(), Duration::from_secs(120), "coordinator");
    assert!(status.success(), "coordinator failed: {status}");
    for (name, worker) in &mut fleet.workers {
        let status = wait_exit(worker, Duration::from_secs(30), name);
        assert!(status.success(), "worker {name}: {status}");
    }

    let trials = stored_trials(&db);
    let indexes: BTreeSet<u64> = trials.iter().map(|t| t.index).collect();
    assert_eq!(trials.len(), TRIALS, "one record per trial");
    assert_eq!(indexes, (0..TRIALS as u64).collect(), "no trial lost or duplicated");
    for t in &trials {
        assert_eq!(t.status, TrialStatus::Completed, "{t:#?}");
        assert!(t.finished_ms.is_some() && t.metrics.contains_key("fvu"), "{t:#?}");
        // Exactly one attempt completed it: every other one ended with a recorded reason.
        assert!(t.attempt >= 1, "{t:#?}");
        assert_eq!(t.errors.len(), t.attempt as usize - 1, "{t:#?}");
    }
    let expired =
        trials.iter().flat_map(|t| &t.errors).filter(|e| e.contains("lease expired")).count();
    assert!(expired >= ROUNDS, "each frozen worker's lease expired: {expired} recorded");
    // Each frozen worker came back with a result for a trial that was no longer its own.
    for (name, times) in &frozen {
        let refused = log_of(dir.path(), name).matches(REFUSED).count();
        assert!(refused >= *times, "worker {name} frozen {times}x, {refused} results refused");
    }
    eprintln!(
        "chaos: {TRIALS} trials, {ROUNDS} rounds, {expired} expired leases, frozen {frozen:?}, \
         {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Whether the report shows a trial running under `worker`'s lease.
fn holds_lease(report: &msae_coordinator::service::ReportJson, worker: &str) -> bool {
    report
        .trials
        .iter()
        .any(|t| t.status == TrialStatus::Running && t.worker.as_deref() == Some(worker))
}

fn log_of(dir: &Path, worker: &str) -> String {
    std::fs::read_to_string(dir.join(format!("worker-{worker}.log"))).unwrap_or_default()
}
