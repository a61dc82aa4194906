"""Attribution benchmark on clutter-digits: every method, localisation and faithfulness, and
the shortcut model's marker; plus the CAAP ablation (layer windows x contexts x sites).

    python benchmarks/attribution.py                 # main table (~10 min on 2 CPU cores)
    python benchmarks/attribution.py --ablation      # CAAP ablation
    python benchmarks/attribution.py --write-docs    # also rewrite the tables in docs/benchmarks.md

Plain model (``clutter-digits-vit``), ``n_plain`` test images (shortcut off): pointing game and
energy pointing game on the digit's pixel mask, deletion and insertion AUC (patch-wise, ``step``
patches per step). Shortcut model (``clutter-digits-shortcut-vit``), ``n_shortcut`` images with
the marker present and true (``on``) and present and conflicting (``conflict``): the energy
share inside the MARKER box (does the map find the marker the model actually uses?). Every map
explains the model's predicted class. Mean and 95% interval (mean +- 1.96 sd / sqrt(n)) per
method and metric, and seconds per image.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from pathlib import Path

import torch

from patchlens import HookedViT
from patchlens.attribution import METHODS
from patchlens.attribution import metrics as am
from patchlens.recipes.caap import caap
from patchlens.zoo.clutter_digits import generate

SEED = 4321
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
#: per-method settings for the benchmark (cheap enough for 2 CPU cores)
SETTINGS = {"rise": dict(n_masks=500), "integrated_gradients": dict(n_steps=16)}


def _ci(v: torch.Tensor) -> tuple[float, float]:
    v = v.double()
    half = 1.96 * v.std().item() / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return v.mean().item(), half


def _load(name: str) -> HookedViT:
    return HookedViT.from_pretrained(name).eval()


def run(n_plain: int = 32, n_shortcut: int = 24, methods=None, step: int = 2,
        progress: bool = True) -> dict:
    """Every method on the fixed subsets. Returns ``{"plain": {method: {metric: values}},
    "shortcut": ..., "seconds": {method: s/image}, "config": ...}``."""
    torch.manual_seed(0)
    methods = list(methods or METHODS)
    plain, short = _load("clutter-digits-vit"), _load("clutter-digits-shortcut-vit")
    dp = generate(n_plain, split="test", seed=SEED)
    xp = plain.preprocess(dp.images)
    out: dict = {"plain": {}, "shortcut": {}, "seconds": {}, "accuracy": {},
                 "config": dict(n_plain=n_plain, n_shortcut=n_shortcut, step=step, seed=SEED,
                                settings=SETTINGS)}
    with torch.inference_mode():
        out["accuracy"]["plain"] = (plain(xp).argmax(-1) == dp.labels).float().mean().item()
    data = {}
    for mode in ("on", "conflict"):
        d = generate(n_shortcut, split="test", seed=SEED + 1, shortcut=mode)
        x = short.preprocess(d.images)
        with torch.inference_mode():
            pred = short(x).argmax(-1)
        out["accuracy"][f"shortcut_{mode}_digit"] = (pred == d.labels).float().mean().item()
        out["accuracy"][f"shortcut_{mode}_marker"] = (pred == d.marker_labels).float().mean().item()
        data[mode] = (d, x)
    for name in methods:
        fn, kw = METHODS[name], SETTINGS.get(name, {})
        t0 = time.perf_counter()
        amap = fn(plain, xp, **kw)
        secs = time.perf_counter() - t0
        res = {
            "pointing": am.pointing_game(amap, dp.masks),
            "energy": am.energy_pointing_game(amap, dp.masks),
            "deletion": am.deletion(plain, xp, amap, step=step),
            "insertion": am.insertion(plain, xp, amap, step=step),
        }
        out["plain"][name] = res
        n_img = n_plain
        sres = {}
        for mode, (d, x) in data.items():
            t0 = time.perf_counter()
            smap = fn(short, x, **kw)
            secs += time.perf_counter() - t0
            n_img += len(d)
            sres[f"marker_energy_{mode}"] = am.energy_pointing_game(smap, d.marker_boxes,
                                                                    tuple(x.shape[-2:]))
            sres[f"digit_energy_{mode}"] = am.energy_pointing_game(smap, d.masks)
        out["shortcut"][name] = sres
        out["seconds"][name] = secs / n_img
        if progress:
            print(f"{name:22s} {secs / n_img:7.3f} s/image  "
                  + "  ".join(f"{k} {v.mean():.3f}" for k, v in {**res, **sres}.items()),
                  flush=True)
    return out


ABLATION_WINDOWS = [(0, 6), (1, 6), (2, 6), (3, 6), (4, 6), (1, 4), (2, 5), (0, 3)]
ABLATION_CONTEXTS = ["blur", "mean", "zeros", "noise", "mean_activation"]
ABLATION_SITES = ["resid_pre", "attn_out", "mlp_out"]


def ablation(n: int = 16, step: int = 4, windows=None, contexts=None, sites=None,
             progress: bool = True) -> list[dict]:
    """CAAP on the plain model: every window x context at ``resid_pre``, then every window x
    site at the ``blur`` context; insertion - deletion AUC and energy pointing game."""
    plain = _load("clutter-digits-vit")
    d = generate(n, split="test", seed=SEED + 2)
    x = plain.preprocess(d.images)
    ref = plain.preprocess(generate(64, split="train", seed=SEED + 3).images)
    windows = windows or ABLATION_WINDOWS
    configs = [(w, c, "resid_pre") for w in windows for c in (contexts or ABLATION_CONTEXTS)]
    configs += [(w, "blur", s) for w in windows for s in (sites or ABLATION_SITES)
                if s != "resid_pre"]
    rows = []
    for w, c, s in configs:
        t0 = time.perf_counter()
        amap = caap(plain, x, layers=w, context=c, site=s,
                    reference=ref if c == "mean_activation" else None, progress=False)
        secs = (time.perf_counter() - t0) / n
        ins = am.insertion(plain, x, amap, step=step)
        dele = am.deletion(plain, x, amap, step=step)
        row = dict(layers=w, context=c, site=s, ins_minus_del=ins - dele, insertion=ins,
                   deletion=dele, energy=am.energy_pointing_game(amap, d.masks),
                   pointing=am.pointing_game(amap, d.masks), seconds=secs)
        rows.append(row)
        if progress:
            print(f"{str(w):8s} {c:16s} {s:10s} ins-del {row['ins_minus_del'].mean():.3f} "
                  f"energy {row['energy'].mean():.3f} pointing {row['pointing'].mean():.3f}",
                  flush=True)
    return rows


# ---- markdown -----------------------------------------------------------------------------
def _fmt(v: torch.Tensor) -> str:
    m, h = _ci(v)
    return f"{m:.3f} ± {h:.3f}"


def table(out: dict) -> str:
    c = out["config"]
    acc = out["accuracy"]
    lines = [
        f"Plain model: {c['n_plain']} test images (seed {c['seed']}), accuracy "
        f"{acc['plain']:.2f}. Shortcut model: {c['n_shortcut']} images per condition (seed "
        f"{c['seed'] + 1}); its prediction agrees with the digit / the marker on "
        f"{acc['shortcut_on_digit']:.2f} / {acc['shortcut_on_marker']:.2f} (marker on) and "
        f"{acc['shortcut_conflict_digit']:.2f} / {acc['shortcut_conflict_marker']:.2f} "
        f"(conflict). Deletion / insertion with {c['step']} patches per step. Settings: "
        f"{c['settings']}, every other parameter at its default. Mean ± 95% interval.",
        "",
        "| method | pointing ↑ | energy (digit) ↑ | deletion AUC ↓ | insertion AUC ↑ | "
        "marker energy, on ↑ | marker energy, conflict ↑ | s / image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in out["plain"].items():
        s = out["shortcut"][name]
        lines.append(
            f"| {name} | {_fmt(r['pointing'])} | {_fmt(r['energy'])} | {_fmt(r['deletion'])} | "
            f"{_fmt(r['insertion'])} | {_fmt(s['marker_energy_on'])} | "
            f"{_fmt(s['marker_energy_conflict'])} | {out['seconds'][name]:.3f} |")
    return "\n".join(lines)


def ablation_table(rows: list[dict]) -> str:
    lines = ["| layers | context | site | insertion − deletion ↑ | insertion ↑ | deletion ↓ | "
             "energy ↑ | pointing ↑ | s / image |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["ins_minus_del"].mean().item()):
        lines.append(
            f"| {r['layers']} | {r['context']} | {r['site']} | {_fmt(r['ins_minus_del'])} | "
            f"{_fmt(r['insertion'])} | {_fmt(r['deletion'])} | {_fmt(r['energy'])} | "
            f"{_fmt(r['pointing'])} | {r['seconds']:.3f} |")
    return "\n".join(lines)


def write_docs(section: str, text: str, path: Path = DOCS) -> None:
    """Replace the text between ``<!-- {section}:start -->`` and ``<!-- {section}:end -->``."""
    doc = path.read_text()
    pat = re.compile(rf"(<!-- {section}:start -->\n).*?(\n<!-- {section}:end -->)", re.S)
    if not pat.search(doc):
        raise ValueError(f"{path} has no {section} markers")
    path.write_text(pat.sub(lambda m: m.group(1) + text + m.group(2), doc))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-plain", type=int, default=32)
    ap.add_argument("--n-shortcut", type=int, default=24)
    ap.add_argument("--step", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--ablation", action="store_true", help="run the CAAP ablation instead")
    ap.add_argument("--n-ablation", type=int, default=16)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    if args.ablation:
        rows = ablation(args.n_ablation)
        text = ablation_table(rows)
        section, result = "caap-ablation", {"rows": rows}
    else:
        result = run(args.n_plain, args.n_shortcut, args.methods, args.step)
        text = table(result)
        section = "attribution"
    total = time.perf_counter() - t0
    print(text)
    print(f"\ntotal {total:.0f} s")
    if args.write_docs:
        write_docs(section, text + f"\n\nTotal time: {total:.0f} s.")
    return result


if __name__ == "__main__":
    main()
