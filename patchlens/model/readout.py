"""How a `HookedViT`'s logits read the residual stream after the last block: the exact linear
readout behind direct logit attribution (``cache.logit_attrs``).

With the final norm's scale frozen at its cached value (as TransformerLens does), the logit of
class ``c`` is linear in the residual stream ``r`` ``[pos, d_model]`` after the last block:

    logit_c = (1 / s_e) * sum_pos  ((r[pos] - mean(r[pos])) / s[pos]) . D_c[pos]  +  o_c

``s`` is the final norm's cached scale (one per token before pooling, ``pre_pool``; one per
image after it, ``post_pool``), ``D_c[pos]`` the direction token ``pos`` is read along (the
head's column for ``c``, times the final norm's weight, times the pooling weight of that token:
1 for the class token, ``1 / n_patches`` for each patch under average pooling, halves for the
two heads of a distilled model), ``s_e`` the L2 norm of a zero-shot head's image embedding
(1 for a plain head) and ``o_c`` the constant: the head's bias plus the final norm's bias read
along the same directions (divided by ``s_e``). Attention pooling (MAP) is not linear in the
residual stream, and a norm applied after pooling to a class token concatenated with the patch
mean (or to two distilled tokens separately) cannot be frozen per image: those are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from patchlens.errors import InputError
from patchlens.metrics import resolve_classes


@dataclass
class Readout:
    """The readout of one or more classes (see the module docstring).

    Attributes:
        directions: ``[*classes, n_tokens, d_model]`` per-token directions ``D_c``.
        norm_bias: ``[*classes]`` the final norm's bias read along the head (divide by
            ``s_e`` like the directions).
        bias: ``[*classes]`` the head's bias (not divided by ``s_e``).
        embed_norm: True for a zero-shot head (divide by the image embedding's L2 norm,
            ``hook_image_embed``).
        scale_per_image: True when the final norm's cached scale is one per image
            (``post_pool``), False when it is one per token.
    """

    directions: Tensor
    norm_bias: Tensor
    bias: Tensor
    embed_norm: bool
    scale_per_image: bool


def check_linear_readout(model) -> None:
    """Raise `InputError` unless the logits are linear in the residual stream (frozen scales)."""
    cfg = model.cfg
    if model.head is None:
        raise InputError("This model is headless (n_classes == 0): there are no logits to "
                         "attribute. Give it a head (e.g. patchlens.zeroshot_head) first.")
    if cfg.pooling in ("map", "none"):
        raise InputError(
            f"pooling={cfg.pooling!r}: the head reads the residual stream through "
            + ("an attention-pooling block (softmax attention and an MLP), which is not linear "
               "in it" if cfg.pooling == "map" else "no pooling")
            + ", so a direct logit attribution would not be exact. Attribute to hook_pooled "
              "instead (cache['hook_pooled'] @ model.W_U) or use activation patching.")
    if cfg.final_norm == "post_pool" and (cfg.pooling == "token_avg" or cfg.distilled):
        raise InputError("The final norm is applied after pooling to "
                         + ("the class token concatenated with the patch mean" if
                            cfg.pooling == "token_avg" else "the class and distillation tokens "
                            "separately (the cache keeps only the last scale)")
                         + ", so its scale cannot be frozen per token: a direct logit "
                           "attribution would not be exact.")


def readout(model, classes, n_patches: int | None = None) -> Readout:
    """The exact linear readout of ``classes`` (an int, a class name of a zero-shot head, or
    integer classes ``[k]``) for images with ``n_patches`` patches (default: native size)."""
    check_linear_readout(model)
    cfg = model.cfg
    c = class_indices(model, classes)
    n_patches = cfg.n_patches if n_patches is None else n_patches
    d, n_prefix = cfg.d_model, cfg.n_prefix
    head_w = model.head.weight  # [n_classes, d_in]
    u = head_w[c]  # [*k, d_in]
    if model.image_proj is not None:
        u = u @ model.image_proj.weight  # [*k, d_pooled]
    bias = model.b_U[c]
    zeros = u.new_zeros((*u.shape[:-1], n_prefix + n_patches, d))
    dirs = zeros.clone()
    if cfg.distilled:
        u_dist = model.head_dist.weight[c]
        dirs[..., 0, :] = u / 2
        dirs[..., 1, :] = u_dist / 2
        b_dist = (model.head_dist.bias[c] if model.head_dist.bias is not None
                  else torch.zeros_like(bias))
        bias = (bias + b_dist) / 2
    elif cfg.pooling == "token":
        dirs[..., 0, :] = u
    elif cfg.pooling == "avg":
        dirs[..., n_prefix:, :] = (u / n_patches).unsqueeze(-2)
    else:  # token_avg: class token, then the patch mean
        dirs[..., 0, :] = u[..., :d]
        dirs[..., n_prefix:, :] = (u[..., d:] / n_patches).unsqueeze(-2)
    norm_bias = torch.zeros_like(bias)
    if model.ln_final is not None:
        norm_bias = (dirs * model.ln_final.b).sum((-1, -2))
        dirs = dirs * model.ln_final.w
    return Readout(dirs, norm_bias, bias, cfg.zeroshot is not None,
                   cfg.final_norm == "post_pool")


def class_indices(model, classes) -> Tensor:
    """Classes as a long tensor (scalar for one class); names look up a zero-shot head's
    ``class_names``."""
    n = model.cfg.n_classes
    names = (model.cfg.zeroshot or {}).get("class_names")
    if isinstance(classes, str):
        if not names or classes not in names:
            known = f" Its classes: {list(names)[:10]}." if names else ""
            raise InputError(f"Unknown class name {classes!r}.{known} Pass a class index.")
        return torch.tensor(list(names).index(classes))
    t = torch.as_tensor(classes)
    if t.ndim == 0:
        return resolve_classes(t, 1, n)[0]
    return resolve_classes(t, t.numel(), n).reshape(t.shape)


def residual_directions(model, classes) -> Tensor:
    """TransformerLens ``tokens_to_residual_directions`` for a classifier: the direction
    ``[*classes, d_model]`` the residual stream of the token the head reads is dotted with
    (after the final norm's frozen centring and scale) to give the logit: the head's column
    times the final norm's weight. Exact for class-token and average pooling; for average
    pooling the logit is the mean over the patches."""
    cfg = model.cfg
    check_linear_readout(model)
    if cfg.zeroshot is not None:
        raise InputError("A zero-shot head L2-normalises the image embedding, so the direction "
                         "depends on each image's embedding norm; use cache.logit_attrs(...), "
                         "which divides by the cached norm (hook_image_embed).")
    if cfg.distilled or cfg.pooling == "token_avg":
        raise InputError(
            "The head reads two different token groups with different weights ("
            + ("class and distillation tokens, two heads averaged" if cfg.distilled else
               "the class token and the patch mean, two halves of the head")
            + "), so there is no single residual direction per class. Use "
              "cache.logit_attrs(stack, classes, pooled=True), which reads each token along "
              "its own direction.")
    ro = readout(model, classes)
    token = 0 if cfg.pooling == "token" else cfg.n_prefix
    scale = 1 if cfg.pooling == "token" else ro.directions.new_tensor(cfg.n_patches)
    return ro.directions[..., token, :] * scale
