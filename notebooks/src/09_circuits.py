# %% [markdown]
# # 09 · Circuits: which edges carry the shortcut, and which carry the digit?
#
# A circuit is a set of edges of the model's computational graph (embedding, every head with
# its query, key and value inputs, every MLP, the logits) that on its own reproduces a
# behaviour. We score every edge with edge attribution patching (EAP, Syed et al. 2023) and its
# integrated-gradients version (EAP-IG, Hanna et al. 2024), keep the top edges, and check the
# circuit by ablation: the model runs with every other edge taking its corrupted value, and
# the faithfulness says how much of the behaviour survives.

# %%
import torch

import patchlens as pl
from patchlens.circuits import Circuit, Graph, edge_scores, evaluate, faithfulness_curve
from patchlens.zoo.clutter_digits import erase_digits, generate

torch.manual_seed(0)
shortcut = pl.HookedViT.from_pretrained("clutter-digits-shortcut-vit")
on = generate(8, split="test", seed=7, shortcut="on")
off = generate(8, split="test", seed=7, shortcut="off")
clean, corrupted = shortcut.preprocess(on.images), shortcut.preprocess(off.images)
metric = pl.metrics.logit(on.labels)
with torch.no_grad():
    print("true-class logit, marker on :", metric(shortcut(clean)).mean().item())
    print("true-class logit, marker off:", metric(shortcut(corrupted)).mean().item())

# %% [markdown]
# ## The graph
# The embedding is split by tokens: the marker's patch (row 0, column 0) is a node of its
# own, so the circuit can say whether a head reads the marker.

# %%
graph = Graph.from_model(shortcut, tokens={"marker": (0, 0)})
print(graph)
graph.to_pandas().head()

# %% [markdown]
# ## Edge scores
# EAP: one forward pass per input and one backward pass score every edge. EAP-IG averages the
# gradient over 5 points between the corrupted and the clean inputs.

# %%
eap = edge_scores(shortcut, clean, corrupted, metric, method="eap", graph=graph)
eap_ig = edge_scores(shortcut, clean, corrupted, metric, method="eap-ig", graph=graph)
print(eap_ig)
eap_ig.top(8)

# %% [markdown]
# ## The marker circuit: 10% of the edges, checked by ablation

# %%
circuit = Circuit.top_k(eap_ig, graph.n_edges // 10)
result = evaluate(shortcut, circuit, clean, corrupted, metric)
print(circuit)
print(result)
assert result.faithfulness >= 0.9

# %%
circuit.connected().plot(eap_ig, title="marker circuit (EAP-IG top 10%, connected edges)")

# %% [markdown]
# The edges out of `embed@marker` against those out of the rest of the image:

# %%
circuit.to_pandas().groupby("sender").value.apply(lambda v: v.abs().sum()).sort_values(
    ascending=False).head(6)

# %% [markdown]
# ## Where the model reads: one embedding node per token
# With one node per token, the summed |score| of each token's edges, laid over the image,
# finds the marker without being told where it is.

# %%
per_token = Graph.from_model(shortcut, tokens="each")
tok_scores = edge_scores(shortcut, clean, corrupted, metric, method="eap-ig", graph=per_token)
tok_scores.plot_tokens("embed", image=on.images[0])

# %% [markdown]
# ## Faithfulness curves: EAP against EAP-IG against random circuits of the same size

# %%
ks = [5, 11, 22, 55, 111, 277, 554]
curve = faithfulness_curve(shortcut, [eap, eap_ig], clean, corrupted, metric, ks=ks,
                           n_random=2)
print(curve)
curve.plot()

# %% [markdown]
# ## The plain model: the digit's circuit
# Clean images show a digit; corrupted images are the same images with the digit erased. The
# digit's evidence is spread over many patches and heads, so a 10% circuit keeps much less of
# it than the marker's circuit does.

# %%
plain = pl.HookedViT.from_pretrained("clutter-digits-vit")
data = generate(8, split="test", seed=3)
d_clean, d_corrupted = plain.preprocess(data.images), plain.preprocess(erase_digits(data))
d_metric = pl.metrics.logit(data.labels)
d_graph = Graph.from_model(plain)
d_scores = edge_scores(plain, d_clean, d_corrupted, d_metric, method="eap-ig", graph=d_graph)
for frac in (0.1, 0.3):
    c = Circuit.top_k(d_scores, round(frac * d_graph.n_edges))
    print(f"top {frac:.0%}:", evaluate(plain, c, d_clean, d_corrupted, d_metric))

# %%
d_curve = faithfulness_curve(plain, d_scores, d_clean, d_corrupted, d_metric, ks=ks, n_random=2)
d_curve.plot(title="digit circuit (plain model)")

# %% [markdown]
# ## Mean ablation, and how far it runs the model off its distribution
# Mean ablation replaces the removed edges by their mean over natural images. The divergence
# report compares the ablated MLP inputs with natural ones and checks for MLP neurons pushed
# beyond their natural range.

# %%
from patchlens.diagnostics import Reference  # noqa: E402

natural = shortcut.preprocess(generate(64, split="train", seed=1, shortcut="train").images)
ref = Reference.fit(shortcut, natural, ["mlp_in"], max_samples=500)
mean_abl = evaluate(shortcut, circuit, clean, corrupted, metric, ablation="mean",
                    reference=natural, diagnose=ref)
print(mean_abl)
mean_abl.divergence.to_pandas()[["label", "hook", "outlier_rate", "n_dormant", "verdict"]]
