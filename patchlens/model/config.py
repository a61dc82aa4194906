"""`ViTConfig`: the TransformerLens config plus the fields a Vision Transformer needs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from transformer_lens.config.transformer_lens_config import TransformerLensConfig

from patchlens.errors import InputError

POOLINGS = ("token", "avg", "max", "avgmax", "map", "coca", "token_avg", "none")
FINAL_NORMS = ("pre_pool", "post_pool", "none")
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu", "sigmoid", "identity")
MLP_KINDS = ("mlp", "swiglu", "glu")
#: rotary-table recipes (`patchlens.model.rotary`): timm ``RotaryEmbeddingCat`` (EVA-02, Perception
#: Encoder, timm RoPE-ViTs), timm ``RotaryEmbeddingDinoV3``, transformers ``DINOv3ViTModel``
ROPE_KINDS = ("timm_cat", "timm_dinov3", "hf_dinov3")
ROPE_PRECISIONS = ("float32", "model")


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
        image_size, patch_size: native input size and patch size, (height, width) in pixels;
            the patch grid is ``image_size // patch_size`` (a remainder is dropped, as the
            source's strided patch projection does: timm's 384 px models with 14 px patches).
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
        qkv_bias, qk_norm, proj_bias: attention details (a source with separate q / v biases
            and no k bias, as EVA, converts to a fused bias whose k part is zero).
        attn_norm: a LayerNorm over the concatenated head outputs before the output projection
            (``attn.norm``; timm Eva ``scale_attn_inner``, open_clip ``scale_attn_inner``).
        rope: rotary position embeddings on q and k (after q/k norm; prefix tokens are not
            rotated), with the tables of one source: ``"timm_cat"`` (timm
            ``RotaryEmbeddingCat``: EVA-02, Perception Encoder), ``"timm_dinov3"`` (timm
            ``RotaryEmbeddingDinoV3``), ``"hf_dinov3"`` (transformers ``DINOv3ViTModel``) or
            None. Sets TransformerLens's ``positional_embedding_type="rotary"``; ``pos_embed``
            says whether a learned absolute embedding is added as well (EVA-02, PE).
        rope_temperature: the frequency base (timm ``rope_temperature``, HF ``rope_theta``).
        rope_grid_offset, rope_grid_indexing: added to the patch coordinates; ``"ij"`` (row,
            col) or ``"xy"`` (col, row) order of the two coordinate halves (timm).
        rope_ref_grid: ``timm_cat``: coordinates rescaled so that every grid spans this
            reference grid (timm ``ref_feat_shape``), or None.
        rope_normalize_coords: ``timm_dinov3``: ``"separate"``, ``"min"`` or ``"max"``.
        rope_periods: ``timm_dinov3``: ``(min_period, max_period)`` instead of the temperature.
        rope_rotate_half: rotate the two halves of each head (``[x1, x2] -> [-x2, x1]``,
            TransformerLens ``rotary_adjacent_pairs=False``) instead of adjacent pairs.
        rope_precision: the dtype the tables are computed in, as the source does: ``"float32"``
            (timm's fixed-size models cache float32 tables) or ``"model"`` (the model's dtype,
            at least float32: timm dynamic-size models, transformers).
        layer_scale: LayerScale after attention and MLP (applied inside attn_out / mlp_out).
        mlp_kind: ``"mlp"`` (fc1, act, fc2), ``"swiglu"`` (gated, ``silu(gate) * linear``:
            Dinov2 / EVA-02 SwiGLU) or ``"glu"`` (gated with ``act_fn``). Gated MLPs pack
            fc1 as ``[gate; linear]`` (``hook_pre`` = gate, ``hook_pre_linear`` = linear).
        mlp_norm: a LayerNorm on the MLP's hidden activation before fc2 (``mlp.norm``; timm
            ``scale_mlp``, open_clip ``scale_fc``).
        pooling: ``"token"`` (class token), ``"avg"`` / ``"max"`` / ``"avgmax"`` (mean, max,
            or half their sum over patch tokens), ``"map"`` (attention-pool head),
            ``"coca"`` (open_clip's ``AttentionalPooler``: a LayerNormed learned query over
            the LayerNormed tokens; the first query's output), ``"token_avg"`` (class token
            concatenated with patch mean, Dinov2 classifier) or ``"none"``.
        pool_include_prefix: avg / max / map / coca pooling runs over the prefix tokens too
            (timm ``pool_include_prefix``; timm Eva's attention pool).
        map_n_heads: heads of the ``map`` / ``coca`` pooler (0 = ``n_heads``).
        pool_dim: width of the ``coca`` pooler's output (0 = ``d_model``).
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
    attn_norm: bool = False
    rope: str | None = None
    rope_temperature: float = 10000.0
    rope_grid_offset: float = 0.0
    rope_grid_indexing: str = "ij"
    rope_ref_grid: tuple[int, int] | None = None
    rope_normalize_coords: str = "separate"
    rope_periods: tuple[float, float] | None = None
    rope_rotate_half: bool = False
    rope_precision: str = "float32"
    layer_scale: bool = False
    mlp_kind: str = "mlp"
    mlp_bias: bool = True
    mlp_norm: bool = False
    pooling: str = "token"
    pool_include_prefix: bool = False
    map_n_heads: int = 0
    pool_dim: int = 0
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
        if self.rope_ref_grid is not None:
            self.rope_ref_grid = as_pair(self.rope_ref_grid)
        if self.rope_periods is not None:
            self.rope_periods = tuple(float(v) for v in self.rope_periods)
        # TransformerLens's names for the same facts
        self.positional_embedding_type = "rotary" if self.rope else "standard"
        self.gated_mlp = self.mlp_kind != "mlp"
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
            (self.rope is None or self.rope in ROPE_KINDS,
             f"rope must be None or one of {ROPE_KINDS}, got {self.rope!r}"),
            (self.rope_precision in ROPE_PRECISIONS,
             f"rope_precision must be one of {ROPE_PRECISIONS}"),
            (self.rope_grid_indexing in ("ij", "xy"), "rope_grid_indexing must be 'ij' or 'xy'"),
            (self.rope_normalize_coords in ("separate", "min", "max"),
             "rope_normalize_coords must be 'separate', 'min' or 'max'"),
            (self.rope is None or self.d_head % 4 == 0,
             f"rotary embeddings need d_head divisible by 4, got {self.d_head}"),
            (self.n_heads * self.d_head == self.d_model or self.n_heads > 0, "n_heads must be > 0"),
            (self.pooling not in ("token", "token_avg") or self.class_token,
             "token pooling needs a class token"),
            (0 <= self.n_pos_prefix <= self.n_prefix, "n_pos_prefix must be in [0, n_prefix]"),
            (self.image_size[0] >= self.patch_size[0] and self.image_size[1] >= self.patch_size[1],
             f"image_size {self.image_size} must be at least patch_size {self.patch_size}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InputError(msg)

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
    def d_vocab_out(self) -> int:
        """TransformerLens's output vocabulary size: the number of classes."""
        return self.n_classes

    @property
    def d_pooled(self) -> int:
        """Width of the pooled feature vector fed to the head."""
        if self.pooling == "token_avg":
            return 2 * self.d_model
        if self.pooling == "coca" and self.pool_dim:
            return self.pool_dim
        return self.d_model

    @property
    def pool_heads(self) -> int:
        """Heads of the attention-pool head (``map`` / ``coca``)."""
        return self.map_n_heads or self.n_heads

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
            raise InputError(f"Unknown ViTConfig fields {unknown}; known fields: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k not in ("dtype",)})

    def replace(self, **changes: Any) -> ViTConfig:
        """A copy with some fields changed."""
        d = self.to_json_dict()
        d.update(changes)
        return ViTConfig.from_json_dict(d)

