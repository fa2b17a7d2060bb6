//! Tests of the scheduler: the state machine with a hand-driven clock, then the actor with a
//! real store (every await under a timeout).

use super::core::{Core, LeaseDecision};
use super::*;
use crate::model::TrialStatus;
use crate::search::{Point, Proposal};
use msae_shared::class_stats::ClassStats;
use std::sync::Mutex;

/// A strategy over a fixed list of points; records what it observes. With `one_at_a_time` it
/// waits for each result before proposing the next point (like a model-based method).
/// What a test strategy observed: (index, oriented value).
pub(crate) type Observed = Arc<Mutex<Vec<(u64, Option<f64>)>>>;

pub(crate) struct ListStrategy {
    points: Vec<Params>,
    next: usize,
    one_at_a_time: bool,
    pub(crate) observed: Observed,
}

impl ListStrategy {
    pub(crate) fn new(n: usize) -> ListStrategy {
        ListStrategy {
            points: (0..n)
                .map(|i| Params::from([("x".to_string(), serde_json::json!(i as f64 * 0.1))]))
                .collect(),
            next: 0,
            one_at_a_time: false,
            observed: Arc::default(),
        }
    }
}

impl Strategy for ListStrategy {
    fn propose(&mut self) -> Proposal {
        if self.next >= self.points.len() {
            return Proposal::Done;
        }
        if self.one_at_a_time && self.observed.lock().unwrap().len() < self.next {
            return Proposal::Wait;
        }
        let p = Point { index: self.next as u64, params: self.points[self.next].clone() };
        self.next += 1;
        Proposal::Point(p)
    }
    fn observe(&mut self, index: u64, value: Option<f64>) {
        self.observed.lock().unwrap().push((index, value));
    }
}

pub(crate) fn make_config() -> MakeConfig {
    Box::new(|p: &Params| {
        if p.get("x").and_then(|v| v.as_f64()).is_some_and(|x| x < 0.0) {
            return Err("x must be >= 0".into());
        }
        Ok(serde_json::json!({ "params": p }))
    })
}

pub(crate) fn policy() -> SchedulerPolicy {
    SchedulerPolicy {
        max_attempts: 2,
        lease_ttl: Duration::from_millis(1000),
        metric: "loss".into(),
        runner: RunnerKind::Noop,
        ..SchedulerPolicy::default()
    }
}

fn core(n: usize, policy: SchedulerPolicy) -> (Core, Observed) {
    let s = ListStrategy::new(n);
    let observed = s.observed.clone();
    let sweep = SweepRecord {
        name: "t".into(),
        yaml: String::new(),
        fingerprint: "f".into(),
        created_ms: 0,
        proposed: 0,
        finished: false,
        uid: None,
    };
    (Core::new(sweep, policy, Box::new(s), make_config()), observed)
}

fn grant(c: &mut Core, worker: &str, now: u64) -> LeaseGrant {
    c.fill_queue(1, now);
    match c.try_lease(worker, now).unwrap() {
        LeaseDecision::Granted(g) => g,
        other => panic!("expected a lease, got {other:?}"),
    }
}

fn success(loss: f64) -> TrialOutcome {
    TrialOutcome {
        success: true,
        metrics: BTreeMap::from([("loss".to_string(), loss)]),
        duration_s: Some(0.5),
        ..TrialOutcome::default()
    }
}

fn failure(msg: &str) -> TrialOutcome {
    TrialOutcome { success: false, error: msg.into(), ..TrialOutcome::default() }
}

fn sample(step: u64, scalars: BTreeMap<String, f64>) -> ProgressReport {
    ProgressReport { step, scalars, evaluations: Vec::new() }
}

#[test]
fn progress_values_never_become_final_metrics() {
    // Regression: progress scalars and final metrics shared one map, so a progress fvu of 1e-6
    // outranked every real result when the completion lacked (or had a NaN) fvu.
    let mut p = policy();
    p.metric = "fvu".into();
    let (mut c, observed) = core(3, p);
    let w = c.register("a", "cpu", V).unwrap();
    let g = grant(&mut c, &w, 0);
    c.progress(&g.lease_id, sample(5, BTreeMap::from([("fvu".into(), 1e-6)])), 10);
    let lacking = TrialOutcome {
        success: true,
        metrics: BTreeMap::from([("mse".to_string(), 0.2)]),
        dropped: vec!["non-finite fvu = NaN".into()],
        ..TrialOutcome::default()
    };
    assert!(c.complete(&g.lease_id, lacking, 20).accepted);
    let t = &c.trials()[0];
    assert_eq!(t.metrics, BTreeMap::from([("mse".to_string(), 0.2)]));
    assert!(
        t.errors.iter().any(|e| e.contains("without the sweep metric fvu (absent or not finite)"))
    );
    assert_eq!(c.counts().best, None, "a trial without the metric is never the best");
    // Attempt 1 reports a tiny fvu and loses its lease; attempt 2 completes without fvu.
    let g = grant(&mut c, &w, 100);
    c.progress(&g.lease_id, sample(5, BTreeMap::from([("fvu".into(), 1e-9)])), 110);
    c.expire(2000);
    let g2 = grant(&mut c, &w, 2001);
    assert_eq!((g2.index, g2.attempt), (1, 2));
    assert!(c.trials()[1].progress.is_empty(), "a new attempt starts without progress");
    let mse_only = TrialOutcome {
        success: true,
        metrics: BTreeMap::from([("mse".to_string(), 0.2)]),
        ..TrialOutcome::default()
    };
    assert!(c.complete(&g2.lease_id, mse_only, 2010).accepted);
    assert!(!c.trials()[1].metrics.contains_key("fvu"));
    assert_eq!(c.counts().best, None);
    // A real result is the best; the strategy saw no value for the two without one.
    let g = grant(&mut c, &w, 3000);
    let real = TrialOutcome {
        success: true,
        metrics: BTreeMap::from([("fvu".to_string(), 0.3)]),
        ..TrialOutcome::default()
    };
    assert!(c.complete(&g.lease_id, real, 3010).accepted);
    assert_eq!(c.counts().best, Some(Best { index: 2, value: 0.3 }));
    assert_eq!(*observed.lock().unwrap(), vec![(0, None), (1, None), (2, Some(0.3))]);
}

#[test]
fn evaluations_are_events_at_their_steps_and_final_metrics_at_the_final_step() {
    let (mut c, _) = core(1, policy());
    let w = c.register("a", "cpu", V).unwrap();
    let g = grant(&mut c, &w, 0);
    c.take_events();
    let classes = |n: u64| {
        let stats = ClassStats::new(1, 1, vec![n], vec![n], None, vec![0.5]).unwrap();
        Some(Arc::new(stats))
    };
    let eval = |step, v: f64| Evaluation {
        step,
        scalars: BTreeMap::from([("val_loss".into(), v)]),
        classes: classes(step),
    };
    let report = ProgressReport {
        step: 430,
        scalars: BTreeMap::from([("train_loss".into(), 0.5)]),
        evaluations: vec![eval(200, 0.9), eval(400, 0.7)],
    };
    c.progress(&g.lease_id, report, 10);
    let steps: Vec<(u64, bool, Option<Arc<ClassStats>>)> = c
        .take_events()
        .into_iter()
        .filter_map(|e| match e {
            SchedulerEvent::TrialProgress { step, evaluation, classes, .. } => {
                Some((step, evaluation, classes))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        steps,
        vec![(200, true, classes(200)), (400, true, classes(400)), (430, false, None)],
        "each evaluation's per-class statistics ride on its event"
    );
    assert_eq!(c.trials()[0].progress["val_loss"], 0.7, "the latest evaluation");
    let done = TrialOutcome { final_step: 600, classes: classes(600), ..success(0.1) };
    assert!(c.complete(&g.lease_id, done, 20).accepted);
    assert_eq!(c.trials()[0].step, 600);
    let finished = c.take_events();
    assert!(matches!(&finished[..], [SchedulerEvent::TrialFinished { record, classes: Some(c) }]
        if record.step == 600 && c.class_samples() == [600]));
}

/// A progress report of the `loss` evaluations `(step, value)`.
fn evaluations(points: &[(u64, f64)]) -> ProgressReport {
    ProgressReport {
        step: points.last().map_or(0, |p| p.0),
        scalars: BTreeMap::new(),
        evaluations: points
            .iter()
            .map(|&(step, v)| Evaluation {
                step,
                scalars: BTreeMap::from([("loss".into(), v)]),
                classes: None,
            })
            .collect(),
    }
}

fn pruned_outcome(loss: f64, step: u64) -> TrialOutcome {
    TrialOutcome { pruned: true, final_step: step, ..success(loss) }
}

fn asha() -> SchedulerPolicy {
    let rule = EarlyTerminate::Asha { min_steps: 100, reduction_factor: 2, max_steps: None };
    SchedulerPolicy { early_terminate: Some(rule), ..policy() }
}

#[test]
fn a_pruned_trial_is_told_in_its_progress_reply_and_ends_pruned_with_its_last_metrics() {
    let (mut c, observed) = core(3, asha());
    let w = c.register("a", "cpu", V).unwrap();
    // Trial 0 sets the bar at rung 100 (0.5) and completes.
    let g0 = grant(&mut c, &w, 0);
    let ack = c.progress(&g0.lease_id, evaluations(&[(100, 0.5), (200, 0.4)]), 1);
    assert_eq!(ack, ProgressAck::default());
    assert!(c.complete(&g0.lease_id, success(0.3), 2).accepted);
    assert_eq!(c.trials()[0].curve, [(100, 0.5), (200, 0.4)]);
    // Trial 1 reaches rung 100 worse: keep max(1, 2 / 2) = 1 of [0.5, 0.9].
    let g1 = grant(&mut c, &w, 3);
    let ack = c.progress(&g1.lease_id, evaluations(&[(100, 0.9)]), 4);
    assert!(ack.stop && ack.prune && !ack.release, "{ack:?}");
    assert!(
        ack.reason.starts_with("pruned by early termination (asha: 0.9 at rung 100"),
        "{ack:?}"
    );
    assert_eq!(c.trials()[1].status, TrialStatus::Running, "running until the worker reports");
    // A report that crossed the reply hears it again.
    let again = c.progress(&g1.lease_id, evaluations(&[(150, 0.85)]), 5);
    assert_eq!(again, ack);
    c.take_events();
    assert!(c.complete(&g1.lease_id, pruned_outcome(0.85, 150), 6).accepted);
    let t = &c.trials()[1];
    assert_eq!(t.status, TrialStatus::Pruned);
    assert_eq!((t.metrics["loss"], t.step, t.lease.is_none()), (0.85, 150, true));
    assert!(
        t.errors
            .iter()
            .any(|e| e.starts_with("attempt 1: pruned at step 150 by early termination (asha:")),
        "{:?}",
        t.errors
    );
    let finished = c.take_events();
    assert!(matches!(&finished[..], [SchedulerEvent::TrialFinished { record, .. }]
        if record.status == TrialStatus::Pruned));
    let counts = c.counts();
    assert_eq!((counts.completed, counts.pruned, counts.failed, counts.running), (1, 1, 0, 0));
    assert_eq!(counts.best, Some(Best { index: 0, value: 0.3 }), "a pruned trial is never best");
    assert_eq!(observed.lock().unwrap()[1], (1, Some(0.85)), "the search hears its last metric");
    // Trial 2 is the best of [0.45, 0.5, 0.9] at rung 100 and runs to its end.
    let g2 = grant(&mut c, &w, 7);
    assert_eq!(c.progress(&g2.lease_id, evaluations(&[(100, 0.45)]), 8), ProgressAck::default());
    assert!(c.complete(&g2.lease_id, success(0.2), 9).accepted);
    // Pruned is final: nothing requeued, and the sweep is finished.
    c.fill_queue(1, 10);
    assert_eq!(c.queued(), 0);
    assert!(c.check_finished());
    assert_eq!((c.counts().completed, c.counts().pruned, c.counts().total), (2, 1, 3));
}

#[test]
fn a_told_trial_that_finished_anyway_is_completed_and_a_resumed_sweep_judges_on_stored_curves() {
    let (mut c, _) = core(3, asha());
    let w = c.register("a", "cpu", V).unwrap();
    let g0 = grant(&mut c, &w, 0);
    c.progress(&g0.lease_id, evaluations(&[(100, 0.5)]), 1);
    assert!(c.complete(&g0.lease_id, success(0.3), 2).accepted);
    // Told to stop, but its worker had finished: it reports a full result, not a pruned one.
    let g1 = grant(&mut c, &w, 3);
    assert!(c.progress(&g1.lease_id, evaluations(&[(100, 0.9)]), 4).prune);
    assert!(c.complete(&g1.lease_id, success(0.6), 5).accepted);
    assert_eq!(c.trials()[1].status, TrialStatus::Completed);
    assert!(c.trials()[1].errors.is_empty());
    // Restart: trial 2, never run, is judged against the stored curves of 0 and 1.
    let stored = c.trials().to_vec();
    let sweep = c.sweep().clone();
    let strategy = Box::new(ListStrategy::new(3));
    let mut b = Core::resume(sweep, stored, asha(), strategy, make_config(), 10).unwrap();
    b.restore_pruning_history();
    let w = b.register("a", "cpu", V).unwrap();
    let g2 = grant(&mut b, &w, 11);
    assert_eq!(g2.index, 2);
    // [0.5, 0.7, 0.9] at rung 100, keep 1: 0.7 is out. Alone (no history) it would go on.
    let ack = b.progress(&g2.lease_id, evaluations(&[(100, 0.7)]), 12);
    assert!(ack.stop && ack.prune, "{ack:?}");
    assert!(b.complete(&g2.lease_id, pruned_outcome(0.7, 100), 13).accepted);
    let counts = b.counts();
    assert_eq!((counts.completed, counts.pruned), (2, 1));
    // ... and a resumed sweep counts its pruned trials.
    let strategy = Box::new(ListStrategy::new(3));
    let again =
        Core::resume(b.sweep().clone(), b.trials().to_vec(), asha(), strategy, make_config(), 20);
    let again = again.unwrap();
    assert_eq!((again.counts().completed, again.counts().pruned), (2, 1));
    assert_eq!(again.queued(), 0, "a pruned trial is not run again");
}

#[test]
fn without_early_terminate_nothing_is_pruned_but_curves_are_kept() {
    let (mut c, _) = core(2, policy());
    let w = c.register("a", "cpu", V).unwrap();
    let g0 = grant(&mut c, &w, 0);
    c.progress(&g0.lease_id, evaluations(&[(100, 0.1)]), 1);
    assert!(c.complete(&g0.lease_id, success(0.1), 2).accepted);
    let g1 = grant(&mut c, &w, 3);
    let ack = c.progress(&g1.lease_id, evaluations(&[(100, 9.0), (200, f64::NAN)]), 4);
    assert_eq!(ack, ProgressAck::default());
    assert_eq!(c.trials()[1].curve, [(100, 9.0)], "non-finite values are no point of a curve");
}

#[test]
fn a_permanent_failure_is_not_retried() {
    let mut p = policy();
    p.max_attempts = 3;
    let (mut c, observed) = core(2, p);
    let w = c.register("a", "cpu", V).unwrap();
    let g = grant(&mut c, &w, 0);
    let missing =
        TrialOutcome { permanent: true, ..failure("loading data: x.npy: file not found") };
    assert!(c.complete(&g.lease_id, missing, 10).accepted);
    let t = &c.trials()[0];
    assert_eq!((t.status, t.attempt), (TrialStatus::Failed, 1));
    assert_eq!(t.errors, vec!["attempt 1/3 (not retryable): loading data: x.npy: file not found"]);
    assert_eq!(*observed.lock().unwrap(), vec![(0, None)]);
    // A retryable failure still is.
    let g = grant(&mut c, &w, 20);
    assert!(c.complete(&g.lease_id, failure("CUDA out of memory"), 30).accepted);
    assert_eq!(c.trials()[1].status, TrialStatus::Queued);
}

const V: u32 = msae_shared::PROTOCOL_VERSION;

#[test]
fn lease_complete_then_second_complete_refused() {
    let (mut c, observed) = core(2, policy());
    let w = c.register("a", "cpu", V).unwrap();
    let g = grant(&mut c, &w, 1000);
    assert_eq!((g.index, g.attempt, g.trial_id.as_str()), (0, 1, "t/0"));
    assert_eq!(g.config_json, r#"{"params":{"x":0.0}}"#);
    assert_eq!(g.runner, RunnerKind::Noop);
    let ack = c.complete(&g.lease_id, success(0.25), 1500);
    assert!(ack.accepted, "{ack:?}");
    let again = c.complete(&g.lease_id, success(0.1), 1600);
    assert!(!again.accepted);
    assert!(again.reason.contains("not current"), "{}", again.reason);
    let t = &c.trials()[0];
    assert_eq!(t.status, TrialStatus::Completed);
    assert_eq!(t.metrics["loss"], 0.25, "the refused result must not change the trial");
    assert_eq!(*observed.lock().unwrap(), vec![(0, Some(0.25))]);
    assert_eq!(c.counts().completed, 1);
    assert_eq!(c.counts().best, Some(Best { index: 0, value: 0.25 }));
    // The batch holds the sweep (proposed) and the trial once.
    let batch = c.take_batch(false);
    assert_eq!(batch.len(), 2);
    assert!(c.take_batch(true).is_empty());
}

#[test]
fn expired_lease_is_refused_and_trial_re_leased_with_next_attempt() {
    let (mut c, _) = core(1, policy());
    let a = c.register("a", "cpu", V).unwrap();
    let b = c.register("b", "cpu", V).unwrap();
    let g1 = grant(&mut c, &a, 0);
    c.expire(500);
    assert_eq!(c.running(), 1, "not expired before the deadline");
    c.expire(1001);
    assert_eq!((c.running(), c.queued()), (0, 1));
    assert!(c.trials()[0].errors[0].contains("lease expired"), "{:?}", c.trials()[0].errors);
    let g2 = grant(&mut c, &b, 1002);
    assert_eq!((g2.index, g2.attempt), (0, 2));
    assert_ne!(g1.lease_id, g2.lease_id);
    assert!(!c.complete(&g1.lease_id, success(1.0), 1003).accepted);
    let p = c.progress(&g1.lease_id, sample(5, BTreeMap::new()), 1003);
    assert!(p.stop && p.reason.contains("not current"), "{p:?}");
    assert!(c.complete(&g2.lease_id, success(2.0), 1004).accepted);
    assert_eq!(c.trials()[0].metrics["loss"], 2.0);
    assert_eq!(c.counts().completed, 1);
}

#[test]
fn progress_renews_the_lease_and_stores_scalars() {
    let (mut c, _) = core(1, policy());
    let w = c.register("a", "cpu", V).unwrap();
    let g = grant(&mut c, &w, 0);
    let ack = c.progress(&g.lease_id, sample(10, BTreeMap::from([("mse".into(), 0.5)])), 900);
    assert!(!ack.stop);
    c.expire(1500);
    assert_eq!(c.running(), 1, "renewed at 900, so alive until 1900");
    assert_eq!(c.trials()[0].step, 10);
    assert_eq!(c.trials()[0].progress["mse"], 0.5);
    assert!(c.trials()[0].metrics.is_empty(), "progress is not a result");
    // Progress is committed lazily: not in an ordinary batch, but in a flush.
    c.take_batch(false);
    c.progress(&g.lease_id, sample(11, BTreeMap::new()), 1000);
    assert!(c.take_batch(false).is_empty());
    assert_eq!(c.take_batch(true).len(), 1);
    // Renewed again at 1000: alive until 2000.
    c.expire(1999);
    assert_eq!(c.running(), 1);
    c.expire(2001);
    assert_eq!(c.running(), 0);
}

#[test]
fn failures_retry_then_fail_with_the_reasons() {
    let (mut c, observed) = core(1, policy());
    let w = c.register("a", "cpu", V).unwrap();
    let g = grant(&mut c, &w, 0);
    assert!(c.complete(&g.lease_id, failure("CUDA out of memory"), 10).accepted);
    assert_eq!(c.trials()[0].status, TrialStatus::Queued);
    let g = grant(&mut c, &w, 20);
    assert_eq!(g.attempt, 2);
    assert!(c.complete(&g.lease_id, failure("NaN loss"), 30).accepted);
    let t = &c.trials()[0];
    assert_eq!(t.status, TrialStatus::Failed);
    assert_eq!(t.errors, vec!["attempt 1/2: CUDA out of memory", "attempt 2/2: NaN loss"]);
    assert_eq!(*observed.lock().unwrap(), vec![(0, None)]);
    assert_eq!((c.counts().failed, c.queued()), (1, 0));
    c.fill_queue(1, 40);
    assert!(c.is_finished());
    assert!(c.check_finished());
    assert_eq!(c.try_lease(&w, 50).unwrap(), LeaseDecision::Shutdown);
}

#[test]
fn release_requeues_first_without_counting_an_attempt() {
    let (mut c, _) = core(3, policy());
    let w = c.register("a", "cpu", V).unwrap();
    let g = grant(&mut c, &w, 0);
    c.fill_queue(3, 0);
    assert!(c.release(&g.lease_id, "SIGTERM"));
    assert!(!c.release(&g.lease_id, "twice"));
    assert_eq!(c.trials()[0].attempt, 0);
    let again = grant(&mut c, &w, 1);
    assert_eq!((again.index, again.attempt), (0, 1), "released trial goes first");
    assert!(c.trials()[0].errors.is_empty());
}

#[test]
fn timeout_stops_the_worker_and_counts_as_a_failure() {
    let mut p = policy();
    p.timeout = Some(Duration::from_millis(300));
    p.max_attempts = 1;
    let (mut c, _) = core(2, p);
    let w = c.register("a", "cpu", V).unwrap();
    let g = grant(&mut c, &w, 0);
    let ack = c.progress(&g.lease_id, sample(1, BTreeMap::new()), 301);
    assert!(ack.stop && ack.reason.contains("timed out"), "{ack:?}");
    assert_eq!(c.trials()[0].status, TrialStatus::Failed);
    // The tick enforces it too, without any progress.
    let g = grant(&mut c, &w, 400);
    c.expire(600);
    assert_eq!(c.trials()[1].status, TrialStatus::Running);
    c.expire(701);
    assert_eq!(c.trials()[1].status, TrialStatus::Failed);
    assert!(!c.complete(&g.lease_id, success(1.0), 702).accepted);
}

#[test]
fn maximize_orients_observations_and_tracks_the_best() {
    let mut p = policy();
    p.goal = Goal::Maximize;
    p.metric = "acc".into();
    let (mut c, observed) = core(3, p);
    let w = c.register("a", "cpu", V).unwrap();
    for acc in [0.5, 0.9, 0.7] {
        let g = grant(&mut c, &w, 0);
        let mut o = success(1.0);
        o.metrics.insert("acc".into(), acc);
        c.complete(&g.lease_id, o, 1);
    }
    assert_eq!(*observed.lock().unwrap(), vec![(0, Some(-0.5)), (1, Some(-0.9)), (2, Some(-0.7))]);
    assert_eq!(c.counts().best, Some(Best { index: 1, value: 0.9 }));
    // A completion without the metric is kept but observed as None, with a note.
    let (mut c, observed) = core(1, policy());
    let w = c.register("a", "cpu", V).unwrap();
    let g = grant(&mut c, &w, 0);
    c.complete(&g.lease_id, TrialOutcome { success: true, ..Default::default() }, 1);
    assert_eq!(*observed.lock().unwrap(), vec![(0, None)]);
    assert!(c.trials()[0].errors[0].contains("without the sweep metric loss"));
}

#[test]
fn max_concurrent_run_cap_workers_and_protocol() {
    let mut p = policy();
    p.max_concurrent = Some(1);
    p.run_cap = Some(2);
    let (mut c, _) = core(10, p);
    assert!(matches!(c.register("a", "cpu", V + 1), Err(SchedulerError::ProtocolVersion { .. })));
    assert!(matches!(c.try_lease("nobody", 0), Err(SchedulerError::UnknownWorker(_))));
    let w = c.register("a", "cpu", V).unwrap();
    let g = grant(&mut c, &w, 0);
    c.fill_queue(5, 0);
    assert_eq!(c.try_lease(&w, 0).unwrap(), LeaseDecision::Nothing, "max_concurrent = 1");
    c.complete(&g.lease_id, success(1.0), 1);
    let g = grant(&mut c, &w, 2);
    c.complete(&g.lease_id, success(1.0), 3);
    c.fill_queue(5, 4);
    assert_eq!(c.trials().len(), 2, "run_cap = 2");
    assert!(c.check_finished());
}

#[test]
fn invalid_trial_config_fails_the_trial_without_running_it() {
    let s = ListStrategy {
        points: vec![Params::from([("x".to_string(), serde_json::json!(-1.0))])],
        next: 0,
        one_at_a_time: false,
        observed: Arc::default(),
    };
    let observed = s.observed.clone();
    let sweep = SweepRecord {
        name: "t".into(),
        yaml: String::new(),
        fingerprint: "f".into(),
        created_ms: 0,
        proposed: 0,
        finished: false,
        uid: None,
    };
    let mut c = Core::new(sweep, policy(), Box::new(s), make_config());
    c.fill_queue(1, 0);
    assert_eq!(c.trials()[0].status, TrialStatus::Failed);
    assert!(c.trials()[0].errors[0].contains("x must be >= 0"));
    assert_eq!(*observed.lock().unwrap(), vec![(0, None)]);
}

#[test]
fn params_match_tolerates_json_float_round_trip_only() {
    let a = Params::from([("lr".to_string(), serde_json::json!(0.1 + 0.2))]);
    let b = Params::from([("lr".to_string(), serde_json::json!(0.30000000000000004))]);
    assert!(params_match(&a, &b));
    let c = Params::from([("lr".to_string(), serde_json::json!(0.3001))]);
    assert!(!params_match(&a, &c));
    let d = Params::from([("k".to_string(), serde_json::json!(3))]);
    let e = Params::from([("k".to_string(), serde_json::json!(4))]);
    assert!(!params_match(&d, &e));
    assert!(!params_match(&a, &Params::new()));
}

// ---- the actor, with a real store ----

/// Leases long enough that a loaded machine never expires one by accident.
pub(crate) fn actor_policy() -> SchedulerPolicy {
    SchedulerPolicy { lease_ttl: Duration::from_secs(10), ..policy() }
}

const T: Duration = Duration::from_secs(10);

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(T, f).await.expect("timed out")
}

fn input(fp: &str) -> SweepInput {
    SweepInput {
        name: "s".into(),
        yaml: "name: s".into(),
        fingerprint: fp.into(),
        new_sweep: false,
    }
}

async fn start_list(
    path: &std::path::Path,
    n: usize,
    policy: SchedulerPolicy,
    fp: &str,
) -> Result<(SchedulerHandle, Observed)> {
    let s = ListStrategy::new(n);
    let observed = s.observed.clone();
    let store = Store::open(path)?;
    let h = within(Scheduler::start(store, input(fp), policy, Box::new(s), make_config())).await?;
    Ok((h, observed))
}

#[tokio::test]
async fn resume_after_restart_keeps_finished_and_honours_old_leases() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.redb");
    let (old_a, old_b);
    {
        let (h, _) = start_list(&path, 4, actor_policy(), "fp").await.unwrap();
        let w = within(h.register("a", "cpu", V)).await.unwrap();
        let g0 = within(h.lease(&w, Duration::ZERO)).await.unwrap().lease.unwrap();
        let g1 = within(h.lease(&w, Duration::ZERO)).await.unwrap().lease.unwrap();
        let g2 = within(h.lease(&w, Duration::ZERO)).await.unwrap().lease.unwrap();
        assert!(within(h.complete(&g0.lease_id, success(0.5))).await.unwrap().accepted);
        (old_a, old_b) = (g1, g2);
        within(h.shutdown(Duration::ZERO)).await.unwrap();
        // The store is closed once the actor and every handle are gone.
        drop(h);
    }
    // Wait until the file lock is released by the stopped actor.
    let store = within(async {
        loop {
            match Store::open(&path) {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await;
    drop(store);
    let mut p = actor_policy();
    p.lease_ttl = Duration::from_millis(1000);
    let (h, observed) = start_list(&path, 4, p, "fp").await.unwrap();
    assert_eq!(*observed.lock().unwrap(), vec![(0, Some(0.5))], "replay observed the result");
    let counts = h.counts().borrow().clone();
    assert_eq!((counts.completed, counts.running), (1, 2));
    // The surviving worker completes its trial with its old lease.
    assert!(within(h.complete(&old_a.lease_id, success(0.7))).await.unwrap().accepted);
    // A new worker (old ids are unknown after a restart) gets trial 3, then trial 2 once the
    // old lease of trial 2 expires, with the next attempt; nothing completed runs again.
    let w2 = within(h.register("b", "cpu", V)).await.unwrap();
    let g3 = within(h.lease(&w2, Duration::from_secs(5))).await.unwrap().lease.unwrap();
    assert_eq!(g3.index, 3);
    assert!(within(h.complete(&g3.lease_id, success(0.3))).await.unwrap().accepted);
    let g2 = within(h.lease(&w2, Duration::from_secs(5))).await.unwrap().lease.unwrap();
    assert_eq!((g2.index, g2.attempt), (2, 2));
    assert!(!within(h.complete(&old_b.lease_id, success(9.0))).await.unwrap().accepted);
    assert!(within(h.complete(&g2.lease_id, success(0.1))).await.unwrap().accepted);
    let done = within(h.finished()).await.unwrap();
    assert_eq!((done.completed, done.failed), (4, 0));
    assert_eq!(done.best, Some(Best { index: 2, value: 0.1 }));
    let out = within(h.lease(&w2, Duration::from_secs(5))).await.unwrap();
    assert!(out.shutdown && out.lease.is_none());
    let records = within(h.records("s")).await.unwrap();
    assert_eq!(records.len(), 4);
    assert!(records.iter().all(|r| r.status == TrialStatus::Completed));
    assert_eq!(records[1].metrics["loss"], 0.7);
    assert!(within(h.sweeps()).await.unwrap()[0].finished);
}

/// Opens `path` once the previous owner (a stopped actor) has let go of it.
async fn reopen(path: &std::path::Path) -> Store {
    within(async {
        loop {
            match Store::open(path) {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await
}

/// Same-named sweeps of two databases get different ids, so their TensorBoard runs never mix;
/// a reopened database resumes its sweep under the id it had.
#[tokio::test]
async fn a_sweep_keeps_its_own_id_across_databases_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one.redb"), dir.path().join("two.redb"));
    let (a, _) = start_list(&one, 2, actor_policy(), "fp").await.unwrap();
    let (b, _) = start_list(&two, 2, actor_policy(), "fp").await.unwrap();
    assert_eq!(a.sweep_name(), b.sweep_name());
    assert_ne!(a.sweep_id(), b.sweep_id());
    let id = a.sweep_id().to_string();
    let root = dir.path().join("runs");
    let logger = |h: &SchedulerHandle| {
        crate::tensorboard::TensorBoardLogger::new(&root, h.sweep_name(), h.sweep_id())
    };
    let (dir_a, dir_b) =
        (logger(&a).sweep_dir().to_path_buf(), logger(&b).sweep_dir().to_path_buf());
    assert_ne!(dir_a, dir_b);
    assert_eq!(within(a.sweeps()).await.unwrap()[0].uid.as_deref(), Some(id.as_str()));
    within(a.shutdown(Duration::ZERO)).await.unwrap();
    drop(a);
    let store = reopen(&one).await;
    drop(store);
    let (again, _) = start_list(&one, 2, actor_policy(), "fp").await.unwrap();
    assert_eq!(again.sweep_id(), id, "resumed under its own id");
    assert_eq!(logger(&again).sweep_dir(), dir_a);
}

#[tokio::test]
async fn changed_definition_is_refused_unless_a_new_sweep_is_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.redb");
    let (h, _) = start_list(&path, 2, actor_policy(), "one").await.unwrap();
    within(h.shutdown(Duration::ZERO)).await.unwrap();
    drop(h);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = start_list(&path, 2, actor_policy(), "two").await.err().expect("must be refused");
    let msg = err.to_string();
    assert!(msg.contains("sweep s exists in DB with a different definition"), "{msg}");
    assert!(msg.contains("--new-sweep"), "{msg}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let store = Store::open(&path).unwrap();
    let mut i = input("two");
    i.new_sweep = true;
    let h = within(Scheduler::start(
        store,
        i,
        actor_policy(),
        Box::new(ListStrategy::new(2)),
        make_config(),
    ))
    .await
    .unwrap();
    assert_eq!(h.sweep_name(), "s-2");
    let names: Vec<_> = within(h.sweeps()).await.unwrap().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["s", "s-2"]);
}

#[tokio::test]
async fn changed_search_under_the_same_fingerprint_is_a_replay_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.redb");
    let (h, _) = start_list(&path, 3, actor_policy(), "fp").await.unwrap();
    let w = within(h.register("a", "cpu", V)).await.unwrap();
    within(h.lease(&w, Duration::ZERO)).await.unwrap().lease.unwrap();
    within(h.shutdown(Duration::ZERO)).await.unwrap();
    drop(h);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut s = ListStrategy::new(3);
    s.points[0].insert("x".into(), serde_json::json!(42));
    let store = Store::open(&path).unwrap();
    let err =
        within(Scheduler::start(store, input("fp"), actor_policy(), Box::new(s), make_config()))
            .await
            .err()
            .expect("must fail");
    assert!(matches!(err, SchedulerError::ReplayMismatch { index: 0, .. }), "{err}");
}

#[tokio::test]
async fn long_poll_wakes_when_a_trial_appears_and_times_out_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("l.redb")).unwrap();
    let mut s = ListStrategy::new(2);
    s.one_at_a_time = true;
    let h = Scheduler::start(store, input("fp"), actor_policy(), Box::new(s), make_config())
        .await
        .unwrap();
    let a = within(h.register("a", "cpu", V)).await.unwrap();
    let b = within(h.register("b", "cpu", V)).await.unwrap();
    let g0 = within(h.lease(&a, Duration::ZERO)).await.unwrap().lease.unwrap();
    // Nothing to lease while trial 0 runs: a short wait comes back empty.
    let t = std::time::Instant::now();
    let none = within(h.lease(&b, Duration::from_millis(200))).await.unwrap();
    assert!(none.lease.is_none() && !none.shutdown);
    assert!(t.elapsed() >= Duration::from_millis(190), "{:?}", t.elapsed());
    // A long wait is woken as soon as the result lets the strategy propose trial 1.
    let waiter = {
        let h = h.clone();
        let b = b.clone();
        tokio::spawn(async move { h.lease(&b, Duration::from_secs(30)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = std::time::Instant::now();
    assert!(within(h.complete(&g0.lease_id, success(1.0))).await.unwrap().accepted);
    let got = within(waiter).await.unwrap().unwrap().lease.expect("woken with a lease");
    assert_eq!(got.index, 1);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[tokio::test]
async fn shutdown_stops_dispatching_but_accepts_results() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.redb");
    let (h, _) = start_list(&path, 5, actor_policy(), "fp").await.unwrap();
    let a = within(h.register("a", "cpu", V)).await.unwrap();
    let g = within(h.lease(&a, Duration::ZERO)).await.unwrap().lease.unwrap();
    let parked = {
        let (h, a) = (h.clone(), a.clone());
        tokio::spawn(async move { h.lease(&a, Duration::from_secs(30)).await })
    };
    // Trial 1 is queued, so the parked request is served; lease everything but one first.
    let _ = within(parked).await.unwrap().unwrap();
    let stopper = {
        let h = h.clone();
        tokio::spawn(async move { h.shutdown(Duration::from_secs(5)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Not finished: no lease, but no dismissal either (workers wait for a restart).
    let out = within(h.lease(&a, Duration::ZERO)).await.unwrap();
    assert!(!out.shutdown && out.lease.is_none(), "{out:?}");
    let p = within(h.progress(&g.lease_id, sample(1, BTreeMap::new()))).await.unwrap();
    assert!(p.stop && p.release && p.reason.contains("shutting down"), "{p:?}");
    assert!(within(h.complete(&g.lease_id, success(0.5))).await.unwrap().accepted);
    let counts = h.counts().borrow().clone();
    assert_eq!(counts.running, 1);
    // Releasing the last running trial lets the shutdown finish before its grace.
    let running = within(h.records("s")).await.unwrap();
    let lease = running.iter().find_map(|r| r.lease.clone()).expect("one trial still running");
    assert!(within(h.release(&lease.lease_id, "bye")).await.unwrap());
    within(stopper).await.unwrap().unwrap();
    assert!(matches!(h.lease(&a, Duration::ZERO).await, Err(SchedulerError::Stopped)));
    assert!(matches!(within(h.finished()).await, Err(SchedulerError::Stopped)));
    drop(h);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let store = Store::open(&path).unwrap();
    let trials = store.trials("s").unwrap();
    assert_eq!(trials[0].status, TrialStatus::Completed);
    assert_eq!(trials[1].status, TrialStatus::Queued);
    assert_eq!(trials[1].attempt, 0);
}

fn next(worker: &str, wait: Duration) -> Option<NextLease> {
    Some(NextLease { worker_id: worker.to_string(), wait })
}

#[tokio::test]
async fn completion_with_next_lease_is_one_command_and_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("n.redb");
    let (h, observed) = start_list(&path, 4, actor_policy(), "fp").await.unwrap();
    let w = within(h.register("a", "cpu", V)).await.unwrap();
    let g0 = within(h.lease(&w, Duration::ZERO)).await.unwrap().lease.unwrap();

    // The result of trial 0 and the lease of trial 1: one reply, one commit.
    let before = h.commits();
    let out = within(h.complete_then_lease(&g0.lease_id, success(0.5), next(&w, Duration::ZERO)))
        .await
        .unwrap();
    assert!(out.ack.accepted, "{:?}", out.ack);
    let g1 = out.next.lease.expect("the next trial comes with the acknowledgement");
    assert_eq!((g1.index, g1.attempt), (1, 1));
    assert!(!out.next.shutdown);
    assert_eq!(h.commits(), before + 1, "completion and lease share one commit");
    // Both changes are durable once the reply is out.
    let records = within(h.records("s")).await.unwrap();
    assert_eq!(records[0].status, TrialStatus::Completed);
    assert_eq!(records[1].status, TrialStatus::Running);

    // Exactly once: the same result again is refused and changes nothing, yet the worker
    // still gets its next lease.
    let dup = within(h.complete_then_lease(&g0.lease_id, success(9.0), next(&w, Duration::ZERO)))
        .await
        .unwrap();
    assert!(!dup.ack.accepted);
    assert!(dup.ack.reason.contains("not current"), "{}", dup.ack.reason);
    let g2 = dup.next.lease.expect("a refused result may still get a lease");
    assert_eq!(g2.index, 2);

    // An unknown worker (the coordinator restarted): the result is taken, no lease is
    // granted, and the trial stays queued for whoever leases next.
    let ghost =
        within(h.complete_then_lease(&g1.lease_id, success(0.25), next("ghost", Duration::ZERO)))
            .await
            .unwrap();
    assert!(ghost.ack.accepted);
    assert_eq!(ghost.next, LeaseOutcome::default());
    let records = within(h.records("s")).await.unwrap();
    assert_eq!(
        (records[1].status, records[3].status),
        (TrialStatus::Completed, TrialStatus::Queued)
    );

    let out =
        within(h.complete_then_lease(&g2.lease_id, success(0.75), next(&w, T))).await.unwrap();
    let g3 = out.next.lease.unwrap();
    assert_eq!(g3.index, 3);
    // The last result finishes the sweep: its lease part says shutdown.
    let last =
        within(h.complete_then_lease(&g3.lease_id, success(1.0), next(&w, T))).await.unwrap();
    assert!(last.ack.accepted && last.next.shutdown && last.next.lease.is_none());

    let counts = within(h.finished()).await.unwrap();
    assert_eq!((counts.completed, counts.failed), (4, 0));
    assert_eq!(counts.best, Some(Best { index: 1, value: 0.25 }));
    let mut seen: Vec<u64> = observed.lock().unwrap().iter().map(|(i, _)| *i).collect();
    seen.sort_unstable();
    assert_eq!(seen, vec![0, 1, 2, 3], "each trial observed exactly once");
    let records = within(h.records("s")).await.unwrap();
    assert_eq!(records[0].metrics["loss"], 0.5, "the refused duplicate changed nothing");
    assert!(records.iter().all(|r| r.attempt == 1));
}

#[tokio::test]
async fn completion_with_next_lease_long_polls_like_a_lease() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.redb");
    let (h, _) = start_list(&path, 3, actor_policy(), "fp").await.unwrap();
    let a = within(h.register("a", "cpu", V)).await.unwrap();
    let b = within(h.register("b", "cpu", V)).await.unwrap();
    let ga = within(h.lease(&a, Duration::ZERO)).await.unwrap().lease.unwrap();
    let gb = within(h.lease(&b, Duration::ZERO)).await.unwrap().lease.unwrap();
    let gc = within(h.lease(&b, Duration::ZERO)).await.unwrap().lease.unwrap();
    assert_eq!((ga.index, gb.index, gc.index), (0, 1, 2));

    // Nothing queued: a short wait comes back after it elapses, with the result taken.
    let t = std::time::Instant::now();
    let out = within(h.complete_then_lease(
        &ga.lease_id,
        success(0.5),
        next(&a, Duration::from_millis(200)),
    ))
    .await
    .unwrap();
    assert!(out.ack.accepted);
    assert_eq!(out.next, LeaseOutcome::default());
    assert!(t.elapsed() >= Duration::from_millis(190), "{:?}", t.elapsed());
    assert_eq!(within(h.records("s")).await.unwrap()[0].status, TrialStatus::Completed);

    // A long wait parks the completion's lease part until a trial is handed back.
    let parked = {
        let (h, a, lease) = (h.clone(), a.clone(), gb.lease_id.clone());
        tokio::spawn(async move { h.complete_then_lease(&lease, success(0.1), next(&a, T)).await })
    };
    // The result is applied (and committed) while the lease part still waits: wait for the
    // count rather than sleep a fixed time, which a loaded machine's commit can outlast.
    let mut counts = h.counts();
    within(counts.wait_for(|c| c.completed == 2))
        .await
        .expect("the result is applied while the lease waits");
    assert!(!parked.is_finished(), "the lease part is still parked");
    let t = std::time::Instant::now();
    assert!(within(h.release(&gc.lease_id, "bye")).await.unwrap());
    let out = within(parked).await.unwrap().unwrap();
    assert!(out.ack.accepted);
    let g = out.next.lease.expect("woken with the released trial");
    assert_eq!((g.index, g.attempt), (2, 1));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // A shutdown answers a parked completion without a lease (and without dismissing the
    // worker: the sweep is not finished), its result still acknowledged.
    let b2 = within(h.register("b2", "cpu", V)).await.unwrap();
    let g2 = g;
    let parked = {
        let h = h.clone();
        tokio::spawn(async move {
            // Stale lease (trial 1 is done): refused, and its lease part parks.
            h.complete_then_lease(&gb.lease_id, success(0.1), next(&b2, T)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopper = {
        let h = h.clone();
        tokio::spawn(async move { h.shutdown(Duration::from_secs(5)).await })
    };
    let out = within(parked).await.unwrap().unwrap();
    assert!(!out.ack.accepted && !out.next.shutdown && out.next.lease.is_none(), "{out:?}");
    assert!(within(h.complete(&g2.lease_id, success(0.2))).await.unwrap().accepted);
    within(stopper).await.unwrap().unwrap();
}

/// Throughput of the scheduler alone (no network): lease + complete per trial with durable
/// commits. `cargo test -p msae-coordinator --lib scheduler::tests::throughput -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check"]
async fn throughput_in_process() {
    for (n, workers) in [(2000usize, 1usize), (10_000, 16), (10_000, 64)] {
        let dir = tempfile::tempdir().unwrap();
        let (h, _) = start_list(&dir.path().join("b.redb"), n, actor_policy(), "fp").await.unwrap();
        let started = std::time::Instant::now();
        let mut tasks = Vec::new();
        for i in 0..workers {
            let h = h.clone();
            tasks.push(tokio::spawn(async move {
                let w = h.register(&format!("w{i}"), "cpu", V).await.unwrap();
                let mut done = 0usize;
                loop {
                    let out = h.lease(&w, Duration::from_secs(1)).await.unwrap();
                    if out.shutdown {
                        return done;
                    }
                    let Some(g) = out.lease else { continue };
                    assert!(h.complete(&g.lease_id, success(1.0)).await.unwrap().accepted);
                    done += 1;
                }
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += within(t).await.unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(total, n);
        eprintln!(
            "in-process: {n} trials, {workers} workers: {:.0} trials/s ({:.3} ms/trial)",
            n as f64 / secs,
            secs * 1000.0 / n as f64
        );
        h.shutdown(Duration::ZERO).await.unwrap();
    }
}

/// Item 12d: the refusal of a changed definition lists what changed, and names the sweep
/// `--new-sweep` would really run (the next free NAME-k, or the one started from this YAML).
#[test]
fn changed_definition_refusal_lists_the_changes_and_the_next_free_name() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("d.redb")).unwrap();
    let sweep = |max: &str, fingerprint: &str, new_sweep: bool| SweepInput {
        name: "s".into(),
        yaml: format!(
            "name: s\nmethod: random\nrun_cap: 4\nparameters:\n  lr: {{min: 0.001, max: {max}}}\n"
        ),
        fingerprint: fingerprint.into(),
        new_sweep,
    };
    load_or_create(&store, &sweep("0.01", "a", false)).unwrap();
    let (s2, _, created) = load_or_create(&store, &sweep("0.02", "b", true)).unwrap();
    assert_eq!((s2.name.as_str(), created), ("s-2", true));

    let msg = load_or_create(&store, &sweep("0.03", "c", false)).unwrap_err().to_string();
    assert!(msg.contains("sweep s exists in DB with a different definition"), "{msg}");
    assert!(msg.contains("changed: parameters.lr.max: 0.01 -> 0.03"), "{msg}");
    assert!(msg.contains("--new-sweep (starts s-3)"), "s-2 is taken: {msg}");
    assert!(!msg.contains("s-2"), "{msg}");

    let msg = load_or_create(&store, &sweep("0.02", "b", false)).unwrap_err().to_string();
    assert!(msg.contains("--new-sweep (resumes s-2"), "{msg}");
    // With --new-sweep it does resume s-2.
    let (again, _, created) = load_or_create(&store, &sweep("0.02", "b", true)).unwrap();
    assert_eq!((again.name.as_str(), created), ("s-2", false));
}

#[test]
fn counts_describe_the_planned_sweep_not_only_the_proposed_trials() {
    // Regression: an interrupted 12-trial sweep counted only what had been proposed, and the
    // status line always showed one queued trial.
    let mut p = policy();
    p.planned = Some(5);
    let (mut c, _) = core(5, p);
    let w = c.register("a", "cpu", V).unwrap();
    let g = grant(&mut c, &w, 0);
    let k = c.counts();
    assert_eq!((k.total, k.proposed, k.running, k.queued, k.completed), (5, 1, 1, 4, 0));
    assert!(c.complete(&g.lease_id, success(0.5), 10).accepted);
    let g = grant(&mut c, &w, 20);
    assert!(c.release(&g.lease_id, "shutdown"));
    let k = c.counts();
    assert_eq!((k.total, k.running, k.queued, k.completed), (5, 0, 4, 1));
    // Once the search is done, the total is what it proposed.
    let (mut c, _) = core(2, SchedulerPolicy { planned: Some(5), ..policy() });
    c.fill_queue(10, 0);
    let k = c.counts();
    assert_eq!((k.total, k.queued), (2, 2));
}

/// The objective of the search-resume test: a bowl in (lr, l1_weight).
fn bowl(config_json: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(config_json).unwrap();
    let (x, y) = (v["params"]["lr"].as_f64().unwrap(), v["params"]["l1_weight"].as_f64().unwrap());
    (x - 0.3).powi(2) + (y - 0.7).powi(2)
}

#[tokio::test]
async fn a_result_driven_search_resumes_from_the_store_without_rerunning_a_point() {
    for method in ["nelder_mead", "particle_swarm", "bayes"] {
        let spec = crate::spec::SweepSpec::parse(
            &format!(
                "name: s\nmethod: {method}\nrun_cap: 24\nsearch: {{population: 4, startup_trials: 4}}\nparameters:\n  lr: {{distribution: uniform, min: 0.001, max: 1}}\n  l1_weight: {{distribution: uniform, min: 0, max: 1}}\n"
            ),
            "s.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        let policy = SchedulerPolicy { run_cap: Some(24), ..actor_policy() };
        let start = |policy: SchedulerPolicy| {
            let strategy = crate::search::make_strategy(&spec);
            let store = Store::open(&path).unwrap();
            Scheduler::start(store, input("fp"), policy, strategy, make_config())
        };
        // First run: 9 results, then the coordinator stops with two trials running.
        let (running_a, running_b);
        {
            let h = within(start(policy.clone())).await.unwrap();
            let w = within(h.register("a", "cpu", V)).await.unwrap();
            for _ in 0..9 {
                let g = within(h.lease(&w, Duration::from_secs(5))).await.unwrap().lease.unwrap();
                let v = bowl(&g.config_json);
                assert!(within(h.complete(&g.lease_id, success(v))).await.unwrap().accepted);
            }
            running_a = within(h.lease(&w, Duration::from_secs(5))).await.unwrap().lease.unwrap();
            running_b = within(h.lease(&w, Duration::from_secs(5))).await.unwrap().lease;
            within(h.shutdown(Duration::ZERO)).await.unwrap();
            drop(h);
        }
        within(async {
            while Store::open(&path).is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        let h = within(start(policy.clone())).await.unwrap();
        // The trials that were running finish under their old leases.
        for g in std::iter::once(running_a).chain(running_b) {
            let v = bowl(&g.config_json);
            assert!(
                within(h.complete(&g.lease_id, success(v))).await.unwrap().accepted,
                "{method}"
            );
        }
        let w = within(h.register("b", "cpu", V)).await.unwrap();
        loop {
            let out = within(h.lease(&w, Duration::from_secs(5))).await.unwrap();
            let Some(g) = out.lease else { break };
            let v = bowl(&g.config_json);
            assert!(within(h.complete(&g.lease_id, success(v))).await.unwrap().accepted);
        }
        let records = within(h.records("s")).await.unwrap();
        assert!(records.len() > 11 && records.len() <= 24, "{method}: {} trials", records.len());
        let mut points = std::collections::HashSet::new();
        for r in &records {
            assert_eq!(r.status, TrialStatus::Completed, "{method}: trial {}", r.index);
            assert_eq!(r.attempt, 1, "{method}: trial {} ran again", r.index);
            assert!(
                points.insert(serde_json::to_string(&r.params).unwrap()),
                "{method}: point {} proposed twice",
                r.index
            );
        }
        let best = records.iter().map(|r| r.metrics["loss"]).fold(f64::MAX, f64::min);
        let first = records[0].metrics["loss"];
        assert!(best < first, "{method}: the search improved ({best} vs {first})");
    }
}

#[tokio::test]
async fn a_swarm_is_dispatched_at_once_and_simplex_cells_run_side_by_side() {
    for (method, extra, in_flight) in
        [("particle_swarm", "search: {population: 5}\n", 10), ("nelder_mead", "", 2)]
    {
        let spec = crate::spec::SweepSpec::parse(
            &format!(
                "name: s\nmethod: {method}\nrun_cap: 40\n{extra}parameters:\n  lr: {{distribution: uniform, min: 0.001, max: 1}}\n  optimizer: {{values: [adam, sgd]}}\n"
            ),
            "s.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("p.redb")).unwrap();
        let policy = SchedulerPolicy { run_cap: Some(40), ..actor_policy() };
        let strategy = crate::search::make_strategy(&spec);
        let h = within(Scheduler::start(store, input("fp"), policy, strategy, make_config()))
            .await
            .unwrap();
        let mut grants = Vec::new();
        for i in 0..in_flight + 1 {
            let w = within(h.register(&format!("w{i}"), "cpu", V)).await.unwrap();
            if let Some(g) = within(h.lease(&w, Duration::ZERO)).await.unwrap().lease {
                grants.push(g);
            }
        }
        // Every particle of both swarms (one per optimizer) at once; one simplex point per cell.
        assert_eq!(grants.len(), in_flight, "{method}");
        within(h.shutdown(Duration::ZERO)).await.unwrap();
    }
}

/// A commit that fails (a full disk) stops the scheduler: the request whose change it held is
/// answered with the error, not acknowledged, nothing is taken afterwards, and the file still
/// holds everything acknowledged before.
#[tokio::test]
async fn a_failed_commit_stops_the_scheduler_and_acknowledges_nothing_it_did_not_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.redb");
    let store = Store::open(&path).unwrap();
    let fault = store.write_fault();
    let s = Box::new(ListStrategy::new(4));
    let h = within(Scheduler::start(store, input("fp"), actor_policy(), s, make_config()))
        .await
        .unwrap();
    let w = within(h.register("a", "cpu", V)).await.unwrap();
    let g0 = within(h.lease(&w, Duration::ZERO)).await.unwrap().lease.unwrap();
    let g1 = within(h.lease(&w, Duration::ZERO)).await.unwrap().lease.unwrap();
    assert!(within(h.complete(&g0.lease_id, success(0.5))).await.unwrap().accepted);
    let mut events = h.events_lossless();

    fault.fail_after(0);
    let refused = within(h.complete(&g1.lease_id, success(0.2))).await;
    match &refused {
        Err(SchedulerError::Commit(e)) => {
            assert!(e.contains("full.redb") && e.contains("no space left"), "{e}")
        }
        other => panic!("a result that was not stored was answered with {other:?}"),
    }
    let counts = within(async { h.counts().wait_for(|c| c.stopped).await.unwrap().clone() }).await;
    assert!(counts.error.as_deref().is_some_and(|e| e.contains("no space left")), "{counts:?}");
    assert!(matches!(within(h.finished()).await, Err(SchedulerError::Commit(_))));
    assert!(within(h.lease(&w, Duration::ZERO)).await.is_err(), "a stopped scheduler leases");
    drop(h);
    // Observers (TensorBoard) hear only of committed changes.
    while let Ok(event) = events.try_recv() {
        let refused =
            matches!(&event, SchedulerEvent::TrialFinished { record, .. } if record.index == 1);
        assert!(!refused, "{event:?}");
    }

    let store = reopen(&path).await;
    let trials = store.trials("s").unwrap();
    assert_eq!((trials[0].status, trials[0].metrics["loss"]), (TrialStatus::Completed, 0.5));
    // The refused completion left trial 1 as last committed: running under the old lease, to
    // expire and run again after a restart.
    assert_eq!(trials[1].status, TrialStatus::Running, "{:?}", trials[1]);
    assert!(trials[1..].iter().all(|t| t.status != TrialStatus::Completed), "{trials:#?}");
}
