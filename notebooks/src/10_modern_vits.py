# %% [markdown]
# # 10 · Modern ViTs: DINOv3, EVA-02 and Perception Encoder (rotary position embeddings)
#
# timm's `Eva` class, Hugging Face's `DINOv3ViTModel` and open_clip's `EVA02-*` / `PE-Core-*`
# towers convert to `HookedViT` exactly. This notebook builds a small random-init DINOv3-S-like
# model offline (pass `pretrained=True`, or a local checkpoint with `checkpoint_path=`, for the
# real weights), looks at its register tokens, and reads the rotary hooks from a cache.

# %%
import plotly.express as px
import timm
import torch

from patchlens import HookedViT

torch.manual_seed(0)
src = timm.create_model("vit_small_patch16_dinov3", pretrained=False, depth=4, embed_dim=96,
                        num_heads=4, num_classes=0).eval()
model = HookedViT.from_timm(src)
cfg = model.cfg
print(f"rope={cfg.rope!r}, temperature {cfg.rope_temperature}, absolute position embedding: "
      f"{cfg.pos_embed}, registers: {cfg.n_registers}, LayerScale: {cfg.layer_scale}")
print("prefix tokens:", model.layout.prefix)

# %% [markdown]
# ## Exact, at any image size
# DINOv3 takes any multiple of the patch size; the rotary tables are built (and cached) per
# patch grid. The converted model agrees with timm to float32 rounding.

# %%
x = torch.randn(2, 3, 96, 160)
with torch.no_grad():
    print("max |HookedViT - timm|:", (model(x) - src(x)).abs().max().item())
    _, cache = model.run_with_cache(x)
print("grids with cached tables:", list(model.rotary._grids))

# %% [markdown]
# ## The rotary hooks
# `attn.hook_q` / `hook_k` hold q and k before the rotation, `attn.hook_rot_q` / `hook_rot_k`
# after it (TransformerLens's names). The class and register tokens are not rotated: their rows
# are equal; every patch token's query turns by an angle that depends on its row and column.

# %%
p = cfg.n_prefix
q, rot_q = cache["q", 1], cache["rot_q", 1]  # [batch, pos, head, d_head]
print("prefix tokens unchanged:", torch.equal(q[:, :p], rot_q[:, :p]))
print("rotation keeps each head's query norm:",
      torch.allclose(q.norm(dim=-1), rot_q.norm(dim=-1), atol=1e-5))
layout = model.layout_for((96, 160))
turn = torch.cosine_similarity(q[0, p:], rot_q[0, p:], dim=-1).mean(-1)  # [patches]
px.imshow(layout.to_grid(turn).numpy(), color_continuous_scale="viridis", height=260,
          title="cos(q, rot_q) per patch (layer 1, averaged over heads)")

# %% [markdown]
# ## Register tokens in the attention pattern
# How much each head of the last block attends from the class token to the four registers
# versus the patches.

# %%
pattern = cache["pattern", cfg.n_layers - 1][0]  # [head, query_pos, key_pos]
cls_row = pattern[:, 0]
print("class token -> registers:", cls_row[:, 1:p].sum(-1).numpy().round(3))
print("class token -> patches:  ", cls_row[:, p:].sum(-1).numpy().round(3))
