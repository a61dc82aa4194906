"""Sites, interventions, the patching engine, recipes and results."""

from patchlens.patching.engine import EngineResult, Variant, run_variants
from patchlens.patching.interventions import (
    Add,
    Custom,
    Interchange,
    Intervention,
    Mean,
    Noise,
    PerVariant,
    Resample,
    Scale,
    Zero,
)
from patchlens.patching.recipe import Recipe, patch
from patchlens.patching.results import PatchResult
from patchlens.patching.sites import Rect, Site

__all__ = [
    "Site", "Rect", "Intervention", "Interchange", "Zero", "Mean", "Resample", "Noise", "Add",
    "Scale", "Custom", "PerVariant", "Variant", "EngineResult", "run_variants", "Recipe", "patch",
    "PatchResult",
]
