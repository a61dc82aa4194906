"""Circuit discovery: EAP, EAP-IG and exact edge scores against their references, in one run.

    python benchmarks/circuits.py [--device cuda] [--pairs 4] [--steps 5] [--edges 96]
                                  [--threads N] [--repeats 3] [--keep-freed-memory] [--skip-zoo]

Measured in one process:
- ViT-Small (timm vit_small_patch16_224, random init; 12 layers x 6 heads, split q/k/v inputs:
  9163 edges), ``--pairs`` clean/corrupted pairs of 224 px images:
  - reference: one forward pass of the clean + corrupted batch (the HookedViT, no hooks);
  - EAP over every edge and EAP-IG (inputs) with ``--steps`` steps, timed in interleaved rounds
    with the reference (median of the per-round ratios), and one run of EAP-IG (activations);
  - their compute floors, timed in the same rounds: the plain model's passes no edge
    attribution can avoid (EAP: a forward of the corrupted batch and a forward + backward of
    the clean batch; EAP-IG: a forward of both batches and one forward + backward of the k
    interpolated clean batches at once), without hooks;
  - exact edge patching of ``--edges`` edges spread over the graph against (a) the naive loop,
    one ``run_with_hooks`` per edge on the receiver's split input, and (b) the compute floor:
    the HookedViT's own per-image forward time at the engine's batch size times the fraction
    of the layers each edge must recompute (from its receiver's layer), summed over edges.
- Both zoo models (8 pairs: the shortcut model's marker on/off, the plain model's digit
  present/erased): exact scores of every edge, the rank correlation (Spearman) of EAP and
  EAP-IG with them, and the faithfulness of each method's top-10% circuit.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, paired_ratio, sync, time_interleaved  # noqa: E402

import patchlens as pl  # noqa: E402
from patchlens.circuits import Circuit, Graph, edge_scores, evaluate  # noqa: E402
from patchlens.circuits.attribute import exact_effects, sender_outputs  # noqa: E402
from patchlens.patching.engine import CPU_MAX_ROWS  # noqa: E402


def timed(fn, device, *args, **kwargs):
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return time.perf_counter() - t0, out


def vit_small(args):
    torch.manual_seed(0)
    src = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    model = pl.HookedViT.from_timm(src).to(args.device)
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(args.pairs, 3, 224, 224, generator=g).to(args.device)
    corrupted = torch.randn(args.pairs, 3, 224, 224, generator=g).to(args.device)
    graph = Graph.from_model(model)
    metric = pl.metrics.logit_diff(0, 1)
    both = torch.cat([clean, corrupted])

    def forward():
        with torch.inference_mode():
            model(both)

    def method(name, **kw):
        return lambda: edge_scores(model, clean, corrupted, metric, method=name, graph=graph,
                                   **kw)

    def grad_pass(x):
        z = x.detach().requires_grad_(True)
        torch.autograd.grad(metric(model(z)).sum(), z)

    def eap_floor():
        with torch.inference_mode():
            model(corrupted)
        grad_pass(clean)

    k = args.steps

    def ig_floor():
        with torch.inference_mode():
            model(both)
        grad_pass(clean.repeat(k, 1, 1, 1))

    fns = {"forward": forward, "eap": method("eap"), f"eap-ig k={k}": method("eap-ig", ig_steps=k),
           "eap floor": eap_floor, "eap-ig floor": ig_floor}
    samples: dict[str, list[float]] = {}
    med = time_interleaved(fns, repeats=args.repeats, warmup=1, device=args.device,
                           samples_out=samples)
    print(f"ViT-Small: {graph}")
    print(f"  {machine()}, {args.pairs} pairs; one forward of the clean + corrupted batch "
          f"({2 * args.pairs} images): median {med['forward']:.3f} s over {args.repeats} rounds")
    ratios = {}
    for key, target in (("eap", 3.0), (f"eap-ig k={k}", k + 2.0)):
        r, lo, hi = paired_ratio(samples, key, "forward")
        ratios[key] = r
        print(f"  {key:26s} median {med[key]:8.2f} s = {r:6.2f}x the forward (per-round ratios "
              f"{lo:.2f}-{hi:.2f}; target <= {target:g}x)")
    for key, floor in (("eap", "eap floor"), (f"eap-ig k={k}", "eap-ig floor")):
        r, lo, hi = paired_ratio(samples, key, floor)
        ratios[f"{key} / floor"] = r
        print(f"  {key:26s} / its compute floor {r:5.2f} (per-round {lo:.2f}-{hi:.2f}; the floor "
              f"is {paired_ratio(samples, floor, 'forward')[0]:.2f}x the forward)")
    t, _ = timed(method("eap-ig", ig_steps=k, ig="activations"), args.device)
    ratios[f"eap-ig (activations) k={k}"] = t / med["forward"]
    print(f"  {'eap-ig (activations) k=' + str(k):26s} one run {t:8.2f} s = "
          f"{t / med['forward']:6.2f}x the forward")

    # exact on a spread of edges: engine vs naive loop vs compute floor
    ids = torch.linspace(0, graph.n_edges - 1, args.edges).round().long().unique()
    def exact():
        delta = sender_outputs(model, graph, corrupted) - sender_outputs(model, graph, clean)
        return exact_effects(model, graph, clean, delta, metric, dict(progress=False), ids)

    t_exact, got = timed(exact, args.device)
    with torch.inference_mode():
        got = got - metric(model(clean))
    t_naive, ref = timed(lambda: naive_loop(model, graph, clean, corrupted, metric, ids),
                         args.device)
    rows = min(CPU_MAX_ROWS, len(ids) * args.pairs) if args.device == "cpu" else \
        len(ids) * args.pairs
    rows = max(args.pairs, rows // args.pairs * args.pairs)
    xb = clean[:1].repeat(rows, 1, 1, 1)
    with torch.inference_mode():
        model(xb)
        per_image = sorted(timed(lambda: model(xb), args.device)[0] for _ in range(3))[1] / rows
    n = model.cfg.n_layers
    layers = graph.edge_layers()[ids].clamp(max=n - 1)
    floor = per_image * args.pairs * float(((n - layers) / n).sum())
    err = float((got - ref).abs().max())
    ratios["naive/exact"] = t_naive / t_exact
    ratios["exact/floor"] = t_exact / floor
    print(f"  exact, {len(ids)} edges: engine {t_exact:.2f} s, naive loop {t_naive:.2f} s, "
          f"floor {floor:.2f} s (engine rows {rows})")
    print(f"    naive/exact {ratios['naive/exact']:.2f}x faster (target >= 3)   "
          f"exact/floor {ratios['exact/floor']:.3f} (target <= 1.2)   max |engine - naive| "
          f"{err:.1e}")
    return ratios


def naive_loop(model, graph, clean, corrupted, metric, ids):
    """One run_with_hooks per edge: the receiver's split input plus the sender's output
    difference."""
    delta = sender_outputs(model, graph, corrupted) - sender_outputs(model, graph, clean)
    out = []
    with torch.inference_mode(), model.options(use_split_qkv_input=True, use_hook_mlp_in=True):
        base = metric(model(clean))
        for i in ids.tolist():
            e = graph.edges[i]
            s, r = graph.nodes[e.sender], graph.receivers[e.receiver]
            d = delta[s.component]

            def hook(act, hook, r=r, d=d):
                act = act.clone()
                if r.head is not None:
                    act[:, :, r.head] += d
                else:
                    act += d
                return act

            out.append(metric(model.run_with_hooks(clean, fwd_hooks=[(r.hook, hook)])) - base)
    return torch.stack(out)


def zoo(args):
    from patchlens.zoo.clutter_digits import erase_digits, generate

    print("zoo models (8 pairs, every edge):")
    for name in ("clutter-digits-shortcut-vit", "clutter-digits-vit"):
        model = pl.HookedViT.from_pretrained(name).to(args.device)
        if "shortcut" in name:
            on = generate(8, split="test", seed=7, shortcut="on")
            off = generate(8, split="test", seed=7, shortcut="off")
            clean, corr, labels, what = on.images, off.images, on.labels, "marker on vs off"
        else:
            d = generate(8, split="test", seed=3)
            clean, corr, labels, what = d.images, erase_digits(d), d.labels, "digit vs erased"
        clean, corr = model.preprocess(clean), model.preprocess(corr)
        metric = pl.metrics.logit(labels)
        graph = Graph.from_model(model)
        scores, times = {}, {}
        for method, kw in [("exact", {}), ("eap", {}), ("eap-ig", {"ig_steps": args.steps}),
                           ("eap-ig", {"ig_steps": args.steps, "ig": "activations"})]:
            t, sc = timed(edge_scores, args.device, model, clean, corr, metric, method=method,
                          graph=graph, progress=False, **kw)
            scores[sc.name], times[sc.name] = sc, t
        k = graph.n_edges // 10
        print(f"  {name} ({what}), {graph.n_edges} edges, top-{k} circuits:")
        for key, sc in scores.items():
            faith = evaluate(model, Circuit.top_k(sc, k), clean, corr, metric).faithfulness
            rho = sc.rank_correlation(scores["exact"])
            print(f"    {key:22s} {times[key]:7.2f} s   Spearman with exact {rho:.3f}   "
                  f"faithfulness of the top 10% {faith:.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--edges", type=int, default=96)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (forward, EAP, "
                    "EAP-IG)")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="call patchlens.keep_freed_memory() first (see docs/performance.md)")
    ap.add_argument("--skip-zoo", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        print(f"keep_freed_memory(): {pl.keep_freed_memory()}")
    ratios = vit_small(args)
    if not args.skip_zoo:
        zoo(args)
    return ratios


if __name__ == "__main__":
    main()
