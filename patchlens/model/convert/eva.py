"""timm ``Eva`` -> (`ViTConfig`, patchlens state dict): EVA, EVA-02, DINOv3, Perception Encoder,
LingBot and timm's RoPE-ViTs.

What differs from the ``VisionTransformer`` family: rotary position embeddings on q and k
(``RotaryEmbeddingCat`` or ``RotaryEmbeddingDinoV3``; prefix tokens unrotated), an optional
learned absolute position embedding, separate q / v biases without a k bias
(``EvaAttention``), un-fused q / k / v projections, a LayerNorm inside attention
(``scale_attn_inner``) and inside the MLP (``scale_mlp``), SwiGLU / GLU MLPs, LayerScale as
bare ``gamma_1`` / ``gamma_2`` parameters, and an attention pool over all tokens (prefix
included). Refused, each with the feature named: post-norm blocks, grouped-query attention,
gated attention, RoPE-Mixed / M-RoPE tables, pixel-frequency tables, RMSNorm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from patchlens.errors import UnsupportedModelError
from patchlens.model.config import ViTConfig
from patchlens.model.convert.common import is_identity, layer_norm_keys, rename
from patchlens.model.convert.timm_layers import (
    act_fields,
    attention_pool_fields,
    check_layer_norm,
    check_patch_embed,
    data_config,
    fuse_mlp_keys,
    mlp_fields,
    optional_norm,
)
from patchlens.model.rotary import rotary_tables

_POOLS = {"": "none", "avg": "avg", "max": "max", "avgmax": "avgmax", "token": "token",
          "map": "map"}


def _rope_fields(model: nn.Module) -> dict[str, Any]:
    """The `ViTConfig` rope fields of an Eva's rotary module (empty without one)."""
    rope = model.rope
    if rope is None:
        return {}
    kind = type(rope).__name__
    if getattr(model, "rope_mixed", False) or kind not in ("RotaryEmbeddingCat",
                                                            "RotaryEmbeddingDinoV3"):
        raise UnsupportedModelError(
            f"rotary embedding {kind} is not supported (patchlens reproduces timm's "
            "RotaryEmbeddingCat and RotaryEmbeddingDinoV3 tables; RoPE-Mixed learns per-layer "
            "frequencies, M-RoPE adds a temporal axis)."
        )
    if rope.feat_shape is not None and len(rope.feat_shape) != 2:
        raise UnsupportedModelError("rotary embeddings over other than 2 axes are not supported.")
    common = dict(
        rope_temperature=float(rope.temperature) if rope.temperature is not None else 10000.0,
        rope_grid_offset=float(rope.grid_offset),
        rope_grid_indexing=rope.grid_indexing,
        rope_rotate_half=bool(rope.rotate_half),
        # a fixed-size model caches float32 tables at construction; a dynamic one builds them
        # per call in the module's (the model's) dtype
        rope_precision="float32" if rope.feat_shape is not None else "model",
    )
    if kind == "RotaryEmbeddingCat":
        if rope.in_pixels or rope.grid_type != "index":
            raise UnsupportedModelError(
                "RotaryEmbeddingCat with pixel-frequency bands (in_pixels=True) is not supported."
            )
        ref = tuple(rope.ref_feat_shape) if rope.ref_feat_shape is not None else None
        return dict(common, rope="timm_cat", rope_ref_grid=ref)
    periods = None
    if rope.min_period is not None and rope.max_period is not None:
        periods = (float(rope.min_period), float(rope.max_period))
    return dict(common, rope="timm_dinov3", rope_normalize_coords=rope.normalize_coords,
                rope_periods=periods)


def _check_attention(attn: nn.Module, n_prefix: int, rope_half: bool | None) -> None:
    kind = type(attn).__name__
    if kind not in ("EvaAttention", "AttentionRope"):
        raise UnsupportedModelError(f"Eva attention class {kind} is not supported.")
    if getattr(attn, "gate", None) is not None:
        raise UnsupportedModelError("gated attention (gated_attn: a sigmoid gate on the attention "
                                    "output) is not supported.")
    if getattr(attn, "num_kv_heads", attn.num_heads) != attn.num_heads:
        raise UnsupportedModelError("grouped-query attention (num_kv_heads < num_heads) is not "
                                    "supported.")
    if attn.num_prefix_tokens != n_prefix:
        raise UnsupportedModelError("attention that leaves a different number of prefix tokens "
                                    "unrotated than the model has is not supported.")
    if rope_half is not None and bool(getattr(attn, "rotate_half", False)) != rope_half:
        raise UnsupportedModelError("attention and rotary tables with different rotation layouts.")


def _qkv_bias(attn: nn.Module) -> bool:
    if attn.qkv is not None:
        return attn.qkv.bias is not None or getattr(attn, "q_bias", None) is not None
    return any(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj))


def eva_config(model: nn.Module, source: str = "") -> ViTConfig:
    """Read a `ViTConfig` off a timm ``Eva``; raise `UnsupportedModelError` naming the first
    feature patchlens cannot reproduce exactly."""
    pe = check_patch_embed(model)
    if model.training and model.patch_drop is not None:
        raise UnsupportedModelError("patch dropout is not supported (convert the model in eval "
                                    "mode).")
    blocks = list(model.blocks)
    blk = blocks[0]
    if any(type(b).__name__ != "EvaBlock" for b in blocks):
        raise UnsupportedModelError(
            f"Eva block class {type(blk).__name__} is not supported (post-norm blocks, "
            "use_post_norm=True, normalise after attention and MLP)."
        )
    n_prefix = model.num_prefix_tokens
    rope = _rope_fields(model)
    half = rope.get("rope_rotate_half") if rope else None
    for b in blocks:
        _check_attention(b.attn, n_prefix, half)
        if (b.gamma_1 is None) != (blk.gamma_1 is None) or (b.gamma_2 is None) != (blk.gamma_2 is None):
            raise UnsupportedModelError("blocks with and without LayerScale mixed.")
    attn = blk.attn
    eps = check_layer_norm(blk.norm1, "blocks.0.norm1")
    if rope and attn.head_dim != model.rope.dim:
        raise UnsupportedModelError(f"rotary tables of width {model.rope.dim} for heads of "
                                    f"width {attn.head_dim} are not supported.")
    mlp = mlp_fields(blk.mlp)
    d = model.embed_dim
    pool = model.global_pool
    if pool not in _POOLS:
        raise UnsupportedModelError(f"global_pool={pool!r} is not supported.")
    pool_fields = attention_pool_fields(model.attn_pool, d) if pool == "map" else {}
    pool_act = pool_fields.pop("pool_act", None)
    has_norm, has_fc_norm = not is_identity(model.norm), not is_identity(model.fc_norm)
    if has_norm and has_fc_norm:
        raise UnsupportedModelError("both a final norm and fc_norm (use_post_transformer_norm "
                                    "and use_fc_norm) are not supported.")
    patch = tuple(pe.patch_size)
    n_classes = model.num_classes if not is_identity(model.head) else 0
    extra: dict[str, Any] = {"timm_class": "Eva"}
    if mlp["gate_last"]:
        extra["timm_glu_gate_last"] = True
    if blk.gamma_1 is not None and blk.gamma_2 is None:
        extra["timm_attn_only_layer_scale"] = True  # ls2 = 1 (exact)
    cfg = ViTConfig(
        d_model=d,
        d_head=attn.head_dim,
        n_heads=attn.num_heads,
        n_layers=len(blocks),
        eps=eps,
        image_size=tuple(pe.img_size),  # the source's input size (the grid drops a remainder)
        patch_size=patch,
        in_channels=pe.proj.in_channels,
        class_token=model.cls_token is not None,
        n_registers=0 if model.reg_token is None else model.reg_token.shape[1],
        n_pos_prefix=0 if model.no_embed_class else n_prefix,
        pos_embed=model.pos_embed is not None,
        pos_interp="timm",
        dynamic_img_size=bool(model.dynamic_img_size),
        patch_bias=pe.proj.bias is not None,
        pre_norm=optional_norm(model.norm_pre, "norm_pre"),
        qkv_bias=_qkv_bias(attn),
        qk_norm=optional_norm(attn.q_norm, "blocks.0.attn.q_norm"),
        proj_bias=attn.proj.bias is not None,
        attn_norm=optional_norm(attn.norm, "blocks.0.attn.norm"),
        **rope,
        layer_scale=blk.gamma_1 is not None,
        **act_fields(mlp, pool_act),
        pooling=_POOLS[pool],
        pool_include_prefix=pool == "map",  # Eva's attention pool sees every token
        final_norm="post_pool" if has_fc_norm else ("pre_pool" if has_norm else "none"),
        n_classes=n_classes,
        head_bias=n_classes == 0 or model.head.bias is not None,
        **pool_fields,
        source=source or f"timm:{getattr(model, 'default_cfg', {}).get('architecture', 'Eva')}",
        extra=extra,
        **data_config(model),
    )
    if cfg.rope:
        cfg.rope_precision = _check_tables(model, cfg)
    return cfg


def _check_tables(model: nn.Module, cfg: ViTConfig) -> str:
    """The ``rope_precision`` whose tables equal the source's own at the native grid, bit for
    bit (the expected one first); `UnsupportedModelError` if neither is close."""
    rope = model.rope
    grid = tuple(model.patch_embed.grid_size)
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        ref = rope.get_embed() if rope.feat_shape is not None else rope.get_embed(shape=list(grid))
    ref_sin, ref_cos = ref.to(torch.float64).chunk(2, dim=-1)
    best, err = cfg.rope_precision, float("inf")
    for precision in dict.fromkeys([cfg.rope_precision, "float32", "model"]):
        sin, cos = rotary_tables(cfg.replace(rope_precision=precision), grid, dtype)
        diff = max((sin.double() - ref_sin).abs().max().item(),
                   (cos.double() - ref_cos).abs().max().item())
        if diff == 0:
            return precision
        if diff < err:
            best, err = precision, diff
    if err > 1e-5:
        raise UnsupportedModelError(
            f"the rotary tables of this {type(rope).__name__} differ from patchlens's "
            f"{cfg.rope!r} recipe by {err:.2g}; an option patchlens does not read is set."
        )
    return best


def convert_eva_state_dict(state_dict: dict[str, Tensor], cfg: ViTConfig) -> dict[str, Tensor]:
    """Rename a timm ``Eva`` state dict to the patchlens layout (pure function): fuse q / k / v
    (the k bias of ``EvaAttention`` is zero), pack SwiGLU, map ``gamma_1/2`` to LayerScale."""
    final = {"pre_pool": "norm", "post_pool": "fc_norm"}.get(cfg.final_norm)
    blk = r"blocks\.(\d+)"
    rules = [
        (r"patch_embed\.proj\.(weight|bias)", r"embed.proj.\1"),
        *layer_norm_keys(r"norm_pre->ln_pre"),
        *layer_norm_keys(rf"{blk}\.norm1->blocks.\1.ln1"),
        *layer_norm_keys(rf"{blk}\.norm2->blocks.\1.ln2"),
        *layer_norm_keys(rf"{blk}\.attn\.(q_norm|k_norm|norm)->blocks.\1.attn.\2"),
        *layer_norm_keys(rf"{blk}\.mlp\.norm->blocks.\1.mlp.norm"),
        (rf"{blk}\.gamma_(\d)", r"blocks.\1.ls\2.gamma"),
        *layer_norm_keys(r"attn_pool\.norm->attn_pool.norm"),
    ]
    if final:
        rules += layer_norm_keys(rf"{final}->ln_final")
    out: dict[str, Tensor] = {}
    for k, v in rename(state_dict, rules).items():
        if k == "cls_token":
            out["embed.cls_token"] = v.reshape(1, -1)
        elif k == "reg_token":
            out["embed.reg_tokens"] = v.reshape(-1, v.shape[-1])
        elif k == "pos_embed":
            out["embed.pos_embed"] = v.reshape(-1, v.shape[-1])
        elif k == "attn_pool.latent":
            out[k] = v.reshape(1, -1)
        elif k.startswith(("norm.", "fc_norm.")) and not final:
            continue
        else:
            out[k] = v
    for i in range(cfg.n_layers):
        _fuse_qkv(out, f"blocks.{i}.attn", cfg.qkv_bias)
        if cfg.extra.get("timm_attn_only_layer_scale"):
            gamma = out[f"blocks.{i}.ls1.gamma"]
            out[f"blocks.{i}.ls2.gamma"] = torch.ones_like(gamma)
    fuse_mlp_keys(out, cfg.n_layers, bool(cfg.extra.get("timm_glu_gate_last")))
    return out


def _fuse_qkv(sd: dict[str, Tensor], p: str, bias: bool) -> None:
    """In place: ``q_proj/k_proj/v_proj`` or ``qkv + q_bias/v_bias`` -> ``qkv`` (weight, bias)."""
    if f"{p}.q_proj.weight" in sd:
        w = [sd.pop(f"{p}.{n}_proj.weight") for n in "qkv"]
        sd[f"{p}.qkv.weight"] = torch.cat(w, dim=0)
        if bias:
            b = [sd.pop(f"{p}.{n}_proj.bias", None) for n in "qkv"]
            b = [t if t is not None else torch.zeros_like(w[0][:, 0]) for t in b]
            sd[f"{p}.qkv.bias"] = torch.cat(b, dim=0)
    elif f"{p}.q_bias" in sd:
        q, v = sd.pop(f"{p}.q_bias"), sd.pop(f"{p}.v_bias")
        sd[f"{p}.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v], dim=0)
