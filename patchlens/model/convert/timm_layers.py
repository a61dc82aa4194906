"""Reading timm's shared layers, for the timm converters (`VisionTransformer`, `Eva`): MLPs
(``Mlp``, ``GluMlp``, ``SwiGLU``), LayerNorms, the attention-pool head, the data config, and
the state-dict steps they share (fusing SwiGLU's two fc1 halves)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from patchlens.errors import UnsupportedModelError
from patchlens.model.convert.common import activation_name, is_identity


def check_patch_embed(model: nn.Module) -> nn.Module:
    """``model.patch_embed`` if it is timm's plain linear ``PatchEmbed`` (no hybrid CNN stem, no
    norm inside, no dynamic padding); `UnsupportedModelError` naming the feature otherwise."""
    from timm.layers import PatchEmbed

    pe = model.patch_embed
    if type(pe) is not PatchEmbed:
        raise UnsupportedModelError(
            f"patch embedding {type(pe).__name__} (hybrid CNN stem) is not supported; patchlens "
            "needs a plain linear patch projection."
        )
    if not is_identity(getattr(pe, "norm", None)):
        raise UnsupportedModelError("a norm inside the patch embedding (embed_norm_layer) is not "
                                    "supported.")
    if getattr(pe, "dynamic_img_pad", False):
        raise UnsupportedModelError("dynamic_img_pad is not supported.")
    return pe


def check_layer_norm(m: nn.Module, where: str) -> float:
    """The eps of an affine ``nn.LayerNorm``; `UnsupportedModelError` for anything else."""
    if not isinstance(m, nn.LayerNorm):
        raise UnsupportedModelError(
            f"{where} is a {type(m).__name__}; patchlens converts LayerNorm models only "
            "(RMSNorm and other norms change the math)."
        )
    if m.weight is None:
        raise UnsupportedModelError(f"{where} has no affine weight (elementwise_affine=False).")
    return float(m.eps)


def optional_norm(m: nn.Module | None, where: str) -> bool:
    """True if the optional norm ``m`` is present (and a LayerNorm), False if switched off."""
    if is_identity(m):
        return False
    check_layer_norm(m, where)
    return True


def mlp_fields(mlp: nn.Module, where: str = "blocks.0.mlp") -> dict[str, Any]:
    """`ViTConfig` fields of a timm MLP: ``d_mlp``, ``mlp_kind``, ``mlp_bias``, ``mlp_norm``,
    ``mlp_act`` (the activation's name) and ``gate_last`` (``GluMlp`` gating with its second
    half, converted by swapping the halves)."""
    kind = type(mlp).__name__
    if kind == "Mlp":
        fc1, gated = mlp.fc1, False
        d_mlp = fc1.out_features if isinstance(fc1, nn.Linear) else 0
    elif kind == "GluMlp":
        fc1, gated = mlp.fc1, True
        d_mlp = fc1.out_features // 2 if isinstance(fc1, nn.Linear) else 0
    elif kind == "SwiGLU":
        fc1, gated = mlp.fc1_g, True
        d_mlp = fc1.out_features
    else:
        raise UnsupportedModelError(
            f"MLP class {kind} ({where}) is not supported (timm Mlp, GluMlp, SwiGLU are)."
        )
    if not isinstance(fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        raise UnsupportedModelError(f"{where}: convolutional MLPs (use_conv=True) are not supported.")
    bias = fc1.bias is not None
    if (mlp.fc2.bias is not None) != bias:
        raise UnsupportedModelError(f"{where}: an MLP with a bias on only one of fc1 / fc2 is "
                                    "not supported.")
    act = activation_name(mlp.act, "timm") if not isinstance(mlp.act, nn.Sigmoid) else "sigmoid"
    return dict(
        d_mlp=d_mlp,
        mlp_kind=("swiglu" if act == "silu" else "glu") if gated else "mlp",
        mlp_bias=bias,
        mlp_norm=optional_norm(getattr(mlp, "norm", None), f"{where}.norm"),
        mlp_act=act,
        gate_last=kind == "GluMlp" and bool(mlp.gate_last),
    )


def act_fields(mlp: dict[str, Any], pool_act: str | None) -> dict[str, Any]:
    """``mlp_kind``, ``act_fn`` and ``d_mlp`` for the config: SwiGLU fixes its own activation,
    so ``act_fn`` then describes the attention pool's MLP; otherwise both must agree."""
    act = mlp["mlp_act"]
    if mlp["mlp_kind"] == "swiglu":
        act = pool_act or "gelu"
    elif pool_act is not None and pool_act != act:
        raise UnsupportedModelError(
            f"the attention pool's MLP activation ({pool_act}) differs from the blocks' ({act})."
        )
    return dict(d_mlp=mlp["d_mlp"], mlp_kind=mlp["mlp_kind"], act_fn=act,
                mlp_bias=mlp["mlp_bias"], mlp_norm=mlp["mlp_norm"])


def attention_pool_fields(ap: nn.Module, d: int) -> dict[str, Any]:
    """Fields of a timm ``AttentionPoolLatent`` head (``map_mlp_ratio``, ``map_n_heads``) and
    its MLP's activation (``pool_act``); `UnsupportedModelError` for variants patchlens lacks."""
    if type(ap).__name__ != "AttentionPoolLatent":
        raise UnsupportedModelError(f"attention pool {type(ap).__name__} is not supported "
                                    "(timm AttentionPoolLatent is).")
    if ap.pos_embed is not None or ap.latent_len != 1:
        raise UnsupportedModelError("attention pool variant (pos_embed or several latents) is "
                                    "not supported.")
    if ap.pool != "token" or not is_identity(ap.q_norm) or ap.mlp is None:
        raise UnsupportedModelError("attention pool without its MLP, with q/k norm or mean pool "
                                    "is not supported.")
    if not isinstance(ap.q, nn.Linear) or ap.latent.shape[-1] != d or ap.kv.in_features != d:
        raise UnsupportedModelError("attention pool without a query projection or with another "
                                    "latent width is not supported.")
    if ap.q.bias is None or ap.kv.bias is None or ap.proj.bias is None:
        raise UnsupportedModelError("attention pool without q/kv/proj biases is not supported.")
    optional_norm(ap.norm, "attn_pool.norm")
    return dict(map_mlp_ratio=ap.mlp.fc1.out_features / d, map_n_heads=ap.num_heads,
                pool_act=activation_name(ap.mlp.act, "timm attention-pool"))


def data_config(model: nn.Module) -> dict[str, Any]:
    """`ViTConfig` data fields from a timm model's ``pretrained_cfg``."""
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


def fuse_mlp_keys(sd: dict[str, Tensor], n_layers: int, gate_last: bool) -> None:
    """In place: SwiGLU's ``mlp.fc1_g`` / ``mlp.fc1_x`` -> one ``mlp.fc1`` packed
    ``[gate; linear]``; ``GluMlp(gate_last=True)``'s fc1 halves swapped to that order."""
    for i in range(n_layers):
        for p in ("weight", "bias"):
            g, x = f"blocks.{i}.mlp.fc1_g.{p}", f"blocks.{i}.mlp.fc1_x.{p}"
            if g in sd and x in sd:
                sd[f"blocks.{i}.mlp.fc1.{p}"] = torch.cat([sd.pop(g), sd.pop(x)], dim=0)
            elif gate_last and f"blocks.{i}.mlp.fc1.{p}" in sd:
                lin, gate = sd[f"blocks.{i}.mlp.fc1.{p}"].chunk(2, dim=0)
                sd[f"blocks.{i}.mlp.fc1.{p}"] = torch.cat([gate, lin], dim=0)
