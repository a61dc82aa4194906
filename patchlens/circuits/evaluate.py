"""How much of the model's behaviour a circuit keeps: faithfulness, curves, random baselines.

Faithfulness of a circuit C (Conmy et al. 2023; Hanna et al. 2024):
``(m(C) - m(empty)) / (m(full) - m(empty))``: ``m(C)`` the metric on the clean images with every
edge outside C ablated, ``m(empty)`` with every edge ablated, ``m(full)`` the unpatched model.
Means over the images are taken before the ratio (per-image ratios are unstable where an
image's gap is small). With ``ablation="corrupted"`` the empty circuit is exactly the corrupted
run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from patchlens.circuits.ablate import ABLATIONS, ablated_values, circuit_metrics
from patchlens.circuits.attribute import check_engine_args, check_graph
from patchlens.circuits.circuit import Circuit
from patchlens.circuits.scores import EdgeScores
from patchlens.errors import InputError
from patchlens.metrics import base_metric, metric_name
from patchlens.recipes.common import baseline_metrics, check_choice, check_pair, check_reference


@dataclass
class CircuitEvaluation:
    """What `evaluate` returns.

    Attributes:
        faithfulness: ``(m_circuit - m_ablated) / (m_clean - m_ablated)`` (means over images).
        circuit: ``[B]`` the metric with every edge outside the circuit ablated.
        ablated: ``[B]`` with every edge ablated (the empty circuit).
        clean, corrupted: ``[B]`` the unpatched runs.
        n_edges, fraction: the circuit's size.
        ablation: how edges were ablated.
        divergence: a `DivergenceReport` of the ablated runs (variants ``"circuit"`` and
            ``"all ablated"``) with ``diagnose=``.
    """

    faithfulness: float
    circuit: Tensor
    ablated: Tensor
    clean: Tensor
    corrupted: Tensor
    n_edges: int
    fraction: float
    ablation: str
    divergence: Any = None
    meta: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        s = (f"CircuitEvaluation(faithfulness {self.faithfulness:.3f} with {self.n_edges} edges "
             f"({100 * self.fraction:.1f}%), {self.ablation} ablation; metric clean "
             f"{self.clean.mean():.3f}, circuit {self.circuit.mean():.3f}, all ablated "
             f"{self.ablated.mean():.3f})")
        if self.divergence is not None:
            s += f"\n  divergence: {self.divergence.summary()}"
        return s


def evaluate(model, circuit: Circuit, clean: Tensor, corrupted: Tensor,
             metric: Callable[[Tensor], Tensor], ablation: str = "corrupted", *,
             reference: Tensor | None = None, seed: int = 0, diagnose: Any = None,
             batch_size: int | None = None, memory_budget: str | int | None = "2GB",
             progress: bool | None = None) -> CircuitEvaluation:
    """Run the clean images with every edge outside ``circuit`` ablated and report its
    faithfulness (see the module docstring).

    Args:
        ablation: ``"corrupted"``, ``"mean"``, ``"zero"`` or ``"resample"`` (see
            `patchlens.circuits.ablate`).
        reference: images for ``"mean"`` / ``"resample"`` (default: the corrupted batch).
        diagnose: a fitted `patchlens.diagnostics.Reference`: attaches how far the ablated runs'
            representations drift from the natural ones, measured at the receivers' hooks the
            reference was fitted at (e.g. ``Reference.fit(model, images, sites=["mlp_in"])``)
            and by the downstream MLP neurons' natural ranges.
    """
    _check_circuit(circuit)
    _validate(model, clean, corrupted, metric, ablation, diagnose)
    check_engine_args(batch_size, memory_budget)
    graph = check_graph(model, circuit.graph, clean)
    m_clean, m_corrupted = baseline_metrics(model, clean, corrupted, metric)
    new, draws = ablated_values(model, graph, ablation, clean, corrupted, reference, seed,
                                batch_size)
    keep = torch.stack([circuit.mask, torch.zeros_like(circuit.mask)])
    labels = ["circuit", "all ablated"]
    engine = dict(batch_size=batch_size, memory_budget=memory_budget, progress=progress)
    collector = diag_variants = None
    if diagnose is not None:
        from patchlens.circuits.ablate import ablation_weights, circuit_variants
        from patchlens.circuits.rewire import EdgeAblation
        from patchlens.diagnostics.diagnose import sweep_collector

        weights = ablation_weights(graph, keep)
        diag_variants = _diagnostic_variants(
            circuit_variants(graph, weights, EdgeAblation(graph, weights, new, draws), labels),
            diagnose)
        collector = sweep_collector(model, clean, diag_variants, diagnose)
    m = circuit_metrics(model, graph, keep, clean, new, draws, base_metric(metric), engine,
                        observers=collector.observers if collector is not None else (),
                        labels=labels)
    faith = faithfulness(m, m_clean)[0]
    result = CircuitEvaluation(float(faith), m[0], m[1], m_clean, m_corrupted, circuit.n_edges,
                               circuit.fraction, ablation,
                               meta={"metric": metric_name(metric), "circuit": circuit.name})
    if collector is not None:
        from patchlens.diagnostics.diagnose import diagnose_sweep
        from patchlens.patching.results import PatchResult

        effects = PatchResult(m.mean(-1), ("circuit",), {"circuit": labels}, baseline=m_clean)
        result.divergence = diagnose_sweep(model, clean, diag_variants, diagnose, effects,
                                           collector=collector)
    return result


def faithfulness(m: Tensor, m_clean: Tensor) -> Tensor:
    """``[V]`` faithfulness of each run ``m [V, B]`` whose last row is the empty circuit."""
    empty, full = m[-1].mean(), m_clean.mean()
    denom = full - empty
    scale = torch.maximum(full.abs(), empty.abs()).clamp_min(1.0)
    if float(denom.abs()) <= 64 * torch.finfo(denom.dtype).eps * float(scale):
        raise InputError(
            f"Faithfulness is undefined: the full model ({float(full):.6g}) and the model with "
            f"every edge ablated ({float(empty):.6g}) give the same metric. Choose inputs and an "
            "ablation that change the metric."
        )
    return (m.mean(-1) - empty) / denom


@dataclass
class FaithfulnessCurve:
    """Faithfulness of the top-k circuits of each method, and of random circuits of the same
    sizes.

    Attributes:
        ks: ``[K]`` circuit sizes (edges); ``fractions`` the same as shares of all edges.
        values: ``{method: [K]}`` faithfulness of each method's top-k circuit.
        random: ``[K]`` mean faithfulness of ``n_random`` random circuits per size
            (``random_all [n_random, K]``).
        area: ``{method or "random": float}``: the mean faithfulness over circuit sizes from 0
            to ``max(ks)`` edges (trapezoid in the share of edges, the empty circuit at 0).
    """

    ks: list[int]
    fractions: list[float]
    values: dict[str, Tensor]
    random: Tensor | None
    random_all: Tensor | None
    area: dict[str, float]
    n_edges: int
    ablation: str
    meta: dict = field(default_factory=dict)

    def to_pandas(self):
        import pandas as pd

        rows = []
        for name, v in list(self.values.items()) + ([("random", self.random)]
                                                     if self.random is not None else []):
            for k, f, val in zip(self.ks, self.fractions, v.tolist()):
                rows.append({"method": name, "k": k, "fraction": f, "faithfulness": val})
        return pd.DataFrame(rows)

    def plot(self, **kwargs: Any):
        """The curves of every method (and the random baseline) on one plot."""
        from patchlens import viz

        return viz.faithfulness_figure(self, **kwargs)

    def __repr__(self) -> str:
        areas = ", ".join(f"{k} {v:.3f}" for k, v in self.area.items())
        return (f"FaithfulnessCurve({len(self.ks)} sizes from {self.ks[0]} to {self.ks[-1]} of "
                f"{self.n_edges} edges, {self.ablation} ablation; area: {areas})")


def default_ks(n_edges: int) -> list[int]:
    """Circuit sizes from 0.5% to 100% of the edges, denser at the small end."""
    fr = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)
    return sorted({max(1, round(f * n_edges)) for f in fr})


def faithfulness_curve(model, scores: EdgeScores | Sequence[EdgeScores] | dict[str, EdgeScores],
                       clean: Tensor, corrupted: Tensor, metric: Callable[[Tensor], Tensor],
                       ks: Sequence[int] | None = None, ablation: str = "corrupted", *,
                       n_random: int = 3, by: str = "abs", reference: Tensor | None = None,
                       seed: int = 0, batch_size: int | None = None,
                       memory_budget: str | int | None = "2GB",
                       progress: bool | None = None) -> FaithfulnessCurve:
    """Faithfulness of the top-``k`` circuit of each method's scores for every ``k`` in ``ks``
    (default `default_ks`), with ``n_random`` random circuits per size as a baseline; every
    circuit runs in one batched engine sweep."""
    named = _named_scores(scores)
    graph = next(iter(named.values())).graph
    for s in named.values():
        if s.graph is not graph and s.graph.n_edges != graph.n_edges:
            raise InputError("faithfulness_curve needs scores over the same graph.")
    _validate(model, clean, corrupted, metric, ablation, None)
    graph = check_graph(model, graph, clean)
    e = graph.n_edges
    ks = default_ks(e) if ks is None else sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] > e:
        raise InputError(f"ks must be circuit sizes in 1..{e} (the graph's edges), got {ks}.")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise InputError(f"n_random must be an int >= 0, got {n_random!r}.")
    rows, labels = [], []
    for name, s in named.items():
        order = s.order(by)
        for k in ks:
            m = torch.zeros(e, dtype=torch.bool)
            m[order[:k]] = True
            rows.append(m)
            labels.append((name, k))
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_random):
        perm = torch.randperm(e, generator=g)
        for k in ks:
            m = torch.zeros(e, dtype=torch.bool)
            m[perm[:k]] = True
            rows.append(m)
            labels.append(("random", k))
    rows.append(torch.zeros(e, dtype=torch.bool))
    labels.append(("empty", 0))
    m_clean, _ = baseline_metrics(model, clean, corrupted, metric)
    new, draws = ablated_values(model, graph, ablation, clean, corrupted, reference, seed,
                                batch_size)
    engine = dict(batch_size=batch_size, memory_budget=memory_budget, progress=progress)
    m = circuit_metrics(model, graph, torch.stack(rows), clean, new, draws, base_metric(metric),
                        engine, labels=labels)
    f = faithfulness(m, m_clean)
    nk = len(ks)
    values = {name: f[i * nk:(i + 1) * nk].clone() for i, name in enumerate(named)}
    start = len(named) * nk
    rand_all = f[start:start + n_random * nk].reshape(n_random, nk) if n_random else None
    fractions = [k / e for k in ks]
    area = {name: _area(fractions, v) for name, v in values.items()}
    if rand_all is not None:
        area["random"] = _area(fractions, rand_all.mean(0))
    return FaithfulnessCurve(ks, fractions, values,
                             rand_all.mean(0) if rand_all is not None else None, rand_all, area,
                             e, ablation, meta={"metric": metric_name(metric), "by": by})


def _area(fractions: list[float], values: Tensor) -> float:
    x = torch.tensor([0.0] + fractions, dtype=torch.float64)
    y = torch.cat([torch.zeros(1, dtype=torch.float64), values.double().cpu()])
    return float(torch.trapezoid(y, x) / x[-1])


def _named_scores(scores) -> dict[str, EdgeScores]:
    if isinstance(scores, EdgeScores):
        return {scores.name: scores}
    if isinstance(scores, dict):
        items = list(scores.items())
    else:
        items = []
        for s in scores:
            name = s.name if isinstance(s, EdgeScores) else None
            if name is not None and name in dict(items):
                name = f"{name} ({len(items)})"
            items.append((name, s))
    if not items:
        raise InputError("faithfulness_curve needs at least one EdgeScores.")
    for _, s in items:
        if not isinstance(s, EdgeScores):
            raise InputError(f"faithfulness_curve takes EdgeScores, got {type(s).__name__}.")
    return dict(items)


def _check_circuit(circuit: Any) -> None:
    if not isinstance(circuit, Circuit):
        raise InputError(f"evaluate takes a Circuit (Circuit.top_k(scores, k), "
                         f"Circuit.from_edges(graph, names), ...), got {type(circuit).__name__}.")
    if not bool(circuit.mask.any()):
        raise InputError("The circuit is empty: evaluate needs at least one edge.")


def _validate(model, clean, corrupted, metric, ablation, diagnose) -> None:
    check_pair(model, clean, corrupted)
    check_choice("ablation", ablation, ABLATIONS)
    check_reference(diagnose)
    if not callable(metric):
        raise InputError(f"metric must be a function logits -> one value per image, got "
                         f"{metric!r}.")


def _diagnostic_variants(variants, reference):
    """The circuit variants restricted to the receiver hooks the reference was fitted at (the
    sites the divergence report measures)."""
    from patchlens.patching.engine import Variant

    hooks = set(reference.hooks)
    out = [Variant([(s, iv) for s, iv in v.pairs if s.hook in hooks], v.label) for v in variants]
    if not any(v.pairs for v in out):
        wanted = sorted({s.hook for v in variants for s, _ in v.pairs})
        raise InputError(
            "diagnose= needs a Reference fitted at the hooks where the circuit's edges are "
            f"ablated (the receivers' inputs, e.g. {', '.join(wanted[:3])}); it has "
            f"{', '.join(sorted(hooks)[:4])}. Fit one with Reference.fit(model, images, "
            "sites=['mlp_in']) (the MLP inputs; 'q_input', 'k_input', 'v_input' work too)."
        )
    return out


__all__ = ["evaluate", "faithfulness", "faithfulness_curve", "CircuitEvaluation",
           "FaithfulnessCurve", "default_ks"]
