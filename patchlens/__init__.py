"""patchlens: mechanistic interpretability for Vision Transformers.

Turn a timm or Hugging Face ViT into a `HookedViT` with TransformerLens hook points, then patch
activations, trace paths, find circuits (`patchlens.circuits`), attribute with CAAP, and check
how far interventions drift from the model's natural distribution.
"""

from patchlens import circuits, das, metrics, sae, zoo
from patchlens.errors import (
    CheckpointMismatchError,
    InputError,
    PatchlensError,
    UnknownHookError,
    UnknownModelError,
    UnsupportedModelError,
)
from patchlens.memory import keep_freed_memory
from patchlens.model import HookedViT, TokenLayout, ViTConfig
from patchlens.patching import (
    Add,
    Custom,
    Interchange,
    Intervention,
    Mean,
    Noise,
    PatchResult,
    Recipe,
    Rect,
    Resample,
    Scale,
    Site,
    Variant,
    Zero,
    patch,
    run_variants,
)
from patchlens.patching.attribution_map import AttributionMap
from patchlens.recipes.activation import activation_patching
from patchlens.recipes.caap import caap
from patchlens.recipes.path import Node, all_heads, all_heads_and_mlps, path_patching
from patchlens.zeroshot import zeroshot_head

__version__ = "0.1.0"

__all__ = [
    "circuits",
    "das",
    "metrics",
    "sae",
    "zoo",
    "activation_patching",
    "caap",
    "AttributionMap",
    "path_patching",
    "Node",
    "all_heads",
    "all_heads_and_mlps",
    "Site",
    "Rect",
    "Intervention",
    "Interchange",
    "Zero",
    "Mean",
    "Resample",
    "Noise",
    "Add",
    "Scale",
    "Custom",
    "Recipe",
    "Variant",
    "patch",
    "run_variants",
    "PatchResult",
    "HookedViT",
    "ViTConfig",
    "TokenLayout",
    "PatchlensError",
    "UnsupportedModelError",
    "UnknownHookError",
    "UnknownModelError",
    "CheckpointMismatchError",
    "InputError",
    "zeroshot_head",
    "keep_freed_memory",
]
