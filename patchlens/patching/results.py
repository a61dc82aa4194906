"""`PatchResult`: what a sweep measured (patched metric, baselines, effects) with named axes
and labels, plots and tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError

OF = ("effects", "values", "normalized_effects")


@dataclass
class PatchResult:
    """What a patching sweep measured: one value per cell of named axes.

    The convention (every recipe, `Recipe.sweep` too): ``values`` is the **patched metric** —
    the metric on each patched run (normalised recovery for a `patchlens.metrics.recovery`
    metric or ``normalize=True``); ``baseline`` is the same metric on the **unpatched** run that
    was patched; ``effects = values - baseline`` is what the patch changed. Everything that
    shows a result — ``repr``, `top`, `plot`, `grid`, `sel`, `to_pandas` — shows ``effects``
    unless told ``of="values"`` (or ``of="normalized_effects"``), and says which.

    Attributes:
        values: ``[*axes]`` the patched metric, averaged over the target images.
        axes: axis names, e.g. ``("layer", "token")`` or ``("layer", "head")``.
        labels: per axis, one label per index (``0``, ``"cls"``, ``"reg0"``, ``"r3c5"``, ...).
        per_example: ``[batch, *axes]`` the patched metric per target image (batch first, as in
            the shards of dataset runs).
        baseline: ``[batch]`` the metric on the unpatched target run, in the units of
            ``values``.
        clean, corrupted: ``[batch]`` the (raw, unnormalised) metric on the unpatched clean and
            corrupted runs, when the recipe had such a pair.
        coords: per axis, the raw value of each index (layer ints, token indices, ...).
        layout: the model's `TokenLayout` (for maps over the patch grid).
        image: ``[C, H, W]`` in [0, 1] (the first of ``images``) to lay maps over.
        images: ``[batch, C, H, W]`` in [0, 1], the images maps are drawn over: the clean
            images of a clean/corrupted pair (where the evidence is), the target images of a
            `Recipe.sweep`.
        meta: what was run (site, direction, method, metric, ``normalized``, ...).
        divergence: a `DivergenceReport` when the sweep was run with ``diagnose=``.
    """

    values: Tensor
    axes: tuple[str, ...]
    labels: dict[str, list]
    per_example: Tensor | None = None
    clean: Tensor | None = None
    corrupted: Tensor | None = None
    coords: dict[str, list] = field(default_factory=dict)
    layout: Any = None
    image: Tensor | None = None
    meta: dict = field(default_factory=dict)
    divergence: Any = None
    baseline: Tensor | None = None
    images: Tensor | None = None

    def __post_init__(self) -> None:
        if self.values.ndim != len(self.axes):
            raise ValueError(f"values has {self.values.ndim} dims but {len(self.axes)} axes {self.axes}")
        for ax, n in zip(self.axes, self.values.shape):
            if len(self.labels[ax]) != n:
                raise ValueError(f"axis {ax!r} has {n} entries but {len(self.labels[ax])} labels")
            self.coords.setdefault(ax, list(self.labels[ax]))
        if self.per_example is not None and tuple(self.per_example.shape[1:]) != self.shape:
            raise ValueError(f"per_example must be [batch, *axes] = [batch, {self.shape}], got "
                             f"{tuple(self.per_example.shape)}")
        if self.image is None and self.images is not None:
            self.image = self.images[0]

    # ---- what the values mean --------------------------------------------------------------
    @property
    def effects(self) -> Tensor:
        """``[*axes]`` patched minus unpatched metric (``values - baseline``), averaged over
        the images."""
        return self.effects_per_example.mean(0) if self.per_example is not None else \
            self.values - self._baseline().mean()

    @property
    def effects_per_example(self) -> Tensor:
        """``[batch, *axes]`` patched minus unpatched metric per image."""
        if self.per_example is None:
            raise InputError("This result has no per_example values.")
        b = self._baseline()
        return self.per_example - b.reshape(-1, *[1] * len(self.axes))

    @property
    def normalized_effects(self) -> Tensor:
        """``[*axes]`` effects divided by ``clean - corrupted`` per image (the share of the
        clean-corrupted gap the patch closes or opens), averaged over the images. For a
        normalised metric (``recovery``) this equals ``effects``."""
        if self.meta.get("normalized"):
            return self.effects
        return self.per_example_of("normalized_effects").mean(0)

    def per_example_of(self, of: str = "effects") -> Tensor:
        """``[batch, *axes]`` values, effects or normalised effects per image."""
        self._check_of(of)
        if of == "values":
            if self.per_example is None:
                raise InputError("This result has no per_example values.")
            return self.per_example
        eff = self.effects_per_example
        if of == "effects" or self.meta.get("normalized"):
            return eff
        if self.clean is None or self.corrupted is None:
            raise InputError("normalized_effects needs the clean and corrupted baselines; this "
                             "result has none (e.g. a Recipe.sweep): use effects.")
        from patchlens.metrics import recovery_denominator

        denom = recovery_denominator(self.clean, self.corrupted).to(self.values.dtype)
        return eff / denom.reshape(-1, *[1] * len(self.axes))

    def _baseline(self) -> Tensor:
        if self.baseline is None:
            raise InputError("This result has no baseline (unpatched metric), so it has no "
                             "effects; use of='values'.")
        return self.baseline.to(self.values.dtype)

    def quantity(self, of: str = "effects") -> Tensor:
        """``values``, ``effects`` or ``normalized_effects`` by name."""
        self._check_of(of)
        return getattr(self, of)

    @staticmethod
    def _check_of(of: str) -> None:
        if of not in OF:
            raise InputError(f"of= must be one of {', '.join(map(repr, OF))}; got {of!r}.")

    def describe(self, of: str = "effects") -> str:
        """What ``of`` holds, in words (used by repr, tables and plots)."""
        unit = "normalised recovery" if self.meta.get("normalized") else \
            str(self.meta.get("metric", "metric"))
        return {"values": f"patched {unit}",
                "effects": f"effect on {unit} (patched − unpatched)",
                "normalized_effects": "effect / (clean − corrupted)"}[of]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    # ---- access -------------------------------------------------------------------------
    def _index(self, axis: str, label: Any) -> int:
        labels, coords = self.labels[axis], self.coords[axis]
        if label in labels:
            return labels.index(label)
        if label in coords:
            return coords.index(label)
        raise InputError(f"{label!r} is not on axis {axis!r}; its labels are {labels[:10]}...")

    def sel(self, of: str = "effects", **where: Any) -> Tensor:
        """Effects (or ``of="values"``) at the given labels, e.g.
        ``result.sel(layer=3, token="cls")``."""
        idx: list[Any] = [slice(None)] * len(self.axes)
        for ax, label in where.items():
            if ax not in self.axes:
                raise InputError(f"No axis {ax!r}; axes are {self.axes}.")
            idx[self.axes.index(ax)] = self._index(ax, label)
        return self.quantity(of)[tuple(idx)]

    def grid(self, layer: Any = None, of: str = "effects", image: int | None = None) -> Tensor:
        """Effects (or ``of="values"``) over the patch grid ``[grid_h, grid_w]`` (at ``layer``
        if there is a layer axis; other axes must already be single); averaged over the
        images, or of image ``image`` alone."""
        if "token" not in self.axes or self.layout is None:
            raise InputError("grid() needs a result with a token axis (per='token').")
        vals = self.quantity(of) if image is None else self.per_example_of(of)[image]
        axes = list(self.axes)
        if "layer" in axes:
            if layer is None:
                raise InputError("Pass the layer: result.grid(layer).")
            vals = vals.select(axes.index("layer"), self._index("layer", layer))
            axes.remove("layer")
        if axes != ["token"]:
            raise InputError(f"grid() needs only layer and token axes, got {self.axes}.")
        coords = self.coords["token"]
        lay = self.layout
        full = torch.full((lay.n_patches,), float("nan"), dtype=vals.dtype)
        for i, tok in enumerate(coords):
            if tok >= lay.n_prefix:
                full[tok - lay.n_prefix] = vals[i]
        return full.reshape(lay.grid)

    def top(self, k: int = 10, by: str = "abs", of: str = "effects"):
        """The ``k`` largest effects (or ``of="values"``), by absolute value (``by="value"``:
        signed, largest first) as a DataFrame (columns: the axes, ``value``, ``effect``...)."""
        flat = self.quantity(of).flatten()
        key = flat.abs() if by == "abs" else flat
        k = min(k, flat.numel())
        order = torch.argsort(key.nan_to_num(-float("inf")), descending=True)[:k]
        df = self.to_pandas()
        out = df.iloc[order.tolist()].reset_index(drop=True)
        out.attrs["ranked_by"] = f"{'|' if by == 'abs' else ''}{of}{'|' if by == 'abs' else ''}"
        return out

    def to_pandas(self):
        """Long table: one row per cell, a column per axis label, ``value`` (patched metric)
        and, when there is a baseline, ``effect`` (patched − unpatched) and
        ``normalized_effect`` (when defined)."""
        import itertools

        import pandas as pd

        cols = {"value": self.values}
        if self.baseline is not None:
            cols["effect"] = self.effects
            try:
                cols["normalized_effect"] = self.normalized_effects
            except InputError:
                pass
        rows = []
        for idx in itertools.product(*(range(n) for n in self.values.shape)):
            row = {ax: self.labels[ax][i] for ax, i in zip(self.axes, idx)}
            row.update({name: float(t[idx]) for name, t in cols.items()})
            rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, kind: str | None = None, of: str = "effects", **kwargs: Any):
        """A plotly figure of the effects (or ``of="values"``): layer x token heatmap (prefix
        tokens split off), ``kind="grid"`` for maps over the images (a layer slider, and an
        image slider with ``per_image=True``), or layer x head heatmap."""
        from patchlens import viz

        return viz.plot_patch_result(self, kind=kind, of=of, **kwargs)

    def __repr__(self) -> str:
        dims = " x ".join(f"{a}({n})" for a, n in zip(self.axes, self.values.shape))
        m = self.meta
        parts = [f"PatchResult[{dims}]"]
        if m:
            parts.append(", ".join(f"{k}={m[k]}" for k in ("site", "direction", "method",
                                                              "metric") if k in m))
        if self.clean is not None and self.corrupted is not None:
            parts.append(f"unpatched metric: clean={self.clean.mean():.3f} "
                         f"corrupted={self.corrupted.mean():.3f}")
        of = "effects" if self.baseline is not None else "values"
        parts.append("values = " + self.describe("values")
                     + (f"; baseline (unpatched) = {self._baseline().mean():.3f}; effects = "
                        "values − baseline" if of == "effects" else ""))
        if self.values.numel():
            q = self.quantity(of)
            v = q.nan_to_num(0)
            i = int(v.abs().flatten().argmax())
            idx = torch.unravel_index(torch.tensor(i), self.values.shape)
            where = ", ".join(f"{a}={self.labels[a][int(j)]}" for a, j in zip(self.axes, idx))
            name = "effect" if of == "effects" else "value"
            parts.append(f"max |{name}| {float(q[tuple(int(j) for j in idx)]):.3f} at {where}")
        if self.divergence is not None:
            parts.append(f"divergence: {self.divergence.summary()}")
        return "\n  ".join(parts)
