//! The scheduler: the single owner of a sweep's state (trials, queue, leases, workers).
//!
//! Shaped like HyperQueue's reactor: [`core::Core`] is a synchronous state machine (plain
//! functions taking `now`), driven by one actor task ([`actor`]). gRPC handlers hold a cheap
//! [`SchedulerHandle`], send it commands over an mpsc channel and await a oneshot reply; nothing
//! else touches the state, so there are no locks.
//!
//! Durability and speed come from group commit: the actor drains every queued command, applies
//! them all, writes the changed records in ONE redb write transaction on a blocking thread, and
//! only after that commit sends the replies. Everything a worker or user relies on (new trials,
//! leases, completions, failures, requeues) is committed before it is acknowledged. Progress
//! (step, scalars, lease renewal) is the exception: renewals live in memory only (a restarted
//! coordinator resets every running lease's deadline anyway) and step/scalars are committed
//! lazily, at most every [`PROGRESS_FLUSH`], piggybacking on the next commit.
//!
//! Per-event work is O(1) in the size of the sweep (queue is a `VecDeque`, leases a `HashMap`,
//! trials a `Vec` indexed by trial index); the periodic tick scans only the running leases.

mod actor;
mod core;
#[cfg(test)]
pub(crate) mod tests;

use crate::model::{Goal, SweepRecord, TrialRecord};
use crate::search::Strategy;
use crate::spec::EarlyTerminate;
use crate::store::{Store, StoreError, WriteBatch};
use crate::weights::{KeepWeights, WeightStore};
use msae_shared::RunnerKind;
use msae_shared::class_stats::ClassStats;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use self::core::params_match;

/// How often lazily kept progress (step, scalars) is committed.
pub const PROGRESS_FLUSH: Duration = Duration::from_secs(1);

/// Swept parameters of one trial (dotted trial-config paths to values).
pub type Params = BTreeMap<String, serde_json::Value>;

/// Builds the full trial config (JSON) of a point; an `Err` fails that trial with the message.
pub type MakeConfig = Box<dyn Fn(&Params) -> Result<serde_json::Value, String> + Send>;

/// Per-sweep scheduling policy (taken from the sweep spec by the caller).
#[derive(Debug, Clone)]
pub struct SchedulerPolicy {
    /// Attempts per trial, the first included (>= 1).
    pub max_attempts: u32,
    /// A lease expires this long after it was granted or last renewed by progress.
    pub lease_ttl: Duration,
    /// Wall-clock limit of one attempt.
    pub timeout: Option<Duration>,
    /// At most this many trials running at once.
    pub max_concurrent: Option<usize>,
    /// At most this many trials proposed.
    pub run_cap: Option<u64>,
    /// The sweep's planned size (grid size or run_cap), when known: the total of every count.
    pub planned: Option<u64>,
    /// Name of the metric the sweep optimises.
    pub metric: String,
    pub goal: Goal,
    /// What each trial runs; sent to workers with every lease.
    pub runner: RunnerKind,
    /// For the noop runner: how long each trial pretends to work.
    pub noop_sleep_ms: u32,
    /// Stops trials whose metric falls behind at their evaluations ([`crate::prune`]).
    pub early_terminate: Option<EarlyTerminate>,
    /// Which completed trials keep their uploaded files.
    pub keep_weights: KeepWeights,
    /// Where uploaded files are kept; None: workers are not asked for them.
    pub weights: Option<Arc<WeightStore>>,
}

impl SchedulerPolicy {
    /// The per-file limit workers are told when their files are wanted.
    pub fn upload_limit(&self) -> Option<u64> {
        self.weights.as_ref().filter(|_| self.keep_weights.uploads()).map(|w| w.limit)
    }
}

impl Default for SchedulerPolicy {
    fn default() -> Self {
        SchedulerPolicy {
            max_attempts: 3,
            lease_ttl: Duration::from_secs(60),
            timeout: None,
            max_concurrent: None,
            run_cap: None,
            planned: None,
            metric: "loss".into(),
            goal: Goal::Minimize,
            runner: RunnerKind::Sae,
            noop_sleep_ms: 0,
            early_terminate: None,
            keep_weights: KeepWeights::default(),
            weights: None,
        }
    }
}

/// What identifies the sweep to start or resume.
#[derive(Debug, Clone)]
pub struct SweepInput {
    /// Sweep name (from the YAML).
    pub name: String,
    /// The YAML text, stored verbatim.
    pub yaml: String,
    /// Fingerprint of the normalised spec; a stored sweep with another one is refused.
    pub fingerprint: String,
    /// Start a new sweep even if one of this name exists (named `NAME-2`, `NAME-3`, ...).
    pub new_sweep: bool,
}

/// A granted lease, as the worker needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseGrant {
    pub lease_id: String,
    /// `{sweep}/{index}`.
    pub trial_id: String,
    pub sweep: String,
    pub index: u64,
    pub attempt: u32,
    /// The trial config as JSON text.
    pub config_json: String,
    pub ttl: Duration,
    pub timeout: Option<Duration>,
    pub runner: RunnerKind,
    pub noop_sleep_ms: u32,
    /// Upload the trial's files before a successful result, each at most this many bytes.
    pub upload_limit: Option<u64>,
}

/// Answer to a lease request: a lease, nothing (the wait elapsed), or shutdown.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LeaseOutcome {
    pub lease: Option<LeaseGrant>,
    /// The sweep is finished or the coordinator is stopping: the worker should exit.
    pub shutdown: bool,
}

/// Answer to a progress report.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProgressAck {
    /// The worker should stop this trial.
    pub stop: bool,
    pub reason: String,
    /// With `stop`: hand the lease back rather than report a result (shutdown).
    pub release: bool,
    /// With `stop`: the sweep's early termination rule stopped the trial; report its metrics so
    /// far as a pruned result.
    pub prune: bool,
}

/// Scalars of one evaluation during training, at its own step.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Evaluation {
    pub step: u64,
    pub scalars: BTreeMap<String, f64>,
    /// Its per-class statistics, when the data has labels: passed on to the events, not stored.
    pub classes: Option<Arc<ClassStats>>,
}

/// One progress report of a running attempt (validated at the edge).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProgressReport {
    /// The latest step and its sampled scalars.
    pub step: u64,
    pub scalars: BTreeMap<String, f64>,
    /// Every evaluation since the previous report, in step order.
    pub evaluations: Vec<Evaluation>,
}

/// The final outcome of an attempt, as reported by a worker (validated at the edge).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrialOutcome {
    pub success: bool,
    /// A failure that a retry cannot change (bad config or data, divergence): no requeue.
    pub permanent: bool,
    /// The step the trial ended at, when the worker said (0 = not said).
    pub final_step: u64,
    /// Finite values only.
    pub metrics: BTreeMap<String, f64>,
    pub error: String,
    pub artifact: Option<String>,
    pub duration_s: Option<f64>,
    /// Metrics the edge dropped (non-finite values), recorded as a note on the trial.
    pub dropped: Vec<String>,
    /// With `success`: the trial stopped early because early termination told it to (its
    /// metrics are those it had reached); it ends Pruned rather than Completed.
    pub pruned: bool,
    /// With `success`: the final evaluation's per-class statistics (passed on to the
    /// [`SchedulerEvent::TrialFinished`] event, not stored).
    pub classes: Option<Arc<ClassStats>>,
}

/// Answer to a completion: refused for a stale, unknown or already used lease.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CompleteAck {
    pub accepted: bool,
    pub reason: String,
}

/// The "then lease for worker W, waiting up to T" part of a completion: lets a worker hand in
/// a result and ask for its next trial in one round trip and one durable commit.
#[derive(Debug, Clone, PartialEq)]
pub struct NextLease {
    /// The worker asking (must be registered, as for [`SchedulerHandle::lease`]).
    pub worker_id: String,
    /// How long the lease part may wait for a trial (a long-poll, as for a lease request).
    pub wait: Duration,
}

/// Answer to a completion that may have carried a [`NextLease`] request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CompleteOutcome {
    /// Whether the result was taken (refused for a stale lease, as a plain completion).
    pub ack: CompleteAck,
    /// The answer to the lease part: a lease, nothing (the wait elapsed, no lease part, or the
    /// worker id is unknown: the client registers again and leases), or shutdown.
    pub next: LeaseOutcome,
}

/// The best completed trial so far (pruned trials never are: their metrics are from before
/// the end of training).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Best {
    pub index: u64,
    /// The metric as reported (not oriented).
    pub value: f64,
}

/// Live counts for progress displays (a `watch`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Counts {
    pub sweep: String,
    /// The sweep's size: the planned size while the search runs, what it proposed once it is
    /// done. Always `completed + pruned + failed + running + queued`.
    pub total: u64,
    pub proposed: u64,
    /// Trials not started yet, proposed or not.
    pub queued: u64,
    pub running: u64,
    pub completed: u64,
    /// Stopped early by the sweep's early termination rule (final, as completed ones).
    pub pruned: u64,
    pub failed: u64,
    /// Workers registered with this coordinator process.
    pub workers: u64,
    pub best: Option<Best>,
    /// Strategy done and every trial final.
    pub finished: bool,
    /// The scheduler stopped (shutdown, or a fatal store error given here).
    pub stopped: bool,
    pub error: Option<String>,
}

/// A registered worker as `msae-coordinator status` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WorkerState {
    pub id: String,
    pub name: String,
    pub device: String,
    /// `{sweep}/{index}` of its running trial.
    pub trial: Option<String>,
    /// Unix ms of its last request.
    pub last_seen_ms: u64,
}

/// Events for the progress display and the TensorBoard writer (a `broadcast`; slow receivers
/// may lag and miss events, the records in the store stay authoritative). Per-class statistics
/// live in events only: like progress scalars they feed TensorBoard as they arrive, and a
/// restarted coordinator goes on from the next evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum SchedulerEvent {
    /// A trial was leased (committed); `record` is its state as leased (params, config,
    /// attempt, lease).
    TrialStarted { index: u64, attempt: u32, worker: String, record: Box<TrialRecord> },
    /// Sampled scalars (`evaluation: false`) or one evaluation's scalars and per-class
    /// statistics, at `step`.
    TrialProgress {
        index: u64,
        step: u64,
        scalars: BTreeMap<String, f64>,
        evaluation: bool,
        classes: Option<Arc<ClassStats>>,
    },
    /// A trial reached Completed, Pruned or Failed (committed); `classes`: the final
    /// evaluation's per-class statistics, as its completion carried them.
    TrialFinished { record: Box<TrialRecord>, classes: Option<Arc<ClassStats>> },
}

/// Errors of the scheduler. `UnknownWorker` is the only one a client should handle by
/// re-registering and retrying; `Stopped` means the coordinator is going away.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `changes` lists the differing keys (empty when they differ only once normalised);
    /// `next` is the sweep `--new-sweep` would run and whether it exists already (resumed).
    #[error(
        "sweep {name} exists in DB with a different definition ({}); use --new-sweep ({}) or another name",
        describe_changes(.changes),
        describe_next(.next, .resumes)
    )]
    FingerprintMismatch { name: String, changes: Vec<String>, next: String, resumes: bool },
    #[error("cannot resume sweep {sweep}: at trial {index}, {detail}")]
    ReplayMismatch { sweep: String, index: u64, detail: String },
    #[error("unknown worker id {0:?} (the coordinator may have restarted): register again")]
    UnknownWorker(String),
    #[error("worker protocol version {got} is not supported; this coordinator speaks {expected}")]
    ProtocolVersion { got: u32, expected: u32 },
    #[error("invalid scheduler policy: {0}")]
    Policy(String),
    #[error("committing to the store failed: {0}")]
    Commit(String),
    #[error("the scheduler has stopped")]
    Stopped,
}

/// Result alias of the scheduler.
pub type Result<T, E = SchedulerError> = std::result::Result<T, E>;

type Reply<T> = oneshot::Sender<Result<T>>;

/// Messages to the actor.
enum Command {
    Register {
        name: String,
        device: String,
        protocol_version: u32,
        reply: Reply<String>,
    },
    Lease {
        worker_id: String,
        wait: Duration,
        reply: Reply<LeaseOutcome>,
    },
    Progress {
        lease_id: String,
        report: ProgressReport,
        reply: Reply<ProgressAck>,
    },
    Complete {
        lease_id: String,
        outcome: TrialOutcome,
        /// Then lease for this worker, in the same batch and commit.
        next: Option<NextLease>,
        reply: Reply<CompleteOutcome>,
    },
    Release {
        lease_id: String,
        reason: String,
        reply: Reply<bool>,
    },
    Renew {
        lease_id: String,
        reply: Reply<Option<(String, u64)>>,
    },
    Status {
        reply: Reply<Vec<WorkerState>>,
    },
    Snapshot {
        reply: Reply<(SweepRecord, Vec<TrialRecord>)>,
    },
    Shutdown {
        grace: Duration,
        reply: Reply<()>,
    },
}

/// Entry point: starts or resumes a sweep and spawns its actor.
pub struct Scheduler;

impl Scheduler {
    /// Starts sweep `input` on `store`, or resumes it when the store holds a sweep of that name
    /// with the same fingerprint (replaying `strategy` against the stored trials). Must be
    /// called inside a tokio runtime; the actor runs until [`SchedulerHandle::shutdown`] or
    /// until every handle is dropped.
    pub async fn start(
        store: Store,
        input: SweepInput,
        policy: SchedulerPolicy,
        strategy: Box<dyn Strategy>,
        make_config: MakeConfig,
    ) -> Result<SchedulerHandle> {
        if policy.max_attempts == 0 {
            return Err(SchedulerError::Policy("max_attempts must be at least 1".into()));
        }
        if policy.lease_ttl.is_zero() {
            return Err(SchedulerError::Policy("lease_ttl must be positive".into()));
        }
        let store = Arc::new(store);
        let weights = policy.upload_limit().and(policy.weights.clone());
        let metric = (policy.metric.clone(), policy.goal);
        let (sweep, trials, created) = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || load_or_create(&store, &input))
                .await
                .map_err(|e| SchedulerError::Commit(format!("loading task failed: {e}")))??
        };
        let now = crate::model::now_ms();
        let core = if created {
            core::Core::new(sweep, policy, strategy, make_config)
        } else {
            tracing::info!(sweep = %sweep.name, trials = trials.len(), "resuming sweep");
            let mut core = core::Core::resume(sweep, trials, policy, strategy, make_config, now)?;
            core.restore_pruning_history();
            core
        };
        let name = core.sweep().name.clone();
        let sweep_id = core.sweep().run_id();
        let (tx, rx) = mpsc::channel(4096);
        let (counts_tx, counts_rx) = watch::channel(core.counts());
        let (events_tx, _) = broadcast::channel(4096);
        let lossless = LosslessSinks::default();
        let commits = Arc::new(AtomicU64::new(0));
        let actor = actor::Actor::new(
            core,
            store.clone(),
            rx,
            counts_tx,
            events_tx.clone(),
            lossless.clone(),
            commits.clone(),
        );
        tokio::spawn(actor.run());
        Ok(SchedulerHandle {
            tx,
            counts: counts_rx,
            events: events_tx,
            lossless,
            store,
            sweep: name,
            sweep_id,
            commits,
            weights,
            metric,
        })
    }
}

/// Reads the stored sweep or records a new one; decides resume vs new vs refuse.
fn load_or_create(
    store: &Store,
    input: &SweepInput,
) -> Result<(SweepRecord, Vec<TrialRecord>, bool)> {
    let existing = store.sweep(&input.name)?;
    let name = match existing {
        Some(rec) if !input.new_sweep => {
            if rec.fingerprint != input.fingerprint {
                let changes = crate::spec::diff::changes(&rec.yaml, &input.yaml);
                let (next, resumes) = match new_sweep_name(store, input)? {
                    NewSweep::Free(name) => (name, false),
                    NewSweep::Existing(rec) => (rec.name, true),
                };
                return Err(SchedulerError::FingerprintMismatch {
                    name: rec.name,
                    changes,
                    next,
                    resumes,
                });
            }
            let trials = store.trials(&rec.name)?;
            return Ok((rec, trials, false));
        }
        Some(rec) if rec.fingerprint == input.fingerprint => {
            // Asked for a new sweep with an unchanged definition: this one is it.
            let trials = store.trials(&rec.name)?;
            return Ok((rec, trials, false));
        }
        Some(_) => match new_sweep_name(store, input)? {
            NewSweep::Free(name) => name,
            NewSweep::Existing(rec) => {
                let trials = store.trials(&rec.name)?;
                return Ok((rec, trials, false));
            }
        },
        None => input.name.clone(),
    };
    let rec = SweepRecord {
        name,
        yaml: input.yaml.clone(),
        fingerprint: input.fingerprint.clone(),
        created_ms: crate::model::now_ms(),
        proposed: 0,
        finished: false,
        uid: Some(SweepRecord::new_uid()),
    };
    let mut batch = WriteBatch::new();
    batch.put_sweep(&rec);
    store.write(&batch)?;
    tracing::info!(sweep = %rec.name, "new sweep recorded");
    Ok((rec, Vec::new(), true))
}

fn describe_changes(changes: &[String]) -> String {
    if changes.is_empty() {
        "they differ only once normalised".into()
    } else {
        format!("changed: {}", crate::spec::diff::summary(changes))
    }
}

fn describe_next(next: &str, resumes: &bool) -> String {
    if *resumes {
        format!("resumes {next}, started earlier from this definition")
    } else {
        format!("starts {next}")
    }
}

/// The sweep `--new-sweep` runs when NAME exists with another definition.
enum NewSweep {
    /// The first free `NAME-k`, k >= 2.
    Free(String),
    /// A `NAME-k` started earlier from this same definition: resumed.
    Existing(SweepRecord),
}

fn new_sweep_name(store: &Store, input: &SweepInput) -> Result<NewSweep> {
    let mut k = 2u64;
    loop {
        let candidate = format!("{}-{k}", input.name);
        match store.sweep(&candidate)? {
            None => return Ok(NewSweep::Free(candidate)),
            Some(rec) if rec.fingerprint == input.fingerprint => {
                return Ok(NewSweep::Existing(rec));
            }
            Some(_) => k += 1,
        }
    }
}

/// A cheap, cloneable handle to a running scheduler.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Command>,
    counts: watch::Receiver<Counts>,
    events: broadcast::Sender<SchedulerEvent>,
    lossless: LosslessSinks,
    store: Arc<Store>,
    sweep: String,
    sweep_id: String,
    commits: Arc<AtomicU64>,
    weights: Option<Arc<WeightStore>>,
    /// The sweep metric and its goal.
    metric: (String, Goal),
}

/// Subscribers that must see every event (the TensorBoard writer: an evaluation is a point on
/// a curve, not a sample). Unbounded: such a consumer only writes files and keeps up.
pub(crate) type LosslessSinks = Arc<std::sync::Mutex<Vec<mpsc::UnboundedSender<SchedulerEvent>>>>;

impl SchedulerHandle {
    /// Store write transactions the actor has committed so far (the durable-commit cost of the
    /// work done: with group commit, fewer than the state changes).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// The name of the sweep this scheduler runs (may be `NAME-2` after `new_sweep`).
    pub fn sweep_name(&self) -> &str {
        &self.sweep
    }

    /// The stable id of the sweep this scheduler runs ([`SweepRecord::run_id`]).
    pub fn sweep_id(&self) -> &str {
        &self.sweep_id
    }

    /// The store (for read-only queries of other sweeps; writes belong to the actor).
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| SchedulerError::Stopped)?;
        rx.await.map_err(|_| SchedulerError::Stopped)?
    }

    /// Registers a worker; returns its id.
    pub async fn register(
        &self,
        name: &str,
        device: &str,
        protocol_version: u32,
    ) -> Result<String> {
        let (name, device) = (name.to_string(), device.to_string());
        self.ask(|reply| Command::Register { name, device, protocol_version, reply }).await
    }

    /// Long-polls for a lease for at most `wait`.
    pub async fn lease(&self, worker_id: &str, wait: Duration) -> Result<LeaseOutcome> {
        let worker_id = worker_id.to_string();
        self.ask(|reply| Command::Lease { worker_id, wait, reply }).await
    }

    /// Reports progress of a lease (renews it).
    pub async fn progress(&self, lease_id: &str, report: ProgressReport) -> Result<ProgressAck> {
        let lease_id = lease_id.to_string();
        self.ask(|reply| Command::Progress { lease_id, report, reply }).await
    }

    /// Renews a lease without progress (a long upload): the trial's sweep and index, or None
    /// when the lease is not current.
    pub async fn renew(&self, lease_id: &str) -> Result<Option<(String, u64)>> {
        let lease_id = lease_id.to_string();
        self.ask(|reply| Command::Renew { lease_id, reply }).await
    }

    /// The workers this coordinator process knows, in registration order.
    pub async fn workers(&self) -> Result<Vec<WorkerState>> {
        self.ask(|reply| Command::Status { reply }).await
    }

    /// The sweep metric and its goal.
    pub fn metric(&self) -> (&str, Goal) {
        (&self.metric.0, self.metric.1)
    }

    /// Where uploaded files are kept and up to what size; None when no files are wanted.
    pub fn weights(&self) -> Option<Arc<WeightStore>> {
        self.weights.clone()
    }

    /// Reports the final outcome of a lease.
    pub async fn complete(&self, lease_id: &str, outcome: TrialOutcome) -> Result<CompleteAck> {
        Ok(self.complete_then_lease(lease_id, outcome, None).await?.ack)
    }

    /// Reports the final outcome of a lease and, with `next`, asks for the worker's next lease
    /// in the same command: both are applied in one batch and answered after ONE commit (the
    /// lease part long-polls up to `next.wait` like [`SchedulerHandle::lease`]). A refused
    /// (stale) result may still get a lease; an unknown worker gets its result acknowledged
    /// and no lease (it registers again and leases as usual).
    pub async fn complete_then_lease(
        &self,
        lease_id: &str,
        outcome: TrialOutcome,
        next: Option<NextLease>,
    ) -> Result<CompleteOutcome> {
        let lease_id = lease_id.to_string();
        self.ask(|reply| Command::Complete { lease_id, outcome, next, reply }).await
    }

    /// Hands a lease back without counting a failure.
    pub async fn release(&self, lease_id: &str, reason: &str) -> Result<bool> {
        let (lease_id, reason) = (lease_id.to_string(), reason.to_string());
        self.ask(|reply| Command::Release { lease_id, reason, reply }).await
    }

    /// Every stored sweep; this scheduler's sweep as it is in memory now.
    pub async fn sweeps(&self) -> Result<Vec<SweepRecord>> {
        let (current, _) = self.ask(|reply| Command::Snapshot { reply }).await?;
        let store = self.store.clone();
        let mut all = tokio::task::spawn_blocking(move || store.sweeps())
            .await
            .map_err(|e| SchedulerError::Commit(format!("read task failed: {e}")))??;
        for s in &mut all {
            if s.name == current.name {
                *s = current.clone();
            }
        }
        Ok(all)
    }

    /// Every stored sweep and the stored trials of `sweep`, read from the store (after a
    /// shutdown, when the actor no longer answers, this is the final state).
    pub async fn stored(&self, sweep: &str) -> Result<(Vec<SweepRecord>, Vec<TrialRecord>)> {
        let store = self.store.clone();
        let sweep = sweep.to_string();
        let read = move || -> Result<_> { Ok((store.sweeps()?, store.trials(&sweep)?)) };
        tokio::task::spawn_blocking(read)
            .await
            .map_err(|e| SchedulerError::Commit(format!("read task failed: {e}")))?
    }

    /// The trials of `sweep` in index order (this scheduler's sweep from memory, others from
    /// the store).
    pub async fn records(&self, sweep: &str) -> Result<Vec<TrialRecord>> {
        if sweep == self.sweep {
            let (_, trials) = self.ask(|reply| Command::Snapshot { reply }).await?;
            return Ok(trials);
        }
        let store = self.store.clone();
        let sweep = sweep.to_string();
        Ok(tokio::task::spawn_blocking(move || store.trials(&sweep))
            .await
            .map_err(|e| SchedulerError::Commit(format!("read task failed: {e}")))??)
    }

    /// Live counts.
    pub fn counts(&self) -> watch::Receiver<Counts> {
        self.counts.clone()
    }

    /// Subscribes to trial events from now on; a slow receiver may lag and miss some.
    pub fn events(&self) -> broadcast::Receiver<SchedulerEvent> {
        self.events.subscribe()
    }

    /// Subscribes to every trial event from now on, none dropped.
    pub fn events_lossless(&self) -> mpsc::UnboundedReceiver<SchedulerEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lossless.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
        rx
    }

    /// Waits until the sweep is finished (Ok) or the scheduler stopped before (Err).
    pub async fn finished(&self) -> Result<Counts> {
        let mut rx = self.counts.clone();
        let counts = rx
            .wait_for(|c| c.finished || c.stopped)
            .await
            .map_err(|_| SchedulerError::Stopped)?
            .clone();
        match (&counts.error, counts.finished) {
            (Some(e), _) => Err(SchedulerError::Commit(e.clone())),
            (None, true) => Ok(counts),
            (None, false) => Err(SchedulerError::Stopped),
        }
    }

    /// Stops dispatching (lease replies say shutdown, progress replies say stop), lets running
    /// trials be completed or released for up to `grace`, flushes and stops the actor.
    pub async fn shutdown(&self, grace: Duration) -> Result<()> {
        match self.ask(|reply| Command::Shutdown { grace, reply }).await {
            Err(SchedulerError::Stopped) => Ok(()),
            other => other,
        }
    }
}
