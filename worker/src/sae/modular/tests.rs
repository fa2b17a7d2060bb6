use super::*;
use crate::sae::model::ModularSae;
use candle_core::{Device, Tensor};
use msae_shared::config::{Activation, Optimizer};
use msae_shared::config::{LayerSparsityMode, RoutingGate, StripeSparsityMode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn base(dim: usize) -> TrialConfig {
    let mut cfg = TrialConfig {
        num_stripes: 6,
        stripe_dim: 3,
        layer_k: 7,
        stripe_k: 2,
        batch_size: 10,
        ..Default::default()
    };
    cfg.data.synthetic.input_dim = dim;
    cfg
}

/// The model with every weight perturbed (biases off zero, so no ReLU sits exactly at 0),
/// and the candle model holding the same weights.
fn pair(cfg: &TrialConfig, dim: usize, seed: u64) -> (ModularFast, ModularSae) {
    let mut fast = ModularFast::new(cfg, dim).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let names: Vec<(String, usize)> =
        fast.weights().map(|(n, _, w)| (n.to_string(), w.len())).collect();
    for (name, len) in &names {
        let w: Vec<f32> = fast.weights().find(|(n, _, _)| n == name).unwrap().2.to_vec();
        let v: Vec<f32> = w.iter().take(*len).map(|&x| x + rng.random_range(-0.3..0.3)).collect();
        fast.set_weight(name, &v).unwrap();
    }
    let model = ModularSae::new(cfg, dim, &Device::Cpu).unwrap();
    for (name, shape, w) in fast.weights() {
        let t = Tensor::from_slice(w, shape, &Device::Cpu).unwrap();
        model.var(name).unwrap().set(&t).unwrap();
    }
    (fast, model)
}

fn batch(rows: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..rows * dim).map(|_| rng.random_range(-1.0f32..1.5)).collect()
}

fn close(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(1e-3f32, |a, v| a.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 2e-3 * scale, "{name}[{i}]: {g} vs {w} (scale {scale})");
    }
}

/// Loss and every gradient of one training step equal candle autograd's.
fn check(cfg: &TrialConfig) {
    check_at(cfg, 5);
}

/// [`check`] with `dim` inputs.
fn check_at(cfg: &TrialConfig, dim: usize) {
    let (mut fast, mut model) = pair(cfg, dim, 7);
    let rows = cfg.batch_size;
    let x = batch(rows, dim, 11);
    let k = cfg.layer_k;
    let loss = fast.gradients(&x, k).unwrap();
    let xt = Tensor::from_slice(&x, (rows, dim), &Device::Cpu).unwrap();
    let out = model.forward_train(&xt, k).unwrap();
    let want = model.loss(&xt, &out).unwrap();
    let grads = want.backward().unwrap();
    let want = want.to_scalar::<f32>().unwrap() as f64;
    assert!((loss - want).abs() <= 1e-4 * want.abs().max(1.0), "loss {loss} vs {want} for {cfg:?}");
    let codes: Vec<f32> = out.codes.flatten_all().unwrap().to_vec1().unwrap();
    close("codes", &fast.ws.codes, &codes);
    for (name, var) in model.vars() {
        let g: Vec<f32> = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all().unwrap().to_vec1().unwrap(),
            None => vec![0.0; var.elem_count()],
        };
        close(
            &format!("{name} ({:?}/{:?})", cfg.layer_sparsity_mode, cfg.stripe_sparsity_mode),
            fast.gradient(&name).unwrap(),
            &g,
        );
    }
    close("duty", fast.duty(), &model.sparsity.duty);
    // The comparison is not vacuous: the gradients that should flow do.
    let nonzero = |name: &str| fast.gradient(name).unwrap().iter().any(|v| *v != 0.0);
    assert!(nonzero("encoder.weight") && nonzero("decoder.bias"), "{cfg:?}");
    if cfg.stripe_sparsity_mode == StripeSparsityMode::Routing {
        assert!(nonzero("router.weight"), "{cfg:?}");
    }
}

#[test]
fn gradients_match_candle_autograd_in_every_mode() {
    let layers = [
        LayerSparsityMode::None,
        LayerSparsityMode::Ordinary,
        LayerSparsityMode::Lifetime,
        LayerSparsityMode::LifetimeBatchMean,
        LayerSparsityMode::Boosted,
    ];
    let stripes =
        [StripeSparsityMode::None, StripeSparsityMode::Ordinary, StripeSparsityMode::Routing];
    for inter in [0, 4] {
        for layer in layers {
            for stripe in stripes {
                let cfg = TrialConfig {
                    intermediate_dim: inter,
                    layer_sparsity_mode: layer,
                    stripe_sparsity_mode: stripe,
                    lifetime_rate: 0.3,
                    ..base(5)
                };
                check(&cfg);
            }
        }
    }
}

#[test]
fn gradients_match_at_shapes_that_split_across_the_two_cores() {
    // 32 rows of 600: the output layer's passes in two halves of rows; 600 x 40 weights: the
    // GEMM halves, the optimiser's halves and (in 8 rows) the skinny products' halves.
    for (rows, layer, stripe) in [
        (32, LayerSparsityMode::None, StripeSparsityMode::Routing),
        (8, LayerSparsityMode::Ordinary, StripeSparsityMode::None),
    ] {
        let cfg = TrialConfig {
            intermediate_dim: 40,
            output_relu: true,
            batch_size: rows,
            layer_sparsity_mode: layer,
            stripe_sparsity_mode: stripe,
            ..base(600)
        };
        check_at(&cfg, 600);
    }
}

#[test]
fn gradients_match_with_gates_penalties_tied_weights_and_options() {
    let routing = TrialConfig {
        stripe_sparsity_mode: StripeSparsityMode::Routing,
        layer_sparsity_mode: LayerSparsityMode::Ordinary,
        ..base(5)
    };
    let variants = [
        TrialConfig { routing_gate: RoutingGate::StraightThrough, ..routing.clone() },
        TrialConfig { routing_l1_regularization: 0.01, ..routing.clone() },
        TrialConfig { active_stripes_per_batch: 0.4, ..routing.clone() },
        TrialConfig { l1_weight: 0.3, kl_weight: 0.2, hoyer_weight: 0.4, ..routing.clone() },
        TrialConfig { tied_weights: true, ..routing.clone() },
        TrialConfig { distort_prob: 0.4, active_stripes_per_batch: 0.5, ..routing.clone() },
        TrialConfig {
            distort_prob: 0.3,
            stripe_sparsity_mode: StripeSparsityMode::Ordinary,
            ..routing.clone()
        },
        TrialConfig {
            activation: Activation::JumpRelu,
            jumprelu_threshold: 0.2,
            jumprelu_bandwidth: 0.5,
            ..routing.clone()
        },
        TrialConfig {
            activation: Activation::JumpRelu,
            jumprelu_threshold: 0.2,
            jumprelu_bandwidth: 0.5,
            intermediate_dim: 4,
            layer_sparsity_mode: LayerSparsityMode::Boosted,
            ..routing.clone()
        },
        TrialConfig { tied_weights: true, intermediate_dim: 4, ..routing.clone() },
        TrialConfig { normalize_decoder: false, intermediate_dim: 4, ..routing.clone() },
        TrialConfig { output_relu: true, intermediate_dim: 4, ..routing.clone() },
        TrialConfig {
            output_relu: true,
            tied_weights: true,
            intermediate_dim: 4,
            l1_weight: 0.1,
            kl_weight: 0.1,
            hoyer_weight: 0.1,
            active_stripes_per_batch: 0.5,
            ..routing.clone()
        },
    ];
    for cfg in variants {
        check(&cfg);
    }
}

#[test]
fn training_follows_the_candle_trainer() {
    // Same init, same batches: a few optimiser steps of each kind stay together.
    for optimizer in [Optimizer::Sgd, Optimizer::Adam, Optimizer::Adamw] {
        let cfg = TrialConfig {
            intermediate_dim: 4,
            layer_sparsity_mode: LayerSparsityMode::Ordinary,
            stripe_sparsity_mode: StripeSparsityMode::Routing,
            optimizer,
            lr: 1e-3,
            momentum: 0.9,
            weight_decay: 0.01,
            distort_prob: 0.3,
            distort_prob_decay: 0.1,
            run_steps_per_epoch: 2,
            ..base(5)
        };
        let mut fast = ModularFast::new(&cfg, 5).unwrap();
        let mut candle = crate::sae::model::CandleTrainer::new(&cfg, 5, &Device::Cpu).unwrap();
        for step in 0..4 {
            let x = batch(cfg.batch_size, 5, step as u64);
            let a = fast.step(&x, step).unwrap();
            let b = candle.step(&x, step).unwrap();
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{optimizer:?} step {step}: {a} vs {b}"
            );
        }
        let x = batch(30, 5, 99);
        let (a, b) = (fast.infer(&x).unwrap(), candle.infer(&x).unwrap());
        close("codes", &a.codes, &b.codes);
        close("recon", &a.recon, &b.recon);
        // The router scores per class come from here: both paths give the same.
        let (ra, rb) = (a.routing.expect("fast path scores"), b.routing.expect("candle scores"));
        assert_eq!(ra.len(), 30 * cfg.num_stripes);
        close("routing", &ra, &rb);
        close("atoms", &fast.atoms().unwrap(), &candle.atoms().unwrap());
    }
}

#[test]
fn saves_in_the_candle_layout() {
    let cfg = TrialConfig {
        intermediate_dim: 4,
        stripe_sparsity_mode: StripeSparsityMode::Routing,
        ..base(5)
    };
    let fast = ModularFast::new(&cfg, 5).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    fast.save(&path).unwrap();
    let loaded = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let model = ModularSae::new(&cfg, 5, &Device::Cpu).unwrap();
    assert_eq!(loaded.len(), model.vars().len());
    for (name, var) in model.vars() {
        assert_eq!(loaded[&name].dims(), var.dims(), "{name}");
    }
}

#[test]
fn eligibility() {
    assert!(eligible(&TrialConfig::default()));
    assert!(eligible(&TrialConfig { activation: Activation::JumpRelu, ..Default::default() }));
    assert!(!eligible(&TrialConfig { aux_k: 8, ..Default::default() }));
    assert!(!eligible(&TrialConfig { resample_dead_every: 10, ..Default::default() }));
    assert!(eligible(&TrialConfig { distort_prob: 0.4, ..Default::default() }));
}

#[test]
fn fused_updates_equal_the_separate_optimiser_pass() {
    // Small batches update single-product weights inside the backward pass; the weights after
    // a few steps are bit for bit those of gradients-then-update.
    let routing = TrialConfig {
        stripe_sparsity_mode: StripeSparsityMode::Routing,
        layer_sparsity_mode: LayerSparsityMode::Ordinary,
        normalize_decoder: false,
        weight_decay: 0.01,
        momentum: 0.9,
        batch_size: 12,
        ..base(37)
    };
    let variants = [
        routing.clone(),
        TrialConfig { intermediate_dim: 21, output_relu: true, ..routing.clone() },
        TrialConfig {
            routing_l1_regularization: 0.01,
            optimizer: Optimizer::Adam,
            ..routing.clone()
        },
        TrialConfig { tied_weights: true, intermediate_dim: 21, ..routing.clone() },
        TrialConfig { normalize_decoder: true, optimizer: Optimizer::Adamw, ..routing.clone() },
        TrialConfig {
            batch_size: 5,
            stripe_sparsity_mode: StripeSparsityMode::None,
            ..routing.clone()
        },
    ];
    // 600 inputs into 40: weights of 24,000, whose updates and products split across the two
    // cores ([`crate::sae::duo`]).
    let wide = TrialConfig { intermediate_dim: 40, output_relu: true, ..routing.clone() };
    let variants = variants.map(|cfg| (cfg, 37)).into_iter().chain([(wide, 600)]);
    for (cfg, dim) in variants {
        let mut fused = ModularFast::new(&cfg, dim).unwrap();
        let mut plain = ModularFast::new(&cfg, dim).unwrap();
        for step in 0..3 {
            let x = batch(cfg.batch_size, dim, step);
            let a = fused.train_step(&x, cfg.layer_k, true).unwrap();
            let b = plain.train_step(&x, cfg.layer_k, false).unwrap();
            assert_eq!(a.to_bits(), b.to_bits(), "loss at step {step} for {cfg:?}");
        }
        let fused_any = fused.params.iter().any(|p| p.updated && p.shape.len() == 2);
        assert!(fused_any, "no weight took the fused update for {cfg:?}");
        for ((name, _, a), (_, _, b)) in fused.weights().zip(plain.weights()) {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{name} differs for {cfg:?}");
        }
    }
}

#[test]
fn sparse_products_give_the_dense_gradients() {
    // Batches above the fused size take the decoder and encoder products over the active
    // codes only, when a quarter of the codes or fewer pass the masks: same loss, codes and
    // gradients as the dense products.
    let dim = 9;
    let routing = TrialConfig {
        num_stripes: 8,
        stripe_dim: 3,
        layer_k: 6,
        stripe_k: 2,
        batch_size: 24,
        stripe_sparsity_mode: StripeSparsityMode::Routing,
        layer_sparsity_mode: LayerSparsityMode::Ordinary,
        lifetime_rate: 0.2,
        ..base(dim)
    };
    let variants = [
        routing.clone(),
        TrialConfig { normalize_decoder: false, ..routing.clone() },
        TrialConfig { intermediate_dim: 7, output_relu: true, ..routing.clone() },
        TrialConfig { tied_weights: true, ..routing.clone() },
        TrialConfig { tied_weights: true, intermediate_dim: 7, ..routing.clone() },
        TrialConfig { routing_gate: RoutingGate::StraightThrough, ..routing.clone() },
        TrialConfig { l1_weight: 0.3, kl_weight: 0.2, hoyer_weight: 0.4, ..routing.clone() },
        TrialConfig { active_stripes_per_batch: 0.5, ..routing.clone() },
        TrialConfig {
            activation: Activation::JumpRelu,
            jumprelu_threshold: 0.2,
            jumprelu_bandwidth: 0.5,
            ..routing.clone()
        },
        TrialConfig { stripe_sparsity_mode: StripeSparsityMode::Ordinary, ..routing.clone() },
        TrialConfig { layer_sparsity_mode: LayerSparsityMode::Lifetime, ..routing.clone() },
        TrialConfig {
            layer_sparsity_mode: LayerSparsityMode::Boosted,
            stripe_sparsity_mode: StripeSparsityMode::None,
            layer_k: 3,
            ..routing.clone()
        },
    ];
    for cfg in variants {
        let (mut sparse, _) = pair(&cfg, dim, 5);
        let (mut dense, _) = pair(&cfg, dim, 5);
        dense.dense_only = true;
        let x = batch(cfg.batch_size, dim, 13);
        let a = sparse.gradients(&x, cfg.layer_k).unwrap();
        let b = dense.gradients(&x, cfg.layer_k).unwrap();
        assert!(sparse.ws.sparse && !dense.ws.sparse, "sparse path not taken for {cfg:?}");
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "loss {a} vs {b} for {cfg:?}");
        close("codes", &sparse.ws.codes, &dense.ws.codes);
        close("reconstruction", &sparse.ws.xhat, &dense.ws.xhat);
        for (name, _, _) in dense.weights() {
            let what = format!("{name} for {cfg:?}");
            close(&what, sparse.gradient(name).unwrap(), dense.gradient(name).unwrap());
        }
    }
}
