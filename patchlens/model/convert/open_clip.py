"""open_clip image towers -> (`ViTConfig`, patchlens state dict).

Two tower kinds are converted exactly:

- open_clip's own ``VisionTransformer`` (``ViT-*`` models, OpenAI CLIP, LAION, DataComp, CLIPA,
  ...): class token, ``ln_pre`` (or ``no_ln_pre``), token / average pooling with ``ln_post``
  on all tokens before pooling (``final_norm="pre_pool"``, open_clip's default, so
  TransformerLens' ``apply_ln_to_stack`` works) or after it (``final_ln_after_pool``),
  quick-GELU (``*-quickgelu``) or GELU,
  LayerScale (``ls_init_value``), per-head q/k LayerNorm (``qk_norm``), and the bare
  ``proj`` parameter ``[width, embed_dim]``, which becomes ``model.head`` (``head_bias=False``).
- ``TimmModel`` towers wrapping a timm ``VisionTransformer`` (SigLIP, ...): the trunk goes
  through the timm converter, the adapter's linear ``proj`` becomes ``model.head``.

``model(x)`` equals ``clip.encode_image(x)`` (unnormalised image features). `from_open_clip`
also records open_clip's eval preprocessing (mean/std, interpolation, resize mode) in the config.
Unsupported towers (``ModifiedResNet``, timm CNNs, attention poolers, scaled-cosine attention,
...) raise `UnsupportedModelError` naming the tower or feature.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from patchlens.errors import UnknownModelError, UnsupportedModelError
from patchlens.model.config import ViTConfig
from patchlens.model.convert.common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    activation_name,
    is_identity,
    layer_norm_keys,
    load_strict,
    rename,
)

_RESIZE = {"shortest": "shortest", "squash": "exact"}


def visual_tower(obj: Any) -> nn.Module:
    """The image tower of an open_clip ``CLIP`` / ``CustomTextCLIP`` (or the tower itself)."""
    if hasattr(obj, "visual") and isinstance(obj.visual, nn.Module):
        return obj.visual
    if isinstance(obj, nn.Module):
        return obj
    raise UnsupportedModelError(
        f"from_open_clip takes an open_clip model, its .visual tower or a model name, got "
        f"{type(obj).__name__}."
    )


def _layer_norm_eps(m: nn.Module, where: str) -> float:
    if not isinstance(m, nn.LayerNorm) or m.weight is None:
        raise UnsupportedModelError(
            f"open_clip {where} is a {type(m).__name__}; patchlens needs an affine LayerNorm."
        )
    return float(m.eps)


def _check_block(blk: nn.Module) -> tuple[bool, bool]:
    """Raise for block features patchlens cannot reproduce; return (qkv_bias, qk_norm)."""
    kind = type(blk).__name__
    if kind == "ResidualAttentionBlock":
        attn = blk.attn
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
            raise UnsupportedModelError("open_clip block attention with separate q/k/v dims.")
        if hasattr(blk, "ln_1_kv"):
            raise UnsupportedModelError("open_clip cross-attention blocks are not supported.")
        return attn.in_proj_bias is not None, False
    if kind == "CustomResidualAttentionBlock":
        attn = blk.attn
        unsupported = [
            ("scaled_cosine_attn", attn.logit_scale is not None),
            ("scale_heads", attn.head_scale is not None),
            ("scale_attn_inner", not is_identity(attn.ln_inner)),
            ("scale_attn", not is_identity(blk.ln_attn)),
            ("scale_fc", not is_identity(blk.mlp.ln)),
        ]
        bad = [name for name, on in unsupported if on]
        if bad:
            raise UnsupportedModelError(
                f"open_clip CustomResidualAttentionBlock with {', '.join(bad)} is not supported "
                "(patchlens reproduces plain pre-norm blocks, optionally with qk_norm)."
            )
        return attn.in_proj_bias is not None, not is_identity(attn.ln_q)
    raise UnsupportedModelError(f"open_clip block class {kind} is not supported.")


def preprocess_fields(tower: nn.Module, obj: Any = None) -> dict[str, Any]:
    """ViTConfig data fields from open_clip's ``preprocess_cfg`` (defaults: OpenAI mean/std,
    bicubic, shortest-side resize + centre crop)."""
    pc = dict(getattr(tower, "preprocess_cfg", None) or {})
    if not pc and obj is not None:
        pc = dict(getattr(getattr(obj, "visual", None), "preprocess_cfg", None) or {})

    def triple(v: Any, default: tuple[float, ...]) -> tuple[float, ...]:
        if v is None:
            return default
        return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (float(v),) * 3

    mode = pc.get("resize_mode", "shortest")
    interp = pc.get("interpolation", "bicubic")
    return dict(
        data_mean=triple(pc.get("mean"), OPENAI_CLIP_MEAN),
        data_std=triple(pc.get("std"), OPENAI_CLIP_STD),
        data_interpolation="bilinear" if interp == "bilinear" else "bicubic",
        data_crop_pct=1.0,
        data_resize=_RESIZE.get(mode, "shortest"),  # "longest" (pad) has no equivalent
    )


def open_clip_config(obj: Any, source: str = "") -> ViTConfig:
    """Read a `ViTConfig` off an open_clip model or image tower; raise `UnsupportedModelError`
    naming the first tower type or feature patchlens cannot reproduce exactly."""
    tower = visual_tower(obj)
    kind = type(tower).__name__
    data = preprocess_fields(tower, obj)
    if kind == "TimmModel":
        return _timm_tower_config(tower, source, data)
    if kind != "VisionTransformer" or not hasattr(tower, "conv1"):
        hint = {
            "ModifiedResNet": " (a CNN: the RN50/RN101 CLIP models)",
            "HFTextEncoder": " (a text tower)",
        }.get(kind, "")
        raise UnsupportedModelError(
            f"open_clip image tower {kind}{hint} is not supported; patchlens converts open_clip's "
            "VisionTransformer and TimmModel towers wrapping a timm VisionTransformer."
        )
    if tower.attn_pool is not None:
        raise UnsupportedModelError(
            "open_clip VisionTransformer with attentional_pool (AttentionalPooler, CoCa-style) is "
            "not supported: its multi-query pooler over all tokens has no exact patchlens "
            "equivalent."
        )
    if tower.pool_type not in ("tok", "avg"):
        raise UnsupportedModelError(
            f"open_clip VisionTransformer with pool_type={tower.pool_type!r} (no pooled output) "
            "is not supported; use pool_type 'tok' or 'avg'."
        )
    blocks = tower.transformer.resblocks
    blk = blocks[0]
    if any(type(b) is not type(blk) for b in blocks):
        raise UnsupportedModelError("open_clip towers mixing block types are not supported.")
    qkv_bias, qk_norm = _check_block(blk)
    eps = _layer_norm_eps(blk.ln_1, "transformer.resblocks.0.ln_1")
    width = tower.conv1.out_channels
    heads = blk.attn.num_heads
    patch = tuple(tower.patch_size)
    grid = tuple(tower.grid_size)
    if tower.positional_embedding.shape[0] != grid[0] * grid[1] + 1:
        raise UnsupportedModelError("open_clip positional embedding size does not fit its grid.")
    after = bool(tower.final_ln_after_pool)
    pooling = "token" if tower.pool_type == "tok" else "avg"
    proj = tower.proj
    return ViTConfig(
        d_model=width,
        d_head=width // heads,
        n_heads=heads,
        n_layers=len(blocks),
        d_mlp=blk.mlp.c_fc.out_features,
        eps=eps,
        act_fn=activation_name(blk.mlp.gelu, 'open_clip'),
        image_size=(grid[0] * patch[0], grid[1] * patch[1]),
        patch_size=patch,
        in_channels=tower.conv1.in_channels,
        class_token=True,
        n_pos_prefix=1,
        pos_interp=None,
        patch_bias=tower.conv1.bias is not None,
        pre_norm=not is_identity(tower.ln_pre),
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        proj_bias=blk.attn.out_proj.bias is not None,
        layer_scale=not is_identity(blk.ls_1),
        mlp_bias=blk.mlp.c_fc.bias is not None,
        pooling=pooling,
        final_norm="post_pool" if after else "pre_pool",  # as open_clip: ln_post on all tokens
        n_classes=0 if proj is None else proj.shape[1],
        head_bias=False,
        source=source or "open_clip:VisionTransformer",
        extra={"open_clip_tower": kind},
        **data,
    )


def _timm_tower_config(tower: nn.Module, source: str, data: dict[str, Any]) -> ViTConfig:
    from patchlens.model.convert.timm import timm_config

    trunk = tower.trunk
    try:
        cfg = timm_config(trunk, source=source or f"open_clip:timm:{type(trunk).__name__}")
    except UnsupportedModelError as e:
        raise UnsupportedModelError(
            f"open_clip TimmModel tower around timm {type(trunk).__name__}: {e}"
        ) from e
    head = dict(tower.head.named_children())
    if "pool" in head:
        raise UnsupportedModelError(
            f"open_clip TimmModel with {type(head['pool']).__name__} pooling (timm_pool "
            "abs_attn / rot_attn) is not supported."
        )
    if "mlp" in head:
        raise UnsupportedModelError(
            "open_clip TimmModel with an MLP projection (timm_proj='mlp') is not supported; "
            "patchlens converts the linear projection (timm_proj='linear') and trunk heads."
        )
    changes: dict[str, Any] = dict(extra={"open_clip_tower": "TimmModel"}, **data)
    if "proj" in head:
        if cfg.n_classes:
            raise UnsupportedModelError("open_clip TimmModel with two stacked heads.")
        p = head["proj"]
        changes.update(n_classes=p.out_features, head_bias=p.bias is not None)
    return cfg.replace(**changes)


def convert_open_clip_state_dict(
    state_dict: dict[str, Tensor], cfg: ViTConfig
) -> dict[str, Tensor]:
    """Rename an open_clip image-tower state dict (keys of ``clip.visual``, or of the whole
    CLIP model with a ``visual.`` prefix) to the patchlens layout (pure function)."""
    if any(k.startswith("visual.") for k in state_dict):  # a whole CLIP: keep the image tower
        state_dict = {k[7:]: v for k, v in state_dict.items() if k.startswith("visual.")}
    sd = dict(state_dict)
    if cfg.extra.get("open_clip_tower") == "TimmModel":
        return _convert_timm_tower(sd, cfg)
    blk = r"transformer\.resblocks\.(\d+)"
    final = layer_norm_keys(r"ln_post->ln_final") if cfg.final_norm != "none" else []
    rules = [
        (r"conv1\.(weight|bias)", r"embed.proj.\1"),
        *layer_norm_keys(r"ln_pre->ln_pre"),
        *layer_norm_keys(rf"{blk}\.ln_1->blocks.\1.ln1"),
        *layer_norm_keys(rf"{blk}\.ln_2->blocks.\1.ln2"),
        (rf"{blk}\.attn\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
        (rf"{blk}\.attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
        *layer_norm_keys(rf"{blk}\.attn\.ln_q->blocks.\1.attn.q_norm"),
        *layer_norm_keys(rf"{blk}\.attn\.ln_k->blocks.\1.attn.k_norm"),
        (rf"{blk}\.ls_(\d)\.gamma", r"blocks.\1.ls\2.gamma"),
        (rf"{blk}\.mlp\.c_fc\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
        (rf"{blk}\.mlp\.c_proj\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
        *final,
    ]
    out: dict[str, Tensor] = {}
    for k, v in rename(sd, rules).items():
        if k == "class_embedding":
            out["embed.cls_token"] = v.reshape(1, -1)
        elif k == "positional_embedding":
            out["embed.pos_embed"] = v
        elif k == "proj":
            if cfg.n_classes:
                out["head.weight"] = v.T
        else:
            out[k] = v
    return out


def _convert_timm_tower(sd: dict[str, Tensor], cfg: ViTConfig) -> dict[str, Tensor]:
    from patchlens.model.convert.timm import convert_timm_state_dict

    trunk = {k.removeprefix("trunk."): v for k, v in sd.items() if k.startswith("trunk.")}
    trunk_cfg = cfg.replace(n_classes=0) if "head.proj.weight" in sd else cfg
    out = convert_timm_state_dict(trunk, trunk_cfg)
    for param in ("weight", "bias"):
        if f"head.proj.{param}" in sd:
            out[f"head.{param}"] = sd[f"head.proj.{param}"]
    return out


def _create(name: str, pretrained: str | None, **kwargs: Any) -> nn.Module:
    import open_clip

    try:
        model = open_clip.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        msg = str(e)
        if "not found" in msg or "Unknown model" in msg or "not a known tag" in msg:
            raise UnknownModelError(f"open_clip: {msg.splitlines()[0]}") from e
        raise
    except (OSError, ConnectionError) as e:
        raise UnknownModelError(
            f"Could not load open_clip model {name!r} with pretrained={pretrained!r} "
            f"({type(e).__name__}). Offline, pass a local checkpoint file as pretrained="
            "'/path/open_clip_model.safetensors', or build the model yourself and pass it."
        ) from e
    return model.eval()


def from_open_clip(cls, obj: Any, pretrained: str | None = None, **create_kwargs: Any):
    """Build a `HookedViT` (class ``cls``) from an open_clip model, its ``.visual`` tower, or a
    model name (``open_clip.create_model(name, pretrained, **create_kwargs)``; random init when
    ``pretrained`` is None). ``model(x)`` equals ``clip.encode_image(x)``; keeps the source's
    device and dtype."""
    if isinstance(obj, str):
        src = _create(obj, pretrained, **create_kwargs)
        source = f"open_clip:{obj}" + (f":{pretrained}" if pretrained else ":random-init")
    else:
        src, source = obj, ""
    tower = visual_tower(src)
    cfg = open_clip_config(tower, source=source)
    if not source and hasattr(src, "visual"):
        cfg.source = f"open_clip:{type(src).__name__}"
    sd = convert_open_clip_state_dict(tower.state_dict(), cfg)
    param = next(tower.parameters())
    model = cls(cfg, init=False).to(device=param.device, dtype=param.dtype)
    load_strict(model, sd)
    return model.eval()
