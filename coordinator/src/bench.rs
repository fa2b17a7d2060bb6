//! `msae-coordinator bench`: the orchestration alone, measured.
//!
//! Starts a real coordinator as a child process (this same binary, a temporary redb file with
//! durable commits, listening on an ephemeral loopback port), then N workers in this process
//! running no-op trials over real gRPC. Reports trials/s and the coordinator's CPU time per
//! trial, read from the child's own accounting so worker CPU is not counted.
//!
//! `msae-coordinator bench report` times the `report` command instead ([`report`]);
//! `msae-coordinator bench prune` measures early termination ([`prune`]).

pub mod prune;
pub mod report;

use anyhow::Context;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Options of `msae-coordinator bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Another benchmark than the orchestration's.
    #[command(subcommand)]
    pub what: Option<BenchWhat>,
    /// Worker counts to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16, 64])]
    pub workers: Vec<usize>,
    /// No-op trials per run (a grid sweep of this many points).
    #[arg(long, default_value_t = 10_000)]
    pub trials: usize,
    /// Spare leases each worker holds (`msae-worker --prefetch`); 0 = one lease at a time.
    #[arg(long, value_name = "N", default_value_t = crate::embedded::DEFAULT_PREFETCH)]
    pub prefetch: usize,
    /// Print one JSON object per run instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The other benchmarks of `msae-coordinator bench`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchWhat {
    /// `report` on a large stored sweep: from the database file, and over gRPC from a
    /// coordinator running on it.
    Report(report::ReportBenchArgs),
    /// Early termination: one sweep without `early_terminate` and under each rule; training
    /// steps executed and the best metric found.
    Prune(prune::PruneBenchArgs),
}

/// One measured run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub workers: usize,
    pub trials: u64,
    /// From the workers' start to the last trial's end.
    pub wall_s: f64,
    pub trials_per_s: f64,
    /// The coordinator's CPU up to the last trial's end (start-up included).
    pub coordinator_cpu_s: f64,
    pub cpu_ms_per_trial: f64,
    /// Durable commits per trial (below 1: concurrent results share commits).
    pub commits_per_trial: f64,
    /// The coordinator's peak resident memory (VmHWM), MiB.
    pub peak_rss_mib: f64,
    /// Seconds from the workers' start until the coordinator knew every one of them (their
    /// connections and registrations), and trials finished by then. None when no sample saw
    /// them all.
    pub startup_s: Option<f64>,
    pub startup_trials: Option<u64>,
    /// From the last trial's end until the coordinator exited (dismissing the workers, the
    /// last commit), left out of every other figure.
    pub shutdown_s: f64,
    /// The run after start-up, cut at 1,000, 2,000, 5,000, 10,000... completed trials: is the
    /// rate flat?
    pub windows: Vec<Window>,
}

/// From one checkpoint to the next: throughput, coordinator CPU and memory in that stretch.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Window {
    /// Completed trials at the window's end (the first sample at or past the checkpoint).
    pub upto: u64,
    pub trials_per_s: f64,
    pub cpu_ms_per_trial: f64,
    /// Resident memory at the window's end, MiB.
    pub rss_mib: f64,
}

/// One look at the coordinator process.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    completed: u64,
    /// Workers the coordinator knows.
    workers: usize,
    cpu_s: f64,
    rss_mib: f64,
    peak_rss_mib: f64,
}

/// CPU seconds (user + system) and resident memory (now and peak, MiB) of process `pid`, from
/// /proc. None where there is no /proc (the windows are then left out).
fn process_usage(pid: u32) -> Option<(f64, f64, f64)> {
    let cpu = msae_shared::signal::cpu_seconds_of(pid)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mib = |key: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
    };
    Some((cpu, mib("VmRSS:")?, mib("VmHWM:")?))
}

/// 1,000, 2,000, 5,000, 10,000, ... below `trials`, then `trials`.
fn checkpoints(trials: u64) -> Vec<u64> {
    let mut marks: Vec<u64> = std::iter::successors(Some(1_000u64), |m| m.checked_mul(10))
        .flat_map(|m| [m, 2 * m, 5 * m])
        .take_while(|&m| m < trials)
        .collect();
    marks.push(trials);
    marks
}

/// Samples the coordinator every [`SAMPLE_EVERY`] (completed trials over the Status RPC, CPU
/// and memory from /proc) until `stop` is set; returns the samples.
async fn sample(url: String, pid: u32, stop: tokio::sync::watch::Receiver<bool>) -> Vec<Sample> {
    use msae_shared::proto::{StatusRequest, coordinator_client::CoordinatorClient};
    let mut samples = Vec::new();
    let Ok(mut client) = CoordinatorClient::connect(url).await else { return samples };
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    while !*stop.borrow() {
        tick.tick().await;
        let Ok(reply) = client.status(StatusRequest {}).await else { break };
        let reply = reply.into_inner();
        let Some((cpu_s, rss_mib, peak_rss_mib)) = process_usage(pid) else { break };
        let completed = reply.completed + reply.failed + reply.pruned;
        let workers = reply.workers.len();
        samples.push(Sample {
            at: Instant::now(),
            completed,
            workers,
            cpu_s,
            rss_mib,
            peak_rss_mib,
        });
    }
    samples
}

/// How often [`sample`] looks (a Status call lists every worker: not free at 1,000 of them).
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// The first sample that saw all `workers` registered: where start-up ends (1,000 workers take
/// a while to connect, and are not a cost per trial).
fn all_known(samples: &[Sample], workers: usize) -> Option<Sample> {
    samples.iter().find(|s| s.workers >= workers).copied()
}

/// The windows between checkpoints, from the samples (the first sample at or past each mark);
/// the first window starts at the end of start-up, or at the first sample when no sample saw
/// every worker.
fn windows(samples: &[Sample], workers: usize, trials: u64) -> Vec<Window> {
    let mut out = Vec::new();
    let Some(mut from) = all_known(samples, workers).or(samples.first().copied()) else {
        return out;
    };
    let start = from.completed;
    for mark in checkpoints(trials).into_iter().filter(|&m| m > start) {
        let Some(to) = samples.iter().find(|s| s.completed >= mark) else { break };
        if to.completed <= from.completed {
            continue; // one sample past two marks: already the end of the last window
        }
        let n = to.completed.saturating_sub(from.completed).max(1) as f64;
        out.push(Window {
            upto: to.completed,
            trials_per_s: n / to.at.duration_since(from.at).as_secs_f64().max(1e-9),
            cpu_ms_per_trial: (to.cpu_s - from.cpu_s) * 1000.0 / n,
            rss_mib: to.rss_mib,
        });
        from = *to;
    }
    out
}

/// A grid sweep of exactly `trials` no-op points (lr x layer_k x seed).
/// The benchmark's sweep: `trials` no-op points. It keeps no files (`keep_weights: none`), so it
/// measures leasing and durable commits, as it did before trials uploaded their files.
pub fn bench_sweep_yaml(name: &str, trials: usize) -> String {
    // Factor trials into a grid: seed values fill the rest after a 10 x 10 base.
    let per = trials.div_ceil(100).max(1);
    let mut yaml = format!(
        "name: {name}\nmethod: grid\nrun_cap: {trials}\nmax_attempts: 3\n\
         task: {{kind: noop, sleep_ms: 0}}\nmetric: {{name: fvu, goal: minimize}}\n\
         keep_weights: none\nparameters:\n"
    );
    let lrs: Vec<String> = (1..=10).map(|i| format!("{}", i as f64 * 1e-4)).collect();
    yaml.push_str(&format!("  lr: {{values: [{}]}}\n", lrs.join(", ")));
    let ks: Vec<String> = (1..=10).map(|k| k.to_string()).collect();
    yaml.push_str(&format!("  layer_k: {{values: [{}]}}\n", ks.join(", ")));
    let seeds: Vec<String> = (0..per).map(|s| s.to_string()).collect();
    yaml.push_str(&format!("  seed: {{values: [{}]}}\n", seeds.join(", ")));
    yaml
}

/// Run every configured worker count; prints the results.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    match &args.what {
        Some(BenchWhat::Report(args)) => return report::run(args),
        Some(BenchWhat::Prune(args)) => return prune::run(args),
        None => {}
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let exe = std::env::current_exe().context("locating this binary")?;
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(
            out,
            "{:>8} {:>8} {:>9} {:>10} {:>14} {:>13} {:>9} {:>14}",
            "workers",
            "trials",
            "wall_s",
            "trials/s",
            "coord_cpu_s",
            "cpu_ms/trial",
            "rss_MiB",
            "commits/trial"
        )?;
    }
    for &workers in &args.workers {
        let result = runtime.block_on(run_one(&exe, workers, args.trials, args.prefetch))?;
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&result)?)?;
        } else {
            writeln!(
                out,
                "{:>8} {:>8} {:>9.2} {:>10.0} {:>14.2} {:>13.3} {:>9.1} {:>14.2}",
                result.workers,
                result.trials,
                result.wall_s,
                result.trials_per_s,
                result.coordinator_cpu_s,
                result.cpu_ms_per_trial,
                result.peak_rss_mib,
                result.commits_per_trial,
            )?;
            if let (Some(secs), Some(done)) = (result.startup_s, result.startup_trials) {
                writeln!(
                    out,
                    "{:>8} {:>8} {:>9.2} {:>10}  start-up: every worker known after {done} trials",
                    "", "start", secs, ""
                )?;
            }
            // The stretches between checkpoints after start-up, when there is more than one:
            // a flat rate means the cost per trial does not grow with the sweep.
            for w in result.windows.iter().filter(|_| result.windows.len() > 1) {
                writeln!(
                    out,
                    "{:>8} {:>8} {:>9} {:>10.0} {:>14} {:>13.3} {:>9.1}",
                    "",
                    format!("..{}", w.upto),
                    "",
                    w.trials_per_s,
                    "",
                    w.cpu_ms_per_trial,
                    w.rss_mib,
                )?;
            }
            writeln!(
                out,
                "{:>8} {:>8} {:>9.2} {:>10}  shutdown: from the last trial to exit",
                "", "end", result.shutdown_s, ""
            )?;
        }
        // Each result as soon as it is measured: a run takes a while.
        out.flush()?;
    }
    Ok(())
}

async fn run_one(
    exe: &Path,
    workers: usize,
    trials: usize,
    prefetch: usize,
) -> anyhow::Result<BenchResult> {
    let dir = std::env::temp_dir().join(format!("msae-bench-{}-{workers}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let sweep = dir.join("bench.yaml");
    std::fs::write(&sweep, bench_sweep_yaml(&format!("bench-{workers}"), trials))?;
    let db = dir.join("bench.redb");
    let child = tokio::process::Command::new(exe)
        .arg(&sweep)
        .args(["--db"])
        .arg(&db)
        .args(["--listen", "127.0.0.1:0", "--local-workers", "0", "--logdir", "none"])
        .args(["--quiet", "--no-report", "--print-stats"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting the coordinator")?;
    let addr_file = crate::run::address_file(&db);
    let deadline = Instant::now() + Duration::from_secs(120);
    let addr = loop {
        if let Ok(addr) = std::fs::read_to_string(&addr_file)
            && !addr.trim().is_empty()
        {
            break addr.trim().to_string();
        }
        anyhow::ensure!(Instant::now() < deadline, "the coordinator did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sampler = tokio::spawn(sample(format!("http://{addr}"), child.id().unwrap_or(0), stop_rx));
    let started = Instant::now();
    let bench_workers = crate::embedded::LocalWorkers {
        url: format!("http://{addr}"),
        count: workers,
        name: "bench".into(),
        gpu: None,
        token: None,
        out_dir: None,
        runner: crate::embedded::Runner::Noop,
        prefetch,
    };
    let handles = crate::embedded::spawn(&bench_workers, std::future::pending::<()>)?;
    let output = tokio::time::timeout(Duration::from_secs(3600), child.wait_with_output())
        .await
        .context("the benchmark sweep did not finish within an hour")??;
    let exit_s = started.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    let mut samples = sampler.await.unwrap_or_default();
    for h in handles {
        if let Ok(Err(e)) = h.await {
            tracing::warn!("bench worker: {e:#}");
        }
    }
    anyhow::ensure!(output.status.success(), "the coordinator failed: {}", output.status);
    let stats: serde_json::Value = serde_json::from_slice(
        output.stdout.split(|b| *b == b'\n').rfind(|l| !l.is_empty()).unwrap_or_default(),
    )
    .context("reading the coordinator's stats line")?;
    let completed = stats["completed"].as_u64().unwrap_or(0);
    anyhow::ensure!(completed as usize == trials, "{completed} of {trials} trials completed");
    // The run ends with the last trial; the coordinator says how long it took to exit after.
    let shutdown_s = stats["shutdown_s"].as_f64().unwrap_or(0.0).clamp(0.0, exit_s);
    let wall_s = exit_s - shutdown_s;
    let cpu = stats["done_cpu_s"].as_f64().or(stats["cpu_s"].as_f64()).unwrap_or(0.0);
    let _ = std::fs::remove_dir_all(&dir);
    // The last trial's end, from the coordinator's own stats line, closes the last window (the
    // samples every 100 ms rarely catch it).
    let startup = all_known(&samples, workers);
    if let Some(last) = samples.last().copied() {
        samples.push(Sample {
            at: started + Duration::from_secs_f64(wall_s),
            completed,
            cpu_s: cpu,
            ..last
        });
    }
    Ok(BenchResult {
        workers,
        trials: completed,
        wall_s,
        trials_per_s: completed as f64 / wall_s,
        coordinator_cpu_s: cpu,
        cpu_ms_per_trial: cpu * 1000.0 / completed.max(1) as f64,
        commits_per_trial: stats["commits"].as_u64().unwrap_or(0) as f64 / completed.max(1) as f64,
        peak_rss_mib: samples.last().map_or(0.0, |s| s.peak_rss_mib),
        shutdown_s,
        startup_s: startup.map(|s| s.at.duration_since(started).as_secs_f64()),
        startup_trials: startup.map(|s| s.completed),
        windows: windows(&samples, workers, completed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_sweep_has_exactly_the_requested_trials() {
        for trials in [1, 100, 250, 10_000] {
            let yaml = bench_sweep_yaml("b", trials);
            let spec = crate::spec::SweepSpec::parse(&yaml, "bench.yaml").unwrap();
            assert_eq!(spec.planned_trials(), Some(trials as u64), "{yaml}");
        }
    }

    #[test]
    fn windows_start_once_every_worker_is_known() {
        let t0 = Instant::now();
        let at = |ms: u64, completed: u64, workers: usize, cpu_s: f64| Sample {
            at: t0 + Duration::from_millis(ms),
            completed,
            workers,
            cpu_s,
            rss_mib: 10.0,
            peak_rss_mib: 10.0,
        };
        // 4 workers: the first two samples are start-up (slow, CPU-heavy).
        let samples = [
            at(0, 0, 0, 0.0),
            at(1000, 100, 2, 1.0),
            at(2000, 500, 4, 1.2),
            at(3000, 1500, 4, 1.3),
            at(4000, 3000, 4, 1.45),
        ];
        assert_eq!(all_known(&samples, 4).map(|s| s.completed), Some(500));
        let w = windows(&samples, 4, 3000);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].upto, 1500);
        assert!((w[0].trials_per_s - 1000.0).abs() < 1e-6, "{}", w[0].trials_per_s);
        assert!((w[0].cpu_ms_per_trial - 0.1).abs() < 1e-9, "{}", w[0].cpu_ms_per_trial);
        assert_eq!(w[1].upto, 3000);
        assert!((w[1].trials_per_s - 1500.0).abs() < 1e-6);
        // Start-up past the first mark: the first window goes to the next one.
        let w = windows(&samples[..], 4, 30_000);
        assert_eq!(w.first().map(|w| w.upto), Some(1500));
        let late = [at(0, 0, 0, 0.0), at(1000, 2000, 4, 1.0), at(2000, 12_000, 4, 2.0)];
        let w = windows(&late, 4, 12_000);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].upto, 12_000);
        // No sample saw every worker: from the first sample, as before.
        assert_eq!(windows(&samples, 5, 3000)[0].trials_per_s, 1500.0 / 3.0);
    }
}
