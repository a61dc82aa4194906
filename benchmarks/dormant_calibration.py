"""Calibration of the dormant-neuron margin on the zoo model (docs/divergence.md, "Verdicts").

    python benchmarks/dormant_calibration.py [--held-out 400] [--batch 4]

A neuron counts as dormant-activated when a patched run drives it above
``max + margin * (max - median)`` of its natural values. This script measures how far
*unpatched* held-out test images already go: references are fitted on 200 / 500 / 2000 training
images, the held-out images are split into batches of ``--batch`` (the statistic a 4-pair sweep
sees: the maximum over the batch's images and patch tokens), and for every MLP neuron it prints
the largest excess ``(value - max) / (max - median)`` and how many batches exceed the margins
0.1, 0.25, 0.5 and 1.0 in each layer. A margin is safe when natural batches never reach it.
"""

from __future__ import annotations

import argparse

import torch

import patchlens as pl
from patchlens.diagnostics import Reference
from patchlens.zoo.clutter_digits import generate


def main(argv=None) -> dict[int, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--held-out", type=int, default=400)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--refs", type=int, nargs="+", default=[200, 500, 2000])
    args = ap.parse_args(argv)
    model = pl.HookedViT.from_pretrained("clutter-digits-vit").eval()
    n_layers = model.cfg.n_layers
    held = model.preprocess(generate(args.held_out, split="test", seed=7).images)
    names = [f"blocks.{l}.mlp.hook_post" for l in range(n_layers)]
    with torch.inference_mode():
        _, cache = model.run_with_cache(held, names_filter=names, return_type=None)
    n_batches = args.held_out // args.batch
    worst: dict[int, float] = {}
    print(f"{args.held_out} held-out test images in {n_batches} batches of {args.batch}; "
          "excess = (batch max - natural max) / (natural max - natural median), patch tokens")
    for n in args.refs:
        x = model.preprocess(generate(n, split="train", seed=0).images)
        ref = Reference.fit(model, x, ["resid_pre"], progress=False)
        print(f"reference of {n} training images")
        print("  layer  largest excess  batches beyond margin 0.1 / 0.25 / 0.5 / 1.0")
        top = 0.0
        for l in range(n_layers):
            a = cache[names[l]][: n_batches * args.batch, model.layout.n_prefix:]
            a = a.reshape(n_batches, args.batch * a.shape[1], -1).amax(1)   # [batches, U]
            r = ref.neurons[l]["patches"]
            ex = (a - r["max"]) / (r["max"] - r["median"]).clamp_min(1e-6)
            beyond = [int((ex > m).any(1).sum()) for m in (0.1, 0.25, 0.5, 1.0)]
            top = max(top, float(ex.max()))
            print(f"  {l:5d}  {float(ex.max()):14.2f}  " + " / ".join(map(str, beyond)))
        worst[n] = top
    print("largest excess per reference size: "
          + ", ".join(f"{n}: {v:.2f}" for n, v in worst.items()))
    return worst


if __name__ == "__main__":
    main()
