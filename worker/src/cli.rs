//! Command-line front end of `msae-worker`: argument types and the `train` command.
//!
//! Kept in the library so tests drive the same code the binary runs.

use crate::runner::{Control, Progress, ProgressKind, RunOptions, TrialRunner};
use crate::train::SaeRunner;
use anyhow::Context;
use msae_shared::TrialConfig;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `msae-worker`: trains modular sparse autoencoders for an msae coordinator, or on its own.
///
/// With `--coordinator URL` it registers with the coordinator, leases trials, trains them and
/// reports results until stopped (Ctrl-C/SIGTERM hands the running trial back). `train` runs
/// one trial from a YAML file without any network; `bench` times training steps.
#[derive(Debug, clap::Parser)]
#[command(name = "msae-worker", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub worker: WorkerArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run one trial locally from a trial-config YAML file (no coordinator).
    Train(TrainArgs),
    /// Time training steps (samples/s, GFLOP/s) of the fast top-k path and the candle model, or
    /// of any trial config (`--config FILE`, `--preset original`) on the trainer training picks.
    Bench(crate::bench::BenchArgs),
    /// Apply a trained SAE (weights.safetensors from `msae-coordinator export` or --out) to
    /// new data: codes, or with --reconstruct the reconstructions, as .npy.
    Encode(crate::encode::EncodeArgs),
}

/// Device selection shared by every command.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DeviceArgs {
    /// Train on CUDA device N (needs a binary built with `--features cuda`).
    #[arg(long, value_name = "N", conflicts_with = "cpu")]
    pub gpu: Option<usize>,
    /// Train on the CPU (the default).
    #[arg(long)]
    pub cpu: bool,
}

/// Options of the worker loop.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// Coordinator to lease trials from, e.g. http://10.0.0.5:50051.
    #[arg(long, env = "MSAE_COORDINATOR", value_name = "URL")]
    pub coordinator: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Name shown in the coordinator's logs and reports (default: hostname-pid).
    #[arg(long)]
    pub name: Option<String>,
    /// Shared secret expected by the coordinator (`authorization: Bearer TOKEN`).
    #[arg(long, env = "MSAE_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    pub token: Option<String>,
    /// Read the token from FILE (keeps it out of process listings and the environment).
    #[arg(long, value_name = "FILE", env = "MSAE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    #[command(flatten)]
    pub tls: msae_shared::tls::TlsArgs,
    /// Also keep each trial's files (weights, config, metrics) on this machine under
    /// DIR/<sweep>/<trial> (the coordinator keeps its own copy).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Exit after this many trials.
    #[arg(long, value_name = "N")]
    pub max_trials: Option<usize>,
    /// While trials are short (under a second), hold up to N leases beyond the running one:
    /// the next trial starts while the last result is still being committed. Longer trials
    /// hold no spare (it would wait a whole trial on a lease another worker could run).
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub prefetch: usize,
    /// Memory for loaded datasets kept across trials, in MiB (0 = read the data for every
    /// trial). Memory-mapped files count only their bookkeeping: their pages are the kernel's.
    #[arg(long, value_name = "MIB", default_value_t = crate::data::cache::DEFAULT_BUDGET_MB)]
    pub data_cache_mb: usize,
}

/// Options of `msae-worker train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Trial config YAML (every field optional; see the README for the list).
    #[arg(long, short, value_name = "FILE")]
    pub config: PathBuf,
    /// Write weights.safetensors, config.yaml and metrics.json into DIR.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Print the final metrics as one JSON object on stdout (progress stays on stderr).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Read and validate a trial config file; errors name the file. Relative data paths are
/// resolved against the file's directory.
pub fn read_config(path: &std::path::Path) -> anyhow::Result<TrialConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read trial config {}", path.display()))?;
    let mut cfg = TrialConfig::from_yaml(&text)
        .with_context(|| format!("invalid trial config {}", path.display()))?;
    cfg.data.resolve_paths(path.parent().unwrap_or(std::path::Path::new("")));
    Ok(cfg)
}

/// Which progress reports of `msae-worker train` get a line: every evaluation and the final
/// report, samples at most once a second.
#[derive(Debug, Default)]
pub struct ProgressLines {
    last_sample: Option<Duration>,
}

impl ProgressLines {
    /// The line for `p` at `elapsed` since the start, if it gets one.
    pub fn line(&mut self, p: &Progress, elapsed: Duration) -> Option<String> {
        if p.kind == ProgressKind::Sample {
            if self.last_sample.is_some_and(|t| elapsed < t + Duration::from_secs(1)) {
                return None;
            }
            self.last_sample = Some(elapsed);
        }
        Some(progress_line(p, elapsed))
    }
}

/// One progress line of `msae-worker train`: `step    200/600  eval  l0 4.00000  ...  [1.2s]`.
pub fn progress_line(p: &Progress, elapsed: Duration) -> String {
    let mut line = format!("step {:>6}/{}", p.step, p.total_steps);
    match p.kind {
        ProgressKind::Evaluation => line.push_str("  eval"),
        ProgressKind::Final => line.push_str("  final"),
        ProgressKind::Sample => {}
    }
    for (k, v) in &p.scalars {
        line.push_str(&format!("  {k} {v:.5}"));
    }
    format!("{line}  [{:.1}s]", elapsed.as_secs_f64())
}

/// `msae-worker train`: one trial, progress on stderr, metrics on stdout.
pub fn train_command(args: &TrainArgs) -> anyhow::Result<()> {
    let config = read_config(&args.config)?;
    let options = RunOptions { gpu: args.device.gpu, out_dir: args.out.clone(), files: true };
    let started = Instant::now();
    let mut lines = ProgressLines::default();
    let mut progress = |p: &Progress| {
        if let Some(line) = lines.line(p, started.elapsed()) {
            eprintln!("{line}");
        }
        Control::Continue
    };
    let outcome = SaeRunner.run(&config, &options, &mut progress)?;
    let mut stdout = std::io::stdout().lock();
    if args.json {
        writeln!(stdout, "{}", serde_json::to_string(&outcome.metrics)?)?;
    } else {
        for (k, v) in &outcome.metrics {
            writeln!(stdout, "{k:<24} {v:.6}")?;
        }
        if let Some(dir) = &args.out {
            writeln!(stdout, "weights, config and metrics written to {}", dir.display())?;
        }
    }
    Ok(())
}

/// The worker loop (`msae-worker --coordinator URL`), until the coordinator finishes the sweep
/// or Ctrl-C/SIGTERM hands the running trial back.
pub fn worker_command(args: &WorkerArgs) -> anyhow::Result<()> {
    let Some(url) = &args.coordinator else {
        anyhow::bail!(
            "nothing to do: pass --coordinator http://HOST:50051 to join a sweep, or use \
             `msae-worker train --config FILE` for a single local trial (see --help)"
        );
    };
    check_device(&args.device)?;
    // `HOST:PORT` is what people type; tonic needs a scheme.
    let url = if url.contains("://") { url.clone() } else { format!("http://{url}") };
    let mut opts = crate::client::ClientOptions::new(url);
    if let Some(name) = &args.name {
        opts.name = name.clone();
    }
    opts.gpu = args.device.gpu;
    opts.token = msae_shared::auth::resolve(args.token.as_deref(), args.token_file.as_deref())?;
    opts.tls = args.tls.client();
    opts.out_dir = args.out.clone();
    opts.max_trials = args.max_trials;
    opts.prefetch = args.prefetch;
    crate::data::cache::global().set_budget(args.data_cache_mb << 20);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let summary = runtime.block_on(crate::client::run_worker(
        opts,
        std::sync::Arc::new(SaeRunner),
        msae_shared::signal::shutdown_signal(),
    ))?;
    tracing::info!(
        leases = summary.leases,
        succeeded = summary.succeeded,
        failed = summary.failed,
        refused = summary.refused,
        released = summary.released,
        "worker finished"
    );
    Ok(())
}

/// Fails early, with the fix, when `--gpu` is asked of a binary built without CUDA.
pub fn check_device(device: &DeviceArgs) -> anyhow::Result<()> {
    if let Some(n) = device.gpu
        && !cfg!(feature = "cuda")
    {
        anyhow::bail!(
            "--gpu {n}: this msae-worker was built without CUDA support; rebuild with \
             `cargo build --release -p msae-worker --features cuda` or use --cpu"
        );
    }
    Ok(())
}

/// The whole `msae-worker` program (the binary and the end-to-end tests call this).
pub fn main() -> std::process::ExitCode {
    let cli = <Cli as clap::Parser>::parse();
    if matches!(cli.command, Some(Command::Bench(_))) {
        msae_shared::logging::init_with_default("warn");
    } else {
        msae_shared::logging::init();
    }
    let result = match &cli.command {
        Some(Command::Train(args)) => check_device(&args.device).and_then(|()| train_command(args)),
        Some(Command::Bench(args)) => crate::bench::run(args),
        Some(Command::Encode(args)) => {
            check_device(&args.device).and_then(|()| crate::encode::encode_command(args))
        }
        None => worker_command(&cli.worker),
    };
    msae_shared::signal::exit_code(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn relative_data_paths_resolve_from_the_config_files_directory() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("trials");
        std::fs::create_dir(&sub).unwrap();
        let file = sub.join("t.yaml");
        std::fs::write(&file, "data: {path: ../acts/x.npy, labels: /abs/l.npy}\n").unwrap();
        let cfg = read_config(&file).unwrap();
        assert_eq!(cfg.data.path, Some(sub.join("../acts/x.npy")));
        assert_eq!(cfg.data.labels.as_deref(), Some(std::path::Path::new("/abs/l.npy")));
    }

    #[test]
    fn every_evaluation_gets_a_progress_line() {
        // Regression: lines were throttled to one a second whatever they carried, so the
        // evaluations of a fast trial never showed.
        let mut lines = ProgressLines::default();
        let at = |ms: u64| Duration::from_millis(ms);
        let p = |step, kind| Progress {
            step,
            total_steps: 600,
            scalars: [("val_loss".to_string(), 0.5)].into(),
            class_stats: None,
            kind,
        };
        let shown: Vec<u64> = [
            (p(100, ProgressKind::Sample), at(0)),
            (p(161, ProgressKind::Sample), at(300)),
            (p(200, ProgressKind::Evaluation), at(350)),
            (p(400, ProgressKind::Evaluation), at(700)),
            (p(450, ProgressKind::Sample), at(1100)),
            (p(600, ProgressKind::Final), at(1200)),
        ]
        .into_iter()
        .filter_map(|(p, t)| lines.line(&p, t).map(|_| p.step))
        .collect();
        assert_eq!(shown, [100, 200, 400, 450, 600]);
        let line = progress_line(&p(200, ProgressKind::Evaluation), at(1500));
        assert_eq!(line, "step    200/600  eval  val_loss 0.50000  [1.5s]");
    }

    #[test]
    fn parses_worker_and_subcommands() {
        let cli = Cli::try_parse_from(["msae-worker", "--coordinator", "http://h:1", "--gpu", "0"])
            .unwrap();
        assert_eq!(cli.worker.coordinator.as_deref(), Some("http://h:1"));
        assert_eq!(cli.worker.device.gpu, Some(0));
        let cli =
            Cli::try_parse_from(["msae-worker", "train", "--config", "t.yaml", "--json"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Train(TrainArgs { json: true, .. }))));
        let err =
            Cli::try_parse_from(["msae-worker", "--gpu", "0", "--cpu"]).unwrap_err().to_string();
        assert!(err.contains("cannot be used with"), "{err}");
        let err = Cli::try_parse_from(["msae-worker", "--gpu", "zero"]).unwrap_err().to_string();
        assert!(err.contains("--gpu"), "{err}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn gpu_without_cuda_build_fails_clearly() {
        let err = check_device(&DeviceArgs { gpu: Some(0), cpu: false }).unwrap_err().to_string();
        assert!(err.contains("built without CUDA support"), "{err}");
        assert!(err.contains("--features cuda"), "{err}");
        check_device(&DeviceArgs::default()).unwrap();
    }

    #[test]
    fn missing_config_file_is_named() {
        let err = read_config(std::path::Path::new("/nonexistent/trial.yaml")).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/trial.yaml"), "{err:#}");
    }
}
