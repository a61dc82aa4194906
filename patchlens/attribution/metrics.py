"""Evaluation metrics for attribution maps on the patch grid (batched).

- `deletion` / `insertion`: Petsiuk, Das & Saenko 2018 (RISE), patch-wise steps.
- `perturbation`: Chefer, Gur & Wolf 2021 positive / negative perturbation.
- `pointing_game`: Zhang et al. 2016 (tolerance as in TorchRay, scaled to the image size).
- `energy_pointing_game`: Wang et al. 2020 (Score-CAM).

``model`` is any callable ``normalised images [N, C, H, W] -> logits [N, classes]`` with a
``cfg.patch_size`` (a `HookedViT`); perturbed images are run in batches of ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from patchlens.errors import InputError
from patchlens.patching.attribution_map import AttributionMap, as_values


def _setup(model, images: Tensor, maps, target):
    v = as_values(maps).to(images.device).float()
    b = images.shape[0]
    if v.shape[0] != b:
        raise InputError(f"{v.shape[0]} maps for {b} images.")
    ph, pw = model.cfg.patch_size
    gh, gw = images.shape[-2] // ph, images.shape[-1] // pw
    if tuple(v.shape[1:]) != (gh, gw):
        raise InputError(f"maps have grid {tuple(v.shape[1:])}, the images' grid is {(gh, gw)}.")
    if target is None:
        if not isinstance(maps, AttributionMap):
            raise InputError("target= is needed when maps is a tensor.")
        target = maps.target
    t = torch.as_tensor(target, dtype=torch.long).flatten()
    t = t.expand(b) if t.numel() == 1 else t
    return v, t.to(images.device), (ph, pw)


def _ranking(v: Tensor) -> Tensor:
    """Patch indices ``[B, P]`` from most to least relevant (ties: raster order)."""
    return torch.argsort(-v.flatten(1), dim=1, stable=True)


def _step_masks(order: Tensor, counts: Sequence[int], grid: tuple[int, int]) -> Tensor:
    """``[B, S, gh, gw]`` bool: the first ``counts[s]`` patches of ``order`` per image."""
    b, p = order.shape
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(p, device=order.device).expand(b, p))
    c = torch.as_tensor(list(counts), device=order.device)
    return (rank[:, None, :] < c[None, :, None]).view(b, len(c), *grid)


def _probabilities(model, images: Tensor, start: Tensor, end: Tensor, masks: Tensor,
                   patch: tuple[int, int], target: Tensor, batch_size: int) -> Tensor:
    """Softmax probability of ``target`` on images showing ``end`` where ``masks`` is on and
    ``start`` elsewhere: ``[B, S]``."""
    b, s = masks.shape[:2]
    pix = masks.repeat_interleave(patch[0], 2).repeat_interleave(patch[1], 3)[:, :, None]
    out = torch.empty(b * s, device=images.device)
    flat_t = target.repeat_interleave(s)
    with torch.inference_mode():
        for i in range(0, b * s, batch_size):
            j = torch.arange(i, min(i + batch_size, b * s), device=images.device)
            img, step = j // s, j % s
            m = pix[img, step].to(images.dtype)
            x = end[img] * m + start[img] * (1 - m)
            out[j] = model(x).float().softmax(-1).gather(1, flat_t[j][:, None])[:, 0]
    return out.view(b, s)


def _auc(curve: Tensor, xs: Tensor) -> Tensor:
    return torch.trapezoid(curve, xs.to(curve), dim=-1)


def deletion(model, images, maps, target=None, step: int = 1, baseline: Tensor | None = None,
             batch_size: int = 256, return_curve: bool = False):
    """Deletion AUC (Petsiuk et al. 2018): remove patches from most to least relevant, ``step``
    at a time, replacing them by ``baseline`` (default the mean colour = zeros in normalised
    space); the target's softmax probability after each step, AUC by the trapezoid rule over
    the fraction removed (0..1). Lower is better. Returns ``[B]`` (and the curve ``[B, S]``)."""
    v, t, patch = _setup(model, images, maps, target)
    p = v[0].numel()
    counts = list(range(0, p, step)) + [p]
    base = torch.zeros_like(images) if baseline is None else baseline.expand_as(images)
    masks = _step_masks(_ranking(v), counts, tuple(v.shape[1:]))
    curve = _probabilities(model, images, images, base, masks, patch, t, batch_size)
    auc = _auc(curve, torch.tensor(counts) / p)
    return (auc, curve) if return_curve else auc


def insertion(model, images, maps, target=None, step: int = 1, blur_kernel: int = 11,
              blur_sigma: float = 5.0, start: Tensor | None = None, batch_size: int = 256,
              return_curve: bool = False):
    """Insertion AUC (Petsiuk et al. 2018): reveal patches from most to least relevant on a
    blurred copy (Gaussian, kernel 11, sigma 5, in pixel space); the target's softmax
    probability per step, AUC over the fraction revealed. Higher is better. ``[B]``."""
    from patchlens.model.preprocess import blur

    v, t, patch = _setup(model, images, maps, target)
    p = v[0].numel()
    counts = list(range(0, p, step)) + [p]
    blurred = blur(model.cfg, images, blur_kernel, blur_sigma) if start is None else start
    masks = _step_masks(_ranking(v), counts, tuple(v.shape[1:]))
    curve = _probabilities(model, images, blurred, images, masks, patch, t, batch_size)
    auc = _auc(curve, torch.tensor(counts) / p)
    return (auc, curve) if return_curve else auc


def perturbation(model, images, maps, target=None, mode: str = "positive",
                 fractions: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                 batch_size: int = 256, return_curve: bool = False):
    """Positive / negative perturbation AUC (Chefer et al. 2021, CVPR): remove (set to the mean
    colour, zeros in normalised space) the ``fraction`` most relevant patches (``"positive"``,
    lower is better) or least relevant (``"negative"``, higher is better), rounded to whole
    patches; target probability per step; AUC by the trapezoid rule over ``fractions``."""
    if mode not in ("positive", "negative"):
        raise InputError(f"mode must be 'positive' or 'negative', got {mode!r}.")
    v, t, patch = _setup(model, images, maps, target)
    p = v[0].numel()
    counts = [round(f * p) for f in fractions]
    order = _ranking(v if mode == "positive" else -v)
    masks = _step_masks(order, counts, tuple(v.shape[1:]))
    curve = _probabilities(model, images, images, torch.zeros_like(images), masks, patch, t,
                           batch_size)
    auc = _auc(curve, torch.tensor(list(fractions), dtype=torch.float32))
    return (auc, curve) if return_curve else auc


def _pixel_masks(masks: Tensor, shape: tuple[int, int]) -> Tensor:
    """Bool masks ``[B, H, W]`` from masks or boxes ``[B, 4]`` (x0, y0, x1, y1, end-exclusive)."""
    masks = torch.as_tensor(masks)
    if masks.ndim == 2 and masks.shape[1] == 4:
        h, w = shape
        ys = torch.arange(h).view(1, h, 1)
        xs = torch.arange(w).view(1, 1, w)
        bx = masks.view(-1, 4, 1, 1)
        return (xs >= bx[:, 0]) & (xs < bx[:, 2]) & (ys >= bx[:, 1]) & (ys < bx[:, 3])
    if masks.ndim != 3 or tuple(masks.shape[-2:]) != tuple(shape):
        raise InputError(f"masks must be [B, {shape[0]}, {shape[1]}] or boxes [B, 4]; got "
                         f"{tuple(masks.shape)}.")
    return masks.bool()


def pointing_game(maps, masks, image_size: tuple[int, int] | None = None,
                  tolerance: float | None = None) -> Tensor:
    """Pointing game (Zhang et al. 2016): 1.0 where the centre of the map's highest patch (first
    in raster order on ties) lies within ``tolerance`` pixels of the ground-truth mask
    ``[B, H, W]`` (or box ``[B, 4]``), pixels taken as unit squares.
    Default tolerance 15 px at 224 px (TorchRay), scaled: ``15 * min(H, W) / 224``. ``[B]``."""
    v = as_values(maps).float()
    b, gh, gw = v.shape
    if image_size is None:
        m = torch.as_tensor(masks)
        if m.ndim != 3:
            raise InputError("image_size= is needed when masks are boxes.")
        image_size = tuple(m.shape[-2:])
    h, w = image_size
    gt = _pixel_masks(masks, (h, w))
    tol = 15.0 * min(h, w) / 224 if tolerance is None else float(tolerance)
    best = v.flatten(1).argmax(1)
    cy = (best // gw + 0.5) * (h / gh)
    cx = (best % gw + 0.5) * (w / gw)
    ys = torch.arange(h).view(1, h, 1).float()
    xs = torch.arange(w).view(1, 1, w).float()
    # distance from the point to each pixel's square [y, y + 1) x [x, x + 1)
    dy = (ys - cy.view(b, 1, 1)).clamp(min=0) + (cy.view(b, 1, 1) - ys - 1).clamp(min=0)
    dx = (xs - cx.view(b, 1, 1)).clamp(min=0) + (cx.view(b, 1, 1) - xs - 1).clamp(min=0)
    d2 = dy ** 2 + dx ** 2
    near = (d2 <= tol ** 2) & gt
    return near.flatten(1).any(1).float()


def energy_pointing_game(maps, masks, image_size: tuple[int, int] | None = None
                         ) -> Float[Tensor, " batch"]:
    """Energy-based pointing game (Wang et al. 2020, Score-CAM): the share of the positive
    attribution mass inside the mask ``[B, H, W]`` (or box ``[B, 4]``), with every pixel taking
    its patch's value. 0 where the map has no positive mass. ``[B]``."""
    v = as_values(maps).float()
    if image_size is None:
        m = torch.as_tensor(masks)
        if m.ndim != 3:
            raise InputError("image_size= is needed when masks are boxes.")
        image_size = tuple(m.shape[-2:])
    gt = _pixel_masks(masks, image_size).float()
    up = F.interpolate(v[:, None].clamp(min=0), size=image_size, mode="nearest")[:, 0]
    total = up.flatten(1).sum(1)
    inside = (up * gt).flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.zeros_like(total))


__all__ = ["deletion", "insertion", "perturbation", "pointing_game", "energy_pointing_game"]
