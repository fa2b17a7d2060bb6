//! The embedded worker: the only module of the coordinator that names `msae_worker`.
//!
//! With the default `local-worker` feature the coordinator runs worker loops in-process
//! (`--local-workers N`, the orchestration benchmark) and checks data files by loading them as
//! a worker would. Without it, the scheduler, store, search and service build and test without
//! candle, and everything here that needs a worker is an error saying how to get one.

use msae_shared::config::DataConfig;
use std::future::Future;
use std::path::PathBuf;
use tokio::task::JoinHandle;

/// Which trial runner embedded workers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    /// Real training ([`msae_worker::train::SaeRunner`]), whatever kind the lease names.
    Sae,
    /// Analytic trials that return at once (the orchestration benchmark).
    Noop,
}

/// Spare leases of local workers: `msae-worker --prefetch`'s default.
pub const DEFAULT_PREFETCH: usize = 4;

/// How to start embedded workers.
#[derive(Debug, Clone)]
pub struct LocalWorkers {
    /// Coordinator URL, `http://HOST:PORT`.
    pub url: String,
    pub count: usize,
    /// Workers are named `{name}-{i}`.
    pub name: String,
    pub gpu: Option<usize>,
    pub token: Option<String>,
    /// Keep each trial's weights and config under this directory.
    pub out_dir: Option<PathBuf>,
    pub runner: Runner,
    /// Spare leases each worker may hold while trials are short (`msae-worker --prefetch`).
    pub prefetch: usize,
}

#[cfg(feature = "local-worker")]
const MISSING: &str = "";
#[cfg(not(feature = "local-worker"))]
const MISSING: &str = "this coordinator was built without the `local-worker` feature, so it \
                       cannot run workers in-process; rebuild with default features or use \
                       `--local-workers 0` and start `msae-worker` processes";

/// Starts `w.count` worker loops; each ends when `stop()` resolves (or the sweep is over).
pub fn spawn<F, S>(w: &LocalWorkers, stop: S) -> anyhow::Result<Vec<JoinHandle<anyhow::Result<()>>>>
where
    S: Fn() -> F,
    F: Future<Output = ()> + Send + 'static,
{
    if w.count == 0 {
        return Ok(Vec::new());
    }
    #[cfg(feature = "local-worker")]
    {
        use msae_worker::client::{ClientOptions, run_worker};
        use msae_worker::runner::TrialRunner;
        use std::sync::Arc;
        let runner: Arc<dyn TrialRunner> = match w.runner {
            Runner::Sae => Arc::new(msae_worker::train::SaeRunner),
            Runner::Noop => Arc::new(msae_worker::noop::NoopRunner::default()),
        };
        Ok((0..w.count)
            .map(|i| {
                let mut client = ClientOptions::new(w.url.clone());
                client.name = format!("{}-{i}", w.name);
                client.gpu = w.gpu;
                client.token = w.token.clone();
                client.out_dir = w.out_dir.clone();
                client.prefetch = w.prefetch;
                let (runner, stop) = (runner.clone(), stop());
                tokio::spawn(async move { run_worker(client, runner, stop).await.map(|_| ()) })
            })
            .collect())
    }
    #[cfg(not(feature = "local-worker"))]
    {
        let _ = stop;
        anyhow::bail!("{MISSING}")
    }
}

/// Fails when embedded workers could not use `gpu` (a build without CUDA), before anything
/// starts.
pub fn check_device(gpu: Option<usize>) -> anyhow::Result<()> {
    #[cfg(feature = "local-worker")]
    {
        msae_worker::cli::check_device(&msae_worker::cli::DeviceArgs { gpu, cpu: false })
    }
    #[cfg(not(feature = "local-worker"))]
    {
        let _ = gpu;
        anyhow::bail!("{MISSING}")
    }
}

/// Sets the budget of the data cache the local workers share.
pub fn set_data_cache_mb(mb: usize) {
    #[cfg(feature = "local-worker")]
    msae_worker::data::cache::global().set_budget(mb << 20);
    let _ = mb;
}

/// Loads `data` as a worker would, to find a bad file before any trial runs. Without the
/// embedded worker there is nothing to load it with: the caller's cheaper checks stand alone.
pub fn load_data(data: &DataConfig) -> anyhow::Result<()> {
    #[cfg(feature = "local-worker")]
    {
        msae_worker::data::load(data, 0).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let _ = (data, MISSING);
    Ok(())
}
