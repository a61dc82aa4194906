"""Running circuits: the model with every edge outside a circuit ablated, many circuits at once.

A circuit run takes the target images; each receiver's input keeps the outputs of the senders
whose edges into it are in the circuit, *as computed in that same run*, and gets the ablated
value of every other sender (ACDC, Conmy et al. 2023; "Circuits" in the references). The
ablated values (`ABLATIONS`): ``"corrupted"`` the sender's output on the aligned corrupted
image; ``"mean"`` its mean over ``reference`` images (per token position); ``"zero"`` nothing;
``"resample"`` its output on a reference image drawn at random per target image (seeded).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from patchlens.circuits.graph import Graph
from patchlens.circuits.rewire import EdgeAblation
from patchlens.errors import InputError
from patchlens.patching.engine import CPU_MAX_ROWS, Variant, capture, parse_bytes, run_variants
from patchlens.patching.sites import Site

ABLATIONS = ("corrupted", "mean", "zero", "resample")


def ablated_values(model, graph: Graph, ablation: str, target: Tensor, corrupted: Tensor,
                   reference: Tensor | None = None, seed: int = 0,
                   batch_size: int | None = None) -> tuple[dict[str, Tensor], Tensor | None]:
    """The values every ablated edge carries, at the graph's sender hooks (``{hook: [B or 1
    or n_reference, ...]}``), and for ``"resample"`` the reference row of each target image."""
    if ablation == "zero":
        return {}, None
    if ablation == "corrupted":
        ref = corrupted
    else:
        ref = corrupted if reference is None else reference
        model.check_images(ref)
        if ref.shape[0] == 0:
            raise InputError(f"ablation={ablation!r} needs at least one reference image.")
    acts = capture(model, ref, graph.sender_hook_names, return_type=None,
                   batch_size=batch_size).acts
    if ablation == "mean":
        return {h: a.mean(0, keepdim=True) for h, a in acts.items()}, None
    if ablation == "resample":
        g = torch.Generator().manual_seed(seed)
        return acts, torch.randint(0, ref.shape[0], (target.shape[0],), generator=g)
    return acts, None


def ablation_weights(graph: Graph, keep: Tensor) -> Tensor:
    """``keep [V, n_edges]`` (True: the edge is in variant v's circuit) -> the `EdgeAblation`
    weights ``[V, n_receivers, n_senders]`` (1 for every edge variant v ablates)."""
    rec = torch.tensor([e.receiver for e in graph.edges])
    snd = torch.tensor([e.sender for e in graph.edges])
    w = torch.zeros(keep.shape[0], len(graph.receivers), len(graph.senders))
    w[:, rec, snd] = (~keep).float()
    return w


def circuit_metrics(model, graph: Graph, keep: Tensor, target: Tensor, new: dict[str, Tensor],
                    draws: Tensor | None, metric, engine: dict[str, Any],
                    observers=(), labels: list | None = None) -> Tensor:
    """``[V, B]`` the metric of each circuit ``keep[v]`` run on ``target`` (one engine sweep;
    each circuit's run starts at the first layer where it ablates an edge)."""
    weights = ablation_weights(graph, keep)
    iv = EdgeAblation(graph, weights, new, draws)
    variants = circuit_variants(graph, weights, iv, labels)
    engine = dict(engine)
    if engine.get("batch_size") is None:
        engine["batch_size"] = _rows(model, graph, target, engine.get("memory_budget"))
    return run_variants(model, target, variants, metric=metric, observers=observers,
                        **engine).outputs


def _rows(model, graph: Graph, target: Tensor, memory_budget) -> int:
    """Rows per forward pass such that the ablation's per-chunk sender differences (every
    component's output at every token, `EdgeAblation`) take at most half the memory budget."""
    elem = next(model.parameters()).element_size()
    per_row = len(graph.components) * graph.n_tokens * model.cfg.d_model * elem
    rows = parse_bytes(memory_budget or "2GB") // (2 * per_row)
    if target.device.type == "cpu":
        rows = min(rows, CPU_MAX_ROWS)
    b = target.shape[0]
    return max(b, rows // b * b)


def circuit_variants(graph: Graph, weights: Tensor, iv, labels: list | None = None) -> list[Variant]:
    """One engine `Variant` per circuit: the ablation at every receiver hook where the circuit
    removes at least one incoming edge (none: the unpatched run)."""
    variants = []
    for v in range(weights.shape[0]):
        pairs = [(Site(blk.hook), iv) for blk in graph.blocks
                 if bool(weights[v][blk.receivers][:, blk.senders].any())]
        variants.append(Variant(pairs, labels[v] if labels is not None else v))
    return variants


__all__ = ["ABLATIONS", "ablated_values", "ablation_weights", "circuit_metrics",
           "circuit_variants"]
