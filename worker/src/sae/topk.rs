//! Exact O(n) top-k masks: per row (k per sample) and per column (k per neuron across a batch).
//!
//! candle has no top-k op and `arg_sort_last_dim` is O(n log n) (and limited in row length on
//! CUDA), so masks are built here with `select_nth_unstable_by` on (value, index) pairs, rows in
//! parallel with rayon. The order is total: larger value first, ties broken by the lower index
//! (NaN sorts with `f32::total_cmp`), so exactly `k` entries survive per row even with ties,
//! unlike the original code's `x >= kth_value`.
//!
//! A mask is a 0/1 f32 tensor of the input's shape. It carries no gradient: callers apply it as
//! `x * mask`, so the gradient reaches only the kept entries.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::cmp::Ordering;

/// Below this many elements the rayon fork/join overhead dominates; run serially.
const PARALLEL_MIN_ELEMS: usize = 1 << 14;

/// Which axis of a 2-D (rows, cols) matrix the top-k runs along.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    /// Keep the k largest entries of every row.
    Row,
    /// Keep the k largest entries of every column (lifetime / batch sparsity).
    Column,
}

/// Descending by value, ascending by index on ties: the order that defines "the k largest".
#[inline]
fn before(values: &[f32], a: u32, b: u32) -> Ordering {
    values[b as usize].total_cmp(&values[a as usize]).then(a.cmp(&b))
}

/// Indices (unordered) of the `k` largest entries of `values`, written into `idx[..k]`.
/// `idx` is scratch of length `values.len()`.
fn select_top(values: &[f32], k: usize, idx: &mut Vec<u32>) {
    idx.clear();
    idx.extend(0..values.len() as u32);
    if k > 0 && k < values.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| before(values, a, b));
    }
}

/// Writes the row-top-k mask of one row: 1 for its `k` largest entries, 0 elsewhere.
fn row_mask(values: &[f32], k: usize, out: &mut [f32], idx: &mut Vec<u32>) {
    let n = values.len();
    if k >= n {
        out.fill(1.0);
        return;
    }
    out.fill(0.0);
    if k == 0 {
        return;
    }
    select_top(values, k, idx);
    for &i in &idx[..k] {
        out[i as usize] = 1.0;
    }
}

/// The sparse form the hand-written classic SAE keeps: exactly k entries of relu(row), in the
/// order of [`before`]: larger value first, ties to the lower index; output sorted
/// by index. `cand` is scratch.
///
/// One pass keeps candidates above a running threshold in a buffer of a few k; when it fills,
/// `select_nth_unstable_by` (O(len)) keeps the best k and their k-th value becomes the new
/// threshold. Scanning in index order, a later entry equal to the threshold loses the tie, so
/// only strictly larger values are admitted. With fewer than k positive values the rest are
/// relu zeros, which go to the lowest indices.
pub(crate) fn relu_topk_row(
    row: &[f32],
    idx: &mut [u32],
    val: &mut [f32],
    cand: &mut Vec<(f32, u32)>,
) {
    let k = idx.len();
    let cap = (4 * k).max(64);
    // [`before`]'s order on (value, index) pairs.
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

/// 0/1 mask keeping, in each row of the row-major (rows, cols) matrix `x`, exactly its `k`
/// largest entries (ties to the lower index). `k >= cols` keeps everything, `k == 0` nothing.
pub fn row_topk_mask(x: &[f32], cols: usize, k: usize) -> Vec<f32> {
    let mut mask = vec![0.0; x.len()];
    row_topk_mask_into(x, cols, k, &mut mask);
    mask
}

/// [`row_topk_mask`] into a caller-provided buffer of `x.len()` elements.
pub fn row_topk_mask_into(x: &[f32], cols: usize, k: usize, mask: &mut [f32]) {
    assert_eq!(x.len(), mask.len(), "top-k mask buffer has the wrong length");
    if cols == 0 {
        return;
    }
    assert_eq!(
        x.len() % cols,
        0,
        "top-k input of {} elements is not a multiple of {cols} columns",
        x.len()
    );
    let serial = |mask: &mut [f32], x: &[f32]| {
        let mut idx = Vec::with_capacity(cols);
        for (out, row) in mask.chunks_mut(cols).zip(x.chunks(cols)) {
            row_mask(row, k, out, &mut idx);
        }
    };
    let rows = x.len() / cols;
    if x.len() < PARALLEL_MIN_ELEMS || rows < 2 {
        serial(mask, x);
    } else if super::duo::is_the_pool() {
        // Two halves of the rows, the second on the helper that the step keeps awake: rayon
        // would wake its threads to compete with it for the two cores.
        let h = rows / 2 * cols;
        let (m0, m1) = mask.split_at_mut(h);
        super::duo::join(|| serial(m0, &x[..h]), || serial(m1, &x[h..]));
    } else {
        mask.par_chunks_mut(cols).zip(x.par_chunks(cols)).for_each_init(
            || Vec::with_capacity(cols),
            |idx, (out, row)| row_mask(row, k, out, idx),
        );
    }
}

/// Indices of the `k` largest entries of each row, per row in descending order (ties to the
/// lower index). Row-major (rows, min(k, cols)).
pub fn row_topk_indices(x: &[f32], cols: usize, k: usize) -> Vec<u32> {
    if cols == 0 {
        return Vec::new();
    }
    let k = k.min(cols);
    let rows = x.len() / cols;
    let mut out = vec![0u32; rows * k];
    if k == 0 {
        return out;
    }
    out.par_chunks_mut(k).zip(x.par_chunks(cols)).for_each_init(
        || Vec::with_capacity(cols),
        |idx, (dst, row)| {
            select_top(row, k, idx);
            let top = &mut idx[..k];
            top.sort_unstable_by(|&a, &b| before(row, a, b));
            dst.copy_from_slice(top);
        },
    );
    out
}

/// 0/1 mask keeping, in each column of the row-major (rows, cols) matrix `x`, exactly its `k`
/// largest entries (ties to the lower row index).
pub fn col_topk_mask(x: &[f32], rows: usize, cols: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * cols, "top-k input is not (rows={rows}, cols={cols})");
    if k >= rows {
        return vec![1.0; x.len()];
    }
    let mut mask = vec![0.0; x.len()];
    if k == 0 || cols == 0 {
        return mask;
    }
    // Each column is gathered into a contiguous buffer, selected, and its kept row indices
    // returned; scattering afterwards keeps the parallel part free of strided writes.
    let keep = |c: usize, buf: &mut (Vec<f32>, Vec<u32>)| -> Vec<u32> {
        let (col, idx) = buf;
        col.clear();
        col.extend((0..rows).map(|r| x[r * cols + c]));
        select_top(col, k, idx);
        idx[..k].to_vec()
    };
    let kept: Vec<Vec<u32>> = if x.len() >= PARALLEL_MIN_ELEMS {
        (0..cols)
            .into_par_iter()
            .map_init(
                || (Vec::with_capacity(rows), Vec::with_capacity(rows)),
                |buf, c| keep(c, buf),
            )
            .collect()
    } else {
        let mut buf = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        (0..cols).map(|c| keep(c, &mut buf)).collect()
    };
    for (c, rows_kept) in kept.iter().enumerate() {
        for &r in rows_kept {
            mask[r as usize * cols + c] = 1.0;
        }
    }
    mask
}

/// Number of samples each neuron keeps in a batch of `batch` at lifetime rate `rate`:
/// ceil(rate * batch), at least 1 and at most `batch`.
pub fn lifetime_k(rate: f64, batch: usize) -> usize {
    // The small epsilon keeps 0.05 * 100 = 5.000000000000001 from rounding up to 6.
    (((rate * batch as f64) - 1e-9).ceil() as usize).clamp(1, batch.max(1))
}

/// The top-k mask as a candle op on a 2-D f32 tensor (no gradient: use
/// [`Tensor::apply_op1_no_bwd`] or [`topk_mask`]).
#[derive(Debug, Clone, Copy)]
pub struct TopKMask {
    pub k: usize,
    pub axis: Axis,
}

impl CustomOp1 for TopKMask {
    fn name(&self) -> &'static str {
        "topk-mask"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, cols) = layout.shape().dims2()?;
        let data = match storage {
            CpuStorage::F32(v) => v,
            _ => candle_core::bail!("topk-mask expects an f32 tensor"),
        };
        let x = match layout.contiguous_offsets() {
            Some((start, end)) => &data[start..end],
            None => candle_core::bail!("topk-mask expects a contiguous tensor"),
        };
        let mask = match self.axis {
            Axis::Row => row_topk_mask(x, cols, self.k),
            Axis::Column => col_topk_mask(x, rows, cols, self.k),
        };
        Ok((CpuStorage::F32(mask), layout.shape().clone()))
    }
}

/// 0/1 top-k mask of a 2-D f32 tensor along `axis`, on the tensor's device, without gradient.
/// Tensors on an accelerator are masked on the CPU and moved back: the mask is O(n) work and
/// carries no gradient, so the transfer is the only cost.
pub fn topk_mask(x: &Tensor, k: usize, axis: Axis) -> candle_core::Result<Tensor> {
    let device = x.device();
    let op = TopKMask { k, axis };
    if device.is_cpu() {
        x.detach().contiguous()?.apply_op1_no_bwd(&op)
    } else {
        let cpu = x.detach().to_device(&candle_core::Device::Cpu)?.contiguous()?;
        cpu.apply_op1_no_bwd(&op)?.to_device(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn row_mask_keeps_exactly_k_largest() {
        let x = [0.1, 0.9, 0.3, 0.7, /* row 2 */ 5.0, -1.0, 2.0, 4.0];
        let m = row_topk_mask(&x, 4, 2);
        assert_eq!(m, vec![0., 1., 0., 1., 1., 0., 0., 1.]);
    }

    #[test]
    fn row_ties_break_to_lower_index_and_keep_exactly_k() {
        // Four equal values and k = 2: `x >= kth` would keep all four.
        let x = [1.0, 1.0, 1.0, 1.0, 0.0];
        assert_eq!(row_topk_mask(&x, 5, 2), vec![1., 1., 0., 0., 0.]);
        let x = [0.0, 3.0, 3.0, 3.0, 3.0];
        assert_eq!(row_topk_mask(&x, 5, 3), vec![0., 1., 1., 1., 0.]);
        // All zero rows still keep exactly k (the lowest indices).
        assert_eq!(row_topk_mask(&[0.0; 4], 4, 1), vec![1., 0., 0., 0.]);
    }

    #[test]
    fn row_edge_cases() {
        assert_eq!(row_topk_mask(&[1.0, 2.0], 2, 0), vec![0., 0.]);
        assert_eq!(row_topk_mask(&[1.0, 2.0], 2, 5), vec![1., 1.]);
        assert_eq!(row_topk_mask(&[-3.0, -1.0, -2.0], 3, 1), vec![0., 1., 0.]);
    }

    #[test]
    fn large_parallel_rows_match_sort() {
        // Deterministic pseudo-random values with many ties, large enough to go parallel.
        let cols = 300;
        let rows = 100;
        let x: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 13) as f32).collect();
        let k = 17;
        let m = row_topk_mask(&x, cols, k);
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            let mut order: Vec<usize> = (0..cols).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let mut expect = vec![0.0; cols];
            for &i in &order[..k] {
                expect[i] = 1.0;
            }
            assert_eq!(&m[r * cols..(r + 1) * cols], &expect[..], "row {r}");
        }
        let idx = row_topk_indices(&x, cols, k);
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            let got = &idx[r * k..(r + 1) * k];
            // Descending, ties by index.
            for w in got.windows(2) {
                assert_eq!(before(row, w[0], w[1]), Ordering::Less);
            }
            for &i in got {
                assert_eq!(m[r * cols + i as usize], 1.0);
            }
        }
    }

    #[test]
    fn column_mask_keeps_k_per_column() {
        // (rows=4, cols=2)
        let x = [1.0, 0.0, 4.0, 0.0, 2.0, 7.0, 3.0, 0.0];
        let m = col_topk_mask(&x, 4, 2, 2);
        // col 0 values 1,4,2,3 -> rows 1,3; col 1 values 0,0,7,0 -> rows 2 and 0 (tie, lower index)
        assert_eq!(m, vec![0., 1., 1., 0., 0., 1., 1., 0.]);
        assert_eq!(col_topk_mask(&x, 4, 2, 4), vec![1.0; 8]);
    }

    #[test]
    fn lifetime_k_is_ceil() {
        assert_eq!(lifetime_k(0.05, 100), 5);
        assert_eq!(lifetime_k(0.05, 256), 13);
        assert_eq!(lifetime_k(0.001, 10), 1);
        assert_eq!(lifetime_k(1.0, 10), 10);
    }

    #[test]
    fn candle_op_matches_slices_and_masks_gradient() {
        let dev = Device::Cpu;
        let data = [0.5f32, -1.0, 2.0, 0.25, 3.0, 1.0];
        let x = candle_core::Var::from_slice(&data, (2, 3), &dev).unwrap();
        let mask = topk_mask(&x, 1, Axis::Row).unwrap();
        assert_eq!(
            mask.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0., 0., 1., 0., 1., 0.]
        );
        let cm = topk_mask(&x, 1, Axis::Column).unwrap();
        assert_eq!(
            cm.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![1., 0., 1., 0., 1., 0.]
        );
        // Gradient of sum(x * mask) is the mask itself: only kept entries receive gradient.
        let y = (x.as_tensor() * &mask).unwrap().sum_all().unwrap();
        let grads = y.backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g, vec![0., 0., 1., 0., 1., 0.]);
    }

    #[test]
    fn non_contiguous_input_is_handled() {
        let dev = Device::Cpu;
        let x = Tensor::from_slice(&[1.0f32, 5.0, 3.0, 2.0], (2, 2), &dev).unwrap().t().unwrap();
        // x^T = [[1, 3], [5, 2]]
        let m = topk_mask(&x, 1, Axis::Row).unwrap();
        assert_eq!(m.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![0., 1., 1., 0.]);
    }
}
