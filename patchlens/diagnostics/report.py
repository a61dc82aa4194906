"""`DivergenceReport`: how far each patched run's representations are from the natural ones.

`diagnose` re-runs the variants through the patching engine, capturing the patched activations at
their sites and the MLP neurons downstream (reduced to per-variant maxima on the fly, so memory
stays bounded), and compares them with a fitted `Reference`. Verdicts follow Grant, Han,
Tartaglini & Potts, "Divergent representations" (arXiv 2511.04638, ICLR 2026):

- ``natural``: the patched vectors look like natural ones and no downstream neuron leaves its
  natural range;
- ``divergent-harmless``: the patched vectors are off the natural distribution (most lie beyond
  the natural 99th percentile of the per-vector measures, or the Sinkhorn ratio is large), but
  no downstream neuron is driven beyond anything natural inputs do;
- ``divergent-pernicious``: some downstream MLP neuron exceeds its natural maximum (a dormant
  pathway turned on: the paper's pernicious signature), so the measured effect may come from a
  mechanism the model never uses naturally.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from patchlens.diagnostics.measures import MEASURES, ot_divergence
from patchlens.diagnostics.reference import Reference, class_of, vectors
from patchlens.errors import InputError

#: Verdict thresholds (see docs/divergence.md for how they were chosen).
THRESHOLDS: dict[str, float] = {
    # a patched vector is an outlier if its mahalanobis, knn or local_pca score is beyond
    # this percentile of held-out natural vectors (natural rate: 1-3 %)
    "outlier_pct": 99.0,
    # a site is divergent if more than this fraction of its patched vectors are outliers
    "outlier_rate": 0.5,
    # ... or if the Sinkhorn distance is this many times the natural-vs-natural baseline
    "ot_ratio": 1.5,
    # a neuron is dormant-activated above max + margin * (max - median) of its natural values
    "dormant_margin": 0.1,
}
VERDICTS = ("natural", "divergent-harmless", "divergent-pernicious")
_AFTER_MLP = ("mlp.hook_post", "hook_mlp_out", "hook_resid_post")


def first_downstream_mlp(hook: str, layer: int | None, n_layers: int) -> int:
    """First layer whose ``mlp.hook_post`` an intervention at ``hook`` can change."""
    if layer is None:
        return n_layers if hook.startswith(("hook_pooled", "hook_logits", "ln_final")) else 0
    return layer + 1 if hook.endswith(_AFTER_MLP) else layer


@dataclass
class DivergenceReport:
    """Divergence of every (variant, site) of a sweep from the natural distribution.

    Attributes:
        rows: one dict per (variant, site): measures, verdict (see `to_pandas`).
        ot: one dict per (site, token class): Sinkhorn distance of all patched vectors there,
            the natural-vs-natural baseline and their ratio.
        dormant: per variant, the neurons beyond their natural range
            (layer, neuron, value, natural max, token class), largest excess first.
        thresholds: the thresholds used for the verdicts.
        shape, axes, labels: the sweep's layout (for plots), if known.
    """

    rows: list[dict]
    ot: list[dict]
    dormant: list[list[dict]]
    thresholds: dict[str, float]
    shape: tuple[int, ...] | None = None
    axes: tuple[str, ...] | None = None
    labels: dict[str, list] | None = None
    effects: Tensor | None = None
    meta: dict = field(default_factory=dict)

    # ---- per variant -------------------------------------------------------------------------
    def variant_verdicts(self) -> list[str]:
        """Worst verdict over each variant's sites."""
        worst: dict[int, int] = defaultdict(int)
        for r in self.rows:
            worst[r["variant"]] = max(worst[r["variant"]], VERDICTS.index(r["verdict"]))
        return [VERDICTS[worst[i]] for i in range(len(self.dormant))]

    def variant_values(self, key: str) -> Tensor:
        """``[V]`` a row measure per variant (max over its sites), reshaped to the sweep."""
        vals = torch.full((len(self.dormant),), float("nan"))
        for r in self.rows:
            v = r[key]
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                cur = vals[r["variant"]]
                vals[r["variant"]] = v if torch.isnan(cur) else max(float(cur), float(v))
        return vals.reshape(self.shape) if self.shape else vals

    def pernicious_share(self) -> float:
        """Share of the summed |effect| that comes from pernicious variants (NaN: no effects)."""
        if self.effects is None:
            return float("nan")
        eff = self.effects.abs().flatten().float()
        total = float(eff.sum())
        if total == 0:
            return 0.0
        mask = torch.tensor([v == "divergent-pernicious" for v in self.variant_verdicts()])
        return float(eff[mask].sum()) / total

    # ---- views -------------------------------------------------------------------------------
    def to_pandas(self):
        """One row per (variant, site): ``label, hook, class, n, <measure>_pct, norm_ratio,
        outlier_rate, ot_ratio, null_fraction, n_dormant, effect, verdict``."""
        import pandas as pd

        return pd.DataFrame([{k: v for k, v in r.items()} for r in self.rows])

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(VERDICTS, 0)
        for v in self.variant_verdicts():
            out[v] += 1
        return out

    def summary(self) -> str:
        """One line: verdict counts, the largest Sinkhorn ratio and the pernicious share."""
        c = self.counts()
        parts = [f"{len(self.dormant)} variants: {c['natural']} natural, "
                 f"{c['divergent-harmless']} divergent-harmless, "
                 f"{c['divergent-pernicious']} divergent-pernicious"]
        share = self.pernicious_share()
        if not math.isnan(share):
            parts.append(f"{100 * share:.0f}% of |effect| from pernicious variants")
        ratios = [o["ratio"] for o in self.ot if not math.isnan(o["ratio"])]
        if ratios:
            parts.append(f"Sinkhorn/baseline up to {max(ratios):.2f}")
        return "; ".join(parts)

    def __repr__(self) -> str:
        t = self.thresholds
        return (f"DivergenceReport({self.summary()})\n  thresholds: outlier beyond the natural "
                f"{t['outlier_pct']:g}th percentile; divergent if outlier rate > "
                f"{t['outlier_rate']:g} or Sinkhorn ratio > {t['ot_ratio']:g}; pernicious if a "
                f"downstream neuron exceeds its natural max by > {t['dormant_margin']:g} x "
                "(max - median)")

    def plot(self, measure: str = "outlier_rate"):
        """Plotly figure: the effect, ``measure`` and the dormant-neuron count side by side
        (per layer x token for a layer x token sweep; per variant otherwise)."""
        import numpy as np
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        panels = [("effect", self.effects), (measure, self.variant_values(measure)),
                  ("dormant neurons", self.variant_values("n_dormant"))]
        fig = make_subplots(rows=1, cols=3, subplot_titles=[p[0] for p in panels],
                            horizontal_spacing=0.06)
        two_d = self.shape is not None and len(self.shape) == 2 and self.axes is not None
        for i, (name, vals) in enumerate(panels, start=1):
            if vals is None:
                continue
            z = vals.detach().float().cpu().numpy()
            if two_d:
                y = [str(v) for v in self.labels[self.axes[0]]]
                x = [str(v) for v in self.labels[self.axes[1]]]
                kw = dict(colorscale="RdBu", zmid=0) if name == "effect" else dict(
                    colorscale="Reds", zmin=0)
                fig.add_trace(go.Heatmap(z=z.reshape(self.shape), x=x, y=y, showscale=False, **kw),
                              1, i)
                fig.update_yaxes(autorange="reversed", row=1, col=i)
            else:
                labels = [str(r) for r in self.meta.get("labels", range(z.size))]
                fig.add_trace(go.Bar(x=labels, y=np.ravel(z), name=name), 1, i)
        fig.update_layout(title=f"Divergence: {self.summary()}", height=360, showlegend=False)
        return fig


# ---- building the report --------------------------------------------------------------------
def diagnose_sweep(model, target: Tensor, variants: Sequence, reference: Reference, result):
    """The hook `activation_patching(..., diagnose=reference)` calls: `diagnose` with the
    sweep's effects and layout taken from ``result`` (a `PatchResult`)."""
    effects = result.values if result is not None else None
    rep = diagnose(model, target, variants, reference, effects=effects)
    if result is not None:
        rep.shape, rep.axes, rep.labels = tuple(result.values.shape), result.axes, result.labels
    _warn(rep)
    return rep


def _warn(rep: DivergenceReport) -> None:
    share = rep.pernicious_share()
    if not math.isnan(share) and share > 0.5:
        warnings.warn(f"{100 * share:.0f}% of the patching effect comes from divergent-pernicious "
                      "variants (downstream neurons beyond their natural range); see "
                      "result.divergence.", stacklevel=3)


def diagnose(model, target: Tensor, variants: Sequence, reference: Reference, *,
             effects: Tensor | None = None, behaviour: bool = True, ot: bool = True,
             ot_samples: int = 1000, memory_budget: str | int = "1GB",
             thresholds: dict[str, float] | None = None, warn: bool = False) -> DivergenceReport:
    """Measure how divergent each variant's patched activations are.

    Args:
        target: the batch the variants patch ``[B, C, H, W]``.
        variants: `Variant` list (as given to `run_variants`).
        reference: a `Reference` fitted on this model at every hook the variants patch.
        effects: ``[V]`` (or the sweep's shape) effect per variant, for the warning and plot.
        behaviour: compute the null-space fraction (one backward pass per class per site hook).
        ot: Sinkhorn ratio per (site, token class) over all patched vectors there, and per
            (variant, site) where it has at least 50 vectors; ``ot_samples`` caps the natural set.
        memory_budget: activation memory per re-run chunk.
    """
    from patchlens.diagnostics.behaviour import null_fraction, site_jacobian
    from patchlens.patching.engine import run_variants, start_layer, suggested_batch_rows

    th = {**THRESHOLDS, **(thresholds or {})}
    reference.check_model(model)
    model.check_images(target)
    if len(variants) == 0:
        raise InputError("No variants to diagnose.")
    b = target.shape[0]
    n_layers = model.cfg.n_layers
    grid = (target.shape[-2] // model.cfg.patch_size[0], target.shape[-1] // model.cfg.patch_size[1])
    n_prefix = model.layout_for(tuple(target.shape[-2:])).n_prefix
    resolved = [[rs for site, _ in v.pairs for rs in site.resolve(model, grid)] for v in variants]
    hooks = sorted({rs.hook for rss in resolved for rs in rss})
    for h in hooks:
        reference.check_hook(h)
        if h.endswith(("hook_pattern", "hook_attn_scores")):
            vectors(torch.zeros(1, 1, 1), h)  # raises the explanation
    starts = [min((start_layer(model, rs) for rs in rss), default=n_layers) for rss in resolved]
    down = [min((first_downstream_mlp(rs.hook, rs.layer, n_layers) for rs in rss),
                default=n_layers) for rss in resolved]

    with torch.inference_mode():
        _, cache = model.run_with_cache(target, names_filter=hooks, return_type=None)
        natural = {h: vectors(cache[h], h).float() for h in hooks}
    del cache
    jac = {h: site_jacobian(model, target, h).float() for h in hooks} if behaviour else {}

    mlp_layers = [l for l in range(n_layers) if l in reference.neurons
                  and f"blocks.{l}.mlp.hook_post" in model.hook_dict]
    v_total = len(variants)
    neuron_max: dict[int, dict[str, Tensor]] = {}
    pools: dict[tuple[str, str], list[Tensor]] = defaultdict(list)
    rows: list[dict] = []
    row_slices: list[tuple[int, tuple[str, str], int, int]] = []
    pool_sizes: dict[tuple[str, str], int] = defaultdict(int)

    rows_per_pass = max(b, suggested_batch_rows(model, model.layout.n_tokens, memory_budget))
    per_chunk = max(1, rows_per_pass // b)
    order = sorted(range(v_total), key=lambda i: starts[i])
    chunks: list[list[int]] = []
    for i in order:
        if chunks and starts[chunks[-1][0]] == starts[i] and len(chunks[-1]) < per_chunk:
            chunks[-1].append(i)
        else:
            chunks.append([i])

    for chunk in chunks:
        idx = torch.tensor(chunk)

        def reduce(act, hook, _idx=idx):
            if act.shape[0] != len(_idx) * b:  # the engine's source / prefix runs
                return
            # the patched run comes last, so its maxima overwrite those of earlier runs
            layer = int(hook.name.split(".")[1])
            a = act.detach().float().reshape(len(_idx), b, act.shape[1], act.shape[-1])
            for c, toks in (("prefix", slice(0, n_prefix)), ("patches", slice(n_prefix, None))):
                if c not in reference.neurons[layer] or a[:, :, toks].shape[2] == 0:
                    continue
                mx = a[:, :, toks].amax((1, 2)).cpu()
                store = neuron_max.setdefault(layer, {}).setdefault(
                    c, torch.full((v_total, a.shape[-1]), -float("inf")))
                store[_idx] = mx

        chunk_hooks = sorted({rs.hook for i in chunk for rs in resolved[i]})
        reducers = [(f"blocks.{l}.mlp.hook_post", reduce) for l in mlp_layers]
        with torch.inference_mode(), model.hooks(fwd_hooks=reducers):
            er = run_variants(model, target, [variants[i] for i in chunk], capture=chunk_hooks,
                              batch_size=len(chunk) * b, progress=False, return_type="pooled")
        for j, vi in enumerate(chunk):
            for si, rs in enumerate(resolved[vi]):
                vec = vectors(er.captured[rs.hook][j], rs.hook).float()   # [B, T, D]
                nat = natural[rs.hook]
                toks = (torch.arange(vec.shape[1]) if rs.tokens is None or vec.shape[1] == 1
                        else rs.tokens)
                delta = (vec[:, toks] - nat[:, toks]).reshape(b, -1)
                nullf = float("nan")
                if behaviour:
                    J = jac[rs.hook][:, :, toks].reshape(b, jac[rs.hook].shape[1], -1)
                    energy = (delta**2).sum(1)
                    if float(energy.sum()) > 0:
                        f = null_fraction(delta, J).nan_to_num(0.0)
                        nullf = float((f * energy).sum() / energy.sum())
                by_class: dict[str, list[int]] = defaultdict(list)
                for t in toks.tolist():
                    by_class["all" if vec.shape[1] == 1 and "all" in reference.samples[rs.hook]
                             else class_of(t, n_prefix)].append(t)
                for c, ts in by_class.items():
                    pv = vec[:, ts].reshape(-1, vec.shape[-1])
                    key = (rs.hook, c)
                    start = pool_sizes[key]
                    pools[key].append(pv)
                    pool_sizes[key] += pv.shape[0]
                    row_slices.append((len(rows), key, start, pool_sizes[key]))
                    rows.append({"variant": vi, "label": variants[vi].label, "site": si,
                                 "hook": rs.hook, "class": c, "n": pv.shape[0],
                                 "null_fraction": nullf,
                                 "shift": float(delta.norm(dim=1).mean())})
        del er

    # per-vector measures, scored per (hook, class) in one batch
    pct_by_key: dict[tuple[str, str], dict[str, Tensor]] = {}
    norm_by_key: dict[tuple[str, str], Tensor] = {}
    for key, parts in pools.items():
        reference.natural(*key)
        scorer = reference.scorer(*key)
        allv = torch.cat(parts)
        scores = scorer.scores(allv)
        pct_by_key[key] = scorer.percentiles(scores)
        norm_by_key[key] = scores["norm_ratio"]
    ot_rows = []
    if ot:
        for key, parts in pools.items():
            nat = reference.natural(*key)
            try:
                r = ot_divergence(torch.cat(parts), nat, max_samples=ot_samples,
                                  stats=reference.stats[key[0]][key[1]])
                ot_rows.append({"hook": key[0], "class": key[1], "distance": r.distance,
                                "baseline": r.baseline, "ratio": r.ratio, "n": r.n_patched})
            except InputError as e:
                ot_rows.append({"hook": key[0], "class": key[1], "distance": float("nan"),
                                "baseline": float("nan"), "ratio": float("nan"), "n": 0,
                                "note": str(e)})

    # dormant pathways per variant
    dormant: list[list[dict]] = [[] for _ in range(v_total)]
    for layer, d in neuron_max.items():
        for c, mx in d.items():
            ref = reference.neurons[layer][c]
            nmax, nmed = ref["max"], ref["median"]
            spread = (nmax - nmed).clamp_min(0)
            bound = nmax + th["dormant_margin"] * spread + 1e-6
            over = mx > bound
            for vi, unit in torch.nonzero(over).tolist():
                if layer < down[vi]:
                    continue
                excess = float((mx[vi, unit] - nmax[unit]) / spread[unit].clamp_min(1e-6))
                dormant[vi].append({"layer": layer, "neuron": unit, "class": c,
                                    "value": float(mx[vi, unit]),
                                    "natural_max": float(nmax[unit]),
                                    "natural_median": float(nmed[unit]), "excess": excess})
    for lst in dormant:
        lst.sort(key=lambda e: -e["excess"])

    eff = None
    if effects is not None:
        eff = torch.as_tensor(effects).detach().float().cpu()
        if eff.numel() != v_total:
            raise InputError(f"effects has {eff.numel()} values for {v_total} variants.")
    flat_eff = None if eff is None else eff.flatten()
    for ri, key, s, e in row_slices:
        r = rows[ri]
        pct = {m: v[s:e] for m, v in pct_by_key[key].items()}
        beyond = torch.stack([pct[m] for m in ("mahalanobis", "knn", "local_pca")]).amax(0)
        for m in MEASURES:
            r[f"{m}_pct"] = float(pct[m].mean())
        r["norm_ratio"] = float(norm_by_key[key][s:e].mean())
        r["outlier_rate"] = float((beyond >= th["outlier_pct"]).float().mean())
        r["ot_ratio"] = float("nan")
        if ot and r["n"] >= 50:
            nat = reference.natural(*key)
            vec = torch.cat(pools[key])[s:e]
            r["ot_ratio"] = ot_divergence(vec, nat, max_samples=ot_samples,
                                          stats=reference.stats[key[0]][key[1]]).ratio
        r["n_dormant"] = len(dormant[r["variant"]])
        r["effect"] = float("nan") if flat_eff is None else float(flat_eff[r["variant"]])
        divergent = r["outlier_rate"] > th["outlier_rate"] or (
            not math.isnan(r["ot_ratio"]) and r["ot_ratio"] > th["ot_ratio"])
        r["verdict"] = ("divergent-pernicious" if r["n_dormant"] else
                        "divergent-harmless" if divergent else "natural")
    rep = DivergenceReport(rows, ot_rows, dormant, th, effects=eff,
                           meta={"labels": [v.label for v in variants], "n_images": b})
    if eff is not None and eff.ndim > 1:
        rep.shape = tuple(eff.shape)
    if warn:
        _warn(rep)
    return rep





def assess(patched, natural, *, downstream=None, thresholds: dict[str, float] | None = None,
           readout=None, delta=None) -> dict[str, Any]:
    """The same verdict on plain tensors: ``patched [M, D]`` vs ``natural [N, D]``.

    Args:
        downstream: ``f(x [n, D]) -> [n, U]`` the computation that follows (e.g. a ReLU layer);
            its units on ``patched`` are compared with their range on ``natural``.
        readout: ``W [C, D]``, a linear readout for the behavioural split of ``delta``
            (``patched - natural`` row by row if not given and the shapes match).
    """
    from patchlens.diagnostics.behaviour import readout_null_fraction
    from patchlens.diagnostics.measures import NaturalScorer, dormant_units

    th = {**THRESHOLDS, **(thresholds or {})}
    p, q = torch.as_tensor(patched, dtype=torch.float32), torch.as_tensor(natural, dtype=torch.float32)
    scorer = NaturalScorer(q)
    pct = scorer.percentiles(scorer.scores(p))
    beyond = torch.stack([pct[m] for m in ("mahalanobis", "knn", "local_pca")]).amax(0)
    out: dict[str, Any] = {f"{m}_pct": float(v.mean()) for m, v in pct.items()}
    out["outlier_rate"] = float((beyond >= th["outlier_pct"]).float().mean())
    r = ot_divergence(p, q)
    out.update(ot_distance=r.distance, ot_baseline=r.baseline, ot_ratio=r.ratio)
    out["dormant"] = []
    if downstream is not None:
        nat_u, pat_u = downstream(q), downstream(p)
        med = nat_u.median(0).values
        mask = dormant_units(pat_u, nat_u.amax(0), med, th["dormant_margin"])
        out["dormant"] = torch.nonzero(mask).flatten().tolist()
    if readout is not None:
        d = delta if delta is not None else p - q[: p.shape[0]]
        out["null_fraction"] = float(readout_null_fraction(d, readout).nanmean())
    divergent = out["outlier_rate"] > th["outlier_rate"] or r.ratio > th["ot_ratio"]
    out["verdict"] = ("divergent-pernicious" if out["dormant"] else
                      "divergent-harmless" if divergent else "natural")
    return out
__all__ = ["THRESHOLDS", "VERDICTS", "DivergenceReport", "assess", "diagnose", "diagnose_sweep"]
