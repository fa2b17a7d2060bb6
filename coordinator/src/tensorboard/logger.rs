//! [`TensorBoardLogger`]: the TensorBoard logs of sweeps under one root, written as the
//! scheduler's events arrive (see [`follow`](super::follow)).
//!
//! `{root}/{sweep}/{layer_sparsity_mode}/{stripe_sparsity_mode}/trial-{index:05}` holds one
//! trial's run: its scalars and HParams session. `{root}/{sweep}` holds the HParams experiment.

use super::event_file::EventWriter;
use super::messages::{
    EXPERIMENT_TAG, Experiment, HParamInfo, HParamsPluginData, MetricInfo, MetricName, ProtoValue,
    SESSION_END_INFO_TAG, SESSION_START_INFO_TAG, STATUS_FAILURE, STATUS_RUNNING, STATUS_SUCCESS,
    STATUS_UNKNOWN, SessionEndInfo, SessionStartInfo, Summary, hparams_value,
};
use super::{Result, TensorBoardError, sanitize, unix_secs_f64};
use crate::model::{TrialRecord, TrialStatus};
use msae_shared::TrialConfig;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Keeps a file descriptor per running trial, up to this many; beyond it the least recently
/// used writer is closed (a later event for that trial opens a new file in the same run
/// directory, which TensorBoard reads as one run).
const MAX_OPEN_WRITERS: usize = 256;

struct OpenTrial {
    writer: EventWriter,
    last_used: u64,
}

/// Writes the TensorBoard logs of sweeps under `root`: per trial scalars (progress and final
/// metrics) and HParams sessions; per sweep the HParams experiment. Methods take `&self` (an
/// internal mutex guards the open files) and do blocking file I/O.
pub struct TensorBoardLogger {
    root: PathBuf,
    open: Mutex<OpenState>,
}

#[derive(Default)]
struct OpenState {
    trials: HashMap<(String, u64), OpenTrial>,
    clock: u64,
}

impl TensorBoardLogger {
    /// A logger writing under `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        TensorBoardLogger { root: root.into(), open: Mutex::new(OpenState::default()) }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of a sweep: `{root}/{sweep}` (holds the HParams experiment).
    pub fn sweep_dir(&self, sweep: &str) -> PathBuf {
        self.root.join(sanitize(sweep))
    }

    /// Directory of a trial: `{root}/{sweep}/{layer_sparsity_mode}/{stripe_sparsity_mode}/trial-{index:05}`,
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
        self.sweep_dir(&record.sweep)
            .join(sanitize(&mode_name(config.layer_sparsity_mode)))
            .join(sanitize(&mode_name(config.stripe_sparsity_mode)))
            .join(format!("trial-{:05}", record.index))
    }

    /// Writes the HParams experiment of a sweep (hyperparameter and metric names) into
    /// `{root}/{sweep}`. Call once per sweep start; TensorBoard keeps the first it sees.
    pub fn sweep_experiment<M: AsRef<str>>(
        &self,
        sweep: &str,
        params: &[HParamInfo],
        metrics: &[M],
    ) -> Result<()> {
        let experiment = Experiment {
            name: sweep.to_string(),
            description: format!("msae sweep {sweep}"),
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
        let mut writer = EventWriter::create(&self.sweep_dir(sweep))?;
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
        self.with_writer(&record.sweep, record.index, Some(record), |w| {
            w.add_summary(summary, 0)?;
            w.flush()
        })
    }

    /// Progress scalars of a running trial at `step`. The trial's run must be known: opened by
    /// [`trial_started`](Self::trial_started) in this process, or found on disk.
    pub fn progress(
        &self,
        sweep: &str,
        index: u64,
        step: u64,
        scalars: &BTreeMap<String, f64>,
    ) -> Result<()> {
        self.with_writer(sweep, index, None, |w| {
            w.add_scalars(scalars.iter().map(|(k, v)| (k.as_str(), *v)), step)?;
            w.flush()
        })
    }

    /// A trial reached a final state: its final metrics as scalars at its last step, then the
    /// HParams session end (success for completed, unknown for pruned, failure otherwise: see
    /// [`STATUS_UNKNOWN`]); closes its file.
    pub fn trial_finished(&self, record: &TrialRecord) -> Result<()> {
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
        let result = self.with_writer(&record.sweep, record.index, Some(record), |w| {
            w.add_scalars(record.metrics.iter().map(|(k, v)| (k.as_str(), *v)), step)?;
            w.add_summary(
                Summary { value: vec![hparams_value(SESSION_END_INFO_TAG, data)] },
                step,
            )?;
            w.flush()
        });
        // The run is over: release its file whatever happened.
        self.lock().trials.remove(&(record.sweep.clone(), record.index));
        result
    }

    /// Flushes and closes every open file (e.g. at shutdown).
    pub fn close_all(&self) -> Result<()> {
        let mut state = self.lock();
        let mut first_error = None;
        for (_, mut open) in state.trials.drain() {
            if let Err(e) = open.writer.flush() {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OpenState> {
        // A panic while holding the lock leaves only file handles behind; keep going.
        self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the trial's open writer, opening one if needed (from `record`, or by finding
    /// the trial's directory on disk).
    fn with_writer(
        &self,
        sweep: &str,
        index: u64,
        record: Option<&TrialRecord>,
        f: impl FnOnce(&mut EventWriter) -> Result<()>,
    ) -> Result<()> {
        let mut state = self.lock();
        state.clock += 1;
        let clock = state.clock;
        let key = (sweep.to_string(), index);
        if !state.trials.contains_key(&key) {
            let dir = match record {
                Some(r) => self.trial_dir(r),
                None => {
                    self.find_trial_dir(sweep, index).ok_or_else(|| TensorBoardError::Write {
                        path: self.sweep_dir(sweep).join(format!("*/*/trial-{index:05}")),
                        error: std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "trial run not started in this log root",
                        ),
                    })?
                }
            };
            if state.trials.len() >= MAX_OPEN_WRITERS {
                let oldest =
                    state.trials.iter().min_by_key(|(_, t)| t.last_used).map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    state.trials.remove(&oldest);
                }
            }
            let writer = EventWriter::create(&dir)?;
            state.trials.insert(key.clone(), OpenTrial { writer, last_used: clock });
        }
        let open = state.trials.get_mut(&key).expect("inserted above");
        open.last_used = clock;
        f(&mut open.writer)
    }

    /// Looks for `{root}/{sweep}/*/*/trial-{index:05}` (a run started before a restart).
    fn find_trial_dir(&self, sweep: &str, index: u64) -> Option<PathBuf> {
        let name = format!("trial-{index:05}");
        let layers = std::fs::read_dir(self.sweep_dir(sweep)).ok()?;
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
            config: serde_json::json!({"stripe_sparsity_mode": "routing", "lr": 0.001}),
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
        let logger = TensorBoardLogger::new(root.path());
        let mut rec = record(7);
        // layer mode absent from the config: TrialConfig's default ("ordinary") is used.
        let dir = root.path().join("stripes/ordinary/routing/trial-00007");
        assert_eq!(logger.trial_dir(&rec), dir);

        logger.trial_started(&rec).unwrap();
        let mut scalars = BTreeMap::new();
        scalars.insert("train_loss".to_string(), 0.5);
        logger.progress("stripes", 7, 100, &scalars).unwrap();
        rec.status = TrialStatus::Completed;
        rec.step = 200;
        rec.metrics.insert("fvu".to_string(), 0.125);
        rec.finished_ms = Some(1_700_000_100_000);
        logger.trial_finished(&rec).unwrap();
        // Unknown trial: an error, not a panic.
        assert!(logger.progress("stripes", 99, 1, &scalars).is_err());

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

    #[test]
    fn progress_after_restart_finds_the_run_on_disk() {
        let root = tempfile::tempdir().unwrap();
        let rec = record(3);
        TensorBoardLogger::new(root.path()).trial_started(&rec).unwrap();
        // A new logger (coordinator restarted) gets progress without trial_started.
        let logger = TensorBoardLogger::new(root.path());
        let scalars = BTreeMap::from([("mse".to_string(), 2.0)]);
        logger.progress("stripes", 3, 5, &scalars).unwrap();
        let dir = logger.trial_dir(&rec);
        let files = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(files, 2, "one file per writer in the same run directory");
    }

    #[test]
    fn pruned_trial_ends_with_its_metrics_and_unknown_status() {
        let root = tempfile::tempdir().unwrap();
        let logger = TensorBoardLogger::new(root.path());
        let mut rec = record(5);
        rec.status = TrialStatus::Pruned;
        rec.step = 300;
        rec.metrics.insert("fvu".to_string(), 0.4);
        logger.trial_finished(&rec).unwrap();
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
        let logger = TensorBoardLogger::new(root.path());
        let mut rec = record(1);
        rec.status = TrialStatus::Failed;
        logger.trial_finished(&rec).unwrap();
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
        let logger = TensorBoardLogger::new(root.path());
        let default_dir = root.path().join("stripes/ordinary/none/trial-00002");
        for config in [serde_json::json!({"sleep_ms": 5}), serde_json::Value::Null] {
            let mut rec = record(2);
            rec.config = config;
            assert_eq!(logger.trial_dir(&rec), default_dir);
        }
        let mut rec = record(2);
        rec.config = serde_json::json!({"layer_sparsity_mode": "lifetime_batch_mean"});
        assert_eq!(
            logger.trial_dir(&rec),
            root.path().join("stripes/lifetime_batch_mean/none/trial-00002")
        );
        rec.config = serde_json::json!({"sleep_ms": 5});
        logger.trial_started(&rec).unwrap();
        assert_eq!(read_events(&only_event_file(&default_dir)).unwrap().len(), 2);
    }

    #[test]
    fn sweep_experiment_lists_params_and_metrics() {
        let root = tempfile::tempdir().unwrap();
        let logger = TensorBoardLogger::new(root.path());
        let params = [HParamInfo::named("lr"), HParamInfo::named("layer_k")];
        logger.sweep_experiment("../evil/name", &params, &["fvu"]).unwrap();
        // The sweep name cannot escape the root.
        let dir = root.path().join(".._evil_name");
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
        let logger = TensorBoardLogger::new(root.path());
        logger.sweep_experiment("d", &infos, &["fvu"]).unwrap();
        let events = read_events(&only_event_file(&root.path().join("d"))).unwrap();
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
