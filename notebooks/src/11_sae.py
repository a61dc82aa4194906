# %% [markdown]
# # 11 · Sparse-autoencoder features as patching sites
#
# A sparse autoencoder (SAE) rewrites an activation as a sparse sum of learned directions
# ("features"). patchlens splices one into a hook point of the model; its feature activations
# become a hook with a `feature` axis, so every intervention, sweep and attribution method works
# on features. With the error term on, the spliced model computes exactly what the plain model
# does, so an intervention on a feature measures that feature's part only.

# %%
import torch

import patchlens as pl
from patchlens.zoo.clutter_digits import erase_digits, generate

torch.manual_seed(0)
model = pl.HookedViT.from_pretrained("clutter-digits-vit")
pl.sae.zoo_saes()

# %%
sae = pl.sae.load("clutter-digits-vit.resid_post.4")   # a TopK SAE shipped in the zoo
print(sae)
{k: round(v, 4) for k, v in sae.meta["quality"].items() if isinstance(v, float)}

# %% [markdown]
# ## 1. Splicing
# `model.add_sae(sae, use_error_term=True)` inserts it after `blocks.4.hook_resid_post`; six
# hook points follow, named as SAELens names them. The logits do not change.

# %%
data = generate(8, split="test", seed=3)
clean, corrupted = model.preprocess(data.images), model.preprocess(erase_digits(data))
plain = model(clean)
model.add_sae(sae, use_error_term=True)
print("max |logits change|:", float((model(clean) - plain).abs().max()))
[(n, " ".join(s.axes), s.alias) for n, s in model.hook_specs.items() if "hook_sae" in n]

# %% [markdown]
# ## 2. Interventions on features
# `Site("sae_acts_post", layers=4, features=[...])` selects features (and tokens, as always).
# Zero-ablating the features that are active at the class token changes the prediction.

# %%
_, cache = model.run_with_cache(clean, names_filter="blocks.4.hook_resid_post.hook_sae_acts_post")
acts = cache["blocks.4.hook_resid_post.hook_sae_acts_post"]
cls_feats = torch.nonzero(acts[0, 0]).flatten().tolist()
print("features active at cls of image 0:", cls_feats)
out = pl.patch(model, clean[:1], [(pl.Site("sae_acts_post", layers=4, tokens="cls",
                                           features=cls_feats), pl.Zero())])
print("label", int(data.labels[0]), "prediction before", int(plain[0].argmax()),
      "after", int(out[0].argmax()))

# %% [markdown]
# ## 3. Which features carry the digit? A sweep over all 512 features
# Clean features patched into the digit-erased run one at a time (exact, batched), then
# attribution patching over all features (one backward pass) with exact values for the top.

# %%
metric = pl.metrics.logit(data.labels[:2])
sweep = pl.activation_patching(model, clean[:2], corrupted[:2], metric, per="feature",
                               progress=False)
sweep.top(5)

# %%
table = pl.sae.patch_features(model, clean, corrupted, pl.metrics.logit(data.labels), top=5)
table.head(8)

# %% [markdown]
# ## 4. Looking at one feature
# Top-activating images with the patches where it fires, its activation histogram and its
# logit effect (the feature zero-ablated on its top images, through the rest of the network).

# %%
f = int(table.iloc[0]["feature"])
view = pl.sae.feature_view(model, clean, f, n_top=4)
print(view)
view.plot()

# %%
pl.sae.features(model, clean).sort_values("frequency", ascending=False).head(5)

# %% [markdown]
# A CAAP map restricted to the feature: for each patch, only this feature's activation from the
# image is written into a blurred context run.

# %%
amap = pl.sae.feature_caap(model, clean[:1], f)
amap.plot(0)

# %% [markdown]
# ## 5. The shortcut, found in feature space
# `clutter-digits-shortcut-vit` reads a coloured corner marker. On conflict images (marker and
# digit disagree) its SAE's features are ranked by attribution to the predicted class, without
# saying where the marker is; the top features sit on the marker, and ablating them moves the
# predictions to the digit.

# %%
from patchlens.sae.shortcut import marker_features

shortcut = pl.HookedViT.from_pretrained("clutter-digits-shortcut-vit")
marker = marker_features(shortcut, pl.sae.load("clutter-digits-shortcut-vit.resid_pre.0"), n=32)
{k: v for k, v in marker.items() if k not in ("top_features", "data")}

# %% [markdown]
# ## 6. Divergence in feature space
# `diagnose(..., sae=sae)` adds feature-space measures to the divergence report: dormant
# features (active on a patched vector, never on natural data) and the off-dictionary share
# of the patched vector compared with natural ones.

# %%
from patchlens.diagnostics import Reference, diagnose

model.reset_saes()
natural = model.preprocess(generate(120, split="train", seed=11).images)
ref = Reference.fit(model, natural, [("resid_post", [4])], max_samples=2000, progress=False)
variants = [pl.Variant([(pl.Site("resid_post", layers=4), pl.Interchange(clean))], "interchange"),
            pl.Variant([(pl.Site("resid_post", layers=4), pl.Scale(4.0))], "scale x4")]
rep = diagnose(model, corrupted, variants, ref, sae=sae, ot=False)
rep.to_pandas()[["label", "class", "outlier_rate", "sae_dormant", "sae_error", "sae_error_pct",
                 "verdict"]]
