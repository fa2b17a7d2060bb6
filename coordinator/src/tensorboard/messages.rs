//! The few protobuf messages an event file needs, declared with `prost` derives: field numbers
//! taken from TensorFlow's `event.proto`, `summary.proto`, `tensor.proto` and TensorBoard's
//! `plugins/hparams/{api,plugin_data}.proto` (checked against tensorboard 2.21's descriptors).
//! Plus the HParams plugin's tags and the summary value that carries its data.

use std::collections::HashMap;

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

/// `tensorboard.hparams.HParamInfo`, with its type and domain so TensorBoard's filters offer
/// the sweep's values (discrete) or range (interval).
#[derive(Clone, PartialEq, prost::Message)]
pub struct HParamInfo {
    #[prost(string, tag = "1")]
    pub name: String,
    /// `tensorboard.hparams.DataType`: 0 unset, 1 string, 2 bool, 3 float64.
    #[prost(int32, tag = "4")]
    pub r#type: i32,
    #[prost(oneof = "Domain", tags = "5, 6")]
    pub domain: Option<Domain>,
}

/// The `domain` oneof of `HParamInfo`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Domain {
    /// `google.protobuf.ListValue` of the allowed values.
    #[prost(message, tag = "5")]
    Discrete(ListValue),
    #[prost(message, tag = "6")]
    Interval(Interval),
}

/// `google.protobuf.ListValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListValue {
    #[prost(message, repeated, tag = "1")]
    pub values: Vec<ProtoValue>,
}

/// `tensorboard.hparams.Interval`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Interval {
    #[prost(double, tag = "1")]
    pub min_value: f64,
    #[prost(double, tag = "2")]
    pub max_value: f64,
}

const DATA_TYPE_STRING: i32 = 1;
const DATA_TYPE_BOOL: i32 = 2;
const DATA_TYPE_FLOAT64: i32 = 3;

impl HParamInfo {
    /// A hyperparameter with neither type nor domain (TensorBoard infers them).
    pub fn named(name: &str) -> HParamInfo {
        HParamInfo { name: name.to_string(), r#type: 0, domain: None }
    }

    /// The hyperparameter of a swept parameter: numeric distributions as an interval, lists
    /// (and constants) as their values when all are of one type; a mixed list gets no domain.
    pub fn of(name: &str, spec: &crate::spec::ParamSpec) -> HParamInfo {
        use crate::spec::{Distribution, ParamSpec};
        let values: Vec<serde_json::Value> = match spec {
            ParamSpec::Value(v) => vec![v.clone()],
            ParamSpec::Values(vs)
            | ParamSpec::Distribution(Distribution::Categorical { values: vs, .. }) => vs.clone(),
            ParamSpec::Distribution(d) => {
                let (min_value, max_value) = d.bounds().unwrap_or((f64::NAN, f64::NAN));
                return HParamInfo {
                    name: name.to_string(),
                    r#type: DATA_TYPE_FLOAT64,
                    domain: Some(Domain::Interval(Interval { min_value, max_value })),
                };
            }
        };
        let r#type = if values.iter().all(serde_json::Value::is_number) {
            DATA_TYPE_FLOAT64
        } else if values.iter().all(serde_json::Value::is_string) {
            DATA_TYPE_STRING
        } else if values.iter().all(serde_json::Value::is_boolean) {
            DATA_TYPE_BOOL
        } else {
            return HParamInfo::named(name);
        };
        let values = values.iter().map(ProtoValue::from_json).collect();
        HParamInfo {
            name: name.to_string(),
            r#type,
            domain: Some(Domain::Discrete(ListValue { values })),
        }
    }
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

/// HParams session status values (api.proto `Status`: unknown, success, failure, running; it
/// has no "aborted" or "pruned").
///
/// Unknown: what a trial stopped by early termination ends with. Neither success (it did not
/// train to its end) nor failure (nothing went wrong), so the HParams status filter keeps
/// pruned sessions apart from both.
pub const STATUS_UNKNOWN: i32 = 0;
/// Successful session.
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
/// DT_FLOAT tensor of shape `[0]`), data class "tensor".
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

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn null_tensor_matches_hparams_plugin_bytes() {
        // tensorboard.plugins.hparams.metadata.NULL_TENSOR.SerializeToString()
        let value = hparams_value("t", HParamsPluginData::default());
        assert_eq!(value.tensor.unwrap().encode_to_vec(), vec![0x08, 0x01, 0x12, 0x02, 0x12, 0x00]);
    }
}
