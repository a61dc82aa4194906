# %% [markdown]
# # 12 · Distributed alignment search: where does the model keep the digit's identity?
#
# Distributed alignment search (DAS; Geiger, Wu, Potts, Icard & Goodman 2023) learns a rotation of
# a site's vectors such that swapping a few rotated coordinates between two images swaps a causal
# variable. Here the variable is the digit's identity in `clutter-digits-vit`: patch the source
# image's subspace into the base image and the model should now read the *source's* digit.
# Interchange intervention accuracy (IIA) is the share of held-out pairs where it does.
#
# The counterfactual latent (CL) loss (Grant, Han, Tartaglini & Potts) keeps the patched vectors
# close to the natural vectors of the counterfactual image (the base image redrawn with the
# source's digit). This notebook trains tiny versions of everything; `benchmarks/das.py` runs the
# full experiment (docs/das.md).

# %%
import tempfile
from pathlib import Path

import torch

import patchlens as pl
from patchlens import Site, das
from patchlens.diagnostics import Reference

torch.manual_seed(0)
model = pl.HookedViT.from_pretrained("clutter-digits-vit")
train = das.digit_pairs(model, 64, split="train", seed=0)
test = das.digit_pairs(model, 32, split="test", seed=1)
train

# %% [markdown]
# Each pair: a base image, a source image with another digit, the counterfactual label (the
# source's digit) and the counterfactual image (the base redrawn with the source's digit).

# %%
import plotly.express as px  # noqa: E402

px.imshow(torch.stack([model.to_image(train.base[0]), model.to_image(train.source[0]),
                       model.to_image(train.counterfactual[0])]).permute(0, 2, 3, 1),
          facet_col=0, title=f"base | source | counterfactual (label {int(train.labels[0])})")

# %% [markdown]
# ## Train a rotation at the class token of the last block's input
# `train_intervention` is interchange intervention training: cross-entropy of the patched logits
# against the counterfactual label (+ `cl_weight` x CL loss), early stopping on held-out IIA.

# %%
site = Site("resid_pre", layers=5, tokens="cls")
plain = das.train_intervention(model, site, das.RotatedSubspace(8), train, steps=20,
                               batch_size=16, lr=3e-2, eval_every=5, progress=False)
print(plain)
plain.plot()

# %% [markdown]
# ## The trained intervention is an ordinary intervention
# It runs in `patch`, in sweeps and in dataset runs, reading its source like `Interchange`, and is
# saved with its site in one safetensors file.

# %%
iv = plain.intervention
logits = pl.patch(model, test.base, [(site, iv.with_source(test.source))])
print("test IIA:", float((logits.argmax(-1) == test.labels).float().mean()),
      "| same via interchange_accuracy:", das.interchange_accuracy(model, site, iv, test))
path = Path(tempfile.mkdtemp()) / "digit_das.safetensors"
iv.save(path)
das.load_intervention(path).site

# %% [markdown]
# ## How natural are the patched vectors? The trade-off, in miniature
# `das_sweep` trains at each (layer, token group, cl_weight) and puts the held-out IIA beside the
# divergence of the patched vectors from the natural class-token vectors at the site
# (`diagnose`: Sinkhorn ratio to the natural-vs-natural baseline, outlier rate, downstream
# neurons beyond their natural range, verdict). `benchmarks/das.py --experiment` runs it on
# both zoo models at several layers and token groups.

# %%
natural = model.preprocess(pl.zoo.generate(200, split="train", seed=7).images)
reference = Reference.fit(model, natural, sites=[("resid_pre", 5)], progress=False)
sweep = das.das_sweep(model, train, test, layers=[5], tokens={"cls": "cls"},
                      cl_weights=[0.0, 10.0], reference=reference,
                      diagnose_kw={"behaviour": False}, progress=False,
                      intervention=lambda: das.RotatedSubspace(8), steps=15, batch_size=16,
                      lr=3e-2, eval_every=5)
sweep.to_pandas()[["layer", "tokens", "cl_weight", "iia", "sinkhorn_ratio", "outlier_rate",
                   "cl_test", "verdict"]]

# %%
sweep.plot()

# %% [markdown]
# ## Boundless DAS learns the subspace's width too
# A soft boundary `sigmoid((w - i - 1/2) / T)` over the rotated dimensions, its temperature
# annealed from 50 to 0.1 over the steps, the width `w` penalised in the loss.

# %%
boundless = das.BoundlessRotatedSubspace(16)
res = das.train_intervention(model, site, boundless, train, steps=20, batch_size=16, lr=3e-2,
                             eval_every=5, patience=None, progress=False)
print(res.iia, "dimensions interchanged:", boundless.n_interchanged())
