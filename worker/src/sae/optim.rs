//! Optimisers: Adam, AdamW (decoupled weight decay) and SGD with momentum.
//!
//! candle-nn offers AdamW and momentum-free SGD, and its AdamW runs about 16 allocating tensor
//! ops per parameter per step (more than half of a small SAE's step). On the CPU the update here
//! is one fused, in-place pass over (param, grad) through candle's [`InplaceOp2`], with the moment
//! buffers owned by the optimiser and lent to the op. On other devices the same update runs as
//! tensor ops with device-resident moments.
//!
//! Update rules (PyTorch's, `t` counts steps from 1):
//! - Adam: `g += wd * p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
//!   p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)`.
//! - AdamW: `p *= 1 - lr * wd`, then Adam without the decay term.
//! - SGD: `g += wd * p; buf = momentum * buf + g; p -= lr * buf` (no dampening, no Nesterov).

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Tensor, Var};
use msae_shared::TrialConfig;
use msae_shared::config::Optimizer;
use std::cell::RefCell;

use super::kernels::simd_dispatch;

/// Optimiser hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimConfig {
    pub kind: Optimizer,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub momentum: f64,
}

impl OptimConfig {
    pub fn from_config(cfg: &TrialConfig) -> Self {
        OptimConfig {
            kind: cfg.optimizer,
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            momentum: cfg.momentum,
        }
    }
}

/// Moment buffers of one parameter.
#[derive(Debug)]
enum Moments {
    /// CPU parameters: plain vectors the fused op updates in place (`v` empty for SGD).
    Host { m: Vec<f32>, v: Vec<f32> },
    /// Accelerator parameters: tensors on the parameter's device.
    Device { m: Tensor, v: Tensor },
}

#[derive(Debug)]
struct Slot {
    var: Var,
    moments: Moments,
}

/// An optimiser over a fixed list of variables.
#[derive(Debug)]
pub struct Optim {
    pub config: OptimConfig,
    slots: Vec<Slot>,
    /// Steps taken so far (bias correction uses t = steps + 1 on the next step).
    steps: usize,
}

/// Scalars of one step, shared by the fused kernel and the tensor fallback.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepScalars {
    kind: Optimizer,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    wd: f32,
    momentum: f32,
    /// 1 - beta1^t and 1 - beta2^t.
    bc1: f32,
    bc2: f32,
}

/// The fused in-place update of one CPU parameter; the moments are lent by the optimiser.
struct FusedStep<'a> {
    s: StepScalars,
    m: RefCell<&'a mut [f32]>,
    v: RefCell<&'a mut [f32]>,
}

impl InplaceOp2 for FusedStep<'_> {
    fn name(&self) -> &'static str {
        "fused-optimizer-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (p, g) = match (s1, s2) {
            (CpuStorage::F32(p), CpuStorage::F32(g)) => (p, g),
            _ => candle_core::bail!("fused optimizer step expects f32 parameters and gradients"),
        };
        let (Some((p0, p1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("fused optimizer step expects contiguous tensors");
        };
        let p = &mut p[p0..p1];
        let g = &g[g0..g1];
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        if p.len() != g.len() || m.len() != p.len() {
            candle_core::bail!("fused optimizer step: parameter, gradient and state sizes differ");
        }
        self.s.apply(p, g, &mut m, &mut v);
        Ok(())
    }
}

impl StepScalars {
    /// The constants of update number `t` (counted from 1).
    pub(crate) fn new(c: &OptimConfig, t: usize) -> Self {
        StepScalars {
            kind: c.kind,
            lr: c.lr as f32,
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            eps: c.eps as f32,
            wd: c.weight_decay as f32,
            momentum: c.momentum as f32,
            bc1: (1.0 - c.beta1.powi(t as i32)) as f32,
            bc2: (1.0 - c.beta2.powi(t as i32)) as f32,
        }
    }

    /// Updates `p` with its gradient `g` and moment buffers (`v` unused by SGD): the one
    /// definition of each rule, for the candle model's fused op and the hand-written trainers.
    pub(crate) fn apply(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        match self.kind {
            Optimizer::Sgd => sgd(self, p, g, m),
            Optimizer::Adam | Optimizer::Adamw => adam(self, p, g, m, v),
        }
    }
}

#[inline(always)]
fn sgd_body(s: &StepScalars, p: &mut [f32], g: &[f32], buf: &mut [f32]) {
    for ((p, &g), b) in p.iter_mut().zip(g).zip(buf.iter_mut()) {
        let g = g + s.wd * *p;
        *b = s.momentum * *b + g;
        *p -= s.lr * *b;
    }
}

#[inline(always)]
fn adam_body(s: &StepScalars, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    let decoupled = s.kind == Optimizer::Adamw;
    // Adam adds the decay to the gradient; AdamW shrinks the parameter first.
    let (l2, decay) = if decoupled { (0.0, 1.0 - s.lr * s.wd) } else { (s.wd, 1.0) };
    let step = s.lr / s.bc1;
    let inv_bc2 = 1.0 / s.bc2;
    let (b1, b2, c1, c2) = (s.beta1, s.beta2, 1.0 - s.beta1, 1.0 - s.beta2);
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g + l2 * *p;
        *p *= decay;
        *m = b1 * *m + c1 * g;
        *v = b2 * *v + c2 * g * g;
        *p -= step * *m / ((*v * inv_bc2).sqrt() + s.eps);
    }
}

simd_dispatch!(sgd, sgd_body, (s: &StepScalars, p: &mut [f32], g: &[f32], buf: &mut [f32]));
simd_dispatch!(adam, adam_body, (s: &StepScalars, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]));

impl Optim {
    /// An optimiser over `vars` (f32 tensors on any one device).
    pub fn new(config: OptimConfig, vars: Vec<Var>) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|var| {
                let moments = if var.device().is_cpu() {
                    let n = var.elem_count();
                    let v = if config.kind == Optimizer::Sgd { Vec::new() } else { vec![0.0; n] };
                    Moments::Host { m: vec![0.0; n], v }
                } else {
                    Moments::Device { m: var.zeros_like()?, v: var.zeros_like()? }
                };
                Ok(Slot { var, moments })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Optim { config, slots, steps: 0 })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Sets the learning rate.
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    fn scalars(&self, t: usize) -> StepScalars {
        StepScalars::new(&self.config, t)
    }

    /// One update of every variable that has a gradient in `grads` (others are skipped).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.steps += 1;
        let s = self.scalars(self.steps);
        for slot in &mut self.slots {
            let Some(grad) = grads.get(slot.var.as_tensor()) else { continue };
            match &mut slot.moments {
                Moments::Host { m, v } => {
                    let grad = grad.contiguous()?;
                    let op = FusedStep { s, m: RefCell::new(m), v: RefCell::new(v) };
                    slot.var.as_tensor().inplace_op2(&grad, &op)?;
                }
                Moments::Device { m, v } => {
                    let p = slot.var.as_tensor();
                    let (new_p, new_m, new_v) = tensor_update(&s, p, grad, m, v)?;
                    *m = new_m;
                    *v = new_v;
                    slot.var.set(&new_p)?;
                }
            }
        }
        Ok(())
    }

    /// Zeroes the optimiser state of the given flat element indices of variable `var` (used when
    /// dead neurons are resampled, so stale moments do not push the fresh weights around).
    pub fn reset_entries(&mut self, var: &Var, indices: &[usize]) -> Result<()> {
        let Some(slot) =
            self.slots.iter_mut().find(|s| s.var.as_tensor().id() == var.as_tensor().id())
        else {
            candle_core::bail!("reset_entries: variable is not managed by this optimiser");
        };
        match &mut slot.moments {
            Moments::Host { m, v } => {
                for &i in indices {
                    m[i] = 0.0;
                    if let Some(x) = v.get_mut(i) {
                        *x = 0.0;
                    }
                }
            }
            Moments::Device { m, v } => {
                let mut keep = vec![1f32; m.elem_count()];
                for &i in indices {
                    keep[i] = 0.0;
                }
                let keep = Tensor::from_vec(keep, m.shape(), m.device())?;
                *m = m.mul(&keep)?;
                *v = v.mul(&keep)?;
            }
        }
        Ok(())
    }
}

/// The update as tensor ops (accelerator devices). Returns (param, m, v).
fn tensor_update(
    s: &StepScalars,
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (lr, wd) = (s.lr as f64, s.wd as f64);
    match s.kind {
        Optimizer::Sgd => {
            let g = (g + p.affine(wd, 0.0)?)?;
            let m = (m.affine(s.momentum as f64, 0.0)? + g)?;
            let p = (p - m.affine(lr, 0.0)?)?;
            Ok((p, m, v.clone()))
        }
        Optimizer::Adam | Optimizer::Adamw => {
            let (p, g) = if s.kind == Optimizer::Adamw {
                (p.affine(1.0 - lr * wd, 0.0)?, g.clone())
            } else {
                (p.clone(), (g + p.affine(wd, 0.0)?)?)
            };
            let m = (m.affine(s.beta1 as f64, 0.0)? + g.affine(1.0 - s.beta1 as f64, 0.0)?)?;
            let v =
                (v.affine(s.beta2 as f64, 0.0)? + g.sqr()?.affine(1.0 - s.beta2 as f64, 0.0)?)?;
            let denom = v.affine(1.0 / s.bc2 as f64, 0.0)?.sqrt()?.affine(1.0, s.eps as f64)?;
            let p = (p - (m.affine(lr / s.bc1 as f64, 0.0)? / denom)?)?;
            Ok((p, m, v))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn cfg(kind: Optimizer, wd: f64) -> OptimConfig {
        OptimConfig {
            kind,
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: wd,
            momentum: 0.9,
        }
    }

    /// Runs two steps of loss = sum(c * p) (gradient c, constant) from p = [1, -2] and returns p.
    fn two_steps(config: OptimConfig) -> Vec<f32> {
        let dev = Device::Cpu;
        let p = Var::from_slice(&[1f32, -2.0], 2, &dev).unwrap();
        let c = Tensor::from_slice(&[0.5f32, -1.0], 2, &dev).unwrap();
        let mut opt = Optim::new(config, vec![p.clone()]).unwrap();
        for _ in 0..2 {
            let loss = p.as_tensor().mul(&c).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads).unwrap();
        }
        p.as_tensor().to_vec1().unwrap()
    }

    fn close(a: &[f32], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((*x as f64 - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn sgd_momentum_two_steps() {
        // buf1 = g, p1 = p0 - lr g; buf2 = 0.9 g + g, p2 = p1 - lr * 1.9 g.
        let got = two_steps(cfg(Optimizer::Sgd, 0.0));
        close(&got, &[1.0 - 0.1 * 0.5 * 2.9, -2.0 + 0.1 * 1.0 * 2.9]);
        // With weight decay: g_t = c + wd * p_{t-1}.
        let wd = 0.1;
        let got = two_steps(cfg(Optimizer::Sgd, wd));
        let mut expect = vec![];
        for (p0, c) in [(1.0f64, 0.5f64), (-2.0, -1.0)] {
            let g1 = c + wd * p0;
            let b1 = g1;
            let p1 = p0 - 0.1 * b1;
            let g2 = c + wd * p1;
            let b2 = 0.9 * b1 + g2;
            expect.push(p1 - 0.1 * b2);
        }
        close(&got, &expect);
    }

    fn adam_reference(p0: f64, c: f64, wd: f64, decoupled: bool) -> f64 {
        let (lr, b1, b2, eps) = (0.1, 0.9, 0.999, 1e-8);
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for t in 1..=2 {
            let mut g = c;
            if decoupled {
                p *= 1.0 - lr * wd;
            } else {
                g += wd * p;
            }
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let mh = m / (1.0 - b1.powi(t));
            let vh = v / (1.0 - b2.powi(t));
            p -= lr * mh / (vh.sqrt() + eps);
        }
        p
    }

    #[test]
    fn adam_two_steps() {
        // Without decay, a constant gradient moves each parameter by lr per step against its sign.
        close(&two_steps(cfg(Optimizer::Adam, 0.0)), &[0.8, -1.8]);
        let got = two_steps(cfg(Optimizer::Adam, 0.5));
        close(
            &got,
            &[adam_reference(1.0, 0.5, 0.5, false), adam_reference(-2.0, -1.0, 0.5, false)],
        );
    }

    #[test]
    fn adamw_two_steps_decouples_decay() {
        let got = two_steps(cfg(Optimizer::Adamw, 0.5));
        close(&got, &[adam_reference(1.0, 0.5, 0.5, true), adam_reference(-2.0, -1.0, 0.5, true)]);
        // Decoupled and coupled decay differ.
        assert!(
            (adam_reference(1.0, 0.5, 0.5, true) - adam_reference(1.0, 0.5, 0.5, false)).abs()
                > 1e-3
        );
    }

    #[test]
    fn tensor_fallback_matches_fused() {
        for kind in [Optimizer::Adam, Optimizer::Adamw, Optimizer::Sgd] {
            let o = Optim::new(cfg(kind, 0.3), vec![]).unwrap();
            let s = o.scalars(3);
            let mut p = vec![0.3f32, -0.7, 1.1];
            let g = vec![0.2f32, 0.5, -0.4];
            let mut m = vec![0.01f32, -0.02, 0.03];
            let mut v = vec![0.001f32, 0.002, 0.003];
            let dev = Device::Cpu;
            let t = |x: &[f32]| Tensor::from_slice(x, 3, &dev).unwrap();
            let (tp, tm, _) = tensor_update(&s, &t(&p), &t(&g), &t(&m), &t(&v)).unwrap();
            s.apply(&mut p, &g, &mut m, &mut v);
            close(&tp.to_vec1::<f32>().unwrap(), &p.iter().map(|&x| x as f64).collect::<Vec<_>>());
            close(&tm.to_vec1::<f32>().unwrap(), &m.iter().map(|&x| x as f64).collect::<Vec<_>>());
        }
    }

    #[test]
    fn reset_entries_zeroes_state() {
        let dev = Device::Cpu;
        let p = Var::from_slice(&[1f32, 1.0], 2, &dev).unwrap();
        let mut opt = Optim::new(cfg(Optimizer::Sgd, 0.0), vec![p.clone()]).unwrap();
        let g = p.as_tensor().sum_all().unwrap().backward().unwrap();
        opt.step(&g).unwrap();
        opt.reset_entries(&p, &[1]).unwrap();
        let g = p.as_tensor().sum_all().unwrap().backward().unwrap();
        opt.step(&g).unwrap();
        // Entry 0 kept its momentum (1.9 total), entry 1 restarted (1 + 1).
        close(&p.as_tensor().to_vec1::<f32>().unwrap(), &[1.0 - 0.1 - 0.19, 1.0 - 0.1 - 0.1]);
    }
}
