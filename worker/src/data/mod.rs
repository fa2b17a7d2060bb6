//! Training data: the seeded synthetic default and file loaders (npy, safetensors, MNIST IDX).
//!
//! Everything becomes a [`Dataset`]: row-major f32 samples split into train and validation,
//! scaled as configured, with optional labels and, for synthetic data, the ground truth.
//!
//! [`load`] is the one entry point. It reads (or generates) every sample as a [`Matrix`], attaches
//! labels, rejects non-finite values, applies `limit`, shuffles deterministically with the seed,
//! splits off the validation set, and scales both splits with statistics fitted on the training
//! split only (so validation numbers never see validation statistics). Every failure is a
//! [`DataError`] that names the file (or config field) and the problem.

use msae_shared::config::{DataConfig, DataSource, Scaling};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use std::io::Read;
use std::path::{Path, PathBuf};

pub mod idx;
pub mod npy;
pub mod safetensors_file;
pub mod synthetic;

/// Ground truth of a synthetic dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct GroundTruth {
    /// Unit-norm true features, row-major (num_features, dim).
    pub features: Vec<f32>,
    pub num_features: usize,
    /// Cluster ("true stripe") of each feature.
    pub feature_cluster: Vec<usize>,
    pub num_clusters: usize,
}

/// A dataset ready for training.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Sample dimension.
    pub dim: usize,
    /// Training samples, row-major (n_train, dim).
    pub train: Vec<f32>,
    /// Validation samples, row-major (n_val, dim).
    pub val: Vec<f32>,
    /// Labels of the validation samples, when a labels source exists.
    pub val_labels: Option<Vec<u32>>,
    /// Labels of the training samples, when a labels source exists.
    pub train_labels: Option<Vec<u32>>,
    /// Known ground truth (synthetic data only).
    pub truth: Option<GroundTruth>,
    /// The scaling fitted on the training split and applied to both splits (saved with the
    /// weights, so new data can be scaled the same way).
    pub scaler: Scaler,
}

impl Dataset {
    pub fn n_train(&self) -> usize {
        self.train.len() / self.dim
    }
    pub fn n_val(&self) -> usize {
        self.val.len() / self.dim
    }
}

/// A data or configuration problem found while loading. Every message names the file (or the
/// config field) and says what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file does not exist.
    #[error("{}: file not found", path.display())]
    NotFound { path: PathBuf },
    /// Any other I/O failure (permissions, a directory, a corrupt gzip stream).
    // The cause is in the message, so it is not also the error's source (printed twice).
    #[error("{}: cannot read: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },
    /// The file does not start with the magic bytes of the expected format.
    #[error("{}: not {format}: bad magic {found} (expected {expected})", path.display())]
    BadMagic { path: PathBuf, format: &'static str, found: String, expected: String },
    /// The header is malformed or describes something unsupported.
    #[error("{}: bad header: {reason}", path.display())]
    Header { path: PathBuf, reason: String },
    /// Fewer data bytes than the header's shape and dtype require.
    #[error(
        "{}: truncated: the header describes {expected} data bytes but the file holds {actual}",
        path.display()
    )]
    Truncated { path: PathBuf, expected: usize, actual: usize },
    /// More data bytes than the header's shape and dtype describe.
    #[error(
        "{}: {actual} data bytes where the header describes {expected}: unexpected trailing data",
        path.display()
    )]
    TrailingData { path: PathBuf, expected: usize, actual: usize },
    /// An element type that this use does not accept.
    #[error("{}: unsupported dtype {found} (accepted: {expected})", path.display())]
    Dtype { path: PathBuf, found: String, expected: String },
    /// A shape that cannot be read as (samples, features) or as a label vector.
    #[error("{}: wrong shape {shape:?}: {reason}", path.display())]
    Shape { path: PathBuf, shape: Vec<usize>, reason: String },
    /// `data.tensor` names a tensor the safetensors file lacks.
    #[error("{}: tensor {name:?} not found; tensors present: {}", path.display(), available.join(", "))]
    TensorNotFound { path: PathBuf, name: String, available: Vec<String> },
    /// No `data.tensor` and the safetensors file does not hold exactly one tensor.
    #[error(
        "{}: holds {} tensors ({}); set data.tensor to choose one",
        path.display(), available.len(), available.join(", ")
    )]
    AmbiguousTensor { path: PathBuf, available: Vec<String> },
    /// The labels file does not have one label per sample.
    #[error("{}: {labels} labels for {samples} samples in {data}", path.display())]
    LabelsMismatch { path: PathBuf, labels: usize, samples: usize, data: String },
    /// A label that is negative or does not fit in u32.
    #[error("{}: invalid label {value} at index {index}: labels must be integers in [0, 2^32)", path.display())]
    BadLabel { path: PathBuf, index: usize, value: i64 },
    /// A NaN or infinite sample value.
    #[error("{origin}: non-finite value {value} at sample {row}, dimension {col}")]
    NonFinite { origin: String, row: usize, col: usize, value: f32 },
    /// Too few samples for a train/validation split.
    #[error("{origin}: not enough samples: {reason}")]
    NotEnoughSamples { origin: String, reason: String },
    /// A data configuration value that cannot be used.
    #[error("{field}: {reason}")]
    InvalidConfig { field: String, reason: String },
}

impl DataError {
    fn invalid(field: &str, reason: impl Into<String>) -> Self {
        DataError::InvalidConfig { field: field.into(), reason: reason.into() }
    }
}

/// Samples as a row-major (rows, cols) f32 matrix, before splitting.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl Matrix {
    /// Keep only the first `rows` rows (no-op when there are fewer).
    pub fn truncate_rows(&mut self, rows: usize) {
        if rows < self.rows {
            self.rows = rows;
            self.data.truncate(rows * self.cols);
        }
    }
}

/// Load (or generate) the configured data, split it and scale it.
///
/// `seed` drives the synthetic generator and the train/validation shuffle, so every worker given
/// the same config and seed builds identical datasets. Steps, in order:
/// 1. read the samples (`data.source`) and, when `data.labels` is set, one label per sample;
/// 2. reject NaN/inf values;
/// 3. `data.limit` (> 0) keeps the first `limit` samples in file order;
/// 4. a seeded shuffle, then the last `ceil(validation_fraction * n)` samples are validation;
/// 5. scaling fitted on the training split, applied to both splits.
pub fn load(cfg: &DataConfig, seed: u64) -> Result<Dataset, DataError> {
    let source = cfg
        .resolved_source()
        .map_err(|e| DataError::InvalidConfig { field: e.field, reason: e.message })?;
    if cfg.source_inferred() {
        tracing::info!(
            source = source.name(),
            path = %cfg.path.as_deref().unwrap_or(Path::new("")).display(),
            "data.source not given: inferred from the file name"
        );
    }
    let (mut matrix, truth, origin) = match source {
        DataSource::Synthetic => {
            let s = &cfg.synthetic;
            // The generator is sequential, so the first `limit` samples are the same whether or
            // not the rest are generated: generate only what is kept.
            let n = if cfg.limit > 0 { cfg.limit.min(s.num_samples) } else { s.num_samples };
            let data = synthetic::generate_n(s, seed, n)?;
            let m = Matrix { data: data.samples, rows: data.num_samples, cols: data.dim };
            (m, Some(data.truth), "synthetic data".to_string())
        }
        DataSource::Npy => {
            let path = require_path(cfg, source)?;
            (npy::load_matrix(path)?, None, path.display().to_string())
        }
        DataSource::Safetensors => {
            let path = require_path(cfg, source)?;
            let m = safetensors_file::load_matrix(path, cfg.tensor.as_deref())?;
            (m, None, path.display().to_string())
        }
        DataSource::Mnist => {
            let path = require_path(cfg, source)?;
            (idx::load_images(path)?, None, path.display().to_string())
        }
    };
    let mut labels = None;
    if let Some(lpath) = &cfg.labels {
        let mut l = read_labels(lpath)?;
        // Synthetic data was possibly generated short (limit); compare against what the file
        // sources hold in full, which is every row for them.
        let expected = match source {
            DataSource::Synthetic => cfg.synthetic.num_samples,
            _ => matrix.rows,
        };
        if l.len() != expected {
            return Err(DataError::LabelsMismatch {
                path: lpath.clone(),
                labels: l.len(),
                samples: expected,
                data: origin.clone(),
            });
        }
        l.truncate(matrix.rows);
        labels = Some(l);
    }
    check_finite(&matrix, &origin)?;
    if cfg.limit > 0 {
        matrix.truncate_rows(cfg.limit);
        if let Some(l) = labels.as_mut() {
            l.truncate(matrix.rows);
        }
    }
    let mut ds = split(matrix, labels, cfg.validation_fraction, seed, &origin)?;
    let scaler = Scaler::fit(cfg.scaling, &ds.train, ds.dim);
    scaler.apply(&mut ds.train, ds.dim);
    scaler.apply(&mut ds.val, ds.dim);
    ds.scaler = scaler;
    ds.truth = truth;
    tracing::info!(
        origin = %origin,
        dim = ds.dim,
        train = ds.n_train(),
        val = ds.n_val(),
        labels = ds.val_labels.is_some(),
        scaling = ?cfg.scaling,
        "data loaded"
    );
    Ok(ds)
}

fn require_path(cfg: &DataConfig, source: DataSource) -> Result<&Path, DataError> {
    cfg.path.as_deref().ok_or_else(|| {
        DataError::invalid("data.path", format!("required when data.source is {}", source.name()))
    })
}

/// Read a whole file, transparently decompressing gzip (detected by the magic bytes 1f 8b, not
/// by the file name, so `train-images-idx3-ubyte` and `.gz` variants both work).
pub fn read_bytes(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DataError::NotFound { path: path.to_path_buf() },
        _ => DataError::Io { path: path.to_path_buf(), error: e },
    })?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(bytes.len() * 4);
        flate2::read::MultiGzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::Io { path: path.to_path_buf(), error: e })?;
        tracing::debug!(path = %path.display(), compressed = bytes.len(), size = out.len(), "gunzipped");
        return Ok(out);
    }
    Ok(bytes)
}

/// Read a labels file: an `.npy` of integers (detected by its magic) or an IDX labels file
/// (optionally gzipped).
pub fn read_labels(path: &Path) -> Result<Vec<u32>, DataError> {
    let bytes = read_bytes(path)?;
    if bytes.starts_with(npy::MAGIC) {
        let arr = npy::parse(path, &bytes)?;
        npy::labels_from_array(path, arr)
    } else {
        idx::parse_labels(path, &bytes)
    }
}

/// Reject NaN and infinite values, naming the first one's position.
fn check_finite(m: &Matrix, origin: &str) -> Result<(), DataError> {
    if let Some(i) = m.data.iter().position(|v| !v.is_finite()) {
        return Err(DataError::NonFinite {
            origin: origin.to_string(),
            row: i / m.cols,
            col: i % m.cols,
            value: m.data[i],
        });
    }
    Ok(())
}

/// The RNG stream of the train/validation shuffle, kept apart from the synthetic generator's.
const SPLIT_STREAM: u64 = 0x9E37_79B9_7F4A_7C15;

/// Number of validation samples for `n` samples: `ceil(fraction * n)`, tolerant of binary
/// floating-point error (0.1 * 30 is 3.0000000000000004 and must give 3, not 4).
pub fn validation_count(n: usize, fraction: f64) -> usize {
    let v = fraction * n as f64;
    let rounded = v.round();
    if (v - rounded).abs() < 1e-9 * v.max(1.0) { rounded as usize } else { v.ceil() as usize }
}

/// Shuffle `matrix` (and its labels) with `seed`, then hold out the last
/// [`validation_count`] samples for validation. Errors on fewer than 2 samples or an empty split.
pub fn split(
    matrix: Matrix,
    labels: Option<Vec<u32>>,
    validation_fraction: f64,
    seed: u64,
    origin: &str,
) -> Result<Dataset, DataError> {
    let n = matrix.rows;
    let dim = matrix.cols;
    if !(0.0..1.0).contains(&validation_fraction) {
        return Err(DataError::invalid(
            "data.validation_fraction",
            format!("{validation_fraction} must be in [0, 1)"),
        ));
    }
    if n < 2 {
        return Err(DataError::NotEnoughSamples {
            origin: origin.to_string(),
            reason: format!("{n} sample(s); a train/validation split needs at least 2"),
        });
    }
    let n_val = validation_count(n, validation_fraction);
    if n_val == 0 || n_val >= n {
        let which = if n_val == 0 { "validation" } else { "training" };
        return Err(DataError::NotEnoughSamples {
            origin: origin.to_string(),
            reason: format!(
                "data.validation_fraction {validation_fraction} of {n} samples leaves the {which} split empty"
            ),
        });
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed ^ SPLIT_STREAM));
    let n_train = n - n_val;
    let gather = |idx: &[usize]| {
        let mut out = Vec::with_capacity(idx.len() * dim);
        for &i in idx {
            out.extend_from_slice(&matrix.data[i * dim..(i + 1) * dim]);
        }
        out
    };
    let (tr, va) = order.split_at(n_train);
    let pick = |l: &Vec<u32>, idx: &[usize]| idx.iter().map(|&i| l[i]).collect::<Vec<u32>>();
    Ok(Dataset {
        dim,
        train: gather(tr),
        val: gather(va),
        train_labels: labels.as_ref().map(|l| pick(l, tr)),
        val_labels: labels.as_ref().map(|l| pick(l, va)),
        truth: None,
        scaler: Scaler::Identity,
    })
}

/// A fitted scaling: statistics come from the training split and are applied unchanged to
/// validation data.
#[derive(Debug, Clone, PartialEq)]
pub enum Scaler {
    /// Leave values as they are.
    Identity,
    /// `(x - mean[j]) * inv_std[j]` per dimension j; a constant dimension (std 0) is only centred.
    Standardize { mean: Vec<f32>, inv_std: Vec<f32> },
    /// Each sample divided by its own L2 norm (all-zero samples stay zero); needs no statistics.
    UnitNorm,
    /// Everything multiplied by `1 / max |x|` of the training split (1 when that is 0).
    MaxAbs { scale: f32 },
}

impl Scaler {
    /// Fit `scaling` on row-major `train` data of width `dim`.
    pub fn fit(scaling: Scaling, train: &[f32], dim: usize) -> Scaler {
        match scaling {
            Scaling::None => Scaler::Identity,
            Scaling::UnitNorm => Scaler::UnitNorm,
            Scaling::MaxAbs => {
                let m = train.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                Scaler::MaxAbs { scale: if m > 0.0 { 1.0 / m } else { 1.0 } }
            }
            Scaling::Standardize => {
                let rows = (train.len() / dim.max(1)).max(1) as f64;
                let mut sum = vec![0f64; dim];
                for row in train.chunks_exact(dim) {
                    for (s, &v) in sum.iter_mut().zip(row) {
                        *s += v as f64;
                    }
                }
                let mean: Vec<f64> = sum.iter().map(|s| s / rows).collect();
                let mut var = vec![0f64; dim];
                for row in train.chunks_exact(dim) {
                    for ((q, &v), m) in var.iter_mut().zip(row).zip(&mean) {
                        let d = v as f64 - m;
                        *q += d * d;
                    }
                }
                let inv_std = var
                    .iter()
                    .map(|q| {
                        let sd = (q / rows).sqrt();
                        if sd > 1e-12 { (1.0 / sd) as f32 } else { 1.0 }
                    })
                    .collect();
                Scaler::Standardize { mean: mean.iter().map(|&m| m as f32).collect(), inv_std }
            }
        }
    }

    /// Scale row-major `data` of width `dim` in place.
    pub fn apply(&self, data: &mut [f32], dim: usize) {
        match self {
            Scaler::Identity => {}
            Scaler::MaxAbs { scale } => data.iter_mut().for_each(|v| *v *= scale),
            Scaler::UnitNorm => {
                for row in data.chunks_exact_mut(dim) {
                    let norm = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt();
                    if norm > 0.0 {
                        let inv = (1.0 / norm) as f32;
                        row.iter_mut().for_each(|v| *v *= inv);
                    }
                }
            }
            Scaler::Standardize { mean, inv_std } => {
                for row in data.chunks_exact_mut(dim) {
                    for ((v, m), s) in row.iter_mut().zip(mean).zip(inv_std) {
                        *v = (*v - m) * s;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use msae_shared::config::SyntheticConfig;

    fn npy_file(dir: &tempfile::TempDir, name: &str, rows: usize, cols: usize) -> PathBuf {
        // Row i holds i * 10 + j, so rows are recognisable after shuffling.
        let v: Vec<f32> = (0..rows * cols).map(|k| ((k / cols) * 10 + k % cols) as f32).collect();
        let p = dir.path().join(name);
        std::fs::write(&p, npy::encode("<f4", false, &[rows, cols], &npy::f32_bytes(&v), 1))
            .unwrap();
        p
    }

    fn npy_cfg(path: PathBuf) -> DataConfig {
        DataConfig { source: Some(DataSource::Npy), path: Some(path), ..Default::default() }
    }

    #[test]
    fn a_path_without_source_loads_that_file() {
        // Regression: `data: {path: x.npy}` used to train on the synthetic default.
        let dir = tempfile::tempdir().unwrap();
        let p = npy_file(&dir, "acts.npy", 20, 3);
        let cfg = DataConfig { path: Some(p.clone()), ..Default::default() };
        let ds = load(&cfg, 1).unwrap();
        assert_eq!((ds.dim, ds.n_train() + ds.n_val()), (3, 20));
        assert!(ds.truth.is_none(), "not synthetic");
        assert_eq!(ds, load(&npy_cfg(p), 1).unwrap());
        let odd = DataConfig { path: Some(dir.path().join("acts.bin")), ..Default::default() };
        let e = load(&odd, 1).unwrap_err().to_string();
        assert!(e.starts_with("data.source:"), "{e}");
    }

    #[test]
    fn synthetic_load_is_deterministic_and_split() {
        let cfg = DataConfig {
            synthetic: SyntheticConfig { num_samples: 1000, ..Default::default() },
            ..Default::default()
        };
        let a = load(&cfg, 42).unwrap();
        assert_eq!((a.n_train(), a.n_val(), a.dim), (900, 100, 64));
        assert_eq!(a.truth.as_ref().unwrap().num_features, 64);
        assert!(a.val_labels.is_none() && a.train_labels.is_none());
        assert_eq!(a, load(&cfg, 42).unwrap());
        assert_ne!(a.train, load(&cfg, 43).unwrap().train);
    }

    #[test]
    fn split_sizes_and_labels_follow_samples() {
        let m = Matrix { data: (0..30).map(|v| v as f32).collect(), rows: 30, cols: 1 };
        let labels: Vec<u32> = (0..30).map(|v| v * 2).collect();
        let ds = split(m.clone(), Some(labels.clone()), 0.1, 5, "t").unwrap();
        // 0.1 * 30 is 3.0000000000000004 in binary: still 3 validation samples.
        assert_eq!((ds.n_train(), ds.n_val()), (27, 3));
        for (x, l) in ds.train.iter().zip(ds.train_labels.as_ref().unwrap()) {
            assert_eq!(*x as u32 * 2, *l);
        }
        for (x, l) in ds.val.iter().zip(ds.val_labels.as_ref().unwrap()) {
            assert_eq!(*x as u32 * 2, *l);
        }
        let mut all: Vec<f32> = ds.train.iter().chain(&ds.val).copied().collect();
        all.sort_by(f32::total_cmp);
        assert_eq!(all, m.data, "the split is a permutation");
        assert_ne!(ds.train[..], m.data[..27], "shuffled");
        let again = split(m.clone(), None, 0.1, 5, "t").unwrap();
        assert_eq!((again.train.clone(), again.val.clone()), (ds.train.clone(), ds.val.clone()));
        let other = split(m.clone(), None, 0.1, 6, "t").unwrap();
        assert_ne!(other.train, ds.train);
        assert_eq!(validation_count(10, 0.25), 3, "ceil");
        assert_eq!(validation_count(60000, 1.0 / 6.0), 10000);
    }

    #[test]
    fn too_few_samples_or_empty_split() {
        let one = Matrix { data: vec![1.0, 2.0], rows: 1, cols: 2 };
        let e = split(one, None, 0.5, 0, "x.npy").unwrap_err().to_string();
        assert!(e.contains("x.npy") && e.contains("at least 2"), "{e}");
        let two = Matrix { data: vec![1.0, 2.0], rows: 2, cols: 1 };
        let e = split(two.clone(), None, 0.0, 0, "x.npy").unwrap_err().to_string();
        assert!(e.contains("validation split empty"), "{e}");
        let e = split(two, None, 0.9, 0, "x.npy").unwrap_err().to_string();
        assert!(e.contains("training split empty"), "{e}");
    }

    #[test]
    fn scaling_statistics_come_from_train_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = npy_file(&dir, "a.npy", 20, 3);
        let raw = load(&npy_cfg(p.clone()), 9).unwrap();
        let cfg = DataConfig { scaling: Scaling::Standardize, ..npy_cfg(p.clone()) };
        let ds = load(&cfg, 9).unwrap();
        // Expected: train statistics computed by hand from the unscaled split.
        for j in 0..3 {
            let col: Vec<f64> = raw.train.iter().skip(j).step_by(3).map(|&v| v as f64).collect();
            let mean = col.iter().sum::<f64>() / col.len() as f64;
            let sd =
                (col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / col.len() as f64).sqrt();
            for (scaled, orig) in
                ds.val.iter().skip(j).step_by(3).zip(raw.val.iter().skip(j).step_by(3))
            {
                let want = (*orig as f64 - mean) / sd;
                assert!((*scaled as f64 - want).abs() < 1e-5, "dim {j}: {scaled} vs {want}");
            }
            let train_mean: f64 =
                ds.train.iter().skip(j).step_by(3).map(|&v| v as f64).sum::<f64>() / 18.0;
            assert!(train_mean.abs() < 1e-5);
        }
        let val_mean: f64 = ds.val.iter().step_by(3).map(|&v| v as f64).sum::<f64>() / 2.0;
        assert!(val_mean.abs() > 1e-3, "validation is not re-centred on its own statistics");

        let cfg = DataConfig { scaling: Scaling::MaxAbs, ..npy_cfg(p.clone()) };
        let ds = load(&cfg, 9).unwrap();
        let train_max = raw.train.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(ds.train.iter().fold(0f32, |m, v| m.max(v.abs())), 1.0);
        for (s, o) in ds.val.iter().zip(&raw.val) {
            assert!((s - o / train_max).abs() < 1e-6);
        }
        let cfg = DataConfig { scaling: Scaling::UnitNorm, ..npy_cfg(p) };
        let ds = load(&cfg, 9).unwrap();
        for row in
            ds.train.chunks(3).chain(ds.val.chunks(3)).filter(|r| r.iter().any(|&v| v != 0.0))
        {
            let n: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((n - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn constant_dimension_is_only_centred() {
        let train = [1.0, 5.0, 3.0, 5.0];
        let s = Scaler::fit(Scaling::Standardize, &train, 2);
        let mut v = [2.0f32, 6.0];
        s.apply(&mut v, 2);
        // dim 0: mean 2, std 1; dim 1 is constant 5: centred, not divided by 0.
        assert_eq!(v, [0.0, 1.0]);
    }

    #[test]
    fn limit_keeps_the_first_samples() {
        let dir = tempfile::tempdir().unwrap();
        let p = npy_file(&dir, "a.npy", 50, 2);
        let cfg = DataConfig { limit: 10, validation_fraction: 0.2, ..npy_cfg(p) };
        let ds = load(&cfg, 1).unwrap();
        assert_eq!((ds.n_train(), ds.n_val()), (8, 2));
        assert!(ds.train.iter().chain(&ds.val).all(|&v| v < 100.0), "only rows 0..10");
        let syn = DataConfig { limit: 100, ..Default::default() };
        let ds = load(&syn, 1).unwrap();
        assert_eq!(ds.n_train() + ds.n_val(), 100);
    }

    #[test]
    fn labels_npy_and_idx_and_count_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let p = npy_file(&dir, "a.npy", 10, 2);
        let lp = dir.path().join("l.npy");
        let raw: Vec<u8> = (0..10i64).flat_map(|x| (x * 10).to_le_bytes()).collect();
        std::fs::write(&lp, npy::encode("<i8", false, &[10], &raw, 1)).unwrap();
        let cfg = DataConfig { labels: Some(lp), ..npy_cfg(p.clone()) };
        let ds = load(&cfg, 3).unwrap();
        // Row i starts with i * 10, its label is i * 10.
        for (row, l) in ds.val.chunks(2).zip(ds.val_labels.as_ref().unwrap()) {
            assert_eq!(row[0] as u32, *l);
        }
        assert_eq!(ds.train_labels.as_ref().unwrap().len(), 9);

        let ip = dir.path().join("img");
        std::fs::write(&ip, idx::encode(&[4, 2, 2], &[1; 16])).unwrap();
        let lp = dir.path().join("lab");
        std::fs::write(&lp, idx::encode(&[3], &[1, 2, 3])).unwrap();
        let cfg = DataConfig {
            source: Some(DataSource::Mnist),
            path: Some(ip),
            labels: Some(lp.clone()),
            validation_fraction: 0.25,
            ..Default::default()
        };
        let e = load(&cfg, 0).unwrap_err();
        assert!(matches!(e, DataError::LabelsMismatch { labels: 3, samples: 4, .. }), "{e}");
        assert!(e.to_string().contains(&lp.display().to_string()), "{e}");
    }

    #[test]
    fn non_finite_values_are_located() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nan.npy");
        let v = [1.0f32, 2.0, 3.0, f32::NAN, 5.0, 6.0];
        std::fs::write(&p, npy::encode("<f4", false, &[3, 2], &npy::f32_bytes(&v), 1)).unwrap();
        let e = load(&npy_cfg(p), 0).unwrap_err().to_string();
        assert!(e.contains("nan.npy") && e.contains("sample 1, dimension 1"), "{e}");
    }

    #[test]
    fn missing_path_and_missing_file() {
        let cfg = DataConfig { source: Some(DataSource::Safetensors), ..Default::default() };
        let e = load(&cfg, 0).unwrap_err().to_string();
        assert!(e.contains("data.path") && e.contains("safetensors"), "{e}");
        let cfg = DataConfig {
            source: Some(DataSource::Mnist),
            path: Some("/nonexistent/train-images.gz".into()),
            ..Default::default()
        };
        let e = load(&cfg, 0).unwrap_err().to_string();
        assert_eq!(e, "/nonexistent/train-images.gz: file not found");
    }
}
