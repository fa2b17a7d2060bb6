//! `msae-worker bench`: times training steps of the trainers on random data.
//!
//! For each shape (batch B, input d, latents n, k) and each path it runs warm-up steps, then
//! times `--steps` steps and reports ms/step, samples/s and achieved GFLOP/s, counting every
//! step as a dense one: 12*B*d*n FLOPs (six GEMMs: encoder and decoder, forward, and two
//! gradients each), so the figure is comparable across paths and with PyTorch. Paths:
//! - `fast`: the hand-written top-k path ([`crate::fast::FastTopK`]);
//! - `candle`: the general candle model ([`crate::model::CandleTrainer`]) on the same top-k config;
//! - `dense`: the dense SAE (`layer_sparsity_mode: none`) on the fast path, which is what
//!   training uses for that config (every product a dense GEMM);
//! - `dense-candle`: the same dense SAE on the general candle model, for comparison.
//!
//! Data are standard-normal rows from `--seed` (no files); a few batches are cycled so the
//! timing includes reading fresh inputs without measuring the generator.
//! `worker/bench/torch_topk.py` is the PyTorch side-by-side at the same shapes.

use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use candle_core::Device;
use msae_shared::config::{LayerSparsityMode, Optimizer, TrialConfig};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;

use crate::fast::FastTopK;
use crate::model::CandleTrainer;
use crate::trainer::Trainer;

/// Batches generated per shape and cycled through while timing.
const DATA_BATCHES: usize = 4;

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
    /// Which trainer to time.
    #[arg(long, value_enum, default_value_t = BenchPath::All)]
    pub path: BenchPath,
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

/// Time one path at one shape on `data` (batches of `shape.batch` rows).
pub fn measure(
    shape: &Shape,
    path: BenchPath,
    args: &BenchArgs,
    data: &[Vec<f32>],
) -> anyhow::Result<Measurement> {
    let mut trainer = build(shape, path, args.seed)?;
    for s in 0..args.warmup {
        trainer.step(&data[s % data.len()], s)?;
    }
    let steps = args.steps.max(1);
    let mut min = f64::INFINITY;
    let mut last_loss = 0.0;
    let start = Instant::now();
    for s in 0..steps {
        let t = Instant::now();
        last_loss = trainer.step(&data[s % data.len()], args.warmup + s)?;
        min = min.min(t.elapsed().as_secs_f64());
    }
    let per_step = start.elapsed().as_secs_f64() / steps as f64;
    Ok(Measurement {
        path,
        steps,
        ms_per_step: per_step * 1e3,
        min_ms: min * 1e3,
        samples_per_s: shape.batch as f64 / per_step,
        gflops: shape.dense_flops() / per_step / 1e9,
        last_loss,
    })
}

/// Standard-normal batches for `shape`, from `seed`.
pub fn random_batches(shape: &Shape, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..DATA_BATCHES)
        .map(|_| (0..shape.batch * shape.input).map(|_| StandardNormal.sample(&mut rng)).collect())
        .collect()
}

/// Measure every requested shape and path.
pub fn measure_all(args: &BenchArgs) -> anyhow::Result<Vec<ShapeReport>> {
    let shapes = if args.shapes.is_empty() { DEFAULT_SHAPES.to_vec() } else { args.shapes.clone() };
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
    let threads = rayon::current_num_threads();
    if !args.json {
        println!(
            "msae bench: {} timed steps after {} warm-up, {threads} threads",
            args.steps, args.warmup
        );
    }
    let reports = measure_all(args)?;
    if args.json {
        let value = serde_json::json!({ "threads": threads, "shapes": reports });
        println!("{value}");
        return Ok(());
    }
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
            assert!(crate::fast::eligible(&cfg));
            assert_eq!(cfg.code_dim(), shape.latents);
            // Both dense paths train the same config, which the fast path accepts.
            let dense = bench_config(&shape, BenchPath::Dense, 1);
            dense.validate().unwrap();
            assert!(crate::fast::eligible(&dense));
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
}
