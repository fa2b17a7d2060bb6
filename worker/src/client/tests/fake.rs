//! A fake coordinator (the generated server trait over real gRPC on 127.0.0.1:0) that records
//! what the worker sent and answers as each test tells it to, and trial runners that misbehave
//! on purpose.

use crate::client::ClientOptions;
use crate::runner::{Control, Progress, ProgressKind, RunOptions, TrialOutcome, TrialRunner};
use msae_shared::TrialConfig;
use msae_shared::class_stats::ClassStats;
use msae_shared::proto::coordinator_server::{Coordinator, CoordinatorServer};
use msae_shared::proto::{
    CompleteReply, CompleteRequest, Lease, LeaseReply, LeaseRequest, ProgressReply,
    ProgressRequest, RegisterReply, RegisterRequest, ReleaseReply, ReleaseRequest, ReportChunk,
    ReportRequest, StatusReply, StatusRequest, UploadChunk, UploadReply,
};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

/// One upload the fake received: the lease, each file's reassembled bytes in arrival order,
/// and whether the completion of that lease had arrived before.
pub(super) type Upload = (String, Vec<(String, Vec<u8>)>, bool);

/// Everything the fake saw, and how it should answer.
#[derive(Clone, Default)]
pub(super) struct FakeState {
    pub(super) leases: VecDeque<Lease>,
    pub(super) registrations: Vec<RegisterRequest>,
    pub(super) authorization: Vec<Option<String>>,
    pub(super) progress: Vec<ProgressRequest>,
    pub(super) completes: Vec<CompleteRequest>,
    pub(super) releases: Vec<ReleaseRequest>,
    /// Completions of these leases are refused.
    pub(super) refuse: HashSet<String>,
    /// Progress of these leases is answered with stop.
    pub(super) stop: HashSet<String>,
    /// Leases whose stop reply asks for the lease back (coordinator shutting down).
    pub(super) release_on_stop: HashSet<String>,
    /// Leases whose stop reply says early termination pruned the trial.
    pub(super) prune_on_stop: HashSet<String>,
    /// Lease calls from these worker ids get NotFound (a coordinator that forgot them).
    pub(super) forget: HashSet<String>,
    /// Reply shutdown = true once the queue is empty.
    pub(super) shutdown_when_empty: bool,
    /// Lease calls received.
    pub(super) lease_calls: usize,
    /// The `wait_ms` of each lease call, in arrival order.
    pub(super) lease_waits: Vec<u32>,
    /// Progress reports for these leases get NotFound (leases the coordinator has expired).
    pub(super) lost: HashSet<String>,
    /// A combined completion (`lease_next`) from these worker ids makes the fake forget
    /// them (as a restarted coordinator would): the result is accepted with no lease.
    pub(super) forget_on_complete: HashSet<String>,
    /// A combined completion with nothing to lease waits its full `wait_ms` (a real
    /// long-poll) instead of at most 20 ms.
    pub(super) long_poll: bool,
    /// Behave like a coordinator that predates `lease_next`: ignore it.
    pub(super) legacy: bool,
    /// Uploads received, in arrival order.
    pub(super) uploads: Vec<Upload>,
    /// Uploads are answered not accepted, permanently, with this reason.
    pub(super) refuse_upload: Option<String>,
}

#[derive(Clone, Default)]
pub(super) struct Fake(Arc<Mutex<FakeState>>);

impl Fake {
    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.0.lock().unwrap()
    }

    /// A copy of the state, so no lock is held across an await.
    pub(super) fn snapshot(&self) -> FakeState {
        self.state().clone()
    }

    fn seen<T>(&self, request: &Request<T>) {
        let auth = request.metadata().get("authorization").map(|v| v.to_str().unwrap().to_string());
        self.state().authorization.push(auth);
    }
}

#[tonic::async_trait]
impl Coordinator for Fake {
    async fn upload(
        &self,
        request: Request<tonic::Streaming<UploadChunk>>,
    ) -> Result<Response<UploadReply>, Status> {
        let mut stream = request.into_inner();
        let (mut lease, mut files) = (String::new(), Vec::<(String, Vec<u8>)>::new());
        while let Some(chunk) = stream.message().await? {
            if !chunk.lease_id.is_empty() {
                lease = chunk.lease_id.clone();
            }
            if !chunk.file.is_empty() {
                files.push((chunk.file.clone(), Vec::new()));
            }
            files.last_mut().expect("a named first chunk").1.extend_from_slice(&chunk.data);
        }
        let mut state = self.state();
        let completed = state.completes.iter().any(|c| c.lease_id == lease);
        state.uploads.push((lease, files, completed));
        let reply = match &state.refuse_upload {
            Some(reason) => {
                UploadReply { accepted: false, reason: reason.clone(), permanent: true }
            }
            None => UploadReply { accepted: true, ..Default::default() },
        };
        Ok(Response::new(reply))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        Err(Status::unimplemented("the fake has no status"))
    }

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

    async fn lease(&self, request: Request<LeaseRequest>) -> Result<Response<LeaseReply>, Status> {
        self.seen(&request);
        let request = request.into_inner();
        {
            let mut state = self.state();
            state.lease_calls += 1;
            state.lease_waits.push(request.wait_ms);
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
        if state.lost.contains(&request.lease_id) {
            state.progress.push(request);
            return Err(Status::not_found("no such lease"));
        }
        let stop = state.stop.contains(&request.lease_id);
        let release = state.release_on_stop.contains(&request.lease_id);
        let prune = stop && state.prune_on_stop.contains(&request.lease_id);
        state.progress.push(request);
        Ok(Response::new(ProgressReply {
            stop,
            reason: if stop { "early stop".into() } else { String::new() },
            release,
            prune,
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
pub(super) struct Server {
    pub(super) addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

pub(super) async fn serve(fake: Fake, addr: SocketAddr) -> Server {
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
    pub(super) async fn shutdown(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("fake server stops")
            .unwrap();
    }
}

pub(super) fn options(addr: SocketAddr) -> ClientOptions {
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

pub(super) fn lease(id: &str, runner: &str, sleep_ms: u32) -> Lease {
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
        upload: false,
        upload_limit: 0,
    }
}

/// Reports progress every 5 ms until told to stop (at most 20 s).
pub(super) struct UntilStopped;

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
                class_stats: None,
                kind: ProgressKind::Sample,
            };
            if let Control::Stop(reason) = progress(&report) {
                return Ok(TrialOutcome {
                    metrics: [("steps".to_string(), step as f64)].into(),
                    stopped: Some(reason),
                    ..TrialOutcome::default()
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        anyhow::bail!("never stopped")
    }
}

/// Panics: the worker must report the trial failed, not die.
pub(super) struct Panics;

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

/// Panics too, as a runner whose trials are instant (run on the worker's own task).
pub(super) struct PanicsAtOnce;

impl TrialRunner for PanicsAtOnce {
    fn run(
        &self,
        _: &TrialConfig,
        _: &RunOptions,
        _: &mut dyn FnMut(&Progress) -> Control,
    ) -> anyhow::Result<TrialOutcome> {
        panic!("boom at once")
    }

    fn instant(&self, _: &TrialConfig, _: &RunOptions) -> bool {
        true
    }
}

/// Ten evaluations in a burst, then a slow final evaluation (no progress call for 300 ms),
/// then the final report; like training, a stop answered to the final report does not
/// make the finished result partial. Every evaluation, and the result, carries per-class
/// statistics ([`EvalsThenSlowEnd::class_stats`]).
pub(super) struct EvalsThenSlowEnd;

impl EvalsThenSlowEnd {
    /// One stripe, two classes of `step` samples each; the stripe fires for every class-1
    /// sample.
    pub(super) fn class_stats(step: u64) -> ClassStats {
        ClassStats::new(1, 2, vec![step, step], vec![0, step], None, vec![0.5, 0.25]).unwrap()
    }
}

impl TrialRunner for EvalsThenSlowEnd {
    fn run(
        &self,
        _: &TrialConfig,
        _: &RunOptions,
        progress: &mut dyn FnMut(&Progress) -> Control,
    ) -> anyhow::Result<TrialOutcome> {
        for step in 1..=10u64 {
            let scalars = [("val_loss".to_string(), 1.0 / step as f64)].into();
            let p = Progress {
                step,
                total_steps: 11,
                scalars,
                class_stats: Some(Self::class_stats(step)),
                kind: ProgressKind::Evaluation,
            };
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
            class_stats: None,
            kind: ProgressKind::Final,
        };
        let _ = progress(&p);
        Ok(TrialOutcome {
            metrics,
            class_stats: Some(Self::class_stats(11)),
            ..TrialOutcome::default()
        })
    }
}

pub(super) const LIMIT: Duration = Duration::from_secs(20);

pub(super) async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(LIMIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}
