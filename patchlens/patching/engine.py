"""The patching engine: runs many variants (sets of site/intervention pairs) on one target batch.

Variants are stacked along the batch axis, grouped by the first layer they touch so that each
group starts from the unpatched residual stream at that layer (prefix reuse), split into
chunks that fit a memory budget, and patched by one vectorised hook per hook point.
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
from patchlens.patching.interventions import Custom, Gather, Intervention, as_intervention
from patchlens.patching.sites import ResolvedSite, Site, options_for

Metric = Callable[[Tensor], Tensor]
_LAYER_OF = re.compile(r"blocks\.(\d+)\.")
CPU_MAX_ROWS = 64  # see benchmarks/patching.py and docs/performance.md
_POST_BLOCK_HOOKS = ("hook_pooled", "hook_pooled_dist", "hook_logits", "ln_final.hook_scale",
                     "ln_final.hook_normalized")


@dataclass
class Variant:
    """One patched run: ``pairs`` of (`Site`, intervention) applied together, and a label."""

    pairs: list[tuple[Site, Any]]
    label: Any = None
    meta: dict = field(default_factory=dict)


@dataclass
class _Entry:
    slot: int          # position of the variant within its chunk
    index: int         # index of the variant in the whole sweep
    order: int         # position of the pair within the variant
    site: ResolvedSite
    user_site: Site
    intervention: Intervention


@dataclass
class EngineResult:
    """Outputs of `run_variants`: ``outputs [V, B, ...]`` (metric values or model outputs)
    and, if asked, ``captured[hook] [V, B, ...]`` activations of the patched runs."""

    outputs: Tensor
    captured: dict[str, Tensor]
    start_layers: list[int]


def parse_bytes(budget: str | int | float) -> int:
    """``"4GB"``, ``"512MB"``, ``2e9`` -> bytes."""
    if isinstance(budget, (int, float)):
        return int(budget)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)i?B?\s*", str(budget), flags=re.IGNORECASE)
    if not m:
        raise InputError(f"Cannot read memory budget {budget!r}; use e.g. '4GB' or '512MB'.")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def bytes_per_row(model, n_tokens: int, explicit_attention: bool) -> int:
    """Estimated peak activation memory of one batch row in an inference forward pass."""
    cfg = model.cfg
    elem = next(model.parameters()).element_size()
    per_token = 8 * cfg.d_model + 3 * cfg.d_mlp
    attn = 3 * cfg.n_heads * n_tokens if explicit_attention else 0
    return elem * n_tokens * (per_token + attn)


def start_layer(model, site: ResolvedSite) -> int:
    """First block a patched run must recompute for this site (-1: from the image)."""
    if site.layer is not None:
        return site.layer
    if site.hook in _POST_BLOCK_HOOKS:
        return model.cfg.n_layers
    return -1


def run_variants(
    model,
    x: Tensor,
    variants: Sequence[Variant],
    *,
    metric: Metric | None = None,
    return_type: str = "logits",
    capture: Sequence[str] = (),
    batch_size: int | None = None,
    memory_budget: str | int | None = "2GB",
    prefix_reuse: bool = True,
    progress: bool | None = None,
    grad: bool = False,
    observers: Sequence[tuple[str, Callable[[str, Tensor, Tensor], None]]] = (),
) -> EngineResult:
    """Run every variant on the target batch ``x`` ``[B, C, H, W]``.

    Args:
        metric: ``outputs [N, ...] -> [N]``; if given, ``outputs`` holds its values ``[V, B]``.
        return_type: passed to the model (``"logits"``, ``"pooled"``).
        capture: hook names whose (patched) activations are returned per variant.
        batch_size: rows per forward pass (variants x images); overrides ``memory_budget``.
        memory_budget: bound on activation memory per forward pass (estimate); on CPU chunks
            are also capped at ``CPU_MAX_ROWS`` rows, which measured faster per row.
        prefix_reuse: start each variant at the first layer it touches.
        progress: tqdm bar (None: only when there is more than one chunk).
        grad: keep autograd on (for users who differentiate through patched runs).
        observers: ``(hook_name, fn)`` pairs; ``fn(hook_name, act, variant_indices)`` is called
            in every patched chunk with the activation at that hook after patching (``act``
            ``[len(variant_indices) * B, ...]``, variant-major; read-only) and the sweep
            indices of the chunk's variants. For statistics reduced inside the sweep's own run
            (e.g. `patchlens.diagnostics`); not called on the source or prefix runs.
    """
    model.check_images(x)
    if len(variants) == 0:
        raise InputError("No variants to run: the selection is empty.")
    b = x.shape[0]
    grid = (x.shape[-2] // model.cfg.patch_size[0], x.shape[-1] // model.cfg.patch_size[1])
    layout = model.layout_for(tuple(x.shape[-2:]))
    n = model.cfg.n_layers
    capture = list(capture)
    model.check_hook_names(capture)
    observers = list(observers)
    model.check_hook_names([name for name, _ in observers])

    resolved: list[list[tuple[ResolvedSite, Site, Intervention]]] = []
    starts: list[int] = []
    for v in variants:
        pairs = []
        for site, iv in v.pairs:
            if not isinstance(site, Site):
                raise InputError(f"Expected a Site, got {site!r}.")
            iv = as_intervention(iv)
            for rs in site.resolve(model, grid):
                pairs.append((rs, site, iv))
        resolved.append(pairs)
        starts.append(min((start_layer(model, rs) for rs, _, _ in pairs), default=n)
                      if prefix_reuse else -1)

    flags = options_for(sorted({rs.hook for pairs in resolved for rs, _, _ in pairs}
                               | set(capture) | {name for name, _ in observers}))
    ctx = torch.enable_grad() if grad else torch.inference_mode()
    with ctx, model.options(**flags):
        sources = _reference_activations(model, resolved, b, batch_size)
        needed = sorted({s for s in starts if 0 <= s})
        base = _base_residuals(model, x, needed)
        explicit = any(rs.hook.endswith(("hook_pattern", "hook_attn_scores"))
                       for pairs in resolved for rs, _, _ in pairs)
        if batch_size is None:
            budget = parse_bytes(memory_budget or "2GB")
            rows = max(b, budget // max(1, bytes_per_row(model, layout.n_tokens, explicit)))
            if x.device.type == "cpu":  # measured: chunks beyond ~64 rows run slower per row on CPU
                rows = max(b, min(rows, CPU_MAX_ROWS))
        else:
            if batch_size < 1:
                raise InputError(f"batch_size must be >= 1, got {batch_size}.")
            rows = max(b, batch_size)
        per_chunk = max(1, rows // b)

        order = sorted(range(len(variants)), key=lambda i: starts[i])
        chunks: list[list[int]] = []
        for i in order:
            if chunks and starts[chunks[-1][0]] == starts[i] and len(chunks[-1]) < per_chunk:
                chunks[-1].append(i)
            else:
                chunks.append([i])

        outputs: Tensor | None = None
        captured: dict[str, Tensor] = {}
        bar = _progress(len(variants), progress, len(chunks))
        try:
            for chunk in chunks:
                s = starts[chunk[0]]
                entries = [
                    _Entry(slot, vi, k, rs, site, iv)
                    for slot, vi in enumerate(chunk)
                    for k, (rs, site, iv) in enumerate(resolved[vi])
                ]
                captured_sink: dict[str, Tensor] = {}
                hooks = _build_hooks(model, entries, b, layout, sources, captured_sink, capture)
                if observers:
                    hooks += _observer_hooks(observers, torch.tensor(chunk))
                if s < 0:
                    inp, kwargs = x.repeat(len(chunk), 1, 1, 1), {}
                else:
                    inp, kwargs = base[s].repeat(len(chunk), 1, 1), {"start_at_layer": s}
                with model.hooks(fwd_hooks=hooks):
                    out = model(inp, return_type=return_type, **kwargs)
                out = _apply_metric(metric, out, len(chunk), b, [variants[i].label for i in chunk])
                if outputs is None:
                    outputs = out.new_empty((len(variants), *out.shape[1:]))
                outputs[chunk] = out
                for name, act in captured_sink.items():
                    if name not in captured:
                        captured[name] = act.new_zeros((len(variants), b, *act.shape[1:]))
                    captured[name][chunk] = act.reshape(len(chunk), b, *act.shape[1:])
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
    return EngineResult(outputs, captured, starts)


def _progress(total: int, progress: bool | None, n_chunks: int):
    if progress is False or (progress is None and n_chunks <= 1):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="patching", unit="variant", leave=False)


def _apply_metric(metric: Metric | None, out: Tensor, n_var: int, b: int, labels) -> Tensor:
    if metric is None:
        return out.reshape(n_var, b, *out.shape[1:])
    values = metric(out)
    if not isinstance(values, Tensor) or values.shape != (out.shape[0],):
        got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise InputError(
            f"The metric must return one value per example, shape ({out.shape[0]},); it returned "
            f"{got}. Reduce over everything but the batch axis."
        )
    if not torch.isfinite(values).all():
        bad = [labels[i // b] for i in torch.nonzero(~torch.isfinite(values)).flatten().tolist()]
        raise InputError(f"The metric returned a non-finite value for variant(s) {bad[:5]}.")
    return values.reshape(n_var, b)


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
        model.check_images(ref)
        step = batch_size or 64
        # stop after the last block whose hooks are needed (no head or later blocks)
        matches = [_LAYER_OF.match(h) for h in hooks]
        last = max(int(m.group(1)) for m in matches) if all(matches) else model.cfg.n_layers
        stop = last + 1 if last + 1 < model.cfg.n_layers else None
        parts: dict[str, list[Tensor]] = defaultdict(list)
        for i in range(0, ref.shape[0], step):
            _, cache = model.run_with_cache(ref[i : i + step], names_filter=sorted(hooks),
                                            return_type=None, stop_at_layer=stop)
            for h in hooks:
                parts[h].append(cache[h])
        acts = {h: torch.cat(p) for h, p in parts.items()}
        out[key] = iv.prepare(acts, target_batch)
    return out


def _base_residuals(model, x: Tensor, layers: list[int]) -> dict[int, Tensor]:
    """The unpatched residual stream entering each block in ``layers`` (n_layers: after the
    last block), from one forward pass."""
    if not layers:
        return {}
    n = model.cfg.n_layers
    names = {l: (f"blocks.{l}.hook_resid_pre" if l < n else f"blocks.{n - 1}.hook_resid_post")
             for l in layers}
    _, cache = model.run_with_cache(x, names_filter=list(names.values()),
                                    return_type=None, stop_at_layer=min(max(layers) + 1, n))
    return {l: cache[name] for l, name in names.items()}


def _build_hooks(model, entries: list[_Entry], b: int, layout, sources, sink, capture):
    """One hook function per hook point, applying its entries in vectorised groups."""
    by_hook: dict[str, list[_Entry]] = defaultdict(list)
    for e in entries:
        by_hook[e.site.hook].append(e)
    n_tokens, n_heads = layout.n_tokens, model.cfg.n_heads
    hooks = []
    for name, group in by_hook.items():
        plans = []
        keyed: dict[tuple, list[_Entry]] = defaultdict(list)
        for e in group:
            rs = e.site
            key = (e.order, id(e.intervention), rs.tokens is None,
                   None if rs.tokens is None else len(rs.tokens),
                   None if rs.heads is None else len(rs.heads), rs.token_dim, rs.head_dim)
            keyed[key].append(e)
        for es in keyed.values():
            rs0 = es[0].site
            ar = torch.arange(b)
            rows = torch.stack([e.slot * b + ar for e in es])
            images = ar.expand(len(es), b)
            var = torch.tensor([e.index for e in es]).view(-1, 1).expand(-1, b)
            toks = torch.stack([torch.arange(n_tokens) if e.site.tokens is None else e.site.tokens
                                for e in es])
            heads = None
            if rs0.head_dim is not None:
                heads = torch.stack([torch.arange(n_heads) if e.site.heads is None else e.site.heads
                                     for e in es])
            gather = Gather(rows, images, var, toks, heads, rs0.token_dim, rs0.head_dim, name)
            plans.append((gather, es))
        hooks.append((name, _make_hook(plans, sources)))
    for name in capture:
        def keep(act, hook, _name=name):
            sink[_name] = act.detach().clone()
        hooks.append((name, keep))
    return hooks


def _observer_hooks(observers, chunk: Tensor):
    def make(fn):
        def observe(act, hook):
            fn(hook.name, act.detach(), chunk)
        return observe

    return [(name, make(fn)) for name, fn in observers]


def _make_hook(plans, sources):
    def hook_fn(act: Tensor, hook) -> Tensor:
        for gather, es in plans:
            if act.device != gather.rows.device:
                gather = _to_device(gather, act.device)
            idx = gather.index(gather.rows)
            selected = act[idx]
            iv = es[0].intervention
            if isinstance(iv, Custom):
                new = torch.stack([iv.apply_one(selected[i], hook, e.user_site) for i, e in enumerate(es)])
            else:
                src = sources.get(id(iv), {}).get(gather.hook) if iv.reference is not None else None
                new = iv.values(selected, gather, src)
                if new.shape != selected.shape:
                    raise InputError(
                        f"{iv!r} returned shape {tuple(new.shape)} for a selection of shape "
                        f"{tuple(selected.shape)} at {gather.hook}."
                    )
            act = act.index_put(idx, new.to(act.dtype))
        return act

    return hook_fn


def _to_device(g: Gather, device) -> Gather:
    return Gather(g.rows.to(device), g.images.to(device), g.variants.to(device), g.tokens.to(device),
                  None if g.heads is None else g.heads.to(device), g.token_dim, g.head_dim, g.hook)


def suggested_batch_rows(model, n_tokens: int, budget: str | int = "2GB") -> int:
    """Rows per forward pass that `run_variants` would use under ``budget``."""
    return max(1, parse_bytes(budget) // bytes_per_row(model, n_tokens, False))


__all__ = ["Variant", "EngineResult", "run_variants", "parse_bytes"]
