"""`Site`: where an intervention acts — which hook, layers, tokens and heads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError, unknown_hook_error
from patchlens.model.hooks import HookSpec, check_axis_selection

TokenSelector = Any  # int | list[int] | str | (row, col) | bool mask | Rect | Tensor
LayerSelector = Any  # int | list[int] | range | "all" | None


@dataclass(frozen=True)
class Rect:
    """A rectangle of the patch grid: rows ``[r0, r1)`` x cols ``[c0, c1)`` (non-negative
    ints, ``r0 < r1``, ``c0 < c1``; checked against the grid when resolved)."""

    r0: int
    r1: int
    c0: int
    c1: int

    def __post_init__(self) -> None:
        vals = (self.r0, self.r1, self.c0, self.c1)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            raise InputError(f"Rect takes ints (r0, r1, c0, c1), got {vals}.")
        if min(vals) < 0 or self.r0 >= self.r1 or self.c0 >= self.c1:
            raise InputError(
                f"Rect(r0={self.r0}, r1={self.r1}, c0={self.c0}, c1={self.c1}) is not a rectangle "
                "of the patch grid: rows [r0, r1) and cols [c0, c1) need 0 <= r0 < r1 and "
                "0 <= c0 < c1 (no negative indices)."
            )


@dataclass(frozen=True)
class ResolvedSite:
    """One hook point of a `Site` with its selections as index tensors (None = everything)
    and the hook's `HookSpec` (which says where the token and head axes are)."""

    hook: str
    layer: int | None
    tokens: Tensor | None
    heads: Tensor | None
    spec: HookSpec
    features: Tensor | None = None

    @property
    def token_dim(self) -> int | None:
        return self.spec.token_axis

    @property
    def head_dim(self) -> int | None:
        return self.spec.head_axis


@dataclass(frozen=True, eq=False)
class Site:
    """Where an intervention acts.

    Args:
        hook: a short name (``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``,
            ``mlp_out``, ``z``, ``q``, ``k``, ``v``, ``result``, ``pattern``, ``attn_scores``,
            ``mlp_pre``, ``mlp_post``, ``q_input``/``k_input``/``v_input``, ``embed``) or a full
            hook name (``"blocks.3.hook_resid_pre"``).
        layers: an int, list, range or ``"all"`` (ignored for full names, which carry a layer).
        tokens: ``"all"``, ``"cls"``, ``"dist"``, ``"registers"``, ``"patches"``, ``"prefix"``,
            an int or list of token indices, a ``(row, col)`` patch, a boolean patch-grid mask
            ``[grid_h, grid_w]``, or a `Rect`. For attention patterns, tokens select the query.
        heads: an int or list (for per-head hooks: q, k, v, z, result, pattern, q/k/v_input).
        features: an int or list of feature indices (for hooks with a ``feature`` axis, e.g. a
            spliced sparse autoencoder's ``hook_sae_acts_post``).
    """

    hook: str
    layers: LayerSelector = "all"
    tokens: TokenSelector = "all"
    heads: int | Sequence[int] | None = None
    features: int | Sequence[int] | None = None
    name: str = field(default="", compare=False)

    def __repr__(self) -> str:
        parts = [repr(self.hook)]
        if self.layers != "all":
            parts.append(f"layers={_short(self.layers)}")
        if not (isinstance(self.tokens, str) and self.tokens == "all"):
            parts.append(f"tokens={_short(self.tokens)}")
        if self.heads is not None:
            parts.append(f"heads={_short(self.heads)}")
        if self.features is not None:
            parts.append(f"features={_short(self.features)}")
        return f"Site({', '.join(parts)})"

    # ------------------------------------------------------------------------------------------
    def hook_names(self, model) -> list[tuple[str, int | None]]:
        """The full hook names this site covers, with their layers (from the hook schema)."""
        aliases = model.hook_aliases
        if self.hook in aliases:
            by_layer = aliases[self.hook]
            if None in by_layer:
                if not _is_all(self.layers):
                    raise InputError(f"{self.hook!r} ({by_layer[None]}) is not a per-layer hook; "
                                     f"leave layers at 'all', got layers={self.layers!r}.")
                return [(by_layer[None], None)]
            names = []
            for layer in resolve_layers(self.layers, model.cfg.n_layers):
                if layer not in by_layer:
                    raise InputError(
                        f"{self.hook!r} has no hook at layer {layer}; it exists at layers "
                        f"{sorted(by_layer)}."
                    )
                names.append((by_layer[layer], layer))
            return names
        if self.hook in model.hook_dict:
            spec = model.hook_spec(self.hook)
            if not _is_all(self.layers):
                wanted = resolve_layers(self.layers, model.cfg.n_layers)
                if wanted != [spec.layer]:
                    short = f"Site({spec.alias!r}, layers={self.layers!r})" if spec.alias else \
                        "a short name with layers="
                    raise InputError(
                        f"{self.hook!r} is one hook at layer {spec.layer}, but layers="
                        f"{self.layers!r} asks for {wanted}; use {short} to vary the layer."
                    )
            return [(self.hook, spec.layer)]
        raise unknown_hook_error(self.hook, list(aliases) + list(model.hook_dict))

    def resolve(self, model, grid: tuple[int, int] | None = None) -> list[ResolvedSite]:
        """One `ResolvedSite` per hook point, selections checked against the hook's axes."""
        layout = model.layout if grid is None else model.layout_for(
            (grid[0] * model.cfg.patch_size[0], grid[1] * model.cfg.patch_size[1]))
        out = []
        for name, layer in self.hook_names(model):
            spec = model.hook_spec(name)
            check_axis_selection(spec, tokens=not _is_all(self.tokens),
                                 heads=self.heads is not None,
                                 features=self.features is not None)
            tokens = None if spec.token_axis is None else resolve_tokens(self.tokens, layout)
            heads = None if self.heads is None else resolve_heads(self.heads, model.cfg.n_heads)
            feats = None if self.features is None else resolve_features(self.features)
            out.append(ResolvedSite(name, layer, tokens, heads, spec, feats))
        return out

    def is_per_layer(self, model) -> bool:
        """True if the hook is one per block (so ``layers=`` selects among them)."""
        by_layer = model.hook_aliases.get(self.hook)
        if by_layer is not None:
            return None not in by_layer
        return False


def _is_all(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v == "all")


def _short(v: Any) -> str:
    if isinstance(v, Tensor):
        return f"tensor{tuple(v.shape)}"
    if isinstance(v, (list, tuple)) and len(v) > 6:
        return f"[{v[0]}, {v[1]}, ..., {v[-1]}] ({len(v)})"
    return repr(v)


def resolve_layers(layers: LayerSelector, n_layers: int) -> list[int]:
    """Layer selector -> sorted list of layer indices in ``[0, n_layers)``."""
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return list(range(n_layers))
    if isinstance(layers, str):
        raise InputError(f"layers must be an int, list, range or 'all', got {layers!r}.")
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise InputError(f"Layer indices must be ints, got {layer!r}.")
        li = layer + n_layers if layer < 0 else layer
        if not 0 <= li < n_layers:
            raise InputError(f"Layer {layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1}).")
        out.append(li)
    if not out:
        raise InputError("The layer selection is empty; pass at least one layer.")
    return sorted(set(out))


def resolve_heads(heads: int | Sequence[int], n_heads: int) -> Tensor:
    hs = [heads] if isinstance(heads, int) else list(heads)
    if not hs:
        raise InputError("The head selection is empty; pass at least one head.")
    for h in hs:
        if isinstance(h, bool) or not isinstance(h, int) or not -n_heads <= h < n_heads:
            raise InputError(f"Head {h!r} is out of range: the model has {n_heads} heads (0..{n_heads - 1}).")
    return torch.tensor(sorted({h % n_heads for h in hs}), dtype=torch.long)


def resolve_features(features: int | Sequence[int] | Tensor) -> Tensor:
    """Feature selector -> sorted unique index tensor (checked against the activation's width
    when the engine runs)."""
    if isinstance(features, Tensor):
        if features.is_floating_point() or features.dtype == torch.bool or features.ndim > 1:
            raise InputError(f"features must be ints or a 1-D integer tensor, got dtype "
                             f"{features.dtype} shape {tuple(features.shape)}.")
        fs = features.tolist()
    else:
        fs = [features] if isinstance(features, int) else list(features)
    if not fs:
        raise InputError("The feature selection is empty; pass at least one feature index.")
    for f in fs:
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise InputError(f"Feature indices are non-negative ints, got {f!r}.")
    return torch.tensor(sorted(set(fs)), dtype=torch.long)


def resolve_tokens(tokens: TokenSelector, layout) -> Tensor | None:
    """Token selector -> token index tensor (None = all tokens)."""
    n = layout.n_tokens
    if isinstance(tokens, str):
        named = {
            "all": None,
            "patches": layout.patches,
            "prefix": list(range(layout.n_prefix)),
            "registers": layout.registers,
        }
        if tokens in named:
            idx = named[tokens]
            if idx is None:
                return None
        elif tokens in ("cls", "dist"):
            idx = [getattr(layout, tokens)]
        else:
            raise InputError(
                f"Unknown token selector {tokens!r}; use 'all', 'cls', 'dist', 'registers', "
                "'patches', 'prefix', an index, a (row, col), a boolean patch mask or a Rect."
            )
    elif isinstance(tokens, Rect):
        idx = layout.rect_tokens((tokens.r0, tokens.r1), (tokens.c0, tokens.c1))
    elif isinstance(tokens, Tensor) and tokens.dtype == torch.bool:
        idx = layout.mask_tokens(tokens)
    elif isinstance(tokens, tuple) and len(tokens) == 2 and all(isinstance(v, int) for v in tokens):
        idx = [layout.token(*tokens)]
    elif isinstance(tokens, int) and not isinstance(tokens, bool):
        idx = [tokens]
    elif isinstance(tokens, Tensor):
        if tokens.is_floating_point() or tokens.is_complex() or tokens.ndim > 1:
            raise InputError(
                f"A token index tensor must be a 1-D integer tensor, got dtype {tokens.dtype} "
                f"shape {tuple(tokens.shape)}; for a patch-grid mask pass a bool tensor "
                f"[grid_h, grid_w] = {tuple(layout.grid)}."
            )
        idx = [int(t) for t in tokens.flatten()]
    elif isinstance(tokens, (list, range)):
        bad = [t for t in tokens if isinstance(t, bool) or not isinstance(t, int)]
        if bad:
            raise InputError(
                f"Token indices must be ints, got {bad[0]!r} in {_short(tokens)}; for a patch "
                "mask pass a bool tensor [grid_h, grid_w], for a patch a (row, col) tuple."
            )
        idx = list(tokens)
    else:
        raise InputError(f"Cannot read {tokens!r} as a token selector.")
    if len(idx) == 0:
        raise InputError(f"The token selector {_short(tokens)} selects no token.")
    for t in idx:
        if not -n <= t < n:
            raise InputError(f"Token {t} is out of range: the model has {n} tokens (0..{n - 1}).")
    return torch.tensor(sorted({t % n for t in idx}), dtype=torch.long)
