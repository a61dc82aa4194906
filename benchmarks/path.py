"""Path patching of every head to the final residual stream: the engine vs a naive loop.

    python benchmarks/path.py [--model vit_tiny_patch16_224] [--images 2] [--threads 1]
        [--repeats 3]

Measured in one run (interleaved rounds, medians):
- engine: `path_patching(model, clean, corrupted, every head, Node("resid_final"), metric)`
  (noising, MLPs frozen: the paper's default);
- naive: the loop a user writes first: the clean and corrupted caches, then for each sender
  head one `run_with_hooks` pass that freezes every head and MLP output to its clean value
  except the sender head (corrupted), keeping the final residual stream, and one pass that
  reads the logits from it.
Printed: both times, their ratio (naive / engine) and the largest difference of the results.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, time_interleaved  # noqa: E402

import patchlens as pl  # noqa: E402
from patchlens import Node  # noqa: E402


def naive(model, clean, corrupted, metric) -> torch.Tensor:
    """``[layer, head]`` metric of the noised path, averaged over the images, by hand."""
    n, h = model.cfg.n_layers, model.cfg.n_heads
    final = f"blocks.{n - 1}.hook_resid_post"
    frozen = [f"blocks.{l}.attn.hook_z" for l in range(n)] + \
             [f"blocks.{l}.hook_mlp_out" for l in range(n)]
    out = torch.empty(n, h, dtype=torch.float64)
    with torch.inference_mode():
        _, cc = model.run_with_cache(clean, names_filter=frozen)
        _, kc = model.run_with_cache(corrupted, names_filter=frozen)
        for layer in range(n):
            for head in range(h):
                sender = f"blocks.{layer}.attn.hook_z"

                def freeze(act, hook, sender=sender, head=head):
                    new = cc[hook.name].clone()
                    if hook.name == sender:
                        new[:, :, head] = kc[hook.name][:, :, head]
                    return new

                kept = {}

                def keep(act, hook, kept=kept):
                    kept["resid"] = act.clone()

                model.run_with_hooks(clean, fwd_hooks=[(name, freeze) for name in frozen]
                                     + [(final, keep)])

                def receive(act, hook, kept=kept):
                    return kept["resid"]

                logits = model.run_with_hooks(clean, fwd_hooks=[(final, receive)])
                out[layer, head] = metric(logits).double().mean()
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = pl.HookedViT.from_timm(timm.create_model(args.model, pretrained=False).eval())
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(args.images, 3, 224, 224, generator=g)
    corrupted = torch.randn(args.images, 3, 224, 224, generator=g)
    metric = pl.metrics.logit_diff(0, 1)
    senders = [Node("z", layer, head) for layer in range(model.cfg.n_layers)
               for head in range(model.cfg.n_heads)]
    results = {}

    def engine():
        results["engine"] = pl.path_patching(model, clean, corrupted, senders,
                                             Node("resid_final"), metric, progress=False)

    def loop():
        results["naive"] = naive(model, clean, corrupted, metric)

    samples: dict[str, list[float]] = {}
    t = time_interleaved({"engine": engine, "naive": loop}, repeats=args.repeats, warmup=1,
                         samples_out=samples)
    res = results["engine"]
    # the naive loop holds the patched metric, as the result's `values` do (before 0.2 `values`
    # held the effect, patched − unpatched: compared as that, so the script runs on both)
    with torch.inference_mode():
        unpatched = metric(model(clean)).double().mean()
    got = res.values.double()
    diff = float(min((got - results["naive"]).abs().max(),
                     (got - (results["naive"] - unpatched)).abs().max()))
    per_round = [n / e for n, e in zip(samples["naive"], samples["engine"])]
    print(machine())
    print(f"path patching, {len(senders)} sender heads -> resid_final, {args.images} image(s), "
          f"{args.model}")
    print(f"engine {t['engine']:.3f} s   naive loop {t['naive']:.3f} s   "
          f"naive / engine {t['naive'] / t['engine']:.2f}x (rounds "
          f"{min(per_round):.2f}-{max(per_round):.2f}x, median "
          f"{statistics.median(per_round):.2f}x)   max |difference| {diff:.2e}")
    return {"ratio": t["naive"] / t["engine"], "diff": diff}


if __name__ == "__main__":
    main()
