"""Cost of divergence diagnostics on the zoo model (random init if its weights are missing).

    python benchmarks/diagnostics.py [--images 2000] [--pairs 4]

Measured in one run and printed as ratios/figures (no constants):
- fit: `Reference.fit` on N clutter-digits images at every residual site (resid_pre/mid/post of
  all layers): seconds and peak resident memory (target: < 120 s, < 2 GB);
- sweep: a full layer x token resid_pre activation-patching sweep, without and with
  ``diagnose=reference`` (interleaved repeats, best of each), and the ratio (target: <= 1.5x).
  The per-site scorers are fitted by `Reference.fit` (and kept by save/load), so they count in
  the fit time, not in the sweep.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import patchlens as pl
from patchlens.diagnostics import Reference
from patchlens.zoo.clutter_digits import generate


def load_model():
    try:
        return pl.HookedViT.from_pretrained("clutter-digits-vit").eval(), "clutter-digits-vit"
    except Exception:  # weights not shipped yet
        from patchlens.zoo.train import make_config

        torch.manual_seed(0)
        return pl.HookedViT(make_config("clutter-digits-vit")).eval(), "random-init zoo config"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    model, name = load_model()
    print(f"model: {name}; threads: {torch.get_num_threads()}")
    x = model.preprocess(generate(args.images, split="train", seed=0).images)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    ref = Reference.fit(model, x, ["resid_pre", "resid_mid", "resid_post"], progress=False)
    fit_s = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"fit: {args.images} images x {len(ref.hooks)} sites: {fit_s:.1f} s, peak RSS "
          f"{rss:.0f} MB (before fit {rss0:.0f} MB)")

    te = model.preprocess(generate(2 * args.pairs, split="test", seed=1).images)
    clean, corrupted = te[: args.pairs], te[args.pairs :]
    metric = pl.metrics.logit_diff(0, 1)
    pl.activation_patching(model, clean, corrupted, metric, progress=False)  # warm-up
    pl.activation_patching(model, clean, corrupted, metric, progress=False, diagnose=ref)
    # interleaved repeats, best of each (the machine is shared; the minimum is the least noisy)
    times: dict[str, list[float]] = {"sweep": [], "sweep+diagnose": []}
    for _ in range(args.repeats):
        for label, kw in [("sweep", {}), ("sweep+diagnose", {"diagnose": ref})]:
            t0 = time.perf_counter()
            res = pl.activation_patching(model, clean, corrupted, metric, progress=False, **kw)
            times[label].append(time.perf_counter() - t0)
    base, diag = min(times["sweep"]), min(times["sweep+diagnose"])
    n = res.values.numel()
    print(f"layer x token sweep ({n} variants, {args.pairs} pairs), best of {args.repeats}:")
    print(f"  sweep          : {base:.2f} s   (all: {', '.join(f'{t:.2f}' for t in times['sweep'])})")
    print(f"  sweep+diagnose : {diag:.2f} s   (all: "
          f"{', '.join(f'{t:.2f}' for t in times['sweep+diagnose'])})")
    print(f"  ratio          : {diag / base:.2f}x  (+{(diag - base) / base:.0%}; target <= 1.5x)")
    print("report:", res.divergence.summary())


if __name__ == "__main__":
    main()
