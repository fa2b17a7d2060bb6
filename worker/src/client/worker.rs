//! The lease loop: register, ask for leases (long-poll), run each one to its end, and register
//! again when the coordinator has forgotten this worker.
//!
//! Results go out on tasks of their own ([`Courier`](super::delivery::Courier)), each asking
//! for the next lease. With `prefetch` 0 the loop waits for each before going on, one lease at
//! a time; with `prefetch` N, while trials are short it holds up to N leases beyond the
//! running one and lets N calls be in flight, so the next trial runs while the coordinator
//! commits the last results (several workers' worth of results in one commit).

use super::connect::{Client, connect};
use super::delivery::Delivered;
use super::edge::{
    LeaseRef, LeasedTrial, NextLease, Received, TrialResult, lease_of, progress_request,
};
use super::options::{ClientOptions, PREFETCH_BELOW, WorkerSummary};
use super::retry::{Backoff, is_transient, timed};
use super::stop::{ShutdownSignal, StopCause};
use super::trial::Finished;
use crate::runner::TrialRunner;
use msae_shared::proto::{Lease, LeaseRequest, RegisterRequest};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tonic::Code;

/// What the coordinator said after a result, about the worker's next step.
#[derive(Debug, Default)]
pub(super) struct After {
    /// The next lease, carried by the reply to the result (no `Lease` call needed).
    pub(super) lease: Option<Received>,
    /// The coordinator is finishing: exit (after running `lease`, if any).
    pub(super) shutdown: bool,
}

impl After {
    /// From a reply's lease and shutdown fields; the lease is converted here, as it arrives.
    pub(super) fn new(lease: Option<Lease>, shutdown: bool) -> Self {
        After { lease: lease.map(LeasedTrial::try_from), shutdown }
    }
}

pub(super) struct Worker {
    pub(super) opts: Arc<ClientOptions>,
    pub(super) client: Client,
    /// Runs `sae` leases; `noop` leases get a fresh `NoopRunner`.
    pub(super) sae: Arc<dyn TrialRunner>,
    pub(super) shutdown: ShutdownSignal,
    pub(super) summary: WorkerSummary,
    pipeline: Pipeline,
}

/// Leases held but not started, and deliveries (or spare fetches) still on their way.
#[derive(Default)]
struct Pipeline {
    /// In arrival order, each with when it arrived.
    ready: VecDeque<(Received, Instant)>,
    /// Landed in whatever order they end: a call that long-polls must not hold back a lease
    /// that another one already brought.
    inflight: JoinSet<anyhow::Result<Delivered>>,
    /// Calls in flight that may bring a lease back.
    asking: usize,
    /// The coordinator said it is finishing: ask for nothing more.
    dismissed: bool,
}

impl Pipeline {
    /// Leases here or on their way.
    fn held(&self) -> usize {
        self.ready.len() + self.asking
    }
}

impl Worker {
    pub(super) fn new(
        opts: ClientOptions,
        sae: Arc<dyn TrialRunner>,
        shutdown: ShutdownSignal,
    ) -> anyhow::Result<Self> {
        let client = connect(&opts)?;
        Ok(Worker {
            opts: Arc::new(opts),
            client,
            sae,
            shutdown,
            summary: WorkerSummary::default(),
            pipeline: Pipeline::default(),
        })
    }

    pub(super) fn backoff(&self) -> Backoff {
        Backoff::new(self.opts.backoff_initial, self.opts.backoff_max)
    }

    /// Sleeps `delay` unless shutdown comes first; returns false on shutdown.
    pub(super) async fn sleep_or_shutdown(&self, delay: Duration) -> bool {
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = shutdown.wait() => false,
        }
    }

    pub(super) async fn run(mut self) -> anyhow::Result<WorkerSummary> {
        if !self.register().await? {
            return Ok(self.summary);
        }
        let outcome = self.lease_loop().await;
        // Whatever ended the loop: results on their way are delivered (or given up on, at
        // shutdown), and leases never started are handed back.
        let settled = self.settle().await;
        outcome.and(settled)?;
        Ok(self.summary)
    }

    async fn lease_loop(&mut self) -> anyhow::Result<()> {
        let mut backoff = self.backoff();
        loop {
            if self.shutdown.is_set() {
                return Ok(());
            }
            self.land_finished()?;
            // A lease already here (carried by a result's reply, or a spare) runs first.
            if let Some((received, since)) = self.pipeline.ready.pop_front() {
                if let Some(received) = self.still_ours(received, since).await {
                    self.handle_lease(received).await?;
                }
                continue;
            }
            if !self.pipeline.inflight.is_empty() {
                self.land_next().await?;
                continue;
            }
            if self.pipeline.dismissed {
                tracing::info!("the coordinator is finishing; worker exits");
                return Ok(());
            }
            if self.opts.max_trials.is_some_and(|max| self.summary.leases >= max) {
                tracing::info!(leases = self.summary.leases, "max trials reached; worker exits");
                return Ok(());
            }
            let request = LeaseRequest {
                worker_id: self.summary.worker_id.clone(),
                wait_ms: self.opts.poll_wait_ms(),
            };
            let mut client = self.client.clone();
            let mut shutdown = self.shutdown.clone();
            let limit = self.opts.poll_wait + self.opts.rpc_timeout;
            let reply = tokio::select! {
                () = shutdown.wait() => return Ok(()),
                reply = timed(limit, client.lease(request)) => reply,
            };
            match reply {
                Ok(reply) => {
                    backoff.reset();
                    self.take(After::new(reply.lease, reply.shutdown), Instant::now());
                }
                Err(status) if status.code() == Code::NotFound => {
                    tracing::warn!(worker_id = %self.summary.worker_id, message = status.message(),
                        "the coordinator does not know this worker; registering again");
                    if !self.register().await? {
                        return Ok(());
                    }
                }
                Err(status) if is_transient(&status) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(coordinator = %self.opts.coordinator, code = ?status.code(),
                        message = status.message(), retry_in = ?delay, "lease request failed");
                    if !self.sleep_or_shutdown(delay).await {
                        return Ok(());
                    }
                }
                Err(status) => anyhow::bail!(
                    "coordinator {} refused the lease request of worker {}: {:?}: {}",
                    self.opts.coordinator,
                    self.summary.worker_id,
                    status.code(),
                    status.message()
                ),
            }
        }
    }

    /// Keeps what a reply (received `at`) said: its lease joins the queue, a dismissal ends
    /// the asking.
    fn take(&mut self, after: After, at: Instant) {
        if let Some(received) = after.lease {
            self.pipeline.ready.push_back((received, at));
        }
        self.pipeline.dismissed |= after.shutdown;
    }

    /// Waits for the next delivery or fetch to end and keeps what it brought.
    async fn land_next(&mut self) -> anyhow::Result<()> {
        let Some(joined) = self.pipeline.inflight.join_next().await else {
            return Ok(());
        };
        self.land(joined)
    }

    fn land(
        &mut self,
        joined: Result<anyhow::Result<Delivered>, tokio::task::JoinError>,
    ) -> anyhow::Result<()> {
        let delivered = joined.map_err(|e| anyhow::anyhow!("delivery task: {e}"))??;
        self.pipeline.asking -= usize::from(delivered.asked);
        self.summary.absorb(&delivered.tally);
        self.take(delivered.after, delivered.at);
        Ok(())
    }

    /// Keeps what calls that already ended brought, without waiting for the others.
    fn land_finished(&mut self) -> anyhow::Result<()> {
        while let Some(joined) = self.pipeline.inflight.try_join_next() {
            self.land(joined)?;
        }
        Ok(())
    }

    /// Sends a result on its own task, asking for as many leases as keep the pipeline full.
    /// Nothing waits for it here: a call may long-poll, and a lease already held must not wait
    /// behind it (the loop waits for calls only when it has nothing to run).
    fn dispatch(&mut self, lease: LeaseRef, result: TrialResult) {
        let spares = if result.duration < PREFETCH_BELOW { self.opts.prefetch } else { 0 };
        let mut wanted = (1 + spares).saturating_sub(self.pipeline.held());
        if let Some(max) = self.opts.max_trials {
            wanted = wanted.min(max.saturating_sub(self.summary.leases + self.pipeline.held()));
        }
        if self.shutdown.is_set() || self.pipeline.dismissed {
            wanted = 0;
        }
        let next = (wanted > 0).then(|| NextLease {
            worker_id: self.summary.worker_id.clone(),
            wait_ms: self.opts.poll_wait_ms(),
        });
        let courier = self.courier();
        self.pipeline.asking += wanted;
        self.pipeline.inflight.spawn(courier.clone().deliver(lease, result, next));
        for _ in 1..wanted {
            self.pipeline.inflight.spawn(courier.clone().fetch(self.summary.worker_id.clone()));
        }
    }

    /// A lease that waited behind a running trial may have outlived its ttl: past a third of
    /// it, a progress report renews it first. None when the coordinator no longer holds it
    /// for us (it has requeued the trial).
    pub(super) async fn still_ours(
        &mut self,
        received: Received,
        since: Instant,
    ) -> Option<Received> {
        let Ok(trial) = &received else { return Some(received) };
        let Some(ttl) = trial.ttl else { return Some(received) };
        if since.elapsed() < ttl / 3 {
            return Some(received);
        }
        let request = progress_request(&trial.lease.lease_id, 0, Default::default(), Vec::new());
        let mut client = self.client.clone();
        match timed(self.opts.rpc_timeout, client.progress(request)).await {
            Err(status) if matches!(status.code(), Code::NotFound | Code::FailedPrecondition) => {
                tracing::info!(trial = %trial.lease.trial_id, message = status.message(),
                    "a held lease expired before its turn; the coordinator has requeued the trial");
                self.summary.leases += 1;
                self.summary.lost += 1;
                None
            }
            // Anything else: run it; its reports and result sort out the rest.
            _ => Some(received),
        }
    }

    /// Delivers what is still on its way and hands back every lease not started.
    async fn settle(&mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        while !self.pipeline.inflight.is_empty() {
            if let Err(e) = self.land_next().await {
                first_error.get_or_insert(e);
            }
        }
        while let Some((received, _)) = self.pipeline.ready.pop_front() {
            // Asked for before the loop ended (shutdown, max trials, an error): hand it back.
            self.summary.leases += 1;
            let reason = if self.shutdown.is_set() {
                StopCause::Shutdown.to_string()
            } else {
                "the worker is exiting".to_string()
            };
            self.release(lease_of(&received), reason).await;
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Registers (retrying while the coordinator is away). Ok(false) if shutdown came first;
    /// Err when the coordinator refuses us (protocol version, token).
    async fn register(&mut self) -> anyhow::Result<bool> {
        let mut backoff = self.backoff();
        loop {
            if self.shutdown.is_set() {
                return Ok(false);
            }
            let request = RegisterRequest {
                protocol_version: msae_shared::PROTOCOL_VERSION,
                name: self.opts.name.clone(),
                device: self.opts.device(),
            };
            let mut client = self.client.clone();
            match timed(self.opts.rpc_timeout, client.register(request)).await {
                Ok(reply) => {
                    tracing::info!(worker_id = %reply.worker_id, name = %self.opts.name, device = %self.opts.device(),
                        coordinator = %self.opts.coordinator, coordinator_version = %reply.coordinator_version, "registered");
                    self.summary.worker_id = reply.worker_id;
                    return Ok(true);
                }
                Err(status) if is_transient(&status) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(coordinator = %self.opts.coordinator, code = ?status.code(),
                        message = status.message(), retry_in = ?delay, "cannot register yet");
                    if !self.sleep_or_shutdown(delay).await {
                        return Ok(false);
                    }
                }
                Err(status) => anyhow::bail!(
                    "coordinator {} refused to register worker {:?}: {:?}: {}",
                    self.opts.coordinator,
                    self.opts.name,
                    status.code(),
                    status.message()
                ),
            }
        }
    }

    /// Runs a lease to its end and sends its result (or hands it back). A lease that cannot
    /// run is reported as a failed trial, never a panic.
    async fn handle_lease(&mut self, received: Received) -> anyhow::Result<()> {
        self.summary.leases += 1;
        let started = Instant::now();
        let (lease, finished) = match received {
            Ok(trial) => {
                tracing::info!(trial = %trial.lease.trial_id, attempt = trial.lease.attempt,
                    lease = %trial.lease.lease_id, runner = %trial.runner, "leased trial");
                let finished = match self.run_trial(&trial, started).await {
                    Finished::Report(result) => {
                        Finished::Report(self.upload_files(&trial, result).await)
                    }
                    release => release,
                };
                (trial.lease, finished)
            }
            Err(bad) => {
                tracing::info!(trial = %bad.lease.trial_id, attempt = bad.lease.attempt,
                    lease = %bad.lease.lease_id, "leased trial");
                tracing::warn!(trial = %bad.lease.trial_id, error = %bad.reason, "cannot run leased trial");
                let result = TrialResult::failed(bad.reason, false, started.elapsed());
                (bad.lease, Finished::Report(result))
            }
        };
        match finished {
            Finished::Report(result) => self.dispatch(lease, result),
            Finished::Release(reason) => self.release(&lease, reason).await,
        }
        Ok(())
    }
}
