"""Dormant pathways: downstream neurons an intervention drives beyond their natural range.

Grant, Han, Tartaglini & Potts, "Divergent representations" (arXiv 2511.04638, section 5): a
divergent intervention is *pernicious* when it activates hidden pathways, units that natural
inputs never drive that far. A unit is beyond its natural range when its activation exceeds
``max + margin * (max - median)`` of its natural values; a unit silent on every natural input
(max = median) is flagged as soon as it turns on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from patchlens.errors import InputError

TOL = 1e-6


def neuron_bound(natural_max: Tensor, natural_median: Tensor, margin: float) -> Tensor:
    """``[U]`` the activation above which a unit counts as beyond its natural range."""
    mx = torch.as_tensor(natural_max, dtype=torch.float32)
    med = torch.as_tensor(natural_median, dtype=torch.float32)
    return mx + margin * (mx - med).clamp_min(0) + TOL


def dormant_units(acts, natural_max, natural_median=None, margin: float = 3.0) -> Tensor:
    """Units ``[U]`` (bool) of a layer whose activation on any of ``acts [M, U]`` is beyond
    `neuron_bound` (``natural_median`` defaults to the max: no margin)."""
    acts = torch.as_tensor(acts, dtype=torch.float32)
    mx = torch.as_tensor(natural_max, dtype=torch.float32)
    med = mx if natural_median is None else torch.as_tensor(natural_median, dtype=torch.float32)
    if mx.ndim != 1 or med.shape != mx.shape or acts.ndim == 0 or acts.shape[-1] != mx.shape[0]:
        raise InputError(f"acts [..., U] and natural_max / natural_median [U] must share U, got "
                         f"{tuple(acts.shape)}, {tuple(mx.shape)}, {tuple(med.shape)}.")
    bound = neuron_bound(mx, med, margin)
    return acts.reshape(-1, acts.shape[-1]).amax(0) > bound


def relu_layer(W, b):
    """``x [N, D] -> relu(x W^T + b)``: the paper's toy downstream computation."""
    W, b = torch.as_tensor(W, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    return lambda x: torch.relu(torch.as_tensor(x, dtype=torch.float32) @ W.T + b)


#: The paper's toy example (section 5): a ReLU layer, natural inputs with x0, x1 in {0, 1} and
#: x2 >= x0, x3 >= x1; the mean-difference patch flips the class and turns on unit 3 (index 2),
#: silent on every natural input.
TOY_W = ((0.75, 0.25, 0.0, 0.5), (0.0, 1.0, 0.0, 0.0), (1.0, 1.0, -1.0, -1.0))
TOY_B = (-0.5, -0.5, 0.0)
TOY_DELTA = (0.5, 0.5, 0.0, -0.5)


def toy_relu_case(n: int = 400, seed: int = 0) -> tuple[Tensor, Tensor, object]:
    """``(natural [n, 4], patched [m, 4], downstream)`` of the paper's toy example: the patch
    is `TOY_DELTA` added to the class-0 inputs (x0 = x1 = 0)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 2, (n, 2), generator=g).float()
    extra = torch.rand(n, 2, generator=g)
    natural = torch.cat([base, base + extra], 1)
    src = natural[(base.sum(1) == 0)]
    return natural, src + torch.tensor(TOY_DELTA), relu_layer(TOY_W, TOY_B)


__all__ = ["TOY_B", "TOY_DELTA", "TOY_W", "dormant_units", "neuron_bound", "relu_layer",
           "toy_relu_case"]
