//! `msae-worker bench`: times training steps of the trainers on random data.
//!
//! For each shape (batch B, input d, latents n, k) and each path it runs warm-up steps, then
//! times `--steps` steps and reports ms/step, samples/s and achieved GFLOP/s, counting every
//! step as a dense one: 12*B*d*n FLOPs (six GEMMs: encoder and decoder, forward, and two
//! gradients each), so the figure is comparable across paths and with PyTorch. Paths:
//! - `fast`: the hand-written top-k path ([`crate::sae::classic::FastTopK`]);
//! - `candle`: the general candle model ([`crate::sae::model::CandleTrainer`]) on the same top-k config;
//! - `dense`: the dense SAE (`layer_sparsity_mode: none`) on the fast path, which is what
//!   training uses for that config (every product a dense GEMM);
//! - `dense-candle`: the same dense SAE on the general candle model, for comparison.
//!
//! Data are standard-normal rows from `--seed` (no files); a few batches are cycled so the
//! timing includes reading fresh inputs without measuring the generator.
//! `worker/bench/torch_topk.py` is the PyTorch side-by-side at the same shapes.
//!
//! Any trial config can be timed too: `--config FILE` (repeatable, the YAML `msae-worker train`
//! reads) and `--preset NAME` (named sets of configs, e.g. `original`: the modular SAE of the
//! original code in every mode of issue 7's table, the files in `worker/bench/configs/`).
//! `--batch N` (repeatable or a comma list) overrides `batch_size`. The input dimension is
//! `--dim` when given, else the config's synthetic `input_dim`, else 784. For each config and
//! batch two trainers are timed: the one training picks ([`crate::train::make_trainer`] with
//! [`Backend::Auto`]) and the candle model ([`Backend::Candle`]); when training picks the candle
//! model it is timed once and the ratio is 1. `worker/bench/torch_modular.py` is the PyTorch
//! reference of the original model, reading the same files with the same flags.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use anyhow::Context as _;
use candle_core::Device;
use msae_shared::config::{LayerSparsityMode, Optimizer, TrialConfig};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;

use crate::sae::classic::FastTopK;
use crate::sae::model::CandleTrainer;
use crate::sae::trainer::Trainer;
use crate::train::{Backend, make_trainer};

/// Batches generated per shape and cycled through while timing.
const DATA_BATCHES: usize = 4;

/// Input dimension of a config whose data are a file, when `--dim` is not given (MNIST's).
pub const DEFAULT_FILE_DIM: usize = 784;

/// Named sets of trial configs for `--preset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// The original code's architecture (784 -> 250 -> 30x5 -> 250 -> 784, SGD) in every mode
    /// of issue 7's table: layer none/ordinary/lifetime/boosted x stripe none/ordinary/routing,
    /// then on routing: active_stripes_per_batch 0.5, L1, KL, Hoyer, JumpReLU, tied weights.
    Original,
}

/// The `original` preset: (name, YAML), the files of `worker/bench/configs/`.
pub const ORIGINAL_PRESET: &[(&str, &str)] = &[
    ("L-none_S-none", include_str!("../bench/configs/L-none_S-none.yaml")),
    ("L-none_S-ordinary", include_str!("../bench/configs/L-none_S-ordinary.yaml")),
    ("L-none_S-routing", include_str!("../bench/configs/L-none_S-routing.yaml")),
    ("L-ordinary_S-none", include_str!("../bench/configs/L-ordinary_S-none.yaml")),
    ("L-ordinary_S-ordinary", include_str!("../bench/configs/L-ordinary_S-ordinary.yaml")),
    ("L-ordinary_S-routing", include_str!("../bench/configs/L-ordinary_S-routing.yaml")),
    ("L-lifetime_S-none", include_str!("../bench/configs/L-lifetime_S-none.yaml")),
    ("L-lifetime_S-ordinary", include_str!("../bench/configs/L-lifetime_S-ordinary.yaml")),
    ("L-lifetime_S-routing", include_str!("../bench/configs/L-lifetime_S-routing.yaml")),
    ("L-boosted_S-none", include_str!("../bench/configs/L-boosted_S-none.yaml")),
    ("L-boosted_S-ordinary", include_str!("../bench/configs/L-boosted_S-ordinary.yaml")),
    ("L-boosted_S-routing", include_str!("../bench/configs/L-boosted_S-routing.yaml")),
    (
        "L-none_S-routing_active-stripes-0.5",
        include_str!("../bench/configs/L-none_S-routing_active-stripes-0.5.yaml"),
    ),
    (
        "L-none_S-routing_penalty-l1",
        include_str!("../bench/configs/L-none_S-routing_penalty-l1.yaml"),
    ),
    (
        "L-none_S-routing_penalty-kl",
        include_str!("../bench/configs/L-none_S-routing_penalty-kl.yaml"),
    ),
    (
        "L-none_S-routing_penalty-hoyer",
        include_str!("../bench/configs/L-none_S-routing_penalty-hoyer.yaml"),
    ),
    ("L-none_S-routing_jumprelu", include_str!("../bench/configs/L-none_S-routing_jumprelu.yaml")),
    ("L-none_S-routing_tied", include_str!("../bench/configs/L-none_S-routing_tied.yaml")),
];

impl Preset {
    /// The preset's (name, YAML) pairs.
    pub fn files(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Preset::Original => ORIGINAL_PRESET,
        }
    }

    /// The preset's configs, parsed and validated.
    pub fn configs(self) -> anyhow::Result<Vec<NamedConfig>> {
        self.files()
            .iter()
            .map(|(name, yaml)| {
                let cfg = TrialConfig::from_yaml(yaml)
                    .with_context(|| format!("preset config {name}"))?;
                Ok(NamedConfig { name: (*name).to_string(), cfg })
            })
            .collect()
    }
}

/// A trial config to time, with the name it is reported under (a file's stem or a preset entry).
#[derive(Debug, Clone, PartialEq)]
pub struct NamedConfig {
    pub name: String,
    pub cfg: TrialConfig,
}

impl NamedConfig {
    /// Read a trial-config YAML file; the name is the file's stem.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let cfg = crate::cli::read_config(path)?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Ok(NamedConfig { name, cfg })
    }
}

/// One benchmark shape: batch, input dimension, latents, k.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shape {
    pub batch: usize,
    pub input: usize,
    pub latents: usize,
    pub k: usize,
}

impl Shape {
    /// FLOPs of one dense training step: 12 * B * d * n.
    pub fn dense_flops(&self) -> f64 {
        12.0 * self.batch as f64 * self.input as f64 * self.latents as f64
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "batch {} input {} latents {} k {}", self.batch, self.input, self.latents, self.k)
    }
}

impl FromStr for Shape {
    type Err = String;

    /// `B,D,N,K`, e.g. `256,784,2048,32`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        let [b, d, n, k] = parts.as_slice() else {
            return Err(format!("shape {s:?}: expected BATCH,INPUT,LATENTS,K (four numbers)"));
        };
        let num = |name: &str, v: &str| -> Result<usize, String> {
            match v.parse::<usize>() {
                Ok(x) if x > 0 => Ok(x),
                _ => Err(format!("shape {s:?}: {name} {v:?} is not a positive integer")),
            }
        };
        let shape = Shape {
            batch: num("batch", b)?,
            input: num("input", d)?,
            latents: num("latents", n)?,
            k: num("k", k)?,
        };
        if shape.k > shape.latents {
            return Err(format!(
                "shape {s:?}: k {} is larger than latents {}",
                shape.k, shape.latents
            ));
        }
        Ok(shape)
    }
}

/// The two shapes of issue 2's speed targets.
pub const DEFAULT_SHAPES: [Shape; 2] = [
    Shape { batch: 256, input: 784, latents: 2048, k: 32 },
    Shape { batch: 1024, input: 512, latents: 4096, k: 64 },
];

/// Which trainer(s) to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchPath {
    /// The hand-written top-k fast path.
    Fast,
    /// The general candle model on the same top-k config.
    Candle,
    /// The dense SAE (no top-k) on the fast path, as training runs it.
    Dense,
    /// The dense SAE on the general candle model.
    DenseCandle,
    /// All four.
    All,
}

impl BenchPath {
    fn expand(self) -> Vec<BenchPath> {
        match self {
            BenchPath::All => {
                vec![BenchPath::Fast, BenchPath::Candle, BenchPath::Dense, BenchPath::DenseCandle]
            }
            p => vec![p],
        }
    }

    fn name(self) -> &'static str {
        match self {
            BenchPath::Fast => "fast",
            BenchPath::Candle => "candle",
            BenchPath::Dense => "dense",
            BenchPath::DenseCandle => "dense-candle",
            BenchPath::All => "all",
        }
    }
}

/// A positive integer flag value.
fn positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?} is not a positive integer")),
    }
}

/// Time SAE training steps and print samples/s and GFLOP/s per shape and path.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// A shape to time, as BATCH,INPUT,LATENTS,K; repeat for several. Default: the two shapes
    /// of the speed targets, 256,784,2048,32 and 1024,512,4096,64.
    #[arg(long = "shape", value_name = "B,D,N,K")]
    pub shapes: Vec<Shape>,
    /// Timed training steps per shape and path.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed warm-up steps before timing (first-touch of buffers, thread pool start).
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Which trainer to time (for `--shape`).
    #[arg(long, value_enum, default_value_t = BenchPath::All)]
    pub path: BenchPath,
    /// A trial config YAML to time (as `msae-worker train --config` reads it); repeatable.
    #[arg(long = "config", value_name = "FILE")]
    pub configs: Vec<PathBuf>,
    /// A named set of trial configs to time; repeatable.
    #[arg(long = "preset", value_enum)]
    pub presets: Vec<Preset>,
    /// Batch sizes overriding the configs' batch_size; repeatable or a comma list (8,256).
    #[arg(long = "batch", value_name = "N", value_delimiter = ',', value_parser = positive)]
    pub batches: Vec<usize>,
    /// Input dimension for configs (default: the synthetic input_dim, or 784 for a data file).
    #[arg(long, value_name = "D", value_parser = positive)]
    pub dim: Option<usize>,
    /// Keep timing past `--steps` until this many seconds have passed (steadier figures for
    /// fast steps).
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0)]
    pub min_time: f64,
    /// Print the results as one JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Seed of the random data and of the models' initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl Default for BenchArgs {
    fn default() -> Self {
        BenchArgs {
            shapes: Vec::new(),
            steps: 20,
            warmup: 3,
            path: BenchPath::All,
            configs: Vec::new(),
            presets: Vec::new(),
            batches: Vec::new(),
            dim: None,
            min_time: 0.0,
            json: false,
            seed: 0,
        }
    }
}

/// The timing of one path at one shape.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub path: BenchPath,
    pub steps: usize,
    /// Mean wall time per step.
    pub ms_per_step: f64,
    /// Fastest single step.
    pub min_ms: f64,
    pub samples_per_s: f64,
    /// 12*B*d*n / time per step.
    pub gflops: f64,
    /// Loss of the last timed step (a sanity check that the step did real work).
    pub last_loss: f64,
}

/// All paths at one shape.
#[derive(Debug, Clone, Serialize)]
pub struct ShapeReport {
    pub shape: Shape,
    pub results: Vec<Measurement>,
    /// samples/s of `fast` over samples/s of `candle`, when both ran.
    pub fast_vs_candle: Option<f64>,
    /// samples/s of `dense` over samples/s of `dense-candle`, when both ran.
    pub dense_vs_candle: Option<f64>,
}

/// The trial config a path trains at `shape`: one stripe of `latents` neurons, AdamW.
pub fn bench_config(shape: &Shape, path: BenchPath, seed: u64) -> TrialConfig {
    let mut cfg = TrialConfig {
        seed,
        num_stripes: 1,
        stripe_dim: shape.latents,
        layer_k: shape.k,
        batch_size: shape.batch,
        optimizer: Optimizer::Adamw,
        lr: 1e-4,
        ..TrialConfig::default()
    };
    cfg.data.synthetic.input_dim = shape.input;
    if matches!(path, BenchPath::Dense | BenchPath::DenseCandle) {
        cfg.layer_sparsity_mode = LayerSparsityMode::None;
    }
    cfg
}

fn build(shape: &Shape, path: BenchPath, seed: u64) -> anyhow::Result<Box<dyn Trainer>> {
    let cfg = bench_config(shape, path, seed);
    Ok(match path {
        BenchPath::Fast | BenchPath::Dense => Box::new(FastTopK::new(&cfg, shape.input)?),
        BenchPath::Candle | BenchPath::DenseCandle => {
            Box::new(CandleTrainer::new(&cfg, shape.input, &Device::Cpu)?)
        }
        BenchPath::All => anyhow::bail!("`all` is not a single path"),
    })
}

/// What [`time_steps`] measured.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub steps: usize,
    /// Mean seconds per timed step.
    pub per_step: f64,
    /// Fastest single step, seconds.
    pub min: f64,
    pub last_loss: f64,
}

/// `args.warmup` untimed steps, then at least `args.steps` timed steps (and at least
/// `args.min_time` seconds), cycling through `data`.
pub fn time_steps(
    trainer: &mut dyn Trainer,
    args: &BenchArgs,
    data: &[Vec<f32>],
) -> anyhow::Result<Timing> {
    for s in 0..args.warmup {
        trainer.step(&data[s % data.len()], s)?;
    }
    let steps = args.steps.max(1);
    let mut min = f64::INFINITY;
    let mut last_loss = 0.0;
    let start = Instant::now();
    let mut s = 0;
    while s < steps || start.elapsed().as_secs_f64() < args.min_time {
        let t = Instant::now();
        last_loss = trainer.step(&data[s % data.len()], args.warmup + s)?;
        min = min.min(t.elapsed().as_secs_f64());
        s += 1;
    }
    let per_step = start.elapsed().as_secs_f64() / s as f64;
    Ok(Timing { steps: s, per_step, min, last_loss })
}

/// Time one path at one shape on `data` (batches of `shape.batch` rows).
pub fn measure(
    shape: &Shape,
    path: BenchPath,
    args: &BenchArgs,
    data: &[Vec<f32>],
) -> anyhow::Result<Measurement> {
    let mut trainer = build(shape, path, args.seed)?;
    let t = time_steps(trainer.as_mut(), args, data)?;
    Ok(Measurement {
        path,
        steps: t.steps,
        ms_per_step: t.per_step * 1e3,
        min_ms: t.min * 1e3,
        samples_per_s: shape.batch as f64 / t.per_step,
        gflops: shape.dense_flops() / t.per_step / 1e9,
        last_loss: t.last_loss,
    })
}

/// Standard-normal batches for `shape`, from `seed`.
pub fn random_batches(shape: &Shape, seed: u64) -> Vec<Vec<f32>> {
    random_rows(shape.batch, shape.input, seed)
}

/// [`DATA_BATCHES`] standard-normal batches of `rows` x `dim`, from `seed`.
pub fn random_rows(rows: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..DATA_BATCHES)
        .map(|_| (0..rows * dim).map(|_| StandardNormal.sample(&mut rng)).collect())
        .collect()
}

/// The timing of one trainer on one config at one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct TrainerTiming {
    /// The trainer's name (`fast`, `candle`, ...), as [`make_trainer`] reports it.
    pub trainer: String,
    pub steps: usize,
    pub ms_per_step: f64,
    pub min_ms: f64,
    pub samples_per_s: f64,
    /// Loss of the last timed step (a sanity check that the step did real work).
    pub last_loss: f64,
}

impl TrainerTiming {
    fn new(trainer: &str, batch: usize, t: Timing) -> Self {
        TrainerTiming {
            trainer: trainer.to_string(),
            steps: t.steps,
            ms_per_step: t.per_step * 1e3,
            min_ms: t.min * 1e3,
            samples_per_s: batch as f64 / t.per_step,
            last_loss: t.last_loss,
        }
    }
}

/// One config at one batch size: the trainer training selects, and the candle model.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigReport {
    pub config: String,
    pub batch: usize,
    pub dim: usize,
    /// The trainer training picks for this config.
    pub selected: TrainerTiming,
    /// The candle model (the same measurement as `selected` when training picks candle).
    pub candle: TrainerTiming,
    /// samples/s of `selected` over samples/s of `candle`.
    pub selected_vs_candle: f64,
}

/// The configs named by `--config` and `--preset`, in that order.
pub fn requested_configs(args: &BenchArgs) -> anyhow::Result<Vec<NamedConfig>> {
    let mut out = Vec::new();
    for path in &args.configs {
        out.push(NamedConfig::from_file(path)?);
    }
    for preset in &args.presets {
        out.extend(preset.configs()?);
    }
    Ok(out)
}

/// Every (config, batch) pair to time: each config at each `--batch` (its own batch_size when
/// none is given), validated, with the input dimension it is timed at.
pub fn expand_batches(
    configs: &[NamedConfig],
    batches: &[usize],
    dim: Option<usize>,
) -> anyhow::Result<Vec<(NamedConfig, usize)>> {
    let mut out = Vec::new();
    for nc in configs {
        let dim = dim.or(nc.cfg.known_input_dim()).unwrap_or(DEFAULT_FILE_DIM);
        let sizes = if batches.is_empty() { vec![nc.cfg.batch_size] } else { batches.to_vec() };
        for b in sizes {
            let mut cfg = nc.cfg.clone();
            cfg.batch_size = b;
            cfg.validate().with_context(|| format!("config {} at batch {b}", nc.name))?;
            out.push((NamedConfig { name: nc.name.clone(), cfg }, dim));
        }
    }
    Ok(out)
}

/// Time one config (its `batch_size`) at input dimension `dim`.
pub fn measure_config(
    nc: &NamedConfig,
    dim: usize,
    args: &BenchArgs,
) -> anyhow::Result<ConfigReport> {
    let cfg = &nc.cfg;
    let b = cfg.batch_size;
    let data = random_rows(b, dim, args.seed);
    let device = Device::Cpu;
    let (mut trainer, name) = make_trainer(cfg, dim, &device, Backend::Auto)?;
    tracing::info!(config = %nc.name, batch = b, trainer = name, "timing");
    let selected = TrainerTiming::new(name, b, time_steps(trainer.as_mut(), args, &data)?);
    drop(trainer);
    let candle = if name == "candle" {
        selected.clone()
    } else {
        let (mut trainer, name) = make_trainer(cfg, dim, &device, Backend::Candle)?;
        tracing::info!(config = %nc.name, batch = b, trainer = name, "timing");
        TrainerTiming::new(name, b, time_steps(trainer.as_mut(), args, &data)?)
    };
    let selected_vs_candle = selected.samples_per_s / candle.samples_per_s;
    Ok(ConfigReport {
        config: nc.name.clone(),
        batch: b,
        dim,
        selected,
        candle,
        selected_vs_candle,
    })
}

/// Measure every requested config at every requested batch size.
pub fn measure_configs(args: &BenchArgs) -> anyhow::Result<Vec<ConfigReport>> {
    let configs = requested_configs(args)?;
    expand_batches(&configs, &args.batches, args.dim)?
        .iter()
        .map(|(nc, dim)| measure_config(nc, *dim, args))
        .collect()
}

fn wants_configs(args: &BenchArgs) -> bool {
    !args.configs.is_empty() || !args.presets.is_empty()
}

/// Measure every requested shape and path (the default shapes when neither shapes nor configs
/// are asked for).
pub fn measure_all(args: &BenchArgs) -> anyhow::Result<Vec<ShapeReport>> {
    let shapes = if !args.shapes.is_empty() {
        args.shapes.clone()
    } else if wants_configs(args) {
        Vec::new()
    } else {
        DEFAULT_SHAPES.to_vec()
    };
    let mut reports = Vec::new();
    for shape in shapes {
        let data = random_batches(&shape, args.seed);
        let mut results = Vec::new();
        for path in args.path.expand() {
            tracing::info!(%shape, path = path.name(), "timing");
            results.push(measure(&shape, path, args, &data)?);
        }
        let rate = |p: BenchPath| results.iter().find(|m| m.path == p).map(|m| m.samples_per_s);
        let ratio = |a: BenchPath, b: BenchPath| match (rate(a), rate(b)) {
            (Some(f), Some(c)) => Some(f / c),
            _ => None,
        };
        let fast_vs_candle = ratio(BenchPath::Fast, BenchPath::Candle);
        let dense_vs_candle = ratio(BenchPath::Dense, BenchPath::DenseCandle);
        reports.push(ShapeReport { shape, results, fast_vs_candle, dense_vs_candle });
    }
    Ok(reports)
}

/// Run the benchmark and print a table (or JSON with `--json`) on stdout.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if !args.batches.is_empty() && !wants_configs(args) {
        anyhow::bail!("--batch applies to --config and --preset; with --shape the batch is its B");
    }
    let threads = rayon::current_num_threads();
    if !args.json {
        println!(
            "msae bench: {} timed steps after {} warm-up, {threads} threads",
            args.steps, args.warmup
        );
    }
    let reports = measure_all(args)?;
    let configs = if wants_configs(args) { measure_configs(args)? } else { Vec::new() };
    if args.json {
        let value =
            serde_json::json!({ "threads": threads, "shapes": reports, "configs": configs });
        println!("{value}");
        return Ok(());
    }
    print_configs(&configs);
    for r in &reports {
        println!("\n{}", r.shape);
        println!(
            "  {:<12} {:>9} {:>9} {:>11} {:>9}",
            "path", "ms/step", "min ms", "samples/s", "GFLOP/s"
        );
        for m in &r.results {
            println!(
                "  {:<12} {:>9.2} {:>9.2} {:>11.0} {:>9.1}",
                m.path.name(),
                m.ms_per_step,
                m.min_ms,
                m.samples_per_s,
                m.gflops
            );
        }
        if let Some(x) = r.fast_vs_candle {
            println!("  fast vs candle: {x:.2}x");
        }
        if let Some(x) = r.dense_vs_candle {
            println!("  dense vs dense-candle: {x:.2}x");
        }
    }
    Ok(())
}

fn print_configs(configs: &[ConfigReport]) {
    if configs.is_empty() {
        return;
    }
    let width = configs.iter().map(|c| c.config.len()).max().unwrap_or(6).max(6);
    println!(
        "\n{:<width$} {:>5} {:>4} {:>8} {:>9} {:>10} {:>9} {:>10} {:>6}",
        "config",
        "batch",
        "dim",
        "selected",
        "ms/step",
        "samples/s",
        "candle ms",
        "samples/s",
        "ratio"
    );
    for c in configs {
        println!(
            "{:<width$} {:>5} {:>4} {:>8} {:>9.3} {:>10.0} {:>9.3} {:>10.0} {:>5.2}x",
            c.config,
            c.batch,
            c.dim,
            c.selected.trainer,
            c.selected.ms_per_step,
            c.selected.samples_per_s,
            c.candle.ms_per_step,
            c.candle.samples_per_s,
            c.selected_vs_candle
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_and_reject() {
        let s: Shape = "256, 784,2048,32".parse().unwrap();
        assert_eq!(s, DEFAULT_SHAPES[0]);
        assert!(s.dense_flops() == 12.0 * 256.0 * 784.0 * 2048.0);
        let e = "1,2,3".parse::<Shape>().unwrap_err();
        assert!(e.contains("four numbers"), "{e}");
        let e = "4,8,16,0".parse::<Shape>().unwrap_err();
        assert!(e.contains("k \"0\""), "{e}");
        let e = "4,8,16,17".parse::<Shape>().unwrap_err();
        assert!(e.contains("larger than latents"), "{e}");
    }

    #[test]
    fn configs_are_valid_and_fast_eligible() {
        for shape in DEFAULT_SHAPES {
            let cfg = bench_config(&shape, BenchPath::Fast, 1);
            cfg.validate().unwrap();
            assert!(crate::sae::classic::eligible(&cfg));
            assert_eq!(cfg.code_dim(), shape.latents);
            // Both dense paths train the same config, which the fast path accepts.
            let dense = bench_config(&shape, BenchPath::Dense, 1);
            dense.validate().unwrap();
            assert!(crate::sae::classic::eligible(&dense));
            assert_eq!(dense.layer_sparsity_mode, LayerSparsityMode::None);
            assert_eq!(bench_config(&shape, BenchPath::DenseCandle, 1), dense);
        }
    }

    #[test]
    fn measures_every_path_on_a_tiny_shape() {
        let args = BenchArgs {
            shapes: vec!["8,16,32,4".parse().unwrap()],
            steps: 2,
            warmup: 1,
            ..BenchArgs::default()
        };
        let reports = measure_all(&args).unwrap();
        assert_eq!(reports.len(), 1);
        let paths: Vec<BenchPath> = reports[0].results.iter().map(|m| m.path).collect();
        assert_eq!(
            paths,
            [BenchPath::Fast, BenchPath::Candle, BenchPath::Dense, BenchPath::DenseCandle]
        );
        for m in &reports[0].results {
            assert!(m.ms_per_step > 0.0 && m.samples_per_s.is_finite() && m.gflops > 0.0, "{m:?}");
            assert!(m.last_loss.is_finite() && m.last_loss > 0.0, "{m:?}");
            assert!(m.min_ms <= m.ms_per_step + 1e-9);
        }
        assert!(reports[0].fast_vs_candle.unwrap() > 0.0);
        assert!(reports[0].dense_vs_candle.unwrap() > 0.0);
        // Same dense model, same data, same seed: both dense paths reach about the same loss.
        let loss =
            |p: BenchPath| reports[0].results.iter().find(|m| m.path == p).unwrap().last_loss;
        let (a, b) = (loss(BenchPath::Dense), loss(BenchPath::DenseCandle));
        assert!((a - b).abs() <= 1e-3 * b, "dense loss {a} vs dense-candle {b}");
        let json = serde_json::to_value(&reports).unwrap();
        assert_eq!(json[0]["results"][0]["path"], "fast");
        assert_eq!(json[0]["results"][3]["path"], "dense_candle");
        assert_eq!(json[0]["shape"]["latents"], 32);
    }

    #[test]
    fn config_preset_batch_and_dim_flags_parse() {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from([
            "msae-worker",
            "bench",
            "--config",
            "a.yaml",
            "--config",
            "dir/b.yaml",
            "--preset",
            "original",
            "--batch",
            "8,256",
            "--batch",
            "32",
            "--dim",
            "20",
            "--min-time",
            "0.5",
            "--json",
        ])
        .unwrap();
        let Some(crate::cli::Command::Bench(args)) = cli.command else { panic!("not bench") };
        assert_eq!(args.configs, [PathBuf::from("a.yaml"), PathBuf::from("dir/b.yaml")]);
        assert_eq!(args.presets, [Preset::Original]);
        assert_eq!(args.batches, [8, 256, 32]);
        assert_eq!(args.dim, Some(20));
        assert_eq!(args.min_time, 0.5);
        assert!(args.json && args.shapes.is_empty());
        for bad in [["--batch", "0"], ["--batch", "8,x"], ["--dim", "0"], ["--preset", "nope"]] {
            let mut argv = vec!["msae-worker", "bench"];
            argv.extend(bad);
            assert!(crate::cli::Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
        // --batch means nothing to --shape timing.
        let e = run(&BenchArgs { batches: vec![8], ..BenchArgs::default() }).unwrap_err();
        assert!(e.to_string().contains("--batch applies to --config"), "{e}");
    }

    #[test]
    fn original_preset_is_the_files_on_disk_and_the_original_architecture() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/configs");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".yaml"))
            .collect();
        on_disk.sort();
        let mut named: Vec<String> =
            ORIGINAL_PRESET.iter().map(|(n, _)| format!("{n}.yaml")).collect();
        named.sort();
        assert_eq!(on_disk, named, "worker/bench/configs and ORIGINAL_PRESET differ");
        let configs = Preset::Original.configs().unwrap();
        assert_eq!(configs.len(), 18);
        for nc in &configs {
            let c = &nc.cfg;
            assert_eq!(
                (c.intermediate_dim, c.num_stripes, c.stripe_dim),
                (250, 30, 5),
                "{}",
                nc.name
            );
            assert_eq!(c.known_input_dim(), Some(784), "{}", nc.name);
            assert!(c.output_relu && c.optimizer == Optimizer::Sgd, "{}", nc.name);
            assert_eq!(
                (c.lr, c.momentum, c.layer_k, c.stripe_k),
                (0.01, 0.9, 15, 3),
                "{}",
                nc.name
            );
            let text = std::fs::read_to_string(dir.join(format!("{}.yaml", nc.name))).unwrap();
            assert_eq!(&TrialConfig::from_yaml(&text).unwrap(), c);
        }
        // Every layer x stripe combination is there once.
        let mut combos: Vec<_> = configs
            .iter()
            .filter(|nc| !nc.name.contains("S-routing_"))
            .map(|nc| (nc.cfg.layer_sparsity_mode, nc.cfg.stripe_sparsity_mode))
            .collect();
        combos.dedup();
        assert_eq!(combos.len(), 12);
    }

    #[test]
    fn batches_override_and_dim_rules() {
        let mut synthetic = TrialConfig { batch_size: 16, ..TrialConfig::default() };
        synthetic.data.synthetic.input_dim = 12;
        let file = TrialConfig::from_yaml("data: {path: x.npy}\n").unwrap();
        let configs = [
            NamedConfig { name: "s".into(), cfg: synthetic },
            NamedConfig { name: "f".into(), cfg: file },
        ];
        let got: Vec<(String, usize, usize)> = expand_batches(&configs, &[8, 256], None)
            .unwrap()
            .into_iter()
            .map(|(nc, dim)| (nc.name, nc.cfg.batch_size, dim))
            .collect();
        let s = |n: &str, b, d| (n.to_string(), b, d);
        assert_eq!(got, [s("s", 8, 12), s("s", 256, 12), s("f", 8, 784), s("f", 256, 784)]);
        // No --batch: each config's own batch_size; --dim wins over everything.
        let got: Vec<(usize, usize)> = expand_batches(&configs, &[], Some(5))
            .unwrap()
            .into_iter()
            .map(|(nc, dim)| (nc.cfg.batch_size, dim))
            .collect();
        assert_eq!(got, [(16, 5), (256, 5)]);
    }

    #[test]
    fn a_tiny_config_file_runs_on_both_trainers() {
        let dir = tempfile::tempdir().unwrap();
        let modular = dir.path().join("tiny-routing.yaml");
        std::fs::write(
            &modular,
            "intermediate_dim: 6\nnum_stripes: 4\nstripe_dim: 2\nstripe_sparsity_mode: routing\n\
             stripe_k: 2\nlayer_sparsity_mode: none\noptimizer: sgd\nlr: 0.01\n\
             data: {synthetic: {input_dim: 10}}\n",
        )
        .unwrap();
        let classic = dir.path().join("tiny-topk.yaml");
        std::fs::write(&classic, "num_stripes: 1\nstripe_dim: 16\nlayer_k: 4\n").unwrap();
        let args = BenchArgs {
            configs: vec![modular, classic],
            batches: vec![4, 8],
            dim: None,
            steps: 2,
            warmup: 1,
            ..BenchArgs::default()
        };
        let reports = measure_configs(&args).unwrap();
        let keys: Vec<(&str, usize, usize)> =
            reports.iter().map(|r| (r.config.as_str(), r.batch, r.dim)).collect();
        assert_eq!(
            keys,
            [
                ("tiny-routing", 4, 10),
                ("tiny-routing", 8, 10),
                ("tiny-topk", 4, 64),
                ("tiny-topk", 8, 64)
            ]
        );
        for r in &reports {
            assert_eq!(r.candle.trainer, "candle");
            for t in [&r.selected, &r.candle] {
                assert!(t.ms_per_step > 0.0 && t.samples_per_s.is_finite(), "{r:?}");
                assert!(t.last_loss.is_finite() && t.last_loss > 0.0, "{r:?}");
                assert_eq!(t.steps, 2);
            }
            assert!(r.selected_vs_candle > 0.0);
        }
        // The classic top-k config trains on the fast path; the modular one on what training
        // picks for it (the candle model, until a faster path takes it).
        assert_eq!(reports[2].selected.trainer, "fast");
        let json = serde_json::to_value(&reports).unwrap();
        assert_eq!(json[0]["config"], "tiny-routing");
        assert_eq!(json[0]["candle"]["trainer"], "candle");
    }
}
