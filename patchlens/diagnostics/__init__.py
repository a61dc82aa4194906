"""Divergence diagnostics: how far interventions push representations off the natural
distribution (Grant, Han, Tartaglini & Potts, "Divergent representations", arXiv 2511.04638).

    >>> ref = Reference.fit(model, images, sites=["resid_pre"])
    >>> result = activation_patching(model, clean, corrupted, metric, diagnose=ref)
    >>> result.divergence.to_pandas()

One concept per module: `reference` (natural activations), `scorer` (the per-vector test),
`measures` (Sinkhorn, local PCA), `neurons` (dormant pathways), `verdict` (the one rule),
`collector` (a sweep's statistics), `result` (`DivergenceReport`), `diagnose` and `assess`.
"""

from patchlens.diagnostics.assess import assess
from patchlens.diagnostics.behaviour import null_fraction, readout_null_fraction, site_jacobian
from patchlens.diagnostics.diagnose import diagnose, diagnose_sweep
from patchlens.diagnostics.measures import OTResult, local_pca_residual, ot_distance, ot_divergence
from patchlens.diagnostics.neurons import dormant_units
from patchlens.diagnostics.reference import RECOMMENDED_IMAGES, Reference
from patchlens.diagnostics.result import DivergenceReport
from patchlens.diagnostics.scorer import NaturalScorer, needed_vectors
from patchlens.diagnostics.training import counterfactual_latent_loss
from patchlens.diagnostics.verdict import THRESHOLDS, VERDICTS

__all__ = [
    "RECOMMENDED_IMAGES",
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
    "needed_vectors",
    "null_fraction",
    "ot_distance",
    "ot_divergence",
    "readout_null_fraction",
    "site_jacobian",
]
