//! Running a sweep: the glue behind `msae-coordinator SWEEP.yaml`.
//!
//! Parses and validates the sweep, opens the store, starts (or resumes) the scheduler, serves
//! gRPC, runs the embedded local workers, writes TensorBoard logs and shows progress, then
//! prints the ranked report. Ctrl-C stops dispatching, lets workers hand their trials back,
//! and shuts down with everything committed.

use crate::progress::ProgressDisplay;
use crate::report::{Report, ReportFormat, ReportOptions};
use crate::scheduler::{Counts, Scheduler, SchedulerPolicy, SweepInput};
use crate::spec::SweepSpec;
use crate::store::Store;
use crate::weights::WeightStore;
use anyhow::Context;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long a finished sweep keeps serving so that workers hear it is over.
const DISMISS_GRACE: Duration = Duration::from_secs(3);

/// How long a stopping coordinator waits for remote workers to hand running trials back (they
/// hear it on their next progress report, at most a heartbeat away).
const REMOTE_RELEASE_GRACE: Duration = Duration::from_secs(10);

/// The default `--max-upload-mb`.
pub const DEFAULT_MAX_UPLOAD_MB: u64 = 4096;

/// Stops transparent huge pages for the rest of this process's life, on Linux.
///
/// A coordinator that trains nothing itself allocates small records all the time, and the
/// kernel zeroed a fresh 2 MiB page for each new stretch of them: 12-15% of its CPU under the
/// 64-worker benchmark, and 8-13% fewer trials/s. Training wants the opposite (huge pages
/// made the modular SAE's batch-256 step about 10% faster), so only a coordinator without
/// local workers does this.
fn without_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
        let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            tracing::debug!("prctl(PR_SET_THP_DISABLE) failed: {e}");
        }
    }
}

/// Everything `run_sweep` needs besides the sweep file.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub sweep: PathBuf,
    pub db: PathBuf,
    pub listen: SocketAddr,
    /// Workers run inside this process (0 = remote workers only).
    pub local_workers: usize,
    /// CUDA device of the local workers (None = CPU).
    pub local_gpu: Option<usize>,
    /// TensorBoard root (None = no event files).
    pub logdir: Option<PathBuf>,
    /// Local workers keep each trial's weights under this directory.
    pub artifacts: Option<PathBuf>,
    pub new_sweep: bool,
    pub token: Option<String>,
    pub lease_ttl: Duration,
    /// The most bytes of one uploaded trial file.
    pub max_upload: u64,
    /// Serve TLS on `listen` (local workers then use a loopback port of their own).
    pub tls: Option<msae_shared::tls::ServerTls>,
    /// The server's deadlines (`--rpc-timeout`, `--upload-idle-timeout`).
    pub limits: crate::service::Limits,
    /// Show live progress on stderr.
    pub progress: bool,
    /// Print the ranked report when the sweep ends.
    pub report: bool,
}

impl RunOptions {
    /// Defaults of the CLI for `sweep`.
    pub fn new(sweep: impl Into<PathBuf>) -> Self {
        RunOptions {
            sweep: sweep.into(),
            db: PathBuf::from("msae.redb"),
            listen: "127.0.0.1:50051".parse().expect("valid address"),
            local_workers: 1,
            local_gpu: None,
            logdir: Some(PathBuf::from("runs")),
            artifacts: None,
            new_sweep: false,
            token: None,
            lease_ttl: Duration::from_secs(30),
            max_upload: DEFAULT_MAX_UPLOAD_MB << 20,
            tls: None,
            limits: crate::service::Limits::default(),
            progress: true,
            report: true,
        }
    }
}

/// How a sweep run ended.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The sweep's name in the store (differs from the YAML's with `--new-sweep`).
    pub sweep: String,
    /// The address the service listened on.
    pub addr: SocketAddr,
    pub counts: Counts,
    /// True when every trial reached a final state; false after Ctrl-C.
    pub finished: bool,
    /// Durable commits made (each carries every change batched since the last).
    pub commits: u64,
    /// When the last trial ended: this process's CPU seconds then, and the instant (what
    /// follows is shutdown: dismissing workers, the last commit, the report).
    pub done: Option<(std::time::Instant, f64)>,
}

/// The file beside the database that tells `report` where the running coordinator listens.
pub fn address_file(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".addr");
    PathBuf::from(name)
}

/// The URL of the coordinator holding `db`, from the address file it writes beside it
/// (`HOST:PORT`, or a whole `https://` URL when it serves TLS).
pub fn running_url(db: &Path) -> anyhow::Result<String> {
    let file = address_file(db);
    let addr = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "{} is locked by another process, and {} (where a running coordinator writes its \
             address) cannot be read; pass --coordinator URL",
            db.display(),
            file.display()
        )
    })?;
    Ok(url_of(addr.trim()))
}

/// A URL from what a user or the address file gives: `HOST:PORT` means `http://HOST:PORT`.
pub fn url_of(addr: &str) -> String {
    if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") }
}

/// Read and validate a sweep file; the error names the file, line and column. Relative data
/// paths are resolved against the file's directory.
pub fn load_spec(path: &Path) -> anyhow::Result<(SweepSpec, String)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read sweep file {}", path.display()))?;
    let mut spec =
        SweepSpec::parse(&text, &path.display().to_string()).map_err(anyhow::Error::new)?;
    spec.resolve_data_paths(path.parent().unwrap_or(Path::new("")));
    Ok((spec, text))
}

/// Run or resume the sweep until it finishes or `shutdown` resolves.
pub async fn run_sweep(
    opts: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<RunSummary> {
    let (spec, yaml) = load_spec(&opts.sweep)?;
    crate::preflight::check_data(&spec, opts.local_workers)?;
    if opts.local_workers == 0 {
        without_huge_pages();
    }
    let tls = opts.tls.as_ref().map(|t| t.config()).transpose().map_err(anyhow::Error::msg)?;
    // Bind before touching the database: a busy port must fail before anything starts.
    let listener = tokio::net::TcpListener::bind(opts.listen).await.with_context(|| {
        format!("cannot listen on {} (another coordinator? use --listen)", opts.listen)
    })?;
    let addr = listener.local_addr()?;
    let db = opts.db.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&db)).await??;
    #[cfg(feature = "fault-injection")]
    arm_write_fault(&store);
    // Opened only once the database is ours: its lock keeps a second coordinator from
    // emptying this one's staging area.
    let weights = if spec.keep_weights.uploads() {
        let root = WeightStore::beside(&opts.db);
        let store = WeightStore::open(root.clone(), opts.max_upload)
            .with_context(|| format!("cannot use the weights directory {}", root.display()))?;
        Some(Arc::new(store))
    } else {
        None
    };
    let policy = SchedulerPolicy {
        max_attempts: spec.max_attempts,
        lease_ttl: opts.lease_ttl,
        timeout: spec.timeout,
        max_concurrent: spec.max_concurrent,
        run_cap: spec.run_cap,
        planned: spec.planned_trials(),
        metric: spec.metric.name.clone(),
        goal: spec.metric.goal,
        runner: spec.task.kind,
        noop_sleep_ms: spec.task.sleep_ms.min(u32::MAX as u64) as u32,
        early_terminate: spec.early_terminate.clone(),
        keep_weights: spec.keep_weights,
        weights,
    };
    let strategy = crate::search::make_strategy(&spec);
    let input = SweepInput {
        name: spec.name.clone(),
        yaml,
        fingerprint: spec.fingerprint(),
        new_sweep: opts.new_sweep,
    };
    let config_spec = spec.clone();
    let make_config = Box::new(move |params: &crate::scheduler::Params| {
        config_spec.trial_config(params).map_err(|e| e.to_string())
    });
    let scheduler = Scheduler::start(store, input, policy, strategy, make_config).await?;
    let sweep = scheduler.sweep_name().to_string();

    let addr_file = address_file(&opts.db);
    let published = if tls.is_some() { format!("https://{addr}") } else { addr.to_string() };
    if let Err(e) = std::fs::write(&addr_file, published) {
        tracing::warn!("cannot write {}: {e}", addr_file.display());
    }
    tracing::info!(%sweep, %addr, db = %opts.db.display(), "coordinator listening");

    let (stop_tx, stop_rx) = watch::channel(false);
    // With TLS, local workers talk plain gRPC on a loopback port of their own (the certificate
    // names the host remote workers use, not 127.0.0.1); the token still applies there.
    let local_listener = match (&tls, opts.local_workers) {
        (Some(_), n) if n > 0 => Some(
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .context("cannot open a loopback port for the local workers")?,
        ),
        _ => None,
    };
    let local_url = match &local_listener {
        Some(l) => format!("http://{}", l.local_addr()?),
        None => format!("http://{addr}"),
    };
    let mut servers = Vec::new();
    for (listener, tls) in
        [Some((listener, tls)), local_listener.map(|l| (l, None))].into_iter().flatten()
    {
        let scheduler = scheduler.clone();
        let token = opts.token.clone();
        let stop = wait_for(stop_rx.clone());
        let limits = opts.limits;
        servers.push(tokio::spawn(async move {
            crate::service::serve(listener, scheduler, token, tls, limits, stop).await
        }));
    }
    let tensorboard = opts.logdir.clone().map(|root| {
        let params: Vec<_> = spec
            .parameters
            .iter()
            .map(|(name, p)| crate::tensorboard::messages::HParamInfo::of(name, p))
            .collect();
        crate::tensorboard::follow::spawn(&scheduler, root, &params, &spec.metric.name)
    });
    let display = opts.progress.then(|| {
        ProgressDisplay::spawn(scheduler.counts(), spec.metric.name.clone(), stop_rx.clone())
    });
    // Local workers stop first, while the server still answers their Release calls.
    let (workers_stop_tx, workers_stop_rx) = watch::channel(false);
    let local = crate::embedded::LocalWorkers {
        url: local_url,
        count: opts.local_workers,
        name: "local".into(),
        gpu: opts.local_gpu,
        token: opts.token.clone(),
        out_dir: opts.artifacts.clone(),
        runner: crate::embedded::Runner::Sae,
        prefetch: crate::embedded::DEFAULT_PREFETCH,
    };
    let workers = crate::embedded::spawn(&local, || wait_for(workers_stop_rx.clone()))?;

    let mut counts_rx = scheduler.counts();
    let finished = tokio::select! {
        // A store error is reported below, after the cleanup, from the counts.
        result = scheduler.finished() => result.is_ok(),
        () = shutdown => {
            eprintln!("stopping: no new trials are dispatched; running trials are handed back");
            false
        }
        // A fatal store error stops the scheduler: report it rather than hang.
        _ = counts_rx.wait_for(|c| c.stopped) => false,
    };
    let done =
        finished.then(|| (std::time::Instant::now(), msae_shared::signal::process_cpu_seconds()));

    if finished {
        // Workers learn that the sweep is over from their next lease request: keep serving
        // until every registered worker has been told (or a dead one would hold us forever).
        let mut counts = scheduler.counts();
        let _ = tokio::time::timeout(DISMISS_GRACE, counts.wait_for(|c| c.workers == 0)).await;
    }
    // Local workers first: they hand their leases back while the server and the scheduler
    // still run, so a stop costs no attempt.
    let _ = workers_stop_tx.send(true);
    for w in workers {
        match tokio::time::timeout(Duration::from_secs(30), w).await {
            Ok(Ok(Err(e))) => tracing::warn!("local worker ended with an error: {e:#}"),
            Ok(Err(e)) => tracing::warn!("local worker panicked: {e}"),
            Err(_) => tracing::warn!("local worker did not stop within 30 s"),
            Ok(Ok(Ok(_))) => {}
        }
    }
    // Remote workers learn of the shutdown from their next progress report (replied "stop and
    // hand the lease back") while the server still runs; then everything is flushed.
    scheduler.shutdown(REMOTE_RELEASE_GRACE).await.ok();
    // Read after the shutdown, so the final report shows the trials as they were left (handed
    // back, not running), as the counts do. Only for a report: it copies every record.
    let (sweeps, records) = if opts.report {
        scheduler.stored(&sweep).await.unwrap_or_default()
    } else {
        Default::default()
    };
    let counts = scheduler.counts().borrow().clone();
    let commits = scheduler.commits();
    let _ = stop_tx.send(true);
    if let Some(handle) = display {
        let _ = handle.await;
    }
    for server in servers {
        match tokio::time::timeout(Duration::from_secs(5), server).await {
            Ok(Ok(Err(e))) => tracing::warn!("gRPC server error: {e}"),
            Err(_) => tracing::warn!("gRPC server did not stop within 5 s"),
            _ => {}
        }
    }
    // The event stream closes when the last scheduler handle is gone (the server held one):
    // the TensorBoard writer then drains what is left and closes its files.
    drop(scheduler);
    if let Some(handle) = tensorboard
        && tokio::time::timeout(Duration::from_secs(5), handle).await.is_err()
    {
        tracing::warn!("TensorBoard writer did not finish within 5 s");
    }
    let _ = std::fs::remove_file(&addr_file);
    if let Some(error) = &counts.error {
        anyhow::bail!(
            "the sweep stopped because the database could not be written ({error}); every \
             result acknowledged before that is stored, and nothing after it was acknowledged: \
             fix the cause (a full disk?) and run the same command again to resume"
        );
    }
    if opts.report
        && let Some(record) = sweeps.iter().find(|s| s.name == sweep)
    {
        // No metric override and no picked metrics: nothing to refuse.
        let top20 = ReportOptions { top: Some(20), ..ReportOptions::default() };
        if let Ok(report) = Report::for_sweep(record, &records, &top20) {
            let text = report.render(ReportFormat::Table);
            msae_shared::signal::print_stdout(text.trim_end())?;
        }
    }
    Ok(RunSummary { sweep, addr, counts, finished, commits, done })
}

/// Tests make the database fail like a full disk after N commits with
/// `MSAE_FAULT_FAIL_WRITES_AFTER=N` (only in builds with the `fault-injection` feature).
#[cfg(feature = "fault-injection")]
fn arm_write_fault(store: &Store) {
    let Ok(text) = std::env::var("MSAE_FAULT_FAIL_WRITES_AFTER") else { return };
    match text.parse::<u64>() {
        Ok(n) => {
            tracing::warn!(commits = n, "fault injection: database writes fail after {n} commits");
            store.write_fault().fail_after(n);
        }
        Err(e) => tracing::warn!("ignoring MSAE_FAULT_FAIL_WRITES_AFTER={text:?}: {e}"),
    }
}

/// Resolves when the watch flips to true (or its sender is gone).
async fn wait_for(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod path_tests {
    use super::*;

    #[test]
    fn relative_data_paths_resolve_from_the_sweep_files_directory() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sweeps");
        std::fs::create_dir(&sub).unwrap();
        let file = sub.join("s.yaml");
        std::fs::write(
            &file,
            "name: p\nmethod: grid\nbase:\n  data: {path: acts/x.npy, labels: /abs/l.npy}\n\
             parameters:\n  lr: {values: [0.1]}\n",
        )
        .unwrap();
        let (spec, _) = load_spec(&file).unwrap();
        let data = &spec.base["data"];
        assert_eq!(data["path"], sub.join("acts/x.npy").display().to_string());
        assert_eq!(data["labels"], "/abs/l.npy", "absolute paths stay");

        // Swept paths resolve the same way.
        std::fs::write(
            &file,
            "name: p\nmethod: grid\nbase: {data.source: npy}\n\
             parameters:\n  data.path: {values: [a.npy, /abs/b.npy]}\n",
        )
        .unwrap();
        let (spec, _) = load_spec(&file).unwrap();
        let crate::spec::ParamSpec::Values(paths) = &spec.parameters["data.path"] else {
            panic!("{:?}", spec.parameters["data.path"])
        };
        assert_eq!(paths[0], sub.join("a.npy").display().to_string());
        assert_eq!(paths[1], "/abs/b.npy");
    }
}
