//! The no-op (analytic) trial runner: a deterministic stand-in for training, so the
//! orchestration (leases, progress, retries, search strategies, reports) can be tested and
//! benchmarked without spending time on a model. Leases whose `runner` is `"noop"` run it.
//!
//! # The analytic objective
//! Metrics are a smooth function of the trial config with a known minimum:
//!
//! ```text
//! fvu = 0.02
//!     + 0.10 * (log10(lr) + 3)^2                      lr optimum 1e-3
//!     + 0.05 * (log2(layer_k / 16))^2                 layer_k optimum 16
//!     + 0.02 * (log2(num_stripes / 16))^2             num_stripes optimum 16
//!     + 0.50 * (stripe_k / num_stripes - 0.25)^2      stripe_k optimum num_stripes / 4
//!     + 0.10 * (active_stripes_per_batch - 0.5)^2     optimum 0.5
//!     + 0.50 * l1_weight                              optimum 0
//! ```
//!
//! so the optimum is [`NOOP_OPTIMUM_FVU`] = 0.02 at lr = 1e-3, layer_k = 16, num_stripes = 16,
//! stripe_k = 4, active_stripes_per_batch = 0.5, l1_weight = 0. Other metrics follow: `mse =
//! fvu` (unit-variance data), `l0 = layer_k`, `active_stripes = stripe_k` (stripe sparsity on)
//! or `num_stripes`, `val_loss = train_loss = fvu + l1_weight`, `steps = config.steps`,
//! `dead_neurons = dead_stripes = 0`. The function is a pure function of the config, so
//! repeated runs agree bit for bit.
//!
//! # The learning curve
//! A trial that takes time (`sleep` > 0) follows a scripted curve on its way there: a fraction
//! `d = step / steps` of the way through,
//!
//! ```text
//! fvu(d) = fvu + (1 - fvu) * (1 - d)^2
//! ```
//!
//! (`mse` alike, the losses `fvu(d) + l1_weight`), so it starts at 1 (an empty reconstruction)
//! and reaches its analytic value at the last step. Curves never cross: at every step trials
//! rank as they will at the end (a stand-in for training, not a model of it). Like training it
//! reports
//! an evaluation (`fvu`, `mse`, `val_loss`, `l0`, `train_loss`) every `eval_every` steps before
//! the last, each at its own step and its share of `sleep`, besides a sample (`train_loss`)
//! after every slice of at most 20 ms. A trial stopped on request returns the curve's metrics
//! at the step it reached. A trial with zero `sleep` reports once, at the end, and nothing
//! else (the orchestration benchmark's trial).

use crate::runner::{Control, Progress, ProgressKind, RunOptions, TrialOutcome, TrialRunner};
use crate::sae::trainer::NamedTensor;
use msae_shared::config::StripeSparsityMode;
use msae_shared::upload::TrialFiles;
use msae_shared::{TrialConfig, metrics};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The minimum of the analytic `fvu` (see the module docs).
pub const NOOP_OPTIMUM_FVU: f64 = 0.02;

/// Longest single sleep between progress reports, so `Control::Stop` is honoured promptly.
const SLICE: Duration = Duration::from_millis(20);

/// A trial runner that computes its metrics analytically and pretends to work for `sleep`.
#[derive(Debug, Clone, Default)]
pub struct NoopRunner {
    /// Wall time the trial takes, slept in slices of at most 20 ms with a progress report after
    /// each. Zero returns at once after a single progress report.
    pub sleep: Duration,
}

impl NoopRunner {
    /// A runner whose trials take `sleep`.
    pub fn new(sleep: Duration) -> Self {
        NoopRunner { sleep }
    }
}

/// The analytic fvu of a config (see the module docs).
pub fn analytic_fvu(config: &TrialConfig) -> f64 {
    let lr = config.lr.max(1e-12);
    let layer_k = config.layer_k.max(1) as f64;
    let num_stripes = config.num_stripes.max(1) as f64;
    let stripe_ratio = config.stripe_k as f64 / num_stripes;
    NOOP_OPTIMUM_FVU
        + 0.10 * (lr.log10() + 3.0).powi(2)
        + 0.05 * (layer_k / 16.0).log2().powi(2)
        + 0.02 * (num_stripes / 16.0).log2().powi(2)
        + 0.50 * (stripe_ratio - 0.25).powi(2)
        + 0.10 * (config.active_stripes_per_batch - 0.5).powi(2)
        + 0.50 * config.l1_weight.max(0.0)
}

/// Every final metric of the analytic trial.
pub fn analytic_metrics(config: &TrialConfig) -> BTreeMap<String, f64> {
    let fvu = analytic_fvu(config);
    let active_stripes = match config.stripe_sparsity_mode {
        StripeSparsityMode::None => config.num_stripes as f64,
        _ => config.stripe_k.min(config.num_stripes) as f64,
    };
    let loss = fvu + config.l1_weight.max(0.0);
    [
        (metrics::FVU, fvu),
        (metrics::MSE, fvu),
        (metrics::L0, config.layer_k as f64),
        (metrics::ACTIVE_STRIPES, active_stripes),
        (metrics::DEAD_NEURONS, 0.0),
        (metrics::DEAD_STRIPES, 0.0),
        (metrics::VAL_LOSS, loss),
        (metrics::TRAIN_LOSS, loss),
        (metrics::STEPS, config.steps as f64),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// A loss-like metric a fraction `done` of the way through: falls from 1 (or stays, when the
/// final value is above 1) to `final_value` at `done = 1`.
pub fn curve_at(final_value: f64, done: f64) -> f64 {
    final_value + (1.0 - final_value).max(0.0) * (1.0 - done.clamp(0.0, 1.0)).powi(2)
}

/// The metrics of the analytic trial at `step` (see the module docs): its final metrics with
/// `fvu`, `mse`, `val_loss`, `train_loss` on their curves and `steps = step`.
pub fn metrics_at(config: &TrialConfig, step: u64) -> BTreeMap<String, f64> {
    let mut m = analytic_metrics(config);
    let done = if config.steps == 0 { 1.0 } else { step as f64 / config.steps as f64 };
    let fvu = curve_at(m[metrics::FVU], done);
    let loss = fvu + config.l1_weight.max(0.0);
    for (k, v) in [
        (metrics::FVU, fvu),
        (metrics::MSE, fvu),
        (metrics::VAL_LOSS, loss),
        (metrics::TRAIN_LOSS, loss),
        (metrics::STEPS, step as f64),
    ] {
        m.insert(k.to_string(), v);
    }
    m
}

/// One report of a trial that takes time: at `step`, after `at` of its sleep.
struct Report {
    step: u64,
    at: Duration,
    kind: ProgressKind,
}

/// The reports of a trial of `total` steps over `sleep`: a sample after every slice, an
/// evaluation every `eval_every` steps before the last (an evaluation at a slice's step stands
/// for both, as in training), in time order.
fn timeline(total: u64, eval_every: u64, sleep: Duration) -> Vec<Report> {
    let slices = sleep.as_nanos().div_ceil(SLICE.as_nanos()).max(1) as u64;
    let at = |done: f64| sleep.mul_f64(done.clamp(0.0, 1.0));
    let mut out: Vec<Report> = (1..=slices)
        .map(|slice| {
            let done = slice as f64 / slices as f64;
            let step = (total as f64 * done).round() as u64;
            Report { step, at: at(done), kind: ProgressKind::Sample }
        })
        .collect();
    if eval_every > 0 && total > 0 {
        let evals = (1..).map(|k| k * eval_every).take_while(|s| *s < total);
        for step in evals {
            out.retain(|r| r.step != step);
            let at = at(step as f64 / total as f64);
            out.push(Report { step, at, kind: ProgressKind::Evaluation });
        }
        out.sort_by_key(|r| (r.at, r.step));
    }
    out
}

impl TrialRunner for NoopRunner {
    /// A trial without `sleep` that writes no files is a few arithmetic operations.
    fn instant(&self, _config: &TrialConfig, options: &RunOptions) -> bool {
        self.sleep.is_zero() && !options.files && options.out_dir.is_none()
    }

    fn run(
        &self,
        config: &TrialConfig,
        options: &RunOptions,
        progress: &mut dyn FnMut(&Progress) -> Control,
    ) -> anyhow::Result<TrialOutcome> {
        let final_metrics = analytic_metrics(config);
        let total_steps = config.steps as u64;
        // Zero sleep: one report at the end (the orchestration benchmark's trial).
        let eval_every = if self.sleep.is_zero() { 0 } else { config.eval_every as u64 };
        let start = Instant::now();
        for r in timeline(total_steps, eval_every, self.sleep) {
            // Sleep until this report's share of the total (absolute targets do not drift).
            if let Some(rest) = r.at.checked_sub(start.elapsed()) {
                std::thread::sleep(rest);
            }
            let now = metrics_at(config, r.step);
            let names: &[&str] = match r.kind {
                ProgressKind::Evaluation => &[
                    metrics::TRAIN_LOSS,
                    metrics::VAL_LOSS,
                    metrics::FVU,
                    metrics::MSE,
                    metrics::L0,
                ],
                _ => &[metrics::TRAIN_LOSS],
            };
            let report = Progress {
                step: r.step,
                total_steps,
                scalars: names.iter().map(|n| (n.to_string(), now[*n])).collect(),
                class_stats: None,
                kind: r.kind,
            };
            // A stop asked for at the last report comes after the work is done: the result
            // stands (as in training).
            if let Control::Stop(reason) = progress(&report)
                && r.step < total_steps
            {
                tracing::debug!(step = r.step, %reason, "noop trial stopped on request");
                return Ok(TrialOutcome {
                    metrics: now,
                    stopped: Some(reason),
                    ..TrialOutcome::default()
                });
            }
        }
        // Building them (a YAML of the config among them) cost more than the rest of the trial.
        let files = (options.files || options.out_dir.is_some())
            .then(|| noop_files(config, &final_metrics));
        Ok(TrialOutcome { metrics: final_metrics, files, ..TrialOutcome::default() })
    }
}

/// Small stand-in files of a noop trial, so uploads and exports are exercised without
/// training: a safetensors file of the point's analytic loss (metadata `format: msae-noop`),
/// the config and the metrics.
fn noop_files(config: &TrialConfig, metrics: &BTreeMap<String, f64>) -> TrialFiles {
    let loss = metrics.get(metrics::VAL_LOSS).copied().unwrap_or_default() as f32;
    let tensor = NamedTensor::new("noop.loss", vec![1], vec![loss]);
    let meta = BTreeMap::from([("format".to_string(), "msae-noop".to_string())]);
    let mut metrics_json = serde_json::to_string_pretty(metrics).expect("metrics serialize");
    metrics_json.push('\n');
    TrialFiles {
        weights: crate::artifact::safetensors_bytes(&[tensor], &meta),
        config_yaml: msae_shared::yaml::to_string(config).unwrap_or_default().into_bytes(),
        metrics_json: metrics_json.into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn optimum() -> TrialConfig {
        TrialConfig {
            lr: 1e-3,
            layer_k: 16,
            num_stripes: 16,
            stripe_k: 4,
            active_stripes_per_batch: 0.5,
            l1_weight: 0.0,
            ..TrialConfig::default()
        }
    }

    fn run(
        runner: &NoopRunner,
        cfg: &TrialConfig,
        mut f: impl FnMut(&Progress) -> Control,
    ) -> TrialOutcome {
        runner.run(cfg, &RunOptions::default(), &mut f).unwrap()
    }

    #[test]
    fn documented_optimum_is_the_minimum() {
        let best = optimum();
        assert!((analytic_fvu(&best) - NOOP_OPTIMUM_FVU).abs() < 1e-12);
        // Moving any parameter away from its optimum makes fvu worse.
        type Vary = Box<dyn Fn(&mut TrialConfig)>;
        let variations: Vec<Vary> = vec![
            Box::new(|c| c.lr = 3e-3),
            Box::new(|c| c.lr = 3e-4),
            Box::new(|c| c.layer_k = 8),
            Box::new(|c| c.layer_k = 32),
            Box::new(|c| c.num_stripes = 32),
            Box::new(|c| c.stripe_k = 2),
            Box::new(|c| c.active_stripes_per_batch = 1.0),
            Box::new(|c| c.l1_weight = 0.01),
        ];
        for vary in variations {
            let mut c = best.clone();
            vary(&mut c);
            assert!(analytic_fvu(&c) > NOOP_OPTIMUM_FVU, "{c:?}");
        }
        // A known off-optimum value: lr a decade away costs exactly 0.1.
        let mut c = best.clone();
        c.lr = 1e-2;
        assert!((analytic_fvu(&c) - 0.12).abs() < 1e-12);
    }

    #[test]
    fn zero_sleep_is_deterministic_and_reports_once() {
        let runner = NoopRunner::new(Duration::ZERO);
        let cfg = TrialConfig { lr: 1e-2, layer_k: 4, ..TrialConfig::default() };
        let mut calls = 0;
        let a = run(&runner, &cfg, |p| {
            calls += 1;
            assert_eq!(p.step, cfg.steps as u64);
            Control::Continue
        });
        let b = run(&runner, &cfg, |_| Control::Continue);
        assert_eq!(calls, 1);
        assert_eq!(a, b);
        assert_eq!(a.metrics[metrics::L0], 4.0);
        assert_eq!(a.metrics[metrics::MSE], a.metrics[metrics::FVU]);
        assert_eq!(a.metrics[metrics::STEPS], cfg.steps as f64);
        assert!(a.stopped.is_none());
    }

    #[test]
    fn sleeps_in_slices_with_increasing_steps() {
        let runner = NoopRunner::new(Duration::from_millis(100));
        let start = Instant::now();
        let mut steps = Vec::new();
        let out = run(&runner, &optimum(), |p| {
            if p.kind == ProgressKind::Sample {
                steps.push(p.step);
            }
            Control::Continue
        });
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert_eq!(steps.len(), 5, "100 ms in 20 ms slices");
        assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
        assert_eq!(*steps.last().unwrap(), optimum().steps as u64);
        assert_eq!(out.metrics[metrics::FVU], NOOP_OPTIMUM_FVU);
    }

    #[test]
    fn evaluations_follow_the_curve_every_eval_every_steps_to_the_analytic_value() {
        let runner = NoopRunner::new(Duration::from_millis(60));
        let cfg = TrialConfig { steps: 1000, eval_every: 200, lr: 1e-2, ..optimum() };
        let mut evals: Vec<(u64, f64)> = Vec::new();
        let mut samples = Vec::new();
        let out = run(&runner, &cfg, |p| {
            match p.kind {
                ProgressKind::Evaluation => {
                    for m in [metrics::VAL_LOSS, metrics::MSE, metrics::L0, metrics::TRAIN_LOSS] {
                        assert!(p.scalars.contains_key(m), "{m} in {:?}", p.scalars);
                    }
                    evals.push((p.step, p.scalars[metrics::FVU]));
                }
                _ => samples.push(p.step),
            }
            Control::Continue
        });
        // Every 200 steps before the last; the final metrics travel as the result.
        assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [200, 400, 600, 800]);
        assert_eq!(samples.last(), Some(&1000));
        let fvu = analytic_fvu(&cfg);
        assert!((fvu - 0.12).abs() < 1e-12, "lr a decade off: 0.1 above the optimum");
        // fvu(d) = 0.12 + 0.88 * (1 - d)^2.
        for (step, value) in &evals {
            let d = *step as f64 / 1000.0;
            let want = fvu + (1.0 - fvu) * (1.0 - d).powi(2);
            assert!((value - want).abs() < 1e-12, "step {step}: {value} vs {want}");
        }
        assert!(evals.windows(2).all(|w| w[1].1 < w[0].1), "decreasing: {evals:?}");
        assert_eq!(out.metrics, analytic_metrics(&cfg), "the last step reaches the analytic value");
        assert!(out.stopped.is_none());
    }

    #[test]
    fn curves_start_at_one_and_keep_the_final_order_at_every_step() {
        let best = optimum(); // fvu 0.02 at the end
        let worse = TrialConfig { lr: 1e-2, ..optimum() }; // fvu 0.12
        let at = |c: &TrialConfig, step| metrics_at(c, step)[metrics::FVU];
        let steps = best.steps as u64;
        for step in (1..=10).map(|i| i * steps / 10) {
            assert!(at(&best, step) < at(&worse, step), "step {step}");
        }
        assert!(
            (at(&best, 0) - 1.0).abs() < 1e-12,
            "every curve starts at an empty reconstruction"
        );
        let m = metrics_at(&best, steps / 2);
        assert_eq!(m[metrics::STEPS], (steps / 2) as f64);
        assert_eq!((m[metrics::MSE], m[metrics::VAL_LOSS]), (m[metrics::FVU], m[metrics::FVU]));
        assert_eq!(m[metrics::L0], 16.0, "metrics without a curve keep their final value");
    }

    #[test]
    fn a_trial_stopped_at_an_evaluation_returns_the_curve_there() {
        let runner = NoopRunner::new(Duration::from_millis(40));
        let cfg = TrialConfig { steps: 400, eval_every: 100, ..optimum() };
        let out = run(&runner, &cfg, |p| {
            if p.kind == ProgressKind::Evaluation && p.step == 200 {
                Control::Stop("pruned".into())
            } else {
                Control::Continue
            }
        });
        assert_eq!(out.stopped.as_deref(), Some("pruned"));
        assert_eq!(out.metrics, metrics_at(&cfg, 200));
        assert_eq!(out.metrics[metrics::FVU], curve_at(NOOP_OPTIMUM_FVU, 0.5));
    }

    #[test]
    fn stop_is_honoured_promptly() {
        let runner = NoopRunner::new(Duration::from_secs(30));
        let start = Instant::now();
        let mut calls = 0;
        let out = run(&runner, &optimum(), |_| {
            calls += 1;
            if calls == 2 { Control::Stop("early stop".into()) } else { Control::Continue }
        });
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(calls, 2);
        assert_eq!(out.stopped.as_deref(), Some("early stop"));
        assert!(out.metrics[metrics::STEPS] < optimum().steps as f64);
    }
}
