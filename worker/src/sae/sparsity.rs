//! The three sparsity stages of the modular SAE's code layer, in the reference order:
//! 1. layer sparsity on the flat (B, N) code ([`LayerSparsityMode`]);
//! 2. stripe sparsity on (B, S, D) ([`StripeSparsityMode`]);
//! 3. lifetime stripe sparsity (`active_stripes_per_batch` < 1).
//!
//! Every stage builds a 0/1 mask with [`crate::sae::topk`] and applies it as `z * mask`, so gradients
//! reach only the kept entries. Routing is the exception that must pass gradient to its router:
//! with [`RoutingGate::Scores`] kept stripes are multiplied by their score; with
//! [`RoutingGate::StraightThrough`] the gate is `mask + (scores - scores.detach()) * mask`:
//! forward the 0/1 mask, backward the identity on the selected scores.
//!
//! `boosted` mode (Numenta k-winners) keeps per-neuron duty cycles, a fraction EMA of "neuron
//! won" with weight 1/`duty_cycle_period`; they update only in training ([`Sparsity::forward_train`]).
//! Batch-dependent modes (`lifetime`, `lifetime_batch_mean`, `active_stripes_per_batch`) use the
//! batch they are given, in evaluation too.
//!
//! Mask distortion (the original's `distort_prob`): in training only, every bit of the stripe
//! masks of stages 2 and 3 (ordinary, routing, lifetime-stripe) is flipped with probability p
//! (`mask XOR (uniform < p)`) before it gates the code; for routing the flipped mask is the one
//! multiplied by the scores. p is `distort_prob` lowered by `distort_prob_decay` per epoch of
//! `run_steps_per_epoch` training steps, never below 0; the clock is the number of
//! [`Sparsity::forward_train`] calls (one per training step). The draws come from a `StdRng`
//! seeded by the config's seed, so training stays deterministic. Stage 1 is never distorted.

use crate::sae::topk::{self, Axis};
use candle_core::{D, DType, Result, Tensor};
use msae_shared::TrialConfig;
use msae_shared::config::{LayerSparsityMode, RoutingGate, StripeSparsityMode, decayed_prob};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Mixed into the seed for the mask distortion's draws.
pub(crate) const DISTORT_SEED_SALT: u64 = 0xD157_0000_0000_0003;

/// The sparsity hyperparameters, taken from a [`TrialConfig`].
#[derive(Debug, Clone, PartialEq)]
pub struct SparsityParams {
    pub layer_mode: LayerSparsityMode,
    pub lifetime_rate: f64,
    pub boost_strength: f64,
    pub duty_cycle_period: usize,
    pub stripe_mode: StripeSparsityMode,
    pub stripe_k: usize,
    pub gate: RoutingGate,
    pub active_stripes_per_batch: f64,
    pub num_stripes: usize,
    pub stripe_dim: usize,
    /// Stripe-mask flip probability at the first epoch (0 = off).
    pub distort_prob: f64,
    /// Decrease of the flip probability per epoch.
    pub distort_prob_decay: f64,
    /// Training steps per epoch (0 = unknown: the probability does not decay).
    pub steps_per_epoch: usize,
    /// Seed of the distortion's draws.
    pub seed: u64,
}

impl SparsityParams {
    pub fn from_config(cfg: &TrialConfig) -> Self {
        SparsityParams {
            layer_mode: cfg.layer_sparsity_mode,
            lifetime_rate: cfg.lifetime_rate,
            boost_strength: cfg.boost_strength,
            duty_cycle_period: cfg.duty_cycle_period,
            stripe_mode: cfg.stripe_sparsity_mode,
            stripe_k: cfg.stripe_k,
            gate: cfg.routing_gate,
            active_stripes_per_batch: cfg.active_stripes_per_batch,
            num_stripes: cfg.num_stripes,
            stripe_dim: cfg.stripe_dim,
            distort_prob: cfg.distort_prob,
            distort_prob_decay: cfg.distort_prob_decay,
            steps_per_epoch: cfg.run_steps_per_epoch,
            seed: cfg.seed,
        }
    }

    /// The stripe-mask flip probability at training step `step` (0-based).
    pub fn distort_prob_at(&self, step: usize) -> f64 {
        let epoch = step.checked_div(self.steps_per_epoch).unwrap_or(0);
        decayed_prob(self.distort_prob, self.distort_prob_decay, epoch)
    }

    /// Code width N = S * D.
    pub fn code_dim(&self) -> usize {
        self.num_stripes * self.stripe_dim
    }
}

/// The sparsity stages with their state (duty cycles of `boosted` mode, the distortion's clock
/// and random stream).
#[derive(Debug, Clone)]
pub struct Sparsity {
    pub params: SparsityParams,
    /// Per-neuron duty cycle d_i in [0, 1]: EMA of the fraction of samples neuron i won.
    pub duty: Vec<f32>,
    /// Training steps taken ([`Sparsity::forward_train`] calls): the distortion schedule's clock.
    pub train_steps: usize,
    distort_rng: StdRng,
}

/// Flips mask bits with probability `p` (training-time distortion).
struct Distorter<'a> {
    p: f64,
    rng: &'a mut StdRng,
}

impl Distorter<'_> {
    /// `mask XOR (uniform < p)`, drawn in row-major order.
    fn flip(&mut self, mask: &Tensor) -> Result<Tensor> {
        let mut bits = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for b in &mut bits {
            if self.rng.random::<f64>() < self.p {
                *b = if *b != 0.0 { 0.0 } else { 1.0 };
            }
        }
        Tensor::from_vec(bits, mask.shape(), mask.device())
    }
}

/// Applies the distortion, if any, to a stripe mask.
fn distorted(mask: Tensor, distort: Option<&mut Distorter<'_>>) -> Result<Tensor> {
    match distort {
        Some(d) => d.flip(&mask),
        None => Ok(mask),
    }
}

impl Sparsity {
    pub fn new(params: SparsityParams) -> Self {
        let n = params.code_dim();
        let distort_rng = StdRng::seed_from_u64(params.seed ^ DISTORT_SEED_SALT);
        Sparsity { params, duty: vec![0.0; n], train_steps: 0, distort_rng }
    }

    /// Boost factors b_i = exp(beta * (k/N - d_i)); the target density k/N is a float.
    pub fn boost_factors(&self, k: usize) -> Vec<f32> {
        let n = self.params.code_dim() as f64;
        let target = k as f64 / n;
        let beta = self.params.boost_strength;
        self.duty.iter().map(|&d| (beta * (target - d as f64)).exp() as f32).collect()
    }

    /// Evaluation-mode sparsity: duty cycles are read, never updated.
    /// `z`: (B, N) activations; `router_scores`: (B, S), required in `routing` mode; `k`: layer k.
    pub fn forward(&self, z: &Tensor, router_scores: Option<&Tensor>, k: usize) -> Result<Tensor> {
        Ok(self.apply(z, router_scores, k, None)?.0)
    }

    /// Training-mode sparsity: as [`Sparsity::forward`] with the stripe masks distorted (when
    /// `distort_prob` > 0, see the module docs), then duty cycles move towards the fraction of
    /// the batch each neuron won (EMA weight 1/duty_cycle_period).
    pub fn forward_train(
        &mut self,
        z: &Tensor,
        router_scores: Option<&Tensor>,
        k: usize,
    ) -> Result<Tensor> {
        let p = self.params.distort_prob_at(self.train_steps);
        self.train_steps += 1;
        let (out, winners) = if p > 0.0 {
            let mut rng = self.distort_rng.clone();
            let result =
                self.apply(z, router_scores, k, Some(&mut Distorter { p, rng: &mut rng }))?;
            self.distort_rng = rng;
            result
        } else {
            self.apply(z, router_scores, k, None)?
        };
        if let Some(win) = winners {
            let n = self.params.code_dim();
            let b = win.len() / n.max(1);
            let alpha = 1.0 / self.params.duty_cycle_period as f32;
            let mut frac = vec![0.0f32; n];
            for row in win.chunks(n) {
                for (f, &w) in frac.iter_mut().zip(row) {
                    *f += w;
                }
            }
            for (d, f) in self.duty.iter_mut().zip(frac) {
                *d += alpha * (f / b as f32 - *d);
            }
        }
        Ok(out)
    }

    /// All three stages, the stripe masks distorted by `distort` when given. Returns the output
    /// and, in `boosted` mode, the winners mask (B*N).
    fn apply(
        &self,
        z: &Tensor,
        router_scores: Option<&Tensor>,
        k: usize,
        mut distort: Option<&mut Distorter<'_>>,
    ) -> Result<(Tensor, Option<Vec<f32>>)> {
        let (z, winners) = self.layer(z, k)?;
        let z = self.stripe(&z, router_scores, distort.as_deref_mut())?;
        let z = self.lifetime_stripe(&z, distort)?;
        Ok((z, winners))
    }

    /// Stage 1: layer sparsity on (B, N).
    fn layer(&self, z: &Tensor, k: usize) -> Result<(Tensor, Option<Vec<f32>>)> {
        let p = &self.params;
        match p.layer_mode {
            LayerSparsityMode::None => Ok((z.clone(), None)),
            LayerSparsityMode::Ordinary => {
                let mask = topk::topk_mask(z, k, Axis::Row)?;
                Ok((z.mul(&mask)?, None))
            }
            LayerSparsityMode::Lifetime => {
                let b = z.dim(0)?;
                let mask = topk::topk_mask(z, topk::lifetime_k(p.lifetime_rate, b), Axis::Column)?;
                Ok((z.mul(&mask)?, None))
            }
            LayerSparsityMode::LifetimeBatchMean => {
                // One shared set of k neurons, chosen by batch-mean activation, for every sample.
                let mean = z.detach().mean_keepdim(0)?;
                let mask = topk::topk_mask(&mean, k, Axis::Row)?;
                Ok((z.broadcast_mul(&mask)?, None))
            }
            LayerSparsityMode::Boosted => {
                let n = p.code_dim();
                let boost = Tensor::from_vec(self.boost_factors(k), (1, n), z.device())?;
                let boosted = z.detach().broadcast_mul(&boost)?;
                let mask = topk::topk_mask(&boosted, k, Axis::Row)?;
                let winners = mask.flatten_all()?.to_vec1::<f32>()?;
                // Output the unboosted activations of the winners.
                Ok((z.mul(&mask)?, Some(winners)))
            }
        }
    }

    /// Stage 2: stripe sparsity.
    fn stripe(
        &self,
        z: &Tensor,
        router_scores: Option<&Tensor>,
        distort: Option<&mut Distorter<'_>>,
    ) -> Result<Tensor> {
        let p = &self.params;
        let (b, n) = z.dims2()?;
        let (s, d) = (p.num_stripes, p.stripe_dim);
        match p.stripe_mode {
            StripeSparsityMode::None => Ok(z.clone()),
            StripeSparsityMode::Ordinary => {
                let scores = stripe_means(z, s, d)?;
                let mask = distorted(topk::topk_mask(&scores, p.stripe_k, Axis::Row)?, distort)?;
                apply_stripe_gate(z, &mask, s, d)
            }
            StripeSparsityMode::Routing => {
                let scores = match router_scores {
                    Some(t) => t,
                    None => candle_core::bail!("routing stripe sparsity needs router scores"),
                };
                if scores.dims2()? != (b, s) {
                    candle_core::bail!(
                        "router scores {:?} are not (batch={b}, stripes={s})",
                        scores.dims()
                    );
                }
                let mask = distorted(topk::topk_mask(scores, p.stripe_k, Axis::Row)?, distort)?;
                let gate = match p.gate {
                    RoutingGate::Scores => scores.mul(&mask)?,
                    RoutingGate::StraightThrough => {
                        // Forward: the 0/1 mask. Backward: identity on the selected scores.
                        let st = (scores - scores.detach())?.mul(&mask)?;
                        (&mask + st)?
                    }
                };
                debug_assert_eq!(n, s * d);
                apply_stripe_gate(z, &gate, s, d)
            }
        }
    }

    /// Stage 3: each stripe active only for its ceil(p*B) highest-scoring samples of the batch
    /// (score = mean of its D activations, after the previous stages).
    fn lifetime_stripe(&self, z: &Tensor, distort: Option<&mut Distorter<'_>>) -> Result<Tensor> {
        let p = &self.params;
        if p.active_stripes_per_batch >= 1.0 {
            return Ok(z.clone());
        }
        let b = z.dim(0)?;
        let scores = stripe_means(z, p.num_stripes, p.stripe_dim)?;
        let keep = topk::lifetime_k(p.active_stripes_per_batch, b);
        let mask = distorted(topk::topk_mask(&scores, keep, Axis::Column)?, distort)?;
        apply_stripe_gate(z, &mask, p.num_stripes, p.stripe_dim)
    }
}

/// Per-sample mean of each stripe's D activations: (B, S*D) -> (B, S).
pub fn stripe_means(z: &Tensor, s: usize, d: usize) -> Result<Tensor> {
    let b = z.dim(0)?;
    z.reshape((b, s, d))?.mean(D::Minus1)
}

/// Multiplies each stripe of `z` (B, S*D) by its gate value in `gate` (B, S).
pub fn apply_stripe_gate(z: &Tensor, gate: &Tensor, s: usize, d: usize) -> Result<Tensor> {
    let b = z.dim(0)?;
    let gate = gate.to_dtype(DType::F32)?.reshape((b, s, 1))?;
    z.reshape((b, s, d))?.broadcast_mul(&gate)?.reshape((b, s * d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::rngs::StdRng;

    fn params(s: usize, d: usize) -> SparsityParams {
        SparsityParams {
            layer_mode: LayerSparsityMode::None,
            lifetime_rate: 0.5,
            boost_strength: 1.0,
            duty_cycle_period: 10,
            stripe_mode: StripeSparsityMode::None,
            stripe_k: 1,
            gate: RoutingGate::Scores,
            active_stripes_per_batch: 1.0,
            num_stripes: s,
            stripe_dim: d,
            distort_prob: 0.0,
            distort_prob_decay: 0.0,
            steps_per_epoch: 0,
            seed: 0,
        }
    }

    fn t(data: &[f32], b: usize, n: usize) -> Tensor {
        Tensor::from_slice(data, (b, n), &Device::Cpu).unwrap()
    }

    fn v(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn none_is_identity() {
        let sp = Sparsity::new(params(2, 2));
        let z = t(&[1., 2., 3., 4.], 1, 4);
        assert_eq!(v(&sp.forward(&z, None, 2).unwrap()), vec![1., 2., 3., 4.]);
    }

    #[test]
    fn ordinary_keeps_k_per_row_with_ties() {
        let mut p = params(2, 2);
        p.layer_mode = LayerSparsityMode::Ordinary;
        let sp = Sparsity::new(p);
        let z = t(&[0.5, 2.0, 1.0, 3.0, /* ties */ 1.0, 1.0, 1.0, 0.0], 2, 4);
        assert_eq!(v(&sp.forward(&z, None, 2).unwrap()), vec![0., 2., 0., 3., 1., 1., 0., 0.]);
    }

    #[test]
    fn lifetime_keeps_ceil_rate_b_per_column() {
        let mut p = params(1, 3);
        p.layer_mode = LayerSparsityMode::Lifetime;
        p.lifetime_rate = 0.5; // B = 4 -> 2 per column
        let sp = Sparsity::new(p);
        let z = t(&[1., 0., 5., 2., 0., 4., 3., 1., 3., 4., 0., 2.], 4, 3);
        // col0: 1,2,3,4 -> rows 2,3; col1: 0,0,1,0 -> rows 2 and 0 (tie to lower); col2: 5,4,3,2 -> rows 0,1
        assert_eq!(
            v(&sp.forward(&z, None, 1).unwrap()),
            vec![0., 0., 5., 0., 0., 4., 3., 1., 0., 4., 0., 0.]
        );
    }

    #[test]
    fn lifetime_batch_mean_shares_one_set() {
        let mut p = params(1, 3);
        p.layer_mode = LayerSparsityMode::LifetimeBatchMean;
        let sp = Sparsity::new(p);
        let z = t(&[1., 0., 5., 9., 0., 0.], 2, 3); // means 5, 0, 2.5 -> k=1 keeps neuron 0
        assert_eq!(v(&sp.forward(&z, None, 1).unwrap()), vec![1., 0., 0., 9., 0., 0.]);
    }

    #[test]
    fn boosted_duty_cycles_move_the_winners() {
        let mut p = params(1, 2);
        p.layer_mode = LayerSparsityMode::Boosted;
        p.boost_strength = 10.0;
        p.duty_cycle_period = 2;
        let mut sp = Sparsity::new(p);
        // Neuron 0 is slightly stronger; without boosting it would always win.
        let z = t(&[1.0, 0.9], 1, 2);
        let out = sp.forward_train(&z, None, 1).unwrap();
        assert_eq!(v(&out), vec![1.0, 0.0]);
        // Duty cycles are fractions: d0 = 0 + 0.5 * (1 - 0) = 0.5, d1 = 0.
        assert_eq!(sp.duty, vec![0.5, 0.0]);
        // Boost: b0 = exp(10*(0.5-0.5)) = 1, b1 = exp(10*0.5) -> neuron 1 wins, output unboosted.
        let out = sp.forward_train(&z, None, 1).unwrap();
        assert_eq!(v(&out), vec![0.0, 0.9]);
        assert_eq!(sp.duty, vec![0.25, 0.5]);
        // Evaluation does not move the duty cycles.
        let before = sp.duty.clone();
        sp.forward(&z, None, 1).unwrap();
        assert_eq!(sp.duty, before);
    }

    #[test]
    fn boost_target_density_is_a_float() {
        let mut p = params(2, 2);
        p.layer_mode = LayerSparsityMode::Boosted;
        p.boost_strength = 2.0;
        let sp = Sparsity::new(p);
        // k/N = 1/4 (the original truncated it to 0): b = exp(2 * 0.25) with zero duty.
        let b = sp.boost_factors(1);
        assert!((b[0] - (0.5f32).exp()).abs() < 1e-6, "{b:?}");
    }

    #[test]
    fn ordinary_stripes_keep_highest_mean() {
        let mut p = params(3, 2);
        p.stripe_mode = StripeSparsityMode::Ordinary;
        p.stripe_k = 1;
        let sp = Sparsity::new(p);
        // stripe means: row0 (1.5, 2.0, 0.5) -> stripe 1; row1 (1, 1, 1) tie -> stripe 0
        let z = t(&[1., 2., 4., 0., 0., 1., 2., 0., 1., 1., 0., 2.], 2, 6);
        assert_eq!(
            v(&sp.forward(&z, None, 1).unwrap()),
            vec![0., 0., 4., 0., 0., 0., 2., 0., 0., 0., 0., 0.]
        );
    }

    #[test]
    fn routing_scores_gate_and_gradient() {
        let mut p = params(2, 2);
        p.stripe_mode = StripeSparsityMode::Routing;
        p.stripe_k = 1;
        let sp = Sparsity::new(p);
        let dev = Device::Cpu;
        let z = Var::from_slice(&[1f32, 2., 3., 4.], (1, 4), &dev).unwrap();
        let scores = Var::from_slice(&[0.5f32, 2.0], (1, 2), &dev).unwrap();
        let out = sp.forward(&z, Some(&scores), 1).unwrap();
        // Stripe 1 is routed; kept stripes are multiplied by their score.
        assert_eq!(v(&out), vec![0., 0., 6., 8.]);
        let g = out.sum_all().unwrap().backward().unwrap();
        assert_eq!(v(g.get(&scores).unwrap()), vec![0., 7.]);
        assert_eq!(v(g.get(&z).unwrap()), vec![0., 0., 2., 2.]);
    }

    #[test]
    fn routing_straight_through_gate() {
        let mut p = params(2, 2);
        p.stripe_mode = StripeSparsityMode::Routing;
        p.stripe_k = 1;
        p.gate = RoutingGate::StraightThrough;
        let sp = Sparsity::new(p);
        let dev = Device::Cpu;
        let z = Var::from_slice(&[1f32, 2., 3., 4.], (1, 4), &dev).unwrap();
        let scores = Var::from_slice(&[0.5f32, 2.0], (1, 2), &dev).unwrap();
        let out = sp.forward(&z, Some(&scores), 1).unwrap();
        // Forward multiplies by the 0/1 mask.
        assert_eq!(v(&out), vec![0., 0., 3., 4.]);
        let g = out.sum_all().unwrap().backward().unwrap();
        // Backward: identity on the selected score (d/ds = sum of the stripe), none elsewhere.
        assert_eq!(v(g.get(&scores).unwrap()), vec![0., 7.]);
        assert_eq!(v(g.get(&z).unwrap()), vec![0., 0., 1., 1.]);
    }

    #[test]
    fn active_stripes_per_batch_after_stripe_sparsity() {
        let mut p = params(2, 1);
        p.active_stripes_per_batch = 0.5; // B = 4 -> each stripe active for 2 samples
        let sp = Sparsity::new(p);
        let z = t(&[1., 4., 2., 3., 3., 2., 4., 1.], 4, 2);
        // stripe 0 scores 1,2,3,4 -> rows 2,3; stripe 1 scores 4,3,2,1 -> rows 0,1
        assert_eq!(v(&sp.forward(&z, None, 1).unwrap()), vec![0., 4., 0., 3., 3., 0., 4., 0.]);

        // With ordinary stripes first (k=1), stage 3 scores the already-sparsified code.
        let mut p = params(2, 1);
        p.stripe_mode = StripeSparsityMode::Ordinary;
        p.active_stripes_per_batch = 0.25; // one sample per stripe
        let sp = Sparsity::new(p);
        let z = t(&[5., 4., 1., 2., 3., 0., 0.5, 0.1], 4, 2);
        // after stage 2: [5,0],[0,2],[3,0],[0.5,0]; stripe0 best row 0, stripe1 best row 1
        assert_eq!(v(&sp.forward(&z, None, 1).unwrap()), vec![5., 0., 0., 2., 0., 0., 0., 0.]);
    }

    /// (B, S) positive values in [0.5, 1.5) from `seed`.
    fn positive(b: usize, s: usize, seed: u64) -> Tensor {
        let mut rng = StdRng::seed_from_u64(seed);
        let data: Vec<f32> = (0..b * s).map(|_| rng.random_range(0.5f32..1.5)).collect();
        t(&data, b, s)
    }

    /// Which stripes (D = 1) pass, as booleans.
    fn passed(out: &Tensor) -> Vec<bool> {
        v(out).iter().map(|x| *x != 0.0).collect()
    }

    #[test]
    fn distortion_flips_each_stripe_mask_bit_at_the_rate() {
        let (b, s) = (200, 50);
        let z = positive(b, s, 1);
        let scores = positive(b, s, 2);
        let setups: [(&str, StripeSparsityMode, f64); 3] = [
            ("ordinary", StripeSparsityMode::Ordinary, 1.0),
            ("routing", StripeSparsityMode::Routing, 1.0),
            ("lifetime-stripe", StripeSparsityMode::None, 0.2),
        ];
        for (name, mode, asb) in setups {
            for p in [0.25, 1.0] {
                let mut params = params(s, 1);
                params.stripe_mode = mode;
                params.stripe_k = 10;
                params.active_stripes_per_batch = asb;
                params.distort_prob = p;
                let mut sp = Sparsity::new(params);
                let r = (mode == StripeSparsityMode::Routing).then_some(&scores);
                let eval = passed(&sp.forward(&z, r, 1).unwrap());
                let train = passed(&sp.forward_train(&z, r, 1).unwrap());
                let kept = eval.iter().filter(|x| **x).count();
                let (mut dropped, mut added) = (0, 0);
                for (e, t) in eval.iter().zip(&train) {
                    match (e, t) {
                        (true, false) => dropped += 1,
                        (false, true) => added += 1,
                        _ => {}
                    }
                }
                let rate = (dropped + added) as f64 / eval.len() as f64;
                if p == 1.0 {
                    assert_eq!((dropped, added), (kept, eval.len() - kept), "{name}: all flip");
                    continue;
                }
                // 10,000 bits: the rate's std is about 0.004.
                assert!((rate - p).abs() < 0.02, "{name}: flip rate {rate}, expected {p}");
                // Both directions, each at about p.
                let drop_rate = dropped as f64 / kept as f64;
                let add_rate = added as f64 / (eval.len() - kept) as f64;
                assert!((drop_rate - p).abs() < 0.05, "{name}: kept bits dropped at {drop_rate}");
                assert!((add_rate - p).abs() < 0.03, "{name}: other bits passed at {add_rate}");
                // Evaluation is never distorted.
                assert_eq!(passed(&sp.forward(&z, r, 1).unwrap()), eval, "{name}");
            }
        }
    }

    #[test]
    fn distortion_decays_per_epoch_to_zero_and_is_deterministic() {
        let mut params = params(4, 1);
        params.stripe_mode = StripeSparsityMode::Ordinary;
        params.stripe_k = 2;
        params.distort_prob = 0.4;
        params.distort_prob_decay = 0.1;
        params.steps_per_epoch = 3;
        let at: Vec<f64> = [0, 2, 3, 5, 6, 9, 11, 12, 100]
            .iter()
            .map(|&s| (params.distort_prob_at(s) * 1e9).round() / 1e9)
            .collect();
        assert_eq!(at, [0.4, 0.4, 0.3, 0.3, 0.2, 0.1, 0.1, 0.0, 0.0]);
        // Unknown epoch length: no decay.
        let steady = SparsityParams { steps_per_epoch: 0, ..params.clone() };
        assert_eq!(steady.distort_prob_at(1000), 0.4);

        let z = positive(64, 4, 3);
        let run = |seed: u64| {
            let mut sp = Sparsity::new(SparsityParams { seed, ..params.clone() });
            let eval = v(&sp.forward(&z, None, 1).unwrap());
            let outs: Vec<Vec<f32>> =
                (0..14).map(|_| v(&sp.forward_train(&z, None, 1).unwrap())).collect();
            assert_eq!(sp.train_steps, 14);
            (eval, outs)
        };
        let (eval, outs) = run(7);
        // Epochs 0-3 distort (p 0.4 .. 0.1); from step 12 (epoch 4) p is 0: no flips.
        assert!(outs[..12].iter().all(|o| *o != eval), "a distorted step matched evaluation");
        assert_eq!(outs[12], eval);
        assert_eq!(outs[13], eval);
        // Same seed, same flips; another seed, other flips.
        assert_eq!(run(7).1, outs);
        assert_ne!(run(8).1, outs);
    }

    #[test]
    fn gradient_flows_only_through_kept_entries() {
        let mut p = params(2, 2);
        p.layer_mode = LayerSparsityMode::Ordinary;
        let sp = Sparsity::new(p);
        let z = Var::from_slice(&[0.1f32, 0.4, 0.3, 0.2], (1, 4), &Device::Cpu).unwrap();
        let out = sp.forward(&z, None, 2).unwrap();
        let g = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g = v(g.get(&z).unwrap());
        assert_eq!(g[0], 0.0);
        assert_eq!(g[3], 0.0);
        assert!((g[1] - 0.8).abs() < 1e-6 && (g[2] - 0.6).abs() < 1e-6, "{g:?}");
    }
}
