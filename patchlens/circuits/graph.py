"""`Graph`: the computational graph of a `HookedViT` for circuit discovery.

Nodes are the embedding (patch + position + prefix tokens, after ``ln_pre`` for CLIP-style
models), every attention head, every MLP and the output (the logits, or the pooled features of
a headless model). An edge ``u -> v`` is ``u``'s output as it enters ``v``'s input through the
residual stream (Conmy et al. 2023, ACDC; Syed et al. 2023): ``v``'s input is the sum of every
upstream output (plus constant biases), before ``v``'s LayerNorm. Each head has three inputs
(query, key, value), so it is the receiver of three edges from every upstream node.

Where the graph reads and writes (the hook schema's names):

| role | node | hook |
| --- | --- | --- |
| sender | embedding | ``blocks.0.hook_resid_pre`` (the stream entering block 0) |
| sender | head ``a{l}.h{h}`` | ``blocks.l.attn.hook_z`` head h through ``W_O`` (times LayerScale) |
| sender | MLP ``m{l}`` | ``blocks.l.hook_mlp_out`` |
| receiver | ``a{l}.h{h}<q|k|v>`` | ``blocks.l.hook_q_input`` / ``k_input`` / ``v_input`` head h |
| receiver | ``m{l}`` | ``blocks.l.hook_mlp_in`` (before ``ln2``) |
| receiver | ``logits`` | ``blocks.{n-1}.hook_resid_post`` (before the final norm) |

A node can be split by token groups (``tokens=``): its output restricted to the tokens of each
group is a node of its own (``embed@marker``), so a circuit says which part of the image a head
reads from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError, close_matches
from patchlens.patching.sites import resolve_tokens

INPUTS = ("q", "k", "v")


@dataclass(frozen=True)
class GraphNode:
    """A sender (or the output) of the graph.

    Attributes:
        name: ``"embed"``, ``"a3.h1"``, ``"m2"``, ``"logits"`` (``"output"`` for a headless
            model); a token part adds ``@group`` (``"embed@marker"``).
        kind: ``"embed"``, ``"head"``, ``"mlp"`` or ``"output"``.
        layer: the block (-1 for the embedding, ``n_layers`` for the output).
        head: the head index (heads only).
        part: the token group's name for a split node, else None.
        component: index of the sender component (embedding, head or MLP) whose output this node
            is (-1 for the output).
    """

    name: str
    kind: str
    layer: int
    head: int | None = None
    part: str | None = None
    component: int = -1

    @property
    def base(self) -> str:
        """The component's name (``"embed"`` for ``"embed@marker"``)."""
        return self.name.split("@")[0]


@dataclass(frozen=True)
class Receiver:
    """One input of a node: a head's query, key or value input, an MLP's input or the output's.

    Attributes:
        name: ``"a3.h1<q>"``, ``"m2"``, ``"logits"``.
        node: the name of the node it feeds.
        input: ``"q"``, ``"k"``, ``"v"``, ``"mlp"`` or ``"out"``.
        layer, head: where it sits (head None for MLPs and the output).
        hook: the hook the receiver's input is patched at.
    """

    name: str
    node: str
    input: str
    layer: int
    head: int | None
    hook: str


@dataclass(frozen=True)
class Edge:
    """``sender -> receiver`` (indices into `Graph.nodes` and `Graph.receivers`)."""

    name: str
    sender: int
    receiver: int


@dataclass(frozen=True)
class HookBlock:
    """The receivers that share one hook (every head of a layer at ``q_input``, or one MLP's
    input, or the output), the sender nodes upstream of them, and the edge index of each
    (sender, receiver) pair ``edges [S, R]``."""

    hook: str
    layer: int
    receivers: list[int]
    heads: list[int] | None
    senders: list[int]
    edges: Tensor


@dataclass(frozen=True)
class SenderHook:
    """A hook the graph reads sender outputs at: ``components`` (indices) along its head axis
    (a layer's ``hook_z``) or the one component it holds (embedding, MLP). `to_residual` turns
    the hook's values into what each component adds to the residual stream: the heads' ``z``
    through their ``W_O`` (``w_out [head, d_head, d_model]``), times the LayerScale ``scale``
    where the model has one."""

    hook: str
    layer: int
    components: list[int]
    per_head: bool
    scale: Tensor | None
    w_out: Tensor | None = None

    def to_residual(self, act: Tensor) -> Tensor:
        """``[K, B, pos, d_model]`` (K = heads or 1) from the hook's activation ``act`` (linear:
        a difference of activations gives the difference of contributions)."""
        if self.per_head:
            out = torch.einsum("bphk,hkd->hbpd", act, self.w_out.to(act.device, act.dtype))
        else:
            out = act.unsqueeze(0)
        if self.scale is not None:
            out = out * self.scale.to(act.device, act.dtype)
        return out


@dataclass
class Graph:
    """The computational graph of a model (see the module docstring); build it with
    `Graph.from_model`.

    Attributes:
        nodes: senders in forward order, then the output.
        receivers: every receiver, in forward order.
        edges: every edge, grouped by receiver (forward order), senders in forward order.
        parts: token groups ``{name: token indices}`` of the split nodes (empty if none).
        split: names of the split components.
        n_layers, n_heads, n_tokens: the model's sizes; ``grid`` the patch grid, ``layout`` its
            `TokenLayout`.
    """

    nodes: list[GraphNode]
    receivers: list[Receiver]
    edges: list[Edge]
    parts: dict[str, Tensor]
    split: tuple[str, ...]
    n_layers: int
    n_heads: int
    layout: Any
    components: list[str]
    sender_hooks: list[SenderHook]
    blocks: list[HookBlock]
    masks: Tensor                       # [S, n_tokens] token mask of every sender node
    meta: dict = field(default_factory=dict)
    _edge_index: dict[str, int] = field(default_factory=dict, repr=False)
    _node_index: dict[str, int] = field(default_factory=dict, repr=False)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model, image_size: tuple[int, int] | None = None,
                   tokens: dict[str, Any] | str | None = None,
                   split: str | Sequence[str] | None = None) -> Graph:
        """The graph of ``model`` at ``image_size`` (default: the model's native size).

        Args:
            tokens: token groups to split nodes by: ``{name: selector}`` with the selectors of
                `Site` (``"cls"``, ``(row, col)``, a `Rect`, a boolean patch mask, indices...),
                or ``"each"`` (one group per token). Groups must not overlap; the tokens they
                leave out form a group ``"rest"``.
            split: which nodes are split by ``tokens``: node names (``"embed"``, ``"a0.h1"``,
                ``"m2"``) or ``"all"``; default ``"embed"`` when ``tokens`` is given.
        """
        check_model(model)
        cfg = model.cfg
        n, h = cfg.n_layers, cfg.n_heads
        layout = model.layout if image_size is None else model.layout_for(tuple(image_size))
        comps = ["embed"] + [name for l in range(n)
                             for name in [f"a{l}.h{j}" for j in range(h)] + [f"m{l}"]]
        parts = _token_parts(tokens, layout)
        split_names = _split_names(split, parts, comps)
        out_name = "logits" if cfg.n_classes else "output"

        nodes: list[GraphNode] = []
        masks: list[Tensor] = []
        full = torch.ones(layout.n_tokens, dtype=torch.bool)

        def add(name: str, kind: str, layer: int, head: int | None, comp: int) -> None:
            if name in split_names:
                for pname, idx in parts.items():
                    m = torch.zeros(layout.n_tokens, dtype=torch.bool)
                    m[idx] = True
                    nodes.append(GraphNode(f"{name}@{pname}", kind, layer, head, pname, comp))
                    masks.append(m)
            else:
                nodes.append(GraphNode(name, kind, layer, head, None, comp))
                masks.append(full)

        add("embed", "embed", -1, None, 0)
        for l in range(n):
            for j in range(h):
                add(f"a{l}.h{j}", "head", l, j, comps.index(f"a{l}.h{j}"))
            add(f"m{l}", "mlp", l, None, comps.index(f"m{l}"))
        n_senders = len(nodes)
        nodes.append(GraphNode(out_name, "output", n))

        receivers: list[Receiver] = []
        for l in range(n):
            for x in INPUTS:
                for j in range(h):
                    receivers.append(Receiver(f"a{l}.h{j}<{x}>", f"a{l}.h{j}", x, l, j,
                                              f"blocks.{l}.hook_{x}_input"))
            receivers.append(Receiver(f"m{l}", f"m{l}", "mlp", l, None, f"blocks.{l}.hook_mlp_in"))
        receivers.append(Receiver(out_name, out_name, "out", n, None,
                                  f"blocks.{n - 1}.hook_resid_post"))

        edges: list[Edge] = []
        blocks: list[HookBlock] = []
        by_hook: dict[str, list[int]] = {}
        for ri, r in enumerate(receivers):
            by_hook.setdefault(r.hook, []).append(ri)
        for hook, ris in by_hook.items():
            r0 = receivers[ris[0]]
            senders = [si for si in range(n_senders) if _feeds(nodes[si], r0)]
            ids = torch.empty(len(senders), len(ris), dtype=torch.long)
            for k, ri in enumerate(ris):
                for j, si in enumerate(senders):
                    ids[j, k] = len(edges)
                    edges.append(Edge(f"{nodes[si].name}->{receivers[ri].name}", si, ri))
            heads = [receivers[ri].head for ri in ris] if r0.head is not None else None
            blocks.append(HookBlock(hook, r0.layer, ris, heads, senders, ids))
        # edges grouped by receiver, in forward order
        order = sorted(range(len(edges)), key=lambda e: (edges[e].receiver, edges[e].sender))
        remap = torch.empty(len(edges), dtype=torch.long)
        remap[torch.tensor(order)] = torch.arange(len(edges))
        edges = [edges[e] for e in order]
        blocks = [HookBlock(b.hook, b.layer, b.receivers, b.heads, b.senders, remap[b.edges])
                  for b in blocks]

        sender_hooks = [SenderHook("blocks.0.hook_resid_pre", -1, [0], False, None)]
        for l in range(n):
            ls1 = getattr(model.blocks[l], "ls1", None)
            scale = ls1.gamma.detach().clone() if ls1 is not None else None
            sender_hooks.append(SenderHook(f"blocks.{l}.attn.hook_z", l,
                                           [comps.index(f"a{l}.h{j}") for j in range(h)], True,
                                           scale, model.blocks[l].attn.W_O.detach().clone()))
            sender_hooks.append(SenderHook(f"blocks.{l}.hook_mlp_out", l, [comps.index(f"m{l}")],
                                           False, None))
        graph = cls(nodes, receivers, edges, parts, tuple(sorted(split_names)), n, h, layout,
                    comps, sender_hooks, blocks, torch.stack(masks),
                    meta={"model": cfg.source or "HookedViT"})
        graph._edge_index = {e.name: i for i, e in enumerate(edges)}
        graph._node_index = {nd.name: i for i, nd in enumerate(nodes)}
        return graph

    # ---- sizes and lookup --------------------------------------------------------------------
    @property
    def n_edges(self) -> int:
        return len(self.edges)

    @property
    def n_tokens(self) -> int:
        return self.layout.n_tokens

    @property
    def senders(self) -> list[GraphNode]:
        """Every node but the output."""
        return self.nodes[:-1]

    @property
    def output(self) -> GraphNode:
        return self.nodes[-1]

    @property
    def counts(self) -> dict[str, int]:
        kinds = [n.kind for n in self.nodes]
        return {"nodes": len(self.nodes), "heads": self.n_layers * self.n_heads,
                "mlps": self.n_layers, "token parts": sum(n.part is not None for n in self.nodes),
                "receivers": len(self.receivers), "edges": len(self.edges),
                "senders": len(kinds) - 1}

    def edge_index(self, name: str) -> int:
        """Index of the edge called ``name`` (``"a0.h1->a2.h3<q>"``)."""
        try:
            return self._edge_index[name]
        except KeyError:
            raise _unknown("edge", name, self._edge_index) from None

    def node_index(self, name: str) -> int:
        """Index of the node called ``name`` (``"a0.h1"``, ``"embed@marker"``, ``"logits"``)."""
        try:
            return self._node_index[name]
        except KeyError:
            raise _unknown("node", name, self._node_index) from None

    def edge_ids(self, edges: Sequence[str | int] | Tensor) -> Tensor:
        """Edge names or indices (or a boolean mask ``[n_edges]``) -> sorted unique indices."""
        if isinstance(edges, Tensor) and edges.dtype == torch.bool:
            if edges.shape != (self.n_edges,):
                raise InputError(f"An edge mask must have shape ({self.n_edges},), got "
                                 f"{tuple(edges.shape)}.")
            return torch.nonzero(edges).flatten()
        out = []
        for e in (edges.tolist() if isinstance(edges, Tensor) else edges):
            if isinstance(e, str):
                out.append(self.edge_index(e))
            elif isinstance(e, int) and not isinstance(e, bool) and 0 <= e < self.n_edges:
                out.append(e)
            else:
                raise InputError(f"{e!r} is not an edge of this graph: pass names like "
                                 f"{self.edges[0].name!r} or indices 0..{self.n_edges - 1}.")
        return torch.tensor(sorted(set(out)), dtype=torch.long)

    def senders_of(self, receiver: int) -> list[int]:
        """Sender node indices of the edges into receiver ``receiver``."""
        return [e.sender for e in self.edges if e.receiver == receiver]

    def edge_layers(self) -> Tensor:
        """``[n_edges]`` the block each edge's receiver sits in (``n_layers`` for the output)."""
        return torch.tensor([self.receivers[e.receiver].layer for e in self.edges])

    # ---- sender outputs ----------------------------------------------------------------------
    def component_outputs(self, acts: dict[str, Tensor]) -> Tensor:
        """``[C, B, pos, d_model]`` (component-major): every sender component's output as it is
        added to the residual stream, from activations captured at `sender_hook_names`."""
        return torch.cat([sh.to_residual(acts[sh.hook]) for sh in self.sender_hooks])

    def component_deltas(self, source: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
        """``[C, B, pos, d_model]``: ``component_outputs(source) - component_outputs(target)``
        in one allocation."""
        first = source[self.sender_hooks[0].hook]
        out = first.new_empty(len(self.components), first.shape[0], first.shape[1],
                              first.shape[-1])
        for sh in self.sender_hooks:
            lo, hi = sh.components[0], sh.components[-1] + 1
            out[lo:hi] = sh.to_residual(source[sh.hook] - target[sh.hook])
        return out

    @property
    def sender_hook_names(self) -> list[str]:
        return [sh.hook for sh in self.sender_hooks]

    @property
    def receiver_hook_names(self) -> list[str]:
        return [b.hook for b in self.blocks]

    # ---- views -------------------------------------------------------------------------------
    def to_pandas(self):
        """One row per edge: ``edge, sender, receiver, input, sender_layer, receiver_layer,
        tokens`` (the sender's token group, '' if not split)."""
        import pandas as pd

        rows = []
        for e in self.edges:
            s, r = self.nodes[e.sender], self.receivers[e.receiver]
            rows.append({"edge": e.name, "sender": s.name, "receiver": r.name, "input": r.input,
                         "sender_layer": s.layer, "receiver_layer": r.layer,
                         "tokens": s.part or ""})
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        c = self.counts
        split = ""
        if self.split:
            split = (f", {', '.join(self.split)} split by {len(self.parts)} token groups "
                     f"({', '.join(list(self.parts)[:4])}{', ...' if len(self.parts) > 4 else ''})")
        return (f"Graph({self.n_layers} layers x {self.n_heads} heads: {c['nodes']} nodes (embed, "
                f"{c['heads']} heads, {c['mlps']} MLPs, {self.output.name}{split}), "
                f"{c['receivers']} receivers (q/k/v per head, MLP inputs, {self.output.name}), "
                f"{c['edges']} edges)")


def check_model(model) -> None:
    """Refuse models whose heads do not each add their own output to the residual stream.

    With ``cfg.attn_norm`` (a LayerNorm over the concatenated head outputs before ``W_O``: timm
    Eva ``scale_attn_inner``, EVA02-CLIP's sub-LayerNorm) the attention output is
    ``LN([z_0, ..., z_H]) W_O``: the norm mixes the heads, so a head has no output of its own
    (``z_h W_O_h`` is not what it adds) and the per-head edges of the graph do not exist.
    Rotary position embeddings, q/k norms, gated MLPs, MLP sub-norms and LayerScale keep every
    node's output additive and are supported."""
    if getattr(model.cfg, "attn_norm", False):
        raise InputError(
            "Circuit discovery is not defined for this model: its attention normalises the "
            "concatenated head outputs before the output projection (cfg.attn_norm: a "
            "sub-LayerNorm inside attention, as in timm Eva scale_attn_inner / EVA02-CLIP), "
            "which mixes the heads, so a head has no output of its own to send along an edge. "
            "Use node-level tools instead (activation_patching on blocks.l.attn.hook_z or "
            "hook_attn_out, path_patching).")


def _feeds(sender: GraphNode, r: Receiver) -> bool:
    """Whether ``sender``'s output reaches receiver ``r`` through the residual stream."""
    if sender.kind == "embed" or r.input == "out":
        return True
    if r.input == "mlp":  # the MLP of layer l reads heads of layers <= l, MLPs of layers < l
        return sender.layer < r.layer or (sender.layer == r.layer and sender.kind == "head")
    return sender.layer < r.layer


def _token_parts(tokens, layout) -> dict[str, Tensor]:
    """``{group: token indices}``: the given groups (disjoint) plus ``"rest"``."""
    if tokens is None:
        return {}
    n = layout.n_tokens
    if isinstance(tokens, str):
        if tokens != "each":
            raise InputError(f"tokens= takes a dict {{name: selector}} or 'each', got {tokens!r}.")
        return {layout.label(t): torch.tensor([t]) for t in range(n)}
    if not isinstance(tokens, dict) or not tokens:
        raise InputError("tokens= takes a non-empty dict {name: token selector} (e.g. "
                         "{'marker': Rect(0, 1, 0, 1)}) or 'each'.")
    parts: dict[str, Tensor] = {}
    seen = torch.zeros(n, dtype=torch.bool)
    for name, sel in tokens.items():
        if not isinstance(name, str) or not name or "@" in name or name == "rest":
            raise InputError(f"Token group names are non-empty strings without '@' (and not "
                             f"'rest', which is added for the tokens left out); got {name!r}.")
        idx = resolve_tokens(sel, layout)
        idx = torch.arange(n) if idx is None else idx
        if seen[idx].any():
            overlap = [layout.label(int(t)) for t in idx[seen[idx]]][:5]
            raise InputError(f"Token group {name!r} overlaps an earlier group at {overlap}; "
                             "groups must be disjoint so that their edges partition the node.")
        seen[idx] = True
        parts[name] = idx
    if not seen.all():
        parts["rest"] = torch.nonzero(~seen).flatten()
    return parts


def _split_names(split, parts: dict[str, Tensor], comps: list[str]) -> set[str]:
    if not parts:
        if split not in (None, (), []):
            raise InputError("split= needs token groups: pass tokens={name: selector} too.")
        return set()
    if split is None:
        return {"embed"}
    if isinstance(split, str):
        split = comps if split == "all" else [split]
    names = set()
    for s in split:
        if s not in comps:
            raise _unknown("node", s, comps)
        names.add(s)
    return names


def _unknown(what: str, name: Any, known) -> InputError:
    known = list(known)
    hint = close_matches(str(name), known) if isinstance(name, str) else []
    near = f" Closest: {', '.join(hint)}." if hint else ""
    return InputError(f"Unknown {what} {name!r}.{near} This graph's {what}s look like "
                      f"{', '.join(known[:4])}, ... ({len(known)} in all).")


__all__ = ["check_model", "Graph", "GraphNode", "Receiver", "Edge", "HookBlock", "SenderHook"]
