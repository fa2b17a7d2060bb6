//! `msae-coordinator list`, `delete` and `status`: the sweeps a database holds, removing one,
//! and what a running coordinator is doing.

use crate::model::TrialStatus;
use crate::report::{Cells, write_aligned};
use crate::spec::SweepSpec;
use crate::store::{Store, StoreError};
use anyhow::Context as _;
use std::path::PathBuf;

/// Options of `list`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// Database file.
    #[arg(long, env = "MSAE_DB", default_value = "msae.redb")]
    pub db: PathBuf,
    #[command(flatten)]
    pub token: msae_shared::auth::ClientTokenArgs,
    #[command(flatten)]
    pub tls: crate::cli::TlsArgs,
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

/// Options of `status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// The running coordinator (default: the one holding --db, found by the address file it
    /// writes beside the database).
    #[arg(long, value_name = "URL")]
    pub coordinator: Option<String>,
    /// Database file of the running coordinator.
    #[arg(long, env = "MSAE_DB", default_value = "msae.redb")]
    pub db: PathBuf,
    #[command(flatten)]
    pub token: msae_shared::auth::ClientTokenArgs,
    #[command(flatten)]
    pub tls: crate::cli::TlsArgs,
}

/// The coordinator `args` names, or the one whose address file lies beside `--db`.
fn coordinator_url(args: &StatusArgs) -> anyhow::Result<String> {
    if let Some(url) = &args.coordinator {
        return Ok(crate::run::url_of(url));
    }
    let file = crate::run::address_file(&args.db);
    let addr = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "no coordinator is running on {} ({} is missing); pass --coordinator http://HOST:PORT",
            args.db.display(),
            file.display()
        )
    })?;
    Ok(crate::run::url_of(addr.trim()))
}

/// `msae-coordinator status`: the running coordinator's sweep, workers and throughput.
pub async fn status(args: &StatusArgs) -> anyhow::Result<String> {
    use msae_shared::proto;
    // A bad token file is named before any connection is tried.
    let token = args.token.resolve()?;
    let url = coordinator_url(args)?;
    let channel = args
        .tls
        .client()
        .endpoint(&url)
        .map_err(anyhow::Error::msg)?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| {
            let hint = if url.starts_with("https://") && args.coordinator.is_none() {
                "; with TLS, name it as its certificate does: --coordinator https://NAME:PORT"
            } else {
                ""
            };
            format!("cannot reach the coordinator at {url} (is it running?){hint}")
        })?;
    let mut client = proto::coordinator_client::CoordinatorClient::new(channel);
    let mut request = tonic::Request::new(proto::StatusRequest {});
    if let Some(token) = &token {
        request
            .metadata_mut()
            .insert(msae_shared::auth::AUTHORIZATION, msae_shared::auth::bearer(token)?);
    }
    let reply = client
        .status(request)
        .await
        .map_err(|s| anyhow::anyhow!("the coordinator at {url} refused status: {}", s.message()))?
        .into_inner();
    Ok(render_status(&reply, crate::model::now_ms()))
}

/// The status reply as text (`now_ms` dates "last seen").
pub fn render_status(r: &msae_shared::proto::StatusReply, now_ms: u64) -> String {
    let done = r.completed + r.pruned + r.failed;
    let mut out = format!(
        "sweep {}: {done}/{} trials final ({} completed, {} pruned, {} failed), {} running, {} queued{}\n",
        r.sweep,
        r.total,
        r.completed,
        r.pruned,
        r.failed,
        r.running,
        r.queued,
        if r.finished { "; finished" } else { "" }
    );
    match r.best_index {
        Some(i) => out
            .push_str(&format!("best: trial {i}, {} {:.6} ({})\n", r.metric, r.best_value, r.goal)),
        None => out.push_str(&format!("best: none yet ({} {})\n", r.goal, r.metric)),
    }
    out.push_str(&format!(
        "throughput: {:.3} trials/s over {:.1} s\n",
        r.trials_per_second, r.uptime_s
    ));
    if r.workers.is_empty() {
        out.push_str("workers: none registered\n");
        return out;
    }
    out.push_str(&format!("workers ({}):\n", r.workers.len()));
    let header: Vec<String> =
        ["worker", "id", "device", "trial", "last seen"].map(String::from).to_vec();
    let mut body = Cells::new(header.len(), r.workers.len());
    for w in &r.workers {
        body.push(&w.name);
        body.push(&w.worker_id);
        body.push(if w.device.is_empty() { "-" } else { &w.device });
        body.push(if w.trial.is_empty() { "idle" } else { &w.trial });
        let ago = now_ms.saturating_sub(w.last_seen_ms) as f64 / 1000.0;
        body.push(format!("{ago:.1} s ago"));
    }
    write_aligned(&mut out, &header, &body, &[false, false, false, false, true]);
    out
}

fn existing(db: &std::path::Path) -> anyhow::Result<()> {
    if !db.exists() {
        anyhow::bail!("no such database {} (run a sweep first, or pass --db)", db.display());
    }
    Ok(())
}

/// Every sweep and its trials (without configs): from the file, or, while a coordinator holds
/// it, from that coordinator.
fn sweeps_and_trials(
    args: &ListArgs,
) -> anyhow::Result<(Vec<crate::model::SweepRecord>, Vec<crate::model::TrialRecord>)> {
    let from_file = || -> Result<_, StoreError> {
        let store = Store::open_read_only(&args.db)?;
        let sweeps = store.sweeps()?;
        let mut trials = Vec::new();
        for s in &sweeps {
            trials.extend(store.trials_without_configs(&s.name)?);
        }
        Ok((sweeps, trials))
    };
    match from_file() {
        Ok(found) => Ok(found),
        Err(StoreError::InUse { path }) => {
            let url = crate::run::running_url(&path)?;
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let json = runtime
                .block_on(crate::service::report::fetch_records(
                    &url,
                    None,
                    args.token.resolve()?.as_deref(),
                    &args.tls.client(),
                ))
                .with_context(|| {
                    format!("{} is held by the coordinator at {url}", path.display())
                })?;
            Ok((json.sweeps, json.trials))
        }
        Err(e) => Err(e.into()),
    }
}

/// The sweeps of the database, oldest first, with their trials per state.
pub fn list(args: &ListArgs) -> anyhow::Result<String> {
    existing(&args.db)?;
    let (mut sweeps, all_trials) = sweeps_and_trials(args)?;
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
        let trials: Vec<_> = all_trials.iter().filter(|t| t.sweep == s.name).collect();
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
        let store = match Store::open_read_only(&args.db) {
            Err(StoreError::InUse { path }) => anyhow::bail!(
                "{} is in use by a running coordinator ({}); stop it before deleting a sweep \
                 (nothing was changed)",
                path.display(),
                crate::run::running_url(&path).unwrap_or_else(|_| "address unknown".into())
            ),
            other => other?,
        };
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
    // The records are gone first: a file without a record is only litter, never a result.
    let weights =
        crate::weights::WeightStore::reader(crate::weights::WeightStore::beside(&args.db));
    weights.remove_sweep(&args.sweep).with_context(|| {
        format!("deleting the trial files of `{}` in {}", args.sweep, weights.root().display())
    })?;
    Ok(format!(
        "deleted sweep `{}`, its {removed} trials and their files from {} ({left} sweep{} left)\n",
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
        let out = list(&ListArgs { db: path, token: Default::default(), tls: Default::default() })
            .unwrap();
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
        let files = crate::weights::WeightStore::beside(&path);
        for d in ["alpha/0", "beta/0"] {
            std::fs::create_dir_all(files.join(d)).unwrap();
            std::fs::write(files.join(d).join("weights.safetensors"), "w").unwrap();
        }
        let done =
            delete(&DeleteArgs { sweep: "alpha".into(), yes: true, db: path.clone() }).unwrap();
        assert!(
            done.contains("deleted sweep `alpha`, its 3 trials and their files")
                && done.contains("1 sweep left"),
            "{done}"
        );
        assert!(!files.join("alpha").exists(), "the sweep's files go with it");
        assert!(files.join("beta/0/weights.safetensors").exists(), "other sweeps' files stay");
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
