"""`DivergenceReport`: the divergence of every (variant, site, token class) of a sweep."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from patchlens.diagnostics.verdict import VERDICTS, evidence, worst


@dataclass
class DivergenceReport:
    """Divergence of every (variant, site) of a sweep from the natural distribution.

    Attributes:
        rows: one dict per (variant, site, token class): measures, sample sizes, verdict and
            its evidence (see `to_pandas`).
        ot: one dict per (site, token class): Sinkhorn distance of all patched vectors there,
            the natural-vs-natural baseline (halves split by image) and their ratio, with sample
            sizes; reported beside the verdicts, not part of them.
        dormant: per variant, the downstream neurons beyond their natural range
            (layer, neuron, value, natural max, token class, natural sample size), largest
            excess first.
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
        """Worst verdict over each variant's rows (`VERDICTS` order)."""
        by: dict[int, list[str]] = defaultdict(list)
        for r in self.rows:
            by[r["variant"]].append(r["verdict"])
        return [worst(by[i]) for i in range(len(self.dormant))]

    def variant_values(self, key: str) -> Tensor:
        """``[V]`` a row measure per variant (max over its rows), reshaped to the sweep."""
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
        """One row per (variant, site, token class): ``label, hook, class, n, n_outliers,
        outlier_rate, <measure>_pct, norm_ratio, measure, n_fit, n_cal, n_images_ref,
        null_fraction, shift, ot_ratio, n_dormant, effect, verdict, evidence``."""
        import pandas as pd

        return pd.DataFrame([dict(r) for r in self.rows])

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(VERDICTS, 0)
        for v in self.variant_verdicts():
            out[v] += 1
        return out

    def summary(self) -> str:
        """One line: verdict counts, what they rest on (test, level, reference size), the
        clearest evidence, the pernicious share and the largest Sinkhorn ratio."""
        c = self.counts()
        t = self.thresholds
        parts = [f"{len(self.dormant)} variants: " + ", ".join(
            f"{c[v]} {v}" for v in VERDICTS if c[v] or v != "insufficient-reference")]
        parts.append(f"verdicts from the per-vector test at alpha={t['alpha']:g} (divergent if "
                     f"> {t['outlier_rate']:g} outliers), reference of "
                     f"{self.meta.get('n_images_ref', '?')} images")
        div = [r for r in self.rows if r["verdict"].startswith("divergent")]
        if div:
            r = max(div, key=lambda r: (r["verdict"] == "divergent-pernicious", r["outlier_rate"],
                                        r["n"]))
            parts.append(f"e.g. {r['label']} at {r['hook']} {r['class']}: {r['evidence']}")
        short = [r for r in self.rows if r["verdict"] == "insufficient-reference"]
        if short:
            parts.append(f"insufficient reference at {short[0]['hook']} {short[0]['class']}: "
                         f"{short[0]['evidence']}")
        share = self.pernicious_share()
        if not math.isnan(share):
            parts.append(f"{100 * share:.0f}% of |effect| from pernicious variants")
        ratios = [o["ratio"] for o in self.ot if not math.isnan(o["ratio"])]
        if ratios:
            parts.append(f"Sinkhorn/baseline up to {max(ratios):.2f} (not in the verdict)")
        return "; ".join(parts)

    def __repr__(self) -> str:
        t = self.thresholds
        return (f"DivergenceReport({self.summary()})\n  rule: a patched vector is an outlier if "
                f"its p-value under the natural distribution is <= {t['alpha']:g}; a row is "
                f"divergent if > {t['outlier_rate']:g} of its vectors are; pernicious if "
                f"divergent and a downstream neuron exceeds its natural max by > "
                f"{t['dormant_margin']:g} x (max - median)")

    def plot(self, measure: str = "outlier_rate"):
        """Plotly figure: the effect, ``measure`` and the dormant-neuron count side by side,
        each with its colour bar (per layer x token for a layer x token sweep; bars per
        variant otherwise)."""
        import numpy as np
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        from patchlens.viz import DIVERGING, colorbar, finish

        names = {"effect": "effect (patched − unpatched)", "outlier_rate": "outlier rate",
                 "n_dormant": "dormant neurons", "ot_ratio": "Sinkhorn ratio"}
        panels = [("effect", self.effects), (measure, self.variant_values(measure)),
                  ("n_dormant", self.variant_values("n_dormant"))]
        titles = [names.get(p[0], p[0].replace("_", " ")) for p in panels]
        two_d = self.shape is not None and len(self.shape) == 2 and self.axes is not None
        fig = make_subplots(rows=1, cols=3, subplot_titles=titles,
                            horizontal_spacing=0.1 if two_d else 0.07)
        x_title, y_title = ("variant", None)
        for i, (name, vals) in enumerate(panels, start=1):
            if vals is None:
                continue
            z = vals.detach().float().cpu().numpy()
            if two_d:
                y = [str(v) for v in self.labels[self.axes[0]]]
                x = [str(v) for v in self.labels[self.axes[1]]]
                dom = fig.layout[f"xaxis{i if i > 1 else ''}"].domain
                bar = dict(colorbar(titles[i - 1]), x=dom[1] + 0.005, len=0.85, thickness=10)
                if name == "effect":
                    lim = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
                    kw = dict(colorscale=DIVERGING, zmid=0, zmin=-lim or -1, zmax=lim or 1)
                else:
                    kw = dict(colorscale="Reds", zmin=0)
                fig.add_trace(go.Heatmap(z=z.reshape(self.shape), x=x, y=y, colorbar=bar,
                                         **kw), 1, i)
                fig.update_yaxes(autorange="reversed", type="category", row=1, col=i)
                fig.update_xaxes(type="category", row=1, col=i)
                x_title, y_title = self.axes[1], self.axes[0]
            else:
                labels, x_title = self._variant_labels(z.size)
                fig.add_trace(go.Bar(x=labels, y=np.ravel(z), name=titles[i - 1]), 1, i)
                fig.update_xaxes(type="category", row=1, col=i)
                fig.update_yaxes(title_text=titles[i - 1], row=1, col=i)
        for i in range(1, 4):
            fig.update_xaxes(title_text=x_title, row=1, col=i)
        if y_title is not None:
            fig.update_yaxes(title_text=y_title, row=1, col=1)
        rows = self.shape[0] if two_d else 1
        height = max(380, 24 * rows + 200) if two_d else 400
        fig.update_layout(showlegend=False)
        return finish(fig, f"Divergence: {self.summary()[:160]}", 1150, height)

    def _variant_labels(self, n: int) -> tuple[list[str], str]:
        """Readable labels for a 1-D sweep's variants and the axis title."""
        if self.axes is not None and len(self.axes) == 1 and self.labels is not None:
            return [str(v) for v in self.labels[self.axes[0]]], self.axes[0]
        raw = self.meta.get("labels", range(n))
        out = []
        for r in raw:
            if isinstance(r, tuple):
                r = ", ".join(str(v) for v in r)
            out.append(str(r))
        return out, "variant"


__all__ = ["DivergenceReport", "evidence"]
