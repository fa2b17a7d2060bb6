//! The backward pass of the modular step: the gradient of the loss into every parameter.

use msae_shared::config::{LayerSparsityMode, StripeSparsityMode};

use super::forward::DUO_MIN_PASS;
use super::penalty::penalties;
use super::{Dims, Fuse, ModularFast, Param, Work, output_t, output_weight, resize, sign, step01};
use crate::sae::duo;
use crate::sae::kernels::{axpy, dot, simd_dispatch};
use crate::sae::linalg::{Mat, join, matmul, matmul_add};
use crate::sae::optim::StepScalars;
use crate::sae::skinny::{combine_rows, product_rows};

/// Sums the rows of `g` (rows, cols) into `out` (cols), adding `sign * sum`.
pub(super) fn add_col_sums(g: &[f32], cols: usize, sign: f32, out: &mut [f32]) {
    for row in g.chunks(cols) {
        out.iter_mut().zip(row).for_each(|(o, &v)| *o += sign * v);
    }
}

/// `ws.g` = dL/dx_hat through the output ReLU (from `ws.xhat`, `ws.outp` and `x`), and its
/// column sums added to `bias_g`. Large batches run it in two halves of rows at once
/// ([`duo`]); the second half's sums go through a buffer, added after the first's.
fn output_grad(ws: &mut Work, x: &[f32], relu_out: bool, bias_g: &mut [f32]) {
    let dim = bias_g.len();
    let scale = 2.0 / ws.g.len() as f32;
    let pass = |g: &mut [f32], xhat: &[f32], x: &[f32], outp: &[f32], sums: &mut [f32]| {
        if relu_out {
            for (((g, &h), &xv), &o) in g.iter_mut().zip(xhat).zip(x).zip(outp) {
                *g = scale * (h - xv) * step01(o);
            }
        } else {
            g.iter_mut().zip(xhat).zip(x).for_each(|((g, &h), &xv)| *g = scale * (h - xv));
        }
        add_col_sums(g, dim, 1.0, sums);
    };
    let (g, xhat, outp) = (&mut ws.g[..], &ws.xhat[..], &ws.outp[..]);
    let rows = g.len() / dim;
    if g.len() < DUO_MIN_PASS || rows < 2 {
        return pass(g, xhat, x, outp, bias_g);
    }
    let h = rows / 2 * dim;
    let (g0, g1) = g.split_at_mut(h);
    let mut theirs = vec![0.0f32; dim];
    duo::join(
        || pass(g0, &xhat[..h], &x[..h], &outp[..h], bias_g),
        || pass(g1, &xhat[h..], &x[h..], &outp[h..], &mut theirs),
    );
    bias_g.iter_mut().zip(&theirs).for_each(|(b, t)| *b += t);
}

/// A weight's gradient `a[rows_w, k] b[k, cols]` (`b` row-major), plus `l1 * sign(w)`: into
/// `p.g` (added to it with `accumulate`), or with `fuse` applied row by row to the weight
/// through the optimiser (`p.updated`), never stored. Every read of the weight in the backward
/// pass must come before this call.
#[allow(clippy::too_many_arguments)]
fn weight_grad(
    p: &mut Param,
    (rows_w, cols, k): (usize, usize, usize),
    a: Mat<'_>,
    b: &[f32],
    l1: f32,
    fuse: Option<Fuse>,
    accumulate: bool,
    scratch: &mut [Vec<f32>; 2],
) {
    match fuse {
        Some(Fuse { optim, t }) if !accumulate => {
            let step = StepScalars::new(&optim, t);
            let Param { w, m, v, .. } = p;
            let b = Mat::rows(b, cols);
            // Rows [0, half) here and the rest on the other core: the weight and its moments
            // are read and written once per step, and two cores stream them twice as fast.
            let half =
                if rows_w >= 2 && rows_w * cols >= DUO_MIN_ELEMENTS { rows_w / 2 } else { rows_w };
            let (w0, w1) = w.split_at_mut(half * cols);
            let (m0, m1) = m.split_at_mut(half * cols);
            let v_half = if v.is_empty() { 0 } else { half * cols };
            let (v0, v1) = v.split_at_mut(v_half);
            let [s0, s1] = scratch;
            let update = |rows: std::ops::Range<usize>,
                          w: &mut [f32],
                          m: &mut [f32],
                          v: &mut [f32],
                          scratch: &mut Vec<f32>| {
                let a = Mat { data: &a.data[rows.start * a.rs..], ..a };
                product_rows(rows.len(), cols, k, a, b, scratch, |i, g| {
                    let span = i * cols..(i + 1) * cols;
                    let w = &mut w[span.clone()];
                    if l1 > 0.0 {
                        g.iter_mut().zip(w.iter()).for_each(|(g, &w)| *g += l1 * sign(w));
                    }
                    let v = if v.is_empty() { &mut [][..] } else { &mut v[span.clone()] };
                    step.apply(w, g, &mut m[span], v);
                });
            };
            if half == rows_w {
                update(0..rows_w, w0, m0, v0, s0);
            } else {
                duo::join(
                    || update(0..half, w0, m0, v0, s0),
                    || update(half..rows_w, w1, m1, v1, s1),
                );
            }
            p.updated = true;
        }
        _ => {
            let product = if accumulate { matmul_add } else { matmul };
            product(rows_w, cols, k, &mut p.g, a, Mat::rows(b, cols));
            if l1 > 0.0 {
                p.g.iter_mut().zip(&p.w).for_each(|(g, &w)| *g += l1 * sign(w));
            }
        }
    }
}

/// Fused weights at least this large split their update across the two cores ([`duo`]).
const DUO_MIN_ELEMENTS: usize = 16 * 1024;

/// Runs `a(b)` and `b(b)` for every row `b`, as two loops at once ([`duo`]). The sparse
/// products run only for batches over [`super::FUSE_MAX_ROWS`] rows, long enough for the
/// handoff.
fn per_row(rows: usize, a: impl FnMut(usize), b: impl FnMut(usize) + Send) {
    duo::join(|| (0..rows).for_each(a), || (0..rows).for_each(b));
}

/// The decoder's gradients over the active codes only (`ws.sparse`): `g_u` (N, out) =
/// `c^T g_y` and `g_c` = `g_y U^T` at the active codes, zero elsewhere (where every mask
/// zeroes it anyway). `ws.g` holds `g_y`, `ws.u` the atoms as rows. Neither gradient reads
/// what the other writes, so they run as two loops ([`per_row`]).
fn sparse_decoder_grads(ws: &mut Work, rows: usize, n: usize, out: usize) {
    let Work { active, active_at, codes, u, g, g_u, g_c, .. } = ws;
    let codes_of = |b: usize| &active[active_at[b]..active_at[b + 1]];
    g_u.fill(0.0);
    g_c.fill(0.0);
    per_row(
        rows,
        |b| {
            let g_y = &g[b * out..(b + 1) * out];
            for &j in codes_of(b) {
                let j = j as usize;
                let c = codes[b * n + j];
                if c != 0.0 {
                    axpy(c, g_y, &mut g_u[j * out..(j + 1) * out]);
                }
            }
        },
        |b| {
            let g_y = &g[b * out..(b + 1) * out];
            for &j in codes_of(b) {
                let j = j as usize;
                g_c[b * n + j] = dot(g_y, &u[j * out..(j + 1) * out]);
            }
        },
    );
}

/// The encoder's gradients over the active codes only (`ws.sparse`; `ws.g_c` holds dL/dpre,
/// zero at every other code): `g_a0 = g_pre W_e`, and the weight's gradient `g_pre^T a0`
/// (added to what the tied decoder put there). The first writes only `g_a0`, the second only
/// the weight's gradient ([`per_row`]).
fn sparse_encoder_grads(
    ws: &mut Work,
    enc: &mut Param,
    rows: usize,
    n: usize,
    inp: usize,
    tied: bool,
) {
    let Work { active, active_at, a0, g_c, g_a0, .. } = ws;
    let codes_of = |b: usize| &active[active_at[b]..active_at[b + 1]];
    let Param { w, g, .. } = enc;
    if !tied {
        g.fill(0.0);
    }
    let (mut refs, mut coef) = (Vec::new(), Vec::new());
    per_row(
        rows,
        |b| {
            refs.clear();
            coef.clear();
            for &j in codes_of(b) {
                let j = j as usize;
                refs.push(&w[j * inp..(j + 1) * inp]);
                coef.push(g_c[b * n + j]);
            }
            combine_rows(&mut g_a0[b * inp..(b + 1) * inp], &refs, &coef, false);
        },
        |b| {
            let x = &a0[b * inp..(b + 1) * inp];
            for &j in codes_of(b) {
                let j = j as usize;
                let gp = g_c[b * n + j];
                if gp != 0.0 {
                    axpy(gp, x, &mut g[j * inp..(j + 1) * inp]);
                }
            }
        },
    );
}

// The backward pass, also compiled for AVX2+FMA, as the forward pass is.
simd_dispatch!(pub(super) fn backward, backward_body, (m: &mut ModularFast, ws: &mut Work, x: &[f32], fuse: Option<Fuse>));

/// The backward pass of the last [`forward`] (training mode) on `x`: gradients of the loss
/// into every parameter's `g`, or with `fuse` the single-product weights updated in place.
#[inline(always)]
fn backward_body(m: &mut ModularFast, ws: &mut Work, x: &[f32], fuse: Option<Fuse>) {
    let cfg = m.cfg.clone();
    let Dims { dim, inter, inp, n, s, d } = m.dims;
    let r = m.roles;
    let rows = ws.rows;
    // Biases accumulate; every weight's gradient is written whole by its first product.
    for p in m.params.iter_mut() {
        p.updated = false;
        if p.shape.len() == 1 {
            p.g.fill(0.0);
        }
    }
    let tied = r.dec_w.is_none();
    // dL/dx_hat, through the output ReLU, and the output bias's gradient.
    resize(&mut ws.g, rows * dim);
    let out_b = if inter == 0 { r.dec_b } else { r.out_b.expect("output bias") };
    output_grad(ws, x, cfg.output_relu, &mut m.params[out_b].g);
    // Width of the decoder's linear part: the input, or the intermediate layer.
    let out = inp;
    // dL/dy (rows, out): the decoder's linear part.
    if inter != 0 {
        let hd = &ws.yd;
        resize(&mut ws.g_hd, rows * inter);
        let (w, tied_out) = output_weight(&r);
        if fuse.is_none() {
            // dL/dhd = g W_out and the weight's gradient g^T hd (in its own layout) at once:
            // neither reads what the other writes.
            let Param { w: wv, g: grad, .. } = &mut m.params[w];
            let w_out = if tied_out { Mat::t(wv, dim) } else { Mat::rows(wv, inter) };
            let (g, g_hd) = (&ws.g, &mut ws.g_hd);
            join(
                || matmul(rows, inter, dim, g_hd, Mat::rows(g, dim), w_out),
                || {
                    if tied_out {
                        matmul(inter, dim, rows, grad, Mat::t(hd, inter), Mat::rows(g, dim))
                    } else {
                        matmul(dim, inter, rows, grad, Mat::t(g, dim), Mat::rows(hd, inter))
                    }
                },
            );
        } else {
            // dL/dhd = g W_out, with W_out (dim, inter) the transpose of the forward's view.
            let w_out = output_t(m, inter, dim).transposed();
            matmul(rows, inter, dim, &mut ws.g_hd, Mat::rows(&ws.g, dim), w_out);
            // Its gradient g^T hd, in the weight's own layout.
            if tied_out {
                let grad = &mut m.params[w].g;
                matmul(inter, dim, rows, grad, Mat::t(hd, inter), Mat::rows(&ws.g, dim));
            } else {
                let shape = (dim, inter, rows);
                let p = &mut m.params[w];
                weight_grad(p, shape, Mat::t(&ws.g, dim), hd, 0.0, fuse, false, &mut ws.row);
            }
        }
        ws.g_hd.iter_mut().zip(hd).for_each(|(gh, &h)| *gh *= step01(h));
        add_col_sums(&ws.g_hd, inter, 1.0, &mut m.params[r.dec_b].g);
        std::mem::swap(&mut ws.g, &mut ws.g_hd); // ws.g is now dL/dy (rows, inter)
    }
    let g_y = &ws.g;
    // Atoms and codes.
    resize(&mut ws.g_c, rows * n);
    match super::forward::stored_atoms(m).filter(|_| !ws.sparse) {
        Some(dw) if fuse.is_none() => {
            // As below, the two products at once.
            let Param { w: wd, g: grad, .. } = &mut m.params[dw];
            let (codes, g_c) = (&ws.codes, &mut ws.g_c);
            join(
                || matmul(rows, n, out, g_c, Mat::rows(g_y, out), Mat::rows(wd, n)),
                || matmul(out, n, rows, grad, Mat::t(g_y, out), Mat::rows(codes, n)),
            );
        }
        Some(dw) => {
            // U = W_d^T as stored: dL/dc = g_y W_d, dL/dW_d = g_y^T c.
            matmul(rows, n, out, &mut ws.g_c, Mat::rows(g_y, out), Mat::rows(m.w(dw), n));
            let p = &mut m.params[dw];
            let (gy_t, codes) = (Mat::t(g_y, out), &ws.codes);
            weight_grad(p, (out, n, rows), gy_t, codes, 0.0, fuse, false, &mut ws.row);
        }
        None => {
            resize(&mut ws.g_u, n * out);
            if ws.sparse {
                sparse_decoder_grads(ws, rows, n, out);
            } else {
                matmul(n, out, rows, &mut ws.g_u, Mat::t(&ws.codes, n), Mat::rows(g_y, out));
                matmul(rows, n, out, &mut ws.g_c, Mat::rows(g_y, out), Mat::t(&ws.u, out));
            }
            if cfg.normalize_decoder {
                let atoms = ws.g_u.chunks_mut(out).zip(ws.u.chunks(out)).zip(&ws.inv_norm);
                for ((gu, uj), &inv) in atoms {
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
        }
    }
    penalties(&cfg, &ws.codes, rows, n, Some(&mut ws.g_c));
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
    // dL/dpre is in g_c. Encoder (and the router, which reads the same input): dL/da0 first,
    // while the weights are this step's.
    add_col_sums(&ws.g_c, n, 1.0, &mut m.params[r.enc_b].g);
    resize(&mut ws.g_a0, rows * inp);
    let paired = !ws.sparse && fuse.is_none();
    if ws.sparse {
        sparse_encoder_grads(ws, &mut m.params[r.enc_w], rows, n, inp, tied);
    } else if paired {
        // dL/da0 = g_pre W_e and the weight's gradient g_pre^T a0 (added to the decoder's
        // part when tied) at once.
        let Param { w: we, g: grad, .. } = &mut m.params[r.enc_w];
        let (g_c, a0, g_a0) = (&ws.g_c, &ws.a0, &mut ws.g_a0);
        let product = if tied { matmul_add } else { matmul };
        join(
            || matmul(rows, inp, n, g_a0, Mat::rows(g_c, n), Mat::rows(we, inp)),
            || product(n, inp, rows, grad, Mat::t(g_c, n), Mat::rows(a0, inp)),
        );
    } else {
        let w_e = Mat::rows(&m.params[r.enc_w].w, inp);
        matmul(rows, inp, n, &mut ws.g_a0, Mat::rows(&ws.g_c, n), w_e);
    }
    if let Some(rw) = r.router_w {
        let w_r = Mat::rows(&m.params[rw].w, inp);
        matmul_add(rows, inp, s, &mut ws.g_a0, Mat::rows(&ws.g_r, s), w_r);
    }
    if !ws.sparse && !paired {
        let p = &mut m.params[r.enc_w];
        let g_pre = Mat::t(&ws.g_c, n);
        weight_grad(p, (n, inp, rows), g_pre, &ws.a0, 0.0, fuse, tied, &mut ws.row);
    }
    if let (Some(rw), Some(rb)) = (r.router_w, r.router_b) {
        add_col_sums(&ws.g_r, s, 1.0, &mut m.params[rb].g);
        let l1 = cfg.routing_l1_regularization as f32;
        let p = &mut m.params[rw];
        weight_grad(p, (s, inp, rows), Mat::t(&ws.g_r, s), &ws.a0, l1, fuse, false, &mut ws.row);
    }
    if inter == 0 {
        // a0 = x - b_dec.
        add_col_sums(&ws.g_a0, dim, -1.0, &mut m.params[r.dec_b].g);
    } else {
        let (wi, bi) = (r.inter_w.expect("intermediate weight"), r.inter_b.expect("bias"));
        ws.g_a0.iter_mut().zip(&ws.hpre).for_each(|(g, &h)| *g *= step01(h));
        add_col_sums(&ws.g_a0, inter, 1.0, &mut m.params[bi].g);
        // Tied: the output layer's part is already there.
        let p = &mut m.params[wi];
        let g_a0 = Mat::t(&ws.g_a0, inter);
        weight_grad(p, (inter, dim, rows), g_a0, x, 0.0, fuse, tied, &mut ws.row);
    }
}
