"""`assess`: the verdict of `diagnose` on plain tensors (any model, or a toy)."""

from __future__ import annotations

import math
from typing import Any

import torch

from patchlens.diagnostics.measures import MIN_OT, as_vectors, ot_divergence
from patchlens.diagnostics.neurons import dormant_units
from patchlens.diagnostics.scorer import NaturalScorer, needed_vectors
from patchlens.diagnostics.verdict import evidence, vector_evidence, verdict
from patchlens.diagnostics.verdict import thresholds as resolve_thresholds
from patchlens.errors import InputError


def assess(patched, natural, *, groups=None, downstream=None,
           thresholds: dict[str, float] | None = None, readout=None, delta=None,
           zscore: str = "natural") -> dict[str, Any]:
    """The verdict of `diagnose` (`verdict.verdict`) for ``patched [M, D]`` against
    ``natural [N, D]``.

    Args:
        groups: ``[N]`` the image each natural vector came from: the per-vector test and the
            Sinkhorn baseline split the natural set by image (None: every vector its own image).
        downstream: ``f(x [n, D]) -> [n, U]`` the computation that follows (e.g. a ReLU layer);
            its units on ``patched`` are compared with their range on ``natural``.
        readout: ``W [C, D]``, a linear readout for the behavioural split of ``delta``
            (``patched - natural`` row by row if not given and the shapes match).
        zscore: of the Sinkhorn ratio (reported, not in the verdict): ``"natural"`` or
            ``"self"`` (the paper's code; see `measures`).

    Returns:
        dict: the row of a `DivergenceReport` (``n``, ``n_outliers``, ``outlier_rate``,
        ``<measure>_pct``, ``measure``, ``n_fit``, ``n_cal``, ...), ``ot_distance``,
        ``ot_baseline``, ``ot_ratio``, ``dormant`` (unit indices), ``null_fraction`` (with a
        readout), ``verdict`` and ``evidence``.
    """
    from patchlens.diagnostics.behaviour import readout_null_fraction

    th = resolve_thresholds(thresholds)
    p, q = as_vectors(patched, "patched"), as_vectors(natural, "natural")
    if p.shape[1] != q.shape[1]:
        raise InputError(f"patched has D={p.shape[1]} but natural has D={q.shape[1]}.")
    g = torch.arange(q.shape[0]) if groups is None else torch.as_tensor(groups).flatten()
    n_images = int(torch.unique(g).numel()) if g.numel() == q.shape[0] else 0
    try:
        scorer = NaturalScorer(q, groups=groups)
    except InputError:
        scorer = None
    if scorer is None:
        scores, pv = None, torch.ones(p.shape[0])
    else:
        scores = scorer.scores(p)
        pv = scorer.pvalues(scores=scores)
    need = needed_vectors(th["alpha"])
    out: dict[str, Any] = {"class": "vectors"}
    out.update(vector_evidence(scorer, scores, pv, th, needed=need,
                               needed_images=-(-need * n_images // max(q.shape[0], 1)),
                               n_images_ref=n_images))
    out.update(ot_distance=math.nan, ot_baseline=math.nan, ot_ratio=math.nan)
    if q.shape[0] >= MIN_OT and p.shape[0] >= 2 and n_images >= 2:
        r = ot_divergence(p, q, groups=groups, zscore=zscore)
        out.update(ot_distance=r.distance, ot_baseline=r.baseline, ot_ratio=r.ratio)
    out["dormant"] = []
    if downstream is not None:
        nat_u, pat_u = downstream(q), downstream(p)
        mask = dormant_units(pat_u, nat_u.amax(0), nat_u.median(0).values, th["dormant_margin"])
        out["dormant"] = torch.nonzero(mask).flatten().tolist()
    out["n_dormant"] = len(out["dormant"])
    out["neurons"] = ", ".join(f"unit {u}" for u in out["dormant"][:3])
    if readout is not None:
        d = delta if delta is not None else p - q[: p.shape[0]]
        out["null_fraction"] = float(readout_null_fraction(d, readout).nanmean())
    out["verdict"] = verdict(out["n"], out["n_outliers"], out["n_dormant"], out["sufficient"], th)
    out["evidence"] = evidence(out, th)
    return out


__all__ = ["assess"]
