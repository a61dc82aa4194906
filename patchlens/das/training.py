"""Interchange intervention training of a trainable intervention, with the counterfactual latent
loss, and interchange intervention accuracy (IIA).

Interchange intervention training (Geiger et al. 2022; DAS: Geiger, Wu, Potts, Icard & Goodman
2023, arXiv 2303.02536): the intervention patches the source's value of a causal variable into
the base run; the loss is the cross-entropy of the patched logits against the label the
high-level causal model predicts after that interchange. The counterfactual latent (CL) loss
(Grant, Han, Tartaglini & Potts, arXiv 2511.04638, section 6) adds
``cl_weight * (mean((h_int - h_cf)^2) + 1 - cos(h_int, h_cf))``, with ``h_int`` the patched
vectors at the site and ``h_cf`` the natural vectors of the counterfactual input there.

The model is frozen, so every step reuses what does not change: the base's residual stream
entering the site's block, the source's activations at the site and the counterfactual's
natural vectors are computed once (`patchlens.patching.engine.natural_activations`); each step
is one differentiable engine run (`run_variants(..., grad=True, prefix=...)`) from the site's
block on.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from patchlens.das.pairs import CounterfactualPairs, check_pairs
from patchlens.diagnostics.training import counterfactual_latent_loss
from patchlens.errors import InputError
from patchlens.patching.engine import Variant, natural_activations, run_variants, start_layer
from patchlens.patching.sites import ResolvedSite, Site
from patchlens.patching.trainable import TrainableIntervention


@dataclass
class _Prepared:
    """One set of pairs, with everything the patched runs reuse."""

    site: ResolvedSite
    start: int | None          # block the patched runs start at (None: from the image)
    base: Tensor               # [N, C, H, W]
    prefix: Tensor | None      # [N, pos, d_model] the base's residual stream entering `start`
    source: Tensor             # [N, ...] the source's natural activations at the site's hook
    labels: Tensor             # [N]
    cf: Tensor | None          # [N, *selection] counterfactual natural vectors at the site
    width: int

    def subset(self, idx: Tensor) -> _Prepared:
        def take(t):
            return None if t is None else t[idx.to(t.device)]

        return _Prepared(self.site, self.start, take(self.base), take(self.prefix),
                         take(self.source), take(self.labels), take(self.cf), self.width)


def resolve_one(model, site: Site, x: Tensor) -> ResolvedSite:
    """The single hook point of ``site`` (an intervention is trained at one hook)."""
    if not isinstance(site, Site):
        raise InputError(f"site must be a patchlens Site, got {type(site).__name__}.")
    grid = (x.shape[-2] // model.cfg.patch_size[0], x.shape[-1] // model.cfg.patch_size[1])
    resolved = site.resolve(model, grid)
    if len(resolved) != 1:
        raise InputError(f"{site!r} covers {len(resolved)} hook points; train one intervention per "
                         "hook, e.g. Site(hook, layers=3, ...).")
    return resolved[0]


def select(act: Tensor, rs: ResolvedSite) -> Tensor:
    """The site's selection (tokens, heads, features) of a full activation ``[B, ...]``, axes
    kept in the hook's order."""
    spec = rs.spec
    for axis, sel in ((spec.token_axis, rs.tokens), (spec.head_axis, rs.heads),
                      (spec.feature_axis, rs.features)):
        if axis is not None and sel is not None:
            act = act.index_select(axis, sel.to(act.device))
    return act


def _as_pairs(pairs: Any, labels: Any, counterfactuals: Any, what: str):
    if isinstance(pairs, CounterfactualPairs):
        return (pairs.base, pairs.source, pairs.labels if labels is None else labels,
                pairs.counterfactual if counterfactuals is None else counterfactuals)
    if not (isinstance(pairs, (tuple, list)) and len(pairs) == 2):
        raise InputError(f"{what} must be CounterfactualPairs or a (base, source) tuple of image "
                         f"batches, got {type(pairs).__name__}.")
    if labels is None:
        raise InputError(f"{what}: pass the counterfactual labels (one class per pair).")
    return pairs[0], pairs[1], labels, counterfactuals


def _natural(model, x: Tensor, hooks: list[str], cache: dict | None,
             batch_size: int) -> dict[str, Tensor]:
    """Natural activations of ``x`` at ``hooks``, reusing those in ``cache`` (keyed by the
    tensor's identity and the hook; the tensor is kept with them so the identity stays valid)."""
    if cache is None:
        return natural_activations(model, x, hooks, batch_size)
    missing = [h for h in hooks if (id(x), h) not in cache]
    if missing:
        for h, a in natural_activations(model, x, missing, batch_size).items():
            cache[(id(x), h)] = (x, a)
    return {h: cache[(id(x), h)][1] for h in hooks}


def prepare(model, site: Site, base: Tensor, source: Tensor, labels: Tensor,
            counterfactuals: Tensor | None = None, batch_size: int = 128,
            cache: dict | None = None) -> _Prepared:
    """Compute what every patched run on a set of pairs reuses (``cache``: a dict shared by
    calls on the same image tensors, e.g. runs at one hook with several token groups)."""
    p = next(model.parameters())
    base, source = base.to(p.device, p.dtype), source.to(p.device, p.dtype)  # same objects if
    if counterfactuals is not None:                                         # nothing changes
        counterfactuals = counterfactuals.to(p.device, p.dtype)
    model.check_images(base)
    rs = resolve_one(model, site, base)
    start = start_layer(model, rs.spec)
    start = start if 0 <= start < model.cfg.n_layers else None
    hooks = [rs.hook] + ([f"blocks.{start}.hook_resid_pre"] if start is not None else [])
    nat = _natural(model, base, hooks, cache, batch_size)
    src = _natural(model, source, [rs.hook], cache, batch_size)[rs.hook]
    width = int(nat[rs.hook].shape[-1])
    cf = None
    if counterfactuals is not None:
        cf = select(_natural(model, counterfactuals, [rs.hook], cache, batch_size)[rs.hook], rs)
    prefix = nat[hooks[1]] if start is not None else None
    return _Prepared(rs, start, base, prefix, src, labels.to(p.device), cf, width)


def _patched(model, site: Site, iv: TrainableIntervention, prep: _Prepared, idx: Tensor, *,
             grad: bool, keep_site: bool) -> tuple[Tensor, Tensor | None]:
    """Patched logits ``[b, n_classes]`` of the pairs ``idx`` (and the patched vectors at the
    site, on the autograd graph when ``grad``)."""
    hook = prep.site.hook
    bound = iv.with_source({hook: prep.source[idx]})
    kw = {} if prep.prefix is None else {"prefix": {prep.start: prep.prefix[idx]}}
    res = run_variants(model, prep.base[idx], [Variant([(site, bound)], "interchange")],
                       grad=grad, capture=[hook] if keep_site else (), progress=False,
                       batch_size=len(idx), **kw)
    h = select(res.captured[hook][0], prep.site) if keep_site else None
    return res.outputs[0], h


def _accuracy(model, site, iv, prep: _Prepared, batch_size: int) -> float:
    correct = 0
    n = prep.labels.shape[0]
    for i in range(0, n, batch_size):
        idx = torch.arange(i, min(n, i + batch_size))
        logits, _ = _patched(model, site, iv, prep, idx, grad=False, keep_site=False)
        correct += int((logits.argmax(-1) == prep.labels[idx]).sum())
    return correct / n


def _n_outputs(model, x: Tensor) -> int:
    with torch.inference_mode():
        return int(model(x[:1]).shape[-1])


def interchange_accuracy(model, site: Site, intervention: TrainableIntervention, pairs: Any,
                         labels: Tensor | None = None, *, batch_size: int = 256) -> float:
    """Interchange intervention accuracy: the share of pairs whose patched prediction (the
    argmax of the logits) equals the counterfactual label. ``pairs``: `CounterfactualPairs` or
    ``(base, source)`` with ``labels``."""
    _check_number("batch_size", batch_size, 1, integer=True)
    base, source, labels, _ = _as_pairs(pairs, labels, None, "pairs")
    check_pairs(base, source, labels, n_classes=_n_outputs(model, base))
    if not isinstance(intervention, TrainableIntervention) or not intervention.built:
        raise InputError(f"{intervention!r} is not a built trainable intervention.")
    prep = prepare(model, site, base, source, labels, batch_size=batch_size)
    return _accuracy(model, site, intervention, prep, batch_size)


@dataclass
class TrainResult:
    """What `train_intervention` did.

    Attributes:
        intervention: the trained intervention (the state with the best held-out IIA).
        site: where it was trained.
        iia: the best held-out interchange intervention accuracy; ``step``: when.
        history: one dict per evaluation: step, loss, ce, cl, penalty (training means since
            the previous evaluation), iia (held-out), seconds.
        stopped: ``"target"`` (IIA reached ``target_iia``), ``"patience"`` (no improvement in
            ``patience`` evaluations) or ``"steps"``.
    """

    intervention: TrainableIntervention
    site: Site
    iia: float
    step: int
    history: list[dict] = field(default_factory=list)
    stopped: str = "steps"
    seconds: float = 0.0
    steps: int = 0
    n_train: int = 0
    n_held_out: int = 0
    cl_weight: float = 0.0

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.history)

    def plot(self):
        """Plotly figure: training loss (and CL term) and held-out IIA per evaluation."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        steps = [h["step"] for h in self.history]
        fig = make_subplots(rows=1, cols=2, subplot_titles=("training loss", "held-out IIA"))
        for key in ("loss", "ce", "cl"):
            ys = [h[key] for h in self.history]
            if any(not math.isnan(y) for y in ys):
                fig.add_trace(go.Scatter(x=steps, y=ys, name=key, mode="lines+markers"), 1, 1)
        fig.add_trace(go.Scatter(x=steps, y=[h["iia"] for h in self.history], name="IIA",
                                 mode="lines+markers"), 1, 2)
        fig.update_xaxes(title_text="step")
        fig.update_yaxes(range=[0, 1.02], row=1, col=2)
        fig.update_layout(title=f"{self.intervention!r} at {self.site!r}", height=340)
        return fig

    def __repr__(self) -> str:
        return (f"TrainResult(IIA {self.iia:.3f} at step {self.step} of {self.steps} "
                f"(stopped: {self.stopped}), {self.seconds:.1f} s, {self.n_train} training / "
                f"{self.n_held_out} held-out pairs, cl_weight={self.cl_weight:g}, "
                f"{self.intervention!r} at {self.site!r})")


def _check_number(name: str, v: Any, low: float = 0.0, integer: bool = False,
                  strict: bool = False) -> None:
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not math.isfinite(v) or v < low or (strict and v == low):
        kind = "an int" if integer else "a number"
        raise InputError(f"{name} must be {kind} {'>' if strict else '>='} {low:g}, got {v!r}.")


def train_intervention(
    model,
    site: Site,
    intervention: TrainableIntervention,
    pairs: Any,
    counterfactual_labels: Tensor | None = None,
    *,
    counterfactuals: Tensor | None = None,
    cl_weight: float = 0.0,
    held_out: Any = None,
    held_out_fraction: float = 0.2,
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 1e-2,
    eval_every: int = 20,
    patience: int | None = 5,
    target_iia: float | None = 1.0,
    seed: int = 0,
    progress: bool = True,
    eval_batch_size: int = 256,
    activation_cache: dict | None = None,
) -> TrainResult:
    """Train ``intervention`` at ``site`` by interchange intervention training.

    Args:
        pairs: `CounterfactualPairs`, or ``(base, source)`` image batches ``[N, C, H, W]``.
        counterfactual_labels: ``[N]`` the label the high-level causal model predicts after the
            interchange (taken from ``pairs`` when it is `CounterfactualPairs`).
        counterfactuals: ``[N, C, H, W]`` inputs realising the interchange (their natural vectors
            at the site are the CL targets); needed when ``cl_weight > 0``.
        cl_weight: weight of the counterfactual latent loss.
        held_out: pairs for early stopping and the reported IIA (`CounterfactualPairs` or
            ``((base, source), labels)``); None: the last ``held_out_fraction`` of a seeded
            shuffle of ``pairs``.
        steps, batch_size, lr: Adam steps, pairs per step, learning rate.
        eval_every, patience, target_iia: held-out IIA every ``eval_every`` steps; stop when it
            reaches ``target_iia`` (None: never) or has not improved for ``patience`` evaluations
            (None: never); the best state is restored (of equal ones, the latest).
        seed: order of the training pairs and of the held-out split (the intervention's
            initialisation has its own seed).
        activation_cache: a dict shared by calls on the same image tensors: the natural
            activations (which do not depend on the intervention) are computed once
            (`patchlens.das.experiment.das_sweep` shares them between its runs).

    Returns:
        `TrainResult`; the intervention is trained in place, its ``site`` and ``meta`` set.
    """
    from patchlens.diagnostics.reference import fingerprint

    if not isinstance(intervention, TrainableIntervention):
        raise InputError(f"intervention must be a trainable intervention (RotatedSubspace, ...), "
                         f"got {type(intervention).__name__}.")
    _check_number("cl_weight", cl_weight)
    _check_number("steps", steps, 1, integer=True)
    _check_number("batch_size", batch_size, 1, integer=True)
    _check_number("eval_every", eval_every, 1, integer=True)
    _check_number("lr", lr, 0, strict=True)
    if patience is not None:
        _check_number("patience", patience, 1, integer=True)
    _check_number("eval_batch_size", eval_batch_size, 1, integer=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an int, got {seed!r}.")
    base, source, labels, cf = _as_pairs(pairs, counterfactual_labels, counterfactuals, "pairs")
    if cl_weight > 0 and cf is None:
        raise InputError("cl_weight > 0 needs counterfactual inputs (counterfactuals=[N, C, H, W]): "
                         "their natural vectors are the CL loss's targets.")
    model.check_images(base)
    n_out = _n_outputs(model, base)
    check_pairs(base, source, labels, cf, n_classes=n_out)
    resolve_one(model, site, base)  # bad sites fail before anything runs
    gen = torch.Generator().manual_seed(int(seed))
    if held_out is None:
        if not 0 < held_out_fraction < 1:
            raise InputError(f"held_out_fraction must be in (0, 1), got {held_out_fraction!r}.")
        perm = torch.randperm(base.shape[0], generator=gen)
        n_held = max(1, round(held_out_fraction * base.shape[0]))
        if n_held >= base.shape[0]:
            raise InputError(f"{base.shape[0]} pair(s) cannot be split into training and held-out "
                             "pairs; pass more pairs or held_out=.")
    else:
        if isinstance(held_out, CounterfactualPairs):
            hb, hs, hl = held_out.base, held_out.source, held_out.labels
        elif isinstance(held_out, (tuple, list)) and len(held_out) == 2:
            hb, hs, hl, _ = _as_pairs(held_out[0], held_out[1], None, "held_out")
        else:
            raise InputError("held_out must be CounterfactualPairs or ((base, source), labels).")
        check_pairs(hb, hs, hl, n_classes=n_out)
        if hb.shape[1:] != base.shape[1:]:
            raise InputError(f"held-out images {tuple(hb.shape)} and training images "
                             f"{tuple(base.shape)} differ in size.")

    t0 = time.perf_counter()
    train = prepare(model, site, base, source, labels, cf if cl_weight > 0 else None,
                    cache=activation_cache)
    if held_out is None:
        train, held = train.subset(perm[n_held:]), train.subset(perm[:n_held])
    else:
        held = prepare(model, site, hb, hs, hl, batch_size=eval_batch_size,
                       cache=activation_cache)
    p = next(model.parameters())
    intervention.build(train.width, dtype=p.dtype).to(device=p.device, dtype=p.dtype)
    params = [q for q in intervention.parameters() if q.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    n = train.labels.shape[0]
    b = min(batch_size, n)

    def evaluate() -> float:
        return _accuracy(model, site, intervention, held, eval_batch_size)

    intervention.anneal(0.0)
    best = evaluate()
    best_step, best_state = 0, copy.deepcopy(intervention.state_dict())
    nan = float("nan")
    history = [{"step": 0, "loss": nan, "ce": nan, "cl": nan, "penalty": nan, "iia": best,
                "seconds": time.perf_counter() - t0}]
    sums = {"loss": 0.0, "ce": 0.0, "cl": 0.0, "penalty": 0.0}
    count, bad, stopped, step = 0, 0, "steps", 0
    order, pos = torch.randperm(n, generator=gen), 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="interchange training", unit="step", leave=False)
    try:
        for step in range(1, steps + 1):
            if target_iia is not None and best >= target_iia:
                stopped, step = "target", step - 1
                break
            if pos + b > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos : pos + b]
            pos += b
            logits, h = _patched(model, site, intervention, train, idx, grad=True,
                                 keep_site=cl_weight > 0)
            ce = F.cross_entropy(logits, train.labels[idx])
            loss = ce
            cl = None
            if cl_weight > 0:
                cl = counterfactual_latent_loss(h, train.cf[idx])
                loss = loss + cl_weight * cl
            pen = intervention.penalty()
            loss = loss + pen
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for q, g in zip(params, grads):
                q.grad = g
            opt.step()
            opt.zero_grad(set_to_none=True)
            intervention.anneal(step / steps)
            sums["loss"] += float(loss.detach())
            sums["ce"] += float(ce.detach())
            sums["cl"] += nan if cl is None else float(cl.detach())
            sums["penalty"] += float(pen.detach() if isinstance(pen, Tensor) else pen)
            count += 1
            if bar is not None:
                bar.update(1)
            if step % eval_every == 0 or step == steps:
                iia = evaluate()
                history.append({**{k: v / count for k, v in sums.items()}, "step": step,
                                "iia": iia, "seconds": time.perf_counter() - t0})
                sums, count = dict.fromkeys(sums, 0.0), 0
                if bar is not None:
                    bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", iia=f"{iia:.3f}")
                bad = 0 if iia > best else bad + 1
                if iia >= best:  # ties: keep the later, longer-trained state
                    best, best_step = iia, step
                    best_state = copy.deepcopy(intervention.state_dict())
                if target_iia is not None and best >= target_iia:
                    stopped = "target"
                    break
                if patience is not None and bad >= patience:
                    stopped = "patience"
                    break
    finally:
        if bar is not None:
            bar.close()
    intervention.load_state_dict(best_state)
    intervention.site = site
    intervention.meta.update({"iia": best, "step": best_step, "cl_weight": float(cl_weight),
                              "model": fingerprint(model)})
    return TrainResult(intervention, site, best, best_step, history, stopped,
                       time.perf_counter() - t0, step, n, held.labels.shape[0], float(cl_weight))


__all__ = ["TrainResult", "interchange_accuracy", "prepare", "resolve_one", "select",
           "train_intervention"]
