//! The worker loop against a fake coordinator: leases, progress, refusals, stop replies,
//! restarts and shutdown.

mod fake;
mod prefetch;

use super::stop::ShutdownSignal;
use super::worker::Worker;
use super::{ClientOptions, run_worker};
use crate::runner::TrialRunner;
use fake::{
    EvalsThenSlowEnd, Fake, LIMIT, Panics, PanicsAtOnce, UntilStopped, lease, options, serve,
    wait_for,
};
use msae_shared::TrialConfig;
use msae_shared::proto::ProgressRequest;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

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
    for e in s.progress.iter().flat_map(|p| &p.evaluations) {
        let c = e.class_stats.as_ref().expect("an evaluation's per-class statistics");
        assert_eq!(c.stripe_class_active, [0, e.step], "step {}", e.step);
    }
    assert!(
        s.progress.iter().all(|p| p.scalars.is_empty()),
        "evaluations and final metrics are not repeated as samples"
    );
    assert!(s.releases.is_empty(), "a finished result must not be handed back");
    assert_eq!(s.completes.len(), 1);
    assert!(s.completes[0].success);
    assert_eq!(s.completes[0].final_step, 11);
    let final_stats = s.completes[0].class_stats.as_ref().expect("the final per-class statistics");
    assert_eq!(final_stats.class_samples, [11, 11]);
    assert_eq!(summary.succeeded, 1);
    server.shutdown().await;
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
    // A runner's panic fails its trial, on a blocking thread and when run at once alike.
    let runners: [Arc<dyn TrialRunner>; 2] = [Arc::new(Panics), Arc::new(PanicsAtOnce)];
    for runner in runners {
        bad_leases_with(runner).await;
    }
}

async fn bad_leases_with(runner: Arc<dyn TrialRunner>) {
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
        run_worker(options(server.addr), runner, std::future::pending()),
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
    let addr = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let fake = Fake::default();
    {
        let mut s = fake.state();
        s.leases.push_back(lease("a", "noop", 0));
        s.shutdown_when_empty = true;
    }
    let worker = tokio::spawn(run_worker(options(addr), Arc::new(Panics), std::future::pending()));
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
async fn a_pruned_trial_is_reported_pruned_and_the_next_one_taken_at_once() {
    let fake = Fake::default();
    {
        let mut s = fake.state();
        s.leases.push_back(lease("p", "sae", 0));
        s.leases.push_back(lease("n", "noop", 0));
        s.stop.insert("p".into());
        s.prune_on_stop.insert("p".into());
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
    assert_eq!((summary.succeeded, summary.pruned, summary.failed), (2, 1, 0));
    let s = fake.snapshot();
    assert!(s.releases.is_empty(), "a pruned trial is reported, not handed back");
    let (p, n) = (&s.completes[0], &s.completes[1]);
    assert_eq!(p.lease_id, "p");
    assert!(p.success && p.pruned, "{p:?}");
    assert!(p.metrics["steps"] >= 1.0, "with the metrics it had reached");
    assert!(p.lease_next, "the result asks for the next trial");
    assert_eq!(s.lease_calls, 1, "the next lease came with the pruned result's reply");
    assert_eq!(n.lease_id, "n");
    assert!(n.success && !n.pruned);
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
    let worker = tokio::spawn(run_worker(options(server.addr), Arc::new(UntilStopped), async {
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
fn invalid_url_is_an_error() {
    let (_tx, rx) = watch::channel(false);
    let err = Worker::new(ClientOptions::new("not a url"), Arc::new(Panics), ShutdownSignal(rx))
        .err()
        .unwrap();
    assert!(err.to_string().contains("invalid coordinator URL"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_uploaded_whole_before_the_result_when_the_lease_asks() {
    let fake = Fake::default();
    {
        let mut s = fake.state();
        let mut asks = lease("u", "noop", 0);
        asks.upload = true;
        asks.upload_limit = 1 << 20;
        s.leases.push_back(asks);
        s.leases.push_back(lease("n", "noop", 0));
        let mut tiny = lease("t", "noop", 0);
        tiny.upload = true;
        tiny.upload_limit = 10;
        s.leases.push_back(tiny);
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
    let s = fake.snapshot();
    assert_eq!(s.uploads.len(), 1, "only the lease that asked uploads, and only once");
    let (lease_id, files, after_complete) = &s.uploads[0];
    assert_eq!(lease_id, "u");
    assert!(!after_complete, "files go before the result");
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, msae_shared::upload::FILES);
    let st = safetensors::SafeTensors::deserialize(&files[0].1).unwrap();
    assert_eq!(st.tensor("noop.loss").unwrap().shape(), &[1]);
    let metrics: std::collections::BTreeMap<String, f64> =
        serde_json::from_slice(&files[2].1).unwrap();
    let done = s.completes.iter().find(|c| c.lease_id == "u").unwrap();
    assert!(done.success);
    assert_eq!(metrics, done.metrics.clone().into_iter().collect());
    // Files over the coordinator's limit fail the trial for good, naming the file and limit.
    let tiny = s.completes.iter().find(|c| c.lease_id == "t").unwrap();
    assert!(!tiny.success && tiny.permanent, "{tiny:?}");
    assert!(
        tiny.error.contains("weights.safetensors is") && tiny.error.contains("limit"),
        "{}",
        tiny.error
    );
    assert_eq!((summary.succeeded, summary.failed), (2, 1));
    server.shutdown().await;
}
