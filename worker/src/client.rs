//! The worker's client loop (`msae-worker --coordinator URL`): register with the coordinator,
//! long-poll for leases, run each leased trial on a blocking thread, report progress (which
//! renews the lease) and deliver the result.
//!
//! Robustness rules, and why:
//! - The coordinator may restart at any time. Calls that fail as transient (`Unavailable`,
//!   timeouts, ...) are retried with capped exponential backoff and jitter; a finished result is
//!   kept in memory and re-sent until the coordinator accepts it or explicitly refuses it
//!   (`accepted = false`: a stale lease, whose trial someone else owns now), so a coordinator
//!   restart loses no work. `NotFound` for our worker id means the coordinator forgot us:
//!   register again.
//! - A trial must never lose its lease because one training step is slow: progress reports go
//!   out whenever the trainer reports (at most every `progress_min_interval`), and a heartbeat
//!   with the last known step goes out every `ttl / 3` regardless.
//! - The runner is synchronous and may take hours; it is stopped cooperatively through
//!   [`Control::Stop`], returned from its progress callback when the coordinator says stop, the
//!   trial's `timeout_s` passes, or the worker shuts down. On shutdown the lease is handed back
//!   (`Release`) so the trial is requeued at once instead of after the lease expires.
//! - One round trip per trial: a result goes out with the worker's next lease request
//!   (`lease_next`), so the coordinator commits both at once and the reply carries the next
//!   lease (or says shutdown); only when it carries neither does the worker send a `Lease`.
//!   An unknown worker id (the coordinator restarted) does not cost the result: it is
//!   accepted without a lease, and the `Lease` that follows triggers the re-registration.
//!   No next lease is asked for when the worker is shutting down or `max_trials` is reached.
//! - Invalid leases (bad JSON, a config `validate()` refuses, an unknown runner kind) are
//!   reported as failed trials with the reason, never a panic.

use crate::noop::NoopRunner;
use crate::runner::{Control, Progress, ProgressKind, RunOptions, TrialOutcome, TrialRunner};
use msae_shared::TrialConfig;
use msae_shared::proto::coordinator_client::CoordinatorClient;
use msae_shared::proto::{
    CompleteRequest, Lease, LeaseRequest, ProgressRequest, RegisterRequest, ReleaseRequest,
};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Options of the worker loop. [`ClientOptions::new`] fills in the defaults.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Coordinator URL, e.g. `http://127.0.0.1:50051`.
    pub coordinator: String,
    /// Worker name shown by the coordinator (default: `{hostname}-{pid}`).
    pub name: String,
    /// CUDA device ordinal to train on; None = CPU.
    pub gpu: Option<usize>,
    /// Shared secret sent as `authorization: Bearer TOKEN`.
    pub token: Option<String>,
    /// Artifacts of a trial go to `{out_dir}/{sweep}/{index}` when set.
    pub out_dir: Option<PathBuf>,
    /// Exit after handling this many leases.
    pub max_trials: Option<usize>,
    /// How long one `Lease` long-poll may wait on the coordinator.
    pub poll_wait: Duration,
    /// Limit of every other call (and the extra time allowed to a long-poll).
    pub rpc_timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// First retry delay after a transient failure; doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    /// Largest retry delay.
    pub backoff_max: Duration,
    /// Progress from the trainer is forwarded at most this often (heartbeats aside).
    pub progress_min_interval: Duration,
    /// On shutdown, how long to wait for the running trial to honour `Stop` before releasing
    /// its lease anyway.
    pub stop_grace: Duration,
}

impl ClientOptions {
    /// Options with defaults for a coordinator at `coordinator`.
    pub fn new(coordinator: impl Into<String>) -> Self {
        ClientOptions {
            coordinator: coordinator.into(),
            name: default_worker_name(),
            gpu: None,
            token: None,
            out_dir: None,
            max_trials: None,
            poll_wait: Duration::from_secs(20),
            rpc_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            progress_min_interval: Duration::from_secs(1),
            stop_grace: Duration::from_secs(60),
        }
    }

    /// The device string sent at registration: `cpu` or `cuda:N`.
    pub fn device(&self) -> String {
        match self.gpu {
            Some(n) => format!("cuda:{n}"),
            None => "cpu".to_string(),
        }
    }
}

/// `{hostname}-{pid}`: unique enough per machine, readable in reports.
pub fn default_worker_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_string());
    format!("{host}-{}", std::process::id())
}

/// What a worker did before it returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerSummary {
    /// The id of the last registration.
    pub worker_id: String,
    /// Leases received.
    pub leases: usize,
    /// Results accepted by the coordinator, successful trials.
    pub succeeded: usize,
    /// Results accepted by the coordinator, failed trials.
    pub failed: usize,
    /// Results the coordinator refused (stale leases).
    pub refused: usize,
    /// Leases handed back without a result (shutdown).
    pub released: usize,
    /// Results given up on at shutdown because the coordinator was unreachable (their leases
    /// expire and the trials run again).
    pub lost: usize,
}

/// Adds `authorization: Bearer TOKEN` to every call when a token is set.
#[derive(Clone)]
struct BearerAuth(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert(msae_shared::auth::AUTHORIZATION, value.clone());
        }
        Ok(request)
    }
}

type Client = CoordinatorClient<InterceptedService<Channel, BearerAuth>>;

/// Runs the worker loop until `shutdown` resolves, the coordinator says it is finishing,
/// `max_trials` leases were handled, or a fatal error (bad URL or token, protocol refused).
///
/// `sae_runner` runs leases whose runner kind is `"sae"` (or empty); `"noop"` leases run a
/// [`NoopRunner`] sleeping the lease's `noop_sleep_ms`.
pub async fn run_worker(
    opts: ClientOptions,
    sae_runner: Arc<dyn TrialRunner>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<WorkerSummary> {
    let (tx, rx) = watch::channel(false);
    let worker = Worker::new(opts, sae_runner, ShutdownSignal(rx))?;
    let work = worker.run();
    tokio::pin!(work);
    tokio::select! {
        result = &mut work => return result,
        () = shutdown => {
            tracing::info!("shutdown requested: stopping the running trial and handing its lease back");
            let _ = tx.send(true);
        }
    }
    // The loop sees the signal, stops the trial, releases the lease and returns.
    work.await
}

/// How long a result call that also asked for the next lease may still answer after a
/// shutdown request before it is cut short and the result resent alone.
const SHUTDOWN_REPLY_GRACE: Duration = Duration::from_secs(2);

/// A cloneable view of the shutdown request.
#[derive(Clone)]
struct ShutdownSignal(watch::Receiver<bool>);

impl ShutdownSignal {
    fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown is requested.
    async fn wait(&mut self) {
        // An error means the sender is gone, i.e. run_worker is returning: same thing.
        let _ = self.0.wait_for(|set| *set).await;
    }
}

/// Exponential backoff with jitter (each delay uniformly in [d/2, d]) so that many workers
/// retrying against a restarted coordinator do not arrive in lockstep.
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max, next: initial }
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(0.5 + 0.5 * rand::random::<f64>())
    }
}

/// Errors worth retrying: the coordinator is away, restarting or overloaded.
fn is_transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Internal
    )
}

/// Awaits a call with a time limit; a timeout reads as `DeadlineExceeded` (transient).
async fn timed<T>(
    limit: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!("no answer within {limit:?}"))),
    }
}

/// Why a running trial was asked to stop.
#[derive(Debug, Clone, PartialEq)]
enum StopCause {
    /// The coordinator said stop (early stopping, cancellation).
    Coordinator(String),
    /// The coordinator no longer knows the lease.
    LeaseLost(String),
    /// The trial's `timeout_s` passed.
    Timeout(f64),
    /// The worker is shutting down.
    Shutdown,
    /// The coordinator asked for the lease back (it is shutting down): no result is reported.
    Release(String),
}

impl std::fmt::Display for StopCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopCause::Coordinator(reason) => write!(f, "stopped by the coordinator: {reason}"),
            StopCause::LeaseLost(reason) => write!(f, "lease lost: {reason}"),
            StopCause::Timeout(secs) => write!(f, "trial exceeded its timeout of {secs} s"),
            StopCause::Shutdown => write!(f, "worker shutting down"),
            StopCause::Release(reason) => write!(f, "handed back: {reason}"),
        }
    }
}

/// Evaluations the runner made that no accepted progress report has carried yet, in step
/// order. A std mutex: never held across an await.
#[derive(Clone, Default)]
struct Evaluations(Arc<Mutex<Vec<msae_shared::proto::Evaluation>>>);

impl Evaluations {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<msae_shared::proto::Evaluation>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, p: &Progress) {
        let scalars = p.scalars.iter().map(|(k, v)| (k.clone(), *v)).collect();
        self.lock().push(msae_shared::proto::Evaluation { step: p.step, scalars });
    }

    fn take(&self) -> Vec<msae_shared::proto::Evaluation> {
        std::mem::take(&mut *self.lock())
    }

    /// Puts back evaluations whose report failed, ahead of any made since.
    fn restore(&self, mut earlier: Vec<msae_shared::proto::Evaluation>) {
        let mut pending = self.lock();
        earlier.append(&mut pending);
        *pending = earlier;
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// Shared between the async side and the runner's progress callback. Set once: the first
/// cause wins. A std mutex: never held across an await.
#[derive(Clone, Default)]
struct StopFlag(Arc<Mutex<Option<StopCause>>>);

impl StopFlag {
    fn set(&self, cause: StopCause) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(cause);
        }
    }

    fn get(&self) -> Option<StopCause> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What the coordinator said after a result, about the worker's next step.
#[derive(Debug, Default)]
struct After {
    /// The next lease, carried by the reply to the result (no `Lease` call needed).
    lease: Option<Lease>,
    /// The coordinator is finishing: exit (after running `lease`, if any).
    shutdown: bool,
}

/// How a lease ended on this worker.
enum Finished {
    /// Report this to the coordinator.
    Report(CompleteRequest),
    /// Hand the lease back (shutdown).
    Release(String),
}

struct Worker {
    opts: ClientOptions,
    client: Client,
    sae: Arc<dyn TrialRunner>,
    shutdown: ShutdownSignal,
    summary: WorkerSummary,
}

impl Worker {
    fn new(
        opts: ClientOptions,
        sae: Arc<dyn TrialRunner>,
        shutdown: ShutdownSignal,
    ) -> anyhow::Result<Self> {
        let endpoint = Endpoint::from_shared(opts.coordinator.clone())
            .map_err(|e| anyhow::anyhow!("invalid coordinator URL {:?}: {e}", opts.coordinator))?
            .connect_timeout(opts.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        // Lazy: connects on the first call and reconnects after the coordinator comes back.
        let channel = endpoint.connect_lazy();
        let auth = opts.token.as_deref().map(msae_shared::auth::bearer).transpose()?;
        let client = CoordinatorClient::with_interceptor(channel, BearerAuth(auth));
        Ok(Worker { opts, client, sae, shutdown, summary: WorkerSummary::default() })
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(self.opts.backoff_initial, self.opts.backoff_max)
    }

    /// Sleeps `delay` unless shutdown comes first; returns false on shutdown.
    async fn sleep_or_shutdown(&self, delay: Duration) -> bool {
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = shutdown.wait() => false,
        }
    }

    async fn run(mut self) -> anyhow::Result<WorkerSummary> {
        if !self.register().await? {
            return Ok(self.summary);
        }
        let mut backoff = self.backoff();
        loop {
            if self.shutdown.is_set() {
                break;
            }
            if self.opts.max_trials.is_some_and(|max| self.summary.leases >= max) {
                tracing::info!(leases = self.summary.leases, "max trials reached; worker exits");
                break;
            }
            let request = LeaseRequest {
                worker_id: self.summary.worker_id.clone(),
                wait_ms: self.opts.poll_wait.as_millis().min(u32::MAX as u128) as u32,
            };
            let mut client = self.client.clone();
            let mut shutdown = self.shutdown.clone();
            let limit = self.opts.poll_wait + self.opts.rpc_timeout;
            let reply = tokio::select! {
                () = shutdown.wait() => break,
                reply = timed(limit, client.lease(request)) => reply,
            };
            match reply {
                Ok(reply) => {
                    backoff.reset();
                    let mut after = After { lease: reply.lease, shutdown: reply.shutdown };
                    // Each result's reply may carry the next lease: run them back to back.
                    while let Some(lease) = after.lease.take() {
                        if self.shutdown.is_set() {
                            // Asked for before the shutdown came: hand it back at once.
                            self.summary.leases += 1;
                            self.release(&lease, StopCause::Shutdown.to_string()).await;
                            break;
                        }
                        let shutdown = after.shutdown;
                        after = self.handle_lease(lease).await?;
                        after.shutdown |= shutdown;
                    }
                    if after.shutdown {
                        tracing::info!("the coordinator is finishing; worker exits");
                        break;
                    }
                }
                Err(status) if status.code() == Code::NotFound => {
                    tracing::warn!(worker_id = %self.summary.worker_id, message = status.message(),
                        "the coordinator does not know this worker; registering again");
                    if !self.register().await? {
                        break;
                    }
                }
                Err(status) if is_transient(&status) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(coordinator = %self.opts.coordinator, code = ?status.code(),
                        message = status.message(), retry_in = ?delay, "lease request failed");
                    if !self.sleep_or_shutdown(delay).await {
                        break;
                    }
                }
                Err(status) => anyhow::bail!(
                    "coordinator {} refused the lease request of worker {}: {:?}: {}",
                    self.opts.coordinator,
                    self.summary.worker_id,
                    status.code(),
                    status.message()
                ),
            }
        }
        Ok(self.summary)
    }

    /// Registers (retrying while the coordinator is away). Ok(false) if shutdown came first;
    /// Err when the coordinator refuses us (protocol version, token).
    async fn register(&mut self) -> anyhow::Result<bool> {
        let mut backoff = self.backoff();
        loop {
            if self.shutdown.is_set() {
                return Ok(false);
            }
            let request = RegisterRequest {
                protocol_version: msae_shared::PROTOCOL_VERSION,
                name: self.opts.name.clone(),
                device: self.opts.device(),
            };
            let mut client = self.client.clone();
            match timed(self.opts.rpc_timeout, client.register(request)).await {
                Ok(reply) => {
                    tracing::info!(worker_id = %reply.worker_id, name = %self.opts.name, device = %self.opts.device(),
                        coordinator = %self.opts.coordinator, coordinator_version = %reply.coordinator_version, "registered");
                    self.summary.worker_id = reply.worker_id;
                    return Ok(true);
                }
                Err(status) if is_transient(&status) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(coordinator = %self.opts.coordinator, code = ?status.code(),
                        message = status.message(), retry_in = ?delay, "cannot register yet");
                    if !self.sleep_or_shutdown(delay).await {
                        return Ok(false);
                    }
                }
                Err(status) => anyhow::bail!(
                    "coordinator {} refused to register worker {:?}: {:?}: {}",
                    self.opts.coordinator,
                    self.opts.name,
                    status.code(),
                    status.message()
                ),
            }
        }
    }

    /// Runs a lease to its end and reports it; returns what the result's reply said about the
    /// next step.
    async fn handle_lease(&mut self, lease: Lease) -> anyhow::Result<After> {
        self.summary.leases += 1;
        tracing::info!(trial = %lease.trial_id, attempt = lease.attempt, lease = %lease.lease_id,
            runner = %lease.runner, "leased trial");
        let started = Instant::now();
        let finished = match self.prepare(&lease) {
            Ok((runner, config)) => self.run_trial(&lease, runner, config, started).await,
            Err(error) => {
                tracing::warn!(trial = %lease.trial_id, %error, "cannot run leased trial");
                Finished::Report(CompleteRequest {
                    lease_id: lease.lease_id.clone(),
                    success: false,
                    error,
                    duration_s: started.elapsed().as_secs_f64(),
                    ..Default::default()
                })
            }
        };
        match finished {
            Finished::Report(request) => self.deliver(&lease, request).await,
            Finished::Release(reason) => {
                self.release(&lease, reason).await;
                Ok(After::default())
            }
        }
    }

    /// Picks the runner and parses the config of a lease; Err is the failure reason.
    fn prepare(&self, lease: &Lease) -> Result<(Arc<dyn TrialRunner>, TrialConfig), String> {
        let runner: Arc<dyn TrialRunner> = match lease.runner.as_str() {
            "" | "sae" => self.sae.clone(),
            "noop" => Arc::new(NoopRunner::new(Duration::from_millis(lease.noop_sleep_ms as u64))),
            other => {
                return Err(format!(
                    "unknown trial runner kind {other:?} (expected \"sae\" or \"noop\")"
                ));
            }
        };
        let config: TrialConfig = serde_json::from_str(&lease.config_json).map_err(|e| {
            format!("trial {}: config_json is not a valid trial config: {e}", lease.trial_id)
        })?;
        config
            .validate()
            .map_err(|e| format!("trial {}: invalid trial config: {e}", lease.trial_id))?;
        Ok((runner, config))
    }

    /// Where a trial's artifacts go: `{out_dir}/{sweep}/{index}`, path components sanitised.
    fn trial_out_dir(&self, lease: &Lease) -> Option<PathBuf> {
        let mut dir = self.opts.out_dir.clone()?;
        for part in lease.trial_id.split('/') {
            let clean: String = part
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' }
                })
                .collect();
            dir.push(if clean.is_empty() || clean.chars().all(|c| c == '.') {
                "_".to_string()
            } else {
                clean
            });
        }
        Some(dir)
    }

    /// Runs the trial on a blocking thread while this task reports progress and heartbeats.
    async fn run_trial(
        &self,
        lease: &Lease,
        runner: Arc<dyn TrialRunner>,
        config: TrialConfig,
        started: Instant,
    ) -> Finished {
        let stop = StopFlag::default();
        let (progress_tx, mut progress_rx) = watch::channel::<Option<Progress>>(None);
        // Samples are superseded by the next one (a watch); evaluations are queued so that
        // every one reaches the coordinator, at its own step.
        let evaluations = Evaluations::default();
        let callback_evaluations = evaluations.clone();
        let deadline =
            (lease.timeout_s > 0.0).then(|| started + Duration::from_secs_f64(lease.timeout_s));
        let timeout_s = lease.timeout_s;
        let options = RunOptions { gpu: self.opts.gpu, out_dir: self.trial_out_dir(lease) };

        let callback_stop = stop.clone();
        let mut handle = tokio::task::spawn_blocking(move || {
            let mut callback = |progress: &Progress| -> Control {
                if progress.kind == ProgressKind::Evaluation {
                    callback_evaluations.push(progress);
                }
                progress_tx.send_replace(Some(progress.clone()));
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    callback_stop.set(StopCause::Timeout(timeout_s));
                }
                match callback_stop.get() {
                    Some(cause) => Control::Stop(cause.to_string()),
                    None => Control::Continue,
                }
            };
            runner.run(&config, &options, &mut callback)
        });

        // Heartbeat at ttl/3 so a lease survives two lost reports; 10 s if the coordinator
        // gave no ttl.
        let heartbeat = if lease.ttl_ms > 0 {
            Duration::from_millis(lease.ttl_ms as u64 / 3).max(Duration::from_millis(10))
        } else {
            Duration::from_secs(10)
        };
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sent: Option<Instant> = None;
        let mut progress_open = true;
        let mut shutdown = self.shutdown.clone();
        let mut grace_until: Option<Instant> = None;

        let joined = loop {
            tokio::select! {
                joined = &mut handle => break Some(joined),
                changed = progress_rx.changed(), if progress_open => {
                    if changed.is_err() {
                        progress_open = false; // the runner returned; `handle` resolves next
                        continue;
                    }
                    if last_sent.is_none_or(|t| t.elapsed() >= self.opts.progress_min_interval) {
                        let latest = progress_rx.borrow_and_update().clone();
                        self.send_progress(lease, latest, &evaluations, &stop).await;
                        last_sent = Some(Instant::now());
                    }
                }
                _ = ticker.tick() => {
                    let latest = progress_rx.borrow_and_update().clone();
                    self.send_progress(lease, latest, &evaluations, &stop).await;
                    last_sent = Some(Instant::now());
                }
                () = sleep_until_opt(deadline), if stop.get().is_none() => {
                    tracing::warn!(trial = %lease.trial_id, timeout_s, "trial timed out; stopping it");
                    stop.set(StopCause::Timeout(timeout_s));
                }
                () = shutdown.wait(), if grace_until.is_none() => {
                    stop.set(StopCause::Shutdown);
                    grace_until = Some(Instant::now() + self.opts.stop_grace);
                }
                () = sleep_until_opt(grace_until) => {
                    tracing::warn!(trial = %lease.trial_id, grace = ?self.opts.stop_grace,
                        "the trial did not stop in time; handing its lease back anyway");
                    break None;
                }
            }
        };
        let duration_s = started.elapsed().as_secs_f64();
        let cause = stop.get();
        // Shutdown hands the lease back, unless the trial ran to its end anyway: then the
        // result is worth delivering.
        let ran_to_end = matches!(&joined, Some(Ok(Ok(outcome))) if outcome.stopped.is_none());
        if joined.is_none() {
            return Finished::Release(StopCause::Shutdown.to_string());
        }
        if let Some(c @ (StopCause::Shutdown | StopCause::Release(_))) = &cause
            && !ran_to_end
        {
            return Finished::Release(c.to_string());
        }
        // Evaluations made since the last report go out before the result.
        if !evaluations.is_empty() {
            self.send_progress(lease, None, &evaluations, &stop).await;
        }
        let mut request =
            CompleteRequest { lease_id: lease.lease_id.clone(), duration_s, ..Default::default() };
        match joined {
            Some(Ok(Ok(outcome))) => fill_outcome(&mut request, outcome, cause),
            Some(Ok(Err(error))) => {
                request.success = false;
                request.permanent = crate::train::is_permanent(&error);
                request.error = format!("{error:#}");
            }
            Some(Err(join_error)) => {
                request.success = false;
                request.error = format!("trial runner panicked: {join_error}");
            }
            None => unreachable!("only the shutdown grace ends the loop without a result"),
        }
        Finished::Report(request)
    }

    /// Sends one progress report; a stop reply or a lost lease sets `stop`. Failures are
    /// logged only: the next heartbeat retries, and the result is delivered with retries.
    async fn send_progress(
        &self,
        lease: &Lease,
        latest: Option<Progress>,
        evaluations: &Evaluations,
        stop: &StopFlag,
    ) {
        let pending = evaluations.take();
        let (step, scalars) = match latest {
            // An evaluation travels as one and final metrics as the result; sent again as a
            // sample they would be duplicates.
            Some(p) if p.kind != ProgressKind::Sample => (p.step, Default::default()),
            Some(p) => (p.step, p.scalars.into_iter().collect()),
            None => (pending.last().map_or(0, |e| e.step), Default::default()),
        };
        let request = ProgressRequest {
            lease_id: lease.lease_id.clone(),
            step,
            scalars,
            evaluations: pending.clone(),
        };
        let mut client = self.client.clone();
        let reply = timed(self.opts.rpc_timeout, client.progress(request)).await;
        if matches!(&reply, Err(s) if !matches!(s.code(), Code::NotFound | Code::FailedPrecondition))
        {
            // Not delivered: the next report carries them again.
            evaluations.restore(pending);
        }
        match reply {
            Ok(reply) if reply.stop && reply.release => {
                tracing::info!(trial = %lease.trial_id, reason = %reply.reason, "the coordinator asked for the lease back");
                stop.set(StopCause::Release(reply.reason));
            }
            Ok(reply) if reply.stop => {
                tracing::info!(trial = %lease.trial_id, reason = %reply.reason, "the coordinator asked to stop the trial");
                stop.set(StopCause::Coordinator(reply.reason));
            }
            Ok(_) => {}
            Err(status) if matches!(status.code(), Code::NotFound | Code::FailedPrecondition) => {
                tracing::warn!(trial = %lease.trial_id, message = status.message(), "lease lost; stopping the trial");
                stop.set(StopCause::LeaseLost(status.message().to_string()));
            }
            Err(status) => {
                tracing::warn!(trial = %lease.trial_id, code = ?status.code(), message = status.message(),
                    "progress report failed; the next heartbeat retries");
            }
        }
    }

    /// Whether a result should carry the next lease request: not when shutting down or when
    /// this worker has handled all the leases it may.
    fn wants_next_lease(&self) -> bool {
        !self.shutdown.is_set() && self.opts.max_trials.is_none_or(|max| self.summary.leases < max)
    }

    /// Delivers a result until it is accepted or refused (with the next lease request when
    /// [`Self::wants_next_lease`]). At shutdown, one last try without it. Returns what the
    /// reply said about the next step.
    async fn deliver(
        &mut self,
        lease: &Lease,
        mut request: CompleteRequest,
    ) -> anyhow::Result<After> {
        let mut backoff = self.backoff();
        loop {
            let last_try = self.shutdown.is_set();
            let ask_next = self.wants_next_lease();
            request.lease_next = ask_next;
            request.worker_id =
                if ask_next { self.summary.worker_id.clone() } else { String::new() };
            request.wait_ms = if ask_next {
                self.opts.poll_wait.as_millis().min(u32::MAX as u128) as u32
            } else {
                0
            };
            let mut client = self.client.clone();
            let reply = if ask_next {
                // The lease part may long-poll. A shutdown first gives the call a moment (its
                // reply is usually in flight: a finished sweep dismisses workers as it
                // completes their last trial), then cuts it short; the loop resends the result
                // alone (refused as stale if the cut call had been taken: the result is
                // committed either way).
                let limit = self.opts.poll_wait + self.opts.rpc_timeout;
                let mut shutdown = self.shutdown.clone();
                let call = timed(limit, client.complete(request.clone()));
                tokio::pin!(call);
                tokio::select! {
                    reply = &mut call => reply,
                    () = shutdown.wait() => {
                        match tokio::time::timeout(SHUTDOWN_REPLY_GRACE, &mut call).await {
                            Ok(reply) => reply,
                            Err(_) => continue,
                        }
                    }
                }
            } else {
                timed(self.opts.rpc_timeout, client.complete(request.clone())).await
            };
            match reply {
                Ok(reply) if reply.accepted => {
                    tracing::info!(trial = %lease.trial_id, success = request.success, duration_s = request.duration_s,
                        error = %request.error, "result accepted");
                    if request.success {
                        self.summary.succeeded += 1;
                    } else {
                        self.summary.failed += 1;
                    }
                    return Ok(After { lease: reply.next, shutdown: reply.shutdown });
                }
                Ok(reply) => {
                    tracing::warn!(trial = %lease.trial_id, lease = %lease.lease_id, reason = %reply.reason,
                        "the coordinator refused the result (stale lease); dropping it");
                    self.summary.refused += 1;
                    // A refused result may still come with the next lease.
                    return Ok(After { lease: reply.next, shutdown: reply.shutdown });
                }
                Err(status)
                    if matches!(
                        status.code(),
                        Code::NotFound | Code::FailedPrecondition | Code::InvalidArgument
                    ) =>
                {
                    tracing::warn!(trial = %lease.trial_id, lease = %lease.lease_id, code = ?status.code(),
                        message = status.message(), "the coordinator refused the result; dropping it");
                    self.summary.refused += 1;
                    return Ok(After::default());
                }
                Err(status) if !is_transient(&status) => anyhow::bail!(
                    "coordinator {} rejected the result of trial {}: {:?}: {}",
                    self.opts.coordinator,
                    lease.trial_id,
                    status.code(),
                    status.message()
                ),
                Err(status) => {
                    if last_try {
                        tracing::warn!(trial = %lease.trial_id, code = ?status.code(), message = status.message(),
                            "shutting down with an undelivered result; the lease will expire and the trial rerun");
                        self.summary.lost += 1;
                        return Ok(After::default());
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(trial = %lease.trial_id, code = ?status.code(), message = status.message(),
                        retry_in = ?delay, "cannot deliver the result yet; keeping it");
                    // On shutdown the sleep ends early and the loop makes its last try.
                    self.sleep_or_shutdown(delay).await;
                }
            }
        }
    }

    /// Hands a lease back (one try: if the coordinator is away, the lease expires instead).
    async fn release(&mut self, lease: &Lease, reason: String) {
        let request = ReleaseRequest { lease_id: lease.lease_id.clone(), reason };
        let mut client = self.client.clone();
        self.summary.released += 1;
        match timed(self.opts.rpc_timeout, client.release(request)).await {
            Ok(reply) => {
                tracing::info!(trial = %lease.trial_id, accepted = reply.accepted, "lease handed back")
            }
            Err(status) => {
                tracing::warn!(trial = %lease.trial_id, code = ?status.code(), message = status.message(),
                "could not hand the lease back; it will expire")
            }
        }
    }
}

/// Fills a completion from a runner outcome: a local timeout is a failure (with the metrics
/// reached), any other stop (coordinator early stopping, lost lease) a success with the metrics
/// so far; the coordinator decides what a stopped trial counts as.
fn fill_outcome(request: &mut CompleteRequest, outcome: TrialOutcome, cause: Option<StopCause>) {
    request.final_step =
        outcome.metrics.get(msae_shared::metrics::STEPS).map_or(0, |s| s.max(0.0) as u64);
    request.metrics = outcome.metrics.into_iter().collect();
    request.artifact = outcome.artifact.map(|p| p.display().to_string()).unwrap_or_default();
    match cause {
        // A timeout that cut the run short; one that struck after the last step did not.
        Some(cause @ StopCause::Timeout(_)) if outcome.stopped.is_some() => {
            request.success = false;
            request.error = cause.to_string();
        }
        _ => request.success = true,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    //! A fake coordinator (the generated server trait over real gRPC on 127.0.0.1:0) drives
    //! the loop through leases, progress, refusals, stop replies, restarts and shutdown.
    use super::*;
    use msae_shared::proto::coordinator_server::{Coordinator, CoordinatorServer};
    use msae_shared::proto::{
        CompleteReply, LeaseReply, ProgressReply, RegisterReply, ReleaseReply, ReportChunk,
        ReportRequest,
    };
    use std::collections::{BTreeMap, HashSet, VecDeque};
    use std::net::SocketAddr;
    use tokio::sync::oneshot;
    use tonic::{Request, Response};

    /// Everything the fake saw, and how it should answer.
    #[derive(Clone, Default)]
    struct FakeState {
        leases: VecDeque<Lease>,
        registrations: Vec<RegisterRequest>,
        authorization: Vec<Option<String>>,
        progress: Vec<ProgressRequest>,
        completes: Vec<CompleteRequest>,
        releases: Vec<ReleaseRequest>,
        /// Completions of these leases are refused.
        refuse: HashSet<String>,
        /// Progress of these leases is answered with stop.
        stop: HashSet<String>,
        /// Leases whose stop reply asks for the lease back (coordinator shutting down).
        release_on_stop: HashSet<String>,
        /// Lease calls from these worker ids get NotFound (a coordinator that forgot them).
        forget: HashSet<String>,
        /// Reply shutdown = true once the queue is empty.
        shutdown_when_empty: bool,
        /// Lease calls received.
        lease_calls: usize,
        /// A combined completion (`lease_next`) from these worker ids makes the fake forget
        /// them (as a restarted coordinator would): the result is accepted with no lease.
        forget_on_complete: HashSet<String>,
        /// A combined completion with nothing to lease waits its full `wait_ms` (a real
        /// long-poll) instead of at most 20 ms.
        long_poll: bool,
        /// Behave like a coordinator that predates `lease_next`: ignore it.
        legacy: bool,
    }

    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<FakeState>>);

    impl Fake {
        fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
            self.0.lock().unwrap()
        }

        /// A copy of the state, so no lock is held across an await.
        fn snapshot(&self) -> FakeState {
            self.state().clone()
        }

        fn seen<T>(&self, request: &Request<T>) {
            let auth =
                request.metadata().get("authorization").map(|v| v.to_str().unwrap().to_string());
            self.state().authorization.push(auth);
        }
    }

    #[tonic::async_trait]
    impl Coordinator for Fake {
        async fn register(
            &self,
            request: Request<RegisterRequest>,
        ) -> Result<Response<RegisterReply>, Status> {
            self.seen(&request);
            let mut state = self.state();
            state.registrations.push(request.into_inner());
            let worker_id = format!("w{}", state.registrations.len());
            Ok(Response::new(RegisterReply { worker_id, coordinator_version: "fake".into() }))
        }

        async fn lease(
            &self,
            request: Request<LeaseRequest>,
        ) -> Result<Response<LeaseReply>, Status> {
            self.seen(&request);
            let request = request.into_inner();
            {
                let mut state = self.state();
                state.lease_calls += 1;
                if state.forget.contains(&request.worker_id) {
                    return Err(Status::not_found(format!("unknown worker {}", request.worker_id)));
                }
                if let Some(lease) = state.leases.pop_front() {
                    return Ok(Response::new(LeaseReply { lease: Some(lease), shutdown: false }));
                }
                if state.shutdown_when_empty {
                    return Ok(Response::new(LeaseReply { lease: None, shutdown: true }));
                }
            }
            // A short long-poll keeps server shutdowns quick.
            tokio::time::sleep(Duration::from_millis(request.wait_ms.min(20) as u64)).await;
            Ok(Response::new(LeaseReply { lease: None, shutdown: false }))
        }

        async fn progress(
            &self,
            request: Request<ProgressRequest>,
        ) -> Result<Response<ProgressReply>, Status> {
            let request = request.into_inner();
            let mut state = self.state();
            let stop = state.stop.contains(&request.lease_id);
            let release = state.release_on_stop.contains(&request.lease_id);
            state.progress.push(request);
            Ok(Response::new(ProgressReply {
                stop,
                reason: if stop { "early stop".into() } else { String::new() },
                release,
            }))
        }

        async fn complete(
            &self,
            request: Request<CompleteRequest>,
        ) -> Result<Response<CompleteReply>, Status> {
            let request = request.into_inner();
            let (reply, hold) = {
                let mut state = self.state();
                let accepted = !state.refuse.contains(&request.lease_id);
                let mut reply = CompleteReply {
                    accepted,
                    reason: if accepted { String::new() } else { "stale lease".into() },
                    next: None,
                    shutdown: false,
                };
                let mut hold = None;
                if request.lease_next && !state.legacy {
                    if state.forget_on_complete.remove(&request.worker_id) {
                        state.forget.insert(request.worker_id.clone());
                    }
                    if state.forget.contains(&request.worker_id) {
                        // Unknown worker: the result counts, the lease part is dropped.
                    } else if let Some(lease) = state.leases.pop_front() {
                        reply.next = Some(lease);
                    } else if state.shutdown_when_empty {
                        reply.shutdown = true;
                    } else {
                        let cap = if state.long_poll { u32::MAX } else { 20 };
                        hold = Some(Duration::from_millis(request.wait_ms.min(cap) as u64));
                    }
                }
                state.completes.push(request);
                (reply, hold)
            };
            if let Some(hold) = hold {
                tokio::time::sleep(hold).await;
            }
            Ok(Response::new(reply))
        }

        async fn release(
            &self,
            request: Request<ReleaseRequest>,
        ) -> Result<Response<ReleaseReply>, Status> {
            self.state().releases.push(request.into_inner());
            Ok(Response::new(ReleaseReply { accepted: true }))
        }

        type ReportStream = std::pin::Pin<
            Box<dyn tokio_stream::Stream<Item = Result<ReportChunk, Status>> + Send + 'static>,
        >;

        async fn report(
            &self,
            _: Request<ReportRequest>,
        ) -> Result<Response<Self::ReportStream>, Status> {
            Err(Status::unimplemented("not in the fake"))
        }
    }

    /// A running fake server; `stop` shuts it down gracefully (connections closed).
    struct Server {
        addr: SocketAddr,
        stop: oneshot::Sender<()>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn serve(fake: Fake, addr: SocketAddr) -> Server {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind fake coordinator");
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(CoordinatorServer::new(fake))
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await
                .expect("fake coordinator serves");
        });
        Server { addr, stop, task }
    }

    impl Server {
        async fn shutdown(self) {
            let _ = self.stop.send(());
            tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .expect("fake server stops")
                .unwrap();
        }
    }

    fn options(addr: SocketAddr) -> ClientOptions {
        ClientOptions {
            poll_wait: Duration::from_millis(50),
            rpc_timeout: Duration::from_secs(2),
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(100),
            progress_min_interval: Duration::ZERO,
            stop_grace: Duration::from_secs(5),
            ..ClientOptions::new(format!("http://{addr}"))
        }
    }

    fn lease(id: &str, runner: &str, sleep_ms: u32) -> Lease {
        let config = TrialConfig { steps: 100, ..TrialConfig::default() };
        Lease {
            lease_id: id.to_string(),
            trial_id: format!("sweep/{id}"),
            sweep: "sweep".into(),
            attempt: 1,
            config_json: serde_json::to_string(&config).unwrap(),
            ttl_ms: 150,
            timeout_s: 0.0,
            runner: runner.to_string(),
            noop_sleep_ms: sleep_ms,
        }
    }

    /// Reports progress every 5 ms until told to stop (at most 20 s).
    struct UntilStopped;

    impl TrialRunner for UntilStopped {
        fn run(
            &self,
            _: &TrialConfig,
            _: &RunOptions,
            progress: &mut dyn FnMut(&Progress) -> Control,
        ) -> anyhow::Result<TrialOutcome> {
            let start = Instant::now();
            let mut step = 0;
            while start.elapsed() < Duration::from_secs(20) {
                step += 1;
                let report = Progress {
                    step,
                    total_steps: 0,
                    scalars: [("mse".to_string(), 1.0)].into(),
                    kind: crate::runner::ProgressKind::Sample,
                };
                if let Control::Stop(reason) = progress(&report) {
                    return Ok(TrialOutcome {
                        metrics: [("steps".to_string(), step as f64)].into(),
                        artifact: None,
                        stopped: Some(reason),
                    });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            anyhow::bail!("never stopped")
        }
    }

    /// Panics: the worker must report the trial failed, not die.
    struct Panics;

    impl TrialRunner for Panics {
        fn run(
            &self,
            _: &TrialConfig,
            _: &RunOptions,
            _: &mut dyn FnMut(&Progress) -> Control,
        ) -> anyhow::Result<TrialOutcome> {
            panic!("boom")
        }
    }

    /// Ten evaluations in a burst, then a slow final evaluation (no progress call for 300 ms),
    /// then the final report; like training, a stop answered to the final report does not
    /// make the finished result partial.
    struct EvalsThenSlowEnd;

    impl TrialRunner for EvalsThenSlowEnd {
        fn run(
            &self,
            _: &TrialConfig,
            _: &RunOptions,
            progress: &mut dyn FnMut(&Progress) -> Control,
        ) -> anyhow::Result<TrialOutcome> {
            for step in 1..=10u64 {
                let scalars = [("val_loss".to_string(), 1.0 / step as f64)].into();
                let p = Progress { step, total_steps: 11, scalars, kind: ProgressKind::Evaluation };
                if let Control::Stop(reason) = progress(&p) {
                    anyhow::bail!("stopped during training: {reason}");
                }
            }
            std::thread::sleep(Duration::from_millis(300));
            let metrics: BTreeMap<String, f64> = [("steps".to_string(), 11.0)].into();
            let p = Progress {
                step: 11,
                total_steps: 11,
                scalars: metrics.clone(),
                kind: ProgressKind::Final,
            };
            let _ = progress(&p);
            Ok(TrialOutcome { metrics, artifact: None, stopped: None })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_evaluation_arrives_and_a_finished_result_is_delivered_not_released() {
        let fake = Fake::default();
        {
            let mut s = fake.state();
            s.leases.push_back(lease("e", "sae", 0));
            s.shutdown_when_empty = true;
        }
        let server = serve(fake.clone(), "127.0.0.1:0".parse().unwrap()).await;
        let opts = options(server.addr);
        let run = run_worker(opts, Arc::new(EvalsThenSlowEnd), std::future::pending());
        let handle = tokio::spawn(run);
        // While the final evaluation runs, the coordinator starts shutting down and asks for
        // the lease back (a heartbeat hears it).
        wait_for("the evaluations", || {
            fake.state().progress.iter().map(|p| p.evaluations.len()).sum::<usize>() == 10
        })
        .await;
        {
            let mut s = fake.state();
            s.stop.insert("e".into());
            s.release_on_stop.insert("e".into());
        }
        let summary = tokio::time::timeout(LIMIT, handle).await.unwrap().unwrap().unwrap();
        let s = fake.snapshot();
        let steps: Vec<u64> =
            s.progress.iter().flat_map(|p| p.evaluations.iter().map(|e| e.step)).collect();
        assert_eq!(steps, (1..=10).collect::<Vec<_>>(), "each evaluation once, in order");
        assert!(
            s.progress.iter().all(|p| p.scalars.is_empty()),
            "evaluations and final metrics are not repeated as samples"
        );
        assert!(s.releases.is_empty(), "a finished result must not be handed back");
        assert_eq!(s.completes.len(), 1);
        assert!(s.completes[0].success);
        assert_eq!(s.completes[0].final_step, 11);
        assert_eq!(summary.succeeded, 1);
        server.shutdown().await;
    }

    const LIMIT: Duration = Duration::from_secs(20);

    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        tokio::time::timeout(LIMIT, async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_leases_reports_progress_and_completes() {
        let fake = Fake::default();
        {
            let mut s = fake.state();
            s.leases.push_back(lease("a", "noop", 300));
            s.leases.push_back(lease("b", "noop", 0));
            s.shutdown_when_empty = true;
        }
        let server = serve(fake.clone(), "127.0.0.1:0".parse().unwrap()).await;
        let mut opts = options(server.addr);
        opts.token = Some("s3cret".into());
        opts.gpu = Some(1);
        let summary =
            tokio::time::timeout(LIMIT, run_worker(opts, Arc::new(Panics), std::future::pending()))
                .await
                .unwrap()
                .unwrap();
        assert_eq!((summary.leases, summary.succeeded, summary.failed), (2, 2, 0));
        assert_eq!(summary.worker_id, "w1");
        let s = fake.snapshot();
        assert_eq!(s.registrations[0].device, "cuda:1");
        assert_eq!(s.registrations[0].protocol_version, msae_shared::PROTOCOL_VERSION);
        assert!(
            s.authorization.iter().all(|a| a.as_deref() == Some("Bearer s3cret")),
            "{:?}",
            s.authorization
        );
        // 300 ms of work with a 150 ms ttl: progress (20 ms slices) and heartbeats renewed it.
        let progress_a: Vec<&ProgressRequest> =
            s.progress.iter().filter(|p| p.lease_id == "a").collect();
        assert!(progress_a.len() >= 3, "progress reports: {}", progress_a.len());
        assert!(progress_a.windows(2).all(|w| w[0].step <= w[1].step));
        assert!(progress_a.iter().any(|p| p.scalars.contains_key("train_loss")));
        let ids: Vec<&str> = s.completes.iter().map(|c| c.lease_id.as_str()).collect();
        assert_eq!(ids, vec!["a", "b"]);
        // One round trip per trial: each result asked for the next lease; "b" came with the
        // reply to "a", the shutdown with the reply to "b", so only the first lease was a call.
        assert!(s.completes.iter().all(|c| c.lease_next && c.worker_id == "w1" && c.wait_ms == 50));
        assert_eq!(s.lease_calls, 1);
        let a = &s.completes[0];
        assert!(a.success && a.error.is_empty());
        assert_eq!(a.metrics["fvu"], crate::noop::analytic_fvu(&TrialConfig::default()));
        assert!(a.duration_s >= 0.3, "{}", a.duration_s);
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_leases_are_reported_as_failures() {
        let fake = Fake::default();
        {
            let mut s = fake.state();
            let mut bad_json = lease("json", "noop", 0);
            bad_json.config_json = "{not json".into();
            let mut invalid = lease("invalid", "noop", 0);
            invalid.config_json = r#"{"lr": -1.0}"#.into();
            let unknown = lease("kind", "quantum", 0);
            let panics = lease("panic", "sae", 0);
            s.leases.extend([bad_json, invalid, unknown, panics]);
            s.shutdown_when_empty = true;
        }
        let server = serve(fake.clone(), "127.0.0.1:0".parse().unwrap()).await;
        let summary = tokio::time::timeout(
            LIMIT,
            run_worker(options(server.addr), Arc::new(Panics), std::future::pending()),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!((summary.leases, summary.failed, summary.succeeded), (4, 4, 0));
        let s = fake.snapshot();
        let errors: Vec<&str> = s.completes.iter().map(|c| c.error.as_str()).collect();
        assert!(s.completes.iter().all(|c| !c.success));
        assert!(errors[0].contains("config_json is not a valid trial config"), "{}", errors[0]);
        assert!(
            errors[1].contains("invalid trial config") && errors[1].contains("lr"),
            "{}",
            errors[1]
        );
        assert!(errors[2].contains("unknown trial runner kind \"quantum\""), "{}", errors[2]);
        assert!(errors[3].contains("panicked"), "{}", errors[3]);
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_result_is_dropped_not_retried() {
        let fake = Fake::default();
        {
            let mut s = fake.state();
            s.leases.push_back(lease("stale", "noop", 0));
            s.leases.push_back(lease("fresh", "noop", 0));
            s.refuse.insert("stale".into());
            s.shutdown_when_empty = true;
        }
        let server = serve(fake.clone(), "127.0.0.1:0".parse().unwrap()).await;
        let summary = tokio::time::timeout(
            LIMIT,
            run_worker(options(server.addr), Arc::new(Panics), std::future::pending()),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!((summary.refused, summary.succeeded), (1, 1));
        let ids: Vec<String> = fake.state().completes.iter().map(|c| c.lease_id.clone()).collect();
        assert_eq!(ids, vec!["stale", "fresh"], "the refused result is sent once");
        // The refusal carried the next lease ("fresh"): no second Lease call.
        assert_eq!(fake.state().lease_calls, 1);
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn result_survives_a_coordinator_restart() {
        let fake = Fake::default();
        fake.state().leases.push_back(lease("a", "noop", 400));
        let server = serve(fake.clone(), "127.0.0.1:0".parse().unwrap()).await;
        let addr = server.addr;
        let mut opts = options(addr);
        opts.max_trials = Some(1);
        let worker = tokio::spawn(run_worker(opts, Arc::new(Panics), std::future::pending()));
        wait_for("first progress", || !fake.state().progress.is_empty()).await;
        // The coordinator goes away while the trial runs and stays away past its end.
        server.shutdown().await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(fake.state().completes.is_empty());
        // Back on the same port, with the same (durable) state.
        let server = serve(fake.clone(), addr).await;
        let summary = tokio::time::timeout(LIMIT, worker).await.unwrap().unwrap().unwrap();
        assert_eq!(summary.succeeded, 1);
        let s = fake.snapshot();
        assert_eq!(s.completes.len(), 1);
        assert!(s.completes[0].success && s.completes[0].lease_id == "a");
        assert!(!s.completes[0].lease_next, "max_trials reached: no next lease asked for");
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn worker_waits_for_a_coordinator_that_is_not_up_yet() {
        // Reserve a port, free it, start the worker, then the coordinator.
        let addr =
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let fake = Fake::default();
        {
            let mut s = fake.state();
            s.leases.push_back(lease("a", "noop", 0));
            s.shutdown_when_empty = true;
        }
        let worker =
            tokio::spawn(run_worker(options(addr), Arc::new(Panics), std::future::pending()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let server = serve(fake.clone(), addr).await;
        let summary = tokio::time::timeout(LIMIT, worker).await.unwrap().unwrap().unwrap();
        assert_eq!(summary.succeeded, 1);
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_reply_stops_the_trial() {
        let fake = Fake::default();
        {
            let mut s = fake.state();
            s.leases.push_back(lease("a", "sae", 0));
            s.stop.insert("a".into());
            s.shutdown_when_empty = true;
        }
        let server = serve(fake.clone(), "127.0.0.1:0".parse().unwrap()).await;
        let start = Instant::now();
        let summary = tokio::time::timeout(
            LIMIT,
            run_worker(options(server.addr), Arc::new(UntilStopped), std::future::pending()),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(summary.succeeded, 1);
        let s = fake.snapshot();
        assert!(s.completes[0].success, "an early-stopped trial reports its metrics");
        assert!(s.completes[0].metrics["steps"] >= 1.0);
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_with_release_hands_the_lease_back_and_reports_nothing() {
        let fake = Fake::default();
        {
            let mut s = fake.state();
            s.leases.push_back(lease("a", "sae", 0));
            s.stop.insert("a".into());
            s.release_on_stop.insert("a".into());
            s.shutdown_when_empty = true;
        }
        let server = serve(fake.clone(), "127.0.0.1:0".parse().unwrap()).await;
        let summary = tokio::time::timeout(
            LIMIT,
            run_worker(options(server.addr), Arc::new(UntilStopped), std::future::pending()),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!((summary.succeeded, summary.failed, summary.released), (0, 0, 1));
        let s = fake.snapshot();
        assert!(s.completes.is_empty(), "a partial trial must not be reported as a result");
        assert_eq!(s.releases.len(), 1);
        assert_eq!(s.releases[0].lease_id, "a");
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_timeout_fails_the_trial() {
        let fake = Fake::default();
        {
            let mut s = fake.state();
            let mut l = lease("a", "sae", 0);
            l.timeout_s = 0.2;
            s.leases.push_back(l);
            s.shutdown_when_empty = true;
        }
        let server = serve(fake.clone(), "127.0.0.1:0".parse().unwrap()).await;
        let summary = tokio::time::timeout(
            LIMIT,
            run_worker(options(server.addr), Arc::new(UntilStopped), std::future::pending()),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(summary.failed, 1);
        let s = fake.snapshot();
        assert!(!s.completes[0].success);
        assert!(s.completes[0].error.contains("timeout of 0.2 s"), "{}", s.completes[0].error);
        assert!(s.completes[0].duration_s < 5.0);
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_releases_the_lease() {
        let fake = Fake::default();
        fake.state().leases.push_back(lease("a", "sae", 0));
        let server = serve(fake.clone(), "127.0.0.1:0".parse().unwrap()).await;
        let (trigger, shutdown) = oneshot::channel::<()>();
        let worker =
            tokio::spawn(run_worker(options(server.addr), Arc::new(UntilStopped), async {
                let _ = shutdown.await;
            }));
        wait_for("first progress", || !fake.state().progress.is_empty()).await;
        trigger.send(()).unwrap();
        let summary = tokio::time::timeout(LIMIT, worker).await.unwrap().unwrap().unwrap();
        assert_eq!((summary.released, summary.succeeded, summary.failed), (1, 0, 0));
        let s = fake.snapshot();
        assert_eq!(s.releases.len(), 1);
        assert_eq!(s.releases[0].lease_id, "a");
        assert!(s.completes.is_empty(), "a released lease has no result");
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forgotten_worker_registers_again() {
        let fake = Fake::default();
        {
            let mut s = fake.state();
            s.forget.insert("w1".into());
            s.leases.push_back(lease("a", "noop", 0));
            s.shutdown_when_empty = true;
        }
        let server = serve(fake.clone(), "127.0.0.1:0".parse().unwrap()).await;
        let summary = tokio::time::timeout(
            LIMIT,
            run_worker(options(server.addr), Arc::new(Panics), std::future::pending()),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(summary.worker_id, "w2");
        assert_eq!(summary.succeeded, 1);
        assert_eq!(fake.state().registrations.len(), 2);
        assert!(fake.state().authorization.iter().all(Option::is_none), "no token, no header");
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn result_from_a_forgotten_worker_counts_then_it_registers_again() {
        let fake = Fake::default();
        {
            let mut s = fake.state();
            s.leases.push_back(lease("a", "noop", 0));
            s.leases.push_back(lease("b", "noop", 0));
            s.forget_on_complete.insert("w1".into());
            s.shutdown_when_empty = true;
        }
        let server = serve(fake.clone(), "127.0.0.1:0".parse().unwrap()).await;
        let summary = tokio::time::timeout(
            LIMIT,
            run_worker(options(server.addr), Arc::new(Panics), std::future::pending()),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!((summary.succeeded, summary.refused), (2, 0));
        assert_eq!(summary.worker_id, "w2");
        let s = fake.snapshot();
        let sent: Vec<(&str, &str)> =
            s.completes.iter().map(|c| (c.lease_id.as_str(), c.worker_id.as_str())).collect();
        assert_eq!(sent, vec![("a", "w1"), ("b", "w2")], "each result sent once");
        // Lease (a), Lease refused as unknown, Lease (b) after registering again.
        assert_eq!((s.registrations.len(), s.lease_calls), (2, 3));
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn old_coordinator_without_lease_next_still_works() {
        let fake = Fake::default();
        {
            let mut s = fake.state();
            s.leases.push_back(lease("a", "noop", 0));
            s.leases.push_back(lease("b", "noop", 0));
            s.shutdown_when_empty = true;
            s.legacy = true;
        }
        let server = serve(fake.clone(), "127.0.0.1:0".parse().unwrap()).await;
        let summary = tokio::time::timeout(
            LIMIT,
            run_worker(options(server.addr), Arc::new(Panics), std::future::pending()),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(summary.succeeded, 2);
        // No `next` in the replies: a Lease call per trial, plus the one answered shutdown.
        assert_eq!(fake.state().lease_calls, 3);
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_during_a_long_polled_result_resends_it_alone() {
        let fake = Fake::default();
        {
            let mut s = fake.state();
            s.leases.push_back(lease("a", "noop", 0));
            s.long_poll = true;
        }
        let server = serve(fake.clone(), "127.0.0.1:0".parse().unwrap()).await;
        let mut opts = options(server.addr);
        opts.poll_wait = Duration::from_secs(15);
        let (trigger, shutdown) = oneshot::channel::<()>();
        let worker = tokio::spawn(run_worker(opts, Arc::new(Panics), async {
            let _ = shutdown.await;
        }));
        wait_for("the result with its lease request", || !fake.state().completes.is_empty()).await;
        let start = Instant::now();
        trigger.send(()).unwrap();
        let summary = tokio::time::timeout(LIMIT, worker).await.unwrap().unwrap().unwrap();
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
        assert_eq!((summary.leases, summary.succeeded), (1, 1));
        let s = fake.snapshot();
        let sent: Vec<(&str, bool)> =
            s.completes.iter().map(|c| (c.lease_id.as_str(), c.lease_next)).collect();
        assert_eq!(sent, vec![("a", true), ("a", false)]);
        assert_eq!(s.completes[0].wait_ms, 15_000);
        server.shutdown().await;
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let delays: Vec<Duration> = (0..5).map(|_| b.next_delay()).collect();
        let bases = [100, 200, 400, 400, 400];
        for (d, base) in delays.iter().zip(bases) {
            let base = Duration::from_millis(base);
            assert!(*d >= base / 2 && *d <= base, "{d:?} not in [{:?}, {base:?}]", base / 2);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn invalid_url_is_an_error() {
        let (_tx, rx) = watch::channel(false);
        let err =
            Worker::new(ClientOptions::new("not a url"), Arc::new(Panics), ShutdownSignal(rx))
                .err()
                .unwrap();
        assert!(err.to_string().contains("invalid coordinator URL"), "{err}");
    }
}
