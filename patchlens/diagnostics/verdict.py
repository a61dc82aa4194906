"""The verdict: one rule, used by `diagnose` (every sweep row) and `assess` (plain tensors).

Grant, Han, Tartaglini & Potts, "Divergent representations" (arXiv 2511.04638): an intervention
is *divergent* when its patched vectors lie off the natural distribution at the site; a divergent
intervention is *pernicious* when it also drives downstream units beyond anything natural inputs
do (a dormant pathway), *harmless* otherwise.

Per row (the patched vectors of one variant at one site and token class):

- every vector gets the conformal p-value of the per-vector test (`scorer.NaturalScorer`); it is
  an *outlier* when ``p <= alpha`` (a natural vector is one with probability ``alpha``);
- ``divergent`` when more than ``outlier_rate`` of the row's vectors are outliers;
- ``divergent-pernicious`` when divergent and some downstream MLP neuron exceeds its natural
  bound (`neurons.neuron_bound`), ``divergent-harmless`` when divergent and none does;
- ``insufficient-reference`` when not divergent but the reference cannot run the test at level
  ``alpha`` (fewer than `scorer.needed_vectors` natural vectors of that class);
- ``natural`` otherwise.

The Sinkhorn ratio (`measures.ot_divergence`) is reported beside the verdict, not part of it: it
compares sets, and the vectors of a sweep row come from a handful of images (docs/divergence.md
shows how often the two agree on the calibration cases).
"""

from __future__ import annotations

from collections.abc import Mapping

from patchlens.errors import InputError

#: Thresholds of the verdict (docs/divergence.md: how they were calibrated).
THRESHOLDS: dict[str, float] = {
    # per-vector false-alarm level: a natural vector is an outlier with probability alpha
    "alpha": 0.01,
    # a row is divergent if more than this share of its vectors are outliers
    "outlier_rate": 0.5,
    # a downstream neuron is beyond its natural range above max + margin * (max - median)
    "dormant_margin": 3.0,
}
#: Verdicts from best to worst (a variant gets the worst of its rows).
VERDICTS = ("natural", "insufficient-reference", "divergent-harmless", "divergent-pernicious")


def thresholds(overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """`THRESHOLDS` with ``overrides`` (unknown keys and out-of-range values raise)."""
    out = dict(THRESHOLDS)
    for k, v in (overrides or {}).items():
        if k not in THRESHOLDS:
            raise InputError(f"Unknown threshold {k!r}; the thresholds are {list(THRESHOLDS)}.")
        out[k] = float(v)
    if not 0 < out["alpha"] < 1:
        raise InputError(f"alpha must be in (0, 1), got {out['alpha']}.")
    if not 0 <= out["outlier_rate"] < 1:
        raise InputError(f"outlier_rate must be in [0, 1), got {out['outlier_rate']}.")
    if out["dormant_margin"] < 0:
        raise InputError(f"dormant_margin must be >= 0, got {out['dormant_margin']}.")
    return out


def verdict(n_vectors: int, n_outliers: int, n_dormant: int, sufficient: bool,
            th: Mapping[str, float] = THRESHOLDS) -> str:
    """The verdict of one row (module docstring)."""
    if n_vectors <= 0:
        raise InputError("A verdict needs at least one patched vector.")
    if n_outliers > th["outlier_rate"] * n_vectors:
        return "divergent-pernicious" if n_dormant else "divergent-harmless"
    return "natural" if sufficient else "insufficient-reference"


def worst(verdicts) -> str:
    """The worst of several verdicts (`VERDICTS` order)."""
    return VERDICTS[max((VERDICTS.index(v) for v in verdicts), default=0)]


def evidence(row: Mapping, th: Mapping[str, float] = THRESHOLDS) -> str:
    """One line: what a row's verdict rests on (measure, neurons, sample sizes)."""
    n, k = row["n"], row["n_outliers"]
    ref = (f"reference {row['n_fit']} + {row['n_cal']} {row['class']} vectors "
           f"from {row['n_images_ref']} images")
    if row.get("constant"):
        ref = f"reference: one constant {row['class']} vector over {row['n_images_ref']} images"
    v = row["verdict"]
    if v == "insufficient-reference":
        return (f"{ref}: a test at alpha={th['alpha']:g} needs >= {row['needed']} "
                f"{row['class']} vectors (about {row['needed_images']} images)")
    head = (f"{k}/{n} vectors beyond the natural {100 * th['alpha']:g}% tail"
            + (f" (mostly {row['measure']})" if k else "") + f"; {ref}")
    if v == "divergent-pernicious":
        return head + f"; downstream neurons beyond natural range: {row['neurons']}"
    if row.get("n_dormant"):
        return head + (f"; {row['n_dormant']} downstream neurons beyond natural range "
                       "(site vectors natural: not part of the verdict)")
    return head


def vector_evidence(scorer, scores, pvalues, th: Mapping[str, float], *, needed: int,
                    needed_images: int, n_images_ref: int) -> dict:
    """The per-vector half of a row: counts, mean percentiles, the measure that flags most
    outliers and the reference sample sizes. ``scorer`` None: the class has too few natural
    vectors for any test (``scores`` / ``pvalues`` then only give the row size)."""
    from patchlens.diagnostics.scorer import MEASURES

    n = int(pvalues.numel())
    out = {"n": n, "n_images_ref": n_images_ref, "needed": needed,
           "needed_images": needed_images}
    if scorer is None:
        out.update(n_outliers=0, outlier_rate=0.0, measure="", n_fit=0, n_cal=0,
                   constant=False, sufficient=False, norm_ratio=float("nan"),
                   **{f"{m}_pct": float("nan") for m in MEASURES})
        return out
    outl = pvalues <= th["alpha"]
    k = int(outl.sum())
    pct = scorer.percentiles(scores)
    out.update({f"{m}_pct": float(v.float().mean()) for m, v in pct.items()})
    out["norm_ratio"] = float(scores["norm"].mean()) / max(scorer.typical_norm(), 1e-30) \
        if not scorer.constant else float("nan")
    out.update(n_outliers=k, outlier_rate=k / n, n_fit=scorer.n_fit, n_cal=scorer.n_cal,
               constant=scorer.constant,
               sufficient=scorer.constant or scorer.resolution() <= th["alpha"])
    out["measure"] = ""
    if k:
        names = scorer.tail_measure({m: s[outl] for m, s in scores.items()})
        counts: dict[str, int] = {}
        for nm in names:
            counts[nm] = counts.get(nm, 0) + 1
        out["measure"] = max(counts, key=counts.get)
    return out


__all__ = ["THRESHOLDS", "VERDICTS", "evidence", "thresholds", "vector_evidence", "verdict",
           "worst"]
