"""Calibration of the divergence verdict on the zoo models (docs/divergence.md, "Calibration").

    python benchmarks/divergence_calibration.py [--models ...] [--refs 100 200 500 2000]
        [--seeds 0 1 2] [--batches 8] [--sites resid_pre resid_mid resid_post attn_out mlp_out]
        [--write-docs]

For each zoo model: references are fitted on ``--refs`` training images (one image set per
``--seeds`` value); held-out *test* images (other digit scans) in batches of 4 are the targets;
every case of `patchlens.diagnostics.calibration` (natural, known-divergent, probes) is run at
every site hook and token class, once per batch (the engine runs once, every reference judges
the same patched activations), plus the paper's toy ReLU case. Printed: the false-alarm rate
(natural cases not called natural), the detection rate (known-divergent cases called
divergent-*), the rate of insufficient-reference verdicts and the seed stability (share of case
instances whose verdict differs between reference seeds), per model and reference size, per
case and token class, per site; a plotly figure. ``--write-docs`` writes the tables between the
calibration markers of docs/divergence.md, the counts to
patchlens/diagnostics/zoo_calibration.csv and the figure to docs/assets/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import patchlens as pl
from patchlens.diagnostics import THRESHOLDS, Reference
from patchlens.diagnostics.calibration import (
    calibrate,
    case_pool,
    count_table,
    figure,
    margin_scan,
    markdown_tables,
    rejudge,
    toy_rows,
)
from patchlens.zoo.clutter_digits import generate

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("clutter-digits-vit", "clutter-digits-shortcut-vit")
SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def _sources(labels: torch.Tensor, pool_labels: torch.Tensor, same: bool, used: set) -> list[int]:
    """One distinct pool image per target: of the same digit class (or of another one)."""
    out = []
    for lab in labels.tolist():
        cand = (pool_labels == lab) if same else (pool_labels != lab)
        idx = next(int(i) for i in torch.nonzero(cand).flatten() if int(i) not in used)
        used.add(idx)
        out.append(idx)
    return out


def run(models=MODELS, refs=(100, 200, 500, 2000), seeds=(0, 1, 2), batches: int = 8,
        batch: int = 4, sites=SITES, layers=None, ot_batches: int = 0, max_samples: int = 5000,
        thresholds: dict | None = None, log=print) -> pd.DataFrame:
    """Every report row of every case, model, reference size and seed (one DataFrame), judged
    with a dormant margin of 0 (``excess`` per row: `rejudge` applies any other margin)."""
    thresholds = {**(thresholds or {}), "dormant_margin": 0.0}
    rows = []
    for name in models:
        model = pl.HookedViT.from_pretrained(name).eval()
        shortcut = "train" if "shortcut" in name else None  # its training distribution
        n_layers = model.cfg.n_layers
        layers = list(range(n_layers)) if layers is None else list(layers)
        hooks = [f"blocks.{l}.hook_{s}" for s in sites for l in layers]
        pool_data = generate(400, split="train", seed=999, shortcut=shortcut)
        pool = case_pool(model, model.preprocess(pool_data.images), pool_data.labels, hooks)
        test = generate(batches * batch, split="test", seed=5, shortcut=shortcut)
        src = generate(max(400, 4 * batches * batch), split="test", seed=6, shortcut=shortcut)
        x, sx = model.preprocess(test.images), model.preprocess(src.images)
        used: set = set()
        references, keys = [], []
        for n_ref in refs:
            for seed in seeds:
                t0 = time.perf_counter()
                d = generate(n_ref, split="train", seed=1000 + seed, shortcut=shortcut)
                references.append(Reference.fit(model, model.preprocess(d.images), list(sites),
                                                max_samples=max_samples, progress=False,
                                                seed=seed))
                keys.append((n_ref, seed))
                log(f"{name}: reference {n_ref} images, seed {seed}: "
                    f"{time.perf_counter() - t0:.0f} s")
        for bi in range(batches):
            t0 = time.perf_counter()
            sl = slice(bi * batch, (bi + 1) * batch)
            same = sx[_sources(test.labels[sl], src.labels, True, used)]
            other = sx[_sources(test.labels[sl], src.labels, False, used)]
            out = calibrate(model, references, x[sl], same, other, hooks, pool,
                            ot=bi < ot_batches, thresholds=thresholds, seed=bi)
            for r in out:
                n_ref, seed = keys[r.pop("reference")]
                rows.append({"model": name, "n_ref": n_ref, "seed": seed, "batch": bi, **r})
            log(f"{name}: batch {bi + 1}/{batches}: {time.perf_counter() - t0:.0f} s")
        for n_ref in refs:
            for seed in seeds:
                for r in toy_rows(max(n_ref, 50), seed=seed, thresholds=thresholds):
                    rows.append({"model": name, "n_ref": n_ref, "seed": seed, "batch": -1, **r})
    df = pd.DataFrame(rows)
    df["site"] = df["hook"].str.split(".").str[-1].str.removeprefix("hook_")
    return df


def sinkhorn_figures(name: str = MODELS[0], n_ref: int = 2000, hook: str = "blocks.3.hook_resid_pre",
                     n_held: int = 100, max_samples: int = 2000) -> str:
    """How the Sinkhorn ratio depends on its definitions (issue 22), on one site of a zoo
    model: held-out natural images (other images) with the baseline halves split by image or
    by vector, z-scored with the natural statistics or each set with its own (the paper's
    code), a steering shift and a x3 rescaling; geomloss ``scaling`` 0.5 (the paper's code, the
    default) against 0.7. A markdown table."""
    from patchlens.diagnostics import ot_divergence

    model = pl.HookedViT.from_pretrained(name).eval()
    x = model.preprocess(generate(n_ref, split="train", seed=1000).images)
    ref = Reference.fit(model, x, [hook], progress=False, scorers=False)
    held_x = model.preprocess(generate(n_held, split="test", seed=9).images)
    with torch.inference_mode():
        _, cache = model.run_with_cache(held_x, names_filter=[hook], return_type=None)
    held = cache[hook][:, model.layout.n_prefix:].reshape(-1, model.cfg.d_model)
    nat, groups = ref.natural(hook, "patches"), ref.images_of(hook, "patches")
    g = torch.Generator().manual_seed(0)
    v = torch.randn(model.cfg.d_model, generator=g)
    v = v / v.norm() * float(nat.norm(dim=1).median())          # a steering vector of typical norm
    sets = {"held-out natural images": held, "held-out + steering vector (typical norm)": held + v,
            "held-out x 3": held * 3}
    rows = ["| patched set | split by image, natural z | split by vector, natural z "
            "| split by image, own z (paper code) | scaling 0.7 / 0.5 |", "|---|---|---|---|---|"]
    for label, p in sets.items():
        kw = dict(max_samples=max_samples)
        a = ot_divergence(p, nat, groups=groups, **kw).ratio
        b = ot_divergence(p, nat, **kw).ratio
        c = ot_divergence(p, nat, groups=groups, zscore="self", **kw).ratio
        d = ot_divergence(p, nat, groups=groups, scaling=0.7, **kw).ratio
        rows.append(f"| {label} | {a:.2f} | {b:.2f} | {c:.2f} | {d / a:.4f} |")
    return (f"{name}, `{hook}`, patch tokens: reference of {n_ref} training images (natural set "
            f"capped at {max_samples}, halves of {max_samples // 2}), {n_held} held-out test "
            f"images ({held.shape[0]} vectors); Sinkhorn ratio = distance / natural-vs-natural "
            "baseline.\n\n" + "\n".join(rows) + "\n")


def _replace_block(text: str, marker: str, body: str) -> str:
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"docs/divergence.md has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    return head + f"{start}\n{body}{end}" + rest.split(end, 1)[1]


def _margin_table(scan: pd.DataFrame, margin: float) -> str:
    """The margin scan as markdown: pernicious share / seed flips of the detected cases."""
    margins = sorted(scan["margin"].unique())
    head = " | ".join(f"margin {m:g}" + (" (used)" if m == margin else "") for m in margins)
    lines = ["**Dormant margin** (known-divergent cases: % called pernicious / % whose verdict "
             "differs between reference seeds)", "", f"| model | reference images | {head} |",
             "|---|---|" + "---|" * len(margins)]
    for (model, n_ref), d in scan.groupby(["model", "reference images"], sort=False):
        cells = [f"{r['pernicious']:.1f}% / {r['seed flips']:.1f}%"
                 for _, r in d.sort_values("margin").iterrows()]
        lines.append(f"| {model} | {n_ref} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_docs(df: pd.DataFrame, scan: pd.DataFrame, margin: float, command: str,
               seconds: float) -> None:
    counts = count_table(df)
    csv = ROOT / "patchlens" / "diagnostics" / "zoo_calibration.csv"
    counts.to_csv(csv, index=False)
    assets = ROOT / "docs" / "assets"
    assets.mkdir(exist_ok=True)
    figure(counts).write_html(assets / "divergence_calibration.html", include_plotlyjs="cdn")
    doc = ROOT / "docs" / "divergence.md"
    text = _replace_block(doc.read_text(), "calibration",
                          f"_Written by `{command}` ({seconds / 60:.0f} min on a shared 2-core CPU "
                          f"machine)._\n\n{markdown_tables(counts)}\n"
                          f"{_margin_table(scan, margin)}")
    text = _replace_block(text, "sinkhorn", f"_Written by `{command}`._\n\n{sinkhorn_figures()}")
    doc.write_text(text)
    print(f"wrote {csv}, {assets / 'divergence_calibration.html'} and {doc}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--refs", type=int, nargs="+", default=[100, 200, 500, 2000])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--sites", nargs="+", default=list(SITES))
    ap.add_argument("--layers", type=int, nargs="+", default=None)
    ap.add_argument("--ot-batches", type=int, default=2,
                    help="batches whose rows also get their own Sinkhorn ratio")
    ap.add_argument("--save", default=None, help="pickle every row to this path")
    ap.add_argument("--margin", type=float, default=THRESHOLDS["dormant_margin"],
                    help="dormant margin of the verdicts (the scan covers 0, 1, 2, 3, 5)")
    ap.add_argument("--thresholds", default=None,
                    help='JSON overrides of THRESHOLDS, e.g. \'{"dormant_margin": 2}\'')
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    df = run(args.models, args.refs, args.seeds, args.batches, sites=args.sites,
             layers=args.layers, ot_batches=args.ot_batches,
             thresholds=json.loads(args.thresholds) if args.thresholds else None)
    seconds = time.perf_counter() - t0
    if args.save:
        df.to_pickle(args.save)
    scan = margin_scan(df)
    df = rejudge(df, args.margin)
    counts = count_table(df)
    pd.set_option("display.width", 200)
    print(markdown_tables(counts))
    print(_margin_table(scan, args.margin))
    ot = df[df["ot_ratio"].notna() & df["kind"].isin(["natural", "divergent"])]
    if len(ot):
        q = ot.groupby("kind")["ot_ratio"].quantile([0.01, 0.5, 0.99]).unstack()
        print("Sinkhorn ratio of rows with >= 50 vectors (quantiles 1% / 50% / 99%):")
        print(q.to_string(float_format=lambda v: f"{v:.2f}"))
    print(f"total {seconds / 60:.1f} min")
    if args.write_docs:
        given = list(argv if argv is not None else sys.argv[1:])
        if "--save" in given:  # where the rows were pickled is not part of the run
            i = given.index("--save")
            del given[i : i + 2]
        cmd = "python benchmarks/divergence_calibration.py " + " ".join(
            a for a in given if a != "--write-docs") + " --write-docs"
        write_docs(df, scan, args.margin, cmd.replace("  ", " "), seconds)
    return df


if __name__ == "__main__":
    main()
