"""timm ``VisionTransformer`` and ``Eva`` families -> (`ViTConfig`, patchlens state dict).

The converter is two pure functions: `timm_config` reads the architecture off a timm model and
`convert_timm_state_dict` renames a timm state dict; `from_timm` glues them to a model. timm's
``Eva`` class (EVA, EVA-02, DINOv3, Perception Encoder, RoPE-ViTs) is read by
`patchlens.model.convert.eva`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from patchlens.errors import UnknownModelError, UnsupportedModelError
from patchlens.model.config import ViTConfig
from patchlens.model.convert.common import is_identity, layer_norm_keys, rename
from patchlens.model.convert.eva import convert_eva_state_dict, eva_config
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


def timm_config(model: nn.Module, source: str = "") -> ViTConfig:
    """Read a `ViTConfig` off a timm VisionTransformer or Eva; raise `UnsupportedModelError`
    naming the first feature patchlens cannot reproduce exactly."""
    from timm.layers.attention import Attention as TimmAttention
    from timm.models.vision_transformer import VisionTransformer

    kind = type(model).__name__
    if kind == "Eva":
        return eva_config(model, source)
    if not isinstance(model, VisionTransformer):
        hint = _feature_hint(kind)
        raise UnsupportedModelError(
            f"timm model class {kind} is not supported{': ' + hint if hint else ''}; patchlens "
            "converts timm's VisionTransformer family (vit_*, deit_*, deit3_*, CLIP/SigLIP-style "
            "ViTs) and Eva (EVA-02, DINOv3, Perception Encoder)."
        )
    if type(model).__name__ not in ("VisionTransformer", "VisionTransformerDistilled"):
        raise UnsupportedModelError(f"timm class {kind} changes the ViT forward pass; not supported.")
    pe = check_patch_embed(model)
    if model.pos_embed is None:
        raise UnsupportedModelError("models without a learned position embedding are not supported.")
    if not is_identity(getattr(model, "patch_drop", None)) and model.training:
        raise UnsupportedModelError("patch dropout is not supported.")
    blk = model.blocks[0]
    if type(blk).__name__ != "Block":
        raise UnsupportedModelError(f"block class {type(blk).__name__} is not supported (parallel "
                                    "or post-norm blocks change the residual stream).")
    attn = blk.attn
    if type(attn) is not TimmAttention:
        raise UnsupportedModelError(
            f"attention class {type(attn).__name__} is not supported (relative position or rotary "
            "attention changes the math)."
        )
    if getattr(attn, "gate", None) is not None:
        raise UnsupportedModelError("gated attention (a sigmoid gate on the attention output) is "
                                    "not supported.")
    eps = check_layer_norm(blk.norm1, "blocks.0.norm1")
    mlp = mlp_fields(blk.mlp)

    distilled = kind == "VisionTransformerDistilled"
    pool = model.global_pool
    has_fc_norm = not is_identity(model.fc_norm)
    has_norm = not is_identity(model.norm)
    if pool not in ("token", "avg", "avgmax", "max", "map", ""):
        raise UnsupportedModelError(f"global_pool={pool!r} is not supported (token, avg, max, "
                                    "avgmax, map, '').")
    pool_fields = attention_pool_fields(model.attn_pool, model.embed_dim) if pool == "map" else {}
    pool_act = pool_fields.pop("pool_act", None)
    final_norm = "post_pool" if has_fc_norm else ("pre_pool" if has_norm else "none")
    if has_fc_norm and has_norm:
        raise UnsupportedModelError("both norm and fc_norm present is not supported.")
    patch = tuple(pe.patch_size)
    n_classes = model.num_classes if not is_identity(model.head) else 0
    cfg = ViTConfig(
        d_model=model.embed_dim,
        d_head=attn.head_dim,
        n_heads=attn.num_heads,
        n_layers=len(model.blocks),
        eps=eps,
        image_size=tuple(pe.img_size),  # the source's input size (the grid drops a remainder)
        patch_size=patch,
        in_channels=pe.proj.in_channels,
        class_token=model.cls_token is not None,
        distilled=distilled,
        n_registers=model.num_reg_tokens,
        n_pos_prefix=0 if model.no_embed_class else model.num_prefix_tokens,
        pos_interp="timm",
        dynamic_img_size=bool(model.dynamic_img_size),
        patch_bias=pe.proj.bias is not None,
        pre_norm=not is_identity(model.norm_pre),
        qkv_bias=attn.qkv.bias is not None,
        qk_norm=not is_identity(attn.q_norm),
        proj_bias=attn.proj.bias is not None,
        attn_norm=optional_norm(attn.norm, "blocks.0.attn.norm"),
        layer_scale=not is_identity(blk.ls1),
        **act_fields(mlp, pool_act),
        pooling={"": "none"}.get(pool, pool),
        pool_include_prefix=bool(getattr(model, "pool_include_prefix", False)),
        final_norm=final_norm,
        n_classes=n_classes,
        head_bias=n_classes == 0 or model.head.bias is not None,
        **pool_fields,
        source=source or f"timm:{getattr(model, 'default_cfg', {}).get('architecture', kind)}",
        extra={"timm_glu_gate_last": True} if mlp["gate_last"] else {},
        **data_config(model),
    )
    if cfg.pooling == "none" and distilled:
        raise UnsupportedModelError("a distilled model without pooling is not supported.")
    return cfg


def _feature_hint(kind: str) -> str:
    hints = {
        "VisionTransformerRelPos": "relative position biases in attention",
        "VisionTransformerSAM": "windowed attention with relative positions",
        "Beit": "relative position biases in attention",
        "NaFlexVit": "NaFlex packs variable-resolution patch sequences with its own embedding",
    }
    return hints.get(kind, "")


def convert_timm_state_dict(state_dict: dict[str, Tensor], cfg: ViTConfig) -> dict[str, Tensor]:
    """Rename a timm VisionTransformer or Eva state dict to the patchlens layout (pure
    function; ``cfg`` from `timm_config`)."""
    if cfg.extra.get("timm_class") == "Eva":
        return convert_eva_state_dict(state_dict, cfg)
    final = {"pre_pool": "norm", "post_pool": "fc_norm"}.get(cfg.final_norm)
    rules = [
        (r"patch_embed\.proj\.(weight|bias)", r"embed.proj.\1"),
        *layer_norm_keys(r"norm_pre->ln_pre"),
        *layer_norm_keys(r"blocks\.(\d+)\.norm1->blocks.\1.ln1"),
        *layer_norm_keys(r"blocks\.(\d+)\.norm2->blocks.\1.ln2"),
        *layer_norm_keys(r"blocks\.(\d+)\.attn\.(q_norm|k_norm|norm)->blocks.\1.attn.\2"),
        *layer_norm_keys(r"blocks\.(\d+)\.mlp\.norm->blocks.\1.mlp.norm"),
        (r"blocks\.(\d+)\.ls(\d)\.gamma", r"blocks.\1.ls\2.gamma"),
        *layer_norm_keys(r"attn_pool\.norm->attn_pool.norm"),
    ]
    if final:
        rules += layer_norm_keys(rf"{final}->ln_final")
    out = {}
    for k, v in rename(state_dict, rules).items():
        if k == "cls_token":
            out["embed.cls_token"] = v.reshape(1, -1)
        elif k == "dist_token":
            out["embed.dist_token"] = v.reshape(1, -1)
        elif k == "reg_token":
            out["embed.reg_tokens"] = v.reshape(-1, v.shape[-1])
        elif k == "pos_embed":
            out["embed.pos_embed"] = v.reshape(-1, v.shape[-1])
        elif k == "attn_pool.latent":
            out[k] = v.reshape(1, -1)
        elif k.startswith(("norm.", "fc_norm.")) and not final:
            continue  # identity norms carry no parameters; nothing to drop really
        else:
            out[k] = v
    fuse_mlp_keys(out, cfg.n_layers, bool(cfg.extra.get("timm_glu_gate_last")))
    return out


def _load_checkpoint_file(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def from_timm(cls, model_or_name, pretrained=False, checkpoint_path=None, **timm_kwargs):
    """Build a `HookedViT` (class ``cls``) from a timm model object or name (see
    `HookedViT.from_timm`)."""
    import timm

    if isinstance(model_or_name, str):
        name = model_or_name
        try:
            src = timm.create_model(name, pretrained=pretrained and checkpoint_path is None,
                                    **timm_kwargs)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise UnknownModelError(f"timm does not know the model {name!r}.") from e
            raise
        except (OSError, ConnectionError) as e:
            raise UnknownModelError(
                f"Could not download the weights of timm model {name!r} ({type(e).__name__}). "
                f"Offline, pass a local file: HookedViT.from_timm({name!r}, "
                "checkpoint_path='weights.safetensors')."
            ) from e
        source = f"timm:{name}"
    else:
        src, source = model_or_name, ""
    cfg = timm_config(src, source)
    state = src.state_dict() if checkpoint_path is None else _load_checkpoint_file(checkpoint_path)
    param = next(src.parameters())
    model = cls.from_state_dict(cfg, convert_timm_state_dict(state, cfg))
    return model.to(device=param.device, dtype=param.dtype).eval()
