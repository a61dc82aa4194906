"""The model side of patchlens: `HookedViT`, its config, token layout and converters."""

from patchlens.model.config import ViTConfig
from patchlens.model.hooked_vit import HookedViT
from patchlens.model.layout import TokenLayout

__all__ = ["HookedViT", "ViTConfig", "TokenLayout"]
