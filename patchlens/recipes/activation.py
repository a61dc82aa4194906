"""Activation patching sweeps (exact, on the engine) and attribution patching (first order).

Denoising (clean activations into the corrupted run) tests whether a component is sufficient
to restore the behaviour; noising (corrupted into clean) tests whether it is necessary
(Heimersheim & Nanda 2024, "How to use and interpret activation patching"; Zhang & Nanda 2023).
Attribution patching estimates every effect at once with a first-order Taylor expansion,
``(a_source - a_target) . dM/da`` at the target run (Nanda 2023; Syed et al. 2023).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from patchlens.errors import InputError
from patchlens.metrics import Recovery, metric_name
from patchlens.patching.engine import run_variants
from patchlens.patching.interventions import Interchange
from patchlens.patching.recipe import Recipe
from patchlens.patching.results import PatchResult
from patchlens.patching.sites import (
    Site,
    options_for,
    resolve_heads,
    resolve_layers,
    resolve_tokens,
)
from patchlens.recipes.common import check_pair, metric_values

Per = Literal["token", "head", "head_token", "layer", "region"]


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
        site: short hook name; default ``"resid_pre"`` (``"z"`` for per-head sweeps).
        per: ``"token"`` (layer x token), ``"head"`` (layer x head, all selected tokens),
            ``"head_token"`` (layer x head x token), ``"layer"``, or ``"region"`` (layer x
            the given patch-grid ``regions``).
        layers, tokens, heads: restrict the sweep (selectors as in `Site`).
        direction: ``"denoising"`` patches clean activations into the corrupted run;
            ``"noising"`` patches corrupted activations into the clean run.
        method: ``"exact"`` (one patched run per variant, batched) or ``"attribution"``
            (first-order estimate from one forward and one backward pass).
        diagnose: a fitted `patchlens.diagnostics.Reference` to attach a divergence report.

    Returns:
        `PatchResult` with ``values [*axes]`` (mean over the pairs) and ``per_example``.
    """
    check_pair(model, clean, corrupted)
    if direction not in ("denoising", "noising"):
        raise InputError(f"direction must be 'denoising' or 'noising', got {direction!r}.")
    if method not in ("exact", "attribution"):
        raise InputError(f"method must be 'exact' or 'attribution', got {method!r}.")
    if per not in ("token", "head", "head_token", "layer", "region"):
        raise InputError(f"per must be token, head, head_token, layer or region; got {per!r}.")
    site = site or ("z" if per in ("head", "head_token") else "resid_pre")
    target, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    layout = model.layout_for(tuple(clean.shape[-2:]))
    n_layers = model.cfg.n_layers

    with torch.inference_mode():
        m_clean = metric_values(metric, model(clean), clean.shape[0])
        m_corrupted = metric_values(metric, model(corrupted), clean.shape[0])

    layer_list = resolve_layers(layers, n_layers)
    axes: dict[str, list] = {"layers": layer_list}
    labels: dict[str, list] = {"layer": [str(layer) for layer in layer_list]}
    fixed: dict[str, Any] = {}
    if per in ("head", "head_token"):
        head_list = resolve_heads(heads if heads is not None else list(range(model.cfg.n_heads)),
                                  model.cfg.n_heads).tolist()
        axes["heads"] = head_list
        labels["head"] = [str(h) for h in head_list]
    elif heads is not None:
        fixed["heads"] = heads
    if per in ("token", "head_token"):
        tok = resolve_tokens(tokens, layout)
        tok_list = list(range(layout.n_tokens)) if tok is None else tok.tolist()
        axes["tokens"] = tok_list
        labels["token"] = [layout.label(t) for t in tok_list]
    elif per == "region":
        if not regions:
            raise InputError("per='region' needs regions=: a dict name -> boolean patch-grid mask.")
        named = regions if isinstance(regions, dict) else {f"region{i}": r for i, r in enumerate(regions)}
        axes["tokens"] = list(named.values())
        labels["region"] = list(named)
    else:
        fixed["tokens"] = tokens

    base = Site(site, **fixed)
    recipe = Recipe([(base, Interchange(source, "clean" if direction == "denoising" else "corrupted"))],
                    f"activation patching ({direction})")
    variants = recipe.variants(**axes)
    # every variant has one pair; fix the site fields that do not vary
    collector = None
    if diagnose is not None and method == "exact":  # reduced inside the sweep's own run
        from patchlens.diagnostics.diagnose import sweep_collector

        collector = sweep_collector(model, target, variants, diagnose)
    if method == "exact":
        res = run_variants(model, target, variants, metric=metric, batch_size=batch_size,
                           memory_budget=memory_budget, progress=progress,
                           observers=collector.observers if collector is not None else ())
        per_variant = res.outputs  # [V, B]
    else:
        per_variant = None
    m_target = m_corrupted if direction == "denoising" else m_clean
    if method == "attribution":  # estimated patched metric = unpatched + first-order change
        per_variant = m_target + _attribution(model, target, source, metric, variants)
    if isinstance(metric, Recovery):
        per_variant = metric.normalise(per_variant, m_clean, m_corrupted)

    names = tuple("region" if (k == "tokens" and per == "region") else
                  {"layers": "layer", "tokens": "token", "heads": "head"}[k] for k in axes)
    shape = [len(v) for v in axes.values()]
    per_example = per_variant.reshape(*shape, target.shape[0]).detach()
    coords = {n: (list(range(len(v))) if n == "region" else list(v)) for n, v in zip(names, axes.values())}
    result = PatchResult(
        per_example.mean(-1), names, {n: labels[n] for n in names}, per_example=per_example,
        clean=m_clean, corrupted=m_corrupted, coords=coords, layout=layout,
        image=model.to_image(target[0]),
        meta={"recipe": "activation patching", "site": site, "per": per, "direction": direction,
              "method": method, "metric": metric_name(metric), "baseline": m_target.mean().item()},
    )
    if diagnose is not None:
        from patchlens.diagnostics.diagnose import diagnose_sweep

        result.divergence = diagnose_sweep(model, target, variants, diagnose, result,
                                           collector=collector)
    return result


def _attribution(model, target: Tensor, source: Tensor, metric, variants) -> Tensor:
    """First-order estimates ``sum((a_source - a_target) * dM/da)`` over each variant's selection,
    ``[V, B]``, from one forward+backward on the target and one cached source run."""
    grid = (target.shape[-2] // model.cfg.patch_size[0], target.shape[-1] // model.cfg.patch_size[1])
    resolved = [v.pairs[0][0].resolve(model, grid) for v in variants]
    hooks = sorted({rs.hook for rss in resolved for rs in rss})
    flags = options_for(hooks)
    acts: dict[str, Tensor] = {}

    def keep(act, hook):
        act.retain_grad()
        acts[hook.name] = act
        return act

    with model.options(**flags):
        with torch.inference_mode():
            _, src_cache = model.run_with_cache(source, names_filter=hooks, return_type=None)
        with torch.enable_grad():
            x = target.detach().clone().requires_grad_(True)
            logits = model.run_with_hooks(x, fwd_hooks=[(h, keep) for h in hooks])
            metric(logits).sum().backward()
    contrib = {}
    for h in hooks:
        prod = ((src_cache[h] - acts[h].detach()) * acts[h].grad).sum(-1)
        if h.endswith(("hook_pattern", "hook_attn_scores")):
            prod = prod.transpose(1, 2)  # [B, query, head]
        contrib[h] = prod if prod.ndim == 3 else prod[..., None]  # [B, pos, head-or-1]
    out = torch.zeros(len(variants), target.shape[0], dtype=target.dtype)
    for i, rss in enumerate(resolved):
        for rs in rss:
            c = contrib[rs.hook]
            if rs.tokens is not None:
                c = c[:, rs.tokens]
            if rs.heads is not None:
                c = c[:, :, rs.heads]
            out[i] += c.sum((1, 2)).to(out.dtype)
    return out
