"""Divergence in the feature space of a sparse autoencoder: verdict inputs for `diagnose`.

For patched vectors at a hook where an SAE was trained, and the natural vectors of a
`Reference` at the same hook and token class:

- **dormant features**: features the patched vector switches on that fire on none of the
  natural vectors (a feature-space analogue of the dormant-neuron check of Grant et al.,
  "Divergent representations", arXiv 2511.04638);
- **off-dictionary share**: how much of the vector the SAE cannot reconstruct,
  ``|x - x_hat|^2 / |x|^2`` (the part that would fall in the SAE's error term), compared with
  the same share on natural vectors (its percentile among them).

`sae_measures` computes them on tensors; `SAEColumns` adds them to the rows of a
`DivergenceReport` (columns ``sae_dormant``, ``sae_dormant_rate``, ``sae_error``,
``sae_error_pct``, ``sae_error_outlier_rate``); they are inputs for the verdict, which does not
read them yet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError

#: a patched vector's off-dictionary share is an outlier beyond this natural percentile
ERROR_PCT = 99.0


class NaturalFeatures:
    """An SAE's view of natural vectors ``[n, D]``: which features ever fire on them, and the
    sorted off-dictionary shares (for percentiles)."""

    def __init__(self, sae: Any, natural: Tensor):
        if natural.ndim != 2 or natural.shape[0] == 0:
            raise InputError(f"natural must be [n, D] with n > 0, got {tuple(natural.shape)}.")
        acts, share = encode_share(sae, natural)
        self.fired = (acts != 0).any(0).cpu()
        self.shares = share.sort().values.cpu()
        self.n = natural.shape[0]

    def percentile(self, share: Tensor) -> Tensor:
        """Percentile (0-100) of each share among the natural ones."""
        return 100.0 * torch.searchsorted(self.shares, share.cpu().double().to(self.shares.dtype),
                                          right=True).double() / self.n


def encode_share(sae: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    """Feature activations ``[n, d_sae]`` of ``x [n, D]`` and the off-dictionary share
    ``|x - x_hat|^2 / |x|^2`` ``[n]`` (float64)."""
    w = sae.W_dec
    d_in = int(w.shape[-1])
    if x.shape[-1] != d_in:
        raise InputError(f"The SAE reads vectors of width {d_in}; got {tuple(x.shape)}.")
    with torch.no_grad():
        xs = x.detach().to(device=w.device, dtype=w.dtype)
        acts = sae.encode(xs)
        norm = getattr(sae, "normalize", "none")
        x_hat = sae(xs) if norm not in (None, "none") and callable(sae) else sae.decode(acts)
        xd = xs.double()
        err = (xd - x_hat.double()).pow(2).sum(-1)
        share = err / xd.pow(2).sum(-1).clamp_min(1e-30)
    return acts, share


def sae_measures(sae: Any, patched: Tensor, natural: Tensor | NaturalFeatures) -> dict[str, float]:
    """The SAE measures of patched vectors ``[m, D]`` against natural ones (``[n, D]`` or a
    fitted `NaturalFeatures`): ``sae_dormant`` (mean number of dormant features a patched vector
    switches on), ``sae_dormant_rate`` (share of patched vectors with at least one),
    ``sae_error`` (mean off-dictionary share), ``sae_error_pct`` (its mean percentile among
    natural vectors) and ``sae_error_outlier_rate`` (share beyond the natural `ERROR_PCT`th
    percentile)."""
    nat = natural if isinstance(natural, NaturalFeatures) else NaturalFeatures(sae, natural)
    if patched.ndim != 2 or patched.shape[0] == 0:
        raise InputError(f"patched must be [m, D] with m > 0, got {tuple(patched.shape)}.")
    acts, share = encode_share(sae, patched)
    dormant = ((acts != 0).cpu() & ~nat.fired).sum(-1).double()
    pct = nat.percentile(share)
    return {"sae_dormant": float(dormant.mean()),
            "sae_dormant_rate": float((dormant > 0).double().mean()),
            "sae_error": float(share.mean()), "sae_error_pct": float(pct.mean()),
            "sae_error_outlier_rate": float((pct >= ERROR_PCT).double().mean())}


class SAEColumns:
    """Adds the SAE measures to `DivergenceReport` rows at the hooks the SAEs were trained on.

    ``saes``: one SAE (with ``hook_name``), a list of them, or ``{hook: sae}``.
    """

    def __init__(self, saes: Any):
        if isinstance(saes, Mapping):
            self.saes = dict(saes)
        else:
            items = saes if isinstance(saes, (list, tuple)) else [saes]
            self.saes = {}
            for s in items:
                hook = getattr(s, "hook_name", None)
                if hook is None:
                    raise InputError("An SAE passed to diagnose(sae=...) must say its hook "
                                     "(hook_name); or pass {hook: sae}.")
                self.saes[hook] = s
        for hook, s in self.saes.items():
            if not hasattr(s, "encode") or not hasattr(s, "W_dec"):
                raise InputError(f"diagnose(sae=...) got {type(s).__name__} for {hook}, which "
                                 "is not a sparse autoencoder (encode, decode, W_dec).")
        self._natural: dict[tuple[str, str], NaturalFeatures] = {}

    def check(self, hooks) -> None:
        missing = [h for h in self.saes if h not in hooks]
        if missing:
            raise InputError(f"diagnose(sae=...): no variant patches {missing}; the SAE measures "
                             f"are taken where an SAE was trained (variants patch {sorted(hooks)}).")

    def row(self, hook: str, cls: str, patched: Tensor, reference) -> dict[str, float]:
        """The measures for one report row (empty if no SAE reads ``hook``)."""
        sae = self.saes.get(hook)
        if sae is None:
            return {}
        key = (hook, cls)
        if key not in self._natural:
            self._natural[key] = NaturalFeatures(sae, reference.natural(hook, cls))
        return sae_measures(sae, patched, self._natural[key])


__all__ = ["ERROR_PCT", "NaturalFeatures", "SAEColumns", "encode_share", "sae_measures"]
