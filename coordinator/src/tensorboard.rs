//! TensorBoard event files, written without TensorFlow: scalars per trial plus the HParams
//! plugin's experiment / session summaries, so `tensorboard --logdir ROOT/SWEEP` shows every
//! trial's curves and the HParams table of a sweep.
//!
//! # File format
//! An event file is a sequence of TFRecord records:
//!
//! ```text
//! u64 len (little endian) | u32 masked_crc32c(len bytes) | data[len] | u32 masked_crc32c(data)
//! ```
//!
//! where `masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8` (wrapping) and `data` is a
//! serialized `tensorboard.Event`. The first record of a file carries `file_version =
//! "brain.Event:2"`. CRC32C (Castagnoli) is implemented here, table-driven, and pinned by the
//! published test vectors.
//!
//! # Messages
//! The few protobuf messages needed are declared below with `prost` derives, field numbers taken
//! from TensorFlow's `event.proto`, `summary.proto`, `tensor.proto` and TensorBoard's
//! `plugins/hparams/{api,plugin_data}.proto` (checked against tensorboard 2.21's descriptors).
//!
//! # Layout
//! `{root}/{sweep}/{layer_sparsity_mode}/{stripe_sparsity_mode}/trial-{index:05}` holds one
//! trial (the original code logged under `[log_dir]/[layer mode]/[stripe mode]/[timestamp]`);
//! `{root}/{sweep}` holds the HParams experiment summary. The HParams plugin looks for the
//! experiment in any run, so TensorBoard may point at `{root}/{sweep}` or at `{root}`.
//!
//! Writing never panics on I/O errors: every call returns a [`Result`] and the caller logs.

use crate::model::{TrialRecord, TrialStatus};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Errors of the TensorBoard writer. All are I/O or format problems; none is worth retrying
/// in a loop (a later call may succeed once the disk has room again).
#[derive(Debug, thiserror::Error)]
pub enum TensorBoardError {
    /// A log directory could not be created.
    #[error("tensorboard: cannot create directory {path}: {error}")]
    CreateDir { path: PathBuf, error: std::io::Error },
    /// An event file could not be created, written or flushed.
    #[error("tensorboard: cannot write event file {path}: {error}")]
    Write { path: PathBuf, error: std::io::Error },
    /// An event file could not be read back.
    #[error("tensorboard: cannot read event file {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    /// A record is truncated, has a bad CRC or does not decode as an `Event`.
    #[error("tensorboard: malformed record at byte {offset}: {reason}")]
    Corrupt { offset: usize, reason: String },
}

/// Result alias of this module.
pub type Result<T, E = TensorBoardError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------------
// CRC32C and record framing

/// CRC32C lookup table (reflected Castagnoli polynomial 0x82F63B78), built at compile time.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC32C (Castagnoli) of `data`, as used by TFRecord framing.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc = CRC32C_TABLE[((crc ^ byte as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The masked CRC TFRecord stores: `((crc >> 15) | (crc << 17)) + 0xa282ead8`, a rotation
/// plus a constant (masking keeps the CRC of data that itself holds CRCs well mixed).
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Frames `data` as one TFRecord record.
pub fn encode_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// Splits a TFRecord byte stream into record payloads, checking both CRCs of each record.
pub fn decode_records(bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    let corrupt = |offset: usize, reason: &str| TensorBoardError::Corrupt {
        offset,
        reason: reason.to_string(),
    };
    let mut records = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let header = bytes.get(pos..pos + 12).ok_or_else(|| corrupt(pos, "truncated header"))?;
        let len_bytes = &header[..8];
        let len_crc = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        if masked_crc32c(len_bytes) != len_crc {
            return Err(corrupt(pos, "length CRC mismatch"));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let start = pos + 12;
        let end = start.checked_add(len).ok_or_else(|| corrupt(pos, "length overflows"))?;
        let data = bytes.get(start..end).ok_or_else(|| corrupt(pos, "truncated data"))?;
        let crc_bytes =
            bytes.get(end..end + 4).ok_or_else(|| corrupt(pos, "truncated data CRC"))?;
        if masked_crc32c(data) != u32::from_le_bytes(crc_bytes.try_into().expect("4 bytes")) {
            return Err(corrupt(pos, "data CRC mismatch"));
        }
        records.push(data.to_vec());
        pos = end + 4;
    }
    Ok(records)
}

/// Reads and decodes every event of an event file (tests and tools; TensorBoard does this
/// itself).
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path)
        .map_err(|error| TensorBoardError::Read { path: path.to_path_buf(), error })?;
    let mut events = Vec::new();
    for record in decode_records(&bytes)? {
        let event = <Event as prost::Message>::decode(record.as_slice()).map_err(|e| {
            TensorBoardError::Corrupt { offset: 0, reason: format!("{}: {e}", path.display()) }
        })?;
        events.push(event);
    }
    Ok(events)
}

// ---------------------------------------------------------------------------------------------
// Protobuf messages (tensorboard.Event and friends)

/// `tensorboard.Event` (event.proto), restricted to the fields written here.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// `oneof what`: only file_version (3) and summary (5) are used.
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

/// `tensorboard.Summary` (summary.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorboard.Summary.Value`: a tag with a scalar or a tensor, and optional plugin metadata.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    /// `oneof value`: simple_value (2) for scalars, tensor (8) for plugin data.
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
    #[prost(message, optional, tag = "8")]
    pub tensor: Option<TensorProto>,
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
}

/// `tensorboard.SummaryMetadata`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
    /// DataClass: 0 unknown, 1 scalar, 2 tensor, 3 blob sequence.
    #[prost(int32, tag = "4")]
    pub data_class: i32,
}

/// `tensorboard.SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PluginData {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

/// `tensorboard.TensorProto` (only what the HParams null tensor needs).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    /// DataType enum; 1 = DT_FLOAT.
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShapeProto>,
    #[prost(float, repeated, tag = "5")]
    pub float_val: Vec<f32>,
}

/// `tensorboard.TensorShapeProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<TensorShapeDim>,
}

/// `tensorboard.TensorShapeProto.Dim`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShapeDim {
    #[prost(int64, tag = "1")]
    pub size: i64,
}

/// `tensorboard.hparams.HParamsPluginData` (plugin_data.proto); exactly one of the three
/// payloads is set.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HParamsPluginData {
    #[prost(int32, tag = "1")]
    pub version: i32,
    #[prost(message, optional, tag = "2")]
    pub experiment: Option<Experiment>,
    #[prost(message, optional, tag = "3")]
    pub session_start_info: Option<SessionStartInfo>,
    #[prost(message, optional, tag = "4")]
    pub session_end_info: Option<SessionEndInfo>,
}

/// `tensorboard.hparams.Experiment` (api.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Experiment {
    #[prost(string, tag = "1")]
    pub description: String,
    #[prost(double, tag = "3")]
    pub time_created_secs: f64,
    #[prost(message, repeated, tag = "4")]
    pub hparam_infos: Vec<HParamInfo>,
    #[prost(message, repeated, tag = "5")]
    pub metric_infos: Vec<MetricInfo>,
    #[prost(string, tag = "6")]
    pub name: String,
}

/// `tensorboard.hparams.HParamInfo`. The type is left unset (the plugin infers it from the
/// session values).
#[derive(Clone, PartialEq, prost::Message)]
pub struct HParamInfo {
    #[prost(string, tag = "1")]
    pub name: String,
}

/// `tensorboard.hparams.MetricInfo`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MetricInfo {
    #[prost(message, optional, tag = "1")]
    pub name: Option<MetricName>,
}

/// `tensorboard.hparams.MetricName`: the scalar `tag` in run `{session}{group}`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MetricName {
    #[prost(string, tag = "1")]
    pub group: String,
    #[prost(string, tag = "2")]
    pub tag: String,
}

/// `tensorboard.hparams.SessionStartInfo`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionStartInfo {
    #[prost(map = "string, message", tag = "1")]
    pub hparams: HashMap<String, ProtoValue>,
    #[prost(string, tag = "2")]
    pub model_uri: String,
    #[prost(string, tag = "4")]
    pub group_name: String,
    #[prost(double, tag = "5")]
    pub start_time_secs: f64,
}

/// `tensorboard.hparams.SessionEndInfo`; status: 0 unknown, 1 success, 2 failure, 3 running.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionEndInfo {
    #[prost(int32, tag = "1")]
    pub status: i32,
    #[prost(double, tag = "2")]
    pub end_time_secs: f64,
}

/// HParams session status values (api.proto `Status`).
pub const STATUS_SUCCESS: i32 = 1;
/// Failed session.
pub const STATUS_FAILURE: i32 = 2;
/// Session still running (or unknown final state).
pub const STATUS_RUNNING: i32 = 3;

/// `google.protobuf.Value` restricted to scalars (HParams supports only those).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProtoValue {
    #[prost(oneof = "ProtoKind", tags = "2, 3, 4")]
    pub kind: Option<ProtoKind>,
}

/// The `kind` oneof of `google.protobuf.Value`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ProtoKind {
    #[prost(double, tag = "2")]
    Number(f64),
    #[prost(string, tag = "3")]
    String(String),
    #[prost(bool, tag = "4")]
    Bool(bool),
}

impl ProtoValue {
    /// Converts a JSON parameter value; arrays, objects and null become their JSON text.
    pub fn from_json(value: &serde_json::Value) -> Self {
        let kind = match value {
            serde_json::Value::Number(n) => ProtoKind::Number(n.as_f64().unwrap_or(f64::NAN)),
            serde_json::Value::String(s) => ProtoKind::String(s.clone()),
            serde_json::Value::Bool(b) => ProtoKind::Bool(*b),
            other => ProtoKind::String(other.to_string()),
        };
        ProtoValue { kind: Some(kind) }
    }
}

/// Tag of the HParams experiment summary.
pub const EXPERIMENT_TAG: &str = "_hparams_/experiment";
/// Tag of the HParams session start summary.
pub const SESSION_START_INFO_TAG: &str = "_hparams_/session_start_info";
/// Tag of the HParams session end summary.
pub const SESSION_END_INFO_TAG: &str = "_hparams_/session_end_info";

/// A summary value carrying HParams plugin data, as `tensorboard.plugins.hparams.summary`
/// writes it: plugin "hparams", version 0, tensor = the plugin's NULL_TENSOR (an empty
/// DT_FLOAT tensor of shape [0]), data class "tensor".
pub fn hparams_value(tag: &str, data: HParamsPluginData) -> SummaryValue {
    SummaryValue {
        tag: tag.to_string(),
        simple_value: None,
        tensor: Some(TensorProto {
            dtype: 1,
            tensor_shape: Some(TensorShapeProto { dim: vec![TensorShapeDim { size: 0 }] }),
            float_val: Vec::new(),
        }),
        metadata: Some(SummaryMetadata {
            plugin_data: Some(PluginData {
                plugin_name: "hparams".to_string(),
                content: prost::Message::encode_to_vec(&data),
            }),
            data_class: 2,
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// EventWriter

/// Distinguishes files a process creates in the same second (TensorBoard's own writers end the
/// name with a counter too).
static FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_else(|| "localhost".to_string());
    let name = sanitize(raw.trim());
    if name.is_empty() { "localhost".to_string() } else { name }
}

fn unix_secs_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One TensorBoard event file: `events.out.tfevents.{unix_secs}.{hostname}.{pid}.{counter}`.
/// Records are buffered; call [`EventWriter::flush`] to make them visible to TensorBoard.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` (and parents) and a new event file in it, starting with the
    /// `brain.Event:2` file-version record.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|error| TensorBoardError::CreateDir { path: dir.to_path_buf(), error })?;
        let secs = unix_secs_f64() as u64;
        let counter = FILE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name =
            format!("events.out.tfevents.{secs}.{}.{}.{counter}", hostname(), std::process::id());
        let path = dir.join(name);
        let file = File::create(&path)
            .map_err(|error| TensorBoardError::Write { path: path.clone(), error })?;
        let mut writer = EventWriter { path, out: BufWriter::new(file) };
        writer.write_event(&Event {
            wall_time: unix_secs_f64(),
            step: 0,
            file_version: Some("brain.Event:2".to_string()),
            summary: None,
        })?;
        Ok(writer)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event record (buffered).
    pub fn write_event(&mut self, event: &Event) -> Result<()> {
        let record = encode_record(&prost::Message::encode_to_vec(event));
        self.out
            .write_all(&record)
            .map_err(|error| TensorBoardError::Write { path: self.path.clone(), error })
    }

    /// Appends a summary at `step`, stamped with the current time.
    pub fn add_summary(&mut self, summary: Summary, step: u64) -> Result<()> {
        self.write_event(&Event {
            wall_time: unix_secs_f64(),
            step: step.min(i64::MAX as u64) as i64,
            file_version: None,
            summary: Some(summary),
        })
    }

    /// Appends a scalar (stored as a 32-bit float, as TensorBoard's `simple_value` is).
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: u64) -> Result<()> {
        self.add_scalars(std::iter::once((tag, value)), step)
    }

    /// Appends several scalars at the same step as one event.
    pub fn add_scalars<'a>(
        &mut self,
        scalars: impl IntoIterator<Item = (&'a str, f64)>,
        step: u64,
    ) -> Result<()> {
        let value = scalars
            .into_iter()
            .map(|(tag, v)| SummaryValue {
                tag: tag.to_string(),
                simple_value: Some(v as f32),
                tensor: None,
                metadata: None,
            })
            .collect::<Vec<_>>();
        if value.is_empty() {
            return Ok(());
        }
        self.add_summary(Summary { value }, step)
    }

    /// Writes buffered records to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|error| TensorBoardError::Write { path: self.path.clone(), error })
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if let Err(e) = self.out.flush() {
            tracing::warn!(path = %self.path.display(), error = %e, "tensorboard: flush on close failed");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TensorBoardLogger

/// Keeps a file descriptor per running trial, up to this many; beyond it the least recently
/// used writer is closed (a later event for that trial opens a new file in the same run
/// directory, which TensorBoard reads as one run).
const MAX_OPEN_WRITERS: usize = 256;

/// Replaces path separators and anything unusual so a sweep name or mode cannot escape `root`.
fn sanitize(component: &str) -> String {
    let s: String = component
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' })
        .collect();
    if s.is_empty() || s.chars().all(|c| c == '.') { "_".to_string() } else { s }
}

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
    /// modes read from the record's config (defaults of `TrialConfig` when absent).
    pub fn trial_dir(&self, record: &TrialRecord) -> PathBuf {
        let mode = |key: &str| -> String {
            record
                .config
                .get(key)
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| default_mode(key))
        };
        self.sweep_dir(&record.sweep)
            .join(sanitize(&mode("layer_sparsity_mode")))
            .join(sanitize(&mode("stripe_sparsity_mode")))
            .join(format!("trial-{:05}", record.index))
    }

    /// Writes the HParams experiment of a sweep (hyperparameter and metric names) into
    /// `{root}/{sweep}`. Call once per sweep start; TensorBoard keeps the first it sees.
    pub fn sweep_experiment<P: AsRef<str>, M: AsRef<str>>(
        &self,
        sweep: &str,
        params: &[P],
        metrics: &[M],
    ) -> Result<()> {
        let experiment = Experiment {
            name: sweep.to_string(),
            description: format!("msae sweep {sweep}"),
            time_created_secs: unix_secs_f64(),
            hparam_infos: params
                .iter()
                .map(|p| HParamInfo { name: p.as_ref().to_string() })
                .collect(),
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
    /// HParams session end (success for completed, failure otherwise); closes its file.
    pub fn trial_finished(&self, record: &TrialRecord) -> Result<()> {
        let status = match record.status {
            TrialStatus::Completed => STATUS_SUCCESS,
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

/// The `TrialConfig` default of a mode field, as its serialized name.
fn default_mode(key: &str) -> String {
    serde_json::to_value(msae_shared::TrialConfig::default())
        .ok()
        .and_then(|v| v.get(key).and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or_else(|| "none".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LeaseInfo;
    use prost::Message;

    #[test]
    fn crc32c_matches_published_vectors() {
        // RFC 3720 (iSCSI) appendix B.4 and the common "123456789" check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        let ascending: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&ascending), 0x46DD_794E);
        let descending: Vec<u8> = (0u8..32).rev().collect();
        assert_eq!(crc32c(&descending), 0x113F_DB5C);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn masked_crc_matches_tensorboard() {
        // Values from tensorboard's own `masked_crc32c` (tensorflow_stub).
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
        assert_eq!(masked_crc32c(b""), 0xA282_EAD8);
        assert_eq!(masked_crc32c(&0u64.to_le_bytes()), 0x0798_0329);
    }

    #[test]
    fn record_framing_round_trips_and_detects_corruption() {
        let mut bytes = encode_record(b"hello");
        bytes.extend(encode_record(b""));
        assert_eq!(&bytes[..8], &5u64.to_le_bytes());
        assert_eq!(decode_records(&bytes).unwrap(), vec![b"hello".to_vec(), Vec::new()]);
        let mut flipped = bytes.clone();
        flipped[13] ^= 1; // inside "hello"
        assert!(matches!(
            decode_records(&flipped),
            Err(TensorBoardError::Corrupt { offset: 0, .. })
        ));
        assert!(decode_records(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn null_tensor_matches_hparams_plugin_bytes() {
        // tensorboard.plugins.hparams.metadata.NULL_TENSOR.SerializeToString()
        let value = hparams_value("t", HParamsPluginData::default());
        assert_eq!(value.tensor.unwrap().encode_to_vec(), vec![0x08, 0x01, 0x12, 0x02, 0x12, 0x00]);
    }

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

    #[test]
    fn event_writer_file_is_readable() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.add_scalar("fvu", 0.25, 10).unwrap();
        w.add_scalar("mse", 1.5, 20).unwrap();
        w.flush().unwrap();
        let path = w.path().to_path_buf();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let parts: Vec<&str> = name.split('.').collect();
        assert_eq!(&parts[..3], &["events", "out", "tfevents"]);
        assert!(parts[3].parse::<u64>().unwrap() > 1_600_000_000);
        assert_eq!(parts[parts.len() - 2], std::process::id().to_string());
        drop(w);

        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        assert!(events[0].summary.is_none());
        let v = &events[1].summary.as_ref().unwrap().value[0];
        assert_eq!((v.tag.as_str(), v.simple_value, events[1].step), ("fvu", Some(0.25), 10));
        let v = &events[2].summary.as_ref().unwrap().value[0];
        assert_eq!((v.tag.as_str(), v.simple_value, events[2].step), ("mse", Some(1.5), 20));
        assert!(events[2].wall_time > 1.6e9);
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
            errors: Vec::new(),
            worker: Some("w1".into()),
            artifact: None,
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

    #[test]
    fn sweep_experiment_lists_params_and_metrics() {
        let root = tempfile::tempdir().unwrap();
        let logger = TensorBoardLogger::new(root.path());
        logger.sweep_experiment("../evil/name", &["lr", "layer_k"], &["fvu"]).unwrap();
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
    fn create_in_unwritable_place_is_an_error() {
        let file = tempfile::NamedTempFile::new().unwrap();
        // A directory below a regular file cannot be created.
        let err = EventWriter::create(&file.path().join("sub")).err().unwrap();
        assert!(err.to_string().contains("cannot create directory"), "{err}");
    }
}
