//! The training loop of one trial, over any [`Trainer`], and [`SaeRunner`], the real
//! [`TrialRunner`].
//!
//! [`train`] validates the config, loads the data, picks the device and the trainer (the
//! hand-written [`crate::sae::classic`] path for eligible top-k configs on the CPU, the candle
//! [`crate::sae::model`] otherwise), then runs `cfg.steps` steps (or `epochs` epochs:
//! [`TrialConfig::total_steps`]) on deterministic shuffled batches:
//! - batches: an epoch is ceil(train rows / batch_size) steps
//!   ([`TrialConfig::steps_per_epoch`]); each epoch draws a fresh permutation of the training rows
//!   from a `StdRng` seeded by `cfg.seed` and consumes it in chunks of `batch_size`; every batch
//!   has the same size, so the last batch of an epoch, when the rows do not divide evenly, is
//!   completed with the first rows of the same permutation (a training set smaller than one
//!   batch is used whole, one step per epoch). The trainer gets the epoch length in
//!   `run_steps_per_epoch` of the config it is built from (per-epoch schedules:
//!   `distort_prob_decay`);
//! - Gaussian noise of std `input_noise_std` is added to every training batch (the trainer
//!   reconstructs the noisy batch: the [`Trainer`] seam passes one batch);
//! - every `eval_every` steps (and at the end) the validation split is evaluated (`val_loss`
//!   and the per-row metrics of [`crate::eval::evaluate`]: `fvu`, `mse`, `l0`, ...; with
//!   labels also its per-class statistics, in [`Progress::class_stats`]);
//!   with `validation_fraction: 0` the training split stands in for it;
//! - early stopping: an evaluation improves when `val_loss < best - early_stopping_min_delta`;
//!   after `early_stopping_patience` evaluations without improvement the loop ends;
//! - `progress` is called at every evaluation and at least every [`PROGRESS_INTERVAL`], and a
//!   [`Control::Stop`] ends the loop before the next step.
//!
//! The final metrics are [`crate::eval::evaluate`] on the validation split plus `val_loss`,
//! `train_loss`, `steps` and `samples_per_s` (training steps only, evaluation excluded); its
//! per-class statistics are [`TrialOutcome::class_stats`].

use crate::data::{self, DataError};
use crate::eval::{self, EvalInputs};
use crate::runner::{Control, Progress, ProgressKind, RunOptions, TrialOutcome, TrialRunner};
use crate::sae::model::CandleTrainer;
use crate::sae::trainer::{Diverged, Trainer};
use crate::sae::{classic, modular};
use anyhow::Context as _;
use candle_core::Device;
use msae_shared::config::BiasInit;
use msae_shared::config::ConfigError;
use msae_shared::upload::TrialFiles;
use msae_shared::{TrialConfig, metrics};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, Normal};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest gap between two progress calls (they renew the trial's lease).
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);
/// Mixed into the seed so batch order and noise do not share a stream with initialisation.
const BATCH_SEED_SALT: u64 = 0xBA7C_0000_0000_0001;

/// Why a trial could not start.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A hyperparameter is invalid (not retryable).
    // The cause is the error's source: `{:#}` (anyhow) prints it once, after this text.
    #[error("invalid trial config")]
    Config(#[from] ConfigError),
    /// The data could not be loaded (retryable only if the files change).
    #[error("loading data")]
    Data(#[from] DataError),
    /// A GPU was requested from a binary built without the `cuda` feature.
    #[error(
        "--gpu {0} asks for CUDA, but this binary was built without CUDA support; rebuild with \
         `cargo build --release -p msae-worker --features cuda` (needs the CUDA toolkit), or \
         drop --gpu to train on the CPU"
    )]
    NoCuda(usize),
    /// The CUDA device could not be opened.
    #[error("opening CUDA device {ordinal}: {message}")]
    Cuda { ordinal: usize, message: String },
}

/// Which trainer implementation [`train_with`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// The fast path when eligible on the CPU, the candle model otherwise.
    #[default]
    Auto,
    /// Always the candle model.
    Candle,
}

/// The real trial runner: trains with [`train`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SaeRunner;

impl TrialRunner for SaeRunner {
    fn run(
        &self,
        config: &TrialConfig,
        options: &RunOptions,
        progress: &mut dyn FnMut(&Progress) -> Control,
    ) -> anyhow::Result<TrialOutcome> {
        train(config, options, progress)
    }
}

/// The device for `options.gpu`.
pub fn select_device(gpu: Option<usize>) -> Result<Device, TrainError> {
    match gpu {
        None => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        Some(n) => {
            Device::new_cuda(n).map_err(|e| TrainError::Cuda { ordinal: n, message: e.to_string() })
        }
        #[cfg(not(feature = "cuda"))]
        Some(n) => Err(TrainError::NoCuda(n)),
    }
}

/// The trainer [`train_with`] uses for `cfg` at input dimension `dim` on `device`, and its
/// name (`"fast"`, `"candle"`, ...): the one place the implementation is chosen, shared with
/// `msae-worker bench`. [`Backend::Candle`] always gets the candle model.
pub fn make_trainer(
    cfg: &TrialConfig,
    dim: usize,
    device: &Device,
    backend: Backend,
) -> anyhow::Result<(Box<dyn Trainer>, &'static str)> {
    if backend == Backend::Auto && device.is_cpu() {
        if classic::eligible(cfg) {
            return Ok((Box::new(classic::FastTopK::new(cfg, dim)?), "fast"));
        }
        if modular::eligible(cfg) {
            return Ok((Box::new(modular::ModularFast::new(cfg, dim)?), "modular"));
        }
    }
    Ok((Box::new(CandleTrainer::new(cfg, dim, device)?), "candle"))
}

/// Trains one trial (see the module docs) and returns its final metrics.
pub fn train(
    cfg: &TrialConfig,
    options: &RunOptions,
    progress: &mut dyn FnMut(&Progress) -> Control,
) -> anyhow::Result<TrialOutcome> {
    train_with(cfg, options, Backend::Auto, progress)
}

/// [`train`] with an explicit choice of trainer implementation.
pub fn train_with(
    cfg: &TrialConfig,
    options: &RunOptions,
    backend: Backend,
    progress: &mut dyn FnMut(&Progress) -> Control,
) -> anyhow::Result<TrialOutcome> {
    cfg.validate().map_err(TrainError::Config)?;
    let device = select_device(options.gpu)?;
    let data = data::load_cached(&cfg.data, cfg.seed).map_err(TrainError::Data)?;
    let dim = data.dim;
    let n_train = data.n_train();
    anyhow::ensure!(n_train > 0, "the training split is empty");
    let steps_per_epoch = cfg.steps_per_epoch(n_train);
    let total_steps = cfg.total_steps(n_train);
    // The trainer's config also carries the epoch length (for per-epoch schedules).
    let run_cfg = TrialConfig { run_steps_per_epoch: steps_per_epoch, ..cfg.clone() };
    let (mut trainer, trainer_name) = make_trainer(&run_cfg, dim, &device, backend)?;
    if cfg.decoder_bias_init == BiasInit::DataMean {
        trainer.set_output_bias(&train_column_means(&data))?;
    }
    tracing::info!(
        steps = total_steps,
        steps_per_epoch,
        batch = cfg.batch_size,
        dim,
        latents = cfg.code_dim(),
        train_rows = data.n_train(),
        val_rows = data.n_val(),
        trainer = trainer_name,
        device = ?device,
        "training started"
    );

    // With no validation split, the training split stands in for it (a copy, but only small
    // data can have no validation rows: the split keeps at least one of any two).
    let train_copy;
    let (eval_x, eval_labels) = if data.n_val() > 0 {
        (&data.val, data.val_labels.as_deref())
    } else {
        train_copy = data.train_matrix();
        (&train_copy, data.train_labels.as_deref())
    };

    let b = cfg.batch_size.min(n_train);
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ BATCH_SEED_SALT);
    let noise = if cfg.input_noise_std > 0.0 {
        Some(Normal::new(0.0f32, cfg.input_noise_std as f32).context("input_noise_std")?)
    } else {
        None
    };
    let mut order: Vec<usize> = (0..n_train).collect();
    let mut cursor = 0;
    // From here on the rows are read in shuffled batches.
    data.samples.rows.advise(false);
    let mut batch = vec![0f32; b * dim];

    let total = total_steps as u64;
    let mut train_loss = f64::NAN;
    let mut best = f64::INFINITY;
    let mut since_best = 0usize;
    let mut stopped = None;
    let mut steps_done = 0usize;
    let mut train_time = Duration::ZERO;
    let mut last_progress = Instant::now();

    for step in 0..total_steps {
        if step.is_multiple_of(steps_per_epoch) {
            order.shuffle(&mut rng);
            cursor = 0;
        }
        // The last batch of an epoch wraps to the permutation's start to stay full.
        data.fill_batch((0..b).map(|r| order[(cursor + r) % n_train]), &mut batch);
        cursor += b;
        if let Some(noise) = &noise {
            batch.iter_mut().for_each(|v| *v += noise.sample(&mut rng));
        }
        let t0 = Instant::now();
        train_loss = trainer.step(&batch, step).with_context(|| format!("training step {step}"))?;
        train_time += t0.elapsed();
        if !train_loss.is_finite() {
            return Err(Diverged { step, value: train_loss }.into());
        }
        steps_done = step + 1;

        let is_eval = cfg.eval_every > 0
            && steps_done.is_multiple_of(cfg.eval_every)
            && steps_done < total_steps;
        let mut scalars = BTreeMap::from([(metrics::TRAIN_LOSS.to_string(), train_loss)]);
        let mut class_stats = None;
        let mut early_stop = false;
        if is_eval {
            let inf = trainer.infer(eval_x)?;
            let val_loss = inf.loss;
            // The per-row metrics of the final evaluation (mse, fvu, l0, active_stripes, ...),
            // so a sweep metric among them has a curve (early termination judges it), and the
            // per-class statistics, whose curves show stripes specialising; MMCS is left for
            // the end.
            let e = eval::evaluate(&EvalInputs::pass(eval_x, &inf, dim, cfg, eval_labels));
            scalars.extend(e.scalars);
            class_stats = e.classes;
            scalars.insert(metrics::VAL_LOSS.to_string(), val_loss);
            let (l0, fvu) = (scalars[metrics::L0], scalars[metrics::FVU]);
            tracing::debug!(step = steps_done, train_loss, val_loss, l0, fvu, "evaluation");
            if val_loss < best - cfg.early_stopping_min_delta {
                best = val_loss;
                since_best = 0;
            } else {
                since_best += 1;
                if cfg.early_stopping_patience > 0 && since_best >= cfg.early_stopping_patience {
                    tracing::info!(step = steps_done, best, val_loss, "early stopping");
                    early_stop = true;
                }
            }
        }
        if is_eval || last_progress.elapsed() >= PROGRESS_INTERVAL {
            last_progress = Instant::now();
            let p = Progress {
                step: steps_done as u64,
                total_steps: total,
                scalars,
                class_stats,
                kind: if is_eval { ProgressKind::Evaluation } else { ProgressKind::Sample },
            };
            if let Control::Stop(reason) = progress(&p) {
                tracing::info!(step = steps_done, %reason, "stopped on request");
                stopped = Some(reason);
                break;
            }
        }
        if early_stop {
            break;
        }
    }

    // Final evaluation.
    let inf = trainer.infer(eval_x)?;
    let val_loss = inf.loss;
    let atoms = trainer.atoms()?;
    let final_eval = eval::evaluate(&EvalInputs {
        atoms: &atoms,
        truth: data.truth.as_ref(),
        ..EvalInputs::pass(eval_x, &inf, dim, cfg, eval_labels)
    });
    let mut out = final_eval.scalars;
    out.insert(metrics::VAL_LOSS.to_string(), val_loss);
    out.insert(metrics::TRAIN_LOSS.to_string(), train_loss);
    out.insert(metrics::STEPS.to_string(), steps_done as f64);
    let secs = train_time.as_secs_f64();
    let sps = if secs > 0.0 { (steps_done * b) as f64 / secs } else { 0.0 };
    out.insert(metrics::SAMPLES_PER_SECOND.to_string(), sps);

    // The final metrics at the final step (they travel as the result, not as an evaluation).
    // The work is done: a stop asked for now (a shutdown, a release) does not make the result
    // partial, so it is not recorded.
    let final_progress = Progress {
        step: steps_done as u64,
        total_steps: total,
        scalars: out.clone(),
        class_stats: None,
        kind: ProgressKind::Final,
    };
    if stopped.is_none()
        && let Control::Stop(reason) = progress(&final_progress)
    {
        tracing::info!(%reason, "asked to stop after the last step: the finished result stands");
    }

    // An interrupted run gives no files: its weights must not pass for a result.
    let files = match &stopped {
        None => Some(crate::artifact::trial_files(trainer.as_ref(), cfg, &data.scaler, dim, &out)?),
        Some(_) => None,
    };
    let artifact = match (&options.out_dir, &files) {
        (None, _) => None,
        (Some(dir), None) => {
            remove_outputs(dir);
            tracing::info!(dir = %dir.display(), "stopped before the end: no weights written");
            None
        }
        (Some(dir), Some(files)) => {
            write_outputs(dir, files)?;
            Some(dir.clone())
        }
    };
    tracing::info!(
        steps = steps_done,
        val_loss,
        train_loss,
        samples_per_s = sps,
        mmcs = out.get(metrics::MMCS).copied(),
        "training finished"
    );
    Ok(TrialOutcome { metrics: out, class_stats: final_eval.classes, artifact, files, stopped })
}

/// The mean of each column of a row-major (rows, dim) matrix.
/// Per-dimension means of the scaled training rows, streamed rather than gathered.
fn train_column_means(data: &data::Dataset) -> Vec<f32> {
    let mut sum = vec![0f64; data.dim];
    data.for_each_train_row(|row| sum.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64));
    let rows = data.n_train().max(1) as f64;
    sum.iter().map(|s| (s / rows) as f32).collect()
}

#[cfg(test)]
fn column_means(x: &[f32], dim: usize) -> Vec<f32> {
    let mut sum = vec![0f64; dim];
    for row in x.chunks(dim) {
        sum.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64);
    }
    let rows = (x.len() / dim).max(1) as f64;
    sum.iter().map(|s| (s / rows) as f32).collect()
}

/// Writes each of the trial's files under a temporary name, then renames it into place: a
/// reader never sees a half-written file, and an interrupted write leaves only a `.partial`
/// file behind.
fn write_outputs(dir: &Path, files: &TrialFiles) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating output directory {}", dir.display()))?;
    for (name, bytes) in files.files() {
        write_atomic(&dir.join(name), bytes)?;
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = partial(path);
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn partial(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// Removes what an earlier, unfinished or superseded run left at the output names.
fn remove_outputs(dir: &Path) {
    for name in msae_shared::upload::FILES {
        for path in [dir.join(name), partial(&dir.join(name))] {
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), "cannot remove a stale output: {e}");
            }
        }
    }
}

/// Whether a trial error cannot change on a retry of the same trial: an invalid config,
/// unreadable or malformed data, a diverged loss. Anything else (a lost device, an I/O hiccup
/// while saving, a panic) may succeed on another attempt or another worker.
pub fn is_permanent(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.downcast_ref::<Diverged>().is_some()
            || matches!(
                cause.downcast_ref::<TrainError>(),
                Some(TrainError::Config(_) | TrainError::Data(_))
            )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use msae_shared::class_stats::ClassStats;

    fn quiet(_: &Progress) -> Control {
        Control::Continue
    }

    fn small_cfg() -> TrialConfig {
        let mut cfg =
            TrialConfig { steps: 60, eval_every: 20, batch_size: 64, ..Default::default() };
        cfg.data.synthetic.num_samples = 2048;
        cfg
    }

    #[test]
    fn default_config_recovers_true_features() {
        let cfg = TrialConfig::default();
        let t0 = Instant::now();
        let out = train(&cfg, &RunOptions::default(), &mut quiet).unwrap();
        let mmcs = out.metrics[metrics::MMCS];
        eprintln!("default config: mmcs {mmcs:.4} in {:.2?}, {:?}", t0.elapsed(), out.metrics);
        assert!(mmcs >= 0.9, "mmcs {mmcs}");
        assert_eq!(out.metrics[metrics::STEPS], 2000.0);
        assert!(out.metrics[metrics::L0] <= 8.0);
    }

    #[test]
    fn candle_model_recovers_true_features() {
        // The autograd path is several times slower per step than the fast path; a shorter,
        // hotter schedule keeps this test in seconds while checking the same recovery.
        let cfg = TrialConfig { steps: 250, lr: 5e-3, eval_every: 0, ..Default::default() };
        let t0 = Instant::now();
        let out = train_with(&cfg, &RunOptions::default(), Backend::Candle, &mut quiet).unwrap();
        let mmcs = out.metrics[metrics::MMCS];
        eprintln!("candle model: mmcs {mmcs:.4} in {:.2?}", t0.elapsed());
        assert!(mmcs >= 0.9, "mmcs {mmcs}");
    }

    #[test]
    fn same_config_gives_identical_metrics() {
        for backend in [Backend::Auto, Backend::Candle] {
            let cfg = small_cfg();
            let mut a =
                train_with(&cfg, &RunOptions::default(), backend, &mut quiet).unwrap().metrics;
            let mut b =
                train_with(&cfg, &RunOptions::default(), backend, &mut quiet).unwrap().metrics;
            a.remove(metrics::SAMPLES_PER_SECOND);
            b.remove(metrics::SAMPLES_PER_SECOND);
            assert_eq!(a, b, "{backend:?}");
        }
    }

    #[test]
    fn early_stopping_ends_after_patience() {
        // min_delta so large that no evaluation after the first counts as an improvement.
        let cfg = TrialConfig {
            eval_every: 5,
            early_stopping_patience: 2,
            early_stopping_min_delta: 1e9,
            ..small_cfg()
        };
        let mut evals = 0;
        let out = train(&cfg, &RunOptions::default(), &mut |p: &Progress| {
            // The final report carries `steps`; evaluations during training do not.
            if p.scalars.contains_key(metrics::VAL_LOSS) && !p.scalars.contains_key(metrics::STEPS)
            {
                evals += 1;
            }
            Control::Continue
        })
        .unwrap();
        // Evaluations at 5 (best), 10 (1 bad), 15 (2 bad -> stop).
        assert_eq!(out.metrics[metrics::STEPS], 15.0);
        assert_eq!(evals, 3);
        assert!(out.stopped.is_none());
        // Patience 0 never stops early.
        let cfg = TrialConfig { early_stopping_patience: 0, ..cfg };
        let out = train(&cfg, &RunOptions::default(), &mut quiet).unwrap();
        assert_eq!(out.metrics[metrics::STEPS], 60.0);
    }

    #[test]
    fn stop_request_ends_promptly() {
        let cfg = TrialConfig { eval_every: 1, ..small_cfg() };
        let mut calls = 0;
        let out = train(&cfg, &RunOptions::default(), &mut |_: &Progress| {
            calls += 1;
            Control::Stop("cancelled".into())
        })
        .unwrap();
        assert_eq!(out.stopped.as_deref(), Some("cancelled"));
        assert_eq!(out.metrics[metrics::STEPS], 1.0);
        assert_eq!(calls, 1);
    }

    #[test]
    fn a_stop_asked_after_the_last_step_keeps_the_finished_result() {
        // Regression: a release asked for while the final evaluation ran marked the finished
        // trial as stopped, and the worker threw the result away.
        let dir = tempfile::tempdir().unwrap();
        let opts = RunOptions { gpu: None, out_dir: Some(dir.path().to_path_buf()), files: true };
        let out = train(&small_cfg(), &opts, &mut |p: &Progress| {
            if p.kind == ProgressKind::Final {
                Control::Stop("the coordinator is shutting down".into())
            } else {
                Control::Continue
            }
        })
        .unwrap();
        assert_eq!(out.stopped, None);
        assert_eq!(out.metrics[metrics::STEPS], 60.0);
        assert!(dir.path().join("weights.safetensors").is_file());
    }

    #[test]
    fn an_interrupted_run_leaves_no_weights_that_look_finished() {
        let dir = tempfile::tempdir().unwrap();
        // Outputs of an earlier run in the same place, and a partial write.
        for name in ["weights.safetensors", "config.yaml", "weights.safetensors.partial"] {
            std::fs::write(dir.path().join(name), b"old").unwrap();
        }
        let opts = RunOptions { gpu: None, out_dir: Some(dir.path().to_path_buf()), files: true };
        let out = train(&small_cfg(), &opts, &mut |p: &Progress| {
            if p.step >= 30 { Control::Stop("SIGINT".into()) } else { Control::Continue }
        })
        .unwrap();
        assert_eq!(out.stopped.as_deref(), Some("SIGINT"));
        assert_eq!(out.artifact, None);
        let left: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        // A finished run leaves exactly the final files, no temporary ones: the bytes it
        // returns for upload.
        let done = train(&small_cfg(), &opts, &mut quiet).unwrap();
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["config.yaml", "metrics.json", "weights.safetensors"]);
        let files = done.files.expect("a finished run has its files");
        for (name, bytes) in files.files() {
            assert_eq!(std::fs::read(dir.path().join(name)).unwrap(), bytes, "{name}");
        }
        let written: BTreeMap<String, f64> = serde_json::from_slice(&files.metrics_json).unwrap();
        assert_eq!(written, done.metrics);
    }

    #[test]
    fn evaluations_are_marked_and_reported_at_their_steps() {
        let cfg = TrialConfig { steps: 60, eval_every: 20, ..small_cfg() };
        let mut evals = Vec::new();
        train(&cfg, &RunOptions::default(), &mut |p: &Progress| {
            if p.kind == ProgressKind::Evaluation {
                for m in [metrics::VAL_LOSS, metrics::FVU, metrics::MSE, metrics::L0] {
                    assert!(p.scalars[m].is_finite(), "{m} in {p:?}");
                }
                assert!(!p.scalars.contains_key(metrics::MMCS), "left for the end: {p:?}");
                evals.push(p.step);
            }
            Control::Continue
        })
        .unwrap();
        // 20 and 40 during training; the end's metrics travel as the result.
        assert_eq!(evals, [20, 40]);
    }

    /// 400 rows of dimension 8 whose class (row % 4) decides which half of the input is
    /// large, written as npy data and labels under `dir`; the config reads them.
    fn labelled_cfg(dir: &Path) -> TrialConfig {
        use crate::data::npy;
        let (rows, dim) = (400, 8);
        let x: Vec<f32> = (0..rows * dim)
            .map(|i| {
                let (r, j) = (i / dim, i % dim);
                let on = (j < dim / 2) == (r % 4 < 2);
                if on { 1.0 + ((i * 37) % 11) as f32 / 10.0 } else { ((i * 13) % 5) as f32 / 50.0 }
            })
            .collect();
        let labels: Vec<u8> = (0..rows).map(|r| (r % 4) as u8).collect();
        let (data, lab) = (dir.join("x.npy"), dir.join("y.npy"));
        std::fs::write(&data, npy::encode("<f4", false, &[rows, dim], &npy::f32_bytes(&x), 1))
            .unwrap();
        std::fs::write(&lab, npy::encode("|u1", false, &[rows], &labels, 1)).unwrap();
        let mut cfg = TrialConfig {
            steps: 30,
            eval_every: 10,
            batch_size: 32,
            num_stripes: 6,
            stripe_dim: 4,
            layer_k: 8,
            stripe_k: 2,
            stripe_sparsity_mode: msae_shared::config::StripeSparsityMode::Routing,
            ..Default::default()
        };
        cfg.data.path = Some(data);
        cfg.data.labels = Some(lab);
        cfg
    }

    /// Labelled data: every evaluation and the final one carry per-class statistics that
    /// agree with the scalars, on both trainers; none of them lands among the metrics.
    #[test]
    fn labelled_data_gives_class_statistics_at_every_evaluation() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = labelled_cfg(dir.path());
        let val_rows = 40; // ceil(0.1 * 400)
        let check = |c: &ClassStats, scalars: &BTreeMap<String, f64>, what: &str| {
            assert_eq!((c.num_stripes(), c.num_classes()), (6, 4), "{what}");
            assert_eq!(c.class_samples().iter().sum::<u64>(), val_rows, "{what}");
            let pairs: u64 = c.active_counts().iter().sum();
            let want = scalars[metrics::ACTIVE_STRIPES] * val_rows as f64;
            assert!((pairs as f64 - want).abs() < 1e-6, "{what}: {pairs} vs {want}");
            let rows: Vec<f64> = c.class_samples().iter().map(|&n| n as f64).collect();
            let mse =
                c.class_mse().iter().zip(&rows).map(|(m, n)| m * n).sum::<f64>() / val_rows as f64;
            assert!((mse - scalars[metrics::MSE]).abs() < 1e-6, "{what}: {mse}");
            let scores = c.routing_scores().unwrap_or_else(|| panic!("{what}: routing"));
            assert!(scores.iter().all(|v| v.is_finite()) && scores.iter().any(|&v| v != 0.0));
        };
        for backend in [Backend::Auto, Backend::Candle] {
            let mut evals = 0;
            let out = train_with(&cfg, &RunOptions::default(), backend, &mut |p: &Progress| {
                if p.kind == ProgressKind::Evaluation {
                    let c = p.class_stats.as_ref().expect("an evaluation's class statistics");
                    check(c, &p.scalars, &format!("{backend:?} step {}", p.step));
                    evals += 1;
                } else {
                    assert_eq!(p.class_stats, None, "{:?}", p.kind);
                }
                Control::Continue
            })
            .unwrap();
            assert_eq!(evals, 2, "{backend:?}");
            let c = out.class_stats.as_ref().expect("the final class statistics");
            check(c, &out.metrics, &format!("{backend:?} final"));
            assert!(out.metrics.keys().all(|k| !k.contains("class")), "{:?}", out.metrics);
        }
        // Without routing there are no router scores; without labels no statistics at all.
        let plain = TrialConfig { stripe_sparsity_mode: Default::default(), ..cfg.clone() };
        let out = train(&plain, &RunOptions::default(), &mut quiet).unwrap();
        assert_eq!(out.class_stats.unwrap().routing_scores(), None);
        let mut unlabelled = cfg;
        unlabelled.data.labels = None;
        assert_eq!(
            train(&unlabelled, &RunOptions::default(), &mut quiet).unwrap().class_stats,
            None
        );
    }

    #[test]
    fn bad_data_and_divergence_are_permanent_failures() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = small_cfg();
        cfg.data = msae_shared::config::DataConfig {
            path: Some(dir.path().join("missing.npy")),
            ..Default::default()
        };
        let e = train(&cfg, &RunOptions::default(), &mut quiet).unwrap_err();
        assert!(is_permanent(&e), "{e:#}");
        // Finite values whose squares overflow f32: the loss is infinite at the first step.
        // Rows of alternating sign, so no bias (the data-mean start included) fits them.
        let huge: Vec<f32> =
            (0..64 * 8).map(|i| if (i / 8) % 2 == 0 { 1e30f32 } else { -1e30 }).collect();
        let path = dir.path().join("huge.npy");
        std::fs::write(
            &path,
            crate::data::npy::encode(
                "<f4",
                false,
                &[64, 8],
                &crate::data::npy::f32_bytes(&huge),
                1,
            ),
        )
        .unwrap();
        for backend in [Backend::Auto, Backend::Candle] {
            cfg.data.path = Some(path.clone());
            let e = train_with(&cfg, &RunOptions::default(), backend, &mut quiet).unwrap_err();
            assert!(format!("{e:#}").contains("diverged"), "{backend:?}: {e:#}");
            assert!(is_permanent(&e), "{backend:?}: {e:#}");
        }
        assert!(!is_permanent(&anyhow::anyhow!("CUDA out of memory")));
    }

    #[test]
    fn the_reconstruction_bias_starts_at_the_training_mean() {
        let dir = tempfile::tempdir().unwrap();
        let data = crate::data::load(&small_cfg().data, small_cfg().seed).unwrap();
        let mean = column_means(&data.train_matrix(), data.dim);
        for (inter, name) in [(0, "decoder.bias"), (16, "output.bias")] {
            for (init, expect_mean) in [(BiasInit::DataMean, true), (BiasInit::Zero, false)] {
                // One step at a negligible rate: the bias is where it started.
                let cfg = TrialConfig {
                    intermediate_dim: inter,
                    decoder_bias_init: init,
                    steps: 1,
                    lr: 1e-12,
                    ..small_cfg()
                };
                let out = dir.path().join(format!("{inter}-{init:?}"));
                let opts = RunOptions { gpu: None, out_dir: Some(out.clone()), files: true };
                train(&cfg, &opts, &mut quiet).unwrap();
                let w =
                    candle_core::safetensors::load(out.join("weights.safetensors"), &Device::Cpu)
                        .unwrap();
                let b: Vec<f32> = w[name].to_vec1().unwrap();
                for (got, m) in b.iter().zip(&mean) {
                    let want = if expect_mean { *m } else { 0.0 };
                    assert!((got - want).abs() < 1e-5, "{name} {init:?}: {got} vs {want}");
                }
            }
        }
        assert!(mean.iter().any(|m| m.abs() > 1e-3), "the test data has a non-zero mean");
    }

    #[test]
    fn writes_weights_and_resolved_config() {
        let dir = tempfile::tempdir().unwrap();
        for (cfg, sub) in
            [(small_cfg(), "fast"), (TrialConfig { intermediate_dim: 16, ..small_cfg() }, "mirror")]
        {
            let out_dir = dir.path().join(sub);
            let opts = RunOptions { gpu: None, out_dir: Some(out_dir.clone()), files: true };
            let out = train(&cfg, &opts, &mut quiet).unwrap();
            assert_eq!(out.artifact.as_deref(), Some(out_dir.as_path()));
            let text = std::fs::read_to_string(out_dir.join("config.yaml")).unwrap();
            assert_eq!(TrialConfig::from_yaml(&text).unwrap(), cfg);
            let w =
                candle_core::safetensors::load(out_dir.join("weights.safetensors"), &Device::Cpu)
                    .unwrap();
            assert_eq!(w["encoder.bias"].dims(), &[256]);
        }
    }

    #[test]
    fn every_mode_trains_end_to_end() {
        use msae_shared::config::*;
        let base = TrialConfig { steps: 12, eval_every: 4, ..small_cfg() };
        let cfgs = [
            TrialConfig { layer_sparsity_mode: LayerSparsityMode::Lifetime, ..base.clone() },
            TrialConfig {
                layer_sparsity_mode: LayerSparsityMode::LifetimeBatchMean,
                ..base.clone()
            },
            TrialConfig { layer_sparsity_mode: LayerSparsityMode::Boosted, ..base.clone() },
            TrialConfig {
                layer_sparsity_mode: LayerSparsityMode::None,
                l1_weight: 0.1,
                kl_weight: 0.1,
                hoyer_weight: 0.1,
                ..base.clone()
            },
            TrialConfig {
                stripe_sparsity_mode: StripeSparsityMode::Ordinary,
                active_stripes_per_batch: 0.5,
                ..base.clone()
            },
            TrialConfig {
                stripe_sparsity_mode: StripeSparsityMode::Routing,
                routing_l1_regularization: 1e-3,
                intermediate_dim: 32,
                ..base.clone()
            },
            TrialConfig {
                activation: Activation::JumpRelu,
                tied_weights: true,
                output_relu: true,
                ..base.clone()
            },
            TrialConfig {
                aux_k: 16,
                dead_after_samples: 64,
                resample_dead_every: 5,
                k_curriculum_start: 64,
                k_curriculum_steps: 10,
                input_noise_std: 0.05,
                optimizer: Optimizer::Sgd,
                ..base.clone()
            },
        ];
        for cfg in cfgs {
            let out = train(&cfg, &RunOptions::default(), &mut quiet).unwrap();
            assert!(out.metrics[metrics::VAL_LOSS].is_finite(), "{cfg:?}");
            assert_eq!(out.metrics[metrics::STEPS], 12.0);
        }
    }

    #[test]
    fn epochs_set_the_number_of_steps() {
        // 2048 samples, 10% validation (205): 1843 training rows, ceil(1843 / 64) = 29 steps
        // per epoch.
        let cfg = TrialConfig { epochs: 2, eval_every: 0, ..small_cfg() };
        let cfg = TrialConfig { steps: msae_shared::config::DEFAULT_STEPS, ..cfg };
        let mut totals = Vec::new();
        let out = train(&cfg, &RunOptions::default(), &mut |p: &Progress| {
            totals.push(p.total_steps);
            Control::Continue
        })
        .unwrap();
        assert_eq!(out.metrics[metrics::STEPS], 58.0);
        assert!(totals.iter().all(|t| *t == 58), "{totals:?}");
        // Both given: a config error, before any data is read.
        let both = TrialConfig { epochs: 2, steps: 60, ..small_cfg() };
        let e = train(&both, &RunOptions::default(), &mut quiet).unwrap_err();
        assert!(is_permanent(&e) && format!("{e:#}").contains("epochs"), "{e:#}");
    }

    #[test]
    fn distortion_reaches_training_and_decays_by_epoch() {
        use msae_shared::config::{LayerSparsityMode, StripeSparsityMode};
        let mut base = TrialConfig {
            layer_sparsity_mode: LayerSparsityMode::None,
            stripe_sparsity_mode: StripeSparsityMode::Routing,
            intermediate_dim: 16,
            batch_size: 64,
            epochs: 3,
            eval_every: 0,
            ..TrialConfig::default()
        };
        base.data.synthetic.num_samples = 512; // 460 training rows: 8 steps per epoch
        let run = |distort_prob: f64, distort_prob_decay: f64| {
            let cfg = TrialConfig { distort_prob, distort_prob_decay, ..base.clone() };
            let mut m = train_with(&cfg, &RunOptions::default(), Backend::Candle, &mut quiet)
                .unwrap()
                .metrics;
            m.remove(metrics::SAMPLES_PER_SECOND);
            assert_eq!(m[metrics::STEPS], 24.0);
            m
        };
        let off = run(0.0, 0.0);
        let steady = run(0.4, 0.0);
        // p = 0.4 in the first epoch only: differs from both.
        let first_epoch_only = run(0.4, 0.4);
        assert_ne!(steady, off);
        assert_ne!(first_epoch_only, off);
        assert_ne!(first_epoch_only, steady);
        assert_eq!(run(0.4, 0.4), first_epoch_only, "distortion is deterministic");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn gpu_without_cuda_feature_says_how_to_rebuild() {
        let opts = RunOptions { gpu: Some(0), out_dir: None, files: true };
        let e = train(&small_cfg(), &opts, &mut quiet).unwrap_err().to_string();
        assert!(e.contains("built without CUDA support") && e.contains("--features cuda"), "{e}");
    }

    #[test]
    fn invalid_config_is_rejected_with_the_field() {
        let cfg = TrialConfig { layer_k: 0, ..small_cfg() };
        // `{:#}` shows the chain, as every caller (CLI, worker results) prints it.
        let e = format!("{:#}", train(&cfg, &RunOptions::default(), &mut quiet).unwrap_err());
        assert!(e.contains("layer_k"), "{e}");
        assert_eq!(e.matches("layer_k").count(), 1, "the cause is printed once: {e}");
    }
}
