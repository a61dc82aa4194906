"""`HookedViT`: a Vision Transformer with TransformerLens hook points on every activation."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedRootModule

from patchlens.checks import all_finite, is_int
from patchlens.errors import InputError, unknown_hook_error
from patchlens.model.cache import ViTActivationCache
from patchlens.model.components import Block, Embed, LayerNorm, init_weights_
from patchlens.model.config import ViTConfig
from patchlens.model.hooks import (
    OPTION_FLAGS,
    HookDecl,
    HookSpec,
    build_aliases,
    build_specs,
    declare_hooks,
    required_options,
    spec_of,
)
from patchlens.model.layout import TokenLayout
from patchlens.model.pooling import AttentionalPooler, AttentionPool
from patchlens.model.rotary import RotaryTables, Rotation
from patchlens.model.weights import WeightViews

ReturnType = Literal["logits", "pooled", "resid", None]
RETURN_TYPES = ("logits", "pooled", "resid", None)


class HookedViT(WeightViews, HookedRootModule):
    """A ViT whose activations are all named `HookPoint`s (TransformerLens conventions).

    Build one from a source model with `from_timm`, `from_hf` or `from_pretrained`, or from a
    `ViTConfig` (random init). ``model(images)`` takes normalised images
    ``[batch, channels, height, width]`` and returns logits ``[batch, n_classes]`` (pooled
    features ``[batch, d_pooled]`` for a headless model).
    """

    def __init__(self, cfg: ViTConfig, init: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        resid = "batch pos d_model"
        declare_hooks(self, {
            "hook_embed": HookDecl(resid, "patch embeddings and prefix tokens", alias="tok_embed"),
            "hook_pos_embed": HookDecl(resid, "position embedding per token (0 where none)",
                                       alias="pos_embed", note="models with a position embedding"),
            "hook_full_embed": HookDecl(resid, "token + position embedding", alias="embed"),
        })
        self.ln_pre = LayerNorm(cfg.d_model, cfg.eps) if cfg.pre_norm else None
        if cfg.pre_norm:
            declare_hooks(self, {"hook_ln_pre": HookDecl(resid, "after the pre-norm (CLIP)",
                                                         alias="ln_pre")})
        else:
            self.hook_ln_pre = None
        self.rotary = RotaryTables(cfg) if cfg.rope else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        post_pool = cfg.final_norm == "post_pool"
        pools = {"map": AttentionPool, "coca": AttentionalPooler}
        if post_pool:  # modules are registered in forward order (the hook schema's order)
            self.attn_pool = pools[cfg.pooling](cfg) if cfg.pooling in pools else None
        self.ln_final = (
            LayerNorm(cfg.d_pooled if post_pool else cfg.d_model, cfg.eps,
                      "batch d_pooled" if post_pool else resid)
            if cfg.final_norm != "none"
            else None
        )
        if not post_pool:
            self.attn_pool = pools[cfg.pooling](cfg) if cfg.pooling in pools else None
        pooled = {"hook_pooled": HookDecl("batch d_pooled", "pooled features fed to the head",
                                          alias="pooled")}
        if cfg.distilled:
            pooled["hook_pooled_dist"] = HookDecl("batch d_pooled", "distillation token, pooled",
                                                  alias="pooled_dist")
        else:
            self.hook_pooled_dist = None
        declare_hooks(self, pooled)
        self._build_output_head()
        if init:
            init_weights_(self)
        self.setup()

    def _build_output_head(self) -> None:
        """The modules after pooling, in forward order: the zero-shot image projection and
        normalisation (``cfg.zeroshot``), the classification head(s) and ``hook_logits``."""
        cfg = self.cfg
        zs = cfg.zeroshot
        self.image_proj = (nn.Linear(cfg.d_pooled, zs["embed_dim"],
                                     bias=bool(zs.get("image_proj_bias", False)))
                           if zs and zs["image_proj"] else None)
        if zs:
            declare_hooks(self, {
                "hook_image_embed": HookDecl("batch embed_dim", "image embedding (CLIP "
                                             "encode_image), unnormalised", alias="image_embed"),
                "hook_normalized_embed": HookDecl("batch embed_dim", "L2-normalised image "
                                                  "embedding", alias="normalized_embed"),
            })
        else:
            self.hook_image_embed = self.hook_normalized_embed = None
        d_in = zs["embed_dim"] if zs else cfg.d_pooled
        self.head = nn.Linear(d_in, cfg.n_classes, bias=cfg.head_bias) if cfg.n_classes else None
        self.head_dist = (
            nn.Linear(cfg.d_pooled, cfg.n_classes, bias=cfg.head_bias)
            if cfg.n_classes and cfg.distilled
            else None
        )
        declare_hooks(self, {"hook_logits": HookDecl("batch n_classes", "classification logits",
                                                     alias="logits",
                                                     note="models with a head")})

    def set_output_head(self, head: nn.Linear, zeroshot: dict | None,
                        image_proj: nn.Linear | None = None) -> None:
        """Replace the classification head (in place), e.g. by a CLIP zero-shot head (see
        `patchlens.zeroshot`): ``head`` maps the (normalised, with ``zeroshot``) embedding to
        the logits; ``zeroshot`` = ``{"embed_dim", "image_proj", ...}`` or None for a plain
        head on the pooled features. The hook schema is rebuilt."""
        cfg = self.cfg
        # mutated in place: the blocks share this config object
        cfg.n_classes = cfg.d_vocab = head.out_features
        cfg.head_bias = head.bias is not None
        cfg.zeroshot = zeroshot
        for name in ("image_proj", "hook_image_embed", "hook_normalized_embed", "head",
                     "head_dist", "hook_logits"):
            if name in self._modules:
                del self._modules[name]
        p = next(self.parameters())
        self._build_output_head()
        self.to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            self.head.weight.copy_(head.weight)
            if head.bias is not None:
                self.head.bias.copy_(head.bias)
            if image_proj is not None:
                self.image_proj.weight.copy_(image_proj.weight)
                if image_proj.bias is not None:
                    self.image_proj.bias.copy_(image_proj.bias)
        self.setup()

    # ---- hook schema ------------------------------------------------------------------------
    def setup(self) -> None:
        """TransformerLens ``setup`` plus the hook schema (every hook point must be declared)."""
        super().setup()
        self._specs_cache: dict[tuple, dict[str, HookSpec]] = {}
        self.hook_specs  # noqa: B018  (fails now if a hook point was not declared)

    @property
    def hook_specs(self) -> dict[str, HookSpec]:
        """The hook schema: one `HookSpec` (axes, layer, stage, order, opt-in flag, alias) per
        hook point, in forward order, for the current config flags."""
        flags = {k: bool(getattr(self.cfg, k)) for k in OPTION_FLAGS}
        key = tuple(sorted(flags.items()))
        if key not in self._specs_cache:
            self._specs_cache[key] = build_specs(self, flags)
        return self._specs_cache[key]

    @property
    def hook_aliases(self) -> dict[str, dict[int | None, str]]:
        """Short names `Site` accepts: ``alias -> {layer (None outside blocks): hook name}``."""
        specs = self.hook_specs
        key = ("aliases", id(specs))
        if key not in self._specs_cache:
            self._specs_cache[key] = build_aliases(specs)
        return self._specs_cache[key]

    def hook_spec(self, name: str) -> HookSpec:
        """The `HookSpec` of hook ``name`` (`UnknownHookError` with close matches if none)."""
        return spec_of(self.hook_specs, name)

    def options_for(self, hooks: Sequence[str]) -> dict[str, bool]:
        """The `options` flags that make the opt-in hooks among ``hooks`` fire."""
        return required_options(self.hook_spec(h) for h in hooks)

    # ---- TransformerLens-compatible aliases -------------------------------------------------
    @property
    def layout(self) -> TokenLayout:
        """Token layout at the native image size (see `layout_for` for other sizes)."""
        return TokenLayout.from_config(self.cfg)

    def layout_for(self, image_size: tuple[int, int]) -> TokenLayout:
        """Token layout of images of ``image_size`` (H, W) pixels."""
        ph, pw = self.cfg.patch_size
        if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
                or not all(is_int(v) and v >= p for v, p in zip(image_size, (ph, pw)))):
            raise InputError(f"image_size must be (H, W) ints of at least one patch "
                             f"{(ph, pw)}, got {image_size!r}.")
        return TokenLayout.from_config(self.cfg, (image_size[0] // ph, image_size[1] // pw))

    @property
    def W_U(self) -> Float[Tensor, "d_pooled n_classes"]:
        """The classification head's weight as a TransformerLens unembedding ``[d, classes]``."""
        if self.head is None:
            raise InputError("This model is headless (n_classes == 0): it has no W_U.")
        return self.head.weight.T

    @property
    def b_U(self) -> Tensor:
        if self.head is None or self.head.bias is None:
            return self.W_U.new_zeros(self.cfg.n_classes)
        return self.head.bias

    def tokens_to_residual_directions(self, tokens: Any) -> Float[Tensor, "... d_model"]:
        """TransformerLens's name for a classifier's class directions: ``tokens`` are class
        indices (an int or a tensor of them; a class name for a zero-shot head is refused
        here, see below). Returns ``[*tokens.shape, d_model]``: the head's column times the
        final norm's weight, the direction the (centred, cached-scale normalised) residual
        stream of the token the head reads is dotted with to give the logit. Exact for
        class-token and average pooling (then the logit is the mean over patches); refused
        with an explanation for attention pooling, distilled heads, class-token + patch-mean
        pooling and zero-shot heads (use ``cache.logit_attrs(..., pooled=True)``)."""
        from patchlens.model.readout import residual_directions

        return residual_directions(self, tokens)

    def accumulated_bias(self, layer: int, mlp_input: bool = False,
                         include_mlp_biases: bool = True) -> Float[Tensor, "d_model"]:
        """The attention (``b_O``) and MLP (``b_out``) output biases added to the residual
        stream before block ``layer`` (and block ``layer``'s ``b_O`` with ``mlp_input``),
        LayerScale applied: what TransformerLens's decompositions call ``bias``."""
        total = self.W_E.new_zeros(self.cfg.d_model)
        for i, block in enumerate(self.blocks[: layer + int(mlp_input)]):
            g1 = block.ls1.gamma if block.ls1 is not None else 1.0
            total = total + block.attn.b_O * g1
            if include_mlp_biases and i < layer:
                g2 = block.ls2.gamma if block.ls2 is not None else 1.0
                total = total + block.mlp.b_out * g2
        return total

    # ---- forward ----------------------------------------------------------------------------
    def check_images(self, x: Tensor) -> None:
        """Raise `InputError` if ``x`` is not a valid image batch for this model."""
        cfg = self.cfg
        if not isinstance(x, Tensor):
            raise InputError(
                f"HookedViT takes a float tensor [batch, {cfg.in_channels}, H, W], got "
                f"{type(x).__name__}; use model.preprocess(...) for images, paths or arrays."
            )
        if not x.is_floating_point():
            raise InputError(
                f"Images must be a float tensor (normalised as in model.preprocess), got dtype "
                f"{x.dtype}; use model.preprocess(x) or x.float()."
            )
        if x.ndim != 4:
            raise InputError(
                f"Images must have shape [batch, {cfg.in_channels}, H, W], got {tuple(x.shape)}; "
                "add a batch dimension with x[None] for a single image."
            )
        dtype = self.embed.proj.weight.dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise InputError(
                f"The images are {x.dtype} but the model is {dtype}; patchlens does not cast "
                f"silently (a float64 model is used for exact results). Convert them with "
                f"x.to({dtype}) or make them with model.preprocess(...), which returns the "
                "model's dtype and device."
            )
        if x.shape[1] != cfg.in_channels:
            raise InputError(
                f"The model takes {cfg.in_channels} channels, got images of shape "
                f"{tuple(x.shape)} ({x.shape[1]} channels)."
            )
        hw = tuple(x.shape[-2:])
        if cfg.dynamic_img_size:
            if hw[0] % cfg.patch_size[0] or hw[1] % cfg.patch_size[1]:
                raise InputError(
                    f"Image size {hw} is not a multiple of the patch size {cfg.patch_size}."
                )
        elif hw != tuple(cfg.image_size):
            raise InputError(
                f"The model takes {cfg.image_size[0]}x{cfg.image_size[1]} images, got {hw[0]}x"
                f"{hw[1]} (shape {tuple(x.shape)}); resize with model.preprocess, or convert the "
                "source model with dynamic_img_size=True."
            )
        if not all_finite(x):
            raise InputError(
                "The images contain NaN or infinite values; patchlens refuses them because every "
                "activation downstream would be NaN. Clean the input (torch.nan_to_num) first."
            )

    def _warn_if_unnormalised(self, x: Tensor) -> None:
        """Warn once per model when ``x`` looks like raw [0, 1] images (see
        `patchlens.model.preprocess.looks_unnormalised`)."""
        if getattr(self, "_warned_unnormalised", False):
            return
        from patchlens.model.preprocess import looks_unnormalised

        if looks_unnormalised(self.cfg, x):
            self._warned_unnormalised = True
            mean, std = self.cfg.data_mean, self.cfg.data_std
            warnings.warn(
                f"The images are all in [0, 1], but this model expects them normalised with "
                f"mean {mean} and std {std} (a black pixel becomes "
                f"{min(-m / s for m, s in zip(mean, std)):.2f}). Pass model.preprocess(images) "
                "(or (images - mean) / std). This warning is shown once per model.",
                UserWarning, stacklevel=3)

    def embed_images(self, x: Float[Tensor, "batch chan h w"]) -> Float[Tensor, "batch pos d"]:
        """The residual stream entering block 0 (embedding, position embedding, pre-norm)."""
        tokens, pos = self.embed(x)
        tokens = self.hook_embed(tokens)
        if pos is not None:
            tokens = tokens + self.hook_pos_embed(pos)
        resid = self.hook_full_embed(tokens)
        if self.ln_pre is not None:
            resid = self.hook_ln_pre(self.ln_pre(resid))
        return resid

    def rotation(self, resid: Float[Tensor, "batch pos d"],
                 grid: tuple[int, int] | None = None) -> Rotation:
        """The rotary tables for ``resid``'s patch grid (``grid``, or found from the number of
        patch tokens as `forward` describes); cached per grid, dtype and device."""
        n_patches = resid.shape[1] - self.cfg.n_prefix
        if grid is None:
            grid = self.rotary.grid_for(n_patches)
            if grid is None:
                raise InputError(
                    f"Cannot tell the patch grid of a residual stream with {n_patches} patch "
                    "tokens (not the native grid and no recent image of that size); pass "
                    "grid=(rows, cols) with start_at_layer."
                )
        elif grid[0] * grid[1] != n_patches:
            raise InputError(f"grid={tuple(grid)} has {grid[0] * grid[1]} patches but the "
                             f"residual stream has {n_patches} patch tokens.")
        return self.rotary.tables(grid, resid.dtype, resid.device)

    def pool(self, resid: Float[Tensor, "batch pos d"]) -> tuple[Tensor, Tensor | None]:
        """Final norm and pooling of the residual stream after the last block: returns the
        pooled features (``hook_pooled``, ``[batch, d_pooled]``) and, for distilled models, the
        distillation token's (``hook_pooled_dist``)."""
        cfg = self.cfg
        post_norm = self.ln_final if cfg.final_norm == "post_pool" else None
        if self.ln_final is not None and cfg.final_norm == "pre_pool":
            resid = self.ln_final(resid)
        n_prefix = cfg.n_prefix
        tokens = resid if cfg.pool_include_prefix else resid[:, n_prefix:]
        if cfg.pooling == "token":
            pooled = resid[:, 0]
        elif cfg.pooling == "avg":
            pooled = tokens.mean(dim=1)
        elif cfg.pooling == "max":
            pooled = tokens.amax(dim=1)
        elif cfg.pooling == "avgmax":
            pooled = 0.5 * (tokens.amax(dim=1) + tokens.mean(dim=1))
        elif cfg.pooling == "token_avg":
            pooled = torch.cat([resid[:, 0], resid[:, n_prefix:].mean(dim=1)], dim=-1)
        elif cfg.pooling in ("map", "coca"):
            pooled = self.attn_pool(tokens)
        else:
            return resid, None
        pooled = self.hook_pooled(post_norm(pooled) if post_norm is not None else pooled)
        if not cfg.distilled:
            return pooled, None
        dist = resid[:, 1]
        return pooled, self.hook_pooled_dist(post_norm(dist) if post_norm is not None else dist)

    def unembed(self, pooled: Tensor, pooled_dist: Tensor | None = None) -> Tensor:
        """Classification head(s) on the pooled features (distilled models average two heads)."""
        if self.head is None:
            return pooled
        if self.hook_image_embed is not None:  # zero-shot: project, L2-normalise, then the head
            emb = self.hook_image_embed(self.image_proj(pooled) if self.image_proj else pooled)
            pooled = self.hook_normalized_embed(F.normalize(emb, dim=-1))
        logits = self.head(pooled)
        if self.head_dist is not None:
            logits = (logits + self.head_dist(pooled_dist)) / 2
        return self.hook_logits(logits)

    def forward(
        self,
        x: Tensor,
        *,
        return_type: ReturnType = "logits",
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        grid: tuple[int, int] | None = None,
    ) -> Tensor | None:
        """Run the model.

        Args:
            x: normalised images ``[batch, chan, H, W]``, or, with ``start_at_layer=l``, the
                residual stream ``[batch, pos, d_model]`` entering block ``l``.
            return_type: ``"logits"`` (pooled features if headless), ``"pooled"``, ``"resid"``
                (the residual stream after the last block run) or None.
            start_at_layer: skip the embedding and blocks before this layer.
            stop_at_layer: stop before this block and return the residual stream entering it.
            grid: rotary models with ``start_at_layer``: the patch grid (rows, cols) of the
                residual stream; by default the most recent grid with that many patches (the
                one of the last image forward pass), else the native grid.
        """
        if return_type not in RETURN_TYPES:
            hint = (" A classifier's loss needs labels: compute it from the logits, e.g. "
                    "F.cross_entropy(model(x), labels)." if return_type == "loss" else "")
            raise InputError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}."
                             + hint)
        n = self.cfg.n_layers
        start = 0 if start_at_layer is None else _check_layer(start_at_layer, n, "start_at_layer")
        stop = n if stop_at_layer is None else _check_layer(stop_at_layer, n, "stop_at_layer")
        if start_at_layer is None:
            self.check_images(x)
            self._warn_if_unnormalised(x)
            ph, pw = self.cfg.patch_size
            grid = (x.shape[-2] // ph, x.shape[-1] // pw)
            resid = self.embed_images(x)
        else:
            if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != self.cfg.d_model:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise InputError(
                    f"With start_at_layer the input is the residual stream [batch, pos, "
                    f"{self.cfg.d_model}], got {shape}."
                )
            resid = x
        rope = None
        if self.rotary is not None and (start < stop or start_at_layer is None):
            rope = self.rotation(resid, grid)  # an image pass records its grid for resuming
        for block in self.blocks[start:stop]:
            resid = block(resid, rope)
        if stop_at_layer is not None or return_type == "resid":
            return resid
        pooled, pooled_dist = self.pool(resid)
        if return_type == "pooled":
            return pooled
        logits = self.unembed(pooled, pooled_dist)
        return None if return_type is None else logits

    # ---- hooks --------------------------------------------------------------------------------
    def check_hook_names(self, names: Sequence[str | Callable]) -> None:
        """Raise `UnknownHookError` (with close matches) for a name the model does not have."""
        for name in names:
            if isinstance(name, str) and name not in self.hook_dict:
                raise unknown_hook_error(name, self.hook_dict)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end=True, clear_contexts=False):
        """TransformerLens ``hooks()``; unknown hook names raise before anything is attached."""
        fwd_hooks, bwd_hooks = list(fwd_hooks), list(bwd_hooks)
        self.check_hook_names([n for n, _ in fwd_hooks] + [n for n, _ in bwd_hooks])
        with super().hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts) as m:
            yield m

    def run_with_cache(self, *args: Any, names_filter=None, incl_bwd: bool = False,
                       metric: Callable[[Tensor], Tensor] | None = None, **kwargs: Any):
        """TransformerLens ``run_with_cache``; returns ``(output, cache)``, a
        `patchlens.model.cache.ViTActivationCache` (TransformerLens's `ActivationCache` with
        exact residual-stream decompositions and direct logit attribution for ViTs).

        With ``incl_bwd=True`` the cache also holds ``name + "_grad"``: the gradient of
        ``metric(output)`` (a scalar) with respect to each cached activation, computed with
        `torch.autograd.grad` (parameters' ``.grad`` stay as they were). Without ``metric`` it
        is TransformerLens's behaviour: ``output.backward()``, which needs a scalar output
        and accumulates into the parameters' ``.grad``.
        """
        if isinstance(names_filter, str):
            self.check_hook_names([names_filter])
        elif isinstance(names_filter, (list, tuple)):
            names_filter = list(names_filter)
            self.check_hook_names(names_filter)
        if metric is not None and not incl_bwd:
            raise InputError("metric= is the scalar to differentiate with incl_bwd=True; pass "
                             "incl_bwd=True too, or drop metric.")
        remove_batch = bool(kwargs.get("remove_batch_dim"))
        if incl_bwd and metric is not None:
            out, cache = self._cache_with_grads(args, names_filter, metric, kwargs)
        else:
            try:
                out, cache = super().run_with_cache(*args, names_filter=names_filter,
                                                    incl_bwd=incl_bwd, **kwargs)
            except RuntimeError as e:
                if incl_bwd and "scalar outputs" in str(e):
                    raise InputError(
                        "run_with_cache(incl_bwd=True) calls output.backward(), which needs a "
                        "scalar output; this model returns one value per image and class. Pass "
                        "metric=fn with fn(output) -> scalar (e.g. lambda lg: lg[:, 3].sum())."
                    ) from e
                raise
        return out, ViTActivationCache(cache, self, has_batch_dim=not remove_batch)

    def _cache_with_grads(self, args, names_filter, metric, kwargs):
        """Forward with caching hooks, then ``d metric(output) / d activation`` for each."""
        from patchlens.model.capture import Capture, differentiable_input

        if kwargs.pop("remove_batch_dim", False):
            raise InputError("remove_batch_dim is not supported with metric=; index [0] instead.")
        if names_filter is None:
            names = list(self.hook_dict)
        elif isinstance(names_filter, str):
            names = [names_filter]
        elif callable(names_filter):
            names = [n for n in self.hook_dict if names_filter(n)]
        else:
            names = list(names_filter)
        cap = Capture(names, keep_graph=True)
        x, *rest = args
        with torch.enable_grad(), self.hooks(fwd_hooks=cap.hooks()):
            out = self(differentiable_input(x), *rest, **kwargs)
            value = metric(out)
            if not isinstance(value, Tensor) or value.numel() != 1:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise InputError(f"metric must return a scalar for incl_bwd=True, got {got}; "
                                 "reduce it, e.g. with .sum().")
            grads = cap.gradients(value.reshape(()))
        cache = cap.detached()
        cache.update({f"{n}_grad": g for n, g in grads.items()})
        return out.detach(), cache

    @contextlib.contextmanager
    def options(self, **flags: bool) -> Iterator[HookedViT]:
        """Temporarily set config flags, e.g. ``use_attn_result=True``,
        ``use_split_qkv_input=True`` or ``use_hook_mlp_in=True`` (the opt-in hooks
        ``hook_result`` / ``hook_q_input``... / ``hook_mlp_in``)."""
        allowed = set(OPTION_FLAGS)
        bad = set(flags) - allowed
        if bad:
            raise InputError(f"options() takes {sorted(allowed)}, got {sorted(bad)}.")
        old = {k: getattr(self.cfg, k) for k in flags}
        try:
            for k, v in flags.items():
                setattr(self.cfg, k, v)
            yield self
        finally:
            for k, v in old.items():
                setattr(self.cfg, k, v)

    # ---- sparse autoencoders ------------------------------------------------------------------
    def add_sae(self, sae: Any, hook: str | None = None, *,
                use_error_term: bool = False) -> HookedViT:
        """Splice a sparse autoencoder in after hook point ``hook`` (default: the hook it was
        trained on, ``sae.hook_name``), replacing any SAE already there.

        The hook point keeps holding the model's activation; the SAE's hook points follow it
        (``<hook>.hook_sae_input``, ``.hook_sae_acts_pre``, ``.hook_sae_acts_post`` (features),
        ``.hook_sae_recons``, ``.hook_sae_error``, ``.hook_sae_output``; short names
        ``sae_acts_post`` etc. for `Site`), and the rest of the network reads
        ``hook_sae_output``. With ``use_error_term=True`` that is ``recons + error`` = the
        activation (to rounding) unless a feature is patched. See `patchlens.model.splice`."""
        from patchlens.model.splice import assign_aliases, splice, splices

        if not isinstance(use_error_term, bool):
            raise InputError(f"use_error_term must be True or False, got {use_error_term!r}.")
        hook = self._sae_hook(sae, hook)
        splice(self, sae, hook, use_error_term)
        self._reset_sae_schema(assign_aliases, splices)
        return self

    def reset_saes(self, hooks: str | Sequence[str] | None = None) -> None:
        """Remove the SAEs spliced at ``hooks`` (default: all of them)."""
        from patchlens.model.splice import assign_aliases, splices, unsplice

        spliced = splices(self)
        names = list(spliced) if hooks is None else [hooks] if isinstance(hooks, str) else list(hooks)
        for h in names:
            if h not in spliced:
                raise InputError(f"No SAE is spliced at {h!r}; spliced: {sorted(spliced) or 'none'}.")
            if any(hp.fwd_hooks or hp.bwd_hooks for _, hp in spliced[h].named_modules()):
                raise InputError(f"The SAE at {h} has hooks attached; remove them "
                                 "(model.reset_hooks()) first.")
        for h in names:
            unsplice(self, h)
        self._reset_sae_schema(assign_aliases, splices)

    @contextlib.contextmanager
    def saes(self, saes: Any = (), *, use_error_term: bool = False) -> Iterator[HookedViT]:
        """Splice ``saes`` (one SAE, a list, or ``{hook: sae}``) for the duration of the block;
        whatever was spliced at those hooks before is restored afterwards."""
        if isinstance(saes, dict):
            items = list(saes.items())
        else:
            items = [(None, s) for s in (saes if isinstance(saes, (list, tuple)) else [saes])]
        before = self.acts_to_saes
        modes = {h: sp.use_error_term for h, sp in self._splices().items()}
        added: list[str] = []
        try:
            for hook, sae in items:
                h = self._sae_hook(sae, hook)
                self.add_sae(sae, h, use_error_term=use_error_term)
                added.append(h)
            yield self
        finally:
            for h in dict.fromkeys(added):
                if h in before:
                    self.add_sae(before[h], h, use_error_term=modes[h])
                elif h in self._splices():
                    self.reset_saes(h)

    @property
    def acts_to_saes(self) -> dict[str, Any]:
        """``{hook name: SAE}`` of the SAEs spliced into the model."""
        return {h: sp.sae for h, sp in self._splices().items()}

    def _splices(self):
        from patchlens.model.splice import splices

        return splices(self)

    def _sae_hook(self, sae: Any, hook: str | None) -> str:
        for attr in ("encode", "decode", "W_dec", "b_dec"):
            if not hasattr(sae, attr):
                raise InputError(f"{type(sae).__name__} lacks {attr}: add_sae takes a sparse "
                                 "autoencoder with encode, decode, W_dec and b_dec (see "
                                 "patchlens.sae).")
        if hook is not None and not isinstance(hook, str):
            raise InputError(f"hook must be a hook name (e.g. 'blocks.3.hook_resid_post') or None "
                             f"(the SAE's hook_name), got {hook!r}.")
        name = hook if hook is not None else getattr(sae, "hook_name", None)
        if name is None and getattr(sae, "cfg", None) is not None:  # SAELens objects
            meta = getattr(sae.cfg, "metadata", None)
            name = getattr(meta, "hook_name", None) or getattr(sae.cfg, "hook_name", None)
        if not isinstance(name, str):
            raise InputError("Which hook? The SAE does not say (no hook_name): pass hook=, e.g. "
                             "model.add_sae(sae, hook='blocks.3.hook_resid_post').")
        self.check_hook_names([name])
        return name

    def _reset_sae_schema(self, assign_aliases, splices) -> None:
        self.setup()
        assign_aliases(self, splices(self))
        self.setup()

    def set_use_attn_result(self, on: bool) -> None:
        self.cfg.use_attn_result = on

    def set_use_split_qkv_input(self, on: bool) -> None:
        self.cfg.use_split_qkv_input = on

    def set_use_hook_mlp_in(self, on: bool) -> None:
        self.cfg.use_hook_mlp_in = on

    def hook_table(self, image_size: tuple[int, int] | None = None) -> list[dict[str, str]]:
        """One row per hook point: the schema (name, axes, opt-in flag, alias, what it holds)
        and the activation's shape on one image (opt-in hooks switched on to measure it)."""
        from patchlens.model.inspect import hook_table

        return hook_table(self, image_size)

    # ---- preprocessing ------------------------------------------------------------------------
    def preprocess(self, images: Any) -> Float[Tensor, "batch chan h w"]:
        """Turn PIL images, paths, numpy arrays or tensors into a normalised input batch, with
        the source model's own preprocessing (resize, crop, mean/std)."""
        from patchlens.model.preprocess import preprocess

        p = next(self.parameters())
        return preprocess(images, self.cfg).to(device=p.device, dtype=p.dtype)

    def to_image(self, x: Tensor) -> Float[Tensor, "... chan h w"]:
        """Undo the input normalisation: normalised images -> values in [0, 1] (for plots)."""
        from patchlens.model.preprocess import to_pixels

        return to_pixels(self.cfg, x.detach()).reshape(x.shape).clamp(0, 1)

    # ---- loading --------------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, cfg: ViTConfig, state_dict: dict[str, Tensor]) -> HookedViT:
        """Build a model from a config and a patchlens-layout state dict (strict)."""
        from patchlens.model.convert.common import load_strict

        model = cls(cfg, init=False)
        dtypes = {v.dtype for v in state_dict.values() if v.is_floating_point()}
        if len(dtypes) == 1:  # build in the checkpoint's dtype: float64 weights stay exact
            model.to(dtypes.pop())
        load_strict(model, state_dict)
        return model.eval()

    @classmethod
    def from_timm(
        cls,
        model_or_name: nn.Module | str,
        pretrained: bool = False,
        checkpoint_path: str | Path | None = None,
        **timm_kwargs: Any,
    ) -> HookedViT:
        """Convert a timm ``VisionTransformer`` (a model object or a timm name)."""
        from patchlens.model.convert.timm import from_timm

        return from_timm(cls, model_or_name, pretrained, checkpoint_path, **timm_kwargs)

    @classmethod
    def from_hf(cls, model_or_config_or_name: Any, **kwargs: Any) -> HookedViT:
        """Convert a Hugging Face ViT / DeiT / Dinov2 / CLIP vision model (object, config or name)."""
        from patchlens.model.convert.hf import from_hf

        return from_hf(cls, model_or_config_or_name, **kwargs)

    @classmethod
    def from_open_clip(
        cls, model_or_name: Any, pretrained: str | None = None, **kwargs: Any
    ) -> HookedViT:
        """Convert an open_clip CLIP model (object, ``.visual`` tower, or name + pretrained tag)."""
        from patchlens.model.convert.open_clip import from_open_clip

        return from_open_clip(cls, model_or_name, pretrained, **kwargs)

    @classmethod
    def from_pretrained(cls, name: str, **kwargs: Any) -> HookedViT:
        """Load by name: a zoo model (offline), ``open_clip:NAME@TAG``, ``hf:<repo>`` /
        ``org/repo`` (Hugging Face), or a timm model name; see `patchlens.model.sources`."""
        from patchlens.model.sources import from_pretrained

        return from_pretrained(cls, name, **kwargs)


def _check_layer(layer: int, n_layers: int, what: str) -> int:
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise InputError(f"{what} must be an int, got {layer!r}.")
    if layer < 0:
        layer += n_layers
    if not 0 <= layer <= n_layers:
        raise InputError(f"{what}={layer} is out of range for a model with {n_layers} layers.")
    return layer
