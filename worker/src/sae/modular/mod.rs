//! A hand-written training step for the modular SAE: every layer and stripe sparsity mode, the
//! intermediate layer with its mirrored decoder, tied weights, the routing gates, L1/KL/Hoyer
//! and routing-L1 penalties, and the three optimisers, without autograd.
//!
//! The candle model ([`crate::sae::model`]) is the reference: same parameters (names, shapes,
//! layout, initialisation from [`crate::sae::model::initial_weights`]), same forward pass, and the
//! gradients of the same loss, tested against candle autograd below. Why by hand: a modular
//! step is a few small GEMMs and a dozen cheap element-wise passes, and the candle path spends
//! most of its time in per-op overhead (allocating a tensor per op, a graph walk, a reduction
//! per bias); here every buffer is reused across steps and every pass is one loop.
//!
//! The three sparsity stages only ever multiply the codes by constants chosen in the forward
//! pass (masks, and for routing the router's scores), so the backward pass is one gate per
//! code plus, for routing, the scores' gradient:
//!
//! ```text
//! z  = relu(pre)                                    pre = W_e a0 + b_e
//! z1 = z * M1                                       layer mask (top-k, lifetime, boosted, ...)
//! z2 = z1 * g[stripe]                               g = M_s (ordinary, straight-through) or r * M_s
//! c  = z2 * M3[stripe]                              lifetime stripe mask
//! dL/dz = dL/dc * M1 * g * M3       dL/dr[b, s] = M_s M3 sum_d dL/dc[b, s, d] z1[b, s, d]
//! ```
//!
//! where `a0` is `x - b_dec` (classic) or `relu(W_i x + b_i)`, and `r = W_r a0 + b_r` the
//! router's scores. The decoder is `c U + b_dec` with the atoms `U` (rows of the decoder, or of
//! the encoder when tied, L2-normalised when `normalize_decoder`), or the mirror
//! `W_o relu(c U + b_d) + b_o` (`W_o = W_i^T` when tied); `output_relu` clamps the output. ReLU
//! gradients are taken as 1 above 0 and 0 elsewhere (PyTorch's convention; candle also passes
//! gradient at exactly 0, a difference on a set of measure zero).
//!
//! Two shortcuts keep the arithmetic the same: batches of at most 16 rows apply the optimiser
//! to each single-product weight row by row inside the backward pass ([`Fuse`]: bit-identical
//! to the separate pass), and when a quarter of the codes or fewer pass the masks the decoder
//! and encoder products run over those codes only (`Work::sparse`; the others are zero, and so
//! are their gradients).
//!
//! JumpReLU (`z = pre * 1{pre > theta}`) takes the candle model's straight-through gradient
//! for its thresholds; the stripe-mask distortion flips the stage 2 and 3 masks with the candle
//! model's random stream ([`crate::sae::sparsity`]), so both paths flip the same bits. Not covered
//! (the candle model trains these): AuxK and dead-latent resampling.
//! [`ineligibility`] says why a configuration is refused.

use msae_shared::TrialConfig;
use msae_shared::config::StripeSparsityMode;

use crate::sae::duo;
use crate::sae::linalg::{Mat, matmul};
use crate::sae::optim::{OptimConfig, StepScalars};
use crate::sae::sparsity::{DISTORT_SEED_SALT, SparsityParams};
use crate::sae::trainer::{Inference, NamedTensor, Trainer, expect_tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;

mod backward;
mod forward;
mod penalty;

use backward::backward;
use forward::{atoms, forward};

/// Batches of at most this many rows update the weights in the backward pass ([`Fuse`]): their
/// weight gradients are skinny products, computed row by row.
const FUSE_MAX_ROWS: usize = crate::sae::skinny::SKINNY;

/// Guards the atom normalisation against zero-norm atoms (the candle model's value).
const NORM_EPS: f32 = 1e-8;

/// Why `cfg` cannot train on this path, or `None` when it can.
pub fn ineligibility(cfg: &TrialConfig) -> Option<String> {
    if cfg.aux_k > 0 {
        return Some("AuxK needs the candle model".into());
    }
    if cfg.resample_dead_every > 0 {
        return Some("dead-latent resampling needs the candle model".into());
    }
    None
}

/// Whether `cfg` trains on this path.
pub fn eligible(cfg: &TrialConfig) -> bool {
    ineligibility(cfg).is_none()
}

/// One parameter with its gradient and optimiser moments.
struct Param {
    name: String,
    shape: Vec<usize>,
    w: Vec<f32>,
    g: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    /// Whether the backward pass has already applied this step's update (see [`Fuse`]).
    updated: bool,
}

/// The optimiser step the backward pass applies itself, for weights whose gradient is one
/// skinny product (small batches): each gradient row goes from a scratch row straight into
/// the update, instead of being stored whole and read back by a separate optimiser pass.
#[derive(Clone, Copy)]
struct Fuse {
    optim: OptimConfig,
    /// The step number the update uses (Adam's bias correction).
    t: usize,
}

/// Positions of the model's parameters in [`ModularFast::params`].
#[derive(Debug, Clone, Copy, Default)]
struct Roles {
    inter_w: Option<usize>,
    inter_b: Option<usize>,
    enc_w: usize,
    enc_b: usize,
    dec_w: Option<usize>,
    dec_b: usize,
    out_w: Option<usize>,
    out_b: Option<usize>,
    router_w: Option<usize>,
    router_b: Option<usize>,
    log_threshold: Option<usize>,
}

/// Sizes of the model.
#[derive(Debug, Clone, Copy)]
struct Dims {
    /// Input dimension.
    dim: usize,
    /// Width of the intermediate layer (0 = classic).
    inter: usize,
    /// Encoder input width: `dim` or `inter`.
    inp: usize,
    /// Code neurons N = S * D.
    n: usize,
    s: usize,
    d: usize,
}

/// What training moves besides the weights: boosted mode's duty cycles, and the stripe-mask
/// distortion's random stream and clock (training steps taken).
struct TrainState {
    duty: Vec<f32>,
    distort_rng: StdRng,
    train_steps: usize,
}

impl Default for TrainState {
    /// An empty placeholder (the state is lent out of the model during a step).
    fn default() -> Self {
        TrainState { duty: Vec::new(), distort_rng: StdRng::seed_from_u64(0), train_steps: 0 }
    }
}

/// Buffers of one forward/backward pass, reused across steps.
#[derive(Default)]
struct Work {
    rows: usize,
    hpre: Vec<f32>,
    a0: Vec<f32>,
    pre: Vec<f32>,
    z1: Vec<f32>,
    m1: Vec<f32>,
    scores: Vec<f32>,
    ms: Vec<f32>,
    gate: Vec<f32>,
    m3: Vec<f32>,
    means: Vec<f32>,
    codes: Vec<f32>,
    u: Vec<f32>,
    inv_norm: Vec<f32>,
    yd: Vec<f32>,
    outp: Vec<f32>,
    xhat: Vec<f32>,
    g: Vec<f32>,
    g_hd: Vec<f32>,
    g_c: Vec<f32>,
    g_u: Vec<f32>,
    g_r: Vec<f32>,
    g_a0: Vec<f32>,
    boosted: Vec<f32>,
    /// One row of a fused weight gradient, for each of the two halves of its rows.
    row: [Vec<f32>; 2],
    /// The codes the masks let through, row by row: row `b`'s are
    /// `active[active_at[b]..active_at[b + 1]]` (see [`forward::mark_active`]).
    active: Vec<u32>,
    active_at: Vec<usize>,
    /// The decoder and encoder products of this pass take only the active codes.
    sparse: bool,
}

fn resize(v: &mut Vec<f32>, len: usize) {
    v.resize(len, 0.0);
}

/// The modular SAE trained by hand (see the module docs).
pub struct ModularFast {
    cfg: TrialConfig,
    dims: Dims,
    params: Vec<Param>,
    roles: Roles,
    optim: OptimConfig,
    /// Optimiser steps taken.
    t: usize,
    /// The distortion's schedule.
    sparsity: SparsityParams,
    /// What training moves besides the weights.
    state: TrainState,
    /// Layer k of the last training step (evaluation keeps it, as the candle model does).
    current_k: usize,
    ws: Work,
    /// Never take the sparse products (tests compare both ways).
    dense_only: bool,
}

impl ModularFast {
    /// A fresh model for `cfg` and input dimension `dim`, initialised as the candle model.
    pub fn new(cfg: &TrialConfig, dim: usize) -> anyhow::Result<Self> {
        cfg.validate().map_err(|e| anyhow::anyhow!("invalid trial config: {e}"))?;
        if let Some(why) = ineligibility(cfg) {
            anyhow::bail!("the modular fast path does not support this config: {why}");
        }
        anyhow::ensure!(dim > 0, "input dimension must be at least 1");
        let n = cfg.code_dim();
        let inter = cfg.intermediate_dim;
        let dims = Dims {
            dim,
            inter,
            inp: if inter == 0 { dim } else { inter },
            n,
            s: cfg.num_stripes,
            d: cfg.stripe_dim,
        };
        let adam = cfg.optimizer != msae_shared::config::Optimizer::Sgd;
        let params: Vec<Param> = crate::sae::model::initial_weights(cfg, dim)
            .into_iter()
            .map(|(name, shape, w)| {
                let len = w.len();
                Param {
                    name,
                    shape,
                    g: vec![0.0; len],
                    m: vec![0.0; len],
                    v: if adam { vec![0.0; len] } else { Vec::new() },
                    w,
                    updated: false,
                }
            })
            .collect();
        let find = |name: &str| params.iter().position(|p| p.name == name);
        let need = |name: &str| find(name).ok_or_else(|| anyhow::anyhow!("missing weight {name}"));
        let roles = Roles {
            inter_w: find("intermediate.weight"),
            inter_b: find("intermediate.bias"),
            enc_w: need("encoder.weight")?,
            enc_b: need("encoder.bias")?,
            dec_w: find("decoder.weight"),
            dec_b: need("decoder.bias")?,
            out_w: find("output.weight"),
            out_b: find("output.bias"),
            router_w: find("router.weight"),
            router_b: find("router.bias"),
            log_threshold: find("encoder.log_threshold"),
        };
        Ok(ModularFast {
            optim: OptimConfig::from_config(cfg),
            cfg: cfg.clone(),
            dims,
            params,
            roles,
            t: 0,
            sparsity: SparsityParams::from_config(cfg),
            state: TrainState {
                duty: vec![0.0; n],
                distort_rng: StdRng::seed_from_u64(cfg.seed ^ DISTORT_SEED_SALT),
                train_steps: 0,
            },
            current_k: cfg.layer_k_at(0),
            ws: Work::default(),
            dense_only: false,
        })
    }

    fn w(&self, i: usize) -> &[f32] {
        &self.params[i].w
    }

    /// Named weights (name, shape, values), in the candle model's layout.
    pub fn weights(&self) -> impl Iterator<Item = (&str, &[usize], &[f32])> {
        self.params.iter().map(|p| (p.name.as_str(), p.shape.as_slice(), p.w.as_slice()))
    }

    /// Sets a weight by name (tests and loading).
    pub fn set_weight(&mut self, name: &str, values: &[f32]) -> anyhow::Result<()> {
        let p = self
            .params
            .iter_mut()
            .find(|p| p.name == name)
            .ok_or_else(|| anyhow::anyhow!("no weight {name}"))?;
        anyhow::ensure!(
            p.w.len() == values.len(),
            "{name}: {} values for {}",
            values.len(),
            p.w.len()
        );
        p.w.copy_from_slice(values);
        Ok(())
    }

    /// The gradient of the last [`ModularFast::gradients`] call, by weight name.
    pub fn gradient(&self, name: &str) -> Option<&[f32]> {
        self.params.iter().find(|p| p.name == name).map(|p| p.g.as_slice())
    }

    /// Boosted mode's duty cycles.
    pub fn duty(&self) -> &[f32] {
        &self.state.duty
    }

    /// Forward and backward on `batch` with layer k `k`, training mode (duty cycles move);
    /// gradients land in the parameters' buffers. Returns the loss.
    pub fn gradients(&mut self, batch: &[f32], k: usize) -> anyhow::Result<f64> {
        self.pass(batch, k, None)
    }

    /// Forward and backward; with `fuse`, the weights it names are updated in the backward
    /// pass and marked `updated`, their gradients not stored.
    fn pass(&mut self, batch: &[f32], k: usize, fuse: Option<Fuse>) -> anyhow::Result<f64> {
        let rows = self.rows_of(batch)?;
        let mut ws = std::mem::take(&mut self.ws);
        let mut state = std::mem::take(&mut self.state);
        let loss = forward(self, Some(&mut state), &mut ws, batch, rows, k);
        self.state = state;
        if loss.is_finite() {
            backward(self, &mut ws, batch, fuse);
        }
        self.ws = ws;
        Ok(loss)
    }

    /// One training step: gradients and the optimiser's update, fused for small batches.
    fn train_step(&mut self, batch: &[f32], k: usize, fused: bool) -> anyhow::Result<f64> {
        let rows = self.rows_of(batch)?;
        let fuse =
            (fused && rows <= FUSE_MAX_ROWS).then(|| Fuse { optim: self.optim, t: self.t + 1 });
        let loss = self.pass(batch, k, fuse)?;
        if !loss.is_finite() {
            return Ok(loss);
        }
        self.t += 1;
        let (cfg, t) = (self.optim, self.t);
        for p in self.params.iter_mut().filter(|p| !p.updated) {
            update(&cfg, t, p);
        }
        Ok(loss)
    }

    /// Whether a pass over `rows` rows may take the sparse decoder and encoder products: not on
    /// the fused small batches (their products are already direct loops).
    fn sparse_allowed(&self, rows: usize) -> bool {
        !self.dense_only && rows > FUSE_MAX_ROWS
    }

    fn rows_of(&self, batch: &[f32]) -> anyhow::Result<usize> {
        let dim = self.dims.dim;
        anyhow::ensure!(
            !batch.is_empty() && batch.len().is_multiple_of(dim),
            "batch of {} values is not a whole number of rows of dim {dim}",
            batch.len()
        );
        Ok(batch.len() / dim)
    }
}

/// The output layer's weight: its index, and whether it is the intermediate layer's (tied).
fn output_weight(r: &Roles) -> (usize, bool) {
    match r.out_w {
        Some(wo) => (wo, false),
        None => (r.inter_w.expect("a mirror decoder has an intermediate layer"), true),
    }
}

/// The output layer as the (inter, dim) matrix the decoder multiplies by: `W_o^T`, or `W_i`
/// when tied.
fn output_t(m: &ModularFast, inter: usize, dim: usize) -> Mat<'_> {
    match output_weight(&m.roles) {
        (w, false) => Mat::t(m.w(w), inter),
        (w, true) => Mat::rows(m.w(w), dim),
    }
}

// Branch-free forms (the signs of activations are random: branches mispredict, and selects
// vectorise).
#[inline]
fn relu(v: f32) -> f32 {
    // +0.0 below zero, as candle's ReLU (top-k breaks ties among zeros by their sign).
    v * step01(v) + 0.0
}

/// 1 above zero, else 0: the ReLU's derivative (0 at 0, as PyTorch).
#[inline]
fn step01(v: f32) -> f32 {
    (v > 0.0) as u32 as f32
}

fn sign(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Parameters at least this large update in two halves at once ([`duo`]): the update is a
/// memory-bound pass, and two cores stream more than one.
const DUO_MIN_UPDATE: usize = 16 * 1024;

/// One optimiser update of `p`.
fn update(cfg: &OptimConfig, t: usize, p: &mut Param) {
    let step = StepScalars::new(cfg, t);
    let Param { w, g, m, v, .. } = p;
    if w.len() < DUO_MIN_UPDATE {
        return step.apply(w, g, m, v);
    }
    let h = w.len() / 2;
    let (w0, w1) = w.split_at_mut(h);
    let (g0, g1) = g.split_at(h);
    let (m0, m1) = m.split_at_mut(h);
    let v_half = if v.is_empty() { 0 } else { h };
    let (v0, v1) = v.split_at_mut(v_half);
    duo::join(|| step.apply(w0, g0, m0, v0), || step.apply(w1, g1, m1, v1));
}

impl Trainer for ModularFast {
    fn step(&mut self, batch: &[f32], step: usize) -> anyhow::Result<f64> {
        // The whole step runs on a rayon worker: each GEMM's parallel half then starts on a
        // thread that is already awake, instead of this thread handing every product to the
        // pool and sleeping until it is done (a dozen wake-ups per step). Small batches run
        // serially (their products are below gemm's parallel size), so they skip the hop.
        let small = batch.len() <= FUSE_MAX_ROWS * self.dims.dim;
        // With two threads the products split on the duo helper instead, which stays awake.
        if !small && rayon::current_thread_index().is_none() && !duo::is_the_pool() {
            return rayon::join(|| self.step(batch, step), || ()).0;
        }
        let k = self.cfg.layer_k_at(step);
        self.current_k = k;
        let loss = self.train_step(batch, k, true)?;
        if !loss.is_finite() {
            return Err(crate::sae::trainer::Diverged { step, value: loss }.into());
        }
        Ok(loss)
    }

    fn infer(&self, x: &[f32]) -> anyhow::Result<Inference> {
        let dim = self.dims.dim;
        let rows = self.rows_of(x)?;
        let chunk = self.cfg.batch_size.max(1);
        let mut ws = Work::default();
        let mut codes = Vec::with_capacity(rows * self.dims.n);
        let mut recon = Vec::with_capacity(x.len());
        let routing_mode = self.cfg.stripe_sparsity_mode == StripeSparsityMode::Routing;
        let mut routing = routing_mode.then(|| Vec::with_capacity(rows * self.dims.s));
        let mut loss_sum = 0.0;
        for part in x.chunks(chunk * dim) {
            let r = part.len() / dim;
            let l = forward(self, None, &mut ws, part, r, self.current_k);
            loss_sum += l * r as f64;
            codes.extend_from_slice(&ws.codes);
            recon.extend_from_slice(&ws.xhat);
            if let Some(all) = routing.as_mut() {
                all.extend_from_slice(&ws.scores[..r * self.dims.s]);
            }
        }
        let loss = if rows > 0 { loss_sum / rows as f64 } else { 0.0 };
        Ok(Inference { codes, recon, loss, routing })
    }

    fn atoms(&self) -> anyhow::Result<Vec<f32>> {
        let Dims { dim, inter, n, .. } = self.dims;
        let (mut u, mut inv) = (Vec::new(), Vec::new());
        atoms(self, &mut u, &mut inv);
        if inter == 0 {
            return Ok(u);
        }
        // Mirror decoder: decode(e_j) - decode(0) = W_o (relu(u_j + b_d) - relu(b_d)).
        let b_d = self.w(self.roles.dec_b);
        let base: Vec<f32> = b_d.iter().map(|&b| relu(b)).collect();
        for row in u.chunks_mut(inter) {
            for ((v, &b), &r0) in row.iter_mut().zip(b_d).zip(&base) {
                *v = relu(*v + b) - r0;
            }
        }
        let mut out = vec![0.0; n * dim];
        matmul(n, dim, inter, &mut out, Mat::rows(&u, inter), output_t(self, inter, dim));
        Ok(out)
    }

    fn set_output_bias(&mut self, bias: &[f32]) -> anyhow::Result<()> {
        let name = if self.dims.inter == 0 { "decoder.bias" } else { "output.bias" };
        self.set_weight(name, bias)
    }

    fn tensors(&self) -> anyhow::Result<Vec<NamedTensor>> {
        Ok(self
            .params
            .iter()
            .map(|p| NamedTensor::new(&p.name, p.shape.clone(), p.w.clone()))
            .collect())
    }

    fn eval_layer_k(&self) -> usize {
        self.current_k
    }

    fn restore(&mut self, tensors: &[NamedTensor], eval_layer_k: usize) -> anyhow::Result<()> {
        let values = self
            .params
            .iter()
            .map(|p| expect_tensor(tensors, &p.name, &p.shape).map(<[f32]>::to_vec))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for (p, w) in self.params.iter_mut().zip(values) {
            p.w = w;
            p.m.iter_mut().chain(p.v.iter_mut()).for_each(|x| *x = 0.0);
        }
        self.t = 0;
        self.current_k = eval_layer_k;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
