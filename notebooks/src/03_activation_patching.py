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
# The same values laid over the first image, one map per layer (use the slider). Early layers
# light up on the digit's patches; later layers move the information to the class token.

# %%
result.plot(kind="grid", image=clean_images[0])

# %% [markdown]
# Where do the digit's patches sit on the grid? The ground-truth mask mapped to patches:

# %%
patch_mask = data.patch_masks(model.cfg.patch_size[0], threshold=0.1)[0]
on_digit = result.values[:, [model.layout.token(int(r), int(c)) for r, c in patch_mask.nonzero()]]
off_digit = result.values[:, [model.layout.token(int(r), int(c)) for r, c in (~patch_mask).nonzero()]]
print("mean recovery per layer on digit patches :", on_digit.mean(1).numpy().round(3))
print("mean recovery per layer off digit patches:", off_digit.mean(1).numpy().round(3))

# %% [markdown]
# ## Layer x head sweep (head outputs, all tokens)

# %%
heads = pl.activation_patching(model, clean, corrupted, metric, per="head")
heads.plot()

# %% [markdown]
# ## Attribution patching: a cheap screen
# One forward and one backward pass estimate every cell. Compare with the exact sweep above
# (attribution values are changes of the metric; the exact recovery is already normalised).

# %%
approx = pl.activation_patching(model, clean, corrupted, metric, site="resid_pre", per="token",
                                method="attribution")
exact = result.values.flatten()
est = approx.values.flatten()
corr = torch.corrcoef(torch.stack([exact, est]))[0, 1].item()
print(f"correlation between attribution patching and exact patching over "
      f"{exact.numel()} cells: {corr:.3f}")
px.scatter(x=exact.numpy(), y=est.numpy(), labels={"x": "exact", "y": "attribution estimate"},
           height=350)
