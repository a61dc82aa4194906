"""Checks shared by the engine and the recipes: what a metric returned."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError


def check_metric_values(values: Any, n: int, where: str = "per image") -> Tensor:
    """``values`` must be a float tensor ``[n]`` (one value per row); returns it.

    Raises `InputError` for another type or shape, or integer / boolean values (which a mean
    over images would silently truncate or refuse after a whole sweep has run)."""
    if not isinstance(values, Tensor) or values.shape != (n,):
        got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise InputError(
            f"The metric must return one value {where}, a tensor of shape ({n},); it returned "
            f"{got}. Reduce over everything but the batch axis."
        )
    if not (values.is_floating_point() or values.is_complex()):
        raise InputError(
            f"The metric returned {values.dtype} values; patchlens averages and normalises "
            "metrics, so return floats (e.g. (logits.argmax(-1) == labels).float() for accuracy, "
            "though a metric linear in the logits shows effects that accuracy hides)."
        )
    return values


def check_finite_metric(values: Tensor, what: str) -> Tensor:
    """Raise `InputError` if ``values`` has NaN or infinite entries."""
    if not torch.isfinite(values).all():
        bad = torch.nonzero(~torch.isfinite(values)).flatten().tolist()
        raise InputError(f"The metric is not finite {what} (rows {bad[:5]}): "
                         f"{values.tolist()[:8]}.")
    return values
