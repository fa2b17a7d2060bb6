#!/usr/bin/env python3
"""Quality at equal budget: msae's classic top-k SAE against OpenAI's TopK SAE on real data.

The data are scikit-learn's bundled handwritten digits (1,797 images of 8x8 pixels, scaled to
[0, 1]; real data, no download), shuffled with a fixed seed and split 80/20 into a training and
a held-out file. Both sides train on the training file with the same latents, k, batch, steps,
Adam learning rate and seed, and both are evaluated here, on the held-out file, with one
formula: FVU = sum (x - x_hat)^2 / sum (x - mean(x))^2 (mean per input dimension) and L0 = mean
non-zero codes per sample.

- msae: `msae-worker train --config trial.yaml --out DIR` (the fast top-k path), weights read
  back from `weights.safetensors` and run through msae's forward pass (pre-bias `b_dec`, top-k of
  ReLU pre-activations, unit-norm atoms). msae holds out 1% of the training file for its own
  validation (its minimum), so it trains on 99% of the rows the reference trains on.
- OpenAI: openai/sparse_autoencoder's model and training step (as in torch_topk.py: pre-bias,
  top-k, unit-norm decoder with the gradient's parallel component removed, Adam), with the
  pre-bias initialised at the data mean (`--openai-bias mean`, OpenAI's choice; the paper uses
  the geometric median) or at 0 (`zero`, msae's).

    python3 worker/bench/quality_topk.py --msae target/release/msae-worker
    python3 worker/bench/quality_topk.py --seeds 0,1,2 --lrs 1e-3,3e-3 --steps 3000

Needs torch, numpy, pyyaml, safetensors and scikit-learn (`pip install scikit-learn safetensors`).
"""

import argparse
import json
import os
import subprocess
import tempfile

import numpy as np
import torch
from safetensors.numpy import load_file
from sklearn.datasets import load_digits


def split_digits(seed):
    x = (load_digits().data / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    return x[order[:cut]], x[order[cut:]]


def write_npy(path, a):
    np.save(path, np.ascontiguousarray(a, dtype=np.float32))


def fvu_l0(x, x_hat, z):
    resid = ((x - x_hat) ** 2).sum()
    var = ((x - x.mean(axis=0, keepdims=True)) ** 2).sum()
    return float(resid / var), float((z != 0).sum(axis=1).mean())


def topk_codes(pre, k):
    z = np.zeros_like(pre)
    idx = np.argpartition(-pre, k - 1, axis=1)[:, :k]
    rows = np.arange(len(pre))[:, None]
    z[rows, idx] = np.maximum(pre[rows, idx], 0.0)
    return z


def run_msae(binary, train_path, val, args, seed, lr, workdir):
    cfg = {
        "seed": seed,
        "data": {"path": train_path, "validation_fraction": 0.01},
        "num_stripes": args.latents // 16,
        "stripe_dim": 16,
        "layer_sparsity_mode": "ordinary",
        "layer_k": args.k,
        "optimizer": "adam",
        "lr": lr,
        "batch_size": args.batch,
        "steps": args.steps,
        "eval_every": 0,
    }
    out = os.path.join(workdir, f"msae-{seed}-{lr}")
    cfg_path = out + ".yaml"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)  # JSON is YAML
    subprocess.run(
        [binary, "train", "--config", cfg_path, "--out", out, "--json"],
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "RUST_LOG": "warn"},
    )
    w = load_file(os.path.join(out, "weights.safetensors"))
    w_enc, b_enc, b_dec = w["encoder.weight"], w["encoder.bias"], w["decoder.bias"]
    atoms = w["decoder.weight"].T  # (N, dim)
    atoms = atoms / np.sqrt((atoms**2).sum(axis=1, keepdims=True) + 1e-8)
    z = topk_codes((val - b_dec) @ w_enc.T + b_enc, args.k)
    return fvu_l0(val, z @ atoms + b_dec, z)


def run_openai(train, val, args, seed, lr):
    torch.manual_seed(seed)
    d, n, k = train.shape[1], args.latents, args.k
    pre_bias = torch.nn.Parameter(
        torch.tensor(train.mean(axis=0)) if args.openai_bias == "mean" else torch.zeros(d)
    )
    latent_bias = torch.nn.Parameter(torch.zeros(n))
    enc = torch.nn.Linear(d, n, bias=False)
    dec = torch.nn.Linear(n, d, bias=False)
    dec.weight.data = enc.weight.data.T.clone()
    dec.weight.data /= dec.weight.data.norm(dim=0, keepdim=True)
    params = [pre_bias, latent_bias, enc.weight, dec.weight]
    opt = torch.optim.Adam(params, lr=lr)
    xt = torch.tensor(train)
    gen = torch.Generator().manual_seed(seed)

    def forward(x):
        pre = enc(x - pre_bias) + latent_bias
        top = torch.topk(pre, k, dim=-1)
        z = torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
        return dec(z) + pre_bias, z

    perm, pos = torch.randperm(len(xt), generator=gen), 0
    for _ in range(args.steps):
        if pos + args.batch > len(xt):
            perm, pos = torch.randperm(len(xt), generator=gen), 0
        x = xt[perm[pos : pos + args.batch]]
        pos += args.batch
        opt.zero_grad(set_to_none=True)
        x_hat, _ = forward(x)
        ((x_hat - x) ** 2).mean().backward()
        w, g = dec.weight.data, dec.weight.grad
        g -= (g * w).sum(dim=0, keepdim=True) * w
        opt.step()
        dec.weight.data /= dec.weight.data.norm(dim=0, keepdim=True)
    with torch.no_grad():
        x_hat, z = forward(torch.tensor(val))
    return fvu_l0(val, x_hat.numpy(), z.numpy())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--msae", default="target/release/msae-worker")
    p.add_argument("--latents", type=int, default=256)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lrs", default="1e-3,3e-3")
    p.add_argument("--openai-bias", choices=["mean", "zero"], default="mean")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train, val = split_digits(0)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        train_path = os.path.join(workdir, "train.npy")
        write_npy(train_path, train)
        for lr in (float(v) for v in args.lrs.split(",")):
            for seed in (int(v) for v in args.seeds.split(",")):
                m_fvu, m_l0 = run_msae(args.msae, train_path, val, args, seed, lr, workdir)
                o_fvu, o_l0 = run_openai(train, val, args, seed, lr)
                results.append(dict(lr=lr, seed=seed, msae_fvu=m_fvu, msae_l0=m_l0,
                                    openai_fvu=o_fvu, openai_l0=o_l0))
    if args.json:
        print(json.dumps(results))
        return
    print(f"digits: {len(train)} train / {len(val)} held-out rows, dim 64; latents {args.latents}, "
          f"k {args.k}, batch {args.batch}, {args.steps} steps, Adam; OpenAI pre-bias init: "
          f"{args.openai_bias}")
    print(f"{'lr':>8} {'seed':>4} {'msae fvu':>9} {'msae l0':>8} {'openai fvu':>10} {'openai l0':>9}")
    for r in results:
        print(f"{r['lr']:>8g} {r['seed']:>4} {r['msae_fvu']:>9.4f} {r['msae_l0']:>8.2f} "
              f"{r['openai_fvu']:>10.4f} {r['openai_l0']:>9.2f}")
    for lr in sorted({r["lr"] for r in results}):
        rs = [r for r in results if r["lr"] == lr]
        m = np.mean([r["msae_fvu"] for r in rs])
        o = np.mean([r["openai_fvu"] for r in rs])
        print(f"lr {lr:g}: mean held-out FVU msae {m:.4f}, OpenAI {o:.4f}")


if __name__ == "__main__":
    main()
