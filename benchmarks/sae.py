"""Sparse autoencoders: the cost of a spliced forward, and a per-feature sweep vs a naive loop.

    python benchmarks/sae.py [--images 64] [--sweep-images 4] [--threads N]

Measured in one run, on the zoo model ``clutter-digits-vit`` and its zoo SAEs (512 features):

- splice: ``model(x)`` with the SAE spliced (error term on) against the plain forward plus
  the SAE's own encode and decode of the same vectors (``sae(acts)``, no hooks), timed
  round-robin; the issue's bound is ratio <= 1.2.
- sweep: `activation_patching(..., site="sae_acts_post", per="feature")` over all 512 features
  (clean features patched into the corrupted run, every token) against a naive loop of one
  ``run_with_hooks`` per feature; the bound is naive / engine >= 3. Both results are compared
  (max abs difference). Also timed: the floor of layer-level prefix reuse (every variant's rows
  run from the SAE's block to the logits, spliced, no hooks), so naive / floor is the most any
  sweep that restarts at the SAE's block can gain.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, time_interleaved  # noqa: E402

import patchlens as pl  # noqa: E402
from patchlens.zoo.clutter_digits import erase_digits, generate  # noqa: E402

SAES = ("clutter-digits-vit.resid_post.2", "clutter-digits-vit.resid_post.4")


def splice_cost(model, sae, x, repeats: int) -> dict[str, float]:
    hook = sae.hook_name
    with torch.inference_mode():
        _, cache = model.run_with_cache(x, names_filter=hook)
        acts = cache[hook]
        spliced = pl.HookedViT.from_pretrained("clutter-digits-vit").add_sae(
            sae, use_error_term=True)
        samples: dict[str, list[float]] = {}
        med = time_interleaved({"plain": lambda: model(x), "sae": lambda: sae(acts),
                                "spliced": lambda: spliced(x)}, repeats=repeats,
                               samples_out=samples)
    ratio = sorted((s / (p + a)) for s, p, a in zip(samples["spliced"], samples["plain"],
                                                   samples["sae"]))
    return {"plain_ms": 1e3 * med["plain"], "sae_ms": 1e3 * med["sae"],
            "spliced_ms": 1e3 * med["spliced"], "ratio": ratio[len(ratio) // 2],
            "ratio_min": ratio[0], "ratio_max": ratio[-1]}


def sweep(model, sae, clean, corrupted) -> dict[str, float]:
    metric = pl.metrics.logit_diff(0, 1)
    model.add_sae(sae, use_error_term=True)
    layer = int(sae.hook_name.split(".")[1])
    hook = f"{sae.hook_name}.hook_sae_acts_post"
    try:
        t0 = time.perf_counter()
        res = pl.activation_patching(model, clean, corrupted, metric, per="feature",
                                     layers=layer, progress=False)
        t_engine = time.perf_counter() - t0
        with torch.inference_mode():
            # the floor: what every variant must recompute with layer-level prefix reuse (block
            # `layer` with the SAE spliced, then the rest), in the engine's 64-row chunks, no hooks
            base = model(clean, stop_at_layer=layer)
            rows = max(1, 64 // clean.shape[0])
            t0 = time.perf_counter()
            for i in range(0, sae.d_sae, rows):
                model(base.repeat(min(rows, sae.d_sae - i), 1, 1), start_at_layer=layer)
            t_floor = time.perf_counter() - t0
            t0 = time.perf_counter()
            _, cache = model.run_with_cache(clean, names_filter=hook)
            src = cache[hook]
            naive = torch.empty(sae.d_sae)
            for f in range(sae.d_sae):
                def put(a, hook, f=f):
                    a = a.clone()
                    a[..., f] = src[..., f]
                    return a

                naive[f] = metric(model.run_with_hooks(corrupted, fwd_hooks=[(hook, put)])).mean()
            t_naive = time.perf_counter() - t0
    finally:
        model.reset_saes()
    return {"engine_s": t_engine, "naive_s": t_naive, "speedup": t_naive / t_engine,
            "floor_s": t_floor, "best_speedup": t_naive / t_floor,
            "max_abs_diff": float((res.values[0].float() - naive).abs().max())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=64, help="batch of the forward timing")
    ap.add_argument("--sweep-images", type=int, default=4, help="image pairs in the sweep")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = pl.HookedViT.from_pretrained("clutter-digits-vit")
    x = model.preprocess(generate(args.images, split="test", seed=0).images)
    data = generate(args.sweep_images, split="test", seed=1)
    clean, corrupted = model.preprocess(data.images), model.preprocess(erase_digits(data))
    print(f"machine: {machine()}; torch {torch.__version__}; shared machine timings")
    out = {}
    for name in SAES:
        sae = pl.sae.load(name)
        s = splice_cost(model, sae, x, args.repeats)
        print(f"{name}: forward of {args.images} images: plain {s['plain_ms']:.1f} ms, SAE "
              f"encode+decode {s['sae_ms']:.1f} ms, spliced {s['spliced_ms']:.1f} ms; "
              f"spliced / (plain + SAE) = {s['ratio']:.3f} (rounds {s['ratio_min']:.3f}-"
              f"{s['ratio_max']:.3f}; bound 1.2)")
        w = sweep(model, sae, clean, corrupted)
        print(f"{name}: per-feature sweep, {sae.d_sae} features x {args.sweep_images} pairs: "
              f"engine {w['engine_s']:.2f} s, naive loop {w['naive_s']:.2f} s, speed-up "
              f"{w['speedup']:.1f}x (bound 3x); max |engine - naive| {w['max_abs_diff']:.1e}; "
              f"floor (the suffix from block {int(sae.hook_name.split('.')[1])} for every "
              f"variant, no hooks) {w['floor_s']:.2f} s: engine / floor "
              f"{w['engine_s'] / w['floor_s']:.2f}, naive / floor {w['best_speedup']:.1f}x")
        out[name] = {**s, **w}
    return out


if __name__ == "__main__":
    main()
