//! [`TensorBoardLogger`]: the TensorBoard logs of one sweep, written as the scheduler's events
//! arrive (see [`follow`](super::follow)).
//!
//! `{root}/{sweep}-{id}/{layer_sparsity_mode}/{stripe_sparsity_mode}/trial-{index:05}` holds one
//! trial's run: its scalars and HParams session; `.../trial-{index:05}/stripe_{s}` the runs of
//! its stripes ([`class_runs`](super::class_runs)). `{root}/{sweep}-{id}` holds the HParams
//! experiment; `id` is the sweep's stable id ([`SweepRecord::run_id`]), so same-named sweeps
//! of two databases never share a run, and a resumed sweep goes on in its own.
//!
//! [`SweepRecord::run_id`]: crate::model::SweepRecord::run_id

use super::class_runs;
use super::event_file::EventWriter;
use super::messages::{
    EXPERIMENT_TAG, Experiment, HParamInfo, HParamsPluginData, MetricInfo, MetricName, ProtoValue,
    SESSION_END_INFO_TAG, SESSION_START_INFO_TAG, STATUS_FAILURE, STATUS_RUNNING, STATUS_SUCCESS,
    STATUS_UNKNOWN, SessionEndInfo, SessionStartInfo, Summary, hparams_value,
};
use super::{Result, TensorBoardError, sanitize, unix_secs_f64};
use crate::model::{TrialRecord, TrialStatus};
use msae_shared::TrialConfig;
use msae_shared::class_stats::ClassStats;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Keeps a file descriptor per open run (a running trial's, and each of its stripes'), up to
/// this many; beyond it the least recently used writer is closed (a later event for that run
/// opens a new file in the same directory, which TensorBoard reads as one run). Room for a
/// dozen running trials of 30 stripes without reopening.
const MAX_OPEN_WRITERS: usize = 512;

/// A trial's run (`None`) or one of its stripes' (the run directory's name).
type RunKey = (u64, Option<String>);

struct OpenRun {
    writer: EventWriter,
    last_used: u64,
}

/// Writes the TensorBoard logs of one sweep under `root`: per trial scalars (progress and final
/// metrics), per-class statistics and HParams sessions; for the sweep the HParams experiment.
/// Methods take `&self` (an internal mutex guards the open files) and do blocking file I/O.
pub struct TensorBoardLogger {
    root: PathBuf,
    sweep: String,
    sweep_dir: PathBuf,
    open: Mutex<OpenState>,
}

#[derive(Default)]
struct OpenState {
    runs: HashMap<RunKey, OpenRun>,
    /// The run directory of every trial written to since it started (or since this process
    /// found it on disk).
    trial_dirs: HashMap<u64, PathBuf>,
    clock: u64,
}

impl TensorBoardLogger {
    /// A logger for the sweep `sweep` with stable id `sweep_id`, writing under `root` (created
    /// on first write).
    pub fn new(root: impl Into<PathBuf>, sweep: &str, sweep_id: &str) -> Self {
        let root = root.into();
        let sweep_dir = root.join(sweep_dir_name(sweep, sweep_id));
        TensorBoardLogger {
            root,
            sweep: sweep.to_string(),
            sweep_dir,
            open: Mutex::new(OpenState::default()),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of the sweep: `{root}/{sweep}-{id}` (holds the HParams experiment).
    pub fn sweep_dir(&self) -> &Path {
        &self.sweep_dir
    }

    /// Directory of a trial: `{sweep_dir}/{layer_sparsity_mode}/{stripe_sparsity_mode}/trial-{index:05}`,
    /// modes read from the record's [`TrialConfig`] (a field it leaves out has the default). A
    /// record without a config, or whose config is not a `TrialConfig` (a runner's own), is
    /// logged under the default modes.
    pub fn trial_dir(&self, record: &TrialRecord) -> PathBuf {
        let config = match record.trial_config() {
            Ok(Some(config)) => config,
            Ok(None) => TrialConfig::default(),
            Err(e) => {
                tracing::debug!(
                    trial = %record.trial_id(),
                    "tensorboard: the config is not a trial config ({e}); default modes"
                );
                TrialConfig::default()
            }
        };
        self.sweep_dir
            .join(sanitize(&mode_name(config.layer_sparsity_mode)))
            .join(sanitize(&mode_name(config.stripe_sparsity_mode)))
            .join(trial_run(record.index))
    }

    /// Writes the HParams experiment of the sweep (hyperparameter and metric names) into its
    /// directory. Call once per sweep start; TensorBoard keeps the first it sees.
    pub fn sweep_experiment<M: AsRef<str>>(
        &self,
        params: &[HParamInfo],
        metrics: &[M],
    ) -> Result<()> {
        let experiment = Experiment {
            name: self.sweep.clone(),
            description: format!("msae sweep {}", self.sweep),
            time_created_secs: unix_secs_f64(),
            hparam_infos: params.to_vec(),
            metric_infos: metrics
                .iter()
                .map(|m| MetricInfo {
                    name: Some(MetricName { group: String::new(), tag: m.as_ref().to_string() }),
                })
                .collect(),
        };
        let data =
            HParamsPluginData { version: 0, experiment: Some(experiment), ..Default::default() };
        let mut writer = EventWriter::create(&self.sweep_dir)?;
        writer.add_summary(Summary { value: vec![hparams_value(EXPERIMENT_TAG, data)] }, 0)?;
        writer.flush()
    }

    /// A trial (attempt) started: opens its run and writes the HParams session start with the
    /// trial's swept parameters.
    pub fn trial_started(&self, record: &TrialRecord) -> Result<()> {
        let start_secs = record
            .lease
            .as_ref()
            .map(|l| l.started_ms as f64 / 1000.0)
            .unwrap_or_else(unix_secs_f64);
        let start = SessionStartInfo {
            hparams: record
                .params
                .iter()
                .map(|(k, v)| (k.clone(), ProtoValue::from_json(v)))
                .collect(),
            model_uri: record.artifact.clone().unwrap_or_default(),
            group_name: String::new(),
            start_time_secs: start_secs,
        };
        let data =
            HParamsPluginData { version: 0, session_start_info: Some(start), ..Default::default() };
        let summary = Summary { value: vec![hparams_value(SESSION_START_INFO_TAG, data)] };
        self.with_writer(record.index, None, Some(record), |w| {
            w.add_summary(summary, 0)?;
            w.flush()
        })
    }

    /// Progress scalars of a running trial at `step`, and an evaluation's per-class statistics.
    /// The trial's run must be known: opened by [`trial_started`](Self::trial_started) in this
    /// process, or found on disk.
    pub fn progress(
        &self,
        index: u64,
        step: u64,
        scalars: &BTreeMap<String, f64>,
        classes: Option<&ClassStats>,
    ) -> Result<()> {
        self.with_writer(index, None, None, |w| {
            w.add_scalars(scalars.iter().map(|(k, v)| (k.as_str(), *v)), step)?;
            w.flush()
        })?;
        match classes {
            Some(c) => self.class_stats(index, None, step, c),
            None => Ok(()),
        }
    }

    /// A trial reached a final state: its final metrics (and the final evaluation's per-class
    /// statistics) at its last step, then the HParams session end (success for completed,
    /// unknown for pruned, failure otherwise: see [`STATUS_UNKNOWN`]); closes its files.
    pub fn trial_finished(&self, record: &TrialRecord, classes: Option<&ClassStats>) -> Result<()> {
        let status = match record.status {
            TrialStatus::Completed => STATUS_SUCCESS,
            TrialStatus::Pruned => STATUS_UNKNOWN,
            TrialStatus::Failed => STATUS_FAILURE,
            TrialStatus::Queued | TrialStatus::Running => STATUS_RUNNING,
        };
        let end_secs =
            record.finished_ms.map(|ms| ms as f64 / 1000.0).unwrap_or_else(unix_secs_f64);
        let data = HParamsPluginData {
            version: 0,
            session_end_info: Some(SessionEndInfo { status, end_time_secs: end_secs }),
            ..Default::default()
        };
        let step = record.step;
        let result = classes
            .map_or(Ok(()), |c| self.class_stats(record.index, Some(record), step, c))
            .and_then(|()| {
                self.with_writer(record.index, None, Some(record), |w| {
                    w.add_scalars(record.metrics.iter().map(|(k, v)| (k.as_str(), *v)), step)?;
                    w.add_summary(
                        Summary { value: vec![hparams_value(SESSION_END_INFO_TAG, data)] },
                        step,
                    )?;
                    w.flush()
                })
            });
        // The trial is over: release its files whatever happened.
        let mut state = self.lock();
        state.runs.retain(|(index, _), _| *index != record.index);
        state.trial_dirs.remove(&record.index);
        result
    }

    /// Flushes and closes every open file (e.g. at shutdown).
    pub fn close_all(&self) -> Result<()> {
        let mut state = self.lock();
        let mut first_error = None;
        for (_, mut open) in state.runs.drain() {
            if let Err(e) = open.writer.flush() {
                first_error.get_or_insert(e);
            }
        }
        state.trial_dirs.clear();
        first_error.map_or(Ok(()), Err)
    }

    /// Per-class statistics at `step`: the trial run's scalars, then each stripe's run.
    fn class_stats(
        &self,
        index: u64,
        record: Option<&TrialRecord>,
        step: u64,
        c: &ClassStats,
    ) -> Result<()> {
        let scalars = class_runs::trial_scalars(c);
        self.with_writer(index, None, record, |w| {
            w.add_scalars(scalars.iter().map(|(k, v)| (k.as_str(), *v)), step)?;
            w.flush()
        })?;
        for (run, scalars) in class_runs::stripe_scalars(c) {
            self.with_writer(index, Some(run), record, |w| {
                w.add_scalars(scalars.iter().map(|(k, v)| (k.as_str(), *v)), step)?;
                w.flush()
            })?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OpenState> {
        // A panic while holding the lock leaves only file handles behind; keep going.
        self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the open writer of a trial's run (`sub: None`) or of a run under it,
    /// opening one if needed; the trial's directory comes from `record`, from an earlier call,
    /// or from the disk.
    fn with_writer(
        &self,
        index: u64,
        sub: Option<String>,
        record: Option<&TrialRecord>,
        f: impl FnOnce(&mut EventWriter) -> Result<()>,
    ) -> Result<()> {
        let mut state = self.lock();
        state.clock += 1;
        let clock = state.clock;
        let key = (index, sub);
        if !state.runs.contains_key(&key) {
            let trial_dir = match (record, state.trial_dirs.get(&index)) {
                (Some(r), _) => self.trial_dir(r),
                (None, Some(dir)) => dir.clone(),
                (None, None) => {
                    self.find_trial_dir(index).ok_or_else(|| TensorBoardError::Write {
                        path: self.sweep_dir.join("*/*").join(trial_run(index)),
                        error: std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "trial run not started in this log root",
                        ),
                    })?
                }
            };
            let dir = match &key.1 {
                Some(sub) => trial_dir.join(sanitize(sub)),
                None => trial_dir.clone(),
            };
            state.trial_dirs.insert(index, trial_dir);
            if state.runs.len() >= MAX_OPEN_WRITERS {
                let oldest =
                    state.runs.iter().min_by_key(|(_, r)| r.last_used).map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    state.runs.remove(&oldest);
                }
            }
            let writer = EventWriter::create(&dir)?;
            state.runs.insert(key.clone(), OpenRun { writer, last_used: clock });
        }
        let open = state.runs.get_mut(&key).expect("inserted above");
        open.last_used = clock;
        f(&mut open.writer)
    }

    /// Looks for `{sweep_dir}/*/*/trial-{index:05}` (a run started before a restart).
    fn find_trial_dir(&self, index: u64) -> Option<PathBuf> {
        let name = trial_run(index);
        let layers = std::fs::read_dir(&self.sweep_dir).ok()?;
        for layer in layers.flatten() {
            let Ok(stripes) = std::fs::read_dir(layer.path()) else { continue };
            for stripe in stripes.flatten() {
                let candidate = stripe.path().join(&name);
                if candidate.is_dir() {
                    return Some(candidate);
                }
            }
        }
        None
    }
}

/// The directory name of a sweep with stable id `sweep_id` under the log root.
pub fn sweep_dir_name(sweep: &str, sweep_id: &str) -> String {
    sanitize(&format!("{sweep}-{sweep_id}"))
}

fn trial_run(index: u64) -> String {
    format!("trial-{index:05}")
}

/// A sparsity mode's name as configs spell it (`lifetime_batch_mean`).
fn mode_name<M: serde::Serialize>(mode: M) -> String {
    serde_json::to_value(mode)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "none".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LeaseInfo;
    use crate::tensorboard::messages::{ProtoKind, SummaryValue};
    use crate::tensorboard::read_events;
    use prost::Message;

    fn only_event_file(dir: &Path) -> PathBuf {
        let files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents.")
            })
            .collect();
        assert_eq!(files.len(), 1, "event files in {}: {files:?}", dir.display());
        files.into_iter().next().unwrap()
    }

    fn record(index: u64) -> TrialRecord {
        let mut params = BTreeMap::new();
        params.insert("lr".to_string(), serde_json::json!(0.001));
        params.insert("stripe_sparsity_mode".to_string(), serde_json::json!("routing"));
        TrialRecord {
            sweep: "stripes".to_string(),
            index,
            params,
            config: serde_json::json!({"stripe_sparsity_mode": "routing", "lr": 0.001}).into(),
            status: TrialStatus::Running,
            attempt: 1,
            lease: Some(LeaseInfo {
                lease_id: "l1".into(),
                worker: "w1".into(),
                deadline_ms: 0,
                started_ms: 1_700_000_000_000,
            }),
            step: 0,
            metrics: BTreeMap::new(),
            progress: BTreeMap::new(),
            curve: Vec::new(),
            errors: Vec::new(),
            worker: Some("w1".into()),
            artifact: None,
            weights: None,
            created_ms: 0,
            finished_ms: None,
            duration_s: None,
        }
    }

    fn plugin_data(value: &SummaryValue) -> HParamsPluginData {
        let meta = value.metadata.as_ref().expect("hparams metadata");
        let plugin = meta.plugin_data.as_ref().unwrap();
        assert_eq!(plugin.plugin_name, "hparams");
        HParamsPluginData::decode(plugin.content.as_slice()).unwrap()
    }

    #[test]
    fn logger_writes_layout_scalars_and_hparams_sessions() {
        let root = tempfile::tempdir().unwrap();
        let logger = TensorBoardLogger::new(root.path(), "stripes", "ab12");
        let mut rec = record(7);
        // layer mode absent from the config: TrialConfig's default ("ordinary") is used.
        let dir = root.path().join("stripes-ab12/ordinary/routing/trial-00007");
        assert_eq!(logger.trial_dir(&rec), dir);

        logger.trial_started(&rec).unwrap();
        let mut scalars = BTreeMap::new();
        scalars.insert("train_loss".to_string(), 0.5);
        logger.progress(7, 100, &scalars, None).unwrap();
        rec.status = TrialStatus::Completed;
        rec.step = 200;
        rec.metrics.insert("fvu".to_string(), 0.125);
        rec.finished_ms = Some(1_700_000_100_000);
        logger.trial_finished(&rec, None).unwrap();
        // Unknown trial: an error, not a panic.
        assert!(logger.progress(99, 1, &scalars, None).is_err());

        let events = read_events(&only_event_file(&dir)).unwrap();
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        let values: Vec<(&SummaryValue, i64)> = events
            .iter()
            .filter_map(|e| e.summary.as_ref().map(|s| (e, s)))
            .flat_map(|(e, s)| s.value.iter().map(move |v| (v, e.step)))
            .collect();
        let tags: Vec<&str> = values.iter().map(|(v, _)| v.tag.as_str()).collect();
        assert_eq!(tags, vec![SESSION_START_INFO_TAG, "train_loss", "fvu", SESSION_END_INFO_TAG]);

        let start = plugin_data(values[0].0);
        assert_eq!(start.version, 0);
        let start = start.session_start_info.unwrap();
        assert_eq!(start.hparams["lr"].kind, Some(ProtoKind::Number(0.001)));
        assert_eq!(
            start.hparams["stripe_sparsity_mode"].kind,
            Some(ProtoKind::String("routing".into()))
        );
        assert_eq!(start.start_time_secs, 1_700_000_000.0);
        assert_eq!((values[1].0.simple_value, values[1].1), (Some(0.5), 100));
        assert_eq!((values[2].0.simple_value, values[2].1), (Some(0.125), 200));
        let end = plugin_data(values[3].0).session_end_info.unwrap();
        assert_eq!(end.status, STATUS_SUCCESS);
        assert_eq!(end.end_time_secs, 1_700_000_100.0);
    }

    /// Every scalar of a run's event files: (tag, step, value), in file order.
    fn scalars_in(dir: &Path) -> Vec<(String, i64, f32)> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
            .iter()
            .flat_map(|f| read_events(f).unwrap())
            .filter_map(|e| e.summary.map(|s| (e.step, s)))
            .flat_map(|(step, s)| {
                s.value.into_iter().filter_map(move |v| Some((v.tag, step, v.simple_value?)))
            })
            .collect()
    }

    /// Two stripes, classes 0 and 2 (label 1 absent), router scores.
    fn class_stats(scale: u64) -> ClassStats {
        ClassStats::new(
            2,
            3,
            vec![4 * scale, 0, 2 * scale],
            vec![scale, 0, 2 * scale, 4 * scale, 0, 0],
            Some(vec![0.5, 0.0, -1.0, 2.0, 0.0, 0.25]),
            vec![0.125, 0.0, 0.5 / scale as f64],
        )
        .unwrap()
    }

    #[test]
    fn class_statistics_go_to_the_trial_run_and_one_run_per_stripe() {
        let root = tempfile::tempdir().unwrap();
        let logger = TensorBoardLogger::new(root.path(), "stripes", "ab12");
        let mut rec = record(7);
        let dir = logger.trial_dir(&rec);
        logger.trial_started(&rec).unwrap();
        let scalars = BTreeMap::from([("val_loss".to_string(), 0.75)]);
        logger.progress(7, 10, &scalars, Some(&class_stats(1))).unwrap();
        rec.status = TrialStatus::Completed;
        rec.step = 20;
        rec.metrics.insert("fvu".to_string(), 0.125);
        logger.trial_finished(&rec, Some(&class_stats(2))).unwrap();

        let mut runs: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        runs.sort();
        assert_eq!(runs, ["stripe_00", "stripe_01"]);
        let trial: Vec<(String, i64, f32)> = scalars_in(&dir)
            .into_iter()
            .filter(|(t, _, _)| t.starts_with("mse_by_class"))
            .collect();
        assert_eq!(
            trial,
            [
                ("mse_by_class/0".into(), 10, 0.125),
                ("mse_by_class/2".into(), 10, 0.5),
                ("mse_by_class/0".into(), 20, 0.125),
                ("mse_by_class/2".into(), 20, 0.25),
            ]
        );
        let s = |tag: &str, step: i64, v: f32| (tag.to_string(), step, v);
        assert_eq!(
            scalars_in(&dir.join("stripe_00")),
            [
                s("class_activations/0", 10, 1.0),
                s("routing_score/0", 10, 0.5),
                s("class_activations/2", 10, 2.0),
                s("routing_score/2", 10, -1.0),
                s("class_activations/0", 20, 2.0),
                s("routing_score/0", 20, 0.5),
                s("class_activations/2", 20, 4.0),
                s("routing_score/2", 20, -1.0),
            ]
        );
        let stripe_1 = scalars_in(&dir.join("stripe_01"));
        assert_eq!(stripe_1[0], s("class_activations/0", 10, 4.0));
        assert_eq!(stripe_1[3], s("routing_score/2", 10, 0.25));
        // One writer per run for the whole trial, and every one closed at its end.
        for run in ["stripe_00", "stripe_01"] {
            only_event_file(&dir.join(run));
        }
        only_event_file(&dir);
        assert!(logger.lock().runs.is_empty() && logger.lock().trial_dirs.is_empty());
    }

    #[test]
    fn stripe_runs_after_restart_go_under_the_trial_found_on_disk() {
        let root = tempfile::tempdir().unwrap();
        let rec = record(3);
        TensorBoardLogger::new(root.path(), "stripes", "ab12").trial_started(&rec).unwrap();
        let logger = TensorBoardLogger::new(root.path(), "stripes", "ab12");
        let scalars = BTreeMap::from([("mse".to_string(), 2.0)]);
        logger.progress(3, 5, &scalars, Some(&class_stats(1))).unwrap();
        let dir = logger.trial_dir(&rec);
        assert_eq!(scalars_in(&dir.join("stripe_01"))[0], ("class_activations/0".into(), 5, 4.0));
    }

    #[test]
    fn progress_after_restart_finds_the_run_on_disk() {
        let root = tempfile::tempdir().unwrap();
        let rec = record(3);
        TensorBoardLogger::new(root.path(), "stripes", "ab12").trial_started(&rec).unwrap();
        // A new logger (coordinator restarted) gets progress without trial_started.
        let logger = TensorBoardLogger::new(root.path(), "stripes", "ab12");
        let scalars = BTreeMap::from([("mse".to_string(), 2.0)]);
        logger.progress(3, 5, &scalars, None).unwrap();
        let dir = logger.trial_dir(&rec);
        let files = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(files, 2, "one file per writer in the same run directory");
    }

    #[test]
    fn pruned_trial_ends_with_its_metrics_and_unknown_status() {
        let root = tempfile::tempdir().unwrap();
        let logger = TensorBoardLogger::new(root.path(), "stripes", "ab12");
        let mut rec = record(5);
        rec.status = TrialStatus::Pruned;
        rec.step = 300;
        rec.metrics.insert("fvu".to_string(), 0.4);
        logger.trial_finished(&rec, None).unwrap();
        let events = read_events(&only_event_file(&logger.trial_dir(&rec))).unwrap();
        let last = events.last().unwrap();
        assert_eq!(last.step, 300);
        let value = &last.summary.as_ref().unwrap().value[0];
        assert_eq!(value.tag, SESSION_END_INFO_TAG);
        assert_eq!(plugin_data(value).session_end_info.unwrap().status, STATUS_UNKNOWN);
        let fvu = &events[events.len() - 2].summary.as_ref().unwrap().value[0];
        assert_eq!((fvu.tag.as_str(), fvu.simple_value), ("fvu", Some(0.4)));
    }

    #[test]
    fn failed_trial_ends_with_failure_status() {
        let root = tempfile::tempdir().unwrap();
        let logger = TensorBoardLogger::new(root.path(), "stripes", "ab12");
        let mut rec = record(1);
        rec.status = TrialStatus::Failed;
        logger.trial_finished(&rec, None).unwrap();
        let events = read_events(&only_event_file(&logger.trial_dir(&rec))).unwrap();
        let last = events.last().unwrap().summary.as_ref().unwrap();
        assert_eq!(last.value[0].tag, SESSION_END_INFO_TAG);
        assert_eq!(plugin_data(&last.value[0]).session_end_info.unwrap().status, STATUS_FAILURE);
    }

    /// A trial whose config is no trial config (a runner's own, or none at all) is logged
    /// under the default modes rather than refused.
    #[test]
    fn a_config_that_is_no_trial_config_gets_the_default_modes() {
        let root = tempfile::tempdir().unwrap();
        let logger = TensorBoardLogger::new(root.path(), "stripes", "ab12");
        let default_dir = root.path().join("stripes-ab12/ordinary/none/trial-00002");
        for config in [serde_json::json!({"sleep_ms": 5}), serde_json::Value::Null] {
            let mut rec = record(2);
            rec.config = config.into();
            assert_eq!(logger.trial_dir(&rec), default_dir);
        }
        let mut rec = record(2);
        rec.config = serde_json::json!({"layer_sparsity_mode": "lifetime_batch_mean"}).into();
        assert_eq!(
            logger.trial_dir(&rec),
            root.path().join("stripes-ab12/lifetime_batch_mean/none/trial-00002")
        );
        rec.config = serde_json::json!({"sleep_ms": 5}).into();
        logger.trial_started(&rec).unwrap();
        assert_eq!(read_events(&only_event_file(&default_dir)).unwrap().len(), 2);
    }

    #[test]
    fn sweep_experiment_lists_params_and_metrics() {
        let root = tempfile::tempdir().unwrap();
        let logger = TensorBoardLogger::new(root.path(), "../evil/name", "x/1");
        let params = [HParamInfo::named("lr"), HParamInfo::named("layer_k")];
        logger.sweep_experiment(&params, &["fvu"]).unwrap();
        // Neither the sweep name nor its id can escape the root.
        let dir = root.path().join(".._evil_name-x_1");
        assert_eq!(logger.sweep_dir(), dir);
        let events = read_events(&only_event_file(&dir)).unwrap();
        let value = &events[1].summary.as_ref().unwrap().value[0];
        assert_eq!(value.tag, EXPERIMENT_TAG);
        let exp = plugin_data(value).experiment.unwrap();
        let names: Vec<&str> = exp.hparam_infos.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, vec!["lr", "layer_k"]);
        assert_eq!(exp.metric_infos[0].name.as_ref().unwrap().tag, "fvu");
    }

    #[test]
    fn hparams_domains_decode_to_the_sweeps_values() {
        use crate::tensorboard::messages::{Domain, ProtoKind};
        let spec = crate::spec::SweepSpec::parse(
            "name: d\nmethod: random\nrun_cap: 2\nparameters:\n  lr: {distribution: log_uniform_values, min: 0.0001, max: 0.01}\n  layer_k: {values: [4, 8]}\n  optimizer: {distribution: categorical, values: [adam, sgd]}\n  tied_weights: {value: true}\n",
            "d.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let infos: Vec<HParamInfo> =
            spec.parameters.iter().map(|(n, p)| HParamInfo::of(n, p)).collect();
        let root = tempfile::tempdir().unwrap();
        let logger = TensorBoardLogger::new(root.path(), "d", "ab12");
        logger.sweep_experiment(&infos, &["fvu"]).unwrap();
        let events = read_events(&only_event_file(&root.path().join("d-ab12"))).unwrap();
        let exp = plugin_data(&events[1].summary.as_ref().unwrap().value[0]).experiment.unwrap();
        let by_name = |n: &str| exp.hparam_infos.iter().find(|h| h.name == n).unwrap().clone();
        let discrete = |h: HParamInfo| match h.domain {
            Some(Domain::Discrete(l)) => {
                l.values.into_iter().map(|v| v.kind.unwrap()).collect::<Vec<_>>()
            }
            other => panic!("{}: {other:?}", h.name),
        };
        let lr = by_name("lr");
        assert_eq!(lr.r#type, 3);
        match lr.domain {
            Some(Domain::Interval(i)) => assert_eq!((i.min_value, i.max_value), (0.0001, 0.01)),
            other => panic!("lr: {other:?}"),
        }
        assert_eq!(by_name("layer_k").r#type, 3);
        assert_eq!(discrete(by_name("layer_k")), [ProtoKind::Number(4.0), ProtoKind::Number(8.0)]);
        assert_eq!(by_name("optimizer").r#type, 1);
        assert_eq!(
            discrete(by_name("optimizer")),
            [ProtoKind::String("adam".into()), ProtoKind::String("sgd".into())]
        );
        assert_eq!(by_name("tied_weights").r#type, 2);
        assert_eq!(discrete(by_name("tied_weights")), [ProtoKind::Bool(true)]);
    }
}
