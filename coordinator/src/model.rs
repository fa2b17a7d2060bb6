//! Domain records of the coordinator: sweeps and trials as stored in redb and shown in reports.

use crate::weights::StoredWeights;
use msae_shared::{ConfigError, TrialConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Lifecycle of a trial. Completed, Pruned and Failed are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrialStatus {
    Queued,
    Running,
    Completed,
    Failed,
    /// Stopped early by the sweep's `early_terminate` rule; its metrics are those it had
    /// reached. Ranked after every completed trial. (Stored as `pruned`: a database written
    /// before this state existed reads unchanged.)
    Pruned,
}

impl TrialStatus {
    /// The state's name, as stored and shown.
    pub fn name(self) -> &'static str {
        match self {
            TrialStatus::Queued => "queued",
            TrialStatus::Running => "running",
            TrialStatus::Completed => "completed",
            TrialStatus::Failed => "failed",
            TrialStatus::Pruned => "pruned",
        }
    }
}

/// Optimisation direction of the sweep metric (the metric table's, stored as `minimize` /
/// `maximize`).
pub use msae_shared::metrics::Goal;

/// The lease a trial is running under.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub lease_id: String,
    pub worker: String,
    /// Unix ms after which the lease is expired unless renewed.
    pub deadline_ms: u64,
    /// Unix ms when this attempt started.
    pub started_ms: u64,
}

/// One trial of a sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialRecord {
    pub sweep: String,
    /// Position in the sweep's proposal order (0-based); the trial id is `{sweep}/{index}`.
    pub index: u64,
    /// The swept parameters of this trial (dotted trial-config paths).
    pub params: BTreeMap<String, serde_json::Value>,
    /// The full trial config (base + params) as JSON, as stored and sent to workers; read it
    /// typed with [`TrialRecord::trial_config`].
    pub config: ConfigJson,
    pub status: TrialStatus,
    /// Attempts started so far (1 after the first lease).
    pub attempt: u32,
    pub lease: Option<LeaseInfo>,
    /// Latest progress step of the current attempt, then the step the trial ended at.
    pub step: u64,
    /// Final metrics, exactly as the completing attempt reported them (empty until then).
    pub metrics: BTreeMap<String, f64>,
    /// Latest progress scalars of the current attempt (samples and evaluations), kept apart
    /// from `metrics` so a progress value can never pass for a result.
    #[serde(default)]
    pub progress: BTreeMap<String, f64>,
    /// The sweep metric at each evaluation step reported during training, `(step, value)` in
    /// step order (a later attempt's value replaces an earlier one's at the same step): what
    /// `early_terminate` judges, rebuilt from here when a sweep resumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub curve: Vec<(u64, f64)>,
    /// Why the trial failed, or why earlier attempts did; also notes on a result (a missing
    /// sweep metric, dropped values, why and where the trial was pruned).
    pub errors: Vec<String>,
    pub worker: Option<String>,
    /// Where the worker wrote its files on its own disk (`msae-worker --out`), as it said.
    pub artifact: Option<String>,
    /// The trial's files kept by the coordinator ([`crate::weights`]); None when not uploaded
    /// or no longer kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<StoredWeights>,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
    /// Duration of the successful attempt in seconds, as reported by the worker.
    pub duration_s: Option<f64>,
}

impl TrialRecord {
    pub fn trial_id(&self) -> String {
        format!("{}/{}", self.sweep, self.index)
    }

    /// The trial's config as the typed [`TrialConfig`], for code that reads its fields (the
    /// record keeps the JSON it was stored and sent as, unchanged). `Ok(None)` when the record
    /// holds no config: its config could not be built, or the record was read without configs.
    /// An error when the JSON is not a `TrialConfig`: a runner's own config, or one written by
    /// another msae version. Not validated: only what it says is read.
    pub fn trial_config(&self) -> Result<Option<TrialConfig>, ConfigError> {
        if self.config.is_null() {
            return Ok(None);
        }
        serde_json::from_str(self.config.as_str())
            .map(Some)
            .map_err(|e| ConfigError::new("config", e.to_string()))
    }
}

/// A trial's full config as compact JSON text, as stored and as sent to workers.
///
/// Kept as text, not as a `serde_json::Value` tree: the tree took about 10 KB per trial, which
/// at 100,000 trials was a gigabyte of coordinator memory for configs that are only ever sent
/// on (leases) or read now and then (reports). Serialised exactly as the JSON it holds, so the
/// stored format is the one a `Value` gave. `null` (no config: it could not be built, or the
/// record was read without configs) is `None`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConfigJson(Option<Box<serde_json::value::RawValue>>);

impl ConfigJson {
    pub fn is_null(&self) -> bool {
        self.0.is_none()
    }

    /// The JSON text (`null` when there is none).
    pub fn as_str(&self) -> &str {
        self.0.as_deref().map_or("null", |raw| raw.get())
    }

    /// The config as a JSON tree.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(self.as_str()).unwrap_or(serde_json::Value::Null)
    }
}

impl From<serde_json::Value> for ConfigJson {
    fn from(value: serde_json::Value) -> Self {
        if value.is_null() {
            return ConfigJson(None);
        }
        let text = value.to_string();
        ConfigJson(Some(
            serde_json::value::RawValue::from_string(text).expect("a Value prints as JSON"),
        ))
    }
}

impl PartialEq for ConfigJson {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

/// A sweep as stored: the YAML it was started from and its fingerprint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepRecord {
    pub name: String,
    /// The sweep YAML text, verbatim.
    pub yaml: String,
    /// Hash of the normalised spec; a changed YAML under the same name is refused.
    pub fingerprint: String,
    pub created_ms: u64,
    /// Proposals made so far (trial indexes 0..proposed exist).
    pub proposed: u64,
    /// True once the strategy reported it is done and every trial is final.
    pub finished: bool,
    /// Random at creation, and never changed: tells this sweep from a same-named one of another
    /// database (or one deleted and started again) where both write files, as in TensorBoard's
    /// log root. Absent from sweeps stored before it existed: see [`SweepRecord::run_id`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

impl SweepRecord {
    /// A fresh [`uid`](Self::uid): 32 random bits in hex.
    pub fn new_uid() -> String {
        format!("{:08x}", rand::random::<u32>())
    }

    /// The sweep's stable id: its `uid`, or for a sweep stored before uids existed one derived
    /// from its creation time (in hex), which never changes either.
    pub fn run_id(&self) -> String {
        self.uid.clone().unwrap_or_else(|| format!("{:x}", self.created_ms))
    }
}

/// Current Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sweep stored before uids existed reads without one and gets an id from its creation
    /// time: the same on every open, different from a same-named sweep created at another time.
    #[test]
    fn a_sweep_stored_without_uid_has_a_stable_id_from_its_creation_time() {
        let old = r#"{"name":"s","yaml":"","fingerprint":"f","created_ms":1700000000123,"proposed":3,"finished":false}"#;
        let rec: SweepRecord = serde_json::from_str(old).unwrap();
        assert_eq!(rec.uid, None);
        assert_eq!(rec.run_id(), "18bcfe5687b");
        assert_eq!(serde_json::to_string(&rec).unwrap(), old, "written back as it was");
        let new = SweepRecord { uid: Some(SweepRecord::new_uid()), ..rec.clone() };
        let id = new.run_id();
        assert_eq!(id.len(), 8);
        let back: SweepRecord =
            serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!(back.run_id(), id);
        assert_ne!(SweepRecord { created_ms: 1, ..rec.clone() }.run_id(), rec.run_id());
    }
}

#[cfg(test)]
mod config_json_tests {
    use super::ConfigJson;
    use serde_json::json;

    #[test]
    fn config_text_is_stored_as_the_json_a_value_gave_and_reads_back() {
        let value = json!({"lr": 0.001, "data": {"dim": 64, "path": "a\"b"}, "seed": 7});
        let config = ConfigJson::from(value.clone());
        assert_eq!(serde_json::to_string(&config).unwrap(), serde_json::to_string(&value).unwrap());
        let back: ConfigJson =
            serde_json::from_str(&serde_json::to_string(&value).unwrap()).unwrap();
        assert_eq!((back.to_value(), &back), (value, &config));
        let none = ConfigJson::from(serde_json::Value::Null);
        assert!(none.is_null() && none.as_str() == "null");
        assert_eq!(serde_json::to_string(&none).unwrap(), "null");
        assert!(serde_json::from_str::<ConfigJson>("null").unwrap().is_null());
    }
}
