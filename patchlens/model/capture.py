"""Capturing activations, and their gradients, at hook points: the one place this idiom lives.

`Capture` builds forward hooks that keep the activation a hook point produces (after any
intervention that ran before it at the same point); `Capture.gradients` differentiates a scalar
with respect to the kept activations with `torch.autograd.grad`, so parameters' ``.grad`` are
never touched. The patching engine and `HookedViT.run_with_cache(incl_bwd=True)` both use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


class Capture:
    """Keeps the activations at ``names`` during a forward pass.

    Args:
        names: hook names.
        keep_graph: keep the activations attached to the autograd graph (for `gradients`);
            otherwise they are detached.
        clone: store a copy (for activations that later code may modify in place); with
            ``keep_graph`` the copy stays on the autograd graph.
    """

    def __init__(self, names: Sequence[str], keep_graph: bool = False, clone: bool = False):
        self.names = list(dict.fromkeys(names))
        self.keep_graph, self.clone = keep_graph, clone
        self.acts: dict[str, Tensor] = {}

    def hooks(self) -> list[tuple[str, Callable]]:
        """``(name, fn)`` forward hooks to install after any patching hook at the same point."""

        def keep(act: Tensor, hook) -> Tensor:
            stored = act if self.keep_graph else act.detach()
            self.acts[hook.name] = stored.clone() if self.clone else stored
            return act

        return [(name, keep) for name in self.names]

    def gradients(self, scalar: Tensor, retain_graph: bool = False) -> dict[str, Tensor]:
        """``d scalar / d act`` for every kept activation (zeros where it does not depend on it)."""
        if not self.keep_graph:
            raise RuntimeError("Capture(keep_graph=False) kept no graph to differentiate.")
        names = [n for n in self.names if n in self.acts]
        acts = [self.acts[n] for n in names]
        diff = [i for i, a in enumerate(acts) if a.requires_grad]
        grads: list[Tensor | None] = [None] * len(acts)
        if diff:
            got = torch.autograd.grad(scalar, [acts[i] for i in diff], retain_graph=retain_graph,
                                      allow_unused=True)
            for i, g in zip(diff, got):
                grads[i] = g
        return {n: (torch.zeros_like(a) if g is None else g.detach())
                for n, a, g in zip(names, acts, grads)}

    def detached(self) -> dict[str, Tensor]:
        return {n: a.detach() for n, a in self.acts.items()}


def differentiable_input(x: Tensor) -> Tensor:
    """A copy of ``x`` that requires grad, so every activation computed from it is part of the
    autograd graph even when the model's parameters are frozen."""
    return x.detach().clone().requires_grad_(True)


__all__ = ["Capture", "differentiable_input"]
