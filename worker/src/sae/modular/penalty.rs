//! The L1, KL and Hoyer penalties on the codes, and their gradients.

use msae_shared::TrialConfig;

use super::sign;
use crate::sae::penalties::KL_EPS;

/// The weighted L1, KL and Hoyer penalties of the codes `c` (rows, n); with `grad`, adds their
/// gradient with respect to `c` into it.
pub(super) fn penalties(
    cfg: &TrialConfig,
    c: &[f32],
    rows: usize,
    n: usize,
    mut grad: Option<&mut [f32]>,
) -> f64 {
    let mut total = 0.0;
    let count = (rows * n) as f64;
    if cfg.l1_weight > 0.0 {
        let sum: f64 = c.iter().map(|v| v.abs() as f64).sum();
        total += cfg.l1_weight * sum / count;
        if let Some(g) = grad.as_deref_mut() {
            let w = (cfg.l1_weight / count) as f32;
            g.iter_mut().zip(c).for_each(|(g, &v)| *g += w * sign(v));
        }
    }
    if cfg.kl_weight > 0.0 {
        let rho = cfg.kl_target;
        let (lo, hi) = (KL_EPS as f32, (1.0 - KL_EPS) as f32);
        let mut rate = vec![0.0f32; n];
        for row in c.chunks(n) {
            rate.iter_mut().zip(row).for_each(|(r, &v)| *r += v.clamp(0.0, 1.0));
        }
        rate.iter_mut().for_each(|r| *r /= rows as f32);
        let constant = rho * rho.ln() + (1.0 - rho) * (1.0 - rho).ln();
        let mut sum = 0.0;
        let mut coef = vec![0.0f32; n];
        for (r, cf) in rate.iter().zip(coef.iter_mut()) {
            let rc = r.clamp(lo, hi) as f64;
            sum += constant - rho * rc.ln() - (1.0 - rho) * (1.0 - rc).ln();
            if *r > lo && *r < hi {
                let d = -rho / rc + (1.0 - rho) / (1.0 - rc);
                *cf = (cfg.kl_weight * d / n as f64 / rows as f64) as f32;
            }
        }
        total += cfg.kl_weight * sum / n as f64;
        if let Some(g) = grad.as_deref_mut() {
            for (grow, crow) in g.chunks_mut(n).zip(c.chunks(n)) {
                for ((g, &v), &cf) in grow.iter_mut().zip(crow).zip(&coef) {
                    if v > 0.0 && v < 1.0 {
                        *g += cf;
                    }
                }
            }
        }
    }
    if cfg.hoyer_weight > 0.0 && n > 1 {
        let sqrt_n = (n as f64).sqrt();
        let mut sum = 0.0;
        let scale = cfg.hoyer_weight / (rows as f64 * (sqrt_n - 1.0));
        for (b, row) in c.chunks(n).enumerate() {
            let l1: f64 = row.iter().map(|v| v.abs() as f64).sum();
            let sumsq: f64 = row.iter().map(|v| (*v as f64).powi(2)).sum();
            if sumsq == 0.0 {
                sum += 0.0; // (0 + 1) / sqrt(0 + 1) - 1
                continue;
            }
            let l2 = sumsq.sqrt();
            sum += (l1 / l2 - 1.0) / (sqrt_n - 1.0);
            if let Some(g) = grad.as_deref_mut() {
                let grow = &mut g[b * n..(b + 1) * n];
                let l2_3 = l2 * sumsq;
                for (g, &v) in grow.iter_mut().zip(row) {
                    *g += (scale * (sign(v) as f64 / l2 - l1 * v as f64 / l2_3)) as f32;
                }
            }
        }
        total += cfg.hoyer_weight * sum / rows as f64;
    }
    total
}
