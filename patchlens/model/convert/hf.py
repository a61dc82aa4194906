"""Hugging Face ``transformers`` vision models -> (`ViTConfig`, patchlens state dict).

Like the timm converter, two pure functions do the work: `hf_config` reads the architecture off a
model or config object and `convert_hf_state_dict` renames and fuses a state dict;
`from_hf` glues them to a `HookedViT`.

Supported architectures and what the converted model returns (``model(x)``):

- ``ViTModel`` / ``DeiTModel``: the final-LayerNorm'd CLS token (HF ``last_hidden_state[:, 0]``).
  HF's tanh ``pooler`` is not part of the converted model (its weights are dropped); apply it
  yourself if you need ``pooler_output``.
- ``ViTForImageClassification``, ``DeiTForImageClassification``: logits on the CLS token.
  DeiT models without the teacher head keep the distillation token as an extra prefix token with
  a position embedding (``n_registers=1``): it is attended to but not read out.
- ``DeiTForImageClassificationWithTeacher``: ``distilled=True``, the two heads averaged.
- ``Dinov2Model`` / ``Dinov2WithRegistersModel``: the LayerNorm'd CLS token (``pooler_output``);
  ``...ForImageClassification``: logits on concat(CLS, mean of patch tokens).
- ``CLIPVisionModel``: ``pooler_output`` (``post_layernorm`` on the CLS token);
  ``CLIPVisionModelWithProjection`` / ``CLIPModel`` (image tower): ``image_embeds``;
  ``CLIPForImageClassification``: logits on the mean of the patch tokens.
- ``SiglipVisionModel`` / ``SiglipModel`` (image tower): the attention-pooled ``pooler_output``;
  ``SiglipForImageClassification``: logits on the mean of all tokens.

Position embeddings: Dinov2 resamples whenever the patch grid differs from the native one (so
the converted model takes any multiple of the patch size); the other families only do so with
``interpolate_pos_encoding=True``, which `from_hf` takes as an argument.
The data config (mean/std, resize) follows the usual image-processor defaults of each family;
it is a best-effort guess made offline, not read from the checkpoint's processor file.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from patchlens.errors import UnknownModelError, UnsupportedModelError
from patchlens.model.config import ViTConfig, as_pair
from patchlens.model.convert.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    layer_norm_keys,
    load_strict,
    rename,
)

# architecture -> (family, head kind); head kinds: None, classifier, teacher, projection
ARCHITECTURES: dict[str, tuple[str, str | None]] = {
    "ViTModel": ("vit", None),
    "ViTForImageClassification": ("vit", "classifier"),
    "DeiTModel": ("deit", None),
    "DeiTForImageClassification": ("deit", "classifier"),
    "DeiTForImageClassificationWithTeacher": ("deit", "teacher"),
    "Dinov2Model": ("dinov2", None),
    "Dinov2ForImageClassification": ("dinov2", "classifier"),
    "Dinov2WithRegistersModel": ("dinov2_with_registers", None),
    "Dinov2WithRegistersForImageClassification": ("dinov2_with_registers", "classifier"),
    "CLIPVisionModel": ("clip", None),
    "CLIPVisionModelWithProjection": ("clip", "projection"),
    "CLIPModel": ("clip", "projection"),
    "CLIPForImageClassification": ("clip", "classifier"),
    "SiglipVisionModel": ("siglip", None),
    "SiglipModel": ("siglip", None),
    "SiglipForImageClassification": ("siglip", "classifier"),
}
_DEFAULT_ARCH = {
    "vit": "ViTModel",
    "deit": "DeiTModel",
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
    "clip_vision_model": "CLIPVisionModel",
    "clip": "CLIPModel",
    "siglip_vision_model": "SiglipVisionModel",
    "siglip": "SiglipModel",
}
_FAMILY = {
    "vit": "vit", "deit": "deit", "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2_with_registers",
    "clip_vision_model": "clip", "clip": "clip",
    "siglip_vision_model": "siglip", "siglip": "siglip",
}
_HINTS = {
    "swin": "Swin uses shifted-window attention with relative position biases.",
    "swinv2": "Swin uses shifted-window attention with relative position biases.",
    "beit": "BEiT uses relative position biases in attention.",
    "data2vec-vision": "Data2Vec-vision uses BEiT-style relative position biases.",
    "vit_mae": "ViT-MAE randomly masks patches in its forward pass.",
    "vit_msn": "convert it as a plain ViT state dict if its forward matches ViTModel.",
    "vit_hybrid": "its patch embedding is a CNN backbone.",
    "dinov3_vit": "DINOv3 uses rotary position embeddings.",
    "convnext": "it is not a transformer.",
}
_ACTS = {
    "gelu": "gelu", "gelu_python": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh", "gelu_python_tanh": "gelu_tanh", "quick_gelu": "quick_gelu",
    "relu": "relu", "silu": "silu", "swish": "silu",
}
IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)
OPENAI_CLIP = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# family -> (mean/std, resize, interpolation, crop_pct): usual processor defaults (best effort)
_DATA = {
    "vit": (HALF, "exact", "bilinear", 1.0),
    "deit": (IMAGENET, "shortest", "bicubic", 224 / 256),
    "dinov2": (IMAGENET, "shortest", "bicubic", 224 / 256),
    "dinov2_with_registers": (IMAGENET, "shortest", "bicubic", 224 / 256),
    "clip": (OPENAI_CLIP, "shortest", "bicubic", 1.0),
    "siglip": (HALF, "exact", "bicubic", 1.0),
}
_WRAPPERS = ("vit.", "deit.", "dinov2_with_registers.", "dinov2.", "vision_model.")
_DROP = re.compile(
    r"(text_model\..*|text_projection\..*|logit_scale|logit_bias|pooler\..*"
    r"|embeddings\.mask_token|embeddings\.position_ids)"
)


def _resolve(obj: Any, architecture: str | None = None) -> tuple[Any, str, str, str | None]:
    """(HF config, architecture name, family, head kind) of a model or config object."""
    from transformers import PretrainedConfig

    if isinstance(obj, PretrainedConfig):
        config = obj
        archs = [a for a in (getattr(config, "architectures", None) or []) if a in ARCHITECTURES]
        arch = architecture or (archs[0] if archs else _DEFAULT_ARCH.get(config.model_type))
    elif isinstance(obj, nn.Module) and hasattr(obj, "config"):
        config, arch = obj.config, type(obj).__name__
    else:
        raise UnsupportedModelError(
            f"from_hf takes a transformers model, a transformers config or a repo id, got "
            f"{type(obj).__name__}."
        )
    model_type = getattr(config, "model_type", "?")
    if arch not in ARCHITECTURES:
        hint = _HINTS.get(model_type, "")
        raise UnsupportedModelError(
            f"Hugging Face model_type {model_type!r} ({arch or type(config).__name__}) is not "
            f"supported{': ' + hint if hint else '.'} patchlens converts "
            f"{', '.join(sorted(ARCHITECTURES))}."
        )
    family, head = ARCHITECTURES[arch]
    if _FAMILY.get(model_type) != family:
        raise UnsupportedModelError(
            f"{arch} with a model_type {model_type!r} config is not supported."
        )
    return config, arch, family, head


def hf_config(obj: Any, architecture: str | None = None, source: str = "") -> ViTConfig:
    """Read a `ViTConfig` off a transformers model or config; raise `UnsupportedModelError`
    naming the model type or feature patchlens cannot reproduce exactly.

    For a bare config the architecture is ``architecture``, else ``config.architectures[0]``,
    else the family's headless base model.
    """
    config, arch, family, head = _resolve(obj, architecture)
    if family == "clip" and config.model_type == "clip":
        top, config = config, config.vision_config
    elif family == "siglip" and config.model_type == "siglip":
        top, config = config, config.vision_config
    else:
        top = config
    act = _ACTS.get(config.hidden_act) if isinstance(config.hidden_act, str) else None
    if act is None:
        raise UnsupportedModelError(
            f"{arch}: hidden_act={config.hidden_act!r} is not supported ({', '.join(_ACTS)} are)."
        )
    d, n_heads = config.hidden_size, config.num_attention_heads
    d_head = getattr(config, "head_dim", None) or d // n_heads
    image, patch = as_pair(config.image_size), as_pair(config.patch_size)
    dinov2 = family.startswith("dinov2")
    if dinov2:
        d_mlp = int(d * config.mlp_ratio)
        if config.use_swiglu_ffn:  # HF Dinov2SwiGLUFFN: 2/3 of the MLP width, rounded up to 8
            d_mlp = (int(d_mlp * 2 / 3) + 7) // 8 * 8
        if image[0] // patch[0] != image[1] // patch[1]:
            raise UnsupportedModelError(
                f"{arch}: a non-square native patch grid {image} / {patch} is not supported (HF "
                "interpolates Dinov2 position embeddings assuming a square grid)."
            )
    else:
        d_mlp = config.intermediate_size
    n_classes, head_bias = 0, True
    if head in ("classifier", "teacher"):
        n_classes = top.num_labels
        if isinstance(obj, nn.Module):
            name = "cls_classifier" if head == "teacher" else "classifier"
            layer = getattr(obj, name)
            n_classes = layer.out_features if isinstance(layer, nn.Linear) else 0
    elif head == "projection":
        n_classes, head_bias = top.projection_dim, False
    pooling = {"dinov2": "token_avg", "dinov2_with_registers": "token_avg"}.get(family, "token")
    pooling = pooling if head == "classifier" else "token"
    final_norm, class_token = "pre_pool", True
    n_registers, distilled, n_pos_prefix = 0, False, -1
    if family == "deit":
        distilled = head == "teacher"
        n_registers = 0 if distilled else 1  # the unused distillation token, see module docs
    elif family == "dinov2_with_registers":
        n_registers, n_pos_prefix = config.num_register_tokens, 1
    elif family == "clip":
        final_norm = "post_pool"
        if head == "classifier":
            pooling, final_norm = "avg", "none"
    elif family == "siglip":
        class_token = False
        pooling = "avg" if head == "classifier" else "map"
        if pooling == "map" and not config.vision_use_head:
            raise UnsupportedModelError(
                f"{arch} without its attention-pooling head (vision_use_head=False) has no pooled "
                "output; patchlens does not support it."
            )
    if head is not None and n_classes == 0 and head != "classifier":
        raise UnsupportedModelError(f"{arch}: a head with 0 outputs is not supported.")
    mean_std, resize, interp, crop = _DATA[family]
    return ViTConfig(
        d_model=d,
        d_head=d_head,
        n_heads=n_heads,
        n_layers=config.num_hidden_layers,
        d_mlp=d_mlp,
        eps=float(config.layer_norm_eps),
        act_fn=act,
        image_size=image,
        patch_size=patch,
        in_channels=config.num_channels,
        class_token=class_token,
        distilled=distilled,
        n_registers=n_registers,
        n_pos_prefix=n_pos_prefix,
        pos_interp={"dinov2": "hf_dinov2", "dinov2_with_registers": "hf_dinov2_reg"}.get(
            family, "hf_vit"
        ),
        dynamic_img_size=dinov2,
        patch_bias=family != "clip",
        pre_norm=family == "clip",
        qkv_bias=bool(getattr(config, "qkv_bias", True)),
        layer_scale=dinov2,
        mlp_kind="swiglu" if dinov2 and config.use_swiglu_ffn else "mlp",
        pooling=pooling,
        final_norm=final_norm,
        n_classes=n_classes,
        head_bias=head_bias,
        map_mlp_ratio=d_mlp / d,
        data_mean=mean_std[0],
        data_std=mean_std[1],
        data_interpolation=interp,
        data_crop_pct=crop,
        data_resize=resize,
        source=source or f"hf:{getattr(top, '_name_or_path', '') or arch}",
        extra={"hf_architecture": arch},
    )


# legacy (transformers < 5) key names -> current ones
_LEGACY = [
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(\w+)",
     lambda m: f"encoder.layer.{m[1]}.attention.{m[2][0]}_proj.{m[3]}"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(\w+)",
     lambda m: f"encoder.layer.{m[1]}.attention.o_proj.{m[2]}"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(\w+)",
     lambda m: f"encoder.layer.{m[1]}.mlp.fc1.{m[2]}"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(\w+)",
     lambda m: f"encoder.layer.{m[1]}.mlp.fc2.{m[2]}"),
    (r"encoder\.layer\.(\d+)\.mlp\.weights_in\.(\w+)", lambda m: f"layers.{m[1]}.mlp.fc1.{m[2]}"),
    (r"encoder\.layer\.(\d+)\.mlp\.weights_out\.(\w+)", lambda m: f"layers.{m[1]}.mlp.fc2.{m[2]}"),
]


def _normalise_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip wrapper prefixes, drop unused keys, map legacy names and ``encoder.layer(s)`` to
    ``layers``."""
    out = {}
    for key, v in state_dict.items():
        for p in _WRAPPERS:
            if key.startswith(p):
                key = key[len(p):]
                break
        if _DROP.fullmatch(key):
            continue
        for pattern, repl in _LEGACY:
            m = re.fullmatch(pattern, key)
            if m:
                key = repl(m)
                break
        key = re.sub(r"^encoder\.layers?\.", "layers.", key)
        out[key] = v
    return out


def convert_hf_state_dict(
    state_dict: dict[str, Tensor], cfg: ViTConfig, model_type: str
) -> dict[str, Tensor]:
    """Rename and fuse a transformers state dict to the patchlens layout (pure function).

    ``model_type`` is the HF ``model_type`` or architecture name (e.g. ``"dinov2"`` or
    ``"CLIPVisionModelWithProjection"``). Keys that do not fit are kept and reported by
    `load_strict`.
    """
    if model_type in ARCHITECTURES:
        family = ARCHITECTURES[model_type][0]
    else:
        family = _FAMILY.get(model_type)
    if family is None:
        raise UnsupportedModelError(f"Hugging Face model_type {model_type!r} is not supported.")
    sd = _normalise_keys(state_dict)
    if family == "siglip" and cfg.pooling != "map":
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    if cfg.final_norm == "none":
        sd = {k: v for k, v in sd.items() if not k.startswith(("post_layernorm.", "layernorm."))}
    blk = r"layers\.(\d+)"
    rules = [
        (r"embeddings\.patch_embeddings?\.(?:projection\.)?(weight|bias)", r"embed.proj.\1"),
        *layer_norm_keys(r"pre_layrnorm->ln_pre"),
        *layer_norm_keys(rf"{blk}\.(?:layernorm_before|norm1|layer_norm1)->blocks.\1.ln1"),
        *layer_norm_keys(rf"{blk}\.(?:layernorm_after|norm2|layer_norm2)->blocks.\1.ln2"),
        (rf"{blk}\.(?:attention|self_attn)\.(?:o_proj|out_proj)\.(\w+)", r"blocks.\1.attn.proj.\2"),
        (rf"{blk}\.mlp\.(fc1|fc2)\.(\w+)", r"blocks.\1.mlp.\2.\3"),
        (rf"{blk}\.mlp\.down_proj\.(\w+)", r"blocks.\1.mlp.fc2.\2"),
        (rf"{blk}\.layer_scale(\d)\.lambda1", r"blocks.\1.ls\2.gamma"),
        *layer_norm_keys(r"(?:layernorm|post_layernorm)->ln_final"),
        (r"head\.probe", "attn_pool.latent"),
        (r"head\.attention\.out_proj\.(\w+)", r"attn_pool.proj.\1"),
        *layer_norm_keys(r"head\.layernorm->attn_pool.norm"),
        (r"head\.mlp\.(fc1|fc2)\.(\w+)", r"attn_pool.mlp.\1.\2"),
        (r"(?:classifier|cls_classifier|visual_projection)\.(\w+)", r"head.\1"),
        (r"distillation_classifier\.(\w+)", r"head_dist.\1"),
    ]
    out: dict[str, Tensor] = {}
    for k, v in rename(sd, rules).items():
        if k in ("embeddings.cls_token", "embeddings.class_embedding"):
            out["embed.cls_token"] = v.reshape(1, -1)
        elif k == "embeddings.distillation_token":
            out["embed.dist_token" if cfg.distilled else "embed.reg_tokens"] = v.reshape(1, -1)
        elif k == "embeddings.register_tokens":
            out["embed.reg_tokens"] = v.reshape(-1, v.shape[-1])
        elif k in ("embeddings.position_embeddings", "embeddings.position_embedding.weight"):
            out["embed.pos_embed"] = v.reshape(-1, v.shape[-1])
        elif k == "attn_pool.latent":
            out[k] = v.reshape(1, -1)
        elif k.startswith("head.attention.in_proj_"):
            kind = k.rsplit("_", 1)[-1]
            d = v.shape[0] // 3
            out[f"attn_pool.q.{kind}"], out[f"attn_pool.kv.{kind}"] = v[:d], v[d:]
        else:
            out[k] = v
    _fuse(out, r"layers\.(\d+)\.(?:attention|self_attn)\.([qkv])_proj\.(weight|bias)",
          ("q", "k", "v"), "blocks.{}.attn.qkv.{}")
    _fuse(out, r"layers\.(\d+)\.mlp\.(gate|up)_proj\.(weight|bias)", ("gate", "up"),
          "blocks.{}.mlp.fc1.{}")
    return out


def _fuse(sd: dict[str, Tensor], pattern: str, parts: tuple[str, ...], target: str) -> None:
    """Concatenate ``parts`` (in order) of each layer/param matched by ``pattern`` into
    ``target``; incomplete groups are left as they are (and reported by `load_strict`)."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for k in list(sd):
        m = re.fullmatch(pattern, k)
        if m:
            groups.setdefault((m[1], m[3]), {})[m[2]] = k
    for (layer, param), keys in groups.items():
        if set(keys) == set(parts):
            sd[target.format(layer, param)] = torch.cat([sd.pop(keys[p]) for p in parts], dim=0)


def _model_class(arch: str):
    import transformers

    return getattr(transformers, arch)


def from_hf(
    cls,
    obj: Any,
    *,
    architecture: str | None = None,
    interpolate_pos_encoding: bool = False,
    **hf_kwargs: Any,
):
    """Build a `HookedViT` (class ``cls``) from a transformers model, a config (random init with
    the HF initialisation) or a repo id / local directory (``from_pretrained`` with
    ``hf_kwargs``). ``interpolate_pos_encoding=True`` lets ViT/DeiT/CLIP/SigLIP models take other
    image sizes, as the same HF forward argument does. Keeps the source's device and dtype."""
    from transformers import PretrainedConfig

    if isinstance(obj, str):
        src = _load_pretrained(obj, architecture, **hf_kwargs)
        source = f"hf:{obj}"
    elif isinstance(obj, PretrainedConfig):
        _, arch, _, _ = _resolve(obj, architecture)
        src = _model_class(arch)._from_config(obj, **hf_kwargs).eval()
        source = f"hf:random-init {arch}"
    else:
        src, source = obj, ""
    cfg = hf_config(src, source=source)
    if interpolate_pos_encoding:
        cfg = cfg.replace(dynamic_img_size=True)
    sd = convert_hf_state_dict(src.state_dict(), cfg, cfg.extra["hf_architecture"])
    param = next(src.parameters())
    model = cls(cfg, init=False).to(device=param.device, dtype=param.dtype)
    load_strict(model, sd)  # load in the source dtype: float64 weights stay exact
    return model.eval()


def _load_pretrained(name: str, architecture: str | None, **kwargs: Any) -> nn.Module:
    from transformers import AutoConfig

    hint = (
        "Offline, pass a local directory holding config.json and the weights "
        "(HookedViT.from_hf('/path/to/dir')), or load the model with transformers yourself and "
        "pass the model object (HookedViT.from_hf(model))."
    )
    shared = ("revision", "cache_dir", "local_files_only", "token", "trust_remote_code")
    config_kwargs = {k: v for k, v in kwargs.items() if k in shared}
    try:
        config = AutoConfig.from_pretrained(name, **config_kwargs)
    except (OSError, ConnectionError) as e:
        raise UnknownModelError(
            f"Could not load the Hugging Face config of {name!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). {hint}"
        ) from e
    except ValueError as e:
        raise UnsupportedModelError(f"Hugging Face model {name!r}: {e}") from e
    _, arch, _, _ = _resolve(config, architecture)
    try:
        return _model_class(arch).from_pretrained(name, **kwargs).eval()
    except (OSError, ConnectionError) as e:
        raise UnknownModelError(
            f"Could not load the Hugging Face weights of {name!r} ({type(e).__name__}). {hint}"
        ) from e
