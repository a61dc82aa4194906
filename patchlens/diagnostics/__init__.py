"""Divergence diagnostics: how far interventions push representations off the natural
distribution (Grant, Han, Tartaglini & Potts, "Divergent representations", arXiv 2511.04638).

    >>> ref = Reference.fit(model, images, sites=["resid_pre"])
    >>> result = activation_patching(model, clean, corrupted, metric, diagnose=ref)
    >>> result.divergence.to_pandas()
"""

from patchlens.diagnostics.behaviour import null_fraction, readout_null_fraction, site_jacobian
from patchlens.diagnostics.measures import (
    NaturalScorer,
    OTResult,
    dormant_units,
    local_pca_residual,
    ot_divergence,
)
from patchlens.diagnostics.reference import Reference
from patchlens.diagnostics.report import (
    THRESHOLDS,
    VERDICTS,
    DivergenceReport,
    assess,
    diagnose,
    diagnose_sweep,
)
from patchlens.diagnostics.training import counterfactual_latent_loss

__all__ = [
    "THRESHOLDS",
    "VERDICTS",
    "DivergenceReport",
    "NaturalScorer",
    "OTResult",
    "Reference",
    "assess",
    "counterfactual_latent_loss",
    "diagnose",
    "diagnose_sweep",
    "dormant_units",
    "local_pca_residual",
    "null_fraction",
    "ot_divergence",
    "readout_null_fraction",
    "site_jacobian",
]
