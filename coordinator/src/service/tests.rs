//! Service tests: a real tonic server on 127.0.0.1:0 and tonic clients; every await is under a
//! timeout.

use super::*;
use crate::model::TrialStatus;
use crate::scheduler::tests::{ListStrategy, actor_policy, make_config};
use crate::scheduler::{Scheduler, SweepInput};
use crate::store::Store;
use msae_shared::proto::coordinator_client::CoordinatorClient;
use std::collections::HashSet;
use tonic::transport::Channel;

const T: Duration = Duration::from_secs(20);

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(T, f).await.expect("timed out")
}

struct Server {
    addr: std::net::SocketAddr,
    scheduler: SchedulerHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    _dir: tempfile::TempDir,
}

async fn server(n: usize, token: Option<&str>) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("svc.redb")).unwrap();
    let input = SweepInput {
        name: "grid".into(),
        yaml: "name: grid".into(),
        fingerprint: "fp".into(),
        new_sweep: false,
    };
    let scheduler = Scheduler::start(
        store,
        input,
        actor_policy(),
        Box::new(ListStrategy::new(n)),
        make_config(),
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task =
        tokio::spawn(serve(listener, scheduler.clone(), token.map(String::from), async move {
            let _ = rx.await;
        }));
    Server { addr, scheduler, stop: Some(tx), task, _dir: dir }
}

impl Server {
    async fn client(&self) -> CoordinatorClient<Channel> {
        within(CoordinatorClient::connect(format!("http://{}", self.addr))).await.unwrap()
    }

    async fn stop(mut self) {
        within(self.scheduler.shutdown(Duration::from_secs(1))).await.unwrap();
        let _ = self.stop.take().unwrap().send(());
        within(self.task).await.unwrap().unwrap();
    }
}

async fn register(c: &mut CoordinatorClient<Channel>, name: &str) -> String {
    within(c.register(proto::RegisterRequest {
        protocol_version: msae_shared::PROTOCOL_VERSION,
        name: name.into(),
        device: "cpu".into(),
    }))
    .await
    .unwrap()
    .into_inner()
    .worker_id
}

/// A fake worker: leases until shutdown, completes each trial with loss = its index; records
/// which trials it completed.
async fn fake_worker(mut c: CoordinatorClient<Channel>, name: String) -> Vec<String> {
    let id = register(&mut c, &name).await;
    let mut done = Vec::new();
    loop {
        let reply = within(c.lease(proto::LeaseRequest { worker_id: id.clone(), wait_ms: 2000 }))
            .await
            .unwrap()
            .into_inner();
        if reply.shutdown {
            return done;
        }
        let Some(lease) = reply.lease else { continue };
        let config: serde_json::Value = serde_json::from_str(&lease.config_json).unwrap();
        assert!(config["params"]["x"].is_number());
        let index: u64 = lease.trial_id.rsplit('/').next().unwrap().parse().unwrap();
        let progress = within(c.progress(proto::ProgressRequest {
            lease_id: lease.lease_id.clone(),
            step: 1,
            scalars: HashMap::from([("mse".into(), 1.0), ("bad".into(), f64::NAN)]),
        }))
        .await
        .unwrap()
        .into_inner();
        assert!(!progress.stop, "{}", progress.reason);
        let ack = within(c.complete(proto::CompleteRequest {
            lease_id: lease.lease_id.clone(),
            success: true,
            metrics: HashMap::from([("loss".into(), index as f64)]),
            error: String::new(),
            artifact: String::new(),
            duration_s: 0.01,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
        assert!(ack.accepted, "{}", ack.reason);
        done.push(lease.trial_id);
        // A duplicate completion is always refused.
        let dup = within(c.complete(proto::CompleteRequest {
            lease_id: lease.lease_id,
            success: true,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
        assert!(!dup.accepted);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grid_with_concurrent_workers_completes_each_trial_exactly_once() {
    const N: usize = 60;
    let s = server(N, None).await;
    let mut workers = Vec::new();
    for i in 0..6 {
        let c = s.client().await;
        workers.push(tokio::spawn(fake_worker(c, format!("w{i}"))));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(within(w).await.unwrap());
    }
    assert_eq!(all.len(), N, "every trial completed once");
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(unique.len(), N, "no duplicates");
    let counts = within(s.scheduler.finished()).await.unwrap();
    assert_eq!((counts.completed, counts.failed, counts.proposed), (N as u64, 0, N as u64));
    assert_eq!(counts.best.unwrap().index, 0);

    // The report over gRPC: every trial, completed, with the NaN progress scalar dropped.
    let mut c = s.client().await;
    let json = within(c.report(proto::ReportRequest { sweep: "grid".into() }))
        .await
        .unwrap()
        .into_inner()
        .json;
    let report: ReportJson = serde_json::from_str(&json).unwrap();
    assert_eq!(report.sweeps.len(), 1);
    assert!(report.sweeps[0].finished);
    assert_eq!(report.trials.len(), N);
    assert!(report.trials.iter().all(|t| t.status == TrialStatus::Completed && t.attempt == 1));
    assert!(report.trials.iter().all(|t| !t.metrics.contains_key("bad")));
    let missing = within(c.report(proto::ReportRequest { sweep: "nope".into() })).await;
    assert_eq!(missing.unwrap_err().code(), tonic::Code::NotFound);
    s.stop().await;
}

/// A worker that asks for its next lease with each result: one RPC per trial after the first
/// lease. Returns the trials it completed and the Lease calls it made.
async fn chained_worker(mut c: CoordinatorClient<Channel>, name: String) -> (Vec<String>, usize) {
    let id = register(&mut c, &name).await;
    let (mut done, mut lease_calls) = (Vec::new(), 0);
    let mut next = None;
    loop {
        let lease = match next.take() {
            Some(lease) => lease,
            None => {
                lease_calls += 1;
                let reply =
                    within(c.lease(proto::LeaseRequest { worker_id: id.clone(), wait_ms: 2000 }))
                        .await
                        .unwrap()
                        .into_inner();
                if reply.shutdown {
                    return (done, lease_calls);
                }
                let Some(lease) = reply.lease else { continue };
                lease
            }
        };
        let index: u64 = lease.trial_id.rsplit('/').next().unwrap().parse().unwrap();
        let reply = within(c.complete(proto::CompleteRequest {
            lease_id: lease.lease_id,
            success: true,
            metrics: HashMap::from([("loss".into(), index as f64)]),
            lease_next: true,
            worker_id: id.clone(),
            wait_ms: 2000,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
        assert!(reply.accepted, "{}", reply.reason);
        done.push(lease.trial_id);
        if reply.shutdown {
            assert!(reply.next.is_none());
            return (done, lease_calls);
        }
        next = reply.next;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_carries_the_next_lease_over_grpc() {
    const N: usize = 40;
    let s = server(N, None).await;
    let mut workers = Vec::new();
    for i in 0..4 {
        let c = s.client().await;
        workers.push(tokio::spawn(chained_worker(c, format!("w{i}"))));
    }
    let (mut all, mut lease_calls) = (Vec::new(), 0);
    for w in workers {
        let (done, calls) = within(w).await.unwrap();
        all.extend(done);
        lease_calls += calls;
    }
    assert_eq!(all.len(), N, "every trial completed once");
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), N, "no duplicates");
    // Each worker leases once at the start (a long-poll could come back empty, and a
    // worker that finds the sweep finished leases once more for its shutdown).
    assert!(lease_calls <= 4 * 3, "{lease_calls} Lease calls for {N} trials");
    let counts = within(s.scheduler.finished()).await.unwrap();
    assert_eq!((counts.completed, counts.failed), (N as u64, 0));

    // Edge checks of the lease part: worker_id is required and bounded, as for Lease.
    let mut c = s.client().await;
    for (worker_id, what) in [(String::new(), "worker_id is empty"), ("w".repeat(300), "300 bytes")]
    {
        let e = within(c.complete(proto::CompleteRequest {
            lease_id: "x".into(),
            lease_next: true,
            worker_id,
            ..Default::default()
        }))
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains(what), "{}", e.message());
    }
    // Without lease_next the worker fields are ignored, and the reply carries no lease.
    let reply = within(c.complete(proto::CompleteRequest {
        lease_id: "x".into(),
        worker_id: String::new(),
        wait_ms: 5000,
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    assert!(!reply.accepted && reply.next.is_none() && !reply.shutdown);
    s.stop().await;
}

#[tokio::test]
async fn completion_from_an_unknown_worker_is_accepted_without_a_lease() {
    let s = server(3, None).await;
    let mut c = s.client().await;
    let id = register(&mut c, "w").await;
    let lease = within(c.lease(proto::LeaseRequest { worker_id: id, wait_ms: 0 }))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    let reply = within(c.complete(proto::CompleteRequest {
        lease_id: lease.lease_id,
        success: true,
        metrics: HashMap::from([("loss".into(), 0.5)]),
        lease_next: true,
        worker_id: "w9-forgotten".into(),
        wait_ms: 1000,
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    assert!(reply.accepted, "{}", reply.reason);
    assert!(reply.next.is_none() && !reply.shutdown);
    assert_eq!(
        within(s.scheduler.records("grid")).await.unwrap()[0].status,
        TrialStatus::Completed
    );
    // The worker's next Lease tells it to register again.
    let e = within(c.lease(proto::LeaseRequest { worker_id: "w9-forgotten".into(), wait_ms: 0 }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    s.stop().await;
}

#[tokio::test]
async fn invalid_arguments_are_refused_at_the_edge() {
    let s = server(3, None).await;
    let mut c = s.client().await;
    let e = within(c.lease(proto::LeaseRequest { worker_id: String::new(), wait_ms: 0 }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("worker_id"), "{}", e.message());
    let e = within(c.progress(proto::ProgressRequest::default())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = within(c.complete(proto::CompleteRequest {
        lease_id: "x".into(),
        duration_s: f64::NAN,
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let big: HashMap<String, f64> =
        (0..MAX_MAP_ENTRIES + 1).map(|i| (format!("m{i}"), 1.0)).collect();
    let e = within(c.complete(proto::CompleteRequest {
        lease_id: "x".into(),
        metrics: big,
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("entries"), "{}", e.message());
    let e = within(c.release(proto::ReleaseRequest::default())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // Unknown worker: not_found, so the client re-registers.
    let e = within(c.lease(proto::LeaseRequest { worker_id: "w9-dead".into(), wait_ms: 0 }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    // Another protocol version: failed_precondition.
    let e = within(c.register(proto::RegisterRequest {
        protocol_version: msae_shared::PROTOCOL_VERSION + 1,
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    // Non-finite final metrics are dropped and noted, not stored.
    let id = register(&mut c, "w").await;
    let lease = within(c.lease(proto::LeaseRequest { worker_id: id, wait_ms: 0 }))
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(lease.runner, "noop");
    assert_eq!(lease.ttl_ms, 10_000);
    let ack = within(c.complete(proto::CompleteRequest {
        lease_id: lease.lease_id,
        success: true,
        metrics: HashMap::from([("loss".into(), f64::INFINITY), ("mse".into(), 0.5)]),
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    assert!(ack.accepted);
    let t = &within(s.scheduler.records("grid")).await.unwrap()[0];
    assert_eq!(t.metrics.get("loss"), None);
    assert_eq!(t.metrics["mse"], 0.5);
    assert!(t.errors.iter().any(|e| e.contains("non-finite loss")), "{:?}", t.errors);
    s.stop().await;
}

#[tokio::test]
async fn token_is_required_when_configured() {
    let s = server(1, Some("s3cret")).await;
    let mut c = s.client().await;
    let e = within(c.report(proto::ReportRequest::default())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut wrong = tonic::Request::new(proto::ReportRequest::default());
    wrong.metadata_mut().insert("authorization", "Bearer s3cre".parse().unwrap());
    let e = within(c.report(wrong)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut right = tonic::Request::new(proto::ReportRequest::default());
    right.metadata_mut().insert("authorization", "Bearer s3cret".parse().unwrap());
    let json = within(c.report(right)).await.unwrap().into_inner().json;
    let report: ReportJson = serde_json::from_str(&json).unwrap();
    assert_eq!(report.sweeps[0].name, "grid");
    s.stop().await;
}

#[test]
fn constant_time_eq_compares_exactly() {
    assert!(constant_time_eq(b"abc", b"abc"));
    assert!(!constant_time_eq(b"abc", b"abd"));
    assert!(!constant_time_eq(b"abc", b"abcd"));
    assert!(!constant_time_eq(b"", b"a"));
}

/// Rough throughput of the whole path (tonic + scheduler + durable redb commits); run with
/// `cargo test -p msae-coordinator --lib --release service::tests::throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check"]
async fn throughput_over_grpc() {
    for (n, workers) in [(2000usize, 1usize), (5000, 16), (5000, 64)] {
        let s = server(n, None).await;
        let started = std::time::Instant::now();
        let mut tasks = Vec::new();
        for i in 0..workers {
            let c = s.client().await;
            tasks.push(tokio::spawn(fake_worker(c, format!("w{i}"))));
        }
        let mut total = 0;
        for t in tasks {
            total += within(t).await.unwrap().len();
        }
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(total, n);
        eprintln!(
            "{n} trials, {workers} workers: {:.0} trials/s ({:.3} ms/trial; 4 RPCs per trial)",
            n as f64 / secs,
            secs * 1000.0 / n as f64
        );
        s.stop().await;
    }
}
