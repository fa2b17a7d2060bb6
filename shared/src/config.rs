//! The trial configuration: every hyperparameter of one modular-SAE training run.
//!
//! One source of truth for the coordinator (sweep expansion and validation), the protocol
//! (carried as JSON) and the worker (training). Every field has a default, unknown keys are
//! rejected, and [`TrialConfig::validate`] names the offending field and says why.
//!
//! Nested blocks (`data`, `data.synthetic`) are addressed with dotted paths in sweeps
//! (`data.synthetic.noise_std`); see [`TrialConfig::has_path`] and [`TrialConfig::from_value`].

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A configuration value that is wrong, with the dotted path of the field and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { field: field.into(), message: message.into() }
    }
}

/// k-sparsity across the whole code layer, ignoring stripe boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LayerSparsityMode {
    /// No layer sparsity.
    #[default]
    None,
    /// Per sample, exactly the `layer_k` largest activations survive (top-k per row).
    Ordinary,
    /// Per code neuron, across the batch, its ceil(lifetime_rate * B) largest activations survive
    /// (the WTA-autoencoder rule, arXiv 1409.2752).
    Lifetime,
    /// The original code's variant: one shared set of `layer_k` neurons chosen by batch-mean
    /// activation survives for every sample.
    LifetimeBatchMean,
    /// k-winners of the boosted activations x * exp(beta * (k/N - duty)); outputs unboosted x
    /// (Numenta, arXiv 1903.11257). Duty cycles update in training only.
    Boosted,
}

/// k-sparsity across stripes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StripeSparsityMode {
    /// No stripe sparsity.
    #[default]
    None,
    /// Per sample, the `stripe_k` stripes with the highest mean activation survive.
    Ordinary,
    /// A learned linear router scores stripes from the layer before the code; the top `stripe_k`
    /// survive. The router learns from reconstruction through the gate (see [`RoutingGate`]).
    Routing,
}

/// How the routing gate passes gradient to the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RoutingGate {
    /// Kept stripes are multiplied by their router score (hard_topk * scores), so the router
    /// receives the reconstruction gradient directly.
    #[default]
    Scores,
    /// Forward multiplies by a 0/1 mask; backward passes the gradient to the selected scores as
    /// if the gate were the identity on them (straight-through estimator).
    StraightThrough,
}

/// Activation of the code layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    #[default]
    Relu,
    /// JumpReLU: z * H(z - theta) with a learned per-neuron threshold theta (straight-through
    /// gradient for theta with a rectangle kernel of width `jumprelu_bandwidth`).
    JumpRelu,
}

/// How the reconstruction's bias starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BiasInit {
    /// At the mean of the training split, as OpenAI's TopK SAE (so reconstruction starts at
    /// the data's centre and the codes only explain deviations from it).
    #[default]
    DataMean,
    /// At zero (the original code).
    Zero,
}

/// Optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    /// Adam (weight decay, if any, added to the gradient).
    Adam,
    /// AdamW (decoupled weight decay).
    #[default]
    Adamw,
    /// SGD with momentum (the original code used SGD, momentum 0.9).
    Sgd,
}

/// Where the training data comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DataSource {
    /// Generated from `seed` (see [`SyntheticConfig`]); identical on every worker, no files.
    #[default]
    Synthetic,
    /// A NumPy `.npy` array (float32/float64), 2-D, or N-D flattened to (N, prod(rest)).
    Npy,
    /// A named tensor in a safetensors file.
    Safetensors,
    /// MNIST IDX images (optionally gzipped), with an optional labels file.
    Mnist,
    /// Comma-separated numbers, one sample a line (optionally a header and a label column).
    Csv,
}

/// Per-feature scaling applied to the data (statistics from the training split).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Scaling {
    #[default]
    None,
    /// Subtract the mean and divide by the standard deviation of each input dimension.
    Standardize,
    /// Divide each sample by its L2 norm.
    UnitNorm,
    /// Divide everything by the largest absolute value (images: 255 -> 1).
    MaxAbs,
}

/// The synthetic dataset: unit ground-truth features grouped into clusters ("true stripes").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyntheticConfig {
    /// Dimension of the samples.
    pub input_dim: usize,
    /// Number of feature clusters.
    pub num_clusters: usize,
    /// Features per cluster.
    pub features_per_cluster: usize,
    /// Clusters active in each sample.
    pub active_clusters: usize,
    /// Features active within each active cluster.
    pub active_features: usize,
    /// Number of samples generated (train + validation).
    pub num_samples: usize,
    /// Coefficients are uniform in [coef_min, coef_max].
    pub coef_min: f64,
    pub coef_max: f64,
    /// Std of Gaussian noise added to every sample.
    pub noise_std: f64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            input_dim: 64,
            num_clusters: 8,
            features_per_cluster: 8,
            active_clusters: 2,
            active_features: 2,
            num_samples: 16384,
            coef_min: 0.5,
            coef_max: 1.5,
            noise_std: 0.0,
        }
    }
}

impl SyntheticConfig {
    /// Total number of ground-truth features.
    pub fn num_features(&self) -> usize {
        self.num_clusters * self.features_per_cluster
    }

    /// What generation needs, each field named by its dotted path (`data.synthetic.*`). The one
    /// check of these fields: the trial config's validation and the generator both call it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, message: String| {
            Err(ConfigError::new(format!("data.synthetic.{field}"), message))
        };
        for (name, v) in [
            ("input_dim", self.input_dim),
            ("num_clusters", self.num_clusters),
            ("features_per_cluster", self.features_per_cluster),
            ("active_clusters", self.active_clusters),
            ("active_features", self.active_features),
            ("num_samples", self.num_samples),
        ] {
            if v == 0 {
                return bad(name, "must be at least 1".into());
            }
        }
        if self.active_clusters > self.num_clusters {
            return bad(
                "active_clusters",
                format!(
                    "{} is larger than num_clusters ({})",
                    self.active_clusters, self.num_clusters
                ),
            );
        }
        if self.active_features > self.features_per_cluster {
            return bad(
                "active_features",
                format!(
                    "{} is larger than features_per_cluster ({})",
                    self.active_features, self.features_per_cluster
                ),
            );
        }
        if !(self.coef_min.is_finite()
            && self.coef_max.is_finite()
            && self.coef_min >= 0.0
            && self.coef_max >= self.coef_min)
        {
            return bad(
                "coef_min",
                format!("need 0 <= coef_min ({}) <= coef_max ({})", self.coef_min, self.coef_max),
            );
        }
        if !(self.noise_std.is_finite() && self.noise_std >= 0.0) {
            return bad("noise_std", format!("{} must be a finite number >= 0", self.noise_std));
        }
        Ok(())
    }
}

/// Data configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Where the data comes from. Absent: inferred from the extension of `path` when one is
    /// given (see [`DataConfig::resolved_source`]), else synthetic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<DataSource>,
    /// Data file (npy, safetensors, mnist images, csv), or for npy/safetensors a directory or a
    /// glob (`acts/*.npy`) of shards read as one dataset in name order. A relative path is
    /// resolved against the directory of the YAML file that names it.
    pub path: Option<PathBuf>,
    /// Tensor name inside a safetensors file (default: the only tensor).
    pub tensor: Option<String>,
    /// Labels file (MNIST IDX labels, or an .npy of integer labels) for per-class statistics;
    /// a directory or glob of label shards goes with sharded data.
    pub labels: Option<PathBuf>,
    /// CSV only: the 0-based column holding each row's integer label (the original project's
    /// `data.csv` has it first: 0). The other columns are the sample.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_column: Option<usize>,
    /// CSV only: whether the first line is a header. Absent: a first line with a field that is
    /// not a number is taken for a header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<bool>,
    /// Fraction of samples held out for validation, in (0, 1).
    pub validation_fraction: f64,
    /// Absent: integer data (uint8 images, CSV of 0..255 values) is divided by 255, other data is
    /// left as it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaling: Option<Scaling>,
    /// Use at most this many samples (0 = all).
    pub limit: usize,
    /// Read uncompressed npy/safetensors files through a memory map (the default). `false` copies
    /// them into memory instead (for comparison, or a file system where mapping misbehaves).
    #[serde(skip_serializing_if = "is_true")]
    pub mmap: bool,
    pub synthetic: SyntheticConfig,
}

fn is_true(b: &bool) -> bool {
    *b
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            source: None,
            path: None,
            tensor: None,
            labels: None,
            label_column: None,
            header: None,
            validation_fraction: 0.1,
            scaling: None,
            limit: 0,
            mmap: true,
            synthetic: SyntheticConfig::default(),
        }
    }
}

/// Every hyperparameter of one trial. Field names match the original code's flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrialConfig {
    /// Seed for initialisation, batching, noise and synthetic data.
    pub seed: u64,
    pub data: DataConfig,

    // --- architecture ---
    /// Width of the optional intermediate layer (0 = none: a classic one-layer SAE with a
    /// linear decoder of unit-norm atoms).
    pub intermediate_dim: usize,
    /// Number of stripes S.
    pub num_stripes: usize,
    /// Neurons per stripe D; the code layer has S*D neurons.
    pub stripe_dim: usize,
    /// Decoder weights are the encoder's, transposed.
    pub tied_weights: bool,
    /// L2-normalise decoder atoms in the forward pass.
    pub normalize_decoder: bool,
    /// Code-layer activation.
    pub activation: Activation,
    /// Initial JumpReLU threshold.
    pub jumprelu_threshold: f64,
    /// Width of the straight-through kernel for the JumpReLU threshold gradient.
    pub jumprelu_bandwidth: f64,
    /// ReLU on the reconstruction (the original applied it; off by default).
    pub output_relu: bool,
    /// Initial value of the reconstruction's bias in input space (`decoder.bias` of the classic
    /// SAE, `output.bias` with an intermediate layer).
    pub decoder_bias_init: BiasInit,

    // --- layer sparsity ---
    pub layer_sparsity_mode: LayerSparsityMode,
    /// k of layer sparsity ("num_active_neurons" in the original).
    pub layer_k: usize,
    /// Fraction of the batch each neuron keeps in `lifetime` mode, in (0, 1].
    pub lifetime_rate: f64,
    /// Boost strength beta of `boosted` mode.
    pub boost_strength: f64,
    /// Duty cycle period of `boosted` mode: the EMA weight of the newest batch is 1/period.
    pub duty_cycle_period: usize,

    // --- stripe sparsity ---
    pub stripe_sparsity_mode: StripeSparsityMode,
    /// Stripes kept per sample ("num_active_stripes" in the original).
    pub stripe_k: usize,
    /// lambda * ||router.weight||_1 added to the loss in `routing` mode.
    pub routing_l1_regularization: f64,
    pub routing_gate: RoutingGate,
    /// Fraction of the batch each stripe may be active for, in (0, 1]; 1 = off.
    pub active_stripes_per_batch: f64,
    /// The original's mask distortion: in training, each bit of the stripe masks (ordinary,
    /// routing and the `active_stripes_per_batch` mask) is flipped with this probability, so some
    /// suppressed stripes pass and some kept ones are dropped; in [0, 1], 0 = off (the original
    /// used 0.4). Never at evaluation. No effect without a stripe mask.
    pub distort_prob: f64,
    /// Subtracted from the distortion probability after every epoch (never below 0); the
    /// original used 0.025.
    pub distort_prob_decay: f64,

    // --- penalties ---
    /// Weight of the L1 penalty (mean |z|).
    pub l1_weight: f64,
    /// Weight of the KL penalty to the target rate.
    pub kl_weight: f64,
    /// Target activation rate rho of the KL penalty, in (0, 1).
    pub kl_target: f64,
    /// Weight of the Hoyer penalty (1 - Hoyer sparseness, mean over samples).
    pub hoyer_weight: f64,

    // --- variants ---
    /// AuxK: number of dead latents used to reconstruct the residual (0 = off).
    pub aux_k: usize,
    /// Weight of the AuxK loss.
    pub aux_k_coef: f64,
    /// A latent that has not fired for this many training samples counts as dead.
    pub dead_after_samples: usize,
    /// Resample dead neurons every this many steps (0 = never).
    pub resample_dead_every: usize,
    /// Linear k curriculum: start at this k and decay to the target (0 = off).
    pub k_curriculum_start: usize,
    /// Steps over which the curriculum decays.
    pub k_curriculum_steps: usize,
    /// Std of Gaussian noise added to the inputs in training.
    pub input_noise_std: f64,

    // --- training ---
    pub optimizer: Optimizer,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub batch_size: usize,
    /// Training steps (batches). Ignored when `epochs` is set (then it must stay at its
    /// default, [`DEFAULT_STEPS`]).
    pub steps: usize,
    /// Train for this many epochs instead of `steps` (0 = use `steps`): the run takes
    /// `epochs * ceil(train rows / batch_size)` steps ([`TrialConfig::total_steps`]).
    pub epochs: usize,
    /// Evaluate on the validation set every this many steps (0 = only at the end).
    pub eval_every: usize,
    /// Stop after this many evaluations without improvement of the validation loss (0 = off).
    pub early_stopping_patience: usize,
    /// Minimum decrease of the validation loss that counts as an improvement.
    pub early_stopping_min_delta: f64,

    /// Training steps per epoch, set by the training loop once the data are loaded
    /// ([`TrialConfig::steps_per_epoch`]), so a trainer can follow per-epoch schedules
    /// (`distort_prob_decay`). Not a hyperparameter: never read from or written to a config
    /// (0 = unknown: per-epoch schedules stay at their start).
    #[serde(skip)]
    pub run_steps_per_epoch: usize,
}

/// The default of `steps`; `epochs` may be set only while `steps` keeps it.
pub const DEFAULT_STEPS: usize = 2000;

impl Default for TrialConfig {
    fn default() -> Self {
        TrialConfig {
            seed: 0,
            data: DataConfig::default(),
            intermediate_dim: 0,
            num_stripes: 16,
            stripe_dim: 16,
            tied_weights: false,
            normalize_decoder: true,
            decoder_bias_init: BiasInit::DataMean,
            activation: Activation::Relu,
            jumprelu_threshold: 0.01,
            jumprelu_bandwidth: 0.01,
            output_relu: false,
            layer_sparsity_mode: LayerSparsityMode::Ordinary,
            layer_k: 8,
            lifetime_rate: 0.05,
            boost_strength: 1.0,
            duty_cycle_period: 1000,
            stripe_sparsity_mode: StripeSparsityMode::None,
            stripe_k: 4,
            routing_l1_regularization: 0.0,
            routing_gate: RoutingGate::Scores,
            active_stripes_per_batch: 1.0,
            distort_prob: 0.0,
            distort_prob_decay: 0.0,
            l1_weight: 0.0,
            kl_weight: 0.0,
            kl_target: 0.05,
            hoyer_weight: 0.0,
            aux_k: 0,
            aux_k_coef: 1.0 / 32.0,
            dead_after_samples: 100_000,
            resample_dead_every: 0,
            k_curriculum_start: 0,
            k_curriculum_steps: 0,
            input_noise_std: 0.0,
            optimizer: Optimizer::Adamw,
            lr: 1e-3,
            momentum: 0.9,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            batch_size: 256,
            steps: DEFAULT_STEPS,
            epochs: 0,
            eval_every: 250,
            early_stopping_patience: 0,
            early_stopping_min_delta: 0.0,
            run_steps_per_epoch: 0,
        }
    }
}

impl DataSource {
    /// The name used in configs (`npy`, `mnist`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DataSource::Synthetic => "synthetic",
            DataSource::Npy => "npy",
            DataSource::Safetensors => "safetensors",
            DataSource::Mnist => "mnist",
            DataSource::Csv => "csv",
        }
    }

    /// The file source a path's name implies: `.npy`, `.safetensors`, or MNIST IDX (`.gz`, or a
    /// name with `idx`/`ubyte` in it, as the MNIST files are named).
    pub fn infer_from_path(path: &std::path::Path) -> Option<DataSource> {
        let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
        if name.ends_with(".npy") {
            Some(DataSource::Npy)
        } else if name.ends_with(".safetensors") {
            Some(DataSource::Safetensors)
        } else if name.ends_with(".csv") {
            Some(DataSource::Csv)
        } else if name.ends_with(".gz") || name.contains("idx") || name.contains("ubyte") {
            Some(DataSource::Mnist)
        } else {
            None
        }
    }
}

impl DataConfig {
    /// The source that is used: `source` when given; otherwise the one `path`'s extension
    /// implies (an error naming `data.source` when it implies none); synthetic without a path.
    pub fn resolved_source(&self) -> Result<DataSource, ConfigError> {
        match (self.source, &self.path) {
            (Some(s), _) => Ok(s),
            (None, None) => Ok(DataSource::Synthetic),
            (None, Some(p)) => DataSource::infer_from_path(p).ok_or_else(|| {
                ConfigError::new(
                    "data.source",
                    format!(
                        "not given, and the name of data.path ({}) does not say the format \
                         (.npy, .safetensors, .csv, MNIST IDX or .gz); set data.source to npy, \
                         safetensors, csv or mnist (a directory of shards needs it too)",
                        p.display()
                    ),
                )
            }),
        }
    }

    /// True when the source was inferred from `path` rather than given.
    pub fn source_inferred(&self) -> bool {
        self.source.is_none() && self.path.is_some()
    }

    /// Make a relative `path` and `labels` relative to `base` (the directory of the YAML file
    /// that names them), so a config means the same files whatever the current directory.
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        for p in [&mut self.path, &mut self.labels].into_iter().flatten() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}

impl TrialConfig {
    /// Number of code neurons N = num_stripes * stripe_dim.
    pub fn code_dim(&self) -> usize {
        self.num_stripes * self.stripe_dim
    }

    /// Input dimension when it is known without reading files (synthetic data).
    pub fn known_input_dim(&self) -> Option<usize> {
        match self.data.resolved_source() {
            Ok(DataSource::Synthetic) => Some(self.data.synthetic.input_dim),
            _ => None,
        }
    }

    /// Build a config from a JSON value (sweep expansion works on values). Unknown keys and
    /// wrong types are errors naming the field.
    pub fn from_value(value: serde_json::Value) -> Result<Self, ConfigError> {
        serde_json::from_value(value).map_err(|e| ConfigError::new("config", e.to_string()))
    }

    /// Parse a YAML trial config (`msae-worker train --config trial.yaml`) and validate it.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let cfg: TrialConfig =
            crate::yaml::from_str(text).map_err(|e| ConfigError::new("config", e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The default config as JSON with every field present: fields left out of the serialised
    /// form while unset (so stored configs keep their fingerprints) are put back, with their
    /// default or null, so they can be named in sweeps.
    pub fn schema_value() -> serde_json::Value {
        let mut value = serde_json::to_value(TrialConfig::default()).expect("config serializes");
        if let Some(serde_json::Value::Object(data)) = value.get_mut("data") {
            for key in ["source", "scaling", "label_column", "header"] {
                data.entry(key).or_insert(serde_json::Value::Null);
            }
            data.entry("mmap").or_insert(serde_json::Value::Bool(true));
        }
        value
    }

    /// Whether `path` (dotted, e.g. `data.synthetic.noise_std`) names a field of the config.
    pub fn has_path(path: &str) -> bool {
        let mut value = Self::schema_value();
        for part in path.split('.') {
            match value {
                serde_json::Value::Object(mut map) => match map.remove(part) {
                    Some(v) => value = v,
                    None => return false,
                },
                _ => return false,
            }
        }
        true
    }

    /// Every leaf field path, for suggestions on misspelt parameter names.
    pub fn field_paths() -> Vec<String> {
        fn walk(prefix: &str, value: &serde_json::Value, out: &mut Vec<String>) {
            if let serde_json::Value::Object(map) = value {
                for (k, v) in map {
                    let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    if v.is_object() {
                        walk(&path, v, out);
                    }
                    out.push(path);
                }
            }
        }
        let mut out = Vec::new();
        walk("", &Self::schema_value(), &mut out);
        out
    }

    /// The known field path closest to `name`, if any is close enough to be a likely typo.
    pub fn suggest_path(name: &str) -> Option<String> {
        let paths = Self::field_paths();
        crate::suggest::closest(name, paths.iter().map(String::as_str)).map(str::to_string)
    }

    /// The layer k in effect at `step` (the linear curriculum decays from `k_curriculum_start`).
    pub fn layer_k_at(&self, step: usize) -> usize {
        if self.k_curriculum_start == 0 || self.k_curriculum_steps == 0 {
            return self.layer_k;
        }
        let start = self.k_curriculum_start as f64;
        let end = self.layer_k as f64;
        let t = (step as f64 / self.k_curriculum_steps as f64).min(1.0);
        (start + (end - start) * t).round().max(1.0) as usize
    }

    /// Training steps per epoch over `train_rows` rows: ceil(rows / batch), where a training
    /// set smaller than one batch is used whole (one step per epoch).
    pub fn steps_per_epoch(&self, train_rows: usize) -> usize {
        let b = self.batch_size.min(train_rows).max(1);
        train_rows.div_ceil(b).max(1)
    }

    /// The number of training steps of a run over `train_rows` rows: `epochs *
    /// steps_per_epoch(train_rows)` when `epochs` is set, else `steps`.
    pub fn total_steps(&self, train_rows: usize) -> usize {
        if self.epochs > 0 { self.epochs * self.steps_per_epoch(train_rows) } else { self.steps }
    }

    /// The stripe-mask distortion probability in epoch `epoch` (0-based): `distort_prob`
    /// lowered by `distort_prob_decay` per epoch, never below 0.
    pub fn distort_prob_at_epoch(&self, epoch: usize) -> f64 {
        decayed_prob(self.distort_prob, self.distort_prob_decay, epoch)
    }

    /// Check every value; the error names the field and says why it is impossible.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |f: &str, m: String| Err(ConfigError::new(f, m));
        let n = self.code_dim();
        if self.num_stripes == 0 {
            return err("num_stripes", "must be at least 1".into());
        }
        if self.stripe_dim == 0 {
            return err("stripe_dim", "must be at least 1".into());
        }
        if self.known_input_dim() == Some(0) {
            return err("data.synthetic.input_dim", "must be at least 1".into());
        }
        let uses_layer_k = matches!(
            self.layer_sparsity_mode,
            LayerSparsityMode::Ordinary
                | LayerSparsityMode::LifetimeBatchMean
                | LayerSparsityMode::Boosted
        );
        if uses_layer_k {
            if self.layer_k == 0 {
                return err("layer_k", "must be at least 1".into());
            }
            if self.layer_k > n {
                return err(
                    "layer_k",
                    format!(
                        "{} is larger than the code layer ({} stripes x {} = {n} neurons)",
                        self.layer_k, self.num_stripes, self.stripe_dim
                    ),
                );
            }
        }
        if self.k_curriculum_start > 0 {
            if !uses_layer_k {
                return err(
                    "k_curriculum_start",
                    "a k curriculum needs a layer_sparsity_mode that uses layer_k".into(),
                );
            }
            if self.k_curriculum_start > n {
                return err(
                    "k_curriculum_start",
                    format!(
                        "{} is larger than the code layer ({n} neurons)",
                        self.k_curriculum_start
                    ),
                );
            }
            if self.k_curriculum_start < self.layer_k {
                return err(
                    "k_curriculum_start",
                    format!(
                        "{} is smaller than layer_k ({}): the curriculum decays from a larger k",
                        self.k_curriculum_start, self.layer_k
                    ),
                );
            }
            if self.k_curriculum_steps == 0 {
                return err(
                    "k_curriculum_steps",
                    "must be at least 1 when k_curriculum_start is set".into(),
                );
            }
        }
        unit_interval("lifetime_rate", self.lifetime_rate)?;
        unit_interval("active_stripes_per_batch", self.active_stripes_per_batch)?;
        if !(0.0..=1.0).contains(&self.distort_prob) {
            return err("distort_prob", format!("{} must be in [0, 1]", self.distort_prob));
        }
        if !(self.boost_strength.is_finite() && self.boost_strength >= 0.0) {
            return err(
                "boost_strength",
                format!("{} must be a finite number >= 0", self.boost_strength),
            );
        }
        if self.duty_cycle_period == 0 {
            return err("duty_cycle_period", "must be at least 1".into());
        }
        if self.stripe_sparsity_mode != StripeSparsityMode::None {
            if self.stripe_k == 0 {
                return err("stripe_k", "must be at least 1".into());
            }
            if self.stripe_k > self.num_stripes {
                return err(
                    "stripe_k",
                    format!("{} is larger than num_stripes ({})", self.stripe_k, self.num_stripes),
                );
            }
        }
        for (name, v) in [
            ("routing_l1_regularization", self.routing_l1_regularization),
            ("l1_weight", self.l1_weight),
            ("kl_weight", self.kl_weight),
            ("hoyer_weight", self.hoyer_weight),
            ("aux_k_coef", self.aux_k_coef),
            ("input_noise_std", self.input_noise_std),
            ("weight_decay", self.weight_decay),
            ("early_stopping_min_delta", self.early_stopping_min_delta),
            ("distort_prob_decay", self.distort_prob_decay),
            ("jumprelu_threshold", self.jumprelu_threshold),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return err(name, format!("{v} must be a finite number >= 0"));
            }
        }
        if !(self.kl_target > 0.0 && self.kl_target < 1.0) {
            return err("kl_target", format!("{} must be in (0, 1)", self.kl_target));
        }
        if !(self.jumprelu_bandwidth.is_finite() && self.jumprelu_bandwidth > 0.0) {
            return err("jumprelu_bandwidth", format!("{} must be > 0", self.jumprelu_bandwidth));
        }
        if self.aux_k > n {
            return err(
                "aux_k",
                format!("{} is larger than the code layer ({n} neurons)", self.aux_k),
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return err("lr", format!("{} must be a finite number > 0", self.lr));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return err("momentum", format!("{} must be in [0, 1)", self.momentum));
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return err("beta1", format!("{} must be in [0, 1)", self.beta1));
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return err("beta2", format!("{} must be in [0, 1)", self.beta2));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return err("eps", format!("{} must be > 0", self.eps));
        }
        if self.batch_size == 0 {
            return err("batch_size", "must be at least 1".into());
        }
        if self.steps == 0 {
            return err("steps", "must be at least 1".into());
        }
        if self.epochs > 0 && self.steps != DEFAULT_STEPS {
            return err(
                "epochs",
                format!(
                    "{} epochs and {} steps are both given; give one (epochs sets the number of \
                     steps: epochs * ceil(training rows / batch_size))",
                    self.epochs, self.steps
                ),
            );
        }
        self.validate_data()
    }

    fn validate_data(&self) -> Result<(), ConfigError> {
        let d = &self.data;
        // Evaluation, early stopping and every reported metric need a validation split.
        if !(d.validation_fraction > 0.0 && d.validation_fraction < 1.0) {
            return Err(ConfigError::new(
                "data.validation_fraction",
                format!("{} must be in (0, 1)", d.validation_fraction),
            ));
        }
        let source = d.resolved_source()?;
        // A field the chosen source does not read would be silently ignored: refuse it.
        let unused = |field: &str, used_by: &str| {
            Err(ConfigError::new(
                field,
                format!(
                    "not used when data.source is {}; it is read only {used_by}",
                    source.name()
                ),
            ))
        };
        if source != DataSource::Synthetic && d.synthetic != SyntheticConfig::default() {
            return unused("data.synthetic", "with synthetic data");
        }
        if source != DataSource::Safetensors && d.tensor.is_some() {
            return unused("data.tensor", "from a safetensors file");
        }
        if source != DataSource::Csv && d.label_column.is_some() {
            return unused("data.label_column", "from a CSV file");
        }
        if source != DataSource::Csv && d.header.is_some() {
            return unused("data.header", "from a CSV file");
        }
        if d.label_column.is_some() && d.labels.is_some() {
            return Err(ConfigError::new(
                "data.labels",
                "data.label_column already gives the labels; set one of the two",
            ));
        }
        match source {
            DataSource::Synthetic => {
                if d.path.is_some() {
                    return Err(ConfigError::new(
                        "data.path",
                        "not used when data.source is synthetic; set data.source to npy, \
                         safetensors or mnist (or leave it out to infer it from the file name)",
                    ));
                }
                if d.labels.is_some() {
                    return unused("data.labels", "with a data file (npy, safetensors, mnist)");
                }
                let s = &d.synthetic;
                s.validate()?;
                let val = (s.num_samples as f64 * d.validation_fraction).ceil() as usize;
                if s.num_samples <= val {
                    return Err(ConfigError::new(
                        "data.synthetic.num_samples",
                        format!(
                            "{} leaves no training samples after the validation split",
                            s.num_samples
                        ),
                    ));
                }
            }
            DataSource::Npy | DataSource::Safetensors | DataSource::Mnist | DataSource::Csv => {
                if d.path.is_none() {
                    return Err(ConfigError::new(
                        "data.path",
                        format!("required when data.source is {}", source.name()),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `start` lowered by `decay` per epoch, never below 0: the schedule of `distort_prob`.
pub fn decayed_prob(start: f64, decay: f64, epoch: usize) -> f64 {
    (start - decay * epoch as f64).max(0.0)
}

fn unit_interval(field: &str, v: f64) -> Result<(), ConfigError> {
    if v > 0.0 && v <= 1.0 {
        Ok(())
    } else {
        Err(ConfigError::new(field, format!("{v} must be in (0, 1]")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        TrialConfig::default().validate().unwrap();
    }

    #[test]
    fn k_larger_than_layer_is_named() {
        let cfg = TrialConfig { layer_k: 1000, ..Default::default() };
        let e = cfg.validate().unwrap_err();
        assert_eq!(e.field, "layer_k");
        assert!(e.message.contains("larger than the code layer"), "{e}");
        assert!(e.message.contains("256"), "{e}");
    }

    #[test]
    fn stripe_k_larger_than_num_stripes() {
        let cfg = TrialConfig {
            stripe_sparsity_mode: StripeSparsityMode::Ordinary,
            stripe_k: 17,
            ..Default::default()
        };
        let e = cfg.validate().unwrap_err();
        assert_eq!(e.field, "stripe_k");
        assert!(e.message.contains("num_stripes (16)"), "{e}");
    }

    #[test]
    fn rates_outside_unit_interval() {
        for bad in [0.0, -0.1, 1.5, f64::NAN] {
            let cfg = TrialConfig { lifetime_rate: bad, ..Default::default() };
            assert_eq!(cfg.validate().unwrap_err().field, "lifetime_rate");
            let cfg = TrialConfig { active_stripes_per_batch: bad, ..Default::default() };
            assert_eq!(cfg.validate().unwrap_err().field, "active_stripes_per_batch");
        }
        let cfg =
            TrialConfig { active_stripes_per_batch: 1.0, lifetime_rate: 1.0, ..Default::default() };
        cfg.validate().unwrap();
    }

    #[test]
    fn unknown_keys_rejected() {
        let e = TrialConfig::from_yaml("layer_k: 4\nlayer_kk: 5\n").unwrap_err();
        assert!(e.message.contains("unknown field `layer_kk`"), "{e}");
        let e = TrialConfig::from_yaml("data:\n  synthetic:\n    noise: 1\n").unwrap_err();
        assert!(e.message.contains("unknown field `noise`"), "{e}");
    }

    #[test]
    fn yaml_round_trip_and_modes() {
        let cfg = TrialConfig::from_yaml(
            "layer_sparsity_mode: boosted\nstripe_sparsity_mode: routing\nstripe_k: 2\noptimizer: sgd\n",
        )
        .unwrap();
        assert_eq!(cfg.layer_sparsity_mode, LayerSparsityMode::Boosted);
        assert_eq!(cfg.stripe_sparsity_mode, StripeSparsityMode::Routing);
        assert_eq!(cfg.optimizer, Optimizer::Sgd);
        let text = crate::yaml::to_string(&cfg).unwrap();
        assert_eq!(TrialConfig::from_yaml(&text).unwrap(), cfg);
        let e = TrialConfig::from_yaml("layer_sparsity_mode: sideways\n").unwrap_err();
        assert!(e.message.contains("unknown variant `sideways`"), "{e}");
    }

    #[test]
    fn paths_and_suggestions() {
        assert!(TrialConfig::has_path("lr"));
        assert!(TrialConfig::has_path("data.synthetic.noise_std"));
        assert!(!TrialConfig::has_path("data.synthetic.nope"));
        // Fields not serialised while unset can still be named in a sweep.
        for p in ["data.source", "data.scaling", "data.label_column", "data.header", "data.mmap"] {
            assert!(TrialConfig::has_path(p), "{p}");
        }
        assert!(!TrialConfig::has_path("lr.x"));
        assert_eq!(TrialConfig::suggest_path("stripe_kk").as_deref(), Some("stripe_k"));
        assert_eq!(TrialConfig::suggest_path("zzzzzz"), None);
    }

    #[test]
    fn file_sources_need_a_path() {
        let mut cfg = TrialConfig::default();
        cfg.data.source = Some(DataSource::Npy);
        assert_eq!(cfg.validate().unwrap_err().field, "data.path");
    }

    fn data_yaml(data: &str) -> Result<TrialConfig, ConfigError> {
        TrialConfig::from_yaml(&format!("data: {data}\n"))
    }

    #[test]
    fn synthetic_checks_are_one_set_for_config_and_generator() {
        // Regression (drift): the generator allowed coef_min < 0 and the config input_dim 0.
        for (yaml, field) in [
            ("{synthetic: {coef_min: -1}}", "data.synthetic.coef_min"),
            ("{synthetic: {input_dim: 0}}", "data.synthetic.input_dim"),
            ("{synthetic: {noise_std: .nan}}", "data.synthetic.noise_std"),
            ("{synthetic: {active_clusters: 9}}", "data.synthetic.active_clusters"),
        ] {
            let e = data_yaml(yaml).unwrap_err();
            assert_eq!(e.field, field, "{yaml}: {e}");
        }
        assert_eq!(
            SyntheticConfig { coef_min: -1.0, ..Default::default() }.validate().unwrap_err().field,
            "data.synthetic.coef_min"
        );
    }

    #[test]
    fn source_is_inferred_from_the_file_name() {
        for (path, source) in [
            ("acts.npy", DataSource::Npy),
            ("dir/Acts.NPY", DataSource::Npy),
            ("m.safetensors", DataSource::Safetensors),
            ("train-images-idx3-ubyte", DataSource::Mnist),
            ("train-images-idx3-ubyte.gz", DataSource::Mnist),
        ] {
            let cfg = data_yaml(&format!("{{path: {path}}}")).unwrap();
            assert_eq!(cfg.data.resolved_source().unwrap(), source, "{path}");
            assert!(cfg.data.source_inferred());
            assert_eq!(cfg.known_input_dim(), None, "{path} is not synthetic");
        }
        let cfg = data_yaml("{source: npy, path: x.bin}").unwrap();
        assert_eq!(cfg.data.resolved_source().unwrap(), DataSource::Npy);
        assert!(!cfg.data.source_inferred());
        let e = data_yaml("{path: x.bin}").unwrap_err();
        assert_eq!(e.field, "data.source");
        assert!(e.message.contains("x.bin"), "{e}");
        // Without a path the default stays synthetic, and an absent source is not serialised.
        let cfg = TrialConfig::default();
        assert_eq!(cfg.data.resolved_source().unwrap(), DataSource::Synthetic);
        assert!(!serde_json::to_string(&cfg).unwrap().contains("source"));
    }

    #[test]
    fn fields_the_source_does_not_read_are_refused() {
        for (data, field) in [
            ("{source: synthetic, path: x.npy}", "data.path"),
            ("{source: synthetic, labels: y.npy}", "data.labels"),
            ("{tensor: acts}", "data.tensor"),
            ("{path: x.npy, tensor: acts}", "data.tensor"),
            ("{path: x.npy, synthetic: {noise_std: 0.1}}", "data.synthetic"),
        ] {
            let e = data_yaml(data).unwrap_err();
            assert_eq!(e.field, field, "{data}: {e}");
            assert!(e.message.contains("not used"), "{data}: {e}");
        }
        data_yaml("{path: m.safetensors, tensor: acts, labels: y.npy}").unwrap();
        data_yaml("{synthetic: {noise_std: 0.1}}").unwrap();
    }

    #[test]
    fn curriculum_must_start_above_the_target() {
        let cfg = TrialConfig {
            layer_k: 8,
            k_curriculum_start: 4,
            k_curriculum_steps: 10,
            ..Default::default()
        };
        let e = cfg.validate().unwrap_err();
        assert_eq!(e.field, "k_curriculum_start");
        assert!(e.message.contains("smaller than layer_k (8)"), "{e}");
    }

    #[test]
    fn distortion_fields_are_checked_and_off_by_default() {
        let d = TrialConfig::default();
        assert_eq!((d.distort_prob, d.distort_prob_decay), (0.0, 0.0));
        for bad in [-0.1, 1.1, f64::NAN] {
            let cfg = TrialConfig { distort_prob: bad, ..Default::default() };
            assert_eq!(cfg.validate().unwrap_err().field, "distort_prob", "{bad}");
        }
        for bad in [-0.025, f64::INFINITY] {
            let cfg = TrialConfig { distort_prob_decay: bad, ..Default::default() };
            assert_eq!(cfg.validate().unwrap_err().field, "distort_prob_decay", "{bad}");
        }
        let cfg = TrialConfig::from_yaml("distort_prob: 0.4\ndistort_prob_decay: 0.025\n").unwrap();
        assert_eq!((cfg.distort_prob, cfg.distort_prob_decay), (0.4, 0.025));
        TrialConfig { distort_prob: 1.0, ..Default::default() }.validate().unwrap();
    }

    #[test]
    fn distortion_decays_per_epoch_down_to_zero() {
        let cfg =
            TrialConfig { distort_prob: 0.4, distort_prob_decay: 0.025, ..Default::default() };
        assert_eq!(cfg.distort_prob_at_epoch(0), 0.4);
        assert!((cfg.distort_prob_at_epoch(1) - 0.375).abs() < 1e-12);
        assert!((cfg.distort_prob_at_epoch(10) - 0.15).abs() < 1e-12);
        assert!(cfg.distort_prob_at_epoch(15) < 0.025 + 1e-12);
        assert_eq!(cfg.distort_prob_at_epoch(16), 0.0);
        assert_eq!(cfg.distort_prob_at_epoch(1000), 0.0);
        // Without a decay the probability stays.
        let cfg = TrialConfig { distort_prob: 0.4, ..Default::default() };
        assert_eq!(cfg.distort_prob_at_epoch(50), 0.4);
    }

    #[test]
    fn epochs_set_the_steps_and_exclude_steps() {
        let cfg = TrialConfig { epochs: 3, batch_size: 8, ..Default::default() };
        cfg.validate().unwrap();
        // ceil(100 / 8) = 13 steps per epoch.
        assert_eq!(cfg.steps_per_epoch(100), 13);
        assert_eq!(cfg.total_steps(100), 39);
        assert_eq!(cfg.steps_per_epoch(96), 12);
        assert_eq!(cfg.total_steps(96), 36);
        // A training set smaller than a batch is one step per epoch.
        assert_eq!(cfg.steps_per_epoch(5), 1);
        assert_eq!(cfg.total_steps(5), 3);
        // Without epochs, steps count.
        let cfg = TrialConfig { steps: 7, batch_size: 8, ..Default::default() };
        assert_eq!(cfg.total_steps(100), 7);
        assert_eq!(cfg.steps_per_epoch(100), 13);
        // Both given: refused, naming epochs.
        let e = TrialConfig::from_yaml("epochs: 20\nsteps: 500\n").unwrap_err();
        assert_eq!(e.field, "epochs");
        assert!(e.message.contains("both given"), "{e}");
        let cfg = TrialConfig::from_yaml("epochs: 20\nbatch_size: 8\n").unwrap();
        assert_eq!(cfg.epochs, 20);
        // The runtime field is neither read nor written.
        let e = TrialConfig::from_yaml("run_steps_per_epoch: 5\n").unwrap_err();
        assert!(e.message.contains("unknown field"), "{e}");
        let cfg = TrialConfig { run_steps_per_epoch: 9, ..Default::default() };
        let text = crate::yaml::to_string(&cfg).unwrap();
        assert!(!text.contains("run_steps_per_epoch"), "{text}");
        assert!(!TrialConfig::has_path("run_steps_per_epoch"));
    }

    #[test]
    fn curriculum_decays_linearly() {
        let cfg = TrialConfig {
            layer_k: 8,
            k_curriculum_start: 64,
            k_curriculum_steps: 100,
            ..Default::default()
        };
        assert_eq!(cfg.layer_k_at(0), 64);
        assert_eq!(cfg.layer_k_at(50), 36);
        assert_eq!(cfg.layer_k_at(100), 8);
        assert_eq!(cfg.layer_k_at(1000), 8);
    }
}
