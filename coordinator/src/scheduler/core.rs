//! The scheduler's state machine: synchronous functions over one sweep's state, with the clock
//! passed in (`now`, Unix ms) so tests drive time directly.
//!
//! Invariants:
//! - `trials[i].index == i`; indexes are the strategy's proposal order, contiguous from 0.
//! - a trial index is in `queue` iff its status is Queued; a lease id is in `leases` iff its
//!   trial is Running under that lease. So "is this lease current" is one hash lookup, and a
//!   stale or reused lease can never change a trial: every trial completes exactly once.
//! - every mutated record is listed in `dirty` until [`Core::take_batch`] hands it to the store.

use super::{
    Best, CompleteAck, Counts, LeaseGrant, MakeConfig, Params, ProgressAck, ProgressReport,
    SchedulerError, SchedulerEvent, SchedulerPolicy, TrialOutcome, WorkerState,
};
use crate::model::{Goal, LeaseInfo, SweepRecord, TrialRecord, TrialStatus, now_ms};
use crate::prune::{self, Decision, History};
use crate::search::{Outcome, Proposal, Stored, Strategy};
use crate::spec::EarlyTerminate;
use crate::store::WriteBatch;
use crate::weights::KeepWeights;
use msae_shared::class_stats::ClassStats;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// A registered worker.
#[derive(Debug, Clone)]
struct Worker {
    name: String,
    device: String,
    /// Registration order, for listing.
    order: u64,
    last_seen_ms: u64,
}

/// What a lease request gets right now.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum LeaseDecision {
    Granted(LeaseGrant),
    /// Nothing to hand out now; the request may wait.
    Nothing,
    /// Finished or shutting down.
    Shutdown,
}

pub(crate) struct Core {
    sweep: SweepRecord,
    trials: Vec<TrialRecord>,
    queue: VecDeque<u64>,
    leases: HashMap<String, u64>,
    workers: HashMap<String, Worker>,
    policy: SchedulerPolicy,
    strategy: Box<dyn Strategy>,
    make_config: MakeConfig,
    strategy_done: bool,
    shutting_down: bool,
    completed: u64,
    failed: u64,
    pruned: u64,
    /// The early termination rule and every trial's sweep metric at its evaluations.
    pruner: Option<(EarlyTerminate, History)>,
    /// Running trials the rule stopped, with why: their progress replies keep saying so until
    /// the worker reports the result.
    pruning: HashMap<u64, String>,
    /// Best so far: (oriented value, index, raw value).
    best: Option<(f64, u64, f64)>,
    dirty: Vec<u64>,
    is_dirty: Vec<bool>,
    progress_dirty: HashSet<u64>,
    sweep_dirty: bool,
    events: Vec<SchedulerEvent>,
    next_worker: u64,
    /// See [`Core::take_discarded`].
    discarded: Vec<String>,
    /// Completed trials holding files with a finite sweep metric, best first (see
    /// [`Core::trim_weights`]); None until first needed.
    ranked: Option<BTreeSet<(Ranked, u64)>>,
}

impl Core {
    /// A fresh sweep (its record is already stored).
    pub(crate) fn new(
        sweep: SweepRecord,
        policy: SchedulerPolicy,
        strategy: Box<dyn Strategy>,
        make_config: MakeConfig,
    ) -> Core {
        let pruner = policy.early_terminate.clone().map(|rule| (rule, History::new(policy.goal)));
        Core {
            sweep,
            trials: Vec::new(),
            queue: VecDeque::new(),
            leases: HashMap::new(),
            workers: HashMap::new(),
            policy,
            strategy,
            make_config,
            strategy_done: false,
            shutting_down: false,
            completed: 0,
            failed: 0,
            pruned: 0,
            pruner,
            pruning: HashMap::new(),
            best: None,
            dirty: Vec::new(),
            is_dirty: Vec::new(),
            progress_dirty: HashSet::new(),
            sweep_dirty: false,
            events: Vec::new(),
            next_worker: 1,
            discarded: Vec::new(),
            ranked: None,
        }
    }

    /// Resumes a stored sweep: replays the strategy over the stored trials (each proposal must
    /// match the stored index and params), observes final results, requeues queued trials and
    /// gives running trials a fresh deadline so a surviving worker can still finish them.
    pub(crate) fn resume(
        sweep: SweepRecord,
        trials: Vec<TrialRecord>,
        policy: SchedulerPolicy,
        strategy: Box<dyn Strategy>,
        make_config: MakeConfig,
        now: u64,
    ) -> Result<Core, SchedulerError> {
        let mut core = Core::new(sweep, policy, strategy, make_config);
        let name = core.sweep.name.clone();
        let mismatch = |index: u64, detail: String| SchedulerError::ReplayMismatch {
            sweep: name.clone(),
            index,
            detail,
        };
        // Result-driven strategies get the stored trials at once; the others replay.
        let restores = core.strategy.restores();
        let mut stored = Vec::new();
        for (pos, mut t) in trials.into_iter().enumerate() {
            if t.index != pos as u64 {
                return Err(mismatch(
                    pos as u64,
                    format!("the DB has no trial {pos} but has trial {}", t.index),
                ));
            }
            if !restores {
                match core.strategy.propose() {
                    Proposal::Point(p)
                        if p.index == t.index && params_match(&p.params, &t.params) => {}
                    Proposal::Point(p) => {
                        return Err(mismatch(
                            t.index,
                            format!(
                                "the search proposes #{} {} but the DB has {}; the sweep definition or search code changed (use --new-sweep)",
                                p.index,
                                json_of(&p.params),
                                json_of(&t.params)
                            ),
                        ));
                    }
                    Proposal::Wait => {
                        return Err(mismatch(
                            t.index,
                            "the search waits for results instead of proposing the stored trial"
                                .into(),
                        ));
                    }
                    Proposal::Done => {
                        return Err(mismatch(
                            t.index,
                            "the search is done but the DB has more trials".into(),
                        ));
                    }
                }
            }
            let index = t.index;
            match t.status {
                TrialStatus::Completed => {
                    core.completed += 1;
                    let v = core.oriented(&t);
                    if let Some(v) = v {
                        core.consider_best(index, v, &t);
                    }
                    if !restores {
                        core.strategy.observe(index, v);
                    }
                }
                TrialStatus::Failed => {
                    core.failed += 1;
                    if !restores {
                        core.strategy.observe(index, None);
                    }
                }
                TrialStatus::Pruned => {
                    core.pruned += 1;
                    if !restores {
                        let v = core.oriented(&t);
                        core.strategy.observe(index, v);
                    }
                }
                TrialStatus::Queued => core.queue.push_back(index),
                TrialStatus::Running => match t.lease.as_mut() {
                    Some(lease) => {
                        lease.deadline_ms = now + core.ttl_ms();
                        core.leases.insert(lease.lease_id.clone(), index);
                    }
                    None => {
                        // Inconsistent record (running without a lease): run it again.
                        t.status = TrialStatus::Queued;
                        core.queue.push_back(index);
                    }
                },
            }
            if restores {
                let outcome = match t.status {
                    // A pruned trial answers with its last metric.
                    TrialStatus::Completed | TrialStatus::Pruned => {
                        Outcome::Finished(core.oriented(&t))
                    }
                    TrialStatus::Failed => Outcome::Finished(None),
                    TrialStatus::Queued | TrialStatus::Running => Outcome::Pending,
                };
                stored.push(Stored { index, params: t.params.clone(), outcome });
            }
            core.trials.push(t);
            core.is_dirty.push(false);
        }
        if restores {
            core.strategy.restore(&stored);
        }
        if core.sweep.proposed != core.trials.len() as u64 {
            core.sweep.proposed = core.trials.len() as u64;
            core.sweep_dirty = true;
        }
        Ok(core)
    }

    pub(crate) fn sweep(&self) -> &SweepRecord {
        &self.sweep
    }

    pub(crate) fn trials(&self) -> &[TrialRecord] {
        &self.trials
    }

    fn ttl_ms(&self) -> u64 {
        self.policy.lease_ttl.as_millis() as u64
    }

    /// The trial's sweep metric oriented so that smaller is better.
    fn oriented(&self, t: &TrialRecord) -> Option<f64> {
        oriented_value(&self.policy, t)
    }

    fn consider_best(&mut self, index: u64, oriented: f64, t: &TrialRecord) {
        if self.best.is_none_or(|(b, _, _)| oriented < b) {
            let raw = t.metrics[&self.policy.metric];
            self.best = Some((oriented, index, raw));
        }
    }

    fn mark(&mut self, index: u64) {
        let i = index as usize;
        if !self.is_dirty[i] {
            self.is_dirty[i] = true;
            self.dirty.push(index);
        }
    }

    pub(crate) fn counts(&self) -> Counts {
        let proposed = self.trials.len() as u64;
        let running = self.leases.len() as u64;
        let total = if self.strategy_done || self.sweep.finished {
            proposed
        } else {
            self.policy.planned.unwrap_or(0).max(proposed)
        };
        Counts {
            sweep: self.sweep.name.clone(),
            total,
            proposed,
            // Not yet started: the proposed ones waiting in the queue and the ones the search
            // has still to propose.
            queued: total.saturating_sub(self.completed + self.pruned + self.failed + running),
            running,
            completed: self.completed,
            pruned: self.pruned,
            failed: self.failed,
            workers: self.workers.len() as u64,
            best: self.best.map(|(_, index, value)| Best { index, value }),
            finished: self.sweep.finished,
            stopped: false,
            error: None,
        }
    }

    /// Strategy done and every trial final.
    pub(crate) fn is_finished(&self) -> bool {
        self.strategy_done && self.queue.is_empty() && self.leases.is_empty()
    }

    pub(crate) fn running(&self) -> usize {
        self.leases.len()
    }

    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    pub(crate) fn set_shutting_down(&mut self) {
        self.shutting_down = true;
    }

    /// Records the sweep as finished once it is (idempotent).
    pub(crate) fn check_finished(&mut self) -> bool {
        if self.is_finished() && !self.sweep.finished {
            self.sweep.finished = true;
            self.sweep_dirty = true;
            tracing::info!(
                sweep = %self.sweep.name,
                completed = self.completed,
                pruned = self.pruned,
                failed = self.failed,
                "sweep finished"
            );
        }
        self.sweep.finished
    }

    pub(crate) fn register(
        &mut self,
        name: &str,
        device: &str,
        protocol_version: u32,
    ) -> Result<String, SchedulerError> {
        if protocol_version != msae_shared::PROTOCOL_VERSION {
            return Err(SchedulerError::ProtocolVersion {
                got: protocol_version,
                expected: msae_shared::PROTOCOL_VERSION,
            });
        }
        // A counter for readability plus randomness so ids of a previous coordinator process
        // are never mistaken for current ones.
        let id = format!("w{}-{:08x}", self.next_worker, rand::random::<u32>());
        self.next_worker += 1;
        let name = if name.is_empty() { id.clone() } else { name.to_string() };
        tracing::info!(worker = %id, %name, %device, "worker registered");
        let worker = Worker {
            name,
            device: device.to_string(),
            order: self.next_worker,
            last_seen_ms: now_ms(),
        };
        self.workers.insert(id.clone(), worker);
        Ok(id)
    }

    /// Proposes points until `want` trials are queued, the strategy waits, or it is done.
    pub(crate) fn fill_queue(&mut self, want: usize, now: u64) {
        while !self.strategy_done && self.queue.len() < want {
            if self.policy.run_cap.is_some_and(|cap| self.trials.len() as u64 >= cap) {
                self.strategy_done = true;
                break;
            }
            match self.strategy.propose() {
                Proposal::Point(p) => {
                    let expected = self.trials.len() as u64;
                    if p.index != expected {
                        tracing::error!(
                            sweep = %self.sweep.name,
                            got = p.index,
                            expected,
                            "search strategy proposed an out-of-order index; stopping the search"
                        );
                        self.strategy_done = true;
                        break;
                    }
                    self.add_trial(p.params, now);
                }
                Proposal::Wait => {
                    if self.queue.is_empty() && self.leases.is_empty() {
                        // Nothing can ever produce the observation it waits for.
                        tracing::warn!(
                            sweep = %self.sweep.name,
                            "search waits for results but no trial is queued or running; ending the search"
                        );
                        self.strategy_done = true;
                    }
                    break;
                }
                Proposal::Done => self.strategy_done = true,
            }
        }
    }

    fn add_trial(&mut self, params: Params, now: u64) {
        let index = self.trials.len() as u64;
        let config = (self.make_config)(&params);
        let mut t = TrialRecord {
            sweep: self.sweep.name.clone(),
            index,
            params,
            config: Default::default(),
            status: TrialStatus::Queued,
            attempt: 0,
            lease: None,
            step: 0,
            metrics: BTreeMap::new(),
            progress: BTreeMap::new(),
            curve: Vec::new(),
            errors: Vec::new(),
            worker: None,
            artifact: None,
            weights: None,
            created_ms: now,
            finished_ms: None,
            duration_s: None,
        };
        let failed = match config {
            Ok(c) => {
                t.config = c.into();
                false
            }
            Err(e) => {
                t.status = TrialStatus::Failed;
                t.errors.push(format!("invalid trial config: {e}"));
                t.finished_ms = Some(now);
                true
            }
        };
        self.trials.push(t);
        self.is_dirty.push(false);
        self.mark(index);
        self.sweep.proposed = self.trials.len() as u64;
        self.sweep_dirty = true;
        if failed {
            self.failed += 1;
            self.strategy.observe(index, None);
            self.finished_event(index);
        } else {
            self.queue.push_back(index);
        }
    }

    fn finished_event(&mut self, index: u64) {
        self.finished_event_with(index, None);
    }

    fn finished_event_with(&mut self, index: u64, classes: Option<Arc<ClassStats>>) {
        let record = Box::new(self.trials[index as usize].clone());
        self.events.push(SchedulerEvent::TrialFinished { record, classes });
    }

    /// The checks every lease request passes first: a known worker (else an error), and a
    /// sweep not finished (else `Shutdown`, and the worker is dismissed). `None`: go on.
    fn admit(&mut self, worker_id: &str) -> Result<Option<LeaseDecision>, SchedulerError> {
        let Some(worker) = self.workers.get_mut(worker_id) else {
            return Err(SchedulerError::UnknownWorker(worker_id.to_string()));
        };
        worker.last_seen_ms = worker.last_seen_ms.max(now_ms());
        if self.sweep.finished {
            // A dismissed worker no longer counts, so the coordinator knows when every worker
            // has been told (it keeps serving until then, briefly, after a sweep finishes).
            self.workers.remove(worker_id);
            return Ok(Some(LeaseDecision::Shutdown));
        }
        Ok(None)
    }

    /// Grants the next queued trial to `worker_id` if possible.
    pub(crate) fn try_lease(
        &mut self,
        worker_id: &str,
        now: u64,
    ) -> Result<LeaseDecision, SchedulerError> {
        if let Some(decision) = self.admit(worker_id)? {
            return Ok(decision);
        }
        if self.shutting_down {
            // The sweep is not over: workers wait (and reconnect to a restarted coordinator)
            // rather than exit.
            return Ok(LeaseDecision::Nothing);
        }
        let worker = &self.workers[worker_id];
        if self.policy.max_concurrent.is_some_and(|m| self.leases.len() >= m) {
            return Ok(LeaseDecision::Nothing);
        }
        let Some(index) = self.queue.pop_front() else {
            return Ok(LeaseDecision::Nothing);
        };
        let worker_name = worker.name.clone();
        let lease_id = format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
        let ttl = self.ttl_ms();
        let t = &mut self.trials[index as usize];
        t.status = TrialStatus::Running;
        t.attempt += 1;
        t.lease = Some(LeaseInfo {
            lease_id: lease_id.clone(),
            worker: worker_id.to_string(),
            deadline_ms: now + ttl,
            started_ms: now,
        });
        t.worker = Some(worker_name.clone());
        t.step = 0;
        t.progress.clear();
        let grant = LeaseGrant {
            lease_id: lease_id.clone(),
            trial_id: t.trial_id(),
            sweep: t.sweep.clone(),
            index,
            attempt: t.attempt,
            config_json: t.config.as_str().to_string(),
            ttl: self.policy.lease_ttl,
            timeout: self.policy.timeout,
            runner: self.policy.runner,
            noop_sleep_ms: self.policy.noop_sleep_ms,
            upload_limit: self.policy.upload_limit(),
        };
        self.events.push(SchedulerEvent::TrialStarted {
            index,
            attempt: t.attempt,
            worker: worker_name,
            record: Box::new(t.clone()),
        });
        self.leases.insert(lease_id, index);
        self.mark(index);
        Ok(LeaseDecision::Granted(grant))
    }

    /// The checks of [`Core::try_lease`] without granting: for a request that queues behind
    /// earlier waiters.
    pub(crate) fn try_lease_check_only(
        &mut self,
        worker_id: &str,
    ) -> Result<LeaseDecision, SchedulerError> {
        Ok(self.admit(worker_id)?.unwrap_or(LeaseDecision::Nothing))
    }

    pub(crate) fn progress(
        &mut self,
        lease_id: &str,
        report: ProgressReport,
        now: u64,
    ) -> ProgressAck {
        let Some(&index) = self.leases.get(lease_id) else {
            return ProgressAck {
                stop: true,
                reason: "lease is not current (expired, completed or unknown)".into(),
                ..ProgressAck::default()
            };
        };
        let ttl = self.ttl_ms();
        let timeout = self.policy.timeout;
        let t = &mut self.trials[index as usize];
        let lease = t.lease.as_mut().expect("running trial has a lease");
        lease.deadline_ms = now + ttl;
        if let Some(w) = self.workers.get_mut(&lease.worker) {
            w.last_seen_ms = w.last_seen_ms.max(now);
        }
        let started = lease.started_ms;
        let ProgressReport { step, scalars, evaluations } = report;
        t.step = t.step.max(step);
        // The sweep metric at each evaluation: the trial's curve, judged by early termination.
        let mut judged: Vec<(u64, f64)> = Vec::new();
        // Evaluations first (they precede the sample in step order); each is an event of its
        // own so none is lost to sampling.
        for e in evaluations {
            t.step = t.step.max(e.step);
            t.progress.extend(
                e.scalars.iter().filter(|(_, v)| v.is_finite()).map(|(k, v)| (k.clone(), *v)),
            );
            if let Some(v) = e.scalars.get(&self.policy.metric).filter(|v| v.is_finite()) {
                set_curve_point(&mut t.curve, e.step, *v);
                judged.push((e.step, *v));
            }
            self.events.push(SchedulerEvent::TrialProgress {
                index,
                step: e.step,
                scalars: e.scalars,
                evaluation: true,
                classes: e.classes,
            });
        }
        t.progress
            .extend(scalars.iter().filter(|(_, v)| v.is_finite()).map(|(k, v)| (k.clone(), *v)));
        self.progress_dirty.insert(index);
        if !scalars.is_empty() {
            self.events.push(SchedulerEvent::TrialProgress {
                index,
                step,
                scalars,
                evaluation: false,
                classes: None,
            });
        }
        if let Some(limit) = timeout
            && now.saturating_sub(started) > limit.as_millis() as u64
        {
            let reason = format!("timed out after {:.1}s", limit.as_secs_f64());
            self.fail_attempt(index, &reason, now);
            return ProgressAck { stop: true, reason, ..ProgressAck::default() };
        }
        // A pruned trial ends now, for good: better than handing it back at a shutdown.
        if let Some(ack) = self.prune_check(index, &judged) {
            return ack;
        }
        if self.shutting_down {
            return ProgressAck {
                stop: true,
                release: true,
                reason: "the coordinator is shutting down; release the trial".into(),
                ..ProgressAck::default()
            };
        }
        ProgressAck::default()
    }

    /// Early termination after a progress report: records the trial's new evaluations of the
    /// sweep metric and judges each in step order. A stop to prune for a trial the rule
    /// rejects now, and again for one it rejected before (a report crossing the reply, or a
    /// resent one); None otherwise or without a rule.
    fn prune_check(&mut self, index: u64, judged: &[(u64, f64)]) -> Option<ProgressAck> {
        let (rule, history) = self.pruner.as_mut()?;
        for &(step, value) in judged {
            history.record(index, step, value);
        }
        if !self.pruning.contains_key(&index) {
            for &(step, _) in judged {
                if let Decision::Stop(reason) = prune::decide(rule, history, index, step) {
                    let t = &self.trials[index as usize];
                    tracing::info!(trial = %t.trial_id(), step, %reason, "pruning trial");
                    self.pruning.insert(index, reason);
                    break;
                }
            }
        }
        let reason = self.pruning.get(&index)?;
        Some(ProgressAck {
            stop: true,
            prune: true,
            release: false,
            reason: format!("pruned by early termination ({reason})"),
        })
    }

    /// Rebuilds the early termination history from the stored curves (a resumed sweep), so
    /// trials run after a restart are judged against every trial before it.
    pub(crate) fn restore_pruning_history(&mut self) {
        let Some((_, history)) = self.pruner.as_mut() else { return };
        for t in &self.trials {
            for &(step, value) in &t.curve {
                history.record(t.index, step, value);
            }
        }
    }

    pub(crate) fn complete(
        &mut self,
        lease_id: &str,
        outcome: TrialOutcome,
        now: u64,
    ) -> CompleteAck {
        let Some(&index) = self.leases.get(lease_id) else {
            return CompleteAck {
                accepted: false,
                reason:
                    "lease is not current (expired, already completed or unknown); result refused"
                        .into(),
            };
        };
        if !outcome.success {
            let reason = if outcome.error.is_empty() {
                "the trial failed without an error message".to_string()
            } else {
                outcome.error.clone()
            };
            self.end_attempt(index, &reason, outcome.permanent, now);
            return CompleteAck { accepted: true, reason: String::new() };
        }
        // A finished run's files are part of its result: without them (when asked for) the
        // attempt did not deliver.
        let mut weights = None;
        if !outcome.pruned
            && let (Some(store), true) = (&self.policy.weights, self.policy.keep_weights.uploads())
        {
            let sweep = &self.trials[index as usize].sweep;
            match store.adopt(lease_id, sweep, index) {
                Ok(Some(stored)) => weights = Some(stored),
                Ok(None) => {
                    self.end_attempt(index, "the trial's files were not uploaded", false, now);
                    return CompleteAck { accepted: true, reason: String::new() };
                }
                Err(e) => {
                    let reason = format!("storing the trial's files: {e}");
                    self.end_attempt(index, &reason, false, now);
                    return CompleteAck { accepted: true, reason: String::new() };
                }
            }
        }
        self.leases.remove(lease_id);
        let metric = self.policy.metric.clone();
        // Pruned as the worker says: it knows whether the stop cut the run short (a trial that
        // had just finished when told is a completed one), and says so across a restart of
        // this coordinator, which forgets whom it told.
        let pruned = outcome.pruned;
        let prune_reason = self.pruning.remove(&index);
        let t = &mut self.trials[index as usize];
        t.status = if pruned { TrialStatus::Pruned } else { TrialStatus::Completed };
        t.lease = None;
        // Exactly what the completing attempt reported: nothing from progress or from an
        // earlier attempt.
        t.metrics = outcome.metrics;
        if outcome.final_step > 0 {
            t.step = outcome.final_step;
        } else if let Some(steps) = t.metrics.get(msae_shared::metrics::STEPS) {
            t.step = *steps as u64;
        }
        t.artifact = outcome.artifact;
        t.weights = weights;
        t.duration_s = outcome.duration_s;
        t.finished_ms = Some(now);
        for d in &outcome.dropped {
            t.errors.push(format!("attempt {}: dropped {d}", t.attempt));
        }
        if pruned {
            let why = prune_reason.map(|r| format!(" ({r})")).unwrap_or_default();
            t.errors.push(format!(
                "attempt {}: pruned at step {} by early termination{why}",
                t.attempt, t.step
            ));
        }
        if !t.metrics.contains_key(&metric) {
            t.errors.push(format!(
                "attempt {}: completed without the sweep metric {metric} (absent or not \
                 finite); ranked after every trial that has it",
                t.attempt
            ));
        }
        let v = self.oriented(&self.trials[index as usize]);
        if pruned {
            // Its metrics are from before the end of training: never the best.
            self.pruned += 1;
        } else {
            self.completed += 1;
            if let Some(v) = v {
                let t = self.trials[index as usize].clone();
                self.consider_best(index, v, &t);
            }
        }
        if self.trials[index as usize].weights.is_some() {
            self.trim_weights(index);
        }
        // A pruned trial gives the search its last metric, as a completed one its final one.
        self.strategy.observe(index, v);
        self.progress_dirty.remove(&index);
        self.mark(index);
        self.finished_event_with(index, outcome.classes);
        CompleteAck { accepted: true, reason: String::new() }
    }

    /// Applies `keep_weights` after trial `index` completed with files: trials that fell out of
    /// the kept ranks lose their files (deleted by the actor once this commit is durable).
    /// Ranks are kept in `ranked` (built on first use, then updated per completion), so a
    /// completion costs O(limit + log n), not a pass over the sweep.
    fn trim_weights(&mut self, index: u64) {
        let keep = self.policy.keep_weights;
        let limit = match keep {
            KeepWeights::All | KeepWeights::None => return,
            KeepWeights::Best(n) => n,
            KeepWeights::Auto => crate::weights::AUTO_BEST,
        };
        let droppable = |t: &TrialRecord| {
            t.weights.as_ref().is_some_and(|w| !keep.keeps(Some(limit), w.bytes()))
        };
        let mut drop: Vec<u64> = Vec::new();
        match self.ranked.as_mut() {
            None => {
                let mut ranked = BTreeSet::new();
                for t in &self.trials {
                    if t.status != TrialStatus::Completed || t.weights.is_none() {
                        continue;
                    }
                    match self.oriented(t) {
                        Some(v) => {
                            ranked.insert((Ranked(v), t.index));
                        }
                        None if droppable(t) => drop.push(t.index),
                        None => {}
                    }
                }
                for (rank, &(_, i)) in ranked.iter().enumerate() {
                    if rank as u64 >= limit && droppable(&self.trials[i as usize]) {
                        drop.push(i);
                    }
                }
                self.ranked = Some(ranked);
            }
            Some(ranked) => {
                let t = &self.trials[index as usize];
                match oriented_value(&self.policy, t) {
                    Some(v) => {
                        ranked.insert((Ranked(v), index));
                        // Only the entry now at rank `limit` can have changed sides: those
                        // after it were past the limit already, and kept only if not droppable.
                        if let Some(&(_, i)) = ranked.iter().nth(limit as usize)
                            && droppable(&self.trials[i as usize])
                        {
                            drop.push(i);
                        }
                    }
                    None if droppable(t) => drop.push(index),
                    None => {}
                }
            }
        }
        let metric = self.policy.metric.clone();
        for i in drop {
            let t = &mut self.trials[i as usize];
            let Some(w) = t.weights.take() else { continue };
            if let (Some(ranked), Some(v)) = (self.ranked.as_mut(), oriented_value(&self.policy, t))
            {
                ranked.remove(&(Ranked(v), i));
            }
            t.errors.push(format!(
                "files not kept: keep_weights {} and this trial is not among the best by {metric}",
                keep.describe()
            ));
            self.discarded.push(w.dir);
            self.mark(i);
        }
    }

    /// Trial directories whose files are no longer kept, to delete after the commit that
    /// forgets them.
    pub(crate) fn take_discarded(&mut self) -> Vec<String> {
        std::mem::take(&mut self.discarded)
    }

    /// Ends the current attempt of a running trial as a failure: requeue, or Failed after
    /// `max_attempts`.
    fn fail_attempt(&mut self, index: u64, reason: &str, now: u64) {
        self.end_attempt(index, reason, false, now);
    }

    /// [`Self::fail_attempt`], or Failed at once when `permanent` (a retry cannot help).
    fn end_attempt(&mut self, index: u64, reason: &str, permanent: bool, now: u64) {
        let max = self.policy.max_attempts;
        self.pruning.remove(&index);
        let t = &mut self.trials[index as usize];
        if let Some(lease) = t.lease.take() {
            self.leases.remove(&lease.lease_id);
            if let Some(store) = &self.policy.weights {
                store.discard(&lease.lease_id);
            }
        }
        let kind = if permanent { " (not retryable)" } else { "" };
        t.errors.push(format!("attempt {}/{max}{kind}: {reason}", t.attempt));
        let final_failure = permanent || t.attempt >= max;
        if final_failure {
            t.status = TrialStatus::Failed;
            t.finished_ms = Some(now);
            self.failed += 1;
            if permanent {
                tracing::warn!(trial = %t.trial_id(), ?reason, "trial failed; not retried (a retry cannot change this)");
            } else {
                tracing::warn!(trial = %t.trial_id(), ?reason, "trial failed after {max} attempts");
            }
            self.strategy.observe(index, None);
            self.finished_event(index);
        } else {
            t.status = TrialStatus::Queued;
            tracing::info!(trial = %t.trial_id(), attempt = t.attempt, ?reason, "attempt failed; requeued");
            self.queue.push_back(index);
        }
        self.progress_dirty.remove(&index);
        self.mark(index);
    }

    /// A worker hands its trial back: requeued at the front, the attempt not counted.
    pub(crate) fn release(&mut self, lease_id: &str, reason: &str) -> bool {
        let Some(index) = self.leases.remove(lease_id) else {
            return false;
        };
        if let Some(store) = &self.policy.weights {
            store.discard(lease_id);
        }
        self.pruning.remove(&index);
        let t = &mut self.trials[index as usize];
        t.lease = None;
        t.status = TrialStatus::Queued;
        t.attempt = t.attempt.saturating_sub(1);
        tracing::info!(trial = %t.trial_id(), ?reason, "lease released; trial requeued");
        self.queue.push_front(index);
        self.progress_dirty.remove(&index);
        self.mark(index);
        true
    }

    /// Extends a current lease's deadline as progress would (an upload carries no progress):
    /// its trial's sweep and index, or None when the lease is not current.
    pub(crate) fn renew(&mut self, lease_id: &str, now: u64) -> Option<(String, u64)> {
        let &index = self.leases.get(lease_id)?;
        let ttl = self.ttl_ms();
        let t = &mut self.trials[index as usize];
        let lease = t.lease.as_mut()?;
        lease.deadline_ms = now + ttl;
        let worker = lease.worker.clone();
        self.seen(&worker, now);
        Some((self.sweep.name.clone(), index))
    }

    fn seen(&mut self, worker_id: &str, now: u64) {
        if let Some(w) = self.workers.get_mut(worker_id) {
            w.last_seen_ms = w.last_seen_ms.max(now);
        }
    }

    /// The registered workers with their running trial, in registration order. A worker that
    /// holds spare leases (`msae-worker --prefetch`) runs them in the order they were granted,
    /// so its running trial is the one leased first.
    pub(crate) fn workers(&self, _now: u64) -> Vec<WorkerState> {
        let mut first: HashMap<&str, (u64, u64)> = HashMap::new();
        for &index in self.leases.values() {
            let t = &self.trials[index as usize];
            if let Some(lease) = &t.lease {
                let key = (lease.started_ms, index);
                first
                    .entry(lease.worker.as_str())
                    .and_modify(|k| *k = (*k).min(key))
                    .or_insert(key);
            }
        }
        let running: HashMap<&str, String> = first
            .into_iter()
            .map(|(worker, (_, index))| (worker, self.trials[index as usize].trial_id()))
            .collect();
        let mut out: Vec<(u64, WorkerState)> = self
            .workers
            .iter()
            .map(|(id, w)| {
                let state = WorkerState {
                    id: id.clone(),
                    name: w.name.clone(),
                    device: w.device.clone(),
                    trial: running.get(id.as_str()).cloned(),
                    last_seen_ms: w.last_seen_ms,
                };
                (w.order, state)
            })
            .collect();
        out.sort_by_key(|(order, _)| *order);
        out.into_iter().map(|(_, s)| s).collect()
    }

    pub(crate) fn weight_store(&self) -> Option<std::sync::Arc<crate::weights::WeightStore>> {
        self.policy.weights.clone()
    }

    /// Expires leases past their deadline and attempts past the timeout. Scans the running
    /// leases only.
    pub(crate) fn expire(&mut self, now: u64) {
        let timeout = self.policy.timeout.map(|d| d.as_millis() as u64);
        let mut ended: Vec<(u64, String)> = Vec::new();
        for &index in self.leases.values() {
            let t = &self.trials[index as usize];
            let Some(lease) = &t.lease else { continue };
            if timeout.is_some_and(|limit| now.saturating_sub(lease.started_ms) > limit) {
                let limit = self.policy.timeout.unwrap_or_default().as_secs_f64();
                ended.push((index, format!("timed out after {limit:.1}s")));
            } else if now > lease.deadline_ms {
                ended.push((
                    index,
                    format!(
                        "lease expired (no progress from worker {} within {:.1}s)",
                        lease.worker,
                        self.policy.lease_ttl.as_secs_f64()
                    ),
                ));
            }
        }
        ended.sort_unstable_by_key(|(i, _)| *i);
        for (index, reason) in ended {
            self.fail_attempt(index, &reason, now);
        }
    }

    /// Moves the changed records into a batch; lazily kept progress only when `with_progress`.
    pub(crate) fn take_batch(&mut self, with_progress: bool) -> WriteBatch {
        if with_progress {
            let progress: Vec<u64> = self.progress_dirty.drain().collect();
            for index in progress {
                self.mark(index);
            }
        }
        let mut batch = WriteBatch::new();
        if self.sweep_dirty {
            batch.put_sweep(&self.sweep);
            self.sweep_dirty = false;
        }
        for index in self.dirty.drain(..) {
            self.is_dirty[index as usize] = false;
            batch.put_trial(&self.trials[index as usize]);
        }
        batch
    }

    pub(crate) fn take_events(&mut self) -> Vec<SchedulerEvent> {
        std::mem::take(&mut self.events)
    }
}

/// Sets the curve's value at `step` (kept in step order; a later attempt replaces a value).
/// `t`'s sweep metric oriented so that smaller is better; None when absent or not finite.
fn oriented_value(policy: &SchedulerPolicy, t: &TrialRecord) -> Option<f64> {
    let v = *t.metrics.get(&policy.metric)?;
    if !v.is_finite() {
        return None;
    }
    Some(match policy.goal {
        Goal::Minimize => v,
        Goal::Maximize => -v,
    })
}

/// An oriented metric ordered totally (finite values only reach it), for the ranks of
/// `keep_weights`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ranked(f64);

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

fn set_curve_point(curve: &mut Vec<(u64, f64)>, step: u64, value: f64) {
    match curve.binary_search_by_key(&step, |(s, _)| *s) {
        Ok(i) => curve[i].1 = value,
        Err(i) => curve.insert(i, (step, value)),
    }
}

fn json_of(p: &Params) -> String {
    serde_json::to_string(p).unwrap_or_default()
}

/// Whether two parameter sets are the same point: equal keys and values, floats equal up to a
/// relative 1e-12 (a float that went through JSON text may differ in its last bit).
pub fn params_match(a: &Params, b: &Params) -> bool {
    a.len() == b.len()
        && a.iter().zip(b.iter()).all(|((ka, va), (kb, vb))| ka == kb && json_close(va, vb))
}

fn json_close(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value as V;
    match (a, b) {
        (V::Number(x), V::Number(y)) => {
            if x.is_f64() || y.is_f64() {
                match (x.as_f64(), y.as_f64()) {
                    (Some(x), Some(y)) => x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
                    _ => false,
                }
            } else {
                x == y
            }
        }
        (V::Array(x), V::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_close(a, b))
        }
        (V::Object(x), V::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_close(v, w)))
        }
        _ => a == b,
    }
}
