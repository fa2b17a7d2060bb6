#!/usr/bin/env python3
"""msae against the PyTorch reference of the original modular SAE, interleaved (A B A B ...).

Runs `msae-worker bench --json` and `torch_modular.py --json` alternately `--rounds` times each
on the same configs and batch sizes (the machine is noisy; interleaving spreads the noise over
both), then prints a Markdown table: per config and batch, the samples/s of the trainer msae
training selects, of msae's candle model and of PyTorch (the range over rounds), and the ratios
msae-selected / PyTorch of the best rounds (the least disturbed by other load) and of the
medians. The 1-minute load average before each run is printed after the table: on a shared
machine a busy core halves msae and can cut PyTorch's 2-thread OpenMP by 10-100x.

    python3 worker/bench/compare_modular.py --preset original --batch 8,256
    python3 worker/bench/compare_modular.py --config my.yaml --batch 8 --rounds 3 --raw out.json
    python3 worker/bench/compare_modular.py --from-raw out.json    # the table again, no runs
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


LOADS = []


def run_json(cmd):
    LOADS.append(os.getloadavg()[0])
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def fmt_range(values):
    lo, hi = min(values), max(values)
    if round(lo) == round(hi):
        return f"{lo:,.0f}"
    return f"{lo:,.0f}-{hi:,.0f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--msae", default=os.path.join(ROOT, "target/release/msae-worker"))
    p.add_argument("--config", action="append", default=[])
    p.add_argument("--preset", action="append", default=[])
    p.add_argument("--batch", action="append", default=[])
    p.add_argument("--dim")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--raw", help="write every round's JSON here")
    p.add_argument("--from-raw", help="print the table of an earlier --raw file, run nothing")
    args = p.parse_args()
    common = []
    for c in args.config:
        common += ["--config", c]
    for c in args.preset:
        common += ["--preset", c]
    for b in args.batch:
        common += ["--batch", b]
    if args.dim:
        common += ["--dim", args.dim]
    common += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    common += ["--min-time", str(args.min_time), "--json"]
    msae_cmd = [args.msae, "bench"] + common
    torch_cmd = [sys.executable, os.path.join(HERE, "torch_modular.py"), "--threads",
                 str(args.threads)] + common
    if args.from_raw:
        with open(args.from_raw) as f:
            saved = json.load(f)
        raw, loads = saved["rounds"], saved.get("loads", [])
    else:
        raw = []
        for _ in range(args.rounds):
            m = run_json(msae_cmd)
            t = run_json(torch_cmd)
            raw.append({"msae": m, "torch": t})
        loads = LOADS
        if args.raw:
            with open(args.raw, "w") as f:
                json.dump({"rounds": raw, "loads": loads}, f, indent=1)
    rows = {}  # (config, batch) -> dict of lists
    order = []
    for rnd in raw:
        m, t = rnd["msae"], rnd["torch"]
        for r in m["configs"]:
            key = (r["config"], r["batch"])
            if key not in rows:
                rows[key] = {"trainer": r["selected"]["trainer"], "sel": [], "candle": [], "torch": []}
                order.append(key)
            rows[key]["sel"].append(r["selected"]["samples_per_s"])
            rows[key]["candle"].append(r["candle"]["samples_per_s"])
        for r in t["results"]:
            rows[(r["config"], r["batch"])]["torch"].append(r["samples_per_s"])
    torch_version = raw[0]["torch"]["torch"]
    print(f"| config | batch | msae trainer | msae samples/s | msae candle samples/s | "
          f"PyTorch {torch_version} ({args.threads} threads) samples/s | "
          f"ratio msae/PyTorch, best (median) | ratio candle/PyTorch, best |")
    print("|---|---|---|---|---|---|---|---|")
    for key in order:
        r = rows[key]
        best = max(r["sel"]) / max(r["torch"])
        med = statistics.median(r["sel"]) / statistics.median(r["torch"])
        candle = max(r["candle"]) / max(r["torch"])
        print(f"| {key[0]} | {key[1]} | {r['trainer']} | {fmt_range(r['sel'])} | "
              f"{fmt_range(r['candle'])} | {fmt_range(r['torch'])} | {best:.2f}x ({med:.2f}x) | "
              f"{candle:.2f}x |")
    print(f"\n{len(raw)} rounds; load average (1 min) before each run, msae/torch alternating: "
          + " ".join(f"{x:.2f}" for x in loads))


if __name__ == "__main__":
    main()
