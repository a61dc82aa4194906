"""Divergence measures between intervened and natural representations, on plain tensors.

Follows Grant, Han, Tartaglini & Potts, "Divergent representations" (arXiv 2511.04638, ICLR
2026): every measure is shown against the natural-vs-natural baseline.

- `ot_divergence`: debiased Sinkhorn divergence (geomloss, ``p=2, blur=0.05``) between patched
  and natural sets, both z-scored per dimension with the natural statistics, capped at
  ``max_samples`` and scaled by ``1/sqrt(D)`` (so ``blur`` is in per-dimension units); the
  baseline is the same distance between two disjoint halves of the natural set.
- `NaturalScorer`: per-vector scores (Mahalanobis with Ledoit-Wolf shrinkage, nearest-neighbour
  MSE, local-PCA residual, norm ratio), each reported as a percentile of the scores of held-out
  natural vectors (fit on one half, score the other), so 50 is typical and 99 is rare.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from patchlens.checks import all_finite, check_int, check_number
from patchlens.errors import InputError

MEASURES = ("mahalanobis", "knn", "local_pca", "norm_ratio")


def _as_2d(x, what: str) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise InputError(f"{what} must be vectors [N, D], got shape {tuple(x.shape)}.")
    if not all_finite(x):
        raise InputError(f"{what} contains NaN or infinite values.")
    return x.detach().to(torch.float32)


def natural_stats(natural: Tensor) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and std ``[D]`` (std floored at 1e-6 of the largest, for dead dims)."""
    return natural.mean(0), safe_std(natural.std(0))


def safe_std(std: Tensor) -> Tensor:
    """``std`` floored at ``1e-6 * max(std)`` (and 1e-8): constant dimensions stay finite."""
    std = torch.as_tensor(std, dtype=torch.float32)
    return std.clamp_min(max(1e-6 * float(std.max()), 1e-8))


def _split(n: int, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n // 2], perm[n // 2 :]


def _cap(x: Tensor, k: int, seed: int) -> Tensor:
    if x.shape[0] <= k:
        return x
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:k]
    return x[idx]


@contextmanager
def few_threads(n: int = 1):
    """Run small tensor ops on ``n`` intra-op threads: the Sinkhorn iterations (a
    ``logsumexp`` over a few hundred points, ~800 calls) and the per-vector measures are
    dominated by thread-pool synchronisation otherwise (20x slower on a shared 2-core
    machine)."""
    before = torch.get_num_threads()
    if n >= before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sinkhorn(x: Tensor, y: Tensor, blur: float = 0.05) -> float:
    """Debiased Sinkhorn divergence ``S_eps(x, y)`` (geomloss, p=2) of two point clouds
    ``[N, D]``, ``[M, D]`` (uniform weights)."""
    from geomloss import SamplesLoss

    both = torch.cat([x, y])
    diameter = float((both.amax(0) - both.amin(0)).norm())
    if diameter <= 1e-9:  # two copies of one point
        return 0.0
    loss = SamplesLoss("sinkhorn", p=2, blur=blur, scaling=0.7, backend="tensorized",
                       diameter=max(diameter, 2 * blur))
    with few_threads(1 if x.shape[0] * y.shape[0] <= 1024**2 else torch.get_num_threads()):
        return float(loss(x.contiguous(), y.contiguous()).clamp_min(0.0))


@dataclass
class OTResult:
    """Sinkhorn distance of a patched set to the natural set, and the natural-vs-natural
    baseline at the same sample size; ``ratio = distance / baseline`` (1 = as natural)."""

    distance: float
    baseline: float
    ratio: float
    n_patched: int
    n_natural: int


MIN_OT = 20  # natural vectors needed (two halves of 10)


def ot_divergence(patched, natural, *, blur: float = 0.05, max_samples: int = 5000,
                  seed: int = 0, stats: tuple[Tensor, Tensor] | None = None,
                  baseline_cache: dict | None = None, cache_key=None) -> OTResult:
    """Sinkhorn divergence of ``patched [M, D]`` to ``natural [N, D]`` beside its baseline.

    The natural set is split into disjoint halves A and B; ``distance = S(P, A)`` and
    ``baseline = S(B, A)`` with P and B subsampled to the same size ``min(M, |B|)`` (the
    debiased divergence still depends on the sample size), after z-scoring with the natural
    statistics and scaling by ``1/sqrt(D)`` (paper, section 3). ``baseline_cache`` (a dict)
    with ``cache_key`` reuses the baseline of an earlier call with the same natural set.
    """
    p = _as_2d(patched, "patched")
    q = _as_2d(natural, "natural")
    check_number("blur", blur, 0.0, low_open=True)
    check_int("max_samples", max_samples, 1)
    if p.shape[0] == 0:
        raise InputError("patched is empty (0 vectors); there is nothing to compare.")
    if p.shape[1] != q.shape[1]:
        raise InputError(f"patched has D={p.shape[1]} but natural has D={q.shape[1]}.")
    if q.shape[0] < MIN_OT:
        raise InputError(
            f"The Sinkhorn baseline needs at least {MIN_OT} natural vectors (two halves of "
            f"{MIN_OT // 2}); got {q.shape[0]}. Fit the reference on more images."
        )
    mean, std = stats if stats is not None else natural_stats(q)
    scale = safe_std(std) * q.shape[1] ** 0.5
    q = (_cap(q, max_samples, seed) - mean) / scale  # rows picked by (n, seed) alone
    p = (p - mean) / scale
    a_idx, b_idx = _split(q.shape[0], seed + 1)
    a, b = q[a_idx], q[b_idx]
    m = min(p.shape[0], b.shape[0])
    p, b = _cap(p, m, seed + 2), _cap(b, m, seed + 3)
    d = sinkhorn(p, a, blur)
    ck = (cache_key, m, q.shape[0], blur, seed)
    if baseline_cache is not None and cache_key is not None and ck in baseline_cache:
        base = baseline_cache[ck]
    else:
        base = sinkhorn(b, a, blur)
        if baseline_cache is not None and cache_key is not None:
            baseline_cache[ck] = base
    ratio = 1.0 if max(d, base) <= 1e-12 else d / base if base > 1e-12 else float("inf")
    return OTResult(d, base, ratio, p.shape[0], a.shape[0])


# ---- per-vector scores --------------------------------------------------------------------------
def _knn(x: Tensor, ref: Tensor, k: int, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """Squared distances ``[M, k]`` and indices of the k nearest rows of ``ref`` (sorted)."""
    ds, ids = [], []
    ref_sq = (ref * ref).sum(1)
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
    ``neighbours`` ``[M, k]``: their indices in ``ref`` if already known (from `_knn`)."""
    if neighbours is None:
        check_int("k", k, 1, ref.shape[0])
        check_number("var", var, 0.0, 1.0, low_open=True)
        if x.ndim != 2 or ref.ndim != 2 or x.shape[1] != ref.shape[1]:
            raise InputError(f"x [M, D] and ref [N, D] must share D, got {tuple(x.shape)} and "
                             f"{tuple(ref.shape)}.")
    idx = neighbours if neighbours is not None else _knn(x, ref, k)[1]
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


class NaturalScorer:
    """Per-vector divergence scores against a natural set ``[N, D]``, as percentiles of
    held-out natural vectors.

    The natural set (capped at ``max_samples``) is split in two halves: ``fit`` (the
    neighbours, the Ledoit-Wolf covariance, the typical norm) and ``held`` (scored against
    ``fit`` to give each measure's natural distribution). Scores (all on z-scored vectors
    except the norm ratio):

    - ``mahalanobis``: ``sqrt((x - m)^T P (x - m))``, ``P`` the Ledoit-Wolf precision;
    - ``knn``: mean squared difference to the nearest natural vector (paper: NN cost, MSE);
    - ``local_pca``: `local_pca_residual` (k = 20 neighbours, 95% variance);
    - ``norm_ratio``: ``||x|| / median ||natural||`` in the raw space.
    """

    def __init__(self, natural, *, k: int = 20, var: float = 0.95, max_samples: int = 5000,
                 seed: int = 0, stats: tuple[Tensor, Tensor] | None = None,
                 state: dict[str, Tensor] | None = None):
        nat = _as_2d(natural, "natural")
        check_int("k", k, 1)
        check_number("var", var, 0.0, 1.0, low_open=True)
        need = 2 * (k + 1)
        if nat.shape[0] < need:
            raise InputError(
                f"The per-vector measures need at least {need} natural vectors (two halves of "
                f"k + 1 = {k + 1} for the local PCA with k={k}); got {nat.shape[0]}. Fit the "
                "reference on more images (or lower k)."
            )
        self.k, self.var, self.dim = k, var, nat.shape[1]
        self.mean, self.std = stats if stats is not None else natural_stats(nat)
        self.std = safe_std(self.std)
        nat = _cap(nat, max_samples, seed)
        fit_idx, held_idx = _split(nat.shape[0], seed + 1)
        self.fit_raw = nat[fit_idx]
        self.fit = self._z(self.fit_raw)
        if state is not None:  # saved by `state_dict` (Reference.save): skip the fitting
            self.location, self.precision = state["location"], state["precision"]
            self.shrinkage = float(state["shrinkage"])
            self.typical_norm = float(state["typical_norm"])
            self.natural_scores = {m: state[f"natural_{m}"] for m in MEASURES}
            return
        from sklearn.covariance import LedoitWolf

        lw = LedoitWolf().fit(self.fit.double().numpy())
        self.location = torch.as_tensor(lw.location_, dtype=torch.float32)
        cov = torch.as_tensor(lw.covariance_, dtype=torch.float64)
        ridge = 1e-9 * max(float(cov.diagonal().mean()), 1e-3)  # constant sets stay invertible
        self.precision = torch.linalg.inv(cov + ridge * torch.eye(cov.shape[0],
                                                                   dtype=cov.dtype)).float()
        self.shrinkage = float(lw.shrinkage_)
        self.typical_norm = float(self.fit_raw.norm(dim=1).median().clamp_min(1e-12))
        held = self.scores(nat[held_idx])
        self.natural_scores = {m: torch.sort(v).values for m, v in held.items()}

    def state_dict(self) -> dict[str, Tensor]:
        """What `Reference.save` stores to rebuild this scorer without refitting (the fit set
        itself is re-derived from the natural sample with the same seed)."""
        out = {"location": self.location, "precision": self.precision,
               "shrinkage": torch.tensor(self.shrinkage),
               "typical_norm": torch.tensor(self.typical_norm)}
        out.update({f"natural_{m}": v for m, v in self.natural_scores.items()})
        return out

    def _z(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def scores(self, x) -> dict[str, Tensor]:
        """Raw scores ``{measure: [M]}`` of vectors ``x [M, D]``."""
        x = _as_2d(x, "vectors")
        if x.shape[1] != self.dim:
            raise InputError(f"Vectors have D={x.shape[1]}; the natural set has D={self.dim}.")
        z = self._z(x)
        c = z - self.location
        maha = ((c @ self.precision) * c).sum(1).clamp_min(0).sqrt()
        d2, idx = _knn(z, self.fit, self.k)  # one search: the nearest is column 0
        return {
            "mahalanobis": maha,
            "knn": d2[:, 0] / self.dim,
            "local_pca": local_pca_residual(z, self.fit, self.k, self.var, neighbours=idx),
            "norm_ratio": x.norm(dim=1) / self.typical_norm,
        }

    def percentiles(self, scores: dict[str, Tensor]) -> dict[str, Tensor]:
        """Percentile ``[M]`` in [0, 100] of each score among the held-out natural scores."""
        out = {}
        for m, s in scores.items():
            ref = self.natural_scores[m]
            out[m] = 100.0 * torch.searchsorted(ref, s.contiguous(), right=True) / ref.numel()
        return out


def dormant_units(acts, natural_max, natural_median=None, margin: float = 0.1,
                  tol: float = 1e-6) -> Tensor:
    """Units ``[U]`` (bool) of a layer whose activation on any of ``acts [M, U]`` exceeds its
    natural maximum by more than ``margin * (max - median) + tol``: pathways the natural
    inputs never drive this far (paper, section 5: the "pernicious" signature). A unit silent
    on every natural input (max = median = 0) is flagged as soon as it turns on."""
    acts = torch.as_tensor(acts, dtype=torch.float32)
    mx = torch.as_tensor(natural_max, dtype=torch.float32)
    med = mx if natural_median is None else torch.as_tensor(natural_median, dtype=torch.float32)
    if mx.ndim != 1 or med.shape != mx.shape or acts.ndim == 0 or acts.shape[-1] != mx.shape[0]:
        raise InputError(f"acts [..., U] and natural_max / natural_median [U] must share U, got "
                         f"{tuple(acts.shape)}, {tuple(mx.shape)}, {tuple(med.shape)}.")
    bound = mx + margin * (mx - med).clamp_min(0) + tol
    top = acts.reshape(-1, acts.shape[-1]).amax(0)
    return top > bound


def relu_layer(W, b):
    """``x [N, D] -> relu(x W^T + b)``: the paper's toy downstream computation."""
    W, b = torch.as_tensor(W, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    return lambda x: torch.relu(torch.as_tensor(x, dtype=torch.float32) @ W.T + b)


def to_numpy(x) -> np.ndarray:
    return torch.as_tensor(x).detach().cpu().numpy()


__all__ = ["MEASURES", "NaturalScorer", "OTResult", "dormant_units", "local_pca_residual",
           "natural_stats", "ot_divergence", "relu_layer", "sinkhorn"]
