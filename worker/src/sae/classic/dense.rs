//! The dense SAE's step (`layer_sparsity_mode: none`): five dense GEMMs.

use super::sparse::dec_bias_grad;
use super::{Params, Workspace};
use crate::sae::kernels;
use crate::sae::linalg::{Mat, matmul};
use rayon::prelude::*;

/// The dense SAE's forward pass over `rows` rows of `x`: `xc = x - b_dec`,
/// `pre = xc W_enc^T + b_enc` then `z = relu(pre)` (in `pre`), `zs = z * inv_norm`, and the
/// reconstruction `x_hat = zs W_dec + b_dec` in `g` (two GEMMs). With `train`, turns `g` into
/// dL/dx_hat. Returns the sum of squared errors.
pub(super) fn forward_dense(
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
pub(super) fn backward_dense(p: &Params, dim: usize, n: usize, ws: &mut Workspace) {
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
