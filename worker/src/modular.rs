//! A hand-written training step for the modular SAE: every layer and stripe sparsity mode, the
//! intermediate layer with its mirrored decoder, tied weights, the routing gates, L1/KL/Hoyer
//! and routing-L1 penalties, and the three optimisers, without autograd.
//!
//! The candle model ([`crate::model`]) is the reference: same parameters (names, shapes,
//! layout, initialisation from [`crate::model::initial_weights`]), same forward pass, and the
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
//! JumpReLU (`z = pre * 1{pre > theta}`) takes the candle model's straight-through gradient
//! for its thresholds; the stripe-mask distortion flips the stage 2 and 3 masks with the candle
//! model's random stream ([`crate::sparsity`]), so both paths flip the same bits. Not covered
//! (the candle model trains these): AuxK and dead-latent resampling.
//! [`ineligibility`] says why a configuration is refused.

use std::path::Path;

use msae_shared::TrialConfig;
use msae_shared::config::{LayerSparsityMode, RoutingGate, StripeSparsityMode};

use crate::linalg::{Mat, matmul, matmul_add};
use crate::optim::{OptimConfig, host_update};
use crate::penalties::KL_EPS;
use crate::sparsity::{DISTORT_SEED_SALT, SparsityParams};
use crate::topk;
use crate::trainer::{Inference, Trainer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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
        let params: Vec<Param> = crate::model::initial_weights(cfg, dim)
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
        let rows = self.rows_of(batch)?;
        let mut ws = std::mem::take(&mut self.ws);
        let mut state = std::mem::take(&mut self.state);
        let loss = forward(self, Some(&mut state), &mut ws, batch, rows, k);
        self.state = state;
        backward(self, &mut ws, batch);
        self.ws = ws;
        Ok(loss)
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

/// The atoms `U` (N, out) and their inverse norms, from the decoder (or the encoder when tied).
fn atoms(m: &ModularFast, u: &mut Vec<f32>, inv_norm: &mut Vec<f32>) {
    let Dims { n, .. } = m.dims;
    let (out, src) = match m.roles.dec_w {
        // decoder.weight is (out, N): column j is atom j.
        Some(i) => {
            let w = m.w(i);
            let out = w.len() / n;
            resize(u, n * out);
            for o in 0..out {
                for j in 0..n {
                    u[j * out + o] = w[o * n + j];
                }
            }
            (out, None)
        }
        None => (m.dims.inp, Some(m.w(m.roles.enc_w))),
    };
    if let Some(w) = src {
        u.clear();
        u.extend_from_slice(w);
    }
    resize(inv_norm, n);
    for (row, inv) in u.chunks_mut(out).zip(inv_norm.iter_mut()) {
        if m.cfg.normalize_decoder {
            *inv = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() + NORM_EPS).sqrt();
            row.iter_mut().for_each(|v| *v *= *inv);
        } else {
            *inv = 1.0;
        }
    }
}

fn add_bias_relu(y: &mut [f32], b: &[f32], relu_after: bool) {
    for row in y.chunks_mut(b.len()) {
        if relu_after {
            row.iter_mut().zip(b).for_each(|(v, &bv)| *v = relu(*v + bv));
        } else {
            row.iter_mut().zip(b).for_each(|(v, &bv)| *v += bv);
        }
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

/// The distortion: each mask bit flipped with probability `p`, drawn in row-major order from
/// `rng` (the candle model's rule and stream; no draws at p = 0).
fn flip(mask: &mut [f32], p: f64, rng: &mut StdRng) {
    if p <= 0.0 {
        return;
    }
    for b in mask {
        if rng.random::<f64>() < p {
            *b = if *b != 0.0 { 0.0 } else { 1.0 };
        }
    }
}

/// Per-row means of each stripe's D values: (rows, S*D) -> (rows, S).
fn stripe_means(z: &[f32], d: usize, out: &mut Vec<f32>) {
    out.clear();
    let inv = 1.0 / d as f32;
    out.extend(z.chunks(d).map(|c| c.iter().sum::<f32>() * inv));
}

/// The forward pass over `rows` rows of `x`; fills the workspace and returns the loss
/// (reconstruction MSE plus the weighted penalties). In training (`train` given) the stripe
/// masks may be distorted and boosted duty cycles move; evaluation reads `m`'s state only.
fn forward(
    m: &ModularFast,
    train: Option<&mut TrainState>,
    ws: &mut Work,
    x: &[f32],
    rows: usize,
    k: usize,
) -> f64 {
    let cfg = &m.cfg;
    let Dims { dim, inter, inp, n, s, d } = m.dims;
    let r = m.roles;
    ws.rows = rows;
    // The stripe-mask distortion of this step (training only), as the candle model draws it.
    // Only drawn from when `distort` > 0, which needs training.
    let mut no_rng = None;
    let (duty, rng, distort) = match train {
        Some(st) => {
            let p = m.sparsity.distort_prob_at(st.train_steps);
            st.train_steps += 1;
            (Some(&mut st.duty), &mut st.distort_rng, p)
        }
        None => (None, no_rng.get_or_insert_with(|| StdRng::seed_from_u64(0)), 0.0),
    };
    // Encoder input a0.
    resize(&mut ws.a0, rows * inp);
    if inter == 0 {
        let b_dec = m.w(r.dec_b);
        for (row, xr) in ws.a0.chunks_mut(dim).zip(x.chunks(dim)) {
            for ((a, &xv), &bv) in row.iter_mut().zip(xr).zip(b_dec) {
                *a = xv - bv;
            }
        }
    } else {
        let (wi, bi) = (r.inter_w.expect("intermediate weight"), r.inter_b.expect("bias"));
        resize(&mut ws.hpre, rows * inter);
        matmul(rows, inter, dim, &mut ws.hpre, Mat::rows(x, dim), Mat::t(m.w(wi), dim));
        add_bias_relu(&mut ws.hpre, m.w(bi), false);
        ws.a0.iter_mut().zip(&ws.hpre).for_each(|(a, &h)| *a = relu(h));
    }
    // Code pre-activations and z = relu(pre) (kept in z1 until the layer mask).
    resize(&mut ws.pre, rows * n);
    matmul(rows, n, inp, &mut ws.pre, Mat::rows(&ws.a0, inp), Mat::t(m.w(r.enc_w), inp));
    add_bias_relu(&mut ws.pre, m.w(r.enc_b), false);
    resize(&mut ws.z1, rows * n);
    match r.log_threshold {
        None => ws.z1.iter_mut().zip(&ws.pre).for_each(|(z, &p)| *z = relu(p)),
        Some(lt) => {
            // JumpReLU: pre where it exceeds its neuron's threshold exp(log_threshold).
            let theta: Vec<f32> = m.w(lt).iter().map(|v| v.exp()).collect();
            let half = (cfg.jumprelu_bandwidth / 2.0) as f32;
            for (zrow, prow) in ws.z1.chunks_mut(n).zip(ws.pre.chunks(n)) {
                for ((z, &p), &t) in zrow.iter_mut().zip(prow).zip(&theta) {
                    // The sign of a zero follows the candle model's `pre * gate + coef * 0`
                    // (-0.0 only below zero inside the threshold's window), so that top-k ties
                    // among zeros (total order: -0.0 < 0.0) break alike on both paths.
                    *z = if p > t {
                        p
                    } else if p < 0.0 && (p - t).abs() < half {
                        -0.0
                    } else {
                        0.0
                    };
                }
            }
        }
    }

    // Stage 1: layer sparsity.
    resize(&mut ws.m1, rows * n);
    let layer = cfg.layer_sparsity_mode;
    match layer {
        LayerSparsityMode::None => ws.m1.fill(1.0),
        LayerSparsityMode::Ordinary => topk::row_topk_mask_into(&ws.z1, n, k, &mut ws.m1),
        LayerSparsityMode::Lifetime => {
            let keep = topk::lifetime_k(cfg.lifetime_rate, rows);
            ws.m1 = topk::col_topk_mask(&ws.z1, rows, n, keep);
        }
        LayerSparsityMode::LifetimeBatchMean => {
            let mut mean = vec![0.0f32; n];
            for row in ws.z1.chunks(n) {
                mean.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
            }
            mean.iter_mut().for_each(|v| *v /= rows as f32);
            let keep = topk::row_topk_mask(&mean, n, k);
            for row in ws.m1.chunks_mut(n) {
                row.copy_from_slice(&keep);
            }
        }
        LayerSparsityMode::Boosted => {
            let target = k as f64 / n as f64;
            let beta = cfg.boost_strength;
            let boost: Vec<f32> = duty
                .as_deref()
                .unwrap_or(&m.state.duty)
                .iter()
                .map(|&dc| (beta * (target - dc as f64)).exp() as f32)
                .collect();
            resize(&mut ws.boosted, rows * n);
            for (brow, zrow) in ws.boosted.chunks_mut(n).zip(ws.z1.chunks(n)) {
                for ((o, &z), &f) in brow.iter_mut().zip(zrow).zip(&boost) {
                    *o = z * f;
                }
            }
            topk::row_topk_mask_into(&ws.boosted, n, k, &mut ws.m1);
            if let Some(duty) = duty {
                let alpha = 1.0 / cfg.duty_cycle_period as f32;
                let mut frac = vec![0.0f32; n];
                for row in ws.m1.chunks(n) {
                    frac.iter_mut().zip(row).for_each(|(f, &w)| *f += w);
                }
                for (dc, f) in duty.iter_mut().zip(frac) {
                    *dc += alpha * (f / rows as f32 - *dc);
                }
            }
        }
    }
    if layer != LayerSparsityMode::None {
        ws.z1.iter_mut().zip(&ws.m1).for_each(|(z, &mk)| *z *= mk);
    }

    // Stage 2: stripe sparsity; `gate` (rows, S) multiplies each stripe.
    resize(&mut ws.gate, rows * s);
    resize(&mut ws.ms, rows * s);
    match cfg.stripe_sparsity_mode {
        StripeSparsityMode::None => {
            ws.gate.fill(1.0);
            ws.ms.fill(1.0);
        }
        StripeSparsityMode::Ordinary => {
            stripe_means(&ws.z1, d, &mut ws.means);
            topk::row_topk_mask_into(&ws.means, s, cfg.stripe_k, &mut ws.ms);
            flip(&mut ws.ms, distort, rng);
            ws.gate.copy_from_slice(&ws.ms);
        }
        StripeSparsityMode::Routing => {
            let (rw, rb) = (r.router_w.expect("router weight"), r.router_b.expect("router bias"));
            resize(&mut ws.scores, rows * s);
            matmul(rows, s, inp, &mut ws.scores, Mat::rows(&ws.a0, inp), Mat::t(m.w(rw), inp));
            add_bias_relu(&mut ws.scores, m.w(rb), false);
            topk::row_topk_mask_into(&ws.scores, s, cfg.stripe_k, &mut ws.ms);
            flip(&mut ws.ms, distort, rng);
            match cfg.routing_gate {
                RoutingGate::Scores => {
                    for ((g, &sc), &mk) in ws.gate.iter_mut().zip(&ws.scores).zip(&ws.ms) {
                        *g = sc * mk;
                    }
                }
                RoutingGate::StraightThrough => ws.gate.copy_from_slice(&ws.ms),
            }
        }
    }
    resize(&mut ws.codes, rows * n);
    for ((c, z), &g) in ws.codes.chunks_mut(d).zip(ws.z1.chunks(d)).zip(&ws.gate) {
        c.iter_mut().zip(z).for_each(|(c, &z)| *c = z * g);
    }

    // Stage 3: each stripe active only for its ceil(p * B) highest-mean samples.
    resize(&mut ws.m3, rows * s);
    if cfg.active_stripes_per_batch < 1.0 {
        stripe_means(&ws.codes, d, &mut ws.means);
        let keep = topk::lifetime_k(cfg.active_stripes_per_batch, rows);
        ws.m3 = topk::col_topk_mask(&ws.means, rows, s, keep);
        flip(&mut ws.m3, distort, rng);
        for (c, &mk) in ws.codes.chunks_mut(d).zip(&ws.m3) {
            c.iter_mut().for_each(|v| *v *= mk);
        }
    } else {
        ws.m3.fill(1.0);
    }

    // Decoder.
    atoms(m, &mut ws.u, &mut ws.inv_norm);
    let out = ws.u.len() / n;
    resize(&mut ws.yd, rows * out);
    matmul(rows, out, n, &mut ws.yd, Mat::rows(&ws.codes, n), Mat::rows(&ws.u, out));
    resize(&mut ws.outp, rows * dim);
    if inter == 0 {
        ws.outp.copy_from_slice(&ws.yd);
        add_bias_relu(&mut ws.outp, m.w(r.dec_b), false);
    } else {
        add_bias_relu(&mut ws.yd, m.w(r.dec_b), true); // now hd = relu(yd)
        let hd = &ws.yd;
        matmul(rows, dim, inter, &mut ws.outp, Mat::rows(hd, inter), output_t(m, inter, dim));
        add_bias_relu(&mut ws.outp, m.w(r.out_b.expect("output bias")), false);
    }
    resize(&mut ws.xhat, rows * dim);
    let out_relu = cfg.output_relu;
    ws.xhat.iter_mut().zip(&ws.outp).for_each(|(h, &o)| *h = if out_relu { relu(o) } else { o });

    // Loss.
    let total = (rows * dim) as f64;
    let sse: f64 = ws.xhat.iter().zip(x).map(|(&h, &xv)| ((h - xv) as f64).powi(2)).sum();
    let mut loss = sse / total;
    loss += penalties(cfg, &ws.codes, rows, n, None);
    if let (true, Some(rw)) = (cfg.routing_l1_regularization > 0.0, r.router_w) {
        let l1: f64 = m.w(rw).iter().map(|v| v.abs() as f64).sum();
        loss += cfg.routing_l1_regularization * l1;
    }
    loss
}

/// The weighted L1, KL and Hoyer penalties of the codes `c` (rows, n); with `grad`, adds their
/// gradient with respect to `c` into it.
fn penalties(
    cfg: &TrialConfig,
    c: &[f32],
    rows: usize,
    n: usize,
    mut grad: Option<&mut [f32]>,
) -> f64 {
    let mut total = 0.0;
    let count = (rows * n) as f64;
    if cfg.l1_weight > 0.0 {
        let sum: f64 = c.iter().map(|v| v.abs() as f64).sum();
        total += cfg.l1_weight * sum / count;
        if let Some(g) = grad.as_deref_mut() {
            let w = (cfg.l1_weight / count) as f32;
            g.iter_mut().zip(c).for_each(|(g, &v)| *g += w * sign(v));
        }
    }
    if cfg.kl_weight > 0.0 {
        let rho = cfg.kl_target;
        let (lo, hi) = (KL_EPS as f32, (1.0 - KL_EPS) as f32);
        let mut rate = vec![0.0f32; n];
        for row in c.chunks(n) {
            rate.iter_mut().zip(row).for_each(|(r, &v)| *r += v.clamp(0.0, 1.0));
        }
        rate.iter_mut().for_each(|r| *r /= rows as f32);
        let constant = rho * rho.ln() + (1.0 - rho) * (1.0 - rho).ln();
        let mut sum = 0.0;
        let mut coef = vec![0.0f32; n];
        for (r, cf) in rate.iter().zip(coef.iter_mut()) {
            let rc = r.clamp(lo, hi) as f64;
            sum += constant - rho * rc.ln() - (1.0 - rho) * (1.0 - rc).ln();
            if *r > lo && *r < hi {
                let d = -rho / rc + (1.0 - rho) / (1.0 - rc);
                *cf = (cfg.kl_weight * d / n as f64 / rows as f64) as f32;
            }
        }
        total += cfg.kl_weight * sum / n as f64;
        if let Some(g) = grad.as_deref_mut() {
            for (grow, crow) in g.chunks_mut(n).zip(c.chunks(n)) {
                for ((g, &v), &cf) in grow.iter_mut().zip(crow).zip(&coef) {
                    if v > 0.0 && v < 1.0 {
                        *g += cf;
                    }
                }
            }
        }
    }
    if cfg.hoyer_weight > 0.0 && n > 1 {
        let sqrt_n = (n as f64).sqrt();
        let mut sum = 0.0;
        let scale = cfg.hoyer_weight / (rows as f64 * (sqrt_n - 1.0));
        for (b, row) in c.chunks(n).enumerate() {
            let l1: f64 = row.iter().map(|v| v.abs() as f64).sum();
            let sumsq: f64 = row.iter().map(|v| (*v as f64).powi(2)).sum();
            if sumsq == 0.0 {
                sum += 0.0; // (0 + 1) / sqrt(0 + 1) - 1
                continue;
            }
            let l2 = sumsq.sqrt();
            sum += (l1 / l2 - 1.0) / (sqrt_n - 1.0);
            if let Some(g) = grad.as_deref_mut() {
                let grow = &mut g[b * n..(b + 1) * n];
                let l2_3 = l2 * sumsq;
                for (g, &v) in grow.iter_mut().zip(row) {
                    *g += (scale * (sign(v) as f64 / l2 - l1 * v as f64 / l2_3)) as f32;
                }
            }
        }
        total += cfg.hoyer_weight * sum / rows as f64;
    }
    total
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

/// Sums the rows of `g` (rows, cols) into `out` (cols), adding `sign * sum`.
fn add_col_sums(g: &[f32], cols: usize, sign: f32, out: &mut [f32]) {
    for row in g.chunks(cols) {
        out.iter_mut().zip(row).for_each(|(o, &v)| *o += sign * v);
    }
}

/// The backward pass of the last [`forward`] (training mode) on `x`: gradients of the loss
/// into every parameter's `g`.
fn backward(m: &mut ModularFast, ws: &mut Work, x: &[f32]) {
    let cfg = m.cfg.clone();
    let Dims { dim, inter, inp, n, s, d } = m.dims;
    let r = m.roles;
    let rows = ws.rows;
    // Biases accumulate; every weight's gradient is written whole by its first product.
    for p in m.params.iter_mut().filter(|p| p.shape.len() == 1) {
        p.g.fill(0.0);
    }
    let tied = r.dec_w.is_none();
    // dL/dx_hat, through the output ReLU.
    resize(&mut ws.g, rows * dim);
    let scale = 2.0 / (rows * dim) as f32;
    if cfg.output_relu {
        for (((g, &h), &xv), &o) in ws.g.iter_mut().zip(&ws.xhat).zip(x).zip(&ws.outp) {
            *g = scale * (h - xv) * step01(o);
        }
    } else {
        ws.g.iter_mut().zip(&ws.xhat).zip(x).for_each(|((g, &h), &xv)| *g = scale * (h - xv));
    }
    let out = ws.u.len() / n;
    // dL/dy (rows, out): the decoder's linear part.
    if inter == 0 {
        add_col_sums(&ws.g, dim, 1.0, &mut m.params[r.dec_b].g);
    } else {
        let ob = r.out_b.expect("output bias");
        add_col_sums(&ws.g, dim, 1.0, &mut m.params[ob].g);
        let hd = &ws.yd;
        resize(&mut ws.g_hd, rows * inter);
        // dL/dhd = g W_out, with W_out (dim, inter) the transpose of the forward's view.
        let w_out = output_t(m, inter, dim).transposed();
        matmul(rows, inter, dim, &mut ws.g_hd, Mat::rows(&ws.g, dim), w_out);
        let (w, tied_out) = output_weight(&r);
        // Its gradient g^T hd, stored in the weight's own layout.
        let grad = &mut m.params[w].g;
        if tied_out {
            matmul(inter, dim, rows, grad, Mat::t(hd, inter), Mat::rows(&ws.g, dim));
        } else {
            matmul(dim, inter, rows, grad, Mat::t(&ws.g, dim), Mat::rows(hd, inter));
        }
        ws.g_hd.iter_mut().zip(hd).for_each(|(gh, &h)| *gh *= step01(h));
        add_col_sums(&ws.g_hd, inter, 1.0, &mut m.params[r.dec_b].g);
        std::mem::swap(&mut ws.g, &mut ws.g_hd); // ws.g is now dL/dy (rows, inter)
    }
    let g_y = &ws.g;
    // Atoms and codes.
    resize(&mut ws.g_u, n * out);
    matmul(n, out, rows, &mut ws.g_u, Mat::t(&ws.codes, n), Mat::rows(g_y, out));
    resize(&mut ws.g_c, rows * n);
    matmul(rows, n, out, &mut ws.g_c, Mat::rows(g_y, out), Mat::t(&ws.u, out));
    penalties(&cfg, &ws.codes, rows, n, Some(&mut ws.g_c));
    if cfg.normalize_decoder {
        for ((gu, uj), &inv) in ws.g_u.chunks_mut(out).zip(ws.u.chunks(out)).zip(&ws.inv_norm) {
            let c: f32 = gu.iter().zip(uj).map(|(a, b)| a * b).sum();
            gu.iter_mut().zip(uj).for_each(|(g, &uv)| *g = (*g - c * uv) * inv);
        }
    }
    match r.dec_w {
        Some(dw) => {
            let g = &mut m.params[dw].g;
            for j in 0..n {
                for o in 0..out {
                    g[o * n + j] = ws.g_u[j * out + o];
                }
            }
        }
        None => {
            m.params[r.enc_w].g.copy_from_slice(&ws.g_u);
        }
    }
    // Sparsity stages: the router's scores, then dL/dz through the gates and the ReLU.
    if cfg.stripe_sparsity_mode == StripeSparsityMode::Routing {
        resize(&mut ws.g_r, rows * s);
        for (((gr, gc), z1), (&mk, &m3)) in ws
            .g_r
            .iter_mut()
            .zip(ws.g_c.chunks(d))
            .zip(ws.z1.chunks(d))
            .zip(ws.ms.iter().zip(&ws.m3))
        {
            let dot: f32 = gc.iter().zip(z1).map(|(a, b)| a * b).sum();
            *gr = mk * m3 * dot;
        }
    }
    for ((gc, &g), &m3) in ws.g_c.chunks_mut(d).zip(&ws.gate).zip(&ws.m3) {
        let gate = g * m3;
        gc.iter_mut().for_each(|v| *v *= gate);
    }
    if cfg.layer_sparsity_mode != LayerSparsityMode::None {
        ws.g_c.iter_mut().zip(&ws.m1).for_each(|(v, &mk)| *v *= mk);
    }
    // dL/dz is in g_c; through the activation to dL/dpre.
    match r.log_threshold {
        None => ws.g_c.iter_mut().zip(&ws.pre).for_each(|(v, &p)| *v *= step01(p)),
        Some(lt) => {
            // Straight-through threshold gradient (see the candle model): d z / d theta =
            // -(theta / eps) 1{|pre - theta| < eps / 2}, and d theta / d log_threshold = theta.
            let eps = cfg.jumprelu_bandwidth as f32;
            let theta: Vec<f32> = m.params[lt].w.iter().map(|v| v.exp()).collect();
            let g_lt = &mut m.params[lt].g;
            g_lt.fill(0.0);
            for (grow, prow) in ws.g_c.chunks_mut(n).zip(ws.pre.chunks(n)) {
                for (((v, &p), &t), gl) in
                    grow.iter_mut().zip(prow).zip(&theta).zip(g_lt.iter_mut())
                {
                    if (p - t).abs() < eps / 2.0 {
                        *gl -= *v * t * t / eps;
                    }
                    if p <= t {
                        *v = 0.0;
                    }
                }
            }
        }
    }
    let g_pre = &ws.g_c;
    // Encoder (and the router, which reads the same input).
    add_col_sums(g_pre, n, 1.0, &mut m.params[r.enc_b].g);
    let enc = if tied { matmul_add } else { matmul };
    enc(n, inp, rows, &mut m.params[r.enc_w].g, Mat::t(g_pre, n), Mat::rows(&ws.a0, inp));
    resize(&mut ws.g_a0, rows * inp);
    matmul(rows, inp, n, &mut ws.g_a0, Mat::rows(g_pre, n), Mat::rows(&m.params[r.enc_w].w, inp));
    if let (Some(rw), Some(rb)) = (r.router_w, r.router_b) {
        add_col_sums(&ws.g_r, s, 1.0, &mut m.params[rb].g);
        matmul(s, inp, rows, &mut m.params[rw].g, Mat::t(&ws.g_r, s), Mat::rows(&ws.a0, inp));
        matmul_add(
            rows,
            inp,
            s,
            &mut ws.g_a0,
            Mat::rows(&ws.g_r, s),
            Mat::rows(&m.params[rw].w, inp),
        );
        if cfg.routing_l1_regularization > 0.0 {
            let c = cfg.routing_l1_regularization as f32;
            let p = &mut m.params[rw];
            p.g.iter_mut().zip(&p.w).for_each(|(g, &w)| *g += c * sign(w));
        }
    }
    if inter == 0 {
        // a0 = x - b_dec.
        add_col_sums(&ws.g_a0, dim, -1.0, &mut m.params[r.dec_b].g);
    } else {
        let (wi, bi) = (r.inter_w.expect("intermediate weight"), r.inter_b.expect("bias"));
        ws.g_a0.iter_mut().zip(&ws.hpre).for_each(|(g, &h)| *g *= step01(h));
        add_col_sums(&ws.g_a0, inter, 1.0, &mut m.params[bi].g);
        // Tied: the output layer's part is already there.
        let first = if tied { matmul_add } else { matmul };
        first(inter, dim, rows, &mut m.params[wi].g, Mat::t(&ws.g_a0, inter), Mat::rows(x, dim));
    }
}

/// Elements per parallel piece of an optimiser update; smaller parameters update serially.
const UPDATE_CHUNK: usize = 1 << 30;

/// One optimiser update of `p`, large parameters in parallel pieces (the update is a
/// memory-bound pass, and two cores stream more than one).
fn update(cfg: &OptimConfig, t: usize, p: &mut Param) {
    use rayon::prelude::*;
    if p.w.len() < 2 * UPDATE_CHUNK {
        host_update(cfg, t, &mut p.w, &p.g, &mut p.m, &mut p.v);
        return;
    }
    let pieces = p.w.par_chunks_mut(UPDATE_CHUNK).zip(p.g.par_chunks(UPDATE_CHUNK));
    let pieces = pieces.zip(p.m.par_chunks_mut(UPDATE_CHUNK));
    if p.v.is_empty() {
        pieces.for_each(|((w, g), m)| host_update(cfg, t, w, g, m, &mut []));
    } else {
        pieces
            .zip(p.v.par_chunks_mut(UPDATE_CHUNK))
            .for_each(|(((w, g), m), v)| host_update(cfg, t, w, g, m, v));
    }
}

impl Trainer for ModularFast {
    fn step(&mut self, batch: &[f32], step: usize) -> anyhow::Result<f64> {
        // The whole step runs on a rayon worker: each GEMM's parallel half then starts on a
        // thread that is already awake, instead of this thread handing every product to the
        // pool and sleeping until it is done (a dozen wake-ups per step).
        if rayon::current_thread_index().is_none() {
            return rayon::join(|| self.step(batch, step), || ()).0;
        }
        let k = self.cfg.layer_k_at(step);
        self.current_k = k;
        let loss = self.gradients(batch, k)?;
        if !loss.is_finite() {
            return Err(crate::trainer::Diverged { step, value: loss }.into());
        }
        self.t += 1;
        let (cfg, t) = (self.optim, self.t);
        for p in &mut self.params {
            update(&cfg, t, p);
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
        let mut loss_sum = 0.0;
        for part in x.chunks(chunk * dim) {
            let r = part.len() / dim;
            let l = forward(self, None, &mut ws, part, r, self.current_k);
            loss_sum += l * r as f64;
            codes.extend_from_slice(&ws.codes);
            recon.extend_from_slice(&ws.xhat);
        }
        Ok(Inference { codes, recon, loss: if rows > 0 { loss_sum / rows as f64 } else { 0.0 } })
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

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut tensors = std::collections::HashMap::new();
        for p in &self.params {
            let t = candle_core::Tensor::from_slice(
                &p.w,
                p.shape.as_slice(),
                &candle_core::Device::Cpu,
            )?;
            tensors.insert(p.name.clone(), t);
        }
        candle_core::safetensors::save(&tensors, path)
            .map_err(|e| anyhow::anyhow!("writing weights to {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModularSae;
    use candle_core::{Device, Tensor};
    use msae_shared::config::{Activation, Optimizer};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn base(dim: usize) -> TrialConfig {
        let mut cfg = TrialConfig {
            num_stripes: 6,
            stripe_dim: 3,
            layer_k: 7,
            stripe_k: 2,
            batch_size: 10,
            ..Default::default()
        };
        cfg.data.synthetic.input_dim = dim;
        cfg
    }

    /// The model with every weight perturbed (biases off zero, so no ReLU sits exactly at 0),
    /// and the candle model holding the same weights.
    fn pair(cfg: &TrialConfig, dim: usize, seed: u64) -> (ModularFast, ModularSae) {
        let mut fast = ModularFast::new(cfg, dim).unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        let names: Vec<(String, usize)> =
            fast.weights().map(|(n, _, w)| (n.to_string(), w.len())).collect();
        for (name, len) in &names {
            let w: Vec<f32> = fast.weights().find(|(n, _, _)| n == name).unwrap().2.to_vec();
            let v: Vec<f32> =
                w.iter().take(*len).map(|&x| x + rng.random_range(-0.3..0.3)).collect();
            fast.set_weight(name, &v).unwrap();
        }
        let model = ModularSae::new(cfg, dim, &Device::Cpu).unwrap();
        for (name, shape, w) in fast.weights() {
            let t = Tensor::from_slice(w, shape, &Device::Cpu).unwrap();
            model.var(name).unwrap().set(&t).unwrap();
        }
        (fast, model)
    }

    fn batch(rows: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..rows * dim).map(|_| rng.random_range(-1.0f32..1.5)).collect()
    }

    fn close(name: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{name}: length");
        let scale = want.iter().fold(1e-3f32, |a, v| a.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 2e-3 * scale, "{name}[{i}]: {g} vs {w} (scale {scale})");
        }
    }

    /// Loss and every gradient of one training step equal candle autograd's.
    fn check(cfg: &TrialConfig) {
        let dim = 5;
        let (mut fast, mut model) = pair(cfg, dim, 7);
        let rows = cfg.batch_size;
        let x = batch(rows, dim, 11);
        let k = cfg.layer_k;
        let loss = fast.gradients(&x, k).unwrap();
        let xt = Tensor::from_slice(&x, (rows, dim), &Device::Cpu).unwrap();
        let out = model.forward_train(&xt, k).unwrap();
        let want = model.loss(&xt, &out).unwrap();
        let grads = want.backward().unwrap();
        let want = want.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (loss - want).abs() <= 1e-4 * want.abs().max(1.0),
            "loss {loss} vs {want} for {cfg:?}"
        );
        let codes: Vec<f32> = out.codes.flatten_all().unwrap().to_vec1().unwrap();
        close("codes", &fast.ws.codes, &codes);
        for (name, var) in model.vars() {
            let g: Vec<f32> = match grads.get(var.as_tensor()) {
                Some(g) => g.flatten_all().unwrap().to_vec1().unwrap(),
                None => vec![0.0; var.elem_count()],
            };
            close(
                &format!("{name} ({:?}/{:?})", cfg.layer_sparsity_mode, cfg.stripe_sparsity_mode),
                fast.gradient(&name).unwrap(),
                &g,
            );
        }
        close("duty", fast.duty(), &model.sparsity.duty);
        // The comparison is not vacuous: the gradients that should flow do.
        let nonzero = |name: &str| fast.gradient(name).unwrap().iter().any(|v| *v != 0.0);
        assert!(nonzero("encoder.weight") && nonzero("decoder.bias"), "{cfg:?}");
        if cfg.stripe_sparsity_mode == StripeSparsityMode::Routing {
            assert!(nonzero("router.weight"), "{cfg:?}");
        }
    }

    #[test]
    fn gradients_match_candle_autograd_in_every_mode() {
        let layers = [
            LayerSparsityMode::None,
            LayerSparsityMode::Ordinary,
            LayerSparsityMode::Lifetime,
            LayerSparsityMode::LifetimeBatchMean,
            LayerSparsityMode::Boosted,
        ];
        let stripes =
            [StripeSparsityMode::None, StripeSparsityMode::Ordinary, StripeSparsityMode::Routing];
        for inter in [0, 4] {
            for layer in layers {
                for stripe in stripes {
                    let cfg = TrialConfig {
                        intermediate_dim: inter,
                        layer_sparsity_mode: layer,
                        stripe_sparsity_mode: stripe,
                        lifetime_rate: 0.3,
                        ..base(5)
                    };
                    check(&cfg);
                }
            }
        }
    }

    #[test]
    fn gradients_match_with_gates_penalties_tied_weights_and_options() {
        let routing = TrialConfig {
            stripe_sparsity_mode: StripeSparsityMode::Routing,
            layer_sparsity_mode: LayerSparsityMode::Ordinary,
            ..base(5)
        };
        let variants = [
            TrialConfig { routing_gate: RoutingGate::StraightThrough, ..routing.clone() },
            TrialConfig { routing_l1_regularization: 0.01, ..routing.clone() },
            TrialConfig { active_stripes_per_batch: 0.4, ..routing.clone() },
            TrialConfig { l1_weight: 0.3, kl_weight: 0.2, hoyer_weight: 0.4, ..routing.clone() },
            TrialConfig { tied_weights: true, ..routing.clone() },
            TrialConfig { distort_prob: 0.4, active_stripes_per_batch: 0.5, ..routing.clone() },
            TrialConfig {
                distort_prob: 0.3,
                stripe_sparsity_mode: StripeSparsityMode::Ordinary,
                ..routing.clone()
            },
            TrialConfig {
                activation: Activation::JumpRelu,
                jumprelu_threshold: 0.2,
                jumprelu_bandwidth: 0.5,
                ..routing.clone()
            },
            TrialConfig {
                activation: Activation::JumpRelu,
                jumprelu_threshold: 0.2,
                jumprelu_bandwidth: 0.5,
                intermediate_dim: 4,
                layer_sparsity_mode: LayerSparsityMode::Boosted,
                ..routing.clone()
            },
            TrialConfig { tied_weights: true, intermediate_dim: 4, ..routing.clone() },
            TrialConfig { normalize_decoder: false, intermediate_dim: 4, ..routing.clone() },
            TrialConfig { output_relu: true, intermediate_dim: 4, ..routing.clone() },
            TrialConfig {
                output_relu: true,
                tied_weights: true,
                intermediate_dim: 4,
                l1_weight: 0.1,
                kl_weight: 0.1,
                hoyer_weight: 0.1,
                active_stripes_per_batch: 0.5,
                ..routing.clone()
            },
        ];
        for cfg in variants {
            check(&cfg);
        }
    }

    #[test]
    fn training_follows_the_candle_trainer() {
        // Same init, same batches: a few optimiser steps of each kind stay together.
        for optimizer in [Optimizer::Sgd, Optimizer::Adam, Optimizer::Adamw] {
            let cfg = TrialConfig {
                intermediate_dim: 4,
                layer_sparsity_mode: LayerSparsityMode::Ordinary,
                stripe_sparsity_mode: StripeSparsityMode::Routing,
                optimizer,
                lr: 1e-3,
                momentum: 0.9,
                weight_decay: 0.01,
                distort_prob: 0.3,
                distort_prob_decay: 0.1,
                run_steps_per_epoch: 2,
                ..base(5)
            };
            let mut fast = ModularFast::new(&cfg, 5).unwrap();
            let mut candle = crate::model::CandleTrainer::new(&cfg, 5, &Device::Cpu).unwrap();
            for step in 0..4 {
                let x = batch(cfg.batch_size, 5, step as u64);
                let a = fast.step(&x, step).unwrap();
                let b = candle.step(&x, step).unwrap();
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "{optimizer:?} step {step}: {a} vs {b}"
                );
            }
            let x = batch(30, 5, 99);
            let (a, b) = (fast.infer(&x).unwrap(), candle.infer(&x).unwrap());
            close("codes", &a.codes, &b.codes);
            close("recon", &a.recon, &b.recon);
            close("atoms", &fast.atoms().unwrap(), &candle.atoms().unwrap());
        }
    }

    #[test]
    fn saves_in_the_candle_layout() {
        let cfg = TrialConfig {
            intermediate_dim: 4,
            stripe_sparsity_mode: StripeSparsityMode::Routing,
            ..base(5)
        };
        let fast = ModularFast::new(&cfg, 5).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        fast.save(&path).unwrap();
        let loaded = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let model = ModularSae::new(&cfg, 5, &Device::Cpu).unwrap();
        assert_eq!(loaded.len(), model.vars().len());
        for (name, var) in model.vars() {
            assert_eq!(loaded[&name].dims(), var.dims(), "{name}");
        }
    }

    #[test]
    fn eligibility() {
        assert!(eligible(&TrialConfig::default()));
        assert!(eligible(&TrialConfig { activation: Activation::JumpRelu, ..Default::default() }));
        assert!(!eligible(&TrialConfig { aux_k: 8, ..Default::default() }));
        assert!(!eligible(&TrialConfig { resample_dead_every: 10, ..Default::default() }));
        assert!(eligible(&TrialConfig { distort_prob: 0.4, ..Default::default() }));
    }
}
