"""`ViTActivationCache`: TransformerLens's `ActivationCache` with the residual-stream
decompositions made exact for Vision Transformers.

What `HookedViT.run_with_cache` returns. Indexing, shorthand (``cache["resid_pre", 3]``),
``accumulated_resid``, ``stack_activation``, ``compute_head_results`` ... are TransformerLens's
own. The methods below are re-implemented (same signatures and stack layouts
``[component, batch, pos, d_model]``, same labels) where a ViT differs from a language model:

- LayerScale (``ls1`` / ``ls2``) multiplies every head's and neuron's contribution and the
  biases (``hook_result`` itself is the head output before it, like ``W_O``);
- a CLIP-style pre-norm makes the stream entering block 0 ``ln_pre(embed + pos_embed)``: the
  embedding component is then ``ln_pre`` (``hook_ln_pre``) instead of ``embed`` and
  ``pos_embed``;
- the final norm may come after pooling (one cached scale per image, ``post_pool``) or not at
  all, and the head may read the class token, the patch mean, both, or two distilled tokens
  (`patchlens.model.readout`): ``logit_attrs(..., pooled=True)`` reads each token along its own
  direction so that a complete decomposition sums exactly to the logits:
  ``logit_attrs(stack, c, pooled=True).sum(0) + logit_offset(c) == logits[:, c]``.

Every decomposition (``decompose_resid``, ``get_full_resid_decomposition``,
``stack_head_results(incl_remainder=True)``, ``stack_neuron_results(incl_remainder=True)``)
sums to the residual stream it decomposes (tested in float64 to 1e-10).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformer_lens import ActivationCache
from transformer_lens.utilities import Slice

from patchlens.errors import InputError
from patchlens.model.readout import readout, residual_directions


def _slice(s: Any) -> Slice:
    return s if isinstance(s, Slice) else Slice(s)


class ViTActivationCache(ActivationCache):
    """A TransformerLens `ActivationCache` of a `HookedViT` (see the module docstring)."""

    def apply_slice_to_batch_dim(self, batch_slice: Any) -> ViTActivationCache:
        c = super().apply_slice_to_batch_dim(batch_slice)
        return ViTActivationCache(c.cache_dict, c.model, has_batch_dim=c.has_batch_dim)

    # ---- pieces ---------------------------------------------------------------------------------
    def _layer(self, layer: int | None, what: str = "layer") -> int:
        n = self.model.cfg.n_layers
        if layer is None or layer == -1:
            return n
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
            raise InputError(f"{what} must be in 0..{n} (or -1 / None for the final stream), "
                             f"got {layer!r}.")
        return layer

    def _get(self, name: str) -> Tensor:
        if name not in self.cache_dict:
            raise InputError(f"The cache has no {name!r}; run run_with_cache without a "
                             "names_filter (or include it) to decompose the residual stream.")
        return self.cache_dict[name]

    def _gamma(self, layer: int, which: int) -> Tensor | None:
        ls = getattr(self.model.blocks[layer], f"ls{which}")
        return None if ls is None else ls.gamma

    def _head_results(self, layer: int) -> Tensor:
        """``[batch, pos, head, d_model]`` what each head adds to the residual stream (LayerScale
        applied): the cached ``hook_result`` or ``z @ W_O``."""
        h = self.model.cfg.n_heads
        cached = self.cache_dict.get(f"blocks.{layer}.attn.hook_result")
        if cached is not None and cached.ndim >= 3 and cached.shape[-2] == h:
            out = cached
        else:
            out = torch.einsum("...hk,hkd->...hd", self._get(f"blocks.{layer}.attn.hook_z"),
                               self.model.blocks[layer].attn.W_O)
        g = self._gamma(layer, 1)
        return out if g is None else out * g

    def _neuron_out(self, layer: int) -> Tensor:
        """``[d_mlp, d_model]`` what one unit of each neuron adds (``W_out``, LayerScale applied)."""
        w = self.model.blocks[layer].mlp.W_out
        g = self._gamma(layer, 2)
        return w if g is None else w * g

    def _embeds(self, pos: Slice) -> list[tuple[str, Tensor]]:
        """The components entering block 0."""
        if self.model.cfg.pre_norm:
            return [("ln_pre", pos.apply(self._get("hook_ln_pre"), dim=-2))]
        out = [("embed", pos.apply(self._get("hook_embed"), dim=-2))]
        if "hook_pos_embed" in self.cache_dict:
            out.append(("pos_embed", pos.apply(self["hook_pos_embed"], dim=-2)))
        return out

    def _resid_into(self, layer: int, mlp_input: bool) -> Tensor:
        """The residual stream a decomposition up to ``layer`` sums to."""
        n = self.model.cfg.n_layers
        if mlp_input:
            if layer >= n:
                raise InputError("mlp_input=True needs a layer < n_layers (the final stream "
                                 "feeds the head, not an MLP).")
            return self._get(f"blocks.{layer}.hook_resid_mid")
        if layer == n:
            return self._get(f"blocks.{n - 1}.hook_resid_post")
        return self._get(f"blocks.{layer}.hook_resid_pre")

    def _empty(self, pos: Slice) -> Tensor:
        ref = pos.apply(self._resid_into(0, False), dim=-2)
        return ref.new_zeros((0, *ref.shape))

    # ---- LayerNorm with cached scales ----------------------------------------------------------
    def _ln_divisor(self, layer: int, mlp_input: bool, pos: Slice, batch: Slice,
                    has_pos: bool) -> Tensor | None:
        """The cached scale the stack is divided by, broadcastable to its trailing
        ``[*batch, *pos, d]`` axes; None when that norm does not exist."""
        n = self.model.cfg.n_layers
        if layer < n:
            scale = pos.apply(self._get(f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"),
                              dim=-2)
        else:
            if mlp_input:
                raise InputError("mlp_input=True needs a layer < n_layers.")
            if self.model.ln_final is None:
                return None
            scale = self._get("ln_final.hook_scale")
            cfg = self.model.cfg
            if cfg.final_norm == "post_pool":
                if cfg.pooling not in ("token", "avg") or cfg.distilled:
                    raise InputError(
                        f"The final norm of this model normalises the pooled features "
                        f"(pooling={cfg.pooling!r}{', distilled' if cfg.distilled else ''}), "
                        "not a linear function of each token's residual stream; a stack of "
                        "residual streams cannot be normalised by its cached scale.")
                if has_pos:  # one scale per image, the same for every token
                    scale = scale.unsqueeze(-2)
            else:
                scale = pos.apply(scale, dim=-2)
        if self.has_batch_dim:
            scale = batch.apply(scale, dim=0)
        return scale

    def apply_ln_to_stack(self, residual_stack: Tensor, layer: int | None = None,
                          mlp_input: bool = False, pos_slice: Any = None,
                          batch_slice: Any = None, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> Tensor:
        """Centre each component and divide it by the cached scale of the norm that reads
        ``layer``'s input (``ln1``, ``ln2`` with ``mlp_input``, or the final norm for
        ``layer = n_layers / -1 / None``), as TransformerLens does. The norm's weight and bias
        are not applied (`logit_attrs` folds them into the directions). For the final norm
        after pooling (``post_pool``) every token is divided by its image's pooled scale
        (exact: the pooling is linear). ``recompute_ln=True`` (final layer only) applies the
        final norm with each component's own statistics instead (logit lens)."""
        layer = self._layer(layer)
        pos, batch = _slice(pos_slice), _slice(batch_slice)
        if has_batch_dim:
            residual_stack = batch.apply(residual_stack, dim=1)
        n = self.model.cfg.n_layers
        if recompute_ln and layer == n:
            ln = self.model.ln_final
            return residual_stack if ln is None else ln(residual_stack)
        has_pos = residual_stack.ndim - 1 - int(has_batch_dim) - 1 >= 1
        divisor = self._ln_divisor(layer, mlp_input, pos, batch, has_pos)
        if divisor is None:
            return residual_stack
        centred = residual_stack - residual_stack.mean(-1, keepdim=True)
        return centred / divisor

    # ---- stacks ---------------------------------------------------------------------------------
    def stack_head_results(self, layer: int = -1, return_labels: bool = False,
                           incl_remainder: bool = False, pos_slice: Any = None,
                           apply_ln: bool = False):
        """Every head's contribution to the residual stream, heads of blocks ``< layer``:
        ``[layer * n_heads (+1), batch, pos, d_model]``, labels ``L{l}H{h}`` (and
        ``remainder``: the rest of the stream entering ``layer``)."""
        layer = self._layer(layer)
        pos = _slice(pos_slice)
        h = self.model.cfg.n_heads
        parts = [pos.apply(self._head_results(lay), dim=-3) for lay in range(layer)]
        labels = [f"L{lay}H{j}" for lay in range(layer) for j in range(h)]
        stack = torch.cat(parts, dim=-2).movedim(-2, 0) if parts else self._empty(pos)
        if incl_remainder:
            rest = pos.apply(self._resid_into(layer, False), dim=-2) - stack.sum(0)
            stack = torch.cat([stack, rest[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos)
        return (stack, labels) if return_labels else stack

    def get_neuron_results(self, layer: int, neuron_slice: Any = None, pos_slice: Any = None,
                           project_output_onto: Tensor | None = None) -> Tensor:
        """What each neuron of block ``layer``'s MLP adds to the residual stream (LayerScale
        applied): ``[batch, pos, d_mlp, d_model]``, or projected onto
        ``project_output_onto`` ``[d_model]`` / ``[d_model, k]`` without building that."""
        acts = _slice(pos_slice).apply(self._get(f"blocks.{layer}.mlp.hook_post"), dim=-2)
        w = self._neuron_out(layer)
        neurons = _neurons(neuron_slice)
        acts, w = neurons.apply(acts, dim=-1), neurons.apply(w, dim=0)
        if project_output_onto is None:
            return acts[..., None] * w
        proj = w @ project_output_onto.to(w.dtype)
        return acts * proj if proj.ndim == 1 else acts[..., None] * proj

    def stack_neuron_results(self, layer: int, pos_slice: Any = None, neuron_slice: Any = None,
                             return_labels: bool = False, incl_remainder: bool = False,
                             apply_ln: bool = False, project_output_onto: Tensor | None = None,
                             mlp_input: bool = False):
        """Every neuron's contribution, neurons of blocks ``< layer``:
        ``[layer * d_mlp (+1), batch, pos, d_model]`` (last axis ``k`` or none with
        ``project_output_onto``), labels ``L{l}N{i}``. With ``apply_ln`` and a projection the
        cached-scale norm is applied analytically (no ``[..., d_mlp, d_model]`` tensor)."""
        layer = self._layer(layer)
        pos = _slice(pos_slice)
        neurons = _neurons(neuron_slice)
        idx = neurons.apply(torch.arange(self.model.cfg.d_mlp), dim=0).tolist()
        labels = [f"L{lay}N{i}" for lay in range(layer) for i in idx]
        proj = project_output_onto
        squeeze = proj is not None and proj.ndim == 1
        if squeeze:
            proj = proj[:, None]
        folded = apply_ln and proj is not None
        parts = []
        if folded:
            ref = pos.apply(self._resid_into(layer, mlp_input), dim=-2)
            has_pos = ref.ndim - int(self.has_batch_dim) - 1 >= 1
            divisor = self._ln_divisor(layer, mlp_input, pos, Slice(None), has_pos)
        for lay in range(layer):
            if folded:
                w = neurons.apply(self._neuron_out(lay), dim=0)
                if divisor is not None:
                    w = w - w.mean(-1, keepdim=True)
                acts = neurons.apply(pos.apply(self._get(f"blocks.{lay}.mlp.hook_post"),
                                               dim=-2), dim=-1)
                if divisor is not None:
                    acts = acts / divisor
                parts.append(acts[..., None] * (w @ proj.to(w.dtype)))
            else:
                parts.append(self.get_neuron_results(lay, neurons, pos, proj))
        if parts:
            stack = torch.cat(parts, dim=-2).movedim(-2, 0)
        else:
            empty = self._empty(pos)
            stack = empty if proj is None else empty.new_zeros((*empty.shape[:-1], proj.shape[-1]))
        if incl_remainder:
            target = pos.apply(self._resid_into(layer, mlp_input), dim=-2)
            if folded:
                target = self.apply_ln_to_stack(target[None], layer, mlp_input, pos)[0]
            if proj is not None:
                target = target @ proj.to(target.dtype)
            stack = torch.cat([stack, (target - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln and not folded:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice=pos)
        if squeeze:
            stack = stack.squeeze(-1)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False,
                        mode: str = "all", apply_ln: bool = False, pos_slice: Any = None,
                        incl_embeds: bool = True, return_labels: bool = False):
        """The stream entering ``layer`` (its MLP with ``mlp_input``) as the embedding
        (``embed``, ``pos_embed``; ``ln_pre`` for a pre-norm model) plus every ``attn_out`` and
        ``mlp_out`` before it: ``[components, batch, pos, d_model]``."""
        layer = self._layer(layer)
        if mode not in ("all", "mlp", "attn"):
            raise InputError(f"mode must be 'all', 'mlp' or 'attn', got {mode!r}.")
        pos = _slice(pos_slice)
        parts = self._embeds(pos) if incl_embeds else []
        for lay in range(layer + int(mlp_input)):
            for kind in ("attn", "mlp"):
                if mode in ("all", kind) and (kind == "attn" or lay < layer):
                    out = self._get(f"blocks.{lay}.hook_{kind}_out")
                    parts.append((f"{lay}_{kind}_out", pos.apply(out, dim=-2)))
        labels = [name for name, _ in parts]
        stack = torch.stack([t for _, t in parts]) if parts else self._empty(pos)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice=pos)
        return (stack, labels) if return_labels else stack

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False,
                                     pos_slice: Any = None, return_labels: bool = False,
                                     project_output_onto: Tensor | None = None):
        """The stream entering ``layer`` as every head, every neuron (or MLP with
        ``expand_neurons=False``), the embedding (``embed``, ``pos_embed`` / ``ln_pre``) and
        the summed biases (``bias``: ``b_O`` and ``b_out``, LayerScale applied), in
        TransformerLens's order. Sums exactly to the stream (with ``apply_ln``: to its
        cached-scale normalisation; with ``project_output_onto``: projected)."""
        layer = self._layer(layer)
        pos = _slice(pos_slice)
        proj = project_output_onto
        squeeze = proj is not None and proj.ndim == 1
        if squeeze:
            proj = proj[:, None]

        def finish(stack: Tensor) -> Tensor:
            if apply_ln:
                stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice=pos)
            return stack if proj is None else stack @ proj.to(stack.dtype)

        heads, labels = self.stack_head_results(layer + int(mlp_input), pos_slice=pos,
                                                return_labels=True)
        parts = [finish(heads)]
        if layer > 0:
            if expand_neurons:
                neurons, nl = self.stack_neuron_results(
                    layer, pos_slice=pos, return_labels=True, apply_ln=apply_ln,
                    project_output_onto=proj, mlp_input=mlp_input)
                parts.append(neurons)
            else:
                mlps, nl = self.decompose_resid(layer, mlp_input, "mlp", pos_slice=pos,
                                                incl_embeds=False, return_labels=True)
                parts.append(finish(mlps))
            labels = labels + nl
        embeds = self._embeds(pos)
        parts += [finish(t[None]) for _, t in embeds]
        labels = labels + [name for name, _ in embeds]
        bias = self.model.accumulated_bias(layer, mlp_input, include_mlp_biases=expand_neurons)
        ref = embeds[0][1]
        parts.append(finish(bias.to(ref.dtype).expand(ref.shape)[None]))
        labels.append("bias")
        stack = torch.cat(parts)
        if squeeze:
            stack = stack.squeeze(-1)
        return (stack, labels) if return_labels else stack

    # ---- logits ---------------------------------------------------------------------------------
    def logit_attrs(self, residual_stack: Tensor, tokens: Any, incorrect_tokens: Any = None,
                    pos_slice: Any = None, batch_slice: Any = None, has_batch_dim: bool = True,
                    pooled: bool = False) -> Tensor:
        """Direct logit attribution of each component of ``residual_stack`` (the stream after
        the last block, ``[components, batch, pos, d_model]``) to the classes ``tokens`` (an
        int, a zero-shot class name, or one class per image ``[batch]``), minus
        ``incorrect_tokens`` if given.

        ``pooled=False`` (TransformerLens): ``[components, batch, pos]``, each token read as
        if the head read it alone (``model.tokens_to_residual_directions``); for class-token
        pooling the logit is at the class token, for average pooling the mean over the
        patches. ``pooled=True``: ``[components, batch]``, each token read along its own
        direction with its pooling weight (`patchlens.model.readout`), so that
        ``attrs.sum(0) + cache.logit_offset(tokens) == logits[:, tokens]`` for a complete
        decomposition (``decompose_resid``, ``get_full_resid_decomposition``, ...)."""
        dirs = self._directions(tokens, pooled, batch_slice)
        if incorrect_tokens is not None:
            dirs = dirs - self._directions(incorrect_tokens, pooled, batch_slice)
        scaled = self.apply_ln_to_stack(residual_stack, -1, pos_slice=pos_slice,
                                        batch_slice=batch_slice, has_batch_dim=has_batch_dim)
        per_image = dirs.ndim == (3 if pooled else 2)
        if pooled:
            if _slice(pos_slice).mode != "identity":
                raise InputError("pooled=True reads every token: pass the full stack (no "
                                 "pos_slice).")
            if scaled.shape[-2] != dirs.shape[-2]:
                raise InputError(f"pooled=True needs the stack's position axis to hold every "
                                 f"token ({dirs.shape[-2]}), got shape {tuple(scaled.shape)}.")
            return (scaled * dirs).sum((-1, -2))
        if per_image and has_batch_dim and scaled.ndim == 4:
            dirs = dirs.unsqueeze(-2)
        return (scaled * dirs).sum(-1)

    def logit_offset(self, tokens: Any, incorrect_tokens: Any = None) -> Tensor:
        """The part of the logits (of ``tokens`` minus ``incorrect_tokens``) that does not
        depend on the residual stream: the head's bias and the final norm's bias read along
        the head (divided by a zero-shot head's cached embedding norm). ``[batch]`` or a
        scalar."""
        def one(t):
            ro = readout(self.model, self._classes(t), self._n_patches())
            norm = self._embed_norm() if ro.embed_norm else None
            return ro.bias + (ro.norm_bias if norm is None else ro.norm_bias / norm)

        out = one(tokens)
        return out if incorrect_tokens is None else out - one(incorrect_tokens)

    def _n_patches(self) -> int:
        return self._resid_into(0, False).shape[-2] - self.model.cfg.n_prefix

    def _embed_norm(self) -> Tensor:
        return self._get("hook_image_embed").norm(dim=-1)

    def _classes(self, tokens: Any):
        t = tokens
        if isinstance(t, Tensor) and t.ndim == 1 and self.has_batch_dim:
            b = self._resid_into(0, False).shape[0]
            if t.numel() not in (1, b):
                raise InputError(f"Got {t.numel()} classes for a cache of {b} images; pass "
                                 "one class per image or a single class.")
        return t

    def _directions(self, tokens: Any, pooled: bool, batch_slice: Any) -> Tensor:
        """``[(batch), (pos), d_model]`` directions for ``tokens`` (see `logit_attrs`)."""
        cfg = self.model.cfg
        classes = self._classes(tokens)
        if not pooled and cfg.zeroshot is None:
            return residual_directions(self.model, classes)
        ro = readout(self.model, classes, self._n_patches())
        dirs = ro.directions  # [*k, pos, d]
        if not pooled:
            if cfg.distilled or cfg.pooling == "token_avg":
                residual_directions(self.model, classes)  # raises the explanation
            token = 0 if cfg.pooling == "token" else cfg.n_prefix
            dirs = dirs[..., token, :] * (1 if cfg.pooling == "token" else self._n_patches())
        if ro.embed_norm:  # one norm per image: [b, (pos), d]
            norm = _slice(batch_slice).apply(self._embed_norm(), dim=0)
            dirs = dirs / norm.view(-1, *[1] * (2 if pooled else 1))
        return dirs


def _neurons(neuron_slice: Any) -> Slice:
    """Neuron selection that never collapses the neuron axis (an int selects ``[int]``)."""
    s = _slice(neuron_slice)
    if s.mode == "int":
        return Slice([s.slice])
    return s
