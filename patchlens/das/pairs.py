"""`CounterfactualPairs`: the data of interchange intervention training, and builders for the zoo.

A pair is a base input and a source input; the high-level causal model says what the output
should be when the variable's value in the base is replaced by its value in the source (the
counterfactual label). A counterfactual input realises that change in the input itself (the base
image with the source's value of the variable); its natural latent is the target of the
counterfactual latent loss (Grant et al., arXiv 2511.04638, section 6).

On the clutter-digits zoo (`patchlens.zoo.clutter_digits`) the generator knows every variable:

- `digit_pairs`, variable *digit identity*: the counterfactual input is the base image redrawn
  with the source's digit scan (same position, size, colour, background and clutter);
  the label is the source's digit.
- `marker_pairs`, variable *marker colour* (the shortcut model's marker, always present): the
  counterfactual input is the base image with its marker repainted in the source's colour; the
  label is the source's marker label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError


@dataclass
class CounterfactualPairs:
    """(base, source) image pairs with their counterfactual labels.

    Attributes:
        base: ``[N, C, H, W]`` normalised model inputs (the runs that are patched).
        source: ``[N, C, H, W]`` the inputs whose variable value is interchanged into the base.
        labels: ``[N]`` the label the high-level causal model predicts after the interchange.
        counterfactual: ``[N, C, H, W]`` inputs realising the interchange (for the CL loss), or
            None.
        variable: the causal variable's name.
        meta: how the pairs were made (seeds, filters, base and source values).
    """

    base: Tensor
    source: Tensor
    labels: Tensor
    counterfactual: Tensor | None = None
    variable: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_pairs(self.base, self.source, self.labels, self.counterfactual)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def pairs(self) -> tuple[Tensor, Tensor]:
        return self.base, self.source

    def __getitem__(self, idx) -> CounterfactualPairs:
        """A subset (int, slice, index tensor or bool mask)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        cf = None if self.counterfactual is None else self.counterfactual[idx]
        meta = {k: (v[idx] if isinstance(v, Tensor) and v.shape[:1] == self.labels.shape else v)
                for k, v in self.meta.items()}
        return CounterfactualPairs(self.base[idx], self.source[idx], self.labels[idx], cf,
                                   self.variable, meta)

    def split(self, n_first: int) -> tuple[CounterfactualPairs, CounterfactualPairs]:
        """The first ``n_first`` pairs and the rest."""
        if not 0 < n_first < len(self):
            raise InputError(f"Cannot split {len(self)} pairs after {n_first}.")
        return self[:n_first], self[n_first:]

    def __repr__(self) -> str:
        cf = "with" if self.counterfactual is not None else "without"
        return (f"CounterfactualPairs({len(self)} pairs, variable={self.variable!r}, "
                f"{cf} counterfactual inputs)")


def check_pairs(base: Any, source: Any, labels: Any, counterfactual: Any = None,
                n_classes: int | None = None) -> None:
    """Raise `InputError` unless base, source (and counterfactual) are image batches of one
    shape and ``labels`` holds one class index per pair (in ``[0, n_classes)`` if given)."""
    for name, t in (("base", base), ("source", source), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise InputError(f"{name} must be a tensor, got {type(t).__name__}.")
    if base.ndim != 4 or not base.is_floating_point():
        raise InputError(f"base images must be a float tensor [N, C, H, W], got {base.dtype} "
                         f"{tuple(base.shape)}.")
    if base.shape[0] == 0:
        raise InputError("There are no pairs (0 base images).")
    if source.shape != base.shape:
        raise InputError(f"The pairs have different sizes: base {tuple(base.shape)}, source "
                         f"{tuple(source.shape)}; pass one source image per base image.")
    if counterfactual is not None and (not isinstance(counterfactual, Tensor)
                                       or counterfactual.shape != base.shape):
        got = (tuple(counterfactual.shape) if isinstance(counterfactual, Tensor)
               else type(counterfactual).__name__)
        raise InputError(f"counterfactual inputs must match the base images {tuple(base.shape)}, "
                         f"got {got}.")
    if labels.ndim != 1 or labels.shape[0] != base.shape[0]:
        raise InputError(f"labels must be [N] = [{base.shape[0]}] (one per pair), got "
                         f"{tuple(labels.shape)}.")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise InputError(f"labels must be integer class indices, got dtype {labels.dtype}.")
    if n_classes is not None and labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= n_classes:
            bad = lo if lo < 0 else hi
            raise InputError(f"Label {bad} is outside the model's classes 0..{n_classes - 1}.")


# ---- the zoo's variables ------------------------------------------------------------------------
def _predict(model, x: Tensor, batch_size: int = 256) -> Tensor:
    with torch.inference_mode():
        return torch.cat([model(x[i : i + batch_size]).argmax(-1).cpu()
                          for i in range(0, x.shape[0], batch_size)])


def _collect(make, model, n: int, filter_model: bool, variable: str, seed: int,
             max_rounds: int = 20) -> CounterfactualPairs:
    """Draw (up to ``max_rounds``) rounds of candidate pairs from ``make(round) -> (base, source, cf, labels,
    base_values, source_values)`` (images in [0, 1]), keep those whose variable values differ
    (and, with ``filter_model``, on which the model's predictions follow the causal model on
    base, source and counterfactual), until ``n`` are kept."""
    kept: list[tuple[Tensor, ...]] = []
    total = drawn = 0
    for r in range(max_rounds):
        base, source, cf, labels, vb, vs = make(r)
        xb, xs, xc = model.preprocess(base), model.preprocess(source), model.preprocess(cf)
        keep = vb != vs
        if filter_model:
            keep &= (_predict(model, xb) == vb) & (_predict(model, xs) == vs) \
                & (_predict(model, xc) == labels)
        drawn += len(labels)
        idx = torch.nonzero(keep).flatten()
        kept.append((xb[idx], xs[idx], xc[idx], labels[idx], vb[idx], vs[idx]))
        total += len(idx)
        if total >= n:
            break
    if total < n:
        raise InputError(f"Only {total} of {drawn} candidate pairs for {variable!r} passed the "
                         f"filters; ask for fewer pairs (n={n}) or pass filter_model=False.")
    xb, xs, xc, labels, vb, vs = (torch.cat(parts)[:n] for parts in zip(*kept))
    return CounterfactualPairs(xb, xs, labels, xc, variable,
                               {"seed": seed, "kept_fraction": total / drawn,
                                "filter_model": filter_model, "base_values": vb,
                                "source_values": vs})


def _seeds(seed: int, r: int) -> tuple[int, int]:
    return 1_000_003 * seed + 2 * r + 17, 1_000_003 * seed + 2 * r + 18


def digit_pairs(model, n: int, split: str = "train", seed: int = 0, *,
                filter_model: bool = True, max_rounds: int = 20,
                **generate_kw: Any) -> CounterfactualPairs:
    """``n`` pairs for the variable *digit identity* on clutter-digits images (`generate`
    options pass through): base and source digits differ; the counterfactual input is the base
    image redrawn with the source's digit scan, its label the source's digit. With
    ``filter_model`` only pairs the model classifies correctly (base, source and counterfactual)
    are kept, as usual for interchange intervention accuracy."""
    from patchlens.zoo.clutter_digits import generate

    def make(r):
        sb, ss = _seeds(seed, r)
        m = n + n // 3 + 32
        base = generate(m, split=split, seed=sb, **generate_kw)
        source = generate(m, split=split, seed=ss, **generate_kw)
        cf = generate(m, split=split, seed=sb, scan_ids=source.scan_ids, **generate_kw)
        return base.images, source.images, cf.images, source.labels, base.labels, source.labels

    return _collect(make, model, n, filter_model, "digit", seed, max_rounds)


def marker_pairs(model, n: int, split: str = "train", seed: int = 0, *,
                 filter_model: bool = True, max_rounds: int = 20,
                 **generate_kw: Any) -> CounterfactualPairs:
    """``n`` pairs for the variable *marker colour* (images with the shortcut marker, which
    encodes the digit's label): base and source markers differ; the counterfactual input is the
    base image with the marker repainted in the source's colour, its label the source's marker
    label (the label a model that reads the marker predicts)."""
    from patchlens.zoo.clutter_digits import MARKER_BOX, MARKER_COLORS, generate

    x0, y0, x1, y1 = MARKER_BOX
    colours = torch.as_tensor(MARKER_COLORS)

    def make(r):
        sb, ss = _seeds(seed, r)
        m = n + n // 3 + 32
        base = generate(m, split=split, seed=sb, shortcut="on", **generate_kw)
        source = generate(m, split=split, seed=ss, shortcut="on", **generate_kw)
        cf = base.images.clone()
        cf[:, :, y0:y1, x0:x1] = colours[source.marker_labels][:, :, None, None]
        return (base.images, source.images, cf, source.marker_labels, base.marker_labels,
                source.marker_labels)

    return _collect(make, model, n, filter_model, "marker colour", seed, max_rounds)


__all__ = ["CounterfactualPairs", "check_pairs", "digit_pairs", "marker_pairs"]
