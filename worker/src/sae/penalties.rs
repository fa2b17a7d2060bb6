//! Sparsity penalties on the codes and the router, as differentiable candle scalars.
//!
//! Each returns a 0-d tensor; the model multiplies it by its weight from the config. Scales are
//! chosen so a weight means the same thing at any width: L1 and KL are means over code neurons,
//! Hoyer a mean over samples of a number in [0, 1].

use candle_core::{D, DType, Result, Tensor};

/// Rates are clamped to [KL_EPS, 1 - KL_EPS] so the KL stays finite for dead or saturated neurons.
pub const KL_EPS: f64 = 1e-6;

/// L1 penalty: mean |z| over every element of the (B, N) codes.
pub fn l1(z: &Tensor) -> Result<Tensor> {
    z.abs()?.mean_all()
}

/// KL penalty to a target rate `rho`, on batch-mean activation.
///
/// The classic sparse-autoencoder penalty expects activations in [0, 1] (sigmoid units). Codes
/// here are ReLU outputs, so each code is clamped to [0, 1] before averaging over the batch:
/// a unit firing at or above 1 counts as fully active, and the penalty cannot be lowered by
/// shrinking large activations. The batch rate rho_hat_j is then clamped to
/// [KL_EPS, 1 - KL_EPS]. Returns the mean over neurons of
/// `rho ln(rho / rho_hat_j) + (1 - rho) ln((1 - rho) / (1 - rho_hat_j))`.
pub fn kl(z: &Tensor, rho: f64) -> Result<Tensor> {
    let rate = z.clamp(0f32, 1f32)?.mean(0)?.clamp(KL_EPS as f32, (1.0 - KL_EPS) as f32)?;
    // rho ln rho - rho ln r + (1-rho) ln(1-rho) - (1-rho) ln(1-r)
    let constant = rho * rho.ln() + (1.0 - rho) * (1.0 - rho).ln();
    let log_r = rate.log()?;
    let log_1mr = rate.affine(-1.0, 1.0)?.log()?;
    let per_neuron = (log_r.affine(-rho, constant)? - log_1mr.affine(1.0 - rho, 0.0)?)?;
    per_neuron.mean_all()
}

/// Hoyer penalty: mean over samples of `1 - sparseness`, with
/// `sparseness = (sqrt(n) - |z|_1 / |z|_2) / (sqrt(n) - 1)` over the n = N codes of a sample.
///
/// An all-zero row counts as maximally sparse (|z|_1/|z|_2 := 1, penalty 0) and gets a finite,
/// zero gradient: its squared norm is shifted by 1 inside the square root, so the root is never
/// differentiated at 0. With n = 1 every row is trivially sparse and the penalty is 0.
pub fn hoyer(z: &Tensor) -> Result<Tensor> {
    let n = z.dim(D::Minus1)?;
    if n <= 1 {
        return Tensor::zeros((), DType::F32, z.device());
    }
    let l1 = z.abs()?.sum(D::Minus1)?;
    let sumsq = z.sqr()?.sum(D::Minus1)?;
    let zero_row = sumsq.eq(0f32)?.to_dtype(DType::F32)?;
    let ratio = ((l1 + &zero_row)? / (sumsq + &zero_row)?.sqrt()?)?;
    let sqrt_n = (n as f64).sqrt();
    // 1 - (sqrt_n - ratio) / (sqrt_n - 1) = (ratio - 1) / (sqrt_n - 1)
    ratio.affine(1.0 / (sqrt_n - 1.0), -1.0 / (sqrt_n - 1.0))?.mean_all()
}

/// L1 of the router's weights: sum |w|.
pub fn routing_l1(router_weight: &Tensor) -> Result<Tensor> {
    router_weight.abs()?.sum_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(data: &[f32], b: usize, n: usize) -> Tensor {
        Tensor::from_slice(data, (b, n), &Device::Cpu).unwrap()
    }

    fn s(t: Tensor) -> f64 {
        t.to_scalar::<f32>().unwrap() as f64
    }

    #[test]
    fn l1_is_mean_abs() {
        assert!((s(l1(&t(&[1., -2., 0., 3.], 2, 2)).unwrap()) - 1.5).abs() < 1e-6);
    }

    #[test]
    fn kl_matches_hand_computation() {
        // Batch of 2, 2 neurons: rates (0.5+0.1)/2 = 0.3 and (1 clamped + 0)/2 = 0.5.
        let z = t(&[0.5, 3.0, 0.1, 0.0], 2, 2);
        let rho: f64 = 0.1;
        let k = |r: f64| rho * (rho / r).ln() + (1.0 - rho) * ((1.0 - rho) / (1.0 - r)).ln();
        let expect = (k(0.3) + k(0.5)) / 2.0;
        let got = s(kl(&z, rho).unwrap());
        assert!((got - expect).abs() < 1e-5, "{got} vs {expect}");
        // At the target rate the penalty is zero.
        let z = t(&[0.1, 0.1], 2, 1);
        assert!(s(kl(&z, 0.1).unwrap()).abs() < 1e-6);
        // All-dead neurons stay finite.
        assert!(s(kl(&t(&[0.0; 4], 2, 2), 0.05).unwrap()).is_finite());
    }

    #[test]
    fn hoyer_matches_hand_computation() {
        // Row 0: one-hot -> sparseness 1, penalty 0. Row 1: uniform (1,1,1,1): l1/l2 = 2,
        // sparseness (2-2)/(2-1) = 0 -> penalty 1. Mean 0.5.
        let z = t(&[0., 5., 0., 0., 1., 1., 1., 1.], 2, 4);
        assert!((s(hoyer(&z).unwrap()) - 0.5).abs() < 1e-6);
        // Row (3, 4, 0, 0): l1/l2 = 7/5, penalty (1.4 - 1) / (2 - 1) = 0.4.
        let z = t(&[3., 4., 0., 0.], 1, 4);
        assert!((s(hoyer(&z).unwrap()) - 0.4).abs() < 1e-6);
    }

    #[test]
    fn hoyer_is_safe_for_zero_rows() {
        let z = Var::from_slice(&[0f32; 4], (1, 4), &Device::Cpu).unwrap();
        let p = hoyer(&z).unwrap();
        assert_eq!(s(p.clone()), 0.0);
        let g = p.backward().unwrap();
        let g: Vec<f32> = g.get(&z).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(g.iter().all(|x| x.is_finite()), "{g:?}");
        assert_eq!(s(hoyer(&t(&[2.0], 1, 1)).unwrap()), 0.0);
    }

    #[test]
    fn routing_l1_sums_abs_weights() {
        assert!((s(routing_l1(&t(&[1., -2., 0.5, 0.], 2, 2)).unwrap()) - 3.5).abs() < 1e-6);
    }
}
