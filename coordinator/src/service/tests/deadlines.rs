//! Server-side deadlines over a real server ([`crate::service::deadline`]): limits are set
//! short here, and every assertion on time leaves a wide margin (a loaded machine is slow, never
//! early).

use super::*;
use std::time::Instant;

/// Clearly after a limit of `limit` (timers never fire early), and clearly before anything
/// like the 30 s a client asked for.
fn ended_near(took: Duration, limit: Duration) {
    assert!(took >= limit.mul_f64(0.8), "ended after {took:?}, before the limit of {limit:?}");
    assert!(took < Duration::from_secs(10), "ended after {took:?}, long after {limit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_ends_at_the_idle_limit_and_its_lease_survives() {
    let files_dir = tempfile::tempdir().unwrap();
    let root = files_dir.path().join("w");
    let idle = Duration::from_millis(300);
    let limits = Limits { upload_idle: idle, ..Limits::default() };
    let s = server_limited(1, None, upload_policy(&root, 4 << 20), limits).await;
    let mut c = s.client().await;
    let id = register(&mut c, "up").await;
    let lease = lease_one(&mut c, &id).await;
    let files = trial_files(3, 10);

    // The first chunk, then nothing, the stream left open: a worker that hung mid-upload.
    let first = upload_chunks(&lease.lease_id, &files, None).remove(0);
    let stalled = tokio_stream::iter(vec![first]).chain(tokio_stream::pending());
    let started = Instant::now();
    let e = within(c.upload(stalled)).await.unwrap_err();
    ended_near(started.elapsed(), idle);
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e:?}");
    assert!(e.message().contains("Upload") && e.message().contains("300ms"), "{e:?}");
    // Removed before the answer went out.
    assert!(staging_is_empty(&root), "the partial upload is gone");

    // The lease is untouched: the files go up again and the result completes the trial.
    let chunks = upload_chunks(&lease.lease_id, &files, None);
    let reply = within(c.upload(tokio_stream::iter(chunks))).await.unwrap().into_inner();
    assert!(reply.accepted, "{reply:?}");
    assert!(complete_ok(&mut c, &lease.lease_id).await.accepted);
    let t = within(s.scheduler.records("grid")).await.unwrap().remove(0);
    assert_eq!((t.status, t.attempt, t.weights.is_some()), (TrialStatus::Completed, 1, true));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_deadline_ends_a_long_poll_and_the_trial_goes_to_the_next_caller() {
    let s = server(1, None).await;
    let mut c = s.client().await;
    let a = register(&mut c, "a").await;
    let b = register(&mut c, "b").await;
    let held = lease_one(&mut c, &a).await;

    // b asks to wait 30 s for a trial but gives the call 300 ms.
    let limit = Duration::from_millis(300);
    let mut request = tonic::Request::new(proto::LeaseRequest { worker_id: b, wait_ms: 30_000 });
    request.set_timeout(limit);
    let started = Instant::now();
    let e = within(c.lease(request)).await.unwrap_err();
    ended_near(started.elapsed(), limit);
    // The server answers deadline_exceeded; tonic's client also enforces the deadline it sends,
    // answering `cancelled`, and its timer may go first.
    assert!(matches!(e.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{e:?}");

    // The server dropped b's request at its deadline (a margin for a loaded machine); the trial
    // that comes free must not be granted to it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let released =
        within(c.release(proto::ReleaseRequest {
            lease_id: held.lease_id.clone(),
            reason: "test".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(released.accepted);
    let next_caller = register(&mut c, "c").await;
    assert_eq!(lease_one(&mut c, &next_caller).await.trial_id, held.trial_id);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_longer_than_the_servers_cap_ends_at_the_cap() {
    let cap = Duration::from_millis(400);
    let limits = Limits { max_wait: cap, ..Limits::default() };
    let s = server_limited(2, None, actor_policy(), limits).await;
    let mut c = s.client().await;
    let a = register(&mut c, "a").await;
    let b = register(&mut c, "b").await;
    let _running = lease_one(&mut c, &a).await;
    let mine = lease_one(&mut c, &b).await;

    // Nothing left to lease: a 30 s wait is cut to the cap and answered "no trial yet".
    let started = Instant::now();
    let reply = within(c.lease(proto::LeaseRequest { worker_id: b.clone(), wait_ms: 30_000 }))
        .await
        .unwrap()
        .into_inner();
    ended_near(started.elapsed(), cap);
    assert!(reply.lease.is_none() && !reply.shutdown, "{reply:?}");

    // The same for the next lease a completion asks for.
    let started = Instant::now();
    let reply = within(c.complete(proto::CompleteRequest {
        lease_id: mine.lease_id,
        success: true,
        metrics: HashMap::from([("loss".into(), 1.0)]),
        lease_next: true,
        worker_id: b,
        wait_ms: 30_000,
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    ended_near(started.elapsed(), cap);
    assert!(reply.accepted && reply.next.is_none() && !reply.shutdown, "{reply:?}");
    s.stop().await;
}
