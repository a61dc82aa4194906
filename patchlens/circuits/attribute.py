"""Edge scores three ways: exact edge patching, EAP and EAP-IG.

For an edge ``u -> v`` and the noising direction (target = clean run, source = corrupted run):

- ``"exact"``: ``m(clean run, v's input with a_u(clean) replaced by a_u(corrupted)) - m(clean)``;
  nothing else changes (v's input is patched at its own hook, so no other node sees the
  change directly). One patched run per edge, batched by the engine, each starting at the
  receiver's layer from the clean residual stream (prefix reuse).
- ``"eap"`` (Syed, Rager & Conmy 2023, arXiv 2310.10348): the first-order estimate
  ``(a_u(corrupted) - a_u(clean)) . dm/d(input_v)`` with the gradient on the clean run: one
  forward pass per input and one backward pass give every edge.
- ``"eap-ig"`` (Hanna, Pezzelle & Belinkov 2024, arXiv 2403.17806): the gradient averaged over
  ``ig_steps`` points ``alpha = k / ig_steps``, ``k = 1..ig_steps``, on the straight line from
  the corrupted (``alpha = 0``) to the clean run (``alpha = 1``). ``ig="inputs"`` interpolates the
  input embeddings (``hook_full_embed``; images enter it affinely, so this is the line between
  the images); ``ig="activations"`` interpolates the outputs of one layer's senders at a time
  (the embedding, a layer's heads, a layer's MLP; Marks et al. 2024) and takes the gradients of
  their outgoing edges from those runs. With one step both equal EAP.

``direction="denoising"`` swaps the roles: the target is the corrupted run and senders take
their clean outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from patchlens.checks import all_finite
from patchlens.circuits.graph import Graph, check_model
from patchlens.circuits.rewire import EdgePatch
from patchlens.circuits.scores import EdgeScores
from patchlens.errors import InputError
from patchlens.metrics import (
    Recovery,
    base_metric,
    check_metric_batch,
    metric_name,
    recovery_denominator,
)
from patchlens.patching.checks import check_finite_metric
from patchlens.patching.engine import CPU_MAX_ROWS, Variant, capture, parse_bytes, run_variants
from patchlens.patching.interventions import PerVariant
from patchlens.patching.sites import Site
from patchlens.recipes.common import check_choice, check_pair

METHODS = ("exact", "eap", "eap-ig")
INPUT_HOOK = "hook_full_embed"


def edge_scores(
    model,
    clean: Tensor,
    corrupted: Tensor,
    metric: Callable[[Tensor], Tensor],
    method: Literal["exact", "eap", "eap-ig"] = "eap",
    *,
    graph: Graph | None = None,
    direction: Literal["noising", "denoising"] = "noising",
    ig_steps: int = 5,
    ig: Literal["inputs", "activations"] = "inputs",
    batch_size: int | None = None,
    memory_budget: str | int | None = "2GB",
    progress: bool | None = None,
) -> EdgeScores:
    """Score every edge of ``graph`` (default: `Graph.from_model(model)`).

    Args:
        clean: image batch ``[B, C, H, W]``.
        corrupted: its pairs, the same shape as ``clean``.
        metric: ``logits [N, classes] -> [N]`` (see `patchlens.metrics`); with
            `patchlens.metrics.recovery` the scores are divided by ``m_clean - m_corrupted``
            (per image), i.e. given as a fraction of the clean-corrupted gap.
        method: ``"exact"``, ``"eap"`` or ``"eap-ig"`` (see the module docstring).
        direction: ``"noising"`` (clean run, the edge carries the corrupted value; tests
            necessity, the setting of the EAP and ACDC papers) or ``"denoising"``.
        ig_steps: EAP-IG's number of points.
        ig: what EAP-IG interpolates (``"inputs"`` or ``"activations"``).
        batch_size: rows per forward pass (passed to the engine).
        memory_budget: passed to the engine.
        progress: passed to the engine.

    Returns:
        `EdgeScores`: ``values [n_edges]`` (mean over images) and ``per_example [n_edges, B]``
        of the effect ``m(patched) - m(target)`` (its estimate for EAP / EAP-IG).
    """
    graph = _validate(model, clean, corrupted, metric, method, graph, direction, ig_steps, ig,
                      batch_size, memory_budget)
    target, source = (clean, corrupted) if direction == "noising" else (corrupted, clean)
    engine = dict(batch_size=batch_size, memory_budget=memory_budget, progress=progress)
    base = base_metric(metric)
    # one run of each input gives the sender outputs and the baselines (and, for EAP, the
    # gradients at every receiver on the target run)
    hooks = graph.sender_hook_names + ([INPUT_HOOK] if method == "eap-ig" and ig == "inputs"
                                       else [])
    src = capture(model, source, hooks, base, batch_size=batch_size)
    tgt = capture(model, target, hooks, base, batch_size=batch_size,
                  grads=graph.receiver_hook_names if method == "eap" else False)
    m_target, m_source = tgt.values.detach(), src.values.detach()
    m_clean, m_corrupted = (m_target, m_source) if direction == "noising" else (m_source, m_target)
    check_baselines(metric, m_clean, m_corrupted)
    delta = graph.component_deltas(src.acts, tgt.acts)
    if method == "exact":
        per = exact_effects(model, graph, target, delta, base, engine) - m_target
    elif method == "eap":
        per = scores_from_grads(graph, delta, tgt.grads)
    else:
        per = _eap_ig(model, graph, target, src.acts, tgt.acts, delta, base, ig_steps, ig, engine)
    del src, tgt
    per = per.detach()
    normalized = isinstance(metric, Recovery)
    if normalized:
        per = per / recovery_denominator(m_clean, m_corrupted).to(per.dtype)
    meta = {"direction": direction, "metric": metric_name(metric), "normalized": normalized}
    if method == "eap-ig":
        meta.update(ig_steps=ig_steps, ig=ig)
    return EdgeScores(graph, per.mean(-1), per, method, m_clean, m_corrupted, meta,
                      image=model.to_image(target[0]).cpu())


def check_baselines(metric, m_clean: Tensor, m_corrupted: Tensor) -> None:
    """The unpatched runs' metric values are finite (and, for a `Recovery` metric, differ)."""
    check_finite_metric(m_clean, "on the clean run")
    check_finite_metric(m_corrupted, "on the corrupted run")
    if isinstance(metric, Recovery):
        Recovery.check(m_clean, m_corrupted)


def check_engine_args(batch_size: Any, memory_budget: Any) -> None:
    """``batch_size`` (None or an int >= 1) and ``memory_budget`` (None or readable), checked up
    front: some methods never reach the engine call that would check them."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise InputError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    if memory_budget is not None:
        parse_bytes(memory_budget)


def _validate(model, clean, corrupted, metric, method, graph, direction, ig_steps, ig,
              batch_size, memory_budget):
    check_pair(model, clean, corrupted)
    if not callable(metric):
        raise InputError(f"metric must be a function logits -> one value per image, got "
                         f"{metric!r}.")
    check_metric_batch(metric, clean.shape[0])
    check_choice("method", method, METHODS)
    check_choice("direction", direction, ("noising", "denoising"))
    check_choice("ig", ig, ("inputs", "activations"))
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise InputError(f"ig_steps must be an int >= 1, got {ig_steps!r}.")
    check_engine_args(batch_size, memory_budget)
    return check_graph(model, graph, clean)


def check_graph(model, graph: Graph | None, x: Tensor) -> Graph:
    """``graph`` (or the model's default graph) checked against the model and the image size."""
    if graph is None:
        return Graph.from_model(model, tuple(x.shape[-2:]))
    if not isinstance(graph, Graph):
        raise InputError(f"graph= takes a patchlens.circuits.Graph, got {type(graph).__name__}.")
    check_model(model)
    cfg = model.cfg
    layout = model.layout_for(tuple(x.shape[-2:]))
    if (graph.n_layers, graph.n_heads) != (cfg.n_layers, cfg.n_heads):
        raise InputError(f"The graph was built for {graph.n_layers} layers x {graph.n_heads} heads; "
                         f"this model has {cfg.n_layers} x {cfg.n_heads}.")
    if graph.layout != layout:
        raise InputError(f"The graph was built for a {graph.layout.grid} patch grid with prefix "
                         f"{list(graph.layout.prefix)}; these images give {layout.grid} with "
                         f"{list(layout.prefix)}. Build it with Graph.from_model(model, "
                         "image_size=images.shape[-2:]).")
    return graph


def sender_outputs(model, graph: Graph, x: Tensor, batch_size: int | None = None) -> Tensor:
    """``[C, B, pos, d_model]`` every sender component's output on ``x`` (one forward pass)."""
    run = capture(model, x, graph.sender_hook_names, return_type=None, batch_size=batch_size)
    return graph.component_outputs(run.acts)


# ---- exact ----------------------------------------------------------------------------------
def exact_effects(model, graph: Graph, target: Tensor, delta: Tensor, metric,
                  engine: dict[str, Any], edges: Tensor | None = None) -> Tensor:
    """``[len(edges), B]`` the metric with each edge patched (one engine variant per edge,
    starting at its receiver's layer): receiver ``r`` gets ``delta [B, pos, C, d]`` of the
    edge's sender component added at the sender's tokens. ``edges``: indices (default: all)."""
    ids = torch.arange(graph.n_edges) if edges is None else edges
    comp = torch.tensor([graph.nodes[graph.edges[i].sender].component for i in ids.tolist()])
    patch = EdgePatch(delta, comp)
    variants = []
    for i in ids.tolist():
        e = graph.edges[i]
        s, r = graph.nodes[e.sender], graph.receivers[e.receiver]
        tokens = graph.parts[s.part] if s.part is not None else "all"
        heads = [r.head] if r.head is not None else None
        variants.append(Variant([(Site(r.hook, tokens=tokens, heads=heads), patch)], e.name))
    return run_variants(model, target, variants, metric=metric, **engine).outputs


# ---- gradients --------------------------------------------------------------------------------
def scores_from_grads(graph: Graph, delta: Tensor, grads: dict[str, Tensor],
                      senders: set[int] | None = None, out: Tensor | None = None) -> Tensor:
    """``[n_edges, B]``: ``sum over tokens and d_model of delta_u . grad_v`` for every edge
    ``u -> v`` (only edges from ``senders`` if given; others stay as in ``out``).

    ``delta`` ``[C, B, pos, d]`` per sender component (`Graph.component_deltas`); ``grads`` at
    the receiver hooks."""
    b = delta.shape[1]
    if out is None:
        out = delta.new_zeros(graph.n_edges, b)
    for blk in graph.blocks:
        if blk.hook not in grads:
            continue
        rows = [j for j, s in enumerate(blk.senders) if senders is None or s in senders]
        if not rows:
            continue
        g = grads[blk.hook].to(delta.dtype)
        g = g[:, :, blk.heads] if blk.heads is not None else g.unsqueeze(2)       # [B, p, R, d]
        nodes = [blk.senders[j] for j in rows]
        comps = torch.tensor([graph.nodes[s].component for s in nodes])
        whole = graph.masks[nodes].all(1)
        sc = delta.new_empty(len(nodes), len(blk.receivers), b)                   # [S, R, B]
        w = torch.nonzero(whole).flatten()
        if len(w):  # senders without token parts: one matrix product per image
            cw = comps[w]
            lo, hi = int(cw.min()), int(cw.max()) + 1
            contiguous = torch.equal(cw, torch.arange(lo, hi))
            dw = delta[lo:hi] if contiguous else delta[cw]
            for i in range(b):
                gi = g[i].permute(0, 2, 1).reshape(-1, g.shape[2])                 # [p*d, R]
                sc[w, :, i] = dw[:, i].reshape(dw.shape[0], -1) @ gi
        for c in comps[~whole].unique().tolist():  # token parts: per token, then per part
            idx = torch.nonzero(~whole & (comps == c)).flatten()
            q = torch.einsum("bpd,bprd->bpr", delta[c], g)
            sc[idx] = torch.einsum("bpr,sp->srb", q, graph.masks[[nodes[i] for i in idx]]
                                   .to(q.dtype))
        out[blk.edges[rows].flatten()] = sc.reshape(-1, b)
    if not all_finite(out):
        raise InputError("Edge attribution got a non-finite gradient or activation; the "
                         "first-order estimate is undefined. Use method='exact'.")
    return out


def _eap_ig(model, graph, target, src, tgt, delta, metric, steps, ig, engine) -> Tensor:
    """The gradients averaged along the interpolation (``src``/``tgt``: the runs' activations
    at the graph's sender hooks and, for ``ig="inputs"``, the input embeddings)."""
    if ig == "inputs":
        grads = _mean_grads(model, target, INPUT_HOOK, src[INPUT_HOOK], tgt[INPUT_HOOK],
                            graph.receiver_hook_names, metric, steps, engine)
        return scores_from_grads(graph, delta, grads)
    out = delta.new_zeros(graph.n_edges, delta.shape[1])
    for sh in graph.sender_hooks:
        nodes = {i for i, nd in enumerate(graph.senders) if nd.component in sh.components}
        down = [blk.hook for blk in graph.blocks if nodes & set(blk.senders)]
        grads = _mean_grads(model, target, sh.hook, src[sh.hook], tgt[sh.hook], down, metric,
                            steps, engine)
        scores_from_grads(graph, delta, grads, senders=nodes, out=out)
    return out


def _mean_grads(model, target, hook, a_src, a_tgt, grad_hooks, metric, steps, engine):
    """Gradients at ``grad_hooks`` averaged over the runs with ``hook`` set to
    ``a_src + alpha (a_tgt - a_src)``, ``alpha = k / steps``, ``k = 1..steps`` (batched: as many
    steps per engine call as fit in one forward pass)."""
    b = target.shape[0]
    rows = engine.get("batch_size") or CPU_MAX_ROWS
    per_call = max(1, rows // b)
    alphas = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    total: dict[str, Tensor] = {}
    site = Site(hook)
    for i in range(0, steps, per_call):
        a = alphas[i : i + per_call].to(a_src.dtype).view(-1, *[1] * a_src.ndim)
        values = a_src.unsqueeze(0) + a * (a_tgt - a_src).unsqueeze(0)            # [k, B, ...]
        replay = PerVariant({hook: values})
        variants = [Variant([(site, replay)], f"alpha={float(x):.3f}")
                    for x in alphas[i : i + per_call]]
        res = run_variants(model, target, variants, metric=metric, grads=grad_hooks,
                           batch_size=engine.get("batch_size"),
                           memory_budget=engine.get("memory_budget"), progress=False)
        for h, g in res.grads.items():
            total[h] = total[h] + g.sum(0) if h in total else g.sum(0)
    return {h: g / steps for h, g in total.items()}


__all__ = ["edge_scores", "exact_effects", "scores_from_grads", "sender_outputs", "check_graph",
           "METHODS"]
