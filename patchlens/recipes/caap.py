"""CAAP: Causal Attribution via Activation Patching (Izadi et al., arXiv 2603.13652, 2026).

For each patch (or block of patches) the source image's activations of that patch are written
into a neutral context run at ``site`` of every layer in an intermediate window ``[start, end)``;
the attribution is ``score(patched context) - score(context)``. Early layers have not formed the
patch's representation yet and late layers have mixed information across tokens, hence the
window. The paper's neutral context and window are not published: both are parameters here,
with defaults chosen on the clutter-digits benchmark (``docs/benchmarks.md``).

Every patched run is an engine `Variant` (one per block, the image's activations at the block's
tokens), so the engine batches them and starts each at layer ``start`` from the context's
cached residual stream (prefix reuse).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from patchlens import metrics as M
from patchlens.checks import check_int
from patchlens.errors import InputError
from patchlens.model.preprocess import blur, from_pixels
from patchlens.patching.attribution_map import AttributionMap, map_dtype, resolve_target
from patchlens.patching.checks import check_batch
from patchlens.patching.engine import Variant, capture, run_variants
from patchlens.patching.interventions import Mean, Stored
from patchlens.patching.sites import Rect, Site

CONTEXTS = ("blur", "mean", "zeros", "noise", "mean_activation")
SCORES = ("logit", "probability", "log_probability", "logit_diff")
#: default layer window as fractions of the depth: (start, end) = (round(a * n), round(b * n)),
#: chosen by the ablation in docs/benchmarks.md.
DEFAULT_WINDOW = (0.0, 1.0)  # the whole depth: see docs/caap.md, the ablation


def default_layers(n_layers: int) -> tuple[int, int]:
    """The default window ``[start, end)`` for a model with ``n_layers`` blocks."""
    start = min(n_layers - 1, round(DEFAULT_WINDOW[0] * n_layers))
    return start, max(start + 1, round(DEFAULT_WINDOW[1] * n_layers))


def caap(
    model,
    images: Float[Tensor, "batch chan H W"],
    target: Any = None,
    layers: tuple[int, int] | None = None,
    context: str | Tensor = "blur",
    site: str = "resid_pre",
    score: str = "logit",
    group: int = 1,
    second_class: Any = None,
    blur_kernel: int = 11,
    blur_sigma: float = 5.0,
    reference: Tensor | None = None,
    batch_size: int | None = None,
    memory_budget: str | int | None = "2GB",
    progress: bool | None = None,
    seed: int = 0,
    features: Any = None,
) -> AttributionMap:
    """CAAP attribution map of ``images`` for ``target`` (Izadi et al. 2026).

    Args:
        images: normalised model inputs ``[batch, chan, H, W]`` (``model.preprocess``).
        target: explained class: None (the prediction on the image), an int, or ``[batch]``.
        layers: window ``(start, end)``, patched at layers ``start <= l < end``
            (default `default_layers`: ``(0, n)``, chosen by the ablation and the shortcut
            benchmark in docs/benchmarks.md).
        context: the neutral run the patches are written into: ``"blur"`` (Gaussian blur of
            the image in pixel space, re-normalised), ``"mean"`` (the data mean colour = zeros
            in normalised space), ``"zeros"`` (a black image), ``"noise"`` (seeded standard
            normal noise in normalised space), a normalised image tensor ``[C, H, W]``,
            ``[1, C, H, W]`` or ``[batch, C, H, W]``, or ``"mean_activation"`` (the residual
            stream entering ``start`` set to its per-token mean over ``reference`` images;
            the context then runs on from there).
        site: short hook name patched at each layer of the window (``resid_pre``,
            ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out``, ``z``, ...).
        score: ``"logit"``, ``"probability"``, ``"log_probability"`` or ``"logit_diff"``
            (target minus ``second_class``; default the image's runner-up class).
        group: patch ``group x group`` blocks together; when it does not divide the grid the
            last row/column of blocks is smaller (ragged edge). Each patch gets its block's value.
        blur_kernel, blur_sigma: Gaussian blur of the ``"blur"`` context.
        reference: normalised images for ``context="mean_activation"``.
        batch_size, memory_budget, progress: passed to the engine.
        seed: seed of the ``"noise"`` context.
        features: at a site with a feature axis (a spliced SAE's ``"sae_acts_post"``), patch
            only these features of each block's tokens (a map of one feature's contribution).

    Returns:
        `AttributionMap` with ``values [batch, grid_h, grid_w]`` = score(patched) - score(context)
        (effects), ``baseline [batch]`` the context's score (so ``patched`` = values +
        baseline); ``meta`` also has the context score and the score on the images themselves.
    """
    check_batch(model, images, "images")
    seed = check_int("seed", seed)
    x = images
    b = x.shape[0]
    n = model.cfg.n_layers
    start, end = _check_layers(layers, n)
    _check_site(model, site)
    if score not in SCORES:
        raise InputError(f"score must be one of {', '.join(SCORES)}; got {score!r}.")
    layout = model.layout_for(tuple(x.shape[-2:]))
    gh, gw = layout.grid
    group = _check_group(group, gh, gw)

    ctx, pre = _context(model, x, context, blur_kernel, blur_sigma, reference, seed, start)
    hooks = [name for name, _ in Site(site, layers=range(start, end)).hook_names(model)]
    # one batched engine run gives the image's logits and source activations and, for an image
    # context, the context's logits (no separate reference pass)
    run = capture(model, x if pre else torch.cat([x, ctx]), hooks)
    logits, ctx_logits = run.output[:b], run.output[b:]
    tgt = resolve_target(model, x, target, logits)
    metric = _score_fn(score, tgt, second_class, logits, model.cfg.n_classes)

    blocks = [(r0, min(r0 + group, gh), c0, min(c0 + group, gw))
              for r0 in range(0, gh, group) for c0 in range(0, gw, group)]
    source = Stored({h: run.acts[h][:b] for h in hooks}, "image")
    variants = [
        Variant(pre + [(Site(site, layers=range(start, end), tokens=Rect(*blk),
                                  features=features), source)],
                label=blk)
        for blk in blocks
    ]
    if pre:  # the context itself is a patched run (mean activations): score it as a variant
        variants.append(Variant(list(pre), label="context"))
    res = run_variants(model, ctx, variants, metric=metric, batch_size=batch_size,
                       memory_budget=memory_budget, progress=progress)
    dtype = map_dtype(x.dtype)
    out = res.outputs.to(dtype).cpu()
    if pre:
        base, out = out[-1], out[:-1]
    else:
        base = metric(ctx_logits).to(dtype).cpu()
    values = torch.zeros(b, gh, gw, dtype=dtype)
    for (r0, r1, c0, c1), v in zip(blocks, out - base):
        values[:, r0:r1, c0:c1] = v.view(b, 1, 1)
    full = metric(logits).to(dtype).cpu()
    meta = {"layers": (start, end), "context": context if isinstance(context, str) else "image",
            "site": site, "score": score, "group": group, "context_score": base,
            "features": features,
            "image_score": full}
    if score == "logit_diff":
        meta["second_class"] = metric.other
    return AttributionMap(values, "caap", tgt, model.to_image(x).cpu(), meta, baseline=base)


# ---- checks and pieces ------------------------------------------------------------------------
def _check_layers(layers, n: int) -> tuple[int, int]:
    if layers is None:
        return default_layers(n)
    if (not isinstance(layers, (tuple, list)) or len(layers) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers)):
        raise InputError(f"layers must be a pair of ints (start, end), got {layers!r}.")
    start, end = layers
    if not 0 <= start < end <= n:
        raise InputError(
            f"layers=({start}, {end}) is not a window of this model: need 0 <= start < end <= "
            f"{n} (the model has {n} layers; patched layers are start..end-1)."
        )
    return start, end


def _check_site(model, site: str) -> None:
    """CAAP patches a per-layer hook with a token axis (not attention scores / patterns)."""
    ok = [alias for alias, by_layer in model.hook_aliases.items()
          if None not in by_layer and all(
              (s := model.hook_spec(h)).token_axis is not None and not s.has_key_axis
              for h in by_layer.values())]
    if site not in ok:
        raise InputError(f"CAAP patches a per-layer, per-token site; site must be one of "
                         f"{', '.join(ok)}; got {site!r}.")


def _check_group(group, gh: int, gw: int) -> int:
    if isinstance(group, bool) or not isinstance(group, int) or not 1 <= group <= max(gh, gw):
        raise InputError(f"group must be an int in 1..{max(gh, gw)} (the grid is {gh}x{gw}); "
                         f"got {group!r}.")
    return group


class _Score:
    """``logits [N, classes] -> [N]`` for the target classes (repeated per variant)."""

    def __init__(self, kind: str, target: Tensor, other: Tensor | None):
        self.kind, self.target, self.other = kind, target, other
        fn = {"logit": M.logit, "probability": M.prob, "log_probability": M.log_prob}
        self.fn = (M.logit_diff(target, other) if kind == "logit_diff" else fn[kind](target))

    def __call__(self, logits: Tensor) -> Tensor:
        return self.fn(logits)

    def __repr__(self) -> str:
        return repr(self.fn)


def _score_fn(score: str, tgt: Tensor, second_class, logits: Tensor, n_classes: int) -> _Score:
    other = None
    if score == "logit_diff":
        if second_class is None:
            masked = logits.detach().float().cpu().clone()
            masked[torch.arange(len(tgt)), tgt] = -float("inf")
            other = masked.argmax(-1)
        else:
            other = M.resolve_classes(second_class, len(tgt), n_classes, "second_class")
            if bool((other == tgt).any()):
                same = torch.nonzero(other == tgt).flatten().tolist()
                raise InputError(
                    f"second_class equals the target class for image(s) {same[:8]}; logit_diff "
                    "would be 0 everywhere (an all-zero map). Pick another class, or leave "
                    "second_class=None for each image's runner-up."
                )
    elif second_class is not None:
        raise InputError(f"second_class is only used with score='logit_diff', not {score!r}.")
    return _Score(score, tgt, other)


def _context(model, x, context, kernel, sigma, reference, seed, start) -> tuple[Tensor, list]:
    """The context input ``[B, C, H, W]`` and the pairs that every variant starts with."""
    if isinstance(context, Tensor):
        ctx = context.to(x.device, x.dtype)
        if ctx.ndim == 3:
            ctx = ctx[None]
        if ctx.ndim != 4 or ctx.shape[1:] != x.shape[1:] or ctx.shape[0] not in (1, x.shape[0]):
            raise InputError(
                f"A context image must be [C, H, W], [1, C, H, W] or [batch, C, H, W] matching the "
                f"images {tuple(x.shape)}; got {tuple(context.shape)}."
            )
        model.check_images(ctx)
        return ctx.expand_as(x).contiguous(), []
    if reference is not None and context != "mean_activation":
        raise InputError("reference= is only used with context='mean_activation'.")
    if context == "blur":
        return blur(model.cfg, x, kernel, sigma), []
    if context == "mean":
        return torch.zeros_like(x), []
    if context == "zeros":
        return from_pixels(model.cfg, torch.zeros_like(x)), []
    if context == "noise":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(x.shape, generator=g).to(x.device, x.dtype), []
    if context == "mean_activation":
        if reference is None:
            raise InputError("context='mean_activation' needs reference= images (normalised, "
                             "[n, C, H, W]) to average the activations over.")
        model.check_images(reference)
        return torch.zeros_like(x), [(Site("resid_pre", layers=start, tokens="all"), Mean(reference))]
    raise InputError(f"context must be one of {', '.join(CONTEXTS)} or an image tensor; "
                     f"got {context!r}.")
