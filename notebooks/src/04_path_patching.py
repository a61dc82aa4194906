# %% [markdown]
# # 04 · Path patching: which heads write the digit's identity into the logits?
#
# Path patching (Wang et al. 2022) measures the effect of one component on another through the
# direct path only. Here: every head as sender, the final residual stream as receiver (the
# direct effect on the logits), on the clutter-digits model.

# %%
import torch

import patchlens as pl
from patchlens import Node
from patchlens.zoo.clutter_digits import erase_digits, generate

model = pl.HookedViT.from_pretrained("clutter-digits-vit")
data = generate(4, split="test", seed=3)
clean_images = data.images
corrupt_images = erase_digits(data)
clean, corrupted = model.preprocess(clean_images), model.preprocess(corrupt_images)
metric = pl.metrics.logit(data.labels)

# %% [markdown]
# ## Direct effect of each head on the true-class logit
# Noising: the clean run, with one head's output taken from the corrupted run and every other
# head (and MLP) frozen to its clean output.

# %%
direct = pl.path_patching(model, clean, corrupted, pl.all_heads(model), Node("resid_final"),
                          metric, normalize=True)
print(direct)
direct.plot()

# %% [markdown]
# ## Which earlier heads feed the class token's queries of the most important last-layer head?

# %%
layer = model.cfg.n_layers - 1
head = int(direct.effects[layer].abs().argmax())   # effects: patched − unpatched
print(f"receiver: head {layer}.{head}, query of the class token")
to_query = pl.path_patching(model, clean, corrupted, pl.all_heads(model)[: layer * model.cfg.n_heads],
                            Node("q", layer, head, tokens="cls"), metric)
to_query.plot()

# %% [markdown]
# ## MLPs: frozen versus recomputed
# With `mlps="recompute"` the paths through the MLPs count too.

# %%
senders = [Node("mlp_out", l) for l in range(model.cfg.n_layers)]
frozen = pl.path_patching(model, clean, corrupted, senders, Node("resid_final"), metric)
recomputed = pl.path_patching(model, clean, corrupted, senders, Node("resid_final"), metric,
                              mlps="recompute")
print("frozen    ", frozen.effects.numpy().round(3))
print("recomputed", recomputed.effects.numpy().round(3))
