//! Small vector kernels, compiled for AVX2+FMA and chosen at run time (the crate is built for
//! baseline x86-64, where LLVM would only use 4-wide SSE). They are memory-bound, so AVX-512
//! would add little; the GEMM, where it matters, uses AVX-512 through `gemm`'s own dispatch.
//!
//! [`simd_dispatch!`] turns a plain `#[inline(always)]` body into a function that runs the
//! AVX2+FMA build of that body when the CPU has it; the optimisers' update rules use it too.

const LANES: usize = 16;

#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Sum of squared differences, accumulated in f64 over independent lanes: a single running sum
/// would chain every add on the one before (latency-bound, 5% of a batch-256 modular step).
#[inline(always)]
fn sq_dist_body(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f64 =
        ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            let d = (x[l] - y[l]) as f64;
            acc[l] += d * d;
        }
    }
    acc.iter().sum::<f64>() + tail
}

#[inline(always)]
fn axpy_body(alpha: f32, x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(y, &x)| *y += alpha * x);
}

#[inline(always)]
fn add_body(y: &mut [f32], x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, &x)| *y += x);
}

macro_rules! simd_dispatch {
    ($name:ident, $body:ident, $($rest:tt)*) => {
        simd_dispatch!(pub(crate) fn $name, $body, $($rest)*);
    };
    ($vis:vis fn $name:ident, $body:ident, ($($arg:ident : $ty:ty),*) $(-> $ret:ty)?) => {
        #[cfg(target_arch = "x86_64")]
        mod $name {
            use super::*;
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            pub unsafe fn v3($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
        }
        #[inline]
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                // SAFETY: each variant runs only when the CPU reports its features.
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    return unsafe { $name::v3($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

pub(crate) use simd_dispatch;

simd_dispatch!(dot, dot_body, (a: &[f32], b: &[f32]) -> f32);
simd_dispatch!(sq_dist, sq_dist_body, (a: &[f32], b: &[f32]) -> f64);
simd_dispatch!(axpy, axpy_body, (alpha: f32, x: &[f32], y: &mut [f32]));
simd_dispatch!(add, add_body, (y: &mut [f32], x: &[f32]));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sq_dist_is_the_sum_of_squared_differences() {
        for len in [0, 1, 15, 16, 17, 40, 1000] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos() * 0.5).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
            let got = sq_dist(&a, &b);
            assert!((got - want).abs() <= 1e-12 * want.max(1.0), "len {len}: {got} vs {want}");
            assert_eq!(sq_dist_body(&a, &b), got, "the plain and the AVX2 builds agree");
        }
    }
}
