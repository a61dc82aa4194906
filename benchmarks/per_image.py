"""Per-image token selections: each image's digit box interchanged from its clean image into its
corrupted run, at every layer of the zoo model, measured in one run against

- loop: one `run_with_hooks` per (layer, image), each patching that image's own box (what one
  writes without per-image selections);
- shared: the same sweep with one token set for every image (the union of the boxes), so the
  ratio per-image / shared is the price of the padding and masked write-back.

    python benchmarks/per_image.py [--images 16] [--threads 1] [--repeats 5]

Prints the median seconds per sweep and the paired ratios (same round, same machine state).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, paired_ratio, time_interleaved  # noqa: E402

import patchlens as pl  # noqa: E402
from patchlens.zoo.clutter_digits import erase_digits, generate  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = pl.HookedViT.from_pretrained("clutter-digits-vit")
    data = generate(args.images, split="test", seed=0)
    clean, corrupted = model.preprocess(data.images), model.preprocess(erase_digits(data))
    rects = pl.Rect.from_boxes(data.boxes, model)
    union = torch.zeros(model.layout.grid, dtype=torch.bool)
    for r in rects:
        union[r.r0:r.r1, r.c0:r.c1] = True
    metric = pl.metrics.logit(data.labels)
    n = model.cfg.n_layers
    iv = pl.Interchange(clean)

    def engine(tokens):
        variants = [pl.Variant([(pl.Site("resid_pre", layers=layer, tokens=tokens), iv)], layer)
                    for layer in range(n)]
        return pl.run_variants(model, corrupted, variants, metric=metric, progress=False).outputs

    with torch.inference_mode():
        _, cache = model.run_with_cache(clean, names_filter=lambda h: h.endswith("resid_pre"))

    def loop():
        out = torch.empty(n, args.images)
        for layer in range(n):
            name = f"blocks.{layer}.hook_resid_pre"
            for b, r in enumerate(rects):
                toks = model.layout.rect_tokens((r.r0, r.r1), (r.c0, r.c1))

                def hook(act, hook, b=b, toks=toks, name=name):
                    act[:, toks] = cache[name][b:b + 1, toks]
                    return act

                with torch.inference_mode():
                    lg = model.run_with_hooks(corrupted[b:b + 1], fwd_hooks=[(name, hook)])
                out[layer, b] = lg[0, data.labels[b]]
        return out

    err = (engine(rects) - loop()).abs().max().item()
    samples: dict[str, list[float]] = {}
    med = time_interleaved({"per_image": lambda: engine(rects), "shared": lambda: engine(union),
                            "loop": loop}, repeats=args.repeats, warmup=1, samples_out=samples)
    vs_loop = paired_ratio(samples, "loop", "per_image")
    vs_shared = paired_ratio(samples, "per_image", "shared")
    print(f"{machine()}; zoo model, {args.images} images x {n} layers, resid_pre digit boxes")
    print(f"max |per-image engine - loop| = {err:.2e}")
    for k, v in med.items():
        print(f"  {k:10s} {v * 1e3:8.1f} ms")
    print(f"loop / per-image engine: {vs_loop[0]:.2f}x (rounds {vs_loop[1]:.2f}-{vs_loop[2]:.2f})")
    print(f"per-image / shared selection: {vs_shared[0]:.2f}x "
          f"(rounds {vs_shared[1]:.2f}-{vs_shared[2]:.2f})")
    return {"loop_over_engine": vs_loop[0], "per_image_over_shared": vs_shared[0], "err": err}


if __name__ == "__main__":
    main()
