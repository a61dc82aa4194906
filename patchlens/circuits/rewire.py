"""Interventions at the receivers' inputs that rewire edges of a `Graph` (handed to the engine).

- `EdgePatch`: exact edge patching. Variant ``v`` patches one edge ``u -> r``: receiver ``r``'s
  input gets ``delta_u = a_u(source) - a_u(target)`` added at ``u``'s tokens (the site's token
  selection), i.e. ``u``'s target output is replaced by its source output for ``r`` only.
- `EdgeAblation`: a circuit run. For variant ``v`` every receiver's input becomes
  ``input_r + sum_u w[v, r, u] (new_u - old_u)``, where ``old_u`` is ``u``'s output in this very
  run (read live from the engine), ``new_u`` its ablated value (corrupted, mean, zero or
  resampled) and ``w[v, r, u] = 1`` for the edges variant ``v`` removes.

Both work in the hooks' own spaces: q/k/v inputs ``[batch, pos, head, d_model]``, the MLP input
and the final residual ``[batch, pos, d_model]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from patchlens.patching.interventions import Gather, Intervention


def _as_receiver_shape(delta: Tensor, where: Gather) -> Tensor:
    """``[E, B, T, d]`` -> the gathered selection's shape (a singleton head axis for per-head
    hooks, broadcast over the selected heads)."""
    if where.spec.head_axis is not None:
        return delta.unsqueeze(3)
    return delta


class EdgePatch(Intervention):
    """Add sender output differences ``deltas [C, B, pos, d]`` (one per sender component) to
    the selected receiver input: variant ``v`` adds component ``component[v]``'s difference
    at the selected tokens (and heads)."""

    def __init__(self, deltas: Tensor, component: Tensor):
        self.deltas, self.component = deltas, component.long()

    def values(self, act, where, source):
        e = where.variants[:, 0]
        d = self.deltas.to(act.device)[self.component.to(act.device)[e]]       # [E, B, pos, dm]
        tok = where.tokens.to(act.device)                                     # [E, T]
        idx = tok[:, None, :, None].expand(-1, d.shape[1], -1, d.shape[-1])
        return act + _as_receiver_shape(d.gather(2, idx), where).to(act.dtype)

    def __repr__(self) -> str:
        return f"EdgePatch({self.deltas.shape[0]} senders)"


class EdgeAblation(Intervention):
    """Ablate, per variant, a set of edges of ``graph`` (see the module docstring).

    Args:
        graph: the `Graph`.
        weights: ``[V, R, S]`` 1 where variant ``v`` ablates the edge from sender node ``s`` into
            receiver ``r`` (0 elsewhere; pairs without an edge are ignored).
        new: ``{sender hook: [B or 1 or n, ...]}`` the ablated values at the graph's sender
            hooks (the hooks' raw values: LayerScale is applied here); a missing hook means
            zeros.
        draws: ``[B]`` for resample ablation: the row of ``new`` each target image takes.

    Per chunk of the engine, the differences ``new - old`` of every sender component are
    computed once (as their hooks fire) into one buffer ``[C, rows, pos, d]``; the senders of a
    receiver are a prefix of the components (forward order), so each receiver hook costs one
    contraction.
    """

    def __init__(self, graph, weights: Tensor, new: dict[str, Tensor],
                 draws: Tensor | None = None):
        self.graph, self.weights, self.new, self.draws = graph, weights, new, draws
        self.reads = tuple(graph.sender_hook_names)
        comp = torch.tensor([nd.component for nd in graph.senders])
        self._blocks = {}
        for blk in graph.blocks:
            snd = torch.tensor(blk.senders)
            c = comp[snd]
            n_comp = int(c.max()) + 1
            counts = torch.bincount(c, minlength=n_comp)
            split = [int(k) for k in torch.nonzero(counts > 1).flatten()]
            whole = torch.zeros(len(snd), n_comp)      # unsplit senders -> their component
            for j, k in enumerate(c.tolist()):
                if counts[k] == 1 and bool(graph.masks[snd[j]].all()):
                    whole[j, k] = 1
                elif k not in split:
                    split.append(k)
            parts = [(k, torch.nonzero(c == k).flatten(), graph.masks[snd[c == k]])
                     for k in sorted(split)]
            self._blocks[blk.hook] = (torch.tensor(blk.receivers), snd, n_comp, whole, parts)
        self._chunk, self._buffer, self._filled = None, None, 0

    def values(self, act, where, source):
        rec, snd, n_comp, whole, parts = self._blocks[where.hook]
        dev, dt = act.device, act.dtype
        e_ids = where.variants[:, 0].to(self.weights.device)
        w = self.weights[e_ids][:, rec][:, :, snd].to(dev, dt)                    # [E, R, S]
        if not bool(w.any()):
            return act
        d = self._diffs(where, n_comp, dev, dt)                                  # [C, E, B, p, d]
        add = torch.einsum("erc,cebpd->ebprd", w @ whole.to(dev, dt), d)
        for k, idx, masks in parts:  # components split by tokens: weights per token
            coef = torch.einsum("ers,sp->erp", w[:, :, idx.to(dev)], masks.to(dev, dt))
            add = add + torch.einsum("erp,ebpd->ebprd", coef, d[k])
        return act + (add[:, :, :, 0] if where.spec.head_axis is None else add)

    def _diffs(self, where, n_comp: int, dev, dt) -> Tensor:
        """``new - old`` of components ``0..n_comp-1`` for the selected rows ``[C, E, B, pos,
        d]`` (LayerScale applied), from the chunk's buffer (filled once per chunk: the live
        values do not change once their hook has fired)."""
        live = where.live
        if self._chunk is not live:
            self._chunk, self._buffer, self._filled = live, None, 0
        for sh in self.graph.sender_hooks:
            lo, hi = sh.components[0], sh.components[-1] + 1
            if hi <= self._filled or lo >= n_comp:
                continue
            old = live[sh.hook].to(dev, dt)                                           # [rows, ...]
            if self._buffer is None:
                emb = live[self.graph.sender_hooks[0].hook]
                self._buffer = old.new_empty(len(self.graph.components), *emb.shape)
            images = torch.arange(old.shape[0], device=dev) % where.images.shape[1]
            new = self.new.get(sh.hook)
            if new is None:
                diff = -old
            elif new.shape[0] == 1:
                diff = new.to(dev, dt) - old
            else:
                rows = images if self.draws is None else self.draws.to(dev)[images]
                diff = new.to(dev, dt)[rows] - old
            self._buffer[lo:hi] = sh.to_residual(diff)
            self._filled = hi
        d = self._buffer[:n_comp]
        rows = where.rows.to(dev)
        if rows.numel() == d.shape[1] and torch.equal(rows.flatten(),
                                                      torch.arange(d.shape[1], device=dev)):
            return d.view(n_comp, *rows.shape, *d.shape[2:])
        return d[:, rows]

    def __repr__(self) -> str:
        return f"EdgeAblation({self.weights.shape[0]} variants)"


__all__ = ["EdgePatch", "EdgeAblation"]
