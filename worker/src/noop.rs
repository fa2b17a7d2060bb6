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

use crate::runner::{Control, Progress, ProgressKind, RunOptions, TrialOutcome, TrialRunner};
use msae_shared::config::StripeSparsityMode;
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

/// The training loss a fraction `done` of the way through: decays from 1 to the final loss.
fn loss_at(final_loss: f64, done: f64) -> f64 {
    final_loss + (1.0 - final_loss).max(0.0) * (1.0 - done).powi(2)
}

impl TrialRunner for NoopRunner {
    fn run(
        &self,
        config: &TrialConfig,
        _options: &RunOptions,
        progress: &mut dyn FnMut(&Progress) -> Control,
    ) -> anyhow::Result<TrialOutcome> {
        let final_metrics = analytic_metrics(config);
        let final_loss = final_metrics[metrics::TRAIN_LOSS];
        let total_steps = config.steps as u64;
        let slices = self.sleep.as_nanos().div_ceil(SLICE.as_nanos()).max(1) as u64;
        let start = Instant::now();
        for slice in 1..=slices {
            // Sleep until this slice's share of the total (absolute targets do not drift).
            let target = self.sleep.mul_f64(slice as f64 / slices as f64);
            if let Some(rest) = target.checked_sub(start.elapsed()) {
                std::thread::sleep(rest);
            }
            let done = slice as f64 / slices as f64;
            let step = (total_steps as f64 * done).round() as u64;
            let report = Progress {
                step,
                total_steps,
                scalars: BTreeMap::from([(
                    metrics::TRAIN_LOSS.to_string(),
                    loss_at(final_loss, done),
                )]),
                kind: ProgressKind::Sample,
            };
            // A stop asked for at the last report comes after the work is done: the result
            // stands (as in training).
            if let Control::Stop(reason) = progress(&report)
                && done < 1.0
            {
                tracing::debug!(step, %reason, "noop trial stopped on request");
                let mut partial = final_metrics.clone();
                let loss = loss_at(final_loss, done);
                partial.insert(metrics::TRAIN_LOSS.to_string(), loss);
                partial.insert(metrics::VAL_LOSS.to_string(), loss);
                partial.insert(metrics::STEPS.to_string(), step as f64);
                return Ok(TrialOutcome {
                    metrics: partial,
                    artifact: None,
                    stopped: Some(reason),
                });
            }
        }
        Ok(TrialOutcome { metrics: final_metrics, artifact: None, stopped: None })
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
            steps.push(p.step);
            Control::Continue
        });
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert_eq!(steps.len(), 5, "100 ms in 20 ms slices");
        assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
        assert_eq!(*steps.last().unwrap(), optimum().steps as u64);
        assert_eq!(out.metrics[metrics::FVU], NOOP_OPTIMUM_FVU);
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
