use super::*;
use crate::sae::linalg::transpose;
use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn cfg(n_stripes: usize, k: usize, normalize: bool) -> TrialConfig {
    TrialConfig {
        num_stripes: n_stripes,
        stripe_dim: 4,
        layer_k: k,
        normalize_decoder: normalize,
        ..TrialConfig::default()
    }
}

fn random(len: usize, scale: f32, rng: &mut StdRng) -> Vec<f32> {
    (0..len).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

/// A model with every parameter random and non-trivial (biases non-zero, atoms not unit).
fn perturbed(cfg: &TrialConfig, dim: usize, seed: u64) -> FastTopK {
    let mut m = FastTopK::new(cfg, dim).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let n = m.n;
    m.p.w_enc = random(n * dim, 0.5, &mut rng);
    m.p.b_enc = random(n, 0.2, &mut rng);
    m.p.w_dec = random(n * dim, 0.7, &mut rng);
    m.p.b_dec = random(dim, 0.3, &mut rng);
    refresh_norms(&mut m.p, dim, m.normalize);
    m
}

struct Reference {
    loss: f64,
    codes: Vec<f32>,
    recon: Vec<f32>,
    w_enc: Vec<f32>,
    b_enc: Vec<f32>,
    /// In decoder.weight layout [dim, n].
    w_dec: Vec<f32>,
    b_dec: Vec<f32>,
}

/// Top-k mask by a full sort (value descending, index ascending), independent of the scan.
fn sort_mask(act: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut mask = vec![0f32; act.len()];
    for (row, mrow) in act.chunks(n).zip(mask.chunks_mut(n)) {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for &j in &order[..k] {
            mrow[j] = 1.0;
        }
    }
    mask
}

/// The same model in plain candle ops, differentiated by candle's autograd: top-k with
/// `Some(k)`, the dense SAE (all of relu(pre)) with `None`.
fn reference(m: &FastTopK, x: &[f32], k: Option<usize>) -> candle_core::Result<Reference> {
    let (n, dim) = (m.n, m.dim);
    let rows = x.len() / dim;
    let dev = Device::Cpu;
    let w_enc = Var::from_vec(m.p.w_enc.clone(), (n, dim), &dev)?;
    let b_enc = Var::from_vec(m.p.b_enc.clone(), n, &dev)?;
    let w_dec = Var::from_vec(transpose(&m.p.w_dec, n, dim), (dim, n), &dev)?;
    let b_dec = Var::from_vec(m.p.b_dec.clone(), dim, &dev)?;
    let xt = Tensor::from_vec(x.to_vec(), (rows, dim), &dev)?;
    let pre = xt.broadcast_sub(&b_dec)?.matmul(&w_enc.t()?)?.broadcast_add(&b_enc)?;
    let act = pre.relu()?;
    let z = match k {
        Some(k) => {
            let mask = sort_mask(&act.flatten_all()?.to_vec1::<f32>()?, n, k);
            (act * Tensor::from_vec(mask, (rows, n), &dev)?)?
        }
        None => act,
    };
    let dec = if m.normalize {
        w_dec.broadcast_div(&w_dec.sqr()?.sum_keepdim(0)?.affine(1.0, 1e-8)?.sqrt()?)?
    } else {
        w_dec.as_tensor().clone()
    };
    let x_hat = z.matmul(&dec.t()?)?.broadcast_add(&b_dec)?;
    let loss = (&x_hat - &xt)?.sqr()?.mean_all()?;
    let grads = loss.backward()?;
    let g = |v: &Var| -> candle_core::Result<Vec<f32>> {
        grads.get(v.as_tensor()).expect("gradient").flatten_all()?.to_vec1::<f32>()
    };
    Ok(Reference {
        loss: loss.to_scalar::<f32>()? as f64,
        codes: z.flatten_all()?.to_vec1()?,
        recon: x_hat.flatten_all()?.to_vec1()?,
        w_enc: g(&w_enc)?,
        b_enc: g(&b_enc)?,
        w_dec: g(&w_dec)?,
        b_dec: g(&b_dec)?,
    })
}

fn assert_close(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(0f32, |a, &b| a.max(b.abs())).max(1e-12);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * scale + 1e-5 * w.abs(),
            "{name}[{i}]: got {g}, want {w} (max |want| {scale})"
        );
    }
    assert!(want.iter().any(|&w| w != 0.0), "{name}: reference is all zero, test is vacuous");
}

fn check_against_autograd(normalize: bool, dense: bool) {
    let (dim, rows, k) = (12, 9, 5);
    let mut cfg = cfg(8, k, normalize); // 32 latents
    if dense {
        cfg.layer_sparsity_mode = LayerSparsityMode::None;
    }
    let mut m = perturbed(&cfg, dim, 7);
    assert_eq!(m.is_dense(), dense);
    let mut rng = StdRng::seed_from_u64(99);
    let x = random(rows * dim, 1.0, &mut rng);
    let r = reference(&m, &x, (!dense).then_some(k)).unwrap();
    if dense {
        // Not secretly top-k: most rows keep more than k latents.
        let wide = r.codes.chunks(m.n).filter(|c| c.iter().filter(|&&v| v > 0.0).count() > k);
        assert!(wide.count() > rows / 2, "dense reference keeps too few latents");
    }

    let inf = m.infer(&x).unwrap();
    assert_close("codes", &inf.codes, &r.codes);
    assert_close("recon", &inf.recon, &r.recon);
    assert!((inf.loss - r.loss).abs() <= 1e-5 * r.loss, "loss {} vs {}", inf.loss, r.loss);

    let g = m.gradients(&x, k).unwrap();
    assert!((g.loss - r.loss).abs() <= 1e-5 * r.loss);
    assert_close("encoder.weight grad", &g.w_enc, &r.w_enc);
    assert_close("encoder.bias grad", &g.b_enc, &r.b_enc);
    assert_close("decoder.weight grad", &transpose(&g.w_dec, m.n, dim), &r.w_dec);
    assert_close("decoder.bias grad", &g.b_dec, &r.b_dec);
}

#[test]
fn matches_candle_autograd_normalized() {
    check_against_autograd(true, false);
}

#[test]
fn matches_candle_autograd_unnormalized() {
    check_against_autograd(false, false);
}

#[test]
fn dense_matches_candle_autograd_normalized() {
    check_against_autograd(true, true);
}

#[test]
fn dense_matches_candle_autograd_unnormalized() {
    check_against_autograd(false, true);
}

/// Shapes that are not multiples of any SIMD width or GEMM block, and more latents than a
/// bias-sum block, so every kernel's edge handling is exercised. (Not dim 1: a normalised
/// 1-d atom has an identically zero gradient, leaving only rounding noise to compare.)
#[test]
fn dense_matches_candle_autograd_odd_shapes() {
    for &(stripes, dim, rows) in &[(1usize, 3usize, 1usize), (7, 37, 67), (70, 5, 3)] {
        let cfg =
            TrialConfig { layer_sparsity_mode: LayerSparsityMode::None, ..cfg(stripes, 1, true) };
        let mut m = perturbed(&cfg, dim, 21);
        let mut rng = StdRng::seed_from_u64(22);
        let x = random(rows * dim, 1.0, &mut rng);
        let r = reference(&m, &x, None).unwrap();
        let g = m.gradients(&x, 1).unwrap();
        assert!((g.loss - r.loss).abs() <= 1e-5 * r.loss, "{stripes} {dim} {rows}");
        let inf = m.infer(&x).unwrap();
        let tol = |name: &str, got: &[f32], want: &[f32]| {
            let scale = want.iter().fold(0f32, |a, &b| a.max(b.abs())).max(1e-12);
            for (i, (a, b)) in got.iter().zip(want).enumerate() {
                assert!((a - b).abs() <= 1e-4 * scale, "{name}[{i}] {a} vs {b} ({dim} {rows})");
            }
            assert_eq!(got.len(), want.len(), "{name}");
        };
        tol("codes", &inf.codes, &r.codes);
        tol("recon", &inf.recon, &r.recon);
        tol("encoder.weight grad", &g.w_enc, &r.w_enc);
        tol("encoder.bias grad", &g.b_enc, &r.b_enc);
        tol("decoder.weight grad", &transpose(&g.w_dec, m.n, dim), &r.w_dec);
        tol("decoder.bias grad", &g.b_dec, &r.b_dec);
    }
}

#[test]
fn topk_keeps_exactly_k_with_index_ties() {
    let row = [0.5, -1.0, 2.0, 0.5, 0.5, 3.0, 0.0];
    let (mut idx, mut val) = ([0u32; 4], [0f32; 4]);
    crate::sae::topk::relu_topk_row(&row, &mut idx, &mut val, &mut Vec::new());
    // 3.0 (5), 2.0 (2), then the two lowest-index 0.5s (0, 3); index 4 loses the tie.
    assert_eq!(idx, [0, 2, 3, 5]);
    assert_eq!(val, [0.5, 2.0, 0.5, 3.0]);
    // Fewer positives than k: relu zeros fill up by lowest index.
    let row = [-1.0, 4.0, -2.0, -3.0];
    let (mut idx, mut val) = ([0u32; 3], [0f32; 3]);
    crate::sae::topk::relu_topk_row(&row, &mut idx, &mut val, &mut Vec::new());
    assert_eq!(idx, [0, 1, 2]);
    assert_eq!(val, [0.0, 4.0, 0.0]);
}

#[test]
fn topk_matches_sort_on_random_rows() {
    let mut rng = StdRng::seed_from_u64(3);
    // Large n / small k forces several buffer compactions; rounding makes ties.
    for &(n, k) in &[(64usize, 1usize), (64, 7), (100, 33), (256, 256), (4096, 8), (2000, 64)] {
        let row: Vec<f32> =
            random(n, 1.0, &mut rng).iter().map(|v| (v * 8.0).round() / 8.0).collect();
        let (mut idx, mut val) = (vec![0u32; k], vec![0f32; k]);
        crate::sae::topk::relu_topk_row(&row, &mut idx, &mut val, &mut Vec::new());
        let relu: Vec<f32> = row.iter().map(|v| v.max(0.0)).collect();
        let mask = sort_mask(&relu, n, k);
        let want: Vec<u32> = (0..n as u32).filter(|&j| mask[j as usize] == 1.0).collect();
        assert_eq!(idx, want, "n {n} k {k}");
    }
}

#[test]
fn exactly_k_nonzeros_per_row() {
    let (dim, rows, k) = (16, 20, 6);
    let cfg = cfg(16, k, true);
    let m = FastTopK::new(&cfg, dim).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    // Positive data against positive-ish directions: plenty of positive pre-activations.
    let x = random(rows * dim, 1.0, &mut rng);
    let inf = m.infer(&x).unwrap();
    for row in inf.codes.chunks(m.n) {
        assert_eq!(row.iter().filter(|&&v| v != 0.0).count(), k);
    }
}

/// One AdamW / Adam step against the update computed by hand from the gradients.
fn check_adam(optimizer: Optimizer, dense: bool) {
    let (dim, rows, k) = (10, 6, 3);
    let mut cfg = TrialConfig { optimizer, lr: 0.01, weight_decay: 0.1, ..cfg(4, k, true) };
    if dense {
        cfg.layer_sparsity_mode = LayerSparsityMode::None;
    }
    let mut m = perturbed(&cfg, dim, 11);
    let mut rng = StdRng::seed_from_u64(12);
    let x = random(rows * dim, 1.0, &mut rng);
    let before = m.p.clone();
    let g = m.gradients(&x, k).unwrap();
    let loss = m.step(&x, 0).unwrap();
    assert!((loss - g.loss).abs() < 1e-12);
    let (lr, wd, eps) = (cfg.lr, cfg.weight_decay, cfg.eps);
    let hand = |p: f32, g: f32| -> f64 {
        let (p, mut g) = (p as f64, g as f64);
        if optimizer == Optimizer::Adam {
            g += wd * p;
        }
        // t = 1: m_hat = g, v_hat = g^2.
        let m_hat = (1.0 - cfg.beta1) * g / (1.0 - cfg.beta1);
        let v_hat = (1.0 - cfg.beta2) * g * g / (1.0 - cfg.beta2);
        let p = if optimizer == Optimizer::Adamw { p * (1.0 - lr * wd) } else { p };
        p - lr * m_hat / (v_hat.sqrt() + eps)
    };
    let check = |name: &str, old: &[f32], grad: &[f32], new: &[f32]| {
        let mut moved = 0;
        for i in 0..old.len() {
            let want = hand(old[i], grad[i]);
            assert!((new[i] as f64 - want).abs() < 1e-5, "{name}[{i}]: {} vs {want}", new[i]);
            moved += (new[i] != old[i]) as usize;
        }
        assert!(moved > 0, "{name} did not move");
    };
    check("w_enc", &before.w_enc, &g.w_enc, &m.p.w_enc);
    check("b_enc", &before.b_enc, &g.b_enc, &m.p.b_enc);
    check("w_dec", &before.w_dec, &g.w_dec, &m.p.w_dec);
    check("b_dec", &before.b_dec, &g.b_dec, &m.p.b_dec);
    // The cached norms follow the updated atoms.
    let mut fresh = m.p.clone();
    refresh_norms(&mut fresh, dim, true);
    for (a, b) in fresh.inv_norm.iter().zip(&m.p.inv_norm) {
        assert!((a - b).abs() <= 1e-6 * a.abs());
    }
}

#[test]
fn adamw_step_matches_hand_computation() {
    check_adam(Optimizer::Adamw, false);
}

#[test]
fn adam_step_matches_hand_computation() {
    check_adam(Optimizer::Adam, false);
}

#[test]
fn dense_adamw_and_adam_steps_match_hand_computation() {
    check_adam(Optimizer::Adamw, true);
    check_adam(Optimizer::Adam, true);
}

#[test]
fn deterministic_for_a_seed() {
    let (dim, rows) = (24, 32);
    let cfg =
        TrialConfig { seed: 42, k_curriculum_start: 12, k_curriculum_steps: 4, ..cfg(16, 4, true) };
    let mut rng = StdRng::seed_from_u64(1);
    let batches: Vec<Vec<f32>> = (0..6).map(|_| random(rows * dim, 1.0, &mut rng)).collect();
    let run = |cfg: &TrialConfig| {
        let mut m = FastTopK::new(cfg, dim).unwrap();
        let losses: Vec<f64> =
            batches.iter().enumerate().map(|(s, b)| m.step(b, s).unwrap()).collect();
        (m.p, losses)
    };
    let (a, la) = run(&cfg);
    let (b, lb) = run(&cfg);
    assert_eq!(a, b, "same seed must give bit-identical weights");
    assert_eq!(la, lb);
    let (c, _) = run(&TrialConfig { seed: 43, ..cfg.clone() });
    assert_ne!(a.w_enc, c.w_enc);
}

#[test]
fn init_atoms_are_the_encoder_rows_at_unit_norm() {
    let m = FastTopK::new(&cfg(8, 4, true), 20).unwrap();
    let bound = 1.0 / 20f32.sqrt();
    assert!(m.p.w_enc.iter().all(|v| v.abs() <= bound));
    for (atom, row) in m.p.w_dec.chunks(20).zip(m.p.w_enc.chunks(20)) {
        let norm: f32 = atom.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        let row_norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        for (a, r) in atom.iter().zip(row) {
            assert!((a - r / row_norm).abs() < 1e-6);
        }
    }
    assert!(m.p.b_enc.iter().chain(&m.p.b_dec).all(|&b| b == 0.0));
}

#[test]
fn init_equals_the_candle_models() {
    let cfg = TrialConfig { seed: 9, ..cfg(4, 3, true) };
    let m = FastTopK::new(&cfg, 7).unwrap();
    let want = crate::sae::model::initial_weights(&cfg, 7);
    let get = |name: &str| want.iter().find(|w| w.0 == name).map(|w| w.2.clone()).unwrap();
    assert_eq!(m.p.w_enc, get("encoder.weight"));
    assert_eq!(m.p.b_enc, get("encoder.bias"));
    assert_eq!(transpose(&m.p.w_dec, 16, 7), get("decoder.weight"));
    assert_eq!(m.p.b_dec, get("decoder.bias"));
}

/// Same config, same batches: the fast path and the general candle trainer follow the same
/// trajectory (losses per step, then reconstructions).
#[test]
fn follows_the_candle_trainer() {
    let cfg = TrialConfig {
        seed: 5,
        lr: 1e-3,
        weight_decay: 0.01,
        k_curriculum_start: 10,
        k_curriculum_steps: 3,
        ..cfg(8, 4, true)
    };
    follow_candle(&cfg);
}

/// The dense SAE (no top-k) follows the candle trainer, with and without normalised
/// atoms, with AdamW and Adam.
#[test]
fn dense_follows_the_candle_trainer() {
    for (normalize, optimizer) in [(true, Optimizer::Adamw), (false, Optimizer::Adam)] {
        let cfg = TrialConfig {
            seed: 6,
            lr: 1e-3,
            weight_decay: 0.01,
            optimizer,
            layer_sparsity_mode: LayerSparsityMode::None,
            ..cfg(8, 4, normalize)
        };
        assert!(eligible(&cfg));
        follow_candle(&cfg);
    }
}

/// Same config, same batches: the fast path and the general candle trainer follow the same
/// trajectory (losses per step, then reconstructions and codes).
fn follow_candle(cfg: &TrialConfig) {
    let (dim, rows) = (20, 24);
    let cfg = cfg.clone();
    let mut fast = FastTopK::new(&cfg, dim).unwrap();
    let mut slow = crate::sae::model::CandleTrainer::new(&cfg, dim, &Device::Cpu).unwrap();
    let mut rng = StdRng::seed_from_u64(6);
    for s in 0..5 {
        let b = random(rows * dim, 1.0, &mut rng);
        let (lf, ls) = (fast.step(&b, s).unwrap(), slow.step(&b, s).unwrap());
        assert!((lf - ls).abs() <= 1e-4 * ls, "step {s}: fast loss {lf}, candle {ls}");
    }
    let x = random(rows * dim, 1.0, &mut rng);
    let (a, b) = (fast.infer(&x).unwrap(), slow.infer(&x).unwrap());
    assert!((a.loss - b.loss).abs() <= 1e-4 * b.loss, "eval loss {} vs {}", a.loss, b.loss);
    for (i, (p, q)) in a.recon.iter().zip(&b.recon).enumerate() {
        assert!((p - q).abs() < 1e-3, "recon[{i}] {p} vs {q}");
    }
    assert_eq!(a.codes.len(), b.codes.len());
    for (i, (p, q)) in a.codes.iter().zip(&b.codes).enumerate() {
        assert!((p - q).abs() < 1e-3, "codes[{i}] {p} vs {q}");
    }
}

#[test]
fn training_reduces_loss() {
    // Sparse combinations of 16 fixed directions in 32 dims: a top-k SAE should fit them.
    let (dim, rows) = (32, 64);
    let mut rng = StdRng::seed_from_u64(8);
    let feats = random(16 * dim, 1.0, &mut rng);
    let batch = |rng: &mut StdRng| {
        let mut x = vec![0f32; rows * dim];
        for row in x.chunks_mut(dim) {
            for _ in 0..2 {
                let f = rng.random_range(0..16);
                let c = rng.random::<f32>() + 0.5;
                kernels::axpy(c, &feats[f * dim..(f + 1) * dim], row);
            }
        }
        x
    };
    let cfg = TrialConfig { lr: 3e-3, ..cfg(8, 4, true) };
    let mut m = FastTopK::new(&cfg, dim).unwrap();
    let eval = batch(&mut rng);
    let start = m.infer(&eval).unwrap().loss;
    for s in 0..400 {
        let b = batch(&mut rng);
        m.step(&b, s).unwrap();
    }
    let end = m.infer(&eval).unwrap().loss;
    assert!(end < 0.2 * start, "loss {start} -> {end}");
}

#[test]
fn save_load_round_trip_in_candle_layout() {
    let dim = 6;
    let cfg = cfg(2, 3, true);
    let m = perturbed(&cfg, dim, 4);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    m.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("encoder.weight").unwrap().shape(), &[8, 6]);
    assert_eq!(st.tensor("decoder.weight").unwrap().shape(), &[6, 8]);
    assert_eq!(st.tensor("encoder.bias").unwrap().shape(), &[8]);
    assert_eq!(st.tensor("decoder.bias").unwrap().shape(), &[6]);
    // decoder.weight[i, j] is component i of atom j.
    let dw = st.tensor("decoder.weight").unwrap();
    let first = f32::from_le_bytes(dw.data()[4..8].try_into().unwrap());
    assert_eq!(first, m.p.w_dec[dim]); // [0, 1] = atom 1, component 0
    let mut back = FastTopK::new(&cfg, dim).unwrap();
    back.load(&path).unwrap();
    assert_eq!(back.p, m.p);
    // A file for another shape is refused, naming the tensor.
    let mut other = FastTopK::new(&cfg, dim + 1).unwrap();
    let e = other.load(&path).unwrap_err().to_string();
    assert!(e.contains("encoder.weight") && e.contains("w.safetensors"), "{e}");
}

#[test]
fn atoms_are_unit_rows() {
    let cfg = cfg(2, 3, true);
    let m = perturbed(&cfg, 5, 4);
    let atoms = m.atoms().unwrap();
    assert_eq!(atoms.len(), 8 * 5);
    for (a, raw) in atoms.chunks(5).zip(m.p.w_dec.chunks(5)) {
        let norm: f32 = a.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        let cos: f32 = a.iter().zip(raw).map(|(x, y)| x * y).sum::<f32>()
            / raw.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((cos - 1.0).abs() < 1e-5);
    }
}

#[test]
fn eligibility() {
    assert!(eligible(&TrialConfig::default()));
    assert!(eligible(&TrialConfig {
        optimizer: Optimizer::Adam,
        input_noise_std: 0.1,
        ..Default::default()
    }));
    for bad in [
        TrialConfig { l1_weight: 0.1, ..Default::default() },
        TrialConfig { intermediate_dim: 8, ..Default::default() },
        TrialConfig { layer_sparsity_mode: LayerSparsityMode::Lifetime, ..Default::default() },
        TrialConfig {
            layer_sparsity_mode: LayerSparsityMode::None,
            intermediate_dim: 8,
            ..Default::default()
        },
        TrialConfig { optimizer: Optimizer::Sgd, ..Default::default() },
        TrialConfig { aux_k: 4, ..Default::default() },
        TrialConfig { stripe_sparsity_mode: StripeSparsityMode::Ordinary, ..Default::default() },
    ] {
        assert!(!eligible(&bad));
        let e = FastTopK::new(&bad, 8).unwrap_err().to_string();
        assert!(e.contains("does not support"), "{e}");
    }
    // Dense: k plays no part, so a layer_k beyond the code size is fine.
    let dense = TrialConfig {
        layer_sparsity_mode: LayerSparsityMode::None,
        layer_k: 1_000_000,
        ..Default::default()
    };
    assert!(eligible(&dense), "{:?}", ineligibility(&dense));
    assert!(FastTopK::new(&dense, 8).unwrap().is_dense());
    assert!(!eligible(&TrialConfig { layer_k: 1_000_000, ..Default::default() }));
    let mut m = FastTopK::new(&TrialConfig::default(), 8).unwrap();
    let e = m.step(&[0.0; 12], 0).unwrap_err().to_string();
    assert!(e.contains("12 values") && e.contains("dim 8"), "{e}");
}
