//! Where a dataset's samples live: an owned f32 buffer (generated, CSV, IDX, gzipped or copied
//! files) or memory-mapped `.npy`/safetensors shards read in place.
//!
//! A map costs address space, not memory: its pages belong to the kernel's page cache, are
//! shared by every process and thread mapping the same file, and are dropped under pressure, so a
//! file larger than RAM still trains. Rows are converted to f32 only when a batch asks for them.

use super::DataError;
use memmap2::Mmap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How the elements of a mapped shard are stored (little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32,
    F64,
    F16,
    BF16,
    U8,
}

impl Elem {
    pub fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::F64 => 8,
            Elem::F16 | Elem::BF16 => 2,
            Elem::U8 => 1,
        }
    }

    fn convert(self, bytes: &[u8], out: &mut [f32]) {
        match self {
            Elem::F32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Elem::F64 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                    *o = f64::from_le_bytes(b.try_into().unwrap()) as f32;
                }
            }
            Elem::F16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            Elem::BF16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            Elem::U8 => {
                for (o, &b) in out.iter_mut().zip(bytes) {
                    *o = f32::from(b);
                }
            }
        }
    }
}

/// One mapped file's rows.
pub struct Shard {
    pub path: PathBuf,
    map: Arc<Mmap>,
    /// Byte offset of the first row in the map.
    offset: usize,
    pub rows: usize,
    pub elem: Elem,
}

impl Shard {
    fn row_bytes(&self, i: usize, cols: usize) -> &[u8] {
        let w = cols * self.elem.size();
        let start = self.offset + i * w;
        &self.map[start..start + w]
    }
}

/// The samples of a dataset, row-major with `cols` values a row.
pub enum Rows {
    Owned {
        data: Vec<f32>,
        cols: usize,
    },
    /// `starts[k]` is the global index of shard k's first row; `len` may stop short of the
    /// shards' total (`data.limit`).
    Mapped {
        shards: Vec<Shard>,
        starts: Vec<usize>,
        len: usize,
        cols: usize,
    },
}

impl std::fmt::Debug for Rows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rows::Owned { cols, .. } => {
                write!(f, "Rows::Owned({} x {cols})", self.len())
            }
            Rows::Mapped { shards, len, cols, .. } => {
                write!(f, "Rows::Mapped({len} x {cols} in {} shard(s))", shards.len())
            }
        }
    }
}

impl Rows {
    pub fn len(&self) -> usize {
        match self {
            Rows::Owned { data, cols } => data.len() / cols.max(&1),
            Rows::Mapped { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn cols(&self) -> usize {
        match self {
            Rows::Owned { cols, .. } | Rows::Mapped { cols, .. } => *cols,
        }
    }

    /// Bytes of anonymous (heap) memory held; a map's pages are the kernel's and not counted.
    pub fn heap_bytes(&self) -> usize {
        match self {
            Rows::Owned { data, .. } => data.len() * 4,
            Rows::Mapped { starts, .. } => starts.len() * 8,
        }
    }

    /// Row `i` as f32 into `out` (of length `cols`).
    #[inline]
    pub fn row_into(&self, i: usize, out: &mut [f32]) {
        match self {
            Rows::Owned { data, cols } => out.copy_from_slice(&data[i * cols..(i + 1) * cols]),
            Rows::Mapped { shards, starts, cols, .. } => {
                let k = starts.partition_point(|&s| s <= i) - 1;
                let s = &shards[k];
                s.elem.convert(s.row_bytes(i - starts[k], *cols), out);
            }
        }
    }

    /// Keep only the first `n` rows.
    pub fn truncate(&mut self, n: usize) {
        match self {
            Rows::Owned { data, cols } => data.truncate(n * *cols),
            Rows::Mapped { len, .. } => *len = (*len).min(n),
        }
    }

    /// Tell the kernel how the mapped shards are about to be read. The passes over all rows
    /// (the finite check, the scaling statistics, the data-mean bias) read front to back and want
    /// read-ahead; batches read scattered rows, for which read-ahead fetches pages nobody asked
    /// for: with a file larger than memory that multiplies the bytes read from disk many times.
    /// Only a hint, shared by the trials reading the same map, so errors are ignored.
    pub fn advise(&self, sequential: bool) {
        #[cfg(unix)]
        if let Rows::Mapped { shards, .. } = self {
            let advice =
                if sequential { memmap2::Advice::Sequential } else { memmap2::Advice::Random };
            for s in shards {
                let _ = s.map.advise(advice);
            }
        }
        #[cfg(not(unix))]
        let _ = sequential;
    }

    /// Visit every row in order, converted to f32.
    pub fn for_each(&self, mut f: impl FnMut(usize, &[f32])) {
        self.advise(true);
        let mut buf = vec![0f32; self.cols()];
        for i in 0..self.len() {
            self.row_into(i, &mut buf);
            f(i, &buf);
        }
    }

    /// Concatenate mapped shards of one row width into one set of rows.
    pub fn from_shards(shards: Vec<(Shard, usize)>) -> Result<Rows, DataError> {
        let mut starts = Vec::with_capacity(shards.len());
        let mut out = Vec::with_capacity(shards.len());
        let mut total = 0;
        let cols = shards.first().map_or(0, |(_, c)| *c);
        for (s, c) in shards {
            if c != cols {
                return Err(DataError::Shape {
                    path: s.path.clone(),
                    shape: vec![s.rows, c],
                    reason: format!(
                        "rows of {c} values where the first shard ({}) has {cols}",
                        out.first().map_or(String::new(), |f: &Shard| f.path.display().to_string())
                    ),
                });
            }
            starts.push(total);
            total += s.rows;
            out.push(s);
        }
        // Empty shards would share a start with the next one; the lookup must skip them.
        let keep: Vec<bool> = out.iter().map(|s| s.rows > 0).collect();
        let mut it = keep.iter();
        starts.retain(|_| *it.next().unwrap());
        let mut it = keep.iter();
        out.retain(|_| *it.next().unwrap());
        Ok(Rows::Mapped { shards: out, starts, len: total, cols })
    }
}

fn open_map(path: &Path) -> Result<Arc<Mmap>, DataError> {
    let file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DataError::NotFound { path: path.to_path_buf() },
        _ => DataError::Io { path: path.to_path_buf(), error: e },
    })?;
    // SAFETY: the map is read-only. If another process truncates the file while it is mapped,
    // reads past the new end fault; data files are not expected to change during a sweep, and
    // the cache key holds the file's size and mtime so a rewritten file is mapped afresh.
    let map = unsafe { Mmap::map(&file) }
        .map_err(|e| DataError::Io { path: path.to_path_buf(), error: e })?;
    Ok(Arc::new(map))
}

/// True when the file starts with the gzip magic (it cannot be mapped and read in place).
pub fn is_gzip(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 2];
    File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == [0x1f, 0x8b]
}

/// Map an uncompressed `.npy` file of samples: returns the shard and its row width.
pub fn map_npy(path: &Path) -> Result<(Shard, usize), DataError> {
    let map = open_map(path)?;
    let l = super::npy::layout(path, &map)?;
    let elem = match l.kind {
        "f4" => Elem::F32,
        "f8" => Elem::F64,
        "f2" => Elem::F16,
        "bf16" => Elem::BF16,
        "u1" => Elem::U8,
        _ => {
            return Err(DataError::Dtype {
                path: path.to_path_buf(),
                found: l.descr,
                expected: "<f4, <f8, <f2, bfloat16 or |u1 for samples (integer dtypes are for \
                           labels)"
                    .into(),
            });
        }
    };
    let (rows, cols) = sample_shape(path, &l.shape, "")?;
    Ok((Shard { path: path.to_path_buf(), map, offset: l.data_start, rows, elem }, cols))
}

/// Map a tensor of a safetensors file (named, or the only one): returns the shard and its row
/// width.
pub fn map_safetensors(path: &Path, name: Option<&str>) -> Result<(Shard, usize), DataError> {
    use safetensors::{Dtype, SafeTensors};
    let map = open_map(path)?;
    let st = SafeTensors::deserialize(&map).map_err(|e| DataError::Header {
        path: path.to_path_buf(),
        reason: format!("not a valid safetensors file: {e}"),
    })?;
    let chosen = super::safetensors_file::choose(path, &st, name)?;
    let view = st.tensor(&chosen).map_err(|e| DataError::Header {
        path: path.to_path_buf(),
        reason: format!("tensor {chosen:?}: {e}"),
    })?;
    let elem = match view.dtype() {
        Dtype::F32 => Elem::F32,
        Dtype::F64 => Elem::F64,
        Dtype::F16 => Elem::F16,
        Dtype::BF16 => Elem::BF16,
        Dtype::U8 => Elem::U8,
        other => {
            return Err(DataError::Dtype {
                path: path.to_path_buf(),
                found: format!("{other:?} (tensor {chosen:?})"),
                expected: "F32, F64, F16, BF16, U8".into(),
            });
        }
    };
    let (rows, cols) = sample_shape(path, view.shape(), &format!("tensor {chosen:?}: "))?;
    let offset = view.data().as_ptr() as usize - map.as_ptr() as usize;
    Ok((Shard { path: path.to_path_buf(), map: map.clone(), offset, rows, elem }, cols))
}

fn sample_shape(path: &Path, shape: &[usize], what: &str) -> Result<(usize, usize), DataError> {
    let bad = |reason: &str| DataError::Shape {
        path: path.to_path_buf(),
        shape: shape.to_vec(),
        reason: format!("{what}{reason}"),
    };
    if shape.len() < 2 {
        return Err(bad("samples need at least 2 dimensions (samples, features...)"));
    }
    let cols: usize = shape[1..].iter().product();
    if cols == 0 {
        return Err(bad("samples have zero features"));
    }
    Ok((shape[0], cols))
}

/// The files `path` stands for: the file itself; every `.npy`/`.safetensors` file of a
/// directory; or the files matching a glob (`*`, `?`) in its last component. Sorted by name,
/// so shard order (and with it the split) does not depend on the directory's listing order.
pub fn expand(path: &Path) -> Result<Vec<PathBuf>, DataError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let is_glob = name.contains(['*', '?']);
    let dir = if is_glob {
        path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf()
    } else if path.is_dir() {
        path.to_path_buf()
    } else {
        return Ok(vec![path.to_path_buf()]);
    };
    let entries = std::fs::read_dir(&dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DataError::NotFound { path: dir.clone() },
        _ => DataError::Io { path: dir.clone(), error: e },
    })?;
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            if is_glob {
                wildcard(name.as_bytes(), n.as_bytes())
            } else {
                let n = n.to_ascii_lowercase();
                n.ends_with(".npy") || n.ends_with(".safetensors")
            }
        })
        .collect();
    out.sort();
    if out.is_empty() {
        let what = if is_glob { "no file matches" } else { "no .npy or .safetensors file in" };
        return Err(DataError::InvalidConfig {
            field: "data.path".into(),
            reason: format!("{what} {}", path.display()),
        });
    }
    Ok(out)
}

/// Shell-style match of `*` (any run) and `?` (one byte).
fn wildcard(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut back: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == s[i]) {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            back = Some((p, i));
            p += 1;
        } else if let Some((bp, bi)) = back {
            p = bp + 1;
            i = bi + 1;
            back = Some((bp, bi + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard(b"*.npy", b"a.npy"));
        assert!(wildcard(b"acts_??.npy", b"acts_01.npy"));
        assert!(!wildcard(b"acts_??.npy", b"acts_1.npy"));
        assert!(wildcard(b"a*b*c", b"aXXbYc"));
        assert!(!wildcard(b"*.npy", b"a.npy.gz"));
    }
}
