//! Command-line front end of `msae-coordinator`: run a sweep, `report`, `bench`.
//!
//! Kept in the library so tests drive the same code the binary runs.

use crate::model::{SweepRecord, TrialRecord};
use crate::report::{
    ConfigColumns, MetricColumns, Report, ReportFormat, ReportOptions, pick_sweep,
};
use crate::run::{RunOptions, run_sweep};
use crate::store::{Store, StoreError};
use anyhow::Context;
use msae_shared::signal::print_stdout;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `msae-coordinator`: runs hyperparameter sweeps of modular sparse autoencoders.
///
/// `msae-coordinator SWEEP.yaml` expands the sweep, leases its trials over gRPC to workers (one
/// embedded local worker by default), stores every trial in the database and prints the ranked
/// results. Running it again on the same database resumes the sweep: finished trials are not
/// rerun. Remote workers join with `msae-worker --coordinator http://HOST:PORT`.
#[derive(Debug, clap::Parser)]
#[command(name = "msae-coordinator", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Ranked results of a sweep (reads the database, or asks the running coordinator).
    Report(ReportArgs),
    /// The sweeps in a database, with their trials per state.
    List(crate::manage::ListArgs),
    /// Delete a sweep and all its trials from a database (asks for --yes).
    Delete(crate::manage::DeleteArgs),
    /// Write a completed trial's weights, config and metrics into a directory.
    Export(crate::export::ExportArgs),
    /// What a running coordinator is doing: workers, trials per state, best so far.
    Status(crate::manage::StatusArgs),
    /// Orchestration benchmark: no-op trials through real gRPC and durable redb commits.
    Bench(crate::bench::BenchArgs),
    /// Ask a running coordinator's grpc.health.v1 service: exit 0 when it is SERVING, 1 with
    /// the reason otherwise (an exec probe for Kubernetes when the port serves TLS).
    Health(crate::health::HealthArgs),
}

/// Options of a sweep run.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Sweep YAML file (see sweeps/stripes.yaml).
    #[arg(value_name = "SWEEP.yaml")]
    pub sweep: Option<PathBuf>,
    /// Database file holding every sweep and trial.
    #[arg(long, env = "MSAE_DB", default_value = "msae.redb")]
    pub db: PathBuf,
    /// Address of the gRPC service. Use 0.0.0.0:50051 for remote workers (with --token).
    #[arg(long, env = "MSAE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Workers run inside this process; 0 = remote workers only.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub local_workers: usize,
    /// Local workers train on CUDA device N (needs `--features msae-worker/cuda`).
    #[arg(long, value_name = "N")]
    pub gpu: Option<usize>,
    /// Memory the local workers may keep loaded datasets in between trials, in MiB; they share
    /// one cache, so two local workers hold one copy (0 = read the data for every trial).
    #[arg(long, value_name = "MIB", default_value_t = 4096)]
    pub data_cache_mb: usize,
    /// TensorBoard log directory (`tensorboard --logdir runs`); `none` disables it.
    #[arg(long, default_value = "runs")]
    pub logdir: String,
    /// Local workers also keep each trial's files on their side under DIR/<sweep>/<trial>
    /// (the coordinator keeps them beside the database either way; see keep_weights).
    #[arg(long, value_name = "DIR")]
    pub artifacts: Option<PathBuf>,
    /// The largest trial file (weights) a worker may upload, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = crate::run::DEFAULT_MAX_UPLOAD_MB,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_upload_mb: u64,
    /// Start a new sweep even if one of the same name with another definition exists
    /// (stored as NAME-2, NAME-3, ...).
    #[arg(long)]
    pub new_sweep: bool,
    /// Shared secret workers must send (`authorization: Bearer TOKEN`). Required to listen
    /// on a non-loopback address (unless --insecure).
    #[arg(long, env = "MSAE_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    pub token: Option<String>,
    /// Read the token from FILE (keeps it out of process listings and the environment).
    #[arg(long, value_name = "FILE", env = "MSAE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Listen on a non-loopback address without a token: anyone who reaches the port can take
    /// and report trials.
    #[arg(long)]
    pub insecure: bool,
    /// Serve TLS with this certificate (PEM, with --tls-key); workers then use https:// URLs
    /// and --tls-ca.
    #[arg(long, value_name = "FILE", env = "MSAE_TLS_SERVER_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", env = "MSAE_TLS_SERVER_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM) from workers and clients.
    #[arg(long, value_name = "FILE", env = "MSAE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// A lease expires when its worker has not reported for this long; its trial is re-leased.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// Server-side deadline of every call (or the client's grpc-timeout, when shorter); a call
    /// past it is answered deadline_exceeded. Lease and Complete may wait up to 60 s for a trial
    /// before it starts to count (a longer wait asked for is cut to 60 s). A Report ends when its
    /// client reads nothing for this long. Uploads have --upload-idle-timeout instead.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub rpc_timeout: Duration,
    /// An upload of trial files ends (deadline_exceeded; the partial files are removed, the
    /// lease stays) when the worker sends nothing for this long. An upload as a whole has no
    /// limit: large weights take minutes.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub upload_idle_timeout: Duration,
    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
    /// Don't print the ranked report at the end.
    #[arg(long)]
    pub no_report: bool,
    /// Print one JSON line with trials, wall and CPU seconds at exit (used by `bench`).
    #[arg(long, hide = true)]
    pub print_stats: bool,
}

pub use msae_shared::tls::TlsArgs;

/// Options of `msae-coordinator report`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// Database file.
    #[arg(long, env = "MSAE_DB", default_value = "msae.redb")]
    pub db: PathBuf,
    /// Sweep to report (default: the most recently created).
    #[arg(long)]
    pub sweep: Option<String>,
    /// Show only the N best trials (N >= 1).
    #[arg(long, value_name = "N", value_parser = parse_top)]
    pub top: Option<usize>,
    /// Rank by this metric instead of the sweep's own (in its natural direction: higher is
    /// better for mmcs, stripe_cluster_match and samples_per_s, lower for the rest).
    #[arg(long, value_name = "NAME")]
    pub metric: Option<String>,
    /// Override the ranking direction.
    #[arg(long, value_enum)]
    pub goal: Option<crate::model::Goal>,
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
    /// Ask this running coordinator instead of opening the database.
    #[arg(long, value_name = "URL")]
    pub coordinator: Option<String>,
    #[command(flatten)]
    pub token: msae_shared::auth::ClientTokenArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Only the Pareto frontier of two metrics, each in its natural direction (e.g. `fvu,l0`:
    /// no listed trial has both a lower FVU and a lower L0 than another), sorted by the second.
    #[arg(long, value_name = "X,Y", value_parser = parse_pair)]
    pub pareto: Option<(String, String)>,
    /// Rank only trials whose L0 lies in [LO, HI]: SAEs compare at matched sparsity.
    #[arg(long, value_name = "LO:HI", value_parser = parse_band)]
    pub l0_band: Option<(f64, f64)>,
    /// Metrics to show: `key` (the ranking metric and the key standard metrics; the table's
    /// default), `all` (every metric the trials reported; the default for csv and json), or
    /// names separated by commas (with the ranking metric). Columns keep one order: the metric
    /// table's, then other metrics alphabetically.
    #[arg(long, value_name = "key|all|A,B,..", value_parser = MetricColumns::parse)]
    pub metrics: Option<MetricColumns>,
    /// How much of each trial's config to show: `swept` (the swept parameters; the table's
    /// default) or `full` (every other setting too, as config.PATH columns; the default for csv
    /// and json).
    #[arg(long, value_enum)]
    pub config: Option<ConfigColumns>,
    /// Also draw the sweep into FILE (.svg or .png): the metric against each swept parameter,
    /// the frontier of the --pareto metrics (default fvu,l0) and the --top trials (default 10)
    /// in parallel coordinates.
    #[arg(long, value_name = "FILE", value_parser = crate::report::plot::parse_target)]
    pub plot: Option<PathBuf>,
}

/// `--pareto X,Y`: two metric names.
fn parse_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once(',') {
        Some((x, y)) if !x.trim().is_empty() && !y.trim().is_empty() && x.trim() != y.trim() => {
            Ok((x.trim().to_string(), y.trim().to_string()))
        }
        _ => Err(format!("`{text}` is not two different metric names as X,Y (e.g. fvu,l0)")),
    }
}

/// `--l0-band LO:HI`: finite bounds with LO <= HI.
fn parse_band(text: &str) -> Result<(f64, f64), String> {
    let bad = || format!("`{text}` is not a band LO:HI of L0 values (e.g. 8:16)");
    let (lo, hi) = text.split_once(':').ok_or_else(bad)?;
    let (lo, hi): (f64, f64) =
        (lo.trim().parse().map_err(|_| bad())?, hi.trim().parse().map_err(|_| bad())?);
    if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
        return Err(bad());
    }
    Ok((lo, hi))
}

/// `--top N`: a count of at least one (`--top 0` would show no trial at all).
fn parse_top(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1 (leave --top out to show every trial)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{text}` is not a number of trials")),
    }
}

/// Parses `90`, `90s`, `500ms`, `30m`, `2h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (examples: 90s, 500ms, 30m, 2h)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("`{text}`: unknown unit `{unit}` (use ms, s, m or h)")),
    };
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(format!("`{text}` must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// `msae-coordinator SWEEP.yaml`.
pub async fn run_command(args: &RunArgs) -> anyhow::Result<SweepExit> {
    let Some(sweep) = &args.sweep else {
        anyhow::bail!(
            "no sweep file given: try `msae-coordinator sweeps/stripes.yaml` (see --help)"
        );
    };
    if args.local_workers > 0 {
        crate::embedded::check_device(args.gpu)?;
        crate::embedded::set_data_cache_mb(args.data_cache_mb);
    }
    let mut opts = RunOptions::new(sweep);
    opts.db = args.db.clone();
    opts.listen = args.listen;
    opts.local_workers = args.local_workers;
    opts.local_gpu = args.gpu;
    opts.logdir = (args.logdir != "none").then(|| PathBuf::from(&args.logdir));
    opts.artifacts = args.artifacts.clone();
    opts.new_sweep = args.new_sweep;
    opts.token = msae_shared::auth::resolve(args.token.as_deref(), args.token_file.as_deref())?;
    check_exposure(args.listen, opts.token.is_some(), args.insecure)?;
    opts.tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(msae_shared::tls::ServerTls {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.tls_client_ca.clone(),
        }),
        _ => None,
    };
    opts.lease_ttl = args.lease_ttl;
    opts.limits = crate::service::Limits {
        rpc: args.rpc_timeout,
        upload_idle: args.upload_idle_timeout,
        ..crate::service::Limits::default()
    };
    opts.max_upload = args.max_upload_mb << 20;
    opts.progress = !args.quiet;
    opts.report = !args.no_report;
    let started = std::time::Instant::now();
    let summary = run_sweep(opts, msae_shared::signal::shutdown_signal()).await?;
    if args.print_stats {
        let stats = serde_json::json!({
            "sweep": summary.sweep,
            "completed": summary.counts.completed,
            "pruned": summary.counts.pruned,
            "failed": summary.counts.failed,
            "wall_s": started.elapsed().as_secs_f64(),
            "cpu_s": msae_shared::signal::process_cpu_seconds(),
            "commits": summary.commits,
            // From the last trial's end to here, and the CPU spent up to it.
            "shutdown_s": summary.done.map(|(at, _)| at.elapsed().as_secs_f64()),
            "done_cpu_s": summary.done.map(|(_, cpu)| cpu),
        });
        print_stdout(&stats.to_string())?;
    }
    if !summary.finished {
        eprintln!(
            "sweep {} stopped with {} of {} trials done; run the same command again to resume",
            summary.sweep,
            summary.counts.completed + summary.counts.pruned + summary.counts.failed,
            summary.counts.total
        );
    } else if summary.counts.failed > 0 {
        eprintln!(
            "sweep {}: {} of {} trials failed (their reasons are in the report)",
            summary.sweep, summary.counts.failed, summary.counts.total
        );
    }
    Ok(SweepExit::of(&summary))
}

/// Refuses to serve a non-loopback address without a token (unless `--insecure`): an open port
/// lets anyone on the network take trials and report results.
pub fn check_exposure(listen: SocketAddr, has_token: bool, insecure: bool) -> anyhow::Result<()> {
    if listen.ip().is_loopback() || has_token {
        return Ok(());
    }
    if insecure {
        tracing::warn!(%listen, "listening without a token (--insecure): anyone who reaches this port can take and report trials");
        return Ok(());
    }
    anyhow::bail!(
        "refusing to listen on {listen} without a token: anyone who reaches the port could take \
         and report trials. Set one with --token-file FILE (or MSAE_TOKEN) and give workers the \
         same, or pass --insecure on a trusted network"
    )
}

/// How a sweep run ended, as the process exit status says it (documented in the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepExit {
    /// 0: finished, every trial completed (or was pruned by early termination).
    Completed,
    /// 3: finished, some trials failed and some completed (or were pruned).
    SomeFailed,
    /// 4: finished, no trial completed or was pruned.
    AllFailed,
    /// 5: stopped before the end (Ctrl-C, SIGTERM); run again to resume.
    Stopped,
}

impl SweepExit {
    /// The exit of a run that ended with `summary`.
    pub fn of(summary: &crate::run::RunSummary) -> SweepExit {
        let c = &summary.counts;
        if !summary.finished {
            SweepExit::Stopped
        } else if c.failed == 0 {
            SweepExit::Completed
        } else if c.completed + c.pruned == 0 {
            SweepExit::AllFailed
        } else {
            SweepExit::SomeFailed
        }
    }

    /// The process exit status.
    pub fn code(self) -> u8 {
        match self {
            SweepExit::Completed => 0,
            SweepExit::SomeFailed => 3,
            SweepExit::AllFailed => 4,
            SweepExit::Stopped => 5,
        }
    }
}

/// `msae-coordinator report`: the rendered report, from the database file, or from the
/// coordinator that holds it (which renders it).
pub async fn report_command(args: &ReportArgs) -> anyhow::Result<String> {
    if args.pareto.is_some() || args.l0_band.is_some() || args.plot.is_some() {
        return narrowed_report(args).await;
    }
    if let Some(url) = &args.coordinator {
        return ask_coordinator(url, args).await;
    }
    if !args.db.exists() {
        anyhow::bail!("no such database {} (run a sweep first, or pass --db)", args.db.display());
    }
    let options = report_options(args);
    let db = args.db.clone();
    let sweep = args.sweep.clone();
    // The configs are most of a record: read only when the report shows them.
    let configs = options.columns.config == ConfigColumns::Full;
    let opened =
        tokio::task::spawn_blocking(move || read_store(&db, sweep.as_deref(), configs)).await?;
    let (sweep, trials) = match opened {
        Ok(found) => found,
        Err(ReadError::Store(StoreError::InUse { path })) => {
            let url = crate::run::running_url(&path)?;
            tracing::debug!("database in use: asking the coordinator at {url}");
            return ask_coordinator(&url, args).await;
        }
        Err(ReadError::Store(e)) => return Err(e.into()),
        Err(ReadError::NoSweep(why)) => anyhow::bail!("{why} in {}", args.db.display()),
    };
    let report = Report::for_sweep(&sweep, &trials, &options).map_err(anyhow::Error::msg)?;
    Ok(report.render(args.format))
}

/// What `args` asks the report to rank by and show.
fn report_options(args: &ReportArgs) -> ReportOptions {
    ReportOptions {
        top: args.top,
        metric: args.metric.clone(),
        goal: args.goal,
        columns: crate::report::Columns::for_format(args.format, args.metrics.clone(), args.config),
    }
}

/// A report narrowed (`--l0-band`, `--pareto`) or drawn (`--plot`) here: from the whole report
/// with every metric (as JSON, wherever it comes from), which narrowing and the plot need
/// whatever the rendered report shows.
async fn narrowed_report(args: &ReportArgs) -> anyhow::Result<String> {
    let columns = report_options(args).columns;
    let whole = ReportArgs {
        top: None,
        format: ReportFormat::Json,
        pareto: None,
        l0_band: None,
        plot: None,
        metrics: Some(MetricColumns::All),
        config: Some(columns.config),
        ..args.clone()
    };
    let json = Box::pin(report_command(&whole)).await?;
    let mut report: Report = serde_json::from_str(&json).context("reading the report")?;
    columns
        .metrics
        .check(&report.metric, &report.reported_metrics())
        .map_err(anyhow::Error::msg)?;
    if let Some((lo, hi)) = args.l0_band {
        report.within(crate::report::L0, lo, hi).map_err(anyhow::Error::msg)?;
    }
    // The plot draws every trial; the frontier is taken first, so metrics it cannot use are
    // refused before a file is written.
    let whole = args.plot.as_ref().map(|_| report.clone());
    if let Some((x, y)) = &args.pareto {
        report.pareto(x, y).map_err(anyhow::Error::msg)?;
    }
    if let (Some(path), Some(whole)) = (&args.plot, &whole) {
        let options =
            crate::report::plot::PlotOptions { top: args.top, frontier: args.pareto.clone() };
        let drawn = crate::report::plot::write(whole, path, &options)?;
        eprintln!("plot of {} written to {}", drawn, path.display());
    }
    report.keep_metrics(&columns.metrics);
    if let Some(n) = args.top {
        report.rows.truncate(n);
    }
    Ok(report.render(args.format))
}

/// Why the database file gave no report.
enum ReadError {
    Store(StoreError),
    NoSweep(String),
}

impl From<StoreError> for ReadError {
    fn from(e: StoreError) -> Self {
        ReadError::Store(e)
    }
}

/// The sweep to report (named, or the latest) and its trials, read from the file.
fn read_store(
    db: &std::path::Path,
    sweep: Option<&str>,
    configs: bool,
) -> Result<(SweepRecord, Vec<TrialRecord>), ReadError> {
    let store = Store::open_read_only(db)?;
    let sweeps = store.sweeps()?;
    let sweep = pick_sweep(&sweeps, sweep).map_err(ReadError::NoSweep)?.clone();
    let trials = if configs {
        store.trials(&sweep.name)?
    } else {
        store.trials_without_configs(&sweep.name)?
    };
    Ok((sweep, trials))
}

/// The report, ranked and rendered by the coordinator at `url`, streamed in pieces.
async fn ask_coordinator(url: &str, args: &ReportArgs) -> anyhow::Result<String> {
    let query = crate::service::ReportQuery {
        sweep: args.sweep.clone(),
        metric: args.metric.clone(),
        goal: args.goal,
        top: args.top,
        records: false,
        format: args.format,
        metrics: args.metrics.clone(),
        config: args.config,
    };
    crate::service::report::fetch_text(
        url,
        &query,
        args.token.resolve()?.as_deref(),
        &args.tls.client(),
    )
    .await
}

/// The whole `msae-coordinator` program (the binary and the end-to-end tests call this).
pub fn main() -> std::process::ExitCode {
    let cli = <Cli as clap::Parser>::parse();
    let local_workers = match &cli.command {
        None => cli.run.local_workers,
        Some(Command::Bench(crate::bench::BenchArgs {
            what: Some(crate::bench::BenchWhat::Prune(prune)),
            ..
        })) => prune.workers,
        Some(_) => 0,
    };
    if local_workers > 1 && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Several local workers share the cores; candle's element-wise pool spins on a barrier
        // and collapses when oversubscribed (15 s instead of 1.8 s for a small trial).
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    if local_workers > 1 {
        // Likewise the hand-written trainers' helper thread, which spins between sections.
        msae_worker::sae::share_the_cores();
    }
    if matches!(cli.command, Some(Command::Bench(_))) {
        msae_shared::logging::init_with_default("warn");
    } else if cli.command.is_none() && !cli.run.quiet && std::io::stderr().is_terminal() {
        // The live status line owns the terminal: per-trial logs of the embedded workers
        // would break it (RUST_LOG still overrides).
        msae_shared::logging::init_with_default("info,msae_worker=warn");
    } else {
        msae_shared::logging::init();
    }
    let result = match &cli.command {
        Some(Command::Bench(args)) => crate::bench::run(args).map(|()| SweepExit::Completed),
        Some(Command::List(args)) => crate::manage::list(args)
            .and_then(|text| print_stdout(text.trim_end()).map_err(anyhow::Error::from))
            .map(|()| SweepExit::Completed),
        Some(Command::Delete(args)) => crate::manage::delete(args)
            .and_then(|text| print_stdout(text.trim_end()).map_err(anyhow::Error::from))
            .map(|()| SweepExit::Completed),
        other => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| {
                rt.block_on(async {
                    match other {
                        Some(Command::Export(args)) => {
                            print_stdout(&crate::export::export(args).await?)?;
                            Ok(SweepExit::Completed)
                        }
                        Some(Command::Status(args)) => {
                            print_stdout(crate::manage::status(args).await?.trim_end())?;
                            Ok(SweepExit::Completed)
                        }
                        Some(Command::Health(args)) => {
                            print_stdout(&crate::health::check(args).await?)?;
                            Ok(SweepExit::Completed)
                        }
                        Some(Command::Report(args)) => {
                            let text = crate::cli::report_command(args).await?;
                            // Not println!: `report | head -1` closes the pipe early.
                            print_stdout(text.trim_end())?;
                            Ok(SweepExit::Completed)
                        }
                        _ => crate::cli::run_command(&cli.run).await,
                    }
                })
            }),
    };
    let result = match result {
        Ok(exit) if exit != SweepExit::Completed => {
            return std::process::ExitCode::from(exit.code());
        }
        other => other.map(|_| ()),
    };
    msae_shared::signal::exit_code(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_ports_need_a_token_or_insecure() {
        let any: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let e = check_exposure(any, false, false).unwrap_err().to_string();
        assert!(
            e.contains("refusing to listen on 0.0.0.0:50051") && e.contains("--token-file"),
            "{e}"
        );
        check_exposure(any, true, false).unwrap();
        check_exposure(any, false, true).unwrap();
        check_exposure(local, false, false).unwrap();
        check_exposure("[::1]:1".parse().unwrap(), false, false).unwrap();
        let both = <Cli as clap::Parser>::try_parse_from([
            "msae-coordinator",
            "s.yaml",
            "--token",
            "a",
            "--token-file",
            "f",
        ]);
        assert!(both.unwrap_err().to_string().contains("cannot be used with"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("5 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("abc").unwrap_err().contains("not a duration"));
        assert!(parse_duration("0s").is_err());
    }

    #[test]
    fn cli_parses_defaults_and_rejects_bad_flags() {
        use clap::Parser;
        let cli = Cli::try_parse_from(["msae-coordinator", "sweeps/stripes.yaml"]).unwrap();
        assert_eq!(cli.run.local_workers, 1);
        assert_eq!(cli.run.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(cli.run.db, PathBuf::from("msae.redb"));
        let err = Cli::try_parse_from(["msae-coordinator", "x.yaml", "--local-workers", "many"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--local-workers"), "{err}");
        let err = Cli::try_parse_from(["msae-coordinator", "x.yaml", "--listen", "nowhere"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--listen"), "{err}");
        let cli = Cli::try_parse_from(["msae-coordinator", "report", "--format", "csv"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Report(ReportArgs { format: ReportFormat::Csv, .. }))
        ));
    }

    /// Item 12a: `--top 0` is a usage error, not an empty report.
    #[test]
    fn top_zero_is_refused() {
        use clap::Parser;
        let err = Cli::try_parse_from(["msae-coordinator", "report", "--top", "0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--top") && err.contains("at least 1"), "{err}");
        let cli = Cli::try_parse_from(["msae-coordinator", "report", "--top", "3"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Report(ReportArgs { top: Some(3), .. }))));
    }

    fn report_args(db: &std::path::Path) -> ReportArgs {
        ReportArgs {
            db: db.to_path_buf(),
            sweep: None,
            top: None,
            metric: None,
            goal: None,
            format: ReportFormat::Table,
            coordinator: None,
            token: Default::default(),
            tls: Default::default(),
            pareto: None,
            l0_band: None,
            metrics: None,
            config: None,
            plot: None,
        }
    }

    #[test]
    fn pareto_and_band_flags_are_checked() {
        use clap::Parser;
        let ok = Cli::try_parse_from(["m", "report", "--pareto", "fvu, l0", "--l0-band", "8:16"])
            .unwrap();
        let Some(Command::Report(r)) = ok.command else { panic!("not a report") };
        assert_eq!(r.pareto, Some(("fvu".into(), "l0".into())));
        assert_eq!(r.l0_band, Some((8.0, 16.0)));
        for bad in [
            ["--pareto", "fvu"],
            ["--pareto", "fvu,fvu"],
            ["--l0-band", "16:8"],
            ["--l0-band", "a:b"],
        ] {
            let e = Cli::try_parse_from(["m", "report", bad[0], bad[1]]).unwrap_err().to_string();
            assert!(e.contains(bad[1]), "{e}");
        }
    }

    /// Issue 10: `--metrics`, `--config` and `--plot` are read, and a plot file whose
    /// extension names no format is refused before anything runs.
    #[test]
    fn column_and_plot_flags_are_checked() {
        use clap::Parser;
        let parsed = |args: &[&str]| match Cli::try_parse_from(["m", "report"].iter().chain(args)) {
            Ok(Cli { command: Some(Command::Report(r)), .. }) => Ok(r),
            Ok(_) => panic!("not a report"),
            Err(e) => Err(e.to_string()),
        };
        let r = parsed(&["--metrics", "l0, fvu", "--config", "full", "--plot", "s.svg"]).unwrap();
        assert_eq!(r.metrics, Some(MetricColumns::Pick(vec!["l0".into(), "fvu".into()])));
        assert_eq!((r.config, r.plot), (Some(ConfigColumns::Full), Some(PathBuf::from("s.svg"))));
        assert_eq!(parsed(&["--metrics", "all"]).unwrap().metrics, Some(MetricColumns::All));
        let r = parsed(&[]).unwrap();
        assert_eq!((r.metrics, r.config, r.plot), (None, None, None));
        let e = parsed(&["--plot", "sweep.jpg"]).unwrap_err();
        assert!(e.contains("cannot plot to a .jpg file (`sweep.jpg`)"), "{e}");
        let e = parsed(&["--config", "everything"]).unwrap_err();
        assert!(e.contains("everything") && e.contains("swept"), "{e}");
        let e = parsed(&["--metrics", ","]).unwrap_err();
        assert!(e.contains("--metrics"), "{e}");
    }

    /// `report --plot` on a database file writes both formats, with a panel per swept
    /// parameter, and still prints the report.
    #[tokio::test]
    async fn report_plots_a_stored_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("s.redb");
        let yaml = crate::bench::report::report_bench_yaml("s", 20);
        crate::bench::report::fill_store(&db, &yaml, 20).unwrap();
        for name in ["s.svg", "s.png"] {
            let path = dir.path().join(name);
            let args = ReportArgs {
                plot: Some(path.clone()),
                format: ReportFormat::Csv,
                ..report_args(&db)
            };
            let csv = report_command(&args).await.unwrap();
            assert_eq!(csv.lines().count(), 21, "{csv}");
            assert!(csv.starts_with("rank,trial,layer_k,lr,seed,fvu,mse,l0,"), "{csv}");
            let bytes = std::fs::read(&path).unwrap();
            assert!(bytes.len() > 20_000, "{name}: {} bytes", bytes.len());
            if name.ends_with(".svg") {
                let svg = String::from_utf8(bytes).unwrap();
                for p in ["layer_k", "lr", "seed"] {
                    assert!(svg.contains(&format!("\nfvu vs {p} (20 trials)\n")), "{p}: {svg}");
                }
                assert!(svg.contains("\nlr, log scale\n"), "lr is log_uniform_values");
            } else {
                assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
            }
        }
    }

    /// Item 12b: an error prints each cause once, as the binary prints it.
    #[tokio::test]
    async fn report_errors_name_their_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let chain = |e: anyhow::Error| msae_shared::signal::error_chain(&*e);
        let missing = report_command(&report_args(&dir.path().join("no.redb"))).await;
        let missing = chain(missing.unwrap_err());
        assert_eq!(missing.matches("no such database").count(), 1, "{missing}");
        let is_dir = chain(report_command(&report_args(dir.path())).await.unwrap_err());
        assert_eq!(is_dir.matches("Is a directory").count(), 1, "{is_dir}");
    }
}
