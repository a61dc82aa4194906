"""`AttributionMap`: the one result type of every attribution method (CAAP and the baselines)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from patchlens.errors import InputError
from patchlens.metrics import resolve_classes


@dataclass
class AttributionMap:
    """Attribution values over the patch grid.

    Attributes:
        values: ``[batch, grid_h, grid_w]`` one value per patch (higher = more evidence for
            ``target``; the scale depends on the method, see ``meta``).
        method: the method's name (``"caap"``, ``"rollout"``, ...).
        target: ``[batch]`` the explained class of each image.
        images: ``[batch, 3, H, W]`` in [0, 1] (unnormalised), to lay the map over; optional.
        meta: what was run (parameters, the score of the context for CAAP, timings, ...).
    """

    values: Float[Tensor, "batch grid_h grid_w"]
    method: str
    target: Tensor
    images: Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.values, Tensor) or self.values.ndim != 3:
            shape = tuple(self.values.shape) if isinstance(self.values, Tensor) else self.values
            raise InputError(f"AttributionMap values must be [batch, grid_h, grid_w], got {shape}.")
        self.target = torch.as_tensor(self.target, dtype=torch.long).flatten()
        if self.target.numel() == 1 and self.values.shape[0] > 1:
            self.target = self.target.expand(self.values.shape[0]).clone()
        if self.target.shape[0] != self.values.shape[0]:
            raise InputError(f"{self.target.shape[0]} targets for {self.values.shape[0]} maps.")
        if self.images is not None and self.images.shape[0] != self.values.shape[0]:
            raise InputError(f"{self.images.shape[0]} images for {self.values.shape[0]} maps.")

    # ---- access ---------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.values.shape[1:])

    def __len__(self) -> int:
        return self.values.shape[0]

    def __getitem__(self, i) -> AttributionMap:
        """The maps of a subset of the batch (int, slice or index tensor)."""
        if isinstance(i, int):
            i = slice(i, i + 1 if i != -1 else None)
        return AttributionMap(self.values[i], self.method, self.target[i],
                              None if self.images is None else self.images[i], dict(self.meta))

    def upsample(self, H: int | None = None, W: int | None = None,
                 mode: str = "nearest") -> Float[Tensor, "batch H W"]:
        """Pixel maps ``[batch, H, W]`` (default: the images' size); ``mode="nearest"`` gives
        every pixel its patch's value, ``"bilinear"`` a smooth map."""
        if H is None:
            if self.images is None:
                raise InputError("upsample needs H, W when the map carries no images.")
            H, W = self.images.shape[-2:]
        W = H if W is None else W
        kw = {} if mode == "nearest" else {"align_corners": False}
        return F.interpolate(self.values[:, None].float(), size=(H, W), mode=mode, **kw)[:, 0]

    def normalized(self) -> AttributionMap:
        """Each map divided by its largest absolute value (to compare methods visually)."""
        scale = self.values.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1)
        return AttributionMap(self.values / scale, self.method, self.target, self.images,
                              dict(self.meta))

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

    def plot(self, i: int | list[int] | None = 0, title: str | None = None, opacity: float = 0.55):
        """The map laid over its image (plotly `Figure`); ``i`` a list (or None for all) gives
        one slider frame per image (each drawn on image ``i[0]``'s frame with its own map)."""
        from patchlens.viz import grid_overlay

        idx = list(range(len(self))) if i is None else ([i] if isinstance(i, int) else list(i))
        maps = self.values[idx]
        labels = [f"image {j} (class {int(self.target[j])})" for j in idx]
        title = title or f"{self.method} · class {int(self.target[idx[0]])}"
        if self.images is None or len(idx) == 1:
            image = None if self.images is None else self.images[idx[0]]
            return grid_overlay(maps, image, labels, title, opacity=opacity)
        return _image_slider(maps, self.images[idx], labels, title, opacity)

    def __repr__(self) -> str:
        b, gh, gw = self.values.shape
        v = self.values.detach().float()
        tgt = self.target.tolist()
        tgt_s = str(tgt) if len(tgt) <= 6 else f"[{', '.join(map(str, tgt[:6]))}, ...]"
        extra = ", ".join(f"{k}={v!r}" for k, v in self.meta.items()
                          if k in ("layers", "context", "site", "score", "group", "layer"))
        return (f"AttributionMap(method={self.method!r}, batch={b}, grid=({gh}, {gw}), "
                f"target={tgt_s}, range=[{v.min().item():.4g}, {v.max().item():.4g}]"
                f"{', ' + extra if extra else ''})")


def _image_slider(maps, images, labels, title, opacity):
    """One slider frame per (image, map) pair."""
    import plotly.graph_objects as go

    from patchlens.viz import grid_overlay

    figs = [grid_overlay(m, img, [lab], title, opacity=opacity)
            for m, img, lab in zip(maps, images, labels)]
    lim = float(maps.abs().max()) or 1.0
    fig = go.Figure(data=figs[0].data, layout=figs[0].layout)
    frames = []
    for f, lab in zip(figs, labels):
        data = list(f.data)
        data[-1].update(zmin=-lim, zmax=lim)
        frames.append(go.Frame(data=data, name=lab))
    fig.data[-1].update(zmin=-lim, zmax=lim)
    fig.frames = frames
    steps = [dict(method="animate", label=lab,
                  args=[[lab], dict(mode="immediate", frame=dict(duration=0, redraw=True))])
             for lab in labels]
    fig.update_layout(sliders=[dict(steps=steps, currentvalue=dict(prefix=""))])
    return fig


def as_values(maps) -> Tensor:
    """``AttributionMap`` or tensor ``[batch, gh, gw]`` -> tensor ``[batch, gh, gw]``."""
    v = maps.values if isinstance(maps, AttributionMap) else torch.as_tensor(maps)
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
