//! The actor task that owns the [`Core`] and the store: batches commands, group-commits, then
//! replies.
//!
//! One loop iteration: wait for a command or the tick; drain everything queued (up to
//! [`MAX_BATCH`]); apply it all to the core; on ticks expire leases and long-poll waits; hand
//! waiting lease requests the trials that appeared; write every changed record in ONE redb
//! transaction on a blocking thread; only then send the replies and publish events. While the
//! commit runs, new commands queue up in the channel and form the next batch, so the commit rate,
//! not the request rate, bounds the fsyncs.
//!
//! A completion may carry the worker's next lease request ([`NextLease`]): the completion is
//! applied, then the lease part goes through exactly the path of a lease command (granted at
//! once, parked until a trial appears or its wait ends, or shutdown), so a worker's result and
//! its next trial cost one round trip and one commit. Parked requests are [`Waiter`]s of either
//! kind; a parked completion is answered, like a parked lease, only after a commit that
//! follows the one holding its result.

use super::core::{Core, LeaseDecision};
use super::{
    Command, CompleteAck, CompleteOutcome, Counts, LeaseOutcome, NextLease, PROGRESS_FLUSH, Reply,
    SchedulerError, SchedulerEvent,
};
use crate::model::now_ms;
use crate::store::{Store, WriteBatch};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;

/// Most commands applied in one batch (bounds reply latency under overload).
const MAX_BATCH: usize = 4096;
/// Period of lease expiry, timeout and long-poll checks.
const TICK: Duration = Duration::from_millis(50);

/// Who waits for the answer to a lease request.
enum Waiter {
    /// A lease command.
    Lease(Reply<LeaseOutcome>),
    /// The lease part of a completion; `ack` is the (already applied) completion's answer.
    Complete { ack: CompleteAck, reply: Reply<CompleteOutcome> },
}

impl Waiter {
    /// The requester went away (client timeout or cancel): no trial should be granted to it.
    fn is_closed(&self) -> bool {
        match self {
            Waiter::Lease(reply) => reply.is_closed(),
            Waiter::Complete { reply, .. } => reply.is_closed(),
        }
    }

    /// The answer to send once the batch is committed.
    fn defer(self, replies: &mut Vec<Deferred>, value: Result<LeaseOutcome, SchedulerError>) {
        match self {
            Waiter::Lease(reply) => defer(replies, reply, value),
            Waiter::Complete { ack, reply } => {
                defer(replies, reply, Ok(complete_outcome(ack, value)))
            }
        }
    }

    /// Answers now (the actor is stopping after its last commit).
    fn send_now(self, value: LeaseOutcome) {
        // The requester may have gone away; nothing to do then.
        match self {
            Waiter::Lease(reply) => {
                let _ = reply.send(Ok(value));
            }
            Waiter::Complete { ack, reply } => {
                let _ = reply.send(Ok(CompleteOutcome { ack, next: value }));
            }
        }
    }
}

/// The answer to a completion whose lease part ended with `lease`. A lease error (an unknown
/// worker: the coordinator restarted) must not hide that the result was taken, so the result
/// is acknowledged with no lease, and the client registers again before its next lease.
fn complete_outcome(
    ack: CompleteAck,
    lease: Result<LeaseOutcome, SchedulerError>,
) -> CompleteOutcome {
    match lease {
        Ok(next) => CompleteOutcome { ack, next },
        Err(e) => {
            tracing::debug!(error = %e, "completion's lease part refused; result acknowledged without a lease");
            CompleteOutcome { ack, next: LeaseOutcome::default() }
        }
    }
}

/// A lease request waiting for a trial.
struct Parked {
    worker_id: String,
    deadline: Instant,
    waiter: Waiter,
}

/// A reply to send once the batch is committed; receives the commit error, if any.
type Deferred = Box<dyn FnOnce(Option<&str>) + Send>;

pub(super) struct Actor {
    core: Core,
    store: Arc<Store>,
    rx: mpsc::Receiver<Command>,
    counts_tx: watch::Sender<Counts>,
    events_tx: broadcast::Sender<SchedulerEvent>,
    lossless: super::LosslessSinks,
    parked: VecDeque<Parked>,
    replies: Vec<Deferred>,
    last_flush: Instant,
    /// Set by a shutdown: when to give up waiting for running trials, and who to tell.
    draining: Option<(Instant, Vec<Reply<()>>)>,
    /// Successful commits, shared with the handles ([`super::SchedulerHandle::commits`]).
    commits: Arc<AtomicU64>,
}

fn defer<T: Send + 'static>(
    replies: &mut Vec<Deferred>,
    tx: Reply<T>,
    value: Result<T, SchedulerError>,
) {
    replies.push(Box::new(move |commit_error: Option<&str>| {
        let value = match commit_error {
            Some(e) => Err(SchedulerError::Commit(e.to_string())),
            None => value,
        };
        // The requester may have gone away (client timeout); nothing to do then.
        let _ = tx.send(value);
    }));
}

impl Actor {
    pub(super) fn new(
        core: Core,
        store: Arc<Store>,
        rx: mpsc::Receiver<Command>,
        counts_tx: watch::Sender<Counts>,
        events_tx: broadcast::Sender<SchedulerEvent>,
        lossless: super::LosslessSinks,
        commits: Arc<AtomicU64>,
    ) -> Actor {
        Actor {
            core,
            store,
            rx,
            counts_tx,
            events_tx,
            lossless,
            parked: VecDeque::new(),
            replies: Vec::new(),
            last_flush: Instant::now(),
            draining: None,
            commits,
        }
    }

    pub(super) async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closed = false;
        loop {
            let mut ticked = false;
            // The tick goes first so a flood of commands cannot starve lease expiry.
            tokio::select! {
                biased;
                _ = tick.tick() => ticked = true,
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => closed = true,
                },
            }
            let mut n = 1;
            while !closed && n < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(cmd) => {
                        self.handle(cmd);
                        n += 1;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
                }
            }
            let now = now_ms();
            if ticked {
                self.core.expire(now);
            }
            self.serve_parked(now, ticked);
            let drained = self.draining.as_ref().is_some_and(|(deadline, _)| {
                self.core.running() == 0 || Instant::now() >= *deadline
            });
            let stopping = closed || drained;
            let with_progress = stopping || self.last_flush.elapsed() >= PROGRESS_FLUSH;
            let batch = self.core.take_batch(with_progress);
            if with_progress {
                self.last_flush = Instant::now();
            }
            let error = if batch.is_empty() {
                None
            } else {
                let result = commit(self.store.clone(), batch).await;
                if result.is_ok() {
                    // Counted before the replies go out, so a caller that sees its reply sees
                    // the commit that made it durable.
                    self.commits.fetch_add(1, Ordering::Relaxed);
                }
                result.err()
            };
            for reply in std::mem::take(&mut self.replies) {
                reply(error.as_deref());
            }
            let discarded = self.core.take_discarded();
            if error.is_none()
                && !discarded.is_empty()
                && let Some(store) = self.core.weight_store()
            {
                // Deleted only once the records no longer point at them.
                tokio::task::spawn_blocking(move || discarded.iter().for_each(|d| store.remove(d)));
            }
            let events = self.core.take_events();
            // Events say what was committed; after a failed commit there is nothing to say
            // (TensorBoard would record a result the file does not hold).
            if error.is_none() && !events.is_empty() {
                let mut sinks = self.lossless.lock().unwrap_or_else(|p| p.into_inner());
                sinks.retain(|sink| events.iter().all(|e| sink.send(e.clone()).is_ok()));
            }
            for event in events.into_iter().filter(|_| error.is_none()) {
                // No receiver is fine: events are for optional observers.
                let _ = self.events_tx.send(event);
            }
            let mut counts = self.core.counts();
            if let Some(e) = &error {
                tracing::error!(error = %e, "store commit failed; the scheduler stops (restart resumes from the last commit)");
                counts.stopped = true;
                counts.error = Some(e.clone());
                self.counts_tx.send_replace(counts);
                return;
            }
            if stopping {
                counts.stopped = true;
                self.counts_tx.send_replace(counts);
                // Only a finished sweep dismisses workers; otherwise they will reconnect to a
                // restarted coordinator.
                let shutdown = self.core.sweep().finished;
                for p in self.parked.drain(..) {
                    p.waiter.send_now(LeaseOutcome { lease: None, shutdown });
                }
                if let Some((_, waiters)) = self.draining.take() {
                    for w in waiters {
                        let _ = w.send(Ok(()));
                    }
                }
                tracing::info!(sweep = %self.core.sweep().name, "scheduler stopped");
                return;
            }
            self.counts_tx.send_if_modified(|c| {
                if *c != counts {
                    *c = counts;
                    true
                } else {
                    false
                }
            });
        }
    }

    fn handle(&mut self, cmd: Command) {
        let now = now_ms();
        match cmd {
            Command::Register { name, device, protocol_version, reply } => {
                let value = self.core.register(&name, &device, protocol_version);
                defer(&mut self.replies, reply, value);
            }
            Command::Lease { worker_id, wait, reply } => {
                self.lease(NextLease { worker_id, wait }, Waiter::Lease(reply), now);
            }
            Command::Progress { lease_id, report, reply } => {
                let ack = self.core.progress(&lease_id, report, now);
                defer(&mut self.replies, reply, Ok(ack));
            }
            Command::Complete { lease_id, outcome, next, reply } => {
                // Applied first, so the trial it frees (or the point the strategy proposes
                // after its observation) can go straight to this worker. A refused (stale)
                // result leaves the state as it was; the lease part is served all the same.
                let ack = self.core.complete(&lease_id, outcome, now);
                match next {
                    Some(next) => self.lease(next, Waiter::Complete { ack, reply }, now),
                    None => defer(
                        &mut self.replies,
                        reply,
                        Ok(CompleteOutcome { ack, next: LeaseOutcome::default() }),
                    ),
                }
            }
            Command::Release { lease_id, reason, reply } => {
                let ok = self.core.release(&lease_id, &reason);
                defer(&mut self.replies, reply, Ok(ok));
            }
            Command::Renew { lease_id, reply } => {
                let value = self.core.renew(&lease_id, now);
                defer(&mut self.replies, reply, Ok(value));
            }
            Command::Status { reply } => {
                let value = self.core.workers(now);
                defer(&mut self.replies, reply, Ok(value));
            }
            Command::Snapshot { reply } => {
                let value = (self.core.sweep().clone(), self.core.trials().to_vec());
                defer(&mut self.replies, reply, Ok(value));
            }
            Command::Shutdown { grace, reply } => {
                tracing::info!(sweep = %self.core.sweep().name, "shutting down: no more dispatching");
                self.core.set_shutting_down();
                // Waiting lease requests (and completions' lease parts) get their answer now:
                // no lease, and a dismissal only if the sweep is over. New ones wait until the
                // end of the drain.
                let shutdown = self.core.sweep().finished;
                for p in self.parked.drain(..) {
                    p.waiter.defer(&mut self.replies, Ok(LeaseOutcome { lease: None, shutdown }));
                }
                let deadline = Instant::now() + grace;
                match &mut self.draining {
                    Some((d, waiters)) => {
                        *d = (*d).min(deadline);
                        waiters.push(reply);
                    }
                    None => self.draining = Some((deadline, vec![reply])),
                }
            }
        }
    }

    /// A lease request (a lease command or the lease part of a completion): granted at once,
    /// parked until a trial appears or `wait` ends, or answered with shutdown.
    fn lease(&mut self, request: NextLease, waiter: Waiter, now: u64) {
        let NextLease { worker_id, wait } = request;
        if waiter.is_closed() {
            // The requester gave up before we got to it: a grant would only wait to expire.
            // (A completion part was applied already; its requester resends or lets it be.)
            return;
        }
        // Earlier waiters go first.
        if self.parked.is_empty() {
            self.core.fill_queue(1, now);
        }
        let decision = if self.parked.is_empty() {
            self.core.try_lease(&worker_id, now)
        } else if self.core.sweep().finished {
            Ok(LeaseDecision::Shutdown)
        } else {
            // Validate the worker even when queuing behind others.
            self.core.try_lease_check_only(&worker_id)
        };
        let value = match decision {
            Err(e) => Err(e),
            Ok(LeaseDecision::Granted(g)) => Ok(LeaseOutcome { lease: Some(g), shutdown: false }),
            Ok(LeaseDecision::Shutdown) => Ok(LeaseOutcome { lease: None, shutdown: true }),
            Ok(LeaseDecision::Nothing) if wait.is_zero() => Ok(LeaseOutcome::default()),
            Ok(LeaseDecision::Nothing) => {
                self.parked.push_back(Parked {
                    worker_id,
                    deadline: Instant::now() + wait,
                    waiter,
                });
                return;
            }
        };
        waiter.defer(&mut self.replies, value);
    }

    /// Hands queued trials to waiting lease requests; on ticks, answers waits that elapsed.
    fn serve_parked(&mut self, now: u64, ticked: bool) {
        self.core.fill_queue(self.parked.len().max(1), now);
        let finished = self.core.check_finished();
        if self.parked.is_empty() {
            return;
        }
        let stop = finished || self.draining.is_some();
        while !self.parked.is_empty() && (stop || self.core.queued() > 0) {
            let p = self.parked.pop_front().expect("not empty");
            if p.waiter.is_closed() {
                continue;
            }
            let value = match self.core.try_lease(&p.worker_id, now) {
                Ok(LeaseDecision::Nothing) => {
                    // max_concurrent reached: keep waiting in order.
                    self.parked.push_front(p);
                    break;
                }
                Ok(LeaseDecision::Granted(g)) => {
                    Ok(LeaseOutcome { lease: Some(g), shutdown: false })
                }
                Ok(LeaseDecision::Shutdown) => Ok(LeaseOutcome { lease: None, shutdown: true }),
                Err(e) => Err(e),
            };
            p.waiter.defer(&mut self.replies, value);
        }
        if ticked {
            let now = Instant::now();
            let mut keep = VecDeque::with_capacity(self.parked.len());
            for p in self.parked.drain(..) {
                if p.waiter.is_closed() {
                    continue;
                }
                if p.deadline <= now {
                    p.waiter.defer(&mut self.replies, Ok(LeaseOutcome::default()));
                } else {
                    keep.push_back(p);
                }
            }
            self.parked = keep;
        }
    }
}

/// Commits a batch on a blocking thread (redb fsyncs).
async fn commit(store: Arc<Store>, batch: WriteBatch) -> Result<(), String> {
    let n = batch.len();
    let started = std::time::Instant::now();
    let result = tokio::task::spawn_blocking(move || store.write(&batch))
        .await
        .map_err(|e| format!("commit task failed: {e}"))?
        .map_err(|e| e.to_string());
    tracing::trace!(records = n, elapsed_us = started.elapsed().as_micros() as u64, "committed");
    result
}
