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
//!   [`Control::Stop`](crate::runner::Control::Stop), returned from its progress callback when
//!   the coordinator says stop, the trial's `timeout_s` passes, or the worker shuts down. On
//!   shutdown the lease is handed back (`Release`) so the trial is requeued at once instead of
//!   after the lease expires.
//! - One round trip per trial: a result goes out with the worker's next lease request
//!   (`lease_next`), so the coordinator commits both at once and the reply carries the next
//!   lease (or says shutdown); only when it carries neither does the worker send a `Lease`.
//!   An unknown worker id (the coordinator restarted) does not cost the result: it is
//!   accepted without a lease, and the `Lease` that follows triggers the re-registration.
//!   No next lease is asked for when the worker is shutting down or `max_trials` is reached.
//! - Results are delivered on tasks of their own. While trials are short, `prefetch` spare
//!   leases (fetched with a `Lease` that does not wait) let the next trial run while earlier
//!   results are committed; the commit, a fsync, no longer bounds one worker's rate. A spare
//!   that waited past a third of its ttl is renewed before it starts; spares are handed back
//!   at exit.
//! - Invalid leases (bad JSON, a config `validate()` refuses, an unknown runner kind) are
//!   reported as failed trials with the reason, never a panic.
//!
//! Layout: `worker` (the lease loop), `trial` (one trial and its heartbeats), `delivery`
//! (progress, results, releases), `edge` (the only code that reads a `proto::Lease` or builds a
//! `CompleteRequest`), `stop`, `retry`, `connect`, `options`.

mod connect;
mod delivery;
mod edge;
mod options;
mod retry;
mod stop;
mod trial;
mod upload;
mod worker;

#[cfg(test)]
mod tests;

pub use options::{ClientOptions, WorkerSummary, default_worker_name};

use crate::runner::TrialRunner;
use std::future::Future;
use std::sync::Arc;
use stop::ShutdownSignal;
use tokio::sync::watch;
use worker::Worker;

/// Runs the worker loop until `shutdown` resolves, the coordinator says it is finishing,
/// `max_trials` leases were handled, or a fatal error (bad URL or token, protocol refused).
///
/// `sae_runner` runs leases whose runner kind is `"sae"` (or empty); `"noop"` leases run a
/// [`NoopRunner`](crate::noop::NoopRunner) sleeping the lease's `noop_sleep_ms`.
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
