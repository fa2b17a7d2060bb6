//! The one GEMM wrapper of the hand-written training paths ([`crate::sae::classic`],
//! [`crate::sae::modular`]) and the evaluation, and the one transpose.
//!
//! Skinny products (a few rows, or a short contraction: every product of a small-batch step)
//! skip `gemm` for the direct loops of [`super::skinny`].

/// A strided read-only matrix for [`matmul`]: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major matrix with `cols` columns.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Mat { data, rs: cols, cs: 1 }
    }

    /// The transpose of a row-major matrix with `cols` columns.
    pub fn t(data: &'a [f32], cols: usize) -> Self {
        Mat { data, rs: 1, cs: cols }
    }

    /// The same data read as the transpose.
    pub fn transposed(self) -> Self {
        Mat { data: self.data, rs: self.cs, cs: self.rs }
    }

    /// Whether every element of an r x c view lies inside `data`.
    fn covers(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || (r - 1) * self.rs + (c - 1) * self.cs < self.data.len()
    }
}

/// Below this many multiply-adds a GEMM runs on the calling thread: rayon's fork/join costs
/// more than it saves on the small products of small batches.
const PARALLEL_MIN_FLOPS: usize = 1 << 22;

/// `dst[m, n] = a[m, k] b[k, n]`, dst row-major and contiguous, through the `gemm` crate
/// (AVX-512 when the CPU has it, rayon threads for large products). Transposed operands are
/// just other strides: `gemm` packs its panels from any layout.
pub(crate) fn matmul(m: usize, n: usize, k: usize, dst: &mut [f32], a: Mat<'_>, b: Mat<'_>) {
    gemm_into(m, n, k, dst, a, b, false);
}

/// `dst[m, n] += a[m, k] b[k, n]` (see [`matmul`]).
pub(crate) fn matmul_add(m: usize, n: usize, k: usize, dst: &mut [f32], a: Mat<'_>, b: Mat<'_>) {
    gemm_into(m, n, k, dst, a, b, true);
}

thread_local! {
    /// Set inside [`join`]: this thread's products run serially, the other core being busy
    /// with the other half.
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs two independent groups of products at once, one on this thread and one on the
/// [`super::duo`] helper, each serially: one handoff where the two products would each have
/// split across the threads.
pub(crate) fn join<RA: Send, RB: Send>(
    a: impl FnOnce() -> RA + Send,
    b: impl FnOnce() -> RB + Send,
) -> (RA, RB) {
    if super::duo::is_off() {
        // Trainers sharing the cores ([`super::duo::share_the_cores`]): rayon's pool.
        rayon::join(|| serially(a), || serially(b))
    } else {
        super::duo::join(a, b)
    }
}

/// Whether this thread's products run serially (inside [`join`] or a [`super::duo`] half).
pub(super) fn is_serial() -> bool {
    SERIAL.get()
}

/// Runs `f` with this thread's products serial; the flag is restored even if `f` panics.
pub(super) fn serially<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SERIAL.set(self.0);
        }
    }
    let _restore = Restore(SERIAL.replace(true));
    f()
}

fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    a: Mat<'_>,
    b: Mat<'_>,
    accumulate: bool,
) {
    assert!(dst.len() >= m * n, "matmul: dst of {} < {m}x{n}", dst.len());
    assert!(a.covers(m, k) && b.covers(k, n), "matmul: operand smaller than its view");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    if super::skinny::product(m, n, k, dst, a, b, accumulate) {
        return;
    }
    let parallel = m * n * k >= PARALLEL_MIN_FLOPS && !SERIAL.get();
    let h = (m / 2).next_multiple_of(8);
    if parallel && m >= 16 && same_blocking(m, n, k, m - h) && super::duo::is_the_pool() {
        // Two cores: halves of dst's rows, one serial product each, on the helper that stays
        // awake between a step's products (rayon would put its thread to sleep after each).
        let (d0, d1) = dst.split_at_mut(h * n);
        let a1 = Mat { data: &a.data[h * a.rs..], ..a };
        super::duo::join(
            || gemm_raw(h, n, k, d0, a, b, accumulate, gemm::Parallelism::None),
            || gemm_raw(m - h, n, k, d1, a1, b, accumulate, gemm::Parallelism::None),
        );
        return;
    }
    let parallelism = if parallel { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    gemm_raw(m, n, k, dst, a, b, accumulate, parallelism);
}

/// Whether an `m x n x k` product and one of `rows` rows (and the same `n`, `k`) add up their
/// contraction in the same blocks, so a split into row halves leaves every element's sum as it
/// was. gemm 0.19 takes blocks of `min(k, 512)` when `m` and `n` are both 64 or less, and a
/// length that depends on `k` alone (and the caches) otherwise.
fn same_blocking(m: usize, n: usize, k: usize, rows: usize) -> bool {
    n > 64 || k <= 512 || (m <= 64) == (rows <= 64)
}

/// `gemm::gemm` on operands whose extents [`gemm_into`] has checked.
#[allow(clippy::too_many_arguments)]
fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    a: Mat<'_>,
    b: Mat<'_>,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    assert!(dst.len() >= m * n && a.covers(m, k) && b.covers(k, n), "gemm: operand too small");
    // SAFETY: the assert above shows every element gemm reads (a: m x k, b: k x n) or writes
    // (dst: m x n, row stride n) lies inside its slice; `dst` is borrowed mutably, so it
    // cannot alias `a` or `b`. Without `accumulate`, dst's old contents are never read.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Row-major [rows, cols] -> [cols, rows].
pub(crate) fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = a[i * cols + j];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_with_strides_and_accumulation() {
        // a = [[1, 2], [3, 4]], b = [[5, 6], [7, 8]]
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [5.0, 6.0, 7.0, 8.0];
        let mut c = [0.0; 4];
        matmul(2, 2, 2, &mut c, Mat::rows(&a, 2), Mat::rows(&b, 2));
        assert_eq!(c, [19.0, 22.0, 43.0, 50.0]);
        matmul(2, 2, 2, &mut c, Mat::t(&a, 2), Mat::rows(&b, 2));
        assert_eq!(c, [26.0, 30.0, 38.0, 44.0]);
        matmul_add(2, 2, 2, &mut c, Mat::rows(&a, 2), Mat::t(&b, 2));
        assert_eq!(c, [26.0 + 17.0, 30.0 + 23.0, 38.0 + 39.0, 44.0 + 53.0]);
    }

    /// `a[m, k] b[k, n]` the slow way, for any strides.
    fn naive(m: usize, n: usize, k: usize, a: Mat<'_>, b: Mat<'_>) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|t| {
                        a.data[i * a.rs + t * a.cs] as f64 * b.data[t * b.rs + j * b.cs] as f64
                    })
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn row_halves_give_the_same_bits_when_the_blocking_is_the_same() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        // (m, n, k): wide products, a narrow one with long contractions whose halves stay
        // above 64 rows, and one whose halves would not (so it is never split).
        for (m, n, k) in [(256, 250, 784), (67, 300, 250), (160, 40, 784), (100, 30, 784)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let (av, bv) = (Mat::rows(&a, k), Mat::t(&b, k));
            let mut whole = vec![0f32; m * n];
            gemm_raw(m, n, k, &mut whole, av, bv, false, gemm::Parallelism::None);
            let h = (m / 2).next_multiple_of(8);
            let mut halves = vec![0f32; m * n];
            let (d0, d1) = halves.split_at_mut(h * n);
            gemm_raw(h, n, k, d0, av, bv, false, gemm::Parallelism::None);
            let a1 = Mat { data: &a[h * k..], ..av };
            gemm_raw(m - h, n, k, d1, a1, bv, false, gemm::Parallelism::None);
            let same = whole.iter().zip(&halves).all(|(x, y)| x.to_bits() == y.to_bits());
            if same_blocking(m, n, k, m - h) {
                assert!(same, "{m}x{n}x{k}: the halves changed the sums");
            } else {
                assert!(!same, "{m}x{n}x{k}: expected a different blocking (gemm changed?)");
            }
        }
    }

    #[test]
    fn skinny_products_match_the_definition_in_every_layout() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // (m, n, k): few rows, short contractions (both loops, with and without tails), and
        // shapes that go to gemm; the first three split across the two cores
        // (odd halves included).
        let shapes = [
            (8, 250, 784),
            (5, 301, 97),
            (67, 300, 250),
            (3, 37, 19),
            (1, 5, 1),
            (16, 33, 70),
            (250, 784, 8),
            (70, 45, 3),
            (40, 30, 50),
        ];
        for (m, n, k) in shapes {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let init: Vec<f32> = (0..m * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            for (a_t, b_t) in [(false, false), (false, true), (true, false), (true, true)] {
                let av = if a_t { Mat::t(&a, m) } else { Mat::rows(&a, k) };
                let bv = if b_t { Mat::t(&b, k) } else { Mat::rows(&b, n) };
                let want = naive(m, n, k, av, bv);
                let mut got = vec![f32::NAN; m * n];
                matmul(m, n, k, &mut got, av, bv);
                let tol = 1e-4 * (k as f32).sqrt();
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= tol, "{m}x{n}x{k} {a_t}/{b_t}: {g} vs {w}");
                }
                let mut acc = init.clone();
                matmul_add(m, n, k, &mut acc, av, bv);
                for ((g, w), i) in acc.iter().zip(&want).zip(&init) {
                    assert!(
                        (g - (w + i)).abs() <= tol,
                        "{m}x{n}x{k} {a_t}/{b_t} add: {g} vs {w}+{i}"
                    );
                }
            }
        }
    }
}
