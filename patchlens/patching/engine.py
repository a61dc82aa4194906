"""The patching engine: runs many variants (sets of site/intervention pairs) on one target batch.

Variants are stacked along the batch axis, grouped by the first layer they touch so that each
group starts from the unpatched residual stream at that layer (prefix reuse; variants that change
only the hook points of an SAE spliced at a block's output start from the SAE's input, skipping
that block: `patchlens.model.splice.resume_point`), split into chunks that fit a memory budget,
and patched by one vectorised hook per hook point. The engine
is the only place that installs hooks: it also captures activations and, on request, their
gradients with respect to a metric (`run_variants(..., grads=...)`, `capture`).

`run_variants` is four steps: `_validate` the arguments, `_plan` (resolve every site against
the hook schema, pick each variant's start layer and the chunks), run the reference inputs and
the shared prefix once, then `_execute` the chunks.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from patchlens.errors import InputError
from patchlens.metrics import check_metric_batch
from patchlens.model.capture import Capture, differentiable_input
from patchlens.model.hooks import HookSpec, required_options
from patchlens.model.splice import resume_point, run_after_splice
from patchlens.patching.checks import check_batch, check_metric_values
from patchlens.patching.interventions import Custom, Gather, Intervention, as_intervention
from patchlens.patching.sites import ResolvedSite, Site

Metric = Callable[[Tensor], Tensor]
CPU_MAX_ROWS = 64  # see benchmarks/patching.py and docs/performance.md


@dataclass
class Variant:
    """One patched run: ``pairs`` of (`Site`, intervention) applied together, and a label."""

    pairs: list[tuple[Site, Any]]
    label: Any = None
    meta: dict = field(default_factory=dict)


@dataclass
class EngineResult:
    """Outputs of `run_variants`.

    Attributes:
        outputs: ``[V, B]`` metric values, or ``[V, B, ...]`` model outputs without a metric.
        captured: ``{hook: [V, B, ...]}`` activations of the patched runs (``capture=`` and
            ``grads=`` hooks).
        start_layers: the block each variant's run started at (-1: from the image; a variant
            that changes only an SAE spliced at block ``L``'s output starts from the SAE's
            input and runs from block ``L + 1``: ``L + 1``).
        grads: ``{hook: [V, B, ...]}`` gradient of the summed metric with respect to the
            (patched) activation at each ``grads=`` hook.
        raw_outputs: ``[V, B, ...]`` model outputs next to the metric (``keep_outputs=True``).
    """

    outputs: Tensor | None
    captured: dict[str, Tensor]
    start_layers: list[int]
    grads: dict[str, Tensor] = field(default_factory=dict)
    raw_outputs: Tensor | None = None


@dataclass
class _Entry:
    slot: int          # position of the variant within its chunk
    index: int         # index of the variant in the whole sweep
    order: int         # position of the pair within the variant
    site: ResolvedSite
    user_site: Site
    intervention: Intervention


@dataclass
class _Plan:
    resolved: list[list[tuple[ResolvedSite, Site, Intervention]]]
    starts: list[int]
    flags: dict[str, bool]
    chunks: list[list[int]]
    layout: Any
    reads: list[str] = field(default_factory=list)  # hooks interventions read (`Intervention.reads`)
    resume: list[str | None] = field(default_factory=list)  # per variant: SAE splice it starts at


def parse_bytes(budget: str | int | float) -> int:
    """``"4GB"``, ``"512MB"``, ``2e9`` -> bytes."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        if not 0 < budget < float("inf"):
            raise InputError(f"memory_budget must be > 0 bytes, got {budget!r}.")
        return int(budget)
    m = re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*([KMGT]?)i?B?\s*", str(budget),
                     flags=re.IGNORECASE)
    if not m or not float(m.group(1)) > 0:
        raise InputError(f"Cannot read memory budget {budget!r}; use e.g. '4GB' or '512MB' "
                         "(more than 0 bytes).")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def bytes_per_row(model, n_tokens: int, explicit_attention: bool) -> int:
    """Estimated peak activation memory of one batch row in an inference forward pass."""
    cfg = model.cfg
    elem = next(model.parameters()).element_size()
    per_token = 8 * cfg.d_model + 3 * cfg.d_mlp
    attn = 3 * cfg.n_heads * n_tokens if explicit_attention else 0
    return elem * n_tokens * (per_token + attn)


def start_layer(model, spec: HookSpec) -> int:
    """First block a patched run must recompute for a hook (-1: from the image;
    ``n_layers``: only the pooling and head)."""
    if spec.stage == "embed":
        return -1
    if spec.stage == "head":
        return model.cfg.n_layers
    return spec.layer


def run_variants(
    model,
    x: Tensor,
    variants: Sequence[Variant],
    *,
    metric: Metric | None = None,
    return_type: str = "logits",
    capture: Sequence[str] = (),
    grads: Sequence[str] = (),
    keep_outputs: bool = False,
    batch_size: int | None = None,
    memory_budget: str | int | None = "2GB",
    prefix_reuse: bool = True,
    progress: bool | None = None,
    grad: bool = False,
    observers: Sequence[tuple[str, Callable[[str, Tensor, Tensor], None]]] = (),
    prefix: dict[int, Tensor] | None = None,
) -> EngineResult:
    """Run every variant on the target batch ``x`` ``[B, C, H, W]``.

    Args:
        metric: ``outputs [N, ...] -> [N]``; if given, ``outputs`` holds its values ``[V, B]``.
        return_type: passed to the model (``"logits"``, ``"pooled"``).
        capture: hook names whose (patched) activations are returned per variant.
        grads: hook names at which the gradient of ``metric`` (summed over the rows; each row
            depends only on its own activations) with respect to the patched activation is
            returned per variant (needs ``metric``). Computed with `torch.autograd.grad`:
            parameters' ``.grad`` are left as they were. Runs start no later than the first of
            these hooks.
        keep_outputs: with a metric, also return the model outputs (``raw_outputs``).
        batch_size: rows per forward pass (variants x images); overrides ``memory_budget``.
        memory_budget: bound on activation memory per forward pass (estimate); on CPU chunks
            are also capped at ``CPU_MAX_ROWS`` rows, which measured faster per row.
        prefix_reuse: start each variant at the first layer it touches.
        progress: tqdm bar (None: only when there is more than one chunk).
        grad: keep autograd on through the patched runs (for trainable interventions: the
            outputs and the ``capture=`` activations then carry the graph to the
            interventions' parameters).
        observers: ``(hook_name, fn)`` pairs; ``fn(hook_name, act, variant_indices)`` is called
            in every patched chunk with the activation at that hook after patching (``act``
            ``[len(variant_indices) * B, ...]``, variant-major; read-only) and the sweep
            indices of the chunk's variants. For statistics reduced inside the sweep's own run
            (e.g. `patchlens.diagnostics`); not called on the source or prefix runs.
        prefix: ``{layer: [B, pos, d_model]}`` the unpatched residual stream of ``x`` entering
            those blocks (``blocks.{layer}.hook_resid_pre``), computed earlier: runs that start
            there reuse it instead of running the shared prefix again (loops over one fixed
            batch, e.g. training an intervention).
    """
    capture, grads, observers = list(capture), list(grads), list(observers)
    _validate(model, x, variants, metric, capture, grads, observers, batch_size)
    prefix = _check_prefix(model, x, prefix)
    plan = _plan(model, x, variants, capture, grads, observers, prefix_reuse, batch_size,
                 memory_budget)
    differentiable = grad or bool(grads)
    with (torch.no_grad() if differentiable else torch.inference_mode()), \
            model.options(**plan.flags):
        sources = _reference_activations(model, plan.resolved, x.shape[0], batch_size)
        need = sorted({s for s, r in zip(plan.starts, plan.resume) if s >= 0 and r is None})
        base: dict[int | str, Tensor] = {s: prefix[s] for s in need if s in prefix}
        base.update(_base_residuals(model, x, [s for s in need if s not in prefix],
                                    sorted({r for r in plan.resume if r is not None})))
        # capture (and read) hooks that lie before a chunk's start layer hold the unpatched values
        early = [h for h in dict.fromkeys(capture + plan.reads)
                 if start_layer(model, model.hook_spec(h)) < max(plan.starts) and h not in grads]
        unpatched = _run_and_keep(model, x, early, x.shape[0]) if early else {}
    with model.options(**plan.flags):
        return _execute(model, x, variants, plan, sources, base, unpatched, metric=metric,
                        return_type=return_type, capture=capture, grads=grads,
                        keep_outputs=keep_outputs, grad=grad, progress=progress,
                        observers=observers)


# ---- step 1: validate -----------------------------------------------------------------------
def _validate(model, x, variants, metric, capture, grads, observers, batch_size) -> None:
    model.check_images(x)
    if x.shape[0] == 0:
        raise InputError("The target batch is empty (0 images); pass at least one image.")
    if len(variants) == 0:
        raise InputError("No variants to run: the selection is empty.")
    model.check_hook_names(capture + grads + [name for name, _ in observers])
    if metric is not None:
        check_metric_batch(metric, x.shape[0])
    if grads and metric is None:
        raise InputError("grads= needs a metric: the gradient of what? Pass metric=fn with "
                         "fn(outputs) -> one value per row.")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise InputError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    for v in variants:
        if not isinstance(v, Variant):
            raise InputError(f"run_variants takes Variant objects, got {type(v).__name__}.")
        for pair in v.pairs:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], Site)):
                raise InputError(f"A variant's pairs are (Site, intervention) tuples; got "
                                 f"{pair!r} in variant {v.label!r}.")


def _check_prefix(model, x, prefix) -> dict[int, Tensor]:
    if prefix is None:
        return {}
    out = {}
    for layer, resid in dict(prefix).items():
        n = model.cfg.n_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            raise InputError(f"prefix keys are block indices 0..{n - 1}, got {layer!r}.")
        want = (x.shape[0], model.layout_for(tuple(x.shape[-2:])).n_tokens, model.cfg.d_model)
        if not isinstance(resid, Tensor) or tuple(resid.shape) != want:
            got = tuple(resid.shape) if isinstance(resid, Tensor) else type(resid).__name__
            raise InputError(f"prefix[{layer}] must be the residual stream entering block {layer}, "
                             f"shape {want} for this batch; got {got}.")
        out[layer] = resid.detach()
    return out


# ---- step 2: plan ---------------------------------------------------------------------------
def _plan(model, x, variants, capture, grads, observers, prefix_reuse, batch_size,
          memory_budget) -> _Plan:
    b = x.shape[0]
    cfg = model.cfg
    grid = (x.shape[-2] // cfg.patch_size[0], x.shape[-1] // cfg.patch_size[1])
    layout = model.layout_for(tuple(x.shape[-2:]))
    n = cfg.n_layers
    grad_start = min((start_layer(model, model.hook_spec(h)) for h in grads), default=n)
    resolved, starts, resume = [], [], []
    for v in variants:
        resume.append(None)
        pairs = [(rs, site, iv) for site, raw in v.pairs
                 for iv in [as_intervention(raw)] for rs in site.resolve(model, grid)]
        for rs, site, _ in pairs:
            if rs.per_image and rs.tokens.shape[0] != b:
                raise InputError(f"{site!r} selects tokens per image for {rs.tokens.shape[0]} "
                                 f"images, but the target batch has {b}; pass one mask / Rect "
                                 "per target image.")
        resolved.append(pairs)
        first = min((start_layer(model, rs.spec) for rs, _, _ in pairs), default=n)
        starts.append(min(first, grad_start) if prefix_reuse else -1)
        point = _resume(model, pairs, grads, observers) if prefix_reuse else None
        if point is not None:
            resume[-1:] = [point[0]]
            starts[-1] = point[1]
    reads = _check_reads(model, resolved)
    hooks = ({rs.hook for pairs in resolved for rs, _, _ in pairs} | set(capture) | set(grads)
             | {name for name, _ in observers} | set(reads))
    flags = required_options(model.hook_spec(h) for h in sorted(hooks))

    explicit = any(rs.spec.has_key_axis for pairs in resolved for rs, _, _ in pairs)
    if batch_size is None:
        budget = parse_bytes("2GB" if memory_budget is None else memory_budget)
        rows = max(b, budget // max(1, bytes_per_row(model, layout.n_tokens, explicit)))
        if x.device.type == "cpu":  # measured: chunks beyond ~64 rows run slower per row on CPU
            rows = max(b, min(rows, CPU_MAX_ROWS))
    else:
        rows = max(b, batch_size)
    per_chunk = max(1, rows // b)
    chunks: list[list[int]] = []
    def group(i):
        return starts[i], resume[i] or ""

    for i in sorted(range(len(variants)), key=group):
        if chunks and group(chunks[-1][0]) == group(i) and len(chunks[-1]) < per_chunk:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return _Plan(resolved, starts, flags, chunks, layout, reads, resume)


def _resume(model, pairs, grads, observers) -> tuple[str, int] | None:
    """``(splice, block)`` when every site of a variant lies inside one SAE spliced at a
    block's output (`resume_point`) and nothing else must run in that block (no gradient or
    observer hook there, no intervention reading activations): the variant then starts from
    the SAE's input. None otherwise."""
    points = {resume_point(model, rs.hook) for rs, _, _ in pairs}
    if len(points) != 1 or None in points or any(iv.reads for _, _, iv in pairs):
        return None
    point = points.pop()
    for h in [*grads, *(name for name, _ in observers)]:
        if resume_point(model, h) != point and start_layer(model, model.hook_spec(h)) < point[1]:
            return None
    return point


def _check_reads(model, resolved) -> list[str]:
    """The hooks interventions read (`Intervention.reads`), checked against the model."""
    out: dict[str, None] = {}
    for pairs in resolved:
        for _, _, iv in pairs:
            if iv.reads:
                model.check_hook_names(list(iv.reads))
                out.update(dict.fromkeys(iv.reads))
    return list(out)


# ---- step 3: what every variant shares ------------------------------------------------------
def _reference_activations(model, resolved, target_batch: int, batch_size: int | None):
    """Run each reference input once, caching only the hooks its intervention is used at."""
    hooks_by_iv: dict[int, set[str]] = defaultdict(set)
    ivs: dict[int, Intervention] = {}
    for pairs in resolved:
        for rs, _, iv in pairs:
            if iv.reference is not None:
                hooks_by_iv[id(iv)].add(rs.hook)
                ivs[id(iv)] = iv
    out: dict[int, dict[str, Tensor]] = {}
    for key, hooks in hooks_by_iv.items():
        iv = ivs[key]
        ref = iv.reference
        try:
            model.check_images(ref)
        except InputError as e:
            raise InputError(f"The reference images of {iv!r}: {e}") from None
        specs = {h: model.hook_spec(h) for h in hooks}
        acts = _run_and_keep(model, ref, sorted(hooks), batch_size or 64)
        out[key] = iv.prepare(acts, target_batch, specs)
    return out


def _run_and_keep(model, x: Tensor, hooks: list[str], step: int) -> dict[str, Tensor]:
    """The activations at ``hooks`` on ``x``, in chunks of ``step`` images, stopping after the
    last block the hooks need (no head or later blocks)."""
    n = model.cfg.n_layers
    specs = [model.hook_spec(h) for h in hooks]
    last = max(s.layer for s in specs) if all(s.stage == "block" for s in specs) else n
    stop = last + 1 if last + 1 < n else None
    parts: dict[str, list[Tensor]] = defaultdict(list)
    for i in range(0, x.shape[0], step):
        cap = Capture(hooks)
        with model.hooks(fwd_hooks=cap.hooks()):
            model(x[i : i + step], return_type=None, stop_at_layer=stop)
        for h in hooks:
            parts[h].append(cap.acts[h])
    return {h: torch.cat(p) for h, p in parts.items()}


def _base_residuals(model, x: Tensor, layers: list[int],
                    splices: Sequence[str] = ()) -> dict[int | str, Tensor]:
    """The unpatched residual stream entering each block in ``layers`` (n_layers: after the
    last block) and the input of each SAE spliced at ``splices`` (its hook point's
    activation), from one forward pass."""
    if not layers and not splices:
        return {}
    n = model.cfg.n_layers
    names: dict[int | str, str] = {
        l: (f"blocks.{l}.hook_resid_pre" if l < n else f"blocks.{n - 1}.hook_resid_post")
        for l in layers}
    names.update({h: h for h in splices})
    stop = max([l + 1 for l in layers] + [model.hook_spec(h).layer + 1 for h in splices])
    cap = Capture(list(dict.fromkeys(names.values())))
    with model.hooks(fwd_hooks=cap.hooks()):
        last = model(x, return_type=None, stop_at_layer=min(stop, n))
    out = {l: cap.acts[name] for l, name in names.items()}
    if n in out:  # what the head reads: the blocks' output (after an SAE spliced at the last
        out[n] = last  # resid_post, whose hook point holds the SAE's input)
    return out


# ---- step 4: execute ------------------------------------------------------------------------
def _execute(model, x, variants, plan: _Plan, sources, base, unpatched, *, metric, return_type,
             capture, grads, keep_outputs, grad, progress, observers) -> EngineResult:
    b = x.shape[0]
    outputs: Tensor | None = None
    raw: Tensor | None = None
    captured: dict[str, Tensor] = {}
    grad_out: dict[str, Tensor] = {}
    differentiable = grad or bool(grads)
    bar = _progress(len(variants), progress, len(plan.chunks))
    try:
        for chunk in plan.chunks:
            s, via = plan.starts[chunk[0]], plan.resume[chunk[0]]
            entries = [_Entry(slot, vi, k, rs, site, iv)
                       for slot, vi in enumerate(chunk)
                       for k, (rs, site, iv) in enumerate(plan.resolved[vi])]
            live = _live_reads(model, entries, s, unpatched, len(chunk), differentiable)
            hooks = _patch_hooks(model, entries, b, plan.layout, sources, live.acts)
            hooks += live.hooks()
            keep = Capture([h for h in capture if h not in grads], clone=True, keep_graph=grad)
            keep_grad = Capture(grads, keep_graph=True)
            hooks += keep.hooks() + keep_grad.hooks()
            if observers:
                hooks += _observer_hooks(observers, torch.tensor(chunk))
            if via is not None:  # from the input of an SAE spliced at a block's output
                inp = base[via].repeat(len(chunk), 1, 1)
            elif s < 0:
                inp, kwargs = x.repeat(len(chunk), 1, 1, 1), {}
            else:
                inp, kwargs = base[s].repeat(len(chunk), 1, 1), {"start_at_layer": s}
            if grads:
                inp = differentiable_input(inp)
            mode = torch.enable_grad() if differentiable else torch.inference_mode()
            with mode, model.hooks(fwd_hooks=hooks):
                if via is not None:
                    out = run_after_splice(model, via, inp, return_type=return_type)
                else:
                    out = model(inp, return_type=return_type, **kwargs)
                labels = [variants[i].label for i in chunk]
                values = _apply_metric(metric, out, len(chunk), b, labels)
                chunk_grads = keep_grad.gradients(values.sum()) if grads else {}
            if values is not None:  # None with return_type=None and no metric
                if not grad:
                    values = values.detach()
                if outputs is None:
                    outputs = values.new_empty((len(variants), *values.shape[1:]))
                outputs[chunk] = values
            if keep_outputs and metric is not None:
                if raw is None:
                    raw = out.new_empty((len(variants), b, *out.shape[1:]))
                raw[chunk] = out.detach().reshape(len(chunk), b, *out.shape[1:])
            for name, act in list(keep.acts.items()) + list(keep_grad.detached().items()):
                _store(captured, name, act, chunk, len(variants), b)
            for name in keep.names:
                if name not in keep.acts:  # before this chunk's start: never patched here
                    act = unpatched[name].repeat(len(chunk), *[1] * (unpatched[name].ndim - 1))
                    _store(captured, name, act, chunk, len(variants), b)
            for name, g in chunk_grads.items():
                _store(grad_out, name, g, chunk, len(variants), b)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return EngineResult(outputs, captured, plan.starts, grad_out, raw)


def _store(sink: dict[str, Tensor], name: str, act: Tensor, chunk: list[int], n_var: int,
           b: int) -> None:
    if name not in sink and chunk == list(range(n_var)):  # one chunk, in order: no copy
        sink[name] = act.reshape(n_var, b, *act.shape[1:])
        return
    if name not in sink:
        sink[name] = act.new_zeros((n_var, b, *act.shape[1:]))
    sink[name][chunk] = act.reshape(len(chunk), b, *act.shape[1:])


def _progress(total: int, progress: bool | None, n_chunks: int):
    if progress is False or (progress is None and n_chunks <= 1):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="patching", unit="variant", leave=False)


def _apply_metric(metric: Metric | None, out: Tensor | None, n_var: int, b: int,
                  labels) -> Tensor | None:
    if metric is None:
        return None if out is None else out.reshape(n_var, b, *out.shape[1:])
    if out is None:
        raise InputError("A metric needs the model's output; return_type=None returns none.")
    values = check_metric_values(metric(out), out.shape[0], "per row")
    if not torch.isfinite(values).all():
        bad = [labels[i // b] for i in torch.nonzero(~torch.isfinite(values)).flatten().tolist()]
        raise InputError(f"The metric returned a non-finite value for variant(s) {bad[:5]}.")
    return values.reshape(n_var, b)


def _live_reads(model, entries: list[_Entry], start: int, unpatched: dict[str, Tensor],
                n_chunk: int, differentiable: bool) -> Capture:
    """Keeps what the chunk's interventions read (`Intervention.reads`): a `Capture` of the read
    hooks that fire in this run, pre-filled with the unpatched values of those before ``start``."""
    reads = list(dict.fromkeys(h for e in entries for h in e.intervention.reads))
    early = [h for h in reads if start_layer(model, model.hook_spec(h)) < start]
    cap = Capture([h for h in reads if h not in early], keep_graph=differentiable)
    for h in early:
        cap.acts[h] = unpatched[h].repeat(n_chunk, *[1] * (unpatched[h].ndim - 1))
    return cap


def _patch_hooks(model, entries: list[_Entry], b: int, layout, sources,
                 live: dict[str, Tensor] | None = None):
    """One hook function per patched hook point, applying its entries in vectorised groups."""
    by_hook: dict[str, list[_Entry]] = defaultdict(list)
    for e in entries:
        by_hook[e.site.hook].append(e)
    sizes = {"token": layout.n_tokens, "head": model.cfg.n_heads}
    hooks = []
    for name, group in by_hook.items():
        keyed: dict[tuple, list[_Entry]] = defaultdict(list)
        for e in group:
            rs = e.site
            key = (e.order, id(e.intervention),
                   None if rs.tokens is None else tuple(rs.tokens.shape),
                   None if rs.heads is None else len(rs.heads),
                   None if rs.features is None else len(rs.features))
            keyed[key].append(e)
        plans = [(_gather(es, b, sizes, live if es[0].intervention.reads else None), es)
                 for es in keyed.values()]
        hooks.append((name, _make_hook(plans, sources)))
    return hooks


def _gather(es: list[_Entry], b: int, sizes: dict[str, int],
            live: dict[str, Tensor] | None = None) -> Gather:
    """The `Gather` of a group of entries that share an intervention and selection sizes."""
    spec = es[0].site.spec
    ar = torch.arange(b)
    rows = torch.stack([e.slot * b + ar for e in es])
    images = ar.expand(len(es), b)
    variants = torch.tensor([e.index for e in es]).view(-1, 1).expand(-1, b)
    features = es[0].site.features is not None
    indexed = [a for a in (spec.token_axis, spec.head_axis,
                           spec.feature_axis if features else None) if a is not None]
    selections = []
    valid = None
    for axis in range(1, max(indexed, default=0) + 1):
        if axis == spec.token_axis:
            picks = [e.site.tokens for e in es]
            full = sizes["token"]
            if es[0].site.per_image:  # [E, B, k] and which entries are real
                valid = torch.stack([e.site.token_valid for e in es])
                if bool(valid.all()):
                    valid = None
        elif axis == spec.head_axis:
            picks = [e.site.heads for e in es]
            full = sizes["head"]
        elif axis == spec.feature_axis:
            picks = [e.site.features for e in es]
            full = None
        else:
            raise InputError(f"Cannot select at {spec.describe()}: axis {spec.axes[axis]!r} "
                             "lies before a token or head axis.")
        selections.append((axis, torch.stack([torch.arange(full) if p is None else p
                                              for p in picks])))
    return Gather(rows, images, variants, tuple(selections), spec, token_valid=valid,
                  live=live)


def _observer_hooks(observers, chunk: Tensor):
    def make(fn):
        def observe(act, hook):
            fn(hook.name, act.detach(), chunk)
        return observe

    return [(name, make(fn)) for name, fn in observers]


def _check_bounds(gather: Gather, act: Tensor) -> None:
    """Selections must fit the activation (feature widths are only known at run time)."""
    for axis, sel in gather.selections:
        if sel.numel() and int(sel.max()) >= act.shape[axis]:
            raise InputError(
                f"Index {int(sel.max())} on axis {gather.spec.axes[axis]!r} of {gather.hook} is "
                f"out of range: that axis has {act.shape[axis]} entries."
            )


def _make_hook(plans, sources):
    def hook_fn(act: Tensor, hook) -> Tensor:
        for gather, es in plans:
            _check_bounds(gather, act)
            if act.device != gather.rows.device:
                gather = gather.to(act.device)
            idx = gather.index(gather.rows)
            selected = act[idx]
            iv = es[0].intervention
            src = sources.get(id(iv), {}).get(gather.hook) if iv.reference is not None else None
            if isinstance(iv, Custom):
                new = _apply_custom(iv, selected, gather, es, hook, src)
            else:
                new = iv.values(selected, gather, src)
                if new.shape != selected.shape:
                    raise InputError(
                        f"{iv!r} returned shape {tuple(new.shape)} for a selection of shape "
                        f"{tuple(selected.shape)} at {gather.hook}."
                    )
            written = gather.written(selected)
            if written is None:
                act = act.index_put(idx, new.to(act.dtype))
            else:  # per-image selections: only the real (unpadded) entries
                full = [i.expand(written.shape) for i in idx]
                act = act.index_put(tuple(i[written] for i in full), new[written].to(act.dtype))
        return act

    return hook_fn


def _apply_custom(iv: Custom, selected: Tensor, gather: Gather, es: list[_Entry], hook,
                  src: Tensor | None) -> Tensor:
    """A `Custom` intervention, called per variant (and, for a per-image token selection,
    per image with that image's real tokens only)."""
    source = gather.take_source(src).to(selected.dtype) if src is not None else None
    if gather.token_valid is None:
        return torch.stack([iv.apply_one(selected[i], hook, e.user_site,
                                         None if source is None else source[i])
                            for i, e in enumerate(es)])
    j = [a for a, _ in gather.selections].index(gather.spec.token_axis)
    new = selected.clone()
    counts = gather.token_valid.sum(-1)  # [E, B]: real entries come first
    for i, e in enumerate(es):
        for b in range(selected.shape[1]):
            k = int(counts[i, b])
            part = selected[i, b:b + 1].narrow(1 + j, 0, k)
            src_part = None if source is None else source[i, b:b + 1].narrow(1 + j, 0, k)
            new[i, b:b + 1].narrow(1 + j, 0, k).copy_(
                iv.apply_one(part, hook, e.user_site, src_part))
    return new


# ---- one run, activations and gradients -------------------------------------------------------
@dataclass
class CaptureResult:
    """What `capture` returns.

    Attributes:
        output: ``[B, ...]`` the model output (``return_type``; None for None), detached.
        values: ``[B]`` the metric on it (None without a metric).
        acts: ``{hook: [B, ...]}`` the activations (after the ``pairs``' interventions).
        grads: ``{hook: [B, ...]}`` ``d sum(values) / d act`` (with ``grads=True``).
    """

    output: Tensor | None
    values: Tensor | None
    acts: dict[str, Tensor]
    grads: dict[str, Tensor]


def capture(model, x: Tensor, hooks: Sequence[str], metric: Metric | None = None, *,
            grads: bool | Sequence[str] = False, pairs: Sequence[tuple[Site, Any]] = (),
            return_type: str | None = "logits", batch_size: int | None = None) -> CaptureResult:
    """One forward pass of ``x`` ``[B, C, H, W]`` (with the (site, intervention) ``pairs``
    applied, if any) keeping the activations at ``hooks`` and, with ``grads=True`` (or a list
    of some of the hooks), the gradient of ``metric(output).sum()`` with respect to each of
    them (one backward pass; rows are independent, so each image's gradient is its own).
    ``batch_size`` splits ``x`` into chunks of that many images. Parameters' ``.grad`` are
    left untouched."""
    hooks = list(dict.fromkeys(hooks))
    grad_hooks = hooks if grads is True else list(grads or ())
    hooks += [h for h in grad_hooks if h not in hooks]
    if grad_hooks and metric is None:
        raise InputError("capture(..., grads=...) needs a metric to differentiate.")
    check_batch(model, x, "x")
    step = x.shape[0] if batch_size is None else batch_size
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise InputError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    parts: list[EngineResult] = []
    for i in range(0, x.shape[0], step):
        parts.append(run_variants(
            model, x[i : i + step], [Variant(list(pairs), "run")], metric=metric,
            return_type=return_type, capture=hooks, grads=grad_hooks,
            keep_outputs=True, prefix_reuse=False, progress=False))

    def cat(get):
        return get(parts[0])[0] if len(parts) == 1 else torch.cat([get(p)[0] for p in parts])

    output = (None if return_type is None
              else cat(lambda p: p.raw_outputs if metric is not None else p.outputs))
    values = cat(lambda p: p.outputs) if metric is not None else None
    acts = {h: cat(lambda p, h=h: p.captured[h]) for h in hooks}
    grad_d = {h: cat(lambda p, h=h: p.grads[h]) for h in grad_hooks}
    return CaptureResult(output, values, acts, grad_d)


def capture_grads(model, x: Tensor, hooks: Sequence[str], metric: Metric,
                  **kwargs: Any) -> CaptureResult:
    """`capture` with ``grads=True``: activations and ``d sum(metric) / d activation``."""
    return capture(model, x, hooks, metric, grads=True, **kwargs)


def natural_activations(model, x: Tensor, hooks: Sequence[str],
                        batch_size: int = 64) -> dict[str, Tensor]:
    """The unpatched activations ``{hook: [B, ...]}`` of ``x`` at ``hooks``, without autograd
    (usable in later differentiable runs), in chunks of ``batch_size`` images, stopping after
    the last block the hooks need."""
    hooks = list(dict.fromkeys(hooks))
    model.check_images(x)
    model.check_hook_names(hooks)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    with torch.no_grad(), model.options(**model.options_for(hooks)):
        return _run_and_keep(model, x, hooks, batch_size)


__all__ = ["Variant", "EngineResult", "CaptureResult", "run_variants", "capture",
           "capture_grads", "natural_activations", "parse_bytes", "start_layer"]
