//! `msae-coordinator export`: a completed trial's files, as its worker made them, copied out of
//! the weights directory beside the database ([`crate::weights`]).

use crate::model::{SweepRecord, TrialRecord, TrialStatus};
use crate::report::pick_sweep;
use crate::spec::SweepSpec;
use crate::store::{Store, StoreError};
use crate::weights::WeightStore;
use anyhow::Context as _;
use msae_shared::upload::{FILES, sha256_hex};
use std::path::{Path, PathBuf};

/// Options of `export`.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["trial", "best"])))]
pub struct ExportArgs {
    /// The trial to export, by its index in the sweep (the report's `trial` column).
    #[arg(long, value_name = "N")]
    pub trial: Option<u64>,
    /// The best completed trial by the sweep's metric.
    #[arg(long)]
    pub best: bool,
    /// The sweep (default: the most recently created).
    #[arg(long)]
    pub sweep: Option<String>,
    /// Directory to write weights.safetensors, config.yaml and metrics.json into (created;
    /// files already there are not overwritten).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Database file; the trial files are in the directory beside it (`NAME.weights`).
    #[arg(long, env = "MSAE_DB", default_value = "msae.redb")]
    pub db: PathBuf,
    #[command(flatten)]
    pub token: msae_shared::auth::ClientTokenArgs,
    #[command(flatten)]
    pub tls: crate::cli::TlsArgs,
}

/// The sweep and its trials, from the file, or from the coordinator that holds it.
async fn records(args: &ExportArgs) -> anyhow::Result<(SweepRecord, Vec<TrialRecord>)> {
    if !args.db.exists() {
        anyhow::bail!("no such database {} (run a sweep first, or pass --db)", args.db.display());
    }
    let db = args.db.clone();
    let wanted = args.sweep.clone();
    // Only the chosen sweep's trials are read: a database may hold many large sweeps.
    let read = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
        let store = Store::open_read_only(&db)?;
        let sweeps = store.sweeps()?;
        let trials = match pick_sweep(&sweeps, wanted.as_deref()) {
            Ok(s) => store.trials_without_configs(&s.name)?,
            Err(_) => Vec::new(),
        };
        Ok((sweeps, trials))
    })
    .await?;
    let (sweeps, trials) = match read {
        Ok(found) => found,
        Err(StoreError::InUse { path }) => {
            let url = crate::run::running_url(&path)?;
            let json = crate::service::report::fetch_records(
                &url,
                args.sweep.as_deref(),
                args.token.resolve()?.as_deref(),
                &args.tls.client(),
            )
            .await?;
            (json.sweeps, json.trials)
        }
        Err(e) => return Err(e.into()),
    };
    let sweep = pick_sweep(&sweeps, args.sweep.as_deref())
        .map_err(|e| anyhow::anyhow!("{e} in {}", args.db.display()))?
        .clone();
    let trials = trials.into_iter().filter(|t| t.sweep == sweep.name).collect();
    Ok((sweep, trials))
}

/// The trial `args` asks for.
fn choose<'a>(
    args: &ExportArgs,
    sweep: &SweepRecord,
    trials: &'a [TrialRecord],
) -> anyhow::Result<&'a TrialRecord> {
    if let Some(n) = args.trial {
        let t = trials.iter().find(|t| t.index == n).with_context(|| {
            format!("sweep {} has no trial {n} (it has {})", sweep.name, trials.len())
        })?;
        return Ok(t);
    }
    let spec = SweepSpec::parse(&sweep.yaml, &sweep.name)
        .map_err(|e| anyhow::anyhow!("the stored sweep {} does not parse: {e}", sweep.name))?;
    let (metric, goal) = (&spec.metric.name, spec.metric.goal);
    let oriented = |t: &TrialRecord| {
        t.metrics.get(metric).filter(|v| v.is_finite()).map(|v| match goal {
            crate::model::Goal::Minimize => *v,
            crate::model::Goal::Maximize => -v,
        })
    };
    trials
        .iter()
        .filter(|t| t.status == TrialStatus::Completed)
        .filter_map(|t| oriented(t).map(|v| (v, t)))
        .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.index.cmp(&b.1.index)))
        .map(|(_, t)| t)
        .with_context(|| format!("sweep {} has no completed trial with {metric}", sweep.name))
}

/// Copies the trial's files into `--out`, checking each against its recorded SHA-256.
pub async fn export(args: &ExportArgs) -> anyhow::Result<String> {
    let (sweep, trials) = records(args).await?;
    let t = choose(args, &sweep, &trials)?;
    let id = t.trial_id();
    if t.status != TrialStatus::Completed {
        anyhow::bail!("trial {id} is {}: only completed trials have files", t.status.name());
    }
    let Some(stored) = &t.weights else {
        let why = t.errors.iter().rev().find(|e| e.starts_with("files not kept")).map_or_else(
            || "its files were not uploaded (keep_weights: none, or a sweep run before msae kept them)".to_string(),
            |e| e.clone(),
        );
        anyhow::bail!("trial {id} has no stored files: {why}");
    };
    let source = WeightStore::reader(WeightStore::beside(&args.db)).path(&stored.dir);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    for name in FILES {
        let target = args.out.join(name);
        if target.exists() {
            anyhow::bail!(
                "{} exists; export into an empty directory (nothing was written)",
                target.display()
            );
        }
    }
    let mut total = 0;
    for name in FILES {
        let from = source.join(name);
        let bytes =
            std::fs::read(&from).with_context(|| format!("cannot read {}", from.display()))?;
        let want = stored.files.get(name).map(|f| f.sha256.as_str()).unwrap_or_default();
        if sha256_hex(&bytes) != want {
            anyhow::bail!(
                "{} does not match the SHA-256 recorded when it was uploaded: the stored file was \
                 changed or damaged",
                from.display()
            );
        }
        write_new(&args.out.join(name), &bytes)?;
        total += bytes.len();
    }
    Ok(format!(
        "exported trial {id} ({}{}) to {}: {} ({total} bytes)",
        sweep.name,
        t.metrics
            .iter()
            .filter(|(k, _)| ["fvu", "l0"].contains(&k.as_str()))
            .map(|(k, v)| format!(", {k} {v:.4}"))
            .collect::<String>(),
        args.out.display(),
        FILES.join(", ")
    ))
}

fn write_new(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}
