"""Checks shared by the engine, the recipes and the attribution methods: what a metric
returned, and the image batch they were given."""

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


def check_batch(model, x: Any, name: str = "images") -> Tensor:
    """``x`` must be a valid image batch for ``model`` (`HookedViT.check_images`: a float
    tensor ``[B, C, H, W]`` of the model's dtype and size, finite) with at least one image."""
    model.check_images(x)
    if x.shape[0] == 0:
        raise InputError(f"{name} is empty (0 images); pass at least one image.")
    return x


def broadcast_images(images: Tensor, given: Any, name: str) -> Tensor:
    """``given``, an image tensor ``[C, H, W]`` or ``[1 or B, C, H, W]`` of the images' dtype
    (a baseline, a start image), finite, broadcast to ``images`` ``[B, C, H, W]``; else an
    `InputError` naming ``name``."""
    if not isinstance(given, Tensor):
        raise InputError(f"{name} must be a normalised image tensor, got {type(given).__name__}.")
    g = given[None] if given.ndim == 3 else given
    if g.ndim != 4 or g.shape[1:] != images.shape[1:] or g.shape[0] not in (1, images.shape[0]):
        raise InputError(f"{name} has shape {tuple(given.shape)}; it must be [C, H, W], "
                         f"[1, C, H, W] or [batch, C, H, W] matching images {tuple(images.shape)}.")
    if g.dtype != images.dtype:
        raise InputError(f"{name} is {g.dtype} but the images are {images.dtype}; convert it "
                         f"with .to({images.dtype}).")
    if not torch.isfinite(g).all():
        raise InputError(f"{name} contains NaN or infinite values.")
    return g.to(images.device).expand_as(images)
