"""Finding the shortcut marker of ``clutter-digits-shortcut-vit`` among SAE features.

On conflict images (the corner marker encodes a label different from the digit's; the shortcut
model follows the marker) every feature is ranked by its attribution to the predicted class
(gradient x activation, `feature_attribution`), without using where the marker is. The
ground truth (the marker sits in patch ``(0, 0)``, token 1) is then used only to check the
result: where the top features fire, and what ablating them does to the predictions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from patchlens.patching.engine import Variant, run_variants
from patchlens.patching.interventions import Custom
from patchlens.patching.sites import Site
from patchlens.sae.attribution import feature_attribution
from patchlens.sae.splicing import spliced

MARKER_PATCH = (0, 0)


def ablate_per_image(model, images: Tensor, features: Tensor, *, sae: Any = None,
                     hook: str | None = None, batch_size: int | None = None) -> Tensor:
    """Logits with, for each image, its own features zero-ablated at every token:
    ``features`` is ``[B, m]`` (feature indices per image). One engine run."""
    mask = torch.zeros(images.shape[0], 0)
    with spliced(model, sae, hook) as names:
        d = int(model.acts_to_saes[names.hook].W_dec.shape[0])
        mask = torch.ones(images.shape[0], d)
        mask.scatter_(1, features.long().cpu(), 0.0)

        def zero_own(act: Tensor, hook, site) -> Tensor:  # act [B, tokens, d_sae]
            m = mask.to(act.device, act.dtype)
            return act * m.view(m.shape[0], *([1] * (act.ndim - 2)), m.shape[1])

        v = [Variant([(Site(names.acts_post), Custom(zero_own))], "ablated")]
        return run_variants(model, images, v, batch_size=batch_size, progress=False).outputs[0]


def marker_features(model, sae: Any, n: int = 200, seed: int = 4321, top: tuple[int, ...] = (1, 3),
                    n_global: int = 10) -> dict[str, Any]:
    """The figures of the marker check (see the module docstring) on ``n`` conflict images.

    Returns a dict: ``follows_marker`` (share of predictions equal to the marker's label before
    any ablation); ``top1_fires_on_marker`` (share of images whose top-attributed feature is
    active at the marker's patch), ``top1_attribution_at_marker`` (mean share of that
    feature's attribution that comes from the marker's patch); ``top_features`` (the features
    ranked first by mean attribution over the images, with their share of activation mass on
    the marker token); per ``m`` in ``top``,
    after ablating each image's own ``m`` top-attributed features: ``follows_marker``,
    ``correct`` (predictions equal to the digit's label) and ``logit_gap`` (mean marker-label
    logit minus digit-label logit; before: ``logit_gap``); and the same for the ``n_global``
    features ranked first overall, ablated on every image.
    """
    from patchlens.zoo.clutter_digits import generate

    data = generate(n, split="test", seed=seed, shortcut="conflict")
    x = model.preprocess(data.images)
    digit, marker = data.labels, data.marker_labels
    layout = model.layout_for(tuple(x.shape[-2:]))
    marker_tok = layout.token(*MARKER_PATCH)
    with spliced(model, sae, use_error_term=True) as names:
        with torch.inference_mode():
            logits = model(x).float().cpu()
        pred = logits.argmax(-1)
        attr = feature_attribution(model, x, pred, hook=names.hook).float().cpu()  # [n, d_sae]
        # the same restricted to the marker token: used only to check the ranking
        attr_marker = feature_attribution(model, x, pred, hook=names.hook,
                                          tokens=[marker_tok]).float().cpu()
        from patchlens.sae.features import feature_activations

        acts = feature_activations(model, x, hook=names.hook).float().cpu()     # [n, T, d]

        def summary(lg: Tensor) -> dict[str, float]:
            p = lg.argmax(-1)
            gap = lg.gather(1, marker[:, None])[:, 0] - lg.gather(1, digit[:, None])[:, 0]
            return {"follows_marker": float((p == marker).float().mean()),
                    "correct": float((p == digit).float().mean()),
                    "logit_gap": float(gap.mean())}

        out: dict[str, Any] = {"n": n, "data": f"generate({n}, split='test', seed={seed}, "
                                              "shortcut='conflict')",
                               "hook": names.hook, **summary(logits)}
        mass = acts.clamp_min(0).sum((0, 1)).clamp_min(1e-12)
        on_marker = acts[:, marker_tok].clamp_min(0).sum(0) / mass
        ranked = torch.argsort(attr.mean(0), descending=True)
        out["top_features"] = [{"feature": int(f), "mean_attribution": float(attr[:, f].mean()),
                                "marker_mass_share": float(on_marker[f]),
                                "images_top1": int((attr.argmax(1) == f).sum())}
                               for f in ranked[:n_global].tolist()]
        per_image_top = torch.argsort(attr, dim=1, descending=True)
        top1 = per_image_top[:, 0]
        rows = torch.arange(n)
        out["top1_fires_on_marker"] = float((acts[rows, marker_tok, top1] > 0).float().mean())
        share = attr_marker[rows, top1] / attr[rows, top1]
        out["top1_attribution_at_marker"] = float(share.mean())
        out["top1_distinct"] = len(set(top1.tolist()))
        for m in top:
            lg = ablate_per_image(model, x, per_image_top[:, :m], hook=names.hook).float().cpu()
            out[f"ablate_top{m}"] = summary(lg)
        glob = ranked[:n_global].expand(n, -1)
        out[f"ablate_global_top{n_global}"] = summary(
            ablate_per_image(model, x, glob, hook=names.hook).float().cpu())
    return out


__all__ = ["marker_features", "ablate_per_image"]
