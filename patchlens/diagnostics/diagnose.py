"""`diagnose`: the divergence of a list of variants (one engine run), and the hooks the sweep
recipes call (``activation_patching(..., diagnose=reference)``)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from patchlens.diagnostics.collector import Collector
from patchlens.diagnostics.reference import Reference
from patchlens.diagnostics.result import DivergenceReport


def diagnose(model, target: Tensor, variants: Sequence, reference: Reference, *,
             effects: Tensor | None = None, behaviour: bool = True, ot: bool | str = "site",
             ot_samples: int = 256, max_vectors: int = 256, memory_budget: str | int = "2GB",
             thresholds: dict[str, float] | None = None, warn: bool = False,
             sae: Any = None) -> DivergenceReport:
    """Measure how divergent each variant's patched activations are (one engine run).

    Args:
        target: the batch the variants patch ``[B, C, H, W]``.
        variants: `Variant` list (as given to `run_variants`).
        reference: a `Reference` fitted on this model at every hook the variants patch.
        effects: ``[V]`` (or the sweep's shape) effect per variant, for the warning and plot.
        behaviour: the null-space fraction of each shift (Jacobian of the logits at the
            unpatched target: one batched backward pass for all sites).
        ot: ``"site"``: one Sinkhorn ratio per (site hook, token class) over all patched vectors
            there (``report.ot``); ``"variant"``: also one per row with at least 50 vectors
            (column ``ot_ratio``); False: none. Reported beside the verdict, not part of it.
            ``ot_samples`` caps the natural set (two halves, split by image).
        max_vectors: patched vectors kept per (variant, site) (uniform subsample).
        memory_budget: activation memory per engine chunk.
        thresholds: overrides of `THRESHOLDS` (``alpha``, ``outlier_rate``, ``dormant_margin``).
        sae: a sparse autoencoder (or a list, or ``{hook: sae}``) trained at hooks the variants
            patch: adds its feature-space measures to the rows (`patchlens.diagnostics.sae`).
    """
    from patchlens.patching.engine import run_variants

    col = Collector(model, target, variants, reference, behaviour=behaviour, ot=ot,
                    ot_samples=ot_samples, max_vectors=max_vectors, thresholds=thresholds,
                    sae=sae)
    run_variants(model, target, variants, observers=col.observers, memory_budget=memory_budget,
                 progress=False, return_type="pooled")
    rep = col.report(effects)
    if warn:
        warn_pernicious(rep)
    return rep


def diagnose_sweep(model, target: Tensor, variants: Sequence, reference: Reference, result,
                   collector: Collector | None = None) -> DivergenceReport:
    """The hook `activation_patching(..., diagnose=reference)` calls: the report with the
    sweep's effects and layout taken from ``result`` (a `PatchResult`). With ``collector``
    (a `sweep_collector` whose observers ran inside the sweep's own engine run) nothing is
    re-run; without it the variants are run again by `diagnose`."""
    effects = result.effects if result is not None else None
    if collector is not None:
        rep = collector.report(effects=effects)
    else:
        rep = diagnose(model, target, variants, reference, effects=effects)
    if result is not None:
        rep.shape, rep.axes, rep.labels = tuple(result.values.shape), result.axes, result.labels
    warn_pernicious(rep)
    return rep


def sweep_collector(model, target: Tensor, variants: Sequence, reference: Reference,
                    **kwargs) -> Collector:
    """A collector for ``variants`` on ``target``: pass ``collector.observers`` to
    `run_variants(..., observers=...)`, then call ``collector.report(effects)``."""
    return Collector(model, target, variants, reference, **kwargs)


def warn_pernicious(rep: DivergenceReport) -> None:
    """Warn when more than half of the summed |effect| comes from pernicious variants."""
    share = rep.pernicious_share()
    if not math.isnan(share) and share > 0.5:
        warnings.warn(f"{100 * share:.0f}% of the patching effect comes from divergent-pernicious "
                      "variants (patched vectors off the natural distribution and downstream "
                      "neurons beyond their natural range); see result.divergence.", stacklevel=3)


__all__ = ["diagnose", "diagnose_sweep", "sweep_collector", "warn_pernicious"]
