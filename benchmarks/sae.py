"""Sparse autoencoders: the cost of a spliced forward, and a per-feature sweep vs a naive loop.

    python benchmarks/sae.py [--images 64] [--sweep-images 4] [--threads N]

Measured in one run, on the zoo model ``clutter-digits-vit`` and its zoo SAEs (512 features):

- splice: ``model(x)`` with the SAE spliced (error term on) against the plain forward plus
  the SAE's own encode and decode of the same vectors (``sae(acts)``, no hooks), timed
  round-robin; the issue's bound is ratio <= 1.2.
- sweep: `activation_patching(..., site="sae_acts_post", per="feature")` over all 512 features
  (clean features patched into the corrupted run, every token) against a naive loop of one
  ``run_with_hooks`` per feature, in interleaved rounds (``--rounds``; ratios per round, the
  median reported); the bound is naive / engine >= 3. Both results are compared (max abs
  difference). Also timed, in the same rounds, two floors (every variant's rows in the
  engine's 64-row chunks, spliced, no hooks): from the SAE's block (what layer-level prefix
  reuse must recompute) and from the SAE's input (the SAE, then the later blocks: what the
  engine recomputes for a variant that changes only the SAE's features,
  `patchlens.model.splice.run_after_splice`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, paired_ratio, time_interleaved  # noqa: E402

import patchlens as pl  # noqa: E402
from patchlens.model.splice import run_after_splice  # noqa: E402
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


def sweep(model, sae, clean, corrupted, rounds: int) -> dict[str, float]:
    metric = pl.metrics.logit_diff(0, 1)
    model.add_sae(sae, use_error_term=True)
    layer = int(sae.hook_name.split(".")[1])
    hook = f"{sae.hook_name}.hook_sae_acts_post"
    rows = max(1, 64 // clean.shape[0])  # variants per chunk of the engine's 64 rows
    got: dict[str, torch.Tensor] = {}
    try:
        with torch.inference_mode():
            base = model(clean, stop_at_layer=layer)
            _, cache = model.run_with_cache(clean, names_filter=[hook, sae.hook_name])
        src, sae_in = cache[hook], cache[sae.hook_name]

        def engine():
            got["engine"] = pl.activation_patching(model, clean, corrupted, metric,
                                                   per="feature", layers=layer,
                                                   progress=False).values[0]

        def floor_block():  # every variant from the SAE's block (layer-level prefix reuse)
            for i in range(0, sae.d_sae, rows):
                model(base.repeat(min(rows, sae.d_sae - i), 1, 1), start_at_layer=layer)

        def floor_resume():  # every variant from the SAE's input (the SAE, then later blocks)
            for i in range(0, sae.d_sae, rows):
                run_after_splice(model, sae.hook_name,
                                 sae_in.repeat(min(rows, sae.d_sae - i), 1, 1))

        def naive():
            out = torch.empty(sae.d_sae)
            for f in range(sae.d_sae):
                def put(a, hook, f=f):
                    a = a.clone()
                    a[..., f] = src[..., f]
                    return a

                out[f] = metric(model.run_with_hooks(corrupted, fwd_hooks=[(hook, put)])).mean()
            got["naive"] = out

        samples: dict[str, list[float]] = {}
        with torch.inference_mode():
            med = time_interleaved({"engine": engine, "naive": naive, "floor_block": floor_block,
                                    "floor_resume": floor_resume}, repeats=rounds, warmup=0,
                                   samples_out=samples)
    finally:
        model.reset_saes()
    speed = paired_ratio(samples, "naive", "engine")
    return {"engine_s": med["engine"], "naive_s": med["naive"], "speedup": speed[0],
            "speedup_min": speed[1], "speedup_max": speed[2],
            "floor_block_s": med["floor_block"], "floor_resume_s": med["floor_resume"],
            "naive_floor_block": paired_ratio(samples, "naive", "floor_block")[0],
            "naive_floor_resume": paired_ratio(samples, "naive", "floor_resume")[0],
            "engine_floor_resume": paired_ratio(samples, "engine", "floor_resume")[0],
            "max_abs_diff": float((got["engine"].float() - got["naive"]).abs().max())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=64, help="batch of the forward timing")
    ap.add_argument("--sweep-images", type=int, default=4, help="image pairs in the sweep")
    ap.add_argument("--repeats", type=int, default=9, help="rounds of the forward timing")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the sweep timing")
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
        w = sweep(model, sae, clean, corrupted, args.rounds)
        layer = int(sae.hook_name.split(".")[1])
        print(f"{name}: per-feature sweep, {sae.d_sae} features x {args.sweep_images} pairs, "
              f"median of {args.rounds} interleaved rounds: engine {w['engine_s']:.2f} s, naive "
              f"loop {w['naive_s']:.2f} s, naive / engine {w['speedup']:.1f}x (rounds "
              f"{w['speedup_min']:.1f}-{w['speedup_max']:.1f}; bound 3x); max |engine - naive| "
              f"{w['max_abs_diff']:.1e}. Floors (every variant's rows, no hooks): from block "
              f"{layer} {w['floor_block_s']:.2f} s (naive / floor {w['naive_floor_block']:.1f}x), "
              f"from the SAE's input {w['floor_resume_s']:.2f} s (naive / floor "
              f"{w['naive_floor_resume']:.1f}x; engine / floor {w['engine_floor_resume']:.2f})")
        out[name] = {**s, **w}
    return out


if __name__ == "__main__":
    main()
