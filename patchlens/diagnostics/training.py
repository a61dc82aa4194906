"""Counterfactual latent (CL) loss: keep intervened representations near natural ones.

Grant, Han, Tartaglini & Potts, "Divergent representations" (arXiv 2511.04638, section 6):
train an intervention with ``L = L_behaviour + eps * L_CL``, where ``h_cf`` is the natural latent
of an input whose causal variables equal the counterfactual values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from patchlens.errors import InputError


def counterfactual_latent_loss(h_intervened: Tensor, h_counterfactual: Tensor) -> Tensor:
    """``mean((h_int - h_cf)^2) + (1 - cos(h_int, h_cf))`` (cosine over the last axis, mean
    over all other axes). Shapes ``[..., D]``, equal; returns a scalar."""
    if h_intervened.shape != h_counterfactual.shape:
        raise InputError(f"h_intervened has shape {tuple(h_intervened.shape)} but "
                         f"h_counterfactual has {tuple(h_counterfactual.shape)}; they must match.")
    h_cf = h_counterfactual.to(h_intervened.dtype)
    mse = ((h_intervened - h_cf) ** 2).mean()
    cos = torch.nn.functional.cosine_similarity(h_intervened, h_cf, dim=-1).mean()
    return mse + (1 - cos)


__all__ = ["counterfactual_latent_loss"]
