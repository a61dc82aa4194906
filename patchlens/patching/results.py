"""`PatchResult`: the values of a sweep with named axes and labels, plots and tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError


@dataclass
class PatchResult:
    """Values of a patching sweep.

    Attributes:
        values: ``[*axes]`` the metric averaged over the target images.
        axes: axis names, e.g. ``("layer", "token")`` or ``("layer", "head")``.
        labels: per axis, one label per index (``0``, ``"cls"``, ``"reg0"``, ``"r3c5"``, ...).
        per_example: ``[*axes, batch]`` the metric per target image.
        clean, corrupted: ``[batch]`` the metric on the unpatched clean and corrupted runs.
        coords: per axis, the raw value of each index (layer ints, token indices, ...).
        layout: the model's `TokenLayout` (for maps over the patch grid).
        image: ``[C, H, W]`` in [0, 1] (the first target image) to lay maps over.
        meta: what was run (site, direction, method, metric, ...).
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

    def __post_init__(self) -> None:
        if self.values.ndim != len(self.axes):
            raise ValueError(f"values has {self.values.ndim} dims but {len(self.axes)} axes {self.axes}")
        for ax, n in zip(self.axes, self.values.shape):
            if len(self.labels[ax]) != n:
                raise ValueError(f"axis {ax!r} has {n} entries but {len(self.labels[ax])} labels")
            self.coords.setdefault(ax, list(self.labels[ax]))

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

    def sel(self, **where: Any) -> Tensor:
        """Values at the given labels, e.g. ``result.sel(layer=3, token="cls")``."""
        idx: list[Any] = [slice(None)] * len(self.axes)
        for ax, label in where.items():
            if ax not in self.axes:
                raise InputError(f"No axis {ax!r}; axes are {self.axes}.")
            idx[self.axes.index(ax)] = self._index(ax, label)
        return self.values[tuple(idx)]

    def grid(self, layer: Any = None) -> Tensor:
        """Values over the patch grid ``[grid_h, grid_w]`` (at ``layer`` if there is a layer axis;
        other axes must already be single)."""
        if "token" not in self.axes or self.layout is None:
            raise InputError("grid() needs a result with a token axis (per='token').")
        vals = self.values
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

    def top(self, k: int = 10, by: str = "abs"):
        """The ``k`` largest effects (by absolute value, or ``by="value"``) as a DataFrame."""
        flat = self.values.flatten()
        key = flat.abs() if by == "abs" else flat
        k = min(k, flat.numel())
        order = torch.argsort(key.nan_to_num(-float("inf")), descending=True)[:k]
        df = self.to_pandas()
        return df.iloc[order.tolist()].reset_index(drop=True)

    def to_pandas(self):
        """Long table: one row per cell, a column per axis label and ``value``."""
        import itertools

        import pandas as pd

        rows = []
        for idx in itertools.product(*(range(n) for n in self.values.shape)):
            row = {ax: self.labels[ax][i] for ax, i in zip(self.axes, idx)}
            row["value"] = float(self.values[idx])
            rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, kind: str | None = None, **kwargs: Any):
        """A plotly figure: layer x token heatmap (prefix tokens split off), ``kind="grid"``
        for per-layer maps over the image with a layer slider, or layer x head heatmap."""
        from patchlens import viz

        return viz.plot_patch_result(self, kind=kind, **kwargs)

    def __repr__(self) -> str:
        dims = " x ".join(f"{a}({n})" for a, n in zip(self.axes, self.values.shape))
        m = self.meta
        parts = [f"PatchResult[{dims}]"]
        if m:
            parts.append(", ".join(f"{k}={m[k]}" for k in ("site", "direction", "method", "metric") if k in m))
        if self.clean is not None and self.corrupted is not None:
            parts.append(f"clean={self.clean.mean():.3f} corrupted={self.corrupted.mean():.3f}")
        if self.values.numel():
            v = self.values.nan_to_num(0)
            i = int(v.abs().flatten().argmax())
            idx = torch.unravel_index(torch.tensor(i), self.values.shape)
            where = ", ".join(f"{a}={self.labels[a][int(j)]}" for a, j in zip(self.axes, idx))
            parts.append(f"max |effect| {float(self.values[tuple(int(j) for j in idx)]):.3f} at {where}")
        if self.divergence is not None:
            parts.append(f"divergence: {self.divergence.summary()}")
        return "\n  ".join(parts)
