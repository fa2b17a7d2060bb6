//! The trained SAEs a sweep keeps, in a directory beside the database (`msae.redb` keeps them
//! in `msae.weights/`): `SWEEP/INDEX/` holds a completed trial's `weights.safetensors`,
//! `config.yaml` and `metrics.json`, exactly as its worker made them.
//!
//! Files arrive under a live lease ([`crate::service::upload`]) into `.staging/LEASE.partial/`,
//! which becomes `.staging/LEASE/` only once every file is whole and matches its SHA-256. The
//! trial's completion moves that directory to `SWEEP/INDEX/` and records it on the trial in the
//! same commit ([`StoredWeights`]); a refused, interrupted or abandoned upload leaves nothing
//! once its lease ends (and `.staging/` is emptied when the coordinator starts).

use msae_shared::upload::FILES;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

/// Which completed trials keep their files (the sweep's `keep_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepWeights {
    /// Every completed trial's files up to [`AUTO_SMALL_BYTES`], and the best [`AUTO_BEST`]
    /// trials' whatever their size.
    #[default]
    Auto,
    All,
    /// The best N completed trials by the sweep metric; the others' files are deleted as they
    /// fall out.
    Best(u64),
    /// No upload at all.
    None,
}

/// Under `auto`, files up to this size are kept for every trial.
pub const AUTO_SMALL_BYTES: u64 = 64 << 20;
/// Under `auto`, the best trials keep their files whatever their size.
pub const AUTO_BEST: u64 = 3;

impl KeepWeights {
    pub fn uploads(self) -> bool {
        self != KeepWeights::None
    }

    /// Whether a trial at `rank` (0 = best; None without the sweep metric) with files of
    /// `bytes` keeps them.
    pub fn keeps(self, rank: Option<u64>, bytes: u64) -> bool {
        match self {
            KeepWeights::All => true,
            KeepWeights::None => false,
            KeepWeights::Best(n) => rank.is_some_and(|r| r < n),
            KeepWeights::Auto => bytes <= AUTO_SMALL_BYTES || rank.is_some_and(|r| r < AUTO_BEST),
        }
    }

    /// As the sweep YAML writes it.
    pub fn describe(self) -> String {
        match self {
            KeepWeights::Auto => "auto".into(),
            KeepWeights::All => "all".into(),
            KeepWeights::None => "none".into(),
            KeepWeights::Best(n) => format!("{{best: {n}}}"),
        }
    }
}

/// Where a completed trial's files are, as recorded on the trial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredWeights {
    /// The trial's directory, relative to the weights directory (`SWEEP/INDEX`).
    pub dir: String,
    /// Every file's size in bytes and lowercase hex SHA-256, by name.
    pub files: BTreeMap<String, FileDigest>,
}

impl StoredWeights {
    pub fn bytes(&self) -> u64 {
        self.files.values().map(|f| f.size).sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub size: u64,
    pub sha256: String,
}

const STAGING: &str = ".staging";
const MANIFEST: &str = ".manifest.json";

/// The weights directory of one database.
#[derive(Debug)]
pub struct WeightStore {
    root: PathBuf,
    /// The most bytes accepted for one uploaded file.
    pub limit: u64,
}

impl WeightStore {
    /// The weights directory of the database at `db`: beside it, named after it.
    pub fn beside(db: &Path) -> PathBuf {
        let stem = db.file_stem().map(|s| s.to_os_string()).unwrap_or_else(|| "msae".into());
        let mut name = stem;
        name.push(".weights");
        db.with_file_name(name)
    }

    /// Opens (creating) the directory and empties its staging area: uploads of an earlier
    /// run's leases can never complete.
    pub fn open(root: PathBuf, limit: u64) -> io::Result<WeightStore> {
        let staging = root.join(STAGING);
        match std::fs::remove_dir_all(&staging) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::create_dir_all(&staging)?;
        Ok(WeightStore { root, limit })
    }

    /// A store over an existing directory, for readers (export): nothing is created or removed.
    pub fn reader(root: PathBuf) -> WeightStore {
        WeightStore { root, limit: 0 }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where an upload under `lease_id` is written while it arrives.
    pub(crate) fn receiving(&self, lease_id: &str) -> PathBuf {
        self.root.join(STAGING).join(format!("{}.partial", safe(lease_id)))
    }

    /// Where a whole, checked upload waits for its trial's completion.
    fn staged(&self, lease_id: &str) -> PathBuf {
        self.root.join(STAGING).join(safe(lease_id))
    }

    /// Marks a received upload whole: its manifest is written and it moves to the staged name.
    pub(crate) fn stage(
        &self,
        lease_id: &str,
        files: &BTreeMap<String, FileDigest>,
    ) -> io::Result<()> {
        let receiving = self.receiving(lease_id);
        let manifest = serde_json::to_vec(files).map_err(io::Error::other)?;
        std::fs::write(receiving.join(MANIFEST), manifest)?;
        let staged = self.staged(lease_id);
        remove_dir(&staged)?;
        std::fs::rename(&receiving, &staged)
    }

    /// The trial directory of `index` in `sweep`, relative to the root.
    pub fn trial_dir(sweep: &str, index: u64) -> String {
        format!("{}/{index}", safe(sweep))
    }

    /// The absolute path of a recorded trial directory.
    pub fn path(&self, dir: &str) -> PathBuf {
        self.root.join(dir)
    }

    /// Moves the staged upload of `lease_id` to the trial's directory (replacing what an
    /// earlier, uncommitted completion left there). `Ok(None)` when nothing whole was staged.
    pub fn adopt(
        &self,
        lease_id: &str,
        sweep: &str,
        index: u64,
    ) -> io::Result<Option<StoredWeights>> {
        let staged = self.staged(lease_id);
        let manifest = match std::fs::read(staged.join(MANIFEST)) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let files: BTreeMap<String, FileDigest> =
            serde_json::from_slice(&manifest).map_err(io::Error::other)?;
        if FILES.iter().any(|f| !files.contains_key(*f)) {
            return Ok(None);
        }
        let dir = Self::trial_dir(sweep, index);
        let target = self.path(&dir);
        std::fs::create_dir_all(target.parent().unwrap_or(&self.root))?;
        remove_dir(&target)?;
        std::fs::rename(&staged, &target)?;
        Ok(Some(StoredWeights { dir, files }))
    }

    /// Drops whatever an upload under `lease_id` left (its lease ended without completing).
    pub fn discard(&self, lease_id: &str) {
        for dir in [self.receiving(lease_id), self.staged(lease_id)] {
            if let Err(e) = remove_dir(&dir) {
                tracing::warn!(dir = %dir.display(), "cannot remove an abandoned upload: {e}");
            }
        }
    }

    /// Deletes a trial directory (its files are no longer kept).
    pub fn remove(&self, dir: &str) {
        let path = self.path(dir);
        if let Err(e) = remove_dir(&path) {
            tracing::warn!(dir = %path.display(), "cannot remove a trial's files: {e}");
        }
    }

    /// Deletes every file of `sweep`.
    pub fn remove_sweep(&self, sweep: &str) -> io::Result<()> {
        remove_dir(&self.root.join(safe(sweep)))
    }
}

fn remove_dir(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A path component from a sweep name or lease id: they are checked printable identifiers,
/// but never let one climb out of the directory.
fn safe(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' })
        .collect();
    if clean.is_empty() || clean.chars().all(|c| c == '.') { "_".into() } else { clean }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(size: u64) -> FileDigest {
        FileDigest { size, sha256: "0".repeat(64) }
    }

    fn receive(store: &WeightStore, lease: &str, files: &[&str]) {
        let dir = store.receiving(lease);
        std::fs::create_dir_all(&dir).unwrap();
        let mut digests = BTreeMap::new();
        for f in files {
            std::fs::write(dir.join(f), format!("{lease}:{f}")).unwrap();
            digests.insert(f.to_string(), digest(3));
        }
        store.stage(lease, &digests).unwrap();
    }

    #[test]
    fn a_staged_upload_moves_to_its_trial_and_replaces_leftovers() {
        let tmp = tempfile::tempdir().unwrap();
        let store = WeightStore::open(tmp.path().join("w"), 1 << 20).unwrap();
        receive(&store, "L1", &FILES);
        std::fs::create_dir_all(store.path("s/4")).unwrap();
        std::fs::write(store.path("s/4/stale"), "x").unwrap();
        let got = store.adopt("L1", "s", 4).unwrap().unwrap();
        assert_eq!(got.dir, "s/4");
        assert_eq!(got.files.len(), 3);
        let read = std::fs::read_to_string(store.path("s/4/config.yaml")).unwrap();
        assert_eq!(read, "L1:config.yaml");
        assert!(!store.path("s/4/stale").exists());
        assert_eq!(store.adopt("L1", "s", 4).unwrap(), None, "adopted once");
    }

    #[test]
    fn nothing_partial_or_incomplete_is_adopted_and_restart_clears_staging() {
        let tmp = tempfile::tempdir().unwrap();
        let store = WeightStore::open(tmp.path().join("w"), 1 << 20).unwrap();
        // Still arriving: not staged.
        std::fs::create_dir_all(store.receiving("L2")).unwrap();
        assert_eq!(store.adopt("L2", "s", 0).unwrap(), None);
        // Staged without every file.
        receive(&store, "L3", &["weights.safetensors"]);
        assert_eq!(store.adopt("L3", "s", 0).unwrap(), None);
        store.discard("L3");
        assert!(!store.staged("L3").exists());
        let store = WeightStore::open(tmp.path().join("w"), 1 << 20).unwrap();
        assert!(!store.receiving("L2").exists(), "a restart empties staging");
    }

    #[test]
    fn keep_rules() {
        assert!(KeepWeights::All.keeps(None, u64::MAX));
        assert!(!KeepWeights::None.keeps(Some(0), 1));
        assert!(KeepWeights::Best(2).keeps(Some(1), 1));
        assert!(!KeepWeights::Best(2).keeps(Some(2), 1));
        assert!(!KeepWeights::Best(2).keeps(None, 1));
        assert!(KeepWeights::Auto.keeps(Some(50), AUTO_SMALL_BYTES));
        assert!(!KeepWeights::Auto.keeps(Some(AUTO_BEST), AUTO_SMALL_BYTES + 1));
        assert!(KeepWeights::Auto.keeps(Some(AUTO_BEST - 1), u64::MAX));
    }

    #[test]
    fn names_cannot_leave_the_directory() {
        assert_eq!(WeightStore::trial_dir("../x", 1), ".._x/1");
        assert_eq!(WeightStore::trial_dir("..", 1), "_/1");
        assert_eq!(safe("a/b"), "a_b");
    }
}
