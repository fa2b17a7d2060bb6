//! Checks before the first trial runs: the data files a sweep names.
//!
//! A missing or unreadable data file fails every trial the same way, so it is found here, once,
//! before anything is dispatched. Files the coordinator can see are checked (exists, readable
//! and, with the embedded worker compiled in and the file small enough, loaded in full: format,
//! shape, labels); a file it cannot see is an error when local workers will read it, and only a
//! warning when every worker is remote (they may see paths the coordinator does not).

use crate::search::{Proposal, make_strategy};
use crate::spec::SweepSpec;
use msae_shared::TrialConfig;
use msae_shared::config::{DataConfig, DataSource};
use std::path::Path;

/// Most proposals looked at for distinct data configurations.
const MAX_POINTS: usize = 1000;
/// Files up to this size are loaded in full by the check (larger ones only opened).
const FULL_CHECK_BYTES: u64 = 512 << 20;

/// The distinct file-backed data configurations among the sweep's first proposals.
pub fn data_configs(spec: &SweepSpec) -> Vec<DataConfig> {
    let mut strategy = make_strategy(spec);
    let mut seen: Vec<DataConfig> = Vec::new();
    for _ in 0..MAX_POINTS {
        let Proposal::Point(p) = strategy.propose() else { break };
        // An invalid point fails as its own trial, with its own message.
        let Ok(value) = spec.trial_config(&p.params) else { continue };
        let Ok(cfg) = TrialConfig::from_value(value) else { continue };
        let file_backed = cfg.data.resolved_source().is_ok_and(|s| s != DataSource::Synthetic);
        if file_backed && !seen.contains(&cfg.data) {
            seen.push(cfg.data);
        }
    }
    seen
}

/// Checks every data file of the sweep; `local_workers` says whether this machine will read
/// them. Returns the first problem, naming the file.
pub fn check_data(spec: &SweepSpec, local_workers: usize) -> anyhow::Result<()> {
    for data in data_configs(spec) {
        let files = data.path.iter().chain(data.labels.iter());
        let shards_ok =
            matches!(data.resolved_source(), Ok(DataSource::Npy | DataSource::Safetensors));
        let mut all_visible = true;
        for path in files {
            if let Err(e) = check_readable(path, shards_ok) {
                if local_workers > 0 || path.exists() {
                    anyhow::bail!("{e} (data of sweep {})", spec.name);
                }
                all_visible = false;
                tracing::warn!(
                    "{e}; every worker is remote, so each must see it at that path (checked when a trial starts)"
                );
            }
        }
        if all_visible {
            load_check(&data)?;
        }
    }
    Ok(())
}

/// A glob (`acts/*.npy`) of shards: its last component has a wildcard.
fn is_glob(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.to_string_lossy().contains(['*', '?']))
}

fn check_readable(path: &Path, shards_ok: bool) -> Result<(), String> {
    if shards_ok && is_glob(path) {
        // The matching itself is the worker's; here only the directory must be there.
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        return match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => Ok(()),
            _ => Err(format!("{}: no such directory for {}", dir.display(), path.display())),
        };
    }
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("{}: data file not found", path.display()),
        _ => format!("{}: cannot read: {e}", path.display()),
    })?;
    if meta.is_dir() && shards_ok {
        let has_shard = std::fs::read_dir(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?
            .filter_map(|e| e.ok())
            .any(|e| {
                let n = e.file_name().to_string_lossy().to_ascii_lowercase();
                n.ends_with(".npy") || n.ends_with(".safetensors")
            });
        if has_shard {
            return Ok(());
        }
        return Err(format!(
            "{}: is a directory with no .npy or .safetensors shard in it",
            path.display()
        ));
    }
    if meta.is_dir() {
        return Err(format!("{}: is a directory, not a data file", path.display()));
    }
    std::fs::File::open(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    Ok(())
}

fn load_check(data: &DataConfig) -> anyhow::Result<()> {
    let size = |p: &Option<std::path::PathBuf>| {
        p.as_ref().and_then(|p| std::fs::metadata(p).ok()).map_or(0, |m| m.len())
    };
    let sharded =
        [&data.path, &data.labels].into_iter().flatten().any(|p| p.is_dir() || is_glob(p));
    // Shards can add up to any size; the workers check them when they load.
    if sharded || size(&data.path) + size(&data.labels) > FULL_CHECK_BYTES {
        return Ok(());
    }
    crate::embedded::load_data(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(data: &str) -> SweepSpec {
        let yaml = format!(
            "name: p\nmethod: grid\nbase: {{data: {data}}}\nparameters:\n  lr: {{values: [0.1, 0.01]}}\n"
        );
        SweepSpec::parse(&yaml, "p.yaml").unwrap()
    }

    #[test]
    fn missing_file_is_found_before_any_trial() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.npy");
        let s = spec(&format!("{{path: {}}}", missing.display()));
        assert_eq!(data_configs(&s).len(), 1, "both points share one data config");
        let e = check_data(&s, 1).unwrap_err().to_string();
        assert!(e.contains("nope.npy: data file not found"), "{e}");
        // Remote workers only: a warning, since they may see that path.
        check_data(&s, 0).unwrap();
        // A directory is refused even with remote workers (the coordinator sees it).
        let s = spec(&format!("{{path: {}/x.npy}}", dir.path().display()));
        std::fs::create_dir(dir.path().join("x.npy")).unwrap();
        let e = check_data(&s, 0).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        // A directory of shards, or a glob of them, is a data set.
        let shards = dir.path().join("shards");
        std::fs::create_dir(&shards).unwrap();
        let acts = msae_worker_npy(4, 3);
        std::fs::write(shards.join("a.npy"), &acts).unwrap();
        std::fs::write(shards.join("b.npy"), &acts).unwrap();
        check_data(&spec(&format!("{{source: npy, path: {}}}", shards.display())), 1).unwrap();
        check_data(&spec(&format!("{{path: {}/*.npy}}", shards.display())), 1).unwrap();
        let e = check_data(&spec(&format!("{{path: {}/gone/*.npy}}", dir.path().display())), 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such directory"), "{e}");
    }

    /// A (rows, cols) float32 `.npy` file's bytes, written by hand so the test needs no worker.
    fn msae_worker_npy(rows: usize, cols: usize) -> Vec<u8> {
        let mut header =
            format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend((0..rows * cols).flat_map(|k| (k as f32).to_le_bytes()));
        out
    }

    #[test]
    fn synthetic_sweeps_have_nothing_to_check() {
        let s = spec("{synthetic: {noise_std: 0.1}}");
        assert!(data_configs(&s).is_empty());
        check_data(&s, 1).unwrap();
    }

    #[cfg(feature = "local-worker")]
    #[test]
    fn a_corrupt_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.npy");
        std::fs::write(&bad, b"not an npy file at all").unwrap();
        let e =
            check_data(&spec(&format!("{{path: {}}}", bad.display())), 1).unwrap_err().to_string();
        assert!(e.contains("bad.npy") && e.contains("not"), "{e}");
    }
}
