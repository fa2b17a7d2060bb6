//! A hand-written training step for the classic one-layer SAE: top-k (exploiting its
//! sparsity) or dense.
//!
//! The candle model ([`crate::sae::model`]) trains every configuration through autograd; for the
//! most common ones (one layer, ordinary top-k or no layer sparsity, ReLU, Adam/AdamW, no
//! penalties) this module does the same arithmetic by hand, several times faster on CPU.
//!
//! Top-k (`layer_sparsity_mode: ordinary`):
//!
//! - only the encoder forward `pre = (x - b_dec) W_enc^T + b_enc` is a dense GEMM (the `gemm`
//!   crate, AVX-512 when the CPU has it);
//! - top-k per row is a thresholded scan (candidates above the running k-th best, pruned with
//!   `select_nth_unstable` when they reach 4k; O(N) per row, rows in parallel), keeping exactly
//!   k entries: larger value first, ties to the lower index;
//! - the decoder forward and every gradient touch only the B*k kept latents, as OpenAI's and
//!   EleutherAI's top-k kernels do: the kept entries are grouped by latent (a CSC index), so each
//!   latent's encoder row, decoder atom and bias get their gradient in one parallel pass;
//! - that same pass applies Adam/AdamW in place (fused: gradients are never stored), and
//!   refreshes the atom's norm for the next step's normalised decoder.
//!
//! Dense (`layer_sparsity_mode: none`): `z = relu(pre)` over all latents, and every product is
//! a dense GEMM through `gemm` with its rayon parallelism, five per step (forward: encoder and
//! decoder; backward: dL/dpre = dL/dx_hat W_dec^T, dL/dW_enc = dpre^T (x - b_dec),
//! dL/dU = z^T dL/dx_hat; PyTorch's sixth, the gradient w.r.t. the encoder input, is only
//! needed summed over the batch for b_dec, a matrix-vector product). The gradients land in
//! reused [n, dim] buffers and the same fused Adam/AdamW pass updates each latent's row,
//! atom, bias and norm. The ReLU's gradient at exactly 0 is 0 (PyTorch's convention; candle
//! lets it through, a difference only on a measure-zero set).
//!
//! Semantics (identical to the candle model; tested against candle autograd below):
//! `z = topk_k(relu(W_enc (x - b_dec) + b_enc))` (dense: no `topk_k`), atoms
//! `u_j = d_j / ||d_j||` when `normalize_decoder` (`d_j / sqrt(|d_j|^2 + 1e-8)`, gradient
//! through the normalisation), `x_hat = z U^T + b_dec`,
//! loss = mean over all elements of `(x - x_hat)^2`. Weight decay applies to every parameter
//! (biases too), as in candle-nn and PyTorch: decoupled for AdamW, added to the gradient for Adam.
//!
//! Initialisation, deterministic from `cfg.seed` (StdRng): OpenAI's (the encoder uniform in
//! ±1/sqrt(dim), the atoms its rows at unit norm); both biases start at 0 (b_dec is not set to the
//! data mean, so the step is a pure function of the config and the batches). This is
//! [`crate::sae::model::initial_weights`] value for value (tested), so both paths start equal.
//! Evaluation keeps the k of the last training step (the curriculum's current k), as the candle
//! model does; the dense SAE has no k.
//!
//! Weights are saved in the candle model's layout: `encoder.weight` [N, dim], `encoder.bias` [N],
//! `decoder.weight` [dim, N] (columns are atoms, unnormalised), `decoder.bias` [dim].

use std::path::Path;

use msae_shared::config::{
    Activation, LayerSparsityMode, Optimizer, StripeSparsityMode, TrialConfig,
};
use rayon::prelude::*;

use crate::sae::kernels;
use crate::sae::linalg::transpose;
use crate::sae::optim::{OptimConfig, StepScalars};
use crate::sae::trainer::{Inference, NamedTensor, Trainer, expect_tensor};

mod dense;
mod sparse;

use dense::{backward_dense, forward_dense};
use sparse::{backward_shared, dec_row_grad, enc_row_grad, forward, project_dec_grad};

/// Guards the atom normalisation against zero-norm atoms (the candle model's value).
const NORM_EPS: f32 = 1e-8;

/// Why the fast path refused a configuration, a batch or a weights file.
#[derive(Debug, thiserror::Error)]
pub enum FastError {
    /// The configuration needs the general candle model.
    #[error("the fast path does not support this config: {0}")]
    NotEligible(String),
    /// A batch whose length is not a multiple of the input dimension, or an empty one.
    #[error("batch of {len} values is not a whole number of rows of dim {dim}")]
    BadBatch { len: usize, dim: usize },
    /// A weights file that cannot be read or does not fit the model.
    #[error("weights file {path}: {message}")]
    Weights { path: String, message: String },
}

/// Why `cfg` cannot use the fast path, or `None` when it can.
pub fn ineligibility(cfg: &TrialConfig) -> Option<String> {
    let dense = cfg.layer_sparsity_mode == LayerSparsityMode::None;
    let checks: [(bool, &str); 14] = [
        (cfg.intermediate_dim == 0, "intermediate_dim must be 0"),
        (
            dense || cfg.layer_sparsity_mode == LayerSparsityMode::Ordinary,
            "layer_sparsity_mode must be ordinary or none",
        ),
        (cfg.stripe_sparsity_mode == StripeSparsityMode::None, "stripe_sparsity_mode must be none"),
        (cfg.active_stripes_per_batch == 1.0, "active_stripes_per_batch must be 1"),
        (cfg.activation == Activation::Relu, "activation must be relu"),
        (!cfg.tied_weights, "tied_weights must be false"),
        (!cfg.output_relu, "output_relu must be false"),
        (cfg.l1_weight == 0.0, "l1_weight must be 0"),
        (cfg.kl_weight == 0.0, "kl_weight must be 0"),
        (cfg.hoyer_weight == 0.0, "hoyer_weight must be 0"),
        (cfg.aux_k == 0, "aux_k must be 0"),
        (cfg.resample_dead_every == 0, "resample_dead_every must be 0"),
        (
            matches!(cfg.optimizer, Optimizer::Adam | Optimizer::Adamw),
            "optimizer must be adam or adamw",
        ),
        // The dense SAE keeps every latent: k plays no part.
        (
            dense || (cfg.layer_k >= 1 && cfg.layer_k <= cfg.code_dim()),
            "layer_k must be in 1..=code size",
        ),
    ];
    checks.iter().find(|(ok, _)| !ok).map(|(_, why)| (*why).to_string())
}

/// Whether `cfg` is the classic one-layer top-k (or dense) SAE this module trains.
pub fn eligible(cfg: &TrialConfig) -> bool {
    ineligibility(cfg).is_none()
}

/// The trainable parameters, atoms stored as rows for contiguous access.
#[derive(Debug, Clone, PartialEq)]
struct Params {
    /// [n, dim]
    w_enc: Vec<f32>,
    /// [n]
    b_enc: Vec<f32>,
    /// [n, dim]: row j is decoder atom j (raw, before normalisation).
    w_dec: Vec<f32>,
    /// [dim]
    b_dec: Vec<f32>,
    /// [n]: 1/||w_dec row|| when normalising, else 1. Derived, kept in sync with `w_dec`.
    inv_norm: Vec<f32>,
}

/// Adam moments, one pair per parameter tensor.
#[derive(Debug, Clone, Default)]
struct Moments {
    m_enc: Vec<f32>,
    v_enc: Vec<f32>,
    m_dec: Vec<f32>,
    v_dec: Vec<f32>,
    m_benc: Vec<f32>,
    v_benc: Vec<f32>,
    m_bdec: Vec<f32>,
    v_bdec: Vec<f32>,
    /// Number of updates applied so far.
    t: u64,
}

/// Buffers reused across steps (resized, never shrunk, so steady-state steps do not allocate).
#[derive(Debug, Clone, Default)]
struct Workspace {
    rows: usize,
    k: usize,
    /// [rows, dim]: x - b_dec.
    xc: Vec<f32>,
    /// [rows, n]: pre-activations.
    pre: Vec<f32>,
    /// [rows, k]: kept latents per row, ascending.
    idx: Vec<u32>,
    /// [rows, k]: their activations relu(pre).
    val: Vec<f32>,
    /// [rows, dim]: reconstruction, then dL/dx_hat in training.
    g: Vec<f32>,
    /// [rows, k]: dL/dpre at the kept entries (0 where relu is inactive).
    dz: Vec<f32>,
    /// [rows]: squared error per row.
    row_sse: Vec<f32>,
    /// [n + 1]: CSC offsets into `entries`, grouped by latent.
    starts: Vec<u32>,
    /// [n]: fill cursor for the CSC build.
    cursor: Vec<u32>,
    /// Flat positions (row * k + t) of active kept entries, grouped by latent, ascending.
    entries: Vec<u32>,
    /// [n]: dL/db_enc.
    db_enc: Vec<f32>,
    /// [dim]: dL/db_dec.
    db_dec: Vec<f32>,
    /// Dense mode, [rows, n]: z * inv_norm (the decoder's input), then dL/dpre.
    zs: Vec<f32>,
    /// Dense mode, [n, dim]: dL/dW_enc.
    gw_enc: Vec<f32>,
    /// Dense mode, [n, dim]: dL/du (gradient w.r.t. the normalised atoms; projected in place
    /// to the raw atoms' gradient by the update).
    gw_dec: Vec<f32>,
}

impl Workspace {
    fn resize(&mut self, rows: usize, k: usize, dim: usize, n: usize) {
        self.rows = rows;
        self.k = k;
        self.xc.resize(rows * dim, 0.0);
        self.pre.resize(rows * n, 0.0);
        self.idx.resize(rows * k, 0);
        self.val.resize(rows * k, 0.0);
        self.g.resize(rows * dim, 0.0);
        self.dz.resize(rows * k, 0.0);
        self.row_sse.resize(rows, 0.0);
        self.starts.resize(n + 1, 0);
        self.cursor.resize(n, 0);
        self.db_enc.resize(n, 0.0);
        self.db_dec.resize(dim, 0.0);
    }

    /// Buffers of the dense mode: `pre` holds z = relu(pre), `g` the reconstruction then
    /// dL/dx_hat, plus `zs` and the two weight gradients; the top-k buffers stay empty.
    fn resize_dense(&mut self, rows: usize, dim: usize, n: usize, train: bool) {
        self.rows = rows;
        self.k = n;
        self.xc.resize(rows * dim, 0.0);
        self.pre.resize(rows * n, 0.0);
        self.zs.resize(rows * n, 0.0);
        self.g.resize(rows * dim, 0.0);
        self.row_sse.resize(rows, 0.0);
        if train {
            self.db_enc.resize(n, 0.0);
            self.db_dec.resize(dim, 0.0);
            self.gw_enc.resize(n * dim, 0.0);
            self.gw_dec.resize(n * dim, 0.0);
        }
    }
}

/// Dense gradients of the loss, for tests and diagnostics (top-k training never materialises
/// them; dense training keeps the weight gradients in its workspace).
#[derive(Debug, Clone)]
pub struct Gradients {
    /// Batch loss (mean squared error).
    pub loss: f64,
    /// [n, dim]
    pub w_enc: Vec<f32>,
    /// [n]
    pub b_enc: Vec<f32>,
    /// [n, dim]: row j is the gradient of decoder atom j (column j of `decoder.weight`).
    pub w_dec: Vec<f32>,
    /// [dim]
    pub b_dec: Vec<f32>,
}

/// The SAE fast path (top-k, or dense with `layer_sparsity_mode: none`): parameters, Adam
/// state and reusable buffers.
#[derive(Debug, Clone)]
pub struct FastTopK {
    cfg: TrialConfig,
    dim: usize,
    n: usize,
    normalize: bool,
    /// `layer_sparsity_mode: none`: z = relu(pre) over all latents, every product a dense GEMM.
    dense: bool,
    p: Params,
    opt: Moments,
    ws: Workspace,
    /// Layer k of the last training step: what [`Trainer::infer`] keeps (as the candle model).
    current_k: usize,
}

impl FastTopK {
    /// A freshly initialised model for `cfg` on inputs of dimension `dim`.
    /// Fails when `cfg` is not [`eligible`] or `dim` is 0.
    pub fn new(cfg: &TrialConfig, dim: usize) -> anyhow::Result<Self> {
        if let Some(why) = ineligibility(cfg) {
            return Err(FastError::NotEligible(why).into());
        }
        if dim == 0 {
            return Err(FastError::NotEligible("input dimension is 0".into()).into());
        }
        let n = cfg.code_dim();
        // The one initialisation of the model (the candle model's); the decoder's columns
        // become this path's atom rows.
        let mut init = crate::sae::model::initial_weights(cfg, dim);
        let mut take = |name: &str| {
            init.iter_mut()
                .find(|(n, _, _)| n == name)
                .map(|(_, _, w)| std::mem::take(w))
                .ok_or_else(|| anyhow::anyhow!("the initial weights lack {name}"))
        };
        let w_enc = take("encoder.weight")?;
        let w_dec = transpose(&take("decoder.weight")?, dim, n);
        let mut p = Params {
            w_enc,
            b_enc: vec![0.0; n],
            w_dec,
            b_dec: vec![0.0; dim],
            inv_norm: vec![1.0; n],
        };
        let normalize = cfg.normalize_decoder;
        refresh_norms(&mut p, dim, normalize);
        let opt = Moments {
            m_enc: vec![0.0; n * dim],
            v_enc: vec![0.0; n * dim],
            m_dec: vec![0.0; n * dim],
            v_dec: vec![0.0; n * dim],
            m_benc: vec![0.0; n],
            v_benc: vec![0.0; n],
            m_bdec: vec![0.0; dim],
            v_bdec: vec![0.0; dim],
            t: 0,
        };
        Ok(FastTopK {
            cfg: cfg.clone(),
            dim,
            n,
            normalize,
            dense: cfg.layer_sparsity_mode == LayerSparsityMode::None,
            p,
            opt,
            ws: Workspace::default(),
            current_k: cfg.layer_k_at(0).clamp(1, n),
        })
    }

    /// Input dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of latents N.
    pub fn latents(&self) -> usize {
        self.n
    }

    /// Whether this is the dense SAE (`layer_sparsity_mode: none`) rather than top-k.
    pub fn is_dense(&self) -> bool {
        self.dense
    }

    /// Replace the weights with those of a safetensors file written by [`Trainer::save`] (or
    /// the candle model). The optimiser state is reset; the evaluation k is kept.
    pub fn load(&mut self, path: &Path) -> anyhow::Result<()> {
        let werr =
            |message: String| FastError::Weights { path: path.display().to_string(), message };
        let bytes = std::fs::read(path).map_err(|e| werr(e.to_string()))?;
        let tensors = crate::artifact::read_tensors(&bytes).map_err(|e| werr(format!("{e:#}")))?;
        let k = self.current_k;
        self.restore(&tensors, k).map_err(|e| werr(format!("{e:#}")).into())
    }

    /// Dense gradients of the loss on `batch` with `k` kept latents per row (ignored by the
    /// dense SAE), computed by the same kernels as [`Trainer::step`], without updating anything.
    pub fn gradients(&mut self, batch: &[f32], k: usize) -> anyhow::Result<Gradients> {
        let rows = self.rows_of(batch)?;
        let (dim, n) = (self.dim, self.n);
        if self.dense {
            let sse = forward_dense(&self.p, dim, n, batch, rows, &mut self.ws, true);
            backward_dense(&self.p, dim, n, &mut self.ws);
            let mut w_dec = self.ws.gw_dec[..n * dim].to_vec();
            for (j, row) in w_dec.chunks_mut(dim).enumerate() {
                let w = &self.p.w_dec[j * dim..(j + 1) * dim];
                project_dec_grad(w, self.p.inv_norm[j], self.normalize, row);
            }
            return Ok(Gradients {
                loss: sse / (rows * dim) as f64,
                w_enc: self.ws.gw_enc[..n * dim].to_vec(),
                b_enc: self.ws.db_enc.clone(),
                w_dec,
                b_dec: self.ws.db_dec.clone(),
            });
        }
        let sse = forward(&self.p, dim, n, batch, rows, k, &mut self.ws, true);
        backward_shared(&self.p, dim, n, &mut self.ws);
        let ws = &self.ws;
        let mut w_enc = vec![0f32; n * dim];
        let mut w_dec = vec![0f32; n * dim];
        for j in 0..n {
            let list = &ws.entries[ws.starts[j] as usize..ws.starts[j + 1] as usize];
            enc_row_grad(list, k, &ws.dz, &ws.xc, dim, &mut w_enc[j * dim..(j + 1) * dim]);
            dec_row_grad(
                list,
                k,
                &ws.val,
                &ws.g,
                dim,
                &self.p.w_dec[j * dim..(j + 1) * dim],
                self.p.inv_norm[j],
                self.normalize,
                &mut w_dec[j * dim..(j + 1) * dim],
            );
        }
        Ok(Gradients {
            loss: sse / (rows * dim) as f64,
            w_enc,
            b_enc: ws.db_enc.clone(),
            w_dec,
            b_dec: ws.db_dec.clone(),
        })
    }

    fn rows_of(&self, batch: &[f32]) -> Result<usize, FastError> {
        if batch.is_empty() || !batch.len().is_multiple_of(self.dim) {
            return Err(FastError::BadBatch { len: batch.len(), dim: self.dim });
        }
        Ok(batch.len() / self.dim)
    }

    /// One fused backward + Adam update over the workspace of the last forward pass: each
    /// latent's encoder row and decoder atom gradients are built in a scratch row and applied
    /// at once (never stored whole).
    fn update(&mut self) {
        let (dim, k, normalize) = (self.dim, self.ws.k, self.normalize);
        let ws = &self.ws;
        start_update(&mut self.p, &mut self.opt, &self.cfg, dim, &ws.db_dec).for_each_init(
            || vec![0f32; dim],
            |grad, (j, (mut l, adam))| {
                let list = &ws.entries[ws.starts[j] as usize..ws.starts[j + 1] as usize];
                enc_row_grad(list, k, &ws.dz, &ws.xc, dim, grad);
                adam.apply(l.we, grad, l.me, l.ve);
                dec_row_grad(list, k, &ws.val, &ws.g, dim, l.wd, *l.inv, normalize, grad);
                l.finish(&adam, grad, ws.db_enc[j], normalize);
            },
        );
    }

    /// The dense mode's Adam update, over the gradients of [`backward_dense`]: per latent (in
    /// parallel) the encoder row, the decoder atom (its gradient projected through the
    /// normalisation first) and the encoder bias, then the atom's norm is refreshed.
    fn update_dense(&mut self) {
        let (dim, normalize) = (self.dim, self.normalize);
        let ws = &mut self.ws;
        let (db_dec, db_enc, gw_enc, gw_dec) = (&ws.db_dec, &ws.db_enc, &ws.gw_enc, &mut ws.gw_dec);
        let latents = start_update(&mut self.p, &mut self.opt, &self.cfg, dim, db_dec);
        latents.zip(gw_enc.par_chunks(dim).zip(gw_dec.par_chunks_mut(dim))).for_each(
            |((j, (mut l, adam)), (ge, gd))| {
                adam.apply(l.we, ge, l.me, l.ve);
                project_dec_grad(l.wd, *l.inv, normalize, gd);
                l.finish(&adam, gd, db_enc[j], normalize);
            },
        );
    }
}

/// Starts an update: counts it, applies the decoder bias (its gradient already used the
/// old encoder weights), and yields every latent's parameters and moments, in parallel.
fn start_update<'a>(
    p: &'a mut Params,
    o: &'a mut Moments,
    cfg: &TrialConfig,
    dim: usize,
    db_dec: &[f32],
) -> impl IndexedParallelIterator<Item = (usize, (Latent<'a>, StepScalars))> {
    o.t += 1;
    let adam = StepScalars::new(&OptimConfig::from_config(cfg), o.t as usize);
    adam.apply(&mut p.b_dec, db_dec, &mut o.m_bdec, &mut o.v_bdec);
    let rows = (
        p.w_enc.par_chunks_mut(dim),
        o.m_enc.par_chunks_mut(dim),
        o.v_enc.par_chunks_mut(dim),
        p.w_dec.par_chunks_mut(dim),
        o.m_dec.par_chunks_mut(dim),
        o.v_dec.par_chunks_mut(dim),
        p.b_enc.par_iter_mut(),
        o.m_benc.par_iter_mut(),
        o.v_benc.par_iter_mut(),
        p.inv_norm.par_iter_mut(),
    );
    rows.into_par_iter()
        .map(move |(we, me, ve, wd, md, vd, be, mbe, vbe, inv)| {
            (Latent { we, me, ve, wd, md, vd, be, mbe, vbe, inv }, adam)
        })
        .enumerate()
        .with_min_len(32)
}

/// One latent's parameters and Adam moments during an update.
struct Latent<'a> {
    we: &'a mut [f32],
    me: &'a mut [f32],
    ve: &'a mut [f32],
    wd: &'a mut [f32],
    md: &'a mut [f32],
    vd: &'a mut [f32],
    be: &'a mut f32,
    mbe: &'a mut f32,
    vbe: &'a mut f32,
    inv: &'a mut f32,
}

impl Latent<'_> {
    /// The decoder atom (gradient `gd`, already w.r.t. the raw atom) and the encoder bias, then
    /// the atom's norm for the next forward pass.
    fn finish(&mut self, adam: &StepScalars, gd: &[f32], db_enc: f32, normalize: bool) {
        adam.apply(self.wd, gd, self.md, self.vd);
        adam.apply(
            std::slice::from_mut(self.be),
            &[db_enc],
            std::slice::from_mut(self.mbe),
            std::slice::from_mut(self.vbe),
        );
        if normalize {
            *self.inv = inv_norm(self.wd);
        }
    }
}

impl Trainer for FastTopK {
    fn step(&mut self, batch: &[f32], step: usize) -> anyhow::Result<f64> {
        let rows = self.rows_of(batch)?;
        let k = self.cfg.layer_k_at(step).clamp(1, self.n);
        self.current_k = k;
        if self.dense {
            let sse = forward_dense(&self.p, self.dim, self.n, batch, rows, &mut self.ws, true);
            backward_dense(&self.p, self.dim, self.n, &mut self.ws);
            self.update_dense();
            return Ok(sse / (rows * self.dim) as f64);
        }
        let sse = forward(&self.p, self.dim, self.n, batch, rows, k, &mut self.ws, true);
        backward_shared(&self.p, self.dim, self.n, &mut self.ws);
        self.update();
        Ok(sse / (rows * self.dim) as f64)
    }

    fn infer(&self, x: &[f32]) -> anyhow::Result<Inference> {
        let rows = self.rows_of(x)?;
        let (dim, n, k) = (self.dim, self.n, self.current_k);
        let mut ws = Workspace::default();
        if self.dense {
            let sse = forward_dense(&self.p, dim, n, x, rows, &mut ws, false);
            // `pre` holds the codes z = relu(pre).
            ws.pre.truncate(rows * n);
            ws.g.truncate(rows * dim);
            let loss = sse / (rows * dim) as f64;
            return Ok(Inference { codes: ws.pre, recon: ws.g, loss, routing: None });
        }
        let sse = forward(&self.p, dim, n, x, rows, k, &mut ws, false);
        let mut codes = vec![0f32; rows * n];
        codes.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
            for t in 0..k {
                row[ws.idx[r * k + t] as usize] = ws.val[r * k + t];
            }
        });
        ws.g.truncate(rows * dim);
        // Classic SAEs have no router: `eligible` refuses every stripe sparsity mode.
        Ok(Inference { codes, recon: ws.g, loss: sse / (rows * dim) as f64, routing: None })
    }

    fn atoms(&self) -> anyhow::Result<Vec<f32>> {
        let dim = self.dim;
        let mut out = self.p.w_dec.clone();
        out.chunks_mut(dim)
            .zip(&self.p.inv_norm)
            .for_each(|(row, &s)| row.iter_mut().for_each(|v| *v *= s));
        Ok(out)
    }

    fn set_output_bias(&mut self, bias: &[f32]) -> anyhow::Result<()> {
        anyhow::ensure!(
            bias.len() == self.p.b_dec.len(),
            "output bias of {} values for dim {}",
            bias.len(),
            self.p.b_dec.len()
        );
        self.p.b_dec.copy_from_slice(bias);
        Ok(())
    }

    fn tensors(&self) -> anyhow::Result<Vec<NamedTensor>> {
        let (n, dim) = (self.n, self.dim);
        Ok(vec![
            NamedTensor::new("encoder.weight", vec![n, dim], self.p.w_enc.clone()),
            NamedTensor::new("encoder.bias", vec![n], self.p.b_enc.clone()),
            NamedTensor::new("decoder.weight", vec![dim, n], transpose(&self.p.w_dec, n, dim)),
            NamedTensor::new("decoder.bias", vec![dim], self.p.b_dec.clone()),
        ])
    }

    fn eval_layer_k(&self) -> usize {
        self.current_k
    }

    fn restore(&mut self, tensors: &[NamedTensor], eval_layer_k: usize) -> anyhow::Result<()> {
        let (n, dim) = (self.n, self.dim);
        let w_enc = expect_tensor(tensors, "encoder.weight", &[n, dim])?.to_vec();
        let b_enc = expect_tensor(tensors, "encoder.bias", &[n])?.to_vec();
        let dec_t = expect_tensor(tensors, "decoder.weight", &[dim, n])?;
        let b_dec = expect_tensor(tensors, "decoder.bias", &[dim])?.to_vec();
        self.p.w_dec = transpose(dec_t, dim, n);
        self.p.w_enc = w_enc;
        self.p.b_enc = b_enc;
        self.p.b_dec = b_dec;
        refresh_norms(&mut self.p, dim, self.normalize);
        self.opt = FastTopK::new(&self.cfg, dim)?.opt;
        self.current_k = eval_layer_k.clamp(1, n);
        Ok(())
    }
}

/// 1 / sqrt(|w|^2 + NORM_EPS): the candle model's guarded normalisation, so that both paths
/// compute the same atoms and gradients.
fn inv_norm(w: &[f32]) -> f32 {
    1.0 / (kernels::dot(w, w) + NORM_EPS).sqrt()
}

fn refresh_norms(p: &mut Params, dim: usize, normalize: bool) {
    for (row, inv) in p.w_dec.chunks(dim).zip(p.inv_norm.iter_mut()) {
        *inv = if normalize { inv_norm(row) } else { 1.0 };
    }
}

#[cfg(test)]
mod tests;
