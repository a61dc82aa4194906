"""Helpers shared by the converters: strict loading, key renaming, module inspection and the
standard preprocessing constants."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from patchlens.errors import CheckpointMismatchError, UnsupportedModelError

#: OpenAI CLIP's input normalisation (open_clip and Hugging Face CLIP use the same numbers)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_identity(m: nn.Module | None) -> bool:
    """True for a missing module or ``nn.Identity`` (an optional layer that is switched off)."""
    return m is None or isinstance(m, nn.Identity)


def activation_name(act: nn.Module, source: str = "") -> str:
    """The `ViTConfig.act_fn` of an activation module (torch, timm or open_clip classes)."""
    name = type(act).__name__
    if name == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    if name == "GELUTanh":
        return "gelu_tanh"
    if name == "GELU":  # timm.layers.GELU wraps F.gelu
        return "gelu"
    if isinstance(act, nn.SiLU):
        return "silu"
    if isinstance(act, nn.ReLU):
        return "relu"
    raise UnsupportedModelError(f"{source + ' ' if source else ''}MLP activation {name} is not "
                                "supported (gelu, gelu_tanh, quick_gelu, relu, silu are).")


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
