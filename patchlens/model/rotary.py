"""2-D rotary position embeddings (RoPE) for ViTs: the sin / cos tables and the rotation.

A rotary ViT rotates each head's query and key of every patch token by angles that depend on
the patch's (row, col) position (Su et al. 2021, "RoFormer", for 1-D; Heo et al. 2024, "Rotary
Position Embedding for Vision Transformer", for the 2-D axial form): with ``d_head / 4``
frequencies per axis, half of the rotated pairs encode the row and half the column. Prefix
tokens (class, registers) are not rotated.

The tables are computed exactly as each source computes them, down to the dtype of every step,
so that a converted model reproduces its source to rounding noise in float64:

- ``"timm_cat"``: timm ``RotaryEmbeddingCat`` (EVA-02, Perception Encoder, timm RoPE-ViTs):
  integer coordinates (``+ grid_offset``, optionally rescaled to ``ref_grid``), frequencies
  ``temperature ** -(i / n)``; the tables are rounded to float32.
- ``"timm_dinov3"``: timm ``RotaryEmbeddingDinoV3``: patch centres normalised to [-1, 1],
  angles ``2 pi c / period`` with ``period = temperature ** (4 i / d_head)``.
- ``"hf_dinov3"``: transformers ``DINOv3ViTModel``: the same coordinates, angles
  ``(2 pi c) * inv_freq`` (float32 coordinates, then the model's dtype).

`RotaryTables` builds them for a patch grid and caches them per (grid, dtype, device).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from patchlens.model.config import ViTConfig

F32 = torch.float32


@dataclass(frozen=True)
class Rotation:
    """The tables of one patch grid: ``sin`` and ``cos`` ``[n_patches, 1, d_head]`` (broadcast
    over heads) in the rotation's layout, and how many prefix tokens precede the patches."""

    sin: Tensor
    cos: Tensor
    n_prefix: int
    half: bool
    grid: tuple[int, int]


def rotate_pairs(x: Tensor) -> Tensor:
    """``[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...]`` (adjacent pairs; timm ``rot``)."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


def rotate_halves(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last axis (the two halves; timm / HF ``rotate_half``)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rotation(
    x: Float[Tensor, "batch pos head d_head"], rot: Rotation
) -> Float[Tensor, "batch pos head d_head"]:
    """Rotate the patch tokens of ``x`` (``x * cos + rotate(x) * sin``, the sources' order of
    operations); the prefix tokens pass unchanged."""
    p = rot.n_prefix
    patches = x[:, p:] if p else x
    if patches.shape[1] != rot.sin.shape[0]:
        raise ValueError(
            f"The rotary tables are for a {rot.grid[0]}x{rot.grid[1]} patch grid "
            f"({rot.sin.shape[0]} patches) but q/k have {patches.shape[1]} patch tokens."
        )
    turned = rotate_halves(patches) if rot.half else rotate_pairs(patches)
    out = (patches * rot.cos + turned * rot.sin).to(x.dtype)
    return torch.cat([x[:, :p], out], dim=1) if p else out


def _layout(x: Tensor, half: bool) -> Tensor:
    """Per-frequency values ``[..., d/2]`` -> ``[..., d]``: ``[f, f]`` (halves) or each
    frequency repeated twice (adjacent pairs)."""
    return torch.cat([x, x], dim=-1) if half else x.repeat_interleave(2, -1)


def _compute_dtype(cfg: ViTConfig, dtype: torch.dtype) -> torch.dtype:
    if cfg.rope_precision == "float32":
        return F32
    return dtype if dtype.is_floating_point and torch.finfo(dtype).bits >= 32 else F32


def _timm_cat(cfg: ViTConfig, grid: tuple[int, int], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """timm ``RotaryEmbeddingCat`` with ``in_pixels=False`` (integer ``index`` grid)."""
    n = cfg.d_head // 4
    exp = torch.arange(0, n, 1, dtype=torch.int64).to(F32) / n
    bands = (1.0 / (float(cfg.rope_temperature) ** exp)).to(_compute_dtype(cfg, dtype))
    shape, ref = list(grid), list(cfg.rope_ref_grid) if cfg.rope_ref_grid else None
    if cfg.rope_grid_indexing == "xy":
        shape = shape[::-1]
        ref = ref[::-1] if ref else None
    t = [torch.arange(s, dtype=torch.int64).to(F32) + cfg.rope_grid_offset for s in shape]
    if ref is not None:
        t = [x / f * r for x, f, r in zip(t, shape, ref)]
    coords = torch.stack(torch.meshgrid(t, indexing=cfg.rope_grid_indexing), dim=-1).to(F32)
    angles = coords.unsqueeze(-1) * bands  # [h, w, 2, n]
    sin, cos = angles.sin().to(F32), angles.cos().to(F32)  # timm returns float32 tables
    return sin.flatten(-2).flatten(0, -2), cos.flatten(-2).flatten(0, -2)


def _centred_coords(cfg: ViTConfig, grid: tuple[int, int]) -> Tensor:
    """Patch centres in [-1, 1] (float32), ``[h * w, 2]`` (timm ``_build_grid('centered')``)."""
    shape = list(grid)[::-1] if cfg.rope_grid_indexing == "xy" else list(grid)
    norm = cfg.rope_normalize_coords
    denom = [float({"max": max(shape), "min": min(shape)}.get(norm, s)) for s in shape]
    t = [(torch.arange(0.5, s, dtype=F32) + cfg.rope_grid_offset) / d for s, d in zip(shape, denom)]
    coords = torch.stack(torch.meshgrid(t, indexing=cfg.rope_grid_indexing), dim=-1).to(F32)
    return (2.0 * coords - 1.0).flatten(0, -2)


def _timm_dinov3(cfg: ViTConfig, grid: tuple[int, int], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """timm ``RotaryEmbeddingDinoV3``."""
    n = cfg.d_head // 4
    if cfg.rope_periods is not None:
        lo, hi = cfg.rope_periods
        periods = lo * ((hi / lo) ** torch.linspace(0, 1, n, dtype=F32))
    else:
        periods = cfg.rope_temperature ** (2.0 * torch.arange(n, dtype=F32) / (cfg.d_head // 2))
    compute = _compute_dtype(cfg, dtype)
    coords = _centred_coords(cfg, grid)[:, :, None].to(compute)
    angles = (2 * math.pi * coords / periods.to(compute)[None, None, :]).flatten(1)
    return angles.sin(), angles.cos()


def _hf_dinov3(cfg: ViTConfig, grid: tuple[int, int], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """transformers ``DINOv3ViTRopePositionEmbedding``."""
    inv_freq = 1 / cfg.rope_temperature ** torch.arange(0, 1, 4 / cfg.d_head, dtype=F32)
    h, w = grid
    ch = torch.arange(0.5, h, dtype=F32) / h
    cw = torch.arange(0.5, w, dtype=F32) / w
    coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0
    compute = _compute_dtype(cfg, dtype)
    angles = (2 * math.pi * coords[:, :, None] * inv_freq.to(compute)[None, None, :]).flatten(1, 2)
    return angles.sin(), angles.cos()


_RECIPES = {"timm_cat": _timm_cat, "timm_dinov3": _timm_dinov3, "hf_dinov3": _hf_dinov3}


def rotary_tables(
    cfg: ViTConfig, grid: tuple[int, int], dtype: torch.dtype = F32
) -> tuple[Float[Tensor, "n_patches d_head"], Float[Tensor, "n_patches d_head"]]:
    """``(sin, cos)`` for every patch of ``grid`` (row-major), in the rotation layout, computed as
    ``cfg.rope`` says, for a model of dtype ``dtype``; stored in ``dtype`` (at least float32)."""
    sin, cos = _RECIPES[cfg.rope](cfg, tuple(grid), dtype)
    half = cfg.rope_rotate_half
    store = torch.promote_types(dtype, F32)
    return _layout(sin, half).to(store), _layout(cos, half).to(store)


class RotaryTables(nn.Module):
    """Rotary tables per patch grid, cached (no parameters, no state-dict entries).

    ``tables(grid, dtype, device)`` returns the `Rotation` for a grid; the most recent grids are
    kept (``max_cached``), so a forward pass builds them once and every block reuses them.
    ``grid_for(n_patches)`` recovers the grid of a residual stream (``start_at_layer``): the most
    recently used grid with that many patches, else the native one.
    """

    def __init__(self, cfg: ViTConfig, max_cached: int = 8):
        super().__init__()
        self.cfg = cfg
        self.max_cached = max_cached
        self._cache: OrderedDict[tuple, Rotation] = OrderedDict()
        self._grids: OrderedDict[tuple[int, int], None] = OrderedDict()

    def tables(self, grid: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Rotation:
        grid = (int(grid[0]), int(grid[1]))
        key = (grid, dtype, str(device))
        rot = self._cache.get(key)
        if rot is None:
            # plain constants, usable later with autograd even if built under inference_mode
            with torch.inference_mode(False), torch.no_grad():
                sin, cos = rotary_tables(self.cfg, grid, dtype)
                rot = Rotation(sin.to(device).unsqueeze(1), cos.to(device).unsqueeze(1),
                               self.cfg.n_prefix, self.cfg.rope_rotate_half, grid)
            self._cache[key] = rot
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        self._grids[grid] = None
        self._grids.move_to_end(grid)
        while len(self._grids) > self.max_cached:
            self._grids.popitem(last=False)
        return rot

    def grid_for(self, n_patches: int) -> tuple[int, int] | None:
        """The patch grid of a residual stream with ``n_patches`` patch tokens, or None."""
        for grid in reversed(self._grids):
            if grid[0] * grid[1] == n_patches:
                return grid
        native = tuple(self.cfg.grid_size)
        if native[0] * native[1] == n_patches:
            return native
        return None

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"{c.rope}, temperature={c.rope_temperature}, "
                f"{'halves' if c.rope_rotate_half else 'pairs'}, cached grids={list(self._grids)}")
