"""CAAP map of one 224px image for vit_small_patch16_224 (random init, 196 patches), layers 4..12.

    python benchmarks/caap.py [--device cuda] [--model vit_small_patch16_224] [--repeats 3]

Measured in one run, on the same HookedViT:
- caap: `patchlens.caap` (196 engine variants, batched, each starting at layer 4);
- floor: the forward cost of layers 4..12 for 196 rows (``model(resid, start_at_layer=4)``
  on the residual stream entering layer 4, repeated 196 times): what any exact method must pay;
- naive: one `run_with_hooks` per patch on the context image, writing the image's resid_pre
  of that patch at layers 4..11 (the loop a user writes by hand).
Targets: caap <= 1.15x floor; naive / caap >= 1.3 on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, sync  # noqa: E402

import patchlens as pl  # noqa: E402
from patchlens.model.preprocess import blur  # noqa: E402


def naive(model, x, ctx, target: int, start: int, end: int) -> torch.Tensor:
    """The per-patch loop: one run_with_hooks per patch token."""
    names = [f"blocks.{l}.hook_resid_pre" for l in range(start, end)]
    _, src = model.run_with_cache(x, names_filter=names)
    base = model(ctx)[0, target]
    out = []
    for tok in model.layout.patches:
        def put(act, hook, tok=tok):
            act[:, tok] = src[hook.name][:, tok]
            return act

        out.append(model.run_with_hooks(ctx, fwd_hooks=[(n, put) for n in names])[0, target])
    return torch.stack(out) - base


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--start", type=int, default=4)
    ap.add_argument("--end", type=int, default=12)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = pl.HookedViT.from_timm(timm.create_model(args.model, pretrained=False).eval())
    model = model.to(args.device)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(args.device)
    s, e = args.start, args.end
    n_patch = model.layout.n_patches
    with torch.inference_mode():
        target = int(model(x).argmax())
        ctx = blur(model.cfg, x)
        resid = model(ctx, stop_at_layer=s).repeat(n_patch, 1, 1)

    def run_caap():
        return pl.caap(model, x, target=target, layers=(s, e), progress=False)

    def run_floor():
        with torch.inference_mode():
            return model(resid, start_at_layer=s)

    def run_naive():
        with torch.inference_mode():
            return naive(model, x, ctx, target, s, e)

    run_floor()
    amap = run_caap()  # warm-up, and the exactness check below
    times: dict[str, list[float]] = {"caap": [], "floor": [], "naive": []}
    ref = None
    for i in range(args.repeats):
        for name, fn in (("caap", run_caap), ("floor", run_floor), ("naive", run_naive)):
            if name == "naive" and i > 0 and args.repeats > 2:
                continue  # the naive loop is slow; one timing of it is enough beside the medians
            sync(args.device)
            t0 = time.perf_counter()
            out = fn()
            sync(args.device)
            times[name].append(time.perf_counter() - t0)
            if name == "naive":
                ref = out
    med = {k: statistics.median(v) for k, v in times.items()}
    err = (amap.values.flatten().to(ref.device) - ref.float()).abs().max().item()
    res = {"caap_s": med["caap"], "floor_s": med["floor"], "naive_s": med["naive"],
           "caap_over_floor": med["caap"] / med["floor"],
           "naive_over_caap": med["naive"] / med["caap"], "max_abs_diff": err}
    print(f"CAAP {args.model}, {n_patch} patches, layers [{s}, {e}), {machine()}, "
          f"torch {torch.__version__}")
    print(f"  caap   {med['caap']:8.2f} s   (median of {len(times['caap'])})")
    print(f"  floor  {med['floor']:8.2f} s   layers {s}..{e - 1} for {n_patch} rows")
    print(f"  naive  {med['naive']:8.2f} s   one run_with_hooks per patch "
          f"({len(times['naive'])} run)")
    print(f"  caap / floor = {res['caap_over_floor']:.3f}   (target <= 1.15)")
    print(f"  naive / caap = {res['naive_over_caap']:.2f}   (target >= 1.3)")
    print(f"  max |caap - naive| = {err:.2e}")
    return res


if __name__ == "__main__":
    main()
