#!/usr/bin/env python3
"""PyTorch reference of the original modular SAE, timed like `msae-worker bench --config`.

The model is the original code's (github.com/JoelClingempeel/ModularSparseAutoencoder, see
../shared/docs/sae-reference.md), with msae's semantics where msae fixed the original
(worker/src/model.rs, worker/src/sparsity.rs are the reference):

- encoder: `h = relu(Linear(input -> intermediate)(x))`, `pre = Linear(intermediate -> S*D)(h)`
  (without an intermediate layer, the classic `pre = W_enc (x - b_dec) + b_enc`);
- code activation: ReLU, or JumpReLU `pre * (pre > theta)` with a learned per-neuron
  `theta = exp(log_threshold)` and the straight-through rectangle-kernel gradient for theta;
- sparsity stages as 0/1 masks multiplying the codes, in order:
  1. layer: `none`; `ordinary` (top layer_k per sample); `lifetime` (per neuron across the batch,
     its ceil(lifetime_rate*B) largest); `lifetime_batch_mean` (one set of layer_k by batch
     mean); `boosted` (k-winners of x*exp(beta*(k/N - duty)), unboosted output, duty an EMA of
     the winners' fraction with weight 1/duty_cycle_period, updated in training);
  2. stripe: `none`; `ordinary` (top stripe_k stripes by mean activation); `routing` (a linear
     router from the layer before the code; kept stripes multiplied by their score, or the
     straight-through 0/1 gate);
  3. `active_stripes_per_batch` < 1: each stripe active for its ceil(p*B) highest-mean samples;
  in training, with `distort_prob` > 0, every stripe-mask bit of stages 2 and 3 is flipped with
  that probability (`mask XOR (uniform < p)`, the original's distortion; a timing run has no
  epochs, so the decay is not applied);
- decoder: `Linear(S*D -> intermediate)` + ReLU, `Linear(intermediate -> input)`, ReLU on the
  output when `output_relu`; tied weights use the encoder layers transposed; `normalize_decoder`
  L2-normalises the code-to-next-layer atoms in the forward pass;
- loss: MSE + l1_weight * mean|z| + kl_weight * KL(rho || clamp(z,0,1).mean(0)) +
  hoyer_weight * Hoyer + routing_l1_regularization * |router.weight|_1;
- optimiser: torch.optim.SGD(momentum), Adam or AdamW with the config's hyperparameters.

It reads the same trial-config YAML files as `msae-worker bench --config` (unknown keys are an
error, absent keys take msae's defaults), takes the same `--batch` overrides, `--dim` rule
(`--dim`, else the synthetic input_dim, else 784) and `--preset original` (the files in
worker/bench/configs/), and trains on random standard-normal data, fp32,
torch.set_num_threads(2) by default.

    python3 worker/bench/torch_modular.py --preset original --batch 8,256
    python3 worker/bench/torch_modular.py --config my.yaml --batch 8 --steps 50 --json
"""

import argparse
import json
import math
import os
import time

import torch
import yaml
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(HERE, "configs")
DEFAULT_FILE_DIM = 784

# The `original` preset, in the order of `ORIGINAL_PRESET` in worker/src/bench.rs.
ORIGINAL_PRESET = [
    f"L-{layer}_S-{stripe}"
    for layer in ["none", "ordinary", "lifetime", "boosted"]
    for stripe in ["none", "ordinary", "routing"]
] + [
    "L-none_S-routing_active-stripes-0.5",
    "L-none_S-routing_penalty-l1",
    "L-none_S-routing_penalty-kl",
    "L-none_S-routing_penalty-hoyer",
    "L-none_S-routing_jumprelu",
    "L-none_S-routing_tied",
]

# msae's TrialConfig::default() (shared/src/config.rs), for keys a file leaves out.
DEFAULTS = {
    "seed": 0,
    "intermediate_dim": 0,
    "num_stripes": 16,
    "stripe_dim": 16,
    "tied_weights": False,
    "normalize_decoder": True,
    "activation": "relu",
    "jumprelu_threshold": 0.01,
    "jumprelu_bandwidth": 0.01,
    "output_relu": False,
    "layer_sparsity_mode": "ordinary",
    "layer_k": 8,
    "lifetime_rate": 0.05,
    "boost_strength": 1.0,
    "duty_cycle_period": 1000,
    "stripe_sparsity_mode": "none",
    "stripe_k": 4,
    "routing_l1_regularization": 0.0,
    "routing_gate": "scores",
    "active_stripes_per_batch": 1.0,
    "distort_prob": 0.0,
    "distort_prob_decay": 0.0,
    "l1_weight": 0.0,
    "kl_weight": 0.0,
    "kl_target": 0.05,
    "hoyer_weight": 0.0,
    "aux_k": 0,
    "aux_k_coef": 1.0 / 32.0,
    "dead_after_samples": 100_000,
    "resample_dead_every": 0,
    "k_curriculum_start": 0,
    "k_curriculum_steps": 0,
    "input_noise_std": 0.0,
    "optimizer": "adamw",
    "lr": 1e-3,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "beta1": 0.9,
    "beta2": 0.999,
    "eps": 1e-8,
    "batch_size": 256,
    "steps": 2000,
    "epochs": 0,
    "eval_every": 250,
    "early_stopping_patience": 0,
    "early_stopping_min_delta": 0.0,
    "data": {},
}

# Training features this reference does not model: timing them here would compare unlike work.
UNSUPPORTED = {
    "aux_k": 0,
    "resample_dead_every": 0,
    "k_curriculum_start": 0,
    "input_noise_std": 0.0,
}

KL_EPS = 1e-6
NORM_EPS = 1e-8


def load_config(path):
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise SystemExit(f"{path}: unknown keys {unknown}")
    cfg = dict(DEFAULTS)
    cfg.update(raw)
    for key, off in UNSUPPORTED.items():
        if cfg[key] != off:
            raise SystemExit(f"{path}: {key} is not modelled by this reference")
    return cfg


def input_dim(cfg, dim_flag):
    if dim_flag:
        return dim_flag
    data = cfg.get("data") or {}
    if data.get("path") is None and data.get("source") in (None, "synthetic"):
        return (data.get("synthetic") or {}).get("input_dim", 64)
    return DEFAULT_FILE_DIM


def topk_mask(x, k, dim):
    """0/1 mask of the k largest entries of x along `dim` (exactly k, as msae)."""
    n = x.shape[dim]
    if k >= n:
        return torch.ones_like(x)
    idx = torch.topk(x, k, dim=dim, sorted=False).indices
    return torch.zeros_like(x).scatter_(dim, idx, 1.0)


class JumpReLU(torch.autograd.Function):
    """z = pre * (pre > theta); d/dpre = the gate, d/dtheta = -(theta/eps) 1{|pre-theta| < eps/2}."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        above = pre - theta
        gate = (above > 0).to(pre.dtype)
        ctx.save_for_backward(gate, above, theta)
        ctx.eps = eps
        return pre * gate

    @staticmethod
    def backward(ctx, grad):
        gate, above, theta = ctx.saved_tensors
        window = (above.abs() < ctx.eps / 2).to(grad.dtype)
        g_theta = (grad * window).sum(0) * (-theta / ctx.eps)
        return grad * gate, g_theta, None


class ModularSAE(nn.Module):
    def __init__(self, cfg, dim):
        super().__init__()
        self.cfg = cfg
        s, d = cfg["num_stripes"], cfg["stripe_dim"]
        self.s, self.d, self.n = s, d, s * d
        inter = cfg["intermediate_dim"]
        self.inter = inter
        tied = cfg["tied_weights"]
        if inter > 0:
            self.intermediate = nn.Linear(dim, inter)
            self.encoder = nn.Linear(inter, self.n)
            self.decoder = None if tied else nn.Linear(self.n, inter, bias=False)
            self.decoder_bias = nn.Parameter(torch.zeros(inter))
            self.output = None if tied else nn.Linear(inter, dim, bias=False)
            self.output_bias = nn.Parameter(torch.zeros(dim))
            router_in = inter
        else:
            self.intermediate = None
            self.encoder = nn.Linear(dim, self.n)
            self.decoder = None if tied else nn.Linear(self.n, dim, bias=False)
            self.decoder_bias = nn.Parameter(torch.zeros(dim))
            router_in = dim
        self.router = (
            nn.Linear(router_in, s) if cfg["stripe_sparsity_mode"] == "routing" else None
        )
        if cfg["activation"] == "jump_relu":
            t = math.log(max(cfg["jumprelu_threshold"], 1e-6))
            self.log_threshold = nn.Parameter(torch.full((self.n,), t))
        else:
            self.log_threshold = None
        self.register_buffer("duty", torch.zeros(self.n))

    # --- encoder ---
    def encode(self, x):
        if self.intermediate is not None:
            inp = torch.relu(self.intermediate(x))
        else:
            inp = x - self.decoder_bias
        pre = self.encoder(inp)
        if self.log_threshold is None:
            z = torch.relu(pre)
        else:
            z = JumpReLU.apply(pre, self.log_threshold.exp(), self.cfg["jumprelu_bandwidth"])
        return z, inp

    # --- sparsity stages ---
    def layer(self, z, train):
        c = self.cfg
        mode, k = c["layer_sparsity_mode"], c["layer_k"]
        if mode == "none":
            return z
        if mode == "ordinary":
            return z * topk_mask(z.detach(), k, 1)
        if mode == "lifetime":
            keep = math.ceil(c["lifetime_rate"] * z.shape[0] - 1e-9)  # msae's topk::lifetime_k
            return z * topk_mask(z.detach(), keep, 0)
        if mode == "lifetime_batch_mean":
            return z * topk_mask(z.detach().mean(0, keepdim=True), k, 1)
        if mode == "boosted":
            boost = torch.exp(c["boost_strength"] * (k / self.n - self.duty))
            mask = topk_mask(z.detach() * boost, k, 1)
            if train:
                self.duty += (mask.mean(0) - self.duty) / c["duty_cycle_period"]
            return z * mask
        raise SystemExit(f"unknown layer_sparsity_mode {mode}")

    def stripe_means(self, z):
        return z.detach().view(z.shape[0], self.s, self.d).mean(-1)

    def distort(self, mask, train):
        p = self.cfg["distort_prob"]
        if not train or p <= 0:
            return mask
        return torch.where(torch.rand_like(mask) < p, 1.0 - mask, mask)

    def gate_stripes(self, z, gate):
        b = z.shape[0]
        return (z.view(b, self.s, self.d) * gate.unsqueeze(-1)).view(b, self.n)

    def stripe(self, z, inp, train):
        c = self.cfg
        mode = c["stripe_sparsity_mode"]
        if mode == "none":
            return z
        if mode == "ordinary":
            mask = topk_mask(self.stripe_means(z), c["stripe_k"], 1)
            return self.gate_stripes(z, self.distort(mask, train))
        if mode == "routing":
            scores = self.router(inp)
            mask = self.distort(topk_mask(scores.detach(), c["stripe_k"], 1), train)
            if c["routing_gate"] == "scores":
                gate = scores * mask
            else:
                gate = mask + (scores - scores.detach()) * mask
            return self.gate_stripes(z, gate)
        raise SystemExit(f"unknown stripe_sparsity_mode {mode}")

    def lifetime_stripe(self, z, train):
        p = self.cfg["active_stripes_per_batch"]
        if p >= 1.0:
            return z
        keep = math.ceil(p * z.shape[0] - 1e-9)  # msae's topk::lifetime_k
        mask = topk_mask(self.stripe_means(z), keep, 0)
        return self.gate_stripes(z, self.distort(mask, train))

    # --- decoder ---
    def atoms(self):
        """(N, next) rows mapping a code neuron to the next layer."""
        a = self.encoder.weight if self.decoder is None else self.decoder.weight.t()
        if self.cfg["normalize_decoder"]:
            a = a / (a.pow(2).sum(1, keepdim=True) + NORM_EPS).sqrt()
        return a

    def decode(self, z):
        y = z @ self.atoms() + self.decoder_bias
        if self.intermediate is not None:
            h = torch.relu(y)
            wo = self.intermediate.weight if self.output is None else self.output.weight.t()
            y = h @ wo + self.output_bias
        return torch.relu(y) if self.cfg["output_relu"] else y

    def forward(self, x, train=True):
        z, inp = self.encode(x)
        z = self.layer(z, train)
        z = self.stripe(z, inp, train)
        z = self.lifetime_stripe(z, train)
        return z, self.decode(z)

    def loss(self, x, z, recon):
        c = self.cfg
        loss = ((recon - x) ** 2).mean()
        if c["l1_weight"] > 0:
            loss = loss + c["l1_weight"] * z.abs().mean()
        if c["kl_weight"] > 0:
            rho = c["kl_target"]
            rate = z.clamp(0, 1).mean(0).clamp(KL_EPS, 1 - KL_EPS)
            kl = rho * torch.log(rho / rate) + (1 - rho) * torch.log((1 - rho) / (1 - rate))
            loss = loss + c["kl_weight"] * kl.mean()
        if c["hoyer_weight"] > 0 and self.n > 1:
            l1 = z.abs().sum(1)
            sumsq = z.pow(2).sum(1)
            zero = (sumsq == 0).to(z.dtype)
            ratio = (l1 + zero) / (sumsq + zero).sqrt()
            sq = math.sqrt(self.n)
            loss = loss + c["hoyer_weight"] * ((ratio - 1) / (sq - 1)).mean()
        if c["routing_l1_regularization"] > 0 and self.router is not None:
            loss = loss + c["routing_l1_regularization"] * self.router.weight.abs().sum()
        return loss


def make_optimizer(cfg, params):
    kind = cfg["optimizer"]
    if kind == "sgd":
        return torch.optim.SGD(
            params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"]
        )
    betas = (cfg["beta1"], cfg["beta2"])
    if kind == "adam":
        return torch.optim.Adam(
            params, lr=cfg["lr"], betas=betas, eps=cfg["eps"], weight_decay=cfg["weight_decay"]
        )
    if kind == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg["lr"], betas=betas, eps=cfg["eps"], weight_decay=cfg["weight_decay"]
        )
    raise SystemExit(f"unknown optimizer {kind}")


def time_config(name, cfg, batch, dim, args):
    torch.manual_seed(args.seed)
    model = ModularSAE(cfg, dim)
    opt = make_optimizer(cfg, model.parameters())
    data = [torch.randn(batch, dim) for _ in range(4)]

    def step(x):
        opt.zero_grad(set_to_none=True)
        z, recon = model(x, train=True)
        loss = model.loss(x, z, recon)
        loss.backward()
        opt.step()
        return loss.item()

    for s in range(args.warmup):
        step(data[s % len(data)])
    times = []
    start = time.perf_counter()
    s = 0
    while s < max(args.steps, 1) or time.perf_counter() - start < args.min_time:
        t = time.perf_counter()
        loss = step(data[s % len(data)])
        times.append(time.perf_counter() - t)
        s += 1
    per_step = (time.perf_counter() - start) / s
    return {
        "config": name,
        "batch": batch,
        "dim": dim,
        "trainer": "torch",
        "steps": s,
        "ms_per_step": per_step * 1e3,
        "min_ms": min(times) * 1e3,
        "samples_per_s": batch / per_step,
        "last_loss": loss,
    }


def positive_list(text):
    out = []
    for part in text.split(","):
        v = int(part)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{part!r} is not a positive integer")
        out.append(v)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", default=[], help="trial-config YAML (repeatable)")
    p.add_argument("--preset", action="append", default=[], choices=["original"])
    p.add_argument(
        "--batch", action="append", type=positive_list, default=[],
        help="batch sizes overriding batch_size (repeatable or a comma list)",
    )
    p.add_argument("--dim", type=int, help="input dimension (default: synthetic input_dim or 784)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-time", type=float, default=0.0, help="time at least this many seconds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    files = [(os.path.splitext(os.path.basename(f))[0], f) for f in args.config]
    for preset in args.preset:
        files += [(n, os.path.join(CONFIG_DIR, n + ".yaml")) for n in ORIGINAL_PRESET]
    if not files:
        p.error("give --config FILE or --preset original")
    batches = [b for group in args.batch for b in group]
    results = []
    if not args.json:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
        print(f"{'config':<36} {'batch':>5} {'dim':>4} {'ms/step':>9} {'min ms':>8} {'samples/s':>10}")
    for name, path in files:
        cfg = load_config(path)
        dim = input_dim(cfg, args.dim)
        for b in batches or [cfg["batch_size"]]:
            r = time_config(name, dict(cfg, batch_size=b), b, dim, args)
            results.append(r)
            if not args.json:
                print(
                    f"{name:<36} {b:>5} {dim:>4} {r['ms_per_step']:9.3f} {r['min_ms']:8.3f} "
                    f"{r['samples_per_s']:10.0f}",
                    flush=True,
                )
    if args.json:
        print(json.dumps({"torch": torch.__version__, "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
