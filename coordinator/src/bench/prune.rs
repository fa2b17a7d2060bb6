//! `msae-coordinator bench prune`: what early termination saves and what it costs.
//!
//! Runs one sweep several times with embedded local workers, once without `early_terminate`
//! and once under each rule, and reports for each run the training steps executed (the sum of
//! every trial's last step: its final step, or the step a pruned trial stopped at), how many
//! trials were pruned, and the best value of the sweep metric among the completed trials.
//!
//! The built-in sweep is a noop grid (60 points of the analytic objective, 1,000 steps each,
//! an evaluation every 100) under hyperband `{min_iter: 100, eta: 3}`, asha `{min_steps: 100,
//! reduction_factor: 3}` and median `{warmup_steps: 200, min_trials: 5}`. The noop runner's
//! curves never cross, so there it measures the steps saved, not the risk of stopping the
//! eventual best. `--sweep FILE` measures a sweep of one's own instead (an SAE one, say): the
//! file without its `early_terminate` block, then with it, or, when it has none or with
//! `--all-rules`, under each of the three rules above (they suit `eval_every: 100`).

use crate::model::{Goal, TrialStatus};
use crate::run::{RunOptions, run_sweep};
use crate::spec::SweepSpec;
use anyhow::Context;
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Options of `msae-coordinator bench prune`.
#[derive(Debug, Clone, clap::Args)]
pub struct PruneBenchArgs {
    /// Embedded workers running trials side by side.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// How long a built-in noop trial takes when it runs to its end, in milliseconds.
    #[arg(long, default_value_t = 400)]
    pub sleep_ms: u64,
    /// Measure this sweep file instead of the built-in noop grid: without its early_terminate
    /// block and with it (or, when it has none, under each built-in rule).
    #[arg(long)]
    pub sweep: Option<PathBuf>,
    /// With --sweep: the three built-in rules instead of the file's own block.
    #[arg(long)]
    pub all_rules: bool,
    /// Print one JSON object per run instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One measured run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PruneResult {
    /// `none`, or the early_terminate rule's type.
    pub run: String,
    pub trials: usize,
    pub completed: usize,
    pub pruned: usize,
    pub failed: usize,
    /// Training steps executed by every trial together.
    pub steps: u64,
    /// `steps` over the run without early termination's.
    pub steps_fraction: f64,
    pub metric: String,
    /// The best value of the metric among completed trials.
    pub best: Option<f64>,
    /// The trial holding it.
    pub best_trial: Option<u64>,
    pub wall_s: f64,
}

/// The built-in sweep: a noop grid of 60 points.
pub fn builtin_sweep(sleep_ms: u64) -> Value {
    json!({
        "name": "prune-bench",
        "method": "grid",
        "metric": {"name": "fvu", "goal": "minimize"},
        "task": {"kind": "noop", "sleep_ms": sleep_ms},
        "base": {"steps": 1000, "eval_every": 100},
        "parameters": {
            "lr": {"values": [1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2]},
            "layer_k": {"values": [4, 8, 16, 32]},
            "stripe_k": {"values": [2, 4, 8]},
        },
    })
}

/// The runs of a sweep document: without early termination first, then under its own rule,
/// or each built-in one when it has none or `all_rules`.
fn variants(doc: &Value, all_rules: bool) -> Vec<(String, Value)> {
    let mut none = doc.clone();
    if let Some(top) = none.as_object_mut() {
        top.remove("early_terminate");
    }
    let mut out = vec![("none".to_string(), none.clone())];
    let rules = match doc.get("early_terminate") {
        Some(rule) if !all_rules => vec![rule.clone()],
        _ => vec![
            json!({"type": "hyperband", "min_iter": 100, "eta": 3}),
            json!({"type": "asha", "min_steps": 100, "reduction_factor": 3}),
            json!({"type": "median", "warmup_steps": 200, "min_trials": 5}),
        ],
    };
    for rule in rules {
        let kind = rule["type"].as_str().unwrap_or("rule").to_string();
        let mut with = none.clone();
        with["early_terminate"] = rule;
        out.push((kind, with));
    }
    out
}

/// Runs every variant; prints the results.
pub fn run(args: &PruneBenchArgs) -> anyhow::Result<()> {
    let doc = match &args.sweep {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read sweep file {}", path.display()))?;
            // Checked as a sweep first, so a bad file fails with its line and column.
            SweepSpec::parse(&text, &path.display().to_string())?;
            msae_shared::yaml::to_json_value(&text)
                .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message))?
        }
        None => builtin_sweep(args.sleep_ms),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let dir = std::env::temp_dir().join(format!("msae-bench-prune-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(
            out,
            "{:<10} {:>6} {:>7} {:>7} {:>10} {:>7} {:>12} {:>6} {:>8}",
            "run", "trials", "pruned", "failed", "steps", "steps%", "best", "trial", "wall_s"
        )?;
    }
    let mut baseline: Option<u64> = None;
    for (name, variant) in variants(&doc, args.all_rules) {
        let mut result = runtime.block_on(run_one(&dir, &name, &variant, args.workers))?;
        let base = *baseline.get_or_insert(result.steps);
        result.steps_fraction = result.steps as f64 / base.max(1) as f64;
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&result)?)?;
        } else {
            let best = result.best.map_or("-".to_string(), |b| format!("{b:.6}"));
            let trial = result.best_trial.map_or("-".to_string(), |t| t.to_string());
            writeln!(
                out,
                "{:<10} {:>6} {:>7} {:>7} {:>10} {:>6.1}% {:>12} {:>6} {:>8.1}",
                result.run,
                result.trials,
                result.pruned,
                result.failed,
                result.steps,
                100.0 * result.steps_fraction,
                best,
                trial,
                result.wall_s
            )?;
        }
        out.flush()?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn run_one(
    dir: &Path,
    name: &str,
    doc: &Value,
    workers: usize,
) -> anyhow::Result<PruneResult> {
    let sweep = dir.join(format!("{name}.yaml"));
    std::fs::write(&sweep, serde_yaml::to_string(doc)?)?;
    let spec = SweepSpec::parse(&std::fs::read_to_string(&sweep)?, &sweep.display().to_string())?;
    let db = dir.join(format!("{name}.redb"));
    let mut opts = RunOptions::new(&sweep);
    opts.db = db.clone();
    opts.listen = "127.0.0.1:0".parse().expect("a loopback address");
    opts.local_workers = workers;
    opts.logdir = None;
    opts.progress = false;
    opts.report = false;
    let started = Instant::now();
    let summary = run_sweep(opts, std::future::pending()).await?;
    let wall_s = started.elapsed().as_secs_f64();
    anyhow::ensure!(summary.finished, "the {name} sweep did not finish");
    // The run's store is closed once its last handle is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    let store = loop {
        match crate::store::Store::open_read_only(&db) {
            Ok(store) => break store,
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let trials = store.trials(&summary.sweep)?;
    let metric = spec.metric.name.clone();
    let count = |s: TrialStatus| trials.iter().filter(|t| t.status == s).count();
    let oriented = |v: f64| if spec.metric.goal == Goal::Maximize { -v } else { v };
    let best = trials
        .iter()
        .filter(|t| t.status == TrialStatus::Completed)
        .filter_map(|t| t.metrics.get(&metric).filter(|v| v.is_finite()).map(|v| (t.index, *v)))
        .min_by(|a, b| oriented(a.1).total_cmp(&oriented(b.1)));
    Ok(PruneResult {
        run: name.to_string(),
        trials: trials.len(),
        completed: count(TrialStatus::Completed),
        pruned: count(TrialStatus::Pruned),
        failed: count(TrialStatus::Failed),
        steps: trials.iter().map(|t| t.step).sum(),
        steps_fraction: 1.0,
        metric,
        best: best.map(|b| b.1),
        best_trial: best.map(|b| b.0),
        wall_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_sweep_and_its_variants_parse() {
        let doc = builtin_sweep(400);
        let runs = variants(&doc, false);
        let names: Vec<&str> = runs.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(names, ["none", "hyperband", "asha", "median"]);
        for (name, variant) in &runs {
            let text = serde_yaml::to_string(variant).unwrap();
            let spec = SweepSpec::parse(&text, name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(spec.planned_trials(), Some(60));
            assert_eq!(spec.early_terminate.is_some(), *name != "none");
        }
        // A sweep of one's own: as written, and without its block.
        let own = json!({"name": "x", "method": "grid", "early_terminate": {"type": "median"}});
        let runs = variants(&own, false);
        assert_eq!(runs.len(), 2);
        assert!(runs[0].1.get("early_terminate").is_none());
        assert_eq!(runs[1].1["early_terminate"], json!({"type": "median"}));
        assert_eq!(variants(&own, true).len(), 4, "--all-rules: the built-in three");
    }
}
