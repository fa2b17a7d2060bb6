//! Why a running trial should stop: the worker's shutdown, seen by every task, and the first
//! stop cause of one trial, shared with the runner's progress callback.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// A cloneable view of the shutdown request.
#[derive(Clone)]
pub(super) struct ShutdownSignal(pub(super) watch::Receiver<bool>);

impl ShutdownSignal {
    pub(super) fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown is requested.
    pub(super) async fn wait(&mut self) {
        // An error means the sender is gone, i.e. run_worker is returning: same thing.
        let _ = self.0.wait_for(|set| *set).await;
    }
}

/// Why a running trial was asked to stop.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum StopCause {
    /// The coordinator said stop (early stopping, cancellation).
    Coordinator(String),
    /// The coordinator's early termination rule pruned the trial: its metrics so far are
    /// reported as a pruned result.
    Pruned(String),
    /// The coordinator no longer knows the lease.
    LeaseLost(String),
    /// The trial's time limit passed.
    Timeout(Duration),
    /// The worker is shutting down.
    Shutdown,
    /// The coordinator asked for the lease back (it is shutting down): no result is reported.
    Release(String),
}

impl std::fmt::Display for StopCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopCause::Coordinator(reason) => write!(f, "stopped by the coordinator: {reason}"),
            StopCause::Pruned(reason) => write!(f, "pruned by the coordinator: {reason}"),
            StopCause::LeaseLost(reason) => write!(f, "lease lost: {reason}"),
            StopCause::Timeout(limit) => {
                write!(f, "trial exceeded its timeout of {} s", limit.as_secs_f64())
            }
            StopCause::Shutdown => write!(f, "worker shutting down"),
            StopCause::Release(reason) => write!(f, "handed back: {reason}"),
        }
    }
}

/// Shared between the async side and the runner's progress callback. Set once: the first
/// cause wins. A std mutex: never held across an await.
#[derive(Clone, Default)]
pub(super) struct StopFlag(Arc<Mutex<Option<StopCause>>>);

impl StopFlag {
    pub(super) fn set(&self, cause: StopCause) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(cause);
        }
    }

    pub(super) fn get(&self) -> Option<StopCause> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_cause_wins() {
        let flag = StopFlag::default();
        assert_eq!(flag.get(), None);
        flag.set(StopCause::Timeout(Duration::from_millis(200)));
        flag.clone().set(StopCause::Shutdown);
        assert_eq!(flag.get(), Some(StopCause::Timeout(Duration::from_millis(200))));
        assert_eq!(flag.get().unwrap().to_string(), "trial exceeded its timeout of 0.2 s");
    }
}
