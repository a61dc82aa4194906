"""Attribution maps: CAAP and baseline methods (one signature each) and evaluation metrics.

``METHODS[name](model, images, target=None, **kw) -> AttributionMap``.
"""

from patchlens.attribution import metrics
from patchlens.attribution.baselines import (
    METHODS,
    attention_rollout,
    caap_method,
    chefer,
    class_attention,
    gradcam,
    integrated_gradients,
    occlusion,
    rise,
)
from patchlens.patching.attribution_map import AttributionMap

__all__ = [
    "AttributionMap", "METHODS", "metrics", "attention_rollout", "chefer", "class_attention",
    "gradcam", "integrated_gradients", "occlusion", "rise", "caap_method",
]
