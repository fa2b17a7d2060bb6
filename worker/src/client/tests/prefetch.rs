//! `prefetch`: spare leases while trials are short, handed back at exit, renewed when they
//! waited long, dropped when the coordinator took them back.

use super::super::edge::LeasedTrial;
use super::super::stop::ShutdownSignal;
use super::super::worker::Worker;
use super::fake::{Fake, LIMIT, UntilStopped, lease, options, serve, wait_for};
use crate::client::run_worker;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

fn ids<'a>(ids: impl IntoIterator<Item = &'a String>) -> Vec<&'a str> {
    ids.into_iter().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_trials_fetch_spares_and_every_result_arrives_once() {
    for prefetch in [0, 2] {
        let fake = Fake::default();
        {
            let mut s = fake.state();
            s.leases.extend((0..12).map(|i| lease(&format!("t{i:02}"), "noop", 0)));
            s.shutdown_when_empty = true;
        }
        let server = serve(fake.clone(), "127.0.0.1:0".parse().unwrap()).await;
        let mut opts = options(server.addr);
        opts.prefetch = prefetch;
        let run = run_worker(opts, Arc::new(UntilStopped), std::future::pending());
        let summary = tokio::time::timeout(LIMIT, run).await.unwrap().unwrap();
        let s = fake.snapshot();
        let completed: Vec<&str> = ids(s.completes.iter().map(|c| &c.lease_id));
        let unique: BTreeSet<&str> = completed.iter().copied().collect();
        assert_eq!(completed.len(), 12, "prefetch {prefetch}: {completed:?}");
        assert_eq!(unique.len(), 12, "each result once: {completed:?}");
        assert_eq!((summary.leases, summary.succeeded, summary.released), (12, 12, 0));
        assert!(s.releases.is_empty());
        if prefetch == 0 {
            // One long poll to start; every later lease rides on a result's reply.
            assert_eq!(s.lease_waits, [50], "one lease at a time");
        } else {
            assert!(
                s.lease_waits.iter().filter(|&&w| w == 0).count() >= 2,
                "spares are fetched without waiting: {:?}",
                s.lease_waits
            );
        }
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spares_are_handed_back_when_the_worker_stops() {
    let fake = Fake::default();
    {
        let mut s = fake.state();
        // After the short first trial the worker holds three long ones: one runs, two wait.
        s.leases.push_back(lease("a", "noop", 0));
        s.leases.extend(["x", "y", "z"].map(|id| lease(id, "sae", 0)));
    }
    let server = serve(fake.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let mut opts = options(server.addr);
    opts.prefetch = 2;
    let (trigger, shutdown) = oneshot::channel::<()>();
    let worker = tokio::spawn(run_worker(opts, Arc::new(UntilStopped), async {
        let _ = shutdown.await;
    }));
    wait_for("a long trial's progress and both spares", || {
        let s = fake.state();
        s.leases.is_empty() && !s.progress.is_empty()
    })
    .await;
    trigger.send(()).unwrap();
    let summary = tokio::time::timeout(LIMIT, worker).await.unwrap().unwrap().unwrap();
    let s = fake.snapshot();
    assert_eq!(ids(s.completes.iter().map(|c| &c.lease_id)), ["a"]);
    let released: BTreeSet<&str> = s.releases.iter().map(|r| r.lease_id.as_str()).collect();
    assert_eq!(released, BTreeSet::from(["x", "y", "z"]));
    assert_eq!((summary.leases, summary.succeeded, summary.released), (4, 1, 3));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_that_waited_past_a_third_of_its_ttl_is_renewed_or_dropped() {
    let fake = Fake::default();
    fake.state().lost.insert("expired".into());
    let server = serve(fake.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let (_tx, rx) = watch::channel(false);
    let mut worker =
        Worker::new(options(server.addr), Arc::new(UntilStopped), ShutdownSignal(rx)).unwrap();
    let received = |id: &str| LeasedTrial::try_from(lease(id, "noop", 0));
    // ttl 150 ms: a lease that arrived just now runs as it is.
    let fresh = worker.still_ours(received("fresh"), Instant::now()).await;
    assert!(fresh.is_some() && fake.snapshot().progress.is_empty(), "no renewal needed");
    // Past 50 ms it is renewed first (a progress report at step 0) and runs...
    let old = Instant::now() - Duration::from_millis(60);
    assert!(worker.still_ours(received("kept"), old).await.is_some());
    // ...unless the coordinator has taken it back: then it is dropped, counted as lost.
    assert!(worker.still_ours(received("expired"), old).await.is_none());
    let s = fake.snapshot();
    let renewals: Vec<(&str, u64)> =
        s.progress.iter().map(|p| (p.lease_id.as_str(), p.step)).collect();
    assert_eq!(renewals, [("kept", 0), ("expired", 0)]);
    assert_eq!((worker.summary.leases, worker.summary.lost), (1, 1));
    assert!(s.releases.is_empty(), "an expired lease is not ours to hand back");
    server.shutdown().await;
}
