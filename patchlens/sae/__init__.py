"""Sparse-autoencoder features as patching sites (docs/sae.md).

    >>> sae = patchlens.sae.load("clutter-digits-vit.resid_post.2")   # or a SAELens folder
    >>> model.add_sae(sae, use_error_term=True)
    >>> pl.patch(model, x, [(pl.Site("sae_acts_post", layers=2, features=[7]), pl.Zero())])

Splicing lives on the model (`HookedViT.add_sae`, `reset_saes`, `saes`); this package has the
SAE module and its loaders, training, the feature tools and the zoo SAEs.
"""

from patchlens.sae.attribution import feature_attribution, feature_caap, patch_features
from patchlens.sae.features import (
    FeatureView,
    class_effects,
    feature_activations,
    feature_view,
    features,
)
from patchlens.sae.loaders import (
    from_state_dict,
    load_prisma,
    load_saelens,
    prisma_from_dict,
    saelens_from_dict,
    save_saelens,
)
from patchlens.sae.quality import evaluate
from patchlens.sae.sae import SAE, SAEProtocol
from patchlens.sae.sources import load
from patchlens.sae.train import train
from patchlens.sae.zoo import zoo_sae_info, zoo_saes

__all__ = [
    "SAE",
    "SAEProtocol",
    "FeatureView",
    "class_effects",
    "evaluate",
    "feature_activations",
    "feature_attribution",
    "feature_caap",
    "feature_view",
    "features",
    "from_state_dict",
    "load",
    "load_prisma",
    "load_saelens",
    "patch_features",
    "prisma_from_dict",
    "saelens_from_dict",
    "save_saelens",
    "train",
    "zoo_sae_info",
    "zoo_saes",
]
