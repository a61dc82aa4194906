"""Throughput of `patchlens run` with 2 processes vs 1 on this machine (CPU, gloo).

    python benchmarks/scale.py [--recipe caap] [--n 64] [--threads 2] [--repeats 2]

Workload: ``patchlens run RECIPE zoo:clutter-digits:N`` with the zoo model (or, while its
weights are not installed, a random model of the same configuration: 6 layers, d_model 128,
8x8 patches, 64x64 images). The CPU is split fairly: the 1-process run gets ``--threads``
torch threads, each of the 2 processes gets ``threads // 2`` (``OMP_NUM_THREADS``); a
1-process run with ``threads // 2`` threads is measured too (the per-process baseline).
Throughput is the run's own items/s (compute only, from its summary line); wall seconds include
process start-up. Configurations run round-robin ``--repeats`` times; medians are reported,
and the ratio 2 processes / 1 process is measured in this run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from patchlens.run import accelerate_command, load_results  # noqa: E402


def model_record(tmp: Path, name: str) -> tuple[str, str]:
    """The zoo model's name, or a zoo-format record of a random model with its config."""
    from patchlens import zoo

    if zoo.is_zoo_name(name):
        return name, name
    from safetensors.torch import save_file

    from patchlens import HookedViT
    from patchlens.zoo.train import make_config

    torch.manual_seed(0)
    cfg = make_config(name)
    m = HookedViT(cfg)
    st = tmp / "model.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(st))
    sha = hashlib.sha256(st.read_bytes()).hexdigest()
    (tmp / "model.json").write_text(json.dumps({"config": cfg.to_json_dict(), "sha256": sha}))
    return str(tmp / "model.json"), f"random init, config of {name}"


def run_once(procs: int, threads: int, args, model: str, out: Path) -> tuple[float, float]:
    """(items/s from the run's summary, wall seconds) of one fresh run."""
    cli = [args.recipe, f"zoo:clutter-digits:{args.n}", "--out", str(out), "--model", model,
           "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size),
           "--no-progress", "--no-resume"]
    if procs == 1:
        cmd = [sys.executable, "-m", "patchlens.run", *cli]
    else:
        cmd = accelerate_command(cli, num_processes=procs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{p.stderr[-3000:]}")
    m = re.search(r"([\d.]+) items/s on (\d+) process", p.stdout)
    if m is None or int(m.group(2)) != procs:
        raise SystemExit(f"unexpected summary from {' '.join(cmd)}:\n{p.stdout}")
    return float(m.group(1)), wall


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="caap", choices=["caap", "activation", "logits"])
    ap.add_argument("--n", type=int, default=64, help="images")
    ap.add_argument("--model", default="clutter-digits-vit")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                    help="CPU threads in all (1 process: all; 2 processes: half each)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    half = max(1, args.threads // 2)
    configs = {f"1 process x {args.threads} threads": (1, args.threads),
               f"2 processes x {half} threads": (2, half),
               f"1 process x {half} threads": (1, half)}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model, desc = model_record(tmp, args.model)
        print(f"patchlens run {args.recipe} over {args.n} clutter-digits images, model {desc}; "
              f"batch {args.batch_size}, shard {args.shard_size}; CPU, {os.cpu_count()} cores")
        rates: dict[str, list[float]] = {k: [] for k in configs}
        walls: dict[str, list[float]] = {k: [] for k in configs}
        for r in range(args.repeats):
            for name, (procs, threads) in configs.items():
                rate, wall = run_once(procs, threads, args, model, tmp / f"out{procs}-{threads}")
                rates[name].append(rate)
                walls[name].append(wall)
                print(f"  [{r + 1}/{args.repeats}] {name:<26} {rate:8.2f} items/s  "
                      f"{wall:6.1f} s wall", flush=True)
        a, b = load_results(tmp / f"out1-{args.threads}"), load_results(tmp / f"out2-{half}")
        c = load_results(tmp / f"out1-{half}")
        same_threads = all(torch.equal(b[k], c[k]) for k in b)
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    med = {k: statistics.median(v) for k, v in rates.items()}
    wall = {k: statistics.median(v) for k, v in walls.items()}
    names = list(configs)
    print("\nmedian items/s (compute) and wall seconds (incl. start-up):")
    for k in names:
        print(f"  {k:<26} {med[k]:8.2f} items/s  {wall[k]:6.1f} s")
    ratio = med[names[1]] / med[names[0]]
    print(f"2 processes / 1 process (same {args.threads} threads in all): {ratio:.2f}x items/s, "
          f"{wall[names[0]] / wall[names[1]]:.2f}x wall")
    print(f"2 processes / 1 process at {half} thread(s) each: {med[names[1]] / med[names[2]]:.2f}x")
    print(f"results: 2 processes bitwise equal to 1 process at {half} thread(s): {same_threads}; "
          f"max |diff| vs {args.threads} threads: {diff:.2e}")
    return {"ratio": ratio, **med}


if __name__ == "__main__":
    main()
