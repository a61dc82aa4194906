"""`Site`: where an intervention acts — which hook, layers, tokens and heads."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError, unknown_hook_error

# short name -> (template, axes). Axes give the dimension of tokens and heads in the activation.
SHORT_NAMES: dict[str, str] = {
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "resid_mid": "blocks.{l}.hook_resid_mid",
    "resid_post": "blocks.{l}.hook_resid_post",
    "attn_out": "blocks.{l}.hook_attn_out",
    "mlp_out": "blocks.{l}.hook_mlp_out",
    "z": "blocks.{l}.attn.hook_z",
    "q": "blocks.{l}.attn.hook_q",
    "k": "blocks.{l}.attn.hook_k",
    "v": "blocks.{l}.attn.hook_v",
    "result": "blocks.{l}.attn.hook_result",
    "pattern": "blocks.{l}.attn.hook_pattern",
    "attn_scores": "blocks.{l}.attn.hook_attn_scores",
    "mlp_pre": "blocks.{l}.mlp.hook_pre",
    "mlp_post": "blocks.{l}.mlp.hook_post",
    "q_input": "blocks.{l}.hook_q_input",
    "k_input": "blocks.{l}.hook_k_input",
    "v_input": "blocks.{l}.hook_v_input",
    "embed": "hook_full_embed",
    "tok_embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
    "ln_pre": "hook_ln_pre",
}
HEAD_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result", "hook_q_input",
              "hook_k_input", "hook_v_input")
PATTERN_HOOKS = ("hook_pattern", "hook_attn_scores")
_LAYER_RE = re.compile(r"blocks\.(\d+)\.")

TokenSelector = Any  # int | list[int] | str | (row, col) | bool mask | Rect | Tensor
LayerSelector = Any  # int | list[int] | range | "all" | None


@dataclass(frozen=True)
class Rect:
    """A rectangle of the patch grid: rows ``[r0, r1)`` x cols ``[c0, c1)``."""

    r0: int
    r1: int
    c0: int
    c1: int


@dataclass(frozen=True)
class ResolvedSite:
    """One hook point of a `Site` with its selections as index tensors (None = everything)."""

    hook: str
    layer: int | None
    tokens: Tensor | None
    heads: Tensor | None
    token_dim: int
    head_dim: int | None

    @property
    def start_layer(self) -> int:
        """The first block whose forward pass this hook belongs to (-1: before block 0)."""
        return -1 if self.layer is None else self.layer


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
    """

    hook: str
    layers: LayerSelector = "all"
    tokens: TokenSelector = "all"
    heads: int | Sequence[int] | None = None
    name: str = field(default="", compare=False)

    def __repr__(self) -> str:
        parts = [repr(self.hook)]
        if self.layers != "all":
            parts.append(f"layers={_short(self.layers)}")
        if not (isinstance(self.tokens, str) and self.tokens == "all"):
            parts.append(f"tokens={_short(self.tokens)}")
        if self.heads is not None:
            parts.append(f"heads={_short(self.heads)}")
        return f"Site({', '.join(parts)})"

    # ------------------------------------------------------------------------------------------
    def hook_names(self, model) -> list[tuple[str, int | None]]:
        """The full hook names this site covers, with their layers."""
        n = model.cfg.n_layers
        if self.hook in SHORT_NAMES:
            template = SHORT_NAMES[self.hook]
            if "{l}" not in template:
                names = [(template, None)]
            else:
                names = [(template.format(l=layer), layer) for layer in resolve_layers(self.layers, n)]
        elif self.hook in model.hook_dict:
            m = _LAYER_RE.match(self.hook)
            names = [(self.hook, int(m.group(1)) if m else None)]
        else:
            candidates = list(SHORT_NAMES) + list(model.hook_dict)
            raise unknown_hook_error(self.hook, candidates)
        for name, _ in names:
            if name not in model.hook_dict:
                raise unknown_hook_error(name, model.hook_dict)
        return names

    def resolve(self, model, grid: tuple[int, int] | None = None) -> list[ResolvedSite]:
        """One `ResolvedSite` per hook point, selections checked against the model."""
        layout = model.layout if grid is None else model.layout_for(
            (grid[0] * model.cfg.patch_size[0], grid[1] * model.cfg.patch_size[1]))
        out = []
        for name, layer in self.hook_names(model):
            last = name.rsplit(".", 1)[-1]
            if last in PATTERN_HOOKS:
                token_dim, head_dim = 2, 1
            elif last in HEAD_HOOKS:
                token_dim, head_dim = 1, 2
            else:
                token_dim, head_dim = 1, None
            if name in ("hook_pooled", "hook_logits", "hook_pooled_dist"):
                token_dim = -1
            tokens = resolve_tokens(self.tokens, layout) if token_dim >= 0 else None
            if token_dim < 0 and not (isinstance(self.tokens, str) and self.tokens == "all"):
                raise InputError(f"Hook {name} has no token axis; use tokens='all'.")
            heads = None
            if self.heads is not None:
                if head_dim is None:
                    raise InputError(
                        f"heads={self.heads!r} given for {name}, which has no head axis; per-head "
                        f"hooks are {', '.join(h.removeprefix('hook_') for h in HEAD_HOOKS + PATTERN_HOOKS)}."
                    )
                heads = resolve_heads(self.heads, model.cfg.n_heads)
            out.append(ResolvedSite(name, layer, tokens, heads, token_dim, head_dim))
        return out


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
    elif isinstance(tokens, (list, range, Tensor)):
        idx = [int(t) for t in tokens]
    else:
        raise InputError(f"Cannot read {tokens!r} as a token selector.")
    if len(idx) == 0:
        raise InputError(f"The token selector {_short(tokens)} selects no token.")
    for t in idx:
        if not -n <= t < n:
            raise InputError(f"Token {t} is out of range: the model has {n} tokens (0..{n - 1}).")
    return torch.tensor(sorted({t % n for t in idx}), dtype=torch.long)


def options_for(hooks: Sequence[str]) -> dict[str, bool]:
    """The `HookedViT.options` flags that make the opt-in hooks among ``hooks`` fire."""
    flags = {}
    if any(h.endswith("hook_result") for h in hooks):
        flags["use_attn_result"] = True
    if any(h.endswith(("hook_q_input", "hook_k_input", "hook_v_input")) for h in hooks):
        flags["use_split_qkv_input"] = True
    return flags
