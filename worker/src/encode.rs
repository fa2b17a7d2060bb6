//! `msae-worker encode`: a trained SAE (an exported or `--out` weights file) applied to new
//! data, scaled exactly as its training data was, so a sweep's result can be used.

use crate::artifact::SavedSae;
use crate::data::{self, Matrix, Scaler};
use crate::eval::{self, EvalInputs};
use crate::sae::trainer::Inference;
use crate::train::{Backend, make_trainer, select_device};
use anyhow::Context as _;
use msae_shared::config::{DataConfig, DataSource};
use msae_shared::metrics;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Rows per forward pass: bounds the memory of one pass, not the result.
const BATCH_ROWS: usize = 4096;

/// Options of `msae-worker encode`.
#[derive(Debug, Clone, clap::Args)]
pub struct EncodeArgs {
    /// The trained SAE: a weights.safetensors written by msae (export, or a worker's --out).
    #[arg(long, value_name = "FILE")]
    pub weights: PathBuf,
    /// Samples to encode, one per row: .npy, .safetensors (see --tensor) or MNIST IDX.
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// The tensor to read from a safetensors --data file (default: its only one).
    #[arg(long, value_name = "NAME")]
    pub tensor: Option<String>,
    /// Output .npy: the codes (rows, num_stripes * stripe_dim), float32.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Write the reconstructions (rows, input dim) in the data's own units instead of codes.
    #[arg(long)]
    pub reconstruct: bool,
    #[command(flatten)]
    pub device: crate::cli::DeviceArgs,
}

/// What an encoding pass gives besides its output file.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// (rows, cols) of the array written.
    pub shape: [usize; 2],
    /// The trial's evaluation metrics over these rows, in the SAE's scaled space, as training
    /// computed them (`fvu`, `mse`, `l0`, ...).
    pub metrics: BTreeMap<String, f64>,
}

fn read_data(path: &Path, tensor: Option<&str>) -> anyhow::Result<Matrix> {
    let cfg = DataConfig { path: Some(path.to_path_buf()), ..Default::default() };
    let source = cfg.resolved_source().map_err(|e| anyhow::anyhow!("--data: {}", e.message))?;
    let m = match source {
        DataSource::Npy => data::npy::load_matrix(path)?,
        DataSource::Safetensors => data::safetensors_file::load_matrix(path, tensor)?,
        DataSource::Mnist => data::idx::load_images(path)?,
        DataSource::Csv => {
            let t = data::csv::load(path, None, None)?;
            Matrix { rows: t.data.len() / t.cols, cols: t.cols, data: t.data }
        }
        DataSource::Synthetic => anyhow::bail!("--data needs a file"),
    };
    if let Some((i, v)) = m.data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        anyhow::bail!(
            "{}: row {} holds {v}; every value must be finite",
            path.display(),
            i / m.cols.max(1)
        );
    }
    Ok(m)
}

/// Undoes `scaler` on reconstructions `recon` of the raw rows `raw`.
fn unscale(scaler: &Scaler, recon: &mut [f32], raw: &[f32], dim: usize) {
    match scaler {
        Scaler::Identity => {}
        Scaler::MaxAbs { scale } => recon.iter_mut().for_each(|v| *v /= scale),
        Scaler::Standardize { mean, inv_std } => {
            for row in recon.chunks_exact_mut(dim) {
                for ((v, m), s) in row.iter_mut().zip(mean).zip(inv_std) {
                    *v = *v / s + m;
                }
            }
        }
        Scaler::UnitNorm => {
            for (row, x) in recon.chunks_exact_mut(dim).zip(raw.chunks_exact(dim)) {
                let norm = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt() as f32;
                if norm > 0.0 {
                    row.iter_mut().for_each(|v| *v *= norm);
                }
            }
        }
    }
}

/// Encodes (or reconstructs) `args.data` with `args.weights` into `args.out`.
pub fn encode(args: &EncodeArgs) -> anyhow::Result<Encoded> {
    let bytes = std::fs::read(&args.weights)
        .with_context(|| format!("cannot read {}", args.weights.display()))?;
    let saved =
        SavedSae::read(&bytes).with_context(|| format!("weights {}", args.weights.display()))?;
    let raw = read_data(&args.data, args.tensor.as_deref())
        .with_context(|| format!("data {}", args.data.display()))?;
    let dim = saved.input_dim;
    if raw.cols != dim {
        anyhow::bail!(
            "{} has {} values per sample; the SAE in {} was trained on {dim}",
            args.data.display(),
            raw.cols,
            args.weights.display()
        );
    }
    let mut x = raw.data.clone();
    saved.scaler.apply(&mut x, dim);
    let device = select_device(args.device.gpu)?;
    let (mut trainer, _) = make_trainer(&saved.config, dim, &device, Backend::Auto)?;
    trainer.restore(&saved.tensors, saved.eval_layer_k).with_context(|| {
        format!("weights {} do not fit their own config", args.weights.display())
    })?;
    let n_codes = saved.config.code_dim();
    let (mut codes, mut recon) = (Vec::with_capacity(raw.rows * n_codes), Vec::new());
    recon.reserve(x.len());
    for batch in x.chunks(BATCH_ROWS * dim) {
        let inf = trainer.infer(batch)?;
        codes.extend_from_slice(&inf.codes);
        recon.extend_from_slice(&inf.recon);
    }
    let all = Inference { codes, recon, loss: 0.0, routing: None };
    let metrics = eval::evaluate(&EvalInputs::pass(&x, &all, dim, &saved.config, None)).scalars;
    let Inference { codes, mut recon, .. } = all;
    let (out, cols) = if args.reconstruct {
        unscale(&saved.scaler, &mut recon, &raw.data, dim);
        (recon, dim)
    } else {
        (codes, n_codes)
    };
    let npy = data::npy::encode("<f4", false, &[raw.rows, cols], &data::npy::f32_bytes(&out), 1);
    crate::train::write_atomic(&args.out, &npy)?;
    Ok(Encoded { shape: [raw.rows, cols], metrics })
}

/// `msae-worker encode`: writes the file, prints a one-line summary on stdout.
pub fn encode_command(args: &EncodeArgs) -> anyhow::Result<()> {
    let e = encode(args)?;
    let get = |k: &str| e.metrics.get(k).copied().unwrap_or(f64::NAN);
    msae_shared::signal::print_stdout(&format!(
        "wrote {} ({} x {} {}): fvu {:.6}, l0 {:.3} (in the SAE's scaled space)",
        args.out.display(),
        e.shape[0],
        e.shape[1],
        if args.reconstruct { "reconstructions" } else { "codes" },
        get(metrics::FVU),
        get(metrics::L0)
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::{Control, RunOptions};
    use msae_shared::TrialConfig;
    use msae_shared::config::{LayerSparsityMode, Scaling};

    fn write_npy(path: &Path, rows: usize, cols: usize, v: &[f32]) {
        std::fs::write(
            path,
            data::npy::encode("<f4", false, &[rows, cols], &data::npy::f32_bytes(v), 1),
        )
        .unwrap();
    }

    /// Trains `cfg` on a file of synthetic samples (shifted and stretched so scaling matters),
    /// then encodes the trial's raw validation rows with its exported weights.
    fn round_trip(mut cfg: TrialConfig, scaling: Scaling) {
        let dir = tempfile::tempdir().unwrap();
        let s = &cfg.data.synthetic;
        let made = data::synthetic::generate_n(s, cfg.seed, s.num_samples).unwrap();
        let raw: Vec<f32> = made
            .samples
            .iter()
            .enumerate()
            .map(|(i, v)| v * (1.0 + (i % 3) as f32) + 0.5)
            .collect();
        let file = dir.path().join("x.npy");
        write_npy(&file, made.num_samples, made.dim, &raw);
        cfg.data.path = Some(file);
        cfg.data.scaling = Some(scaling);
        cfg.data.synthetic = Default::default();
        let out = dir.path().join("trial");
        let options = RunOptions { gpu: None, out_dir: Some(out.clone()), files: true };
        let trained = crate::train::train(&cfg, &options, &mut |_| Control::Continue).unwrap();

        // The same validation rows, unscaled.
        let mut unscaled = cfg.data.clone();
        unscaled.scaling = Some(Scaling::None);
        let ds = data::load(&unscaled, cfg.seed).unwrap();
        let val = dir.path().join("val.npy");
        write_npy(&val, ds.n_val(), ds.dim, &ds.val);
        let args = EncodeArgs {
            weights: out.join("weights.safetensors"),
            data: val.clone(),
            tensor: None,
            out: dir.path().join("codes.npy"),
            reconstruct: false,
            device: Default::default(),
        };
        let e = encode(&args).unwrap();
        assert_eq!(e.shape, [ds.n_val(), cfg.code_dim()]);
        let (want, got) = (trained.metrics[metrics::FVU], e.metrics[metrics::FVU]);
        assert!((want - got).abs() <= 1e-4 * want.max(1e-3), "{scaling:?}: fvu {got} vs {want}");
        assert!((trained.metrics[metrics::L0] - e.metrics[metrics::L0]).abs() < 1e-3);
        let codes = data::npy::load_matrix(&args.out).unwrap();
        assert_eq!((codes.rows, codes.cols), (ds.n_val(), cfg.code_dim()));

        // Reconstructions come back in the data's own units.
        let rec = EncodeArgs { reconstruct: true, out: dir.path().join("rec.npy"), ..args };
        encode(&rec).unwrap();
        let r = data::npy::load_matrix(&rec.out).unwrap();
        assert_eq!((r.rows, r.cols), (ds.n_val(), ds.dim));
        let mean: f64 = ds.val.iter().map(|&v| v as f64).sum::<f64>() / ds.val.len() as f64;
        let sse: f64 = r.data.iter().zip(&ds.val).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let sst: f64 = ds.val.iter().map(|&v| (v as f64 - mean).powi(2)).sum();
        assert!(
            sse < 0.8 * sst,
            "{scaling:?}: reconstructions are not in input units ({sse} vs {sst})"
        );
    }

    fn small() -> TrialConfig {
        let mut cfg =
            TrialConfig { steps: 80, eval_every: 40, batch_size: 64, ..Default::default() };
        cfg.data.synthetic.num_samples = 1024;
        cfg
    }

    #[test]
    fn encode_reproduces_the_trials_fvu_on_its_validation_rows() {
        round_trip(small(), Scaling::Standardize);
        round_trip(small(), Scaling::MaxAbs);
        let topk = TrialConfig { layer_sparsity_mode: LayerSparsityMode::Ordinary, ..small() };
        round_trip(topk, Scaling::UnitNorm);
    }

    #[test]
    fn wrong_width_data_and_foreign_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("trial");
        let options = RunOptions { gpu: None, out_dir: Some(out.clone()), files: true };
        crate::train::train(&small(), &options, &mut |_| Control::Continue).unwrap();
        let narrow = dir.path().join("narrow.npy");
        write_npy(&narrow, 2, 3, &[0.0; 6]);
        let args = EncodeArgs {
            weights: out.join("weights.safetensors"),
            data: narrow,
            tensor: None,
            out: dir.path().join("c.npy"),
            reconstruct: false,
            device: Default::default(),
        };
        let e = format!("{:#}", encode(&args).unwrap_err());
        assert!(
            e.contains("narrow.npy has 3 values per sample") && e.contains("trained on"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            encode(&EncodeArgs { weights: out.join("config.yaml"), ..args }).unwrap_err()
        );
        assert!(e.contains("config.yaml") && e.contains("not a safetensors file"), "{e}");
        assert!(!dir.path().join("c.npy").exists(), "nothing written on an error");
    }
}
