"""Circuits on the zoo models: exact scores against the naive loop, the shortcut model's marker
circuit, the divergence of ablated runs."""

from __future__ import annotations

import pytest
import torch
from test_circuits import naive_exact, no_stray_hooks

import patchlens as pl
from patchlens.circuits import Circuit, Graph, edge_scores, evaluate
from patchlens.zoo.clutter_digits import generate


@pytest.fixture(scope="module")
def shortcut():
    model = pl.HookedViT.from_pretrained("clutter-digits-shortcut-vit")
    on = generate(8, split="test", seed=7, shortcut="on")
    off = generate(8, split="test", seed=7, shortcut="off")
    return model, model.preprocess(on.images), model.preprocess(off.images), on.labels


def test_exact_equals_naive_on_the_zoo(shortcut):
    model, clean, corr, labels = shortcut
    m = pl.HookedViT.from_pretrained("clutter-digits-shortcut-vit").double()
    clean, corr = clean[:2].double(), corr[:2].double()
    metric = pl.metrics.logit(labels[:2])
    g = Graph.from_model(m, tokens={"marker": (0, 0)})
    ids = torch.arange(0, g.n_edges, 43)          # 28 edges, every receiver kind and layer
    from patchlens.circuits.attribute import exact_effects, sender_outputs

    delta = sender_outputs(m, g, corr) - sender_outputs(m, g, clean)
    with torch.no_grad():
        got = exact_effects(m, g, clean, delta, metric, dict(progress=False), ids) - metric(m(clean))
    ref = naive_exact(m, g, clean, corr, metric, edges=ids.tolist())
    assert torch.allclose(got, ref, atol=1e-10, rtol=0)
    assert got.abs().max() > 1e-2


def test_shortcut_marker_circuit(shortcut):
    """The marker's effect (marker on vs off) is carried by <= 10% of the edges."""
    model, clean, corr, labels = shortcut
    metric = pl.metrics.logit(labels)
    g = Graph.from_model(model)
    scores = edge_scores(model, clean, corr, metric, method="eap-ig", graph=g)
    circuit = Circuit.top_k(scores, g.n_edges // 10)
    ev = evaluate(model, circuit, clean, corr, metric)
    assert ev.faithfulness >= 0.9, ev
    no_stray_hooks(model)


@pytest.mark.filterwarnings("ignore:.*divergent-pernicious")
def test_diagnose_ablated_runs(shortcut):
    from patchlens.diagnostics import Reference

    model, clean, corr, labels = shortcut
    natural = model.preprocess(generate(48, split="train", seed=3, shortcut="train").images)
    ref = Reference.fit(model, natural, ["mlp_in"], max_samples=300, progress=False)
    metric = pl.metrics.logit(labels[:4])
    g = Graph.from_model(model)
    scores = edge_scores(model, clean[:4], corr[:4], metric, graph=g)
    circuit = Circuit.top_k(scores, 60)
    ev = evaluate(model, circuit, clean[:4], corr[:4], metric, ablation="mean",
                  reference=natural[:16], diagnose=ref)
    rep = ev.divergence
    assert rep is not None and len(rep.dormant) == 2
    assert set(rep.to_pandas().label) == {"circuit", "all ablated"}
    assert set(rep.to_pandas().hook) <= {f"blocks.{l}.hook_mlp_in" for l in range(6)}
    assert "divergence" in repr(ev)
    with pytest.raises(pl.InputError, match="Reference fitted at the hooks"):
        ref2 = Reference.fit(model, natural[:8], ["resid_pre"], max_samples=100, progress=False,
                             scorers=False)
        evaluate(model, circuit, clean[:4], corr[:4], metric, diagnose=ref2)
    no_stray_hooks(model)
