# %% [markdown]
# # 06 · Divergence: does the intervention stay on the model's natural distribution?
#
# The same question — "is the digit's identity carried by the residual stream at layer l?" —
# asked with three interventions: interchange (clean activations patched into the digit-erased
# run), zero-ablation and steering (adding a direction). For each, patchlens measures how far
# the patched activations are from anything the model produces on natural images (Grant, Han,
# Tartaglini & Potts, *Addressing divergent representations from causal interventions*).

# %%
import torch

import patchlens as pl
from patchlens import Site, Variant, Zero
from patchlens.diagnostics import (
    RECOMMENDED_IMAGES,
    Reference,
    counterfactual_latent_loss,
    diagnose,
)
from patchlens.zoo.clutter_digits import erase_digits, generate

torch.manual_seed(0)
model = pl.HookedViT.from_pretrained("clutter-digits-vit")
# the reference size the calibration recommends (docs/divergence.md)
natural = model.preprocess(generate(RECOMMENDED_IMAGES, split="train", seed=11).images)
reference = Reference.fit(model, natural, sites=["resid_pre"])
reference

# %%
data = generate(4, split="test", seed=3)
clean, corrupted = model.preprocess(data.images), model.preprocess(erase_digits(data))
metric = pl.metrics.logit(data.labels)

# %% [markdown]
# ## 1. Interchange (activation patching), one layer at a time, every token
# `diagnose=reference` measures the sweep's own patched activations (no second run). Every
# row's verdict comes with its evidence: how many patched vectors lie beyond the natural 1%
# tail (and by which measure), how many reference vectors that rests on, and the downstream
# neurons beyond their natural range. Patching all of layer 0 from the clean images *is* the
# clean run: natural.

# %%
interchange = pl.activation_patching(model, clean, corrupted, metric, per="layer",
                                     diagnose=reference, progress=False)
print(interchange.divergence.summary())
interchange.divergence.to_pandas()[["label", "class", "n", "outlier_rate", "null_fraction",
                                    "n_dormant", "verdict", "evidence"]].head(12)

# %% [markdown]
# ## 2. Zero-ablation of the same sites
# Zero is far below the natural norm range of the residual stream (the class token entering
# layer 0 is one constant vector, so zero is unlike it too): every site is divergent, found by
# the norm's lower tail.

# %%
zero_variants = [Variant([(Site("resid_pre", layers=l), Zero())], l)
                 for l in range(model.cfg.n_layers)]
zero = diagnose(model, corrupted, zero_variants, reference)
print(zero.summary())
zero.to_pandas()[["label", "class", "outlier_rate", "measure", "n_dormant", "verdict"]].head(12)

# %% [markdown]
# ## 3. Steering: add the mean difference between clean and corrupted residual streams
# A steering vector of moderate size stays close to the natural set; the same vector scaled up
# ten times does not.

# %%
layer = 2
with torch.no_grad():
    _, cc = model.run_with_cache(clean, names_filter=f"blocks.{layer}.hook_resid_pre")
    _, kc = model.run_with_cache(corrupted, names_filter=f"blocks.{layer}.hook_resid_pre")
direction = (cc[f"blocks.{layer}.hook_resid_pre"] - kc[f"blocks.{layer}.hook_resid_pre"]).mean((0, 1))
steer = [Variant([(Site("resid_pre", layers=layer), pl.Add(direction, scale))], f"scale {scale}")
         for scale in (1.0, 10.0)]
steering = diagnose(model, corrupted, steer, reference)
print(steering.summary())
steering.to_pandas()[["label", "class", "outlier_rate", "norm_ratio", "verdict"]]

# %% [markdown]
# ## Side by side (verdicts per variant)

# %%
import pandas as pd  # noqa: E402

pd.DataFrame([
    {"intervention": name, **rep.counts()}
    for name, rep in [("interchange", interchange.divergence), ("zero", zero), ("steering", steering)]
])

# %% [markdown]
# ## What a verdict is worth: the calibration
# `benchmarks/divergence_calibration.py` runs known-natural interventions (held-out images,
# self-patches, whole-layer interchanges from another image) and known-divergent ones (zero,
# x0 / x0.1 / x10, the class mean where it lies inside the natural shell, large random and
# steering vectors, vectors from the most distant layer, the paper's toy ReLU case) at the
# residual, attention-output and MLP sites of layers 0, 2 and 5 of both zoo models, with
# references of 100 to 2000 images and two seeds (docs/divergence.md has the command and the
# full tables). Its table, per model and reference size (in %):

# %%
from patchlens.diagnostics.calibration import figure, overall, zoo_counts  # noqa: E402

counts = zoo_counts()
overall(counts)

# %%
figure(counts)

# %% [markdown]
# ## Training a steering vector with and without the counterfactual latent loss
# A vector `v` added at layer 2 of the digit-erased run is trained to restore the true class's
# logit. With the counterfactual latent (CL) loss, the patched residual stream is also pulled
# towards the clean run's (the natural latent of the counterfactual input), as the paper
# proposes: `L = L_behaviour + eps * L_CL`. On this model the CL term pulls the patch tokens
# back towards the natural distribution at a cost in restored logit; the class token, which
# gets the same vector, stays divergent: one vector added to every token cannot follow the
# per-token counterfactual latents (docs/divergence.md has the measured figures).

# %%
hook = f"blocks.{layer}.hook_resid_pre"
h_clean = cc[hook]


def train_vector(eps: float, steps: int = 60) -> torch.Tensor:
    v = torch.zeros(model.cfg.d_model, requires_grad=True)
    opt = torch.optim.Adam([v], lr=0.05)
    base = model(corrupted, stop_at_layer=layer).detach()
    for _ in range(steps):
        h = base + v
        logits = model(h, start_at_layer=layer)
        loss = -metric(logits).mean()
        if eps:
            loss = loss + eps * counterfactual_latent_loss(h, h_clean)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return v.detach()


rows = []
for eps in (0.0, 10.0, 100.0):
    v = train_vector(eps)
    rep = diagnose(model, corrupted, [Variant([(Site("resid_pre", layers=layer), pl.Add(v))], eps)],
                   reference)
    with torch.no_grad():
        restored = metric(model(model(corrupted, stop_at_layer=layer) + v, start_at_layer=layer))
    by_class = {r["class"]: r for r in rep.rows}
    rows.append({"eps": eps, "|v|": float(v.norm()), "logit": float(restored.mean()),
                 "cls outliers": by_class["cls"]["outlier_rate"],
                 "patch outliers": by_class["patches"]["outlier_rate"],
                 "dormant neurons": by_class["patches"]["n_dormant"],
                 "verdict": rep.variant_verdicts()[0]})
pd.DataFrame(rows)
