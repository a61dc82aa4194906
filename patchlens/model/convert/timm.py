"""timm ``VisionTransformer`` family -> (`ViTConfig`, patchlens state dict).

The converter is two pure functions: `timm_config` reads the architecture off a timm model and
`convert_timm_state_dict` renames a timm state dict; `from_timm` glues them to a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from patchlens.errors import UnknownModelError, UnsupportedModelError
from patchlens.model.config import ViTConfig
from patchlens.model.convert.common import activation_name, is_identity, layer_norm_keys, rename

_NORMS = ("norm_pre", "norm", "fc_norm")


def _check_layer_norm(m: nn.Module, where: str) -> float:
    if not isinstance(m, nn.LayerNorm):
        raise UnsupportedModelError(
            f"{where} is a {type(m).__name__}; patchlens converts LayerNorm models only."
        )
    if m.weight is None:
        raise UnsupportedModelError(f"{where} has no affine weight (elementwise_affine=False).")
    return float(m.eps)


def timm_config(model: nn.Module, source: str = "") -> ViTConfig:
    """Read a `ViTConfig` off a timm VisionTransformer; raise `UnsupportedModelError` naming the
    first feature patchlens cannot reproduce exactly."""
    from timm.layers import PatchEmbed
    from timm.layers.attention import Attention as TimmAttention
    from timm.layers.mlp import Mlp
    from timm.models.vision_transformer import VisionTransformer

    kind = type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"timm model class {kind} is not a VisionTransformer; patchlens supports timm's "
            "VisionTransformer family (vit_*, deit_*, deit3_*, CLIP/SigLIP-style ViTs). "
            f"{_feature_hint(kind)}"
        )
    if type(model).__name__ not in ("VisionTransformer", "VisionTransformerDistilled"):
        raise UnsupportedModelError(f"timm class {kind} changes the ViT forward pass; not supported.")
    if type(model.patch_embed) is not PatchEmbed:
        raise UnsupportedModelError(
            f"patch embedding {type(model.patch_embed).__name__} (hybrid CNN stem) is not supported;"
            " patchlens needs a plain linear patch projection."
        )
    pe = model.patch_embed
    if not is_identity(getattr(pe, "norm", None)):
        raise UnsupportedModelError("a norm inside the patch embedding (embed_norm_layer) is not supported.")
    if getattr(pe, "dynamic_img_pad", False):
        raise UnsupportedModelError("dynamic_img_pad is not supported.")
    if model.pos_embed is None:
        raise UnsupportedModelError("models without a learned position embedding are not supported.")
    if not is_identity(getattr(model, "patch_drop", None)) and model.training:
        raise UnsupportedModelError("patch dropout is not supported.")
    blk = model.blocks[0]
    attn = blk.attn
    if type(attn) is not TimmAttention:
        raise UnsupportedModelError(
            f"attention class {type(attn).__name__} is not supported (relative position or rotary "
            "attention changes the math)."
        )
    if not is_identity(attn.norm) or getattr(attn, "gate", None) is not None:
        raise UnsupportedModelError("attention output norm (scale_norm) or gating is not supported.")
    if type(blk.mlp) is not Mlp or not is_identity(getattr(blk.mlp, "norm", None)):
        raise UnsupportedModelError(f"MLP class {type(blk.mlp).__name__} is not supported.")
    if type(blk).__name__ != "Block":
        raise UnsupportedModelError(f"block class {type(blk).__name__} is not supported.")
    eps = _check_layer_norm(blk.norm1, "blocks.0.norm1")

    distilled = kind == "VisionTransformerDistilled"
    pool = model.global_pool
    has_fc_norm = not is_identity(model.fc_norm)
    has_norm = not is_identity(model.norm)
    if pool not in ("token", "avg", "map", ""):
        raise UnsupportedModelError(f"global_pool={pool!r} is not supported (token, avg, map, '').")
    if getattr(model, "pool_include_prefix", False):
        raise UnsupportedModelError("pool_include_prefix=True is not supported.")
    if pool == "map":
        ap = model.attn_pool
        if type(ap).__name__ != "AttentionPoolLatent" or ap.pos_embed is not None or ap.latent_len != 1:
            raise UnsupportedModelError("attention pool variant (pos_embed or several latents) is not supported.")
        if ap.pool != "token" or not is_identity(ap.q_norm) or ap.mlp is None:
            raise UnsupportedModelError("attention pool without its MLP, with q/k norm or mean pool is not supported.")
    final_norm = "post_pool" if has_fc_norm else ("pre_pool" if has_norm else "none")
    if has_fc_norm and has_norm:
        raise UnsupportedModelError("both norm and fc_norm present is not supported.")
    grid = tuple(pe.grid_size)
    patch = tuple(pe.patch_size)
    n_classes = model.num_classes if not is_identity(model.head) else 0
    d = model.embed_dim
    n_heads = attn.num_heads
    cfg = ViTConfig(
        d_model=d,
        d_head=attn.head_dim,
        n_heads=n_heads,
        n_layers=len(model.blocks),
        d_mlp=blk.mlp.fc1.out_features,
        eps=eps,
        act_fn=activation_name(blk.mlp.act),
        image_size=(grid[0] * patch[0], grid[1] * patch[1]),
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
        layer_scale=not is_identity(blk.ls1),
        mlp_bias=blk.mlp.fc1.bias is not None,
        pooling={"": "none"}.get(pool, pool),
        final_norm=final_norm,
        n_classes=n_classes,
        head_bias=n_classes == 0 or model.head.bias is not None,
        map_mlp_ratio=(model.attn_pool.mlp.fc1.out_features / d) if pool == "map" else 4.0,
        source=source or f"timm:{getattr(model, 'default_cfg', {}).get('architecture', kind)}",
        **_timm_data_config(model),
    )
    if cfg.pooling == "none" and distilled:
        raise UnsupportedModelError("a distilled model without pooling is not supported.")
    return cfg


def _timm_data_config(model: nn.Module) -> dict[str, Any]:
    pc = getattr(model, "pretrained_cfg", None) or {}
    out: dict[str, Any] = {}
    if "mean" in pc:
        out["data_mean"] = tuple(pc["mean"])
        out["data_std"] = tuple(pc["std"])
    if "interpolation" in pc:
        out["data_interpolation"] = pc["interpolation"]
    if "crop_pct" in pc:
        out["data_crop_pct"] = float(pc["crop_pct"])
    return out


def _feature_hint(kind: str) -> str:
    hints = {
        "Eva": "Eva uses rotary position embeddings and SwiGLU blocks, which patchlens does not model.",
        "VisionTransformerRelPos": "it uses relative position biases in attention.",
        "VisionTransformerSAM": "it uses windowed attention with relative positions.",
        "Beit": "it uses relative position biases in attention.",
    }
    return hints.get(kind, "")


def convert_timm_state_dict(state_dict: dict[str, Tensor], cfg: ViTConfig) -> dict[str, Tensor]:
    """Rename a timm VisionTransformer state dict to the patchlens layout (pure function)."""
    final = {"pre_pool": "norm", "post_pool": "fc_norm"}.get(cfg.final_norm)
    rules = [
        (r"patch_embed\.proj\.(weight|bias)", r"embed.proj.\1"),
        *layer_norm_keys(r"norm_pre->ln_pre"),
        *layer_norm_keys(r"blocks\.(\d+)\.norm1->blocks.\1.ln1"),
        *layer_norm_keys(r"blocks\.(\d+)\.norm2->blocks.\1.ln2"),
        *layer_norm_keys(r"blocks\.(\d+)\.attn\.q_norm->blocks.\1.attn.q_norm"),
        *layer_norm_keys(r"blocks\.(\d+)\.attn\.k_norm->blocks.\1.attn.k_norm"),
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
