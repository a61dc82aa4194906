"""`Circuit`: a set of edges of a `Graph`, chosen from edge scores or by hand."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from patchlens.circuits.graph import Graph
from patchlens.circuits.scores import EdgeScores
from patchlens.errors import InputError


@dataclass
class Circuit:
    """A set of edges (``mask [n_edges]``, True = in the circuit) of ``graph``.

    Build one with `top_k`, `threshold`, `from_edges` or `patchlens.circuits.greedy_circuit`
    (ACDC-style pruning); check it with `patchlens.circuits.evaluate`.
    """

    graph: Graph
    mask: Tensor
    scores: EdgeScores | None = None
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.graph, Graph):
            raise InputError(f"Circuit takes a patchlens.circuits.Graph, got "
                             f"{type(self.graph).__name__}.")
        self.mask = torch.as_tensor(self.mask).bool().flatten()
        if self.mask.shape != (self.graph.n_edges,):
            raise InputError(f"A circuit's mask has one entry per edge ({self.graph.n_edges}); "
                             f"got shape {tuple(self.mask.shape)}.")
        if not bool(self.mask.any()):
            raise InputError("The circuit is empty (no edge selected): a circuit needs at least "
                             "one edge. Pick a larger k or a smaller threshold.")

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_edges(cls, graph: Graph, edges: Sequence[str | int] | Tensor, name: str = "") -> Circuit:
        """The circuit of the given edge names (``"a0.h1->a2.h3<q>"``) or indices."""
        ids = graph.edge_ids(edges)
        mask = torch.zeros(graph.n_edges, dtype=torch.bool)
        mask[ids] = True
        return cls(graph, mask, name=name or f"{len(ids)} edges")

    @classmethod
    def top_k(cls, scores: EdgeScores, k: int, by: str = "abs") -> Circuit:
        """The ``k`` edges with the largest scores (``|value|``, or ``value`` with
        ``by="value"``)."""
        _check_scores(scores)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= scores.graph.n_edges:
            raise InputError(f"k must be an int in 1..{scores.graph.n_edges} (the graph's "
                             f"edges), got {k!r}.")
        mask = torch.zeros(scores.graph.n_edges, dtype=torch.bool)
        mask[scores.order(by)[:k]] = True
        return cls(scores.graph, mask, scores, f"top {k} ({scores.method})",
                   {"k": k, "by": by, "method": scores.method})

    @classmethod
    def threshold(cls, scores: EdgeScores, tau: float, by: str = "abs") -> Circuit:
        """Every edge whose score (``|value|`` or ``value``) exceeds ``tau``."""
        _check_scores(scores)
        key = scores.values.abs() if by == "abs" else scores.values
        mask = key > tau
        if not bool(mask.any()):
            raise InputError(f"No edge scores above {tau} (the largest is {float(key.max()):.4g}); "
                             "the circuit would be empty. Lower the threshold.")
        return cls(scores.graph, mask, scores, f"|score| > {tau:g} ({scores.method})",
                   {"tau": tau, "by": by, "method": scores.method})

    # ---- contents ----------------------------------------------------------------------------
    @property
    def n_edges(self) -> int:
        return int(self.mask.sum())

    @property
    def fraction(self) -> float:
        """Share of the graph's edges in the circuit."""
        return self.n_edges / self.graph.n_edges

    @property
    def edges(self) -> list[str]:
        return [self.graph.edges[i].name for i in torch.nonzero(self.mask).flatten().tolist()]

    @property
    def nodes(self) -> list[str]:
        """Nodes with at least one edge in the circuit (senders and receivers' nodes), in
        forward order."""
        names = set()
        for i in torch.nonzero(self.mask).flatten().tolist():
            e = self.graph.edges[i]
            names.add(self.graph.nodes[e.sender].name)
            names.add(self.graph.receivers[e.receiver].node)
        return [n.name for n in self.graph.nodes if n.name in names] + sorted(
            n for n in names if n not in {nd.name for nd in self.graph.nodes})

    def __contains__(self, edge: str | int) -> bool:
        i = edge if isinstance(edge, int) else self.graph.edge_index(edge)
        return bool(self.mask[i])

    def __len__(self) -> int:
        return self.n_edges

    def connected(self) -> Circuit:
        """The edges that lie on a path from the embedding to the output within the circuit
        (dangling edges dropped: they cannot change the output)."""
        g = self.graph
        kept = torch.nonzero(self.mask).flatten().tolist()
        comp_of = {nd.name: nd.base for nd in g.nodes}
        # forward: a sender is live if it is the embedding or its component receives a kept edge
        live_comp = {"embed"}
        for i in kept:  # edges are in forward order of their receivers
            e = g.edges[i]
            if comp_of[g.nodes[e.sender].name] in live_comp:
                live_comp.add(g.receivers[e.receiver].node)
        # backward: a component is useful if it is the output or feeds a useful one
        useful = {g.output.name}
        for i in reversed(kept):
            e = g.edges[i]
            if g.receivers[e.receiver].node in useful:
                useful.add(comp_of[g.nodes[e.sender].name])
        mask = torch.zeros_like(self.mask)
        for i in kept:
            e = g.edges[i]
            base = comp_of[g.nodes[e.sender].name]
            if base in live_comp and g.receivers[e.receiver].node in useful and base in useful:
                mask[i] = True
        return Circuit(g, mask, self.scores, f"{self.name} (connected)", dict(self.meta))

    # ---- views -------------------------------------------------------------------------------
    def to_pandas(self):
        """The graph's edge table restricted to the circuit (with scores if known)."""
        df = self.graph.to_pandas()
        if self.scores is not None:
            df["value"] = self.scores.values.detach().double().cpu().numpy()
        return df[self.mask.numpy()].reset_index(drop=True)

    def plot(self, scores: EdgeScores | None = None, **kwargs: Any):
        """The circuit figure (nodes by layer and head, edge width by ``|score|``, colour by
        sign; see `patchlens.viz.circuit_figure`)."""
        from patchlens import viz

        sc = scores if scores is not None else self.scores
        values = sc.values if sc is not None else None
        kwargs.setdefault("title", f"circuit: {self.name or ''} ({self.n_edges} edges)")
        return viz.circuit_figure(self.graph, torch.nonzero(self.mask).flatten(), values, **kwargs)

    def plot_tokens(self, node: str = "embed", image: Tensor | None = None, **kwargs: Any):
        """The circuit's edges from a split node's token parts, over the image grid."""
        from patchlens import viz

        if self.scores is None:
            values = self.mask.double()
        else:
            values = self.scores.values * self.mask
            image = image if image is not None else self.scores.image
        return viz.token_parts_figure(self.graph, values, node, image, **kwargs)

    def __repr__(self) -> str:
        heads = sum(1 for n in self.nodes if n.startswith("a"))
        mlps = sum(1 for n in self.nodes if n.startswith("m"))
        return (f"Circuit({self.name!r}: {self.n_edges} of {self.graph.n_edges} edges "
                f"({100 * self.fraction:.1f}%), {heads} heads, {mlps} MLPs)")


def _check_scores(scores: Any) -> None:
    if not isinstance(scores, EdgeScores):
        raise InputError(f"Expected EdgeScores (from patchlens.circuits.edge_scores), got "
                         f"{type(scores).__name__}.")


__all__ = ["Circuit"]
