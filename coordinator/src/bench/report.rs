//! `msae-coordinator bench report`: how long `report` takes on a large stored sweep, both ways.
//!
//! Writes a sweep of N completed trials (records the size a real trial's are: full trial
//! config, a dozen metrics) into a temporary redb file, then times `report` as a user runs it:
//! first opening the file (no coordinator), then beside a coordinator started on that file as a
//! child process (this binary, no workers, so it keeps running with one trial queued), once
//! through the address file as plain `report --db` does and once with `--coordinator URL`.
//! Every run builds and renders the whole table (no `--top`), the worst case.

use crate::cli::{ReportArgs, report_command};
use crate::model::{SweepRecord, TrialRecord, TrialStatus, now_ms};
use crate::report::ReportFormat;
use crate::search::Proposal;
use crate::spec::SweepSpec;
use crate::store::{Store, WriteBatch};
use anyhow::Context;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Options of `msae-coordinator bench report`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportBenchArgs {
    /// Completed trials in the stored sweep.
    #[arg(long, default_value_t = 100_000)]
    pub trials: usize,
    /// Timed runs of each path; the best and the median are shown.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Print one JSON object per path instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write the sweep and database into DIR and keep them (to profile `report` on them).
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
}

/// The timings of one path.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReportBenchResult {
    pub path: &'static str,
    pub trials: usize,
    pub best_s: f64,
    pub median_s: f64,
    /// Bytes of the rendered table.
    pub output_bytes: usize,
}

/// Builds the sweep, times both paths, prints the results.
pub fn run(args: &ReportBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.trials > 0 && args.runs > 0, "--trials and --runs must be positive");
    let dir = match &args.keep {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("msae-bench-report-{}", std::process::id())),
    };
    if args.keep.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&dir, args);
    if args.keep.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let results = result?;
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(
            out,
            "{:<22} {:>8} {:>8} {:>10} {:>12}",
            "path", "trials", "best_s", "median_s", "output_MB"
        )?;
    }
    for r in &results {
        if args.json {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        } else {
            writeln!(
                out,
                "{:<22} {:>8} {:>8.3} {:>10.3} {:>12.1}",
                r.path,
                r.trials,
                r.best_s,
                r.median_s,
                r.output_bytes as f64 / 1e6
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

fn run_in(dir: &Path, args: &ReportBenchArgs) -> anyhow::Result<Vec<ReportBenchResult>> {
    let sweep_file = dir.join("report-bench.yaml");
    let db = dir.join("report-bench.redb");
    // One point more than is stored: the coordinator started on the file has a trial left to
    // hand out, so it keeps running (no workers) until it is killed.
    let yaml = report_bench_yaml("report-bench", args.trials + 1);
    std::fs::write(&sweep_file, &yaml)?;
    let started = Instant::now();
    let _ = std::fs::remove_file(&db);
    fill_store(&db, &yaml, args.trials)?;
    tracing::info!(trials = args.trials, secs = started.elapsed().as_secs_f64(), "store written");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report_args = |coordinator: Option<String>| ReportArgs {
        db: db.clone(),
        sweep: None,
        top: None,
        metric: None,
        goal: None,
        format: ReportFormat::Table,
        coordinator,
        token: Default::default(),
        tls: Default::default(),
        pareto: None,
        l0_band: None,
        metrics: None,
        config: None,
        plot: None,
    };
    let mut results = vec![time_path(&runtime, "file", &report_args(None), args)?];

    let exe = std::env::current_exe().context("locating this binary")?;
    let mut child = std::process::Command::new(exe)
        .arg(&sweep_file)
        .arg("--db")
        .arg(&db)
        .args(["--listen", "127.0.0.1:0", "--local-workers", "0", "--logdir", "none"])
        .args(["--quiet", "--no-report"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the coordinator")?;
    let grpc = (|| {
        let addr = wait_for_address(&db, &mut child)?;
        let auto = time_path(&runtime, "grpc (report --db)", &report_args(None), args)?;
        let url = format!("http://{addr}");
        let explicit = time_path(&runtime, "grpc (--coordinator)", &report_args(Some(url)), args)?;
        anyhow::Ok([auto, explicit])
    })();
    let _ = child.kill();
    let _ = child.wait();
    results.extend(grpc?);
    Ok(results)
}

/// A random noop sweep of `planned` trials. Random, not grid: a grid of more than 100,000
/// points is refused before it starts (every point is checked), a random search checks its
/// parameters' edges only.
pub fn report_bench_yaml(name: &str, planned: usize) -> String {
    format!(
        "name: {name}\nmethod: random\nrun_cap: {planned}\nmax_attempts: 3\n\
         task: {{kind: noop, sleep_ms: 0}}\nmetric: {{name: fvu, goal: minimize}}\nparameters:\n\
         \x20 lr: {{distribution: log_uniform_values, min: 1.0e-4, max: 1.0e-2}}\n\
         \x20 layer_k: {{distribution: int_uniform, min: 1, max: 10}}\n\
         \x20 seed: {{distribution: int_uniform, min: 0, max: 1000000}}\n"
    )
}

/// Times `args.runs` reports (after one untimed warm-up run).
fn time_path(
    runtime: &tokio::runtime::Runtime,
    path: &'static str,
    report: &ReportArgs,
    args: &ReportBenchArgs,
) -> anyhow::Result<ReportBenchResult> {
    let mut times = Vec::with_capacity(args.runs);
    let mut output_bytes = 0;
    for i in 0..=args.runs {
        let started = Instant::now();
        let text = runtime.block_on(report_command(report))?;
        let secs = started.elapsed().as_secs_f64();
        // A title line, a header line, a line per trial.
        let rows = text.lines().count().saturating_sub(2);
        anyhow::ensure!(rows == args.trials, "{path}: {rows} rows for {} trials", args.trials);
        output_bytes = text.len();
        if i > 0 {
            times.push(secs);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(ReportBenchResult {
        path,
        trials: args.trials,
        best_s: times[0],
        median_s: times[times.len() / 2],
        output_bytes,
    })
}

/// Writes the sweep record and `trials` completed trials, the search's first points in order
/// (so the coordinator resumes them), in a few large commits. Also sets up the end-to-end
/// tests of large reports.
pub fn fill_store(db: &Path, yaml: &str, trials: usize) -> anyhow::Result<()> {
    let spec = SweepSpec::parse(yaml, "report-bench.yaml")?;
    let mut strategy = crate::search::make_strategy(&spec);
    let store = Store::open(db)?;
    let now = now_ms();
    let mut batch = WriteBatch::new();
    batch.put_sweep(&SweepRecord {
        name: spec.name.clone(),
        yaml: yaml.to_string(),
        fingerprint: spec.fingerprint(),
        created_ms: now,
        proposed: trials as u64,
        finished: false,
        uid: Some(SweepRecord::new_uid()),
    });
    // Every trial carries a full trial config, as real ones do (the bulk of a record).
    let mut config = None;
    for i in 0..trials {
        let Proposal::Point(p) = strategy.propose() else {
            anyhow::bail!("the bench grid ended after {i} points");
        };
        if config.is_none() {
            config = Some(spec.trial_config(&p.params)?);
        }
        let config = config.clone().unwrap_or_default();
        batch.put_trial(&trial(&spec.name, p.index, p.params, config, now));
        if batch.len() >= 10_000 {
            store.write(&batch)?;
            batch = WriteBatch::new();
        }
    }
    store.write(&batch)?;
    Ok(())
}

fn trial(
    sweep: &str,
    index: u64,
    params: crate::scheduler::Params,
    config: serde_json::Value,
    now: u64,
) -> TrialRecord {
    use msae_shared::metrics as m;
    // Deterministic, distinct values so the ranking sorts real numbers.
    let x = ((index.wrapping_mul(2_654_435_761) % 1_000_003) as f64) / 1_000_003.0;
    let metrics = [
        (m::FVU, 0.05 + 0.5 * x),
        (m::MSE, 0.01 + 0.1 * x),
        (m::L0, 8.0 + 32.0 * x),
        (m::DEAD_NEURONS, 0.1 * x),
        (m::MMCS, 0.9 - 0.3 * x),
        (m::ACTIVE_STRIPES, 4.0),
        ("train_loss", 0.02 + x),
        ("steps", 600.0),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    TrialRecord {
        sweep: sweep.to_string(),
        index,
        params,
        config: config.into(),
        status: TrialStatus::Completed,
        attempt: 1,
        lease: None,
        step: 600,
        metrics,
        progress: Default::default(),
        curve: Vec::new(),
        errors: Vec::new(),
        worker: Some(format!("bench-{}", index % 16)),
        artifact: None,
        weights: None,
        created_ms: now,
        finished_ms: Some(now),
        duration_s: Some(1.0 + x),
    }
}

/// The coordinator's address, once it has resumed the sweep and written its address file.
fn wait_for_address(db: &Path, child: &mut std::process::Child) -> anyhow::Result<String> {
    let file: PathBuf = crate::run::address_file(db);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(addr) = std::fs::read_to_string(&file)
            && !addr.trim().is_empty()
        {
            return Ok(addr.trim().to_string());
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the coordinator exited before listening: {status}");
        }
        anyhow::ensure!(Instant::now() < deadline, "the coordinator did not start in 5 minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
}
