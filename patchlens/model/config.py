"""`ViTConfig`: the TransformerLens config plus the fields a Vision Transformer needs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from transformer_lens.config.transformer_lens_config import TransformerLensConfig

POOLINGS = ("token", "avg", "map", "token_avg", "none")
FINAL_NORMS = ("pre_pool", "post_pool", "none")
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu", "identity")
MLP_KINDS = ("mlp", "swiglu")


def as_pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


@dataclass
class ViTConfig(TransformerLensConfig):
    """Architecture of a `HookedViT`.

    The TransformerLens fields (``d_model``, ``d_head``, ``n_heads``, ``n_layers``, ``d_mlp``,
    ``n_ctx``, ``eps``, ``act_fn``, ``normalization_type``, ``use_attn_result``,
    ``use_split_qkv_input``, ``use_hook_mlp_in``) keep their TransformerLens meaning; ``n_ctx`` is the number of
    tokens at the native image size and is derived when left at 0.

    Vision fields:
        image_size, patch_size: native input size and patch size, (height, width) in pixels.
        in_channels: image channels.
        class_token, distilled, n_registers: the prefix tokens, in the order
            ``cls, dist, reg0..`` before the patches (row-major).
        n_pos_prefix: how many leading prefix tokens receive a learned position embedding
            (timm ``no_embed_class`` -> 0; timm default -> all; Dinov2 with registers -> 1).
        pos_embed: whether there is a learned absolute position embedding at all.
        pos_interp: how the position embedding is resampled for another grid
            (``"timm"``, ``"hf_dinov2"``, ``"hf_dinov2_reg"`` (antialiased, Dinov2 with
            registers), ``"hf_vit"`` or ``None`` = native size only).
        dynamic_img_size: accept images of another size (position embedding resampled).
        patch_bias: the patch projection has a bias (CLIP-style models have none).
        pre_norm: a LayerNorm after the embedding (CLIP ``ln_pre`` / timm ``norm_pre``).
        qkv_bias, qk_norm, proj_bias: attention details.
        layer_scale: LayerScale after attention and MLP (applied inside attn_out / mlp_out).
        mlp_kind: ``"mlp"`` (fc1, act, fc2) or ``"swiglu"`` (gated, Dinov2 SwiGLU).
        pooling: ``"token"`` (class token), ``"avg"`` (mean of patch tokens), ``"map"``
            (attention-pool head), ``"token_avg"`` (class token concatenated with patch
            mean, Dinov2 classifier) or ``"none"``.
        final_norm: ``"pre_pool"`` (norm over all tokens, then pool), ``"post_pool"``
            (pool, then norm: timm ``fc_norm`` / CLIP ``post_layernorm``) or ``"none"``.
        n_classes: outputs of the classification head (0 = headless, returns pooled features).
        head_bias: the head has a bias (False for CLIP's visual projection).
        data_mean, data_std, data_interpolation, data_crop_pct, data_resize: the source
            model's preprocessing (see `patchlens.model.preprocess`).
        source: where the model came from, e.g. ``"timm:vit_small_patch16_224"``.
        zeroshot: a CLIP zero-shot head's description (``embed_dim``, ``image_proj``,
            ``class_names``, ...; see `patchlens.zeroshot`), or None.
    """

    d_model: int = 768
    d_head: int = 64
    n_layers: int = 12
    n_ctx: int = 0
    n_heads: int = -1
    d_mlp: int | None = None
    eps: float = 1e-6
    act_fn: str = "gelu"
    device: str | None = "cpu"
    use_hook_mlp_in: bool = False
    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    in_channels: int = 3
    class_token: bool = True
    distilled: bool = False
    n_registers: int = 0
    n_pos_prefix: int = -1
    pos_embed: bool = True
    pos_interp: str | None = "timm"
    dynamic_img_size: bool = False
    patch_bias: bool = True
    pre_norm: bool = False
    qkv_bias: bool = True
    qk_norm: bool = False
    proj_bias: bool = True
    layer_scale: bool = False
    mlp_kind: str = "mlp"
    mlp_bias: bool = True
    pooling: str = "token"
    final_norm: str = "pre_pool"
    n_classes: int = 0
    head_bias: bool = True
    map_mlp_ratio: float = 4.0
    data_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    data_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    data_interpolation: str = "bicubic"
    data_crop_pct: float = 0.875
    data_resize: str = "shortest"
    source: str = ""
    zeroshot: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if "zeroshot" in self.extra:  # configs written before `zeroshot` was a field
            extra = dict(self.extra)
            moved = extra.pop("zeroshot")
            self.extra = extra
            self.zeroshot = self.zeroshot if self.zeroshot is not None else moved
        self.image_size = as_pair(self.image_size)
        self.patch_size = as_pair(self.patch_size)
        self.data_mean = tuple(float(v) for v in self.data_mean)
        self.data_std = tuple(float(v) for v in self.data_std)
        if self.n_pos_prefix < 0:
            self.n_pos_prefix = self.n_prefix
        if self.n_ctx <= 0:
            self.n_ctx = self.n_prefix + self.grid_size[0] * self.grid_size[1]
        self.d_vocab = self.n_classes
        checks = [
            (self.pooling in POOLINGS, f"pooling must be one of {POOLINGS}, got {self.pooling!r}"),
            (self.final_norm in FINAL_NORMS, f"final_norm must be one of {FINAL_NORMS}"),
            (self.act_fn in ACTIVATIONS, f"act_fn must be one of {ACTIVATIONS}, got {self.act_fn!r}"),
            (self.mlp_kind in MLP_KINDS, f"mlp_kind must be one of {MLP_KINDS}"),
            (self.n_heads * self.d_head == self.d_model or self.n_heads > 0, "n_heads must be > 0"),
            (self.pooling not in ("token", "token_avg") or self.class_token,
             "token pooling needs a class token"),
            (0 <= self.n_pos_prefix <= self.n_prefix, "n_pos_prefix must be in [0, n_prefix]"),
            (self.image_size[0] % self.patch_size[0] == 0
             and self.image_size[1] % self.patch_size[1] == 0,
             f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    # ---- derived quantities -------------------------------------------------------------
    @property
    def n_prefix(self) -> int:
        """Number of prefix tokens (class, distillation and register tokens)."""
        return int(self.class_token) + int(self.distilled) + self.n_registers

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, cols) at the native image size."""
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def n_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def d_pooled(self) -> int:
        """Width of the pooled feature vector fed to the head."""
        return 2 * self.d_model if self.pooling == "token_avg" else self.d_model

    # ---- serialisation ------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that `from_json_dict` turns back into this config."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("device", "dtype"):
                continue
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> ViTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown ViTConfig fields {unknown}; known fields: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k not in ("dtype",)})

    def replace(self, **changes: Any) -> ViTConfig:
        """A copy with some fields changed."""
        d = self.to_json_dict()
        d.update(changes)
        return ViTConfig.from_json_dict(d)

