# %% [markdown]
# # 01 · HookedViT: hook points, caches and attention over the image
#
# Load the embedded clutter-digits ViT (offline), look at its token layout, cache every
# activation, edit one patch token with a hook, and draw attention patterns over the patch grid.

# %%
import plotly.express as px
import torch

import patchlens as pl
from patchlens import HookedViT
from patchlens.zoo.clutter_digits import generate

torch.manual_seed(0)
model = HookedViT.from_pretrained("clutter-digits-vit")
cfg = model.cfg
print(f"{cfg.n_layers} layers, d_model={cfg.d_model}, {cfg.n_heads} heads, grid {cfg.grid_size}")
print("prefix tokens:", model.layout.prefix, "| patch (2, 5) is token", model.layout.token(2, 5))

# %% [markdown]
# ## Images and predictions
# `model.preprocess` applies the model's own normalisation; inputs are `[batch, 3, 64, 64]`.

# %%
data = generate(6, split="test", seed=0)
x = model.preprocess(data.images)
with torch.no_grad():
    logits, cache = model.run_with_cache(x)
print("labels     ", data.labels.tolist())
print("predictions", logits.argmax(-1).tolist())
px.imshow(data.images.permute(0, 2, 3, 1).numpy(), facet_col=0, facet_col_wrap=6, height=220)

# %% [markdown]
# ## The cache
# Every hook point is in the cache; TransformerLens shorthand works. (On Linux,
# `pl.keep_freed_memory()` makes repeated full caches of big models faster: glibc keeps the
# memory of dropped caches in the process; it returns False where it does not apply.)

# %%
print("keep_freed_memory applied:", pl.keep_freed_memory())
print(len(cache.cache_dict), "activations cached")
for key in [("resid_pre", 3), ("q", 0), ("pattern", 0), ("mlp_post", 2)]:
    print(key, tuple(cache[key].shape))
decomposition = cache.decompose_resid()
final = cache["resid_post", cfg.n_layers - 1]
print("decomposition sums to the final residual stream:",
      torch.allclose(decomposition.sum(0), final, atol=1e-4))

# %% [markdown]
# ## A hook that edits one patch token
# Zero the residual stream of the patch under the digit's centre at layer 2 and see how the
# logit of the true class moves.

# %%
i = 0
ys, xs = torch.nonzero(data.masks[i], as_tuple=True)
row, col = int(ys.float().mean()) // cfg.patch_size[0], int(xs.float().mean()) // cfg.patch_size[1]
token = model.layout.token(row, col)


def zero_token(resid, hook):
    resid[:, token] = 0.0
    return resid


with torch.no_grad():
    edited = model.run_with_hooks(x[i : i + 1], fwd_hooks=[("blocks.2.hook_resid_pre", zero_token)])
label = int(data.labels[i])
print(f"patch ({row}, {col}) = token {token}: logit of class {label} "
      f"{logits[i, label]:.2f} -> {edited[0, label]:.2f}")

# %% [markdown]
# ## Attention of the class token over the image
# Row `cls` of each head's pattern, reshaped to the patch grid with `layout.to_grid`.

# %%
layer = cfg.n_layers - 1
cls_rows = cache["pattern", layer][i, :, model.layout.cls]  # [head, key_pos]
maps = model.layout.to_grid(cls_rows)  # [head, grid_h, grid_w]
fig = px.imshow(maps.numpy(), facet_col=0, color_continuous_scale="viridis", height=260,
                title=f"layer {layer}: class-token attention per head")
fig

# %% [markdown]
# ## Direct logit attribution, as in TransformerLens
# `get_full_resid_decomposition` splits the final residual stream into every head, every MLP,
# the embedding and the biases; `logit_attrs(..., pooled=True)` reads each component through
# the final norm (cached scale) and the head, so with `logit_offset` the components sum exactly
# to the logits. The weights have TransformerLens's shapes (`W_Q`, `W_O`, `OV`, ...).

# %%
stack, names = cache.get_full_resid_decomposition(expand_neurons=False, return_labels=True)
attrs = cache.logit_attrs(stack, data.labels, pooled=True)  # [component, image]
total = attrs.sum(0) + cache.logit_offset(data.labels)
print("components sum to the true-class logits:",
      torch.allclose(total, logits.gather(1, data.labels[:, None])[:, 0], atol=1e-4))
top = attrs.mean(1).abs().topk(5).indices
print("largest direct contributions:", [(names[j], round(float(attrs[j].mean()), 2)) for j in top])
print("W_Q", tuple(model.W_Q.shape), "W_O", tuple(model.W_O.shape), "OV", model.blocks[0].attn.OV)
