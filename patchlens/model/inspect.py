"""The hook point table: every hook's name and activation shape, read off a real forward pass."""

from __future__ import annotations

import torch

SHAPE_NAMES = {
    "hook_q": "batch pos head d_head", "hook_k": "batch pos head d_head",
    "hook_v": "batch pos head d_head", "hook_z": "batch pos head d_head",
    "hook_attn_scores": "batch head query_pos key_pos", "hook_pattern": "batch head query_pos key_pos",
    "hook_result": "batch pos head d_model", "hook_q_input": "batch pos head d_model",
    "hook_k_input": "batch pos head d_model", "hook_v_input": "batch pos head d_model",
    "hook_scale": "... 1", "hook_pre": "batch pos d_mlp", "hook_post": "batch pos d_mlp",
    "hook_pre_linear": "batch pos d_mlp", "hook_pooled": "batch d_pooled",
    "hook_pooled_dist": "batch d_pooled", "hook_logits": "batch n_classes",
    "hook_image_embed": "batch embed_dim", "hook_normalized_embed": "batch embed_dim",
    "hook_ln_pre": "batch pos d_model",
}


def hook_shapes(model, image_size: tuple[int, int] | None = None) -> list[dict[str, str]]:
    """Rows ``{"name", "shape", "axes"}`` for every hook point, measured on one image with the
    opt-in hooks (``hook_result``, split q/k/v inputs) switched on."""
    size = image_size or model.cfg.image_size
    p = next(model.parameters())
    x = torch.zeros(1, model.cfg.in_channels, *size, device=p.device, dtype=p.dtype)
    with torch.no_grad(), model.options(use_attn_result=True, use_split_qkv_input=True):
        _, cache = model.run_with_cache(x)
    rows = []
    for name in model.hook_dict:
        last = name.rsplit(".", 1)[-1]
        shape = tuple(cache[name].shape) if name in cache.cache_dict else None
        rows.append({
            "name": name,
            "shape": "x".join(map(str, shape)) if shape else "(not used by this model)",
            "axes": SHAPE_NAMES.get(last, "batch pos d_model"),
        })
    return rows
