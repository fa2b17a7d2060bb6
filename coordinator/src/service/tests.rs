//! Service tests: a real tonic server on 127.0.0.1:0 and tonic clients; every await is under a
//! timeout.

use super::*;
use crate::model::TrialStatus;
use crate::report::{ConfigColumns, MetricColumns, Report, ReportFormat};
use crate::scheduler::tests::{ListStrategy, actor_policy, make_config};
use crate::scheduler::{Scheduler, SchedulerPolicy, SweepInput};
use crate::store::Store;
use msae_shared::proto::coordinator_client::CoordinatorClient;
use std::collections::HashSet;
use tokio_stream::StreamExt;
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
    server_with(n, token, actor_policy()).await
}

async fn server_with(n: usize, token: Option<&str>, policy: SchedulerPolicy) -> Server {
    server_limited(n, token, policy, Limits::default()).await
}

async fn server_limited(
    n: usize,
    token: Option<&str>,
    policy: SchedulerPolicy,
    limits: Limits,
) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("svc.redb")).unwrap();
    let input = SweepInput {
        name: "grid".into(),
        yaml: "name: grid".into(),
        fingerprint: "fp".into(),
        new_sweep: false,
    };
    let scheduler =
        Scheduler::start(store, input, policy, Box::new(ListStrategy::new(n)), make_config())
            .await
            .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        listener,
        scheduler.clone(),
        token.map(String::from),
        None,
        limits,
        async move {
            let _ = rx.await;
        },
    ));
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
            evaluations: vec![proto::Evaluation {
                step: 1,
                scalars: HashMap::from([("val_loss".into(), 0.5)]),
                ..Default::default()
            }],
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
    let request =
        proto::ReportRequest { sweep: "grid".into(), records: true, ..Default::default() };
    let stream = within(c.report(request)).await.unwrap().into_inner();
    let report: ReportJson = within(collect_records(stream)).await.unwrap();
    assert_eq!(report.sweeps.len(), 1);
    assert!(report.sweeps[0].finished);
    assert_eq!(report.trials.len(), N);
    assert!(report.trials.iter().all(|t| t.status == TrialStatus::Completed && t.attempt == 1));
    assert!(report.trials.iter().all(|t| !t.metrics.contains_key("bad")));
    let missing =
        within(c.report(proto::ReportRequest { sweep: "nope".into(), ..Default::default() })).await;
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
async fn a_pruning_decision_reaches_the_worker_and_its_result_ends_the_trial_pruned() {
    // The median rule over `loss`, judged from the first trial on.
    let rule = crate::spec::EarlyTerminate::Median { warmup_steps: 0, min_trials: 1 };
    let s = server_with(2, None, SchedulerPolicy { early_terminate: Some(rule), ..actor_policy() })
        .await;
    let mut c = s.client().await;
    let id = register(&mut c, "w").await;
    let evaluation = |lease_id: &str, loss: f64| proto::ProgressRequest {
        lease_id: lease_id.into(),
        step: 10,
        scalars: HashMap::new(),
        evaluations: vec![proto::Evaluation {
            step: 10,
            scalars: HashMap::from([("loss".into(), loss), ("mse".into(), 1.0)]),
            ..Default::default()
        }],
    };
    let lease = |c: &mut CoordinatorClient<Channel>, id: String| {
        let mut c = c.clone();
        async move {
            within(c.lease(proto::LeaseRequest { worker_id: id, wait_ms: 0 }))
                .await
                .unwrap()
                .into_inner()
                .lease
                .unwrap()
        }
    };
    let first = lease(&mut c, id.clone()).await;
    let reply = within(c.progress(evaluation(&first.lease_id, 0.5))).await.unwrap().into_inner();
    assert!(!reply.stop && !reply.prune, "{reply:?}");
    let done = proto::CompleteRequest {
        lease_id: first.lease_id.clone(),
        success: true,
        metrics: HashMap::from([("loss".into(), 0.3)]),
        final_step: 20,
        ..Default::default()
    };
    assert!(within(c.complete(done)).await.unwrap().into_inner().accepted);
    // Worse than the median (0.5) of the other trial at step 10: pruned, in the reply.
    let second = lease(&mut c, id.clone()).await;
    let reply = within(c.progress(evaluation(&second.lease_id, 0.9))).await.unwrap().into_inner();
    assert!(reply.stop && reply.prune && !reply.release, "{reply:?}");
    assert!(reply.reason.contains("median"), "{}", reply.reason);
    // The worker ends it with its last metrics, marked pruned, and asks for its next lease.
    let pruned = proto::CompleteRequest {
        lease_id: second.lease_id.clone(),
        success: true,
        pruned: true,
        metrics: HashMap::from([("loss".into(), 0.9), ("steps".into(), 10.0)]),
        final_step: 10,
        lease_next: true,
        worker_id: id.clone(),
        wait_ms: 0,
        ..Default::default()
    };
    let ack = within(c.complete(pruned)).await.unwrap().into_inner();
    assert!(ack.accepted && ack.next.is_none(), "nothing left to lease: {ack:?}");
    let trials = within(s.scheduler.records("grid")).await.unwrap();
    let t = &trials[1];
    assert_eq!(t.status, TrialStatus::Pruned);
    assert_eq!(t.metrics, BTreeMap::from([("loss".into(), 0.9), ("steps".into(), 10.0)]));
    assert_eq!((t.step, t.curve.as_slice()), (10, &[(10, 0.9)][..]));
    assert_eq!(trials[0].status, TrialStatus::Completed);
    let counts = s.scheduler.counts().borrow().clone();
    assert_eq!((counts.completed, counts.pruned, counts.finished), (1, 1, true));
    // `pruned` without success is a plain failure, never a pruned trial.
    let c2 = Completion::try_from(proto::CompleteRequest {
        lease_id: "l".into(),
        pruned: true,
        ..Default::default()
    })
    .unwrap();
    assert!(!c2.outcome.pruned);
    s.stop().await;
}

/// Per-class statistics reach the scheduler's types as sent (an empty router array: no
/// routing); a malformed table is dropped alone, never the evaluation or the result with it.
#[test]
fn class_statistics_cross_the_edge_and_a_malformed_table_costs_only_itself() {
    let table = |active: Vec<u64>| proto::ClassStats {
        num_stripes: 2,
        num_classes: 2,
        class_samples: vec![3, 1],
        stripe_class_active: active,
        routing_score_mean: Vec::new(),
        class_mse: vec![0.5, 0.25],
    };
    let progress = |c: proto::ClassStats| proto::ProgressRequest {
        lease_id: "l".into(),
        evaluations: vec![proto::Evaluation {
            step: 5,
            scalars: HashMap::from([("loss".into(), 1.0)]),
            class_stats: Some(c),
        }],
        ..Default::default()
    };
    let p = ProgressUpdate::try_from(progress(table(vec![3, 0, 1, 1]))).unwrap();
    let c = p.report.evaluations[0].classes.as_ref().expect("the statistics");
    assert_eq!((c.active(0, 0), c.active(1, 1), c.routing_scores()), (3, 1, None));
    // Three entries for a 2 x 2 table; then a count above its class's samples.
    for bad in [vec![3, 0, 1], vec![3, 2, 0, 0]] {
        let p = ProgressUpdate::try_from(progress(table(bad))).unwrap();
        assert_eq!(p.report.evaluations[0].classes, None);
        assert_eq!(p.report.evaluations[0].scalars["loss"], 1.0, "the scalars still count");
    }
    let complete = |success: bool| proto::CompleteRequest {
        lease_id: "l".into(),
        success,
        class_stats: Some(proto::ClassStats {
            routing_score_mean: vec![0.5, 1.0, -1.0, 0.0],
            ..table(vec![0, 0, 3, 1])
        }),
        ..Default::default()
    };
    let done = Completion::try_from(complete(true)).unwrap();
    let c = done.outcome.classes.expect("the final statistics");
    assert_eq!((c.active(1, 0), c.routing_score(1, 0)), (3, Some(-1.0)));
    assert_eq!(Completion::try_from(complete(false)).unwrap().outcome.classes, None);
    let wrong = proto::CompleteRequest {
        class_stats: Some(proto::ClassStats { num_stripes: 3, ..table(vec![0; 4]) }),
        ..complete(true)
    };
    let done = Completion::try_from(wrong).unwrap();
    assert!(done.outcome.success && done.outcome.classes.is_none());
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
    let mut right =
        tonic::Request::new(proto::ReportRequest { format: "json".into(), ..Default::default() });
    right.metadata_mut().insert("authorization", "Bearer s3cret".parse().unwrap());
    let stream = within(c.report(right)).await.unwrap().into_inner();
    let report = within(collect_report(stream)).await.unwrap();
    assert_eq!(report.sweep, "grid");
    s.stop().await;
}

/// The one Report client (`report --coordinator` and the end-to-end tests): the token travels,
/// a refusal names the URL, and the records come back whole.
#[tokio::test]
async fn the_report_client_asks_with_its_token() {
    let s = server(2, Some("s3cret")).await;
    let url = format!("http://{}", s.addr);
    let json = ReportQuery::new(ReportFormat::Json);
    let text =
        within(report::fetch_text(&url, &json, Some("s3cret"), &Default::default())).await.unwrap();
    let parsed: crate::report::Report = serde_json::from_str(&text).unwrap();
    assert_eq!(parsed.sweep, "grid");
    let e = within(report::fetch_text(&url, &json, None, &Default::default()))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("the coordinator at {url} refused the report")), "{e}");
    let records =
        within(report::fetch_records(&url, Some("grid"), Some("s3cret"), &Default::default()))
            .await
            .unwrap();
    assert_eq!(records.sweeps.len(), 1);
    // Trials are proposed as they are needed: at least the first is stored.
    assert!(!records.trials.is_empty() && records.trials.iter().all(|t| t.sweep == "grid"));
    let e = within(report::fetch_text("not a url", &json, None, &Default::default()))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid coordinator URL"), "{e}");
    s.stop().await;
}

/// A query survives the trip through its request.
#[test]
fn report_query_round_trips_through_its_request() {
    let queries = [
        ReportQuery { records: true, ..ReportQuery::new(ReportFormat::Table) },
        ReportQuery {
            sweep: Some("grid".into()),
            metric: Some("mmcs".into()),
            goal: Some(crate::model::Goal::Maximize),
            top: Some(3),
            ..ReportQuery::new(ReportFormat::Csv)
        },
        ReportQuery {
            goal: Some(crate::model::Goal::Minimize),
            ..ReportQuery::new(ReportFormat::Json)
        },
        ReportQuery {
            metrics: Some(MetricColumns::Pick(vec!["l0".into(), "my_score".into()])),
            config: Some(ConfigColumns::Full),
            ..ReportQuery::new(ReportFormat::Table)
        },
        ReportQuery {
            metrics: Some(MetricColumns::All),
            config: Some(ConfigColumns::Swept),
            ..ReportQuery::new(ReportFormat::Csv)
        },
        ReportQuery { metrics: Some(MetricColumns::Key), ..ReportQuery::new(ReportFormat::Json) },
    ];
    for q in queries {
        assert_eq!(ReportQuery::try_from(proto::ReportRequest::from(&q)).unwrap(), q);
    }
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

/// Proposes `n` points, each with a long text parameter, so rows are large.
struct WideStrategy {
    n: u64,
    next: u64,
}

impl crate::search::Strategy for WideStrategy {
    fn propose(&mut self) -> crate::search::Proposal {
        if self.next >= self.n {
            return crate::search::Proposal::Done;
        }
        self.next += 1;
        crate::search::Proposal::Point(crate::search::Point {
            index: self.next - 1,
            params: wide_params(self.next - 1),
        })
    }
    fn observe(&mut self, _: u64, _: Option<f64>) {}
}

fn wide_params(i: u64) -> crate::scheduler::Params {
    crate::scheduler::Params::from([
        ("x".to_string(), serde_json::json!(i)),
        ("note".to_string(), serde_json::json!(format!("{i:>6}{}", "n".repeat(400)))),
    ])
}

/// A server whose store already holds `n` completed trials of sweep "grid" (resumed), written
/// in one commit: far quicker than completing them over gRPC.
async fn server_with_completed(n: u64) -> Server {
    let yaml = "name: grid\nmetric: {name: loss, goal: minimize}\n";
    let trials = (0..n)
        .map(|i| {
            // Ranked in reverse index order, so order is checked, not assumed.
            completed_trial(i, BTreeMap::from([("loss".to_string(), (n - i) as f64)]))
        })
        .collect();
    server_with_records(yaml, trials).await
}

/// A completed trial of sweep "grid" at point `i` of [`WideStrategy`], with `metrics`.
fn completed_trial(i: u64, metrics: BTreeMap<String, f64>) -> TrialRecord {
    let params = wide_params(i);
    TrialRecord {
        sweep: "grid".into(),
        index: i,
        config: serde_json::json!({ "params": params }).into(),
        params,
        status: TrialStatus::Completed,
        attempt: 1,
        lease: None,
        step: 10,
        metrics,
        progress: BTreeMap::new(),
        curve: Vec::new(),
        errors: Vec::new(),
        worker: Some("w".into()),
        artifact: None,
        weights: None,
        created_ms: 1,
        finished_ms: Some(2),
        duration_s: Some(0.5),
    }
}

/// A server resuming sweep "grid" (`yaml`) whose store holds `trials` (the points of a
/// [`WideStrategy`] as long), written in one commit.
async fn server_with_records(yaml: &str, trials: Vec<TrialRecord>) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.redb");
    let n = trials.len() as u64;
    {
        let store = Store::open(&path).unwrap();
        let mut batch = crate::store::WriteBatch::new();
        batch.put_sweep(&SweepRecord {
            name: "grid".into(),
            yaml: yaml.into(),
            fingerprint: "fp".into(),
            created_ms: 1,
            proposed: n,
            finished: false,
            uid: None,
        });
        for t in &trials {
            batch.put_trial(t);
        }
        store.write(&batch).unwrap();
    }
    let input = SweepInput {
        name: "grid".into(),
        yaml: yaml.into(),
        fingerprint: "fp".into(),
        new_sweep: false,
    };
    let scheduler = Scheduler::start(
        Store::open(&path).unwrap(),
        input,
        actor_policy(),
        Box::new(WideStrategy { n, next: 0 }),
        make_config(),
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        let _ = rx.await;
    };
    let task =
        tokio::spawn(serve(listener, scheduler.clone(), None, None, Limits::default(), stop));
    Server { addr, scheduler, stop: Some(tx), task, _dir: dir }
}

/// Item 9: a report far over tonic's 4 MB message limit reaches a client that keeps the
/// default limit, ranked, in pieces; so do the raw records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_larger_than_a_message_streams_in_pieces() {
    const N: u64 = 12_000;
    let s = server_with_completed(N).await;
    let mut c = s.client().await;
    let json = proto::ReportRequest { format: "json".into(), ..Default::default() };
    let stream = within(c.report(json.clone())).await.unwrap().into_inner();
    let text = within(collect_text(stream)).await.unwrap();
    assert!(text.len() > 4 << 20, "the test needs a report larger than one message");
    let report: crate::report::Report = serde_json::from_str(&text).unwrap();
    assert_eq!((report.sweep.as_str(), report.metric.as_str()), ("grid", "loss"));
    assert_eq!(report.counts.completed, N as usize);
    assert_eq!(report.rows.len(), N as usize);
    assert!(report.rows.iter().enumerate().all(|(i, r)| r.rank == i + 1));
    assert_eq!(report.rows[0].trial, N - 1, "best (lowest loss) first");
    assert_eq!(report.rows[N as usize - 1].trial, 0);
    assert_eq!(report.rows[5].params, wide_params(N - 6));

    // Ranking options travel with the request and are applied by the coordinator.
    let request = proto::ReportRequest { top: Some(3), goal: "maximize".into(), ..json };
    let stream = within(c.report(request)).await.unwrap().into_inner();
    let top = within(collect_report(stream)).await.unwrap();
    assert_eq!(top.rows.iter().map(|r| r.trial).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(top.counts.completed, N as usize, "counts cover every trial");
    // The default format is the table `report` prints: a title, a header and a line per row.
    let stream = within(c.report(proto::ReportRequest::default())).await.unwrap().into_inner();
    let table = within(collect_text(stream)).await.unwrap();
    assert_eq!(table.lines().count(), N as usize + 2);
    assert!(table.lines().nth(2).unwrap().contains(&format!("{}", N - 1)));

    let request = proto::ReportRequest { records: true, ..Default::default() };
    let stream = within(c.report(request)).await.unwrap().into_inner();
    let records = within(collect_records(stream)).await.unwrap();
    assert_eq!(records.trials.len(), N as usize);
    assert!(serde_json::to_string(&records).unwrap().len() > 4 << 20);
    s.stop().await;
}

/// Issue 10: every column option gives over gRPC (`report --coordinator URL`) the report that
/// the same code gives on the stored records; a request without the new fields (an older
/// client) gets its format's default columns; narrowing and `--plot` work from the reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_rpc_gives_the_local_report_for_every_column_option() {
    let yaml = "name: grid\nmetric: {name: fvu, goal: minimize}\n";
    let mut trials: Vec<TrialRecord> = (0..6u64)
        .map(|i| {
            let x = i as f64;
            let mut t = completed_trial(
                i,
                BTreeMap::from([
                    ("fvu".to_string(), 0.5 / (1.0 + x)),
                    ("l0".to_string(), 4.0 + 3.0 * x),
                    ("mmcs".to_string(), 0.9),
                    ("steps".to_string(), 100.0),
                    ("zz_custom".to_string(), x),
                ]),
            );
            t.config = serde_json::json!({
                "x": i, "note": t.params["note"], "steps": 100, "data": {"dim": 64}
            })
            .into();
            t.worker = Some(format!("w{}", i % 2));
            t.attempt = 1 + (i % 2) as u32;
            t.duration_s = Some(1.0 + x);
            t
        })
        .collect();
    trials[4].status = TrialStatus::Pruned;
    trials[5].status = TrialStatus::Failed;
    trials[5].metrics.clear();
    trials[5].errors = vec!["out of memory".into()];
    let s = server_with_records(yaml, trials).await;
    let url = format!("http://{}", s.addr);
    let store = s.scheduler.store();
    let sweep = store.sweeps().unwrap().into_iter().find(|w| w.name == "grid").unwrap();
    let stored = store.trials("grid").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let args = |format, metrics: Option<MetricColumns>, config| crate::cli::ReportArgs {
        db: dir.path().join("unused.redb"),
        sweep: None,
        top: None,
        metric: None,
        goal: None,
        format,
        coordinator: Some(url.clone()),
        token: Default::default(),
        tls: Default::default(),
        pareto: None,
        l0_band: None,
        metrics,
        config,
        plot: None,
    };
    let picks = MetricColumns::Pick(vec!["zz_custom".into(), "l0".into()]);
    for format in [ReportFormat::Table, ReportFormat::Csv, ReportFormat::Json] {
        for metrics in
            [None, Some(MetricColumns::Key), Some(MetricColumns::All), Some(picks.clone())]
        {
            for config in [None, Some(ConfigColumns::Swept), Some(ConfigColumns::Full)] {
                let a = args(format, metrics.clone(), config);
                let remote = within(crate::cli::report_command(&a)).await.unwrap();
                let q =
                    ReportQuery { metrics: metrics.clone(), config, ..ReportQuery::new(format) };
                let local = Report::for_sweep(&sweep, &stored, &q.options()).unwrap();
                assert_eq!(remote, local.render(format), "{format:?} {metrics:?} {config:?}");
            }
        }
    }
    // The full CSV holds the config's other settings and the picked metrics in order.
    let csv = within(crate::cli::report_command(&args(ReportFormat::Csv, Some(picks), None)))
        .await
        .unwrap();
    let header = csv.lines().next().unwrap();
    assert_eq!(
        header,
        "rank,trial,note,x,fvu,l0,zz_custom,status,attempts,worker,duration_s,files,config.data.dim,\
         config.steps,error"
    );
    // An older client sends neither field: its format's defaults (every metric and setting).
    let mut c = s.client().await;
    let old = proto::ReportRequest { format: "csv".into(), ..Default::default() };
    let text = within(collect_text(within(c.report(old)).await.unwrap().into_inner())).await;
    let all = Report::for_sweep(&sweep, &stored, &ReportQuery::new(ReportFormat::Csv).options());
    assert_eq!(text.unwrap(), all.unwrap().render(ReportFormat::Csv));
    // Narrowed and plotted from the reply.
    let plot = dir.path().join("grid.svg");
    let narrowed = crate::cli::ReportArgs {
        pareto: Some(("fvu".into(), "l0".into())),
        plot: Some(plot.clone()),
        top: Some(3),
        ..args(ReportFormat::Table, Some(MetricColumns::Pick(vec!["mmcs".into()])), None)
    };
    let table = within(crate::cli::report_command(&narrowed)).await.unwrap();
    let header = table.lines().nth(2).unwrap();
    assert!(
        header.starts_with("rank  trial  note") && header.contains(" fvu  mmcs  status"),
        "{table}"
    );
    assert!(!header.contains("l0"), "l0 narrowed the rows but was not picked: {table}");
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.contains("Pareto frontier of fvu and l0"), "{svg}");
    s.stop().await;
}

/// Item 12a: a report of zero trials is refused, not answered with an empty table.
#[tokio::test]
async fn report_options_are_checked() {
    let s = server(2, None).await;
    let mut c = s.client().await;
    for request in [
        proto::ReportRequest { top: Some(0), ..Default::default() },
        proto::ReportRequest { goal: "sideways".into(), ..Default::default() },
        proto::ReportRequest { metric: "fvu\n".into(), ..Default::default() },
        proto::ReportRequest { format: "yaml".into(), ..Default::default() },
        proto::ReportRequest { config: "everything".into(), ..Default::default() },
        proto::ReportRequest { metrics: "fvu,,l0".into(), ..Default::default() },
        proto::ReportRequest { metrics: "fvu,l0\n".into(), ..Default::default() },
        proto::ReportRequest { metrics: "l".repeat(64 * MAX_ID_LEN + 1), ..Default::default() },
    ] {
        let e = within(c.report(request.clone())).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{request:?}: {e}");
    }
    // A picked metric no trial reports (a typo) is refused once the records are read.
    let typo = proto::ReportRequest { metrics: "fuv".into(), ..Default::default() };
    let stream = within(c.report(typo)).await.unwrap().into_inner();
    let e = within(collect_text(stream)).await.unwrap_err();
    assert!(
        matches!(&e, FetchError::Refused(s) if s.code() == tonic::Code::InvalidArgument
            && s.message().contains("did you mean `fvu`?")),
        "{e}"
    );
    s.stop().await;
}

/// Item 11: an identifier with a control character (a newline and an escape sequence would
/// forge a line of the coordinator's log) is refused in every request that carries one.
#[tokio::test]
async fn control_characters_in_identifiers_are_refused() {
    let s = server(2, None).await;
    let mut c = s.client().await;
    let forged = "w1\n2030-01-01T00:00:00Z  INFO \u{1b}[31mtrial s/0 completed";
    fn codes<T: std::fmt::Debug>(r: Result<tonic::Response<T>, Status>) -> Status {
        r.unwrap_err()
    }
    let register = |name: &str, device: &str| proto::RegisterRequest {
        protocol_version: msae_shared::PROTOCOL_VERSION,
        name: name.into(),
        device: device.into(),
    };
    let mut refused = vec![
        codes(within(c.register(register(forged, "cpu"))).await),
        codes(within(c.register(register("w", "cpu\u{1b}[2K"))).await),
        codes(within(c.register(register("w\u{7f}", "cpu"))).await),
        codes(within(c.lease(proto::LeaseRequest { worker_id: "w\r".into(), wait_ms: 0 })).await),
        codes(
            within(
                c.progress(proto::ProgressRequest { lease_id: "l\n".into(), ..Default::default() }),
            )
            .await,
        ),
        codes(
            within(
                c.complete(proto::CompleteRequest { lease_id: "l\t".into(), ..Default::default() }),
            )
            .await,
        ),
        codes(
            within(c.complete(proto::CompleteRequest {
                lease_id: "l".into(),
                metrics: HashMap::from([("fvu\n".into(), 1.0)]),
                ..Default::default()
            }))
            .await,
        ),
        codes(
            within(c.release(proto::ReleaseRequest {
                lease_id: "l\u{85}".into(),
                ..Default::default()
            }))
            .await,
        ),
    ];
    let e = within(c.report(proto::ReportRequest { sweep: "grid\n".into(), ..Default::default() }))
        .await
        .map(|_| ())
        .unwrap_err();
    refused.push(e);
    for e in &refused {
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().contains("control character"), "{e}");
    }
    // Printable names, non-ASCII ones included, are still welcome.
    let id = within(c.register(register("gpu-nœud-α 1", "cuda:0"))).await.unwrap();
    assert!(!id.into_inner().worker_id.is_empty());
    s.stop().await;
}

/// Raw request bytes, to send what no generated client would.
#[derive(Debug, Clone, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        use prost::bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

async fn raw_call(addr: std::net::SocketAddr, method: &'static str, body: Vec<u8>) -> Status {
    let channel =
        within(Channel::from_shared(format!("http://{addr}")).unwrap().connect()).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    within(grpc.ready()).await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    within(grpc.unary(tonic::Request::new(body), path, RawCodec))
        .await
        .map(|_: tonic::Response<Vec<u8>>| ())
        .unwrap_err()
}

/// Item 12c: bytes that do not decode are the client's fault (`invalid_argument`, not
/// `internal`); a request over the size limit is `resource_exhausted`, not `out_of_range`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_and_oversized_requests_get_client_error_codes() {
    let s = server(2, None).await;
    // An unterminated varint; then field 2 (name, a string) holding invalid UTF-8.
    for body in [vec![0xff, 0xff, 0xff], vec![0x12, 0x02, 0xc3, 0x28]] {
        let e = raw_call(s.addr, "/msae.v1.Coordinator/Register", body.clone()).await;
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{body:?}: {e}");
        assert!(e.message().contains("failed to decode"), "{e}");
    }
    let e = raw_call(s.addr, "/msae.v1.Coordinator/Report", vec![0xff]).await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "a streaming method too: {e}");
    let e =
        raw_call(s.addr, "/msae.v1.Coordinator/Lease", vec![0; edge::MAX_REQUEST_BYTES + 1]).await;
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    // The handlers' own answers keep their codes.
    let e = raw_call(s.addr, "/msae.v1.Coordinator/Lease", Vec::new()).await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "empty worker_id: {e}");
    let mut c = s.client().await;
    let e = within(c.lease(proto::LeaseRequest { worker_id: "nobody".into(), wait_ms: 0 }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Uploads

fn upload_policy(root: &std::path::Path, limit: u64) -> SchedulerPolicy {
    let store = crate::weights::WeightStore::open(root.to_path_buf(), limit).unwrap();
    SchedulerPolicy {
        keep_weights: crate::weights::KeepWeights::All,
        weights: Some(std::sync::Arc::new(store)),
        ..actor_policy()
    }
}

fn trial_files(seed: u8, weights_len: usize) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("weights.safetensors", (0..weights_len).map(|i| (i as u8) ^ seed).collect()),
        ("config.yaml", format!("seed: {seed}\n").into_bytes()),
        ("metrics.json", b"{\"loss\": 1.0}\n".to_vec()),
    ]
}

/// The chunks of an upload of `files` (1 MiB each), digests as given or computed.
fn upload_chunks(
    lease: &str,
    files: &[(&str, Vec<u8>)],
    digests: Option<&[&str]>,
) -> Vec<proto::UploadChunk> {
    let mut out = Vec::new();
    for (i, (name, bytes)) in files.iter().enumerate() {
        let sha =
            digests.map_or_else(|| msae_shared::upload::sha256_hex(bytes), |d| d[i].to_string());
        let parts: Vec<&[u8]> =
            if bytes.is_empty() { vec![&[][..]] } else { bytes.chunks(1 << 20).collect() };
        for (c, part) in parts.into_iter().enumerate() {
            out.push(proto::UploadChunk {
                lease_id: if i == 0 && c == 0 { lease.into() } else { String::new() },
                file: if c == 0 { name.to_string() } else { String::new() },
                size: if c == 0 { bytes.len() as u64 } else { 0 },
                sha256: if c == 0 { sha.clone() } else { String::new() },
                data: part.to_vec(),
            });
        }
    }
    out
}

async fn lease_one(c: &mut CoordinatorClient<Channel>, id: &str) -> proto::Lease {
    within(c.lease(proto::LeaseRequest { worker_id: id.into(), wait_ms: 2000 }))
        .await
        .unwrap()
        .into_inner()
        .lease
        .expect("a lease")
}

async fn complete_ok(c: &mut CoordinatorClient<Channel>, lease: &str) -> proto::CompleteReply {
    within(c.complete(proto::CompleteRequest {
        lease_id: lease.into(),
        success: true,
        metrics: HashMap::from([("loss".into(), 1.0)]),
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner()
}

fn staging_is_empty(root: &std::path::Path) -> bool {
    std::fs::read_dir(root.join(".staging")).unwrap().next().is_none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_files_complete_the_trial_and_are_kept_byte_for_byte() {
    let files_dir = tempfile::tempdir().unwrap();
    let root = files_dir.path().join("w");
    let s = server_with(1, None, upload_policy(&root, 8 << 20)).await;
    let mut c = s.client().await;
    let id = register(&mut c, "up").await;
    let lease = lease_one(&mut c, &id).await;
    assert!(lease.upload && lease.upload_limit == 8 << 20, "{lease:?}");
    let files = trial_files(7, (2 << 20) + 3);
    let chunks = upload_chunks(&lease.lease_id, &files, None);
    assert_eq!(chunks.len(), 3 + 2, "the weights travel in three chunks");
    let reply = within(c.upload(tokio_stream::iter(chunks))).await.unwrap().into_inner();
    assert!(reply.accepted, "{reply:?}");
    assert!(complete_ok(&mut c, &lease.lease_id).await.accepted);
    let records = within(s.scheduler.records("grid")).await.unwrap();
    let t = &records[0];
    assert_eq!(t.status, TrialStatus::Completed);
    let stored = t.weights.as_ref().expect("the record says where the files are");
    assert_eq!(stored.dir, "grid/0");
    for (name, bytes) in &files {
        assert_eq!(&std::fs::read(root.join("grid/0").join(name)).unwrap(), bytes, "{name}");
        assert_eq!(stored.files[*name].sha256, msae_shared::upload::sha256_hex(bytes));
    }
    assert!(staging_is_empty(&root));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_uploads_leave_nothing_and_the_trial_runs_again() {
    let files_dir = tempfile::tempdir().unwrap();
    let root = files_dir.path().join("w");
    let s = server_with(1, None, upload_policy(&root, 4 << 20)).await;
    let mut c = s.client().await;
    let id = register(&mut c, "up").await;
    let lease = lease_one(&mut c, &id).await;
    let files = trial_files(1, 3 << 20);

    // Cut off after the first chunk: the client gives up on the call.
    let first = upload_chunks(&lease.lease_id, &files, None).remove(0);
    let stalled = tokio_stream::iter(vec![first]).chain(tokio_stream::pending());
    let cut = tokio::time::timeout(Duration::from_millis(300), c.upload(stalled)).await;
    assert!(cut.is_err(), "the stalled upload cannot finish");
    within(async {
        while !staging_is_empty(&root) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // A digest that does not match: refused, worth a retry.
    let wrong = ["0".repeat(64), "0".repeat(64), "0".repeat(64)];
    let wrong: Vec<&str> = wrong.iter().map(String::as_str).collect();
    let reply =
        within(c.upload(tokio_stream::iter(upload_chunks(&lease.lease_id, &files, Some(&wrong)))))
            .await
            .unwrap()
            .into_inner();
    assert!(!reply.accepted && !reply.permanent && reply.reason.contains("sha256"), "{reply:?}");
    assert!(staging_is_empty(&root));

    // Over the limit: refused for good, naming the file.
    let big = trial_files(2, (4 << 20) + 1);
    let reply = within(c.upload(tokio_stream::iter(upload_chunks(&lease.lease_id, &big, None))))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !reply.accepted && reply.permanent && reply.reason.contains("weights.safetensors"),
        "{reply:?}"
    );

    // Malformed: an unknown file, a missing file.
    let mut odd = upload_chunks(&lease.lease_id, &files, None);
    odd[3].file = "../escape".into();
    let e = within(c.upload(tokio_stream::iter(odd))).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = within(c.upload(tokio_stream::iter(upload_chunks(&lease.lease_id, &files[..2], None))))
        .await
        .unwrap_err();
    assert!(e.message().contains("metrics.json"), "{e:?}");
    assert!(staging_is_empty(&root));

    // A result without its files does not complete the trial: it runs again.
    assert!(complete_ok(&mut c, &lease.lease_id).await.accepted);
    let t = within(s.scheduler.records("grid")).await.unwrap().remove(0);
    assert_eq!((t.status, t.weights.is_none()), (TrialStatus::Queued, true));
    assert!(t.errors.last().unwrap().contains("files were not uploaded"), "{:?}", t.errors);
    assert!(!root.join("grid").exists(), "nothing stored for the trial");

    // The stale lease can no longer upload; the new one can, and completes the trial.
    let e = within(c.upload(tokio_stream::iter(upload_chunks(&lease.lease_id, &files, None))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let again = lease_one(&mut c, &id).await;
    let reply = within(c.upload(tokio_stream::iter(upload_chunks(&again.lease_id, &files, None))))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.accepted, "{reply:?}");
    assert!(complete_ok(&mut c, &again.lease_id).await.accepted);
    let t = within(s.scheduler.records("grid")).await.unwrap().remove(0);
    assert_eq!((t.status, t.attempt), (TrialStatus::Completed, 2));
    assert_eq!(std::fs::read(root.join("grid/0/weights.safetensors")).unwrap(), files[0].1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_best_deletes_the_files_of_trials_that_fall_out() {
    let files_dir = tempfile::tempdir().unwrap();
    let root = files_dir.path().join("w");
    let mut policy = upload_policy(&root, 1 << 20);
    policy.keep_weights = crate::weights::KeepWeights::Best(1);
    let s = server_with(3, None, policy).await;
    let mut c = s.client().await;
    let id = register(&mut c, "up").await;
    // Losses 3, 1, 2 (minimize): trial 1 is the one kept at the end.
    for loss in [3.0, 1.0, 2.0] {
        let lease = lease_one(&mut c, &id).await;
        let files = trial_files(loss as u8, 10);
        let chunks = upload_chunks(&lease.lease_id, &files, None);
        assert!(within(c.upload(tokio_stream::iter(chunks))).await.unwrap().into_inner().accepted);
        let reply = within(c.complete(proto::CompleteRequest {
            lease_id: lease.lease_id.clone(),
            success: true,
            metrics: HashMap::from([("loss".into(), loss)]),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
        assert!(reply.accepted);
    }
    let records = within(s.scheduler.records("grid")).await.unwrap();
    let kept: Vec<u64> = records.iter().filter(|t| t.weights.is_some()).map(|t| t.index).collect();
    assert_eq!(kept, [1]);
    assert!(
        records[0].errors.iter().any(|e| e.starts_with("files not kept")),
        "{:?}",
        records[0].errors
    );
    within(async {
        while root.join("grid/0").exists() || root.join("grid/2").exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(root.join("grid/1/weights.safetensors").exists());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_workers_their_trials_and_counts() {
    let s = server(3, None).await;
    let mut c = s.client().await;
    let id = register(&mut c, "gpu-box").await;
    let _idle = register(&mut c, "idle-box").await;
    let lease = lease_one(&mut c, &id).await;
    let reply = within(c.status(proto::StatusRequest {})).await.unwrap().into_inner();
    assert_eq!((reply.sweep.as_str(), reply.running), ("grid", 1));
    assert_eq!(reply.total, reply.queued + reply.running, "{reply:?}");
    let names: Vec<(&str, &str)> =
        reply.workers.iter().map(|w| (w.name.as_str(), w.trial.as_str())).collect();
    assert_eq!(names, [("gpu-box", lease.trial_id.as_str()), ("idle-box", "")]);
    assert!(reply.workers.iter().all(|w| w.device == "cpu" && w.last_seen_ms > 0));
    // A spare lease (`--prefetch`) does not hide the running trial: the one leased first.
    let spare = lease_one(&mut c, &id).await;
    let reply = within(c.status(proto::StatusRequest {})).await.unwrap().into_inner();
    assert_eq!(reply.workers[0].trial, lease.trial_id);
    assert!(complete_ok(&mut c, &lease.lease_id).await.accepted);
    let reply = within(c.status(proto::StatusRequest {})).await.unwrap().into_inner();
    assert_eq!(reply.workers[0].trial, spare.trial_id, "the spare runs next");
    assert_eq!((reply.completed, reply.best_index, reply.best_value), (1, Some(0), 1.0));
    assert_eq!((reply.metric.as_str(), reply.goal.as_str()), ("loss", "minimize"));
    let text = crate::manage::render_status(&reply, reply.workers[0].last_seen_ms + 1500);
    assert!(
        text.starts_with(&format!("sweep grid: 1/{} trials final (1 completed", reply.total)),
        "{text}"
    );
    assert!(text.contains("best: trial 0, loss 1.000000 (minimize)"), "{text}");
    assert!(text.contains("gpu-box") && text.contains("idle"), "{text}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_serving_without_the_token() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let s = server(1, Some("s3cret")).await;
    let channel = within(
        tonic::transport::Endpoint::from_shared(format!("http://{}", s.addr)).unwrap().connect(),
    )
    .await
    .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "msae.v1.Coordinator"] {
        let reply = within(health.check(HealthCheckRequest { service: service.into() }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status(), ServingStatus::Serving, "{service:?}");
    }
    // The coordinator's own RPCs still want the token.
    let mut c = s.client().await;
    let e = within(c.status(proto::StatusRequest {})).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// TLS

/// A CA, a server certificate for `localhost` and a client certificate, as PEM files in `dir`.
fn write_pki(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (name, san) in [("server", "localhost"), ("client", "worker-1")] {
        let key = KeyPair::generate().unwrap();
        let cert =
            CertificateParams::new(vec![san.to_string()]).unwrap().signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

async fn tls_server(dir: &std::path::Path, client_ca: bool) -> Server {
    let tls = msae_shared::tls::ServerTls {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        client_ca: client_ca.then(|| dir.join("ca.pem")),
    }
    .config()
    .unwrap();
    let db = tempfile::tempdir().unwrap();
    let store = Store::open(db.path().join("tls.redb")).unwrap();
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
        Box::new(ListStrategy::new(1)),
        make_config(),
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        let _ = rx.await;
    };
    let task =
        tokio::spawn(serve(listener, scheduler.clone(), None, Some(tls), Limits::default(), stop));
    Server { addr, scheduler, stop: Some(tx), task, _dir: db }
}

async fn register_over(tls: &msae_shared::tls::ClientTls, url: &str) -> Result<String, String> {
    let endpoint = tls.endpoint(url)?.connect_timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    let mut c = CoordinatorClient::new(channel);
    c.register(proto::RegisterRequest {
        protocol_version: msae_shared::PROTOCOL_VERSION,
        name: "tls".into(),
        device: "cpu".into(),
    })
    .await
    .map(|r| r.into_inner().worker_id)
    .map_err(|s| format!("{s:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_clients_that_trust_its_ca_and_only_them() {
    let pki = tempfile::tempdir().unwrap();
    write_pki(pki.path());
    let s = tls_server(pki.path(), false).await;
    let url = format!("https://localhost:{}", s.addr.port());
    let trusting =
        msae_shared::tls::ClientTls { ca: Some(pki.path().join("ca.pem")), ..Default::default() };
    assert!(within(register_over(&trusting, &url)).await.is_ok());
    // No CA for an https URL: refused before connecting, saying what to pass.
    let e = within(register_over(&Default::default(), &url)).await.unwrap_err();
    assert!(e.contains("--tls-ca"), "{e}");
    // Trusting another CA: the handshake fails.
    let other = tempfile::tempdir().unwrap();
    write_pki(other.path());
    let stranger =
        msae_shared::tls::ClientTls { ca: Some(other.path().join("ca.pem")), ..Default::default() };
    assert!(within(register_over(&stranger, &url)).await.is_err());
    // Plain gRPC to the TLS port gets nowhere.
    let plain = format!("http://127.0.0.1:{}", s.addr.port());
    assert!(within(register_over(&Default::default(), &plain)).await.is_err());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_ca_requires_client_certificates() {
    let pki = tempfile::tempdir().unwrap();
    write_pki(pki.path());
    let s = tls_server(pki.path(), true).await;
    let url = format!("https://localhost:{}", s.addr.port());
    let ca = Some(pki.path().join("ca.pem"));
    let anonymous = msae_shared::tls::ClientTls { ca: ca.clone(), ..Default::default() };
    assert!(within(register_over(&anonymous, &url)).await.is_err(), "no client certificate");
    let known = msae_shared::tls::ClientTls {
        ca,
        cert: Some(pki.path().join("client.pem")),
        key: Some(pki.path().join("client.key")),
    };
    assert!(within(register_over(&known, &url)).await.is_ok());
    // A certificate and key that do not go together are refused at start, naming the files.
    let bad = msae_shared::tls::ServerTls {
        cert: pki.path().join("server.pem"),
        key: pki.path().join("client.key"),
        client_ca: None,
    };
    let e = bad.config().unwrap_err();
    assert!(e.contains("server.pem") && e.contains("client.key"), "{e}");
    let missing = msae_shared::tls::ServerTls { cert: pki.path().join("nope.pem"), ..bad };
    assert!(missing.config().unwrap_err().contains("nope.pem"));
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Hostile request sequences against a live server

mod hostile {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Junk {
        Register(String, String, u32),
        Lease(String, u32),
        Progress(String, u64, f64),
        Complete(String, bool, f64, f64),
        Release(String, String),
        Upload(String, String, u64, String),
        Report(String, String, String),
        Status,
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "\\PC{0,10}",
            "[\\x00-\\x1f]{1,3}",
            Just(String::new()),
            Just("grid/0".to_string()),
            Just("x".repeat(MAX_ID_LEN + 5)),
        ]
    }

    fn number() -> impl Strategy<Value = f64> {
        prop_oneof![any::<f64>(), Just(f64::NAN), Just(f64::INFINITY), Just(-1.0)]
    }

    fn junk() -> impl Strategy<Value = Junk> {
        prop_oneof![
            (text(), text(), any::<u32>()).prop_map(|(a, b, v)| Junk::Register(a, b, v)),
            (text(), 0..50u32).prop_map(|(a, w)| Junk::Lease(a, w)),
            (text(), any::<u64>(), number()).prop_map(|(a, s, v)| Junk::Progress(a, s, v)),
            (text(), any::<bool>(), number(), number())
                .prop_map(|(a, ok, v, d)| Junk::Complete(a, ok, v, d)),
            (text(), text()).prop_map(|(a, b)| Junk::Release(a, b)),
            (text(), text(), any::<u64>(), text())
                .prop_map(|(a, f, n, h)| Junk::Upload(a, f, n, h)),
            (text(), text(), text()).prop_map(|(a, b, c)| Junk::Report(a, b, c)),
            Just(Junk::Status),
        ]
    }

    async fn send(c: &mut CoordinatorClient<Channel>, j: Junk) -> Option<tonic::Code> {
        let r = match j {
            Junk::Register(name, device, v) => c
                .register(proto::RegisterRequest { protocol_version: v, name, device })
                .await
                .map(drop),
            Junk::Lease(worker_id, wait_ms) => {
                c.lease(proto::LeaseRequest { worker_id, wait_ms }).await.map(drop)
            }
            Junk::Progress(lease_id, step, v) => c
                .progress(proto::ProgressRequest {
                    lease_id,
                    step,
                    scalars: HashMap::from([("loss".into(), v)]),
                    evaluations: Vec::new(),
                })
                .await
                .map(drop),
            Junk::Complete(lease_id, success, v, d) => c
                .complete(proto::CompleteRequest {
                    lease_id,
                    success,
                    metrics: HashMap::from([("loss".into(), v)]),
                    duration_s: d,
                    ..Default::default()
                })
                .await
                .map(drop),
            Junk::Release(lease_id, reason) => {
                c.release(proto::ReleaseRequest { lease_id, reason }).await.map(drop)
            }
            Junk::Upload(lease_id, file, size, sha256) => {
                let chunk = proto::UploadChunk { lease_id, file, size, sha256, data: vec![1; 8] };
                c.upload(tokio_stream::iter(vec![chunk])).await.map(drop)
            }
            Junk::Report(sweep, metric, format) => {
                match c
                    .report(proto::ReportRequest { sweep, metric, format, ..Default::default() })
                    .await
                {
                    Ok(stream) => {
                        let mut stream = stream.into_inner();
                        loop {
                            match stream.message().await {
                                Ok(Some(_)) => {}
                                Ok(None) => break Ok(()),
                                Err(e) => break Err(e),
                            }
                        }
                    }
                    Err(e) => Err(e),
                }
            }
            Junk::Status => c.status(proto::StatusRequest {}).await.map(drop),
        };
        r.err().map(|s| s.code())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn junk_requests_get_a_proper_status_and_change_no_stored_result(
            sequence in proptest::collection::vec(junk(), 1..16)
        ) {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let s = server_with_completed(3).await;
                let before = within(s.scheduler.records("grid")).await.unwrap();
                let mut c = s.client().await;
                for j in sequence {
                    let shown = format!("{j:?}");
                    let code = within(send(&mut c, j)).await;
                    prop_assert!(
                        matches!(
                            code,
                            None | Some(
                                tonic::Code::InvalidArgument
                                    | tonic::Code::NotFound
                                    | tonic::Code::FailedPrecondition
                                    | tonic::Code::ResourceExhausted
                            )
                        ),
                        "{shown}: {code:?}"
                    );
                }
                let after = within(s.scheduler.records("grid")).await.unwrap();
                let completed = |v: &[TrialRecord]| -> Vec<TrialRecord> {
                    v.iter().filter(|t| t.status == TrialStatus::Completed).cloned().collect()
                };
                prop_assert_eq!(completed(&after), completed(&before));
                s.stop().await;
                Ok(())
            })?;
        }
    }
}

mod deadlines;
