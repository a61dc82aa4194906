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


def resolve_classes(classes: Classes, b: int, n_classes: int, name: str = "classes") -> Tensor:
    """An int or one integer class per image -> ``[b]`` long tensor on the CPU, checked
    (integer dtype, one per image, in ``[0, n_classes)``)."""
    t = torch.as_tensor(classes)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InputError(f"{name} must be an int or integer classes [batch], got dtype {t.dtype}.")
    t = t.long().flatten().cpu()
    if t.numel() == 1:
        t = t.expand(b).clone()
    if t.shape[0] != b:
        raise InputError(f"Got {t.shape[0]} {name} values for {b} images; pass one per image "
                         "(or a single int for all).")
    if (t < 0).any() or (t >= n_classes).any():
        raise InputError(f"{name} out of range for {n_classes} classes: {t.unique().tolist()}.")
    return t


def _per_row(classes: Classes, n: int, n_classes: int) -> Tensor:
    """Per-example classes repeated over ``n`` rows (``V`` variants x ``B`` images)."""
    c = torch.as_tensor(classes)
    if c.is_floating_point() or c.is_complex() or c.dtype == torch.bool:
        raise InputError(f"Metric classes must be ints, got dtype {c.dtype}.")
    c = c.long().flatten()
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
    #: how many per-example classes it was given (None: one class for every example)
    n_examples: int | None = None

    def __call__(self, logits: Tensor) -> Tensor:
        return self.fn(logits)

    def __repr__(self) -> str:
        return self.name


def _n_examples(*classes: Classes) -> int | None:
    sizes = {torch.as_tensor(c).numel() for c in classes} - {1}
    if len(sizes) > 1:
        raise InputError(f"Per-example class arguments have different lengths {sorted(sizes)}.")
    return sizes.pop() if sizes else None


def check_metric_batch(metric, b: int) -> None:
    """Raise `InputError` if ``metric`` was given per-example classes for another batch size
    than ``b`` (they would otherwise be cycled silently over the images)."""
    inner = metric.metric if isinstance(metric, Recovery) else metric
    k = getattr(inner, "n_examples", None)
    if k is not None and k != b:
        raise InputError(f"The metric {inner!r} was given {k} per-example classes for a batch of "
                         f"{b} images; pass one class per image (or a single int for all).")


def _upcast(lg: Tensor) -> Tensor:
    """Half-precision logits in float32 for the softmax; float32 / float64 stay as they are."""
    return lg.float() if lg.dtype in (torch.float16, torch.bfloat16) else lg


def logit(classes: Classes) -> Callable[[Tensor], Tensor]:
    """The logit of ``classes``."""
    return _Named(lambda lg: _pick(lg, classes), f"logit({_fmt(classes)})", _n_examples(classes))


def logit_diff(classes: Classes, other: Classes) -> Callable[[Tensor], Tensor]:
    """``logit[classes] - logit[other]`` (e.g. correct minus counterfactual answer)."""
    return _Named(lambda lg: _pick(lg, classes) - _pick(lg, other),
                  f"logit_diff({_fmt(classes)}, {_fmt(other)})", _n_examples(classes, other))


def log_prob(classes: Classes) -> Callable[[Tensor], Tensor]:
    """Log-probability (log-softmax) of ``classes``."""
    return _Named(lambda lg: _pick(_upcast(lg).log_softmax(-1), classes).to(lg.dtype),
                  f"log_prob({_fmt(classes)})", _n_examples(classes))


def prob(classes: Classes) -> Callable[[Tensor], Tensor]:
    """Softmax probability of ``classes`` (saturates: prefer `log_prob` or `logit_diff`)."""
    return _Named(lambda lg: _pick(_upcast(lg).softmax(-1), classes).to(lg.dtype),
                  f"prob({_fmt(classes)})", _n_examples(classes))


@dataclass(frozen=True)
class Recovery:
    """Normalised recovery ``(m_patched - m_corrupted) / (m_clean - m_corrupted)`` of a base
    metric: 1 = the patch restores the clean behaviour, 0 = no effect. It needs the clean and
    corrupted runs, so it is not a function of one run's logits: recipes that know both runs
    (`activation_patching`, `path_patching`) normalise with it; elsewhere call `normalise`."""

    metric: Callable[[Tensor], Tensor]

    def __call__(self, logits: Tensor) -> Tensor:
        raise InputError(
            f"{self!r} is normalised by the clean and corrupted runs, so it cannot score one run's "
            f"logits alone. Pass it to activation_patching / path_patching, call its base metric "
            f"({self.metric!r}: recovery(m).metric(logits)), or normalise values yourself with "
            "recovery(m).normalise(patched, clean, corrupted)."
        )

    @staticmethod
    def check(clean: Tensor, corrupted: Tensor) -> Tensor:
        """``clean - corrupted`` ``[B]``; raises `InputError` where it is within rounding noise
        of zero (relative to the values' size and dtype), where the ratio would be noise."""
        return recovery_denominator(clean, corrupted)

    def normalise(self, patched: Tensor, clean: Tensor, corrupted: Tensor) -> Tensor:
        """``(patched - corrupted) / (clean - corrupted)``, broadcast over leading axes."""
        return (patched - corrupted) / self.check(clean, corrupted)

    def __repr__(self) -> str:
        return f"recovery({self.metric!r})"


def recovery_denominator(clean: Tensor, corrupted: Tensor) -> Tensor:
    """``clean - corrupted``, refusing pairs whose difference is rounding noise: below
    ``64 * eps(dtype) * max(|clean|, |corrupted|, 1)`` (float32: ~8e-6 for values of order 1)."""
    denom = clean - corrupted
    dtype = denom.dtype if denom.is_floating_point() else torch.float32
    scale = torch.maximum(clean.abs(), corrupted.abs()).clamp_min(1.0)
    tol = 64 * torch.finfo(dtype).eps * scale
    bad = denom.abs() <= tol
    if bad.any():
        idx = torch.nonzero(bad).flatten().tolist()
        raise InputError(
            "Normalised recovery is undefined: the clean and corrupted metric values are equal "
            f"(up to {dtype} rounding) for example(s) {idx[:8]}: clean "
            f"{clean[bad].tolist()[:4]} vs corrupted {corrupted[bad].tolist()[:4]}. Choose "
            "pairs that differ in the metric, or use the raw metric."
        )
    return denom


def recovery(metric: Callable[[Tensor], Tensor]) -> Recovery:
    """Wrap ``metric`` so recipes report normalised recovery (see `Recovery`)."""
    if isinstance(metric, Recovery):
        raise InputError("recovery() was applied twice; wrap the base metric once.")
    return Recovery(metric)


def base_metric(metric: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The per-run metric behind ``metric`` (itself, or the metric a `Recovery` normalises)."""
    return metric.metric if isinstance(metric, Recovery) else metric


def metric_name(metric) -> str:
    return repr(metric) if isinstance(metric, (_Named, Recovery)) else getattr(metric, "__name__", "metric")


def _fmt(c: Classes) -> str:
    if isinstance(c, Tensor) and c.numel() > 1:
        return f"<{c.numel()} classes>"
    if isinstance(c, list) and len(c) > 1:
        return f"<{len(c)} classes>"
    return str(int(torch.as_tensor(c).flatten()[0]))
