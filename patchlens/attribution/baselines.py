"""Baseline attribution methods, one signature each:
``method(model, images, target=None, **kw) -> AttributionMap`` with values on the patch grid.

Attention methods read cached attention patterns (``blocks.{l}.attn.hook_pattern``); Grad-CAM
and occlusion come from pytorch-grad-cam and captum, with pixel attributions summed per patch.
``images`` are normalised model inputs ``[batch, chan, H, W]`` in the model's dtype.

Dtype: every method computes in, and returns, `map_dtype` of the model's dtype (float64 stays
float64 end to end; float16 / bfloat16 models are run in their dtype and their outputs,
activations and gradients are widened to float32 before anything is summed).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from patchlens.checks import check_int, check_number
from patchlens.errors import InputError
from patchlens.metrics import logit
from patchlens.patching.attribution_map import AttributionMap, map_dtype, resolve_target
from patchlens.patching.checks import broadcast_images, check_batch
from patchlens.patching.engine import capture, capture_grads


def _prepare(model, images: Tensor, target) -> Tensor:
    check_batch(model, images, "images")
    return resolve_target(model, images, target)


def _layer(model, layer) -> int:
    n = model.cfg.n_layers
    return check_int("layer", layer, -n, n - 1) % n


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
    check_number("residual", residual, 0.0, 1.0, high_open=True)
    layout = model.layout_for(tuple(images.shape[-2:]))
    dt = map_dtype(images.dtype)
    rel = None
    for a in _patterns(model, images):
        a = _fuse(a.to(dt), head_fusion)
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
    layer = _layer(model, layer)
    layout = model.layout_for(tuple(images.shape[-2:]))
    a = _patterns(model, images)[layer].to(map_dtype(images.dtype)).mean(1)
    return _make(model, images, _query_row(model, layout, a), "class_attention", tgt,
                 layer=layer)


def chefer(model, images, target=None) -> AttributionMap:
    """Generic attention explainability (Chefer, Gur & Wolf 2021b, ICCV): ``R = I``; per layer
    ``R += mean_heads(clamp(dA * A, min=0)) @ R`` with ``dA`` the gradient of the target logit
    with respect to the attention pattern; the class-token row over patches."""
    tgt = _prepare(model, images, target)
    layout = model.layout_for(tuple(images.shape[-2:]))
    names = _pattern_hooks(model)
    run = capture_grads(model, images, names, logit(tgt.to(images.device)))
    t = layout.n_tokens
    dt = map_dtype(images.dtype)
    rel = torch.eye(t, device=images.device, dtype=dt).expand(images.shape[0], t, t)
    for n in names:
        cam = (run.grads[n].to(dt) * run.acts[n].to(dt)).clamp(min=0).mean(1)
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
    CAM (channel weights = mean gradient over the grid, ReLU of the weighted sum), at grid
    resolution, divided per image by ``max - min`` after subtracting ``min`` (0 where the CAM
    is constant), in the model's dtype (see `_grid_cam_class`)."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    tgt = _prepare(model, images, target)
    layer = _layer(model, layer)
    layout = model.layout_for(tuple(images.shape[-2:]))
    gh, gw = layout.grid
    dt = map_dtype(images.dtype)

    def reshape(t: Tensor) -> Tensor:  # widened before the library turns it into numpy
        t = t[:, layout.n_prefix:].reshape(t.shape[0], gh, gw, t.shape[-1]).permute(0, 3, 1, 2)
        return t.to(dt)

    was_training = model.training
    x = images.detach().clone().requires_grad_(True)  # a graph even with frozen parameters
    with torch.enable_grad(), _no_param_grads(model):
        cam = _grid_cam_class()(model=model, target_layers=[model.blocks[layer].ln1],
                                reshape_transform=reshape)
        try:
            out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in tgt])
        finally:
            cam.activations_and_grads.release()
    model.train(was_training)
    return _make(model, images, torch.as_tensor(out), "gradcam", tgt, layer=layer)


def _grid_cam_class():
    """The Grad-CAM class (built on first use: pytorch-grad-cam imports OpenCV)."""
    from pytorch_grad_cam import GradCAM

    class _GridCAM(GradCAM):
        """pytorch-grad-cam's Grad-CAM per target layer (its ``get_cam_image``: weights, weighted
        sum) and ReLU, kept at grid resolution and in the activations' dtype: the library's
        ``scale_cam_image`` casts to float32 and resizes with OpenCV, so the min-max scaling is
        done here instead (float64 models keep float64)."""

        def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):
            acts = [a.numpy() for a in self.activations_and_grads.activations]
            grads = [g.numpy() for g in self.activations_and_grads.gradients]
            return [np.maximum(self.get_cam_image(input_tensor, layer, targets, a, g,
                                                  eigen_smooth), 0)
                    for layer, a, g in zip(self.target_layers, acts, grads)]

        def aggregate_multi_layers(self, cams):
            cam = np.mean(np.stack(cams, 1), 1)  # [B, gh, gw]
            cam = cam - cam.min(axis=(1, 2), keepdims=True)
            top = cam.max(axis=(1, 2), keepdims=True)
            return np.divide(cam, top, out=np.zeros_like(cam), where=top > 0)

    return _GridCAM


def _baseline(images: Tensor, baseline) -> Tensor:
    """``"mean"`` (zeros in normalised space) or an image tensor broadcast to ``images``."""
    if isinstance(baseline, str) and baseline == "mean":
        return torch.zeros_like(images)
    if not isinstance(baseline, Tensor):
        raise InputError(f"baseline must be 'mean' or a normalised image tensor [C, H, W] / "
                         f"[1 or batch, C, H, W], got {baseline!r}.")
    return broadcast_images(images, baseline, "baseline")


def integrated_gradients(model, images, target=None, n_steps: int = 32,
                         baseline: str | Tensor = "mean",
                         internal_batch_size: int | None = 256) -> AttributionMap:
    """Integrated Gradients (Sundararajan et al. 2017): ``(x - x') * int_0^1 dF_t(x' + a (x -
    x'))/dx da`` with the ``n_steps``-point Gauss-Legendre rule (captum's default), from the
    mean-colour image (zeros in normalised space) or a given baseline ``x'``; pixel
    attributions summed per patch. ``internal_batch_size`` interpolated images per forward.

    Computed with `torch.autograd.grad` on the interpolated inputs (no hooks, parameters'
    ``.grad`` untouched), summed in the model's dtype: captum's implementation multiplies the
    gradients by float32 quadrature weights, which caps a float64 model at float32 accuracy.
    Equal to captum's ``IntegratedGradients`` in float32 (tests/test_reliability.py)."""
    tgt = _prepare(model, images, target)
    n_steps = check_int("n_steps", n_steps, 1)
    chunk = check_int("internal_batch_size", internal_batch_size, 1, none=True)
    base = _baseline(images, baseline)
    dt = map_dtype(images.dtype)
    nodes, weights = np.polynomial.legendre.leggauss(n_steps)
    alphas, weights = (nodes + 1) / 2, weights / 2  # Gauss-Legendre on [0, 1]
    b = images.shape[0]
    rows = [(k, j) for k in range(n_steps) for j in range(b)]  # (step, image)
    chunk = chunk or len(rows)
    total = torch.zeros(images.shape, dtype=dt, device=images.device)
    diff = images - base
    cls = tgt.to(images.device)
    with torch.enable_grad():
        for i in range(0, len(rows), chunk):
            ks = torch.tensor([k for k, _ in rows[i:i + chunk]])
            js = torch.tensor([j for _, j in rows[i:i + chunk]], device=images.device)
            a = torch.as_tensor(alphas[ks.numpy()], dtype=images.dtype, device=images.device)
            z = (base[js] + a.view(-1, 1, 1, 1) * diff[js]).detach().requires_grad_(True)
            score = model(z).gather(1, cls[js][:, None]).sum()
            (g,) = torch.autograd.grad(score, z)
            w = torch.as_tensor(weights[ks.numpy()], dtype=dt, device=images.device)
            total.index_add_(0, js, g.to(dt) * w.view(-1, 1, 1, 1))
    attr = total * diff.to(dt)
    return _make(model, images, _pool_pixels(model, attr), "integrated_gradients", tgt,
                 n_steps=n_steps)


def occlusion(model, images, target=None, window: int | None = None,
              perturbations_per_eval: int = 64) -> AttributionMap:
    """Occlusion (Zeiler & Fergus 2014) through captum: each patch (or each ``window x window``
    tile, stride = window; the last row / column of tiles is smaller when ``window`` does not
    divide the image) set to the mean colour (zeros in normalised space). Values in logit
    units: per patch, the drop of the target logit when that patch is occluded (with another
    ``window``, the mean over the patch's pixels of the drop of the tile covering each pixel),
    so occlusion and CAAP maps share a scale (captum gives every input of a tile the tile's
    drop; summing them per patch would multiply it by ``C * h * w``). Non-overlapping windows
    are feature ablation, so this runs captum's ``FeatureAblation`` on the tiles (its
    ``Occlusion`` divides by a float32 count, which caps a float64 model at float32
    accuracy)."""
    from captum.attr import FeatureAblation

    tgt = _prepare(model, images, target)
    _, c, h, w = images.shape
    window = check_int("window", window, 1, min(h, w), none=True)
    ppe = check_int("perturbations_per_eval", perturbations_per_eval, 1)
    ph, pw = model.cfg.patch_size
    wh, ww = (ph, pw) if window is None else (window, window)
    rows = torch.arange(h, device=images.device) // wh
    cols = torch.arange(w, device=images.device) // ww
    tiles = (rows[:, None] * (-(-w // ww)) + cols[None, :]).expand(1, c, h, w)
    dt = map_dtype(images.dtype)

    def forward(z: Tensor) -> Tensor:  # half-precision logits compared in float32
        return model(z).to(dt)

    with torch.inference_mode():
        attr = FeatureAblation(forward).attribute(
            images, baselines=0.0, target=tgt.tolist(), feature_mask=tiles,
            perturbations_per_eval=ppe)
    drop = _pool_pixels(model, attr.to(dt)) / (c * ph * pw)  # mean over the patch's inputs
    return _make(model, images, drop, "occlusion", tgt)


def rise(model, images, target=None, n_masks: int = 1000, cells: int | None = None,
         p_keep: float = 0.5, seed: int = 0, batch_size: int = 256) -> AttributionMap:
    """RISE (Petsiuk, Das & Saenko 2018): ``sum_i p_i(target) M_i / (N p_keep)`` over ``N``
    random binary ``cells x cells`` masks, bilinearly upsampled and randomly shifted (seeded);
    masked-out pixels take the mean colour (zeros in normalised space). Pixel saliency averaged
    per patch. Masks, probabilities and sums are in the model's dtype (float32 for half)."""
    tgt = _prepare(model, images, target)
    n_masks = check_int("n_masks", n_masks, 1)
    check_int("cells", cells, 1, none=True)
    p_keep = check_number("p_keep", p_keep, 0.0, 1.0, low_open=True)
    seed = check_int("seed", seed)
    batch_size = check_int("batch_size", batch_size, 1)
    b, _, h, w = images.shape
    gh, gw = h // model.cfg.patch_size[0], w // model.cfg.patch_size[1]
    s = cells or max(2, min(gh, gw) // 2)
    dt = map_dtype(images.dtype)
    g = torch.Generator().manual_seed(seed)
    cell_h, cell_w = -(-h // s), -(-w // s)
    grid = (torch.rand(n_masks, 1, s, s, generator=g) < p_keep).to(dt)
    up = F.interpolate(grid, size=((s + 1) * cell_h, (s + 1) * cell_w), mode="bilinear",
                       align_corners=False)
    dx = torch.randint(0, cell_h, (n_masks,), generator=g)
    dy = torch.randint(0, cell_w, (n_masks,), generator=g)
    masks = torch.stack([up[i, 0, dx[i]:dx[i] + h, dy[i]:dy[i] + w] for i in range(n_masks)])
    masks = masks.to(images.device)  # [N, H, W] in dt
    sal = torch.zeros(b, h, w, device=images.device, dtype=dt)
    with torch.inference_mode():
        for j in range(b):
            t = int(tgt[j])
            for i in range(0, n_masks, batch_size):
                m = masks[i:i + batch_size]
                p = model(images[j:j + 1] * m[:, None].to(images.dtype)).to(dt).softmax(-1)[:, t]
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
