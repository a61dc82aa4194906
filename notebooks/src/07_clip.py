# %% [markdown]
# # 07 · CLIP: open_clip models, zero-shot heads, and patching across images
#
# Build a small random-init open_clip CLIP offline, turn its image tower into a `HookedViT`,
# give it a zero-shot head from a few class names, and patch the residual stream of one
# image's digit patches into another image to see how the text-prompt logits move.
# (With random weights the logits mean nothing; the mechanics are those of a real CLIP.)

# %%
import logging

import open_clip
import plotly.express as px
import torch

from patchlens import HookedViT, zeroshot_head
from patchlens.zoo.clutter_digits import generate

logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that no weights were loaded
torch.manual_seed(0)
small = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=64, patch_size=16, width=64, layers=4, head_width=16),
    text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=4, layers=2),
)
clip = open_clip.create_model("ViT-B-32", pretrained=None, **small).eval()  # random init
image_tower = HookedViT.from_open_clip(clip)
cfg = image_tower.cfg
print(cfg.source, f"| {cfg.n_layers} layers, d_model={cfg.d_model}, grid {cfg.grid_size}")
print("mean/std from open_clip:", cfg.data_mean, cfg.data_std)

# %% [markdown]
# ## Exactly the same image features
# `image_tower(x)` is `clip.encode_image(x)`: the unnormalised image embedding.

# %%
data = generate(2, split="test", seed=3)
x = image_tower.preprocess(data.images)
with torch.no_grad():
    diff = (image_tower(x) - clip.encode_image(x)).abs().max().item()
print(f"max |HookedViT - open_clip| = {diff:.1e}")

# %% [markdown]
# ## A zero-shot head
# `zeroshot_head` embeds one prompt per class and template with CLIP's own text tower, averages
# the templates, and attaches `logit_scale * text_features` as an ordinary linear head after an
# explicit L2 normalisation (`hook_image_embed` -> `hook_normalized_embed` -> `head`).

# %%
names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
templates = ("a photo of the digit {}.", "a handwritten {}.")
model = zeroshot_head(clip, names, templates, hooked=image_tower)  # attaches in place
with torch.no_grad():
    logits, cache = model.run_with_cache(x)
    # one template: the head reproduces open_clip's own image-text logits
    one = zeroshot_head(clip, names)
    reference, _ = clip.get_logits(x, open_clip.tokenize([f"a photo of a {n}." for n in names], 16))
    print(f"max |zero-shot head - clip.get_logits| = {(one(x) - reference).abs().max():.1e}")
print("head:", model.head, "| W_U", tuple(model.W_U.shape))
for name in ["hook_pooled", "hook_image_embed", "hook_normalized_embed", "hook_logits"]:
    print(f"{name:22s}", tuple(cache[name].shape))
print("labels:", data.labels.tolist(), "| predictions:", logits.argmax(-1).tolist())
px.imshow(data.images.permute(0, 2, 3, 1).numpy(), facet_col=0, height=240)

# %% [markdown]
# ## Patch one image's digit into the other
# Take the residual stream of image B at the patches that cover its digit, write it into image
# A's run at one layer with `run_with_hooks`, and compare A's class logits before and after.

# %%
layer = 2
mask = data.masks[1].reshape(cfg.grid_size[0], cfg.patch_size[0], cfg.grid_size[1],
                             cfg.patch_size[1]).any(3).any(1)  # patches touching B's digit
tokens_b = [model.layout.token(int(r), int(c)) for r, c in torch.nonzero(mask)]
source = cache["resid_pre", layer][1]


def paste_b(resid, hook):
    resid[0, tokens_b] = source[tokens_b]
    return resid


with torch.no_grad():
    patched = model.run_with_hooks(x[:1], fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", paste_b)])
print(f"pasted {len(tokens_b)} of B's patch tokens into A at layer {layer}")
fig = px.bar(x=names, y=[logits[0].numpy(), patched[0].numpy()], barmode="group",
             labels={"x": "prompt class", "value": "logit"}, height=300,
             title="image A: zero-shot logits before / after the patch")
fig.data[0].name, fig.data[1].name = "clean", "patched"
fig

# %% [markdown]
# ## Real weights (online)
# With internet access the same code runs on trained models:
#
# ```python
# clip = open_clip.create_model("ViT-B-32", pretrained="openai")
# model = zeroshot_head(clip, ["a cat", "a dog"])            # logits == clip.get_logits(...)
# HookedViT.from_open_clip("ViT-B-32", pretrained="openai")  # image tower only
# ```
#
# Offline, pass a checkpoint file as `pretrained="/path/open_clip_model.safetensors"`. Hugging
# Face `CLIPModel` / `SiglipModel` work too; pass their tokenizer (`tokenizer=`) or
# pre-tokenized `input_ids`. See `docs/clip.md`.
