"""`Recipe`: named, reusable sets of (site, intervention) pairs; `patch` runs one of them."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError
from patchlens.patching.engine import Variant, run_variants
from patchlens.patching.interventions import as_intervention
from patchlens.patching.results import PatchResult
from patchlens.patching.sites import Site

AXIS_NAMES = {"layers": "layer", "tokens": "token", "heads": "head", "features": "feature"}


def patch(model, x: Tensor, pairs: Sequence[tuple[Site, Any]], return_type: str = "logits",
          **engine_kwargs: Any) -> Tensor:
    """One patched forward pass of ``x`` with every (site, intervention) pair applied."""
    res = run_variants(model, x, [Variant(list(pairs), "patched")], return_type=return_type,
                       progress=False, **engine_kwargs)
    return res.outputs[0]


class Recipe:
    """An experiment: (site, intervention) pairs applied together, with a name.

    >>> recipe = Recipe([(Site("resid_pre", layers=3, tokens="cls"), Interchange(clean))], "cls@3")
    >>> recipe.run(model, corrupted)                       # one patched forward
    >>> recipe.sweep(model, corrupted, metric, layers=range(12), tokens=range(65))

    ``sweep`` varies Site fields (``layers``, ``tokens``, ``heads``) over the given values —
    every pair's site takes the value — and returns a `PatchResult` with one axis per field.
    """

    def __init__(self, pairs: Iterable[tuple[Site, Any]] = (), name: str = ""):
        self.pairs = [(s, as_intervention(iv)) for s, iv in pairs]
        self.name = name or " + ".join(f"{iv!r}@{s!r}" for s, iv in self.pairs)

    def add(self, site: Site, intervention: Any) -> Recipe:
        return Recipe(self.pairs + [(site, intervention)], self.name)

    def __add__(self, other: Recipe) -> Recipe:
        return Recipe(self.pairs + other.pairs, f"{self.name} + {other.name}")

    def __repr__(self) -> str:
        return f"Recipe({self.name!r}, {len(self.pairs)} pair(s))"

    def run(self, model, x: Tensor, return_type: str = "logits", **kw: Any) -> Tensor:
        """One patched forward pass."""
        return patch(model, x, self.pairs, return_type=return_type, **kw)

    def variants(self, **axes: Iterable[Any]) -> list[Variant]:
        """One `Variant` per combination of the given Site field values (row-major)."""
        if not self.pairs:
            raise InputError("This recipe has no (site, intervention) pairs.")
        bad = set(axes) - set(AXIS_NAMES)
        if bad:
            raise InputError(f"Recipes vary {sorted(AXIS_NAMES)}, got {sorted(bad)}.")
        values = {k: list(v) for k, v in axes.items()}
        for k, v in values.items():
            if not v:
                raise InputError(f"The sweep over {k} is empty.")
        out = []
        for combo in itertools.product(*values.values()):
            changes = dict(zip(values, combo))
            pairs = [(dataclasses.replace(s, **changes), iv) for s, iv in self.pairs]
            out.append(Variant(pairs, tuple(combo)))
        return out

    def sweep(self, model, x: Tensor, metric: Callable[[Tensor], Tensor], labels: dict | None = None,
              **kwargs: Any) -> PatchResult:
        """Run the recipe for every combination of ``layers=``, ``tokens=``, ``heads=`` values
        and return the metric as a `PatchResult` (averaged over the target images)."""
        axes = {k: kwargs.pop(k) for k in list(kwargs) if k in AXIS_NAMES}
        variants = self.variants(**axes)
        res = run_variants(model, x, variants, metric=metric, **kwargs)
        shape = [len(list(v)) for v in axes.values()]
        per_example = res.outputs.reshape(*shape, x.shape[0])
        names = tuple(AXIS_NAMES[k] for k in axes)
        coords = {AXIS_NAMES[k]: list(v) for k, v in axes.items()}
        labels = labels or {}
        lab = {n: labels.get(n, [str(c) for c in coords[n]]) for n in names}
        with torch.no_grad():
            return PatchResult(per_example.mean(-1), names, lab, per_example=per_example,
                               coords=coords, layout=model.layout_for(tuple(x.shape[-2:])),
                               meta={"recipe": self.name})
