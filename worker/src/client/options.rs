//! What a worker is told (`ClientOptions`) and what it tells back (`WorkerSummary`).

use std::path::PathBuf;
use std::time::Duration;

/// Options of the worker loop. [`ClientOptions::new`] fills in the defaults.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Coordinator URL, e.g. `http://127.0.0.1:50051`.
    pub coordinator: String,
    /// Worker name shown by the coordinator (default: `{hostname}-{pid}`).
    pub name: String,
    /// CUDA device ordinal to train on; None = CPU.
    pub gpu: Option<usize>,
    /// Shared secret sent as `authorization: Bearer TOKEN`.
    pub token: Option<String>,
    /// What to trust for an https:// coordinator (and a client certificate, if it asks).
    pub tls: msae_shared::tls::ClientTls,
    /// Artifacts of a trial go to `{out_dir}/{sweep}/{index}` when set.
    pub out_dir: Option<PathBuf>,
    /// Exit after handling this many leases.
    pub max_trials: Option<usize>,
    /// Leases to hold beyond the running one while trials are short (under
    /// [`PREFETCH_BELOW`]): the next trial starts while the last result is still being
    /// committed, and that many results can be in flight at once. 0 = one lease at a time.
    pub prefetch: usize,
    /// How long one `Lease` long-poll may wait on the coordinator.
    pub poll_wait: Duration,
    /// Limit of every other call (and the extra time allowed to a long-poll).
    pub rpc_timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// First retry delay after a transient failure; doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    /// Largest retry delay.
    pub backoff_max: Duration,
    /// Progress from the trainer is forwarded at most this often (heartbeats aside).
    pub progress_min_interval: Duration,
    /// On shutdown, how long to wait for the running trial to honour `Stop` before releasing
    /// its lease anyway.
    pub stop_grace: Duration,
}

impl ClientOptions {
    /// Options with defaults for a coordinator at `coordinator`.
    pub fn new(coordinator: impl Into<String>) -> Self {
        ClientOptions {
            coordinator: coordinator.into(),
            name: default_worker_name(),
            gpu: None,
            token: None,
            tls: Default::default(),
            out_dir: None,
            max_trials: None,
            prefetch: 0,
            poll_wait: Duration::from_secs(20),
            rpc_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            progress_min_interval: Duration::from_secs(1),
            stop_grace: Duration::from_secs(60),
        }
    }

    /// The device string sent at registration: `cpu` or `cuda:N`.
    pub fn device(&self) -> String {
        match self.gpu {
            Some(n) => format!("cuda:{n}"),
            None => "cpu".to_string(),
        }
    }

    /// `poll_wait` as the protocol's `wait_ms`, saturating.
    pub(super) fn poll_wait_ms(&self) -> u32 {
        self.poll_wait.as_millis().min(u32::MAX as u128) as u32
    }
}

/// Trials that ran at least this long do not ask for spare leases: their round trip is
/// already hidden, and a spare would wait a whole trial on a lease another worker could use.
pub const PREFETCH_BELOW: Duration = Duration::from_secs(1);

/// `{hostname}-{pid}`: unique enough per machine, readable in reports.
pub fn default_worker_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_string());
    format!("{host}-{}", std::process::id())
}

/// What a worker did before it returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerSummary {
    /// The id of the last registration.
    pub worker_id: String,
    /// Leases received.
    pub leases: usize,
    /// Results accepted by the coordinator, successful trials (pruned ones included).
    pub succeeded: usize,
    /// Of `succeeded`: trials the coordinator's early termination stopped, reported with the
    /// metrics they had reached.
    pub pruned: usize,
    /// Results accepted by the coordinator, failed trials.
    pub failed: usize,
    /// Results the coordinator refused (stale leases).
    pub refused: usize,
    /// Leases handed back without a result (shutdown).
    pub released: usize,
    /// Results given up on at shutdown because the coordinator was unreachable, and spare
    /// leases that expired before their turn (either way the trial runs again elsewhere).
    pub lost: usize,
}

impl WorkerSummary {
    /// Adds the outcome counts of `other` (a delivery's), keeping this summary's worker id.
    pub(super) fn absorb(&mut self, other: &WorkerSummary) {
        self.leases += other.leases;
        self.succeeded += other.succeeded;
        self.pruned += other.pruned;
        self.failed += other.failed;
        self.refused += other.refused;
        self.released += other.released;
        self.lost += other.lost;
    }
}
