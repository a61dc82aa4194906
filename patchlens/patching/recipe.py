"""`Recipe`: named, reusable sets of (site, intervention) pairs; `patch` runs one of them."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError
from patchlens.metrics import metric_name
from patchlens.patching.engine import Variant, run_variants
from patchlens.patching.interventions import as_intervention
from patchlens.patching.results import PatchResult
from patchlens.patching.sites import Site

AXIS_NAMES = {"layers": "layer", "tokens": "token", "heads": "head", "features": "feature"}


def patch(model, x: Tensor, pairs: Sequence[tuple[Site, Any]], return_type: str = "logits",
          **engine_kwargs: Any) -> Tensor:
    """One patched forward pass of ``x`` with every (site, intervention) pair applied; other
    keyword arguments go to `run_variants` (``batch_size``, ``progress`` (default off), ...)."""
    engine_kwargs.setdefault("progress", False)
    res = run_variants(model, x, [Variant(list(pairs), "patched")], return_type=return_type,
                       **engine_kwargs)
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
        if isinstance(pairs, (Site, str)) or not isinstance(pairs, Iterable):
            raise InputError(f"A recipe takes a list of (Site, intervention) pairs, got "
                             f"{pairs!r}: write Recipe([(Site('resid_pre', layers=3), Zero())]).")
        pairs = list(pairs)
        for pair in pairs:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], Site)):
                raise InputError(f"A recipe's pairs are (Site, intervention) tuples; got "
                                 f"{pair!r}. Write Site('resid_pre', layers=3) for a hook name.")
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
        values = {k: _values(k, v) for k, v in axes.items()}
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
        and return a `PatchResult`: ``values`` the metric of each patched run (averaged over
        the target images), ``baseline`` the metric of the unpatched run of ``x`` (run in the
        same sweep), ``effects`` = values − baseline, ``per_example [batch, *axes]``. Other
        keyword arguments go to `run_variants` (``batch_size``, ``progress``, ...)."""
        axes = {k: _values(k, kwargs.pop(k)) for k in list(kwargs) if k in AXIS_NAMES}
        engine = set(inspect.signature(run_variants).parameters) - {"model", "x", "variants",
                                                                    "metric"}
        unknown = sorted(set(kwargs) - engine)
        if unknown:
            raise InputError(f"sweep varies {sorted(AXIS_NAMES)} and passes {sorted(engine)} to "
                             f"the engine; got {unknown}.")
        variants = self.variants(**axes)
        res = run_variants(model, x, variants + [Variant([], "unpatched")], metric=metric,
                           **kwargs)
        shape = [len(list(v)) for v in axes.values()]
        per_example = res.outputs[:-1].reshape(*shape, x.shape[0]).movedim(-1, 0)
        names = tuple(AXIS_NAMES[k] for k in axes)
        coords = {AXIS_NAMES[k]: list(v) for k, v in axes.items()}
        labels = labels or {}
        lab = {n: labels.get(n, [_label(c) for c in coords[n]]) for n in names}
        with torch.no_grad():
            return PatchResult(per_example.mean(0), names, lab, per_example=per_example,
                               baseline=res.outputs[-1], coords=coords,
                               layout=model.layout_for(tuple(x.shape[-2:])),
                               images=model.to_image(x).cpu(),
                               meta={"recipe": self.name, "metric": metric_name(metric)})


def _label(value: Any) -> str:
    """A readable axis label for a swept Site field value (a tensor mask or a Rect shows its
    kind and size, not its repr)."""
    if isinstance(value, Tensor):
        return f"mask({int(value.sum())})" if value.dtype == torch.bool else \
            f"tensor({value.numel()})"
    return str(value)


def _values(axis: str, values: Any) -> list:
    """The values a sweep takes along ``axis``, as a list (a generator is read once)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InputError(f"The sweep over {axis} takes a list of values (one per variant), got "
                         f"{values!r}; e.g. {axis}=[{values!r}] for a single value.")
    return list(values)
