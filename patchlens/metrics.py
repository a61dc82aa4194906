"""Metrics for patching: functions ``logits [N, classes] -> [N]``.

Prefer metrics linear in the logits (logit, logit difference, log-probability): probability
saturates and accuracy hides effects (Heimersheim & Nanda 2024; Zhang & Nanda 2023).
Class arguments are an int or a tensor ``[B]`` of per-example classes; when a metric is called
on a stack of variants (``N = V * B`` rows) the per-example classes repeat.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from patchlens.errors import InputError

Classes = int | Tensor | list


def _per_row(classes: Classes, n: int, n_classes: int) -> Tensor:
    c = torch.as_tensor(classes, dtype=torch.long).flatten()
    if c.numel() == 1:
        c = c.expand(n)
    elif n % c.numel() == 0:
        c = c.repeat(n // c.numel())
    else:
        raise InputError(f"Got {c.numel()} per-example classes for {n} rows of logits; pass one "
                         "class per target image.")
    if (c < 0).any() or (c >= n_classes).any():
        raise InputError(f"Class index out of range for {n_classes} classes: {c.unique().tolist()}.")
    return c


def _pick(logits: Tensor, classes: Classes) -> Tensor:
    if logits.ndim != 2:
        raise InputError(f"Metrics take logits [N, classes], got shape {tuple(logits.shape)}.")
    c = _per_row(classes, logits.shape[0], logits.shape[1]).to(logits.device)
    return logits.gather(1, c[:, None])[:, 0]


@dataclass(frozen=True)
class _Named:
    fn: Callable[[Tensor], Tensor]
    name: str

    def __call__(self, logits: Tensor) -> Tensor:
        return self.fn(logits)

    def __repr__(self) -> str:
        return self.name


def logit(classes: Classes) -> Callable[[Tensor], Tensor]:
    """The logit of ``classes``."""
    return _Named(lambda lg: _pick(lg, classes), f"logit({_fmt(classes)})")


def logit_diff(classes: Classes, other: Classes) -> Callable[[Tensor], Tensor]:
    """``logit[classes] - logit[other]`` (e.g. correct minus counterfactual answer)."""
    return _Named(lambda lg: _pick(lg, classes) - _pick(lg, other),
                  f"logit_diff({_fmt(classes)}, {_fmt(other)})")


def log_prob(classes: Classes) -> Callable[[Tensor], Tensor]:
    """Log-probability (log-softmax) of ``classes``."""
    return _Named(lambda lg: _pick(lg.float().log_softmax(-1), classes).to(lg.dtype),
                  f"log_prob({_fmt(classes)})")


def prob(classes: Classes) -> Callable[[Tensor], Tensor]:
    """Softmax probability of ``classes`` (saturates: prefer `log_prob` or `logit_diff`)."""
    return _Named(lambda lg: _pick(lg.float().softmax(-1), classes).to(lg.dtype),
                  f"prob({_fmt(classes)})")


@dataclass(frozen=True)
class Recovery:
    """Normalised recovery ``(m_patched - m_corrupted) / (m_clean - m_corrupted)`` of a base
    metric: 1 = the patch restores the clean behaviour, 0 = no effect. Recipes that know the
    clean and corrupted runs apply the normalisation; called alone it is the base metric."""

    metric: Callable[[Tensor], Tensor]

    def __call__(self, logits: Tensor) -> Tensor:
        return self.metric(logits)

    def normalise(self, patched: Tensor, clean: Tensor, corrupted: Tensor) -> Tensor:
        denom = clean - corrupted
        if (denom.abs() < 1e-12).any():
            raise InputError(
                "Normalised recovery is undefined: the clean and corrupted metric values are equal "
                f"for some example ({clean.tolist()} vs {corrupted.tolist()}); choose inputs that "
                "differ in the metric, or use the raw metric."
            )
        return (patched - corrupted) / denom

    def __repr__(self) -> str:
        return f"recovery({self.metric!r})"


def recovery(metric: Callable[[Tensor], Tensor]) -> Recovery:
    """Wrap ``metric`` so recipes report normalised recovery (see `Recovery`)."""
    return Recovery(metric)


def metric_name(metric) -> str:
    return repr(metric) if isinstance(metric, (_Named, Recovery)) else getattr(metric, "__name__", "metric")


def _fmt(c: Classes) -> str:
    if isinstance(c, Tensor) and c.numel() > 1:
        return f"<{c.numel()} classes>"
    if isinstance(c, list) and len(c) > 1:
        return f"<{len(c)} classes>"
    return str(int(torch.as_tensor(c).flatten()[0]))
