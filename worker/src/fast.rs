//! A hand-written training step for the classic one-layer SAE: top-k (exploiting its
//! sparsity) or dense.
//!
//! The candle model ([`crate::model`]) trains every configuration through autograd; for the
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
//! Initialisation, deterministic from `cfg.seed` (StdRng): encoder rows and decoder atoms are the
//! same random unit directions (transpose init); both biases start at 0 (b_dec is not set to the
//! data mean, so the step is a pure function of the config and the batches). This is
//! [`crate::model::initial_weights`] value for value (tested), so both paths start equal.
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

use crate::linalg::{Mat, matmul};
use crate::trainer::{Inference, Trainer};

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
        // The one initialisation of the model (the candle model's): encoder rows are the unit
        // atoms, which are also the decoder's rows here.
        let w_dec = crate::model::initial_weights(cfg, dim)
            .into_iter()
            .find(|(name, _, _)| name == "encoder.weight")
            .map(|(_, _, w)| w)
            .ok_or_else(|| anyhow::anyhow!("the initial weights lack encoder.weight"))?;
        let w_enc = w_dec.clone();
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
    /// the candle model). The optimiser state is reset.
    pub fn load(&mut self, path: &Path) -> anyhow::Result<()> {
        let werr =
            |message: String| FastError::Weights { path: path.display().to_string(), message };
        let bytes = std::fs::read(path).map_err(|e| werr(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| werr(e.to_string()))?;
        let (n, dim) = (self.n, self.dim);
        let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>, FastError> {
            let t = st.tensor(name).map_err(|e| werr(format!("tensor {name}: {e}")))?;
            if t.dtype() != safetensors::Dtype::F32 || t.shape() != shape {
                return Err(werr(format!(
                    "tensor {name} is {:?} {:?}, expected F32 {shape:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            Ok(t.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let w_enc = read("encoder.weight", &[n, dim])?;
        let b_enc = read("encoder.bias", &[n])?;
        let dec_t = read("decoder.weight", &[dim, n])?;
        let b_dec = read("decoder.bias", &[dim])?;
        self.p.w_enc = w_enc;
        self.p.b_enc = b_enc;
        self.p.w_dec = transpose(&dec_t, dim, n);
        self.p.b_dec = b_dec;
        refresh_norms(&mut self.p, dim, self.normalize);
        let fresh = FastTopK::new(&self.cfg, dim)?;
        self.opt = fresh.opt;
        Ok(())
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

    /// One fused backward + Adam update over the workspace of the last forward pass.
    fn update(&mut self) {
        let (dim, k, normalize) = (self.dim, self.ws.k, self.normalize);
        self.opt.t += 1;
        let adam = AdamStep::new(&self.cfg, self.opt.t);
        let ws = &self.ws;
        let p = &mut self.p;
        let o = &mut self.opt;
        // The decoder bias first: its gradient already used the old encoder weights.
        adam.update(&mut p.b_dec, &mut o.m_bdec, &mut o.v_bdec, &ws.db_dec);
        (
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
        )
            .into_par_iter()
            .enumerate()
            .with_min_len(32)
            .for_each_init(
                || vec![0f32; dim],
                |grad, (j, (we, me, ve, wd, md, vd, be, mbe, vbe, inv))| {
                    let list = &ws.entries[ws.starts[j] as usize..ws.starts[j + 1] as usize];
                    enc_row_grad(list, k, &ws.dz, &ws.xc, dim, grad);
                    adam.update(we, me, ve, grad);
                    dec_row_grad(list, k, &ws.val, &ws.g, dim, wd, *inv, normalize, grad);
                    adam.update(wd, md, vd, grad);
                    adam.update(
                        std::slice::from_mut(be),
                        std::slice::from_mut(mbe),
                        std::slice::from_mut(vbe),
                        &[ws.db_enc[j]],
                    );
                    if normalize {
                        *inv = inv_norm(wd);
                    }
                },
            );
    }

    /// The dense mode's Adam update, over the gradients of [`backward_dense`]: per latent (in
    /// parallel) the encoder row, the decoder atom (its gradient projected through the
    /// normalisation first) and the encoder bias, then the atom's norm is refreshed.
    fn update_dense(&mut self) {
        let (dim, normalize) = (self.dim, self.normalize);
        self.opt.t += 1;
        let adam = AdamStep::new(&self.cfg, self.opt.t);
        let ws = &mut self.ws;
        let p = &mut self.p;
        let o = &mut self.opt;
        adam.update(&mut p.b_dec, &mut o.m_bdec, &mut o.v_bdec, &ws.db_dec);
        let db_enc = &ws.db_enc;
        (
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
            ws.gw_enc.par_chunks(dim),
            ws.gw_dec.par_chunks_mut(dim),
        )
            .into_par_iter()
            .enumerate()
            .with_min_len(32)
            .for_each(|(j, (we, me, ve, wd, md, vd, be, mbe, vbe, inv, ge, gd))| {
                adam.update(we, me, ve, ge);
                project_dec_grad(wd, *inv, normalize, gd);
                adam.update(wd, md, vd, gd);
                adam.update(
                    std::slice::from_mut(be),
                    std::slice::from_mut(mbe),
                    std::slice::from_mut(vbe),
                    &[db_enc[j]],
                );
                if normalize {
                    *inv = inv_norm(wd);
                }
            });
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
            return Ok(Inference { codes: ws.pre, recon: ws.g, loss: sse / (rows * dim) as f64 });
        }
        let sse = forward(&self.p, dim, n, x, rows, k, &mut ws, false);
        let mut codes = vec![0f32; rows * n];
        codes.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
            for t in 0..k {
                row[ws.idx[r * k + t] as usize] = ws.val[r * k + t];
            }
        });
        ws.g.truncate(rows * dim);
        Ok(Inference { codes, recon: ws.g, loss: sse / (rows * dim) as f64 })
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

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        let (n, dim) = (self.n, self.dim);
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let tensors = [
            ("encoder.weight", vec![n, dim], bytes(&self.p.w_enc)),
            ("encoder.bias", vec![n], bytes(&self.p.b_enc)),
            ("decoder.weight", vec![dim, n], bytes(&transpose(&self.p.w_dec, n, dim))),
            ("decoder.bias", vec![dim], bytes(&self.p.b_dec)),
        ];
        let werr =
            |message: String| FastError::Weights { path: path.display().to_string(), message };
        let mut views = Vec::new();
        for (name, shape, data) in &tensors {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .map_err(|e| werr(format!("tensor {name}: {e}")))?;
            views.push((*name, view));
        }
        safetensors::serialize_to_file(views, None, path).map_err(|e| werr(e.to_string()))?;
        Ok(())
    }
}

/// Row-major [r, c] -> [c, r].
fn transpose(a: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0f32; r * c];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = a[i * c + j];
        }
    }
    out
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

/// Forward pass over `rows` rows of `x`: fills `xc`, `pre`, `idx`, `val` and the reconstruction
/// in `g`; with `train`, turns `g` into dL/dx_hat and fills `dz`. Returns the sum of squared errors.
#[allow(clippy::too_many_arguments)]
fn forward(
    p: &Params,
    dim: usize,
    n: usize,
    x: &[f32],
    rows: usize,
    k: usize,
    ws: &mut Workspace,
    train: bool,
) -> f64 {
    ws.resize(rows, k, dim, n);
    let b_dec = &p.b_dec;
    ws.xc.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(c, xr)| {
        c.iter_mut().zip(xr).zip(b_dec).for_each(|((c, &xv), &b)| *c = xv - b);
    });
    // pre[rows, n] = xc[rows, dim] * W_enc^T; W_enc^T(kk, j) = w_enc[j * dim + kk].
    // SAFETY: every pointer covers the strided extent gemm reads or writes (rows*dim, n*dim,
    // rows*n elements), and dst does not alias the inputs.
    unsafe {
        gemm::gemm(
            rows,
            n,
            dim,
            ws.pre.as_mut_ptr(),
            1,
            n as isize,
            false,
            ws.xc.as_ptr(),
            1,
            dim as isize,
            p.w_enc.as_ptr(),
            dim as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
    let scale = 2.0 / (rows * dim) as f32;
    (ws.pre.par_chunks_mut(n), ws.idx.par_chunks_mut(k), ws.val.par_chunks_mut(k))
        .into_par_iter()
        .with_min_len(4)
        .for_each_init(Vec::new, |cand, (pre, idx, val)| {
            kernels::add(pre, &p.b_enc);
            topk_row(pre, idx, val, cand);
        });
    // Then, per row: decode the k kept latents, the error, and dL/dz at the kept entries.
    (
        ws.idx.par_chunks(k),
        ws.val.par_chunks(k),
        ws.g.par_chunks_mut(dim),
        ws.dz.par_chunks_mut(k),
        ws.row_sse.par_iter_mut(),
        x.par_chunks(dim),
    )
        .into_par_iter()
        .with_min_len(4)
        .for_each(|(idx, val, g, dz, sse, xr)| {
            g.copy_from_slice(b_dec);
            for (&j, &v) in idx.iter().zip(val.iter()) {
                if v > 0.0 {
                    let j = j as usize;
                    kernels::axpy(v * p.inv_norm[j], &p.w_dec[j * dim..(j + 1) * dim], g);
                }
            }
            if train {
                g.iter_mut().zip(xr).for_each(|(g, &xv)| *g -= xv);
                *sse = kernels::dot(g, g);
                g.iter_mut().for_each(|g| *g *= scale);
                for ((d, &j), &v) in dz.iter_mut().zip(idx.iter()).zip(val.iter()) {
                    let j = j as usize;
                    *d = if v > 0.0 {
                        kernels::dot(g, &p.w_dec[j * dim..(j + 1) * dim]) * p.inv_norm[j]
                    } else {
                        0.0
                    };
                }
            } else {
                *sse = g.iter().zip(xr).map(|(&a, &b)| (a - b) * (a - b)).sum();
            }
        });
    ws.row_sse.iter().map(|&s| s as f64).sum()
}

/// After a training forward pass: group active entries by latent (CSC), and compute the bias
/// gradients, which need all rows (dL/db_dec = sum_b g_b - W_enc^T dL/db_enc).
fn backward_shared(p: &Params, dim: usize, n: usize, ws: &mut Workspace) {
    let total = ws.rows * ws.k;
    ws.starts.iter_mut().for_each(|s| *s = 0);
    for (&j, &v) in ws.idx[..total].iter().zip(&ws.val[..total]) {
        if v > 0.0 {
            ws.starts[j as usize + 1] += 1;
        }
    }
    for j in 0..n {
        ws.starts[j + 1] += ws.starts[j];
    }
    ws.cursor.copy_from_slice(&ws.starts[..n]);
    ws.entries.resize(ws.starts[n] as usize, 0);
    for (pos, (&j, &v)) in ws.idx[..total].iter().zip(&ws.val[..total]).enumerate() {
        if v > 0.0 {
            let c = &mut ws.cursor[j as usize];
            ws.entries[*c as usize] = pos as u32;
            *c += 1;
        }
    }
    for j in 0..n {
        let list = &ws.entries[ws.starts[j] as usize..ws.starts[j + 1] as usize];
        ws.db_enc[j] = list.iter().map(|&pos| ws.dz[pos as usize]).sum();
    }
    dec_bias_grad(&ws.g, &ws.db_enc, &p.w_enc, dim, &mut ws.db_dec);
}

/// dL/db_dec = sum_b g_b - W_enc^T dL/db_enc (b_dec enters x_hat directly and the encoder
/// input as -b_dec), from dL/dx_hat `g` [rows, dim] and dL/db_enc.
fn dec_bias_grad(g: &[f32], db_enc: &[f32], w_enc: &[f32], dim: usize, db_dec: &mut [f32]) {
    // Column blocks of b_dec in parallel; each block sums rows and latents in a fixed order.
    const BLOCK: usize = 64;
    db_dec.par_chunks_mut(BLOCK).enumerate().for_each(|(blk, out)| {
        let c0 = blk * BLOCK;
        let w = out.len();
        out.iter_mut().for_each(|o| *o = 0.0);
        for row in g.chunks_exact(dim) {
            kernels::add(out, &row[c0..c0 + w]);
        }
        for (j, &d) in db_enc.iter().enumerate() {
            if d != 0.0 {
                kernels::axpy(-d, &w_enc[j * dim + c0..j * dim + c0 + w], out);
            }
        }
    });
}

/// dL/dW_enc[j] = sum over the latent's active entries of dz * (x - b_dec).
fn enc_row_grad(list: &[u32], k: usize, dz: &[f32], xc: &[f32], dim: usize, out: &mut [f32]) {
    out.iter_mut().for_each(|o| *o = 0.0);
    for &pos in list {
        let b = pos as usize / k;
        kernels::axpy(dz[pos as usize], &xc[b * dim..(b + 1) * dim], out);
    }
}

/// dL/d(decoder atom j): gu = sum of z * dL/dx_hat over the latent's entries, projected
/// through the normalisation u = w / ||w|| when normalising: (gu - u (u . gu)) / ||w||.
#[allow(clippy::too_many_arguments)]
fn dec_row_grad(
    list: &[u32],
    k: usize,
    val: &[f32],
    g: &[f32],
    dim: usize,
    w: &[f32],
    inv_norm: f32,
    normalize: bool,
    out: &mut [f32],
) {
    out.iter_mut().for_each(|o| *o = 0.0);
    for &pos in list {
        let b = pos as usize / k;
        kernels::axpy(val[pos as usize], &g[b * dim..(b + 1) * dim], out);
    }
    project_dec_grad(w, inv_norm, normalize, out);
}

/// Turns `gu`, the gradient w.r.t. the atom u = w / ||w||, into the gradient w.r.t. the raw
/// atom w: (gu - u (u . gu)) / ||w||. Without normalisation u = w and `gu` is left as is.
fn project_dec_grad(w: &[f32], inv_norm: f32, normalize: bool, gu: &mut [f32]) {
    if normalize {
        let c = kernels::dot(w, gu) * inv_norm * inv_norm;
        gu.iter_mut().zip(w).for_each(|(o, &wv)| *o = (*o - c * wv) * inv_norm);
    }
}

/// The dense SAE's forward pass over `rows` rows of `x`: `xc = x - b_dec`,
/// `pre = xc W_enc^T + b_enc` then `z = relu(pre)` (in `pre`), `zs = z * inv_norm`, and the
/// reconstruction `x_hat = zs W_dec + b_dec` in `g` (two GEMMs). With `train`, turns `g` into
/// dL/dx_hat. Returns the sum of squared errors.
fn forward_dense(
    p: &Params,
    dim: usize,
    n: usize,
    x: &[f32],
    rows: usize,
    ws: &mut Workspace,
    train: bool,
) -> f64 {
    ws.resize_dense(rows, dim, n, train);
    let b_dec = &p.b_dec;
    ws.xc.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(c, xr)| {
        c.iter_mut().zip(xr).zip(b_dec).for_each(|((c, &xv), &b)| *c = xv - b);
    });
    // W_enc^T (d x n): element (kk, j) = w_enc[j * dim + kk].
    matmul(
        rows,
        n,
        dim,
        &mut ws.pre,
        Mat { data: &ws.xc, rs: dim, cs: 1 },
        Mat { data: &p.w_enc, rs: 1, cs: dim },
    );
    let (b_enc, inv) = (&p.b_enc, &p.inv_norm);
    ws.pre.par_chunks_mut(n).zip(ws.zs.par_chunks_mut(n)).with_min_len(4).for_each(|(z, zs)| {
        for (((z, zs), &b), &s) in z.iter_mut().zip(zs.iter_mut()).zip(b_enc).zip(inv) {
            *z = (*z + b).max(0.0);
            *zs = *z * s;
        }
    });
    matmul(
        rows,
        dim,
        n,
        &mut ws.g,
        Mat { data: &ws.zs, rs: n, cs: 1 },
        Mat { data: &p.w_dec, rs: dim, cs: 1 },
    );
    let scale = 2.0 / (rows * dim) as f32;
    (ws.g.par_chunks_mut(dim), ws.row_sse.par_iter_mut(), x.par_chunks(dim))
        .into_par_iter()
        .with_min_len(4)
        .for_each(|(g, sse, xr)| {
            kernels::add(g, b_dec);
            if train {
                g.iter_mut().zip(xr).for_each(|(g, &xv)| *g -= xv);
                *sse = kernels::dot(g, g);
                g.iter_mut().for_each(|g| *g *= scale);
            } else {
                *sse = g.iter().zip(xr).map(|(&a, &b)| (a - b) * (a - b)).sum();
            }
        });
    ws.row_sse.iter().map(|&s| s as f64).sum()
}

/// The dense SAE's gradients after a training [`forward_dense`], three GEMMs:
/// `dz = (g W_dec^T) * inv_norm * 1{pre > 0}` (in `zs`), `dW_enc = dz^T xc`,
/// `dU = z^T g` (w.r.t. the normalised atoms; [`project_dec_grad`] maps it to the raw ones),
/// and both bias gradients. The ReLU gradient at exactly 0 is 0, as in PyTorch.
fn backward_dense(p: &Params, dim: usize, n: usize, ws: &mut Workspace) {
    let rows = ws.rows;
    // W_dec^T (d x n): element (kk, j) = w_dec[j * dim + kk].
    matmul(
        rows,
        n,
        dim,
        &mut ws.zs,
        Mat { data: &ws.g, rs: dim, cs: 1 },
        Mat { data: &p.w_dec, rs: 1, cs: dim },
    );
    let inv = &p.inv_norm;
    ws.zs.par_chunks_mut(n).zip(ws.pre.par_chunks(n)).with_min_len(4).for_each(|(d, z)| {
        for ((d, &z), &s) in d.iter_mut().zip(z).zip(inv) {
            *d = if z > 0.0 { *d * s } else { 0.0 };
        }
    });
    // db_enc: column sums of dz, column blocks in parallel, rows in a fixed order.
    const BLOCK: usize = 256;
    let dz = &ws.zs[..rows * n];
    ws.db_enc.par_chunks_mut(BLOCK).enumerate().for_each(|(blk, out)| {
        let c0 = blk * BLOCK;
        out.iter_mut().for_each(|o| *o = 0.0);
        for row in dz.chunks_exact(n) {
            kernels::add(out, &row[c0..c0 + out.len()]);
        }
    });
    // dz^T (n x rows): element (j, b) = dz[b * n + j]; likewise z^T from `pre`.
    matmul(
        n,
        dim,
        rows,
        &mut ws.gw_enc,
        Mat { data: dz, rs: 1, cs: n },
        Mat { data: &ws.xc, rs: dim, cs: 1 },
    );
    matmul(
        n,
        dim,
        rows,
        &mut ws.gw_dec,
        Mat { data: &ws.pre, rs: 1, cs: n },
        Mat { data: &ws.g, rs: dim, cs: 1 },
    );
    dec_bias_grad(&ws.g, &ws.db_enc, &p.w_enc, dim, &mut ws.db_dec);
}

/// Exactly k entries of relu(row): larger value first, ties to the lower index; output sorted
/// by index. `cand` is scratch.
///
/// One pass keeps candidates above a running threshold in a buffer of a few k; when it fills,
/// `select_nth_unstable_by` (O(len)) keeps the best k and their k-th value becomes the new
/// threshold. Scanning in index order, a later entry equal to the threshold loses the tie, so
/// only strictly larger values are admitted. With fewer than k positive values the rest are
/// relu zeros, which go to the lowest indices.
fn topk_row(row: &[f32], idx: &mut [u32], val: &mut [f32], cand: &mut Vec<(f32, u32)>) {
    let k = idx.len();
    let cap = (4 * k).max(64);
    // Total order: larger value first, then lower index.
    let better = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    cand.clear();
    let mut thr = 0.0f32;
    for (j, &v) in row.iter().enumerate() {
        if v > thr {
            cand.push((v, j as u32));
            if cand.len() == cap {
                cand.select_nth_unstable_by(k - 1, better);
                cand.truncate(k);
                // Position k-1 now holds the worst of the best k: the new threshold.
                thr = cand[k - 1].0;
            }
        }
    }
    if cand.len() > k {
        cand.select_nth_unstable_by(k - 1, better);
        cand.truncate(k);
    } else if cand.len() < k {
        // Fewer than k positives: fill with relu zeros, lowest indices first.
        for (j, &v) in row.iter().enumerate() {
            if cand.len() == k {
                break;
            }
            if v <= 0.0 || v.is_nan() {
                cand.push((0.0, j as u32));
            }
        }
    }
    cand.sort_unstable_by_key(|c| c.1);
    for (t, c) in cand.iter().enumerate() {
        idx[t] = c.1;
        val[t] = c.0;
    }
}

/// One Adam/AdamW update's constants (bias corrections for update number `t`).
#[derive(Debug, Clone, Copy)]
struct AdamStep {
    lr: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    /// Weight decay added to the gradient (Adam).
    l2: f32,
    /// Multiplier applied to the parameter before the step (AdamW: 1 - lr * wd).
    decay: f32,
    inv_bc1: f32,
    inv_bc2: f32,
}

impl AdamStep {
    fn new(cfg: &TrialConfig, t: u64) -> Self {
        let decoupled = cfg.optimizer == Optimizer::Adamw;
        let t = t as i32;
        AdamStep {
            lr: cfg.lr as f32,
            b1: cfg.beta1 as f32,
            b2: cfg.beta2 as f32,
            eps: cfg.eps as f32,
            l2: if decoupled { 0.0 } else { cfg.weight_decay as f32 },
            decay: if decoupled { (1.0 - cfg.lr * cfg.weight_decay) as f32 } else { 1.0 },
            inv_bc1: (1.0 / (1.0 - cfg.beta1.powi(t))) as f32,
            inv_bc2: (1.0 / (1.0 - cfg.beta2.powi(t))) as f32,
        }
    }

    fn update(&self, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        kernels::adam(self, p, m, v, g);
    }
}

/// Small vector kernels, compiled for AVX2+FMA and chosen at run time (the crate is built for
/// baseline x86-64, where LLVM would only use 4-wide SSE). They are memory-bound, so AVX-512
/// would add little (and its target feature needs a newer rustc than the workspace's MSRV);
/// the GEMM, where it matters, uses AVX-512 through `gemm`'s own dispatch.
mod kernels {
    use super::AdamStep;

    const LANES: usize = 16;

    #[inline(always)]
    fn dot_body(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
        for (x, y) in ca.zip(cb) {
            for l in 0..LANES {
                acc[l] += x[l] * y[l];
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    #[inline(always)]
    fn axpy_body(alpha: f32, x: &[f32], y: &mut [f32]) {
        y.iter_mut().zip(x).for_each(|(y, &x)| *y += alpha * x);
    }

    #[inline(always)]
    fn add_body(y: &mut [f32], x: &[f32]) {
        y.iter_mut().zip(x).for_each(|(y, &x)| *y += x);
    }

    #[inline(always)]
    fn adam_body(s: &AdamStep, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        let (b1, b2, c1, c2) = (s.b1, s.b2, 1.0 - s.b1, 1.0 - s.b2);
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let g = g + s.l2 * *p;
            let mn = b1 * *m + c1 * g;
            let vn = b2 * *v + c2 * g * g;
            *m = mn;
            *v = vn;
            *p = *p * s.decay - s.lr * (mn * s.inv_bc1) / ((vn * s.inv_bc2).sqrt() + s.eps);
        }
    }

    macro_rules! dispatch {
        ($name:ident, $body:ident, ($($arg:ident : $ty:ty),*) $(-> $ret:ty)?) => {
            #[cfg(target_arch = "x86_64")]
            mod $name {
                use super::*;
                #[target_feature(enable = "avx2,fma")]
                pub unsafe fn v3($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
            }
            #[inline]
            pub(super) fn $name($($arg: $ty),*) $(-> $ret)? {
                #[cfg(target_arch = "x86_64")]
                {
                    // SAFETY: each variant runs only when the CPU reports its features.
                    if std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                    {
                        return unsafe { $name::v3($($arg),*) };
                    }
                }
                $body($($arg),*)
            }
        };
    }

    dispatch!(dot, dot_body, (a: &[f32], b: &[f32]) -> f32);
    dispatch!(axpy, axpy_body, (alpha: f32, x: &[f32], y: &mut [f32]));
    dispatch!(add, add_body, (y: &mut [f32], x: &[f32]));
    dispatch!(adam, adam_body, (s: &AdamStep, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]));
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn cfg(n_stripes: usize, k: usize, normalize: bool) -> TrialConfig {
        TrialConfig {
            num_stripes: n_stripes,
            stripe_dim: 4,
            layer_k: k,
            normalize_decoder: normalize,
            ..TrialConfig::default()
        }
    }

    fn random(len: usize, scale: f32, rng: &mut StdRng) -> Vec<f32> {
        (0..len).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect()
    }

    /// A model with every parameter random and non-trivial (biases non-zero, atoms not unit).
    fn perturbed(cfg: &TrialConfig, dim: usize, seed: u64) -> FastTopK {
        let mut m = FastTopK::new(cfg, dim).unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        let n = m.n;
        m.p.w_enc = random(n * dim, 0.5, &mut rng);
        m.p.b_enc = random(n, 0.2, &mut rng);
        m.p.w_dec = random(n * dim, 0.7, &mut rng);
        m.p.b_dec = random(dim, 0.3, &mut rng);
        refresh_norms(&mut m.p, dim, m.normalize);
        m
    }

    struct Reference {
        loss: f64,
        codes: Vec<f32>,
        recon: Vec<f32>,
        w_enc: Vec<f32>,
        b_enc: Vec<f32>,
        /// In decoder.weight layout [dim, n].
        w_dec: Vec<f32>,
        b_dec: Vec<f32>,
    }

    /// Top-k mask by a full sort (value descending, index ascending), independent of the scan.
    fn sort_mask(act: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut mask = vec![0f32; act.len()];
        for (row, mrow) in act.chunks(n).zip(mask.chunks_mut(n)) {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            for &j in &order[..k] {
                mrow[j] = 1.0;
            }
        }
        mask
    }

    /// The same model in plain candle ops, differentiated by candle's autograd: top-k with
    /// `Some(k)`, the dense SAE (all of relu(pre)) with `None`.
    fn reference(m: &FastTopK, x: &[f32], k: Option<usize>) -> candle_core::Result<Reference> {
        let (n, dim) = (m.n, m.dim);
        let rows = x.len() / dim;
        let dev = Device::Cpu;
        let w_enc = Var::from_vec(m.p.w_enc.clone(), (n, dim), &dev)?;
        let b_enc = Var::from_vec(m.p.b_enc.clone(), n, &dev)?;
        let w_dec = Var::from_vec(transpose(&m.p.w_dec, n, dim), (dim, n), &dev)?;
        let b_dec = Var::from_vec(m.p.b_dec.clone(), dim, &dev)?;
        let xt = Tensor::from_vec(x.to_vec(), (rows, dim), &dev)?;
        let pre = xt.broadcast_sub(&b_dec)?.matmul(&w_enc.t()?)?.broadcast_add(&b_enc)?;
        let act = pre.relu()?;
        let z = match k {
            Some(k) => {
                let mask = sort_mask(&act.flatten_all()?.to_vec1::<f32>()?, n, k);
                (act * Tensor::from_vec(mask, (rows, n), &dev)?)?
            }
            None => act,
        };
        let dec = if m.normalize {
            w_dec.broadcast_div(&w_dec.sqr()?.sum_keepdim(0)?.affine(1.0, 1e-8)?.sqrt()?)?
        } else {
            w_dec.as_tensor().clone()
        };
        let x_hat = z.matmul(&dec.t()?)?.broadcast_add(&b_dec)?;
        let loss = (&x_hat - &xt)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        let g = |v: &Var| -> candle_core::Result<Vec<f32>> {
            grads.get(v.as_tensor()).expect("gradient").flatten_all()?.to_vec1::<f32>()
        };
        Ok(Reference {
            loss: loss.to_scalar::<f32>()? as f64,
            codes: z.flatten_all()?.to_vec1()?,
            recon: x_hat.flatten_all()?.to_vec1()?,
            w_enc: g(&w_enc)?,
            b_enc: g(&b_enc)?,
            w_dec: g(&w_dec)?,
            b_dec: g(&b_dec)?,
        })
    }

    fn assert_close(name: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{name}: length");
        let scale = want.iter().fold(0f32, |a, &b| a.max(b.abs())).max(1e-12);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * scale + 1e-5 * w.abs(),
                "{name}[{i}]: got {g}, want {w} (max |want| {scale})"
            );
        }
        assert!(want.iter().any(|&w| w != 0.0), "{name}: reference is all zero, test is vacuous");
    }

    fn check_against_autograd(normalize: bool, dense: bool) {
        let (dim, rows, k) = (12, 9, 5);
        let mut cfg = cfg(8, k, normalize); // 32 latents
        if dense {
            cfg.layer_sparsity_mode = LayerSparsityMode::None;
        }
        let mut m = perturbed(&cfg, dim, 7);
        assert_eq!(m.is_dense(), dense);
        let mut rng = StdRng::seed_from_u64(99);
        let x = random(rows * dim, 1.0, &mut rng);
        let r = reference(&m, &x, (!dense).then_some(k)).unwrap();
        if dense {
            // Not secretly top-k: most rows keep more than k latents.
            let wide = r.codes.chunks(m.n).filter(|c| c.iter().filter(|&&v| v > 0.0).count() > k);
            assert!(wide.count() > rows / 2, "dense reference keeps too few latents");
        }

        let inf = m.infer(&x).unwrap();
        assert_close("codes", &inf.codes, &r.codes);
        assert_close("recon", &inf.recon, &r.recon);
        assert!((inf.loss - r.loss).abs() <= 1e-5 * r.loss, "loss {} vs {}", inf.loss, r.loss);

        let g = m.gradients(&x, k).unwrap();
        assert!((g.loss - r.loss).abs() <= 1e-5 * r.loss);
        assert_close("encoder.weight grad", &g.w_enc, &r.w_enc);
        assert_close("encoder.bias grad", &g.b_enc, &r.b_enc);
        assert_close("decoder.weight grad", &transpose(&g.w_dec, m.n, dim), &r.w_dec);
        assert_close("decoder.bias grad", &g.b_dec, &r.b_dec);
    }

    #[test]
    fn matches_candle_autograd_normalized() {
        check_against_autograd(true, false);
    }

    #[test]
    fn matches_candle_autograd_unnormalized() {
        check_against_autograd(false, false);
    }

    #[test]
    fn dense_matches_candle_autograd_normalized() {
        check_against_autograd(true, true);
    }

    #[test]
    fn dense_matches_candle_autograd_unnormalized() {
        check_against_autograd(false, true);
    }

    /// Shapes that are not multiples of any SIMD width or GEMM block, and more latents than a
    /// bias-sum block, so every kernel's edge handling is exercised. (Not dim 1: a normalised
    /// 1-d atom has an identically zero gradient, leaving only rounding noise to compare.)
    #[test]
    fn dense_matches_candle_autograd_odd_shapes() {
        for &(stripes, dim, rows) in &[(1usize, 3usize, 1usize), (7, 37, 67), (70, 5, 3)] {
            let cfg = TrialConfig {
                layer_sparsity_mode: LayerSparsityMode::None,
                ..cfg(stripes, 1, true)
            };
            let mut m = perturbed(&cfg, dim, 21);
            let mut rng = StdRng::seed_from_u64(22);
            let x = random(rows * dim, 1.0, &mut rng);
            let r = reference(&m, &x, None).unwrap();
            let g = m.gradients(&x, 1).unwrap();
            assert!((g.loss - r.loss).abs() <= 1e-5 * r.loss, "{stripes} {dim} {rows}");
            let inf = m.infer(&x).unwrap();
            let tol = |name: &str, got: &[f32], want: &[f32]| {
                let scale = want.iter().fold(0f32, |a, &b| a.max(b.abs())).max(1e-12);
                for (i, (a, b)) in got.iter().zip(want).enumerate() {
                    assert!((a - b).abs() <= 1e-4 * scale, "{name}[{i}] {a} vs {b} ({dim} {rows})");
                }
                assert_eq!(got.len(), want.len(), "{name}");
            };
            tol("codes", &inf.codes, &r.codes);
            tol("recon", &inf.recon, &r.recon);
            tol("encoder.weight grad", &g.w_enc, &r.w_enc);
            tol("encoder.bias grad", &g.b_enc, &r.b_enc);
            tol("decoder.weight grad", &transpose(&g.w_dec, m.n, dim), &r.w_dec);
            tol("decoder.bias grad", &g.b_dec, &r.b_dec);
        }
    }

    #[test]
    fn topk_keeps_exactly_k_with_index_ties() {
        let row = [0.5, -1.0, 2.0, 0.5, 0.5, 3.0, 0.0];
        let (mut idx, mut val) = ([0u32; 4], [0f32; 4]);
        topk_row(&row, &mut idx, &mut val, &mut Vec::new());
        // 3.0 (5), 2.0 (2), then the two lowest-index 0.5s (0, 3); index 4 loses the tie.
        assert_eq!(idx, [0, 2, 3, 5]);
        assert_eq!(val, [0.5, 2.0, 0.5, 3.0]);
        // Fewer positives than k: relu zeros fill up by lowest index.
        let row = [-1.0, 4.0, -2.0, -3.0];
        let (mut idx, mut val) = ([0u32; 3], [0f32; 3]);
        topk_row(&row, &mut idx, &mut val, &mut Vec::new());
        assert_eq!(idx, [0, 1, 2]);
        assert_eq!(val, [0.0, 4.0, 0.0]);
    }

    #[test]
    fn topk_matches_sort_on_random_rows() {
        let mut rng = StdRng::seed_from_u64(3);
        // Large n / small k forces several buffer compactions; rounding makes ties.
        for &(n, k) in &[(64usize, 1usize), (64, 7), (100, 33), (256, 256), (4096, 8), (2000, 64)] {
            let row: Vec<f32> =
                random(n, 1.0, &mut rng).iter().map(|v| (v * 8.0).round() / 8.0).collect();
            let (mut idx, mut val) = (vec![0u32; k], vec![0f32; k]);
            topk_row(&row, &mut idx, &mut val, &mut Vec::new());
            let relu: Vec<f32> = row.iter().map(|v| v.max(0.0)).collect();
            let mask = sort_mask(&relu, n, k);
            let want: Vec<u32> = (0..n as u32).filter(|&j| mask[j as usize] == 1.0).collect();
            assert_eq!(idx, want, "n {n} k {k}");
        }
    }

    #[test]
    fn exactly_k_nonzeros_per_row() {
        let (dim, rows, k) = (16, 20, 6);
        let cfg = cfg(16, k, true);
        let m = FastTopK::new(&cfg, dim).unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        // Positive data against positive-ish directions: plenty of positive pre-activations.
        let x = random(rows * dim, 1.0, &mut rng);
        let inf = m.infer(&x).unwrap();
        for row in inf.codes.chunks(m.n) {
            assert_eq!(row.iter().filter(|&&v| v != 0.0).count(), k);
        }
    }

    /// One AdamW / Adam step against the update computed by hand from the gradients.
    fn check_adam(optimizer: Optimizer, dense: bool) {
        let (dim, rows, k) = (10, 6, 3);
        let mut cfg = TrialConfig { optimizer, lr: 0.01, weight_decay: 0.1, ..cfg(4, k, true) };
        if dense {
            cfg.layer_sparsity_mode = LayerSparsityMode::None;
        }
        let mut m = perturbed(&cfg, dim, 11);
        let mut rng = StdRng::seed_from_u64(12);
        let x = random(rows * dim, 1.0, &mut rng);
        let before = m.p.clone();
        let g = m.gradients(&x, k).unwrap();
        let loss = m.step(&x, 0).unwrap();
        assert!((loss - g.loss).abs() < 1e-12);
        let (lr, wd, eps) = (cfg.lr, cfg.weight_decay, cfg.eps);
        let hand = |p: f32, g: f32| -> f64 {
            let (p, mut g) = (p as f64, g as f64);
            if optimizer == Optimizer::Adam {
                g += wd * p;
            }
            // t = 1: m_hat = g, v_hat = g^2.
            let m_hat = (1.0 - cfg.beta1) * g / (1.0 - cfg.beta1);
            let v_hat = (1.0 - cfg.beta2) * g * g / (1.0 - cfg.beta2);
            let p = if optimizer == Optimizer::Adamw { p * (1.0 - lr * wd) } else { p };
            p - lr * m_hat / (v_hat.sqrt() + eps)
        };
        let check = |name: &str, old: &[f32], grad: &[f32], new: &[f32]| {
            let mut moved = 0;
            for i in 0..old.len() {
                let want = hand(old[i], grad[i]);
                assert!((new[i] as f64 - want).abs() < 1e-5, "{name}[{i}]: {} vs {want}", new[i]);
                moved += (new[i] != old[i]) as usize;
            }
            assert!(moved > 0, "{name} did not move");
        };
        check("w_enc", &before.w_enc, &g.w_enc, &m.p.w_enc);
        check("b_enc", &before.b_enc, &g.b_enc, &m.p.b_enc);
        check("w_dec", &before.w_dec, &g.w_dec, &m.p.w_dec);
        check("b_dec", &before.b_dec, &g.b_dec, &m.p.b_dec);
        // The cached norms follow the updated atoms.
        let mut fresh = m.p.clone();
        refresh_norms(&mut fresh, dim, true);
        for (a, b) in fresh.inv_norm.iter().zip(&m.p.inv_norm) {
            assert!((a - b).abs() <= 1e-6 * a.abs());
        }
    }

    #[test]
    fn adamw_step_matches_hand_computation() {
        check_adam(Optimizer::Adamw, false);
    }

    #[test]
    fn adam_step_matches_hand_computation() {
        check_adam(Optimizer::Adam, false);
    }

    #[test]
    fn dense_adamw_and_adam_steps_match_hand_computation() {
        check_adam(Optimizer::Adamw, true);
        check_adam(Optimizer::Adam, true);
    }

    #[test]
    fn deterministic_for_a_seed() {
        let (dim, rows) = (24, 32);
        let cfg = TrialConfig {
            seed: 42,
            k_curriculum_start: 12,
            k_curriculum_steps: 4,
            ..cfg(16, 4, true)
        };
        let mut rng = StdRng::seed_from_u64(1);
        let batches: Vec<Vec<f32>> = (0..6).map(|_| random(rows * dim, 1.0, &mut rng)).collect();
        let run = |cfg: &TrialConfig| {
            let mut m = FastTopK::new(cfg, dim).unwrap();
            let losses: Vec<f64> =
                batches.iter().enumerate().map(|(s, b)| m.step(b, s).unwrap()).collect();
            (m.p, losses)
        };
        let (a, la) = run(&cfg);
        let (b, lb) = run(&cfg);
        assert_eq!(a, b, "same seed must give bit-identical weights");
        assert_eq!(la, lb);
        let (c, _) = run(&TrialConfig { seed: 43, ..cfg.clone() });
        assert_ne!(a.w_enc, c.w_enc);
    }

    #[test]
    fn init_is_transposed_unit_directions() {
        let m = FastTopK::new(&cfg(8, 4, true), 20).unwrap();
        assert_eq!(m.p.w_enc, m.p.w_dec);
        for row in m.p.w_dec.chunks(20) {
            let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5);
        }
        assert!(m.p.b_enc.iter().chain(&m.p.b_dec).all(|&b| b == 0.0));
    }

    #[test]
    fn init_equals_the_candle_models() {
        let cfg = TrialConfig { seed: 9, ..cfg(4, 3, true) };
        let m = FastTopK::new(&cfg, 7).unwrap();
        let want = crate::model::initial_weights(&cfg, 7);
        let get = |name: &str| want.iter().find(|w| w.0 == name).map(|w| w.2.clone()).unwrap();
        assert_eq!(m.p.w_enc, get("encoder.weight"));
        assert_eq!(m.p.b_enc, get("encoder.bias"));
        assert_eq!(transpose(&m.p.w_dec, 16, 7), get("decoder.weight"));
        assert_eq!(m.p.b_dec, get("decoder.bias"));
    }

    /// Same config, same batches: the fast path and the general candle trainer follow the same
    /// trajectory (losses per step, then reconstructions).
    #[test]
    fn follows_the_candle_trainer() {
        let cfg = TrialConfig {
            seed: 5,
            lr: 1e-3,
            weight_decay: 0.01,
            k_curriculum_start: 10,
            k_curriculum_steps: 3,
            ..cfg(8, 4, true)
        };
        follow_candle(&cfg);
    }

    /// The dense SAE (no top-k) follows the candle trainer, with and without normalised
    /// atoms, with AdamW and Adam.
    #[test]
    fn dense_follows_the_candle_trainer() {
        for (normalize, optimizer) in [(true, Optimizer::Adamw), (false, Optimizer::Adam)] {
            let cfg = TrialConfig {
                seed: 6,
                lr: 1e-3,
                weight_decay: 0.01,
                optimizer,
                layer_sparsity_mode: LayerSparsityMode::None,
                ..cfg(8, 4, normalize)
            };
            assert!(eligible(&cfg));
            follow_candle(&cfg);
        }
    }

    /// Same config, same batches: the fast path and the general candle trainer follow the same
    /// trajectory (losses per step, then reconstructions and codes).
    fn follow_candle(cfg: &TrialConfig) {
        let (dim, rows) = (20, 24);
        let cfg = cfg.clone();
        let mut fast = FastTopK::new(&cfg, dim).unwrap();
        let mut slow = crate::model::CandleTrainer::new(&cfg, dim, &Device::Cpu).unwrap();
        let mut rng = StdRng::seed_from_u64(6);
        for s in 0..5 {
            let b = random(rows * dim, 1.0, &mut rng);
            let (lf, ls) = (fast.step(&b, s).unwrap(), slow.step(&b, s).unwrap());
            assert!((lf - ls).abs() <= 1e-4 * ls, "step {s}: fast loss {lf}, candle {ls}");
        }
        let x = random(rows * dim, 1.0, &mut rng);
        let (a, b) = (fast.infer(&x).unwrap(), slow.infer(&x).unwrap());
        assert!((a.loss - b.loss).abs() <= 1e-4 * b.loss, "eval loss {} vs {}", a.loss, b.loss);
        for (i, (p, q)) in a.recon.iter().zip(&b.recon).enumerate() {
            assert!((p - q).abs() < 1e-3, "recon[{i}] {p} vs {q}");
        }
        assert_eq!(a.codes.len(), b.codes.len());
        for (i, (p, q)) in a.codes.iter().zip(&b.codes).enumerate() {
            assert!((p - q).abs() < 1e-3, "codes[{i}] {p} vs {q}");
        }
    }

    #[test]
    fn training_reduces_loss() {
        // Sparse combinations of 16 fixed directions in 32 dims: a top-k SAE should fit them.
        let (dim, rows) = (32, 64);
        let mut rng = StdRng::seed_from_u64(8);
        let feats = random(16 * dim, 1.0, &mut rng);
        let batch = |rng: &mut StdRng| {
            let mut x = vec![0f32; rows * dim];
            for row in x.chunks_mut(dim) {
                for _ in 0..2 {
                    let f = rng.random_range(0..16);
                    let c = rng.random::<f32>() + 0.5;
                    kernels::axpy(c, &feats[f * dim..(f + 1) * dim], row);
                }
            }
            x
        };
        let cfg = TrialConfig { lr: 3e-3, ..cfg(8, 4, true) };
        let mut m = FastTopK::new(&cfg, dim).unwrap();
        let eval = batch(&mut rng);
        let start = m.infer(&eval).unwrap().loss;
        for s in 0..400 {
            let b = batch(&mut rng);
            m.step(&b, s).unwrap();
        }
        let end = m.infer(&eval).unwrap().loss;
        assert!(end < 0.2 * start, "loss {start} -> {end}");
    }

    #[test]
    fn save_load_round_trip_in_candle_layout() {
        let dim = 6;
        let cfg = cfg(2, 3, true);
        let m = perturbed(&cfg, dim, 4);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        m.save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("encoder.weight").unwrap().shape(), &[8, 6]);
        assert_eq!(st.tensor("decoder.weight").unwrap().shape(), &[6, 8]);
        assert_eq!(st.tensor("encoder.bias").unwrap().shape(), &[8]);
        assert_eq!(st.tensor("decoder.bias").unwrap().shape(), &[6]);
        // decoder.weight[i, j] is component i of atom j.
        let dw = st.tensor("decoder.weight").unwrap();
        let first = f32::from_le_bytes(dw.data()[4..8].try_into().unwrap());
        assert_eq!(first, m.p.w_dec[dim]); // [0, 1] = atom 1, component 0
        let mut back = FastTopK::new(&cfg, dim).unwrap();
        back.load(&path).unwrap();
        assert_eq!(back.p, m.p);
        // A file for another shape is refused, naming the tensor.
        let mut other = FastTopK::new(&cfg, dim + 1).unwrap();
        let e = other.load(&path).unwrap_err().to_string();
        assert!(e.contains("encoder.weight") && e.contains("w.safetensors"), "{e}");
    }

    #[test]
    fn atoms_are_unit_rows() {
        let cfg = cfg(2, 3, true);
        let m = perturbed(&cfg, 5, 4);
        let atoms = m.atoms().unwrap();
        assert_eq!(atoms.len(), 8 * 5);
        for (a, raw) in atoms.chunks(5).zip(m.p.w_dec.chunks(5)) {
            let norm: f32 = a.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5);
            let cos: f32 = a.iter().zip(raw).map(|(x, y)| x * y).sum::<f32>()
                / raw.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((cos - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn eligibility() {
        assert!(eligible(&TrialConfig::default()));
        assert!(eligible(&TrialConfig {
            optimizer: Optimizer::Adam,
            input_noise_std: 0.1,
            ..Default::default()
        }));
        for bad in [
            TrialConfig { l1_weight: 0.1, ..Default::default() },
            TrialConfig { intermediate_dim: 8, ..Default::default() },
            TrialConfig { layer_sparsity_mode: LayerSparsityMode::Lifetime, ..Default::default() },
            TrialConfig {
                layer_sparsity_mode: LayerSparsityMode::None,
                intermediate_dim: 8,
                ..Default::default()
            },
            TrialConfig { optimizer: Optimizer::Sgd, ..Default::default() },
            TrialConfig { aux_k: 4, ..Default::default() },
            TrialConfig {
                stripe_sparsity_mode: StripeSparsityMode::Ordinary,
                ..Default::default()
            },
        ] {
            assert!(!eligible(&bad));
            let e = FastTopK::new(&bad, 8).unwrap_err().to_string();
            assert!(e.contains("does not support"), "{e}");
        }
        // Dense: k plays no part, so a layer_k beyond the code size is fine.
        let dense = TrialConfig {
            layer_sparsity_mode: LayerSparsityMode::None,
            layer_k: 1_000_000,
            ..Default::default()
        };
        assert!(eligible(&dense), "{:?}", ineligibility(&dense));
        assert!(FastTopK::new(&dense, 8).unwrap().is_dense());
        assert!(!eligible(&TrialConfig { layer_k: 1_000_000, ..Default::default() }));
        let mut m = FastTopK::new(&TrialConfig::default(), 8).unwrap();
        let e = m.step(&[0.0; 12], 0).unwrap_err().to_string();
        assert!(e.contains("12 values") && e.contains("dim 8"), "{e}");
    }
}
