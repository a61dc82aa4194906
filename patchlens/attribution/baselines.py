"""Baseline attribution methods, one signature each:
``method(model, images, target=None, **kw) -> AttributionMap`` with values on the patch grid.

Attention methods read cached attention patterns (``blocks.{l}.attn.hook_pattern``); gradient
and perturbation methods come from captum and pytorch-grad-cam, with pixel attributions summed
per patch. ``images`` are normalised model inputs ``[batch, chan, H, W]``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from patchlens.errors import InputError
from patchlens.metrics import logit
from patchlens.patching.attribution_map import AttributionMap, map_dtype, resolve_target
from patchlens.patching.engine import capture, capture_grads


def _prepare(model, images: Tensor, target) -> Tensor:
    model.check_images(images)
    return resolve_target(model, images, target)


def _make(model, images, values, method, target, **meta) -> AttributionMap:
    return AttributionMap(values.detach().to(map_dtype(images.dtype)).cpu(), method, target,
                          model.to_image(images).cpu(), meta)


def _query_row(model, layout, rel: Float[Tensor, "batch pos pos"]) -> Tensor:
    """The class-token row over patch tokens, as a grid (mean of patch rows without a cls)."""
    if layout.n_prefix and getattr(model.cfg, "class_token", True):
        row = rel[:, layout.cls]
    else:
        row = rel[:, layout.n_prefix:].mean(1)
    return layout.to_grid(row[:, layout.n_prefix:])


def _pool_pixels(model, attr: Float[Tensor, "batch chan H W"]) -> Float[Tensor, "batch gh gw"]:
    """Sum pixel attributions over channels and over each patch."""
    ph, pw = model.cfg.patch_size
    return F.avg_pool2d(attr.sum(1, keepdim=True), (ph, pw))[:, 0] * (ph * pw)


def _pattern_hooks(model) -> list[str]:
    return list(model.hook_aliases["pattern"].values())


def _patterns(model, x: Tensor) -> list[Tensor]:
    names = _pattern_hooks(model)
    acts = capture(model, x, names, return_type=None).acts
    return [acts[n] for n in names]


def attention_rollout(model, images, target=None, head_fusion: str = "mean",
                      residual: float = 0.5) -> AttributionMap:
    """Attention rollout (Abnar & Zuidema 2020, "Quantifying attention flow in transformers").

    ``R = prod_l normalise_rows(residual * I + (1 - residual) * mean_heads(A_l))`` (later layers
    on the left); the class-token row over the patch tokens. Class-agnostic: ``target`` only
    labels the map.
    """
    tgt = _prepare(model, images, target)
    layout = model.layout_for(tuple(images.shape[-2:]))
    rel = None
    for a in _patterns(model, images):
        a = _fuse(a, head_fusion)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = residual * eye + (1 - residual) * a
        a = a / a.sum(-1, keepdim=True)
        rel = a if rel is None else a @ rel
    return _make(model, images, _query_row(model, layout, rel), "rollout", tgt,
                 head_fusion=head_fusion, residual=residual)


def _fuse(a: Tensor, how: str) -> Tensor:
    if how == "mean":
        return a.mean(1)
    if how == "max":
        return a.amax(1)
    raise InputError(f"head_fusion must be 'mean' or 'max', got {how!r}.")


def class_attention(model, images, target=None, layer: int = -1) -> AttributionMap:
    """Class-token attention to each patch at one layer (default the last), mean over heads.
    Class-agnostic."""
    tgt = _prepare(model, images, target)
    layout = model.layout_for(tuple(images.shape[-2:]))
    n = model.cfg.n_layers
    if not -n <= layer < n:
        raise InputError(f"layer {layer} out of range for {n} layers.")
    a = _patterns(model, images)[layer % n].mean(1)
    return _make(model, images, _query_row(model, layout, a), "class_attention", tgt,
                 layer=layer % n)


def chefer(model, images, target=None) -> AttributionMap:
    """Generic attention explainability (Chefer, Gur & Wolf 2021b, ICCV): ``R = I``; per layer
    ``R += mean_heads(clamp(dA * A, min=0)) @ R`` with ``dA`` the gradient of the target logit
    with respect to the attention pattern; the class-token row over patches."""
    tgt = _prepare(model, images, target)
    layout = model.layout_for(tuple(images.shape[-2:]))
    names = _pattern_hooks(model)
    run = capture_grads(model, images, names, logit(tgt.to(images.device)))
    t = layout.n_tokens
    rel = torch.eye(t, device=images.device, dtype=images.dtype).expand(images.shape[0], t, t)
    for n in names:
        cam = (run.grads[n] * run.acts[n]).clamp(min=0).mean(1)
        rel = rel + cam @ rel
    return _make(model, images, _query_row(model, layout, rel), "chefer", tgt)


@contextlib.contextmanager
def _no_param_grads(model):
    """Backward passes here leave the parameters' ``.grad`` as they were."""
    params = list(model.parameters())
    saved = [p.grad for p in params]
    flags = [p.requires_grad for p in params]
    try:
        yield
    finally:
        for p, g, f in zip(params, saved, flags):
            p.grad = g
            p.requires_grad_(f)


def gradcam(model, images, target=None, layer: int = -2) -> AttributionMap:
    """Grad-CAM (Selvaraju et al. 2017) through pytorch-grad-cam on the tokens of
    ``blocks[layer].ln1`` reshaped to the grid (prefix tokens dropped). Default ``layer=-2``:
    at the last block only the class token feeds the head, so patch-token gradients there come
    through one attention step and are weak (see docs/attribution.md). Values are the library's
    ReLU-ed CAM, normalised to [0, 1] per image, at grid resolution."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    tgt = _prepare(model, images, target)
    layout = model.layout_for(tuple(images.shape[-2:]))
    n = model.cfg.n_layers
    if not -n <= layer < n:
        raise InputError(f"layer {layer} out of range for {n} layers.")
    gh, gw = layout.grid

    def reshape(t: Tensor) -> Tensor:
        return t[:, layout.n_prefix:].reshape(t.shape[0], gh, gw, t.shape[-1]).permute(0, 3, 1, 2)

    class _GridCAM(GradCAM):
        def get_target_width_height(self, input_tensor):
            return gw, gh

    was_training = model.training
    with torch.enable_grad(), _no_param_grads(model):
        cam = _GridCAM(model=model, target_layers=[model.blocks[layer % n].ln1],
                       reshape_transform=reshape)
        try:
            out = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in tgt])
        finally:
            cam.activations_and_grads.release()
    model.train(was_training)
    return _make(model, images, torch.as_tensor(out), "gradcam", tgt, layer=layer % n)


def integrated_gradients(model, images, target=None, n_steps: int = 32,
                         baseline: str | Tensor = "mean",
                         internal_batch_size: int | None = 256) -> AttributionMap:
    """Integrated Gradients (Sundararajan et al. 2017) through captum, from the mean-colour
    image (zeros in normalised space) or a given baseline; pixel attributions summed per patch."""
    from captum.attr import IntegratedGradients

    tgt = _prepare(model, images, target)
    base = torch.zeros_like(images) if isinstance(baseline, str) and baseline == "mean" else baseline
    with torch.enable_grad(), _no_param_grads(model):
        attr = IntegratedGradients(model).attribute(
            images, baselines=base, target=tgt.tolist(), n_steps=n_steps,
            internal_batch_size=internal_batch_size)
    return _make(model, images, _pool_pixels(model, attr.detach()), "integrated_gradients", tgt,
                 n_steps=n_steps)


def occlusion(model, images, target=None, window: int | None = None,
              perturbations_per_eval: int = 64) -> AttributionMap:
    """Occlusion (Zeiler & Fergus 2014) through captum: each patch (or ``window`` pixels, stride
    = window) set to the mean colour (zeros in normalised space). Values in logit units: per
    patch, the drop of the target logit when that patch is occluded (with another ``window``,
    the mean over the patch's pixels of the drop of the window covering each pixel), so
    occlusion and CAAP maps share a scale. captum spreads a window's drop over each of its
    ``C x h x w`` inputs; summing them would multiply the drop by ``C * h * w``."""
    from captum.attr import Occlusion

    tgt = _prepare(model, images, target)
    ph, pw = model.cfg.patch_size
    wh, ww = (ph, pw) if window is None else (window, window)
    c = images.shape[1]
    with torch.inference_mode():
        attr = Occlusion(model).attribute(
            images, sliding_window_shapes=(c, wh, ww), strides=(c, wh, ww), baselines=0.0,
            target=tgt.tolist(), perturbations_per_eval=perturbations_per_eval)
    drop = F.avg_pool2d(attr.mean(1, keepdim=True), (ph, pw))[:, 0]  # per-pixel drop, averaged
    return _make(model, images, drop, "occlusion", tgt)


def rise(model, images, target=None, n_masks: int = 1000, cells: int | None = None,
         p_keep: float = 0.5, seed: int = 0, batch_size: int = 256) -> AttributionMap:
    """RISE (Petsiuk, Das & Saenko 2018): ``sum_i p_i(target) M_i / (N p_keep)`` over ``N``
    random binary ``cells x cells`` masks, bilinearly upsampled and randomly shifted (seeded);
    masked-out pixels take the mean colour (zeros in normalised space). Pixel saliency averaged
    per patch."""
    tgt = _prepare(model, images, target)
    b, _, h, w = images.shape
    gh, gw = h // model.cfg.patch_size[0], w // model.cfg.patch_size[1]
    s = cells or max(2, min(gh, gw) // 2)
    g = torch.Generator().manual_seed(seed)
    cell_h, cell_w = -(-h // s), -(-w // s)
    grid = (torch.rand(n_masks, 1, s, s, generator=g) < p_keep).float()
    up = F.interpolate(grid, size=((s + 1) * cell_h, (s + 1) * cell_w), mode="bilinear",
                       align_corners=False)
    dx = torch.randint(0, cell_h, (n_masks,), generator=g)
    dy = torch.randint(0, cell_w, (n_masks,), generator=g)
    masks = torch.stack([up[i, 0, dx[i]:dx[i] + h, dy[i]:dy[i] + w] for i in range(n_masks)])
    masks = masks.to(images.device, images.dtype)  # [N, H, W]
    sal = torch.zeros(b, h, w, device=images.device)
    with torch.inference_mode():
        for j in range(b):
            t = int(tgt[j])
            for i in range(0, n_masks, batch_size):
                m = masks[i:i + batch_size]
                p = model(images[j:j + 1] * m[:, None]).float().softmax(-1)[:, t]
                sal[j] += (p[:, None, None] * m).sum(0)
    sal = sal / (n_masks * p_keep)
    ph, pw = model.cfg.patch_size
    return _make(model, images, F.avg_pool2d(sal[:, None], (ph, pw))[:, 0], "rise", tgt,
                 n_masks=n_masks, cells=s, p_keep=p_keep, seed=seed)


def caap_method(model, images, target=None, **kw: Any) -> AttributionMap:
    """CAAP (Izadi et al. 2026); see `patchlens.caap`."""
    from patchlens.recipes.caap import caap

    return caap(model, images, target, **kw)


METHODS = {
    "caap": caap_method,
    "rollout": attention_rollout,
    "chefer": chefer,
    "gradcam": gradcam,
    "integrated_gradients": integrated_gradients,
    "occlusion": occlusion,
    "rise": rise,
    "class_attention": class_attention,
}
