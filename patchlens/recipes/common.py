"""Steps shared by the clean/corrupted recipes (activation and path patching)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError
from patchlens.metrics import Recovery, base_metric, check_metric_batch
from patchlens.patching.checks import check_finite_metric, check_metric_values


def check_pair(model, clean: Tensor, corrupted: Tensor) -> None:
    """Both are valid image batches of the same shape, with at least one image."""
    model.check_images(clean)
    model.check_images(corrupted)
    if clean.shape != corrupted.shape:
        raise InputError(
            f"clean and corrupted must have the same shape, got {tuple(clean.shape)} and "
            f"{tuple(corrupted.shape)}; pass aligned pairs (or one corrupted image repeated)."
        )
    if clean.shape[0] == 0:
        raise InputError("clean and corrupted are empty (0 images); pass at least one pair.")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """Raise `InputError` unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def metric_values(metric, logits: Tensor, b: int) -> Tensor:
    """``metric(logits)`` ``[b]``, checked (shape, float dtype, finite), detached."""
    values = check_metric_values(base_metric(metric)(logits), b)
    return check_finite_metric(values, "on the unpatched runs").detach()


def baseline_metrics(model, clean: Tensor, corrupted: Tensor, metric) -> tuple[Tensor, Tensor]:
    """The metric on the unpatched clean and corrupted runs, ``[B]`` each; checked before any
    sweep runs (for a `Recovery` metric: that the two differ beyond rounding noise)."""
    check_metric_batch(metric, clean.shape[0])
    with torch.inference_mode():
        m_clean = metric_values(metric, model(clean), clean.shape[0])
        m_corrupted = metric_values(metric, model(corrupted), clean.shape[0])
    if isinstance(metric, Recovery):
        Recovery.check(m_clean, m_corrupted)
    return m_clean, m_corrupted


def check_reference(diagnose: Any) -> None:
    """``diagnose=`` must be a fitted `patchlens.diagnostics.Reference` (or None)."""
    if diagnose is None:
        return
    from patchlens.diagnostics.reference import Reference

    if not isinstance(diagnose, Reference):
        raise InputError(
            f"diagnose= takes a fitted patchlens.diagnostics.Reference, got {diagnose!r}. Fit "
            "one on natural images first: ref = Reference.fit(model, images, sites=[site])."
        )
