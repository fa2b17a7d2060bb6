#!/usr/bin/env python3
"""PyTorch side-by-side for `msae-worker bench`: OpenAI-style top-k SAE training steps on CPU.

The model follows openai/sparse_autoencoder (model.py, train.py): a pre-bias subtracted before a
bias-free encoder, a latent bias, top-k of the pre-activations with ReLU on the kept values
(torch.topk + scatter), a bias-free decoder whose columns are unit-normalised after every step
(with the gradient's parallel component removed before the step), MSE loss, Adam. `--dense`
drops the top-k (a ReLU SAE) for the dense comparison. Random standard-normal data, fp32,
torch.set_num_threads(2) by default (the machine the targets are stated for).

Prints per shape: ms/step, samples/s and achieved GFLOP/s counting 12*B*d*n FLOPs per step,
the same convention as `msae-worker bench`.

    python3 worker/bench/torch_topk.py                      # the two default shapes
    python3 worker/bench/torch_topk.py --shape 256,784,2048,32 --steps 50 --dense
"""

import argparse
import json
import time

import torch
from torch import nn

DEFAULT_SHAPES = ["256,784,2048,32", "1024,512,4096,64"]


class TopKSAE(nn.Module):
    def __init__(self, d: int, n: int, k: int, dense: bool):
        super().__init__()
        self.k, self.dense = k, dense
        self.pre_bias = nn.Parameter(torch.zeros(d))
        self.latent_bias = nn.Parameter(torch.zeros(n))
        self.encoder = nn.Linear(d, n, bias=False)
        self.decoder = nn.Linear(n, d, bias=False)
        # Transpose init with unit-norm atoms, as OpenAI's.
        self.decoder.weight.data = self.encoder.weight.data.T.clone()
        self.unit_norm_decoder_()

    def unit_norm_decoder_(self):
        self.decoder.weight.data /= self.decoder.weight.data.norm(dim=0, keepdim=True)

    def project_decoder_grad_(self):
        w, g = self.decoder.weight.data, self.decoder.weight.grad
        g -= (g * w).sum(dim=0, keepdim=True) * w

    def forward(self, x):
        pre = self.encoder(x - self.pre_bias) + self.latent_bias
        if self.dense:
            z = torch.relu(pre)
        else:
            top = torch.topk(pre, self.k, dim=-1)
            z = torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
        return self.decoder(z) + self.pre_bias


def time_shape(b, d, n, k, args):
    torch.manual_seed(args.seed)
    model = TopKSAE(d, n, k, args.dense)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = [torch.randn(b, d) for _ in range(4)]

    def step(x):
        opt.zero_grad(set_to_none=True)
        loss = ((model(x) - x) ** 2).mean()
        loss.backward()
        model.project_decoder_grad_()
        opt.step()
        model.unit_norm_decoder_()
        return loss.item()

    for s in range(args.warmup):
        step(data[s % len(data)])
    times = []
    start = time.perf_counter()
    for s in range(args.steps):
        t = time.perf_counter()
        loss = step(data[s % len(data)])
        times.append(time.perf_counter() - t)
    per_step = (time.perf_counter() - start) / args.steps
    return {
        "shape": {"batch": b, "input": d, "latents": n, "k": k},
        "path": "torch-dense" if args.dense else "torch-topk",
        "ms_per_step": per_step * 1e3,
        "min_ms": min(times) * 1e3,
        "samples_per_s": b / per_step,
        "gflops": 12.0 * b * d * n / per_step / 1e9,
        "last_loss": loss,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", action="append", help="BATCH,INPUT,LATENTS,K (repeatable)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense", action="store_true", help="ReLU SAE without top-k")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for spec in args.shape or DEFAULT_SHAPES:
        b, d, n, k = (int(v) for v in spec.split(","))
        r = time_shape(b, d, n, k, args)
        results.append(r)
        if not args.json:
            print(
                f"batch {b} input {d} latents {n} k {k}  {r['path']:<11} "
                f"{r['ms_per_step']:8.2f} ms/step  {r['min_ms']:8.2f} min  "
                f"{r['samples_per_s']:8.0f} samples/s  {r['gflops']:6.1f} GFLOP/s",
                flush=True,
            )
    if args.json:
        print(json.dumps({"torch": torch.__version__, "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
