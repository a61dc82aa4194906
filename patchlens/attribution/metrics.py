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

from patchlens.checks import check_int, check_number
from patchlens.errors import InputError
from patchlens.metrics import resolve_classes
from patchlens.patching.attribution_map import AttributionMap, as_values, map_dtype
from patchlens.patching.checks import broadcast_images


def _setup(model, images: Tensor, maps, target):
    """Checked maps ``[B, gh, gw]`` (in `map_dtype`), targets ``[B]`` and the patch size."""
    check = getattr(model, "check_images", None)
    if check is not None:
        check(images)
    elif not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise InputError("images must be a float tensor [B, C, H, W].")
    b = images.shape[0]
    if b == 0:
        raise InputError("images is empty (0 images); pass at least one image.")
    v = _finite_maps(maps).to(images.device)
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
    # a plain callable has no n_classes: its classes are checked against its logits
    n_classes = getattr(model.cfg, "n_classes", None) or 2**62
    t = resolve_classes(target, b, n_classes, "target")
    return v, t.to(images.device), (ph, pw)


def _finite_maps(maps) -> Tensor:
    """``as_values(maps)`` in `map_dtype`, refusing NaN / inf (a NaN ranks arbitrarily)."""
    v = as_values(maps)
    if v.is_complex():
        raise InputError(f"maps must be real numbers, got dtype {v.dtype}.")
    v = v.to(map_dtype(v.dtype) if v.is_floating_point() else torch.float32)
    if not torch.isfinite(v).all():
        raise InputError("maps contain NaN or infinite values; the ranking of patches (and the "
                         "location of the maximum) would be arbitrary. Fix the attribution "
                         "method's output first.")
    return v


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
    dt = map_dtype(images.dtype)
    out = torch.empty(b * s, device=images.device, dtype=dt)
    flat_t = target.repeat_interleave(s)
    with torch.inference_mode():
        for i in range(0, b * s, batch_size):
            j = torch.arange(i, min(i + batch_size, b * s), device=images.device)
            img, step = j // s, j % s
            m = pix[img, step].to(images.dtype)
            x = end[img] * m + start[img] * (1 - m)
            logits = model(x)
            if int(flat_t[j].max()) >= logits.shape[-1]:
                raise InputError(f"target {int(flat_t[j].max())} is out of range: the model "
                                 f"returns {logits.shape[-1]} classes.")
            out[j] = logits.to(dt).softmax(-1).gather(1, flat_t[j][:, None])[:, 0]
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
    step, batch_size = _check_steps(step, batch_size)
    p = v[0].numel()
    counts = list(range(0, p, step)) + [p]
    base = (torch.zeros_like(images) if baseline is None
            else broadcast_images(images, baseline, "baseline"))
    masks = _step_masks(_ranking(v), counts, tuple(v.shape[1:]))
    curve = _probabilities(model, images, images, base, masks, patch, t, batch_size)
    auc = _auc(curve, torch.tensor(counts, dtype=torch.float64) / p)
    return (auc, curve) if return_curve else auc


def insertion(model, images, maps, target=None, step: int = 1, blur_kernel: int = 11,
              blur_sigma: float = 5.0, start: Tensor | None = None, batch_size: int = 256,
              return_curve: bool = False):
    """Insertion AUC (Petsiuk et al. 2018): reveal patches from most to least relevant on a
    blurred copy (Gaussian, kernel 11, sigma 5, in pixel space); the target's softmax
    probability per step, AUC over the fraction revealed. Higher is better. ``[B]``."""
    from patchlens.model.preprocess import blur

    v, t, patch = _setup(model, images, maps, target)
    step, batch_size = _check_steps(step, batch_size)
    p = v[0].numel()
    counts = list(range(0, p, step)) + [p]
    blurred = (blur(model.cfg, images, blur_kernel, blur_sigma) if start is None
               else broadcast_images(images, start, "start"))
    masks = _step_masks(_ranking(v), counts, tuple(v.shape[1:]))
    curve = _probabilities(model, images, blurred, images, masks, patch, t, batch_size)
    auc = _auc(curve, torch.tensor(counts, dtype=torch.float64) / p)
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
    _, batch_size = _check_steps(1, batch_size)
    fractions = _check_fractions(fractions)
    p = v[0].numel()
    counts = [round(f * p) for f in fractions]
    order = _ranking(v if mode == "positive" else -v)
    masks = _step_masks(order, counts, tuple(v.shape[1:]))
    curve = _probabilities(model, images, images, torch.zeros_like(images), masks, patch, t,
                           batch_size)
    auc = _auc(curve, torch.tensor(fractions, dtype=torch.float64))
    return (auc, curve) if return_curve else auc


def _check_steps(step, batch_size) -> tuple[int, int]:
    return check_int("step", step, 1), check_int("batch_size", batch_size, 1)


def _check_fractions(fractions) -> list[float]:
    """At least two increasing fractions in [0, 1] (the trapezoid AUC needs two points)."""
    try:
        fr = [check_number("fractions", f, 0.0, 1.0) for f in fractions]
    except TypeError:
        raise InputError(f"fractions must be a sequence of numbers in [0, 1], got "
                         f"{fractions!r}.") from None
    if len(fr) < 2 or any(a >= b for a, b in zip(fr, fr[1:])):
        raise InputError(f"fractions must be at least two strictly increasing numbers in "
                         f"[0, 1] (the AUC is over them), got {list(fractions)!r}.")
    return fr


def _pixel_masks(masks: Tensor, shape: tuple[int, int] | None, b: int | None) -> Tensor:
    """Bool masks ``[B, H, W]`` from masks or boxes ``[B, 4]`` (x0, y0, x1, y1, end-exclusive).
    Masks are boolean, or numbers that are all 0 or 1 (a soft mask is refused, not rounded)."""
    try:
        masks = torch.as_tensor(masks)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"masks must be a tensor [B, H, W] or boxes [B, 4], got "
                         f"{type(masks).__name__}.") from None
    if shape is None:  # conversion only
        return masks
    if masks.ndim == 0 or masks.shape[0] != b:
        raise InputError(f"masks has shape {tuple(masks.shape)}: {b} maps need {b} masks "
                         "[B, H, W] or boxes [B, 4].")
    if masks.is_complex() or (masks.is_floating_point() and not torch.isfinite(masks).all()):
        raise InputError("masks contain NaN, infinite or complex values.")
    if masks.ndim == 2 and masks.shape[1] == 4:
        h, w = shape
        ys = torch.arange(h).view(1, h, 1)
        xs = torch.arange(w).view(1, 1, w)
        bx = masks.view(-1, 4, 1, 1)
        return (xs >= bx[:, 0]) & (xs < bx[:, 2]) & (ys >= bx[:, 1]) & (ys < bx[:, 3])
    if masks.ndim != 3 or tuple(masks.shape[-2:]) != tuple(shape):
        raise InputError(f"masks must be [B, {shape[0]}, {shape[1]}] or boxes [B, 4]; got "
                         f"{tuple(masks.shape)}.")
    if masks.dtype != torch.bool and not ((masks == 0) | (masks == 1)).all():
        raise InputError(f"masks must be boolean (or all 0 / 1), got {masks.dtype} values such "
                         f"as {masks[(masks != 0) & (masks != 1)][0].item()!r}; threshold a "
                         "soft mask yourself (e.g. mask > 0.5).")
    return masks.bool()


def _image_size(maps, masks, image_size) -> tuple[int, int]:
    """The pixel size the masks live in: given, a pixel mask's own, or (for boxes) the size of
    the `AttributionMap`'s images."""
    if image_size is None:
        m = masks if isinstance(masks, Tensor) else _pixel_masks(masks, None, None)
        if m.ndim == 3:
            return tuple(m.shape[-2:])
        images = getattr(maps, "images", None)
        if images is not None:
            return tuple(images.shape[-2:])
        raise InputError("Boxes [B, 4] do not say how large the images are: pass "
                         "image_size=(H, W) (or an AttributionMap that carries its images).")
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or not all(check_int("image_size", v, 1) for v in image_size)):
        raise InputError(f"image_size must be (H, W), got {image_size!r}.")
    return tuple(image_size)


def pointing_game(maps, masks, image_size: tuple[int, int] | None = None,
                  tolerance: float | None = None) -> Tensor:
    """Pointing game (Zhang et al. 2016): 1.0 where the centre of the map's highest patch (first
    in raster order on ties) lies within ``tolerance`` pixels of the ground-truth mask
    ``[B, H, W]`` (or box ``[B, 4]``), pixels taken as unit squares.
    Default tolerance 15 px at 224 px (TorchRay), scaled: ``15 * min(H, W) / 224``. ``[B]``."""
    v = _finite_maps(maps)
    b, gh, gw = v.shape
    h, w = _image_size(maps, masks, image_size)
    gt = _pixel_masks(masks, (h, w), b)
    tol = (15.0 * min(h, w) / 224 if tolerance is None
           else check_number("tolerance", tolerance, 0.0))
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
    return near.flatten(1).any(1).to(v.dtype)


def energy_pointing_game(maps, masks, image_size: tuple[int, int] | None = None
                         ) -> Float[Tensor, " batch"]:
    """Energy-based pointing game (Wang et al. 2020, Score-CAM): the share of the positive
    attribution mass inside the mask ``[B, H, W]`` (or box ``[B, 4]``), with every pixel taking
    its patch's value. 0 where the map has no positive mass. ``[B]``."""
    v = _finite_maps(maps)
    image_size = _image_size(maps, masks, image_size)
    gt = _pixel_masks(masks, image_size, v.shape[0]).to(v.dtype)
    up = F.interpolate(v[:, None].clamp(min=0), size=image_size, mode="nearest")[:, 0]
    total = up.flatten(1).sum(1)
    inside = (up * gt).flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.zeros_like(total))


__all__ = ["deletion", "insertion", "perturbation", "pointing_game", "energy_pointing_game"]
