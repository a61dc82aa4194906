# %% [markdown]
# # 03 · Activation patching: where does the digit's identity live?
#
# Clean images show a digit among clutter; corrupted images are the same images with the digit
# erased (its pixels filled with the image's median background colour). Denoising patches clean
# activations into the corrupted run, one (layer, token) at a time, and measures how much of the
# true class's logit comes back.

# %%
import plotly.express as px
import torch

import patchlens as pl
from patchlens.zoo.clutter_digits import erase_digits, generate

torch.manual_seed(0)
model = pl.HookedViT.from_pretrained("clutter-digits-vit")
data = generate(4, split="test", seed=3)
clean_images = data.images
corrupt_images = erase_digits(data)
clean, corrupted = model.preprocess(clean_images), model.preprocess(corrupt_images)
px.imshow(torch.cat([clean_images, corrupt_images]).permute(0, 2, 3, 1).numpy(), facet_col=0,
          facet_col_wrap=4, height=360)

# %% [markdown]
# ## Layer x token sweep (residual stream, denoising)
# The metric is the logit of each image's true class, reported as normalised recovery
# (1 = the patch restores the clean logit, 0 = no effect).

# %%
metric = pl.metrics.recovery(pl.metrics.logit(data.labels))
result = pl.activation_patching(model, clean, corrupted, metric, site="resid_pre", per="token")
print(result)
result.plot()

# %% [markdown]
# Each image's own effects laid over its own clean image, one panel per layer; the slider picks
# the image. Early layers light up on the digit's patches; later layers move the information to
# the class token.

# %%
result.plot(kind="grid")

# %% [markdown]
# Where do the digit's patches sit on the grid? Each image's ground-truth mask mapped to its
# patches; the effects on an image's own digit patches against the rest of its patches:

# %%
patch_masks = data.patch_masks(model.cfg.patch_size[0], threshold=0.1)   # [4, 8, 8], per image
per_image = result.effects_per_example[:, :, model.layout.n_prefix:]      # [4, layer, patches]
digit = patch_masks.flatten(1)[:, None, :].expand_as(per_image)
on_digit = (per_image * digit).sum(-1) / digit.sum(-1)
off_digit = (per_image * ~digit).sum(-1) / (~digit).sum(-1)
print("mean effect per layer on each image's digit patches:", on_digit.mean(0).numpy().round(3))
print("mean effect per layer on its other patches          :", off_digit.mean(0).numpy().round(3))

# %% [markdown]
# The same question in one sweep: `per="region"` with one mask per image patches every image's
# own digit patches (and, as a second region, the rest) at once.

# %%
regions = pl.activation_patching(model, clean, corrupted, metric, per="region",
                                 regions={"digit": patch_masks, "rest": ~patch_masks})
print(regions.to_pandas().pivot(index="layer", columns="region", values="effect").round(3))

# %% [markdown]
# ## Layer x head sweep (head outputs, all tokens)

# %%
heads = pl.activation_patching(model, clean, corrupted, metric, per="head")
heads.plot()

# %% [markdown]
# ## Attribution patching: a cheap screen
# One forward and one backward pass estimate every cell. Its result has the same meaning as the
# exact sweep's (values: the estimated patched recovery, normalised the same way; effects: the
# first-order change), so the effects compare directly.

# %%
approx = pl.activation_patching(model, clean, corrupted, metric, site="resid_pre", per="token",
                                method="attribution")
exact = result.effects.flatten()
est = approx.effects.flatten()
corr = torch.corrcoef(torch.stack([exact, est]))[0, 1].item()
print(f"correlation between attribution patching and exact patching over "
      f"{exact.numel()} cells: {corr:.3f}")
px.scatter(x=exact.numpy(), y=est.numpy(), labels={"x": "exact", "y": "attribution estimate"},
           height=350)
