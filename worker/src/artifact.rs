//! A trained SAE as files: self-describing safetensors weights, the resolved config and the
//! final metrics ([`msae_shared::upload::TrialFiles`]), and reading the weights back
//! (`msae-worker encode`).
//!
//! The weights file is written here rather than by the safetensors crate so that the same
//! model always gives the same bytes: tensors and metadata keys in name order. Its
//! `__metadata__` holds, as strings:
//! - `format` (`msae-sae`) and `format_version` ([`FORMAT_VERSION`]);
//! - `config`: the resolved trial config as JSON;
//! - `scaling`: the data scaling fitted on the training split, as JSON (`{"kind":
//!   "standardize", "mean": [...], "std": [...]}`, `{"kind": "max_abs", "scale": s}` (the
//!   multiplier), `{"kind": "unit_norm"}` or `{"kind": "none"}`);
//! - `input_dim`, and `eval_layer_k` (the k-curriculum's k at the last training step, which
//!   evaluation and encoding use).

use crate::data::Scaler;
use crate::sae::trainer::{NamedTensor, Trainer};
use anyhow::Context as _;
use msae_shared::TrialConfig;
use msae_shared::upload::TrialFiles;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The value of `format` in the metadata.
pub const FORMAT: &str = "msae-sae";
/// Bumped when the layout or the metadata changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;

/// The scaling statistics as stored in the metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum ScalingStats {
    None,
    Standardize { mean: Vec<f32>, std: Vec<f32> },
    UnitNorm,
    MaxAbs { scale: f32 },
}

impl ScalingStats {
    fn of(scaler: &Scaler) -> Self {
        match scaler {
            Scaler::Identity => ScalingStats::None,
            Scaler::UnitNorm => ScalingStats::UnitNorm,
            Scaler::MaxAbs { scale } => ScalingStats::MaxAbs { scale: *scale },
            Scaler::Standardize { mean, inv_std } => ScalingStats::Standardize {
                mean: mean.clone(),
                std: inv_std.iter().map(|s| 1.0 / s).collect(),
            },
        }
    }

    fn scaler(self, dim: usize) -> anyhow::Result<Scaler> {
        Ok(match self {
            ScalingStats::None => Scaler::Identity,
            ScalingStats::UnitNorm => Scaler::UnitNorm,
            ScalingStats::MaxAbs { scale } => {
                anyhow::ensure!(scale.is_finite() && scale > 0.0, "scaling: scale {scale}");
                Scaler::MaxAbs { scale }
            }
            ScalingStats::Standardize { mean, std } => {
                anyhow::ensure!(
                    mean.len() == dim && std.len() == dim,
                    "scaling: {} means and {} stds for input_dim {dim}",
                    mean.len(),
                    std.len()
                );
                anyhow::ensure!(
                    std.iter().all(|s| s.is_finite() && *s > 0.0),
                    "scaling: a std is not a positive number"
                );
                Scaler::Standardize { mean, inv_std: std.iter().map(|s| 1.0 / s).collect() }
            }
        })
    }
}

/// Safetensors bytes of `tensors` (F32, little-endian) with `metadata`, deterministically.
pub fn safetensors_bytes(tensors: &[NamedTensor], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut order: Vec<&NamedTensor> = tensors.iter().collect();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let meta = metadata.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    }
    let mut offset = 0usize;
    for t in &order {
        let end = offset + t.data.len() * 4;
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::to_string(&header).expect("a header serializes");
    // The data starts 8-byte aligned, as the format asks.
    while !(8 + json.len()).is_multiple_of(8) {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    for t in &order {
        for v in &t.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// The metadata of a trained SAE's weights file.
fn metadata(
    cfg: &TrialConfig,
    scaler: &Scaler,
    input_dim: usize,
    eval_layer_k: usize,
) -> BTreeMap<String, String> {
    let config = serde_json::to_string(cfg).expect("a trial config serializes");
    let scaling = serde_json::to_string(&ScalingStats::of(scaler)).expect("stats serialize");
    BTreeMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("format_version".to_string(), FORMAT_VERSION.to_string()),
        ("config".to_string(), config),
        ("scaling".to_string(), scaling),
        ("input_dim".to_string(), input_dim.to_string()),
        ("eval_layer_k".to_string(), eval_layer_k.to_string()),
    ])
}

/// The files of a trained SAE: weights with metadata, the config as YAML, the metrics as JSON.
pub fn trial_files(
    trainer: &dyn Trainer,
    cfg: &TrialConfig,
    scaler: &Scaler,
    input_dim: usize,
    metrics: &BTreeMap<String, f64>,
) -> anyhow::Result<TrialFiles> {
    let meta = metadata(cfg, scaler, input_dim, trainer.eval_layer_k());
    let weights = safetensors_bytes(&trainer.tensors()?, &meta);
    let config_yaml = msae_shared::yaml::to_string(cfg).context("serialising the config")?;
    let mut metrics_json = serde_json::to_string_pretty(metrics).context("serialising metrics")?;
    metrics_json.push('\n');
    Ok(TrialFiles {
        weights,
        config_yaml: config_yaml.into_bytes(),
        metrics_json: metrics_json.into_bytes(),
    })
}

/// The F32 tensors of a safetensors file, in name order.
pub fn read_tensors(bytes: &[u8]) -> anyhow::Result<Vec<NamedTensor>> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("not a safetensors file: {e}"))?;
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        anyhow::ensure!(
            view.dtype() == safetensors::Dtype::F32,
            "tensor {name} is {:?}; msae writes F32",
            view.dtype()
        );
        let data = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        tensors.push(NamedTensor::new(name, view.shape().to_vec(), data));
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(tensors)
}

/// A trained SAE read back from its weights file.
#[derive(Debug, Clone)]
pub struct SavedSae {
    pub config: TrialConfig,
    pub scaler: Scaler,
    pub input_dim: usize,
    pub eval_layer_k: usize,
    pub tensors: Vec<NamedTensor>,
    pub format_version: u32,
}

impl SavedSae {
    /// Reads a weights file written by [`trial_files`]; errors say what is missing or wrong.
    pub fn read(bytes: &[u8]) -> anyhow::Result<SavedSae> {
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| anyhow::anyhow!("not a safetensors file: {e}"))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let get = |key: &str| {
            meta.get(key).ok_or_else(|| {
                anyhow::anyhow!(
                    "no `{key}` in the file's metadata: not the weights of an msae trial (msae \
                     writes them with weights.safetensors)"
                )
            })
        };
        let format = get("format")?;
        anyhow::ensure!(format == FORMAT, "metadata format is {format:?}, not {FORMAT:?}");
        let version: u32 = get("format_version")?.parse().context("format_version")?;
        anyhow::ensure!(
            version <= FORMAT_VERSION,
            "written in format version {version} by a newer msae; this one reads up to \
             {FORMAT_VERSION}"
        );
        let config: TrialConfig =
            serde_json::from_str(get("config")?).context("the config in the metadata")?;
        let input_dim: usize = get("input_dim")?.parse().context("input_dim")?;
        let eval_layer_k: usize = get("eval_layer_k")?.parse().context("eval_layer_k")?;
        let stats: ScalingStats =
            serde_json::from_str(get("scaling")?).context("the scaling in the metadata")?;
        let scaler = stats.scaler(input_dim)?;
        let tensors = read_tensors(bytes)?;
        Ok(SavedSae { config, scaler, input_dim, eval_layer_k, tensors, format_version: version })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> Vec<NamedTensor> {
        vec![
            NamedTensor::new("encoder.weight", vec![3, 2], vec![1.0, -2.0, 3.5, 0.0, 1e-3, 7.0]),
            NamedTensor::new("decoder.bias", vec![2], vec![0.25, -0.5]),
        ]
    }

    #[test]
    fn the_file_is_standard_safetensors_and_the_same_bytes_every_time() {
        let meta = BTreeMap::from([("b".to_string(), "2".to_string()), ("a".into(), "1".into())]);
        let bytes = safetensors_bytes(&tensors(), &meta);
        let mut reversed = tensors();
        reversed.reverse();
        assert_eq!(bytes, safetensors_bytes(&reversed, &meta), "order of the input matters");
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + n) % 8, 0, "data is aligned");
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let enc = st.tensor("encoder.weight").unwrap();
        assert_eq!(enc.shape(), &[3, 2]);
        assert_eq!(&enc.data()[4..8], &(-2.0f32).to_le_bytes());
        let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(m.metadata().as_ref().unwrap()["b"], "2");
    }

    #[test]
    fn metadata_round_trips_with_config_scaling_and_k() {
        let cfg = TrialConfig { layer_k: 3, lr: 2.5e-3, ..Default::default() };
        let scaler = Scaler::Standardize { mean: vec![1.0, -2.0], inv_std: vec![0.5, 4.0] };
        let bytes = safetensors_bytes(&tensors(), &metadata(&cfg, &scaler, 2, 3));
        let saved = SavedSae::read(&bytes).unwrap();
        assert_eq!(saved.config, cfg);
        assert_eq!(saved.scaler, scaler);
        assert_eq!((saved.input_dim, saved.eval_layer_k, saved.format_version), (2, 3, 1));
        let mut want = tensors();
        want.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(saved.tensors, want);
        for s in [Scaler::Identity, Scaler::UnitNorm, Scaler::MaxAbs { scale: 0.125 }] {
            let bytes = safetensors_bytes(&tensors(), &metadata(&cfg, &s, 2, 3));
            assert_eq!(SavedSae::read(&bytes).unwrap().scaler, s);
        }
    }

    #[test]
    fn files_without_msae_metadata_or_from_a_newer_format_are_refused_by_name() {
        let plain = safetensors_bytes(&tensors(), &BTreeMap::new());
        let e = SavedSae::read(&plain).unwrap_err().to_string();
        assert!(e.contains("no `format`"), "{e}");
        let cfg = TrialConfig::default();
        let mut meta = metadata(&cfg, &Scaler::Identity, 2, 3);
        meta.insert("format_version".into(), "9".into());
        let e = SavedSae::read(&safetensors_bytes(&tensors(), &meta)).unwrap_err().to_string();
        assert!(e.contains("format version 9"), "{e}");
        let e = SavedSae::read(b"not a file at all").unwrap_err().to_string();
        assert!(e.contains("not a safetensors file"), "{e}");
        let mut meta = metadata(&cfg, &Scaler::Identity, 2, 3);
        meta.insert("scaling".into(), r#"{"kind":"standardize","mean":[0],"std":[1]}"#.into());
        let e = SavedSae::read(&safetensors_bytes(&tensors(), &meta)).unwrap_err().to_string();
        assert!(e.contains("input_dim 2"), "{e}");
    }
}
