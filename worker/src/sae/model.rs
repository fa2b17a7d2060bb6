//! The modular sparse autoencoder in candle, and [`CandleTrainer`]: it with its optimiser.
//!
//! Forward pass (shapes for a batch of B; N = S*D code neurons):
//! - classic (`intermediate_dim: 0`): `pre = W_enc (x - b_dec) + b_enc` (OpenAI's pre-bias);
//! - with an intermediate layer: `h = relu(W_i x + b_i)`, `pre = W_enc h + b_enc`;
//! - code activation: ReLU, or JumpReLU `z = pre * H(pre - theta)` with a learned per-neuron
//!   threshold `theta = exp(log_threshold)` whose gradient is the straight-through rectangle-kernel
//!   estimate `-(theta/eps) * 1{|pre - theta| < eps/2}` (Rajamanoharan et al. 2024);
//! - [`crate::sae::sparsity`]: layer, stripe, lifetime-stripe (the router reads `x - b_dec` or `h`);
//! - decoder: linear `x_hat = z A + b_dec` with atoms `A` (N, dim) for the classic SAE, or the
//!   mirror `x_hat = W_o relu(z A + b_d) + b_o`; `normalize_decoder` L2-normalises the atoms (the
//!   rows of A) in the forward pass; `tied_weights` uses the encoder's weights transposed;
//!   `output_relu` applies ReLU to x_hat.
//!
//! Loss: MSE per element + `l1_weight * L1 + kl_weight * KL + hoyer_weight * Hoyer`
//! (on the final codes) + `routing_l1_regularization * |router.weight|_1` + in training
//! `aux_k_coef * AuxK`. AuxK (OpenAI): the top-`aux_k` ReLU pre-activations of the dead latents
//! reconstruct the residual `x - x_hat` (detached); the MSE is divided by the residual's variance.
//! A latent is dead when it has not fired for `dead_after_samples` training samples. Every
//! `resample_dead_every` steps, dead latents are re-initialised towards inputs of the current
//! batch drawn with probability proportional to their squared reconstruction loss, and their
//! optimiser state is zeroed.
//!
//! Safetensors names: classic SAE "encoder.weight" [N, dim], "encoder.bias" [N],
//! "decoder.weight" [dim, N] (columns are atoms), "decoder.bias" [dim]; with an intermediate
//! layer "intermediate.weight" [I, dim], "intermediate.bias" [I], "encoder.*" [N, I] / [N],
//! "decoder.weight" [I, N], "decoder.bias" [I], "output.weight" [dim, I], "output.bias" [dim].
//! Tied weights omit "decoder.weight" (and "output.weight"). Optional "router.weight" [S, in],
//! "router.bias" [S], "encoder.log_threshold" [N].
//!
//! Initialisation comes from a `StdRng` seeded by `cfg.seed` ([`initial_weights`]), never from
//! candle's global RNG, so CPU training is deterministic.

use crate::sae::linalg::transpose;
use crate::sae::optim::{Optim, OptimConfig};
use crate::sae::penalties;
use crate::sae::sparsity::{Sparsity, SparsityParams};
use crate::sae::topk::{self, Axis};
use crate::sae::trainer::{Inference, NamedTensor, Trainer, expect_tensor};
use anyhow::Context as _;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use msae_shared::TrialConfig;
use msae_shared::config::{Activation, StripeSparsityMode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Mixed into the seed for resampling draws.
const RESAMPLE_SEED_SALT: u64 = 0x5AE0_1417_0000_0002;
/// Guards the atom normalisation against zero-norm atoms.
const NORM_EPS: f64 = 1e-8;

/// One named initial weight: (name, shape, row-major values).
pub type NamedWeight = (String, Vec<usize>, Vec<f32>);

/// The initial weights of the model for `cfg` and input dimension `dim`, in a fixed order, from
/// a `StdRng` seeded by `cfg.seed`. Shared with [`crate::sae::classic`] so both paths start equal.
///
/// Classic SAE: the encoder is uniform in ±1/sqrt(dim) and the decoder atoms are its rows
/// normalised to unit norm (OpenAI's init); biases are zero. With tied weights the encoder rows
/// are the atoms (normalised in the forward pass when `normalize_decoder`). Other layers use PyTorch's `Linear` rule,
/// uniform in ±1/sqrt(fan_in), with zero biases.
pub fn initial_weights(cfg: &TrialConfig, dim: usize) -> Vec<NamedWeight> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let n = cfg.code_dim();
    let inter = cfg.intermediate_dim;
    let mut out: Vec<NamedWeight> = Vec::new();
    let uniform = |rng: &mut StdRng, rows: usize, cols: usize| -> Vec<f32> {
        let a = 1.0 / (cols as f32).sqrt();
        (0..rows * cols).map(|_| rng.random_range(-a..a)).collect()
    };
    if inter == 0 {
        // OpenAI's init: the encoder by PyTorch's `Linear` rule, the decoder atoms its rows
        // normalised to unit norm. (Unit-norm encoder rows instead train measurably worse at
        // small learning rates: worker/bench/quality_topk.py.)
        let enc = uniform(&mut rng, n, dim);
        let mut atoms = enc.clone();
        for row in atoms.chunks_mut(dim) {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|v| *v /= norm);
        }
        out.push(("encoder.weight".into(), vec![n, dim], enc));
        out.push(("encoder.bias".into(), vec![n], vec![0.0; n]));
        if !cfg.tied_weights {
            out.push(("decoder.weight".into(), vec![dim, n], transpose(&atoms, n, dim)));
        }
        out.push(("decoder.bias".into(), vec![dim], vec![0.0; dim]));
    } else {
        let wi = uniform(&mut rng, inter, dim);
        out.push(("intermediate.weight".into(), vec![inter, dim], wi));
        out.push(("intermediate.bias".into(), vec![inter], vec![0.0; inter]));
        let we = uniform(&mut rng, n, inter);
        out.push(("encoder.weight".into(), vec![n, inter], we));
        out.push(("encoder.bias".into(), vec![n], vec![0.0; n]));
        if !cfg.tied_weights {
            let wd = uniform(&mut rng, inter, n);
            out.push(("decoder.weight".into(), vec![inter, n], wd));
        }
        out.push(("decoder.bias".into(), vec![inter], vec![0.0; inter]));
        if !cfg.tied_weights {
            let wo = uniform(&mut rng, dim, inter);
            out.push(("output.weight".into(), vec![dim, inter], wo));
        }
        out.push(("output.bias".into(), vec![dim], vec![0.0; dim]));
    }
    if cfg.stripe_sparsity_mode == StripeSparsityMode::Routing {
        let input = if inter == 0 { dim } else { inter };
        let wr = uniform(&mut rng, cfg.num_stripes, input);
        out.push(("router.weight".into(), vec![cfg.num_stripes, input], wr));
        out.push(("router.bias".into(), vec![cfg.num_stripes], vec![0.0; cfg.num_stripes]));
    }
    if cfg.activation == Activation::JumpRelu {
        let t = (cfg.jumprelu_threshold.max(1e-6) as f32).ln();
        out.push(("encoder.log_threshold".into(), vec![n], vec![t; n]));
    }
    out
}

/// `y + b` for a (B, M) matrix and an (M) bias, as `y + ones(B, 1) b^T`: the bias gradient is
/// then a GEMM instead of candle's slow CPU reduction over the batch axis.
fn add_bias(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    let rows = y.dim(0)?;
    let ones = Tensor::ones((rows, 1), y.dtype(), y.device())?;
    y + ones.matmul(&b.unsqueeze(0)?)?
}

/// What a forward pass produced.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// Code-layer pre-activations (B, N).
    pub pre: Tensor,
    /// Final codes after every sparsity stage (B, N).
    pub codes: Tensor,
    /// Reconstruction (B, dim).
    pub recon: Tensor,
    /// Router scores (B, S) in routing mode.
    pub scores: Option<Tensor>,
}

/// The modular SAE: parameters (in a [`VarMap`]) and the sparsity state.
pub struct ModularSae {
    pub cfg: TrialConfig,
    pub dim: usize,
    pub device: Device,
    pub varmap: VarMap,
    pub sparsity: Sparsity,
    intermediate: Option<(Var, Var)>,
    enc_w: Var,
    enc_b: Var,
    /// None when tied (the encoder's transpose is used).
    dec_w: Option<Var>,
    dec_b: Var,
    /// Mirror decoder's last layer: (weight or None when tied, bias).
    output: Option<(Option<Var>, Var)>,
    router: Option<(Var, Var)>,
    log_threshold: Option<Var>,
}

impl ModularSae {
    /// A freshly initialised model ([`initial_weights`]) on `device`.
    pub fn new(cfg: &TrialConfig, dim: usize, device: &Device) -> anyhow::Result<Self> {
        cfg.validate().context("invalid trial config")?;
        anyhow::ensure!(dim > 0, "input dimension must be at least 1");
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().expect("varmap lock");
            for (name, shape, values) in initial_weights(cfg, dim) {
                let t = Tensor::from_vec(values, shape, device)?;
                data.insert(name, Var::from_tensor(&t)?);
            }
        }
        let get = |name: &str| varmap.data().lock().expect("varmap lock").get(name).cloned();
        let req = |name: &str| get(name).with_context(|| format!("missing initial weight {name}"));
        let intermediate = match (get("intermediate.weight"), get("intermediate.bias")) {
            (Some(w), Some(b)) => Some((w, b)),
            _ => None,
        };
        let output = if cfg.intermediate_dim > 0 {
            Some((get("output.weight"), req("output.bias")?))
        } else {
            None
        };
        let router = match (get("router.weight"), get("router.bias")) {
            (Some(w), Some(b)) => Some((w, b)),
            _ => None,
        };
        Ok(ModularSae {
            cfg: cfg.clone(),
            dim,
            device: device.clone(),
            sparsity: Sparsity::new(SparsityParams::from_config(cfg)),
            intermediate,
            enc_w: req("encoder.weight")?,
            enc_b: req("encoder.bias")?,
            dec_w: get("decoder.weight"),
            dec_b: req("decoder.bias")?,
            output,
            router,
            log_threshold: get("encoder.log_threshold"),
            varmap,
        })
    }

    /// Every trainable variable, in a fixed (name) order.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// A variable by its safetensors name.
    pub fn var(&self, name: &str) -> Option<Var> {
        self.varmap.data().lock().expect("varmap lock").get(name).cloned()
    }

    /// The router's weight, when routing is on.
    pub fn router_weight(&self) -> Option<&Var> {
        self.router.as_ref().map(|(w, _)| w)
    }

    /// Encoder part: (code pre-activations (B, N), router input (B, in)).
    fn encode_pre(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let input = match &self.intermediate {
            None => add_bias(x, &self.dec_b.as_tensor().neg()?)?,
            Some((w, b)) => add_bias(&x.matmul(&w.t()?)?, b.as_tensor())?.relu()?,
        };
        let pre = add_bias(&input.matmul(&self.enc_w.t()?)?, self.enc_b.as_tensor())?;
        Ok((pre, input))
    }

    /// Code activation (ReLU or JumpReLU).
    fn activate(&self, pre: &Tensor) -> Result<Tensor> {
        match &self.log_threshold {
            None => pre.relu(),
            Some(log_t) => {
                let theta = log_t.as_tensor().exp()?.unsqueeze(0)?;
                let above = pre.detach().broadcast_sub(&theta.detach())?;
                let gate = above.gt(0f32)?.to_dtype(DType::F32)?;
                let out = pre.mul(&gate)?;
                // Straight-through threshold gradient: d out / d theta =
                // -(theta / eps) * 1{|pre - theta| < eps / 2}; zero in the forward pass.
                let eps = self.cfg.jumprelu_bandwidth;
                let window = above.abs()?.lt(eps / 2.0)?.to_dtype(DType::F32)?;
                let coef = window.broadcast_mul(&theta.detach())?.affine(-1.0 / eps, 0.0)?;
                let zero = (&theta - theta.detach())?;
                out + coef.broadcast_mul(&zero)?
            }
        }
    }

    /// The atoms of the code-to-next-layer map, (N, out): rows of the decoder (or the encoder
    /// when tied), L2-normalised when `normalize_decoder` is set.
    pub fn decoder_rows(&self) -> Result<Tensor> {
        let a = match &self.dec_w {
            // A contiguous copy: the row reductions below are fast on contiguous rows.
            Some(w) => w.as_tensor().t()?.contiguous()?,
            None => self.enc_w.as_tensor().clone(),
        };
        if self.cfg.normalize_decoder {
            let norm = a.sqr()?.sum_keepdim(1)?.affine(1.0, NORM_EPS)?.sqrt()?;
            a.broadcast_div(&norm)
        } else {
            Ok(a)
        }
    }

    /// Decoder without the output ReLU; `with_bias: false` drops the final bias (AuxK decodes
    /// the residual, which has no offset).
    fn decode_raw(&self, z: &Tensor, with_bias: bool) -> Result<Tensor> {
        let a = self.decoder_rows()?;
        let y = z.matmul(&a)?;
        match &self.output {
            None => {
                if with_bias {
                    add_bias(&y, self.dec_b.as_tensor())
                } else {
                    Ok(y)
                }
            }
            Some((w, b)) => {
                let h = add_bias(&y, self.dec_b.as_tensor())?.relu()?;
                let wo = match w {
                    Some(w) => w.as_tensor().t()?,
                    // Tied: output = intermediate.weight^T, so h @ (W_i^T)^T = h @ W_i.
                    None => match &self.intermediate {
                        Some((wi, _)) => wi.as_tensor().clone(),
                        None => {
                            candle_core::bail!("tied mirror decoder without an intermediate layer")
                        }
                    },
                };
                let out = h.matmul(&wo)?;
                if with_bias { add_bias(&out, b.as_tensor()) } else { Ok(out) }
            }
        }
    }

    /// Full decoder (bias and optional output ReLU).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let y = self.decode_raw(z, true)?;
        if self.cfg.output_relu { y.relu() } else { Ok(y) }
    }

    fn router_scores(&self, input: &Tensor) -> Result<Option<Tensor>> {
        match &self.router {
            None => Ok(None),
            Some((w, b)) => Ok(Some(add_bias(&input.matmul(&w.t()?)?, b.as_tensor())?)),
        }
    }

    /// Evaluation-mode forward pass (duty cycles are not updated).
    pub fn forward(&self, x: &Tensor, k: usize) -> Result<ForwardOutput> {
        let (pre, input) = self.encode_pre(x)?;
        let z = self.activate(&pre)?;
        let scores = self.router_scores(&input)?;
        let codes = self.sparsity.forward(&z, scores.as_ref(), k)?;
        let recon = self.decode(&codes)?;
        Ok(ForwardOutput { pre, codes, recon, scores })
    }

    /// Training-mode forward pass (boosted duty cycles move).
    pub fn forward_train(&mut self, x: &Tensor, k: usize) -> Result<ForwardOutput> {
        let (pre, input) = self.encode_pre(x)?;
        let z = self.activate(&pre)?;
        let scores = self.router_scores(&input)?;
        let codes = self.sparsity.forward_train(&z, scores.as_ref(), k)?;
        let recon = self.decode(&codes)?;
        Ok(ForwardOutput { pre, codes, recon, scores })
    }

    /// Reconstruction MSE plus the weighted penalties (no AuxK), as a 0-d tensor.
    pub fn loss(&self, x: &Tensor, out: &ForwardOutput) -> Result<Tensor> {
        let c = &self.cfg;
        let mut loss = (&out.recon - x)?.sqr()?.mean_all()?;
        if c.l1_weight > 0.0 {
            loss = (loss + penalties::l1(&out.codes)?.affine(c.l1_weight, 0.0)?)?;
        }
        if c.kl_weight > 0.0 {
            loss = (loss + penalties::kl(&out.codes, c.kl_target)?.affine(c.kl_weight, 0.0)?)?;
        }
        if c.hoyer_weight > 0.0 {
            loss = (loss + penalties::hoyer(&out.codes)?.affine(c.hoyer_weight, 0.0)?)?;
        }
        if let (true, Some((w, _))) = (c.routing_l1_regularization > 0.0, &self.router) {
            let r = penalties::routing_l1(w.as_tensor())?;
            loss = (loss + r.affine(c.routing_l1_regularization, 0.0)?)?;
        }
        Ok(loss)
    }

    /// AuxK loss (unweighted): the top-`aux_k` ReLU pre-activations among `dead` latents
    /// reconstruct the residual `x - recon`; MSE over the residual's variance. None when no latent
    /// is dead or the residual is constant.
    pub fn aux_k_loss(
        &self,
        x: &Tensor,
        out: &ForwardOutput,
        dead: &[bool],
    ) -> Result<Option<Tensor>> {
        let num_dead = dead.iter().filter(|&&d| d).count();
        if self.cfg.aux_k == 0 || num_dead == 0 {
            return Ok(None);
        }
        let k = self.cfg.aux_k.min(num_dead);
        let n = dead.len();
        let dead_mask: Vec<f32> = dead.iter().map(|&d| if d { 1.0 } else { 0.0 }).collect();
        let dead_mask = Tensor::from_vec(dead_mask, (1, n), &self.device)?;
        let aux = out.pre.relu()?.broadcast_mul(&dead_mask)?;
        let keep = topk::topk_mask(&aux, k, Axis::Row)?;
        let z_aux = aux.mul(&keep)?;
        let residual = (x - &out.recon)?.detach();
        let recon_aux = match &self.output {
            None => self.decode_raw(&z_aux, false)?,
            // Non-linear decoder: the contribution of the codes, decode(z) - decode(0).
            Some(_) => {
                let zero = z_aux.zeros_like()?;
                (self.decode_raw(&z_aux, true)? - self.decode_raw(&zero, true)?)?
            }
        };
        let centred = residual.broadcast_sub(&residual.mean_keepdim(0)?)?;
        let var = centred.sqr()?.mean_all()?.to_scalar::<f32>()?;
        // Also catches NaN.
        if var.is_nan() || var <= 0.0 {
            return Ok(None);
        }
        Ok(Some((recon_aux - residual)?.sqr()?.mean_all()?.affine(1.0 / var as f64, 0.0)?))
    }
}

/// The candle model with its optimiser and training state; works for every configuration.
pub struct CandleTrainer {
    pub model: ModularSae,
    optim: Optim,
    /// Training samples since each latent last fired.
    since_fired: Vec<u64>,
    /// Layer k in effect at the last training step (used by [`Trainer::infer`]).
    current_k: usize,
    rng: StdRng,
}

impl CandleTrainer {
    /// A fresh model for `cfg` and input dimension `dim` on `device`, with its optimiser.
    pub fn new(cfg: &TrialConfig, dim: usize, device: &Device) -> anyhow::Result<Self> {
        let model = ModularSae::new(cfg, dim, device)?;
        let vars = model.vars().into_iter().map(|(_, v)| v).collect();
        let optim = Optim::new(OptimConfig::from_config(cfg), vars)?;
        Ok(CandleTrainer {
            since_fired: vec![0; cfg.code_dim()],
            current_k: cfg.layer_k_at(0),
            rng: StdRng::seed_from_u64(cfg.seed ^ RESAMPLE_SEED_SALT),
            optim,
            model,
        })
    }

    /// Latents that have not fired for `dead_after_samples` training samples.
    pub fn dead_latents(&self) -> Vec<bool> {
        let limit = self.model.cfg.dead_after_samples as u64;
        self.since_fired.iter().map(|&s| s >= limit).collect()
    }

    fn tensor(&self, x: &[f32]) -> anyhow::Result<Tensor> {
        let dim = self.model.dim;
        anyhow::ensure!(
            x.len().is_multiple_of(dim),
            "input of {} values is not a multiple of the input dimension {dim}",
            x.len()
        );
        Ok(Tensor::from_slice(x, (x.len() / dim, dim), &self.model.device)?)
    }

    fn update_dead(&mut self, codes: &Tensor) -> Result<()> {
        let (b, n) = codes.dims2()?;
        // Scanned on the host: candle's reductions over the batch axis are slow on the CPU.
        let codes = codes.flatten_all()?.to_vec1::<f32>()?;
        let mut fired = vec![false; n];
        for row in codes.chunks(n) {
            for (f, &v) in fired.iter_mut().zip(row) {
                *f |= v != 0.0;
            }
        }
        for (s, f) in self.since_fired.iter_mut().zip(fired) {
            *s = if f { 0 } else { s.saturating_add(b as u64) };
        }
        Ok(())
    }

    /// Re-initialises dead latents towards high-loss inputs of `x` and zeroes their optimiser
    /// state. Returns how many latents were resampled.
    pub fn resample_dead(&mut self, x: &Tensor, out: &ForwardOutput) -> anyhow::Result<usize> {
        let dead: Vec<usize> =
            self.dead_latents().iter().enumerate().filter(|(_, d)| **d).map(|(i, _)| i).collect();
        if dead.is_empty() {
            return Ok(0);
        }
        let m = &self.model;
        // Direction each latent should point at, in the space the code layer reads.
        let input = match &m.intermediate {
            None => x.broadcast_sub(m.dec_b.as_tensor())?,
            Some((w, b)) => x.matmul(&w.t()?)?.broadcast_add(b.as_tensor())?.relu()?,
        };
        let in_dim = input.dim(1)?;
        let input = input.flatten_all()?.to_vec1::<f32>()?;
        let per_sample = (&out.recon - x)?.sqr()?.sum(1)?.to_vec1::<f32>()?;
        let weights: Vec<f64> = per_sample.iter().map(|&l| (l as f64) * (l as f64)).collect();
        let total: f64 = weights.iter().sum();
        let n = m.cfg.code_dim();
        let mut enc_w = m.enc_w.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        // Encoder rows of alive latents set the scale of the new rows (Anthropic's 0.2x rule).
        let alive_norm = {
            let dead_set: std::collections::HashSet<usize> = dead.iter().copied().collect();
            let norms: Vec<f32> = (0..n)
                .filter(|i| !dead_set.contains(i))
                .map(|i| {
                    enc_w[i * in_dim..(i + 1) * in_dim].iter().map(|v| v * v).sum::<f32>().sqrt()
                })
                .collect();
            if norms.is_empty() { 1.0 } else { norms.iter().sum::<f32>() / norms.len() as f32 }
        };
        let mut enc_b = m.enc_b.as_tensor().to_vec1::<f32>()?;
        let mut dec =
            m.dec_w.as_ref().map(|w| w.as_tensor().flatten_all()?.to_vec1::<f32>()).transpose()?;
        let mut enc_idx = Vec::new();
        let mut dec_idx = Vec::new();
        for &j in &dead {
            let pick = if total > 0.0 {
                let mut r = self.rng.random::<f64>() * total;
                let mut pick = weights.len() - 1;
                for (i, w) in weights.iter().enumerate() {
                    if r < *w {
                        pick = i;
                        break;
                    }
                    r -= w;
                }
                pick
            } else {
                self.rng.random_range(0..weights.len())
            };
            let v = &input[pick * in_dim..(pick + 1) * in_dim];
            let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
            if norm <= 0.0 {
                continue;
            }
            let scale = if m.dec_w.is_some() { 0.2 * alive_norm } else { 1.0 };
            for c in 0..in_dim {
                enc_w[j * in_dim + c] = v[c] / norm * scale;
                enc_idx.push(j * in_dim + c);
            }
            enc_b[j] = 0.0;
            if let Some(d) = dec.as_mut() {
                // decoder.weight is (in_dim, N): column j is the atom.
                for c in 0..in_dim {
                    d[c * n + j] = v[c] / norm;
                    dec_idx.push(c * n + j);
                }
            }
            self.since_fired[j] = 0;
        }
        let dev = &m.device;
        m.enc_w.set(&Tensor::from_vec(enc_w, m.enc_w.shape(), dev)?)?;
        m.enc_b.set(&Tensor::from_vec(enc_b, m.enc_b.shape(), dev)?)?;
        if let (Some(d), Some(w)) = (dec, &m.dec_w) {
            w.set(&Tensor::from_vec(d, w.shape(), dev)?)?;
            self.optim.reset_entries(w, &dec_idx)?;
        }
        let (enc_w, enc_b) = (m.enc_w.clone(), m.enc_b.clone());
        self.optim.reset_entries(&enc_w, &enc_idx)?;
        self.optim.reset_entries(&enc_b, &dead)?;
        tracing::debug!(resampled = dead.len(), "resampled dead latents");
        Ok(dead.len())
    }
}

impl Trainer for CandleTrainer {
    fn step(&mut self, batch: &[f32], step: usize) -> anyhow::Result<f64> {
        let x = self.tensor(batch)?;
        let k = self.model.cfg.layer_k_at(step);
        self.current_k = k;
        let out = self.model.forward_train(&x, k)?;
        let mut loss = self.model.loss(&x, &out)?;
        if self.model.cfg.aux_k > 0 {
            let dead = self.dead_latents();
            if let Some(aux) = self.model.aux_k_loss(&x, &out, &dead)? {
                loss = (loss + aux.affine(self.model.cfg.aux_k_coef, 0.0)?)?;
            }
        }
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Err(crate::sae::trainer::Diverged { step, value }.into());
        }
        let grads = loss.backward()?;
        self.optim.step(&grads)?;
        self.update_dead(&out.codes)?;
        let every = self.model.cfg.resample_dead_every;
        if every > 0 && (step + 1).is_multiple_of(every) {
            self.resample_dead(&x, &out)?;
        }
        Ok(value)
    }

    fn infer(&self, x: &[f32]) -> anyhow::Result<Inference> {
        let dim = self.model.dim;
        let rows = x.len() / dim;
        let chunk = self.model.cfg.batch_size.max(1);
        let mut codes = Vec::with_capacity(rows * self.model.cfg.code_dim());
        let mut recon = Vec::with_capacity(x.len());
        let mut routing = self.model.router.as_ref().map(|_| Vec::new());
        let mut loss_sum = 0.0;
        // Batch-dependent sparsity (lifetime, active_stripes_per_batch) sees training-size
        // batches in evaluation too.
        for part in x.chunks(chunk * dim) {
            let t = self.tensor(part)?;
            let out = self.model.forward(&t, self.current_k)?;
            let l = self.model.loss(&t, &out)?.to_scalar::<f32>()? as f64;
            loss_sum += l * (part.len() / dim) as f64;
            codes.extend(out.codes.flatten_all()?.to_vec1::<f32>()?);
            recon.extend(out.recon.flatten_all()?.to_vec1::<f32>()?);
            if let (Some(all), Some(scores)) = (routing.as_mut(), &out.scores) {
                all.extend(scores.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        let loss = if rows > 0 { loss_sum / rows as f64 } else { 0.0 };
        Ok(Inference { codes, recon, loss, routing })
    }

    fn atoms(&self) -> anyhow::Result<Vec<f32>> {
        let m = &self.model;
        let n = m.cfg.code_dim();
        let a = if m.output.is_none() {
            m.decoder_rows()?
        } else {
            let eye = Tensor::eye(n, DType::F32, &m.device)?;
            let zero = Tensor::zeros((1, n), DType::F32, &m.device)?;
            m.decode_raw(&eye, true)?.broadcast_sub(&m.decode_raw(&zero, true)?)?
        };
        Ok(a.flatten_all()?.to_vec1::<f32>()?)
    }

    fn set_output_bias(&mut self, bias: &[f32]) -> anyhow::Result<()> {
        let m = &self.model;
        let var = match &m.output {
            None => &m.dec_b,
            Some((_, b)) => b,
        };
        anyhow::ensure!(
            bias.len() == var.elem_count(),
            "output bias of {} values for {}",
            bias.len(),
            var.elem_count()
        );
        var.set(&Tensor::from_slice(bias, var.shape(), &m.device)?)?;
        Ok(())
    }

    fn tensors(&self) -> anyhow::Result<Vec<NamedTensor>> {
        self.model
            .vars()
            .into_iter()
            .map(|(name, var)| {
                let shape = var.dims().to_vec();
                let data = var.as_tensor().flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                Ok(NamedTensor::new(name, shape, data))
            })
            .collect()
    }

    fn eval_layer_k(&self) -> usize {
        self.current_k
    }

    fn restore(&mut self, tensors: &[NamedTensor], eval_layer_k: usize) -> anyhow::Result<()> {
        let vars = self.model.vars();
        let values = vars
            .iter()
            .map(|(name, var)| expect_tensor(tensors, name, var.dims()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for ((_, var), data) in vars.iter().zip(values) {
            var.set(&Tensor::from_slice(data, var.shape(), &self.model.device)?)?;
        }
        let vars = self.model.vars().into_iter().map(|(_, v)| v).collect();
        self.optim = Optim::new(OptimConfig::from_config(&self.model.cfg), vars)?;
        self.current_k = eval_layer_k;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use msae_shared::config::{LayerSparsityMode, RoutingGate};

    fn small(dim: usize) -> TrialConfig {
        let mut cfg = TrialConfig {
            num_stripes: 4,
            stripe_dim: 2,
            layer_k: 3,
            batch_size: 8,
            ..Default::default()
        };
        cfg.data.synthetic.input_dim = dim;
        cfg
    }

    fn batch(b: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..b * dim).map(|_| rng.random_range(0.0f32..1.0)).collect()
    }

    fn grad_abs_sum(grads: &candle_core::backprop::GradStore, v: &Var) -> f32 {
        grads
            .get(v.as_tensor())
            .map(|g| g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
            .unwrap_or(0.0)
    }

    #[test]
    fn init_is_deterministic_and_classic_layout() {
        let cfg = small(5);
        let a = initial_weights(&cfg, 5);
        assert_eq!(a, initial_weights(&cfg, 5));
        let names: Vec<&str> = a.iter().map(|w| w.0.as_str()).collect();
        assert_eq!(names, ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"]);
        assert_eq!(a[0].1, vec![8, 5]);
        assert_eq!(a[2].1, vec![5, 8]);
        // OpenAI's init: the encoder uniform in ±1/sqrt(dim), the decoder's columns its rows at
        // unit norm.
        let bound = 1.0 / 5f32.sqrt();
        assert!(a[0].2.iter().all(|v| v.abs() <= bound));
        for j in 0..8 {
            let col: Vec<f32> = (0..5).map(|c| a[2].2[c * 8 + j]).collect();
            assert!((col.iter().map(|v| v * v).sum::<f32>() - 1.0).abs() < 1e-5);
            let row = &a[0].2[j * 5..(j + 1) * 5];
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            for (c, r) in col.iter().zip(row) {
                assert!((c - r / norm).abs() < 1e-6, "atom {j} is not encoder row {j} normalised");
            }
        }
        let other = TrialConfig { seed: 1, ..cfg };
        assert_ne!(a[0].2, initial_weights(&other, 5)[0].2);
    }

    #[test]
    fn forward_shapes_and_exact_k_for_every_layout() {
        for (inter, tied, act) in [
            (0, false, Activation::Relu),
            (0, true, Activation::Relu),
            (6, false, Activation::Relu),
            (6, true, Activation::JumpRelu),
        ] {
            let cfg = TrialConfig {
                intermediate_dim: inter,
                tied_weights: tied,
                activation: act,
                ..small(5)
            };
            let m = ModularSae::new(&cfg, 5, &Device::Cpu).unwrap();
            let x = Tensor::from_vec(batch(7, 5, 1), (7, 5), &Device::Cpu).unwrap();
            let out = m.forward(&x, 3).unwrap();
            assert_eq!(out.codes.dims(), &[7, 8]);
            assert_eq!(out.recon.dims(), &[7, 5]);
            let codes = out.codes.to_vec2::<f32>().unwrap();
            for row in codes {
                assert!(row.iter().filter(|v| **v != 0.0).count() <= 3);
            }
        }
    }

    #[test]
    fn router_learns_from_reconstruction_alone() {
        for gate in [RoutingGate::Scores, RoutingGate::StraightThrough] {
            for inter in [0, 6] {
                let cfg = TrialConfig {
                    intermediate_dim: inter,
                    layer_sparsity_mode: LayerSparsityMode::None,
                    stripe_sparsity_mode: StripeSparsityMode::Routing,
                    stripe_k: 2,
                    routing_gate: gate,
                    routing_l1_regularization: 0.0,
                    ..small(5)
                };
                let m = ModularSae::new(&cfg, 5, &Device::Cpu).unwrap();
                let x = Tensor::from_vec(batch(16, 5, 2), (16, 5), &Device::Cpu).unwrap();
                let out = m.forward(&x, 3).unwrap();
                let loss = m.loss(&x, &out).unwrap();
                let grads = loss.backward().unwrap();
                let g = grad_abs_sum(&grads, m.router_weight().unwrap());
                assert!(g > 0.0, "router got no gradient ({gate:?}, intermediate {inter})");
            }
        }
    }

    #[test]
    fn normalized_decoder_has_unit_atoms() {
        let cfg = TrialConfig { intermediate_dim: 0, ..small(5) };
        let mut t = CandleTrainer::new(&cfg, 5, &Device::Cpu).unwrap();
        for s in 0..5 {
            t.step(&batch(8, 5, s), s as usize).unwrap();
        }
        let atoms = t.atoms().unwrap();
        for a in atoms.chunks(5) {
            let n: f32 = a.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((n - 1.0).abs() < 1e-4, "{n}");
        }
    }

    #[test]
    fn jumprelu_threshold_gets_straight_through_gradient() {
        let cfg = TrialConfig {
            activation: Activation::JumpRelu,
            jumprelu_threshold: 0.5,
            jumprelu_bandwidth: 0.2,
            layer_sparsity_mode: LayerSparsityMode::None,
            ..small(2)
        };
        let m = ModularSae::new(&cfg, 2, &Device::Cpu).unwrap();
        let pre = Tensor::from_slice(
            &[0.45f32, 0.55, 0.2, 1.0, 0.62, 0.5, 0.0, 0.3],
            (1, 8),
            &Device::Cpu,
        )
        .unwrap();
        let z = m.activate(&pre).unwrap();
        // Forward: pre where pre > theta (0.5).
        let zv = z.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let expect = [0.0, 0.55, 0.0, 1.0, 0.62, 0.0, 0.0, 0.0];
        for (a, b) in zv.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{zv:?}");
        }
        let grads = z.sum_all().unwrap().backward().unwrap();
        let lt = m.var("encoder.log_threshold").unwrap();
        let g = grads.get(lt.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        // d/dlog(theta) = theta * d/dtheta = theta * -(theta/eps) inside the window |pre-theta|<0.1.
        let inside = -0.5 * 0.5 / 0.2;
        let expect = [inside, inside, 0.0, 0.0, 0.0, inside, 0.0, 0.0];
        for (a, b) in g.iter().zip(expect) {
            assert!((a - b).abs() < 1e-5, "{g:?}");
        }
    }

    #[test]
    fn aux_k_reaches_dead_latents_only() {
        let cfg = TrialConfig { aux_k: 2, layer_k: 1, ..small(5) };
        let m = ModularSae::new(&cfg, 5, &Device::Cpu).unwrap();
        let x = Tensor::from_vec(batch(16, 5, 3), (16, 5), &Device::Cpu).unwrap();
        let out = m.forward(&x, 1).unwrap();
        let mut dead = vec![false; 8];
        dead[3] = true;
        dead[6] = true;
        let aux = m.aux_k_loss(&x, &out, &dead).unwrap().unwrap();
        assert!(aux.to_scalar::<f32>().unwrap() > 0.0);
        let grads = aux.backward().unwrap();
        let g = grads
            .get(m.var("encoder.weight").unwrap().as_tensor())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, row) in g.iter().enumerate() {
            let s: f32 = row.iter().map(|v| v.abs()).sum();
            if dead[i] {
                assert!(s >= 0.0);
            } else {
                assert_eq!(s, 0.0, "alive latent {i} got AuxK gradient");
            }
        }
        assert!(m.aux_k_loss(&x, &out, &[false; 8]).unwrap().is_none());
    }

    #[test]
    fn dead_latents_are_tracked_and_resampled() {
        let cfg =
            TrialConfig { dead_after_samples: 16, resample_dead_every: 0, layer_k: 1, ..small(5) };
        let mut t = CandleTrainer::new(&cfg, 5, &Device::Cpu).unwrap();
        // Force latent 0 dead by a huge negative bias.
        let mut b = vec![0f32; 8];
        b[0] = -1e3;
        t.model.enc_b.set(&Tensor::from_vec(b, 8, &Device::Cpu).unwrap()).unwrap();
        for s in 0..3 {
            t.step(&batch(8, 5, s), s as usize).unwrap();
        }
        assert!(t.dead_latents()[0], "latent 0 should be dead after 24 samples");
        let x = Tensor::from_vec(batch(8, 5, 9), (8, 5), &Device::Cpu).unwrap();
        let out = t.model.forward(&x, 1).unwrap();
        let n = t.resample_dead(&x, &out).unwrap();
        assert!(n >= 1);
        assert!(!t.dead_latents()[0]);
        assert_eq!(t.model.enc_b.as_tensor().to_vec1::<f32>().unwrap()[0], 0.0);
    }

    #[test]
    fn training_reduces_loss_for_every_optimizer() {
        use msae_shared::config::Optimizer;
        for opt in [Optimizer::Adam, Optimizer::Adamw, Optimizer::Sgd] {
            let cfg = TrialConfig {
                optimizer: opt,
                lr: if opt == Optimizer::Sgd { 0.05 } else { 0.01 },
                ..small(5)
            };
            let mut t = CandleTrainer::new(&cfg, 5, &Device::Cpu).unwrap();
            let x = batch(32, 5, 4);
            let first = t.infer(&x).unwrap().loss;
            for s in 0..200 {
                t.step(&x, s).unwrap();
            }
            let last = t.infer(&x).unwrap().loss;
            assert!(last < 0.5 * first, "{opt:?}: {first} -> {last}");
        }
    }

    #[test]
    fn saves_named_safetensors() {
        let cfg = small(5);
        let t = CandleTrainer::new(&cfg, 5, &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        t.save(&path).unwrap();
        let loaded = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded["encoder.weight"].dims(), &[8, 5]);
        assert_eq!(loaded["decoder.weight"].dims(), &[5, 8]);
        assert_eq!(loaded["decoder.bias"].dims(), &[5]);
    }
}
