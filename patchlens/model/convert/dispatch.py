"""`HookedViT.from_pretrained`: route a name to the zoo, Hugging Face or timm."""

from __future__ import annotations

from typing import Any

from patchlens.errors import UnknownModelError


def from_pretrained(cls, name: str, **kwargs: Any):
    """Zoo names load offline; ``open_clip:NAME@TAG`` goes to open_clip; ``hf:org/repo`` or
    ``org/repo`` to Hugging Face; other names to timm (``pretrained=True``: timm downloads
    when online)."""
    from patchlens import zoo

    if zoo.is_zoo_name(name):
        return zoo.load(name, **kwargs)
    if name.startswith("open_clip:"):
        model_name, _, tag = name.removeprefix("open_clip:").partition("@")
        return cls.from_open_clip(model_name, pretrained=tag or None, **kwargs)
    if name.startswith("hf:") or "/" in name:
        return cls.from_hf(name.removeprefix("hf:"), **kwargs)
    import timm

    if timm.is_model(name):
        return cls.from_timm(name, pretrained=True, **kwargs)
    names = [n for n, _ in zoo.list()]
    raise UnknownModelError(
        f"Unknown model {name!r}: not a zoo model ({', '.join(names)}), not a timm model name, and "
        "not a Hugging Face repo id (use 'org/name' or 'hf:org/name')."
    )
