"""Trainable interventions and distributed alignment search (DAS) on ViTs.

    >>> from patchlens import das
    >>> data = das.digit_pairs(model, 512)                      # (base, source) + labels
    >>> site = pl.Site("resid_pre", layers=3, tokens="cls")
    >>> res = das.train_intervention(model, site, das.RotatedSubspace(8), data, cl_weight=1.0)
    >>> res.iia, res.intervention.save("digit@3.safetensors")

The interventions (`RotatedSubspace`, `LowRankRotatedSubspace`, `BoundlessRotatedSubspace`) live
in `patchlens.patching.trainable` and are ordinary engine interventions.
"""

from patchlens.das.experiment import DASSweep, das_sweep, divergence_figures
from patchlens.das.pairs import CounterfactualPairs, digit_pairs, marker_pairs
from patchlens.das.recipe import interchange_recipe
from patchlens.das.training import TrainResult, interchange_accuracy, train_intervention
from patchlens.patching.trainable import (
    BoundlessRotatedSubspace,
    LowRankRotatedSubspace,
    RotatedSubspace,
    TrainableIntervention,
    load_intervention,
)

__all__ = [
    "BoundlessRotatedSubspace",
    "CounterfactualPairs",
    "DASSweep",
    "LowRankRotatedSubspace",
    "RotatedSubspace",
    "TrainResult",
    "TrainableIntervention",
    "das_sweep",
    "digit_pairs",
    "divergence_figures",
    "interchange_accuracy",
    "interchange_recipe",
    "load_intervention",
    "marker_pairs",
    "train_intervention",
]
