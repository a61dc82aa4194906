"""Divergence measures between intervened and natural representations, on plain tensors.

Grant, Han, Tartaglini & Potts, "Divergent representations" (arXiv 2511.04638, ICLR 2026),
section 3: every measure is read against the same measure between two natural sets.

- `ot_divergence`: debiased Sinkhorn divergence (geomloss, ``p=2, blur=0.05``, geomloss's default
  ``scaling=0.5`` as in the paper's code) between patched and natural vectors, divided by
  ``sqrt(D)``, beside the natural-vs-natural baseline at the same sample size. The natural set is
  split **by image** (its halves share no image), so the baseline compares independent images
  as a held-out natural set does.
- `local_pca_residual`, `knn`: the geometry the per-vector test (`scorer.NaturalScorer`) uses.

How the z-scoring differs from the paper's code (``rep_divergence/divergence/divergence_utils.py``,
``sample_emd(normalize=True)``): there each set is z-scored with its *own* mean and std (std +
1e-5), which hides any shift or per-dimension rescaling of the patched set; patchlens z-scores
both with the *natural* statistics by default (``zscore="natural"``), and offers
``zscore="self"`` to reproduce the paper's numbers (docs/divergence.md, with figures).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from patchlens.checks import all_finite, check_int, check_number
from patchlens.errors import InputError

ZSCORES = ("natural", "self")
MIN_OT = 20  # natural vectors needed for a baseline (two halves of 10)
SELF_EPS = 1e-5  # the paper's code: (x - mean) / (std + 1e-5)


def as_vectors(x, what: str) -> Tensor:
    """``x`` as float32 ``[N, D]`` (a single vector becomes ``[1, D]``); rejects NaN/inf."""
    x = torch.as_tensor(x)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise InputError(f"{what} must be vectors [N, D], got shape {tuple(x.shape)}.")
    if x.shape[0] == 0:
        raise InputError(f"{what} is empty (0 vectors).")
    if not all_finite(x):
        raise InputError(f"{what} contains NaN or infinite values.")
    return x.detach().to(torch.float32)


def safe_std(std: Tensor) -> Tensor:
    """``std`` floored at ``1e-6 * max(std)`` (and 1e-8): constant dimensions stay finite."""
    std = torch.as_tensor(std, dtype=torch.float32)
    return std.clamp_min(max(1e-6 * float(std.max()), 1e-8))


def _cap(x: Tensor, k: int, seed: int) -> Tensor:
    """Row indices of a uniform subsample of at most ``k`` rows (all rows, in order, if fewer)."""
    if x.shape[0] <= k:
        return torch.arange(x.shape[0])
    return torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:k]


@contextmanager
def few_threads(n: int = 1):
    """Run small tensor ops on ``n`` intra-op threads: the Sinkhorn iterations and the per-vector
    measures are dominated by thread-pool synchronisation otherwise (20x slower on a shared
    2-core machine)."""
    before = torch.get_num_threads()
    if n >= before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sinkhorn(x: Tensor, y: Tensor, blur: float = 0.05, scaling: float = 0.5) -> float:
    """Debiased Sinkhorn divergence ``S_eps(x, y)`` (geomloss ``SamplesLoss("sinkhorn", p=2)``,
    cost ``|x - y|^2 / 2``, uniform weights) of ``[N, D]`` and ``[M, D]``."""
    from geomloss import SamplesLoss

    both = torch.cat([x, y])
    if float((both.amax(0) - both.amin(0)).norm()) <= 1e-9:  # two copies of one point
        return 0.0
    loss = SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, backend="tensorized")
    with few_threads(1 if x.shape[0] * y.shape[0] <= 1024**2 else torch.get_num_threads()):
        return float(loss(x.contiguous(), y.contiguous()).clamp_min(0.0))


def zscored(x: Tensor, zscore: str, stats: tuple[Tensor, Tensor] | None) -> Tensor:
    """``x`` z-scored per dimension: with the natural ``stats`` (``"natural"``; std floored by
    `safe_std`) or with its own mean and std + 1e-5 (``"self"``, the paper's code)."""
    if zscore == "self":
        return (x - x.mean(0)) / (x.std(0) + SELF_EPS)
    mean, std = stats
    return (x - mean) / safe_std(std)


def ot_distance(x, y, *, zscore: str = "natural", stats: tuple[Tensor, Tensor] | None = None,
                blur: float = 0.05, scaling: float = 0.5) -> float:
    """Sinkhorn divergence of ``x [N, D]`` and ``y [M, D]`` after z-scoring (`zscored`; with
    ``"natural"``, ``stats`` are the natural ``(mean, std)``, default: ``y``'s), divided by
    ``sqrt(D)`` (paper, section 3; with ``zscore="self"`` and the defaults this is the paper
    code's ``sample_emd(x, y, normalize=True)`` without its shuffling)."""
    x, y = as_vectors(x, "x"), as_vectors(y, "y")
    if x.shape[1] != y.shape[1]:
        raise InputError(f"x has D={x.shape[1]} but y has D={y.shape[1]}.")
    if zscore not in ZSCORES:
        raise InputError(f"zscore must be one of {ZSCORES}; got {zscore!r}.")
    if zscore == "natural" and stats is None:
        stats = (y.mean(0), y.std(0))
    return sinkhorn(zscored(x, zscore, stats), zscored(y, zscore, stats), blur,
                    scaling) / x.shape[1] ** 0.5


@dataclass
class OTResult:
    """Sinkhorn distance of a patched set to the natural set, and the natural-vs-natural
    baseline at the same sample size; ``ratio = distance / baseline`` (1 = as natural).
    ``n_patched`` / ``n_natural``: vectors compared; ``n_images``: images in each natural half."""

    distance: float
    baseline: float
    ratio: float
    n_patched: int
    n_natural: int
    n_images: int = 0


def ot_divergence(patched, natural, *, groups=None, zscore: str = "natural", blur: float = 0.05,
                  scaling: float = 0.5, max_samples: int = 5000, seed: int = 0,
                  stats: tuple[Tensor, Tensor] | None = None,
                  baseline_cache: dict | None = None, cache_key=None) -> OTResult:
    """Sinkhorn divergence of ``patched [M, D]`` to ``natural [N, D]`` beside its baseline.

    The natural set (capped at ``max_samples``) is split into halves A and B **by image**
    (``groups [N]``: the image of each natural vector; None: every vector its own image);
    ``distance = OT(P, A)`` and ``baseline = OT(B, A)`` (`ot_distance`), with P and B subsampled
    to the same size ``min(M, |B|)`` (the debiased divergence still depends on the sample size).
    ``stats``: natural ``(mean, std)`` for ``zscore="natural"`` (default: of ``natural``).
    ``baseline_cache`` (a dict) with ``cache_key`` reuses the baseline of an earlier call.
    """
    p = as_vectors(patched, "patched")
    q = as_vectors(natural, "natural")
    check_number("blur", blur, 0.0, low_open=True)
    check_int("max_samples", max_samples, 1)
    if p.shape[0] == 0:
        raise InputError("patched is empty (0 vectors); there is nothing to compare.")
    if p.shape[1] != q.shape[1]:
        raise InputError(f"patched has D={p.shape[1]} but natural has D={q.shape[1]}.")
    if zscore not in ZSCORES:
        raise InputError(f"zscore must be one of {ZSCORES}; got {zscore!r}.")
    g = torch.arange(q.shape[0]) if groups is None else torch.as_tensor(groups).flatten()
    if g.numel() != q.shape[0]:
        raise InputError(f"groups has {g.numel()} entries for {q.shape[0]} natural vectors.")
    if q.shape[0] < MIN_OT or torch.unique(g).numel() < 2:
        raise InputError(
            f"The Sinkhorn baseline needs at least {MIN_OT} natural vectors from at least 2 "
            f"images (two halves); got {q.shape[0]} from {torch.unique(g).numel()}. Fit the "
            "reference on more images.")
    if stats is None:
        stats = (q.mean(0), q.std(0))
    keep = _cap(q, max_samples, seed)  # rows picked by (n, seed) alone
    q, g = q[keep], g[keep]
    a_idx, b_idx = split_by_group(g, seed + 1)
    a, b = q[a_idx], q[b_idx]
    m = min(p.shape[0], b.shape[0])
    p, b = p[_cap(p, m, seed + 2)], b[_cap(b, m, seed + 3)]
    kw = dict(zscore=zscore, stats=stats, blur=blur, scaling=scaling)
    d = ot_distance(p, a, **kw)
    ck = (cache_key, m, q.shape[0], blur, scaling, zscore, seed)
    if baseline_cache is not None and cache_key is not None and ck in baseline_cache:
        base = baseline_cache[ck]
    else:
        base = ot_distance(b, a, **kw)
        if baseline_cache is not None and cache_key is not None:
            baseline_cache[ck] = base
    ratio = 1.0 if max(d, base) <= 1e-12 else d / base if base > 1e-12 else float("inf")
    return OTResult(d, base, ratio, p.shape[0], a.shape[0],
                    int(torch.unique(g[a_idx]).numel()))


# ---- geometry of the per-vector test ------------------------------------------------------------
def split_by_group(groups: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Row indices of two halves with no group (image) in both."""
    uniq, inv = torch.unique(groups, return_inverse=True)
    perm = torch.randperm(len(uniq), generator=torch.Generator().manual_seed(seed))
    first = torch.zeros(len(uniq), dtype=torch.bool)
    first[perm[: len(uniq) // 2]] = True
    mask = first[inv]
    return torch.nonzero(mask).flatten(), torch.nonzero(~mask).flatten()


def knn(x: Tensor, ref: Tensor, k: int, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """Squared distances ``[M, k]`` and indices of the k nearest rows of ``ref`` (sorted)."""
    ds, ids = [], []
    ref_sq = (ref * ref).sum(1)
    k = min(k, ref.shape[0])
    for i in range(0, x.shape[0], chunk):
        xc = x[i : i + chunk]
        d2 = (xc * xc).sum(1, keepdim=True) - 2 * xc @ ref.T + ref_sq
        v, j = torch.topk(d2, k, dim=1, largest=False)
        ds.append(v.clamp_min(0))
        ids.append(j)
    return torch.cat(ds), torch.cat(ids)


def local_pca_residual(x: Tensor, ref: Tensor, k: int = 20, var: float = 0.95,
                       chunk: int = 512, neighbours: Tensor | None = None) -> Tensor:
    """Residual ``[M]`` (mean square per dimension) of each ``x`` after projecting ``x - mu``
    onto the principal components (to ``var`` explained variance) of its ``k`` nearest
    neighbours in ``ref``, ``mu`` their mean (paper: local PCA with k = 20, 95%).
    ``neighbours`` ``[M, k]``: their indices in ``ref`` if already known (from `knn`)."""
    if neighbours is None:
        check_int("k", k, 1, ref.shape[0])
        check_number("var", var, 0.0, 1.0, low_open=True)
        if x.ndim != 2 or ref.ndim != 2 or x.shape[1] != ref.shape[1]:
            raise InputError(f"x [M, D] and ref [N, D] must share D, got {tuple(x.shape)} and "
                             f"{tuple(ref.shape)}.")
    idx = neighbours if neighbours is not None else knn(x, ref, k)[1]
    out = []
    for i in range(0, x.shape[0], chunk):
        nb = ref[idx[i : i + chunk]]                           # [m, k, D]
        mu = nb.mean(1, keepdim=True)
        xc = nb - mu
        # principal directions from the k x k Gram matrix (k << D): v_j = xc^T u_j / s_j
        ev, u = torch.linalg.eigh(torch.bmm(xc, xc.transpose(1, 2)).double())  # ascending
        ev, u = ev.flip(-1).clamp_min(0), u.flip(-1)
        frac = ev.cumsum(1) / ev.sum(1, keepdim=True).clamp_min(1e-30)
        n_comp = (frac < var).sum(1) + 1                       # components to reach `var`
        keep = (torch.arange(ev.shape[1]) < n_comp[:, None]) & (ev > 1e-12 * ev[:, :1])
        r = x[i : i + chunk] - mu[:, 0]
        proj = torch.bmm(xc, r.unsqueeze(-1)).double()         # xc r  [m, k, 1]
        w = u @ ((u.transpose(1, 2) @ proj) * (keep / ev.clamp_min(1e-30)).unsqueeze(-1))
        resid = r - torch.bmm(xc.transpose(1, 2), w.float()).squeeze(-1)
        out.append((resid.double() ** 2).sum(1).float() / x.shape[1])
    return torch.cat(out)


__all__ = ["MIN_OT", "OTResult", "ZSCORES", "as_vectors", "few_threads", "knn",
           "local_pca_residual", "ot_distance", "ot_divergence", "safe_std", "sinkhorn",
           "split_by_group"]
