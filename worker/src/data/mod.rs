//! Training data: the seeded synthetic default and file loaders (npy, safetensors, MNIST IDX, CSV).
//!
//! Loading has two halves. [`read_samples`] turns the configured source into [`Samples`]: every
//! row (owned, or memory-mapped shards read in place), the labels, and for synthetic data the
//! ground truth; non-finite values are refused and `limit` applied. It does not depend on the
//! trial beyond the synthetic seed, so a worker keeps it in its [`cache`] and shares it across
//! trials (and between in-process workers). [`prepare`] then makes one trial's [`Dataset`]: a
//! seeded split into training and validation row indices, scaling fitted on the training rows by
//! streaming over them (validation numbers never see validation statistics), and the validation
//! rows materialised. Training rows are gathered and scaled a batch at a time
//! ([`Dataset::fill_batch`]), so a mapped file is never copied whole. Every failure is a
//! [`DataError`] that names the file (or config field) and the problem.

use msae_shared::config::{DataConfig, DataSource, Scaling};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub mod cache;
pub mod csv;
pub mod idx;
pub mod npy;
pub mod rows;
pub mod safetensors_file;
pub mod synthetic;

pub use rows::Rows;

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

/// Every sample of a source, before any split or scaling: what the cache keeps.
#[derive(Debug)]
pub struct Samples {
    pub rows: Rows,
    /// One label per row, when a labels source exists.
    pub labels: Option<Vec<u32>>,
    /// Known ground truth (synthetic data only).
    pub truth: Option<GroundTruth>,
    /// The file (or "synthetic data") for messages.
    pub origin: String,
    /// Every value is an integer in 0..=255 (uint8 files, IDX images, such CSVs): unscaled, such
    /// data trains badly (errors in the thousands), so it is divided by 255 unless a scaling is
    /// chosen.
    pub byte_valued: bool,
}

impl Samples {
    /// Owned rows of width `cols`.
    pub fn owned(data: Vec<f32>, cols: usize, origin: impl Into<String>) -> Samples {
        Samples {
            rows: Rows::Owned { data, cols },
            labels: None,
            truth: None,
            origin: origin.into(),
            byte_valued: false,
        }
    }

    /// Heap memory held (mapped pages are not counted: see [`rows`]).
    pub fn heap_bytes(&self) -> usize {
        self.rows.heap_bytes()
            + self.labels.as_ref().map_or(0, |l| l.len() * 4)
            + self.truth.as_ref().map_or(0, |t| t.features.len() * 4 + t.feature_cluster.len() * 8)
    }
}

/// A dataset ready for training: one trial's split of shared [`Samples`].
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Sample dimension.
    pub dim: usize,
    /// The rows, unscaled, shared with other trials of the same data.
    pub samples: Arc<Samples>,
    /// Indices (into `samples`) of the training rows, in split order.
    pub train_rows: Vec<usize>,
    /// Validation samples, scaled, row-major (n_val, dim).
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

/// Equal content: the same scaled rows in the same order, wherever they are stored.
impl PartialEq for Dataset {
    fn eq(&self, o: &Self) -> bool {
        self.dim == o.dim
            && self.n_train() == o.n_train()
            && self.val == o.val
            && self.val_labels == o.val_labels
            && self.train_labels == o.train_labels
            && self.truth == o.truth
            && self.scaler == o.scaler
            && self.train_matrix() == o.train_matrix()
    }
}

impl Dataset {
    pub fn n_train(&self) -> usize {
        self.train_rows.len()
    }
    pub fn n_val(&self) -> usize {
        self.val.len() / self.dim
    }

    /// The training rows at `positions` (indices into the training split), scaled, written
    /// one after the other into `out`.
    #[inline]
    pub fn fill_batch(&self, positions: impl Iterator<Item = usize>, out: &mut [f32]) {
        let dim = self.dim;
        for (row, p) in out.chunks_exact_mut(dim).zip(positions) {
            self.samples.rows.row_into(self.train_rows[p], row);
        }
        self.scaler.apply(out, dim);
    }

    /// Visit every training row, scaled, in file order.
    pub fn for_each_train_row(&self, mut f: impl FnMut(&[f32])) {
        self.samples.rows.advise(true);
        let mut buf = vec![0f32; self.dim];
        for i in self.train_rows_in_file_order() {
            self.samples.rows.row_into(i, &mut buf);
            self.scaler.apply(&mut buf, self.dim);
            f(&buf);
        }
    }

    /// The training row indices ascending: passes over all of them then read a mapped file
    /// front to back instead of hopping around it (which, for a file larger than RAM, would
    /// fetch each page many times).
    pub fn train_rows_in_file_order(&self) -> Vec<usize> {
        let mut rows = self.train_rows.clone();
        rows.sort_unstable();
        rows
    }

    /// Every training row, scaled, as one row-major buffer (a full copy: tests and small data).
    pub fn train_matrix(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n_train() * self.dim];
        self.fill_batch(0..self.n_train(), &mut out);
        out
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
    /// A CSV field that is not what its column needs.
    #[error("{}: line {line}, column {column}: {reason}", path.display())]
    Csv { path: PathBuf, line: usize, column: usize, reason: String },
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

/// Load (or generate) the configured data, split it and scale it, without the worker's cache.
///
/// `seed` drives the synthetic generator and the train/validation shuffle, so every worker given
/// the same config and seed builds identical datasets. Steps, in order:
/// 1. read the samples (`data.source`) and, when `data.labels` is set, one label per sample;
/// 2. reject NaN/inf values;
/// 3. `data.limit` (> 0) keeps the first `limit` samples in file order;
/// 4. a seeded shuffle, then the last `ceil(validation_fraction * n)` samples are validation;
/// 5. scaling fitted on the training split, applied to both splits.
pub fn load(cfg: &DataConfig, seed: u64) -> Result<Dataset, DataError> {
    let samples = Arc::new(read_samples(cfg, seed)?);
    prepare(samples, cfg, seed)
}

/// [`load`] through the process-wide cache: equal data configs share one [`Samples`].
pub fn load_cached(cfg: &DataConfig, seed: u64) -> Result<Dataset, DataError> {
    let samples = cache::global().get_or_load(cfg, seed)?;
    prepare(samples, cfg, seed)
}

/// The source `cfg` reads: the configured or inferred one; for a directory without a source,
/// the format of the files in it.
pub fn resolve_source(cfg: &DataConfig) -> Result<DataSource, DataError> {
    match cfg.resolved_source() {
        Ok(s) => Ok(s),
        Err(e) => match cfg.path.as_deref() {
            Some(p) if p.is_dir() => {
                let first = rows::expand(p)?;
                DataSource::infer_from_path(&first[0])
                    .ok_or(DataError::InvalidConfig { field: e.field, reason: e.message })
            }
            _ => Err(DataError::InvalidConfig { field: e.field, reason: e.message }),
        },
    }
}

/// Read every sample of the configured source (steps 1 to 3 of [`load`]).
pub fn read_samples(cfg: &DataConfig, seed: u64) -> Result<Samples, DataError> {
    let source = resolve_source(cfg)?;
    if cfg.source_inferred() {
        tracing::info!(
            source = source.name(),
            path = %cfg.path.as_deref().unwrap_or(Path::new("")).display(),
            "data.source not given: inferred from the file name"
        );
    }
    let mut truth = None;
    let mut csv_labels = None;
    let (rows, origin, byte_valued) = match source {
        DataSource::Synthetic => {
            let s = &cfg.synthetic;
            // The generator is sequential, so the first `limit` samples are the same whether or
            // not the rest are generated: generate only what is kept.
            let n = if cfg.limit > 0 { cfg.limit.min(s.num_samples) } else { s.num_samples };
            let data = synthetic::generate_n(s, seed, n)?;
            truth = Some(data.truth);
            (
                Rows::Owned { data: data.samples, cols: data.dim },
                "synthetic data".to_string(),
                false,
            )
        }
        DataSource::Npy | DataSource::Safetensors => {
            let path = require_path(cfg, source)?;
            read_files(cfg, source, path)?
        }
        DataSource::Mnist => {
            let path = require_path(cfg, source)?;
            let m = idx::load_images(path)?;
            (Rows::Owned { data: m.data, cols: m.cols }, path.display().to_string(), true)
        }
        DataSource::Csv => {
            let path = require_path(cfg, source)?;
            let t = csv::load(path, cfg.header, cfg.label_column)?;
            csv_labels = t.labels;
            let byte_valued = t.byte_valued;
            (Rows::Owned { data: t.data, cols: t.cols }, path.display().to_string(), byte_valued)
        }
    };
    let mut samples = Samples { rows, labels: csv_labels, truth, origin, byte_valued };
    if let Some(lpath) = &cfg.labels {
        let l = read_label_files(lpath)?;
        // Synthetic data was possibly generated short (limit); compare against what the file
        // sources hold in full, which is every row for them.
        let expected = match source {
            DataSource::Synthetic => cfg.synthetic.num_samples,
            _ => samples.rows.len(),
        };
        if l.len() != expected {
            return Err(DataError::LabelsMismatch {
                path: lpath.clone(),
                labels: l.len(),
                samples: expected,
                data: samples.origin.clone(),
            });
        }
        samples.labels = Some(l);
    }
    if cfg.limit > 0 {
        samples.rows.truncate(cfg.limit);
    }
    if let Some(l) = samples.labels.as_mut() {
        l.truncate(samples.rows.len());
    }
    if !byte_valued {
        check_finite(&samples.rows, &samples.origin)?;
    }
    Ok(samples)
}

/// The rows of one `.npy`/safetensors file, a directory or a glob of them: mapped when
/// `data.mmap` is on and the files are uncompressed, else read into memory.
fn read_files(
    cfg: &DataConfig,
    source: DataSource,
    path: &Path,
) -> Result<(Rows, String, bool), DataError> {
    let files = rows::expand(path)?;
    let origin = if files.len() == 1 {
        files[0].display().to_string()
    } else {
        format!("{} ({} shards)", path.display(), files.len())
    };
    let tensor = cfg.tensor.as_deref();
    let mapped = cfg.mmap && !files.iter().any(|f| rows::is_gzip(f));
    if mapped {
        let shards = files
            .iter()
            .map(|f| match source {
                DataSource::Safetensors => rows::map_safetensors(f, tensor),
                _ => rows::map_npy(f),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let byte_valued = shards.iter().all(|(s, _)| s.elem == rows::Elem::U8);
        let rows = Rows::from_shards(shards)?;
        tracing::debug!(origin = %origin, rows = rows.len(), cols = rows.cols(), "data mapped");
        return Ok((rows, origin, byte_valued));
    }
    let mut data = Vec::new();
    let mut cols = None;
    let mut byte_valued = true;
    for f in &files {
        let m = match source {
            DataSource::Safetensors => safetensors_file::load_matrix(f, tensor)?,
            _ => npy::load_matrix(f)?,
        };
        byte_valued &= file_is_byte_valued(f, source, tensor);
        match cols {
            None => cols = Some(m.cols),
            Some(c) if c != m.cols => {
                return Err(DataError::Shape {
                    path: f.clone(),
                    shape: vec![m.rows, m.cols],
                    reason: format!(
                        "rows of {} values where the first shard ({}) has {c}",
                        m.cols,
                        files[0].display()
                    ),
                });
            }
            Some(_) => {}
        }
        if data.is_empty() {
            data = m.data;
        } else {
            data.extend_from_slice(&m.data);
        }
    }
    Ok((Rows::Owned { data, cols: cols.unwrap_or(1) }, origin, byte_valued))
}

/// Whether a file read into memory stored unsigned bytes (its values were converted already).
fn file_is_byte_valued(path: &Path, source: DataSource, tensor: Option<&str>) -> bool {
    let Ok(bytes) = read_bytes(path) else { return false };
    match source {
        DataSource::Safetensors => safetensors::SafeTensors::deserialize(&bytes)
            .ok()
            .and_then(|st| {
                let name = safetensors_file::choose(path, &st, tensor).ok()?;
                st.tensor(&name).ok().map(|v| v.dtype() == safetensors::Dtype::U8)
            })
            .unwrap_or(false),
        _ => npy::layout(path, &bytes).is_ok_and(|l| l.kind == "u1"),
    }
}

/// Labels from a file, or concatenated from the files of a directory or glob (name order, to
/// match the data's shards).
fn read_label_files(path: &Path) -> Result<Vec<u32>, DataError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !(path.is_dir() || name.contains(['*', '?'])) {
        return read_labels(path);
    }
    let mut out = Vec::new();
    for f in rows::expand(path)? {
        out.extend(read_labels(&f)?);
    }
    Ok(out)
}

/// Split shared samples for one trial and fit the scaling (steps 4 and 5 of [`load`]).
pub fn prepare(samples: Arc<Samples>, cfg: &DataConfig, seed: u64) -> Result<Dataset, DataError> {
    let mut ds = split_samples(samples, cfg.validation_fraction, seed)?;
    let scaling = match cfg.scaling {
        Some(Scaling::None) if ds.samples.byte_valued => {
            tracing::warn!(
                origin = %ds.samples.origin,
                "integer data (0..255) with data.scaling none: errors will be in the thousands; \
                 leave data.scaling out (divides by 255) or set max_abs"
            );
            Some(Scaling::None)
        }
        s => s,
    };
    ds.scaler = match scaling {
        Some(s) => Scaler::fit_rows(s, ds.dim, |f| {
            ds.samples.rows.advise(true);
            let mut buf = vec![0f32; ds.dim];
            for i in ds.train_rows_in_file_order() {
                ds.samples.rows.row_into(i, &mut buf);
                f(&buf);
            }
        }),
        None if ds.samples.byte_valued => {
            tracing::info!(
                origin = %ds.samples.origin,
                "integer data (0..255): divided by 255 (set data.scaling to choose another)"
            );
            Scaler::MaxAbs { scale: 1.0 / 255.0 }
        }
        None => Scaler::Identity,
    };
    ds.scaler.apply(&mut ds.val, ds.dim);
    tracing::info!(
        origin = %ds.samples.origin,
        dim = ds.dim,
        train = ds.n_train(),
        val = ds.n_val(),
        labels = ds.val_labels.is_some(),
        scaler = ds.scaler.name(),
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
fn check_finite(rows: &Rows, origin: &str) -> Result<(), DataError> {
    if let Rows::Owned { data, cols } = rows {
        // The common case in one tight pass; the position is only worked out on failure.
        if data.iter().all(|v| v.is_finite()) {
            return Ok(());
        }
        let i = data.iter().position(|v| !v.is_finite()).unwrap();
        return Err(DataError::NonFinite {
            origin: origin.to_string(),
            row: i / cols,
            col: i % cols,
            value: data[i],
        });
    }
    let mut bad = None;
    rows.for_each(|r, row| {
        if bad.is_none()
            && let Some(c) = row.iter().position(|v| !v.is_finite())
        {
            bad = Some((r, c, row[c]));
        }
    });
    match bad {
        Some((row, col, value)) => {
            Err(DataError::NonFinite { origin: origin.to_string(), row, col, value })
        }
        None => Ok(()),
    }
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
/// [`validation_count`] samples for validation, unscaled. Errors on fewer than 2 samples or an
/// empty split.
pub fn split(
    matrix: Matrix,
    labels: Option<Vec<u32>>,
    validation_fraction: f64,
    seed: u64,
    origin: &str,
) -> Result<Dataset, DataError> {
    let mut samples = Samples::owned(matrix.data, matrix.cols, origin);
    samples.labels = labels;
    split_samples(Arc::new(samples), validation_fraction, seed)
}

fn split_samples(
    samples: Arc<Samples>,
    validation_fraction: f64,
    seed: u64,
) -> Result<Dataset, DataError> {
    let n = samples.rows.len();
    let dim = samples.rows.cols();
    let origin = &samples.origin;
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
    // One permutation of all rows, across shards, so the split depends only on the seed and the
    // row count, never on how the rows are stored.
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed ^ SPLIT_STREAM));
    let n_train = n - n_val;
    let va = order.split_off(n_train);
    let mut val = vec![0f32; va.len() * dim];
    for (row, &i) in val.chunks_exact_mut(dim).zip(&va) {
        samples.rows.row_into(i, row);
    }
    let pick = |l: &Vec<u32>, idx: &[usize]| idx.iter().map(|&i| l[i]).collect::<Vec<u32>>();
    Ok(Dataset {
        dim,
        train_labels: samples.labels.as_ref().map(|l| pick(l, &order)),
        val_labels: samples.labels.as_ref().map(|l| pick(l, &va)),
        truth: samples.truth.clone(),
        train_rows: order,
        val,
        samples,
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
        Scaler::fit_rows(scaling, dim, |f| train.chunks_exact(dim).for_each(f))
    }

    /// Fit `scaling` on the rows `visit` hands to its callback; it is called once per pass
    /// (standardising takes two), so the rows are streamed and never gathered into a copy.
    pub fn fit_rows(
        scaling: Scaling,
        dim: usize,
        visit: impl Fn(&mut dyn FnMut(&[f32])),
    ) -> Scaler {
        match scaling {
            Scaling::None => Scaler::Identity,
            Scaling::UnitNorm => Scaler::UnitNorm,
            Scaling::MaxAbs => {
                let mut m = 0.0f32;
                visit(&mut |row| m = row.iter().fold(m, |m, v| m.max(v.abs())));
                Scaler::MaxAbs { scale: if m > 0.0 { 1.0 / m } else { 1.0 } }
            }
            Scaling::Standardize => {
                let mut rows = 0usize;
                let mut sum = vec![0f64; dim];
                visit(&mut |row| {
                    rows += 1;
                    for (s, &v) in sum.iter_mut().zip(row) {
                        *s += v as f64;
                    }
                });
                let rows = rows.max(1) as f64;
                let mean: Vec<f64> = sum.iter().map(|s| s / rows).collect();
                let mut var = vec![0f64; dim];
                visit(&mut |row| {
                    for ((q, &v), m) in var.iter_mut().zip(row).zip(&mean) {
                        let d = v as f64 - m;
                        *q += d * d;
                    }
                });
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

    /// The scaling's name in logs.
    pub fn name(&self) -> &'static str {
        match self {
            Scaler::Identity => "none",
            Scaler::Standardize { .. } => "standardize",
            Scaler::UnitNorm => "unit_norm",
            Scaler::MaxAbs { .. } => "max_abs",
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
        assert_ne!(a.train_matrix(), load(&cfg, 43).unwrap().train_matrix());
    }

    #[test]
    fn split_sizes_and_labels_follow_samples() {
        let m = Matrix { data: (0..30).map(|v| v as f32).collect(), rows: 30, cols: 1 };
        let labels: Vec<u32> = (0..30).map(|v| v * 2).collect();
        let ds = split(m.clone(), Some(labels.clone()), 0.1, 5, "t").unwrap();
        // 0.1 * 30 is 3.0000000000000004 in binary: still 3 validation samples.
        assert_eq!((ds.n_train(), ds.n_val()), (27, 3));
        for (x, l) in ds.train_matrix().iter().zip(ds.train_labels.as_ref().unwrap()) {
            assert_eq!(*x as u32 * 2, *l);
        }
        for (x, l) in ds.val.iter().zip(ds.val_labels.as_ref().unwrap()) {
            assert_eq!(*x as u32 * 2, *l);
        }
        let mut all: Vec<f32> = ds.train_matrix().iter().chain(&ds.val).copied().collect();
        all.sort_by(f32::total_cmp);
        assert_eq!(all, m.data, "the split is a permutation");
        assert_ne!(ds.train_matrix()[..], m.data[..27], "shuffled");
        let again = split(m.clone(), None, 0.1, 5, "t").unwrap();
        assert_eq!(
            (again.train_matrix().clone(), again.val.clone()),
            (ds.train_matrix().clone(), ds.val.clone())
        );
        let other = split(m.clone(), None, 0.1, 6, "t").unwrap();
        assert_ne!(other.train_matrix(), ds.train_matrix());
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
        let cfg = DataConfig { scaling: Some(Scaling::Standardize), ..npy_cfg(p.clone()) };
        let ds = load(&cfg, 9).unwrap();
        // Expected: train statistics computed by hand from the unscaled split.
        for j in 0..3 {
            let col: Vec<f64> =
                raw.train_matrix().iter().skip(j).step_by(3).map(|&v| v as f64).collect();
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
                ds.train_matrix().iter().skip(j).step_by(3).map(|&v| v as f64).sum::<f64>() / 18.0;
            assert!(train_mean.abs() < 1e-5);
        }
        let val_mean: f64 = ds.val.iter().step_by(3).map(|&v| v as f64).sum::<f64>() / 2.0;
        assert!(val_mean.abs() > 1e-3, "validation is not re-centred on its own statistics");

        let cfg = DataConfig { scaling: Some(Scaling::MaxAbs), ..npy_cfg(p.clone()) };
        let ds = load(&cfg, 9).unwrap();
        let train_max = raw.train_matrix().iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(ds.train_matrix().iter().fold(0f32, |m, v| m.max(v.abs())), 1.0);
        for (s, o) in ds.val.iter().zip(&raw.val) {
            assert!((s - o / train_max).abs() < 1e-6);
        }
        let cfg = DataConfig { scaling: Some(Scaling::UnitNorm), ..npy_cfg(p) };
        let ds = load(&cfg, 9).unwrap();
        for row in ds
            .train_matrix()
            .chunks(3)
            .chain(ds.val.chunks(3))
            .filter(|r| r.iter().any(|&v| v != 0.0))
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
        assert!(ds.train_matrix().iter().chain(&ds.val).all(|&v| v < 100.0), "only rows 0..10");
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

    fn write_npy(dir: &Path, name: &str, descr: &str, shape: &[usize], raw: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, npy::encode(descr, false, shape, raw, 1)).unwrap();
        p
    }

    fn batch(ds: &Dataset, positions: &[usize]) -> Vec<f32> {
        let mut out = vec![0f32; positions.len() * ds.dim];
        ds.fill_batch(positions.iter().copied(), &mut out);
        out
    }

    #[test]
    fn mapped_and_copied_reads_give_identical_batches() {
        let dir = tempfile::tempdir().unwrap();
        let (rows, cols) = (40, 5);
        let vals: Vec<f32> = (0..rows * cols).map(|k| (k as f32 * 0.37).sin() * 3.0).collect();
        let f16: Vec<u8> =
            vals.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        let bf16: Vec<u8> =
            vals.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        let bytes: Vec<u8> = (0..rows * cols).map(|k| (k * 7 % 256) as u8).collect();
        let files = [
            write_npy(dir.path(), "f32.npy", "<f4", &[rows, cols], &npy::f32_bytes(&vals)),
            write_npy(dir.path(), "f16.npy", "<f2", &[rows, cols], &f16),
            write_npy(dir.path(), "bf16.npy", "<V2", &[rows, cols], &bf16),
            write_npy(dir.path(), "u8.npy", "|u1", &[rows, 1, cols], &bytes),
        ];
        let st = dir.path().join("acts.safetensors");
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![rows, cols], &bf16)
                .unwrap();
        std::fs::write(&st, safetensors::serialize([("acts", view)], None).unwrap()).unwrap();
        for path in files.iter().chain([&st]) {
            for scaling in [None, Some(Scaling::Standardize), Some(Scaling::UnitNorm)] {
                let mapped = DataConfig { scaling, ..npy_cfg(path.clone()) };
                let mapped = DataConfig { source: None, ..mapped };
                let copied = DataConfig { mmap: false, ..mapped.clone() };
                let (m, c) = (load(&mapped, 7).unwrap(), load(&copied, 7).unwrap());
                assert!(matches!(m.samples.rows, Rows::Mapped { .. }), "{}", path.display());
                assert!(matches!(c.samples.rows, Rows::Owned { .. }));
                assert_eq!(m.samples.byte_valued, path.ends_with("u8.npy"));
                assert_eq!(c.samples.byte_valued, m.samples.byte_valued);
                assert_eq!(m, c, "{} {scaling:?}", path.display());
                let picks = [3, 0, 35, 3, 17];
                assert_eq!(batch(&m, &picks), batch(&c, &picks));
            }
        }
        // The f32 file's rows are the very values written.
        let ds = load(&npy_cfg(files[0].clone()), 7).unwrap();
        let r = ds.train_rows[4];
        assert_eq!(batch(&ds, &[4]), vals[r * cols..(r + 1) * cols]);
    }

    #[test]
    fn shards_equal_the_concatenated_file() {
        let dir = tempfile::tempdir().unwrap();
        let (rows, cols) = (50, 3);
        let vals: Vec<f32> = (0..rows * cols).map(|k| k as f32).collect();
        let labels: Vec<u8> = (0..rows).map(|r| (r % 7) as u8).collect();
        let whole =
            write_npy(dir.path(), "whole.npy", "<f4", &[rows, cols], &npy::f32_bytes(&vals));
        let wl = write_npy(dir.path(), "whole_labels.npy", "|u1", &[rows], &labels);
        let sd = dir.path().join("shards");
        let ld = dir.path().join("labels");
        std::fs::create_dir_all(&sd).unwrap();
        std::fs::create_dir_all(&ld).unwrap();
        // An empty shard in the middle, and shards whose names sort in row order.
        for (k, (a, b)) in [(0, 17), (17, 17), (17, 50)].into_iter().enumerate() {
            let part = &vals[a * cols..b * cols];
            write_npy(&sd, &format!("part_{k}.npy"), "<f4", &[b - a, cols], &npy::f32_bytes(part));
            write_npy(&ld, &format!("part_{k}.npy"), "|u1", &[b - a], &labels[a..b]);
        }
        std::fs::write(sd.join("README"), "not a shard").unwrap();
        let want = DataConfig { labels: Some(wl), ..npy_cfg(whole) };
        for (path, lab) in [(sd.clone(), ld.clone()), (sd.join("part_*.npy"), ld.join("*.npy"))] {
            for mmap in [true, false] {
                let cfg = DataConfig {
                    path: Some(path.clone()),
                    labels: Some(lab.clone()),
                    mmap,
                    ..want.clone()
                };
                for seed in [1, 2] {
                    let (a, b) = (load(&cfg, seed).unwrap(), load(&want, seed).unwrap());
                    assert_eq!(a, b, "{} mmap {mmap}", path.display());
                    assert!(a.samples.origin.contains("3 shards"), "{}", a.samples.origin);
                }
            }
        }
        // A directory without data.source: the shards' format.
        let cfg = DataConfig { source: None, path: Some(sd.clone()), ..Default::default() };
        assert_eq!(load(&cfg, 1).unwrap().n_train() + load(&cfg, 1).unwrap().n_val(), 50);
        write_npy(&sd, "part_9.npy", "<f4", &[1, 2], &npy::f32_bytes(&[1.0, 2.0]));
        let e = load(&npy_cfg(sd.clone()), 1).unwrap_err().to_string();
        assert!(
            e.contains("part_9.npy") && e.contains("rows of 2 values") && e.contains("3"),
            "{e}"
        );
        let e = load(&npy_cfg(dir.path().join("nothing_*.npy")), 1).unwrap_err().to_string();
        assert!(e.starts_with("data.path: no file matches") && e.contains("nothing_*.npy"), "{e}");
    }

    #[test]
    fn integer_data_is_scaled_to_the_unit_interval_by_default() {
        let dir = tempfile::tempdir().unwrap();
        let px: Vec<u8> = (0..=255).collect();
        let p = write_npy(dir.path(), "img.npy", "|u1", &[16, 16], &px);
        let ds = load(&npy_cfg(p.clone()), 0).unwrap();
        assert_eq!(ds.scaler, Scaler::MaxAbs { scale: 1.0 / 255.0 });
        let all: Vec<f32> = ds.train_matrix().into_iter().chain(ds.val.clone()).collect();
        assert!(all.iter().all(|v| (0.0..=1.0).contains(v)) && all.contains(&1.0));
        let raw = load(&DataConfig { scaling: Some(Scaling::None), ..npy_cfg(p) }, 0).unwrap();
        assert_eq!(raw.scaler, Scaler::Identity, "an explicit none is obeyed (with a warning)");
        let csv = dir.path().join("data.csv");
        std::fs::write(&csv, "label,a,b\n1,0,255\n2,3,4\n0,9,9\n").unwrap();
        let cfg = DataConfig {
            path: Some(csv.clone()),
            label_column: Some(0),
            validation_fraction: 0.34,
            ..Default::default()
        };
        let ds = load(&cfg, 0).unwrap();
        assert_eq!(ds.scaler, Scaler::MaxAbs { scale: 1.0 / 255.0 });
        let mut got: Vec<u32> = ds.train_labels.clone().unwrap();
        got.extend(ds.val_labels.clone().unwrap());
        got.sort();
        assert_eq!((ds.dim, got), (2, vec![0, 1, 2]));
        // Float data is left as it is.
        std::fs::write(&csv, "0.5,1\n2,3\n4,5\n").unwrap();
        let cfg = DataConfig { path: Some(csv), validation_fraction: 0.34, ..Default::default() };
        assert_eq!(load(&cfg, 0).unwrap().scaler, Scaler::Identity);
    }

    #[test]
    fn csv_errors_name_the_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("data.csv");
        std::fs::write(&csv, "label,p1,p2\n1,0,255\n2,3,4x\n").unwrap();
        let cfg =
            DataConfig { path: Some(csv.clone()), label_column: Some(0), ..Default::default() };
        let e = load(&cfg, 0).unwrap_err().to_string();
        assert_eq!(e, format!("{}: line 3, column 3: \"4x\" is not a number", csv.display()));
    }

    #[test]
    fn the_cache_shares_equal_configs_and_evicts_under_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let syn = |n: usize| DataConfig {
            synthetic: SyntheticConfig { num_samples: n, input_dim: 8, ..Default::default() },
            ..Default::default()
        };
        // 1000 x 8 f32 rows are 32000 bytes (plus the ground truth): two do not fit in 80 kB.
        let cache = cache::DataCache::new(80_000);
        let a = cache.get_or_load(&syn(1000), 1).unwrap();
        let scaled = DataConfig { scaling: Some(Scaling::Standardize), ..syn(1000) };
        assert!(Arc::ptr_eq(&a, &cache.get_or_load(&scaled, 1).unwrap()), "scaling is per trial");
        assert!(!Arc::ptr_eq(&a, &cache.get_or_load(&syn(1000), 2).unwrap()), "another seed");
        assert_eq!(cache.len(), 2);
        assert!(cache.held_bytes() <= 80_000);
        let b = cache.get_or_load(&syn(1200), 1).unwrap();
        assert!(cache.held_bytes() <= 80_000, "{}", cache.held_bytes());
        assert_eq!(cache.len(), 2, "the least recently used entry went");
        assert!(Arc::ptr_eq(&b, &cache.get_or_load(&syn(1200), 1).unwrap()));
        assert!(!Arc::ptr_eq(&a, &cache.get_or_load(&syn(1000), 1).unwrap()), "a was evicted");
        // Two trials of one prepared dataset draw from the same rows.
        let (t1, t2) =
            (prepare(b.clone(), &syn(1200), 5).unwrap(), prepare(b, &syn(1200), 6).unwrap());
        assert!(Arc::ptr_eq(&t1.samples, &t2.samples) && t1.train_rows != t2.train_rows);

        // Files: equal configs share; a rewritten file is read afresh; bigger than the budget is
        // served but not kept.
        let p = npy_file(&dir, "a.npy", 20, 3);
        let f = cache.get_or_load(&npy_cfg(p.clone()), 0).unwrap();
        assert!(matches!(f.rows, Rows::Mapped { .. }));
        assert!(Arc::ptr_eq(&f, &cache.get_or_load(&npy_cfg(p.clone()), 9).unwrap()), "seed-free");
        std::thread::sleep(std::time::Duration::from_millis(20));
        npy_file(&dir, "a.npy", 21, 3);
        let g = cache.get_or_load(&npy_cfg(p.clone()), 0).unwrap();
        assert_eq!(g.rows.len(), 21);
        let tiny = cache::DataCache::new(100);
        let copied = DataConfig { mmap: false, ..npy_cfg(p.clone()) };
        let x = tiny.get_or_load(&copied, 0).unwrap();
        assert!(tiny.is_empty() && !Arc::ptr_eq(&x, &tiny.get_or_load(&copied, 0).unwrap()));
        tiny.set_budget(1 << 20);
        let x = tiny.get_or_load(&copied, 0).unwrap();
        assert!(Arc::ptr_eq(&x, &tiny.get_or_load(&copied, 0).unwrap()));
        tiny.set_budget(0);
        assert!(tiny.is_empty());
    }
}
