"""The SAE section of the HTML report (`patchlens.report.HtmlReport`): the SAE's quality figures,
the features that most support the model's predictions, and a view of the top ones."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from patchlens.sae.attribution import feature_attribution
from patchlens.sae.features import feature_activations, feature_view
from patchlens.sae.quality import evaluate

QUALITY_KEYS = ("fve", "mse", "l0", "dead", "delta_loss", "delta_accuracy", "loss_recovered",
                "n_vectors")


def sae_section(report, model, images: Tensor, sae: Any, *, labels: Tensor | None = None,
                n_features: int = 2, n_table: int = 10) -> dict[str, Any]:
    """Add a "Sparse-autoencoder features" section to ``report`` for ``sae`` on ``images``
    (normalised). Returns a summary dict (quality figures and the top features)."""
    hook = getattr(sae, "hook_name", None)
    report.heading(f"Sparse-autoencoder features at {hook}")
    quality = (sae.meta.get("quality") if getattr(sae, "meta", None) else None) or evaluate(
        model, sae, images, labels, hook=hook)
    source = getattr(sae, "meta", {}).get("name") or getattr(sae, "meta", {}).get("source", "")
    report.text(f"{type(sae).__name__} {source}: {sae.W_dec.shape[0]} features. Quality on "
                "held-out images (fve: fraction of variance explained; delta: the model with "
                "the reconstruction spliced in, without the error term, minus the plain model):")
    report.table([{k: quality[k] for k in QUALITY_KEYS if k in quality}])
    attr = feature_attribution(model, images, sae=sae).float().cpu()     # [B, d_sae]
    acts = feature_activations(model, images, sae=sae).float().cpu()
    if acts.ndim == 2:
        acts = acts[:, None]
    mean_attr = attr.mean(0)
    order = mean_attr.abs().argsort(descending=True)[:n_table].tolist()
    rows = [{"feature": f, "attribution": float(mean_attr[f]),
             "frequency": float((acts[..., f] != 0).float().mean()),
             "max_act": float(acts[..., f].max())} for f in order]
    report.table(rows, "features ranked by |gradient x activation| for each image's predicted "
                 "class (mean over the images); SAE spliced with its error term")
    for f in order[:n_features]:
        view = feature_view(model, images, f, sae=sae, n_top=min(4, images.shape[0]))
        report.figure(view.plot(), f"feature {f}: top images with the patches where it fires, "
                      "its activation histogram and its logit effect (zero-ablation)")
    return {"hook": hook, "quality": {k: quality.get(k) for k in QUALITY_KEYS},
            "top_features": rows[:n_features]}


__all__ = ["sae_section"]
