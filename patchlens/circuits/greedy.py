"""Greedy circuit search in the spirit of ACDC (Conmy et al. 2023, arXiv 2304.14997), driven by
exact edge ablations.

Start from the full graph. Visit the receivers from the output backwards; at each one, measure
(exactly: one batched engine run) how much removing each of its remaining incoming edges from
the current circuit moves the metric, and drop every edge that moves it by less than ``tau``
(in units of the full-to-empty gap ``|m(full) - m(empty)|``). A node none of whose outputs is
left in the circuit loses its incoming edges without a test. ACDC removes edges one at a time
(a forward pass each) and compares KL divergences; here the edges into one receiver are tested
together against the same current circuit, so the search costs one batched run per receiver.
Receivers are visited from the output backwards, so everything before the visited receiver's
layer is still the clean run: every run starts there (prefix reuse).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from patchlens.circuits.ablate import ablated_values, circuit_metrics
from patchlens.circuits.attribute import check_graph
from patchlens.circuits.circuit import Circuit
from patchlens.circuits.evaluate import _validate
from patchlens.circuits.graph import Graph
from patchlens.errors import InputError
from patchlens.metrics import base_metric
from patchlens.recipes.common import baseline_metrics


def greedy_circuit(model, clean: Tensor, corrupted: Tensor, metric: Callable[[Tensor], Tensor],
                   *, graph: Graph | None = None, tau: float = 0.01,
                   ablation: str = "corrupted", reference: Tensor | None = None, seed: int = 0,
                   batch_size: int | None = None, memory_budget: str | int | None = "2GB",
                   progress: bool | None = False) -> Circuit:
    """The circuit left after greedy pruning (see the module docstring).

    Args:
        tau: an edge is dropped if removing it changes the metric by less than ``tau`` times
            ``|m(full) - m(empty)|`` (the mean over the images).
        ablation: how removed edges are ablated (see `evaluate`).
        reference: the images of mean / resample ablations (see `evaluate`).
        seed: the resample ablation's seed (see `evaluate`).

    Returns:
        a `Circuit`; ``circuit.meta`` holds ``tau``, the number of engine runs and of
        patched variants, and the faithfulness of the result.
    """
    _validate(model, clean, corrupted, metric, ablation, None)
    graph = check_graph(model, graph, clean)
    if not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and tau >= 0):
        raise InputError(f"tau must be a number >= 0, got {tau!r}.")
    base = base_metric(metric)
    m_clean, _ = baseline_metrics(model, clean, corrupted, metric)
    new, draws = ablated_values(model, graph, ablation, clean, corrupted, reference, seed,
                                batch_size)
    engine: dict[str, Any] = dict(batch_size=batch_size, memory_budget=memory_budget,
                                  progress=progress)
    e = graph.n_edges
    full = torch.ones(e, dtype=torch.bool)
    m_empty = circuit_metrics(model, graph, torch.zeros(1, e, dtype=torch.bool), clean, new,
                              draws, base, engine)[0].mean()
    gap = float((m_clean.mean() - m_empty).abs())
    if gap == 0.0:
        raise InputError("The full model and the model with every edge ablated give the same "
                         "metric; there is nothing for a circuit to explain.")
    keep = full.clone()
    incoming: dict[int, list[int]] = {}
    for i, edge in enumerate(graph.edges):
        incoming.setdefault(edge.receiver, []).append(i)
    outgoing: dict[str, list[int]] = {}
    for i, edge in enumerate(graph.edges):
        outgoing.setdefault(graph.nodes[edge.sender].base, []).append(i)
    runs = variants = 0
    for r in reversed(range(len(graph.receivers))):
        rec = graph.receivers[r]
        live = [i for i in incoming.get(r, []) if keep[i]]
        if not live:
            continue
        if rec.input != "out" and not bool(keep[outgoing.get(rec.node, [])].any()):
            keep[live] = False
            continue
        trials = keep.repeat(len(live) + 1, 1)
        for j, i in enumerate(live):
            trials[j, i] = False
        m = circuit_metrics(model, graph, trials, clean, new, draws, base, engine).mean(-1)
        runs += 1
        variants += len(live) + 1
        change = (m[:-1] - m[-1]).abs() / gap
        drop = [i for i, c in zip(live, change.tolist()) if c < tau]
        keep[drop] = False
    if not bool(keep.any()):
        raise InputError(f"Greedy pruning with tau={tau} removed every edge; lower tau.")
    final = circuit_metrics(model, graph, torch.stack([keep, torch.zeros_like(keep)]), clean,
                            new, draws, base, engine).mean(-1)
    faith = float((final[0] - final[1]) / (m_clean.mean() - final[1]))
    return Circuit(graph, keep, name=f"greedy tau={tau:g}",
                   meta={"tau": tau, "ablation": ablation, "engine_runs": runs + 2,
                         "variants": variants + 3, "faithfulness": faith})


__all__ = ["greedy_circuit"]
