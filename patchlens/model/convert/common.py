"""Helpers shared by the converters: strict loading and key renaming."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from patchlens.errors import CheckpointMismatchError


def load_strict(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Load ``state_dict`` into ``model``; any missing, unexpected or mis-shaped key raises
    `CheckpointMismatchError` listing all of them."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:12])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:12])}")
        if shapes:
            parts.append(f"shape mismatches: {'; '.join(shapes[:12])}")
        raise CheckpointMismatchError(
            "The checkpoint does not fit the model config: " + " | ".join(parts)
            + ". Check that the config was built from the same architecture as the checkpoint."
        )
    with torch.no_grad():
        model.load_state_dict(state_dict, strict=True)


def rename(state_dict: dict[str, Tensor], rules: Iterable[tuple[str, str]]) -> dict[str, Tensor]:
    """Rename keys with the first matching ``(regex, replacement)`` rule; keys that no rule
    matches are kept as they are (and later reported by `load_strict` if they do not fit)."""
    rules = [(re.compile(p), r) for p, r in rules]
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in rules:
            if pattern.fullmatch(key):
                key = pattern.sub(repl, key)
                break
        out[key] = value
    return out


def layer_norm_keys(prefix: str) -> list[tuple[str, str]]:
    """Rules mapping ``<src>.weight|bias`` to ``<dst>.w|b`` for a LayerNorm."""
    src, dst = prefix.split("->")
    return [(rf"{src}\.weight", rf"{dst}.w"), (rf"{src}\.bias", rf"{dst}.b")]
