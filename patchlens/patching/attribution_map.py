"""`AttributionMap`: the one result type of every attribution method (CAAP and the baselines)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from patchlens.checks import check_int
from patchlens.errors import InputError
from patchlens.metrics import resolve_classes

#: what each method's values hold (shown by repr and plot)
HOLDS = {
    "caap": "effect: score(context + the patch) − score(context)",
    "rollout": "attention rollout (class token row)",
    "chefer": "gradient-weighted attention relevance",
    "gradcam": "Grad-CAM, normalised to [0, 1]",
    "integrated_gradients": "integrated gradients, summed per patch",
    "occlusion": "occlusion: score drop when the patch is filled, summed per patch",
    "rise": "RISE saliency",
    "class_attention": "last-layer class-token attention",
}


class MapIndexError(InputError, IndexError):
    """An image index outside an `AttributionMap` (an `IndexError` too, so iteration stops)."""


def _as_index_tensor(t, name: str) -> Tensor:
    """Integer classes as a tensor (floats, bools, strings refused)."""
    try:
        t = torch.as_tensor(t)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{name} must be integer classes, got {t!r}.") from None
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InputError(f"{name} must be integer classes, got dtype {t.dtype}.")
    return t


@dataclass
class AttributionMap:
    """Attribution values over the patch grid.

    Attributes:
        values: ``[batch, grid_h, grid_w]`` one value per patch (higher = more evidence for
            ``target``; the scale depends on the method, see ``meta`` and `holds`).
        method: the method's name (``"caap"``, ``"rollout"``, ...).
        target: ``[batch]`` the explained class of each image.
        images: ``[batch, 3, H, W]`` in [0, 1] (unnormalised), to lay the map over; optional.
        meta: what was run (parameters, timings, ...).
        baseline: ``[batch]`` for methods whose values are effects of a patch (CAAP): the score
            of the unpatched run (the context), so ``values`` are ``effects`` and
            ``patched = values + baseline``; None for the other methods.
    """

    values: Float[Tensor, "batch grid_h grid_w"]
    method: str
    target: Tensor
    images: Tensor | None = None
    meta: dict = field(default_factory=dict)
    baseline: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.values, Tensor) or self.values.ndim != 3:
            shape = tuple(self.values.shape) if isinstance(self.values, Tensor) else self.values
            raise InputError(f"AttributionMap values must be [batch, grid_h, grid_w], got {shape}.")
        t = _as_index_tensor(self.target, "target")
        self.target = t.long().flatten()
        if self.target.numel() == 1 and self.values.shape[0] > 1:
            self.target = self.target.expand(self.values.shape[0]).clone()
        if self.target.shape[0] != self.values.shape[0]:
            raise InputError(f"{self.target.shape[0]} targets for {self.values.shape[0]} maps.")
        if self.images is not None and self.images.shape[0] != self.values.shape[0]:
            raise InputError(f"{self.images.shape[0]} images for {self.values.shape[0]} maps.")

    # ---- what the values mean --------------------------------------------------------------
    @property
    def holds(self) -> str:
        """What ``values`` hold, in words."""
        return self.meta.get("holds") or HOLDS.get(self.method, f"{self.method} attribution")

    @property
    def effects(self) -> Tensor:
        """``[batch, grid_h, grid_w]`` patched − unpatched score: the values themselves, for
        methods that patch (CAAP); refused for the others."""
        if self.baseline is None:
            raise InputError(f"{self.method} values are not effects of a patch (they hold "
                             f"{self.holds}); use values.")
        return self.values

    @property
    def patched(self) -> Tensor:
        """``[batch, grid_h, grid_w]`` the score of each patched run (``values + baseline``)."""
        return self.effects + self.baseline.to(self.values.dtype).view(-1, 1, 1)

    # ---- access ---------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.values.shape[1:])

    def __len__(self) -> int:
        return self.values.shape[0]

    def __getitem__(self, i) -> AttributionMap:
        """The maps of a subset of the batch (int, slice or index tensor)."""
        if isinstance(i, int) and not isinstance(i, bool):
            n = len(self)
            if not -n <= i < n:  # IndexError also ends `for m in amap`
                raise MapIndexError(f"Map {i} is out of range: this AttributionMap holds {n} "
                                    f"map(s) (0..{n - 1}).")
            i = slice(i % n, i % n + 1)
        return AttributionMap(self.values[i], self.method, self.target[i],
                              None if self.images is None else self.images[i], dict(self.meta),
                              None if self.baseline is None else self.baseline[i])

    def upsample(self, H: int | None = None, W: int | None = None,
                 mode: str = "nearest") -> Float[Tensor, "batch H W"]:
        """Pixel maps ``[batch, H, W]`` (default: the images' size); ``mode="nearest"`` gives
        every pixel its patch's value, ``"bilinear"`` a smooth map."""
        if H is None:
            if self.images is None:
                raise InputError("upsample needs H, W when the map carries no images.")
            H, W = self.images.shape[-2:]
        W = H if W is None else W
        check_int("H", int(H) if isinstance(H, Tensor) else H, 1)
        check_int("W", int(W) if isinstance(W, Tensor) else W, 1)
        if mode not in ("nearest", "bilinear"):
            raise InputError(f"mode must be 'nearest' or 'bilinear', got {mode!r}.")
        kw = {} if mode == "nearest" else {"align_corners": False}
        return F.interpolate(self.values[:, None].float(), size=(H, W), mode=mode, **kw)[:, 0]

    def normalized(self) -> AttributionMap:
        """Each map divided by its largest absolute value (to compare methods visually)."""
        scale = self.values.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1)
        meta = dict(self.meta, holds=f"{self.holds}, divided by each map's max |value|")
        return AttributionMap(self.values / scale, self.method, self.target, self.images, meta)

    # ---- output ---------------------------------------------------------------------------
    def to_pandas(self):
        """One row per image and patch: ``image, row, col, value, target, method``."""
        import pandas as pd

        b, gh, gw = self.values.shape
        img, row, col = torch.meshgrid(torch.arange(b), torch.arange(gh), torch.arange(gw),
                                       indexing="ij")
        return pd.DataFrame({
            "image": img.flatten().numpy(), "row": row.flatten().numpy(),
            "col": col.flatten().numpy(),
            "value": self.values.detach().float().flatten().cpu().numpy(),
            "target": self.target[img.flatten()].numpy(), "method": self.method,
        })

    def plot(self, i: int | list[int] | None = 0, title: str | None = None,
             opacity: float = 0.85, per_image_scale: bool = False):
        """Each map laid over its own image (plotly `Figure`): ``i`` an int for one image, a
        list (or None for all) for an image slider; the title follows the slider (image and
        class). One colour range for all images, or ``per_image_scale=True``."""
        from patchlens.viz import grid_overlay

        idx = list(range(len(self))) if i is None else ([i] if isinstance(i, int) else list(i))
        if not idx:
            raise InputError("plot() needs at least one image index.")
        for j in idx:
            check_int("i", j, -len(self), len(self) - 1)
        idx = [j % len(self) for j in idx]
        signed = bool((self.values[idx] < 0).any())
        base = title or f"{self.method} · {self.holds}"
        titles = [f"{base} · image {j}, class {int(self.target[j])}" for j in idx]
        images = None if self.images is None else self.images[idx]
        return grid_overlay(self.values[idx][:, None], images, [""], base, opacity,
                            diverging=signed, image_labels=[str(j) for j in idx],
                            image_titles=titles, colorbar_title=self.method,
                            per_image_scale=per_image_scale, panel_title="")

    def __repr__(self) -> str:
        b, gh, gw = self.values.shape
        v = self.values.detach().float()
        tgt = self.target.tolist()
        tgt_s = str(tgt) if len(tgt) <= 6 else f"[{', '.join(map(str, tgt[:6]))}, ...]"
        extra = ", ".join(f"{k}={v!r}" for k, v in self.meta.items()
                          if k in ("layers", "context", "site", "score", "group", "layer"))
        base = ("" if self.baseline is None else
                f", baseline (unpatched score) mean={self.baseline.float().mean().item():.4g}")
        return (f"AttributionMap(method={self.method!r}, batch={b}, grid=({gh}, {gw}), "
                f"target={tgt_s}, values = {self.holds}, range=[{v.min().item():.4g}, "
                f"{v.max().item():.4g}]{base}{', ' + extra if extra else ''})")


def as_values(maps) -> Tensor:
    """``AttributionMap`` or tensor ``[batch, gh, gw]`` -> tensor ``[batch, gh, gw]``."""
    try:
        v = maps.values if isinstance(maps, AttributionMap) else torch.as_tensor(maps)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"maps must be an AttributionMap or a tensor [batch, grid_h, grid_w], "
                         f"got {type(maps).__name__}.") from None
    if v.ndim == 2:
        v = v[None]
    if v.ndim != 3:
        raise InputError(f"Expected maps [batch, grid_h, grid_w], got shape {tuple(v.shape)}.")
    return v


def map_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype attribution values are returned in: the model's (float32 / float64), float32
    for half-precision models (sums over patches lose too much in 16 bits)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def resolve_target(model, x: Tensor, target, logits: Tensor | None = None,
                   name: str = "target") -> Tensor:
    """``target`` (None = the predicted class, an int, or one class per image) -> ``[batch]``
    (on the CPU)."""
    n_classes = model.cfg.n_classes
    if not n_classes:
        raise InputError("Attribution needs a classifier head; this model is headless.")
    if target is None:
        if logits is None:
            with torch.inference_mode():
                logits = model(x)
        return logits.argmax(-1).cpu()
    return resolve_classes(target, x.shape[0], n_classes, name)
