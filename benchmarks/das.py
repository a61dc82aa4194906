"""Distributed alignment search on the zoo models: training speed, and the IIA / divergence
trade-off of the counterfactual latent (CL) loss.

    python benchmarks/das.py                  # speed: DAS at one layer of clutter-digits-vit
    python benchmarks/das.py --experiment     # the trade-off sweep; writes docs/das.md's table

Speed (one process, figures measured in this run): the time `train_intervention` takes to
converge (early stopping on held-out IIA; this includes computing the reused activations), its
steps and held-out IIA, and the same time in units of one plain forward pass over the training
pairs' base images, timed in the same process (a ratio that does not depend on the machine's
speed as much as seconds do). The machine's load average is printed beside them.

Experiment: for each model and causal variable (clutter-digits-vit: the digit's identity;
clutter-digits-shortcut-vit: the marker's colour), train `RotatedSubspace` at ``resid_pre`` of
the given layers and token groups for each ``cl_weight``, and measure on held-out pairs the IIA,
the CL loss, and the divergence of the patched vectors (`patchlens.diagnostics.diagnose`:
Sinkhorn ratio to the natural baseline, outlier rate, downstream neurons beyond their natural
range, verdict). The table replaces the block between the ``das-table`` markers of docs/das.md;
the figure goes to docs/assets/das_tradeoff.html.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import time
from pathlib import Path

import torch

import patchlens as pl
from patchlens import Rect, Site, das
from patchlens.das.experiment import das_sweep
from patchlens.diagnostics import Reference
from patchlens.zoo.clutter_digits import generate

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "das.md"
FIGURE = ROOT / "docs" / "assets" / "das_tradeoff.html"


def load() -> str:
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


def speed(args) -> None:
    model = pl.HookedViT.from_pretrained("clutter-digits-vit")
    t0 = time.perf_counter()
    train = das.digit_pairs(model, args.train, split="train", seed=0)
    test = das.digit_pairs(model, args.test, split="test", seed=1)
    prep = time.perf_counter() - t0
    site = Site("resid_pre", layers=args.layer, tokens=args.tokens)
    # one plain forward pass over the training base images: the unit of the ratio below
    with torch.inference_mode():
        model(train.base[:8])
        t0 = time.perf_counter()
        for i in range(0, len(train), 64):
            model(train.base[i : i + 64])
        forward = time.perf_counter() - t0
    # a first optimizer step imports torch._dynamo (seconds, once per process): not DAS's cost
    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.zeros(1)
    torch.optim.Adam([p]).step()
    iv = das.RotatedSubspace(args.k)
    t0 = time.perf_counter()
    res = das.train_intervention(model, site, iv, train, steps=args.steps, batch_size=args.batch,
                                 lr=args.lr, eval_every=args.eval_every, patience=args.patience,
                                 progress=False)
    seconds = time.perf_counter() - t0
    iia = das.interchange_accuracy(model, site, iv, test)
    print(f"threads {torch.get_num_threads()}, {load()} (shared machine)")
    print(f"pairs: {len(train)} training (of which {res.n_held_out} held out for early stopping), "
          f"{len(test)} test; made in {prep:.1f} s")
    print(f"DAS {iv!r} at {site!r}: {seconds:.1f} s to converge ({res.steps} steps of "
          f"{args.batch}, stopped: {res.stopped}); validation IIA {res.iia:.3f}, test IIA {iia:.3f}")
    print(f"plain forward over the {len(train)} training base images: {forward:.2f} s; training "
          f"= {seconds / forward:.1f} forward passes over them")


def experiment(args) -> None:
    kw = dict(steps=args.steps, batch_size=args.batch, lr=args.lr, eval_every=args.eval_every,
              patience=args.patience)
    layers = [int(v) for v in args.layers.split(",")]
    weights = [float(v) for v in args.cl_weights.split(",")]
    setups = [("clutter-digits-vit", das.digit_pairs, None, {"cls": "cls", "patches": "patches"}),
              ("clutter-digits-shortcut-vit", das.marker_pairs, "train",
               {"cls": "cls", "marker patch": Rect(0, 1, 0, 1)})]
    if args.models:
        keep = args.models.split(",")
        setups = [st for st in setups if st[0] in keep]
    if args.token_groups:
        keep = args.token_groups.split(",")
        setups = [(*st[:3], {k: v for k, v in st[3].items() if k in keep}) for st in setups]
    if not setups or not all(st[3] for st in setups):
        raise SystemExit("--models / --token-groups select nothing")
    tables, sweeps = [], []
    t_all = time.perf_counter()
    for name, make_pairs, shortcut, tokens in setups:
        model = pl.HookedViT.from_pretrained(name)
        train = make_pairs(model, args.train, split="train", seed=0)
        test = make_pairs(model, args.test, split="test", seed=1)
        natural = model.preprocess(generate(args.natural, split="train", seed=7,
                                            shortcut=shortcut).images)
        ref = Reference.fit(model, natural, sites=[("resid_pre", layers)], progress=False)
        t0 = time.perf_counter()
        sweep = das_sweep(model, train, test, layers=layers, tokens=tokens, cl_weights=weights,
                          intervention=lambda: das.RotatedSubspace(args.k), reference=ref,
                          diagnose_kw={"behaviour": False}, progress=True, **kw)
        print(f"{name}: {len(sweep.rows)} runs in {time.perf_counter() - t0:.0f} s")
        print(sweep.to_markdown())
        sweeps.append((name, train.variable, sweep))
        tables.append(f"**{name}**, variable *{train.variable}* ({len(train)} training pairs, "
                      f"{len(test)} held-out test pairs):\n\n{sweep.to_markdown()}")
    minutes = (time.perf_counter() - t_all) / 60
    cmd = " ".join(["python benchmarks/das.py --experiment", *args.argv])
    header = (f"Produced by `{cmd}` on {datetime.date.today()}: {minutes:.0f} min, "
              f"{torch.get_num_threads()} threads, {load()} (a shared machine). "
              f"`RotatedSubspace({args.k})` at `resid_pre`; up to {args.steps} steps of "
              f"{args.batch} pairs, lr {args.lr}, early stopping on a held-out fifth of the "
              f"training pairs (patience {args.patience} evaluations, every {args.eval_every} "
              "steps); IIA and CL loss on the test pairs; divergence from `diagnose` on the test "
              f"pairs (reference: {args.natural} natural training images; `behaviour=False`: "
              "no null-space fractions).")
    block = header + "\n\n" + "\n\n".join(tables)
    text = DOC.read_text()
    new, n = re.subn(r"(<!-- das-table:start -->\n).*?(\n<!-- das-table:end -->)",
                     lambda m: m.group(1) + block + m.group(2), text, flags=re.S)
    if n != 1:
        raise SystemExit(f"{DOC} has no das-table markers")
    DOC.write_text(new)
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    figs = [s.plot(title=f"{name} ({var}): held-out IIA vs divergence") for name, var, s in sweeps]
    html = "\n".join(f.to_html(full_html=False, include_plotlyjs="cdn" if i == 0 else False)
                     for i, f in enumerate(figs))
    FIGURE.write_text(f"<html><head><meta charset='utf-8'></head><body>{html}</body></html>")
    print(f"wrote {DOC} and {FIGURE}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--experiment", action="store_true")
    ap.add_argument("--layer", type=int, default=5, help="speed: the layer (resid_pre)")
    ap.add_argument("--tokens", default="cls", help="speed: the token group")
    ap.add_argument("--layers", default="1,3,5", help="experiment: layers")
    ap.add_argument("--cl-weights", default="0,1,10", help="experiment: CL weights")
    ap.add_argument("--models", default="", help="experiment: comma-separated zoo models "
                    "(default: clutter-digits-vit and clutter-digits-shortcut-vit)")
    ap.add_argument("--token-groups", default="", help="experiment: token groups to keep "
                    "(cls, patches, 'marker patch'; default: all)")
    ap.add_argument("--k", type=int, default=8, help="subspace dimension")
    ap.add_argument("--train", type=int, default=512, help="training pairs")
    ap.add_argument("--test", type=int, default=128, help="test pairs")
    ap.add_argument("--natural", type=int, default=500, help="experiment: reference images")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--patience", type=int, default=4)
    args = ap.parse_args(argv)
    args.argv = [a for a in (argv if argv is not None else __import__("sys").argv[1:])
                 if a != "--experiment"]
    experiment(args) if args.experiment else speed(args)


if __name__ == "__main__":
    main()
