//! What goes to the coordinator about a lease: progress (every evaluation exactly once), the
//! result (kept and re-sent until the coordinator accepts or refuses it), or the lease itself,
//! handed back.

use super::edge::{
    LeaseRef, NextLease, TrialResult, Verdict, complete_request, evaluation, progress_request,
};
use super::retry::{is_transient, timed};
use super::stop::{StopCause, StopFlag};
use super::worker::{After, Worker};
use crate::runner::{Progress, ProgressKind};
use msae_shared::proto::{Evaluation, ReleaseRequest};
use std::sync::{Arc, Mutex};
use std::time::Duration;
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

    /// The lease request a result should carry: none when shutting down or when this worker
    /// has handled all the leases it may.
    fn next_lease(&self) -> Option<NextLease> {
        let wanted = !self.shutdown.is_set()
            && self.opts.max_trials.is_none_or(|max| self.summary.leases < max);
        wanted.then(|| NextLease {
            worker_id: self.summary.worker_id.clone(),
            wait_ms: self.opts.poll_wait_ms(),
        })
    }

    /// Delivers a result until it is accepted or refused (with the next lease request when
    /// [`Self::next_lease`] gives one). At shutdown, one last try without it. Returns what the
    /// reply said about the next step.
    pub(super) async fn deliver(
        &mut self,
        lease: &LeaseRef,
        result: TrialResult,
    ) -> anyhow::Result<After> {
        let mut backoff = self.backoff();
        loop {
            let last_try = self.shutdown.is_set();
            let next = self.next_lease();
            let request = complete_request(lease, &result, next.as_ref());
            let mut client = self.client.clone();
            let reply = if next.is_some() {
                // The lease part may long-poll. A shutdown first gives the call a moment (its
                // reply is usually in flight: a finished sweep dismisses workers as it
                // completes their last trial), then cuts it short; the loop resends the result
                // alone (refused as stale if the cut call had been taken: the result is
                // committed either way).
                let limit = self.opts.poll_wait + self.opts.rpc_timeout;
                let mut shutdown = self.shutdown.clone();
                let call = timed(limit, client.complete(request));
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
                timed(self.opts.rpc_timeout, client.complete(request)).await
            };
            match reply {
                Ok(reply) if reply.accepted => {
                    tracing::info!(trial = %lease.trial_id, success = result.success(), duration_s = result.duration.as_secs_f64(),
                        error = %result.error(), "result accepted");
                    if result.success() {
                        self.summary.succeeded += 1;
                        if result.verdict == Verdict::Pruned {
                            self.summary.pruned += 1;
                        }
                    } else {
                        self.summary.failed += 1;
                    }
                    return Ok(After::new(reply.next, reply.shutdown));
                }
                Ok(reply) => {
                    tracing::warn!(trial = %lease.trial_id, lease = %lease.lease_id, reason = %reply.reason,
                        "the coordinator refused the result (stale lease); dropping it");
                    self.summary.refused += 1;
                    // A refused result may still come with the next lease.
                    return Ok(After::new(reply.next, reply.shutdown));
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
