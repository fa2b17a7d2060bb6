//! The top-k SAE's step: the forward pass keeps k latents per row, and every gradient touches
//! only the kept entries, grouped by latent.

use super::{Params, Workspace};
use crate::sae::kernels;
use crate::sae::topk::relu_topk_row;
use rayon::prelude::*;

/// Forward pass over `rows` rows of `x`: fills `xc`, `pre`, `idx`, `val` and the reconstruction
/// in `g`; with `train`, turns `g` into dL/dx_hat and fills `dz`. Returns the sum of squared errors.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
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
            relu_topk_row(pre, idx, val, cand);
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
pub(super) fn backward_shared(p: &Params, dim: usize, n: usize, ws: &mut Workspace) {
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
pub(super) fn dec_bias_grad(
    g: &[f32],
    db_enc: &[f32],
    w_enc: &[f32],
    dim: usize,
    db_dec: &mut [f32],
) {
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
pub(super) fn enc_row_grad(
    list: &[u32],
    k: usize,
    dz: &[f32],
    xc: &[f32],
    dim: usize,
    out: &mut [f32],
) {
    out.iter_mut().for_each(|o| *o = 0.0);
    for &pos in list {
        let b = pos as usize / k;
        kernels::axpy(dz[pos as usize], &xc[b * dim..(b + 1) * dim], out);
    }
}

/// dL/d(decoder atom j): gu = sum of z * dL/dx_hat over the latent's entries, projected
/// through the normalisation u = w / ||w|| when normalising: (gu - u (u . gu)) / ||w||.
#[allow(clippy::too_many_arguments)]
pub(super) fn dec_row_grad(
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
pub(super) fn project_dec_grad(w: &[f32], inv_norm: f32, normalize: bool, gu: &mut [f32]) {
    if normalize {
        let c = kernels::dot(w, gu) * inv_norm * inv_norm;
        gu.iter_mut().zip(w).for_each(|(o, &wv)| *o = (*o - c * wv) * inv_norm);
    }
}
