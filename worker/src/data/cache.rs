//! The worker's cache of loaded [`Samples`], so a sweep of many trials on one file reads (or
//! maps, or generates) it once, and in-process workers share one copy.
//!
//! Entries are keyed by what decides the samples: the source, each file's identity (canonical
//! path, size, modification time, inode), the labels files, the tensor, the CSV options, `limit`,
//! `mmap`, and for synthetic data the generator settings and seed. The split and the scaling are
//! per trial and not part of the key. Entries are evicted least recently used first once their
//! heap memory passes the budget; a mapped file counts only its bookkeeping, because its pages
//! belong to the kernel's page cache (shared, and reclaimed under pressure) rather than to us.
//! An evicted entry lives on in the trials still holding it.

use super::{DataError, Samples, rows};
use msae_shared::config::{DataConfig, DataSource};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

/// Default budget (`--data-cache-mb`).
pub const DEFAULT_BUDGET_MB: usize = 4096;

/// Identity of one file: a rewritten file (new size or mtime, or a new inode behind the same
/// name) is a different key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileId {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl FileId {
    fn of(path: &Path) -> Result<FileId, DataError> {
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DataError::NotFound { path: path.to_path_buf() },
            _ => DataError::Io { path: path.to_path_buf(), error: e },
        })?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let inode = 0;
        Ok(FileId {
            path: std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
            len: meta.len(),
            modified: meta.modified().ok(),
            inode,
        })
    }
}

/// What makes two data configs read the same samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    source: DataSource,
    files: Vec<FileId>,
    labels: Vec<FileId>,
    tensor: Option<String>,
    label_column: Option<usize>,
    header: Option<bool>,
    limit: usize,
    mmap: bool,
    /// Generator settings (as JSON: they hold floats) and seed of synthetic data.
    synthetic: Option<(String, u64)>,
}

impl Key {
    pub fn of(cfg: &DataConfig, seed: u64) -> Result<Key, DataError> {
        let source = super::resolve_source(cfg)?;
        let ids = |p: Option<&Path>| -> Result<Vec<FileId>, DataError> {
            match p {
                None => Ok(Vec::new()),
                Some(p) => rows::expand(p)?.iter().map(|f| FileId::of(f)).collect(),
            }
        };
        let synthetic = (source == DataSource::Synthetic)
            .then(|| (serde_json::to_string(&cfg.synthetic).unwrap_or_default(), seed));
        Ok(Key {
            source,
            files: if source == DataSource::Synthetic {
                Vec::new()
            } else {
                ids(cfg.path.as_deref())?
            },
            labels: ids(cfg.labels.as_deref())?,
            tensor: cfg.tensor.clone(),
            label_column: cfg.label_column,
            header: cfg.header,
            limit: cfg.limit,
            mmap: cfg.mmap,
            synthetic,
        })
    }
}

struct Entry {
    key: Key,
    samples: Arc<Samples>,
    bytes: usize,
    last_used: u64,
}

struct Inner {
    entries: Vec<Entry>,
    budget: usize,
    clock: u64,
}

/// Loaded samples by [`Key`], within a memory budget.
pub struct DataCache {
    inner: Mutex<Inner>,
}

impl DataCache {
    pub fn new(budget_bytes: usize) -> DataCache {
        DataCache {
            inner: Mutex::new(Inner { entries: Vec::new(), budget: budget_bytes, clock: 0 }),
        }
    }

    /// Change the budget, evicting at once what no longer fits.
    pub fn set_budget(&self, budget_bytes: usize) {
        let mut g = self.lock();
        g.budget = budget_bytes;
        g.evict(None);
    }

    /// The samples `cfg` describes: the cached ones when an equal key is held, else loaded now
    /// and kept if they fit the budget.
    pub fn get_or_load(&self, cfg: &DataConfig, seed: u64) -> Result<Arc<Samples>, DataError> {
        let key = Key::of(cfg, seed)?;
        // The lock is held while loading: two workers starting trials on the same file at once
        // must not both read it, which would double the memory the cache exists to save.
        let mut g = self.lock();
        g.clock += 1;
        let now = g.clock;
        if let Some(e) = g.entries.iter_mut().find(|e| e.key == key) {
            e.last_used = now;
            tracing::debug!(origin = %e.samples.origin, "data from the worker's cache");
            return Ok(e.samples.clone());
        }
        let samples = Arc::new(super::read_samples(cfg, seed)?);
        let bytes = samples.heap_bytes();
        if bytes > g.budget {
            tracing::info!(
                origin = %samples.origin,
                mb = bytes / (1 << 20),
                budget_mb = g.budget / (1 << 20),
                "data larger than the cache budget (--data-cache-mb): not kept for other trials"
            );
            return Ok(samples);
        }
        g.entries.push(Entry { key, samples: samples.clone(), bytes, last_used: now });
        g.evict(Some(now));
        Ok(samples)
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Heap bytes held by the entries.
    pub fn held_bytes(&self) -> usize {
        self.lock().entries.iter().map(|e| e.bytes).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while loading leaves nothing half-inserted, so the data stays usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    /// Drop least recently used entries (never the one used at `keep`) until within budget.
    fn evict(&mut self, keep: Option<u64>) {
        while self.entries.iter().map(|e| e.bytes).sum::<usize>() > self.budget {
            let victim = self
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| Some(e.last_used) != keep)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i);
            let Some(i) = victim else { break };
            let e = self.entries.remove(i);
            tracing::debug!(origin = %e.samples.origin, mb = e.bytes / (1 << 20), "evicted from the data cache");
        }
    }
}

/// The process-wide cache every trial of this process (and every in-process worker) uses.
pub fn global() -> &'static DataCache {
    static CACHE: OnceLock<DataCache> = OnceLock::new();
    CACHE.get_or_init(|| DataCache::new(DEFAULT_BUDGET_MB << 20))
}
