//! The lease loop: register, ask for leases (long-poll), run each one to its end, and register
//! again when the coordinator has forgotten this worker.

use super::connect::{Client, connect};
use super::edge::{LeasedTrial, Received, TrialResult, lease_of};
use super::options::{ClientOptions, WorkerSummary};
use super::retry::{Backoff, is_transient, timed};
use super::stop::{ShutdownSignal, StopCause};
use super::trial::Finished;
use crate::runner::TrialRunner;
use msae_shared::proto::{Lease, LeaseRequest, RegisterRequest};
use std::sync::Arc;
use std::time::{Duration, Instant};
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
    pub(super) opts: ClientOptions,
    pub(super) client: Client,
    /// Runs `sae` leases; `noop` leases get a fresh `NoopRunner`.
    pub(super) sae: Arc<dyn TrialRunner>,
    pub(super) shutdown: ShutdownSignal,
    pub(super) summary: WorkerSummary,
}

impl Worker {
    pub(super) fn new(
        opts: ClientOptions,
        sae: Arc<dyn TrialRunner>,
        shutdown: ShutdownSignal,
    ) -> anyhow::Result<Self> {
        let client = connect(&opts)?;
        Ok(Worker { opts, client, sae, shutdown, summary: WorkerSummary::default() })
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
        let mut backoff = self.backoff();
        loop {
            if self.shutdown.is_set() {
                break;
            }
            if self.opts.max_trials.is_some_and(|max| self.summary.leases >= max) {
                tracing::info!(leases = self.summary.leases, "max trials reached; worker exits");
                break;
            }
            let request = LeaseRequest {
                worker_id: self.summary.worker_id.clone(),
                wait_ms: self.opts.poll_wait_ms(),
            };
            let mut client = self.client.clone();
            let mut shutdown = self.shutdown.clone();
            let limit = self.opts.poll_wait + self.opts.rpc_timeout;
            let reply = tokio::select! {
                () = shutdown.wait() => break,
                reply = timed(limit, client.lease(request)) => reply,
            };
            match reply {
                Ok(reply) => {
                    backoff.reset();
                    let mut after = After::new(reply.lease, reply.shutdown);
                    // Each result's reply may carry the next lease: run them back to back.
                    while let Some(received) = after.lease.take() {
                        if self.shutdown.is_set() {
                            // Asked for before the shutdown came: hand it back at once.
                            self.summary.leases += 1;
                            self.release(lease_of(&received), StopCause::Shutdown.to_string())
                                .await;
                            break;
                        }
                        let shutdown = after.shutdown;
                        after = self.handle_lease(received).await?;
                        after.shutdown |= shutdown;
                    }
                    if after.shutdown {
                        tracing::info!("the coordinator is finishing; worker exits");
                        break;
                    }
                }
                Err(status) if status.code() == Code::NotFound => {
                    tracing::warn!(worker_id = %self.summary.worker_id, message = status.message(),
                        "the coordinator does not know this worker; registering again");
                    if !self.register().await? {
                        break;
                    }
                }
                Err(status) if is_transient(&status) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(coordinator = %self.opts.coordinator, code = ?status.code(),
                        message = status.message(), retry_in = ?delay, "lease request failed");
                    if !self.sleep_or_shutdown(delay).await {
                        break;
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
        Ok(self.summary)
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

    /// Runs a lease to its end and reports it; returns what the result's reply said about the
    /// next step. A lease that cannot run is reported as a failed trial, never a panic.
    async fn handle_lease(&mut self, received: Received) -> anyhow::Result<After> {
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
            Finished::Report(result) => self.deliver(&lease, result).await,
            Finished::Release(reason) => {
                self.release(&lease, reason).await;
                Ok(After::default())
            }
        }
    }
}
