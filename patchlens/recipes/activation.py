"""Activation patching sweeps (exact, on the engine) and attribution patching (first order).

Denoising (clean activations into the corrupted run) tests whether a component is sufficient
to restore the behaviour; noising (corrupted into clean) tests whether it is necessary
(Heimersheim & Nanda 2024, "How to use and interpret activation patching"; Zhang & Nanda 2023).
Attribution patching estimates every effect at once with a first-order Taylor expansion,
``(a_source - a_target) . dM/da`` at the target run (Nanda 2023; Syed et al. 2023).

`activation_patching` is four steps: validate the arguments, plan the sweep's axes and
variants, execute them (exact or attribution), and assemble the `PatchResult`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from patchlens.checks import all_finite
from patchlens.errors import InputError
from patchlens.metrics import Recovery, base_metric, metric_name
from patchlens.patching.engine import Variant, capture, capture_grads, run_variants
from patchlens.patching.interventions import Interchange
from patchlens.patching.recipe import Recipe
from patchlens.patching.results import PatchResult
from patchlens.patching.sites import (
    Rect,
    ResolvedSite,
    Site,
    resolve_features,
    resolve_heads,
    resolve_layers,
    resolve_tokens,
)
from patchlens.recipes.common import baseline_metrics, check_choice, check_pair, check_reference

Per = Literal["token", "head", "head_token", "layer", "region", "feature"]
PERS = ("token", "head", "head_token", "layer", "region", "feature")
AXIS_OF = {"layers": "layer", "tokens": "token", "heads": "head", "features": "feature"}


@dataclass
class _Sweep:
    """The planned sweep: which Site field varies along each axis, and the axes' labels."""

    axes: dict[str, list]          # Site field -> values, in axis order
    names: tuple[str, ...]         # result axis names
    labels: dict[str, list]
    coords: dict[str, list]
    variants: list[Variant]


def activation_patching(
    model,
    clean: Tensor,
    corrupted: Tensor,
    metric: Callable[[Tensor], Tensor],
    site: str | None = None,
    per: Per = "token",
    *,
    layers: Any = "all",
    tokens: Any = "all",
    heads: Any = None,
    regions: dict[str, Tensor] | Sequence[Tensor] | None = None,
    features: Any = None,
    direction: Literal["denoising", "noising"] = "denoising",
    method: Literal["exact", "attribution"] = "exact",
    batch_size: int | None = None,
    memory_budget: str | int | None = "2GB",
    progress: bool | None = None,
    diagnose: Any = None,
) -> PatchResult:
    """Patch one site at a time and measure ``metric``.

    Args:
        clean, corrupted: image batches ``[B, C, H, W]`` of the same shape (pairs).
        metric: ``logits [N, classes] -> [N]`` (see `patchlens.metrics`); wrap it in
            `patchlens.metrics.recovery` to report normalised recovery.
        site: short hook name; default ``"resid_pre"`` (``"z"`` for per-head sweeps,
            ``"sae_acts_post"`` for per-feature sweeps). A full
            hook name (``"blocks.3.hook_resid_pre"``) is one hook: the layer axis has its one
            layer.
        per: ``"token"`` (layer x token), ``"head"`` (layer x head, all selected tokens),
            ``"head_token"`` (layer x head x token), ``"layer"``, ``"region"`` (layer x
            the given patch-grid ``regions``), or ``"feature"`` (layer x feature, at a hook with
            a feature axis such as a spliced SAE's ``"sae_acts_post"``; all selected tokens).
        layers, tokens, heads, features: restrict the sweep (selectors as in `Site`).
        direction: ``"denoising"`` patches clean activations into the corrupted run;
            ``"noising"`` patches corrupted activations into the clean run.
        method: ``"exact"`` (one patched run per variant, batched) or ``"attribution"``
            (first-order estimate from one forward and one backward pass).
        diagnose: a fitted `patchlens.diagnostics.Reference` to attach a divergence report.

    Returns:
        `PatchResult`: ``values [*axes]`` the patched metric averaged over the pairs
        (normalised recovery with a `recovery` metric; for ``method="attribution"`` its
        first-order estimate), ``per_example [batch, *axes]``, ``baseline [batch]`` the
        unpatched target run's metric (the corrupted run when denoising), and ``effects`` =
        values − baseline (what ``repr``, ``top`` and ``plot`` show).
    """
    site = _validate(model, clean, corrupted, site, per, direction, method, diagnose, regions)
    target, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    m_clean, m_corrupted = baseline_metrics(model, clean, corrupted, metric)
    sweep = _plan(model, site, per, layers, tokens, heads, regions, source, direction,
                  model.layout_for(tuple(clean.shape[-2:])), features)
    m_target = m_corrupted if direction == "denoising" else m_clean
    collector = None
    if method == "exact":
        if diagnose is not None:  # reduced inside the sweep's own run
            from patchlens.diagnostics.diagnose import sweep_collector

            collector = sweep_collector(model, target, sweep.variants, diagnose)
        per_variant = run_variants(
            model, target, sweep.variants, metric=base_metric(metric), batch_size=batch_size,
            memory_budget=memory_budget, progress=progress,
            observers=collector.observers if collector is not None else ()).outputs  # [V, B]
    else:  # estimated patched metric = unpatched + first-order change
        per_variant = m_target + attribution_estimates(model, target, source, metric,
                                                       sweep.variants)
    normalized = isinstance(metric, Recovery)
    if normalized:
        per_variant = metric.normalise(per_variant, m_clean, m_corrupted)
        m_target = metric.normalise(m_target, m_clean, m_corrupted)
    result = _assemble(model, sweep, per_variant, clean, m_clean, m_corrupted, m_target,
                       meta={"site": site, "per": per, "direction": direction, "method": method,
                             "metric": metric_name(metric), "normalized": normalized})
    if diagnose is not None:
        from patchlens.diagnostics.diagnose import diagnose_sweep

        result.divergence = diagnose_sweep(model, target, sweep.variants, diagnose, result,
                                           collector=collector)
    return result


# ---- steps --------------------------------------------------------------------------------------
def _validate(model, clean, corrupted, site, per, direction, method, diagnose, regions) -> str:
    check_pair(model, clean, corrupted)
    check_choice("direction", direction, ("denoising", "noising"))
    check_choice("method", method, ("exact", "attribution"))
    check_choice("per", per, PERS)
    check_reference(diagnose)
    if regions is not None and per != "region":
        raise InputError(f"regions= is only used with per='region' (got per={per!r}); pass "
                         "per='region' to sweep over the regions.")
    if site is not None and (not isinstance(site, str) or not site):
        raise InputError(f"site must be a hook name (short or full; None for the default), got "
                         f"{site!r}. `patchlens hooks MODEL` lists them.")
    default = {"head": "z", "head_token": "z", "feature": "sae_acts_post"}.get(per, "resid_pre")
    return default if site is None else site


def _plan(model, site: str, per: str, layers, tokens, heads, regions, source, direction,
          layout, features=None) -> _Sweep:
    """The sweep's axes (Site field -> values), labels and variants."""
    axes: dict[str, list] = {}
    labels: dict[str, list] = {}
    fixed: dict[str, Any] = {}
    probe = Site(site)
    if probe.is_per_layer(model):
        layer_list = resolve_layers(layers, model.cfg.n_layers)
        if isinstance(layers, str) and layers == "all":  # only where the hook exists (SAEs)
            layer_list = [l for l in layer_list if l in model.hook_aliases[site]]
        axes["layers"], labels["layer"] = layer_list, [str(layer) for layer in layer_list]
    else:  # one hook (a full name, or a hook outside the blocks): a layer axis of one entry
        ((name, layer),) = Site(site, layers=layers).hook_names(model)
        axes["layers"] = [layers]
        labels["layer"] = [str(layer) if layer is not None else name]
    if per in ("head", "head_token"):
        n_heads = model.cfg.n_heads
        head_list = resolve_heads(heads if heads is not None else list(range(n_heads)),
                                  n_heads).tolist()
        axes["heads"], labels["head"] = head_list, [str(h) for h in head_list]
    elif heads is not None:
        fixed["heads"] = heads
    if per in ("token", "head_token"):
        tok = resolve_tokens(tokens, layout)
        tok_list = list(range(layout.n_tokens)) if tok is None else tok.tolist()
        axes["tokens"], labels["token"] = tok_list, [layout.label(t) for t in tok_list]
    elif per == "region":
        named = _regions(regions, layout, source.shape[0])
        axes["tokens"], labels["region"] = list(named.values()), list(named)
    else:
        fixed["tokens"] = tokens
    if per == "feature":
        feat_list = (resolve_features(features) if features is not None
                     else torch.arange(_feature_count(
                         model, site, axes["layers"] if probe.is_per_layer(model) else layers,
                         source))).tolist()
        axes["features"], labels["feature"] = feat_list, [str(f) for f in feat_list]
    elif features is not None:
        fixed["features"] = features
    source_name = "clean" if direction == "denoising" else "corrupted"
    recipe = Recipe([(Site(site, **fixed), Interchange(source, source_name))],
                    f"activation patching ({direction})")
    variants = recipe.variants(**axes)
    names = tuple("region" if (k == "tokens" and per == "region") else AXIS_OF[k] for k in axes)
    coords = {n: (list(range(len(v))) if n == "region" else list(v))
              for n, v in zip(names, axes.values())}
    return _Sweep(axes, names, {n: labels[n] for n in names}, coords, variants)


def _feature_count(model, site: str, layers, images: Tensor) -> int:
    """Width of the feature axis at ``site`` (measured on one image)."""
    names = [n for n, _ in Site(site, layers=layers).hook_names(model)]
    spec = model.hook_spec(names[0])
    if spec.feature_axis is None:
        raise InputError(f"per='feature' needs a hook with a feature axis (e.g. a spliced SAE's "
                         f"'sae_acts_post'); {spec.describe()} has none.")
    acts = capture(model, images[:1], names, return_type=None).acts
    widths = {n: a.shape[model.hook_spec(n).feature_axis] for n, a in acts.items()}
    if len(set(widths.values())) > 1:
        raise InputError(f"The feature axes differ in width across layers ({widths}); sweep one "
                         "layer at a time or pass features=.")
    return next(iter(widths.values()))


def _assemble(model, sweep: _Sweep, per_variant: Tensor, clean, m_clean, m_corrupted, m_target,
              meta: dict) -> PatchResult:
    shape = [len(v) for v in sweep.axes.values()]
    per_example = per_variant.reshape(*shape, clean.shape[0]).movedim(-1, 0).detach()
    return PatchResult(
        per_example.mean(0), sweep.names, sweep.labels, per_example=per_example,
        clean=m_clean, corrupted=m_corrupted, baseline=m_target.detach(), coords=sweep.coords,
        layout=model.layout_for(tuple(clean.shape[-2:])), images=model.to_image(clean).cpu(),
        meta={"recipe": "activation patching", **meta},
    )


def _regions(regions, layout, batch: int) -> dict[str, Any]:
    """``regions=`` (a dict name -> mask, a list of masks or a bool tensor ``[R, gh, gw]``) as
    named boolean patch-grid masks or `Rect` objects, each checked against the grid. A region
    may differ per image: a bool mask ``[batch, gh, gw]`` or a list of one `Rect` per image."""
    if isinstance(regions, Tensor) and regions.ndim == 3:
        regions = list(regions)
    if regions is None or (isinstance(regions, (dict, list, tuple)) and len(regions) == 0):
        raise InputError("per='region' needs regions=: a dict name -> boolean patch-grid "
                         f"mask {tuple(layout.grid)} (or a list of masks).")
    if not isinstance(regions, (dict, list, tuple)):
        raise InputError(f"regions must be a dict name -> mask, a list of masks or a bool "
                         f"tensor [R, grid_h, grid_w], got {type(regions).__name__}.")
    named = regions if isinstance(regions, dict) else {f"region{i}": r
                                                      for i, r in enumerate(regions)}
    grid = tuple(layout.grid)
    for name, mask in named.items():
        per_image = ((isinstance(mask, Tensor) and mask.dtype == torch.bool
                      and tuple(mask.shape) == (batch, *grid))
                     or (isinstance(mask, (list, tuple)) and len(mask) == batch
                         and all(isinstance(r, Rect) for r in mask)))
        if not per_image and not isinstance(mask, Rect) and not (
                isinstance(mask, Tensor) and mask.dtype == torch.bool
                and tuple(mask.shape) == grid):
            got = (f"dtype {mask.dtype} shape {tuple(mask.shape)}" if isinstance(mask, Tensor)
                   else type(mask).__name__)
            raise InputError(
                f"regions[{name!r}] must be a boolean patch-grid mask of shape {grid}, a Rect, "
                f"or one per image (a mask {(batch, *grid)} or a list of {batch} Rects), got "
                f"{got}; build one with torch.zeros(*grid, "
                "dtype=torch.bool) and set the region's cells to True (a 0/1 mask: mask.bool())."
            )
    return dict(named)


# ---- attribution patching -----------------------------------------------------------------------
def attribution_estimates(model, target: Tensor, source: Tensor, metric,
                          variants: Sequence[Variant]) -> Tensor:
    """First-order estimates ``sum((a_source - a_target) * dM/da)`` over each variant's
    selection, ``[V, B]``: the engine captures the source activations in one run and the
    target's activations and gradients in one forward and backward pass."""
    grid = (target.shape[-2] // model.cfg.patch_size[0],
            target.shape[-1] // model.cfg.patch_size[1])
    resolved = [[rs for site, _ in v.pairs for rs in site.resolve(model, grid)]
                for v in variants]
    hooks = sorted({rs.hook for rss in resolved for rs in rss})
    src = capture(model, source, hooks)
    tgt = capture_grads(model, target, hooks, base_metric(metric))
    contrib = {}
    for h in hooks:
        prod = (src.acts[h] - tgt.acts[h]) * tgt.grads[h]
        if not all_finite(prod):
            raise InputError(
                f"Attribution patching got a non-finite gradient or activation at {h}; the "
                "first-order estimate is undefined there. Use method='exact'."
            )
        contrib[h] = prod
    out = torch.zeros(len(variants), target.shape[0], dtype=tgt.values.dtype,
                      device=tgt.values.device)
    for i, rss in enumerate(resolved):
        for rs in rss:
            out[i] += selection_sum(contrib[rs.hook], rs).to(out.dtype)
    return out


def selection_sum(values: Tensor, rs: ResolvedSite) -> Tensor:
    """``values`` (one per activation element, ``[B, ...]`` in the hook's axes) summed over a
    site's selection: the selected tokens, heads and features, every other axis but the batch;
    ``[B]``."""
    v = values
    for axis, idx in ((rs.spec.token_axis, rs.tokens), (rs.spec.head_axis, rs.heads),
                      (rs.spec.feature_axis, rs.features)):
        if axis is None or idx is None:
            continue
        idx = idx.to(v.device)
        if idx.ndim == 1:
            v = v.index_select(axis, idx)
        else:  # per-image tokens [B, k]: each image's own, padding zeroed
            shape = [v.shape[0]] + [1] * (v.ndim - 1)
            shape[axis] = idx.shape[1]
            v = v.gather(axis, idx.view(shape).expand(
                *[idx.shape[1] if a == axis else n for a, n in enumerate(v.shape)]))
            if rs.token_valid is not None:
                v = v * rs.token_valid.to(v.device).view(shape).to(v.dtype)
    return v.reshape(v.shape[0], -1).sum(1)
