"""Checks shared by the clean/corrupted recipes (activation and path patching)."""

from __future__ import annotations

import torch
from torch import Tensor

from patchlens.errors import InputError


def check_pair(model, clean: Tensor, corrupted: Tensor) -> None:
    model.check_images(clean)
    model.check_images(corrupted)
    if clean.shape != corrupted.shape:
        raise InputError(
            f"clean and corrupted must have the same shape, got {tuple(clean.shape)} and "
            f"{tuple(corrupted.shape)}; pass aligned pairs (or one corrupted image repeated)."
        )


def metric_values(metric, logits: Tensor, b: int) -> Tensor:
    values = metric(logits)
    if not isinstance(values, Tensor) or values.shape != (b,):
        got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise InputError(f"The metric must return one value per image, shape ({b},); got {got}.")
    if not torch.isfinite(values).all():
        raise InputError(f"The metric is not finite on the unpatched runs: {values.tolist()}.")
    return values.detach()
