"""Behavioural split of a shift: the part the downstream computation cannot see, and the rest.

A patched activation ``h' = h + delta`` is harmlessly divergent when ``delta`` lies in the
behavioural null space of what follows (``W delta = 0`` for a linear readout ``W``; Grant et al.,
"Divergent representations", arXiv 2511.04638, section 5). For a non-linear downstream
computation we use its Jacobian at the natural activation (first order): the null space is the
orthogonal complement of the row space of ``J = d outputs / d h`` (C outputs: rank <= C).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from patchlens.errors import InputError


def null_fraction(delta: Tensor, J: Tensor, rtol: float = 1e-10) -> Tensor:
    """Fraction of ``||delta||^2`` outside the row space of ``J`` (in its null space).

    Args:
        delta: ``[M, K]`` shifts.
        J: ``[C, K]`` (one readout for all) or ``[M, C, K]`` (one Jacobian per shift).

    Returns:
        ``[M]`` in [0, 1] (NaN where ``delta = 0``).
    """
    delta = torch.as_tensor(delta, dtype=torch.float32)
    J = torch.as_tensor(J, dtype=torch.float32)
    if delta.ndim == 1:
        delta = delta[None]
    if J.shape[-1] != delta.shape[-1]:
        raise InputError(f"J has shape {tuple(J.shape)}; its last axis must be delta's "
                         f"{delta.shape[-1]}.")
    # ||P_row(J) delta||^2 = a^T (J J^T)^+ a with a = J delta (C x C system, C << K)
    Jd = J.double()
    gram = Jd @ Jd.transpose(-1, -2)
    ev, u = torch.linalg.eigh(gram)
    keep = ev > rtol * ev.amax(-1, keepdim=True).clamp_min(1e-30)
    a = (Jd @ delta.double().unsqueeze(-1)).squeeze(-1) if J.ndim == 3 else delta.double() @ Jd.T
    c = (a.unsqueeze(-2) @ u).squeeze(-2) if J.ndim == 3 else a @ u
    inside = ((c**2 / ev.clamp_min(1e-30)) * keep).sum(-1).float()
    total = (delta**2).sum(-1)
    frac = 1 - inside / total.clamp_min(1e-30)
    return torch.where(total > 0, frac.clamp(0, 1), torch.full_like(frac, float("nan")))


def readout_null_fraction(delta: Tensor, W: Tensor) -> Tensor:
    """Exact split for a final linear readout ``y = W h + b`` (``W [C, D]``): fraction of
    ``||delta||^2`` with ``W delta = 0``. For a HookedViT head pass ``model.W_U.T``."""
    return null_fraction(delta, W)


def site_jacobian(model, x: Tensor, hook: str, tokens: Tensor | None = None,
                  metric: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Jacobian of the logits (or of ``metric``) w.r.t. the activation at ``hook``, at the
    natural run on ``x [B, C, H, W]``.

    Returns:
        ``[B, C_out, T, D]`` for the selected ``tokens`` (all if None; head axes flattened
        into D). One batched backward pass through the engine: the images are repeated once
        per output (``C_out`` = number of classes, or 1 with a metric).
    """
    from patchlens.diagnostics.reference import vectors
    from patchlens.patching.engine import capture_grads

    spec = model.hook_spec(hook)
    b = x.shape[0]
    if metric is not None:
        run = capture_grads(model, x.detach(), [hook], metric)
        jac = vectors(run.grads[hook], spec)[:, None]                      # [B, 1, T, D]
    else:
        with torch.inference_mode():
            n_out = model(x[:1]).shape[-1]
        rows = torch.arange(n_out).repeat_interleave(b)
        run = capture_grads(model, x.detach().repeat(n_out, 1, 1, 1), [hook],
                            lambda out: out.gather(1, rows[:, None].to(out.device))[:, 0])
        g = vectors(run.grads[hook], spec)
        jac = g.reshape(n_out, b, *g.shape[1:]).transpose(0, 1)             # [B, C, T, D]
    return jac if tokens is None else jac[:, :, tokens]


__all__ = ["null_fraction", "readout_null_fraction", "site_jacobian"]
