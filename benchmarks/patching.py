"""Full layer x token resid_pre sweep: the engine vs a naive loop vs the compute floor.

    python benchmarks/patching.py [--device cuda] [--model vit_tiny_patch16_224] [--tokens N]

Measured in one run:
- engine: `activation_patching` (batched variants, prefix reuse);
- naive: one `run_with_hooks` per variant (the reference loop every library starts from);
- floor: the HookedViT's own per-image forward time at the engine's batch size, times the
  fraction of layers each variant must recompute, summed over variants.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, sync  # noqa: E402

import patchlens as pl  # noqa: E402
from patchlens.patching.engine import CPU_MAX_ROWS, bytes_per_row, parse_bytes  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=None, help="limit the token axis (quick runs)")
    ap.add_argument("--budget", default="2GB")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    src = timm.create_model(args.model, pretrained=False).eval()
    model = pl.HookedViT.from_timm(src).to(args.device)
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(1, 3, 224, 224, generator=g).to(args.device)
    corrupted = torch.randn(1, 3, 224, 224, generator=g).to(args.device)
    n_layers, n_tok = model.cfg.n_layers, model.layout.n_tokens
    tokens = list(range(args.tokens or n_tok))
    metric = pl.metrics.logit_diff(0, 1)
    n_var = n_layers * len(tokens)
    rows = max(1, parse_bytes(args.budget) // bytes_per_row(model, n_tok, False))
    if args.device == "cpu":
        rows = min(rows, CPU_MAX_ROWS)

    chunk = min(rows, len(tokens))  # the engine's rows per forward pass
    with torch.inference_mode():
        xb = clean.repeat(chunk, 1, 1, 1)
        model(xb)  # warm-up
        samples = []
        for _ in range(3):
            sync(args.device)
            t0 = time.perf_counter()
            model(xb)
            sync(args.device)
            samples.append((time.perf_counter() - t0) / chunk)
        per_image = sorted(samples)[1]
    floor = per_image * sum((n_layers - layer) / n_layers for layer in range(n_layers)) * len(tokens)

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sync(args.device)
    t0 = time.perf_counter()
    result = pl.activation_patching(model, clean, corrupted, metric, tokens=tokens,
                                    memory_budget=args.budget, progress=False)
    sync(args.device)
    t_engine = time.perf_counter() - t0
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024

    with torch.inference_mode():
        _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
        naive = torch.empty(n_layers, len(tokens))
        sync(args.device)
        t0 = time.perf_counter()
        for layer in range(n_layers):
            name = f"blocks.{layer}.hook_resid_pre"
            for j, tok in enumerate(tokens):
                def hook(act, hook, tok=tok, name=name):
                    act = act.clone()
                    act[:, tok] = cache[name][:, tok]
                    return act
                naive[layer, j] = metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)]))[0]
        sync(args.device)
        t_naive = time.perf_counter() - t0
    err = (naive - result.values.cpu()).abs().max().item()
    ratios = {"naive/engine": t_naive / t_engine, "engine/floor": t_engine / floor}
    print(f"patching benchmark: {args.model}, {n_layers} x {len(tokens)} = {n_var} variants, "
          f"{machine()}, engine batch rows {chunk}")
    print(f"  engine {t_engine:8.2f} s   naive loop {t_naive:8.2f} s   floor {floor:8.2f} s")
    print(f"  naive/engine  {ratios['naive/engine']:.2f}x faster")
    print(f"  engine/floor  {ratios['engine/floor']:.3f}")
    print(f"  max |engine - naive| = {err:.2e}")
    print(f"  peak RSS growth during the engine run: {rss_growth / 2**20:.0f} MiB "
          f"(budget {args.budget})")
    return ratios


if __name__ == "__main__":
    main()
