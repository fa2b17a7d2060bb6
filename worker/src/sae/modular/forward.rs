//! The forward pass of the modular step: encoder, the three sparsity stages, decoder, loss.

use msae_shared::config::{LayerSparsityMode, RoutingGate, StripeSparsityMode};

use super::penalty::penalties;
use super::{Dims, ModularFast, NORM_EPS, TrainState, Work, output_t, relu, resize};
use crate::sae::kernels::simd_dispatch;
use crate::sae::linalg::{Mat, matmul};
use crate::sae::skinny::combine_rows;
use crate::sae::topk;
use crate::sae::{duo, kernels};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The decoder weight when the atoms are its columns as stored (untied, not normalised): the
/// passes then read `U = W_d^T` in place instead of building it with [`atoms`].
pub(super) fn stored_atoms(m: &ModularFast) -> Option<usize> {
    m.roles.dec_w.filter(|_| !m.cfg.normalize_decoder)
}

/// The atoms `U` (N, out) and their inverse norms, from the decoder (or the encoder when tied).
pub(super) fn atoms(m: &ModularFast, u: &mut Vec<f32>, inv_norm: &mut Vec<f32>) {
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

pub(super) fn add_bias_relu(y: &mut [f32], b: &[f32], relu_after: bool) {
    for row in y.chunks_mut(b.len()) {
        if relu_after {
            row.iter_mut().zip(b).for_each(|(v, &bv)| *v = relu(*v + bv));
        } else {
            row.iter_mut().zip(b).for_each(|(v, &bv)| *v += bv);
        }
    }
}

/// The output layer's element-wise pass: `outp += bias`, `xhat = relu(outp)` (or `outp`), and
/// the squared error against `x`. Large batches run it in two halves of rows at once
/// ([`duo`]), each with its own sum.
fn output_pass(outp: &mut [f32], xhat: &mut [f32], x: &[f32], bias: &[f32], relu_out: bool) -> f64 {
    let pass = |outp: &mut [f32], xhat: &mut [f32], x: &[f32]| {
        add_bias_relu(outp, bias, false);
        xhat.iter_mut().zip(&*outp).for_each(|(h, &o)| *h = if relu_out { relu(o) } else { o });
        kernels::sq_dist(xhat, x)
    };
    let rows = outp.len() / bias.len();
    if outp.len() < DUO_MIN_PASS || rows < 2 {
        return pass(outp, xhat, x);
    }
    let h = rows / 2 * bias.len();
    let (o0, o1) = outp.split_at_mut(h);
    let (h0, h1) = xhat.split_at_mut(h);
    let (x0, x1) = x.split_at(h);
    let (a, b) = duo::join(|| pass(o0, h0, x0), || pass(o1, h1, x1));
    a + b
}

/// Element-wise passes over at least this many values split across the two cores.
pub(super) const DUO_MIN_PASS: usize = 16 * 1024;

/// The distortion: each mask bit flipped with probability `p`, drawn in row-major order from
/// `rng` (the candle model's rule and stream; no draws at p = 0).
pub(super) fn flip(mask: &mut [f32], p: f64, rng: &mut StdRng) {
    if p <= 0.0 {
        return;
    }
    for b in mask {
        if rng.random::<f64>() < p {
            *b = if *b != 0.0 { 0.0 } else { 1.0 };
        }
    }
}

/// Lists, per row, the codes every mask lets through (`m1 * ms * m3 != 0`, the stripe mask
/// rather than the routing gate: a stripe routed with a zero score still passes gradient to
/// its score). Every other code is zero, and so is its gradient. Sets `ws.sparse` when the
/// decoder and encoder products should take only these: `allowed`, and a quarter of the codes
/// or fewer.
pub(super) fn mark_active(ws: &mut Work, rows: usize, n: usize, d: usize, allowed: bool) {
    ws.active.clear();
    ws.active_at.clear();
    ws.sparse = false;
    if !allowed {
        // Nothing reads the lists then (small batches run the dense products).
        return;
    }
    ws.active_at.push(0);
    for b in 0..rows {
        let stripes = ws.ms[b * (n / d)..].iter().zip(&ws.m3[b * (n / d)..]);
        for (st, (&ms, &m3)) in stripes.take(n / d).enumerate() {
            if ms == 0.0 || m3 == 0.0 {
                continue;
            }
            for j in st * d..(st + 1) * d {
                if ws.m1[b * n + j] != 0.0 {
                    ws.active.push(j as u32);
                }
            }
        }
        ws.active_at.push(ws.active.len());
    }
    ws.sparse = ws.active.len() * 4 <= rows * n;
}

/// `y[b, :] = sum_j c[b, j] U[j, :]` over row `b`'s active codes, `U` (N, out) row-major.
fn sparse_decode(ws: &mut Work, rows: usize, n: usize, out: usize) {
    let Work { active, active_at, codes, u, yd, .. } = ws;
    let (mut refs, mut coef) = (Vec::new(), Vec::new());
    for b in 0..rows {
        refs.clear();
        coef.clear();
        for &j in &active[active_at[b]..active_at[b + 1]] {
            let j = j as usize;
            refs.push(&u[j * out..(j + 1) * out]);
            coef.push(codes[b * n + j]);
        }
        combine_rows(&mut yd[b * out..(b + 1) * out], &refs, &coef, false);
    }
}

/// Per-row means of each stripe's D values: (rows, S*D) -> (rows, S).
pub(super) fn stripe_means(z: &[f32], d: usize, out: &mut Vec<f32>) {
    out.clear();
    let inv = 1.0 / d as f32;
    out.extend(z.chunks(d).map(|c| c.iter().sum::<f32>() * inv));
}

// The forward pass, also compiled for AVX2+FMA: its element-wise passes (biases, ReLUs, masks)
// over the whole batch are a tenth of a batch-256 step, and the portable build runs them 4
// lanes wide.
simd_dispatch!(pub(super) fn forward, forward_body, (m: &ModularFast, train: Option<&mut TrainState>, ws: &mut Work, x: &[f32], rows: usize, k: usize) -> f64);

/// The forward pass over `rows` rows of `x`; fills the workspace and returns the loss
/// (reconstruction MSE plus the weighted penalties). In training (`train` given) the stripe
/// masks may be distorted and boosted duty cycles move; evaluation reads `m`'s state only.
#[inline(always)]
fn forward_body(
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

    mark_active(ws, rows, n, d, m.sparse_allowed(rows));

    // Decoder.
    let out = inp;
    resize(&mut ws.yd, rows * out);
    if ws.sparse {
        // The atoms as rows, each active code's one read whole.
        atoms(m, &mut ws.u, &mut ws.inv_norm);
        sparse_decode(ws, rows, n, out);
    } else {
        let u = match stored_atoms(m) {
            Some(dw) => Mat::t(m.w(dw), n),
            None => {
                atoms(m, &mut ws.u, &mut ws.inv_norm);
                Mat::rows(&ws.u, out)
            }
        };
        matmul(rows, out, n, &mut ws.yd, Mat::rows(&ws.codes, n), u);
    }
    resize(&mut ws.outp, rows * dim);
    let out_bias = if inter == 0 {
        ws.outp.copy_from_slice(&ws.yd);
        m.w(r.dec_b)
    } else {
        add_bias_relu(&mut ws.yd, m.w(r.dec_b), true); // now hd = relu(yd)
        let hd = &ws.yd;
        matmul(rows, dim, inter, &mut ws.outp, Mat::rows(hd, inter), output_t(m, inter, dim));
        m.w(r.out_b.expect("output bias"))
    };
    resize(&mut ws.xhat, rows * dim);
    let sse = output_pass(&mut ws.outp, &mut ws.xhat, x, out_bias, cfg.output_relu);

    // Loss.
    let total = (rows * dim) as f64;
    let mut loss = sse / total;
    loss += penalties(cfg, &ws.codes, rows, n, None);
    if let (true, Some(rw)) = (cfg.routing_l1_regularization > 0.0, r.router_w) {
        let l1: f64 = m.w(rw).iter().map(|v| v.abs() as f64).sum();
        loss += cfg.routing_l1_regularization * l1;
    }
    loss
}
