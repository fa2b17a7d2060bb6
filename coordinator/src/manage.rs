//! `msae-coordinator list` and `delete`: the sweeps a database holds, and removing one.

use crate::model::TrialStatus;
use crate::report::{Cells, write_aligned};
use crate::spec::SweepSpec;
use crate::store::Store;
use anyhow::Context as _;
use std::path::PathBuf;

/// Options of `list`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// Database file.
    #[arg(long, env = "MSAE_DB", default_value = "msae.redb")]
    pub db: PathBuf,
}

/// Options of `delete`.
#[derive(Debug, Clone, clap::Args)]
pub struct DeleteArgs {
    /// The sweep to delete, with every trial it holds.
    pub sweep: String,
    /// Really delete (without it, says what would go and changes nothing).
    #[arg(long)]
    pub yes: bool,
    /// Database file.
    #[arg(long, env = "MSAE_DB", default_value = "msae.redb")]
    pub db: PathBuf,
}

fn existing(db: &std::path::Path) -> anyhow::Result<()> {
    if !db.exists() {
        anyhow::bail!("no such database {} (run a sweep first, or pass --db)", db.display());
    }
    Ok(())
}

/// The sweeps of the database, oldest first, with their trials per state.
pub fn list(args: &ListArgs) -> anyhow::Result<String> {
    existing(&args.db)?;
    let store = Store::open_read_only(&args.db)?;
    let mut sweeps = store.sweeps()?;
    if sweeps.is_empty() {
        return Ok(format!("{} holds no sweep\n", args.db.display()));
    }
    sweeps.sort_by_key(|s| (s.created_ms, s.name.clone()));
    let header: Vec<String> = [
        "sweep",
        "method",
        "created (UTC)",
        "trials",
        "completed",
        "pruned",
        "failed",
        "running",
        "queued",
        "state",
    ]
    .map(String::from)
    .to_vec();
    let mut body = Cells::new(header.len(), sweeps.len());
    for s in &sweeps {
        let trials = store.trials_without_configs(&s.name)?;
        let count = |st: TrialStatus| trials.iter().filter(|t| t.status == st).count();
        let method = SweepSpec::parse(&s.yaml, &s.name)
            .map(|spec| spec.method.name().to_string())
            .unwrap_or_else(|_| "?".into());
        body.push(&s.name);
        body.push(method);
        body.push(utc(s.created_ms));
        body.push(trials.len());
        body.push(count(TrialStatus::Completed));
        body.push(count(TrialStatus::Pruned));
        body.push(count(TrialStatus::Failed));
        body.push(count(TrialStatus::Running));
        body.push(count(TrialStatus::Queued));
        body.push(if s.finished { "finished" } else { "open" });
    }
    let mut out = String::new();
    let right = [false, false, false, true, true, true, true, true, true, false];
    write_aligned(&mut out, &header, &body, &right);
    Ok(out)
}

/// Deletes a sweep and its trials (with `--yes`; otherwise says what would go).
pub fn delete(args: &DeleteArgs) -> anyhow::Result<String> {
    existing(&args.db)?;
    let names: Vec<String> = {
        let store = Store::open_read_only(&args.db)?;
        let names = store.sweeps()?.into_iter().map(|s| s.name).collect::<Vec<_>>();
        if !names.contains(&args.sweep) {
            let hint = msae_shared::suggest::closest(&args.sweep, names.iter().map(String::as_str))
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            anyhow::bail!(
                "no sweep `{}` in {}{hint} (sweeps: {})",
                args.sweep,
                args.db.display(),
                if names.is_empty() { "none".into() } else { names.join(", ") }
            );
        }
        let trials = store.trials_without_configs(&args.sweep)?.len();
        if !args.yes {
            return Ok(format!(
                "would delete sweep `{}` and its {trials} trials from {}; nothing was changed: pass --yes to delete\n",
                args.sweep,
                args.db.display()
            ));
        }
        names
    };
    let store = Store::open(&args.db)?;
    let removed = store
        .delete_sweep(&args.sweep)
        .with_context(|| format!("deleting sweep `{}`", args.sweep))?
        .with_context(|| format!("sweep `{}` went away while deleting", args.sweep))?;
    let left = names.len() - 1;
    Ok(format!(
        "deleted sweep `{}` and its {removed} trials from {} ({left} sweep{} left)\n",
        args.sweep,
        args.db.display(),
        if left == 1 { "" } else { "s" }
    ))
}

/// `YYYY-MM-DD HH:MM` in UTC of a Unix time in milliseconds.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}", rem / 3600, rem % 3600 / 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{SweepRecord, TrialRecord};
    use crate::store::WriteBatch;

    fn sweep(name: &str, created_ms: u64) -> SweepRecord {
        SweepRecord {
            name: name.into(),
            yaml: format!("name: {name}\nmethod: grid\n"),
            fingerprint: "0".into(),
            created_ms,
            proposed: 0,
            finished: false,
            uid: None,
        }
    }

    fn trial(sweep: &str, index: u64, status: TrialStatus) -> TrialRecord {
        let mut t: TrialRecord = serde_json::from_value(serde_json::json!({
            "sweep": sweep, "index": index, "params": {}, "config": null, "status": "queued",
            "attempt": 1, "lease": null, "step": 0, "metrics": {}, "errors": [], "worker": null,
            "artifact": null, "created_ms": 0, "finished_ms": null, "duration_s": null
        }))
        .unwrap();
        t.status = status;
        t
    }

    fn db() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        let store = Store::open(&path).unwrap();
        let mut batch = WriteBatch::new();
        batch.put_sweep(&sweep("alpha", 1_764_547_200_000));
        batch.put_sweep(&sweep("beta", 1_764_547_260_000));
        for (i, st) in [TrialStatus::Completed, TrialStatus::Failed, TrialStatus::Queued]
            .into_iter()
            .enumerate()
        {
            batch.put_trial(&trial("alpha", i as u64, st));
        }
        batch.put_trial(&trial("beta", 0, TrialStatus::Completed));
        store.write(&batch).unwrap();
        (dir, path)
    }

    #[test]
    fn list_counts_each_sweep_s_trials() {
        let (_dir, path) = db();
        let out = list(&ListArgs { db: path }).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[1].starts_with("alpha  grid    2025-12-01 00:00"), "{out}");
        let cols: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(&cols[4..], ["3", "1", "0", "1", "0", "1", "open"], "{out}");
        assert!(lines[2].starts_with("beta"), "{out}");
    }

    #[test]
    fn delete_needs_yes_names_unknown_sweeps_and_removes_only_its_own_trials() {
        let (_dir, path) = db();
        let dry =
            delete(&DeleteArgs { sweep: "alpha".into(), yes: false, db: path.clone() }).unwrap();
        assert!(dry.contains("would delete sweep `alpha` and its 3 trials"), "{dry}");
        assert_eq!(Store::open_read_only(&path).unwrap().trials("alpha").unwrap().len(), 3);
        let e = delete(&DeleteArgs { sweep: "alpah".into(), yes: true, db: path.clone() })
            .unwrap_err()
            .to_string();
        assert!(e.contains("no sweep `alpah`") && e.contains("did you mean `alpha`?"), "{e}");
        let done =
            delete(&DeleteArgs { sweep: "alpha".into(), yes: true, db: path.clone() }).unwrap();
        assert!(
            done.contains("deleted sweep `alpha` and its 3 trials")
                && done.contains("1 sweep left"),
            "{done}"
        );
        let store = Store::open_read_only(&path).unwrap();
        assert!(store.sweep("alpha").unwrap().is_none());
        assert!(store.trials("alpha").unwrap().is_empty());
        assert_eq!(store.trials("beta").unwrap().len(), 1, "other sweeps untouched");
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00");
        assert_eq!(utc(1_764_590_700_000), "2025-12-01 12:05");
    }
}
