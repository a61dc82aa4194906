"""The IIA / divergence trade-off of DAS (Grant, Han, Tartaglini & Potts, arXiv 2511.04638): train
an intervention at every (layer, token group) for each counterfactual-latent weight, and report
its interchange intervention accuracy on held-out pairs beside how far its patched vectors are
from the natural ones (`patchlens.diagnostics.diagnose`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from patchlens.das.pairs import CounterfactualPairs
from patchlens.das.training import _accuracy, _patched, prepare, train_intervention
from patchlens.diagnostics.training import counterfactual_latent_loss
from patchlens.errors import InputError
from patchlens.patching.engine import Variant
from patchlens.patching.sites import Site
from patchlens.patching.trainable import RotatedSubspace, TrainableIntervention

COLUMNS = ("layer", "tokens", "cl_weight", "iia", "sinkhorn_ratio", "outlier_rate", "n_dormant",
           "verdict", "cl_test", "steps", "seconds")


def divergence_figures(report) -> dict[str, Any]:
    """The few numbers of a one-variant `DivergenceReport` the trade-off table shows: the
    largest Sinkhorn ratio over the site's token classes, the mean outlier rate and null-space
    fraction, the number of downstream neurons beyond their natural range, the verdict."""
    nan = float("nan")
    ratios = [float(o["ratio"]) for o in getattr(report, "ot", [])
              if o.get("ratio") is not None and math.isfinite(float(o["ratio"]))]
    rows = getattr(report, "rows", [])

    def mean(key):
        vals = [float(r[key]) for r in rows if r.get(key) is not None
                and math.isfinite(float(r[key]))]
        return sum(vals) / len(vals) if vals else nan

    dormant = getattr(report, "dormant", None)
    verdicts = report.variant_verdicts() if hasattr(report, "variant_verdicts") else []
    return {"sinkhorn_ratio": max(ratios) if ratios else nan,
            "outlier_rate": mean("outlier_rate"), "null_fraction": mean("null_fraction"),
            "n_dormant": sum(len(d) for d in dormant) if dormant is not None else nan,
            "verdict": verdicts[0] if verdicts else ""}


def heldout_cl_loss(model, site: Site, iv: TrainableIntervention, pairs: CounterfactualPairs,
                    batch_size: int = 256, cache: dict | None = None) -> float:
    """The CL loss of the patched vectors against the counterfactual inputs' natural vectors,
    averaged over ``pairs`` (NaN without counterfactual inputs)."""
    if pairs.counterfactual is None:
        return float("nan")
    prep = prepare(model, site, pairs.base, pairs.source, pairs.labels, pairs.counterfactual,
                   batch_size, cache)
    total, n = 0.0, len(pairs)
    for i in range(0, n, batch_size):
        idx = torch.arange(i, min(n, i + batch_size))
        _, h = _patched(model, site, iv, prep, idx, grad=False, keep_site=True)
        total += float(counterfactual_latent_loss(h, prep.cf[idx])) * len(idx)
    return total / n


@dataclass
class DASSweep:
    """One row per (layer, token group, cl_weight): held-out IIA, divergence figures, training
    cost. ``interventions`` holds the trained interventions by (layer, tokens, cl_weight)."""

    rows: list[dict[str, Any]]
    interventions: dict[tuple, TrainableIntervention] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def to_markdown(self, columns: Sequence[str] = COLUMNS) -> str:
        """A Markdown table (for the docs)."""
        cols = [c for c in columns if any(c in r for r in self.rows)]

        def fmt(v):
            if isinstance(v, float):
                return "–" if math.isnan(v) else f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
            return str(v)

        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in self.rows]
        return "\n".join(lines)

    def plot(self, title: str = "DAS: interchange accuracy vs divergence"):
        """Plotly figure: held-out IIA against the Sinkhorn ratio (1 = as natural), one panel
        per token group, one colour per ``cl_weight``; grey lines join the runs of one site."""
        import plotly.graph_objects as go
        from plotly.colors import qualitative
        from plotly.subplots import make_subplots

        groups = list(dict.fromkeys(r["tokens"] for r in self.rows))
        weights = list(dict.fromkeys(r["cl_weight"] for r in self.rows))
        fig = make_subplots(rows=1, cols=len(groups), subplot_titles=[f"tokens: {g}" for g in groups],
                            shared_yaxes=True)
        for gi, g in enumerate(groups, start=1):
            mine = [r for r in self.rows if r["tokens"] == g]
            for layer in dict.fromkeys(r["layer"] for r in mine):
                pts = sorted((r for r in mine if r["layer"] == layer), key=lambda r: r["cl_weight"])
                fig.add_trace(go.Scatter(x=[r["sinkhorn_ratio"] for r in pts],
                                         y=[r["iia"] for r in pts], mode="lines",
                                         line=dict(color="lightgrey"), showlegend=False,
                                         hoverinfo="skip"), 1, gi)
            for wi, w in enumerate(weights):
                pts = [r for r in mine if r["cl_weight"] == w]
                fig.add_trace(go.Scatter(
                    x=[r["sinkhorn_ratio"] for r in pts], y=[r["iia"] for r in pts],
                    mode="markers+text", text=[f"L{r['layer']}" for r in pts],
                    textposition="top center", name=f"cl_weight={w:g}", legendgroup=str(w),
                    showlegend=gi == 1, marker=dict(size=9, color=qualitative.Plotly[wi % 10]),
                    hovertext=[f"layer {r['layer']}, {g}, cl_weight {w:g}: IIA {r['iia']:.3f}, "
                               f"Sinkhorn ratio {r['sinkhorn_ratio']:.2f}, {r['verdict']}"
                               for r in pts], hoverinfo="text"), 1, gi)
            fig.update_xaxes(title_text="Sinkhorn ratio to natural (1 = natural)", row=1, col=gi)
        fig.update_yaxes(title_text="held-out IIA", range=[-0.02, 1.05], row=1, col=1)
        fig.update_layout(title=title, height=420)
        return fig

    def __repr__(self) -> str:
        return f"DASSweep({len(self.rows)} runs; {self.meta.get('variable', '')})"


def das_sweep(model, train: CounterfactualPairs, test: CounterfactualPairs, *,
              layers: Sequence[int], tokens: Mapping[str, Any] | Sequence[Any] = ("cls",),
              cl_weights: Sequence[float] = (0.0, 1.0), hook: str = "resid_pre",
              intervention: Callable[[], TrainableIntervention] = lambda: RotatedSubspace(8),
              reference=None, diagnose_kw: dict | None = None, progress: bool = True,
              **train_kw: Any) -> DASSweep:
    """Train ``intervention()`` at ``Site(hook, layers=l, tokens=t)`` for every layer, token
    group and ``cl_weight`` on ``train`` (early stopping on a held-out part of it), then
    measure on ``test``: IIA, the CL loss of the patched vectors, and (with a ``reference``
    fitted at ``hook``) the divergence of the patched vectors (`diagnose`, one variant per run;
    ``diagnose_kw`` passes through).

    Args:
        tokens: token groups: ``{"name": selector}`` or selectors (named by ``str``).
        train_kw: passed to `train_intervention` (steps, lr, batch_size, ...).
    """
    from patchlens.diagnostics import diagnose

    groups = dict(tokens) if isinstance(tokens, Mapping) else {str(t): t for t in tokens}
    if not groups or not list(layers) or not list(cl_weights):
        raise InputError("das_sweep needs at least one layer, token group and cl_weight.")
    if not isinstance(train, CounterfactualPairs) or not isinstance(test, CounterfactualPairs):
        raise InputError("das_sweep takes CounterfactualPairs for train and test.")
    combos = [(layer, name, sel, float(w)) for layer in layers for name, sel in groups.items()
              for w in cl_weights]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(combos), desc="DAS sweep", unit="run")
    rows, trained = [], {}
    cache: dict = {}  # natural activations, shared by the runs at one hook
    try:
        for layer, name, sel, w in combos:
            site = Site(hook, layers=layer, tokens=sel)
            iv = intervention()
            t0 = time.perf_counter()
            res = train_intervention(model, site, iv, train, cl_weight=w, progress=False,
                                     activation_cache=cache, **train_kw)
            seconds = time.perf_counter() - t0
            row = {"layer": layer, "tokens": name, "cl_weight": w,
                   "iia": _accuracy(model, site, iv, prepare(model, site, test.base, test.source,
                                                             test.labels, cache=cache), 256),
                   "iia_validation": res.iia, "steps": res.steps, "stopped": res.stopped,
                   "seconds": seconds, "cl_test": heldout_cl_loss(model, site, iv, test, cache=cache),
                   "n_interchanged": iv.n_interchanged()}
            if reference is not None:
                rep = diagnose(model, test.base,
                               [Variant([(site, iv.with_source(test.source))], f"L{layer} {name}")],
                               reference, **(diagnose_kw or {}))
                row.update(divergence_figures(rep))
            rows.append(row)
            trained[(layer, name, w)] = iv
            if bar is not None:
                bar.update(1)
                bar.set_postfix(layer=layer, tokens=name, cl=w, iia=f"{row['iia']:.2f}")
    finally:
        if bar is not None:
            bar.close()
    return DASSweep(rows, trained, {"variable": train.variable, "hook": hook,
                                    "n_train": len(train), "n_test": len(test)})


__all__ = ["COLUMNS", "DASSweep", "das_sweep", "divergence_figures", "heldout_cl_loss"]
