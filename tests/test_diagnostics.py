"""Divergence diagnostics: known answers (Grant et al., arXiv 2511.04638), numpy/scipy
cross-checks and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import patchlens as pl
from patchlens.diagnostics import (
    THRESHOLDS,
    NaturalScorer,
    Reference,
    assess,
    counterfactual_latent_loss,
    dormant_units,
    local_pca_residual,
    null_fraction,
    ot_divergence,
)
from patchlens.diagnostics.measures import relu_layer
from patchlens.errors import InputError


def gaussian(n, d=16, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(99)) / d**0.5
    return torch.randn(n, d, generator=g) @ mix + shift


@pytest.fixture(scope="module")
def natural():
    return gaussian(1200, seed=1)


def test_held_out_natural_scores_as_natural(natural):
    held = gaussian(300, seed=2)
    r = ot_divergence(held, natural)
    assert 0.8 < r.ratio < 1.25  # documented bound (docs/divergence.md) for 300 vs 600/600
    out = assess(held, natural)
    assert out["verdict"] == "natural"
    assert out["outlier_rate"] < 0.06
    assert 40 < out["mahalanobis_pct"] < 60


def test_large_random_steering_is_divergent(natural):
    steer = 3 * torch.randn(16, generator=torch.Generator().manual_seed(3))
    out = assess(gaussian(300, seed=2) + steer, natural)
    assert out["ot_ratio"] > 1.5 and out["outlier_rate"] > 0.9
    assert out["verdict"].startswith("divergent")


def test_null_space_of_linear_readout_is_harmless(natural):
    W = torch.randn(3, 16, generator=torch.Generator().manual_seed(4))
    _, _, vh = torch.linalg.svd(W)
    null_dir = vh[-1] * 8  # W @ null_dir == 0
    held = gaussian(300, seed=2)
    patched = held + null_dir
    assert torch.allclose(patched @ W.T, held @ W.T, atol=1e-4)  # zero behavioural effect
    out = assess(patched, natural, readout=W, delta=patched - held,
                 downstream=lambda x: x @ W.T)
    assert out["verdict"] == "divergent-harmless"
    assert out["null_fraction"] > 0.999


def test_toy_relu_pernicious_unit():
    # paper, section 5: unit 3 is silent on every natural input; the mean-difference patch
    # flips the class as intended but turns it on.
    W = [[0.75, 0.25, 0, 0.5], [0, 1, 0, 0], [1, 1, -1, -1]]
    b = [-0.5, -0.5, 0]
    f = relu_layer(W, b)
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 2, (400, 2), generator=g).float()
    extra = torch.rand(400, 2, generator=g)
    natural = torch.cat([base, base + extra], 1)  # x2 >= x0, x3 >= x1
    assert f(natural)[:, 2].max() == 0
    delta = torch.tensor([0.5, 0.5, 0, -0.5])
    src = natural[(base.sum(1) == 0) & (extra.sum(1) < 1)]  # class-0 inputs
    mask = dormant_units(f(src + delta), f(natural).amax(0), f(natural).median(0).values)
    assert mask.tolist() == [False, False, True]
    out = assess(src + delta, natural, downstream=f)
    assert out["dormant"] == [2] and out["verdict"] == "divergent-pernicious"


def test_measures_match_numpy_scipy():
    from scipy.spatial import cKDTree
    from scipy.spatial.distance import mahalanobis
    from sklearn.covariance import LedoitWolf

    nat = gaussian(200, d=6, seed=5)
    x = gaussian(7, d=6, seed=6, shift=0.5)
    s = NaturalScorer(nat)
    sc = s.scores(x)
    z = lambda v: ((v - s.mean) / s.std).double().numpy()  # noqa: E731
    fit = s.fit.double().numpy()
    lw = LedoitWolf().fit(fit)
    ref_m = [mahalanobis(v, lw.location_, lw.precision_) for v in z(x)]
    np.testing.assert_allclose(sc["mahalanobis"].numpy(), ref_m, rtol=1e-4)
    d, _ = cKDTree(fit).query(z(x), k=1)
    np.testing.assert_allclose(sc["knn"].numpy(), d**2 / 6, rtol=1e-4)
    res = []
    for v in z(x):
        nb = fit[np.argsort(((fit - v) ** 2).sum(1))[:20]]
        mu = nb.mean(0)
        _, sv, vt = np.linalg.svd(nb - mu, full_matrices=False)
        k = int((np.cumsum(sv**2) / np.sum(sv**2) < 0.95).sum()) + 1
        r = v - mu
        res.append(((r - vt[:k].T @ (vt[:k] @ r)) ** 2).mean())
    np.testing.assert_allclose(sc["local_pca"].numpy(), res, rtol=1e-4)
    np.testing.assert_allclose(local_pca_residual(torch.as_tensor(z(x)).float(), s.fit),
                               res, rtol=1e-4)
    J = torch.randn(5, 3, 6, dtype=torch.float64)
    dl = torch.randn(5, 6, dtype=torch.float64)
    P = [np.linalg.pinv(j) @ j for j in J.numpy()]
    want = [1 - (p @ v) @ (p @ v) / (v @ v) for p, v in zip(P, dl.numpy())]
    np.testing.assert_allclose(null_fraction(dl, J).numpy(), want, rtol=1e-4)


def test_counterfactual_latent_loss():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    bb = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    want = ((a - bb) ** 2).mean() + (1 - torch.tensor([0.0, 1.0]).mean())
    assert torch.allclose(counterfactual_latent_loss(a, bb), want)
    with pytest.raises(InputError):
        counterfactual_latent_loss(a, bb[:1])


# ---- on a HookedViT ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_setup(tiny_cfg):
    torch.manual_seed(0)
    model = pl.HookedViT(tiny_cfg).eval()
    images = torch.randn(120, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = Reference.fit(model, images, ["resid_pre"], max_samples=800, batch_size=40,
                        progress=False)
    return model, images, ref


def test_sweep_with_diagnose(vit_setup, tmp_path):
    model, images, ref = vit_setup
    clean, corrupted = images[:3], images[3:6]
    res = pl.activation_patching(model, clean, corrupted, pl.metrics.logit_diff(0, 1),
                                 layers=[0, 2], tokens=[0, 1, 5], diagnose=ref)
    rep = res.divergence
    assert len(rep.variant_verdicts()) == 6
    df = rep.to_pandas()
    assert {"verdict", "outlier_rate", "null_fraction", "n_dormant"} <= set(df.columns)
    assert "variants" in rep.summary() and "\n" not in rep.summary()
    assert "divergence:" in repr(res)
    rep.plot()
    ref.save(tmp_path / "ref.safetensors")
    back = Reference.load(tmp_path / "ref.safetensors")
    assert back.hooks == ref.hooks
    assert torch.equal(back.natural(ref.hooks[0], "patches"), ref.natural(ref.hooks[0], "patches"))
    back.check_model(model)


def _assert_random_steering_divergent(model, images, ref, norm_scale: float) -> None:
    """A random vector added to every patch token at layer 1 is divergent, nearly every
    patched vector an outlier."""
    from patchlens.diagnostics import diagnose
    from patchlens.patching import Add, Site, Variant

    steer = norm_scale * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    v = [Variant([(Site("resid_pre", layers=1, tokens="patches"), Add(steer))], "steer")]
    rep = diagnose(model, images[:4], v, ref, ot=False)
    assert rep.variant_verdicts()[0].startswith("divergent")
    assert rep.rows[0]["outlier_rate"] > 0.9


def test_steering_sweep_is_divergent(vit_setup):
    _assert_random_steering_divergent(*vit_setup, norm_scale=50)


def test_bad_input(vit_setup, tiny_cfg):
    from patchlens.diagnostics import diagnose
    from patchlens.patching import Site, Variant, Zero

    model, images, ref = vit_setup
    v = [Variant([(Site("resid_mid", layers=0), Zero())], "z")]
    with pytest.raises(InputError, match="not in the reference"):
        diagnose(model, images[:2], v, ref)
    torch.manual_seed(5)
    other = pl.HookedViT(tiny_cfg).eval()
    with pytest.raises(InputError, match="another model"):
        diagnose(other, images[:2], [Variant([(Site("resid_pre", layers=0), Zero())])], ref)
    with pytest.raises(InputError, match="at least 42 natural vectors"):
        NaturalScorer(torch.randn(30, 4))
    with pytest.raises(InputError, match="at least 20 natural vectors"):
        ot_divergence(torch.randn(5, 4), torch.randn(10, 4))


# ---- calibration on the trained zoo model (docs/divergence.md, "Verdicts and thresholds") ------
@pytest.fixture(scope="module")
def zoo():
    from patchlens.zoo.clutter_digits import generate

    model = pl.HookedViT.from_pretrained("clutter-digits-vit").eval()
    x = model.preprocess(generate(200, split="train", seed=0).images)
    ref = Reference.fit(model, x, [("resid_pre", [1, 3])], max_samples=2000, progress=False)
    held = model.preprocess(generate(8, split="test", seed=5).images)
    return model, ref, held


def test_zoo_natural_inputs_are_natural(zoo):
    """Held-out natural images run unpatched (a self-patch is the unpatched run) stay within
    every downstream neuron's natural bound, and self-patches are `natural`."""
    from patchlens.diagnostics import diagnose
    from patchlens.patching import Interchange, Site, Variant

    model, ref, held = zoo
    v = [Variant([(Site("resid_pre", layers=l, tokens=t), Interchange(held))], (l, t))
         for l in (1, 3) for t in (0, 9, 30, 64)]
    v.append(Variant([(Site("resid_pre", layers=1), Interchange(held))], "all tokens"))
    rep = diagnose(model, held, v, ref, ot=False)
    assert rep.meta["target_dormant"] == []  # unpatched held-out images: no neuron beyond bound
    assert rep.variant_verdicts() == ["natural"] * len(v)
    assert max(r["outlier_rate"] for r in rep.rows) < 0.5
    # the dormant bound alone (without the "beyond the unpatched target" condition)
    bound = {l: ref.neurons[l]["patches"]["max"] + THRESHOLDS["dormant_margin"] * (
        ref.neurons[l]["patches"]["max"] - ref.neurons[l]["patches"]["median"]) for l in range(6)}
    names = [f"blocks.{l}.mlp.hook_post" for l in range(6)]
    with torch.inference_mode():
        _, cache = model.run_with_cache(held, names_filter=names, return_type=None)
    for l in range(6):
        assert not (cache[names[l]][:, 1:].amax((0, 1)) > bound[l]).any()


def test_zoo_random_steering_is_divergent(zoo):
    model, ref, held = zoo
    _assert_random_steering_divergent(model, held, ref, norm_scale=20)


def test_zoo_dormant_neurons_match_naive_loop(zoo):
    """The streamed dormant scan (per-chunk maxima in the engine's observers) lists exactly the
    neurons a naive per-variant `run_with_hooks` loop finds beyond max(bound, target)."""
    from patchlens.diagnostics import diagnose
    from patchlens.patching import Add, Scale, Site, Variant

    model, ref, held = zoo
    x = held[:3]
    steer = 6 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    v = [Variant([(Site("resid_pre", layers=l, tokens=t), Scale(s))], (l, t, s))
         for l in (1, 3) for t in (0, 20, "patches") for s in (1.0, 8.0)]
    v.append(Variant([(Site("resid_pre", layers=1, tokens="patches"), Add(steer))], "steer"))
    rep = diagnose(model, x, v, ref, ot=False, behaviour=False)
    m = THRESHOLDS["dormant_margin"]
    names = [f"blocks.{l}.mlp.hook_post" for l in range(6)]
    with torch.inference_mode():
        _, clean = model.run_with_cache(x, names_filter=names, return_type=None)
    n_found = 0
    for vi, var in enumerate(v):
        (site, iv), = var.pairs
        (rs,) = site.resolve(model, (8, 8))
        toks = rs.tokens

        def edit(act, hook, iv=iv, toks=toks):
            out = act.clone()
            sel = slice(None) if toks is None else toks
            out[:, sel] = (iv.alpha * act[:, sel] if isinstance(iv, Scale)
                           else act[:, sel] + iv.scale * iv.direction)
            return out

        with torch.inference_mode(), model.hooks(fwd_hooks=[(rs.hook, edit)]):
            _, cache = model.run_with_cache(x, names_filter=names, return_type=None)
        expected = set()
        for l in range(rs.layer, 6):
            for c, sl in (("prefix", slice(0, 1)), ("patches", slice(1, None))):
                r = ref.neurons[l][c]
                bound = r["max"] + m * (r["max"] - r["median"]).clamp_min(0) + 1e-6
                t = clean[names[l]][:, sl]
                thr = torch.maximum(bound, t + 1e-4 * (1 + t.abs()))
                hit = (cache[names[l]][:, sl] - thr).amax(1).amax(0) > 0
                expected |= {(l, int(u), c) for u in torch.nonzero(hit).flatten()}
        got = {(d["layer"], d["neuron"], d["class"]) for d in rep.dormant[vi]}
        assert got == expected, var.label
        n_found += len(got)
    assert n_found > 0  # the large edits do switch on dormant neurons
    assert rep.dormant[0] == [] and rep.dormant[6] == []  # Scale(1.0) changes nothing


def test_site_sinkhorn_needs_enough_patched_vectors(zoo):
    """A (site, class) with fewer than MIN_OT patched vectors gets no Sinkhorn ratio (NaN and a
    note saying how many are needed); one with enough gets a finite ratio."""
    from patchlens.diagnostics import diagnose
    from patchlens.diagnostics.measures import MIN_OT
    from patchlens.patching import Interchange, Site, Variant

    model, ref, held = zoo
    v = [Variant([(Site("resid_pre", layers=1, tokens=t), Interchange(held[:4]))], t)
         for t in range(6)]  # prefix: 4 vectors; patches: 5 tokens x 4 images = 20
    rep = diagnose(model, held[4:8], v, ref)
    by_class = {o["class"]: o for o in rep.ot}
    assert by_class["prefix"]["n"] == 4 < MIN_OT and math.isnan(by_class["prefix"]["ratio"])
    assert f"at least {MIN_OT}" in by_class["prefix"]["note"]
    assert by_class["patches"]["n"] == 20 and math.isfinite(by_class["patches"]["ratio"])
