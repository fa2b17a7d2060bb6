//! End-to-end sweeps: a coordinator and several workers in one process over real gRPC on
//! 127.0.0.1, then a small real SAE sweep with the embedded local worker, and the standalone
//! `msae-worker train` command.

use msae_coordinator::model::TrialStatus;
use msae_coordinator::run::{RunOptions, address_file, run_sweep};
use msae_tests::*;
use msae_worker::client::{ClientOptions, run_worker};
use msae_worker::noop::NoopRunner;
use msae_worker::runner::TrialRunner;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grid_with_several_workers_completes_every_point_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("grid.yaml");
    std::fs::write(&sweep, noop_sweep("grid", 40, 20, 2)).unwrap();
    let db = dir.path().join("grid.redb");
    let mut opts = RunOptions::new(&sweep);
    opts.db = db.clone();
    opts.listen = "127.0.0.1:0".parse().unwrap();
    opts.local_workers = 0;
    opts.logdir = Some(dir.path().join("runs"));
    opts.progress = false;
    opts.report = false;
    let coordinator = tokio::spawn(run_sweep(opts, std::future::pending()));
    let addr_file = address_file(&db);
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                break a;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("coordinator address");
    let runner: Arc<dyn TrialRunner> = Arc::new(NoopRunner { sleep: Duration::ZERO });
    let workers: Vec<_> = (0..4)
        .map(|i| {
            let mut o = ClientOptions::new(format!("http://{}", addr.trim()));
            o.name = format!("w{i}");
            tokio::spawn(run_worker(o, runner.clone(), std::future::pending()))
        })
        .collect();
    let summary = tokio::time::timeout(Duration::from_secs(120), coordinator)
        .await
        .expect("sweep finished in time")
        .unwrap()
        .unwrap();
    assert!(summary.finished);
    assert_eq!(summary.counts.completed, 40);
    let mut succeeded = 0;
    for w in workers {
        let s = tokio::time::timeout(Duration::from_secs(30), w).await.unwrap().unwrap().unwrap();
        succeeded += s.succeeded;
    }
    assert_eq!(succeeded, 40, "workers' accepted results add up to the grid");
    let trials = stored_trials(&db);
    assert_eq!(trials.len(), 40);
    let indexes: BTreeSet<u64> = trials.iter().map(|t| t.index).collect();
    assert_eq!(indexes.len(), 40);
    assert!(trials.iter().all(|t| t.status == TrialStatus::Completed && t.attempt == 1));
    let workers_used: BTreeSet<_> = trials.iter().filter_map(|t| t.worker.clone()).collect();
    assert!(workers_used.len() > 1, "work was spread: {workers_used:?}");
    // TensorBoard: one run directory per trial with an event file.
    let runs = walk(&dir.path().join("runs"));
    let event_files = runs.iter().filter(|p| p.contains("events.out.tfevents")).count();
    assert!(event_files >= 40, "{event_files} event files");
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

#[test]
fn small_sae_sweep_with_the_embedded_worker_ranks_real_results() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("sae.yaml");
    std::fs::write(
        &sweep,
        "name: sae\nmethod: grid\nmetric: {name: fvu, goal: minimize}\n\
         base:\n  steps: 150\n  eval_every: 50\n  data: {synthetic: {num_samples: 2048}}\n\
         parameters:\n  layer_sparsity_mode: {values: [ordinary, boosted]}\n\
         \x20 stripe_sparsity_mode: {values: [none, routing]}\n",
    )
    .unwrap();
    let db = dir.path().join("sae.redb");
    let out = std::process::Command::new(bin("e2e-coordinator"))
        .arg(&sweep)
        .arg("--db")
        .arg(&db)
        .args(["--listen", "127.0.0.1:0", "--quiet", "--logdir"])
        .arg(dir.path().join("runs"))
        .arg("--artifacts")
        .arg(dir.path().join("artifacts"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let trials = stored_trials(&db);
    assert_eq!(trials.len(), 4);
    for t in &trials {
        assert_eq!(t.status, TrialStatus::Completed, "{t:?}");
        for m in ["fvu", "mse", "l0", "mmcs", "active_stripes", "dead_neurons"] {
            let v = t.metrics.get(m).unwrap_or_else(|| panic!("{m} missing in {:?}", t.metrics));
            assert!(v.is_finite());
        }
        // Routing keeps stripe_k (default 4) of 16 stripes.
        if t.params["stripe_sparsity_mode"] == "routing" {
            assert!(t.metrics["active_stripes"] <= 4.0 + 1e-9, "{:?}", t.metrics);
        }
    }
    // TensorBoard: every evaluation at its own step (50, 100), the final metrics at the final
    // step (150). Regression: progress was sampled once a second, so evaluations between
    // samples were lost and final metrics landed at the last sampled step.
    let sweeps = stored_sweeps(&db);
    let logger = msae_coordinator::tensorboard::TensorBoardLogger::new(
        dir.path().join("runs"),
        &sweeps[0].name,
        &sweeps[0].run_id(),
    );
    for t in &trials {
        let run = logger.trial_dir(t);
        let file = std::fs::read_dir(&run)
            .unwrap_or_else(|e| panic!("{}: {e}", run.display()))
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("events.out"))
            .unwrap();
        let events = msae_coordinator::tensorboard::read_events(&file).unwrap();
        let steps_of = |tag: &str| -> Vec<i64> {
            events
                .iter()
                .filter(|e| {
                    e.summary.as_ref().is_some_and(|s| {
                        s.value.iter().any(|v| v.tag == tag && v.simple_value.is_some())
                    })
                })
                .map(|e| e.step)
                .collect()
        };
        assert_eq!(steps_of("val_loss"), [50, 100, 150], "trial {}", t.index);
        assert_eq!(steps_of("steps"), [150], "trial {}", t.index);
        assert_eq!(steps_of("mmcs"), [150], "trial {}", t.index);
        assert_eq!(t.step, 150);
    }
    // --artifacts: the embedded worker kept every trial's weights and resolved config.
    let kept = walk(&dir.path().join("artifacts"));
    assert_eq!(kept.iter().filter(|p| p.ends_with("weights.safetensors")).count(), 4, "{kept:?}");
    assert_eq!(kept.iter().filter(|p| p.ends_with("config.yaml")).count(), 4, "{kept:?}");
    // The final table is ranked by fvu, best first.
    let mut fvus: Vec<f64> = trials.iter().map(|t| t.metrics["fvu"]).collect();
    fvus.sort_by(f64::total_cmp);
    assert!(stdout.contains("fvu"), "{stdout}");
    let report = std::process::Command::new(bin("e2e-coordinator"))
        .args(["report", "--format", "json", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let ranked: Vec<f64> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["metrics"]["fvu"].as_f64().unwrap())
        .collect();
    assert_eq!(ranked, fvus);
}

/// Every scalar of the event files in `run`: (tag, step, value).
fn scalars_of(run: &std::path::Path) -> Vec<(String, i64, f32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(run).unwrap_or_else(|e| panic!("{}: {e}", run.display())) {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        for e in msae_coordinator::tensorboard::read_events(&path).unwrap() {
            for v in e.summary.map(|s| s.value).unwrap_or_default() {
                if let Some(x) = v.simple_value {
                    out.push((v.tag, e.step, x));
                }
            }
        }
    }
    out
}

/// A routing SAE on labelled data, through worker, protocol and coordinator: its trial run
/// gets the reconstruction error per class at every evaluation and at the end, each stripe a
/// run of its own with its activations (and router score) per class. A second database with
/// the same sweep writes beside it, not into it.
#[test]
fn labelled_data_gives_per_class_runs_per_stripe_in_tensorboard() {
    use msae_worker::data::npy;
    let dir = tempfile::tempdir().unwrap();
    let (rows, dim) = (300, 8);
    let x: Vec<f32> = (0..rows * dim)
        .map(|i| if (i % dim < 4) == (i / dim % 3 == 0) { 1.0 } else { 0.1 })
        .collect();
    let labels: Vec<u8> = (0..rows).map(|r| (r % 3) as u8).collect();
    let (xp, yp) = (dir.path().join("x.npy"), dir.path().join("y.npy"));
    std::fs::write(&xp, npy::encode("<f4", false, &[rows, dim], &npy::f32_bytes(&x), 1)).unwrap();
    std::fs::write(&yp, npy::encode("|u1", false, &[rows], &labels, 1)).unwrap();
    let sweep = dir.path().join("classes.yaml");
    std::fs::write(
        &sweep,
        format!(
            "name: classes\nmethod: grid\nmetric: {{name: fvu, goal: minimize}}\n\
             base:\n  steps: 40\n  eval_every: 20\n  batch_size: 32\n  num_stripes: 6\n\
             \x20 stripe_dim: 4\n  layer_k: 8\n  stripe_k: 2\n  stripe_sparsity_mode: routing\n\
             \x20 data: {{path: {}, labels: {}}}\nparameters:\n  lr: {{values: [0.001]}}\n",
            xp.display(),
            yp.display()
        ),
    )
    .unwrap();
    let runs = dir.path().join("runs");
    let logdir = runs.to_str().unwrap();
    let mut sweep_dirs = Vec::new();
    for db in ["one.redb", "two.redb"] {
        let db = dir.path().join(db);
        let out = run_to_end(&sweep, &db, &["--quiet", "--logdir", logdir]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let trials = stored_trials(&db);
        assert_eq!(trials[0].status, TrialStatus::Completed, "{:?}", trials[0]);
        assert!(trials[0].metrics.keys().all(|k| !k.contains("class")), "{:?}", trials[0].metrics);
        let s = &stored_sweeps(&db)[0];
        let logger =
            msae_coordinator::tensorboard::TensorBoardLogger::new(&runs, &s.name, &s.run_id());
        sweep_dirs.push(logger.sweep_dir().to_path_buf());
        let trial = logger.trial_dir(&trials[0]);
        assert!(trial.ends_with("ordinary/routing/trial-00000"), "{}", trial.display());
        let steps = |scalars: &[(String, i64, f32)], tag: &str| -> Vec<i64> {
            scalars.iter().filter(|(t, _, _)| t == tag).map(|(_, s, _)| *s).collect()
        };
        let main = scalars_of(&trial);
        for class in 0..3 {
            assert_eq!(steps(&main, &format!("mse_by_class/{class}")), [20, 40], "{main:?}");
        }
        for stripe in 0..6 {
            let run = scalars_of(&trial.join(format!("stripe_{stripe:02}")));
            for class in 0..3 {
                assert_eq!(steps(&run, &format!("class_activations/{class}")), [20, 40]);
                assert_eq!(steps(&run, &format!("routing_score/{class}")), [20, 40]);
            }
            // Counts of the 30 validation samples, split among the classes.
            for step in [20, 40] {
                let total: f32 = run
                    .iter()
                    .filter(|(t, s, _)| *s == step && t.starts_with("class_activations/"))
                    .map(|(_, _, v)| v)
                    .sum();
                assert!((0.0..=30.0).contains(&total), "stripe {stripe} at {step}: {total}");
            }
        }
    }
    assert_ne!(sweep_dirs[0], sweep_dirs[1], "two databases, two sweep directories");
    assert!(sweep_dirs.iter().all(|d| d.is_dir()));
}

#[test]
fn standalone_train_writes_weights_config_and_json_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("trial.yaml");
    std::fs::write(&config, "steps: 100\ndata: {synthetic: {num_samples: 2048}}\n").unwrap();
    let out_dir = dir.path().join("out");
    let out = std::process::Command::new(bin("e2e-worker"))
        .args(["train", "--json", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one JSON object on stdout: {stdout}");
    let metrics: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(metrics["fvu"].as_f64().unwrap().is_finite());
    assert_eq!(metrics["steps"].as_f64().unwrap(), 100.0);
    assert!(out_dir.join("weights.safetensors").exists());
    let resolved = std::fs::read_to_string(out_dir.join("config.yaml")).unwrap();
    let cfg = msae_shared::TrialConfig::from_yaml(&resolved).unwrap();
    assert_eq!(cfg.steps, 100);

    // Bad input: unknown key, and --gpu on a CPU build.
    std::fs::write(&config, "stepz: 100\n").unwrap();
    let out = std::process::Command::new(bin("e2e-worker"))
        .args(["train", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("trial.yaml") && stderr.contains("stepz"), "{stderr}");
    if !cfg!(feature = "cuda") {
        std::fs::write(&config, "steps: 10\n").unwrap();
        let out = std::process::Command::new(bin("e2e-worker"))
            .args(["train", "--gpu", "0", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("without CUDA support"));
    }
}

#[test]
fn orchestration_bench_runs_every_trial_through_a_real_coordinator() {
    let out = std::process::Command::new(bin("e2e-coordinator"))
        .args(["bench", "--workers", "1,4", "--trials", "60", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for (row, workers) in rows.iter().zip([1, 4]) {
        assert_eq!(row["workers"], workers);
        assert_eq!(row["trials"], 60, "every trial completed: {row}");
        assert!(row["trials_per_s"].as_f64().unwrap() > 0.0);
        assert!(row["coordinator_cpu_s"].as_f64().unwrap() > 0.0, "child CPU was read: {row}");
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn local_workers_on_a_gpu_need_a_cuda_build() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("g.yaml");
    std::fs::write(&sweep, noop_sweep("g", 1, 0, 1)).unwrap();
    let db = dir.path().join("g.redb");
    let out = run_to_end(&sweep, &db, &["--gpu", "0"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("without CUDA support") && stderr.contains("--features cuda"),
        "{stderr}"
    );
    assert!(!db.exists(), "refused before anything was stored");
}

/// Early termination end to end: a real coordinator process with its embedded worker runs a
/// noop sweep under ASHA. Trials whose curve falls behind at a rung are stopped through their
/// progress replies and end pruned with the metrics they had reached; the best trial trains to
/// its end; the sweep finishes with exit status 0 and the report shows the pruned trials as
/// such, below the completed ones.
#[test]
fn early_terminate_prunes_trials_and_the_sweep_finishes_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("prune.yaml");
    std::fs::write(
        &sweep,
        "name: prune\nmethod: grid\nmetric: {name: fvu, goal: minimize}\n\
         task: {kind: noop, sleep_ms: 500}\n\
         early_terminate: {type: asha, min_steps: 100, reduction_factor: 3}\n\
         base: {steps: 1000, eval_every: 100}\n\
         parameters:\n  lr: {values: [1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2]}\n\
         \x20 layer_k: {values: [4, 16]}\n",
    )
    .unwrap();
    let db = dir.path().join("prune.redb");
    let out = run_to_end(&sweep, &db, &["--quiet", "--logdir", "none"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}\n{stdout}");
    let trials = stored_trials(&db);
    assert_eq!(trials.len(), 10);
    let pruned: Vec<_> = trials.iter().filter(|t| t.status == TrialStatus::Pruned).collect();
    let completed: Vec<_> = trials.iter().filter(|t| t.status == TrialStatus::Completed).collect();
    assert_eq!(pruned.len() + completed.len(), 10, "nothing failed or left: {trials:#?}");
    assert!(!pruned.is_empty() && !completed.is_empty(), "{trials:#?}");
    for t in &pruned {
        // Stopped after its first rung (100), before its end, with the metrics it had then.
        assert!((100..1000).contains(&t.step), "trial {} pruned at {}", t.index, t.step);
        assert_eq!(t.metrics["steps"], t.step as f64, "{t:?}");
        let config = t.trial_config().unwrap().unwrap();
        let fvu = msae_worker::noop::metrics_at(&config, t.step)["fvu"];
        assert_eq!(t.metrics["fvu"], fvu, "the curve's value where it stopped: {t:?}");
        assert!(t.curve.first().is_some_and(|p| p.0 == 100), "{:?}", t.curve);
        assert!(t.errors.iter().any(|e| e.contains("pruned at step")), "{:?}", t.errors);
    }
    for t in &completed {
        assert_eq!(t.step, 1000, "{t:?}");
    }
    // The noop curves never cross, so the best point always survives its rungs.
    let analytic = |t: &msae_coordinator::model::TrialRecord| t.trial_config().unwrap().unwrap();
    let best = trials
        .iter()
        .min_by(|a, b| {
            let (a, b) = (analytic(a), analytic(b));
            msae_worker::noop::analytic_fvu(&a).total_cmp(&msae_worker::noop::analytic_fvu(&b))
        })
        .unwrap();
    assert_eq!(best.status, TrialStatus::Completed, "{best:?}");
    let steps: u64 = trials.iter().map(|t| t.step).sum();
    assert!(steps < 10 * 1000, "pruning saved steps: {steps}");
    // The final table: the counts and the pruned rows, below every completed one.
    assert!(
        stdout.contains(&format!(
            "{} completed, {} pruned, 0 failed",
            completed.len(),
            pruned.len()
        )),
        "{stdout}"
    );
    let report = std::process::Command::new(bin("e2e-coordinator"))
        .args(["report", "--format", "json", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    let statuses: Vec<&str> =
        report["rows"].as_array().unwrap().iter().map(|r| r["status"].as_str().unwrap()).collect();
    let first_pruned = statuses.iter().position(|s| *s == "pruned").unwrap();
    assert_eq!(first_pruned, completed.len(), "{statuses:?}");
    assert!(statuses[first_pruned..].iter().all(|s| *s == "pruned"), "{statuses:?}");
    assert_eq!(report["counts"]["pruned"], pruned.len());
}
