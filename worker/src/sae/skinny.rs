//! Direct loops for skinny products: a few rows of `a`, or a short contraction, which is every
//! product of a small-batch training step (batch 8: `x[8, 784] W^T`, and the weight gradients
//! `g^T[784, 8] h[8, 250]`).
//!
//! `gemm` packs its operands into panels before multiplying; at batch 8 packing the weight
//! matrices cost more than the arithmetic (a quarter of the modular step). These loops read the
//! large operand once, in place:
//! - [`dots`]: `b` is the transpose of a row-major matrix (a weight used as `x W^T`), so each
//!   output is a dot product of two contiguous rows; two rows of `a` by four of `W` at a time.
//! - [`combos`]: `b`'s rows are contiguous, so each row of `dst` is a combination of `b`'s
//!   rows; eight rows of `b` at a time, applied to every row of `dst` while they are in cache.
//!
//! The same kernel serves two row-wise helpers: [`product_rows`] (a large product consumed row
//! by row, as the fused weight updates do) and [`combine_rows`] (a row times a sparse factor).
//!
//! The AVX2+FMA versions are written with intrinsics (LLVM's vectoriser kept the accumulators
//! of the blocked dot products on the stack); other CPUs run the plain loops.

use super::duo;
use super::linalg::Mat;

/// At most this many rows of `a` (or this long a contraction) make a product skinny.
pub(crate) const SKINNY: usize = 16;

/// Runs `dst[m, n] (+)= a[m, k] b[k, n]` with the direct loops when it is skinny and its layout
/// suits them; false otherwise (for `gemm`). The caller has checked the operands' extents.
///
/// A product over a large weight (`b`, at least [`DUO_MIN_WEIGHT`] elements) splits the
/// weight's rows between the two cores ([`duo::join`]), as the fused updates do: both halves
/// of a step then read the same rows of each weight on the same core.
pub(super) fn product(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    a: Mat<'_>,
    b: Mat<'_>,
    accumulate: bool,
) -> bool {
    // By shape alone, so the arithmetic (the order of the split sums) is the same wherever
    // the product runs; `duo::join` runs both halves here when the other core is taken.
    let split = n * k >= DUO_MIN_WEIGHT && n >= 8 && k >= 8;
    if m <= SKINNY && a.cs == 1 && b.rs == 1 {
        // `b`'s columns are the weight's rows: each half computes half of dst's columns.
        if split {
            let h = n / 2;
            let b1 = Mat { data: &b.data[h * b.cs..], ..b };
            let ((), theirs) = duo::join(
                || dots(m, h, n, k, dst, a, b, accumulate),
                || {
                    let mut part = vec![0.0; m * (n - h)];
                    dots(m, n - h, n - h, k, &mut part, a, b1, false);
                    part
                },
            );
            for (d, p) in dst.chunks_exact_mut(n).zip(theirs.chunks_exact(n - h)) {
                let d = &mut d[h..];
                if accumulate {
                    d.iter_mut().zip(p).for_each(|(d, p)| *d += p);
                } else {
                    d.copy_from_slice(p);
                }
            }
        } else {
            dots(m, n, n, k, dst, a, b, accumulate);
        }
        true
    } else if (m <= SKINNY || k <= SKINNY) && b.cs == 1 {
        // `b`'s rows are the weight's rows: each half sums over half of them.
        if split && m <= SKINNY {
            let h = k / 2;
            let (a1, b1) =
                (Mat { data: &a.data[h * a.cs..], ..a }, Mat { data: &b.data[h * b.rs..], ..b });
            let ((), theirs) = duo::join(
                || combos(m, n, h, dst, a, b, accumulate),
                || {
                    let mut part = vec![0.0; m * n];
                    combos(m, n, k - h, &mut part, a1, b1, false);
                    part
                },
            );
            dst[..m * n].iter_mut().zip(&theirs).for_each(|(d, p)| *d += p);
        } else {
            combos(m, n, k, dst, a, b, accumulate);
        }
        true
    } else {
        false
    }
}

/// Skinny products over weights at least this large split across the two cores.
pub(crate) const DUO_MIN_WEIGHT: usize = 16 * 1024;

/// `dst[r, j] (+)= a_r . w_j` for `j < n`, dst's rows `ld` apart, with `a`'s rows and `b`'s
/// columns (`w_j`) contiguous.
#[allow(clippy::too_many_arguments)]
fn dots(
    m: usize,
    n: usize,
    ld: usize,
    k: usize,
    dst: &mut [f32],
    a: Mat<'_>,
    b: Mat<'_>,
    accumulate: bool,
) {
    let row = |r: usize| &a.data[r * a.rs..r * a.rs + k];
    let col = |j: usize| &b.data[j * b.cs..j * b.cs + k];
    let mut put = |r: usize, j: usize, v: f32| {
        let d = &mut dst[r * ld + j];
        *d = if accumulate { *d + v } else { v };
    };
    let avx2 = has_avx2();
    let mut j = 0;
    while j < n {
        let cols = if j + 4 <= n { 4 } else { 1 };
        let w = [col(j), col(j + cols / 4), col(j + 2 * (cols / 4)), col(j + 3 * (cols / 4))];
        let mut r = 0;
        while r < m {
            let rows = if r + 2 <= m { 2 } else { 1 };
            let x = [row(r), row(r + rows - 1)];
            let v = dot_2x4(avx2, x, w);
            for (dr, vr) in v.iter().enumerate().take(rows) {
                for (dj, &v) in vr.iter().enumerate().take(cols) {
                    put(r + dr, j + dj, v);
                }
            }
            r += rows;
        }
        j += cols;
    }
}

/// The dot products of two rows with four, all of one length (repeats are allowed: the
/// callers pass a row twice at the edges and ignore the extra results).
#[inline]
fn dot_2x4(avx2: bool, x: [&[f32]; 2], w: [&[f32]; 4]) -> [[f32; 4]; 2] {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is true only when the CPU has AVX2 and FMA.
        return unsafe { avx2::dot_2x4(x, w) };
    }
    let _ = avx2;
    x.map(|x| w.map(|w| x.iter().zip(w).map(|(a, b)| a * b).sum()))
}

/// `dst[i, :] (+)= sum_t a[i, t] b_t`, with `b`'s rows (`b_t`) contiguous.
fn combos(m: usize, n: usize, k: usize, dst: &mut [f32], a: Mat<'_>, b: Mat<'_>, accumulate: bool) {
    const BLOCK: usize = 8;
    let avx2 = has_avx2();
    let mut t0 = 0;
    while t0 < k {
        let kn = (k - t0).min(BLOCK);
        let add = accumulate || t0 > 0;
        let rows: [&[f32]; BLOCK] = std::array::from_fn(|t| {
            let t = t0 + t.min(kn - 1);
            &b.data[t * b.rs..t * b.rs + n]
        });
        for (i, d) in dst.chunks_exact_mut(n).take(m).enumerate() {
            let coef: [f32; BLOCK] =
                std::array::from_fn(
                    |t| if t < kn { a.data[i * a.rs + (t0 + t) * a.cs] } else { 0.0 },
                );
            combine(avx2, d, &rows[..kn], &coef[..kn], add);
        }
        t0 += kn;
    }
}

/// Row by row, `a[m, k] b[k, n]` with `b`'s rows contiguous: row i goes into `scratch` and is
/// handed to `f(i, row)`, so a caller can consume a large product (a weight's gradient) without
/// storing it whole. Each row is computed exactly as [`product`] computes it.
pub(crate) fn product_rows(
    m: usize,
    n: usize,
    k: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    scratch: &mut Vec<f32>,
    mut f: impl FnMut(usize, &mut [f32]),
) {
    const BLOCK: usize = 8;
    assert!(b.cs == 1 && k > 0, "product_rows: b's rows must be contiguous, k > 0");
    assert!(
        (m - 1) * a.rs + (k - 1) * a.cs < a.data.len() && (k - 1) * b.rs + n <= b.data.len(),
        "product_rows: operand smaller than its view"
    );
    let avx2 = has_avx2();
    let blocks: Vec<(usize, [&[f32]; BLOCK])> = (0..k)
        .step_by(BLOCK)
        .map(|t0| {
            let kn = (k - t0).min(BLOCK);
            (
                t0,
                std::array::from_fn(|t| {
                    let t = t0 + t.min(kn - 1);
                    &b.data[t * b.rs..t * b.rs + n]
                }),
            )
        })
        .collect();
    scratch.resize(n, 0.0);
    for i in 0..m {
        for &(t0, rows) in &blocks {
            let kn = (k - t0).min(BLOCK);
            let coef: [f32; BLOCK] =
                std::array::from_fn(
                    |t| if t < kn { a.data[i * a.rs + (t0 + t) * a.cs] } else { 0.0 },
                );
            combine(avx2, scratch, &rows[..kn], &coef[..kn], t0 > 0);
        }
        f(i, scratch);
    }
}

/// `d (+)= sum_t coef[t] rows[t]` for any number of rows (in blocks of 8), every row as long
/// as `d`: a row of a product whose other factor is sparse.
pub(crate) fn combine_rows(d: &mut [f32], rows: &[&[f32]], coef: &[f32], add: bool) {
    let avx2 = has_avx2();
    if rows.is_empty() && !add {
        d.fill(0.0);
    }
    for (i, (r, c)) in rows.chunks(8).zip(coef.chunks(8)).enumerate() {
        combine(avx2, d, r, c, add || i > 0);
    }
}

/// `d (+)= sum_t coef[t] rows[t]`, every row as long as `d`.
#[inline]
fn combine(avx2: bool, d: &mut [f32], rows: &[&[f32]], coef: &[f32], add: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is true only when the CPU has AVX2 and FMA.
        return unsafe { avx2::combine(d, rows, coef, add) };
    }
    let _ = avx2;
    for (c, dv) in d.iter_mut().enumerate() {
        let start = if add { *dv } else { 0.0 };
        *dv = rows.iter().zip(coef).fold(start, |acc, (r, &w)| acc + w * r[c]);
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// The sum of a vector's lanes.
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// See [`super::dot_2x4`]: eight accumulators, each chunk of the six rows loaded once.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dot_2x4(x: [&[f32]; 2], w: [&[f32]; 4]) -> [[f32; 4]; 2] {
        let k = x[0].len();
        assert!(x.iter().all(|r| r.len() == k) && w.iter().all(|r| r.len() == k));
        let (x0, x1) = (x[0].as_ptr(), x[1].as_ptr());
        let (w0, w1, w2, w3) = (w[0].as_ptr(), w[1].as_ptr(), w[2].as_ptr(), w[3].as_ptr());
        let z = _mm256_setzero_ps();
        let (mut a00, mut a01, mut a02, mut a03) = (z, z, z, z);
        let (mut a10, mut a11, mut a12, mut a13) = (z, z, z, z);
        let full = k / 8 * 8;
        let mut i = 0;
        while i < full {
            // SAFETY: i + 8 <= k, the length of every row (asserted above).
            unsafe {
                let (u, v) = (_mm256_loadu_ps(x0.add(i)), _mm256_loadu_ps(x1.add(i)));
                let c = _mm256_loadu_ps(w0.add(i));
                a00 = _mm256_fmadd_ps(u, c, a00);
                a10 = _mm256_fmadd_ps(v, c, a10);
                let c = _mm256_loadu_ps(w1.add(i));
                a01 = _mm256_fmadd_ps(u, c, a01);
                a11 = _mm256_fmadd_ps(v, c, a11);
                let c = _mm256_loadu_ps(w2.add(i));
                a02 = _mm256_fmadd_ps(u, c, a02);
                a12 = _mm256_fmadd_ps(v, c, a12);
                let c = _mm256_loadu_ps(w3.add(i));
                a03 = _mm256_fmadd_ps(u, c, a03);
                a13 = _mm256_fmadd_ps(v, c, a13);
            }
            i += 8;
        }
        let mut out = [
            [hsum(a00), hsum(a01), hsum(a02), hsum(a03)],
            [hsum(a10), hsum(a11), hsum(a12), hsum(a13)],
        ];
        for (o, xr) in out.iter_mut().zip(x) {
            for (o, wr) in o.iter_mut().zip(w) {
                *o += xr[full..].iter().zip(&wr[full..]).map(|(a, b)| a * b).sum::<f32>();
            }
        }
        out
    }

    /// See [`super::combine`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn combine(d: &mut [f32], rows: &[&[f32]], coef: &[f32], add: bool) {
        let n = d.len();
        assert!(rows.len() == coef.len() && rows.iter().all(|r| r.len() == n));
        let full = n / 8 * 8;
        let dp = d.as_mut_ptr();
        let mut c = 0;
        if let (Ok(r), Ok(w)) = (<&[&[f32]; 8]>::try_from(rows), <&[f32; 8]>::try_from(coef)) {
            // A whole block, written out: its pointers and broadcast coefficients stay in
            // registers instead of being reloaded for every chunk.
            let p = r.map(|r| r.as_ptr());
            let w = w.map(|w| _mm256_set1_ps(w));
            while c < full {
                // SAFETY: c + 8 <= n, the length of `d` and of every row (asserted above).
                unsafe {
                    let mut acc =
                        if add { _mm256_loadu_ps(dp.add(c)) } else { _mm256_setzero_ps() };
                    let mut acc2 = _mm256_mul_ps(w[1], _mm256_loadu_ps(p[1].add(c)));
                    acc = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(p[0].add(c)), acc);
                    acc2 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(p[3].add(c)), acc2);
                    acc = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(p[2].add(c)), acc);
                    acc2 = _mm256_fmadd_ps(w[5], _mm256_loadu_ps(p[5].add(c)), acc2);
                    acc = _mm256_fmadd_ps(w[4], _mm256_loadu_ps(p[4].add(c)), acc);
                    acc2 = _mm256_fmadd_ps(w[7], _mm256_loadu_ps(p[7].add(c)), acc2);
                    acc = _mm256_fmadd_ps(w[6], _mm256_loadu_ps(p[6].add(c)), acc);
                    _mm256_storeu_ps(dp.add(c), _mm256_add_ps(acc, acc2));
                }
                c += 8;
            }
        }
        while c < full {
            // SAFETY: c + 8 <= n, the length of `d` and of every row (asserted above).
            unsafe {
                let mut acc = if add { _mm256_loadu_ps(dp.add(c)) } else { _mm256_setzero_ps() };
                for (r, &w) in rows.iter().zip(coef) {
                    acc =
                        _mm256_fmadd_ps(_mm256_set1_ps(w), _mm256_loadu_ps(r.as_ptr().add(c)), acc);
                }
                _mm256_storeu_ps(dp.add(c), acc);
            }
            c += 8;
        }
        for (c, dv) in d.iter_mut().enumerate().skip(full) {
            let start = if add { *dv } else { 0.0 };
            *dv = rows.iter().zip(coef).fold(start, |acc, (r, &w)| w.mul_add(r[c], acc));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn the_plain_loops_agree_with_the_vector_ones() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut v =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
        for len in [1, 7, 8, 19, 64, 250] {
            let (x0, x1) = (v(len), v(len));
            let w: Vec<Vec<f32>> = (0..4).map(|_| v(len)).collect();
            let w = [&w[0][..], &w[1][..], &w[2][..], &w[3][..]];
            let want = dot_2x4(false, [&x0, &x1], w);
            let got = dot_2x4(has_avx2(), [&x0, &x1], w);
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!((g - w).abs() <= 1e-4 * (len as f32).sqrt(), "dot {len}: {g} vs {w}");
            }
            for kn in [1, 3, 8] {
                let rows: Vec<Vec<f32>> = (0..kn).map(|_| v(len)).collect();
                let rows: Vec<&[f32]> = rows.iter().map(|r| &r[..]).collect();
                let coef = v(kn);
                let start = v(len);
                for add in [false, true] {
                    let (mut a, mut b) = (start.clone(), start.clone());
                    combine(false, &mut a, &rows, &coef, add);
                    combine(has_avx2(), &mut b, &rows, &coef, add);
                    for (x, y) in a.iter().zip(&b) {
                        assert!((x - y).abs() <= 1e-5, "combine {len}x{kn} add {add}: {x} vs {y}");
                    }
                }
            }
        }
    }
}
