//! What goes to the coordinator about a lease: progress (every evaluation exactly once), the
//! result (kept and re-sent until the coordinator accepts or refuses it), or the lease itself,
//! handed back.

use super::connect::Client;
use super::edge::{
    LeaseRef, NextLease, TrialResult, Verdict, complete_request, evaluation, progress_request,
};
use super::options::{ClientOptions, WorkerSummary};
use super::retry::{Backoff, is_transient, timed};
use super::stop::{ShutdownSignal, StopCause, StopFlag};
use super::worker::{After, Worker};
use crate::runner::{Progress, ProgressKind};
use msae_shared::proto::{Evaluation, LeaseRequest, ReleaseRequest};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Code;

/// How long a result call that also asked for the next lease may still answer after a
/// shutdown request before it is cut short and the result resent alone.
const SHUTDOWN_REPLY_GRACE: Duration = Duration::from_secs(2);

/// Evaluations the runner made that no accepted progress report has carried yet, in step
/// order. A std mutex: never held across an await.
#[derive(Clone, Default)]
pub(super) struct Evaluations(Arc<Mutex<Vec<Evaluation>>>);

impl Evaluations {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Evaluation>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn push(&self, p: &Progress) {
        self.lock().push(evaluation(p));
    }

    fn take(&self) -> Vec<Evaluation> {
        std::mem::take(&mut *self.lock())
    }

    /// Puts back evaluations whose report failed, ahead of any made since.
    fn restore(&self, mut earlier: Vec<Evaluation>) {
        let mut pending = self.lock();
        earlier.append(&mut pending);
        *pending = earlier;
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

impl Worker {
    /// Sends one progress report; a stop reply or a lost lease sets `stop`. Failures are
    /// logged only: the next heartbeat retries, and the result is delivered with retries.
    pub(super) async fn send_progress(
        &self,
        lease: &LeaseRef,
        latest: Option<Progress>,
        evaluations: &Evaluations,
        stop: &StopFlag,
    ) {
        let pending = evaluations.take();
        let (step, scalars) = match latest {
            // An evaluation travels as one and final metrics as the result; sent again as a
            // sample they would be duplicates.
            Some(p) if p.kind != ProgressKind::Sample => (p.step, Default::default()),
            Some(p) => (p.step, p.scalars),
            None => (pending.last().map_or(0, |e| e.step), Default::default()),
        };
        let request = progress_request(&lease.lease_id, step, scalars, pending.clone());
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
            Ok(reply) if reply.stop && reply.prune => {
                tracing::info!(trial = %lease.trial_id, reason = %reply.reason, "the coordinator pruned the trial");
                stop.set(StopCause::Pruned(reply.reason));
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

    /// What a delivery needs, owned, so it can go on its own task while the next trial runs.
    pub(super) fn courier(&self) -> Courier {
        Courier {
            opts: self.opts.clone(),
            client: self.client.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Hands a lease back (one try: if the coordinator is away, the lease expires instead).
    pub(super) async fn release(&mut self, lease: &LeaseRef, reason: String) {
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

/// Delivers results (and fetches spare leases) on tasks of their own: with `--prefetch`, a
/// result is committed while the worker already runs the next trial.
#[derive(Clone)]
pub(super) struct Courier {
    opts: Arc<ClientOptions>,
    client: Client,
    shutdown: ShutdownSignal,
}

/// What came back from a delivery or a fetch: the next step, and the counts it adds to the
/// worker's summary.
#[derive(Debug)]
pub(super) struct Delivered {
    pub(super) after: After,
    pub(super) tally: WorkerSummary,
    /// When the reply came: a lease it carried has been ours since then, however late the
    /// loop looks at it.
    pub(super) at: Instant,
    /// The call asked for a lease (whether or not one came).
    pub(super) asked: bool,
}

impl Delivered {
    fn now(after: After, tally: WorkerSummary, asked: bool) -> Self {
        Delivered { after, tally, at: Instant::now(), asked }
    }
}

impl Courier {
    /// Delivers a result until it is accepted or refused, asking for `next` with it unless the
    /// worker is shutting down by then. At shutdown, one last try without it.
    pub(super) async fn deliver(
        self,
        lease: LeaseRef,
        result: TrialResult,
        next: Option<NextLease>,
    ) -> anyhow::Result<Delivered> {
        let mut backoff = Backoff::new(self.opts.backoff_initial, self.opts.backoff_max);
        let mut tally = WorkerSummary::default();
        let asked = next.is_some();
        loop {
            let last_try = self.shutdown.is_set();
            let next = next.as_ref().filter(|_| !last_try);
            let request = complete_request(&lease, &result, next);
            let mut client = self.client.clone();
            let reply = if next.is_some() {
                // The lease part may long-poll. A shutdown first gives the call a moment (its
                // reply is usually in flight: a finished sweep dismisses workers as it
                // completes their last trial), then cuts it short; the loop resends the result
                // alone (refused as stale if the cut call had been taken: the result is
                // committed either way).
                let limit = self.opts.poll_wait + self.opts.rpc_timeout;
                let mut shutdown = self.shutdown.clone();
                // Boxed (here and below): a tonic call's future is several KB, and inline it
                // would make this task's future as large, copied whole when the task is
                // spawned and when it completes.
                let mut call = Box::pin(timed(limit, client.complete(request)));
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
                Box::pin(timed(self.opts.rpc_timeout, client.complete(request))).await
            };
            match reply {
                Ok(reply) if reply.accepted => {
                    tracing::info!(trial = %lease.trial_id, success = result.success(), duration_s = result.duration.as_secs_f64(),
                        error = %result.error(), "result accepted");
                    if result.success() {
                        tally.succeeded += 1;
                        if result.verdict == Verdict::Pruned {
                            tally.pruned += 1;
                        }
                    } else {
                        tally.failed += 1;
                    }
                    return Ok(Delivered::now(
                        After::new(reply.next, reply.shutdown),
                        tally,
                        asked,
                    ));
                }
                Ok(reply) => {
                    tracing::warn!(trial = %lease.trial_id, lease = %lease.lease_id, reason = %reply.reason,
                        "the coordinator refused the result (stale lease); dropping it");
                    tally.refused += 1;
                    // A refused result may still come with the next lease.
                    return Ok(Delivered::now(
                        After::new(reply.next, reply.shutdown),
                        tally,
                        asked,
                    ));
                }
                Err(status)
                    if matches!(
                        status.code(),
                        Code::NotFound | Code::FailedPrecondition | Code::InvalidArgument
                    ) =>
                {
                    tracing::warn!(trial = %lease.trial_id, lease = %lease.lease_id, code = ?status.code(),
                        message = status.message(), "the coordinator refused the result; dropping it");
                    tally.refused += 1;
                    return Ok(Delivered::now(After::default(), tally, asked));
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
                        tally.lost += 1;
                        return Ok(Delivered::now(After::default(), tally, asked));
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(trial = %lease.trial_id, code = ?status.code(), message = status.message(),
                        retry_in = ?delay, "cannot deliver the result yet; keeping it");
                    // On shutdown the sleep ends early and the loop makes its last try.
                    let mut shutdown = self.shutdown.clone();
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.wait() => {}
                    }
                }
            }
        }
    }

    /// One `Lease` call that does not wait: a spare lease if a trial is queued now. Failures
    /// cost nothing (the loop asks again, with its long poll and re-registration, when it has
    /// nothing to run).
    pub(super) async fn fetch(self, worker_id: String) -> anyhow::Result<Delivered> {
        let request = LeaseRequest { worker_id, wait_ms: 0 };
        let mut client = self.client.clone();
        let after = match Box::pin(timed(self.opts.rpc_timeout, client.lease(request))).await {
            Ok(reply) => After::new(reply.lease, reply.shutdown),
            Err(status) => {
                tracing::debug!(code = ?status.code(), message = status.message(), "no spare lease");
                After::default()
            }
        };
        Ok(Delivered::now(after, WorkerSummary::default(), true))
    }
}
