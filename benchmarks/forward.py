"""HookedViT forward cost against the source timm model, measured in one run.

    python benchmarks/forward.py [--device cuda] [--batch 8] [--model vit_small_patch16_224]
                                 [--threads N] [--repeats 9] [--keep-freed-memory]

``--model`` is any timm model `HookedViT.from_timm` converts (random init), e.g.
``vit_small_patch16_dinov3`` or ``eva02_tiny_patch14_224`` (timm ``Eva``: rotary attention);
images have the model's native size.

Prints the ratios (HookedViT no hooks / timm, run_with_cache of every hook / timm): the ratio of
the medians over interleaved rounds, and the median and range of the per-round ratios (each
round times all three back to back, so a per-round ratio is immune to slow drift of a shared
machine's speed) and the ratio of the fastest runs (the least disturbed by other jobs).
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, paired_ratio, time_interleaved  # noqa: E402

from patchlens import HookedViT, keep_freed_memory  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="call patchlens.keep_freed_memory() first (glibc keeps freed memory)")
    args = ap.parse_args(argv)
    if args.keep_freed_memory:
        print(f"patchlens.keep_freed_memory(): {keep_freed_memory()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    src = timm.create_model(args.model, pretrained=False).eval().to(args.device)
    model = HookedViT.from_timm(src)
    x = torch.randn(args.batch, 3, *model.cfg.image_size, device=args.device)
    samples: dict[str, list[float]] = {}
    with torch.inference_mode():
        times = time_interleaved({
            "timm": lambda: src(x),
            "hooked": lambda: model(x),
            "cache_all": lambda: model.run_with_cache(x),
        }, repeats=args.repeats, device=args.device, samples_out=samples)
    ratios = {"hooked/timm": times["hooked"] / times["timm"],
              "cache_all/timm": times["cache_all"] / times["timm"]}
    print(f"forward benchmark: {args.model}, batch {args.batch}, {machine()}")
    for k, v in times.items():
        print(f"  {k:10s} {v * 1000:8.1f} ms")
    for k, v in ratios.items():
        num, den = k.split("/")
        med, lo, hi = paired_ratio(samples, num, den)
        best = min(samples[num]) / min(samples[den])
        print(f"  {k:16s} {v:.3f}   (per round: median {med:.3f}, range {lo:.3f}-{hi:.3f}; "
              f"best of each: {best:.3f})")
    if args.device == "cpu":  # memory the OS had to hand back: what scatters the cached timings
        faults = []
        with torch.inference_mode():
            for _ in range(5):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                model.run_with_cache(x)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(f"  minor page faults per run_with_cache call (5 calls): {faults}")
    return ratios


if __name__ == "__main__":
    main()
