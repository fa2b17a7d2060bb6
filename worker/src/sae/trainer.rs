//! The seam between the training loop and a model implementation.
//!
//! The loop in [`crate::train`] owns batching, input noise, evaluation, early stopping and
//! progress; a [`Trainer`] owns parameters and optimiser state. The candle model
//! ([`crate::sae::model`]) works for every configuration; the hand-written top-k fast path
//! ([`crate::sae::classic`]) serves the configurations it supports and is tested against it.

use std::path::Path;

/// Codes and reconstructions of a set of samples, in evaluation mode.
#[derive(Debug, Clone, PartialEq)]
pub struct Inference {
    /// Row-major (rows, N) codes after every sparsity stage.
    pub codes: Vec<f32>,
    /// Row-major (rows, dim) reconstructions.
    pub recon: Vec<f32>,
    /// Total loss (reconstruction MSE + weighted penalties) over these rows.
    pub loss: f64,
    /// Row-major (rows, num_stripes) router scores, before any stripe is selected; `None`
    /// outside routing mode.
    pub routing: Option<Vec<f32>>,
}

/// The training loss stopped being finite: the configuration diverges, and a retry of the same
/// trial (same seed, same data) would diverge again.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("training diverged: the loss became {value} at step {step}")]
pub struct Diverged {
    pub step: usize,
    pub value: f64,
}

/// One f32 weight tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl NamedTensor {
    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> Self {
        NamedTensor { name: name.into(), shape, data }
    }
}

/// The tensor `name` of `tensors`, checked to have `shape`; errors name what differs.
pub fn expect_tensor<'a>(
    tensors: &'a [NamedTensor],
    name: &str,
    shape: &[usize],
) -> anyhow::Result<&'a [f32]> {
    let t = tensors
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| anyhow::anyhow!("the weights have no tensor {name}"))?;
    anyhow::ensure!(
        t.shape == shape && t.data.len() == shape.iter().product::<usize>(),
        "tensor {name} has shape {:?}; this config needs {shape:?}",
        t.shape
    );
    Ok(&t.data)
}

/// A trainable SAE with its optimiser state.
pub trait Trainer {
    /// One optimisation step on `batch` (row-major, (b, dim)) at training step `step` (0-based).
    /// Returns the training loss of the batch.
    fn step(&mut self, batch: &[f32], step: usize) -> anyhow::Result<f64>;
    /// Evaluation-mode forward pass (no duty-cycle or dead-latent updates).
    fn infer(&self, x: &[f32]) -> anyhow::Result<Inference>;
    /// Decoder atoms in input space, row-major (N, dim): for a linear decoder its (normalised)
    /// rows; for a decoder with an intermediate layer, decode(e_i) - decode(0).
    fn atoms(&self) -> anyhow::Result<Vec<f32>>;
    /// The weights, by their safetensors names (the candle model's layout, whichever
    /// implementation trained them).
    fn tensors(&self) -> anyhow::Result<Vec<NamedTensor>>;
    /// The layer k evaluation uses: the k-curriculum's k at the last training step.
    fn eval_layer_k(&self) -> usize;
    /// Replaces the weights with `tensors` (every weight by name, with its shape) and sets the
    /// evaluation k, as of a trained model; the optimiser state is not restored.
    fn restore(&mut self, tensors: &[NamedTensor], eval_layer_k: usize) -> anyhow::Result<()>;
    /// Writes the weights as safetensors (no metadata).
    fn save(&self, path: &Path) -> anyhow::Result<()> {
        let bytes = crate::artifact::safetensors_bytes(&self.tensors()?, &Default::default());
        std::fs::write(path, bytes)
            .map_err(|e| anyhow::anyhow!("writing weights to {}: {e}", path.display()))
    }
    /// Sets the reconstruction's bias in input space (`decoder.bias` of the classic SAE,
    /// `output.bias` with an intermediate layer), before training (`decoder_bias_init`).
    fn set_output_bias(&mut self, bias: &[f32]) -> anyhow::Result<()>;
}
