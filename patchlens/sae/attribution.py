"""Attributing model outputs to SAE features: gradient x activation over all features in one
backward pass, attribution patching with exact patching of the top features, and CAAP maps
restricted to one feature.

- `feature_attribution`: ``sum_tokens a_f * d logit / d a_f`` at the feature activations of
  the spliced SAE (with its error term, so the feature's part is measured exactly). It is the
  first-order estimate of minus the effect of zero-ablating the feature (Syed et al. 2023,
  "Attribution patching outperforms automated circuit discovery"; Marks et al. 2024, "Sparse
  feature circuits").
- `patch_features`: attribution patching over every feature (one forward and one backward on
  the target, one forward on the source) and exact activation patching of the ``top`` ones.
- `feature_caap`: CAAP (Izadi et al. 2026) with only one feature patched per image block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError
from patchlens.patching.attribution_map import AttributionMap, resolve_target
from patchlens.patching.engine import capture, capture_grads
from patchlens.recipes.caap import caap
from patchlens.sae.splicing import spliced


def feature_attribution(model, images: Tensor, target: Any = None, *, sae: Any = None,
                        hook: str | None = None, tokens: Tensor | None = None,
                        batch_size: int | None = 64) -> Tensor:
    """Gradient x activation of each SAE feature for the ``target`` logit, ``[B, d_sae]``.

    Args:
        images: normalised images ``[B, C, H, W]``.
        target: class per image (int or ``[B]``); None: the model's prediction.
        sae, hook: the SAE (spliced for the call, with its error term, if it is not spliced
            already) or the hook of one spliced in the model.
        tokens: restrict the sum to these token indices (default: all tokens).

    Returns:
        ``[B, d_sae]``: ``sum_tokens a_f * d logit_target / d a_f`` (float64 for float64 models).
    """
    model.check_images(images)
    with spliced(model, sae, hook) as names:
        name = names.acts_post
        spec = model.hook_spec(name)
        tgt = resolve_target(model, images, target) if target is not None else None
        out = []
        step = batch_size or images.shape[0]
        for i in range(0, images.shape[0], step):
            xb = images[i : i + step]
            if tgt is None:  # the prediction of the spliced model (= the plain model's)
                tb = capture(model, xb, []).output.argmax(-1).cpu()
            else:
                tb = tgt[i : i + step]
            run = capture_grads(model, xb, [name],
                                lambda lg, tb=tb: lg.gather(1, tb.view(-1, 1).to(lg.device))[:, 0])
            contrib = run.acts[name] * run.grads[name]
            tok = spec.token_axis
            if tok is not None:
                if tokens is not None:
                    contrib = contrib.index_select(tok, torch.as_tensor(tokens).to(contrib.device))
                contrib = contrib.sum(tok)
            out.append(contrib.reshape(contrib.shape[0], -1))
    return torch.cat(out)


def patch_features(model, clean: Tensor, corrupted: Tensor, metric, *, sae: Any = None,
                   hook: str | None = None, top: int = 10, tokens: Any = "all",
                   direction: str = "denoising", batch_size: int | None = None,
                   progress: bool | None = None):
    """Attribution patching over every feature of an SAE, then exact patching of the ``top``.

    Each feature's activation (at the selected ``tokens``) is patched from the source run
    (``clean`` for denoising, ``corrupted`` for noising) into the target run, one feature at a
    time. The estimate for all features costs one forward pass of the source and one forward
    and backward pass of the target; the ``top`` features by ``|estimate|`` are then patched
    exactly (one batched engine sweep).

    Returns a pandas DataFrame sorted by ``|attribution|`` with ``feature``, ``attribution``
    (first-order estimate of ``metric(patched) - metric(target)``, mean over the pairs) and
    ``exact`` (measured; NaN beyond the top ``top``); ``attrs["target"]`` is the target's mean
    metric. (`Recovery` metrics are read as their base metric here.)
    """
    import pandas as pd

    from patchlens.metrics import base_metric
    from patchlens.patching.engine import Variant, run_variants
    from patchlens.patching.interventions import Interchange
    from patchlens.patching.sites import Site
    from patchlens.recipes.common import check_choice, check_pair, metric_values

    check_pair(model, clean, corrupted)
    check_choice("direction", direction, ("denoising", "noising"))
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise InputError(f"top must be an int >= 0, got {top!r}.")
    target, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    fn = base_metric(metric)
    with spliced(model, sae, hook) as names:
        name = names.acts_post
        (rs,) = Site(name, tokens=tokens).resolve(model, _grid(model, target))
        src = capture(model, source, [name], batch_size=batch_size).acts[name]
        tgt = capture_grads(model, target, [name], fn, batch_size=batch_size)
        base = metric_values(metric, tgt.output, target.shape[0])
        contrib = (src - tgt.acts[name]) * tgt.grads[name]             # [B, (T), d_sae]
        tok = rs.spec.token_axis
        if tok is not None and rs.tokens is not None:
            contrib = contrib.index_select(tok, rs.tokens.to(contrib.device))
        if tok is not None:
            contrib = contrib.sum(tok)
        est = contrib.reshape(contrib.shape[0], -1).mean(0)            # [d_sae]
        if not bool(torch.isfinite(est).all()):
            raise InputError("Attribution patching got a non-finite gradient or activation; "
                             "use activation_patching(..., per='feature') (exact).")
        order = torch.argsort(est.abs(), descending=True)
        chosen = order[:top].tolist()
        exact: dict[int, float] = {}
        if chosen:
            iv = Interchange(source, "clean" if direction == "denoising" else "corrupted")
            variants = [Variant([(Site(name, tokens=tokens, features=[f]), iv)], f)
                        for f in chosen]
            res = run_variants(model, target, variants, metric=fn, batch_size=batch_size,
                               progress=progress)
            exact = {f: float((res.outputs[i] - base.to(res.outputs)).mean())
                     for i, f in enumerate(chosen)}
    rows = [{"feature": f, "attribution": float(est[f]), "exact": exact.get(f, float("nan"))}
            for f in order.tolist()]
    df = pd.DataFrame(rows)
    df.attrs["target"] = float(base.mean())
    return df


def _grid(model, x: Tensor) -> tuple[int, int]:
    return (x.shape[-2] // model.cfg.patch_size[0], x.shape[-1] // model.cfg.patch_size[1])


def feature_caap(model, images: Tensor, feature: int, *, sae: Any = None, hook: str | None = None,
                 target: Any = None, **caap_kwargs: Any) -> AttributionMap:
    """CAAP map of one feature: for each patch (block), only ``feature``'s activation from the
    image is written into the context run at the SAE's layer (``score(patched) -
    score(context)``; `patchlens.recipes.caap.caap`'s other arguments pass through)."""
    if isinstance(feature, bool) or not isinstance(feature, int) or feature < 0:
        raise InputError(f"feature must be a non-negative int, got {feature!r}.")
    if "layers" in caap_kwargs or "site" in caap_kwargs:
        raise InputError("feature_caap patches at the SAE's own hook; do not pass layers= or "
                         "site=.")
    with spliced(model, sae, hook) as names:
        if names.alias is None or names.layer is None:
            raise InputError(f"feature_caap needs an SAE spliced inside a block; {names.hook} "
                             "is outside the blocks.")
        amap = caap(model, images, target, layers=(names.layer, names.layer + 1),
                    site=names.alias, features=[feature], **caap_kwargs)
    amap.meta["feature"] = feature
    amap.meta["sae_hook"] = names.hook
    return amap


__all__ = ["feature_attribution", "patch_features", "feature_caap"]
