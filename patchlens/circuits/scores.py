"""`EdgeScores`: one value per edge of a `Graph`, with labels, tables and figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError


@dataclass
class EdgeScores:
    """The effect of patching each edge (``method="exact"``) or its estimate (``"eap"``,
    ``"eap-ig"``).

    Attributes:
        graph: the `Graph` the edges belong to.
        values: ``[n_edges]`` mean over the images.
        per_example: ``[n_edges, B]``.
        method: ``"exact"``, ``"eap"`` or ``"eap-ig"``.
        clean, corrupted: ``[B]`` the metric on the unpatched runs.
        meta: direction, metric, IG steps and variant, whether values are normalised.
        image: ``[C, H, W]`` the first target image in [0, 1] (for token figures).
    """

    graph: Any
    values: Tensor
    per_example: Tensor
    method: str
    clean: Tensor | None = None
    corrupted: Tensor | None = None
    meta: dict = field(default_factory=dict)
    image: Tensor | None = None

    def __post_init__(self) -> None:
        if self.values.shape != (self.graph.n_edges,):
            raise ValueError(f"values has shape {tuple(self.values.shape)}, the graph has "
                             f"{self.graph.n_edges} edges")

    @property
    def name(self) -> str:
        """The method, with EAP-IG's variant: ``"exact"``, ``"eap"``, ``"eap-ig"``,
        ``"eap-ig (activations)"``."""
        if self.method == "eap-ig" and self.meta.get("ig") == "activations":
            return "eap-ig (activations)"
        return self.method

    @property
    def labels(self) -> list[str]:
        """The edge names, in the order of `values`."""
        return [e.name for e in self.graph.edges]

    def __getitem__(self, edge: str | int) -> float:
        """The score of one edge, by name or index."""
        i = edge if isinstance(edge, int) else self.graph.edge_index(edge)
        return float(self.values[i])

    def order(self, by: str = "abs") -> Tensor:
        """Edge indices, largest first (by ``|value|``, or by ``value`` with ``by="value"``)."""
        if by not in ("abs", "value"):
            raise InputError(f"by must be 'abs' or 'value', got {by!r}.")
        key = self.values.abs() if by == "abs" else self.values
        return torch.argsort(key.double().nan_to_num(-float("inf")), descending=True,
                             stable=True)

    def rank(self, edge: str | int, by: str = "abs") -> int:
        """Position of ``edge`` in `order` (0 = first)."""
        i = edge if isinstance(edge, int) else self.graph.edge_index(edge)
        return int((self.order(by) == i).nonzero()[0, 0])

    def top(self, k: int = 10, by: str = "abs"):
        """The ``k`` largest scores as a DataFrame (edge, sender, receiver, input, value)."""
        k = max(0, min(int(k), self.graph.n_edges))
        df = self.to_pandas()
        return df.iloc[self.order(by)[:k].tolist()].reset_index(drop=True)

    def to_pandas(self):
        """One row per edge: the graph's edge table plus ``value``."""
        df = self.graph.to_pandas()
        df["value"] = self.values.detach().double().cpu().numpy()
        return df

    def rank_correlation(self, other: EdgeScores) -> float:
        """Spearman rank correlation of the values with ``other``'s (same graph)."""
        if other.graph.n_edges != self.graph.n_edges:
            raise InputError("rank_correlation needs scores over the same graph.")
        return spearman(self.values, other.values)

    def plot(self, k: int = 40, by: str = "abs", **kwargs: Any):
        """The circuit figure of the ``k`` largest edges (see `patchlens.viz.circuit_figure`)."""
        from patchlens import viz

        kwargs.setdefault("title", f"top {k} edges · {self.method} · {self.meta.get('metric', '')}")
        return viz.circuit_figure(self.graph, self.order(by)[:k], self.values, **kwargs)

    def plot_tokens(self, node: str = "embed", image: Tensor | None = None, **kwargs: Any):
        """Scores of a split node's token parts over the image grid (the sum of ``|score|`` of
        each part's outgoing edges; see `patchlens.viz.token_parts_figure`)."""
        from patchlens import viz

        return viz.token_parts_figure(self.graph, self.values, node,
                                      image if image is not None else self.image, **kwargs)

    def __repr__(self) -> str:
        m = self.meta
        head = (f"EdgeScores[{self.graph.n_edges} edges] method={self.method}, "
                f"direction={m.get('direction')}, metric={m.get('metric')}")
        if m.get("ig_steps"):
            head += f", ig_steps={m['ig_steps']} on the {m.get('ig')}"
        parts = [head]
        if self.clean is not None and self.corrupted is not None:
            parts.append(f"clean={self.clean.mean():.3f} corrupted={self.corrupted.mean():.3f}")
        if self.values.numel():
            top = self.order()[:3].tolist()
            parts.append("largest: " + ", ".join(f"{self.graph.edges[i].name} "
                                                 f"{float(self.values[i]):+.4f}" for i in top))
        return "\n  ".join(parts)


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two vectors (ties get their average rank)."""
    ra, rb = _ranks(a.double().flatten()), _ranks(b.double().flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def _ranks(x: Tensor) -> Tensor:
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    # average ranks over ties
    uniq, inv = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=x.dtype).index_add_(0, inv, ranks)
    counts = torch.zeros(len(uniq), dtype=x.dtype).index_add_(0, inv, torch.ones_like(x))
    return (sums / counts)[inv]


__all__ = ["EdgeScores", "spearman"]
