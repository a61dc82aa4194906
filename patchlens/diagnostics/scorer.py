"""`NaturalScorer`: is one vector an outlier of a natural set, at a stated false-alarm level?

Per-vector measures of Grant, Han, Tartaglini & Potts, "Divergent representations" (arXiv
2511.04638, section 3), turned into one conformal test (Vovk et al., *Algorithmic learning in a
random world*, 2005; Angelopoulos & Bates 2021):

- the natural vectors are split **by image** into a *fit* half (neighbours, Ledoit-Wolf
  covariance) and a *calibration* half from other images (so a new image is compared with
  vectors of other images, exactly as the calibration vectors are);
- four measures per vector: Mahalanobis distance, nearest-neighbour MSE, local-PCA residual
  (k = 20 neighbours, 95% variance), all on vectors z-scored with the natural statistics, and
  the raw norm, two-sided (a vector far *below* the natural norm range, e.g. a zero ablation,
  is as unusual as one far above);
- each measure's *surprise* ``-log P(S >= s)`` among the calibration vectors, on the log of
  the measure (`tail_surprise`: empirical, with an exponential tail fitted to the top 10%, so a
  vector far beyond every calibration vector is far more surprising than the most extreme
  natural one); the norm counts twice, its upper and its lower tail;
- the largest surprise, ranked among the calibration vectors' own (each computed leaving
  itself out), gives the vector's conformal p-value
  ``(1 + #{calibration vectors at least as surprising}) / (n_cal + 1)``: a natural vector gets
  ``p <= alpha`` with probability at most ``alpha`` (exchangeability), whatever the measures'
  scales and tails;
- a *constant* set (every natural vector equal, e.g. the class token before the first block)
  is a point: a vector equal to it (relative tolerance 1e-4) is natural, any other is not.
  Dimensions with (near-)zero natural variance are z-scored with a floor of 1e-3 of the
  typical standard deviation, so they count without exploding.

A p-value cannot be below ``1 / (n_cal + 1)``: an ``alpha`` test needs
``n_cal >= 1/alpha - 1`` calibration vectors (`needed_vectors`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from patchlens.checks import check_int, check_number
from patchlens.diagnostics.measures import as_vectors, knn, local_pca_residual, split_by_group
from patchlens.errors import InputError

MEASURES = ("mahalanobis", "knn", "local_pca", "norm")
STD_FLOOR = 1e-3      # dims with std below this fraction of the typical std are floored to it
CONSTANT_RTOL = 1e-5  # a set whose spread is below this fraction of its scale is constant
MATCH_RTOL = 1e-4     # ... and a vector within this relative distance of it is natural
TAIL_FRAC, TAIL_MIN = 0.1, 10  # the exponential tail is fitted to the top 10% (at least 10)


def needed_vectors(alpha: float, k: int = 20) -> int:
    """Natural vectors (by image: images for the class token) needed for an ``alpha`` test:
    two halves, the calibration half with ``ceil(1/alpha) - 1`` vectors (and the fit half at
    least ``k + 1`` for the local PCA)."""
    return 2 * max(math.ceil(1 / alpha - 1e-9) - 1, k + 1)


def _upper(sorted_ref: Tensor, s: Tensor) -> Tensor:
    """``#{ref >= s}`` for a sorted reference."""
    return sorted_ref.numel() - torch.searchsorted(sorted_ref, s.contiguous(), right=False)


def _lower(sorted_ref: Tensor, s: Tensor) -> Tensor:
    """``#{ref <= s}`` for a sorted reference."""
    return torch.searchsorted(sorted_ref, s.contiguous(), right=True)


def _tail_model(ref: Tensor, k: int) -> tuple[float, float]:
    """``(u, beta)``: the value below the ``k`` largest of a sorted ``ref`` and the mean excess
    of those ``k`` over it (an exponential tail beyond ``u``)."""
    n = ref.numel()
    u = float(ref[n - k - 1])
    return u, max(float((ref[n - k:] - u).mean()), 1e-12 * max(abs(u), 1e-30))


def _tail_k(n: int) -> int:
    return min(max(TAIL_MIN, int(TAIL_FRAC * n)), n - 1)


def tail_surprise(ref: Tensor, s: Tensor, k: int | None = None) -> Tensor:
    """``-log P(S >= s)`` for scores ``s [M]`` against a sorted reference sample ``ref [n]``:
    ``(#{ref >= s} + 1) / (n + 1)`` up to the ``k`` largest reference values, and beyond them an
    exponential tail fitted to those ``k`` (mean excess), so the surprise keeps growing past the
    largest reference value instead of saturating at ``log(n + 1)``."""
    n = ref.numel()
    if n < 2:
        return torch.zeros_like(s)
    k = _tail_k(n) if k is None else k
    u, beta = _tail_model(ref, k)
    emp = (_upper(ref, s) + 1).double() / (n + 1)
    ext = (k + 1) / (n + 1) * torch.exp(-(s.double() - u) / beta)
    return -torch.log(torch.where(s > u, ext, emp)).float()


def tail_surprise_loo(ref: Tensor) -> Tensor:
    """``[n]`` `tail_surprise` of each value of a sorted ``ref`` against the others (leave one
    out; ``k`` fixed from ``n``), so that a new vector and a reference vector are scored alike."""
    n = ref.numel()
    if n < 3:
        return torch.zeros_like(ref)
    k = _tail_k(n)
    m = n - 1
    r = ref.double()
    cnt = (_upper(ref, ref) - 1).double()                         # #{others >= v}
    emp = (cnt + 1) / (m + 1)
    # the tail model of the others: unchanged unless the left-out value is in the top k + 1
    u, beta = _tail_model(ref, k)
    u = torch.full_like(r, u)
    beta = torch.full_like(r, beta)
    top = torch.arange(n) >= n - k - 1
    if k + 1 < n:
        u_top = float(ref[n - k - 2])
        top_sum = float(r[n - k - 1:].sum())
        b_top = ((top_sum - r) / k - u_top).clamp_min(1e-12 * max(abs(u_top), 1e-30))
        u = torch.where(top, torch.full_like(r, u_top), u)
        beta = torch.where(top, b_top, beta)
    ext = (k + 1) / (m + 1) * torch.exp(-(r - u) / beta)
    return (-torch.log(torch.where(r > u, ext, emp))).float()


def _log(x: Tensor) -> Tensor:
    """The scale the tails are modelled on: every measure is positive and spreads
    multiplicatively (``x 0.1`` is as far below as ``x 10`` is above; 0 is infinitely far)."""
    return torch.log(x.float().clamp_min(1e-30))


class NaturalScorer:
    """Per-vector conformal outlier test against a natural set ``[N, D]`` (module docstring).

    Args:
        natural: natural vectors ``[N, D]``.
        groups: ``[N]`` image index of each vector (the halves are split by image); None: every
            vector its own image.
        stats: per-dimension natural ``(mean, std)`` over everything streamed (default: of
            ``natural``).
        k, var: local PCA neighbours and explained variance (paper: 20, 95%).

    Attributes:
        n_fit, n_cal: vectors in the fit and calibration halves; ``n_images``: images in all.
        constant: whether the natural set is a single point.
    """

    def __init__(self, natural, *, groups=None, k: int = 20, var: float = 0.95,
                 max_samples: int = 5000, seed: int = 0,
                 stats: tuple[Tensor, Tensor] | None = None,
                 state: dict[str, Tensor] | None = None):
        nat = as_vectors(natural, "natural")
        check_int("k", k, 1)
        check_number("var", var, 0.0, 1.0, low_open=True)
        n, d = nat.shape
        g = torch.arange(n) if groups is None else torch.as_tensor(groups).flatten()
        if g.numel() != n:
            raise InputError(f"groups has {g.numel()} entries for {n} natural vectors.")
        if n < 2:
            raise InputError(f"The per-vector test needs at least 2 natural vectors; got {n}.")
        self.k, self.var, self.dim = k, var, d
        mean, std = stats if stats is not None else (nat.mean(0), nat.std(0))
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32)
        rms_std = float(std.square().mean().sqrt())
        scale = float(self.mean.square().mean().sqrt()) + rms_std
        self.n_images = int(torch.unique(g).numel())
        self.constant = rms_std <= CONSTANT_RTOL * max(scale, 1e-30)
        if self.constant:  # one point: nothing to fit
            self.std = torch.ones_like(std)
            self.n_fit, self.n_cal = 0, n
            return
        self.std = std.clamp_min(max(STD_FLOOR * rms_std, 1e-12))
        if n > max_samples:
            keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples]
            nat, g = nat[keep], g[keep]
        fit_idx, cal_idx = split_by_group(g, seed + 1)
        self.n_fit, self.n_cal = len(fit_idx), len(cal_idx)
        if self.n_fit < k + 1 or self.n_cal < 1:
            raise InputError(
                f"The per-vector test needs at least k + 1 = {k + 1} natural vectors in each half "
                f"(split by image); got {self.n_fit} and {self.n_cal} from {self.n_images} "
                "images. Fit the reference on more images (or lower k).")
        self.fit_raw = nat[fit_idx]
        self.fit = self._z(self.fit_raw)
        if state is not None:  # saved by `state_dict` (Reference.save): skip the fitting
            self.location, self.precision = state["location"], state["precision"]
            self.cal = {m: state[f"cal_{m}"] for m in MEASURES}
            self.cal_stat = state["cal_stat"]
            return
        from sklearn.covariance import LedoitWolf

        lw = LedoitWolf().fit(self.fit.double().numpy())
        self.location = torch.as_tensor(lw.location_, dtype=torch.float32)
        cov = torch.as_tensor(lw.covariance_, dtype=torch.float64)
        ridge = 1e-9 * max(float(cov.diagonal().mean()), 1e-3)
        self.precision = torch.linalg.inv(cov + ridge * torch.eye(d, dtype=cov.dtype)).float()
        cal = self.scores(nat[cal_idx])
        self.cal = {m: torch.sort(v).values for m, v in cal.items()}
        # each calibration vector's own combined statistic, leave-one-out
        loo = []
        for m in MEASURES:
            ref = _log(self.cal[m])
            loo.append(tail_surprise_loo(ref)[torch.argsort(torch.argsort(cal[m]))])
            if m == "norm":
                low = tail_surprise_loo(-ref.flip(0))
                loo.append(low[torch.argsort(torch.argsort(-cal[m]))])
        self.cal_stat = torch.sort(torch.stack(loo).amax(0)).values

    def state_dict(self) -> dict[str, Tensor]:
        """What `Reference.save` stores to rebuild this scorer without refitting."""
        if self.constant:
            return {}
        out = {"location": self.location, "precision": self.precision, "cal_stat": self.cal_stat}
        out.update({f"cal_{m}": v for m, v in self.cal.items()})
        return out

    def _z(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    # ---- scores -------------------------------------------------------------------------------
    def scores(self, x) -> dict[str, Tensor]:
        """Raw scores ``{measure: [M]}`` of vectors ``x [M, D]`` (constant set: the relative
        distance to the point under every measure)."""
        x = as_vectors(x, "vectors")
        if x.shape[1] != self.dim:
            raise InputError(f"Vectors have D={x.shape[1]}; the natural set has D={self.dim}.")
        if self.constant:
            dist = (x - self.mean).norm(dim=1) / max(float(self.mean.norm()), 1e-30)
            return {m: dist for m in MEASURES}
        z = self._z(x)
        c = z - self.location
        maha = ((c @ self.precision) * c).sum(1).clamp_min(0).sqrt()
        d2, idx = knn(z, self.fit, self.k)  # one search: the nearest is column 0
        return {
            "mahalanobis": maha,
            "knn": d2[:, 0] / self.dim,
            "local_pca": local_pca_residual(z, self.fit, self.k, self.var, neighbours=idx),
            "norm": x.norm(dim=1),
        }

    def _surprise(self, scores: dict[str, Tensor]) -> Tensor:
        """``[5, M]`` `tail_surprise` of each score among the calibration scores (the norm's
        upper and lower tails separately)."""
        out = []
        for m in MEASURES:
            ref, s = _log(self.cal[m]), _log(scores[m])
            out.append(tail_surprise(ref, s))
            if m == "norm":
                out.append(tail_surprise(-ref.flip(0), -s))
        return torch.stack(out)

    def pvalues(self, x=None, scores: dict[str, Tensor] | None = None) -> Tensor:
        """``[M]`` conformal p-value of each vector: ``(1 + #{calibration vectors at least as
        surprising}) / (n_cal + 1)`` under the combined statistic (the largest `_surprise`; the
        calibration vectors' own, leave-one-out, are ``cal_stat``)."""
        if scores is None:
            scores = self.scores(x)
        if self.constant:
            d = scores["norm"]
            return torch.where(d <= MATCH_RTOL, torch.ones_like(d), torch.zeros_like(d))
        t = self._surprise(scores).amax(0)
        return (_upper(self.cal_stat, t) + 1).float() / (self.n_cal + 1)

    def tail_measure(self, scores: dict[str, Tensor]) -> list[str]:
        """The measure that makes each vector most surprising (norm split into low / high)."""
        if self.constant:
            return ["constant"] * len(scores["norm"])
        names = ["mahalanobis", "knn", "local_pca", "norm (high)", "norm (low)"]
        return [names[i] for i in self._surprise(scores).argmax(0).tolist()]

    def percentiles(self, scores: dict[str, Tensor]) -> dict[str, Tensor]:
        """Percentile ``[M]`` in [0, 100] of each raw score among the calibration scores."""
        if self.constant:
            return {m: torch.where(s <= MATCH_RTOL, 50.0, 100.0) for m, s in scores.items()}
        return {m: 100.0 * _lower(self.cal[m], s).float() / self.n_cal for m, s in scores.items()}

    def resolution(self) -> float:
        """The smallest p-value this scorer can give (``1 / (n_cal + 1)``; 0 if constant)."""
        return 0.0 if self.constant else 1.0 / (self.n_cal + 1)

    def typical_norm(self) -> float:
        """Median norm of the calibration vectors (of the point, if constant)."""
        if self.constant:
            return float(self.mean.norm())
        return float(self.cal["norm"][self.n_cal // 2])


__all__ = ["MEASURES", "NaturalScorer", "needed_vectors", "tail_surprise", "tail_surprise_loo"]
