"""Path patching: the effect of a sender component on receivers, through the direct path only.

Wang et al. 2022 (Interpretability in the Wild, appendix B); Goldowsky-Dill et al. 2023:
1. run the clean and corrupted inputs and cache the senders;
2. run the clean input with every attention head's output (and, unless ``mlps="recompute"``,
   every MLP's output) frozen to its clean value, except the sender, which takes its corrupted
   value; cache the receivers' inputs;
3. run the clean input with only the receivers' inputs patched to those values; measure.
Both the second and third steps run every sender as a batched engine sweep.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from patchlens.checks import check_bool
from patchlens.errors import InputError
from patchlens.metrics import Recovery, base_metric, metric_name, recovery_denominator
from patchlens.patching.engine import Variant, run_variants
from patchlens.patching.interventions import Interchange, PerVariant
from patchlens.patching.results import PatchResult
from patchlens.patching.sites import Site
from patchlens.recipes.common import baseline_metrics, check_choice, check_pair, check_reference

SENDER_KINDS = ("z", "attn_out", "mlp_out", "embed")
RECEIVER_KINDS = ("q", "k", "v", "mlp_in", "resid_final")


@dataclass(frozen=True)
class Node:
    """A component in a path: a sender (``"z"`` one head's output, ``"attn_out"``,
    ``"mlp_out"``, ``"embed"``) or a receiver (``"q"|"k"|"v"`` one head's query/key/value
    input, ``"mlp_in"``, ``"resid_final"`` = the residual stream feeding the final norm and
    head). ``tokens`` restricts it with the selectors of `Site`."""

    kind: str
    layer: int | None = None
    head: int | None = None
    tokens: Any = "all"

    def __post_init__(self) -> None:
        if self.kind not in SENDER_KINDS + RECEIVER_KINDS:
            raise InputError(f"Unknown node kind {self.kind!r}; senders are {SENDER_KINDS}, "
                             f"receivers are {RECEIVER_KINDS}.")
        for what, v in (("layer", self.layer), ("head", self.head)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise InputError(f"Node({self.kind!r}) {what} must be an int, got {v!r}.")
        needs_layer = self.kind not in ("embed", "resid_final")
        if needs_layer and self.layer is None:
            raise InputError(f"Node({self.kind!r}) needs a layer.")
        if self.kind in ("z", "q", "k", "v") and self.head is None:
            raise InputError(f"Node({self.kind!r}, {self.layer}) needs a head.")

    def __str__(self) -> str:
        if self.kind in ("embed", "resid_final"):
            return self.kind
        if self.head is not None:
            return f"{self.kind}{self.layer}.{self.head}"
        return f"{self.kind}{self.layer}"

    def site(self, model) -> Site:
        """The hook where this node is read (sender) or written (receiver)."""
        n = model.cfg.n_layers
        _check_range(self, model)
        hook, heads = {
            "z": ("z", self.head), "attn_out": ("attn_out", None), "mlp_out": ("mlp_out", None),
            "embed": ("embed", None), "q": ("q_input", self.head), "k": ("k_input", self.head),
            "v": ("v_input", self.head), "mlp_in": (f"blocks.{self.layer}.ln2.hook_normalized", None),
            "resid_final": (f"blocks.{n - 1}.hook_resid_post", None),
        }[self.kind]
        layers = self.layer if self.layer is not None else "all"
        return Site(hook, layers=layers, tokens=self.tokens, heads=heads)

    @property
    def order(self) -> float:
        """Position in the forward pass (receivers at layer l read before its heads write)."""
        if self.kind == "embed":
            return -1.0
        if self.kind == "resid_final":
            return float("inf")
        return self.layer + {"q": 0.0, "k": 0.0, "v": 0.0, "z": 0.5, "attn_out": 0.5,
                             "mlp_in": 0.6, "mlp_out": 0.7}[self.kind]


def _check_range(node: Node, model) -> None:
    n, h = model.cfg.n_layers, model.cfg.n_heads
    if node.layer is not None and not 0 <= node.layer < n:
        raise InputError(f"{node}: layer {node.layer} is out of range (the model has {n} layers).")
    if node.head is not None and not 0 <= node.head < h:
        raise InputError(f"{node}: head {node.head} is out of range (the model has {h} heads).")


def all_heads(model) -> list[Node]:
    """Every attention head as a sender, layer-major."""
    return [Node("z", layer, head) for layer in range(model.cfg.n_layers)
            for head in range(model.cfg.n_heads)]


def all_heads_and_mlps(model) -> list[Node]:
    """Every head and every MLP as senders, in forward order."""
    out = []
    for layer in range(model.cfg.n_layers):
        out += [Node("z", layer, h) for h in range(model.cfg.n_heads)] + [Node("mlp_out", layer)]
    return out


def path_patching(
    model,
    clean: Tensor,
    corrupted: Tensor,
    senders: Node | Sequence[Node],
    receivers: Node | Sequence[Node],
    metric: Callable[[Tensor], Tensor],
    *,
    direction: Literal["noising", "denoising"] = "noising",
    mlps: Literal["frozen", "recompute"] = "frozen",
    combine: Literal["joint", "separate"] = "joint",
    normalize: bool = False,
    batch_size: int | None = None,
    memory_budget: str | int | None = "2GB",
    progress: bool | None = None,
    diagnose: Any = None,
) -> PatchResult:
    """Effect of each sender on the receivers through the direct path (Wang et al. 2022).

    Args:
        senders: one `Node` or a list (e.g. `all_heads(model)`); a full layer x head grid of
            heads gives a result with axes (layer, head), otherwise an axis ``sender``.
        receivers: one `Node` or a list; ``combine="joint"`` patches them together (the
            paper's set of receivers), ``"separate"`` adds a ``receiver`` axis.
        direction: ``"noising"`` (the paper: clean run, sender takes its corrupted value) or
            ``"denoising"`` (corrupted run, sender takes its clean value).
        mlps: ``"frozen"`` (MLP outputs frozen like heads: only the direct path counts) or
            ``"recompute"`` (MLPs recomputed: paths through MLPs count too).
        normalize: report normalised recovery ``(m - m_corrupted) / (m_clean - m_corrupted)``
            (as with a `patchlens.metrics.recovery` metric), so effects are divided by
            ``m_clean - m_corrupted``.

    Returns:
        `PatchResult`: ``values`` the patched metric (step 3's run), ``baseline [batch]`` the
        unpatched target run's metric, ``effects`` = values − baseline (what ``repr``,
        ``top`` and ``plot`` show), ``per_example [batch, *axes]``.
    """
    senders, receivers = _validate(model, clean, corrupted, senders, receivers, direction, mlps,
                                   combine, diagnose, normalize)
    target, other = (clean, corrupted) if direction == "noising" else (corrupted, clean)
    m_clean, m_corrupted = baseline_metrics(model, clean, corrupted, metric)
    m_base = m_clean if direction == "noising" else m_corrupted
    groups = [receivers] if combine == "joint" else [[r] for r in receivers]
    engine = dict(batch_size=batch_size, memory_budget=memory_budget, progress=progress)
    step2 = _sender_variants(model, senders, target, other, direction, mlps)
    effects = _receiver_effects(model, senders, groups, step2, target, metric, m_base, engine)
    normalized = isinstance(metric, Recovery) or normalize
    patched = effects + m_base
    if normalized:  # normalised recovery: (m - m_corrupted) / (m_clean - m_corrupted)
        denom = recovery_denominator(m_clean, m_corrupted)
        patched = effects / denom + (m_base - m_corrupted) / denom
        m_base = (m_base - m_corrupted) / denom
    axes, labels, coords, per_example = _sender_axes(model, senders, groups, patched)
    result = PatchResult(
        per_example.mean(0), axes, labels, per_example=per_example, clean=m_clean,
        corrupted=m_corrupted, baseline=m_base, coords=coords,
        layout=model.layout_for(tuple(clean.shape[-2:])), images=model.to_image(clean).cpu(),
        meta={"recipe": "path patching", "direction": direction, "mlps": mlps,
              "receivers": ", ".join(str(r) for r in receivers), "metric": metric_name(metric),
              "normalized": bool(normalized)},
    )
    if diagnose is not None:
        from patchlens.diagnostics.diagnose import diagnose_sweep

        result.divergence = diagnose_sweep(model, target, step2, diagnose, result)
    return result


def _validate(model, clean, corrupted, senders, receivers, direction, mlps, combine, diagnose,
              normalize):
    check_pair(model, clean, corrupted)
    for what, nodes in (("senders", senders), ("receivers", receivers)):
        if not isinstance(nodes, (Node, list, tuple)):
            raise InputError(f"{what} must be a Node or a list of Nodes, got {nodes!r}.")
    senders = [senders] if isinstance(senders, Node) else list(senders)
    receivers = [receivers] if isinstance(receivers, Node) else list(receivers)
    if not senders or not receivers:
        raise InputError("path_patching needs at least one sender and one receiver.")
    for node in senders + receivers:
        if not isinstance(node, Node):
            raise InputError(f"Senders and receivers are Node objects, got {node!r}.")
    for node in senders:
        if node.kind not in SENDER_KINDS:
            raise InputError(f"{node} cannot be a sender; senders are {SENDER_KINDS}.")
    for node in receivers:
        if node.kind not in RECEIVER_KINDS:
            raise InputError(f"{node} cannot be a receiver; receivers are {RECEIVER_KINDS}.")
    check_choice("direction", direction, ("noising", "denoising"))
    check_choice("mlps", mlps, ("frozen", "recompute"))
    check_choice("combine", combine, ("joint", "separate"))
    check_reference(diagnose)
    check_bool("normalize", normalize)
    return senders, receivers


def _sender_variants(model, senders, target, other, direction, mlps) -> list[Variant]:
    """Step 2: one variant per sender; every head (and MLP, if frozen) downstream of it frozen
    to the target run, the sender taking the other run's value."""
    n = model.cfg.n_layers
    freeze_target = Interchange(target, "frozen")
    from_other = Interchange(other, "corrupted" if direction == "noising" else "clean")
    step2 = []
    for s in senders:
        first = 0 if s.kind == "embed" else s.layer
        pairs = [(Site("z", layers=range(first, n)), freeze_target)]
        if mlps == "frozen":
            pairs.append((Site("mlp_out", layers=range(first, n)), freeze_target))
        pairs.append((s.site(model), from_other))
        step2.append(Variant(pairs, str(s)))
    return step2


def _receiver_effects(model, senders, groups, step2, target, metric, m_base, engine) -> Tensor:
    """Steps 2 and 3: run the sender variants capturing the receivers' inputs, then replay
    those inputs into the target run, per receiver group; effects ``[S, G, B]``."""
    receiver_sites = [[r.site(model) for r in g] for g in groups]
    capture = sorted({rs.hook for g in receiver_sites for s in g for rs in s.resolve(model)})
    res2 = run_variants(model, target, step2, capture=capture, **engine)
    effects = torch.zeros(len(senders), len(groups), target.shape[0], dtype=m_base.dtype)
    for gi, (group, sites) in enumerate(zip(groups, receiver_sites)):
        live = [i for i, s in enumerate(senders) if any(r.order > s.order for r in group)]
        if not live:
            continue
        replay = PerVariant({h: v[live] for h, v in res2.captured.items()})
        step3 = [Variant([(site, replay) for site in sites], str(senders[i])) for i in live]
        res3 = run_variants(model, target, step3, metric=base_metric(metric), **engine)
        effects[live, gi] = res3.outputs.to(effects.dtype) - m_base
    return effects


def _sender_axes(model, senders, groups, effects):
    """(layer, head) axes for a full grid of head senders, else a ``sender`` axis."""
    n, h = model.cfg.n_layers, model.cfg.n_heads
    sep = len(groups) > 1
    rec_labels = [" + ".join(str(r) for r in g) for g in groups]
    heads = [s for s in senders if s.kind == "z" and s.tokens == "all"]
    layers = sorted({s.layer for s in heads})
    grid = len(heads) == len(senders) == len(layers) * h and \
        [(s.layer, s.head) for s in senders] == [(layer, j) for layer in layers for j in range(h)]
    b = effects.shape[-1]
    if grid:
        per = effects.reshape(len(layers), h, len(groups), b)
        axes = ("layer", "head")
        labels = {"layer": [str(layer) for layer in layers], "head": [str(j) for j in range(h)]}
        coords = {"layer": layers, "head": list(range(h))}
    else:
        per = effects
        axes = ("sender",)
        labels = {"sender": [str(s) for s in senders]}
        coords = {"sender": list(range(len(senders)))}
    if sep:
        axes = axes + ("receiver",)
        labels["receiver"] = rec_labels
        coords["receiver"] = list(range(len(groups)))
    else:
        per = per.squeeze(-2)
    del n
    return axes, labels, coords, per.movedim(-1, 0)  # batch first
