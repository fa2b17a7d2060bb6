//! The backward pass of the modular step: the gradient of the loss into every parameter.

use msae_shared::config::{LayerSparsityMode, StripeSparsityMode};

use super::penalty::penalties;
use super::{Dims, ModularFast, Work, output_t, output_weight, resize, sign, step01};
use crate::sae::linalg::{Mat, matmul, matmul_add};

/// Sums the rows of `g` (rows, cols) into `out` (cols), adding `sign * sum`.
pub(super) fn add_col_sums(g: &[f32], cols: usize, sign: f32, out: &mut [f32]) {
    for row in g.chunks(cols) {
        out.iter_mut().zip(row).for_each(|(o, &v)| *o += sign * v);
    }
}

/// The backward pass of the last [`forward`] (training mode) on `x`: gradients of the loss
/// into every parameter's `g`.
pub(super) fn backward(m: &mut ModularFast, ws: &mut Work, x: &[f32]) {
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
